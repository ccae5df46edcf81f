"""Drive a hot store as the processor does: decide a batch of readings against the store's claims, commit.

:func:`commit_readings` is what the store suites call instead of the removed ``store.apply``: the
readings are decided by a small per-reading claim loop here (first occurrence in the batch, claim,
probe the next keys on a collision), windows and devices summed from first principles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fieldmesh.core.batch import (
    CLAIMED,
    COLLISION,
    BatchResult,
    DeviceDeltas,
    Position,
    ReadingColumns,
    WindowDeltas,
)
from fieldmesh.core.exact import exact_sum
from fieldmesh.core.model import DeadLetter, Reading
from fieldmesh.store.base import INTERVALS, HotStore, HotTxn

__all__ = ["Committed", "commit_readings", "settle_readings"]

_KEY_SPACE = 1 << 63


@dataclass(frozen=True, slots=True)
class Committed:
    """What one commit did, in the counters' terms."""

    stored: int
    duplicates: int
    late: int
    dead_lettered: int
    result: BatchResult


def settle_readings(
    txn: HotTxn,
    readings: Sequence[Reading],
    *,
    late: Sequence[bool] | None = None,
    origins: Sequence[int] | None = None,
    dead_letters: Sequence[DeadLetter] = (),
    positions: Mapping[Position, int] | None = None,
    watermarks: Mapping[Position, int] | None = None,
) -> BatchResult:
    """Decide ``readings`` against ``txn``'s claims, one reading at a time."""
    n = len(readings)
    late_ = list(late) if late is not None else [False] * n
    origin = list(origins) if origins is not None else [-1] * n
    first: dict[int, int] = {}  # key -> row of its first reading
    pending: list[int] = []
    dups = 0
    for i, r in enumerate(readings):
        j = first.get(r.key)
        if j is None:
            first[r.key] = i
        elif readings[j].chk == r.chk:
            dups += 1
        else:
            pending.append(i)
    rows = list(first.values())
    store_key: dict[int, int] = {}  # row -> key claimed
    owner: dict[int, int] = {}  # key claimed in this batch -> row
    if rows:
        got = txn.claim_keys(
            np.array([readings[i].key for i in rows], np.int64), np.array([readings[i].chk for i in rows], np.int64),
            np.array([origin[i] for i in rows], np.int64),
        )
        for i, a in zip(rows, got.tolist(), strict=True):
            if a == CLAIMED:
                store_key[i] = readings[i].key
                owner[readings[i].key] = i
            elif a == COLLISION:
                pending.append(i)
            else:
                dups += 1
    for i in sorted(pending):  # probe from the key itself: a reading that collided in the batch may own it
        r = readings[i]
        k = r.key
        while True:
            if k in owner:
                if readings[owner[k]].chk == r.chk:
                    dups += 1
                    break
            else:
                a = int(txn.claim_keys(np.array([k], np.int64), np.array([r.chk], np.int64),
                                       np.array([origin[i]], np.int64))[0])
                if a == CLAIMED:
                    store_key[i] = k
                    owner[k] = i
                    break
                if a != COLLISION:
                    dups += 1
                    break
            k = (k + 1) % _KEY_SPACE
    new_rows = sorted(store_key)
    new = [readings[i] for i in new_rows]
    n_late = sum(late_[i] for i in new_rows)
    counts: dict[str, int] = {"stored": len(new), "duplicates": dups, "late": n_late}
    for d in dead_letters:
        counts[f"dlq.{d.reason}"] = counts.get(f"dlq.{d.reason}", 0) + 1
    return BatchResult(
        positions=dict(positions or {}), watermarks=dict(watermarks or {}), device_watermarks={},
        new=ReadingColumns.from_readings(new), store_key=np.array([store_key[i] for i in new_rows], np.int64),
        late=np.array([late_[i] for i in new_rows], dtype=bool),
        windows={name: _windows(new, name, width) for name, width in INTERVALS.items()},
        devices=_devices(new), dead_letters=tuple(dead_letters), counts=counts,
    )  # fmt: skip


def commit_readings(
    store: HotStore,
    readings: Sequence[Reading],
    *,
    late: Sequence[bool] | None = None,
    origins: Sequence[int] | None = None,
    dead_letters: Sequence[DeadLetter] = (),
    positions: Mapping[Position, int] | None = None,
    watermarks: Mapping[Position, int] | None = None,
) -> Committed:
    """Decide ``readings`` against ``store`` and commit them in one transaction."""
    res = store.commit(
        lambda txn: settle_readings(
            txn, readings, late=late, origins=origins, dead_letters=dead_letters, positions=positions,
            watermarks=watermarks,
        ),
        ts_ms=np.array([r.ts_ms for r in readings], np.int64),
    )  # fmt: skip
    c = res.counts
    return Committed(c.get("stored", 0), c.get("duplicates", 0), c.get("late", 0), len(res.dead_letters), res)


def _windows(new: Sequence[Reading], name: str, width: int) -> WindowDeltas:
    vals: dict[tuple[str, str, int], list[float]] = {}
    for r in new:
        for metric, v in r.measurements.items():
            vals.setdefault((r.device_id, metric, r.ts_ms - r.ts_ms % width), []).append(float(v))
    keys = sorted(vals)
    sums = [exact_sum(vals[k]) for k in keys]

    def objs(xs: list[object]) -> np.ndarray:  # type: ignore[type-arg]
        a = np.empty(len(xs), dtype=object)
        a[:] = xs
        return a

    return WindowDeltas(
        name, width, objs([k[0] for k in keys]), objs([k[1] for k in keys]),
        np.array([k[2] for k in keys], np.int64), np.array([len(vals[k]) for k in keys], np.int64),
        objs([m for m, _ in sums]), np.array([e for _, e in sums], np.int64),
        np.array([min(vals[k]) for k in keys], np.float64), np.array([max(vals[k]) for k in keys], np.float64),
    )  # fmt: skip


def _devices(new: Sequence[Reading]) -> DeviceDeltas:
    agg: dict[str, list[int]] = {}
    pairs: set[tuple[str, str]] = set()
    for r in new:
        a = agg.setdefault(r.device_id, [r.received_ms, r.received_ms, r.ts_ms, r.ts_ms, 0])
        a[0], a[1] = min(a[0], r.received_ms), max(a[1], r.received_ms)
        a[2], a[3] = min(a[2], r.ts_ms), max(a[3], r.ts_ms)
        a[4] += 1
        pairs.update((r.device_id, m) for m in r.measurements)
    devs = sorted(agg)
    dev = np.empty(len(devs), dtype=object)
    dev[:] = devs
    return DeviceDeltas(dev, *(np.array([agg[d][i] for d in devs], np.int64) for i in range(5)),
                        metric_pairs=tuple(sorted(pairs)))  # type: ignore[misc]
