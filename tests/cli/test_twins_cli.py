"""``fieldmesh twins get|delta|set-desired`` on a real store."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fieldmesh.cli.main import app
from fieldmesh.store.access import AccessStore
from fieldmesh.store.twins import TwinStore


def test_twins_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    run = CliRunner()
    r = run.invoke(app, ["twins", "set-desired", "pump-1", '{"mode": "window", "window_ms": 5000}', "--store-url", url])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["version"] == 1
    s = TwinStore(url)
    s.update_reported("pump-1", {"mode": "window"})
    s.close()
    r = run.invoke(app, ["twins", "delta", "pump-1", "--store-url", url])
    assert r.exit_code == 0 and json.loads(r.stdout)["delta"] == {"window_ms": 5000}
    r = run.invoke(app, ["twins", "get", "pump-1", "--store-url", url])
    doc = json.loads(r.stdout)
    assert doc["reported"] == {"mode": "window"} and doc["version"] == 2
    stale = run.invoke(app, ["twins", "set-desired", "pump-1", '{"mode": null}', "--version", "1", "--store-url", url])
    assert stale.exit_code == 3 and "version 2" in stale.output
    bad = run.invoke(app, ["twins", "set-desired", "pump-1", "{nope", "--store-url", url])
    assert bad.exit_code == 2 and "not JSON" in bad.output
    big = run.invoke(app, ["twins", "set-desired", "pump-1", json.dumps({"x": "y" * 9000}), "--store-url", url])
    assert big.exit_code == 2 and "8192" in big.output
    ok = run.invoke(app, ["twins", "set-desired", "pump-1", '{"mode": null}', "--version", "2", "--store-url", url])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["desired"] == {"window_ms": 5000}
    audit = AccessStore(url)
    try:
        actors = {e.actor for e in audit.audit_log() if e.action == "twin.desired"}
    finally:
        audit.close()
    assert len(actors) == 1 and next(iter(actors)).startswith("cli:")


def test_twins_serve_against_a_broker(tmp_path: Path) -> None:
    """``fieldmesh twins serve`` (the service for an external broker) on the local Mosquitto: a report is
    applied and answered; SIGTERM stops it cleanly. Its session is removed at the end."""
    import os
    import secrets
    import signal
    import subprocess
    import sys
    import threading
    import time

    import paho.mqtt.client as mqtt
    import pytest

    url = f"sqlite:///{tmp_path}/s.db"
    cid = f"fm-twins-test-{secrets.token_hex(3)}"
    dev = f"tcli-{secrets.token_hex(3)}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "fieldmesh", "twins", "serve", "--mqtt-url", "mqtt://127.0.0.1:1883",
                             "--client-id", cid, "--store-url", url], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    got: list[dict[str, object]] = []
    sub = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"d-{dev}", protocol=mqtt.MQTTv311)
    c.on_connect = lambda cl, u, f, rc, p=None: cl.subscribe(f"devices/{dev}/twin/delta", 1)
    c.on_subscribe = lambda *a: sub.set()
    c.on_message = lambda cl, u, m: got.append(json.loads(m.payload))
    try:
        c.connect("127.0.0.1", 1883)
        c.loop_start()
        assert sub.wait(10)
        deadline = time.monotonic() + 30
        while not got:  # the service may still be starting: ask until it answers
            assert time.monotonic() < deadline and proc.poll() is None, "the service did not answer"
            c.publish(f"devices/{dev}/twin/reported", json.dumps({"state": {"fw": "3"}, "client_token": "k"}), qos=1)
            time.sleep(0.5)
        assert got[0]["status"] == "accepted" and got[0]["client_token"] == "k"
        s = TwinStore(url)
        assert s.get(dev).reported == {"fw": "3"}
        s.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert '"reported": ' in out  # its counters, logged at the stop
    finally:
        c.loop_stop()
        c.disconnect()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        drop = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=True,
                           protocol=mqtt.MQTTv311)
        try:
            drop.connect("127.0.0.1", 1883)
            drop.disconnect()
        except OSError:
            pytest.fail("the local Mosquitto (1883) is not reachable")
