"""Exact sums are order-independent and equal to math.fsum."""

from __future__ import annotations

import math
import random
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from fieldmesh.core.exact import ExactSum, exact_avg, format_exact, merge, parse_exact

finite = st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300)


@given(st.lists(finite, min_size=1, max_size=60), st.randoms())
def test_sum_is_fsum_in_any_order_and_grouping(vs: list[float], rnd: random.Random):
    a = ExactSum()
    for v in vs:
        a.add(v)
    shuffled = vs[:]
    rnd.shuffle(shuffled)
    cut = rnd.randint(0, len(shuffled))
    b1, b2 = ExactSum(), ExactSum()
    for v in shuffled[:cut]:
        b1.add(v)
    for v in shuffled[cut:]:
        b2.add(v)
    m, e = merge(b1.m, b1.e, b2.m, b2.e)
    assert format_exact(a.m, a.e) == format_exact(m, e)
    try:
        expected = math.fsum(vs)
    except OverflowError:
        return
    assert a.value() == expected
    assert parse_exact(format_exact(a.m, a.e)) and exact_avg(a.m, a.e, len(vs)) == float(
        sum(map(Fraction, vs)) / len(vs)
    )


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=80))
def test_exact_sum_of_a_list_is_exact(vs: list[float]):
    from fieldmesh.core.exact import exact_sum

    m, e = exact_sum(vs)
    assert Fraction(m) * Fraction(2) ** e == sum(map(Fraction, vs), Fraction(0))


def test_sums_beyond_the_float_range_are_infinite_not_an_error():
    """1e308 + 1e308 overflows a float: the sum reads as ±inf (its average too), never OverflowError."""
    from fieldmesh.core.exact import exact_value

    for sign in (1.0, -1.0):
        a = ExactSum()
        a.add(sign * 1e308)
        a.add(sign * 1e308)
        assert exact_value(a.m, a.e) == sign * math.inf
        assert exact_avg(a.m, a.e, 1) == sign * math.inf
        assert exact_avg(a.m, a.e, 2) == sign * 1e308
