"""Poison, oversized and unserved messages through a real ``fieldmesh up``: each costs only itself.

* a 20 KB payload nested 10,000 levels, then 20 valid readings: the 20 are stored, the poison is
  dead-lettered as ``too_deep``, the gateway is never restarted (it crash-looped before);
* payloads over the gateway's limit (256 KiB) and over nats-server's former 8 MB limit (up to 31 MiB): counted as
  ``too_large``, dead-lettered with the first 64 KiB, and the publisher's connection stays up (it was
  closed and nothing counted before);
* messages on unserved topics (``devices/x/other``, ``devices/x/telemetry.zst``, ``devices/../telemetry``):
  dead-lettered as ``unknown_topic`` with the topic as published, counted in ``unrouted`` (they vanished
  before); the edge agent's side topics are ignored, not dead-lettered.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from fmtest.faults import FaultReport
from fmtest.procs import Up, publish_all, publisher

pytestmark = pytest.mark.integration


def _readings(dev: str, n: int) -> list[tuple[str, bytes]]:
    now = int(time.time() * 1000)
    return [(f"devices/{dev}/telemetry",
             json.dumps({"ts": now - 10_000 + i, "seq": i, "measurements": {"t": float(i)}}).encode())
            for i in range(n)]


def _restarts(up: Up) -> int:
    log = (up.data_dir.parent / f"{up.data_dir.name}-up.log").read_text(errors="replace")
    return log.count("restarting")


def _metrics(up: Up) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{up.http_port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def test_poison_message_costs_only_itself(tmp_path: Path):
    dev = f"poison{uuid.uuid4().hex[:6]}"
    poison = (f"devices/{dev}/telemetry", b"[" * 10_000 + b"]" * 10_000)
    valid = _readings(dev, 20)
    up = Up(tmp_path / "data").start()
    try:
        c = publisher(up.mqtt_port)
        publish_all(c, [poison, *valid])
        stats = up.wait_for(lambda s: s["received"] >= 21 and sum(s["lag"].values()) == 0, timeout_s=45)
        dl = up.get("/dlq?reason=too_deep&limit=5")
        report = FaultReport("poison: 10,000-deep JSON then 20 readings", sent=21, acknowledged=21,
                             stored=stats["stored"], duplicates=stats["duplicates"],
                             counted_losses={k: v for k, v in stats["dead_lettered"].items() if k != "total"})
        report.show()
        assert stats["stored"] == 20, stats
        assert stats["dead_lettered"] == {"total": 1, "too_deep": 1}, stats
        assert [(d["topic"], d["device_id"]) for d in dl] == [(f"devices/{dev}/telemetry", dev)]
        assert len(up.get(f"/telemetry/raw?device_id={dev}&limit=100")) == 20
        assert _restarts(up) == 0, up.tail()
        assert "Traceback" not in (up.data_dir / "logs" / "gateway.log").read_text(errors="replace")
        c.disconnect()
    finally:
        assert up.stop() == 0, up.tail()


def test_oversized_messages_are_counted_and_truncated(tmp_path: Path):
    dev = f"big{uuid.uuid4().hex[:6]}"
    topic = f"devices/{dev}/telemetry"
    big = [(topic, b"[" + b" " * (300 * 1024) + b"]"), (topic, b"[" + b" " * (9 * 1024 * 1024) + b"]"),
           (topic, b"x" * (31 * 1024 * 1024))]
    valid = _readings(dev, 5)
    up = Up(tmp_path / "data").start()
    try:
        c = publisher(up.mqtt_port)
        publish_all(c, [*big, *valid])  # each one acknowledged (PUBACK): nats-server took them
        assert c.is_connected()
        stats = up.wait_for(lambda s: s["received"] >= 8 and sum(s["lag"].values()) == 0, timeout_s=45)
        report = FaultReport("oversized: 300 KiB, 9 MiB, 31 MiB, then 5 readings", sent=8, acknowledged=8,
                             stored=stats["stored"], duplicates=stats["duplicates"],
                             counted_losses={k: v for k, v in stats["dead_lettered"].items() if k != "total"})
        report.show()
        assert stats["stored"] == 5, stats
        assert stats["dead_lettered"] == {"total": 3, "too_large": 3}, stats
        rows = up.get("/dlq?reason=too_large&limit=10")
        assert len(rows) == 3 and all(r["truncated"] and r["topic"] == topic for r in rows), rows
        assert all(len(r["payload"]) <= 2 * 64 * 1024 for r in rows)  # utf-8 text or hex of 64 KiB
        assert 'fieldmesh_dead_letters_total{reason="too_large"} 3.0' in _metrics(up)
        assert _restarts(up) == 0, up.tail()
        c.disconnect()
    finally:
        assert up.stop() == 0, up.tail()


def test_unserved_topics_are_dead_lettered_and_counted(tmp_path: Path):
    dev = f"top{uuid.uuid4().hex[:6]}"
    body = _readings(dev, 1)[0][1]
    unserved = [f"devices/{dev}/other", f"devices/{dev}/telemetry.zst", "devices/../telemetry",
                f"devices/{dev}/telemetry/a/b"]
    side = [f"devices/{dev}/state", f"devices/{dev}/anomalies"]  # the edge agent's: ignored
    valid = _readings(dev, 3)
    up = Up(tmp_path / "data").start()
    try:
        c = publisher(up.mqtt_port)
        publish_all(c, [*((t, body) for t in unserved + side), *valid])
        stats = up.wait_for(lambda s: s["received"] >= 7 and sum(s["lag"].values()) == 0, timeout_s=45)
        report = FaultReport("unserved topics: 4 unserved, 2 side topics, 3 readings", sent=9, acknowledged=9,
                             stored=stats["stored"], duplicates=stats["duplicates"],
                             counted_losses={k: v for k, v in stats["dead_lettered"].items() if k != "total"})
        report.show()
        assert stats["stored"] == 3, stats
        assert stats["unrouted"] == 4, stats
        assert stats["dead_lettered"] == {"total": 4, "unknown_topic": 4}, stats
        rows = up.get("/dlq?reason=unknown_topic&limit=10")
        assert sorted(r["topic"] for r in rows) == sorted(unserved)
        metrics = _metrics(up)
        assert "fieldmesh_messages_unrouted_total 4.0" in metrics
        assert 'fieldmesh_dead_letters_total{reason="unknown_topic"} 4.0' in metrics
        c.disconnect()
    finally:
        assert up.stop() == 0, up.tail()


def test_above_the_doors_max_payload_nothing_is_acknowledged(tmp_path: Path):
    """Over the embedded door's max_payload (just under JetStream's 32 MiB record limit) nothing is acknowledged.

    nats-server refuses the PUBLISH, logs ``maximum payload exceeded`` and closes the connection; the
    device gets no PUBACK (its client retries, refused each time). Nothing is acknowledged, so nothing
    acknowledged is lost; the door keeps serving everyone else.
    """
    import paho.mqtt.client as mqtt

    from fieldmesh.runtime.natsserver import MAX_PAYLOAD_BYTES, EmbeddedNats
    from fmtest.procs import free_port

    port = free_port()
    srv = EmbeddedNats(store_dir=tmp_path / "nats", mqtt_port=port)
    srv.start()
    try:
        disconnects: list[object] = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                        client_id=f"fmhuge{uuid.uuid4().hex[:6]}", clean_session=True)
        c.on_disconnect = lambda *a: disconnects.append(a)
        c.connect("127.0.0.1", port)
        c.loop_start()
        info = c.publish("devices/huge/telemetry", b"x" * (MAX_PAYLOAD_BYTES + 1024 * 1024), qos=1)
        with contextlib.suppress(RuntimeError):  # paho may raise once the connection is gone
            info.wait_for_publish(8)
        c.loop_stop()
        c.disconnect()
        assert not info.is_published()
        assert disconnects, "nats-server should have closed the connection"
        log = (tmp_path / "nats" / "nats-server.log").read_text(errors="replace")
        assert "maximum payload exceeded" in log
        ok = publisher(port)  # the door still serves others
        publish_all(ok, _readings("after", 1))
        ok.disconnect()
        FaultReport("above the embedded door's max_payload (32 MiB - 128 KiB)", sent=1, acknowledged=0).show()
    finally:
        srv.stop()
