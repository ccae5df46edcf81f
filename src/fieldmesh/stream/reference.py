"""The stream contract in plain per-reading Python: the readable oracle of :mod:`fieldmesh.stream.columnar`.

It decides exactly what the processor and the stores decided before the contract existed
(``Processor.apply_records`` plus the stores' ``apply``), now in one place and without I/O:

* :func:`decode`: records at or below the state's position are skipped; a DLQ record is decoded as a
  dead letter; a record that does not decode (corrupt, nested too deep, an unknown bus encoding) becomes
  a dead letter of its own (:func:`corrupt_dead_letter`) and its position is covered all the same, since
  redelivering it would fail the same way forever.
* :func:`decide`: a reading is *late* when its device's watermark (the latest event time seen from it,
  duplicates included) minus ``grace_ms`` had passed the end of its 1-minute window
  (``ts - ts % 60000 + 60000 <= watermark - grace``). Every reading advances its device's and its
  partition's watermark; a reading record without readings still writes its partition's watermark.
* :func:`settle`: the first occurrence of a key in the batch wins; a later reading with the same key is
  a duplicate when its check value is the same, a collision when not. The first occurrences are claimed
  in one call; a collision (in the batch, or answered by the store) probes ``key``, ``key + 1``, ...
  (mod 2**63) in the order the stores did (in-batch collisions first, then the store's, each in arrival
  order): a key taken in this batch is a duplicate when its check value is the same and skipped when
  not; any other key is claimed until the store answers CLAIMED or DUPLICATE. This is the one copy of
  that algorithm; stores only answer claims. Windows and device deltas are computed over the new
  readings, sums exactly (:mod:`fieldmesh.core.exact`).

Watermarks are plain maxima here. The processor wrote ``dev_wm.get(dev) or known.get(dev, 0)``: the same,
since event times are after 2000-01-01 (the gateway rejects earlier ones), so a watermark is never 0
once a reading has been seen.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.batch import (
    CLAIMED,
    DUPLICATE,
    BatchResult,
    DeviceDeltas,
    Position,
    ReadingColumns,
    WindowDeltas,
    origin_of,
)
from fieldmesh.core.codec import decode_bus_readings, decode_dead_letter
from fieldmesh.core.exact import exact_sum
from fieldmesh.core.model import DeadLetter, Reading
from fieldmesh.core.topics import DLQ_TOPIC
from fieldmesh.stream.base import Claim, DecodedBatch, EnrichFn, StreamState

__all__ = ["KEY_SPACE", "WINDOW_MS", "corrupt_dead_letter", "decide", "decode", "settle"]

#: Identity keys are 63-bit: probing wraps around modulo this.
KEY_SPACE = 2**63
#: The window lateness is judged by.
WINDOW_MS = 60_000


def corrupt_dead_letter(rec: BusRecord, exc: Exception) -> DeadLetter:
    """The dead letter of a bus record that does not decode (``too_deep`` for nesting past the limit)."""
    return DeadLetter(
        reason="too_deep" if isinstance(exc, RecursionError) else "schema_violation",
        detail=f"corrupt bus record {rec.topic}[{rec.partition}]@{rec.offset}: {type(exc).__name__}: {exc}"[:300],
        topic=f"{rec.topic}.{rec.partition}",
        received_ms=int(time.time() * 1000),
        payload=rec.value[:65536],
    )


def decode(records: Sequence[BusRecord], state: StreamState) -> DecodedBatch:
    """Bus records as one batch of columns, record by record (see the module docstring)."""
    readings: list[Reading] = []
    origin: list[int] = []
    row_position: list[int] = []
    reading_positions: dict[Position, int] = {}
    positions: dict[Position, int] = {}
    dead: list[DeadLetter] = []
    corrupt = skipped = 0
    for rec in records:
        pos = (rec.topic, rec.partition)
        if rec.offset <= state.positions.get(pos, -1):
            skipped += 1
            continue
        positions[pos] = max(positions.get(pos, -1), rec.offset)
        if rec.topic == DLQ_TOPIC:
            try:
                dead.append(decode_dead_letter(rec.value))
            except Exception as exc:
                corrupt += 1
                dead.append(corrupt_dead_letter(rec, exc))
            continue
        try:
            got = decode_bus_readings(rec.value)
        except Exception as exc:
            corrupt += 1
            dead.append(corrupt_dead_letter(rec, exc))
            continue
        index = reading_positions.setdefault(pos, len(reading_positions))
        readings.extend(got)
        origin.extend([origin_of(rec.offset, rec.partition)] * len(got))
        row_position.extend([index] * len(got))
    return DecodedBatch(
        cols=ReadingColumns.from_readings(readings),
        origin=np.array(origin, dtype=np.int64),
        row_position=np.array(row_position, dtype=np.int32),
        reading_positions=tuple(reading_positions),
        positions=positions,
        dead_letters=tuple(dead),
        corrupt=corrupt,
        skipped=skipped,
    )


def decide(
    batch: DecodedBatch,
    state: StreamState,
    claim: Claim,
    *,
    grace_ms: int,
    intervals: Mapping[str, int],
    enrich: EnrichFn | None = None,
) -> BatchResult:
    """Lateness from device watermarks, then :func:`settle`; ``enrich`` is applied to the new readings.

    Enriching only the new readings stores what enriching every reading did: the enrichment of a
    reading depends on that reading alone (its join key and event time) and on the enricher's state,
    which deciding does not change; and it touches none of what is decided here (key, check value,
    device, event time, measurements), so the same readings are new, late and windowed either way,
    while duplicates, whose enrichment was thrown away with them, are no longer enriched for nothing.
    """
    cols = batch.cols
    wms = {pos: state.watermarks.get(pos, 0) for pos in batch.reading_positions}
    pos_of = batch.reading_positions
    known = state.device_watermarks
    advanced: dict[str, int] = {}
    late: list[bool] = []
    devices = cols.devices
    for code, ts, p in zip(cols.device.tolist(), cols.ts_ms.tolist(), batch.row_position.tolist(), strict=True):
        dev = devices[code]
        dwm = advanced.get(dev, known.get(dev, 0))
        late.append(ts - ts % WINDOW_MS + WINDOW_MS <= dwm - grace_ms)
        if ts > dwm:
            advanced[dev] = ts
        pos = pos_of[p]
        if ts > wms[pos]:
            wms[pos] = ts
    result = settle(
        cols, np.array(late, dtype=np.bool_), batch.origin, claim, intervals=intervals,
        dead_letters=batch.dead_letters, positions=batch.positions, watermarks=wms, device_watermarks=advanced,
        corrupt=batch.corrupt,
    )
    if enrich is None or not len(result.new):
        return result
    return dataclasses.replace(result, new=with_enrichment(result.new, enrich(result.new)))


def with_enrichment(cols: ReadingColumns, extra: NDArray[np.object_]) -> ReadingColumns:
    """``cols`` with ``extra[i]`` joined into row i's enrichment (None: unchanged), as the enricher did."""
    old = [None] * len(cols) if cols.enrichment is None else cols.enrichment.tolist()
    merged: list[Any] = [
        e if x is None else ({**e, **x} if e else x) for e, x in zip(old, extra.tolist(), strict=True)
    ]
    if all(m is None for m in merged):
        return cols
    out = np.empty(len(merged), dtype=object)
    out[:] = merged
    return dataclasses.replace(cols, enrichment=out)


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
    """De-duplicate and claim, then the window and device deltas of the new readings."""
    readings = cols.to_readings()
    origins = origin.tolist()
    first: dict[int, int] = {}  # key -> row of its first reading in the batch
    dups = 0
    collided: list[int] = []
    for i, r in enumerate(readings):
        j = first.get(r.key)
        if j is None:
            first[r.key] = i
        elif readings[j].chk == r.chk:
            dups += 1
        else:
            collided.append(i)
    store_key: dict[int, int] = {}  # row -> key it is stored under
    taken: dict[int, int] = {}  # key -> row, claimed in this batch
    if first:
        rows = list(first.values())
        answers = claim(
            np.array(list(first), dtype=np.int64),
            np.array([readings[i].chk for i in rows], dtype=np.int64),
            np.array([origins[i] for i in rows], dtype=np.int64),
        ).tolist()
        for (k, i), a in zip(first.items(), answers, strict=True):
            if a == CLAIMED:
                store_key[i] = k
                taken[k] = i
            elif a == DUPLICATE:
                dups += 1
            else:
                collided.append(i)
    for i in collided:  # a 63-bit key collision (or a duplicate of a collided reading): probe from the key
        r = readings[i]
        k = r.key
        while True:
            if k in taken:
                if readings[taken[k]].chk == r.chk:
                    dups += 1
                    break
            else:
                a = int(claim(np.array([k], dtype=np.int64), np.array([r.chk], dtype=np.int64),
                              np.array([origins[i]], dtype=np.int64))[0])
                if a == CLAIMED:
                    store_key[i] = k
                    taken[k] = i
                    break
                if a == DUPLICATE:
                    dups += 1
                    break
            k = (k + 1) % KEY_SPACE
    new_rows = sorted(store_key)
    new = [readings[i] for i in new_rows]
    new_late = [bool(late[i]) for i in new_rows]
    counts: dict[str, int] = {"stored": len(new), "duplicates": dups, "late": sum(new_late)}
    for d in dead_letters:
        counts[f"dlq.{d.reason}"] = counts.get(f"dlq.{d.reason}", 0) + 1
    return BatchResult(
        positions=dict(positions or {}),
        watermarks=dict(watermarks or {}),
        device_watermarks=dict(device_watermarks or {}),
        new=cols.take(np.array(new_rows, dtype=np.intp)),
        store_key=np.array([store_key[i] for i in new_rows], dtype=np.int64),
        late=np.array(new_late, dtype=np.bool_),
        windows={name: _windows(new, name, width) for name, width in intervals.items()},
        devices=_devices(new),
        dead_letters=tuple(dead_letters),
        counts=counts,
        corrupt=corrupt,
    )


def _objects(values: Sequence[Any]) -> NDArray[np.object_]:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _windows(new: Sequence[Reading], name: str, width: int) -> WindowDeltas:
    """Exact deltas of one interval: values gathered per (device, metric, window start), then reduced."""
    groups: dict[tuple[str, str, int], list[float]] = {}
    for r in new:
        ws = r.ts_ms - r.ts_ms % width
        for metric, v in r.measurements.items():
            groups.setdefault((r.device_id, metric, ws), []).append(float(v))
    keys = sorted(groups)
    sums = [exact_sum(groups[k]) for k in keys]
    return WindowDeltas(
        interval=name,
        width_ms=width,
        device=_objects([k[0] for k in keys]),
        metric=_objects([k[1] for k in keys]),
        window_start_ms=np.array([k[2] for k in keys], dtype=np.int64),
        count=np.array([len(groups[k]) for k in keys], dtype=np.int64),
        sum_m=_objects([m for m, _ in sums]),
        sum_e=np.array([e for _, e in sums], dtype=np.int64),
        min=np.array([min(groups[k]) for k in keys], dtype=np.float64),
        max=np.array([max(groups[k]) for k in keys], dtype=np.float64),
    )


def _devices(new: Sequence[Reading]) -> DeviceDeltas:
    """Per device of the new readings: received and event-time ranges, count; (device, metric) pairs."""
    acc: dict[str, list[int]] = {}
    pairs: set[tuple[str, str]] = set()
    for r in new:
        a = acc.get(r.device_id)
        if a is None:
            acc[r.device_id] = [r.received_ms, r.received_ms, r.ts_ms, r.ts_ms, 1]
        else:
            a[0] = min(a[0], r.received_ms)
            a[1] = max(a[1], r.received_ms)
            a[2] = min(a[2], r.ts_ms)
            a[3] = max(a[3], r.ts_ms)
            a[4] += 1
        pairs.update((r.device_id, m) for m in r.measurements)
    devs = sorted(acc)

    def col(j: int) -> NDArray[np.int64]:
        return np.array([acc[d][j] for d in devs], dtype=np.int64)

    return DeviceDeltas(
        device=_objects(devs), first_received_ms=col(0), last_received_ms=col(1), first_ts_ms=col(2),
        last_ts_ms=col(3), count=col(4), metric_pairs=tuple(sorted(pairs)),
    )
