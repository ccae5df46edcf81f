"""``GET /api/v1/features/{entity}?views=a,b``: the online feature values of one entity (docs/features.md).

Reads the online store (Redis or the embedded SQLite, :func:`fieldmesh.store.features.load_online_store`),
opened on first use. A view without a value (never computed, or older than its TTL) is ``null``; a
feature whose window had no value (a rate over one reading) is ``null`` in ``values``. Readers need a
viewer credential for every device (an entity may be an asset or a site spanning devices).

Routes with a fixed segment under ``/api/v1/features/`` (such as ``/similar``) must be included before this
router, else ``{entity}`` takes them.

The route is on the serving path of models (docs/features.md, "Latency"): it reads Redis on the event loop
(:meth:`~fieldmesh.store.features.RedisOnlineStore.aget_many`, no worker thread) and answers bytes encoded
once by msgspec (:func:`~fieldmesh.store.features.encode_answer`): the JSON that :class:`EntityFeatures`
describes in the OpenAPI document, without building and validating the pydantic models for each request.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.responses import Response
from prometheus_client.core import CounterMetricFamily
from pydantic import BaseModel, Field

from fieldmesh.core.errors import BackendError, FieldmeshError
from fieldmesh.store.base import HotStore
from fieldmesh.store.features import FeatureTables, OnlineStore, encode_answer, load_online_store
from fieldmesh.stream.featureviews import FeatureRow

__all__ = ["FeatureCollector", "features_router", "row_json"]

_VIEWS = r"^[A-Za-z_][A-Za-z0-9_]*(,[A-Za-z_][A-Za-z0-9_]*)*$"


class FeatureValues(BaseModel):
    """One view's latest row for the entity."""

    window_start: str = Field(description="start of the view's largest window (ISO 8601, UTC)")
    window_end: str = Field(description="end of the windows (ISO 8601, UTC)")
    known_at: str = Field(description="arrival time of the reading that made the row final (ISO 8601, UTC)")
    version: int
    values: dict[str, float | None] = Field(description="{metric__agg__size: value}")


class EntityFeatures(BaseModel):
    """``GET /api/v1/features/{entity}``."""

    entity: str
    views: dict[str, FeatureValues | None]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def row_json(row: FeatureRow) -> dict[str, Any]:
    """A feature row as the API returns it (as a dict; the route encodes it with
    :func:`~fieldmesh.store.features.encode_answer`)."""
    return {"window_start": _iso(row.window_start_ms), "window_end": _iso(row.window_end_ms),
            "known_at": _iso(row.known_at_ms), "version": row.version,
            "values": {k: (v if math.isfinite(v) else None) for k, v in sorted(row.values.items())}}


def features_router(online_url: str | None, *, reader: Any, get_store: Callable[[], HotStore]) -> APIRouter:
    """The feature routes over the online store at ``online_url`` (None: features are off, 404)."""
    r = APIRouter(prefix="/api/v1/features", tags=["features"])
    lock = threading.Lock()
    opened: list[OnlineStore] = []

    def online() -> OnlineStore:
        if online_url is None:
            raise HTTPException(404, "features are off (start with --features FILE)")
        with lock:
            if not opened:
                try:
                    opened.append(load_online_store(online_url))
                except FieldmeshError as exc:
                    raise HTTPException(503, f"online store not ready: {exc}") from None
            return opened[0]

    @r.get("/{entity}", response_model=EntityFeatures, responses={
        400: {"description": "bad parameter"}, 404: {"description": "features are off"},
        503: {"description": "online store unavailable"}})
    async def get_features(
        entity: Annotated[str, Path(min_length=1, max_length=256)],
        views: Annotated[str, Query(min_length=1, max_length=4096, pattern=_VIEWS,
                                    description="comma-separated view names, e.g. pump_stats,site_temp")],
        _: Any = reader,
    ) -> Response:
        names = list(dict.fromkeys(views.split(",")))
        store = online()
        try:
            got = await store.aget_many(entity, names)
        except BackendError as exc:
            raise HTTPException(503, f"online store: {exc}") from None
        # a Response is sent as it is: response_model above documents it (and the tests hold the two equal)
        return Response(encode_answer(entity, got), media_type="application/json")

    return r


class FeatureCollector:
    """Prometheus counters of the feature stage, from its durable counters in the hot store."""

    def __init__(self, get_store: Callable[[], HotStore]) -> None:
        self.get_store = get_store

    def collect(self) -> Iterator[Any]:
        try:
            st = FeatureTables.stats(self.get_store())
        except Exception:
            return
        if st is None:
            return
        for key, name, help_ in (
            ("rows_written", "fieldmesh_feature_rows_written", "Feature rows committed (feature_rows)"),
            ("online_write_failures", "fieldmesh_feature_online_write_failures",
             "Online feature store writes that failed (rows kept and written again)"),
            ("late", "fieldmesh_feature_late", "Readings x metrics x window sizes too late for an emitted window"),
            ("unkeyed", "fieldmesh_feature_unkeyed", "Readings without the enriched field a view is keyed by"),
        ):
            c = CounterMetricFamily(name, help_)
            c.add_metric([], st[key])
            yield c
