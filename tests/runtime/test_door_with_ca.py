"""The whole path with fieldmesh's own CA: ``fieldmesh ca init`` and ``server-cert``, a device registered
and provisioned through the running ``up``'s API (``fieldmesh edge provision``), then publishing through
the mutual-TLS door; ``fieldmesh ca revoke --device`` closes its connection within seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmtest.door import Probe, telemetry, tls_context
from fmtest.procs import Up, free_port

pytestmark = pytest.mark.integration


def _fm(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "fieldmesh", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@pytest.mark.parametrize("kind", ["nats", "mosquitto"])
def test_provisioned_device_through_the_mtls_door(kind: str, tmp_path: Path) -> None:
    d = tmp_path / "data"
    _fm("ca", "init", "--data-dir", str(d))
    _fm("ca", "server-cert", "--host", "127.0.0.1", "--data-dir", str(d))
    _fm("devices", "add", "pump-1", "--data-dir", str(d))
    token = json.loads(_fm("ca", "token", "pump-1", "--data-dir", str(d), "--json"))["token"]
    ca = d / "ca"
    tls_port = free_port()
    up = Up(d, "--door", kind, "--mqtt-tls-port", str(tls_port), "--mqtt-tls-cert", str(ca / "server.pem"),
            "--mqtt-tls-key", str(ca / "server.key"), "--mqtt-ca", str(ca / "ca.pem"), "--require-client-cert").start()
    try:
        dev = tmp_path / "device"
        _fm("edge", "provision", "--url", f"http://127.0.0.1:{up.http_port}", "--device-id", "pump-1",
            "--token", token, "--out", str(dev))
        ctx = tls_context(ca / "ca.pem", dev / "device.pem", dev / "device.key")
        deadline = time.monotonic() + 20  # the door takes the new certificate at its next registry poll
        while True:
            p = Probe(tls_port, ctx)
            if p.connect():
                break
            p.close()
            assert time.monotonic() < deadline, f"the provisioned device is not let in\n{up.tail()}"
            time.sleep(0.5)
        assert p.publish("devices/pump-1/telemetry", telemetry("pump-1", 21.5))
        up.wait_for(lambda s: s["received"] >= 1)
        t0 = time.monotonic()
        _fm("ca", "revoke", "--device", "pump-1", "--data-dir", str(d))
        while p.disconnected_at is None:
            assert time.monotonic() - t0 < 20, f"still connected after the revocation\n{up.tail()}"
            time.sleep(0.02)
        print(f"\n{kind} door: 'fieldmesh ca revoke' to a closed connection: {p.disconnected_at - t0:.2f} s "
              "(the command's own start-up included)")
        p.close()
        time.sleep(1.5)  # a Mosquitto door restarts with the new CRL
        again = Probe(tls_port, ctx)
        assert not again.connect()
        again.close()
    finally:
        assert up.stop() == 0, up.tail()
