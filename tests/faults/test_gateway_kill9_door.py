"""The Mosquitto door: a gateway killed (-9) between receiving messages and writing them to the bus
loses nothing Mosquitto acknowledged to a device.

The gateway PUBACKs a message to Mosquitto only after the bus acknowledged what it derived from it
(its PUBACKs of a batch go out as one write). Here the bus (nats-server) is frozen with SIGSTOP, so
the gateway receives a second round of messages (Mosquitto has PUBACKed them to the devices) but cannot
write them; it is then killed with SIGKILL. The restarted gateway, under the same client id, gets
them again from its persistent session at Mosquitto, and every reading is stored once. Devices
publish JSON over MQTT 3.1.1 (the gateway's short path for plain PUBLISH packets) and msgpack over
MQTT 5, announced by the content type, with a user property (paho's full path): both kinds must come
back, the msgpack ones with their content type (without it they would be dead-lettered).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fieldmesh.runtime.mosquitto import MAX_INFLIGHT, MAX_QUEUED
from fieldmesh.runtime.natsserver import EmbeddedNats
from fieldmesh.store import load_store
from fmtest.faults import FaultReport
from fmtest.mqtt import PrivateMosquitto

pytestmark = pytest.mark.integration

DEVICES = 20
ROUND = 1_500  # messages per round, one reading each


def _round(prefix: str, k: int) -> list[tuple[str, bytes]]:
    """One round; the odd messages are msgpack (sent over MQTT 5 with their content type)."""
    now = int(time.time() * 1000)
    out: list[tuple[str, bytes]] = []
    for i in range(ROUND // DEVICES):
        for d in range(DEVICES):
            dev = f"{prefix}-{d:02d}"
            seq = k * ROUND + i
            body = {"device_id": dev, "ts": now - 60_000 + seq, "seq": seq, "boot_id": "b",
                    "measurements": {"temperature": 20.0 + seq % 7}}
            enc = msgspec.msgpack.encode if len(out) % 2 else msgspec.json.encode
            out.append((f"devices/{dev}/telemetry", enc(body)))
    return out


def _publish(msgs: list[tuple[str, bytes]], port: int) -> int:
    """Publish the odd messages over MQTT 5 (content type msgpack, a user property), the rest over
    3.1.1; return how many Mosquitto acknowledged."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/msgpack"
    props.UserProperty = ("firmware", "1.2.3")
    clients = []
    for proto in (mqtt.MQTTv311, mqtt.MQTTv5):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=proto,
                        client_id=f"k9-{proto}-{uuid.uuid4().hex[:6]}")
        c.max_inflight_messages_set(1000)
        c.connect("127.0.0.1", port)
        c.loop_start()
        clients.append(c)
    infos = [clients[i % 2].publish(t, p, qos=1, properties=props if i % 2 else None)
             for i, (t, p) in enumerate(msgs)]
    for i in infos:
        i.wait_for_publish(60)
    for c in clients:
        c.disconnect()
        c.loop_stop()
    return sum(i.is_published() for i in infos)


def _stored(store_url: str) -> tuple[int, int]:
    try:
        st = load_store(store_url, readonly=True).stats()
    except Exception:  # the processor may be creating the schema
        return -1, -1
    return st.stored, st.duplicates


def _wait_stored(store_url: str, n: int, timeout_s: float = 90) -> tuple[int, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        stored, dups = _stored(store_url)
        if stored >= n or time.monotonic() > deadline:
            return stored, dups
        time.sleep(0.2)


def test_gateway_killed_between_receive_and_bus_write_loses_nothing(tmp_path: Path) -> None:
    broker = PrivateMosquitto(tmp_path / "mosquitto", extra=f"max_queued_messages {MAX_QUEUED}\n"
                              f"max_inflight_messages {MAX_INFLIGHT}\nautosave_interval 1\n")
    nats = EmbeddedNats(store_dir=tmp_path / "nats")
    nats.start()
    assert nats.proc is not None
    store_url = f"sqlite:///{tmp_path}/store.db"
    fm = [sys.executable, "-m", "fieldmesh"]
    # the door's gateway: a plain subscription and a persistent session under a stable client id
    env = {**os.environ, "FIELDMESH__GATEWAY__SHARE_GROUP": ""}
    client_id = f"k9-gw-{uuid.uuid4().hex[:6]}"

    def gateway(n: int) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / f"gw{n}.log"
        p = subprocess.Popen([*fm, "gateway", "--bus-url", nats.url, "--mqtt-url", broker.url,
                              "--client-id", client_id], stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while "gateway running" not in log.read_text():
            assert p.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        return p, log

    gw, gw_log = gateway(1)
    proc = subprocess.Popen([*fm, "process", "--bus-url", nats.url, "--store-url", store_url],
                            stdout=(tmp_path / "proc.log").open("wb"), stderr=subprocess.STDOUT, env=env)
    procs = [gw, proc]
    try:
        time.sleep(0.5)  # the subscription is in place
        prefix = f"k9{uuid.uuid4().hex[:6]}"
        first, second = _round(prefix, 0), _round(prefix, 1)
        acked = _publish(first, broker.port)
        assert _wait_stored(store_url, len(first))[0] == len(first)  # the first round went through

        os.kill(nats.proc.pid, signal.SIGSTOP)  # the bus takes nothing from now on
        try:
            acked += _publish(second, broker.port)  # Mosquitto PUBACKs them and sends them to the gateway
            time.sleep(2)  # the gateway has them (its Receive Maximum is 65,535) and is stuck writing them
            gw.kill()  # SIGKILL between receiving and the bus write
            gw.wait()
        finally:
            os.kill(nats.proc.pid, signal.SIGCONT)
        gw, gw_log = gateway(2)  # same client id: Mosquitto sends its session's un-acknowledged messages
        procs[0] = gw
        stored, dups = _wait_stored(store_url, len(first) + len(second))
        time.sleep(1)  # anything more would be a double count
        stored, dups = _stored(store_url)
        gw.send_signal(signal.SIGTERM)
        gw.wait(30)
        total = len(first) + len(second)
        FaultReport("gateway kill -9 between receive and bus write, Mosquitto door", sent=total,
                    acknowledged=acked, stored=stored, duplicates=dups,
                    counted_losses={"mosquitto_dropped_log_lines": broker.dropped_lines()}).show()
        assert acked == total
        assert stored == total, (gw_log.read_text()[-2000:], (tmp_path / "gw1.log").read_text()[-2000:])
        # the restarted gateway had the second round again from Mosquitto (or the part of it the killed
        # one had not PUBACKed); what the killed one had in JetStream already comes again as duplicates
        handled = next(ln for ln in gw_log.read_text().splitlines() if "stopped:" in ln)
        again = int(handled.split("stopped: ")[1].split(" messages")[0])
        assert len(second) <= again <= len(second) + dups, handled
        assert "rejected {}" in handled, handled  # no msgpack message lost its content type on the way
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        nats.stop()
        broker.stop()
