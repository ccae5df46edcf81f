"""The REST API (CONTRACT.md, under ``/api/v1``) and Prometheus ``/metrics``.

It reads the hot store through a read-only connection, so it serves while the processor writes.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fieldmesh import __version__
from fieldmesh.core.codec import REASONS
from fieldmesh.core.errors import ConfigError, FieldmeshError
from fieldmesh.core.topics import DEVICE_ID_RE
from fieldmesh.store import HotStore, load_store

__all__ = ["create_app", "parse_time"]

Limit = Annotated[int, Query(ge=1, le=100_000)]
HealthFn = Callable[[], Awaitable[dict[str, Any]]]
LagFn = Callable[[], Awaitable[dict[str, int]]]


def parse_time(value: str | None, name: str) -> int | None:
    """Parse an RFC 3339 string or epoch milliseconds; a clear 400 otherwise."""
    if value is None or value == "":
        return None
    v = value.strip()
    if v.lstrip("-").isdigit():
        return int(v)
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00") if v.endswith("Z") else v)
    except ValueError:
        raise HTTPException(
            400, f"'{name}' must be RFC 3339 (2025-01-31T12:00:00Z) or epoch ms, got {value!r}"
        ) from None
    if dt.tzinfo is None:
        raise HTTPException(400, f"'{name}' needs a UTC offset (e.g. a trailing Z)")
    return int(dt.timestamp() * 1000)


class _StoreCollector(Collector):
    def __init__(self, store: HotStore, lag: LagFn | None, lag_cache: dict[str, int]) -> None:
        self.store = store
        self.lag_cache = lag_cache

    def collect(self) -> Iterator[Any]:
        st = self.store.stats()
        for name, value, help_ in (
            ("fieldmesh_readings_received", st.received, "Readings and payloads that reached the pipeline"),
            ("fieldmesh_readings_stored", st.stored, "Readings stored (first arrival of each identity)"),
            ("fieldmesh_readings_duplicates", st.duplicates, "Readings dropped as duplicates of a stored one"),
            ("fieldmesh_readings_late", st.late, "Stored readings whose window had already been emitted"),
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
        rows = self.store.query("SELECT max(last_seen_ms), count(*) FROM devices").rows
        last, n_dev = rows[0] if rows else (None, 0)
        g = GaugeMetricFamily("fieldmesh_devices", "Devices seen")
        g.add_metric([], n_dev or 0)
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
    store: HotStore | None = None,
) -> FastAPI:
    """Build the API app over the hot store at ``store_url``."""
    app = FastAPI(
        title="fieldmesh",
        version=__version__,
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
    )
    state: dict[str, Any] = {"store": store}
    lag_cache: dict[str, int] = {}

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
        return JSONResponse(status_code=422, content={"detail": "; ".join(problems), "errors": problems})

    @app.exception_handler(ConfigError)
    async def _config_error(request: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    r = APIRouter(prefix="/api/v1")

    def _device(device_id: str | None) -> str | None:
        if device_id is not None and not DEVICE_ID_RE.fullmatch(device_id):
            raise HTTPException(400, f"device_id {device_id[:140]!r} is not 1-128 chars of [A-Za-z0-9_-]")
        return device_id

    @r.get("/health")
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

    @r.get("/stats")
    async def get_stats() -> dict[str, Any]:
        st = get_store().stats()
        body: dict[str, Any] = {
            "received": st.received,
            "stored": st.stored,
            "duplicates": st.duplicates,
            "late": st.late,
            "dead_lettered": {"total": sum(st.dead_lettered.values()), **st.dead_lettered},
            "gaps": st.gaps,
        }
        if lag is not None:
            lag_cache.update(await lag())
            body["lag"] = dict(lag_cache)
        return body

    @r.get("/devices")
    def get_devices() -> list[dict[str, Any]]:
        return get_store().devices()

    @r.get("/devices/{device_id}")
    def get_device(device_id: str) -> dict[str, Any]:
        rows = get_store().devices(_device(device_id))
        if not rows:
            raise HTTPException(404, f"no device {device_id!r}")
        return rows[0]

    @r.get("/telemetry/raw")
    def get_raw(
        device_id: str | None = None, metric: str | None = None, start: str | None = None,
        end: str | None = None, limit: Limit = 1000,
    ) -> list[dict[str, Any]]:
        return get_store().raw(device_id=_device(device_id), metric=metric, start_ms=parse_time(start, "start"),
                               end_ms=parse_time(end, "end"), limit=limit)

    @r.get("/telemetry/rollups")
    def get_rollups(
        device_id: str | None = None, metric: str | None = None,
        interval: Literal["1m", "1h"] = "1m", start: str | None = None, end: str | None = None,
        limit: Limit = 10_000,
    ) -> list[dict[str, Any]]:
        return get_store().rollups(interval=interval, device_id=_device(device_id), metric=metric,
                                   start_ms=parse_time(start, "start"), end_ms=parse_time(end, "end"), limit=limit)

    @r.get("/dlq")
    def get_dlq(reason: str | None = None, limit: Limit = 100) -> list[dict[str, Any]]:
        return get_store().dlq(reason=reason, limit=limit)

    @r.get("/alerts")
    def get_alerts(device_id: str | None = None, since: str | None = None) -> JSONResponse:
        return JSONResponse(status_code=501, content={"detail": "alert rules are not part of this release yet"})

    app.include_router(r)

    registry = CollectorRegistry()
    collector: _StoreCollector | None = None

    @app.get("/metrics")
    async def metrics() -> Response:
        nonlocal collector
        if collector is None:
            collector = _StoreCollector(get_store(), lag, lag_cache)
            registry.register(collector)
        if lag is not None:
            lag_cache.update(await lag())
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
