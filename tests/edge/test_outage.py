"""Outage: the broker goes away while readings continue; the agent is killed -9 during the outage and
again during the replay; every reading arrives exactly once (after identity de-dup), in order."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_for

pytestmark = pytest.mark.integration

OUTAGE_S = float(os.environ.get("FM_EDGE_OUTAGE_S", "8"))


def _cfg(tmp_path: Path, port: int, prefix: str, devices: int = 8, interval_ms: int = 50) -> dict[str, Any]:
    return {
        "agent": {"boot_id": "agent1", "stats_interval_s": 0.2},
        "sources": [
            {
                "simulator": {
                    "devices": devices,
                    "interval_ms": interval_ms,
                    "prefix": prefix,
                    "seed": 7,
                    "spike_prob": 0.01,
                    "start_ts_ms": int(time.time() * 1000) - 1000,
                }
            }
        ],
        "infer": {"scorer": "ewma"},
        "buffer": {"path": str(tmp_path / "buf"), "fsync": "always", "segment_bytes": 65536},
        # a bandwidth cap makes the replay last long enough to kill the agent in the middle of it
        "uplink": {
            "port": port,
            "linger_ms": 100,
            "backoff_initial_ms": 100,
            "backoff_max_ms": 500,
            "max_batch_readings": 200,
            "max_inflight_groups": 2,
            "max_readings_per_s": 600,
        },
        "twin": {"enabled": False},
    }


def _check_exactly_once(readings: list[tuple[str, dict[str, Any]]], devices: list[str], ticks: int) -> None:
    first: dict[tuple[str, str, int], dict[str, Any]] = {}
    order: dict[str, list[int]] = defaultdict(list)
    for dev, r in readings:
        key = (dev, r["boot_id"], r["seq"])
        if key not in first:
            first[key] = r
            order[dev].append(r["seq"])
    expected = {(d, "sim7", k) for d in devices for k in range(ticks)}
    missing = expected - first.keys()
    extra = first.keys() - expected
    assert not missing, f"{len(missing)} readings lost, e.g. {sorted(missing)[:5]}"
    assert not extra, f"unexpected readings {sorted(extra)[:5]}"
    for dev, seqs in order.items():
        assert seqs == sorted(seqs), f"per-device order broken for {dev}"


@pytest.mark.parametrize(
    "outage_s", [OUTAGE_S, pytest.param(30.0, marks=pytest.mark.slow)], ids=["short", "30s"]
)
def test_outage_kill9_exactly_once(
    outage_s: float,
    tmp_path: Path,
    mosquitto_factory: Any,
    collector_factory: Any,
    agent_factory: Any,
    prefix: str,
) -> None:
    broker = mosquitto_factory(persistence=True)
    coll = collector_factory(broker.port, prefix)
    agent = agent_factory(_cfg(tmp_path, broker.port, prefix))
    agent.start()
    wait_for(lambda: coll.count() >= 100, 20, "first readings downstream")

    # outage: the broker goes away while the simulator keeps ticking
    broker.stop()
    time.sleep(outage_s / 2)
    before = agent.stats()["buffer"]["pending_readings"]
    assert before > 0, "readings must pile up in the buffer during the outage"
    agent.kill9()  # kill -9 during the outage
    agent.start()
    wait_for(
        lambda: agent.stats().get("boot_id") and agent.stats()["buffer"]["recovered_readings"] > 0,
        20,
        "restarted agent recovering the buffer",
    )
    time.sleep(outage_s / 2)
    pending = agent.stats()["buffer"]["pending_readings"]
    assert pending >= before
    broker.start()

    # kill -9 again in the middle of the replay
    def replaying() -> bool:
        s = agent.stats()
        return bool(s and s["uplink"]["connects"] >= 1 and s["uplink"]["readings_acked"] > 0)

    wait_for(replaying, 20, "replay to start")
    left = agent.stats()["buffer"]["pending_readings"]
    assert left > 0, "the kill must land during the replay"
    agent.kill9()
    agent.start()
    wait_for(
        lambda: (
            agent.stats().get("uplink", {}).get("connects", 0) >= 1
            and agent.stats()["buffer"]["pending_readings"] < 200
        ),
        60,
        "replay to finish",
    )
    assert agent.stop() == 0
    ticks = json.loads((tmp_path / "buf" / "state" / "source0-simulator.json").read_text())["next_tick"]
    devices = [f"{prefix}-{i:05d}" for i in range(8)]
    wait_for(lambda: coll.count() >= ticks * len(devices), 20, "every reading downstream")
    time.sleep(0.5)
    assert not coll.rejects, coll.rejects[:3]
    assert ticks * 8 > 1000
    _check_exactly_once(coll.readings, devices, ticks)
    # zstd content type and traceparent travel as MQTT 5 properties
    _, _, props = coll.topic_messages("telemetry")[0]
    assert props.ContentType == "application/json+zstd"
    assert any(k == "traceparent" for k, _ in props.UserProperty)
