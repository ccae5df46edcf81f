"""The agent streaming through ``fieldmesh up`` end to end (its MQTT listener speaks 3.1.1 only, so
this also exercises the fallback and the ``telemetry/zstd`` topic suffix on the gateway side)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fmtest.procs import Up

pytestmark = pytest.mark.integration


def test_agent_through_fieldmesh_up(tmp_path: Path, agent_factory: Any, prefix: str) -> None:
    devices, ticks = 5, 100
    up = Up(tmp_path / "data").start()
    try:
        before = up.get("/stats")
        agent = agent_factory(
            {
                "agent": {"stats_interval_s": 0.2},
                "sources": [
                    {
                        "simulator": {
                            "devices": devices,
                            "interval_ms": 20,
                            "prefix": prefix,
                            "seed": 4,
                            "max_ticks": ticks,
                            "start_ts_ms": int(time.time() * 1000) - 5000,
                        }
                    }
                ],
                "infer": {"scorer": "onnx"},
                "buffer": {"path": str(tmp_path / "buf")},
                "uplink": {"port": up.mqtt_port, "linger_ms": 200},
                "twin": {"enabled": False},
            }
        )
        agent.start()
        stats = up.wait_for(lambda s: s["stored"] - before["stored"] >= devices * ticks, 90)
        assert stats["stored"] - before["stored"] == devices * ticks
        assert stats["duplicates"] == before["duplicates"]
        assert agent.stats()["uplink"]["protocol"] == "3.1.1"
        rows = up.get(f"/telemetry/raw?device_id={prefix}-00002&limit=100000")
        assert len({r["ts"] if "ts" in r else r.get("ts_ms") for r in rows}) == ticks
        assert agent.stop() == 0
    finally:
        assert up.stop() == 0, up.tail()
