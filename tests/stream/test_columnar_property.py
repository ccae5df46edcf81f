"""The stream engines: the reference equals the oracle, and the columnar engine equals the reference.

Readings come from real device JSON through the gateway's decoder (real identities), then travel as bus
records of either encoding. Keys can be forced into a handful of values near 2**63 (collisions that wrap
around the key space; every identity keeps its own check value, so the oracle, which knows nothing of
keys, still holds). Claims go to an in-memory store (``fmtest.claims``) that answers as a hot store does.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.batch import BatchResult, ReadingColumns, WindowDeltas
from fieldmesh.core.codec import decode_telemetry, encode_bus_batch, encode_bus_columns, encode_reading_json
from fieldmesh.core.exact import exact_avg, exact_sum, exact_value, format_exact, merge
from fieldmesh.core.model import BusBatch, DeadLetter, Reading
from fieldmesh.core.topics import DLQ_TOPIC, READINGS_TOPIC
from fieldmesh.stream import columnar, reference
from fieldmesh.stream.base import DecodedBatch, StreamState
from fmtest import oracle
from fmtest.claims import ClaimStore

NOW = 1_763_812_345_123
BASE = NOW - 3 * 3_600_000
HOUR = 3_600_000
INTERVALS = {"1m": 60_000, "1h": 3_600_000}
GRACE = 5_000
PARTS = 3

values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),  # any magnitude: subnormals, ±1e308
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e-300, max_value=1e-300),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e3, max_value=1e3),
    st.sampled_from([1e308, -1e308, 5e-324, -5e-324, 2.2250738585072014e-308, 0.0, -0.0, 0.1, 0.7]),
    st.booleans(),
    st.integers(-1000, 1000),
)
#: for the oracle, whose ``math.fsum`` overflows past the float range: sums of 60 of these cannot
bounded = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e-300, max_value=1e-300),
    st.sampled_from([1e300, 5e-324, -5e-324, 2.2250738585072014e-308, 0.0, -0.0, 0.1]),
    st.booleans(),
    st.integers(-1000, 1000),
)


#: event times, often on a 5 s grid from a minute's start (lateness's boundary: end == watermark - grace)
times = st.one_of(st.integers(BASE, NOW - 1), st.integers(0, 400).map(lambda k: BASE - BASE % 60_000 + k * 5_000))


def _items(vals: st.SearchStrategy[Any]) -> st.SearchStrategy[list[tuple[str, dict[str, Any]]]]:
    reading = st.fixed_dictionaries(
        {"ts": times, "late": st.booleans(), "measurements": st.dictionaries(
            st.sampled_from(["t", "h", "v"]), vals, min_size=1, max_size=3)},
        optional={"seq": st.integers(0, 40), "event_id": st.sampled_from(["a", "b", "c"]),
                  "boot_id": st.sampled_from(["b1", "b2"]), "meta": st.just({"site": "n"})},
    )
    return st.lists(st.tuples(st.sampled_from(["d1", "d2", "d-3", "d4"]), reading), min_size=1, max_size=60)


def _readings(items: list[tuple[str, dict[str, Any]]]) -> list[Reading]:
    """Each item through the gateway's decoder (validation, identity); ``late`` ones an hour back."""
    out = []
    for dev, r in items:
        extra = {k: r[k] for k in ("event_id", "boot_id", "meta") if k in r}
        p = encode_reading_json(dev, r["ts"], r["measurements"], r.get("seq"), **extra)
        res = decode_telemetry(p, device_id=dev, topic=f"devices/{dev}/telemetry", received_ms=NOW)
        assert not res.rejects, res.rejects
        out.extend(res.readings)
    return out


def _sent(items: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """Items with ``late`` applied (an hour back), as the oracle reads them."""
    return [(dev, {**r, "ts": r["ts"] - HOUR if r["late"] else r["ts"]}) for dev, r in items]


def _force_collisions(readings: list[Reading]) -> list[Reading]:
    """Keys squeezed into 8 values around 2**63 (wrapping), each identity keeping its check value."""
    return [msgspec.structs.replace(r, key=(2**63 - 4 + r.key % 8) % 2**63) for r in readings]


def _records(readings: list[Reading], rnd: random.Random, *, encoding: int | None = None,
             start: int = 1, corrupt: bool = False) -> list[BusRecord]:
    """Readings split at random into records (some empty) on PARTS partitions, v1 or v2 (random per record
    unless ``encoding``); with ``corrupt``, a corrupt record, a DLQ record and a corrupt DLQ record too."""
    out: list[BusRecord] = []
    offsets = [start - 1] * PARTS
    i = 0
    while i < len(readings) or not out:
        n = rnd.choice([0, 1, 2, 3, 5, 8])
        chunk = readings[i : i + n]
        i += n
        p = rnd.randrange(PARTS)
        offsets[p] += 1
        enc = encoding or rnd.choice([1, 2])
        value = (encode_bus_batch(BusBatch(chunk)) if enc == 1
                 else encode_bus_columns(ReadingColumns.from_readings(chunk)))
        out.append(BusRecord(topic=READINGS_TOPIC, partition=p, offset=offsets[p], value=value))
        if corrupt and rnd.random() < 0.1:
            offsets[p] += 1
            out.append(BusRecord(topic=READINGS_TOPIC, partition=p, offset=offsets[p], value=b"\xc1\x07junk"))
    if corrupt:
        dl = DeadLetter(reason="malformed_json", detail="x", topic="devices/d1/telemetry", received_ms=NOW,
                        payload=b"{")
        out.append(BusRecord(topic=DLQ_TOPIC, partition=0, offset=start, value=msgspec.json.encode(dl)))
        out.append(BusRecord(topic=DLQ_TOPIC, partition=0, offset=start + 1, value=b"not json"))
    return out


def _splits(n: int, rnd: random.Random) -> list[tuple[int, int]]:
    cuts = sorted({0, n, *(rnd.randint(0, n) for _ in range(rnd.randint(0, 3)))})
    return list(itertools.pairwise(cuts)) or [(0, 0)]


def _advance(state: StreamState, res: BatchResult) -> StreamState:
    """The processor's state after committing ``res``."""
    return StreamState({**state.positions, **res.positions}, {**state.watermarks, **res.watermarks},
                       {**state.device_watermarks, **res.device_watermarks})


# ---- field-by-field comparison of two results -----------------------------------------------------------


def _rows(cols: ReadingColumns) -> list[tuple[Reading, str]]:
    return list(zip(cols.to_readings(), cols.measurements_json.tolist(), strict=True))


def _windows(w: WindowDeltas) -> list[tuple[Any, ...]]:
    return list(zip(w.device.tolist(), w.metric.tolist(), w.window_start_ms.tolist(), w.count.tolist(),
                    [format_exact(int(m), int(e)) for m, e in zip(w.sum_m.tolist(), w.sum_e.tolist(), strict=True)],
                    w.min.tolist(), w.max.tolist(), strict=True))


def _dead(ds: Sequence[DeadLetter]) -> list[DeadLetter]:
    # a corrupt record's dead letter is stamped with the time it was decoded
    return [msgspec.structs.replace(d, received_ms=0) if d.detail.startswith("corrupt bus record") else d for d in ds]


def assert_same(a: BatchResult, b: BatchResult) -> None:
    """Equal field by field: readings by value (dictionaries may differ), sums exactly."""
    assert dict(a.positions) == dict(b.positions)
    assert dict(a.watermarks) == dict(b.watermarks)
    assert dict(a.device_watermarks) == dict(b.device_watermarks)
    assert _rows(a.new) == _rows(b.new)
    assert a.store_key.tolist() == b.store_key.tolist()
    assert a.late.tolist() == b.late.tolist()
    assert list(a.windows) == list(b.windows)
    for name in a.windows:
        assert (a.windows[name].interval, a.windows[name].width_ms) == (b.windows[name].interval,
                                                                        b.windows[name].width_ms)
        assert _windows(a.windows[name]) == _windows(b.windows[name]), name
    da, db = a.devices, b.devices
    for f in ("device", "first_received_ms", "last_received_ms", "first_ts_ms", "last_ts_ms", "count"):
        assert getattr(da, f).tolist() == getattr(db, f).tolist(), f
    assert da.metric_pairs == db.metric_pairs
    assert _dead(a.dead_letters) == _dead(b.dead_letters)
    assert dict(a.counts) == dict(b.counts)
    assert a.corrupt == b.corrupt


# ---- the reference against the oracle -----------------------------------------------------------------


def _run(engine: Any, records: list[BusRecord], splits: list[tuple[int, int]], claims: ClaimStore,
         state: StreamState) -> tuple[list[BatchResult], StreamState]:
    out = []
    for lo, hi in splits:
        batch = engine.decode(records[lo:hi], state)
        res = engine.decide(batch, state, claims, grace_ms=GRACE, intervals=INTERVALS)
        out.append(res)
        state = _advance(state, res)
    return out, state


def _expected_late(sent: list[tuple[str, dict[str, Any]]]) -> int:
    """Late first occurrences, from the contract (the device's watermark passed the 1m window's end)."""
    wm: dict[str, int] = {}
    seen: set[tuple[Any, ...]] = set()
    late = 0
    for dev, r in sent:
        w = wm.get(dev, 0)
        ident = oracle.identity(dev, r)
        if ident not in seen:
            seen.add(ident)
            late += r["ts"] // 60_000 * 60_000 + 60_000 <= w - GRACE
        wm[dev] = max(w, r["ts"])
    return late


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=_items(bounded), seed=st.integers(0, 2**32 - 1), collide=st.booleans())
def test_reference_equals_the_oracle_and_re_deciding_is_identical(
    items: list[tuple[str, dict[str, Any]]], seed: int, collide: bool
) -> None:
    rnd = random.Random(seed)
    # one identity, one reading (the contract's premise), then exact copies re-sent later, and disorder
    sent = list(oracle.unique_readings(_sent(items)).values())
    sent += [rnd.choice(sent) for _ in range(rnd.randint(0, len(sent)))]
    rnd.shuffle(sent)
    readings = _readings([(d, {**r, "late": False}) for d, r in sent])
    if collide:
        readings = _force_collisions(readings)
    records = _records(readings, rnd)
    claims = ClaimStore()
    start = StreamState({}, {}, {})
    splits = _splits(len(records), rnd)
    results, _ = _run(reference, records, splits, claims, start)

    acc: dict[tuple[str, str, int], list[Any]] = {}
    for interval in INTERVALS:
        acc.clear()
        for res in results:
            w = res.windows[interval]
            for dev, metric, ws, n, m, e, lo, hi in zip(
                w.device.tolist(), w.metric.tolist(), w.window_start_ms.tolist(), w.count.tolist(),
                w.sum_m.tolist(), w.sum_e.tolist(), w.min.tolist(), w.max.tolist(), strict=True,
            ):
                a = acc.get((dev, metric, ws))
                acc[(dev, metric, ws)] = ([n, m, e, lo, hi] if a is None
                                          else [a[0] + n, *merge(a[1], a[2], m, e), min(a[3], lo), max(a[4], hi)])
        expected = oracle.rollups(sent, interval)
        assert set(acc) == set(expected)
        for k, x in expected.items():
            n, m, e, lo, hi = acc[k]
            assert (n, exact_value(m, e), lo, hi, exact_avg(m, e, n)) == (
                x["count"], x["sum"], x["min"], x["max"], x["avg"]), (interval, k)
    stored = [(r.device_id, r.ts_ms, {k: float(v) for k, v in r.measurements.items()})
              for res in results for r in res.new.to_readings()]
    uniq = [(d, r["ts"], {k: float(v) for k, v in r["measurements"].items()})
            for d, r in oracle.unique_readings(sent).values()]
    assert sorted(stored, key=repr) == sorted(uniq, key=repr)
    keys = [k for res in results for k in res.store_key.tolist()]
    assert len(set(keys)) == len(keys) == len(uniq)
    assert sum(res.counts["duplicates"] for res in results) == len(sent) - len(uniq)
    assert sum(res.counts["late"] for res in results) == _expected_late(sent)

    # re-deciding committed records with their origins decides exactly as the first time
    again, _ = _run(reference, records, splits, claims, start)
    assert len(again) == len(results)
    for a, b in zip(again, results, strict=True):
        assert_same(a, b)
    # ... while a store that holds them under other origins sees duplicates only
    other = ClaimStore()
    for k, (c, _o) in claims.held.items():
        other.held[k] = (c, -1)
    dup, _ = _run(reference, records, splits, other, start)
    assert sum(r.counts["stored"] for r in dup) == 0
    assert sum(r.counts["duplicates"] for r in dup) == len(sent)


def test_reference_decodes_dead_letters_and_skips_applied_records() -> None:
    rnd = random.Random(7)
    items = [("d1", {"ts": BASE + i * 7000, "seq": i, "late": False, "measurements": {"t": i * 0.5}})
             for i in range(30)]
    records = _records(_readings(items), rnd, corrupt=True)
    state = StreamState({(READINGS_TOPIC, 0): 2}, {}, {})
    batch = reference.decode(records, state)
    assert batch.skipped == sum(1 for r in records if r.topic == READINGS_TOPIC and r.partition == 0 and r.offset <= 2)
    reasons = sorted(d.reason for d in batch.dead_letters)
    assert "malformed_json" in reasons and reasons.count("schema_violation") == batch.corrupt >= 1
    res = reference.decide(batch, state, ClaimStore(), grace_ms=GRACE, intervals=INTERVALS)
    assert res.counts["dlq.schema_violation"] == batch.corrupt
    assert res.positions[(DLQ_TOPIC, 0)] == 2
    # a reading record, even an empty one, writes its partition's watermark; a corrupt one does not
    assert set(res.watermarks) == set(batch.reading_positions)


@pytest.mark.parametrize("answer", ["in-batch", "store"])
def test_reference_collision_probes_the_next_keys(answer: str) -> None:
    rs = _readings([("d1", {"ts": BASE + i, "seq": i, "late": False, "measurements": {"t": 1.0}}) for i in range(3)])
    k = 2**63 - 1  # probing wraps to 0
    a, b, c = (msgspec.structs.replace(r, key=k) for r in rs)
    claims = ClaimStore()
    if answer == "store":
        claims.held[k] = (a.chk, -1)
        claims.held[0] = (12345, -1)
    cols = ReadingColumns.from_readings([a, b, c, b])
    res = reference.settle(cols, np.zeros(4, np.bool_), np.arange(4, dtype=np.int64), claims, intervals=INTERVALS)
    if answer == "in-batch":
        assert res.store_key.tolist() == [k, 0, 1]
        assert res.counts == {"stored": 3, "duplicates": 1, "late": 0}
    else:  # a is stored already; key 0 is another reading's: b and c go to 1 and 2
        assert res.store_key.tolist() == [1, 2]
        assert res.counts == {"stored": 2, "duplicates": 2, "late": 0}


def _state(rnd: random.Random) -> StreamState:
    """A random prior state: positions below the records', watermarks around the readings' times."""
    return StreamState(
        {(READINGS_TOPIC, p): rnd.choice([-1, 0]) for p in range(PARTS) if rnd.random() < 0.5},
        {(READINGS_TOPIC, p): rnd.randint(BASE - HOUR, NOW) for p in range(PARTS) if rnd.random() < 0.5},
        {d: rnd.randint(BASE - 2 * HOUR, NOW) for d in ("d1", "d2", "d-3", "d4") if rnd.random() < 0.5},
    )



# ---- the columnar engine against the reference ----------------------------------------------------------


def _same_decoded(a: DecodedBatch, b: DecodedBatch) -> None:
    assert _rows(a.cols) == _rows(b.cols)
    assert a.origin.tolist() == b.origin.tolist()
    assert a.row_position.tolist() == b.row_position.tolist()
    assert a.reading_positions == b.reading_positions
    assert dict(a.positions) == dict(b.positions)
    assert _dead(a.dead_letters) == _dead(b.dead_letters)
    assert (a.corrupt, a.skipped) == (b.corrupt, b.skipped)


def _prior_claims(readings: list[Reading], rnd: random.Random) -> ClaimStore:
    """A store that holds some of the readings already (stored by other records), and some foreign keys."""
    claims = ClaimStore()
    for r in readings:
        if rnd.random() < 0.15:
            claims.held.setdefault(r.key, (r.chk, -1))
        elif rnd.random() < 0.05:
            claims.held.setdefault(r.key, (r.chk ^ 1, -1))  # another reading under this key: a collision
    return claims


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=_items(values), seed=st.integers(0, 2**32 - 1), collide=st.booleans(), corrupt=st.booleans())
def test_columnar_decides_as_the_reference(
    items: list[tuple[str, dict[str, Any]]], seed: int, collide: bool, corrupt: bool
) -> None:
    rnd = random.Random(seed)
    sent = _sent(items)
    sent += [rnd.choice(sent) for _ in range(rnd.randint(0, len(sent)))]  # duplicates
    rnd.shuffle(sent)
    readings = _readings([(d, {**r, "late": False}) for d, r in sent])
    if collide:
        readings = _force_collisions(readings)
    records = _records(readings, rnd, corrupt=corrupt)
    splits = _splits(len(records), rnd)
    state = _state(rnd)
    ref_claims = _prior_claims(readings, rnd)
    col_claims = ref_claims.copy()
    for lo, hi in splits:
        rb = reference.decode(records[lo:hi], state)
        cb = columnar.decode(records[lo:hi], state)
        _same_decoded(cb, rb)
        ref = reference.decide(rb, state, ref_claims, grace_ms=GRACE, intervals=INTERVALS)
        col = columnar.decide(cb, state, col_claims, grace_ms=GRACE, intervals=INTERVALS)
        assert_same(col, ref)
        assert col_claims.held == ref_claims.held
        state = _advance(state, ref)
    # settle alone, with any lateness and origins
    cols = ReadingColumns.from_readings(readings)
    late = np.array([rnd.random() < 0.3 for _ in readings], dtype=np.bool_)
    origin = np.array([rnd.randrange(-1, 50) for _ in readings], dtype=np.int64)
    ref_claims = _prior_claims(readings, rnd)
    col_claims = ref_claims.copy()
    others = {"1m": 60_000, "5m": 300_000, "1d": 86_400_000, "90s": 90_000}
    ref = reference.settle(cols, late, origin, ref_claims, intervals=others)
    col = columnar.settle(cols, late, origin, col_claims, intervals=others)
    assert_same(col, ref)
    assert col_claims.held == ref_claims.held


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=_items(values), seed=st.integers(0, 2**32 - 1))
def test_v1_and_v2_records_decide_alike(items: list[tuple[str, dict[str, Any]]], seed: int) -> None:
    readings = _readings(_sent(items))
    out = []
    for engine in (reference, columnar):
        for enc in (1, 2):
            rnd = random.Random(seed)
            records = _records(readings, rnd, encoding=enc)
            res, _ = _run(engine, records, [(0, len(records))], ClaimStore(), StreamState({}, {}, {}))
            out.append(res[0])
    for r in out[1:]:
        assert_same(r, out[0])


@pytest.mark.parametrize("group", [
    [1e308, 1e308, 5e-324, -1e308, 0.1],  # past the int64 fast path: Python ints
    [0.1, 0.2, 0.3, 1e-3, 7.0],
    [0.0, -0.0],
    [5e-324, -5e-324, 2.2250738585072014e-308],
    [2.0**52 + 1, -(2.0**52 + 1), 1.0] * 30,
])
def test_exact_sums_of_a_window(group: list[float]) -> None:
    ms = [{"t": v} for v in group]
    rs = [msgspec.structs.replace(r, measurements=m, key=i)
          for i, (r, m) in enumerate(zip(_readings([("d1", {"ts": BASE + i, "late": False, "measurements": {"t": 1}})
                                                   for i in range(len(group))]), ms, strict=True))]
    cols = ReadingColumns.from_readings(rs)
    res = columnar.settle(cols, np.zeros(len(rs), np.bool_), np.zeros(len(rs), np.int64), ClaimStore(),
                          intervals={"1h": HOUR})
    w = res.windows["1h"]
    m, e = exact_sum(group)
    assert len(w) == 1 and format_exact(int(w.sum_m[0]), int(w.sum_e[0])) == format_exact(m, e)


@pytest.mark.parametrize("engine", [reference, columnar])
def test_lateness_boundary(engine: Any) -> None:
    """Late exactly when the window's end is at or before the device's watermark minus the grace."""
    ws = BASE - BASE % 60_000
    items = [("d1", {"ts": ws + 65_000, "late": False, "measurements": {"t": 1}}),
             ("d1", {"ts": ws, "late": False, "measurements": {"t": 2}}),  # end == watermark - grace: late
             ("d1", {"ts": ws + 65_001, "late": False, "measurements": {"t": 3}}),
             ("d1", {"ts": ws + 60_000, "late": False, "measurements": {"t": 4}}),  # end > watermark - grace
             ("d2", {"ts": ws, "late": False, "measurements": {"t": 5}})]  # d2's state: ws + 65_000
    records = _records(_readings(items), random.Random(1), encoding=2)
    state = StreamState({}, {}, {"d2": ws + 65_000})
    res = engine.decide(engine.decode(records, state), state, ClaimStore(), grace_ms=GRACE, intervals=INTERVALS)
    assert res.late.tolist() == [False, True, False, False, True]
    assert res.device_watermarks == {"d1": ws + 65_001}


@pytest.mark.parametrize("prior", [False, True])
def test_enrichment_of_the_new_readings(prior: bool) -> None:
    items = [(d, {"ts": BASE + i * 1000, "seq": i, "late": False, "measurements": {"t": i}})
             for i in range(20) for d in ("d1", "d2")]
    readings = _readings(items)
    if prior:  # enriched at the gateway already: the enricher's fields are joined into it
        readings = [msgspec.structs.replace(r, enrichment={"gw": 1}) if i % 3 else r for i, r in enumerate(readings)]
    readings += readings[:7]  # duplicates: not enriched, not stored

    def enrich(cols: ReadingColumns) -> Any:
        names = np.array(cols.devices, dtype=object)[cols.device]
        out = np.empty(len(cols), dtype=object)
        out[:] = [{"site": "north"} if n == "d1" else None for n in names.tolist()]
        return out

    got = []
    for engine in (reference, columnar):
        records = _records(readings, random.Random(3))
        state = StreamState({}, {}, {})
        got.append(engine.decide(engine.decode(records, state), state, ClaimStore(), grace_ms=GRACE,
                                 intervals=INTERVALS, enrich=enrich))
    assert_same(got[1], got[0])
    new = got[0].new.to_readings()
    assert len(new) == 40
    for r in new:
        gw = {"gw": 1} if r.enrichment and "gw" in r.enrichment else {}
        assert r.enrichment == ({**gw, "site": "north"} if r.device_id == "d1" else (gw or None))
    assert prior == any(r.enrichment and "gw" in r.enrichment for r in new)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.one_of(st.integers(0, 2**62), st.integers(0, 10)),
                               st.sampled_from(["x", "y"]), bounded, st.integers(0, 5)), min_size=1, max_size=30),
       seed=st.integers(0, 2**32 - 1))
def test_event_times_far_apart(rows: list[tuple[str, int, str, Any, int]], seed: int) -> None:
    """Event times spread over 2**62 ms (bus records are not re-validated): the engines' wide-range paths
    (ranks instead of offsets for the running maximum, np.unique for window ids) decide as the reference."""
    rnd = random.Random(seed)
    readings = [Reading(dev, ts, {m: v if isinstance(v, bool) else float(v)}, key=rnd.randrange(2**63) if k else 7,
                        chk=rnd.randrange(2**63), received_ms=ts // 3) for dev, ts, m, v, k in rows]
    records = _records(readings, rnd)
    state = StreamState({}, {}, {"a": 2**61} if rnd.random() < 0.5 else {})
    intervals = {"1ms": 1, "1m": 60_000}
    ref_claims = ClaimStore()
    col_claims = ref_claims.copy()
    ref = reference.decide(reference.decode(records, state), state, ref_claims, grace_ms=0, intervals=intervals)
    col = columnar.decide(columnar.decode(records, state), state, col_claims, grace_ms=0, intervals=intervals)
    assert_same(col, ref)


def _window_rows(w: WindowDeltas) -> list[tuple[Any, ...]]:
    return [(w.device[i], w.metric[i], int(w.window_start_ms[i]), int(w.count[i]),
             format_exact(int(w.sum_m[i]), int(w.sum_e[i])), float(w.min[i]), float(w.max[i])) for i in range(len(w))]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_items(values), st.lists(st.integers(1, 8), min_size=1, max_size=6))
def test_windows_combined_over_batches_equal_the_windows_of_all(
    items: list[tuple[str, dict[str, Any]]], sizes: list[int]
) -> None:
    """What a store holds over several batches (their deltas combined) equals the deltas of all their readings at
    once: the same entries, sorted alike, exact sums included."""
    rs = _readings(items)
    parts, i, k = [], 0, 0
    while i < len(rs):
        parts.append(ReadingColumns.from_readings(rs[i : i + sizes[k % len(sizes)]]))
        i, k = i + sizes[k % len(sizes)], k + 1
    whole = columnar.window_deltas(ReadingColumns.from_readings(rs), INTERVALS)
    for name in INTERVALS:
        combined = columnar.combine_windows([columnar.window_deltas(p, INTERVALS)[name] for p in parts])
        assert _window_rows(combined) == _window_rows(whole[name])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(st.tuples(st.one_of(st.integers(-(2**40), 2**40), st.integers(-(2**63), 2**63 - 1),
                                              st.integers(-(2**90), 2**90), st.just(0)),
                                    st.integers(-60, 60)), min_size=1, max_size=6), min_size=1, max_size=12))
def test_shifted_sums_of_narrow_and_wide_mantissas(groups: list[list[tuple[int, int]]]) -> None:
    """Each group's exact sum at its lowest exponent, with mantissas of any width in any group (the int64 path and
    the Python ints' path): the sums of Python ints."""
    flat = [x for g in groups for x in g]
    m = np.empty(len(flat), dtype=object)
    m[:] = [x[0] for x in flat]
    e = np.array([x[1] for x in flat], dtype=np.int64)
    starts = np.cumsum([0, *map(len, groups[:-1])])
    emin = np.array([min(x[1] for x in g) for g in groups], dtype=np.int64)
    got = columnar._shifted_sums(m, e, emin, starts).tolist()
    assert got == [sum(mi << (ei - lo) for mi, ei in g) for g, lo in zip(groups, emin.tolist(), strict=True)]
