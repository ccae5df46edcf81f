"""Rollup arithmetic shared by the hot stores (pure functions).

An accumulator is ``[count, m, e, min, max]``: the exact sum is ``m * 2**e``
(:mod:`fieldmesh.core.exact`), so merging accumulators in any order gives the same result.
Bools count as 0 and 1.
"""

from __future__ import annotations

import numpy as np

__all__ = ["Acc", "RollupKey", "evict_oldest", "merge_acc"]

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
