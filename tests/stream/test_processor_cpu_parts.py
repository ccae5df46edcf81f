"""The processor's CPU by part of a batch (``fieldmesh_processor_cpu_seconds{part}``): each part that ran is
counted, and the parts add up to what the applying thread spent.

Real processor code over a real SQLite store with an alert rule, bus records as the gateway's version-1
encoding carries them (tests/fmtest/alerts.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import REGISTRY

from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.store.alerts import AlertTables
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.alerting import AlertEngine
from fieldmesh.stream.alerts import parse_rule
from fieldmesh.stream.processor import Processor
from fmtest.alerts import records, stream

NOW = 1_763_812_345_123
PARTS = ("decode", "decide", "alerts", "products", "store", "sinks", "other")
SQLITE_PARTS = ("begin", "segments", "gaps", "rollups", "devices", "rows", "keys", "commit", "finish")
HOT = {"name": "hot", "kind": "threshold", "metric": "temperature", "op": ">", "value": 30, "clear_value": 28}


def _parts() -> dict[str, float]:
    out = {p: REGISTRY.get_sample_value("fieldmesh_processor_cpu_seconds_total", {"part": p}) or 0.0
           for p in PARTS}
    out.update({f"sqlite.{p}": REGISTRY.get_sample_value("fieldmesh_processor_sqlite_cpu_seconds_total", {"part": p})
                or 0.0 for p in SQLITE_PARTS})
    return out


def test_each_part_is_counted_and_the_parts_add_up_to_the_thread(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/hot.db"
    tables = AlertTables(url)
    tables.put_rule(parse_rule(HOT), actor="test")
    store = SqliteStore(url)
    try:
        proc = Processor(bus=None, store=store, settings=ProcessorSettings(),  # type: ignore[arg-type]
                         alerts=AlertEngine(store))
        recs = records(stream(1, NOW), 7, NOW)
        assert len(recs) >= 20
        before = _parts()
        c0 = time.thread_time()
        for s in range(0, len(recs), 10):
            proc.apply_records(recs[s:s + 10])
        spent = time.thread_time() - c0
        after = _parts()
        assert store.stats().stored > 0 and proc.stats.batches >= 2
    finally:
        store.close()
        tables.close()
    delta = {p: after[p] - before[p] for p in after}
    for p in ("decode", "decide", "alerts", "store"):
        assert delta[p] > 0, (p, delta)
    assert delta["products"] == 0 and delta["sinks"] == 0  # no products configured, no extra sink: not counted
    counted = sum(delta[p] for p in PARTS)
    # only the counting itself and the calls around each batch lie outside the parts
    assert 0.9 * spent <= counted <= spent, (counted, spent, delta)
    # the SQLite store's split of its part: each step ran, and together they are (nearly all of) that part
    for p in ("begin", "segments", "gaps", "rollups", "devices", "rows", "keys", "commit", "finish"):
        assert delta[f"sqlite.{p}"] > 0, (p, delta)
    split = sum(delta[f"sqlite.{p}"] for p in SQLITE_PARTS)
    assert 0.8 * delta["store"] <= split <= delta["store"], (split, delta["store"], delta)
