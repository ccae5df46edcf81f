"""A burst through a Mosquitto with stock queue settings reaches the store exactly (issue 8, 4a).

Mosquitto 2.0 as shipped sends a subscriber at most ``max_inflight_messages`` (20) unacknowledged
QoS 1 messages, queues 1,000 more, and drops the rest ("Outgoing messages are being dropped").
An MQTT 5 subscriber's CONNECT Receive Maximum replaces that 20, so the gateway asks for 65,535
and holds the burst itself until the bus has it.

The gateway is paused (SIGSTOP) while the burst arrives, so the case does not depend on how fast
this machine happens to be: a gateway busy for a moment (a slow bus, a starved CPU) is exactly when
a burst hits the broker's limits. Before the fix: 1,020 of 4,000 stored, the broker logged drops.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fieldmesh.runtime.natsserver import EmbeddedNats
from fieldmesh.store import load_store
from fmtest.faults import FaultReport
from fmtest.mqtt import PrivateMosquitto

pytestmark = pytest.mark.integration

BURST = 4_000  # well over the 1,260 of the issue, and over 20 + 1,000 (what stock limits keep)
DEVICES = 20


def _messages(prefix: str) -> list[tuple[str, bytes]]:
    now = int(time.time() * 1000)
    out = []
    for i in range(BURST // DEVICES):
        for d in range(DEVICES):
            dev = f"{prefix}-{d:02d}"
            body = {"device_id": dev, "ts": now - 60_000 + i, "seq": i, "boot_id": "b",
                    "measurements": {"temperature": 20.0 + i % 7}}
            out.append((f"devices/{dev}/telemetry", json.dumps(body).encode()))
    return out


def test_burst_through_stock_mosquitto_is_stored_exactly(tmp_path: Path) -> None:
    broker = PrivateMosquitto(tmp_path / "mosquitto")
    nats = EmbeddedNats(store_dir=tmp_path / "nats")
    nats.start()
    store_url = f"sqlite:///{tmp_path}/store.db"
    fm = [sys.executable, "-m", "fieldmesh"]
    env = {**os.environ, "FIELDMESH__GATEWAY__SHARE_GROUP": "burst"}
    gw_log = tmp_path / "gw.log"
    procs = [
        subprocess.Popen([*fm, "gateway", "--bus-url", nats.url, "--mqtt-url", broker.url, "--client-id", "burst-gw"],
                         stdout=gw_log.open("wb"), stderr=subprocess.STDOUT, env=env),
        subprocess.Popen([*fm, "process", "--bus-url", nats.url, "--store-url", store_url],
                         stdout=(tmp_path / "proc.log").open("wb"), stderr=subprocess.STDOUT, env=env),
    ]
    try:
        deadline = time.monotonic() + 30
        while "gateway running" not in gw_log.read_text():
            assert procs[0].poll() is None and time.monotonic() < deadline, gw_log.read_text()
            time.sleep(0.1)
        time.sleep(0.5)  # the subscription is in place
        msgs = _messages(f"burst{uuid.uuid4().hex[:6]}")
        pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=f"burst-pub-{os.getpid()}")
        pub.max_inflight_messages_set(1000)  # as fast as it can: the broker's own limit paces it
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()
        procs[0].send_signal(signal.SIGSTOP)  # the gateway stalls while the burst arrives
        infos = [pub.publish(t, p, qos=1) for t, p in msgs]
        for i in infos:
            i.wait_for_publish(60)
        acked = sum(i.is_published() for i in infos)
        procs[0].send_signal(signal.SIGCONT)
        pub.disconnect()
        pub.loop_stop()

        stored = dups = -1
        last, last_change = -1, time.monotonic()
        while stored + dups < len(msgs) and time.monotonic() - last_change < 15:
            time.sleep(0.3)
            try:
                st = load_store(store_url, readonly=True).stats()
            except Exception:  # the processor may be creating the schema
                continue
            stored, dups = st.stored, st.duplicates
            if stored + dups != last:
                last, last_change = stored + dups, time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        procs[0].wait(30)
        FaultReport("burst through stock Mosquitto", sent=len(msgs), acknowledged=acked, stored=stored,
                    duplicates=dups, counted_losses={"mosquitto_dropped_log_lines": broker.dropped_lines()}).show()
        assert acked == len(msgs)
        assert broker.dropped_lines() == 0, broker.log_text()[-2000:]
        assert (stored, dups) == (len(msgs), 0), gw_log.read_text()[-2000:]
        handled = next(ln for ln in gw_log.read_text().splitlines() if "stopped:" in ln)
        assert f"stopped: {len(msgs)} messages" in handled
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
        nats.stop()
        broker.stop()
