"""``fieldmesh up --door mosquitto``: MQTT 5 devices through a private Mosquitto, exactly once.

The door is the embedded default's alternative to nats-server's MQTT 3.1.1 listener (which
answers ``mosquitto_pub -V mqttv5`` with "Unsupported Protocol Version").
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from e2e.dataset import make_stream
from e2e.test_up import check_exact
from fieldmesh.core.errors import ConfigError
from fieldmesh.runtime.mosquitto import mosquitto_config, resolve_door
from fmtest.faults import FaultReport
from fmtest.mqtt import check_stored_once
from fmtest.procs import Up

pytestmark = pytest.mark.integration


def _v5_publisher(port: int) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=f"v5-{uuid.uuid4().hex[:8]}")
    c.max_inflight_messages_set(200)
    c.connect("127.0.0.1", port)
    c.loop_start()
    deadline = time.monotonic() + 10
    while not c.is_connected():  # the CONNACK
        assert time.monotonic() < deadline, f"no CONNACK from 127.0.0.1:{port}"
        time.sleep(0.02)
    return c


def _publish_v5(c: mqtt.Client, msgs: list[tuple[str, bytes]], *, during: Any = None) -> int:
    """Publish with MQTT 5 user properties (calling ``during()`` meanwhile); returns how many
    messages the broker acknowledged."""
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("firmware", "1.2.3")
    infos = [c.publish(t, p, qos=1, properties=props) for t, p in msgs]
    if during is not None:
        during()
    for i in infos:
        i.wait_for_publish(30)
    return sum(i.is_published() for i in infos)


def _worker_pid(up: Up, role: str, program: bytes = b"fieldmesh.runtime.worker") -> int:
    """The pid of ``up``'s child whose command line has ``program`` and the argument ``role``."""
    assert up.proc is not None
    seen = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == up.proc.pid:
            seen.append((d.name, stat.rsplit(")", 1)[1].split()[0], b" ".join(cmd)[:120]))
        if ppid == up.proc.pid and any(program in a for a in cmd) and role.encode() in cmd:
            return int(d.name)
    raise AssertionError(f"no {role} worker under {up.proc.pid}: {seen}")


def test_mqtt5_into_the_mosquitto_door_is_stored_exactly(tmp_path: Path) -> None:
    prefix = f"dm{uuid.uuid4().hex[:6]}"
    up = Up(tmp_path / "data", "--door", "mosquitto").start()
    try:
        assert "MQTT 3.1.1 and 5 by Mosquitto" in " ".join(up.tail().split())
        stream = make_stream(prefix, devices=6, per_device=40, seed=5)
        c = _v5_publisher(up.mqtt_port)
        acked = _publish_v5(c, stream["messages"])
        c.disconnect()
        assert acked == len(stream["messages"])
        # and the command-line client every Mosquitto user has, speaking MQTT 5 with a user property
        dev = f"{prefix}-cli"
        body = {"device_id": dev, "ts": int(time.time() * 1000) - 5000, "seq": 1, "measurements": {"t": 2.5}}
        r = subprocess.run(["mosquitto_pub", "-V", "mqttv5", "-p", str(up.mqtt_port), "-q", "1",
                            "-t", f"devices/{dev}/telemetry", "-m", json.dumps(body),
                            "-D", "publish", "user-property", "site", "plant-7"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        sent = [*stream["sent"], (dev, body)]
        check_exact(up, sent, {})
        st = up.get("/stats")
        FaultReport("MQTT 5 into the Mosquitto door (readings)", sent=len(sent), acknowledged=len(sent),
                    stored=st["stored"], duplicates=st["duplicates"]).show()
    finally:
        assert up.stop() == 0, up.tail()


def test_kill9_of_the_gateway_under_the_mosquitto_door_is_exact(tmp_path: Path) -> None:
    prefix = f"dk{uuid.uuid4().hex[:6]}"
    up = Up(tmp_path / "data", "--door", "mosquitto").start()
    try:
        stream = make_stream(prefix, devices=48, per_device=60, seed=11)
        msgs = stream["messages"]
        c = _v5_publisher(up.mqtt_port)
        gw = _worker_pid(up, "gateway")

        def kill_when_flowing() -> None:
            deadline = time.monotonic() + 30
            while up.get("/stats")["received"] == 0:
                assert time.monotonic() < deadline, up.tail()
                time.sleep(0.02)
            os.kill(gw, signal.SIGKILL)

        # While the gateway is down (until the supervisor restarts it) its persistent session at the
        # door keeps what devices send, and what it had received but not yet PUBACKed is sent again.
        acked = _publish_v5(c, msgs, during=kill_when_flowing)
        c.disconnect()
        assert acked == len(msgs)  # every message PUBACKed: all its readings are acknowledged
        deadline = time.monotonic() + 30
        while True:  # the supervisor restarts the gateway; it resumes its persistent session
            with contextlib.suppress(AssertionError):
                if _worker_pid(up, "gateway") != gw:
                    break
            assert time.monotonic() < deadline, up.tail()
            time.sleep(0.1)
        st = check_stored_once(up, stream["sent"])
        log = (up.data_dir / "logs" / "gateway.log").read_text()
        assert "session present True" in log, log
        FaultReport("kill -9 of the gateway, Mosquitto door (readings)", sent=len(stream["sent"]),
                    acknowledged=len(stream["sent"]),
                    stored=st["stored"], duplicates=st["duplicates"]).show()
    finally:
        assert up.stop() == 0, up.tail()


def test_kill9_of_the_mosquitto_door_restarts_it(tmp_path: Path) -> None:
    prefix = f"dr{uuid.uuid4().hex[:6]}"
    up = Up(tmp_path / "data", "--door", "mosquitto").start()
    try:
        stream = make_stream(prefix, devices=6, per_device=40, seed=13)
        msgs = stream["messages"]
        c = _v5_publisher(up.mqtt_port)
        assert _publish_v5(c, msgs[: len(msgs) // 2]) == len(msgs) // 2
        c.disconnect()
        up.wait_for(lambda s: s["received"] > 0 and sum(s["lag"].values()) == 0)
        time.sleep(1.5)  # the gateway PUBACKs reached Mosquitto, and its next autosave has them
        conf = str(up.data_dir / "mosquitto" / "mosquitto.conf")
        pid = _worker_pid(up, conf, program=b"mosquitto")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:  # the supervisor restarts the door on the same port
            with contextlib.suppress(AssertionError):
                if _worker_pid(up, conf, program=b"mosquitto") != pid:
                    break
            assert time.monotonic() < deadline, up.tail()
            time.sleep(0.1)
        while True:  # devices reconnect, possibly before the gateway does: its session queues for it
            with contextlib.suppress(OSError, AssertionError):
                c = _v5_publisher(up.mqtt_port)
                break
            assert time.monotonic() < deadline, up.tail()
            time.sleep(0.1)
        assert _publish_v5(c, msgs[len(msgs) // 2 :]) == len(msgs) - len(msgs) // 2
        c.disconnect()
        st = check_stored_once(up, stream["sent"])
        assert up.get("/health")["status"] == "ok"
        assert "mosquitto exited" in up.tail()
        FaultReport("kill -9 of the Mosquitto door, quiet (readings)", sent=len(stream["sent"]),
                    acknowledged=len(stream["sent"]), stored=st["stored"], duplicates=st["duplicates"]).show()
    finally:
        assert up.stop() == 0, up.tail()


def test_the_default_door_says_it_serves_mqtt_311_only(tmp_path: Path) -> None:
    up = Up(tmp_path / "data").start()
    try:
        line = " ".join(up.tail().split())
        assert "MQTT 3.1.1 by nats-server (PUBACK once JetStream stored the message; --door mosquitto" in line
        r = subprocess.run(["mosquitto_pub", "-V", "mqttv5", "-p", str(up.mqtt_port), "-q", "1",
                            "-t", "devices/x/telemetry", "-m", "{}"], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0  # what the start line warns about
    finally:
        assert up.stop() == 0, up.tail()


def test_door_choice_and_config() -> None:
    assert resolve_door("auto", external_mqtt=False) == "nats"  # PUBACK only after JetStream stored it
    assert resolve_door("mosquitto", external_mqtt=False) == "mosquitto"
    assert resolve_door("mosquitto", external_mqtt=True) == "external"
    with pytest.raises(ConfigError, match="--door"):
        resolve_door("emqx", external_mqtt=False)
    conf = mosquitto_config(port=1999, state_dir=Path("/x/m"))
    assert "listener 1999 127.0.0.1" in conf and "persistence_location /x/m/" in conf
    assert "max_queued_messages 1000000" in conf  # the stock 1,000 drops bursts
