"""The identity keys of SQLite's ``idents_recent`` table in memory, for lookups.

``idents_recent`` is written in arrival order (a rowid table, no index on the key): a commit's new keys then
fill a few pages at its end instead of dirtying a page per key all over a keyed B-tree, which each commit
wrote to the WAL (and each checkpoint again). Lookups of the keys it holds are answered here instead: the
keys, their check values and origins as sorted runs of numpy arrays, merged as they grow (like an LSM tree:
a run is merged into the one before it once it holds half as many keys), so adding a commit's keys costs
amortised O(log n) per key and a lookup one binary search per run.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

__all__ = ["RecentKeys"]

_I64 = NDArray[np.int64]
_EMPTY: _I64 = np.zeros(0, dtype=np.int64)


class RecentKeys:
    """Keys with their check value and origin (-1: none), as sorted runs."""

    def __init__(self) -> None:
        self._runs: list[tuple[_I64, _I64, _I64]] = []
        self._n = 0
        self._dropped_view = 0  # keys dropped from the front whose memory the one run's arrays (views) still hold

    def __len__(self) -> int:
        return self._n

    def clear(self) -> None:
        self._runs = []
        self._n = 0
        self._dropped_view = 0

    def add(self, ids: _I64, chks: _I64, origins: _I64) -> None:
        """Add keys not held yet (the caller looked them up first)."""
        if not len(ids):
            return
        order = np.argsort(ids, kind="stable")
        self._runs.append((ids[order], chks[order], origins[order]))
        del order
        self._n += len(ids)
        while len(self._runs) > 1 and 2 * len(self._runs[-1][0]) >= len(self._runs[-2][0]):
            self._merge_last_two()

    def _merge_last_two(self) -> None:
        """Merge the newest two runs into one, a column at a time, letting each old column go once merged: the
        merge of two generations of millions of keys then holds about 1.2 times what they do for a moment, not
        2.5 times (the concatenations, the sort order and the three permuted columns at once)."""
        b = list(self._runs.pop())
        a = list(self._runs.pop())
        if not self._runs:  # the first run is new arrays: no dropped keys in them
            self._dropped_view = 0
        ids = np.concatenate((a[0], b[0]))
        a[0] = b[0] = _EMPTY  # (the runs' columns are no longer referenced, unless a caller holds them)
        order = np.argsort(ids, kind="stable")  # two sorted runs: a linear merge
        merged = [ids[order]]
        del ids
        for j in (1, 2):
            col = np.concatenate((a[j], b[j]))
            a[j] = b[j] = _EMPTY
            merged.append(col[order])
            del col
        self._runs.append((merged[0], merged[1], merged[2]))

    def compact(self) -> tuple[_I64, _I64, _I64]:
        """Merge every run into one; return it (ids, check values, origins in key order)."""
        while len(self._runs) > 1:
            self._merge_last_two()
        if not self._runs:
            return _EMPTY, _EMPTY, _EMPTY
        return self._runs[0]

    def drop_front(self, n: int) -> None:
        """Forget the ``n`` smallest keys."""
        if n <= 0:
            return
        ids, chks, origins = self.compact()
        if n >= len(ids):
            self._runs = []
            self._dropped_view = 0
        elif self._dropped_view + n >= len(ids) - n:  # half of what the arrays hold is gone: copy, free the rest
            cols = [ids, chks, origins]
            del ids, chks, origins
            self._runs = []
            for j in range(3):  # a column at a time, each old one let go once copied
                cols[j] = cols[j][n:].copy()
            self._runs = [(cols[0], cols[1], cols[2])]
            self._dropped_view = 0
        else:  # views: the dropped keys' memory stays until the copy above (or the last key goes)
            self._runs = [(ids[n:], chks[n:], origins[n:])]
            self._dropped_view += n
        self._n = max(0, self._n - n)

    def find(self, keys: _I64) -> tuple[NDArray[np.bool_], _I64, _I64]:
        """For each key: whether it is held, and if so its check value and origin (else 0 and -1)."""
        found = np.zeros(len(keys), dtype=bool)
        chk = np.zeros(len(keys), dtype=np.int64)
        org = np.full(len(keys), -1, dtype=np.int64)
        for ids, c, o in self._runs:
            at = np.searchsorted(ids, keys)
            inside = at < len(ids)
            hit = np.zeros(len(keys), dtype=bool)
            hit[inside] = ids[at[inside]] == keys[inside]
            chk[hit] = c[at[hit]]
            org[hit] = o[at[hit]]
            found |= hit
        return found, chk, org
