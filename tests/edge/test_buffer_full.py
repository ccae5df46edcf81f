"""Buffer full during an outage: the dropped counter equals exactly what never arrives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import free_port, wait_for

pytestmark = pytest.mark.integration


def test_drop_oldest_dropped_equals_missing(
    tmp_path: Path, mosquitto_factory: Any, collector_factory: Any, agent_factory: Any, prefix: str
) -> None:
    devices, ticks = 10, 300
    cfg: dict[str, Any] = {
        "agent": {"boot_id": "a", "stats_interval_s": 0.2},
        "sources": [
            {
                "simulator": {
                    "devices": devices,
                    "prefix": prefix,
                    "seed": 1,
                    "realtime": False,
                    "max_ticks": ticks,
                    "interval_ms": 100,
                }
            }
        ],
        "infer": {"scorer": "none"},
        "buffer": {
            "path": str(tmp_path / "buf"),
            "max_bytes": 40_000,
            "segment_bytes": 4096,
            "full_policy": "drop_oldest",
            "fsync": "never",
        },
        "uplink": {"port": free_port(), "backoff_max_ms": 300},  # nobody listens: an outage
        "twin": {"enabled": False},
    }
    agent = agent_factory(cfg)
    agent.start()
    wait_for(
        lambda: agent.stats().get("buffer", {}).get("appended_readings") == devices * ticks,
        30,
        "all readings buffered",
    )
    assert agent.stop() == 0
    s1 = agent.stats()["buffer"]
    dropped = s1["dropped_readings"]
    assert dropped > 0, "the test must overflow the buffer"

    broker = mosquitto_factory()
    coll = collector_factory(broker.port, prefix)
    cfg["uplink"]["port"] = broker.port
    agent.cfg_path.write_text(yaml.safe_dump(cfg))
    agent.start()
    wait_for(lambda: coll.count() >= devices * ticks - dropped, 30, "the buffered rest downstream")
    wait_for(lambda: agent.stats().get("buffer", {}).get("pending_readings") == 0, 10, "buffer drained")
    assert agent.stop() == 0
    got = {(d, r["seq"]) for d, r in coll.readings}
    expected = {(f"{prefix}-{i:05d}", k) for i in range(devices) for k in range(ticks)}
    missing = expected - got
    assert len(missing) == dropped
    assert got <= expected
    # drop_oldest: what is missing is the oldest ticks
    assert max(k for _, k in missing) < min(k for _, k in got)


def test_block_policy_loses_nothing(
    tmp_path: Path, mosquitto_factory: Any, collector_factory: Any, agent_factory: Any, prefix: str
) -> None:
    """``block``: when full, the agent stops reading its source (nothing acknowledged, nothing dropped)."""
    devices, ticks = 10, 300
    cfg: dict[str, Any] = {
        "agent": {"boot_id": "a", "stats_interval_s": 0.2},
        "sources": [
            {
                "simulator": {
                    "devices": devices,
                    "prefix": prefix,
                    "seed": 1,
                    "realtime": False,
                    "max_ticks": ticks,
                    "interval_ms": 100,
                }
            }
        ],
        "infer": {"scorer": "none"},
        "buffer": {
            "path": str(tmp_path / "buf"),
            "max_bytes": 40_000,
            "segment_bytes": 4096,
            "full_policy": "block",
            "fsync": "never",
        },
        "uplink": {"port": free_port(), "backoff_max_ms": 300},
        "twin": {"enabled": False},
    }
    agent = agent_factory(cfg)
    agent.start()
    wait_for(lambda: agent.stats().get("full_waits", 0) > 0, 30, "the buffer to fill up and block")
    s = agent.stats()
    assert s["buffer"]["dropped_readings"] == 0
    assert s["buffer"]["appended_readings"] < devices * ticks  # the source is held back
    broker = mosquitto_factory()
    coll = collector_factory(broker.port, prefix)
    assert agent.stop() == 0
    cfg["uplink"]["port"] = broker.port
    agent.cfg_path.write_text(yaml.safe_dump(cfg))
    agent.start()
    wait_for(lambda: coll.count() >= devices * ticks, 60, "every reading downstream")
    assert agent.stop() == 0
    got = {(d, r["seq"]) for d, r in coll.readings}
    assert got == {(f"{prefix}-{i:05d}", k) for i in range(devices) for k in range(ticks)}
