"""Window aggregation survives kill -9: open windows are saved before the source is acknowledged,
so every tick is in exactly one aggregate, equal to an oracle recomputed from the simulator."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_for
from fieldmesh.edge.simulator import FleetSimulator

pytestmark = pytest.mark.integration


def test_windows_survive_kill9(
    tmp_path: Path, mosquitto_factory: Any, collector_factory: Any, agent_factory: Any, prefix: str
) -> None:
    devices, interval, win = 4, 50, 1000
    start = (int(time.time() * 1000) // win) * win - 3 * win
    broker = mosquitto_factory()
    coll = collector_factory(broker.port, prefix)
    agent = agent_factory(
        {
            "agent": {"stats_interval_s": 0.2},
            "sources": [
                {
                    "simulator": {
                        "devices": devices,
                        "interval_ms": interval,
                        "prefix": prefix,
                        "seed": 5,
                        "start_ts_ms": start,
                        "spike_prob": 0.0,
                        "stuck_prob": 0.0,
                    }
                }
            ],
            "preprocess": {"mode": "window", "window_ms": win},
            "infer": {"scorer": "none"},
            "buffer": {"path": str(tmp_path / "buf"), "fsync": "always"},
            "uplink": {"port": broker.port, "linger_ms": 100},
            "twin": {"enabled": False},
        }
    )
    for _ in range(3):
        agent.start()
        wait_for(lambda: agent.stats().get("uplink", {}).get("readings_acked", 0) > 0, 20, "agent delivering")
        time.sleep(1.3)
        agent.kill9()
    agent.start()
    time.sleep(1.5)
    assert agent.stop() == 0
    ticks = json.loads((tmp_path / "buf" / "state" / "source0-simulator.json").read_text())["next_tick"]
    # oracle: the same simulator, aggregated here
    sim = FleetSimulator(devices=devices, seed=5, prefix=prefix, spike_prob=0.0, stuck_prob=0.0)
    vals: dict[tuple[str, int], list[float]] = {}
    for k in range(ticks):
        ts = start + k * interval
        tick = sim.tick(ts)
        for i, d in enumerate(sim.device_ids):
            vals.setdefault((d, ts - ts % win), []).append(float(tick.values["temperature"][i]))
    last_ts = start + (ticks - 1) * interval
    closed = {k: v for k, v in vals.items() if k[1] + win <= last_ts}  # the last window may still be open
    wait_for(lambda: {(d, r["ts"]) for d, r in coll.readings} >= closed.keys(), 20, "every closed window")
    seen: dict[tuple[str, str], dict[str, float]] = {}
    for d, r in coll.readings:
        assert r["event_id"], "only aggregates: no raw reading was late"
        m = r["measurements"]
        prev = seen.setdefault((d, r["event_id"]), m)
        assert prev == m, "a window was emitted twice with different contents"
    got = {(d, int(e.split(":")[1])): m for (d, e), m in seen.items()}
    for key, xs in closed.items():
        m = got[key]
        assert m["temperature.count"] == len(xs), key
        assert m["temperature.min"] == min(xs) and m["temperature.max"] == max(xs)
        assert math.isclose(m["temperature.avg"], math.fsum(xs) / len(xs), rel_tol=1e-9)
    assert ticks * interval > 5000
