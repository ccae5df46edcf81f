"""Rollup arithmetic shared by the hot stores (pure functions).

An accumulator is ``[count, m, e, min, max]``: the exact sum is ``m * 2**e``
(:mod:`fieldmesh.core.exact`), so merging accumulators in any order gives the same result.
Bools count as 0 and 1.
"""

from __future__ import annotations

from collections.abc import Iterable

from fieldmesh.core.exact import add_float, merge
from fieldmesh.core.model import Reading
from fieldmesh.store.base import INTERVALS

__all__ = ["Acc", "RollupKey", "merge_acc", "rollup_deltas"]

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
    mins: dict[RollupKey, Acc] = {}
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
        for name, v in r.measurements.items():
            fv = float(v)
            k = (dev, name, ws)
            a = mins.get(k)
            if a is None:
                n, d = fv.as_integer_ratio()
                mins[k] = [1, n, 1 - d.bit_length(), fv, fv]
            else:
                a[0] += 1
                a[1], a[2] = add_float(a[1], a[2], fv)  # type: ignore[arg-type]
                if fv < a[3]:
                    a[3] = fv
                if fv > a[4]:
                    a[4] = fv
    hours: dict[RollupKey, Acc] = {}
    for (dev, name, ws), a in mins.items():
        k = (dev, name, ws - ws % _HOUR_MS)
        h = hours.get(k)
        hours[k] = list(a) if h is None else merge_acc(h, a)
    return {"1m": mins, "1h": hours}


def merge_acc(a: Acc, b: Acc) -> Acc:
    """Merge two accumulators into a new one."""
    m, e = merge(int(a[1]), int(a[2]), int(b[1]), int(b[2]))
    return [int(a[0]) + int(b[0]), m, e, min(a[3], b[3]), max(a[4], b[4])]
