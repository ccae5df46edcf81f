"""The edge agent's own ``/metrics`` (``fieldmesh edge run --metrics-port``): buffer depth and egress bytes
consistent with its stats, through a broker outage; the edge dashboard and rules name only metrics it serves."""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import free_port, wait_for

pytestmark = pytest.mark.integration


def _scrape(port: int) -> tuple[str, dict[str, float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return text, {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def _cfg(tmp_path: Path, port: int, prefix: str) -> dict[str, Any]:
    return {
        "agent": {"boot_id": "m1", "stats_interval_s": 0.2},
        "sources": [{"simulator": {"devices": 4, "interval_ms": 50, "prefix": prefix, "seed": 3}}],
        "infer": {"scorer": "none"},
        "buffer": {"path": str(tmp_path / "buf")},
        "uplink": {"port": port, "linger_ms": 50, "backoff_initial_ms": 100, "backoff_max_ms": 300},
        "twin": {"enabled": False},
    }


def test_edge_metrics_follow_buffer_and_egress(tmp_path: Path, mosquitto_factory: Any, collector_factory: Any,
                                               agent_factory: Any, prefix: str) -> None:
    from fieldmesh.obs.dashboards import DASHBOARDS, RULES, read

    broker = mosquitto_factory()
    coll = collector_factory(broker.port, prefix)
    agent = agent_factory(_cfg(tmp_path, broker.port, prefix))
    mport = free_port()
    agent.start("--metrics-port", str(mport))
    try:
        wait_for(lambda: coll.count() >= 50, 20, "readings downstream")
        _, m = wait_for(lambda: _try(mport), 10, "the metrics endpoint")
        assert m["fieldmesh_edge_uplink_connected"] == 1
        assert m["fieldmesh_edge_egress_bytes_total"] > m["fieldmesh_edge_egress_payload_bytes_total"] > 0
        assert m["fieldmesh_edge_readings_sent_total"] >= m["fieldmesh_edge_readings_acked_total"] > 0
        # an outage: the buffer fills, the gauge shows it, egress stops
        broker.stop()
        time.sleep(1.5)
        _, m1 = _scrape(mport)
        time.sleep(1.0)
        _, m2 = _scrape(mport)
        assert m2["fieldmesh_edge_uplink_connected"] == 0
        assert m2["fieldmesh_edge_buffer_pending_readings"] > m1["fieldmesh_edge_buffer_pending_readings"] > 0
        assert m2["fieldmesh_edge_egress_bytes_total"] == m1["fieldmesh_edge_egress_bytes_total"]
        assert m2["fieldmesh_edge_buffer_bytes"] > 0
        broker.start()
        wait_for(lambda: _scrape(mport)[1]["fieldmesh_edge_buffer_pending_readings"] < 50, 30, "the buffer drains")
        text, m3 = _scrape(mport)
        assert m3["fieldmesh_edge_egress_bytes_total"] > m2["fieldmesh_edge_egress_bytes_total"]
        assert m3["fieldmesh_edge_uplink_disconnects_total"] >= 1
        assert m3["fieldmesh_edge_readings_sent_total"] >= m3["fieldmesh_edge_readings_acked_total"]
        assert m3["fieldmesh_edge_readings_acked_total"] > m2["fieldmesh_edge_readings_acked_total"]
        served = set(m3) | set(re.findall(r"^# TYPE (\S+)", text, re.MULTILINE))
        for name in (*DASHBOARDS, RULES):
            used = {u for u in re.findall(r"\bfieldmesh_[a-z0-9_]+", read(name)) if u.startswith("fieldmesh_edge_")}
            assert used <= served, (name, sorted(used - served))
        assert len(set(re.findall(r"\bfieldmesh_edge_[a-z0-9_]+", read("edge.json")))) >= 8
    finally:
        assert agent.stop() == 0, agent.output()


def _try(port: int) -> tuple[str, dict[str, float]] | None:
    try:
        return _scrape(port)
    except OSError:
        return None
