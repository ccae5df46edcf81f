"""``rollup.exact_columns`` (the column-wise sum, average and ``sum_exact`` of rollup rows) gives exactly what
the per-row functions of ``core.exact`` give, for any mantissa, exponent and count."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from fieldmesh.core.exact import exact_avg, exact_value, format_exact
from fieldmesh.store.rollup import _int64_columns, exact_columns

_mantissa = st.one_of(
    st.integers(-1000, 1000), st.integers(-(2**53), 2**53), st.integers(-(2**63), 2**63),
    st.integers(-(2**1100), 2**1100), st.just(0),
)
_exponent = st.one_of(st.integers(-1200, 1100), st.sampled_from([0, -52, -1022, -1074, -1100, 971, 1000]))
_count = st.one_of(st.integers(1, 10), st.integers(1, 2**62), st.just(0))
_row = st.tuples(_count, _mantissa, _exponent)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))


@settings(max_examples=400, deadline=None)
@given(st.lists(_row, min_size=1, max_size=40))
def test_exact_columns_equal_the_per_row_functions(rows: list[tuple[int, int, int]]) -> None:
    count, m, e = (list(c) for c in zip(*rows, strict=True))
    values, avgs, texts = exact_columns(count, m, e)
    for i, (c, mi, ei) in enumerate(rows):
        assert _same(values[i], exact_value(mi, ei)), (mi, ei)
        assert _same(avgs[i], exact_avg(mi, ei, c)), (mi, ei, c)
        assert texts[i] == format_exact(mi, ei)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2**62), _mantissa, _exponent), min_size=1, max_size=40))
def test_exact_columns_without_empty_windows(rows: list[tuple[int, int, int]]) -> None:
    """No count of 0 (the rows a stream writes): the column-wise path, with per-row fallbacks."""
    test_exact_columns_equal_the_per_row_functions.hypothesis.inner_test(rows)  # type: ignore[attr-defined]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2**53 - 1),
                          st.one_of(st.integers(-1000, 1000), st.integers(-(2**53) + 1, 2**53 - 1), st.just(0)),
                          _exponent), min_size=1, max_size=40))
def test_exact_columns_of_a_streams_windows(rows: list[tuple[int, int, int]]) -> None:
    """Every mantissa and count below 2**53: the int64 columns' path takes them (subnormal and out-of-range
    results included) and gives what the per-row functions give."""
    count, m, e = (list(c) for c in zip(*rows, strict=True))
    assert _int64_columns(count, m) is not None
    got = exact_columns(count, m, e)
    for i, (c, mi, ei) in enumerate(rows):
        assert _same(got[0][i], exact_value(mi, ei)), (mi, ei)
        assert _same(got[1][i], exact_avg(mi, ei, c)), (mi, ei, c)
        assert got[2][i] == format_exact(mi, ei)


def test_wider_mantissas_or_counts_take_the_general_path() -> None:
    assert _int64_columns([1], [2**53]) is None
    assert _int64_columns([1], [-(2**53)]) is None
    assert _int64_columns([2**53], [1]) is None
    assert _int64_columns([0], [1]) is None
    assert _int64_columns([1], [2**70]) is None
    assert _int64_columns([3], [2**53 - 1]) is not None


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 2**54),
                          st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(2**53 - 3, 2**53 + 3),
                                    st.integers(-(2**80), 2**80)),
                          st.integers(-1100, 1000)), min_size=1, max_size=40))
def test_windows_of_floats_past_53_bits(rows: list[tuple[int, int, int]]) -> None:
    """Mantissas of 54 to 64 bits (the sums of a window of floats of similar magnitude), beside wider ones and
    those near 2**53: the same values as the per-row functions."""
    test_exact_columns_equal_the_per_row_functions.hypothesis.inner_test(rows)  # type: ignore[attr-defined]
