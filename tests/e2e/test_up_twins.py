"""Twins through ``fieldmesh up`` on both doors: a desired change through the REST API reaches a device
over MQTT, its report comes back into the twin, a device that connects later converges from ``get``,
and the gateway lets twin topics be (nothing dead-lettered)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from fmtest.procs import Up

pytestmark = pytest.mark.integration


def _patch(up: Up, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{up.http_port}/api/v1{path}", data=json.dumps(body).encode(),
                                 method="PATCH", headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=10) as r:
        out: dict[str, Any] = json.loads(r.read())
        return out


class Device:
    def __init__(self, port: int, device_id: str) -> None:
        self.id = device_id
        self.got: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        sub = threading.Event()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"d-{device_id}", protocol=mqtt.MQTTv311)
        self.c.on_connect = lambda c, u, f, rc, p=None: c.subscribe([(f"devices/{device_id}/twin/delta", 1)])
        self.c.on_subscribe = lambda *a: sub.set()
        self.c.on_message = lambda c, u, m: self._got(json.loads(m.payload))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert sub.wait(10)

    def _got(self, doc: dict[str, Any]) -> None:
        with self.lock:
            self.got.append(doc)

    def wait(self, pred: Any, what: str, timeout_s: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                found = [d for d in self.got if pred(d)]
            if found:
                return found[-1]
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: got {self.got}")

    def send(self, leaf: str, body: dict[str, Any]) -> None:
        self.c.publish(f"devices/{self.id}/twin/{leaf}", json.dumps(body).encode(), qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.mark.parametrize("door", ["nats", "mosquitto"])
def test_twins_through_up(tmp_path: Path, door: str) -> None:
    prefix = f"tw{uuid.uuid4().hex[:6]}"
    up = Up(tmp_path / "data", "--door", door, "--no-lake").start()
    devices: list[Device] = []
    try:
        assert up.get("/health")["twins"] == "ok"
        dev = Device(up.mqtt_port, f"{prefix}-1")
        devices.append(dev)
        twin = _patch(up, f"/devices/{dev.id}/twin/desired", {"desired": {"mode": "window", "window_ms": 5000}})
        assert twin["version"] == 1
        pushed = dev.wait(lambda d: d.get("status") == "desired", "the pushed delta")
        assert pushed["delta"] == {"mode": "window", "window_ms": 5000}
        dev.send("reported", {"state": {"mode": "window", "window_ms": 5000}, "client_token": "t1"})
        ans = dev.wait(lambda d: d.get("client_token") == "t1", "the answer to the report")
        assert ans["status"] == "accepted" and ans["delta"] == {} and ans["version"] == 2
        got = up.get(f"/devices/{dev.id}/twin")
        assert got["reported"] == {"mode": "window", "window_ms": 5000} and got["delta"] == {}
        # a device that was never connected: changed first, then it connects and asks
        _patch(up, f"/devices/{prefix}-2/twin/desired", {"desired": {"threshold": 3.5}}, {"If-Match": '"0"'})
        late = Device(up.mqtt_port, f"{prefix}-2")
        devices.append(late)
        late.send("get", {"client_token": "g"})
        assert late.wait(lambda d: d.get("client_token") == "g", "the get answer")["delta"] == {"threshold": 3.5}
        # a bad report is answered and counted: /stats and /metrics
        dev.c.publish(f"devices/{dev.id}/twin/reported", b"{not json", qos=1).wait_for_publish(10)
        stats = up.wait_for(lambda s: (s.get("twins") or {}).get("rejected", {}).get("bad_json") == 1)
        assert stats["twins"]["reported"] == 1 and stats["twins"]["gets"] == 1, stats["twins"]
        assert stats["twins"]["desired_published"] >= 2 and stats["twins"]["state"] == "connected"
        with urllib.request.urlopen(f"http://127.0.0.1:{up.http_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'fieldmesh_twin_rejected_total{reason="bad_json"} 1.0' in metrics
        assert 'fieldmesh_twin_messages_total{kind="reported"} 1.0' in metrics
        # the gateway took the twin topics as side topics: nothing dead-lettered
        stats = up.wait_for(lambda s: sum(s["lag"].values()) == 0)
        assert stats["dead_lettered"]["total"] == 0, stats
    finally:
        for d in devices:
            d.close()
        assert up.stop() == 0, up.tail()
