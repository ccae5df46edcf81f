"""Any permutation, duplication and batching of readings gives the oracle's rows and rollups.

The processor's real code path runs against a real SQLite store: bus records (as the gateway
encodes them) -> Processor.apply_records -> SqliteStore. Redelivered records (at or below the stored
position) are skipped; a processor restarted on the same store resumes from its stored positions.
"""

from __future__ import annotations

import itertools
import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.codec import decode_telemetry, encode_bus_batch, encode_reading_json
from fieldmesh.core.model import BusBatch
from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.processor import Processor
from fmtest import oracle

NOW = 1_763_812_345_123
BASE = NOW - 3 * 3_600_000

values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e-6, max_value=1e-6),
    st.booleans(),
    st.integers(-1000, 1000),
)
reading = st.fixed_dictionaries(
    {
        "ts": st.integers(BASE, NOW - 1),
        "measurements": st.dictionaries(st.sampled_from(["t", "h", "v"]), values, min_size=1, max_size=3),
    },
    optional={"seq": st.integers(0, 40), "event_id": st.sampled_from(["a", "b", "c"]),
              "boot_id": st.sampled_from(["b1", "b2"])},
)
sent_items = st.lists(st.tuples(st.sampled_from(["d1", "d2", "d-3"]), reading), min_size=1, max_size=60)


def _records(items: list[tuple[str, dict]], batch_sizes: list[int], start: int = 1) -> list[BusRecord]:
    readings = []
    for dev, r in items:
        extra = {k: r[k] for k in ("event_id", "boot_id") if k in r}
        p = encode_reading_json(dev, r["ts"], r["measurements"], r.get("seq"), **extra)
        res = decode_telemetry(p, device_id=dev, topic=f"devices/{dev}/telemetry", received_ms=NOW)
        assert not res.rejects, res.rejects
        readings.extend(res.readings)
    out, i, off = [], 0, start
    sizes = itertools.cycle(batch_sizes)
    while i < len(readings):
        n = next(sizes)
        out.append(BusRecord(topic=READINGS_TOPIC, partition=off % 3, offset=off,
                             value=encode_bus_batch(BusBatch(readings[i : i + n]))))
        i += n
        off += 1
    return out


def _stored(store: SqliteStore) -> dict:
    rows = store.query("SELECT device_id, ts_ms, seq, boot_id, event_id, measurements FROM readings").rows
    return {"raw": sorted(map(str, rows)),
            "1m": store.query("SELECT * FROM rollup_1m ORDER BY 1,2,3").rows,
            "1h": store.query("SELECT * FROM rollup_1h ORDER BY 1,2,3").rows}


def _check_against_oracle(store: SqliteStore, items: list[tuple[str, dict]]) -> None:
    uniq = oracle.unique_readings(items)
    assert store.stats().stored == len(uniq)
    for interval in ("1m", "1h"):
        expected = oracle.rollups(items, interval)
        got = {(r["device_id"], r["metric"], r["window_start_ms"]): r
               for r in store.rollups(interval=interval, device_id=None, metric=None, start_ms=None, end_ms=None,
                                      limit=10**6)}
        assert set(got) == set(expected)
        for k, e in expected.items():
            g = got[k]
            assert (g["count"], g["sum"], g["min"], g["max"], g["avg"]) == (
                e["count"], e["sum"], e["min"], e["max"], e["avg"]), k


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=sent_items, seed=st.integers(0, 2**32 - 1), sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4))
def test_permutation_duplication_batching_give_the_oracle(items, seed, sizes):
    # Two readings with one identity are the same reading (the contract's premise): keep one per identity,
    # then duplicate exact copies.
    items = list(oracle.unique_readings(items).values())
    rnd = random.Random(seed)
    dup = items + [rnd.choice(items) for _ in range(rnd.randint(0, len(items)))]
    rnd.shuffle(dup)
    with tempfile.TemporaryDirectory() as d:
        a = SqliteStore(f"sqlite:///{d}/a.db")
        pa = Processor(bus=None, store=a, settings=ProcessorSettings())  # type: ignore[arg-type]
        recs = _records(dup, sizes)
        cut = rnd.randint(0, len(recs))
        pa.apply_records(recs[:cut])
        pa.apply_records(recs[: cut // 2])  # redelivery of committed records: skipped
        pa.apply_records(recs[cut:])
        _check_against_oracle(a, items)
        # the same readings in the original order, one batch: identical stored state
        b = SqliteStore(f"sqlite:///{d}/b.db")
        Processor(bus=None, store=b, settings=ProcessorSettings()).apply_records(  # type: ignore[arg-type]
            _records(items, [len(items)]))
        assert _stored(a) == _stored(b)
        assert a.stats().stored + a.stats().duplicates == len(dup)


def test_restart_resumes_from_stored_positions(tmp_path: Path):
    items = [("d1", {"ts": BASE + i * 7000, "seq": i, "measurements": {"t": i * 0.1}}) for i in range(50)]
    recs = _records(items, [5])
    s1 = SqliteStore(f"sqlite:///{tmp_path}/s.db")
    Processor(bus=None, store=s1, settings=ProcessorSettings()).apply_records(recs[:6])  # type: ignore[arg-type]
    s1.close()
    s2 = SqliteStore(f"sqlite:///{tmp_path}/s.db")
    p2 = Processor(bus=None, store=s2, settings=ProcessorSettings())  # type: ignore[arg-type]
    p2._positions = s2.positions()
    p2.apply_records(recs)  # the bus redelivers everything: the first 6 records are skipped
    assert p2.stats.skipped == 6
    st_ = s2.stats()
    assert (st_.stored, st_.duplicates) == (50, 0)
    _check_against_oracle(s2, items)


def test_late_readings_are_counted_and_correct_rollups(tmp_path: Path):
    s = SqliteStore(f"sqlite:///{tmp_path}/s.db")
    p = Processor(bus=None, store=s, settings=ProcessorSettings(grace_ms=5000))  # type: ignore[arg-type]
    on_time = [("d1", {"ts": BASE + i * 1000, "seq": i, "measurements": {"t": 1.0}}) for i in range(600)]
    late = [("d1", {"ts": BASE + 10_000, "seq": 10_000 + i, "measurements": {"t": 5.0}}) for i in range(3)]
    p.apply_records(_records(on_time, [100]))
    p.apply_records(_records(late, [3], start=100))
    assert s.stats().late == 3
    _check_against_oracle(s, on_time + late)
    w = s.rollups(interval="1m", device_id="d1", metric="t", start_ms=None, end_ms=None, limit=1)[0]
    ws = (BASE + 10_000) // 60_000 * 60_000
    in_window = sum(1 for _, r in on_time if ws <= r["ts"] < ws + 60_000)
    assert w["window_start_ms"] == ws and w["count"] == in_window + 3 and w["max"] == 5.0


def test_lateness_is_per_device(tmp_path: Path):
    """A device behind another on the same partition is not late; its own replay is."""
    s = SqliteStore(f"sqlite:///{tmp_path}/s.db")
    p = Processor(bus=None, store=s, settings=ProcessorSettings(grace_ms=5000))  # type: ignore[arg-type]
    ahead = [("d1", {"ts": BASE + 3_600_000, "seq": 0, "measurements": {"t": 1.0}})]
    behind = [("d2", {"ts": BASE + i * 1000, "seq": i, "measurements": {"t": 1.0}}) for i in range(120)]
    p.apply_records(_records(ahead + behind, [200]))
    assert s.stats().late == 0  # d2 an hour behind d1 is not late: its own windows were never emitted
    replay = [("d2", {"ts": BASE + 1000, "seq": 1000, "measurements": {"t": 2.0}})]
    p2 = Processor(bus=None, store=s, settings=ProcessorSettings(grace_ms=5000))  # type: ignore[arg-type]
    p2.apply_records(_records(replay, [1], start=50))  # a restarted processor knows d2's watermark
    assert s.stats().late == 1
