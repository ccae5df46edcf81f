"""The stream contract with numpy over columns: the processor's hot path.

It decides what :mod:`fieldmesh.stream.reference` decides (the tests hold it to that field by field),
with array operations instead of a Python step per reading:

* decoding: :func:`fieldmesh.core.codec.decode_bus_columns_many` (one batch of columns for all records);
* lateness: readings sorted by device (stable, so arrival order is kept within a device); the exclusive
  running maximum of event times within each device is one ``np.maximum.accumulate`` over values that
  carry the device's segment number in their high bits, then the state's watermark is folded in;
* first occurrences: ``np.unique(key, return_index=True)``; collisions (astronomically rare) run the
  reference's probe in Python;
* windows: the new readings' measurement entries are sorted once by (device name, metric name, event
  time), which orders them by window for every interval; each interval's groups are then reduced with
  ``reduceat``: count, min, max, and the exact sum from integer mantissas (see :func:`_exact_sums`).

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

__all__ = ["decide", "decode", "settle"]

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
        order = np.argsort(cols.device, kind="stable")
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
        windows=_windows(new, intervals),
        devices=_devices(new),
        dead_letters=tuple(dead_letters),
        counts=counts,
        corrupt=corrupt,
    )


def _objects(values: Sequence[Any]) -> NDArray[np.object_]:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _name_rank(names: tuple[str, ...]) -> NDArray[np.int64]:
    """Per code of a dictionary: the rank of its name (so sorting by rank sorts by name)."""
    rank = np.empty(len(names), dtype=np.int64)
    rank[sorted(range(len(names)), key=names.__getitem__)] = np.arange(len(names))
    return rank


def _windows(new: ReadingColumns, intervals: Mapping[str, int]) -> dict[str, WindowDeltas]:
    """Exact window deltas of every interval from the new readings' measurement entries."""
    row = new.m_row
    dev = _name_rank(new.devices)[new.device[row]]
    met = _name_rank(new.metrics)[new.m_metric]
    ts = new.ts_ms[row]
    # one sort by (device name, metric name, event time) orders the entries by window for every interval
    if len(ts):
        lo = int(ts.min())
        bits = (int(ts.max()) - lo).bit_length()
        pair = dev * len(new.metrics) + met
        if (len(new.devices) * len(new.metrics)).bit_length() + bits <= 62:
            order = np.argsort((pair << bits) | (ts - lo))
        else:
            order = np.lexsort((ts, met, dev))
        dev, met, ts, pair = dev[order], met[order], ts[order], pair[order]
        value = new.m_value[order]
        # exact integer form of every value: value = mant * 2**exp with mant odd (or 0), |value| < 2**top
        frac, top_ = np.frexp(value)
        mant = (frac * 2.0**53).astype(np.int64)
        top = top_.astype(np.int64)
        exp = top - 53
        zero = mant == 0
        low = mant & -mant  # the lowest set bit (a power of two, exact as a float)
        tz = np.frexp(np.where(zero, 1, low).astype(np.float64))[1].astype(np.int64) - 1
        mant >>= tz
        exp = np.where(zero, _NO_EXP, exp + tz)
        top = np.where(zero, -_NO_EXP, top)
        pair_change = np.r_[True, pair[1:] != pair[:-1]]
    dev_names = _objects(new.devices)[np.argsort(_name_rank(new.devices))]  # by rank
    met_names = _objects(new.metrics)[np.argsort(_name_rank(new.metrics))]
    out: dict[str, WindowDeltas] = {}
    for name, width in intervals.items():
        if not len(ts):
            out[name] = WindowDeltas(name, width, _objects([]), _objects([]), np.empty(0, np.int64),
                                     np.empty(0, np.int64), _objects([]), np.empty(0, np.int64),
                                     np.empty(0, np.float64), np.empty(0, np.float64))
            continue
        ws = ts - ts % width
        starts = np.flatnonzero(pair_change | np.r_[True, ws[1:] != ws[:-1]])
        count = np.diff(np.r_[starts, len(ts)])
        sum_m, sum_e = _exact_sums(mant, exp, top, starts, count)
        out[name] = WindowDeltas(
            interval=name, width_ms=width,
            device=dev_names[dev[starts]], metric=met_names[met[starts]],
            window_start_ms=ws[starts], count=count.astype(np.int64), sum_m=sum_m, sum_e=sum_e,
            min=np.minimum.reduceat(value, starts), max=np.maximum.reduceat(value, starts),
        )
    return out


def _exact_sums(
    mant: _I64, exp: _I64, top: _I64, starts: NDArray[np.intp], count: NDArray[np.intp]
) -> tuple[NDArray[np.object_], _I64]:
    """Exact sum of each group (entries ``starts[g]`` up to the next start) as ``sum_m * 2**sum_e``.

    Each value is ``mant * 2**exp`` with ``|value| < 2**top``. Shifted to the group's lowest exponent
    ``emin``, value i is the integer ``x_i = mant_i << s_i`` (``s_i = exp_i - emin``) with
    ``|x_i| < 2**w`` where ``w = max(top) - emin`` over the group. Split
    ``x_i = h_i * 2**31 + l_i`` with ``0 <= l_i < 2**31`` (``h_i = floor(x_i / 2**31)``, computed by
    shifting ``mant_i`` so nothing is formed wider than 64 bits), so ``|h_i| <= 2**max(w - 31, 0)``.

    Bound: a group of ``c`` values has ``c < 2**bitlen(c)``, so ``|sum h| <= c * 2**max(w - 31, 0) <
    2**(bitlen(c) + max(w - 31, 0))``, which is at most 2**63 when ``w + bitlen(c) <= 94`` (and
    ``bitlen(c) <= 63``); ``sum l < c * 2**31 < 2**63`` for ``c < 2**32``. Every partial sum of
    ``np.add.reduceat`` is bounded the same way, so int64 never overflows, and
    ``sum = (sum h * 2**31 + sum l) * 2**emin`` exactly. A group past the bound (values more than ~2**40
    apart in magnitude with full mantissas) is summed with Python ints, still without a loop: numpy
    applies ``<<`` and ``+`` to object arrays.
    """
    emin = np.minimum.reduceat(exp, starts)
    width = np.maximum.reduceat(top, starts) - emin
    emin = np.where(emin == _NO_EXP, 0, emin)  # a group of zeros
    group = np.repeat(np.arange(len(starts)), count)
    shift = exp - emin[group]
    shift = np.where(mant == 0, 0, shift)
    bitlen = np.frexp(count.astype(np.float64))[1].astype(np.int64)  # bit length of each count
    fast = width + bitlen <= 94
    up = shift - _LIMB  # >= 0: x_i = mant_i << up is the high limb, the low one 0
    hi = np.where(up >= 0, mant << np.clip(up, 0, 63), mant >> np.clip(-up, 0, 63))
    down = np.clip(_LIMB - shift, 0, _LIMB)
    lo = np.where(up >= 0, 0, (mant & ((np.int64(1) << down) - 1)) << np.clip(shift, 0, _LIMB))
    sum_m = np.empty(len(starts), dtype=object)
    if fast.all():
        hs, ls = np.add.reduceat(hi, starts), np.add.reduceat(lo, starts)
        sum_m[:] = hs.astype(object) * (1 << _LIMB) + ls.astype(object)
        return sum_m, emin
    fast_entries = fast[group]
    f_starts = np.cumsum(np.r_[0, count[fast][:-1]])
    if fast.any():
        hs = np.add.reduceat(hi[fast_entries], f_starts)
        ls = np.add.reduceat(lo[fast_entries], f_starts)
        sum_m[fast] = hs.astype(object) * (1 << _LIMB) + ls.astype(object)
    slow = ~fast
    s_starts = np.cumsum(np.r_[0, count[slow][:-1]])
    x = mant[~fast_entries].astype(object) << shift[~fast_entries].astype(object)
    sum_m[slow] = np.add.reduceat(x, s_starts)
    return sum_m, emin


def _devices(new: ReadingColumns) -> DeviceDeltas:
    """Per device of the new readings (sorted by name): received and event-time ranges, count; the
    (device, metric) pairs seen."""
    if not len(new):
        e = np.empty(0, np.int64)
        return DeviceDeltas(_objects([]), e, e, e, e, e, ())
    rank = _name_rank(new.devices)
    dev = rank[new.device]
    order = np.argsort(dev, kind="stable")
    d = dev[order]
    starts = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
    rx, ts = new.received_ms[order], new.ts_ms[order]
    names = _objects(new.devices)[np.argsort(rank)]  # rank -> name
    nmet = len(new.metrics)
    pairs = np.unique(rank[new.device[new.m_row]] * nmet + _name_rank(new.metrics)[new.m_metric])
    met_names = [new.metrics[i] for i in np.argsort(_name_rank(new.metrics)).tolist()]
    return DeviceDeltas(
        device=names[d[starts]],
        first_received_ms=np.minimum.reduceat(rx, starts), last_received_ms=np.maximum.reduceat(rx, starts),
        first_ts_ms=np.minimum.reduceat(ts, starts), last_ts_ms=np.maximum.reduceat(ts, starts),
        count=np.diff(np.r_[starts, len(d)]).astype(np.int64),
        metric_pairs=tuple(zip(names[pairs // nmet].tolist(), [met_names[m] for m in (pairs % nmet).tolist()],
                               strict=True)),
    )
