"""Exact, order-independent sums of floats.

Every finite float is ``n * 2**e`` for integers ``n`` and ``e``. An :class:`ExactSum` keeps the sum
as such a pair with unbounded ``n`` (a Python int), so adding the same values in any order, in any
grouping, gives the same state, and :meth:`ExactSum.value` is the correctly rounded sum (equal to
``math.fsum`` of the values). Rollups use it so that a replay, a permutation or a late reading can
never change a sum in its last bits.
"""

from __future__ import annotations

import math

__all__ = ["ExactSum", "add_float", "exact_avg", "exact_sum", "exact_value", "format_exact", "merge", "parse_exact"]


def add_float(m: int, e: int, v: float) -> tuple[int, int]:
    """Return ``(m, e)`` + ``v`` where the state stands for ``m * 2**e``."""
    n, d = v.as_integer_ratio()
    ev = 1 - d.bit_length()  # d == 2**-ev
    if ev < e:
        m <<= e - ev
        e = ev
    return m + (n << (ev - e)), e


def exact_sum(values: list[float]) -> tuple[int, int]:
    """The exact sum of ``values`` as ``(m, e)``, fast for long lists.

    ``math.fsum`` (C, exact internally) returns the correctly rounded sum; subtracting it and
    summing again yields the rounding residual, and so on until the residual is exactly zero (every
    float is a multiple of 2**-1074, so a non-zero residual never rounds to zero). The terms form an
    exact expansion of the sum, usually one to three floats, which are then added exactly.
    """
    m, e = 0, 0
    if len(values) <= 4:  # few values: adding them one by one is cheaper than the fsum passes
        for v in values:
            m, e = add_float(m, e, float(v))
        return m, e
    terms: list[float] = []
    work = list(values)
    try:
        while True:
            t = math.fsum(work)
            if t == 0.0:
                break
            terms.append(t)
            work.append(-t)
            if len(terms) > 60:  # cannot happen for finite inputs; keep the loop bounded anyway
                raise OverflowError
    except OverflowError:  # an intermediate sum beyond the float range: add one by one
        terms = [float(v) for v in values]
    for t in terms:
        m, e = add_float(m, e, t)
    return m, e


def merge(m1: int, e1: int, m2: int, e2: int) -> tuple[int, int]:
    """Sum of two exact states."""
    if e1 > e2:
        m1, e1, m2, e2 = m2, e2, m1, e1
    return m1 + (m2 << (e2 - e1)), e1


def exact_value(m: int, e: int) -> float:
    """The correctly rounded float of ``m * 2**e`` (±inf beyond the float range)."""
    try:
        return float(m << e) if e >= 0 else m / (1 << -e)
    except OverflowError:
        return math.inf if m > 0 else -math.inf  # copysign would convert m to a float: OverflowError


def exact_avg(m: int, e: int, count: int) -> float:
    """The correctly rounded float of ``m * 2**e / count``."""
    if count <= 0:
        return math.nan
    try:
        return (m << e) / count if e >= 0 else m / (count << -e)
    except OverflowError:
        return math.inf if m > 0 else -math.inf  # copysign would convert m to a float: OverflowError


def format_exact(m: int, e: int) -> str:
    """Text form for storage: ``"<hex m>:<e>"``, canonical (``m`` odd or zero)."""
    if m == 0:
        return "0:0"
    tz = (m & -m).bit_length() - 1
    return f"{m >> tz:x}:{e + tz}"


def parse_exact(s: str) -> tuple[int, int]:
    """Inverse of :func:`format_exact`."""
    a, b = s.split(":")
    return int(a, 16), int(b)


class ExactSum:
    """A mutable exact accumulator (convenience wrapper over the functions above)."""

    __slots__ = ("e", "m")

    def __init__(self, m: int = 0, e: int = 0) -> None:
        self.m = m
        self.e = e

    def add(self, v: float) -> None:
        """Add one float."""
        self.m, self.e = add_float(self.m, self.e, v)

    def value(self) -> float:
        """The correctly rounded sum."""
        return exact_value(self.m, self.e)
