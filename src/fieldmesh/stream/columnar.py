"""The stream contract with numpy over columns: the processor's hot path.

It decides what :mod:`fieldmesh.stream.reference` decides (the tests hold it to that field by field),
with array operations instead of a Python step per reading:

* decoding: :func:`fieldmesh.core.codec.decode_bus_columns_many` (one batch of columns for all records);
* lateness: readings sorted by device (stable, so arrival order is kept within a device); the exclusive
  running maximum of event times within each device is one ``np.maximum.accumulate`` over values that
  carry the device's segment number in their high bits, then the state's watermark is folded in;
* first occurrences: ``np.unique(key, return_index=True)``; collisions (astronomically rare) run the
  reference's probe in Python;
* windows: the new readings' measurement entries get dense ids of their (device, metric, window) group,
  numbered in output order without a sort, and are reduced with ``ufunc.at``: count, min, max, and the
  exact sum from integer mantissas (see :func:`_exact_sums`).

Python loops that remain run per record, per device, per bus position or per colliding reading, never
per reading.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.batch import (
    CLAIMED,
    COLLISION,
    DUPLICATE,
    BatchResult,
    DeviceDeltas,
    Position,
    ReadingColumns,
    WindowDeltas,
    origin_of,
)
from fieldmesh.core.codec import decode_bus_columns_many, decode_dead_letter
from fieldmesh.core.model import DeadLetter
from fieldmesh.core.topics import DLQ_TOPIC
from fieldmesh.stream.base import Claim, DecodedBatch, EnrichFn, StreamState
from fieldmesh.stream.reference import KEY_SPACE, WINDOW_MS, corrupt_dead_letter, with_enrichment

__all__ = ["combine_windows", "decide", "decode", "settle", "window_deltas"]

_I64 = NDArray[np.int64]
#: Limb split of the exact sums: the low limb holds 31 bits per value, so a group of fewer than 2**32
#: values cannot overflow it.
_LIMB: Final = 31
#: Exponent given to zero values: above every real one (so it never is a group's lowest exponent).
_NO_EXP: Final = 1 << 40


def decode(records: Sequence[BusRecord], state: StreamState) -> DecodedBatch:
    """Bus records as one batch of columns: the reading records decoded together, in record order."""
    kept: list[BusRecord] = []
    positions: dict[Position, int] = {}
    skipped = 0
    for rec in records:
        pos = (rec.topic, rec.partition)
        if rec.offset <= state.positions.get(pos, -1):
            skipped += 1
            continue
        positions[pos] = max(positions.get(pos, -1), rec.offset)
        kept.append(rec)
    readers = [rec for rec in kept if rec.topic != DLQ_TOPIC]
    cols, rows, errors = decode_bus_columns_many([rec.value for rec in readers])
    dead: list[DeadLetter] = []
    corrupt = 0
    reading_positions: dict[Position, int] = {}
    index: list[int] = []
    origins: list[int] = []
    j = 0  # index into readers
    for rec in kept:  # dead letters and positions in record order, as the reference has them
        if rec.topic == DLQ_TOPIC:
            try:
                dead.append(decode_dead_letter(rec.value))
            except Exception as exc:
                corrupt += 1
                dead.append(corrupt_dead_letter(rec, exc))
            continue
        error = errors.get(j)
        j += 1
        if error is not None:
            corrupt += 1
            dead.append(corrupt_dead_letter(rec, error))
            continue
        index.append(reading_positions.setdefault((rec.topic, rec.partition), len(reading_positions)))
        origins.append(origin_of(rec.offset, rec.partition))
    counts = [n for i, n in enumerate(rows) if i not in errors]
    return DecodedBatch(
        cols=cols,
        origin=np.repeat(np.array(origins, dtype=np.int64), counts),
        row_position=np.repeat(np.array(index, dtype=np.int32), counts),
        reading_positions=tuple(reading_positions),
        positions=positions,
        dead_letters=tuple(dead),
        corrupt=corrupt,
        skipped=skipped,
    )


def _segment_max(values: _I64, segment: NDArray[np.intp], starts: NDArray[np.intp]) -> _I64:
    """Inclusive running maximum of ``values`` within each segment (rows grouped by ``segment``, which
    counts up from 0; ``starts``: first row of each).

    One ``np.maximum.accumulate`` over ``segment << bits | rank``: a later segment's values are above
    every earlier one's, so the maximum never crosses a segment boundary. ``rank`` is the value minus the
    batch's minimum when that fits beside the segment number (the common case: a batch spans hours),
    else the value's rank among the batch's distinct values (always fits: fewer than 2**31 rows).
    """
    lo = int(values.min())
    bits = (int(values.max()) - lo).bit_length()
    if len(starts).bit_length() + bits <= 62:
        packed = (segment.astype(np.int64) << bits) | (values - lo)
        return (np.maximum.accumulate(packed) & ((1 << bits) - 1)) + lo
    distinct, rank = np.unique(values, return_inverse=True)
    bits = len(distinct).bit_length()
    packed = (segment.astype(np.int64) << bits) | rank.astype(np.int64)
    return np.asarray(distinct[np.maximum.accumulate(packed) & ((1 << bits) - 1)], dtype=np.int64)


def decide(
    batch: DecodedBatch,
    state: StreamState,
    claim: Claim,
    *,
    grace_ms: int,
    intervals: Mapping[str, int],
    enrich: EnrichFn | None = None,
) -> BatchResult:
    """Lateness from device watermarks (vectorised), then :func:`settle`; see :func:`reference.decide`."""
    cols = batch.cols
    n = len(cols)
    wms = {pos: state.watermarks.get(pos, 0) for pos in batch.reading_positions}
    advanced: dict[str, int] = {}
    late = np.zeros(n, dtype=np.bool_)
    if n:
        ts = cols.ts_ms
        # stable, and a radix sort for codes that fit 16 bits
        order = np.argsort(cols.device.astype(np.uint16) if len(cols.devices) <= 2**16 else cols.device, kind="stable")
        dev_sorted = cols.device[order]
        ts_sorted = ts[order]
        starts = np.flatnonzero(np.r_[True, dev_sorted[1:] != dev_sorted[:-1]])
        segment = np.cumsum(np.r_[False, dev_sorted[1:] != dev_sorted[:-1]], dtype=np.intp)
        codes = dev_sorted[starts].tolist()
        known = state.device_watermarks
        seed = np.array([known.get(cols.devices[c], 0) for c in codes], dtype=np.int64)
        running = _segment_max(ts_sorted, segment, starts)
        # the watermark each reading meets: the state's, or the latest event time of its device before it
        before = np.empty(n, dtype=np.int64)
        before[1:] = running[:-1]
        before[starts] = np.iinfo(np.int64).min
        wm = np.maximum(before, seed[segment])
        end = ts_sorted - ts_sorted % WINDOW_MS + WINDOW_MS
        late[order] = end <= wm - grace_ms
        top = running[np.r_[starts[1:], n] - 1]  # each device's latest event time in the batch
        up = np.flatnonzero(top > seed)
        advanced = {cols.devices[codes[i]]: v for i, v in zip(up.tolist(), top[up].tolist(), strict=True)}
        per_pos = np.full(len(batch.reading_positions), np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(per_pos, batch.row_position, ts)
        for pos, v in zip(batch.reading_positions, per_pos.tolist(), strict=True):
            if v > wms[pos]:
                wms[pos] = v
    result = settle(
        cols, late, batch.origin, claim, intervals=intervals, dead_letters=batch.dead_letters,
        positions=batch.positions, watermarks=wms, device_watermarks=advanced, corrupt=batch.corrupt,
    )
    if enrich is None or not len(result.new):
        return result
    extra = enrich(result.new)
    if result.new.enrichment is None:  # the common case: nothing to merge into
        none = bool((extra == None).all())  # noqa: E711 (elementwise, in C)
        new = result.new if none else dataclasses.replace(result.new, enrichment=extra)
    else:
        new = with_enrichment(result.new, extra)
    return dataclasses.replace(result, new=new)


def _probe(
    cols: ReadingColumns, origin: _I64, claim: Claim, collided: list[int], taken: dict[int, int]
) -> tuple[dict[int, int], int]:
    """The reference's collision probe for the ``collided`` rows: row -> key claimed; duplicates found.

    ``taken`` maps each key claimed in this batch to its check value (updated here)."""
    key, chk = cols.key.tolist(), cols.chk.tolist()
    out: dict[int, int] = {}
    dups = 0
    for i in collided:
        k, c = key[i], chk[i]
        while True:
            if k in taken:
                if taken[k] == c:
                    dups += 1
                    break
            else:
                a = int(claim(np.array([k], dtype=np.int64), np.array([c], dtype=np.int64), origin[i : i + 1])[0])
                if a == CLAIMED:
                    out[i] = k
                    taken[k] = c
                    break
                if a == DUPLICATE:
                    dups += 1
                    break
            k = (k + 1) % KEY_SPACE
    return out, dups


def settle(
    cols: ReadingColumns,
    late: NDArray[np.bool_],
    origin: NDArray[np.int64],
    claim: Claim,
    *,
    intervals: Mapping[str, int],
    dead_letters: Sequence[DeadLetter] = (),
    positions: Mapping[Position, int] | None = None,
    watermarks: Mapping[Position, int] | None = None,
    device_watermarks: Mapping[str, int] | None = None,
    corrupt: int = 0,
) -> BatchResult:
    """De-duplicate and claim (one call for the first occurrences), then window and device deltas."""
    n = len(cols)
    store_key = cols.key.copy()
    dups = 0
    if n:
        keys, first, inverse = np.unique(cols.key, return_index=True, return_inverse=True)
        first_chk = cols.chk[first]
        is_first = np.zeros(n, dtype=np.bool_)
        is_first[first] = True
        same = cols.chk == first_chk[inverse.reshape(-1)]
        dups = int(np.count_nonzero(~is_first & same))
        in_batch = np.flatnonzero(~is_first & ~same)  # a key's later reading with another check value
        answers = np.asarray(claim(keys, first_chk, origin[first]))
        claimed = answers == CLAIMED
        dups += int(np.count_nonzero(answers == DUPLICATE))
        new_mask = np.zeros(n, dtype=np.bool_)
        new_mask[first[claimed]] = True
        store_collided = np.sort(first[answers == COLLISION])
        if len(in_batch) or len(store_collided):
            taken = dict(zip(keys[claimed].tolist(), first_chk[claimed].tolist(), strict=True))
            probed, more = _probe(cols, origin, claim, in_batch.tolist() + store_collided.tolist(), taken)
            dups += more
            for i, k in probed.items():
                new_mask[i] = True
                store_key[i] = k
        new_rows = np.flatnonzero(new_mask)
    else:
        new_rows = np.empty(0, dtype=np.intp)
    new = cols.take(new_rows)
    new_late = late[new_rows]
    ranks = (_name_rank(new.devices), _name_rank(new.metrics))
    counts: dict[str, int] = {"stored": len(new_rows), "duplicates": dups, "late": int(np.count_nonzero(new_late))}
    for d in dead_letters:
        counts[f"dlq.{d.reason}"] = counts.get(f"dlq.{d.reason}", 0) + 1
    return BatchResult(
        positions=dict(positions or {}),
        watermarks=dict(watermarks or {}),
        device_watermarks=dict(device_watermarks or {}),
        new=new,
        store_key=store_key[new_rows],
        late=new_late,
        windows=_windows(new, intervals, ranks),
        devices=_devices(new, ranks),
        dead_letters=tuple(dead_letters),
        counts=counts,
        corrupt=corrupt,
    )


def window_deltas(readings: ReadingColumns, intervals: Mapping[str, int]) -> dict[str, WindowDeltas]:
    """Exact window deltas of every interval from ``readings`` (what :func:`settle` gives for its new readings).

    For a store that rebuilds the deltas of readings it holds (its rollup rows written later than the readings).
    """
    return _windows(readings, intervals, (_name_rank(readings.devices), _name_rank(readings.metrics)))


def combine_windows(parts: Sequence[WindowDeltas]) -> WindowDeltas:
    """The deltas of ``parts`` (one interval, several batches) merged: one entry per (device, metric, window).

    Counts add, minima and maxima reduce, exact sums add exactly (each group's mantissas shifted to its lowest
    exponent, as Python ints); entries come out sorted by (device, metric, window_start_ms), as a batch's do.
    """
    parts = [p for p in parts if len(p)]
    if len(parts) <= 1:
        if parts:
            return parts[0]
        e = np.empty(0, np.int64)
        return WindowDeltas("", 0, _objects([]), _objects([]), e, e, _objects([]), e,
                            np.empty(0, np.float64), np.empty(0, np.float64))
    first = parts[0]

    def cat(name: str) -> NDArray[Any]:
        return np.concatenate([getattr(p, name) for p in parts])

    device, metric, ws = cat("device"), cat("metric"), cat("window_start_ms")
    dev_names, dcode = _codes_by_name(device)
    met_names, mcode = _codes_by_name(metric)
    order = np.lexsort((ws, mcode, dcode))
    d, mt, w = dcode[order], mcode[order], ws[order]
    starts = np.flatnonzero(np.r_[True, (d[1:] != d[:-1]) | (mt[1:] != mt[:-1]) | (w[1:] != w[:-1])])
    if len(starts) == len(order):  # no window in two parts (a backlog's batches, each device in one): reordered
        return WindowDeltas(
            interval=first.interval, width_ms=first.width_ms, device=dev_names[d], metric=met_names[mt],
            window_start_ms=w, count=cat("count")[order], sum_m=cat("sum_m")[order], sum_e=cat("sum_e")[order],
            min=cat("min")[order], max=cat("max")[order],
        )
    count = np.add.reduceat(cat("count")[order], starts)
    lo = np.minimum.reduceat(cat("min")[order], starts)
    hi = np.maximum.reduceat(cat("max")[order], starts)
    sum_m, sum_e = cat("sum_m")[order], cat("sum_e")[order]
    emin = np.minimum.reduceat(sum_e, starts)
    return WindowDeltas(
        interval=first.interval, width_ms=first.width_ms, device=dev_names[d[starts]], metric=met_names[mt[starts]],
        window_start_ms=w[starts], count=count.astype(np.int64), sum_m=_shifted_sums(sum_m, sum_e, emin, starts),
        sum_e=emin.astype(np.int64), min=lo, max=hi,
    )


def _codes_by_name(names: NDArray[np.object_]) -> tuple[NDArray[np.object_], NDArray[np.int64]]:
    """The distinct strings of ``names`` sorted, and each entry's index among them (a dict look-up an entry, in C:
    sorting the object array itself compares Python strings, several times slower)."""
    distinct = sorted(dict.fromkeys(names.tolist()))
    rank = {n: i for i, n in enumerate(distinct)}
    return _objects(distinct), np.fromiter(map(rank.__getitem__, names.tolist()), np.int64, len(names))


def _shifted_sums(sum_m: NDArray[np.object_], sum_e: _I64, emin: _I64, starts: NDArray[np.intp]) -> NDArray[np.object_]:
    """Per group (entries from each of ``starts``): the exact sum of ``sum_m[i] * 2**sum_e[i]`` as a mantissa of
    ``2**emin``. In int64 where no partial sum can overflow (each mantissa shifted below 2**(62 - bitlen(n)) for
    ``n`` entries in the group), else as Python ints."""
    n = len(sum_m)
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))
    shift = sum_e - emin[group]  # >= 0: each mantissa shifted to its group's lowest exponent, exactly
    out = np.empty(len(starts), dtype=object)
    try:
        m64 = np.array(sum_m.tolist(), dtype=np.int64)
    except OverflowError:  # a mantissa of 64 bits or more: all as Python ints
        m64 = None
    if m64 is not None:
        size = np.diff(np.r_[starts, n])
        room = 62 - np.frexp(size.astype(np.float64))[1]  # bits a shifted mantissa may have in its group
        bits = np.frexp(np.abs(m64).astype(np.float64))[1] + shift  # (rounding up: never under the true length)
        fits = np.ones(len(starts), dtype=np.bool_)
        np.logical_and.at(fits, group, bits <= room[group])
        small = fits[group]
        sums = np.add.reduceat(np.where(small, m64 << np.where(small, shift, 0), 0), starts)
        out[fits] = sums[fits].tolist()
        if fits.all():
            return out
        rest = ~fits
    else:
        rest = np.ones(len(starts), dtype=np.bool_)
    sel = rest[group]
    wide = np.zeros(n, dtype=object)
    wide[sel] = np.asarray(sum_m, dtype=object)[sel] << shift[sel].astype(object)
    out[rest] = np.add.reduceat(wide, starts)[rest]
    return out


def _objects(values: Sequence[Any]) -> NDArray[np.object_]:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _name_rank(names: tuple[str, ...]) -> NDArray[np.int64]:
    """Per code of a dictionary: the rank of its name (so sorting by rank sorts by name)."""
    rank = np.empty(len(names), dtype=np.int64)
    rank[sorted(range(len(names)), key=names.__getitem__)] = np.arange(len(names))
    return rank


def _group_ids(pair: _I64, npairs: int, ws: _I64, width: int) -> tuple[NDArray[np.intp], int]:
    """Dense ids of the (pair, window) groups of the entries, numbered in (pair, window) order; and how many.

    Without a sort when the id space is small (the common case: a batch spans hours, so few windows per
    pair): mark the ids present in a table and number them by a running count. Else ``np.unique``.
    """
    lo = int(ws.min())
    nws = (int(ws.max()) - lo) // width + 1
    if npairs * nws <= 8 * len(ws) + 4096:
        g = pair * nws + (ws - lo) // width
        present = np.zeros(npairs * nws, dtype=np.bool_)
        present[g] = True
        dense = np.cumsum(present, dtype=np.intp) - 1
        return dense[g], int(dense[-1]) + 1
    if (npairs * nws).bit_length() <= 62:
        _, ids = np.unique(pair * nws + (ws - lo) // width, return_inverse=True)
    else:
        _, ids = np.unique(np.stack([pair, ws], axis=1), axis=0, return_inverse=True)
    ids = ids.reshape(-1)
    return ids, int(ids.max()) + 1


def _windows(
    new: ReadingColumns, intervals: Mapping[str, int], ranks: tuple[_I64, _I64]
) -> dict[str, WindowDeltas]:
    """Exact window deltas of every interval from the new readings' measurement entries.

    No sort: entries get dense group ids in output order (device name, metric name, window start) and
    are reduced with unbuffered ``ufunc.at`` (``np.add.at``, ``np.minimum.at``: a few ns per entry). An
    interval whose width is a multiple of another's (1h of 1m) is made from that one's deltas (:func:`_coarser`):
    a backlog's 1m windows hold a few readings each, so the second interval costs a fraction of the first.
    """
    out: dict[str, WindowDeltas] = {}
    if not len(new.m_row):
        for name, width in intervals.items():
            e = np.empty(0, np.int64)
            out[name] = WindowDeltas(name, width, _objects([]), _objects([]), e, e, _objects([]), e,
                                     np.empty(0, np.float64), np.empty(0, np.float64))
        return out
    drank, mrank = ranks
    nmet = len(new.metrics)
    pair = drank[new.device[new.m_row]] * nmet + mrank[new.m_metric]
    ts = new.ts_ms[new.m_row]
    value = new.m_value
    # exact integer form of every value: value = mant * 2**exp with mant odd (or 0), |value| < 2**top
    frac, top_ = np.frexp(value)
    mant = (frac * 2.0**53).astype(np.int64)
    top = top_.astype(np.int64)
    zero = mant == 0
    low = mant & -mant  # the lowest set bit (a power of two, exact as a float)
    tz = np.frexp(np.where(zero, 1, low).astype(np.float64))[1].astype(np.int64) - 1
    mant >>= tz
    exp = np.where(zero, _NO_EXP, top - 53 + tz)
    top = np.where(zero, -_NO_EXP, top)
    dev_names = _objects(new.devices)[np.argsort(drank)]  # by rank
    met_names = _objects(new.metrics)[np.argsort(mrank)]
    done: dict[int, tuple[WindowDeltas, _I64]] = {}  # by width: the deltas and each entry's pair
    for name, width in sorted(intervals.items(), key=lambda kv: kv[1]):
        finer = [w for w in done if width % w == 0]
        if finer:  # a multiple of a finer interval's width: its windows merged, fewer entries than the values
            fine, fine_pair = done[max(finer)]
            out[name], p = _coarser(fine, fine_pair, name, width)
            done[width] = (out[name], p)
            continue
        ws = ts - ts % width
        ids, groups = _group_ids(pair, len(new.devices) * nmet, ws, width)
        rep = np.empty(groups, dtype=np.intp)
        rep[ids] = np.arange(len(ids))  # an entry of each group
        lo = np.full(groups, np.inf)
        np.minimum.at(lo, ids, value)
        hi = np.full(groups, -np.inf)
        np.maximum.at(hi, ids, value)
        sum_m, sum_e = _exact_sums(mant, exp, top, ids, groups)
        p = pair[rep]
        out[name] = WindowDeltas(
            interval=name, width_ms=width, device=dev_names[p // nmet], metric=met_names[p % nmet],
            window_start_ms=ws[rep], count=np.bincount(ids, minlength=groups).astype(np.int64),
            sum_m=sum_m, sum_e=sum_e, min=lo, max=hi,
        )
        done[width] = (out[name], p)
    return {name: out[name] for name in intervals}


def _coarser(fine: WindowDeltas, pair: _I64, name: str, width: int) -> tuple[WindowDeltas, _I64]:
    """The deltas of an interval whose width is a multiple of ``fine``'s, from ``fine``'s entries (and each entry's
    pair code, in entry order); the same as from the values, exactly.

    ``fine``'s entries are in (pair, window) order, and a coarse window holds whole fine ones: each coarse window
    is a run of consecutive entries, reduced with ``ufunc.reduceat``; exact sums shifted to the run's lowest
    exponent (:func:`_shifted_sums`). An entry whose sum is 0 takes part at the exponent of its run's others.
    """
    ws = fine.window_start_ms - fine.window_start_ms % width
    starts = np.flatnonzero(np.r_[True, (pair[1:] != pair[:-1]) | (ws[1:] != ws[:-1])])
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(ws)]))
    zero = fine.sum_m == 0
    e = np.where(zero, _NO_EXP, fine.sum_e)
    emin = np.minimum.reduceat(e, starts)
    emin[emin == _NO_EXP] = 0  # a run of zero sums
    e = np.where(zero, emin[group], e)  # (0 shifted by 0)
    return WindowDeltas(
        interval=name, width_ms=width, device=fine.device[starts], metric=fine.metric[starts],
        window_start_ms=ws[starts], count=np.add.reduceat(fine.count, starts).astype(np.int64),
        sum_m=_shifted_sums(fine.sum_m, e, emin, starts), sum_e=emin.astype(np.int64),
        min=np.minimum.reduceat(fine.min, starts), max=np.maximum.reduceat(fine.max, starts),
    ), pair[starts]


def _exact_sums(
    mant: _I64, exp: _I64, top: _I64, ids: NDArray[np.intp], groups: int
) -> tuple[NDArray[np.object_], _I64]:
    """Exact sum of each group (entries with ``ids == g``) as ``sum_m * 2**sum_e``.

    Each value is ``mant * 2**exp`` with ``|value| < 2**top``. Shifted to the group's lowest exponent
    ``emin``, value i is the integer ``x_i = mant_i << s_i`` (``s_i = exp_i - emin``) with
    ``|x_i| < 2**w`` where ``w = max(top) - emin`` over the group; a group of ``c`` values has
    ``c < 2**bitlen(c)``.

    * ``w + bitlen(c) <= 63`` (most groups: values of similar magnitude): ``|sum x| < c * 2**w <
      2**(bitlen(c) + w) <= 2**63``, and so is every partial sum, in any order: int64 never overflows.
    * ``w + bitlen(c) <= 94``: two limbs, ``x_i = h_i * 2**31 + l_i`` with ``0 <= l_i < 2**31``
      (``h_i = floor(x_i / 2**31)``, computed by shifting ``mant_i``, so nothing is formed wider than
      64 bits), so ``|h_i| <= 2**max(w - 31, 0)`` and ``|sum h| < 2**(bitlen(c) + max(w - 31, 0)) <= 2**63``;
      ``sum l < c * 2**31 < 2**63`` for ``c < 2**32``. Then ``sum x = sum h * 2**31 + sum l`` exactly.
    * beyond (values more than ~2**40 apart in magnitude, with full mantissas): Python ints, still
      without a Python loop (numpy applies ``<<`` and ``+`` to object arrays).
    """
    emin = np.full(groups, _NO_EXP, dtype=np.int64)
    np.minimum.at(emin, ids, exp)
    width = np.full(groups, -_NO_EXP, dtype=np.int64)
    np.maximum.at(width, ids, top)
    width -= emin
    emin[emin == _NO_EXP] = 0  # a group of zeros
    count = np.bincount(ids, minlength=groups)
    shift = np.where(mant == 0, 0, exp - emin[ids])
    need = width + np.frexp(count.astype(np.float64))[1].astype(np.int64)  # w + bitlen(c)
    one = need <= 63
    x = mant << np.minimum(shift, 63)  # right for the entries of one-limb groups
    if not one.all():
        x[~one[ids]] = 0
    sums = np.zeros(groups, dtype=np.int64)
    np.add.at(sums, ids, x)
    sum_m = sums.astype(object)
    two = ~one & (need <= 94)
    if two.any():
        sel = two[ids]
        m, sh, g = mant[sel], shift[sel], ids[sel]
        up = sh - _LIMB  # >= 0: the high limb is m << up, the low one 0
        hi = np.where(up >= 0, m << np.clip(up, 0, 63), m >> np.clip(-up, 0, 63))
        lo = np.where(up >= 0, 0, (m & ((np.int64(1) << np.clip(-up, 0, _LIMB)) - 1)) << np.clip(sh, 0, _LIMB))
        hs = np.zeros(groups, dtype=np.int64)
        np.add.at(hs, g, hi)
        ls = np.zeros(groups, dtype=np.int64)
        np.add.at(ls, g, lo)
        sum_m[two] = hs[two].astype(object) * (1 << _LIMB) + ls[two].astype(object)
    big = need > 94
    if big.any():
        sel = big[ids]
        acc = np.zeros(groups, dtype=object)
        np.add.at(acc, ids[sel], mant[sel].astype(object) << shift[sel].astype(object))
        sum_m[big] = acc[big]
    return np.asarray(sum_m, dtype=object), emin


def _devices(new: ReadingColumns, ranks: tuple[_I64, _I64]) -> DeviceDeltas:
    """Per device of the new readings (sorted by name): received and event-time ranges, count; the
    (device, metric) pairs seen. Device ranks are dense ids already: reduced with ``ufunc.at``."""
    if not len(new):
        e = np.empty(0, np.int64)
        return DeviceDeltas(_objects([]), e, e, e, e, e, ())
    rank, mrank = ranks
    dev = rank[new.device]
    ndev = len(new.devices)
    count = np.bincount(dev, minlength=ndev)
    seen = np.flatnonzero(count)

    def reduce(ufunc: np.ufunc, values: _I64, init: int) -> _I64:
        acc = np.full(ndev, init, dtype=np.int64)
        ufunc.at(acc, dev, values)
        return acc[seen]

    big, small = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    names = _objects(new.devices)[np.argsort(rank)]  # rank -> name
    nmet = len(new.metrics)
    pairs = np.flatnonzero(np.bincount(dev[new.m_row] * nmet + mrank[new.m_metric], minlength=ndev * nmet))
    met_names = _objects(new.metrics)[np.argsort(mrank)]
    return DeviceDeltas(
        device=names[seen],
        first_received_ms=reduce(np.minimum, new.received_ms, big),
        last_received_ms=reduce(np.maximum, new.received_ms, small),
        first_ts_ms=reduce(np.minimum, new.ts_ms, big), last_ts_ms=reduce(np.maximum, new.ts_ms, small),
        count=count[seen].astype(np.int64),
        metric_pairs=tuple(zip(names[pairs // nmet].tolist(), met_names[pairs % nmet].tolist(), strict=True)),
    )
