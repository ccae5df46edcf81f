"""Rollup arithmetic shared by the hot stores (pure functions).

An accumulator is ``[count, m, e, min, max]``: the exact sum is ``m * 2**e``
(:mod:`fieldmesh.core.exact`), so merging accumulators in any order gives the same result.
Bools count as 0 and 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import repeat
from operator import and_, lshift, mul, neg, rshift, truediv
from typing import Final

import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.exact import exact_avg, exact_value

__all__ = ["Acc", "RollupKey", "evict_oldest", "exact_columns", "merge_acc"]

RollupKey = tuple[str, str, int]
"""(device_id, metric, window_start_ms)"""
Acc = list[float | int]
"""[count, m, e, min, max]"""


def merge_acc(a: Acc, b: Acc) -> Acc:
    """Merge two accumulators into a new one (inlined exact merge: this runs per window touched)."""
    e1, e2 = int(a[2]), int(b[2])
    if e1 <= e2:
        m, e = int(a[1]) + (int(b[1]) << (e2 - e1)), e1
    else:
        m, e = int(b[1]) + (int(a[1]) << (e1 - e2)), e2
    return [a[0] + b[0], m, e, a[3] if a[3] <= b[3] else b[3], a[4] if a[4] >= b[4] else b[4]]


def evict_oldest(cache: dict[RollupKey, Acc], keep: int) -> None:
    """Drop all but about the ``keep`` accumulators of the latest windows from a rollup cache.

    Readings mostly touch recent windows; an old window touched again (a late reading) is read back
    from the store. Bounds a cache's memory without forgetting the hot windows, as clearing it would.
    """
    if len(cache) <= keep:
        return
    starts = np.fromiter((k[2] for k in cache), np.int64, len(cache))
    cut = int(np.partition(starts, len(starts) - keep)[len(starts) - keep]) if keep > 0 else np.iinfo(np.int64).max
    for k in [k for k in cache if k[2] < cut]:
        del cache[k]


_TINY: Final = 2.0**-1022  # the smallest normal float


def exact_columns(count: list[int], m: list[int], e: list[int]) -> tuple[list[float], list[float], list[str]]:
    """Per accumulator: :func:`~fieldmesh.core.exact.exact_value`, :func:`~fieldmesh.core.exact.exact_avg`
    and :func:`~fieldmesh.core.exact.format_exact` of ``m * 2**e`` (and ``count``), the same values.

    Why: these run per rollup row written. ``float(m)`` and ``m / count`` of Python ints are correctly
    rounded (C, whatever the size of ``m``), and scaling by ``2**e`` (``ldexp``) is exact while the result
    is a normal float: so the sum and the average of most rows are those two operations and one numpy
    ``ldexp`` over the column, without the wide shifted integers of the general form. When every mantissa and
    count is below 2**53 (:func:`_int64_columns`) the two operations and the trailing zeros are numpy's too.
    Rows whose result is subnormal or beyond the float range take :func:`_exact_rows` (the integer operations).
    """
    if not m:
        return [], [], []
    small = _int64_columns(count, m)
    if small is not None:
        ma, ca = small
        mf = ma.astype(np.float64)
        q = mf / ca
        tz = np.maximum(np.frexp((ma & -ma).astype(np.float64))[1] - 1, 0)  # 2**k is exact: frexp gives k + 1
        odd: Iterable[int] = (ma >> tz).tolist()
    else:
        m = list(map(int, m))  # numpy integers in an object column would not take int's methods
        try:
            if min(count) <= 0:
                raise ZeroDivisionError
            mf = np.array(list(map(float, m)), dtype=np.float64)
            q = np.array(list(map(truediv, m, count)), dtype=np.float64)
        except (OverflowError, ZeroDivisionError):  # a mantissa beyond the float range, or a count of 0
            return _exact_rows(count, m, e)
        tz = np.maximum(np.array(list(map(int.bit_length, map(and_, m, map(neg, m)))), dtype=np.int64) - 1, 0)
        odd = map(rshift, m, tz.tolist())
    ea = np.asarray(e, dtype=np.int64)
    ei = np.clip(ea, -4000, 4000).astype(np.int32)
    with np.errstate(over="ignore", under="ignore"):
        x = np.ldexp(mf, ei)
        avg = np.ldexp(q, ei)
    ax, aa = np.abs(x), np.abs(avg)
    zero = mf == 0.0
    fast = zero | ((ax >= _TINY) & (ax < np.inf) & (aa >= _TINY) & (aa < np.inf))
    ex = np.where(zero, 0, ea + tz)
    values: list[float] = x.tolist()
    avgs: list[float] = avg.tolist()
    texts: list[str] = list(map("%x:%d".__mod__, zip(odd, ex.tolist(), strict=True)))
    if not fast.all():
        slow = np.flatnonzero(~fast).tolist()
        sv, sa, _ = _exact_rows([count[i] for i in slow], [m[i] for i in slow], [e[i] for i in slow])
        for j, i in enumerate(slow):
            values[i], avgs[i] = sv[j], sa[j]
    return values, avgs, texts


_F53: Final = 2**53


def _int64_columns(count: list[int], m: list[int]) -> tuple[NDArray[np.int64], NDArray[np.int64]] | None:
    """``m`` and ``count`` as int64 columns when every mantissa and count is below 2**53 (and counts above 0): both
    convert to floats exactly, so ``m / count`` is one correctly rounded division, as Python's integer division
    gives it. Windows of integer or coarse fixed-point readings (counters, quantized sensors: 0.25 steps) have
    such sums; those of arbitrary floats usually not (their mantissas, shifted to the window's lowest exponent,
    pass 53 bits), and one such row sends the whole call to the general path (the conversion fails at it)."""
    try:
        ma = np.array(m, dtype=np.int64)
        ca = np.array(count, dtype=np.int64)
    except (OverflowError, TypeError):  # beyond int64
        return None
    if not ((ca > 0) & (ca < _F53) & (ma > -_F53) & (ma < _F53)).all():
        return None
    return ma, ca


def _exact_rows(count: list[int], m: list[int], e: list[int]) -> tuple[list[float], list[float], list[str]]:
    """:func:`exact_columns` with Python integers: the same integer operations mapped over the columns."""
    if not m:
        return [], [], []
    m = list(map(int, m))  # numpy integers in an object column would not take int's methods
    ea = np.asarray(e, dtype=np.int64)
    try:
        if min(count) <= 0:
            raise ZeroDivisionError
        num = list(map(lshift, m, np.maximum(ea, 0).tolist()))  # m * 2**e = num / den, both ints
        den = list(map(lshift, repeat(1), np.maximum(-ea, 0).tolist()))
        values = list(map(truediv, num, den))
        avgs = list(map(truediv, num, map(mul, count, den)))
    except (OverflowError, ZeroDivisionError):  # ±inf or a count of 0 (nan): the exact module's answers
        values = list(map(exact_value, m, e))
        avgs = list(map(exact_avg, m, e, count))
    bits = np.array(list(map(int.bit_length, map(and_, m, map(neg, m)))), dtype=np.int64)  # lowest set bit
    tz = np.maximum(bits - 1, 0)  # trailing zeros (0 for m == 0)
    ex = ea + tz
    ex[bits == 0] = 0
    return values, avgs, list(map("{:x}:{}".format, map(rshift, m, tz.tolist()), ex.tolist()))
