"""Hopping windows of many panes keep running exact sums (each part added once and subtracted once, the
parts' sums in a heap); they must give exactly what merging every window's parts again gives.

The plain path is the same operator with the running sums turned off (``_SLIDE_MIN`` above every k), so
the two share everything but the code under test. Compared bit for bit (``float.hex``, so ``-0.0`` is not
``0.0``), call by call: the windows, their aggregates, late counts, triggers and the snapshots.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.core.batch import ReadingColumns
from fieldmesh.core.model import Reading
from fieldmesh.stream import windows
from fieldmesh.stream.windows import AGGREGATES, Hopping, WindowOperator, WindowResults

T0 = 1_700_000_040_000  # a whole minute

# floats of any magnitude (subnormals to near the float limit, both zeros), NaN-free
values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e-300, max_value=1e-300),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6),
    st.integers(-400, 1600).map(lambda x: x / 4),
    st.sampled_from([0.0, -0.0, 5e-324, -2.5e-310, 2.0**60, 1.7e308, -1.7e308, 21.5]),
)
readings_st = st.lists(
    st.tuples(st.sampled_from(["d1", "d2", "d-3"]),
              st.one_of(st.integers(0, 5_400_000), st.integers(0, 90).map(lambda s: s * 60_000)),
              st.dictionaries(st.sampled_from(["t", "h"]), values, min_size=1, max_size=2)),
    min_size=1, max_size=120,
)


@contextmanager
def _plain() -> Iterator[None]:
    """Operators made (or restored) inside merge every window's parts again."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(windows, "_SLIDE_MIN", 10**9)
        yield


def _bits(x: Any) -> Any:
    return x.hex() if isinstance(x, float) else x


def _rows(out: WindowResults) -> list[tuple[Any, ...]]:
    rows = out.rows()
    trig = [] if out.trigger is None else out.trigger.tolist()
    return [tuple((k, _bits(v)) for k, v in r.items()) for r in rows] + [("trigger", tuple(trig))]


def _split(items: list[Reading], cuts: list[int]) -> list[list[Reading]]:
    bounds = sorted({0, len(items), *(c % (len(items) + 1) for c in cuts)})
    return [items[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=readings_st, hop=st.sampled_from([1_000, 30_000, 60_000]), k=st.integers(3, 60),
       lateness=st.sampled_from([0, 5_000, 60_000, 400_000]), cuts=st.lists(st.integers(0, 120), max_size=8),
       restore_at=st.integers(-1, 8), aggs=st.sampled_from([AGGREGATES, ("avg", "stddev", "count"), ("sum",)]))
def test_running_sums_equal_merging_every_window(items: list[Any], hop: int, k: int, lateness: int, cuts: list[int],
                                                 restore_at: int, aggs: tuple[str, ...]) -> None:
    readings = [Reading(d, T0 + t, m, key=i, chk=0) for i, (d, t, m) in enumerate(items)]
    spec = Hopping(hop * k, hop)
    fast = WindowOperator(spec, aggs, allowed_lateness_ms=lateness)
    with _plain():
        plain = WindowOperator(spec, aggs, allowed_lateness_ms=lateness)
    assert fast._heap is not None and plain._heap is None  # the two paths under comparison
    for i, batch in enumerate(_split(readings, cuts)):
        if i == restore_at:
            assert fast.snapshot() == plain.snapshot()
            fast = WindowOperator.restore(fast.snapshot())
            with _plain():
                plain = WindowOperator.restore(plain.snapshot())
        cols = ReadingColumns.from_readings(batch)
        got, want = fast.process(cols), plain.process(cols)
        assert _rows(got) == _rows(want)
        assert got.late == want.late
    assert fast.snapshot() == plain.snapshot()
    assert _rows(fast.flush()) == _rows(plain.flush())
    assert fast.late_total == plain.late_total


def test_running_sums_survive_a_long_stream_of_mixed_magnitudes() -> None:
    """Hours of an hour window over minute hops: values from 1e-300 to 1e300 enter and leave the running
    sums many times (exact subtraction back to small values), equal to the plain path throughout."""
    rng = np.random.default_rng(7)
    spec = Hopping(3_600_000, 60_000)
    fast = WindowOperator(spec, AGGREGATES, allowed_lateness_ms=30_000)
    with _plain():
        plain = WindowOperator(spec, AGGREGATES, allowed_lateness_ms=30_000)
    ts = 0
    for _ in range(60):
        batch = []
        for _ in range(200):
            ts += int(rng.integers(0, 20_000))
            late = int(rng.integers(0, 90_000)) if rng.random() < 0.05 else 0
            mag = 10.0 ** float(rng.choice([-300, -20, 0, 3, 20, 300]))
            batch.append(Reading(f"d{int(rng.integers(0, 4))}", T0 + ts - late,
                                 {"t": float(rng.normal()) * mag, "h": float(rng.integers(0, 100)) / 4}, key=0, chk=0))
        cols = ReadingColumns.from_readings(batch)
        assert _rows(fast.process(cols)) == _rows(plain.process(cols))
    assert _rows(fast.flush()) == _rows(plain.flush())
    assert fast._carry is not None and not len(fast._carry.dev)  # every sum added was subtracted again
    assert fast.late_total == plain.late_total > 0
