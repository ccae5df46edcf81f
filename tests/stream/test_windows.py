"""Windows against a brute-force reference written here from the definitions (docs/windows.md).

The reference walks the readings one by one in arrival order, keeps every accepted value in lists and
computes each aggregate with ``fractions.Fraction`` (square roots with ``decimal`` at 100 digits), so it
shares nothing with the operator's columns, limbs and reductions but the definitions.
"""

from __future__ import annotations

import decimal
import itertools
import math
import random
from collections import defaultdict
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.core.batch import ReadingColumns
from fieldmesh.core.model import Reading
from fieldmesh.stream.windows import AGGREGATES, Hopping, Session, WindowOperator, WindowResults, tumbling

T0 = 1_700_000_040_000  # a whole minute

Spec = Hopping | Session


# -- the reference ---------------------------------------------------------------------------------------
def _float(x: Fraction) -> float:
    try:
        return float(x)
    except OverflowError:
        return math.copysign(math.inf, x)


def _sqrt(x: Fraction) -> float:
    """The float nearest to sqrt(x), ties to even: a decimal estimate, then the float whose rounding
    interval (between the midpoints to its neighbours, compared squared and exactly) holds sqrt(x)."""
    with decimal.localcontext() as ctx:
        ctx.prec = 100
        ctx.Emax = 10**6
        ctx.Emin = -(10**6)
        guess = float(decimal.Decimal(x.numerator * x.denominator).sqrt() / decimal.Decimal(x.denominator))
    for f in (math.nextafter(guess, -1.0), guess, math.nextafter(guess, math.inf)):
        if f < 0 or math.isinf(f):
            continue
        lo = (Fraction(math.nextafter(f, -1.0)) + Fraction(f)) / 2 if f > 0 else Fraction(0)
        hi = (Fraction(f) + Fraction(math.nextafter(f, math.inf))) / 2
        even = f.hex().split("p")[0][-1] in "02468ace" or f == 0
        if lo * lo < x < hi * hi or (x == lo * lo and even) or (x == hi * hi and even):
            return f
    raise AssertionError(f"no float rounds sqrt({x})")


def ref_aggregates(points: list[tuple[int, float]]) -> dict[str, Any]:
    vals = [Fraction(v) for _, v in points]
    n = len(vals)
    mean = sum(vals, Fraction(0)) / n
    sq = sum(((x - mean) ** 2 for x in vals), Fraction(0))
    first, last = min(points), max(points)  # by (ts, value)
    return {
        "count": n, "sum": _float(sum(vals, Fraction(0))), "min": min(v for _, v in points),
        "max": max(v for _, v in points), "avg": _float(mean), "stddev": _sqrt(sq / n),
        "stddev_samp": _sqrt(sq / (n - 1)) if n > 1 else math.nan, "first": first[1], "last": last[1],
        "rate": math.nan if first[0] == last[0]
        else _float((Fraction(last[1]) - Fraction(first[1])) * 1000 / (last[0] - first[0])),
    }


class Reference:
    """Per reading, in arrival order; windows as lists of (ts, value)."""

    def __init__(self, spec: Spec, lateness: int, update_ms: int = 0) -> None:
        self.spec, self.lateness, self.update_ms = spec, lateness, update_ms
        self.touched: set[tuple[str, str, int, int]] = set()
        self.newest: dict[str, int] = {}
        self.content: dict[tuple[str, str, int, int], list[tuple[int, float]]] = defaultdict(list)
        self.points: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
        self.emitted: dict[tuple[str, str, int, int], dict[str, Any]] = {}

    def watermark(self, device: str) -> float:
        return self.newest[device] - self.lateness if device in self.newest else -math.inf

    def feed(self, readings: list[Reading]) -> tuple[list[dict[str, Any]], int]:
        self.before = dict(self.newest)
        late = 0
        for r in readings:
            w = self.watermark(r.device_id)
            for metric, value in r.measurements.items():
                v = float(value)
                if isinstance(self.spec, Hopping):
                    size, hop = self.spec.size_ms, self.spec.hop_ms
                    missed = False
                    for start in range(r.ts_ms - r.ts_ms % hop, r.ts_ms - size, -hop):
                        assert start <= r.ts_ms < start + size
                        key = (r.device_id, metric, start, start + size)
                        if w >= start + size + self.update_ms:  # emitted (or would have been) and closed
                            missed = True
                        else:
                            self.content[key].append((r.ts_ms, v))
                            self.touched.add(key)
                    late += missed
                elif r.ts_ms < w:
                    late += 1
                else:
                    self.points[(r.device_id, metric)].append((r.ts_ms, v))
            self.newest[r.device_id] = max(self.newest.get(r.device_id, r.ts_ms), r.ts_ms)
        return self.emit(), late

    def windows(self) -> dict[tuple[str, str, int, int], list[tuple[int, float]]]:
        if isinstance(self.spec, Hopping):
            return self.content
        gap = self.spec.gap_ms
        out = {}
        for (d, m), pts in self.points.items():
            pts = sorted(pts)
            run = [pts[0]]
            for p in pts[1:]:
                if p[0] - run[-1][0] >= gap:
                    out[(d, m, run[0][0], run[-1][0] + gap)] = run
                    run = []
                run.append(p)
            out[(d, m, run[0][0], run[-1][0] + gap)] = run
        return out

    def emit(self, final: bool = False) -> list[dict[str, Any]]:
        rows = []
        windows = self.windows()
        if final:
            self.before = dict(self.newest)
        for key, pts in windows.items():
            # emitted again: readings of this call for a window whose end the watermark had passed before it
            was = self.before[key[0]] - self.lateness if key[0] in self.before else -math.inf
            again = key in self.touched and was >= key[3]
            if again or (key not in self.emitted and (final or self.watermark(key[0]) >= key[3])):
                self.emitted[key] = agg = ref_aggregates(pts)
                row = dict(zip(("device", "metric", "start_ms", "end_ms"), key, strict=True)) | agg
                rows.append(row | {"update": again} if self.update_ms else row)
        self.touched.clear()
        for key, agg in self.emitted.items():  # an emitted window never changes afterwards (or is emitted again)
            assert _canon([agg]) == _canon([ref_aggregates(windows[key])])
        return rows


# -- helpers ---------------------------------------------------------------------------------------------
def _canon(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Rows as sorted tuples; NaN as None so that equal results compare equal."""
    out = []
    for r in rows:
        out.append(tuple((k, None if isinstance(v, float) and math.isnan(v) else v) for k, v in sorted(r.items())))
    return sorted(out)


def _cols(readings: list[Reading]) -> ReadingColumns:
    return ReadingColumns.from_readings(readings)


def run(op: WindowOperator, batches: list[list[Reading]], restore_at: int = -1) -> tuple[list[dict[str, Any]], int]:
    rows: list[dict[str, Any]] = []
    late = 0
    for i, b in enumerate(batches):
        if i == restore_at:
            op = WindowOperator.restore(op.snapshot())
        out = op.process(_cols(b))
        rows += out.rows()
        late += out.late
    rows += op.flush().rows()
    assert op.late_total == late
    return rows, late


def split(items: list[Reading], cuts: list[int]) -> list[list[Reading]]:
    bounds = sorted({0, len(items), *(c % (len(items) + 1) for c in cuts)})
    return [items[a:b] for a, b in itertools.pairwise(bounds)]


values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e-6, max_value=1e-6),
    st.integers(-1000, 1000).map(float),
    st.sampled_from([0.0, -0.0, 1e300, -1e300, 5e-324, 2.5e-310, 2.0**60, 21.5]),
    st.booleans(),
)
readings_st = st.lists(
    st.tuples(st.sampled_from(["d1", "d2", "d-3"]),
              st.one_of(st.integers(0, 900_000), st.integers(0, 90).map(lambda s: s * 10_000)),  # on boundaries
              st.dictionaries(st.sampled_from(["t", "h", "v"]), values, min_size=1, max_size=3)),
    min_size=1, max_size=80,
)
specs = st.one_of(
    st.builds(lambda hop, k: Hopping(hop * k, hop), st.sampled_from([1_000, 30_000, 60_000]), st.integers(1, 5)),
    st.builds(Session, st.sampled_from([1_000, 20_000, 90_000])),
)
lateness_st = st.sampled_from([0, 5_000, 60_000, 400_000])


def make(items: list[tuple[str, int, dict[str, float | bool]]]) -> list[Reading]:
    return [Reading(d, T0 + t, m, key=i, chk=0) for i, (d, t, m) in enumerate(items)]


# -- properties ------------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=readings_st, spec=specs, lateness=lateness_st, cuts=st.lists(st.integers(0, 100), max_size=6),
       restore_at=st.integers(-1, 6), update_ms=st.sampled_from([0, 0, 30_000, 200_000]))
def test_matches_reference_call_by_call(items: list[Any], spec: Spec, lateness: int, cuts: list[int],
                                        restore_at: int, update_ms: int) -> None:
    """Any arrival order (late readings included), any batching, a snapshot/restore anywhere: every call
    emits exactly the windows the reference finalises (or updates) then, with equal aggregates, and the
    same late count."""
    readings = make(items)
    update_ms = update_ms if isinstance(spec, Hopping) else 0
    op = WindowOperator(spec, allowed_lateness_ms=lateness, on_late="update" if update_ms else "drop",
                        update_ms=update_ms)
    ref = Reference(spec, lateness, update_ms)
    for i, b in enumerate(split(readings, cuts)):
        if i == restore_at:
            op = WindowOperator.restore(op.snapshot())
        out = op.process(_cols(b))
        want, late = ref.feed(b)
        assert _canon(out.rows()) == _canon(want)
        assert out.late == late
    assert _canon(op.flush().rows()) == _canon(ref.emit(final=True))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=readings_st, spec=specs, lateness=st.sampled_from([1_000, 60_000, 400_000]),
       jitter=st.lists(st.floats(0, 1), min_size=80, max_size=80), cuts=st.lists(st.integers(0, 100), max_size=6))
def test_disorder_within_lateness_changes_nothing(items: list[Any], spec: Spec, lateness: int, jitter: list[float],
                                                  cuts: list[int]) -> None:
    """Readings arriving in order of ts + a delay of at most the allowed lateness: no reading is late and the
    windows equal those of the readings in event-time order, in one batch."""
    readings = make(items)
    arrival = sorted(readings, key=lambda r: (r.ts_ms + int(jitter[r.key] * lateness), r.key))
    in_order = sorted(readings, key=lambda r: (r.ts_ms, r.key))
    got, late = run(WindowOperator(spec, allowed_lateness_ms=lateness), split(arrival, cuts))
    want, want_late = run(WindowOperator(spec, allowed_lateness_ms=lateness), [in_order])
    assert late == want_late == 0
    assert _canon(got) == _canon(want)


@settings(max_examples=100, deadline=None)
@given(items=readings_st, spec=specs, lateness=lateness_st, cuts=st.lists(st.integers(0, 100), max_size=6),
       restore_at=st.integers(0, 6))
def test_batching_and_restore_change_nothing(items: list[Any], spec: Spec, lateness: int, cuts: list[int],
                                             restore_at: int) -> None:
    readings = make(items)
    rows, late = run(WindowOperator(spec, allowed_lateness_ms=lateness), [readings])
    got, got_late = run(WindowOperator(spec, allowed_lateness_ms=lateness), split(readings, cuts), restore_at)
    assert (_canon(got), got_late) == (_canon(rows), late)


# -- examples --------------------------------------------------------------------------------------------
def test_late_reading_is_counted_not_lost() -> None:
    op = WindowOperator(tumbling(60_000), ["count", "sum"], allowed_lateness_ms=5_000)
    op.process(_cols(make([("d", 0, {"t": 1.0}), ("d", 70_000, {"t": 2.0})])))  # watermark 65 s: [0, 60 s) final
    out = op.process(_cols(make([("d", 10_000, {"t": 3.0, "h": 1.0})])))
    assert (len(out), out.late, op.late_total) == (0, 2, 2)
    out = op.process(_cols(make([("d", 62_000, {"t": 4.0})])))  # 3 s behind the newest: within lateness
    assert out.late == 0
    assert [(r["start_ms"], r["count"], r["sum"]) for r in op.flush().rows()] == [(T0 + 60_000, 2, 6.0)]


def test_hopping_reading_misses_only_emitted_windows() -> None:
    op = WindowOperator(Hopping(180_000, 60_000), ["count"], allowed_lateness_ms=0)
    first = op.process(_cols(make([("d", 100_000, {"t": 1.0}), ("d", 150_000, {"t": 1.0})])))
    assert [r["end_ms"] - T0 for r in first.rows()] == [120_000]  # watermark 100 s then 150 s
    out = op.process(_cols(make([("d", 110_000, {"t": 5.0})])))  # in [-60,120) (emitted), [0,180), [60,240)
    assert out.late == 1
    assert [(r["end_ms"] - T0, r["count"]) for r in op.flush().rows()] == [(180_000, 3), (240_000, 3), (300_000, 1)]


def test_late_reading_bridges_two_sessions() -> None:
    op = WindowOperator(Session(gap_ms=15_000), ["count", "first", "last", "rate"], allowed_lateness_ms=60_000)
    assert not op.process(_cols(make([("d", 0, {"t": 1.0}), ("d", 20_000, {"t": 5.0})])))
    assert not op.process(_cols(make([("d", 10_000, {"t": 3.0})])))  # 0 -- 10 -- 20: one session
    out = op.process(_cols(make([("d", 200_000, {"t": 0.0})])))
    assert out.rows() == [{"device": "d", "metric": "t", "start_ms": T0, "end_ms": T0 + 35_000, "count": 3,
                           "first": 1.0, "last": 5.0, "rate": 0.2}]
    assert op.watermark("d") == T0 + 140_000 and op.watermark("other") is None
    rows = op.process(_cols(make([("d", 215_000, {"t": 0.0}), ("d", 500_000, {"t": 0.0})]))).rows()
    rows += op.flush().rows()  # 200 s and 215 s are gap_ms apart: two sessions
    assert [(r["start_ms"] - T0, r["count"]) for r in rows] == [(200_000, 1), (215_000, 1), (500_000, 1)]


def test_exact_on_large_groups_of_any_magnitude() -> None:
    """Thousands of readings in one window, exponents close (the int64 limb path) and spread (the fallback)."""
    rng = np.random.default_rng(7)
    close = (20 + rng.standard_normal(3000)).tolist()
    spread = (rng.standard_normal(3000) * 10.0 ** rng.integers(-30, 30, 3000)).tolist()
    readings = [Reading("d", T0 + i, {"close": c, "spread": s}, key=i, chk=0)
                for i, (c, s) in enumerate(zip(close, spread, strict=True))]
    ref = Reference(tumbling(3_600_000), 0)
    ref.feed(readings)
    got, _ = run(WindowOperator(tumbling(3_600_000), allowed_lateness_ms=0), [readings])
    assert _canon(got) == _canon(ref.emit(final=True))
    assert got[0]["sum"] == math.fsum(close)


def test_snapshot_keeps_only_open_windows() -> None:
    op = WindowOperator(tumbling(60_000), allowed_lateness_ms=0)
    op.process(_cols(make([("d", i * 1000, {"t": float(i)}) for i in range(600)])))
    small = len(op.snapshot())
    op.process(_cols(make([("d", 600_000 + i * 1000, {"t": float(i)}) for i in range(6000)])))
    assert len(op.snapshot()) < 2 * small  # one open window either way


def test_invalid_specs() -> None:
    with pytest.raises(ValueError, match="must divide"):
        Hopping(300_000, 70_000)
    with pytest.raises(ValueError, match="unknown aggregates"):
        WindowOperator(tumbling(1000), ["median"], allowed_lateness_ms=0)
    with pytest.raises(ValueError):
        Session(0)
    assert set(AGGREGATES) >= {"count", "sum", "min", "max", "avg", "stddev", "last", "rate"}


def test_docs_example() -> None:
    """The example of docs/windows.md, as written there."""
    from fieldmesh.core.batch import ReadingColumns
    from fieldmesh.core.model import Reading
    from fieldmesh.stream.windows import Hopping, WindowOperator

    op = WindowOperator(Hopping(size_ms=300_000, hop_ms=60_000), ["count", "avg", "max", "last"],
                        allowed_lateness_ms=10_000)
    t0 = 1_700_000_040_000  # a whole minute
    readings = [Reading("pump-1", t0 + i * 15_000, {"temp": 20.0 + i}, key=i, chk=0) for i in range(40)]
    out = op.process(ReadingColumns.from_readings(readings))
    assert out.rows()[0] == {"device": "pump-1", "metric": "temp", "start_ms": t0 - 240_000, "end_ms": t0 + 60_000,
                             "count": 4, "avg": 21.5, "max": 23.0, "last": 23.0}
    state = op.snapshot()  # store it with the consumer's bus positions
    op = WindowOperator.restore(state)
    out = op.process(ReadingColumns.from_readings([Reading("pump-1", t0, {"temp": 99.0}, key=99, chk=0)]))
    assert (len(out), out.late, op.late_total) == (0, 1, 1)  # its windows were final: counted, not lost
    assert isinstance(out, WindowResults)


def test_rows_order_is_by_end_then_names() -> None:
    items = [(d, t, {"b": 1.0, "a": 2.0}) for t in range(0, 200_000, 7_000) for d in ("z", "y")]
    random.Random(3).shuffle(items)
    rows, _ = run(WindowOperator(tumbling(60_000), ["count"], allowed_lateness_ms=300_000), [make(items)])
    keys = [(r["end_ms"], r["device"], r["metric"]) for r in rows]
    assert keys == sorted(keys) and len(keys) == len(set(keys)) == 4 * 4


def test_empty_batches_and_after_flush() -> None:
    op = WindowOperator(Hopping(120_000, 60_000), ["count"], allowed_lateness_ms=0)
    assert (len(op.process(_cols([]))), op.process(_cols([])).late) == (0, 0)
    op.process(_cols(make([("d", 0, {"t": 1.0})])))
    assert [r["count"] for r in op.flush().rows()] == [1, 1]
    out = op.process(_cols(make([("d", 5_000, {"t": 1.0}), ("e", 5_000, {"t": 1.0})])))  # d: after its flush
    assert (len(out), out.late, op.late_total) == (0, 1, 1)
    assert [r["device"] for r in op.flush().rows()] == ["e", "e"]


@settings(max_examples=100, deadline=None)
@given(items=readings_st, spec=specs.filter(lambda s: isinstance(s, Hopping)), lateness=lateness_st,
       cuts=st.lists(st.integers(0, 100), max_size=6), update_ms=st.sampled_from([1_000, 60_000, 10**9]))
def test_updates_end_where_one_batch_does(items: list[Any], spec: Hopping, lateness: int, cuts: list[int],
                                          update_ms: int) -> None:
    """on_late="update": the last version of each window is what one batch gives; with an update horizon
    beyond every delay nothing is late and the windows equal those of the readings in event-time order."""
    readings = make(items)

    def last_versions(batches: list[list[Reading]]) -> tuple[list[Any], int]:
        rows, late = run(WindowOperator(spec, allowed_lateness_ms=lateness, on_late="update",
                                        update_ms=update_ms), batches)
        final = {(r["device"], r["metric"], r["start_ms"]): {k: v for k, v in r.items() if k != "update"}
                 for r in rows}
        return _canon(list(final.values())), late

    got = last_versions(split(readings, cuts))
    assert got == last_versions([readings])
    if update_ms == 10**9:
        in_order = sorted(readings, key=lambda r: (r.ts_ms, r.key))
        assert got == (_canon(run(WindowOperator(spec, allowed_lateness_ms=lateness), [in_order])[0]), 0)


def test_update_example() -> None:
    op = WindowOperator(tumbling(60_000), ["count", "sum"], allowed_lateness_ms=0, on_late="update",
                        update_ms=120_000)
    out = op.process(_cols(make([("d", 10_000, {"t": 1.0}), ("d", 61_000, {"t": 2.0})])))
    assert [(r["count"], r["update"]) for r in out.rows()] == [(1, False)]
    out = op.process(_cols(make([("d", 20_000, {"t": 3.0}), ("d", 200_000, {"t": 0.0})])))
    assert [(r["end_ms"] - T0, r["count"], r["sum"], r["update"]) for r in out.rows()] == [
        (60_000, 2, 4.0, True), (120_000, 1, 2.0, False)]
    out = op.process(_cols(make([("d", 30_000, {"t": 5.0})])))  # watermark 200 s >= 60 s + 120 s: closed
    assert (len(out), out.late) == (0, 1)
    with pytest.raises(ValueError, match="sessions"):
        WindowOperator(Session(1000), allowed_lateness_ms=0, on_late="update", update_ms=1)
    with pytest.raises(ValueError, match="update_ms"):
        WindowOperator(tumbling(1000), allowed_lateness_ms=0, on_late="update")


@settings(max_examples=500, deadline=None)
@given(a=st.integers(1, 2**300), b=st.integers(1, 2**300), root=st.integers(1, 2**54), k=st.integers(-300, 300))
def test_stddev_square_root_is_correctly_rounded(a: int, b: int, root: int, k: int) -> None:
    """The square root behind the stddevs, on any ratio and on exact squares (midpoints between floats
    included, where a float estimate alone would round the wrong way)."""
    from fieldmesh.stream.windows import _sqrt_ratio

    assert _sqrt_ratio(a, b) == _sqrt(Fraction(a, b))
    num, den = (root * root << 2 * k, 1) if k >= 0 else (root * root, 1 << -2 * k)
    assert _sqrt_ratio(num, den) == _sqrt(Fraction(num, den))


def test_trigger_names_the_reading_that_made_each_window_final_whatever_the_batching() -> None:
    """``trigger``: per window, the first reading of its device with ts >= end + lateness, in arrival order."""
    rnd = random.Random(4)
    rs = []
    clock = {"a": 0, "b": 0}
    for i in range(400):
        d = rnd.choice("ab")
        clock[d] += rnd.randrange(0, 4000)
        ts = clock[d] - (rnd.randrange(0, 30_000) if rnd.random() < 0.1 else 0)
        rs.append(Reading(d, 1_000_000 + ts, {"t": float(i)}, key=i, chk=0, received_ms=10_000 + i))

    def run(sizes: list[int]) -> dict[tuple[str, int], int]:
        op = WindowOperator(Hopping(20_000, 10_000), ["count"], allowed_lateness_ms=5_000)
        out: dict[tuple[str, int], int] = {}
        i = 0
        while i < len(rs):
            n = sizes[i % len(sizes)]
            cols = ReadingColumns.from_readings(rs[i:i + n])
            res = op.process(cols)
            assert res.trigger is not None
            for d, end, t in zip(res.device.tolist(), res.end_ms.tolist(), res.trigger.tolist(), strict=True):
                out.setdefault((d, end), int(cols.received_ms[t]))
            i += n
        return out

    one = run([1])
    assert len(one) > 50
    for d, end in one:  # an oracle: the first reading of the device at or past end + lateness
        first = next(r for r in rs if r.device_id == d and r.ts_ms >= end + 5_000)
        assert one[(d, end)] == first.received_ms
    assert run([7, 1, 40]) == one and run([400]) == one
