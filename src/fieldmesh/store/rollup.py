"""Rollup arithmetic shared by the hot stores (pure functions).

An accumulator is ``[count, m, e, min, max]``: the exact sum is ``m * 2**e``
(:mod:`fieldmesh.core.exact`), so merging accumulators in any order gives the same result.
Bools count as 0 and 1.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from fieldmesh.core.exact import exact_sum
from fieldmesh.core.model import Reading
from fieldmesh.store.base import INTERVALS

__all__ = ["Acc", "RollupKey", "evict_oldest", "merge_acc", "rollup_deltas"]

RollupKey = tuple[str, str, int]
"""(device_id, metric, window_start_ms)"""
Acc = list[float | int]
"""[count, m, e, min, max]"""

_MIN_MS = INTERVALS["1m"]
_HOUR_MS = INTERVALS["1h"]


def rollup_deltas(
    readings: Iterable[Reading], devices: dict[str, list[int]] | None = None
) -> dict[str, dict[RollupKey, Acc]]:
    """Aggregate readings into per-interval accumulators (1m from readings, 1h from 1m).

    When ``devices`` is given, it also gathers per device, in the same pass,
    ``[first_received_ms, last_received_ms, first_ts_ms, last_ts_ms, readings]``.
    """
    # First gather each window's values (cheap appends), then reduce each group in C:
    # len/min/max, and the exact sum through math.fsum's exact expansion.
    groups: dict[tuple[str, int], list[dict[str, float | bool]]] = {}
    for r in readings:
        ts = r.ts_ms
        ws = ts - ts % _MIN_MS
        dev = r.device_id
        if devices is not None:
            da = devices.get(dev)
            rx = r.received_ms
            if da is None:
                devices[dev] = [rx, rx, ts, ts, 1]
            else:
                if rx < da[0]:
                    da[0] = rx
                if rx > da[1]:
                    da[1] = rx
                if ts < da[2]:
                    da[2] = ts
                if ts > da[3]:
                    da[3] = ts
                da[4] += 1
        k = (dev, ws)
        g = groups.get(k)
        if g is None:
            groups[k] = [r.measurements]
        else:
            g.append(r.measurements)
    mins: dict[RollupKey, Acc] = {}
    for (dev, ws), mss in groups.items():
        names = mss[0].keys() if len(mss) == 1 else {n for ms in mss for n in ms}
        for name in names:
            vs = [ms[name] for ms in mss if name in ms]
            m, e = exact_sum(vs)  # type: ignore[arg-type]
            mins[(dev, name, ws)] = [len(vs), m, e, float(min(vs)), float(max(vs))]
    hours: dict[RollupKey, Acc] = {}
    for (dev, name, ws), a in mins.items():
        hk = (dev, name, ws - ws % _HOUR_MS)
        h = hours.get(hk)
        hours[hk] = list(a) if h is None else merge_acc(h, a)
    return {"1m": mins, "1h": hours}


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
