"""The REST API (docs/contract.md, under ``/api/v1``) and Prometheus ``/metrics``.

It reads the hot store through a read-only connection, so it serves while the processor writes.
A bad parameter is a 400 naming it (:mod:`fieldmesh.api.params`); the OpenAPI document describes
every answer; the docs page (Swagger UI) is served from assets in the installed package, offline.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fieldmesh import __version__
from fieldmesh.api.params import (
    BAD_PARAMETER,
    STORE_UNAVAILABLE,
    ErrorBody,
    check_device,
    check_metric,
    check_reason,
    device_query,
    metric_query,
    parse_time,
    reason_query,
    time_query,
)
from fieldmesh.api.schemas import DeadLetterRow, DeviceRow, Health, RawRow, RollupRow, Stats
from fieldmesh.core.codec import REASONS
from fieldmesh.core.errors import ConfigError, FieldmeshError
from fieldmesh.core.topics import DEVICE_ID_RE
from fieldmesh.store import HotStore, load_store

__all__ = ["create_app", "parse_time"]

Limit = Annotated[int, Query(ge=1, le=100_000, description="at most this many rows")]
Device = Annotated[str | None, device_query()]
Metric = Annotated[str | None, metric_query()]
HealthFn = Callable[[], Awaitable[dict[str, Any]]]
LagFn = Callable[[], Awaitable[dict[str, int]]]
PartitionLagFn = Callable[[], Awaitable[dict[str, dict[int, int]]]]


class _StoreCollector(Collector):
    def __init__(self, store: HotStore, lag_cache: dict[str, int],
                 partition_cache: dict[str, dict[int, int]]) -> None:
        self.store = store
        self.lag_cache = lag_cache
        self.partition_cache = partition_cache

    def collect(self) -> Iterator[Any]:
        st = self.store.stats()
        for name, value, help_ in (
            ("fieldmesh_readings_received", st.received, "Readings and payloads that reached the pipeline"),
            ("fieldmesh_readings_stored", st.stored, "Readings stored (first arrival of each identity)"),
            ("fieldmesh_readings_duplicates", st.duplicates, "Readings dropped as duplicates of a stored one"),
            ("fieldmesh_readings_late", st.late, "Stored readings whose window had already been emitted"),
            ("fieldmesh_messages_unrouted", st.unrouted, "Messages on topics nothing serves (DLQ unknown_topic)"),
        ):
            c = CounterMetricFamily(name, help_)
            c.add_metric([], value)
            yield c
        dl = CounterMetricFamily("fieldmesh_dead_letters", "Rejected items by reason", labels=["reason"])
        for reason in sorted(set(REASONS) | set(st.dead_lettered)):
            dl.add_metric([reason], st.dead_lettered.get(reason, 0))
        yield dl
        # a gauge: it falls when late readings fill a gap
        gaps = GaugeMetricFamily("fieldmesh_seq_gaps", "Seqs missing between readings stored, per device and boot")
        gaps.add_metric([], st.gaps)
        yield gaps
        lag = GaugeMetricFamily("fieldmesh_bus_lag_messages", "Messages not yet consumed", labels=["stage"])
        for stage, n in self.lag_cache.items():
            lag.add_metric([stage], n)
        yield lag
        plag = GaugeMetricFamily("fieldmesh_bus_partition_lag_messages", "Messages not yet consumed per partition",
                                 labels=["stage", "partition"])
        for stage, parts in self.partition_cache.items():
            for p, n in sorted(parts.items()):
                plag.add_metric([stage, str(p)], n)
        yield plag
        summary = self.store.device_summary()
        last = summary.last_seen_ms
        g = GaugeMetricFamily("fieldmesh_devices", "Devices seen")
        g.add_metric([], summary.devices)
        yield g
        if last:
            f = GaugeMetricFamily("fieldmesh_freshness_seconds", "Seconds since the newest stored reading arrived")
            f.add_metric([], max(0.0, time.time() - last / 1000))
            yield f


def create_app(
    store_url: str,
    *,
    health: HealthFn | None = None,
    lag: LagFn | None = None,
    partition_lag: PartitionLagFn | None = None,
    store: HotStore | None = None,
) -> FastAPI:
    """Build the API app over the hot store at ``store_url``.

    ``lag`` gives each stage's total lag, ``partition_lag`` the lag per stage and partition.
    """
    # FastAPIOffline: a FastAPI whose Swagger UI page loads its JS/CSS from the package, not a CDN
    app = FastAPIOffline(
        title="fieldmesh",
        version=__version__,
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
        static_url="/api/v1/docs/static",
        swagger_ui_oauth2_redirect_url="/api/v1/docs/oauth2-redirect",
        swagger_ui_parameters={"validatorUrl": None},  # the default validator badge calls swagger.io
    )
    state: dict[str, Any] = {"store": store}
    lag_cache: dict[str, int] = {}
    partition_cache: dict[str, dict[int, int]] = {}

    def get_store() -> HotStore:
        if state["store"] is None:
            try:
                state["store"] = load_store(store_url, readonly=True)
            except FieldmeshError as exc:
                raise HTTPException(503, f"store not ready: {exc}") from None
        s: HotStore = state["store"]
        return s

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'] if p != 'query')}: {e['msg']}" for e in exc.errors()
        ]
        return JSONResponse(status_code=400, content={"detail": "; ".join(problems), "errors": problems})

    @app.exception_handler(ConfigError)
    async def _config_error(request: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    r = APIRouter(prefix="/api/v1", responses=STORE_UNAVAILABLE)
    _device = check_device

    @r.get("/health", response_model=None, responses={
        200: {"model": Health}, 503: {"model": Health, "description": "degraded: the failing components say why"}})
    async def get_health() -> JSONResponse:
        comps: dict[str, Any] = {}
        ok = True
        try:
            get_store().stats()
            comps["store"] = "ok"
        except Exception as exc:
            comps["store"] = f"error: {exc}"
            ok = False
        if health is not None:
            extra = await health()
            comps.update(extra)
            ok = ok and all(v == "ok" for v in extra.values() if isinstance(v, str))
        body = {"status": "ok" if ok else "degraded", "version": __version__, **comps}
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @r.get("/stats", response_model=None, responses={200: {"model": Stats}})
    async def get_stats() -> dict[str, Any]:
        st = get_store().stats()
        body: dict[str, Any] = {
            "received": st.received,
            "stored": st.stored,
            "duplicates": st.duplicates,
            "late": st.late,
            "unrouted": st.unrouted,
            "dead_lettered": {"total": sum(st.dead_lettered.values()), **st.dead_lettered},
            "gaps": st.gaps,
        }
        if lag is not None:
            lag_cache.update(await lag())
            body["lag"] = dict(lag_cache)
        if partition_lag is not None:
            partition_cache.update(await partition_lag())
            body["lag_partitions"] = {stage: {str(p): n for p, n in sorted(parts.items())}
                                      for stage, parts in partition_cache.items()}
        return body

    @r.get("/devices", response_model=None, responses={200: {"model": list[DeviceRow]}})
    def get_devices() -> list[dict[str, Any]]:
        return get_store().devices()

    @r.get("/devices/{device_id}", response_model=None, responses={
        200: {"model": DeviceRow}, **BAD_PARAMETER, 404: {"model": ErrorBody, "description": "no such device"}})
    def get_device(device_id: Annotated[str, Path(pattern=f"^{DEVICE_ID_RE.pattern}$")]) -> dict[str, Any]:
        rows = get_store().devices(_device(device_id))
        if not rows:
            raise HTTPException(404, f"no device {device_id!r}")
        return rows[0]

    @r.get("/telemetry/raw", response_model=None, responses={200: {"model": list[RawRow]}, **BAD_PARAMETER})
    def get_raw(
        device_id: Device = None, metric: Metric = None,
        start: Annotated[str | None, time_query("readings at or after")] = None,
        end: Annotated[str | None, time_query("readings before")] = None, limit: Limit = 1000,
    ) -> list[dict[str, Any]]:
        return get_store().raw(device_id=_device(device_id), metric=check_metric(metric),
                               start_ms=parse_time(start, "start"), end_ms=parse_time(end, "end"), limit=limit)

    @r.get("/telemetry/rollups", response_model=None, responses={200: {"model": list[RollupRow]}, **BAD_PARAMETER})
    def get_rollups(
        device_id: Device = None, metric: Metric = None,
        interval: Literal["1m", "1h"] = "1m",
        start: Annotated[str | None, time_query("windows starting at or after")] = None,
        end: Annotated[str | None, time_query("windows starting before")] = None,
        limit: Limit = 10_000,
    ) -> list[dict[str, Any]]:
        return get_store().rollups(interval=interval, device_id=_device(device_id), metric=check_metric(metric),
                                   start_ms=parse_time(start, "start"), end_ms=parse_time(end, "end"), limit=limit)

    @r.get("/dlq", response_model=None, responses={200: {"model": list[DeadLetterRow]}, **BAD_PARAMETER})
    def get_dlq(reason: Annotated[str | None, reason_query()] = None, limit: Limit = 100) -> list[dict[str, Any]]:
        return get_store().dlq(reason=check_reason(reason), limit=limit)

    @r.get("/alerts", responses={
        **BAD_PARAMETER, 501: {"model": ErrorBody, "description": "alert rules are not part of this release"}})
    def get_alerts(
        device_id: Device = None, since: Annotated[str | None, time_query("alerts since")] = None
    ) -> JSONResponse:
        _device(device_id)
        parse_time(since, "since")
        return JSONResponse(status_code=501, content={"detail": "alert rules are not part of this release yet"})

    app.include_router(r)

    registry = CollectorRegistry()
    collector: _StoreCollector | None = None

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text exposition format",
              "content": {"text/plain": {"schema": {"type": "string"}}}}, **STORE_UNAVAILABLE})
    async def metrics() -> Response:
        nonlocal collector
        if collector is None:
            collector = _StoreCollector(get_store(), lag_cache, partition_cache)
            registry.register(collector)
        if lag is not None:
            lag_cache.update(await lag())
        if partition_lag is not None:
            partition_cache.update(await partition_lag())
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        """The OpenAPI document without FastAPI's 422 answers: a bad parameter is a 400 here."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for ops in doc.get("paths", {}).values():
                for op in ops.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                doc.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
