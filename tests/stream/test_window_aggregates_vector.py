"""The window aggregates computed for all emitted windows at once (object-array Python ints, numpy) equal
the scalar functions, window by window, bit for bit: random windows of random floats, from ordinary
values to the extremes of the float range where the fast paths fall back."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldmesh.core.exact import exact_avg, exact_sum
from fieldmesh.stream.windows import (
    _avgs,
    _exact_sum_squares,
    _rate,
    _rates,
    _spread,
    _spreads,
    _sqrt_scaled,
    _stddevs,
)

finite = st.floats(allow_nan=False, allow_infinity=False)
ordinary = st.integers(-4000, 4000).map(lambda i: i / 4) | st.floats(-1e6, 1e6, allow_nan=False)
values = st.one_of(finite, ordinary)
window = st.lists(values, min_size=1, max_size=8)


def _same(a: list[float], b: list[float]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or (x == y and math.copysign(1, x) == math.copysign(1, y))
               for x, y in zip(a, b, strict=True)) and len(a) == len(b)


@settings(max_examples=300, deadline=None)
@given(st.lists(window, min_size=1, max_size=12))
def test_avg_sum_stddev_equal_the_scalar_functions(wins: list[list[float]]) -> None:
    sums = [exact_sum(w) for w in wins]
    squares = [_exact_sum_squares(np.array(w)) for w in wins]
    n = np.array([len(w) for w in wins], dtype=np.int64)
    sm = np.empty(len(wins), dtype=object)
    sm[:] = [m for m, _ in sums]
    qm = np.empty(len(wins), dtype=object)
    qm[:] = [m for m, _ in squares]
    se = np.array([e for _, e in sums], dtype=np.int64)
    qe = np.array([e for _, e in squares], dtype=np.int64)
    assert _same(_avgs(sm, se, n).tolist(), [exact_avg(m, e, len(w)) for (m, e), w in zip(sums, wins, strict=True)])
    assert _same(_avgs(sm, se, np.ones(len(wins), dtype=np.int64)).tolist(),
                 [exact_avg(m, e, 1) for m, e in sums])
    num, e0 = _spreads(n, sm, se, qm, qe)
    spread = [_spread(len(w), s[0], s[1], q[0], q[1]) for w, s, q in zip(wins, sums, squares, strict=True)]
    assert [int(x) for x in num] == [x for x, _ in spread] and e0.tolist() == [e for _, e in spread]
    for sample in (0, 1):
        want = [math.nan if len(w) <= sample else _sqrt_scaled(x, e, len(w) * (len(w) - sample))
                for w, (x, e) in zip(wins, spread, strict=True)]
        assert _same(_stddevs(n, num, e0, sample=bool(sample)).tolist(), want)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(values, values, st.integers(0, 10**12), st.integers(0, 10**7)), min_size=1, max_size=20))
def test_rate_equals_the_scalar_function(rows: list[tuple[float, float, int, int]]) -> None:
    fv = np.array([r[0] for r in rows])
    lv = np.array([r[1] for r in rows])
    fts = np.array([r[2] for r in rows], dtype=np.int64)
    lts = fts + np.array([r[3] for r in rows], dtype=np.int64)
    want = [_rate(a, t0, b, t1) for a, b, t0, t1 in zip(fv.tolist(), lv.tolist(), fts.tolist(), lts.tolist(),
                                                          strict=True)]
    assert _same(_rates(fv, fts, lv, lts).tolist(), want)
