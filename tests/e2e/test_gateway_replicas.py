"""Several stand-alone gateways share one MQTT 5 broker's devices through a shared subscription."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from e2e.dataset import make_stream
from e2e.test_external_mqtt import mosquitto  # noqa: F401 - fixture
from fieldmesh.runtime.natsserver import EmbeddedNats
from fieldmesh.store import load_store
from fmtest import oracle
from fmtest.mqtt import assert_sessions_gone
from fmtest.procs import publish_all, publisher

pytestmark = pytest.mark.integration


def test_two_gateways_share_the_devices_and_the_totals_are_exact(tmp_path: Path, mosquitto):  # noqa: F811
    prefix = f"gr{uuid.uuid4().hex[:6]}"
    # Clean sessions (expiry 0): nothing is left queueing at the shared broker after the test.
    env = {**os.environ, "FIELDMESH__GATEWAY__SHARE_GROUP": f"g{prefix}", "FIELDMESH__GATEWAY__SESSION_EXPIRY_S": "0"}
    nats = EmbeddedNats(store_dir=tmp_path / "nats")
    nats.start()
    store_url = f"sqlite:///{tmp_path}/store.db"
    fm = [sys.executable, "-m", "fieldmesh"]
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        for i in range(2):
            log = open(tmp_path / f"gw{i}.log", "wb")  # noqa: SIM115
            logs.append(tmp_path / f"gw{i}.log")
            procs.append(subprocess.Popen(
                [*fm, "gateway", "--bus-url", nats.url, "--mqtt-url", f"mqtt://{mosquitto[0]}:{mosquitto[1]}",
                 "--client-id", f"{prefix}-gw{i}"], stdout=log, stderr=subprocess.STDOUT, env=env))
        procs.append(subprocess.Popen([*fm, "process", "--bus-url", nats.url, "--store-url", store_url],
                                      stdout=open(tmp_path / "proc.log", "wb"),  # noqa: SIM115
                                      stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + 30
        while not all("gateway running" in p.read_text() for p in logs):
            assert time.monotonic() < deadline, [p.read_text() for p in logs]
            time.sleep(0.2)
        time.sleep(0.5)  # subscriptions settle
        stream = make_stream(prefix, devices=10, per_device=60, seed=9)
        c = publisher(mosquitto[1], v5=True)
        publish_all(c, stream["messages"])
        c.disconnect()
        uniq = oracle.unique_readings(stream["sent"])
        deadline = time.monotonic() + 60
        while True:
            try:
                st = load_store(store_url, readonly=True).stats()
            except Exception:
                st = None
            if st is not None and st.stored + st.duplicates >= len(stream["sent"]):
                break
            assert time.monotonic() < deadline, st
            time.sleep(0.3)
        assert (st.stored, st.duplicates) == (len(uniq), len(stream["sent"]) - len(uniq))
        for p in procs[:2]:
            p.send_signal(signal.SIGTERM)
            p.wait(30)
        handled = []
        for p in logs:
            line = next(x for x in p.read_text().splitlines() if "stopped:" in x)
            handled.append(int(line.split("stopped:")[1].split("messages")[0]))
        assert all(n > 0 for n in handled), handled  # both replicas took part
        assert sum(handled) == len(stream["messages"])  # and each message went to exactly one
        assert_sessions_gone([f"{prefix}-gw0", f"{prefix}-gw1", c._client_id.decode()], *mosquitto)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        nats.stop()
