"""``Processor(sinks=[...])``: every committed result reaches every sink, and a sink that fell behind catches up.

Two SQLite stores: the hot one (it claims the keys) and a second one used as a plain sink. The sink's
disk fills (SQLite ``max_page_count``, a real ``database or disk is full``) while the hot store commits;
the batch is retried in the same process, then the processor restarts and the bus redelivers what was
not acknowledged. Both stores must then equal :mod:`fmtest.oracle`, over readings with duplicates,
disorder and forced key collisions, with either engine.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any

import msgspec
import pytest

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.codec import decode_telemetry, encode_bus_batch, encode_reading_json
from fieldmesh.core.errors import FieldmeshError
from fieldmesh.core.model import BusBatch, Reading
from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.store.base import INTERVALS
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.processor import Processor
from fmtest import oracle

NOW = 1_763_812_345_123
BASE = NOW - 3 * 3_600_000


def _sent(seed: int, n: int = 150) -> tuple[list[tuple[str, dict[str, Any]]], list[Reading]]:
    """Distinct items (the oracle's input), and what was sent: some keys forced to collide, a third
    more as duplicates, shuffled."""
    rnd = random.Random(seed)
    items: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        r: dict[str, Any] = {"ts": BASE + rnd.randrange(0, 3 * 3_600_000),
                             "measurements": {m: rnd.choice([rnd.uniform(-1e6, 1e6), rnd.randint(-5, 5)])
                                              for m in rnd.sample(["t", "h", "v"], rnd.randint(1, 3))}}
        if rnd.random() < 0.8:
            r["seq"] = i
        items.append((rnd.choice(["d1", "d2", "d-3"]), r))
    items = list(oracle.unique_readings(items).values())
    rs: list[Reading] = []
    for dev, r in items:
        p = encode_reading_json(dev, r["ts"], r["measurements"], r.get("seq"))
        rs.extend(decode_telemetry(p, device_id=dev, topic=f"devices/{dev}/telemetry", received_ms=NOW).readings)
    for _ in range(6):
        a, b = rnd.sample(range(len(rs)), 2)
        rs[b] = msgspec.structs.replace(rs[b], key=rs[a].key)
    rs += [rnd.choice(rs) for _ in range(len(rs) // 3)]
    rnd.shuffle(rs)
    return items, rs


def _records(rs: list[Reading], sizes: list[int]) -> list[BusRecord]:
    out: list[BusRecord] = []
    i, off = 0, 1
    while i < len(rs):
        n = sizes[off % len(sizes)]
        out.append(BusRecord(topic=READINGS_TOPIC, partition=off % 3, offset=off,
                             value=encode_bus_batch(BusBatch(rs[i : i + n]))))
        i, off = i + n, off + 1
    return out


def _assert_oracle(store: SqliteStore, items: list[tuple[str, dict[str, Any]]]) -> None:
    assert store.stats().stored == len(items)
    raw = store.raw(device_id=None, metric=None, start_ms=None, end_ms=None, limit=10**6)
    assert sorted((r["device_id"], r["ts_ms"], r.get("seq")) for r in raw) == sorted(
        (d, r["ts"], r.get("seq")) for d, r in items)
    for interval in INTERVALS:
        expected = oracle.rollups(items, interval)
        got = {(r["device_id"], r["metric"], r["window_start_ms"]): r
               for r in store.rollups(interval=interval, device_id=None, metric=None, start_ms=None, end_ms=None,
                                      limit=10**6)}
        assert set(got) == set(expected)
        for k, e in expected.items():
            g = got[k]
            assert (g["count"], g["sum"], g["min"], g["max"], g["avg"]) == (
                e["count"], e["sum"], e["min"], e["max"], e["avg"]), k


@pytest.mark.parametrize("engine", ["columnar", "reference"])
def test_a_sink_whose_write_failed_catches_up_after_a_retry_and_a_restart(tmp_path: Path, engine: str) -> None:
    items, rs = _sent(7)
    recs = _records(rs, [7, 3, 11, 1])
    third = len(recs) // 3
    settings = ProcessorSettings(engine=engine)  # type: ignore[arg-type]
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    cold = SqliteStore(f"sqlite:///{tmp_path / 'cold.db'}")
    try:
        p = Processor(bus=None, store=hot, settings=settings, sinks=[cold])  # type: ignore[arg-type]
        p.apply_records(recs[:third])
        assert cold.applied() == hot.applied() and cold.stats().stored == hot.stats().stored > 0

        pages = cold._w.execute("PRAGMA page_count").fetchone()[0]
        cold._w.execute(f"PRAGMA max_page_count = {pages}")  # the sink's disk is full
        with pytest.raises(sqlite3.OperationalError, match="full"):
            p.apply_records(recs[third : 2 * third])  # the hot store committed; the sink did not
        assert hot.applied() != cold.applied()
        with pytest.raises(sqlite3.OperationalError, match="full"):
            p.apply_records(recs[third : 2 * third])  # retried in process (nothing acknowledged): still full
        assert cold.stats().stored < hot.stats().stored  # the sink is behind

        cold._w.execute("PRAGMA max_page_count = 1073741823")  # space is back; the processor restarts
        p2 = Processor(bus=None, store=hot, settings=settings, sinks=[cold])  # type: ignore[arg-type]
        p2._positions = hot.positions()
        p2.apply_records(recs[third : 2 * third + 2])  # redelivered (not acknowledged) and two more
        p2.apply_records(recs[2 * third :])
        p2.apply_records(recs[2 * third :])  # a redelivery both have: skipped by both
    finally:
        hot.close()
        cold.close()
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    cold = SqliteStore(f"sqlite:///{tmp_path / 'cold.db'}")
    for store in (hot, cold):
        _assert_oracle(store, items)
    assert cold.applied() == hot.applied() == {(READINGS_TOPIC, p): max(r.offset for r in recs if r.partition == p)
                                               for p in range(3)}
    h, c = hot.stats(), cold.stats()
    assert (h.stored, h.duplicates, h.gaps) == (c.stored, c.duplicates, c.gaps)
    assert cold.watermarks() == hot.watermarks()
    hot.close()
    cold.close()


def test_a_sink_missing_records_the_bus_will_not_deliver_again_is_refused_not_written_with_a_hole(
    tmp_path: Path,
) -> None:
    _, rs = _sent(3)
    recs = _records(rs, [10])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    cold = SqliteStore(f"sqlite:///{tmp_path / 'cold.db'}")
    try:
        Processor(bus=None, store=hot, settings=ProcessorSettings()).apply_records(recs[:6])  # type: ignore[arg-type]
        p = Processor(bus=None, store=hot, settings=ProcessorSettings(), sinks=[cold])  # type: ignore[arg-type]
        p._positions = hot.positions()
        with pytest.raises(FieldmeshError, match="lacks records"):
            p.apply_records(recs[6:])  # acknowledged records 1..6 never reach the new sink
        assert cold.applied() == {} and cold.stats().stored == 0
    finally:
        hot.close()
        cold.close()
