"""``GET /api/v1/features/similar?view=&entity=&ts=&k=``: the k past windows across the fleet most similar to an
entity's window known at ``ts`` (docs/features.md, "Similar windows").

One in-memory :class:`~fieldmesh.stream.similar.SimilarityIndex` per view, filled from the offline store's
feature rows (the hot store's ``feature_rows``) on the first query and brought up to date incrementally:
at most every ``refresh_s``, the rows known since the newest one indexed minus ``slack_ms`` are read and
those not indexed yet are added (a row can become visible a little after rows known later than it, e.g.
from another processor; ``slack_ms`` covers that). Included before the ``/{entity}`` route of
:mod:`fieldmesh.api.features`, which would otherwise take ``similar`` as an entity.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Final

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from fieldmesh.api.params import parse_time
from fieldmesh.core.errors import FieldmeshError
from fieldmesh.store.base import HotStore
from fieldmesh.store.offline import StoreRow, feature_rows_from_store, store_rows_since
from fieldmesh.stream.similar import Match, SimilarityIndex, SimilarResult

__all__ = ["SimilarWindows", "similar_router"]

_REFRESH_S: Final = 2.0
_SLACK_MS: Final = 10 * 60_000


class SimilarWindow(BaseModel):
    """One window: an entity's feature row."""

    entity: str
    window_end: str = Field(description="end of the window (ISO 8601, UTC)")
    known_at: str = Field(description="when the row became known (ISO 8601, UTC)")
    version: int
    distance: float = Field(description="Euclidean distance of the z-normalized feature vectors (0 for the query)")


class SimilarAnswer(BaseModel):
    """``GET /api/v1/features/similar``."""

    view: str
    entity: str
    ts: str
    features: list[str] = Field(description="the vector's features, in order")
    query: SimilarWindow
    matches: list[SimilarWindow] = Field(description="nearest first")
    searched: int = Field(description="windows compared (known at ts, of other entities unless same_entity)")
    indexed: int = Field(description="windows in the view's index")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _window(m: Match) -> dict[str, Any]:
    return {"entity": m.entity, "window_end": _iso(m.window_end_ms), "known_at": _iso(m.known_at_ms),
            "version": m.version, "distance": m.distance}


class SimilarWindows:
    """The per-view indexes and their incremental refresh from the hot store's ``feature_rows``."""

    def __init__(self, get_store: Callable[[], HotStore], *, refresh_s: float = _REFRESH_S,
                 slack_ms: int = _SLACK_MS) -> None:
        self.get_store = get_store
        self.refresh_s = refresh_s
        self.slack_ms = slack_ms
        self.indexes: dict[str, SimilarityIndex] = {}
        self._lock = threading.Lock()
        self._newest = -(2**62)  # newest known_at indexed
        self._recent: dict[tuple[str, str, int, int], int] = {}  # rows that a refresh can read again: known_at
        self._refreshed = 0.0
        self.rows_indexed = 0

    def refresh(self, *, force: bool = False) -> int:
        """Index the rows not indexed yet; return how many were added."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._refreshed < self.refresh_s:
                return 0
            since = self._newest - self.slack_ms
            try:
                rows = store_rows_since(self.get_store(), since)
            except FieldmeshError:  # no feature_rows table: features never ran on this store
                rows = []
            self._refreshed = time.monotonic()
            fresh: dict[str, list[StoreRow]] = {}
            recent = self._recent
            for r in rows:  # (view, entity, window_start, window_end, known_at, version, values JSON)
                key = (r[0], r[1], r[3], r[5])
                if key in recent:
                    continue
                recent[key] = r[4]
                fresh.setdefault(r[0], []).append(r)
                self._newest = max(self._newest, r[4])
            for view, got in fresh.items():
                index = self.indexes.setdefault(view, SimilarityIndex(view))
                index.add(feature_rows_from_store(view, got))
            added = sum(len(g) for g in fresh.values())
            self.rows_indexed += added
            cut = self._newest - self.slack_ms  # rows known before it are never read again
            if len(self._recent) > 2 * sum(1 for t in self._recent.values() if t >= cut) + 10_000:
                self._recent = {k: t for k, t in self._recent.items() if t >= cut}
            return added

    def similar(self, view: str, entity: str, ts_ms: int, k: int, *, same_entity: bool) -> SimilarResult | None:
        """:meth:`~fieldmesh.stream.similar.SimilarityIndex.similar` of the view (KeyError: no such view)."""
        with self._lock:
            return self.indexes[view].similar(entity, ts_ms, k, same_entity=same_entity)


def similar_router(*, reader: Any, get_store: Callable[[], HotStore], enabled: bool,
                   refresh_s: float = _REFRESH_S) -> APIRouter:
    """The ``/api/v1/features/similar`` route (404 when features are off)."""
    r = APIRouter(prefix="/api/v1/features", tags=["features"])
    service = SimilarWindows(get_store, refresh_s=refresh_s)

    @r.get("/similar", response_model=SimilarAnswer, responses={
        400: {"description": "bad parameter"},
        404: {"description": "features are off, no such view, or nothing known for the entity at ts"}})
    async def get_similar(
        view: Annotated[str, Query(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                   description="the feature view whose rows are the vectors")],
        entity: Annotated[str, Query(min_length=1, max_length=256, description="the query window's entity")],
        ts: Annotated[str | None, Query(description="as of this time (RFC 3339 or epoch ms; default now): the "
                                                    "entity's window known then, compared with windows known then")
                      ] = None,
        k: Annotated[int, Query(ge=1, le=1000, description="how many windows")] = 10,
        same_entity: Annotated[bool, Query(description="also return the entity's own other windows")] = False,
        _: Any = reader,
    ) -> dict[str, Any]:
        if not enabled:
            raise HTTPException(404, "features are off (start with --features FILE)")
        at = parse_time(ts, "ts")
        at = int(time.time() * 1000) if at is None else at
        await run_in_threadpool(service.refresh)
        index = service.indexes.get(view)
        if index is None:
            raise HTTPException(404, f"no feature rows of view {view!r}")
        res = await run_in_threadpool(lambda: service.similar(view, entity, at, k, same_entity=same_entity))
        if res is None:
            raise HTTPException(404, f"no window of {entity!r} in view {view!r} known at {_iso(at)}")
        return {"view": view, "entity": entity, "ts": _iso(at), "features": index.names, "query": _window(res.query),
                "matches": [_window(m) for m in res.matches], "searched": res.searched, "indexed": len(index)}

    return r
