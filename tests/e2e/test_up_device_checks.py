"""``fieldmesh up --require-registration`` with rate limits: real MQTT publishers, the real gateway process.

Registered devices are stored; an unregistered one is ``unknown_device``; a suspended one, and a payload
naming another device, ``unauthorized``; what a device sends over its rate limit, ``rate_limited``. Each
lands in the DLQ and is counted in ``/stats`` and ``/metrics``.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path

import pytest

from fieldmesh.store import default_store_url
from fieldmesh.store.registry import DeviceRegistry
from fmtest.procs import Up, publish_all, publisher

pytestmark = pytest.mark.integration

NOW_TS = 1_763_812_345_000


def _reading(seq: int, **kw: object) -> bytes:
    return json.dumps({"ts": NOW_TS + seq, "seq": seq, "measurements": {"t": float(seq)}, **kw}).encode()


def test_registration_and_rate_limits_through_up(tmp_path: Path):
    p = f"dc{uuid.uuid4().hex[:6]}"
    ok, ok2, off, stranger = f"{p}-ok", f"{p}-ok2", f"{p}-off", f"{p}-new"
    data = tmp_path / "data"
    data.mkdir()
    reg = DeviceRegistry(default_store_url(data))  # registered before the gateway starts
    try:
        reg.add(ok, actor="test")
        reg.add(ok2, actor="test")
        reg.add(off, status="suspended", actor="test")
    finally:
        reg.close()
    # 3 messages per device, and a refill so slow that no test run earns a 4th
    up = Up(data, "--require-registration", env={"FIELDMESH__GATEWAY__RATE_LIMIT_MESSAGES_PER_S": "0.001",
                                                 "FIELDMESH__GATEWAY__RATE_LIMIT_BURST_S": "3000"}).start()
    try:
        assert "devices: registration enforced, rate limit 0.001 messages/s per device (burst 3000 s)" in " ".join(
            up.tail().split())  # the start line says what is checked
        assert up.get("/health")["registry"] == "ok"  # the registry the gateway reads, in /health
        c = publisher(up.mqtt_port)
        msgs = [(f"devices/{ok}/telemetry", _reading(i)) for i in range(10)]  # 3 stored, 7 over the limit
        msgs += [(f"devices/{ok2}/telemetry", _reading(0)),
                 (f"devices/{ok2}/telemetry", _reading(1, device_id=ok))]  # for another device: unauthorized
        msgs += [(f"devices/{off}/telemetry", _reading(i)) for i in range(2)]  # suspended: unauthorized
        msgs += [(f"devices/{stranger}/telemetry", _reading(i)) for i in range(2)]  # not registered
        publish_all(c, msgs)
        want = {"rate_limited": 7, "unauthorized": 3, "unknown_device": 2}
        stats = up.wait_for(lambda s: s["received"] >= 4 + 12 and sum(s["lag"].values()) == 0)
        assert stats["stored"] == 4, stats
        assert {k: v for k, v in stats["dead_lettered"].items() if k != "total" and v} == want, stats
        assert sorted(r["seq"] for r in up.get(f"/telemetry/raw?device_id={ok}&limit=100")) == [0, 1, 2]
        rl = up.get("/dlq?reason=rate_limited&limit=100")
        assert {r["device_id"] for r in rl} == {ok} and "over its rate limit" in rl[0]["detail"]
        unknown = up.get("/dlq?reason=unknown_device&limit=10")
        assert {r["device_id"] for r in unknown} == {stranger} and "not registered" in unknown[0]["detail"]
        unauth = {r["device_id"]: r["detail"] for r in up.get("/dlq?reason=unauthorized&limit=10")}
        assert "suspended" in unauth[off] and "does not match topic" in unauth[ok2]
        with urllib.request.urlopen(f"http://127.0.0.1:{up.http_port}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        for reason, n in want.items():
            assert f'fieldmesh_dead_letters_total{{reason="{reason}"}} {float(n)}' in metrics
        c.disconnect()
    finally:
        assert up.stop() == 0, up.tail()
