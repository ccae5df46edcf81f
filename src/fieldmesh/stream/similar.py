"""Similar windows across the fleet: nearest feature rows of a view, by exact brute force (docs/features.md).

A window's vector is its feature row's values in a fixed feature order (the view's feature names, sorted),
each feature z-normalized (minus its mean, over its standard deviation, across the rows indexed); a
feature absent from a row, or NaN, is 0 after normalization (the mean). Similarity is the Euclidean
distance between vectors.

Why brute force and not an ANN index: it is exact (an ANN index returns approximate neighbours and needs
tuning per data set), the data is small (1,000,000 windows x 20 features in float32 is 80 MB), and one
query is one matrix-vector product over it, tens of milliseconds on one core, which meets an interactive
budget without a build step, a dependency or a recall figure to explain. The index takes rows
incrementally; the normalization (means, deviations) is recomputed, with every vector, when the number of
rows has grown by 10% since the last time or new features appear, so its cost is amortized.

Pure numpy, no I/O: :mod:`fieldmesh.api.features_similar` feeds it the offline store's rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from fieldmesh.stream.pointintime import FeatureRows

__all__ = ["Match", "SimilarResult", "SimilarityIndex"]

_GROW: Final = 1.1  # renormalize every vector when the rows grew by this factor


@dataclass(frozen=True, slots=True)
class Match:
    """One similar window."""

    entity: str
    window_end_ms: int
    known_at_ms: int
    version: int
    distance: float


@dataclass(frozen=True, slots=True)
class SimilarResult:
    """The query window (the entity's row known at ts) and its nearest windows, nearest first."""

    query: Match
    matches: list[Match]
    searched: int  # candidate windows compared


class SimilarityIndex:
    """Window vectors of one view, searchable by exact nearest neighbours (see the module docstring)."""

    def __init__(self, view: str, *, capacity: int = 1024) -> None:
        self.view = view
        self.names: list[str] = []
        self._col: dict[str, int] = {}
        self._entities: list[str] = []
        self._code: dict[str, int] = {}
        self.n = 0
        self._cap = 0
        self._raw = np.empty((0, 0), np.float32)  # values, NaN where absent
        self._z = np.empty((0, 0), np.float32)
        self._norm = np.empty(0, np.float32)
        self._ent = np.empty(0, np.int32)
        self._end = np.empty(0, np.int64)
        self._known = np.empty(0, np.int64)
        self._ver = np.empty(0, np.int64)
        self._mu = np.empty(0, np.float64)
        self._inv_sd = np.empty(0, np.float64)
        self._normalized_at = 0  # rows when the normalization was computed (0: to compute)
        self._reserve(capacity, 0)

    def __len__(self) -> int:
        return self.n

    def _reserve(self, rows: int, cols: int) -> None:
        """Room for ``rows`` rows (capacity doubles); the stored rows and vectors are kept."""
        if rows <= self._cap:
            return
        cap = max(rows, self._cap * 2, 16)
        for name, fill in (("_raw", np.nan), ("_z", 0.0)):
            old = getattr(self, name)
            new = np.full((cap, cols), fill, np.float32)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)
        for name in ("_norm", "_ent", "_end", "_known", "_ver"):
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype)
            new[: self.n] = old[: self.n]
            setattr(self, name, new)
        self._cap = cap

    def add(self, rows: FeatureRows) -> int:
        """Index ``rows`` (of this view; the caller passes each row once); return how many were added."""
        m = len(rows)
        if not m:
            return 0
        new_names = sorted(set(rows.names) - set(self._col))
        if new_names:  # columns in sorted order again: move the stored values to their new columns
            self.names = sorted([*self.names, *new_names])
            old_cols = [self.names.index(x) for x in self._col]
            raw = np.full((self._cap, len(self.names)), np.nan, np.float32)
            raw[:, old_cols] = self._raw
            self._raw = raw
            self._z = np.zeros(raw.shape, np.float32)
            self._col = {x: i for i, x in enumerate(self.names)}
            self._normalized_at = 0
        self._reserve(self.n + m, len(self.names))
        cols = [self._col[x] for x in rows.names]
        block = np.where(rows.present, rows.values, np.nan).astype(np.float32)
        sl = slice(self.n, self.n + m)
        self._raw[sl] = np.nan
        self._raw[sl, cols] = block
        for e in set(rows.entity.tolist()) - set(self._code):
            self._code[e] = len(self._entities)
            self._entities.append(e)
        self._ent[sl] = np.fromiter((self._code[e] for e in rows.entity.tolist()), np.int32, count=m)
        self._end[sl] = rows.window_end_ms
        self._known[sl] = rows.known_at_ms
        self._ver[sl] = rows.version
        self.n += m
        if not self._normalized_at or self.n > self._normalized_at * _GROW:
            self._normalize(slice(0, self.n), refit=True)
        else:
            self._normalize(sl, refit=False)
        return m

    def refit(self) -> None:
        """Recompute the normalization from every row now indexed, and every vector."""
        if self.n:
            self._normalize(slice(0, self.n), refit=True)

    def _normalize(self, sl: slice, *, refit: bool) -> None:
        if refit:
            raw = self._raw[: self.n].astype(np.float64)
            finite = np.isfinite(raw)
            cnt = finite.sum(axis=0)
            x = np.where(finite, raw, 0.0)
            mu = x.sum(axis=0) / np.maximum(cnt, 1)
            var = np.where(finite, (raw - mu) ** 2, 0.0).sum(axis=0) / np.maximum(cnt, 1)
            sd = np.sqrt(var)
            self._mu = mu
            self._inv_sd = np.where(sd > 0, 1.0 / np.where(sd > 0, sd, 1.0), 0.0)
            self._normalized_at = self.n
        block = self._raw[sl].astype(np.float64)
        z = np.where(np.isfinite(block), (block - self._mu) * self._inv_sd, 0.0).astype(np.float32)
        self._z[sl] = z
        self._norm[sl] = np.einsum("ij,ij->i", z, z)

    def known_row(self, entity: str, ts_ms: int) -> int | None:
        """The entity's row known at ``ts_ms`` (largest (window_end, version) with known_at <= ts), or None."""
        code = self._code.get(entity)
        if code is None:
            return None
        idx = np.flatnonzero((self._ent[: self.n] == code) & (self._known[: self.n] <= ts_ms))
        if not len(idx):
            return None
        best = np.lexsort((self._ver[idx], self._end[idx]))[-1]
        return int(idx[best])

    def _match(self, i: int, d2: float) -> Match:
        return Match(self._entities[int(self._ent[i])], int(self._end[i]), int(self._known[i]), int(self._ver[i]),
                     float(np.sqrt(max(d2, 0.0))))

    def similar(self, entity: str, ts_ms: int, k: int, *, same_entity: bool = False) -> SimilarResult | None:
        """The ``k`` windows nearest to the entity's window known at ``ts_ms``, among windows known at
        ``ts_ms`` (of other entities unless ``same_entity``); None when nothing is known for the entity."""
        qi = self.known_row(entity, ts_ms)
        if qi is None:
            return None
        n = self.n
        z = self._z[:n]
        q = z[qi]
        d2 = self._norm[:n] - 2.0 * (z @ q) + self._norm[qi]
        cand = self._known[:n] <= ts_ms
        if same_entity:
            cand[qi] = False
        else:
            cand &= self._ent[:n] != self._ent[qi]
        searched = int(cand.sum())
        d2 = np.where(cand, d2, np.inf)
        k = min(k, searched)
        if k <= 0:
            return SimilarResult(self._match(qi, 0.0), [], searched)
        top = np.argpartition(d2, k - 1)[:k] if k < n else np.arange(n)
        top = top[np.lexsort((top, d2[top]))][:k]
        return SimilarResult(self._match(qi, 0.0), [self._match(int(i), float(d2[i])) for i in top], searched)

    def vectors(self, idx: Sequence[int] | NDArray[np.intp]) -> NDArray[np.float32]:
        """The normalized vectors of rows ``idx`` (tests, explanations)."""
        return self._z[np.asarray(idx, dtype=np.intp)].copy()
