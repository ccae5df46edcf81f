"""Event-time windows over :class:`~fieldmesh.core.batch.ReadingColumns`: hopping, tumbling and session.

What alerts and the feature store build on. A :class:`WindowOperator` takes batches of readings in arrival
order and returns the windows that became final, per device and metric, with any of :data:`AGGREGATES`.
Pure code (no I/O); its state is bounded (a window is dropped once emitted) and can be snapshotted to
bytes, so a consumer makes it durable with its bus positions.

**Watermarks.** Each device has an event-time watermark: the latest ``ts_ms`` seen from it (over all its
metrics) minus ``allowed_lateness_ms``. Per device, not per partition, because devices interleave on a
partition and an edge buffer replaying an outage is late only for its own device. A window is emitted,
final, when its device's watermark reaches its end. Readings are judged one by one in arrival order
against the watermark as it stood when they arrived (the readings before them in the same batch
included), so how the stream is cut into batches never changes a result.

**Lateness.** A reading that arrives after a window it falls in was emitted misses that window: it is
counted (:attr:`WindowResults.late`, :attr:`WindowOperator.late_total`), never silently lost. A reading at
most ``allowed_lateness_ms`` older than the newest one of its device never misses a window, so any arrival
order within that bound gives the same windows. Hopping: a reading misses only the windows already
emitted and still counts in its later ones. Sessions: a reading older than its device's watermark is
dropped whole (it might bridge into a session already emitted). With ``on_late="update"`` (hopping
windows), an emitted window keeps taking late readings for ``update_ms`` and is emitted again, flagged.

**Windows.** :class:`Hopping` windows ``[start, start + size_ms)`` start at every multiple of ``hop_ms``
(from the Unix epoch), so a reading belongs to ``size_ms / hop_ms`` windows; ``hop_ms`` must divide
``size_ms``. :func:`tumbling` is ``Hopping(size, size)``. :class:`Session` windows are per device and
metric: readings less than ``gap_ms`` apart are one session; a reading that bridges two open sessions
merges them. A session spans ``[first ts, last ts + gap_ms)``.

**Aggregates** are exact, then rounded once, so they do not depend on arrival order or batching: ``sum``
and ``avg`` come from exact sums (:mod:`fieldmesh.core.exact`), ``stddev`` (population) and
``stddev_samp`` (sample, NaN below two readings) from exact sums and exact sums of squares, correctly
rounded square roots of the exact variances. ``first`` and ``last`` are the values of the smallest and
largest ``(ts_ms, value)``: ties in event time go to the smaller value for ``first`` and the larger for
``last``. ``rate`` is ``(last - first) / (last ts - first ts)`` per second (NaN when they are equal).

How: readings are grouped with one ``np.lexsort`` and reduced with ``ufunc.reduceat``; exact sums use
int64 limbs when a group's exponents are close (the common case) and :func:`~fieldmesh.core.exact.exact_sum`
otherwise. Hopping windows keep one partial aggregate per pane (``hop_ms`` slice) and merge ``size/hop``
panes at emission; with three panes or more and late readings dropped, the exact sums are running sums
instead (each pane added once and subtracted once, exact as Python ints: :func:`_slide`), with the
panes' sums in lists the state points into (:class:`_Heap`). The mean, sum, stddev and rate of all the
windows one call emits are computed at once (Python-int operators applied by numpy to object arrays; a
float square root kept where an exact check shows it correctly rounded), equal bit for bit to the scalar
functions they fall back to.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Final, Literal

import msgspec
import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.batch import ReadingColumns
from fieldmesh.core.exact import exact_avg, exact_sum

__all__ = ["AGGREGATES", "Hopping", "Session", "WindowOperator", "WindowResults", "tumbling"]

AGGREGATES: Final = ("count", "sum", "min", "max", "avg", "stddev", "stddev_samp", "first", "last", "rate")
_NO_TS: Final = -(2**62)  # a device's newest ts before any reading
_END_TS: Final = 2**62  # the newest ts flush() assumes: every window ends before it
_LIMB: Final = 21
_LIMB_MASK: Final = (1 << _LIMB) - 1
_FAST_SHIFT: Final = 10  # |mantissa| << shift stays below 2**63
_FAST_COUNT: Final = 1 << 19  # sums of 3 * 2**44-sized limb products stay below 2**63
_SLIDE_MIN: Final = 3  # hopping windows of at least this many panes keep running exact sums (_slide)
_NO_E: Final = 2**40  # an exponent above every real one (rows without a sum)


@dataclass(frozen=True, slots=True)
class Hopping:
    """Windows of ``size_ms`` starting every ``hop_ms`` (a multiple of it), aligned to the epoch."""

    size_ms: int
    hop_ms: int

    def __post_init__(self) -> None:
        if self.hop_ms <= 0 or self.size_ms <= 0:
            raise ValueError("size_ms and hop_ms must be positive")
        if self.size_ms % self.hop_ms:
            raise ValueError(f"hop_ms ({self.hop_ms}) must divide size_ms ({self.size_ms})")


def tumbling(size_ms: int) -> Hopping:
    """Back-to-back windows of ``size_ms``."""
    return Hopping(size_ms, size_ms)


@dataclass(frozen=True, slots=True)
class Session:
    """Per device and metric: readings less than ``gap_ms`` apart in event time form one session."""

    gap_ms: int

    def __post_init__(self) -> None:
        if self.gap_ms <= 0:
            raise ValueError("gap_ms must be positive")


WindowSpec = Hopping | Session


@dataclass(frozen=True, slots=True, eq=False)
class WindowResults:
    """Windows emitted by one call, sorted by (end, device, metric, start); ``late``: readings x metrics
    that arrived too late for at least one of their windows (each counted once)."""

    device: NDArray[np.object_]  # str
    metric: NDArray[np.object_]  # str
    start_ms: NDArray[np.int64]
    end_ms: NDArray[np.int64]
    values: Mapping[str, NDArray[Any]]  # per aggregate asked for: count int64, the others float64
    late: int
    # on_late="update": True for a window whose end the watermark had passed before this call (emitted
    # before, or empty then), emitted again with late readings; False for a first emission
    update: NDArray[np.bool_] | None = None
    # per window: the batch row (reading, in arrival order) whose arrival made it final, i.e. the first of
    # its device with ts_ms >= end + allowed lateness (an update: the device's first row of the batch);
    # -1 from flush(). So ``received_ms[trigger]`` is when the window became known, whatever the batching.
    trigger: NDArray[np.int64] | None = None

    def __len__(self) -> int:
        return len(self.start_ms)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per window (for tests, examples and small outputs)."""
        cols: dict[str, list[Any]] = {"device": self.device.tolist(), "metric": self.metric.tolist(),
                                      "start_ms": self.start_ms.tolist(), "end_ms": self.end_ms.tolist()}
        cols.update((k, v.tolist()) for k, v in self.values.items())
        if self.update is not None:
            cols["update"] = self.update.tolist()
        return [dict(zip(cols, r, strict=True)) for r in zip(*cols.values(), strict=True)]


@dataclass(slots=True)
class _Parts:
    """Partial aggregates, one row each: per (device, metric, a, b), where (a, b) is (pane, first window
    index that may count it) for hopping windows and (first ts, last ts) for sessions. The sum is
    ``sm * 2**se`` and the sum of squares ``qm * 2**qe``, exact (Python ints in object arrays)."""

    dev: NDArray[np.int64]
    met: NDArray[np.int64]
    a: NDArray[np.int64]
    b: NDArray[np.int64]
    count: NDArray[np.int64]
    sm: NDArray[np.object_]
    se: NDArray[np.int64]
    qm: NDArray[np.object_]
    qe: NDArray[np.int64]
    mn: NDArray[np.float64]
    mx: NDArray[np.float64]
    fts: NDArray[np.int64]
    fv: NDArray[np.float64]
    lts: NDArray[np.int64]
    lv: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.count)

    def take(self, idx: NDArray[np.intp], *, sums: bool = True) -> _Parts:
        """Rows ``idx``; without ``sums`` the exact sums are left out (empty columns: cheaper)."""
        if sums:
            return _Parts(*(getattr(self, f.name)[idx] for f in fields(_Parts)))
        o, i = np.empty(0, dtype=object), np.empty(0, dtype=np.int64)
        return _Parts(self.dev[idx], self.met[idx], self.a[idx], self.b[idx], self.count[idx], o, i, o, i,
                      self.mn[idx], self.mx[idx], self.fts[idx], self.fv[idx], self.lts[idx], self.lv[idx])

    @staticmethod
    def concat(parts: Sequence[_Parts]) -> _Parts:
        return _Parts(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(_Parts)))

    @staticmethod
    def empty() -> _Parts:
        i, f, o = np.empty(0, np.int64), np.empty(0, np.float64), np.empty(0, object)
        return _Parts(i, i, i, i, i, o, i, o, i, f, f, i, f, i, f)


def _objects(values: Sequence[Any]) -> NDArray[np.object_]:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _segment_starts(*keys: NDArray[np.int64]) -> NDArray[np.intp]:
    """Indices where any of ``keys`` (sorted together) changes, 0 first."""
    n = len(keys[0])
    change = np.zeros(n, dtype=bool)
    change[:1] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(change)


def _group_ids(starts: NDArray[np.intp], n: int) -> NDArray[np.intp]:
    g = np.zeros(n, dtype=np.intp)
    g[starts[1:]] = 1
    return np.cumsum(g)


def _running_max(vals: NDArray[np.int64], starts: NDArray[np.intp], seeds: NDArray[np.int64]) -> NDArray[np.int64]:
    """Per segment (rows ``starts[i]:starts[i+1]``): the max of ``seeds[i]`` and the values before each row.

    Seeds below every value are raised to ``min(vals) - 1``: callers only compare the result with values,
    and a narrow range keeps the one-accumulate path.
    """
    n = len(vals)
    out = np.empty(n, dtype=np.int64)
    if not n:
        return out
    g = _group_ids(starts, n)
    prev = np.empty(n, dtype=np.int64)  # exclusive: a row sees its segment's earlier rows only
    prev[1:] = vals[:-1]
    prev[starts] = np.maximum(seeds, vals.min() - 1)
    lo = int(prev.min())
    span = int(prev.max()) - lo + 1
    if span * len(starts) < 2**62:  # segment number in the high part: one accumulate over all segments
        shifted = g.astype(np.int64) * span + (prev - lo)
        return np.maximum.accumulate(shifted) - g.astype(np.int64) * span + lo
    ends = [*starts[1:].tolist(), n]
    for s, e in zip(starts.tolist(), ends, strict=True):
        out[s:e] = np.maximum.accumulate(prev[s:e])
    return out


def _exact_sums(v: NDArray[np.float64], starts: NDArray[np.intp],
                squares: bool) -> tuple[NDArray[np.object_], NDArray[np.int64], NDArray[np.object_], NDArray[np.int64]]:
    """Exact sums (and sums of squares) of the groups of ``v`` beginning at ``starts``, as ``(m, e)`` columns.

    Each value is ``M * 2**E`` with ``|M| < 2**53`` (``np.frexp``). In a group whose exponents differ by at
    most 10, every ``|M| << (E - min E)`` fits in 63 bits; split into three 21-bit limbs, the limbs and their
    pairwise products sum in int64 without overflow for up to 2**19 values. Other groups go through
    :func:`~fieldmesh.core.exact.exact_sum` (the squares split exactly into three floats by Veltkamp's
    method, or as Python ints for magnitudes where that could overflow or underflow).
    """
    n, k = len(v), len(starts)
    mant, ex = np.frexp(v)
    m = (mant * 2.0**53).astype(np.int64)
    e = ex.astype(np.int64) - 53
    zero = m == 0
    g = _group_ids(starts, n)
    emin = np.minimum.reduceat(np.where(zero, 2**40, e), starts)
    emin = np.where(emin == 2**40, 0, emin)
    shift = np.where(zero, 0, e - emin[g])
    counts = np.diff(np.append(starts, n))
    fast = (np.maximum.reduceat(shift, starts) <= _FAST_SHIFT) & (counts < _FAST_COUNT)
    a = np.abs(m) << np.minimum(shift, _FAST_SHIFT)
    sign = np.where(m < 0, -1, 1)
    limbs = [a & _LIMB_MASK, (a >> _LIMB) & _LIMB_MASK, a >> (2 * _LIMB)]

    def combine(terms: list[NDArray[np.int64]]) -> NDArray[np.object_]:
        total = np.zeros(k, dtype=object)
        for i, t in enumerate(terms):
            total = total + (np.add.reduceat(t, starts).astype(object) << (i * _LIMB))
        return total

    sm = combine([sign * x for x in limbs])
    se = emin.copy()
    qm, qe = np.zeros(k, dtype=object), 2 * emin
    if squares:
        l0, l1, l2 = limbs
        qm = combine([l0 * l0, 2 * l0 * l1, l1 * l1 + 2 * l0 * l2, 2 * l1 * l2, l2 * l2])
    for i in np.flatnonzero(~fast).tolist():
        vals = v[starts[i]:starts[i] + counts[i]]
        sm[i], se[i] = exact_sum(vals.tolist())
        if squares:
            qm[i], qe[i] = _exact_sum_squares(vals)
    return sm, se, qm, qe


def _exact_sum_squares(v: NDArray[np.float64]) -> tuple[int, int]:
    big = np.abs(v)
    if ((big > 2.0**500) | ((big < 2.0**-400) & (big > 0))).any():
        m, e = 0, 0
        for x in v.tolist():  # rare magnitudes: exact integer squares
            num, den = x.as_integer_ratio()
            sq_e = -2 * (den.bit_length() - 1)
            if sq_e < e:
                m, e = m << (e - sq_e), sq_e
            m += (num * num) << (sq_e - e)
        return m, e
    t = v * 134217729.0  # Veltkamp: v = hi + lo, each with at most 26 significant bits
    hi = t - (t - v)
    lo = v - hi
    return exact_sum(np.concatenate([hi * hi, 2.0 * hi * lo, lo * lo]).tolist())


def _first_last(fts: NDArray[np.int64], fv: NDArray[np.float64], lts: NDArray[np.int64], lv: NDArray[np.float64],
                starts: NDArray[np.intp]) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.int64],
                                                   NDArray[np.float64]]:
    """Per group: the smallest (fts, fv) and the largest (lts, lv), without sorting (values are finite)."""
    g = _group_ids(starts, len(fts))
    first_ts = np.minimum.reduceat(fts, starts)
    first_v = np.minimum.reduceat(np.where(fts == first_ts[g], fv, np.inf), starts)
    last_ts = np.maximum.reduceat(lts, starts)
    last_v = np.maximum.reduceat(np.where(lts == last_ts[g], lv, -np.inf), starts)
    return first_ts, first_v, last_ts, last_v


def _expand(lo: NDArray[np.int64], hi: NDArray[np.int64],
            floor: NDArray[np.int64] | None = None) -> tuple[NDArray[np.intp], NDArray[np.int64]]:
    """Row ``i`` repeated for each ``q`` in ``[max(lo[i], floor[i]), hi[i]]``: (row numbers, q)."""
    if floor is not None:
        lo = np.maximum(lo, floor)
    nq = np.maximum(hi - lo + 1, 0)
    src = np.repeat(np.arange(len(lo)), nq)
    return src, lo[src] + np.arange(len(src)) - np.repeat(np.cumsum(nq) - nq, nq)


def _rows_in(rows: tuple[NDArray[np.int64], ...], among: tuple[NDArray[np.int64], ...]) -> NDArray[np.bool_]:
    """Per row of the columns ``rows``: whether the same values occur as a row of ``among``."""
    n = len(rows[0])
    cols = [np.concatenate([r, a]) for r, a in zip(rows, among, strict=True)]
    order = np.lexsort(cols[::-1])
    starts = _segment_starts(*(c[order] for c in cols))
    found = np.maximum.reduceat((order >= n).astype(np.int8), starts) if len(order) else np.empty(0, np.int8)
    out = np.empty(len(order), dtype=bool)
    out[order] = found[_group_ids(starts, len(order))] > 0
    return out[:n]


def _merge_sums(m: NDArray[np.object_], e: NDArray[np.int64], starts: NDArray[np.intp],
                g: NDArray[np.intp]) -> tuple[NDArray[np.object_], NDArray[np.int64]]:
    """Exact sums ``m * 2**e`` merged per group; Python-int work only for groups of two rows or more
    (most of the state is single rows when a batch's panes are folded in)."""
    sizes = np.diff(np.append(starts, len(m)))
    out_m, out_e = m[starts], e[starts]
    multi = sizes > 1
    if multi.any():
        rows = np.flatnonzero(multi[g])  # whole groups, still contiguous
        sub = np.searchsorted(rows, starts[multi])
        em, ee = m[rows], e[rows]
        emin = np.minimum.reduceat(ee, sub)
        out_m[multi] = np.add.reduceat(np.left_shift(em, (ee - emin[_group_ids(sub, len(rows))]).astype(object)), sub)
        out_e[multi] = emin
    return out_m, out_e


_SumCols = tuple[NDArray[np.object_], NDArray[np.int64], NDArray[np.object_], NDArray[np.int64]]  # sm, se, qm, qe


@dataclass(slots=True)
class _Carry:
    """Per (device, metric), sorted: the exact sum (``sm * 2**se``) and sum of squares of its parts that
    count in its last final window and in later ones too (those with ``a + b <= q_was``: still held, so
    ``a + k > q_was``). A series absent has zero sums."""

    dev: NDArray[np.int64]
    met: NDArray[np.int64]
    sm: NDArray[np.object_]
    se: NDArray[np.int64]
    qm: NDArray[np.object_]
    qe: NDArray[np.int64]

    @staticmethod
    def of(p: _Parts, sums: _Heap, sid: NDArray[np.int64], q_was: NDArray[np.int64]) -> _Carry:
        """The carry of the parts ``p`` (sorted by device and metric; exact sums ``sums`` at ``sid``) whose
        device's last final window (per row) is ``q_was``."""
        rows = np.flatnonzero(p.a + p.b <= q_was)
        dev, met = p.dev[rows], p.met[rows]
        if not len(rows):
            i, o = np.empty(0, dtype=np.int64), np.empty(0, dtype=object)
            return _Carry(i, i, o, i, o, i)
        starts = _segment_starts(dev, met)
        g = _group_ids(starts, len(rows))
        rsm, rse, rqm, rqe = sums.at(sid[rows])
        sm, se = _merge_sums(rsm, rse, starts, g)
        qm, qe = _merge_sums(rqm, rqe, starts, g)
        return _Carry(dev[starts], met[starts], sm, se, qm, qe)


class _Heap:
    """The exact sums of the parts of a running-sum operator, in Python lists that parts point into
    (``sid``). Python ints are scattered in memory: moving every one of them at each call (sorting,
    evicting) cost more than the windows; here a call touches only the sums it adds, merges or reads.
    Sums no part points to any more are dropped when they outnumber the live ones (:meth:`compact`)."""

    __slots__ = ("qe", "qm", "se", "sm")

    def __init__(self, sm: list[int], se: list[int], qm: list[int], qe: list[int]) -> None:
        self.sm, self.se, self.qm, self.qe = sm, se, qm, qe

    def __len__(self) -> int:
        return len(self.sm)

    def add(self, sm: NDArray[np.object_], se: NDArray[np.int64], qm: NDArray[np.object_],
            qe: NDArray[np.int64]) -> NDArray[np.int64]:
        """Append sums; their ids."""
        start = len(self.sm)
        self.sm.extend(sm.tolist())
        self.se.extend(se.tolist())
        self.qm.extend(qm.tolist())
        self.qe.extend(qe.tolist())
        return np.arange(start, len(self.sm), dtype=np.int64)

    def at(self, sid: NDArray[np.int64]) -> _SumCols:
        """``(sm, se, qm, qe)`` of the ids ``sid``."""
        ids = sid.tolist()
        sm, se, qm, qe = self.sm, self.se, self.qm, self.qe
        return (_objects([sm[i] for i in ids]), np.array([se[i] for i in ids], dtype=np.int64),
                _objects([qm[i] for i in ids]), np.array([qe[i] for i in ids], dtype=np.int64))

    def compact(self, sid: NDArray[np.int64]) -> NDArray[np.int64]:
        """Keep only the sums of ``sid`` (when the dead ones are the most); the ids to use instead."""
        if len(self.sm) <= 2 * len(sid) + 4096:
            return sid
        ids = sid.tolist()
        self.sm, self.se = [self.sm[i] for i in ids], [self.se[i] for i in ids]
        self.qm, self.qe = [self.qm[i] for i in ids], [self.qe[i] for i in ids]
        return np.arange(len(ids), dtype=np.int64)


def _packed(cols: Sequence[NDArray[np.int64]]) -> NDArray[np.int64] | None:
    """One int64 ordered as the rows of ``cols`` are lexicographically, or None when it would not fit."""
    if not len(cols[0]):
        return np.empty(0, dtype=np.int64)
    lows = [int(c.min()) for c in cols]
    spans = [int(c.max()) - lo + 1 for c, lo in zip(cols, lows, strict=True)]
    if math.prod(spans) >= 2**62:
        return None
    key = np.zeros(len(cols[0]), dtype=np.int64)
    for c, lo, span in zip(cols, lows, spans, strict=True):
        key = key * span + (c - lo)
    return key


def _slide(p: _Parts, sums: _Heap, sid: NDArray[np.int64], carry: _Carry, q_was: NDArray[np.int64],
           q_done: NDArray[np.int64], k: int, w_dev: NDArray[np.int64], w_met: NDArray[np.int64],
           w_q: NDArray[np.int64]) -> tuple[_SumCols, _Carry]:
    """Exact sums and sums of squares of the hopping windows ``(w_dev, w_met, w_q)`` (sorted, each in
    ``(q_was, q_done]`` of its device) from running sums, and the carry for the next call.

    A part ``(a, b)`` counts in the windows ``a + b .. a + k``. So a series' sum in window ``q`` is its
    ``carry`` (parts counted before this call, all still counting) plus the parts with
    ``q_was < a + b <= q`` minus those with ``a + k < q``: each part is added once and subtracted once
    (when its last window is final, just before it is dropped), whatever ``k``. Python ints are exact,
    so a subtraction leaves exactly the sum of the rest: the same number as merging the window's parts,
    hence the same correctly rounded aggregates. Per series the terms are put on its smallest exponent
    and summed with one running (object) sum over all series.
    """
    add = np.flatnonzero((p.a + p.b > q_was) & (p.a + p.b <= q_done))
    drop = np.flatnonzero(p.a + k <= q_done)
    n_c, n_a, n_d, n_w = len(carry.dev), len(add), len(drop), len(w_q)
    if not n_c + n_a + n_d + n_w:
        o, i = np.empty(0, dtype=object), np.empty(0, dtype=np.int64)
        return (o, i, o, i), carry
    dev = np.concatenate([carry.dev, p.dev[add], p.dev[drop], w_dev])
    met = np.concatenate([carry.met, p.met[add], p.met[drop], w_met])
    at = np.concatenate([np.full(n_c, _NO_TS, dtype=np.int64), (p.a + p.b)[add], p.a[drop] + k + 1, w_q])
    kind = np.concatenate([np.zeros(n_c + n_a + n_d, dtype=np.int8), np.ones(n_w, dtype=np.int8)])
    sign = np.concatenate([np.ones(n_c + n_a, dtype=np.int64), -np.ones(n_d, dtype=np.int64),
                           np.zeros(n_w, dtype=np.int64)])
    order = np.lexsort((kind, at, met, dev))  # a window after the terms at its own q
    dev, met, sign = dev[order], met[order], sign[order]
    starts = _segment_starts(dev, met)
    g = _group_ids(starts, len(dev))
    ends = np.append(starts[1:], len(dev)) - 1
    is_w = np.flatnonzero(kind[order] == 1)
    zero_o, none_e = _objects([0] * n_w), np.full(n_w, _NO_E, dtype=np.int64)
    out: list[Any] = []
    new: list[Any] = []
    a_sm, a_se, a_qm, a_qe = sums.at(sid[add])
    d_sm, d_se, d_qm, d_qe = sums.at(sid[drop])
    for cm, ce, am, ae, dm, de in ((carry.sm, carry.se, a_sm, a_se, d_sm, d_se),
                                   (carry.qm, carry.qe, a_qm, a_qe, d_qm, d_qe)):
        m = np.concatenate([cm, am, dm, zero_o])[order]
        e = np.concatenate([ce, ae, de, none_e])[order]
        emin = np.minimum.reduceat(e, starts) if len(e) else np.empty(0, dtype=np.int64)
        emin = np.where(emin == _NO_E, 0, emin)
        terms = np.left_shift(m, np.where(e == _NO_E, 0, e - emin[g]).astype(object)) * sign.astype(object)
        run = np.add.accumulate(terms) if len(terms) else terms
        before_seg = run[starts] - terms[starts]  # the running sum of the series before this one
        total = run - before_seg[g]
        out += [total[is_w], emin[g[is_w]]]
        new += [total[ends], emin]
    keep = np.flatnonzero(((new[0] != 0) | (new[2] != 0)).astype(bool))  # a zero carry is no carry
    nxt = _Carry(dev[starts][keep], met[starts][keep], new[0][keep], new[1][keep], new[2][keep], new[3][keep])
    return (out[0], out[1], out[2], out[3]), nxt


class WindowOperator:
    """Windows of one :data:`WindowSpec` with the chosen aggregates, per device and metric.

    Args:
        spec: :class:`Hopping` (or :func:`tumbling`) or :class:`Session`.
        aggregates: names from :data:`AGGREGATES`.
        allowed_lateness_ms: how far behind its device's newest event time a reading may arrive and still
            count in all its windows; windows are emitted that much later.
        on_late: "drop" (default): a reading for an emitted window misses it and is counted. "update": for
            ``update_ms`` of watermark time after its emission, a window still takes late readings and is
            emitted again, whole, flagged in :attr:`WindowResults.update` (hopping windows only).
        update_ms: with ``on_late="update"``, how long an emitted window stays open to updates.
    """

    def __init__(self, spec: WindowSpec, aggregates: Iterable[str] = AGGREGATES, *, allowed_lateness_ms: int,
                 on_late: Literal["drop", "update"] = "drop", update_ms: int = 0) -> None:
        if (on_late == "update") != (update_ms > 0) or update_ms < 0:
            raise ValueError('on_late="update" takes update_ms > 0; on_late="drop" takes none')
        if on_late == "update" and not isinstance(spec, Hopping):
            raise ValueError('on_late="update" is for hopping and tumbling windows; sessions drop late readings')
        self.on_late: Final = on_late
        self.update_ms: Final = update_ms
        self.spec: Final = spec
        self.aggregates: Final = tuple(aggregates)
        unknown = set(self.aggregates) - set(AGGREGATES)
        if unknown or not self.aggregates:
            raise ValueError(f"unknown aggregates {sorted(unknown)}; choose from {AGGREGATES}")
        if allowed_lateness_ms < 0:
            raise ValueError("allowed_lateness_ms must be >= 0")
        self.allowed_lateness_ms: Final = allowed_lateness_ms
        self._squares = bool({"stddev", "stddev_samp"} & set(self.aggregates))
        self._devices: list[str] = []
        self._device_id: dict[str, int] = {}
        self._metrics: list[str] = []
        self._metric_id: dict[str, int] = {}
        self._newest = np.empty(0, dtype=np.int64)  # per device id: newest ts seen
        self._parts = _Parts.empty()
        # hopping windows of k >= _SLIDE_MIN panes dropping late readings keep running sums: the parts'
        # exact sums are in a heap (their columns in _parts are empty), _sid[i] is part i's
        self._heap: _Heap | None = None
        self._sid = np.empty(0, dtype=np.int64)
        if isinstance(spec, Hopping) and not update_ms and spec.size_ms // spec.hop_ms >= _SLIDE_MIN:
            self._heap = _Heap([], [], [], [])
        # per (device, metric), the exact sums of the parts already counted in its last final window that
        # still count in later ones (see _slide); None: to be derived from the parts (after a restore)
        self._carry: _Carry | None = None
        self.late_total = 0

    # -- identifiers ---------------------------------------------------------------------------------
    @staticmethod
    def _ids(names: tuple[str, ...], table: list[str], index: dict[str, int]) -> NDArray[np.int64]:
        """Operator-wide ids of a batch's dictionary ``names`` (new names are appended to ``table``)."""
        for s in names:
            if s not in index:
                index[s] = len(table)
                table.append(s)
        return np.array([index[s] for s in names], dtype=np.int64)

    def watermark(self, device: str) -> int | None:
        """The device's event-time watermark (newest ts - allowed lateness), None before its first reading."""
        i = self._device_id.get(device)
        return None if i is None else int(self._newest[i]) - self.allowed_lateness_ms

    # -- processing ----------------------------------------------------------------------------------
    def process(self, cols: ReadingColumns) -> WindowResults:
        """Take a batch (rows in arrival order); return the windows it made final (and, with
        ``on_late="update"``, the emitted windows its late readings changed)."""
        dev_of = self._ids(cols.devices, self._devices, self._device_id)
        met_of = self._ids(cols.metrics, self._metrics, self._metric_id)
        if len(self._newest) < len(self._devices):
            self._newest = np.concatenate(
                [self._newest, np.full(len(self._devices) - len(self._newest), _NO_TS, dtype=np.int64)])
        dev = dev_of[cols.device]
        before = self._newest.copy()
        # every row's watermark as it arrived: the newest ts of its device among the rows before it
        order = np.argsort(dev, kind="stable")
        sdev = dev[order]
        starts = _segment_starts(sdev)
        prior = np.empty(len(dev), dtype=np.int64)
        prior[order] = _running_max(cols.ts_ms[order], starts, before[sdev[starts]])
        if len(dev):
            np.maximum.at(self._newest, dev, cols.ts_ms)
        rows = cols.m_row
        wm = prior[rows] - self.allowed_lateness_ms
        ts = cols.ts_ms[rows]
        edev, emet, v = dev[rows], met_of[cols.m_metric], cols.m_value
        if isinstance(self.spec, Hopping):
            hop, k = self.spec.hop_ms, self.spec.size_ms // self.spec.hop_ms
            pane = ts // hop
            first_q = np.maximum(1, (wm - self.update_ms) // hop + 1 - pane)  # q*hop + update_ms > wm count it
            late = int(np.count_nonzero(first_q > 1))
            keep = np.flatnonzero(first_q <= k)
            new = self._entry_parts(edev[keep], emet[keep], pane[keep], first_q[keep], ts[keep], v[keep])
        else:
            ok = ts >= wm
            late = len(ts) - int(np.count_nonzero(ok))
            keep = np.flatnonzero(ok)
            new = self._entry_parts(edev[keep], emet[keep], ts[keep], ts[keep], ts[keep], v[keep])
        self.late_total += late
        out = self._advance(new, before, late)
        return replace(out, trigger=self._triggers(out, dev, cols.ts_ms, before))

    def _triggers(self, out: WindowResults, dev: NDArray[np.int64], ts: NDArray[np.int64],
                  before: NDArray[np.int64]) -> NDArray[np.int64]:
        """Per emitted window, the first batch row of its device whose running newest ts (from ``before``)
        reaches ``end + allowed lateness``: the reading whose arrival made it final."""
        n = len(out)
        if not n or not len(dev):
            return np.full(n, -1, dtype=np.int64)
        order = np.argsort(dev, kind="stable")
        sdev = dev[order]
        starts = _segment_starts(sdev)
        # inclusive running newest ts per device segment, seeded with the device's newest before the batch
        seeds = before[sdev[starts]] if len(before) else np.full(len(starts), _NO_TS, dtype=np.int64)
        g = _group_ids(starts, len(sdev))
        reach = np.maximum(_running_max(ts[order], starts, seeds), ts[order])
        win_dev = np.array([self._device_id[d] for d in out.device.tolist()], dtype=np.int64)
        need = out.end_ms + self.allowed_lateness_ms
        seg_dev = sdev[starts]
        seg = np.searchsorted(seg_dev, win_dev)
        seg = np.minimum(seg, len(starts) - 1)
        has = seg_dev[seg] == win_dev
        ends = np.append(starts[1:], len(sdev))
        lo = int(min(reach.min(), need.min()))
        span = int(max(reach.max(), need.max())) - lo + 1
        if span * (len(starts) + 1) < 2**62:  # one search over all segments: segment number in the high part
            j = np.searchsorted(g.astype(np.int64) * span + (reach - lo), seg.astype(np.int64) * span + (need - lo))
        else:
            j = np.array([lo_ + int(np.searchsorted(reach[lo_:hi_], x)) for lo_, hi_, x in zip(
                starts[seg].tolist(), ends[seg].tolist(), need.tolist(), strict=True)], dtype=np.int64)
        ok = has & (j < ends[seg])
        res = np.full(n, -1, dtype=np.int64)
        res[ok] = order[j[ok]]
        return res

    def flush(self) -> WindowResults:
        """End of stream: emit every open window (later readings count as late)."""
        before = self._newest.copy()
        self._newest[:] = _END_TS
        return self._advance(_Parts.empty(), before, 0)

    def _entry_parts(self, dev: NDArray[np.int64], met: NDArray[np.int64], a: NDArray[np.int64],
                     b: NDArray[np.int64], ts: NDArray[np.int64], v: NDArray[np.float64]) -> _Parts:
        """Readings x metrics grouped into partial aggregates per (dev, met, a, b)."""
        if not len(v):
            return _Parts.empty()
        order = np.lexsort((b, a, met, dev))
        dev, met, a, b, ts, v = dev[order], met[order], a[order], b[order], ts[order], v[order]
        starts = _segment_starts(dev, met, a, b)
        sm, se, qm, qe = _exact_sums(v, starts, self._squares)
        fts, fv, lts, lv = _first_last(ts, v, ts, v, starts)
        return _Parts(dev[starts], met[starts], a[starts], b[starts], np.diff(np.append(starts, len(v))),
                      sm, se, qm, qe, np.minimum.reduceat(v, starts), np.maximum.reduceat(v, starts),
                      fts, fv, lts, lv)

    def _reduce(self, p: _Parts, order: NDArray[np.intp] | None, starts: NDArray[np.intp]) -> _Parts:
        """Merge the rows of ``p`` taken in ``order`` (None: as they are) into one per group beginning at
        ``starts``; (a, b) become the group's (min a, max b). Rows taken without their sums give groups
        without them."""
        if order is not None:
            p = p.take(order)
        n = len(p)
        if not n:
            return p
        g = _group_ids(starts, n)
        if len(p.sm) != n:
            sm, se, qm, qe = p.sm, p.se, p.qm, p.qe
        else:
            sm, se = _merge_sums(p.sm, p.se, starts, g)
            qm, qe = _merge_sums(p.qm, p.qe, starts, g) if self._squares else (p.qm[starts], p.qe[starts])
        return _Parts(p.dev[starts], p.met[starts], np.minimum.reduceat(p.a, starts), np.maximum.reduceat(p.b, starts),
                      np.add.reduceat(p.count, starts), sm, se, qm, qe,
                      np.minimum.reduceat(p.mn, starts), np.maximum.reduceat(p.mx, starts),
                      *_first_last(p.fts, p.fv, p.lts, p.lv, starts))

    def _advance(self, new: _Parts, before: NDArray[np.int64], late: int) -> WindowResults:
        """Fold ``new`` into the state; emit and evict what the watermarks (moved from ``before``) closed."""
        if self._heap is not None:
            return self._advance_sliding(new, before, late)
        p = _Parts.concat([self._parts, new]) if len(new) else self._parts
        lateness = self.allowed_lateness_ms
        if not len(p):
            none = np.empty(0, np.int64)
            return self._results(p, none, none, late, np.empty(0, bool) if self.update_ms else None)
        if isinstance(self.spec, Hopping):
            hop, k = self.spec.hop_ms, self.spec.size_ms // self.spec.hop_ms
            if len(new):
                order = np.lexsort((p.b, p.a, p.met, p.dev))
                p = self._reduce(p, order, _segment_starts(p.dev[order], p.met[order], p.a[order], p.b[order]))
            # windows ending at q*hop <= watermark are final; those before this call were emitted already
            q_done = (self._newest[p.dev] - lateness) // hop
            q_was = (before[p.dev] - lateness) // hop
            h = self.update_ms
            # each part's windows not emitted yet, and (on_late="update") those still open to updates
            src, q = _expand(p.a + p.b, np.minimum(p.a + k, q_done), (before[p.dev] - lateness - h) // hop + 1)
            again = q <= q_was[src]
            if again.any():  # emitted before: again only if this call's readings changed it
                t_src, t_q = _expand(new.a + new.b, np.minimum(new.a + k, (before[new.dev] - lateness) // hop))
                hit = _rows_in((p.dev[src], p.met[src], q), (new.dev[t_src], new.met[t_src], t_q))
                keep = np.flatnonzero(~again | hit)
                src, q, again = src[keep], q[keep], again[keep]
            order = np.lexsort((q, p.met[src], p.dev[src]))
            src, q, again = src[order], q[order], again[order]
            win = p.take(src)  # the parts of each window, in window order: taken once
            starts = _segment_starts(win.dev, win.met, q)
            out = self._reduce(win, None, starts)
            end = q[starts] * hop
            start = end - self.spec.size_ms
            update = again[starts] if h else None
            self._parts = p.take(np.flatnonzero(p.a + k > (self._newest[p.dev] - lateness - h) // hop))
        else:
            gap = self.spec.gap_ms
            order = np.lexsort((p.a, p.met, p.dev))
            sp = p.take(order)
            seg = _segment_starts(sp.dev, sp.met)
            reach = _running_max(sp.b, seg, np.full(len(seg), _NO_TS, dtype=np.int64))  # latest ts before
            opens = np.zeros(len(sp), dtype=bool)
            opens[seg] = True
            opens |= sp.a >= reach + gap
            p = self._reduce(sp, np.arange(len(sp)), np.flatnonzero(opens))
            closed = p.b + gap <= self._newest[p.dev] - lateness
            out = p.take(np.flatnonzero(closed))
            start, end = out.a, out.b + gap
            self._parts = p.take(np.flatnonzero(~closed))
            update = None
        return self._results(out, start, end, late, update)

    def _fold(self, new: _Parts) -> None:
        """Merge ``new`` (grouped, sorted) into the running-sum state (sorted, one row per key): the two
        sorted runs are merged (one stable sort of a packed key, else a lexsort), rows with the same key
        combined; the exact sums go to the heap, the rows keep their ids."""
        assert self._heap is not None
        p = _Parts.concat([self._parts, new.take(np.arange(len(new)), sums=False)])
        sid = np.concatenate([self._sid, self._heap.add(new.sm, new.se, new.qm, new.qe)])
        key = _packed((p.dev, p.met, p.a, p.b))
        order = np.argsort(key, kind="stable") if key is not None else np.lexsort((p.b, p.a, p.met, p.dev))
        p, sid = p.take(order, sums=False), sid[order]
        same = np.flatnonzero((p.dev[1:] == p.dev[:-1]) & (p.met[1:] == p.met[:-1]) & (p.a[1:] == p.a[:-1])
                              & (p.b[1:] == p.b[:-1]))  # row i and i + 1: the state's and the new one
        if len(same):
            pairs = np.stack([same, same + 1], axis=1).ravel()
            two = np.arange(0, len(pairs), 2)
            merged = self._reduce(p.take(pairs, sums=False), None, two)
            for f in ("count", "mn", "mx", "fts", "fv", "lts", "lv"):
                getattr(p, f)[same] = getattr(merged, f)
            sm, se, qm, qe = self._heap.at(sid[pairs])
            g = np.repeat(np.arange(len(same)), 2)
            msm, mse = _merge_sums(sm, se, two, g)
            mqm, mqe = _merge_sums(qm, qe, two, g) if self._squares else (qm[two], qe[two])  # as _reduce
            sid[same] = self._heap.add(msm, mse, mqm, mqe)
            keep = np.ones(len(p), dtype=bool)
            keep[same + 1] = False
            rows = np.flatnonzero(keep)
            p, sid = p.take(rows, sums=False), sid[rows]
        self._parts, self._sid = p, sid

    def _advance_sliding(self, new: _Parts, before: NDArray[np.int64], late: int) -> WindowResults:
        """:meth:`_advance` of hopping windows of ``k >= _SLIDE_MIN`` panes dropping late readings: the
        exact sums come from running sums (:func:`_slide`), the others from the parts of each window."""
        assert isinstance(self.spec, Hopping) and self._heap is not None
        if len(new):
            self._fold(new)
        p, sid = self._parts, self._sid
        lateness = self.allowed_lateness_ms
        hop, k = self.spec.hop_ms, self.spec.size_ms // self.spec.hop_ms
        q_done = (self._newest[p.dev] - lateness) // hop
        q_was = (before[p.dev] - lateness) // hop
        src, q = _expand(p.a + p.b, np.minimum(p.a + k, q_done), q_was + 1)
        order = np.lexsort((q, p.met[src], p.dev[src]))
        src, q = src[order], q[order]
        win = p.take(src, sums=False)  # the parts of each window, in window order, without their sums
        starts = _segment_starts(win.dev, win.met, q)
        out = self._reduce(win, None, starts)
        carry = self._carry if self._carry is not None else _Carry.of(p, self._heap, sid, q_was)
        w_sums, self._carry = _slide(p, self._heap, sid, carry, q_was, q_done, k, out.dev, out.met, q[starts])
        out = replace(out, sm=w_sums[0], se=w_sums[1], qm=w_sums[2], qe=w_sums[3])
        end = q[starts] * hop
        kept = np.flatnonzero(p.a + k > q_done)
        self._parts = p.take(kept, sums=False)
        self._sid = self._heap.compact(sid[kept])
        return self._results(out, end - self.spec.size_ms, end, late, None)

    # -- results -------------------------------------------------------------------------------------
    def _results(self, p: _Parts, start: NDArray[np.int64], end: NDArray[np.int64], late: int,
                 update: NDArray[np.bool_] | None) -> WindowResults:
        dev_names = _objects(self._devices)
        met_names = _objects(self._metrics)
        dev_rank = np.argsort(np.argsort(dev_names.astype(str))) if self._devices else np.empty(0, np.int64)
        met_rank = np.argsort(np.argsort(met_names.astype(str))) if self._metrics else np.empty(0, np.int64)
        order = np.lexsort((start, met_rank[p.met], dev_rank[p.dev], end))
        p, start, end = p.take(order), start[order], end[order]
        update = None if update is None else update[order]
        values: dict[str, NDArray[Any]] = {}
        spread: tuple[NDArray[np.object_], NDArray[np.int64]] | None = None
        for name in self.aggregates:
            if name == "count":
                values[name] = p.count.copy()
            elif name == "sum":
                values[name] = _avgs(p.sm, p.se, np.ones(len(p), dtype=np.int64))
            elif name == "avg":
                values[name] = _avgs(p.sm, p.se, p.count)
            elif name in ("stddev", "stddev_samp"):
                if spread is None:  # n*Q - S**2, shared by both
                    spread = _spreads(p.count, p.sm, p.se, p.qm, p.qe)
                values[name] = _stddevs(p.count, *spread, sample=name == "stddev_samp")
            elif name == "min":
                values[name] = p.mn
            elif name == "max":
                values[name] = p.mx
            elif name == "first":
                values[name] = p.fv
            elif name == "last":
                values[name] = p.lv
            else:  # rate
                values[name] = _rates(p.fv, p.fts, p.lv, p.lts)
        return WindowResults(dev_names[p.dev], met_names[p.met], start.astype(np.int64), end.astype(np.int64),
                             values, late, update)

    # -- durability ----------------------------------------------------------------------------------
    def snapshot(self) -> bytes:
        """The state as bytes (msgpack), to store with the consumer's positions; see :meth:`restore`."""
        p = self._parts
        if self._heap is not None:
            sm, se, qm, qe = self._heap.at(self._sid)
            p = replace(p, sm=sm, se=se, qm=qm, qe=qe)
        spec = (["hopping", self.spec.size_ms, self.spec.hop_ms] if isinstance(self.spec, Hopping)
                else ["session", self.spec.gap_ms])
        return _enc.encode(_Snapshot(
            spec=spec, aggregates=list(self.aggregates), allowed_lateness_ms=self.allowed_lateness_ms,
            update_ms=self.update_ms, late_total=self.late_total, devices=self._devices,
            newest=self._newest.tolist(), metrics=self._metrics,
            ints={n: getattr(p, n).tolist() for n in ("dev", "met", "a", "b", "count", "se", "qe", "fts", "lts")},
            floats={n: getattr(p, n).tolist() for n in ("mn", "mx", "fv", "lv")},
            big={n: [format(x, "x") for x in getattr(p, n).tolist()] for n in ("sm", "qm")},
        ))

    @classmethod
    def restore(cls, data: bytes) -> WindowOperator:
        """An operator in the state :meth:`snapshot` saved (same spec, aggregates, lateness and updates)."""
        s = _dec.decode(data)
        spec: WindowSpec = Hopping(s.spec[1], s.spec[2]) if s.spec[0] == "hopping" else Session(s.spec[1])
        op = cls(spec, s.aggregates, allowed_lateness_ms=s.allowed_lateness_ms,
                 on_late="update" if s.update_ms else "drop", update_ms=s.update_ms)
        op.late_total = s.late_total
        op._devices, op._metrics = list(s.devices), list(s.metrics)
        op._device_id = {d: i for i, d in enumerate(op._devices)}
        op._metric_id = {m: i for i, m in enumerate(op._metrics)}
        op._newest = np.array(s.newest, dtype=np.int64)
        cols: dict[str, Any] = {n: np.array(x, dtype=np.int64) for n, x in s.ints.items()}
        cols.update((n, np.array(x, dtype=np.float64)) for n, x in s.floats.items())
        cols.update((n, _objects([int(h, 16) for h in x])) for n, x in s.big.items())
        op._parts = _Parts(**cols)
        if op._heap is not None:
            p = op._parts
            op._sid = op._heap.add(p.sm, p.se, p.qm, p.qe)
            op._parts = p.take(np.arange(len(p)), sums=False)
        op._carry = None  # derived from the parts at the next call
        return op


class _Snapshot(msgspec.Struct, frozen=True):
    spec: list[Any]
    aggregates: list[str]
    allowed_lateness_ms: int
    update_ms: int
    late_total: int
    devices: list[str]
    newest: list[int]
    metrics: list[str]
    ints: dict[str, list[int]]
    floats: dict[str, list[float]]
    big: dict[str, list[str]]  # exact sums as hex (Python ints beyond 64 bits)


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(_Snapshot)


def _sqrt_ratio(num: int, den: int) -> float:
    """The correctly rounded float of sqrt(num / den) (num >= 0, den > 0).

    Usually the float square root of the correctly rounded quotient, accepted when sqrt(num / den) lies
    strictly between the midpoints to its neighbours (checked exactly, squared); else (ties, rare
    near-ties, extreme magnitudes) an integer square root with a sticky bit.
    """
    if num == 0:
        return 0.0
    f = math.sqrt(num / den) if num.bit_length() - den.bit_length() < 1000 else math.inf
    if 2.0**-900 < f < 2.0**900:
        m, e = math.frexp(f)
        mant = int(m * 2.0**53)  # f = mant * 2**(e - 53)
        if mant != 1 << 52:  # a power of two has a nearer neighbour below
            shift = 2 * (e - 54)  # the midpoints are (2 * mant -+ 1) * 2**(e - 54)
            lo, hi = (2 * mant - 1) ** 2 * den, (2 * mant + 1) ** 2 * den
            scaled = num << -shift if shift < 0 else num
            if shift > 0:
                lo, hi = lo << shift, hi << shift
            if lo < scaled < hi:
                return f
    k = max(0, (116 - num.bit_length() + den.bit_length()) // 2 + 1)  # >= 56 bits of root
    x, rem = divmod(num << (2 * k), den)
    r = math.isqrt(x)
    if rem or r * r != x:
        r |= 1  # sticky bit: below the rounding position, so round-to-nearest sees "above the half-way"
    try:
        return r / (1 << k)
    except OverflowError:  # a sample stddev of values near the float limit
        return math.inf


def _spread(n: int, sm: int, se: int, qm: int, qe: int) -> tuple[int, int]:
    """``n*Q - S**2`` as ``(num, e)`` (``num * 2**e``, e even), from the exact sum S and sum of squares Q."""
    e0 = min(qe, 2 * se)
    num = (n * qm << (qe - e0)) - (sm * sm << (2 * se - e0))
    return (num << 1, e0 - 1) if e0 % 2 else (num, e0)


def _sqrt_scaled(num: int, e: int, den: int) -> float:
    """The correctly rounded sqrt(num * 2**e / den): the stddev with den = n*n (population) or n*(n-1)."""
    return _sqrt_ratio(num << e, den) if e >= 0 else _sqrt_ratio(num, den << -e)


def _rate(fv: float, fts: int, lv: float, lts: int) -> float:
    """(lv - fv) per second over (fts, lts], exact then rounded."""
    if lts == fts:
        return math.nan
    n1, d1 = lv.as_integer_ratio()
    n2, d2 = fv.as_integer_ratio()
    try:
        return (n1 * d2 - n2 * d1) * 1000 / (d1 * d2 * (lts - fts))
    except OverflowError:  # copysign would convert the difference to a float: OverflowError
        return math.inf if n1 * d2 - n2 * d1 > 0 else -math.inf


# -- the aggregates of many windows at once -----------------------------------------------------------
# Python-int arithmetic on object arrays (numpy calls the int operators element by element, without a
# Python call per window); each is exactly the scalar function above, element by element, which it
# falls back to where a fast path does not apply (an overflow, a square root not provably rounded).


def _avgs(sm: NDArray[np.object_], se: NDArray[np.int64], count: NDArray[np.int64]) -> NDArray[np.float64]:
    """Per window :func:`~fieldmesh.core.exact.exact_avg` ``(sm, se, count)`` (the sum with count 1)."""
    if not len(sm):
        return np.empty(0, dtype=np.float64)
    if (count > 0).all():
        try:
            num = np.left_shift(sm, np.maximum(se, 0).astype(object))
            den = np.left_shift(count.astype(object), np.maximum(-se, 0).astype(object))
            return np.asarray(num / den, dtype=np.float64)  # int / int: correctly rounded
        except OverflowError:
            pass
    return np.array([exact_avg(m, e, c) for m, e, c in zip(sm.tolist(), se.tolist(), count.tolist(), strict=True)],
                    dtype=np.float64)


def _spreads(n: NDArray[np.int64], sm: NDArray[np.object_], se: NDArray[np.int64], qm: NDArray[np.object_],
             qe: NDArray[np.int64]) -> tuple[NDArray[np.object_], NDArray[np.int64]]:
    """Per window :func:`_spread`: ``n*Q - S**2`` as ``(num, e)``, e even."""
    e0 = np.minimum(qe, 2 * se)
    num = (np.left_shift(n.astype(object) * qm, (qe - e0).astype(object))
           - np.left_shift(sm * sm, (2 * se - e0).astype(object)))
    odd = (e0 % 2).astype(bool)
    num = np.where(odd, np.left_shift(num, odd.astype(np.int64).astype(object)), num)
    return num, e0 - odd


def _stddevs(n: NDArray[np.int64], num: NDArray[np.object_], e: NDArray[np.int64], *,
             sample: bool) -> NDArray[np.float64]:
    """Per window the stddev :meth:`WindowOperator._results` computes with :func:`_sqrt_scaled`."""
    k = int(sample)
    out = np.full(len(n), math.nan)
    ok = np.flatnonzero(n > k)
    if not len(ok):
        return out
    c = n[ok].astype(object)
    eo = e[ok]
    top = np.left_shift(num[ok], np.maximum(eo, 0).astype(object))
    bottom = np.left_shift(c * (c - k), np.maximum(-eo, 0).astype(object))
    out[ok] = _sqrt_ratios(top, bottom)
    return out


def _sqrt_ratios(num: NDArray[np.object_], den: NDArray[np.object_]) -> NDArray[np.float64]:
    """Per element :func:`_sqrt_ratio`: its first (float) path checked on all at once, the rest one by one."""
    out = np.zeros(len(num))
    try:
        f = np.sqrt(np.asarray(num / den, dtype=np.float64))
    except OverflowError:
        f = np.full(len(num), math.inf)
    m, ex = np.frexp(np.where(np.isfinite(f), f, 0.0))
    mant = (m * 2.0**53).astype(np.int64)
    cand = np.flatnonzero((f > 2.0**-900) & (f < 2.0**900) & (mant != 1 << 52))
    good = np.zeros(len(num), dtype=bool)
    if len(cand):
        shift = 2 * (ex[cand].astype(np.int64) - 54)
        mo, d = mant[cand].astype(object), den[cand]
        up = np.maximum(shift, 0).astype(object)
        lo = np.left_shift((2 * mo - 1) ** 2 * d, up)
        hi = np.left_shift((2 * mo + 1) ** 2 * d, up)
        scaled = np.left_shift(num[cand], np.maximum(-shift, 0).astype(object))
        good[cand] = ((lo < scaled) & (scaled < hi)).astype(bool)
    out[good] = f[good]
    zero = (num == 0).astype(bool)
    for i in np.flatnonzero(~good & ~zero).tolist():
        out[i] = _sqrt_ratio(int(num[i]), int(den[i]))
    return out


def _rates(fv: NDArray[np.float64], fts: NDArray[np.int64], lv: NDArray[np.float64],
           lts: NDArray[np.int64]) -> NDArray[np.float64]:
    """Per window :func:`_rate`: the exact ``(lv - fv) * 1000 / (lts - fts)``, rounded once."""
    out = np.full(len(fv), math.nan)
    ok = np.flatnonzero(lts != fts)
    if not len(ok):
        return out
    a, b, dt = lv[ok], fv[ok], lts[ok] - fts[ok]
    if np.isfinite(a).all() and np.isfinite(b).all():
        ma, ea = np.frexp(a)
        mb, eb = np.frexp(b)
        ia, ib = (ma * 2.0**53).astype(np.int64), (mb * 2.0**53).astype(np.int64)
        ea, eb = ea.astype(np.int64), eb.astype(np.int64)
        ea = np.where(ia == 0, eb, ea)  # a zero takes the other's exponent (any exponent is exact for it)
        eb = np.where(ib == 0, ea, eb)
        emin = np.minimum(ea, eb)
        diff = (np.left_shift(ia.astype(object), (ea - emin).astype(object))
                - np.left_shift(ib.astype(object), (eb - emin).astype(object))) * 1000
        e = emin - 53
        try:
            out[ok] = np.asarray(np.left_shift(diff, np.maximum(e, 0).astype(object))
                                 / np.left_shift(dt.astype(object), np.maximum(-e, 0).astype(object)),
                                 dtype=np.float64)
            return out
        except OverflowError:
            pass
    for i, f_v, f_ts, l_v, l_ts in zip(ok.tolist(), fv[ok].tolist(), fts[ok].tolist(), lv[ok].tolist(),
                                       lts[ok].tolist(), strict=True):
        out[i] = _rate(f_v, f_ts, l_v, l_ts)
    return out
