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


class RecentKeys:
    """Keys with their check value and origin (-1: none), as sorted runs."""

    def __init__(self) -> None:
        self._runs: list[tuple[_I64, _I64, _I64]] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def clear(self) -> None:
        self._runs = []
        self._n = 0

    def add(self, ids: _I64, chks: _I64, origins: _I64) -> None:
        """Add keys not held yet (the caller looked them up first)."""
        if not len(ids):
            return
        order = np.argsort(ids, kind="stable")
        self._runs.append((ids[order], chks[order], origins[order]))
        self._n += len(ids)
        while len(self._runs) > 1 and 2 * len(self._runs[-1][0]) >= len(self._runs[-2][0]):
            (a_id, a_chk, a_org), (b_id, b_chk, b_org) = self._runs[-2], self._runs[-1]
            ids_ = np.concatenate((a_id, b_id))
            order = np.argsort(ids_, kind="stable")  # two sorted runs: a linear merge
            self._runs[-2:] = [(ids_[order], np.concatenate((a_chk, b_chk))[order],
                                np.concatenate((a_org, b_org))[order])]

    def compact(self) -> tuple[_I64, _I64, _I64]:
        """Merge every run into one; return it (ids, check values, origins in key order)."""
        if len(self._runs) > 1:
            ids = np.concatenate([r[0] for r in self._runs])
            order = np.argsort(ids, kind="stable")
            self._runs = [(ids[order], np.concatenate([r[1] for r in self._runs])[order],
                           np.concatenate([r[2] for r in self._runs])[order])]
        if not self._runs:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, empty
        return self._runs[0]

    def drop_front(self, n: int) -> None:
        """Forget the ``n`` smallest keys."""
        if n <= 0:
            return
        ids, chks, origins = self.compact()
        self._runs = [(ids[n:], chks[n:], origins[n:])] if n < len(ids) else []
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
