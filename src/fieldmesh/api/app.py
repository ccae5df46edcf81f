"""The REST API (docs/contract.md, under ``/api/v1``) and Prometheus ``/metrics``.

It reads the hot store through a read-only connection, so it serves while the processor writes.
Every route but ``/health`` depends on a guard (:func:`create_app`'s ``need``) that authenticates the
caller and checks its role and device groups (:mod:`fieldmesh.api.auth`, docs/security.md), or, for
:data:`DEVICE_ROUTES` (provisioning), on one that checks the device's proof in the request body;
``create_app`` refuses to build an app with an unguarded route.
A bad parameter is a 400 naming it (:mod:`fieldmesh.api.params`); the OpenAPI document describes
every answer; the docs page (Swagger UI) is served from assets in the installed package, offline.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path as FsPath
from typing import Annotated, Any, Final, Literal, TypeVar

from fastapi import APIRouter, Body, FastAPI, HTTPException, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute

from fieldmesh import __version__
from fieldmesh.api.auth import Access, AuthError, Principal, basic_token
from fieldmesh.api.console import add_console_routes, page_ids, sort_devices
from fieldmesh.api.features import FeatureCollector, features_router
from fieldmesh.api.features_similar import similar_router
from fieldmesh.api.jobs import add_job_routes
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
from fieldmesh.api.provision import DEVICE_ROUTES, ProvisionService, add_provision_routes
from fieldmesh.api.schema_registry import CONTENT_TYPE as REGISTRY_CONTENT_TYPE
from fieldmesh.api.schema_registry import PREFIX as REGISTRY_PREFIX
from fieldmesh.api.schema_registry import RegistryResponse, error_body, registry_router
from fieldmesh.api.schemas import (
    AlertDetail,
    AlertRow,
    AlertRuleRow,
    AlertStep,
    AuditRow,
    DeadLetterRow,
    DeviceImported,
    DevicePatch,
    DeviceRecord,
    DeviceRow,
    Health,
    ImportRejectedBody,
    KeyRow,
    NewDevice,
    NewKey,
    NewKeyRow,
    NotificationRow,
    RawRow,
    RollupRow,
    Stats,
    WhoAmI,
)
from fieldmesh.api.twins import TwinCollector, TwinStoreHolder, twins_router
from fieldmesh.control.provision import Provisioner
from fieldmesh.core.codec import REASONS
from fieldmesh.core.errors import (
    BackendError,
    ConfigError,
    ConflictError,
    FieldmeshError,
    NotFoundError,
    PermissionDenied,
    RowsRejected,
)
from fieldmesh.core.settings import LakeSettings
from fieldmesh.core.topics import DEVICE_ID_RE
from fieldmesh.obs.metrics import (
    AuthCollector,
    DoorCollector,
    FreshnessCollector,
    StoreCollector,
    multiprocess_collector,
)
from fieldmesh.schema.base import RegistryError
from fieldmesh.schema.registry import SchemaRegistry
from fieldmesh.store import HotStore, load_store
from fieldmesh.store.access import GROUP_RE
from fieldmesh.store.alerts import AlertTables
from fieldmesh.store.features import FeatureTables
from fieldmesh.store.jobs import JobStore
from fieldmesh.store.products import ProductTables
from fieldmesh.store.registry import Device as RegisteredDevice
from fieldmesh.store.registry import DeviceRegistry
from fieldmesh.store.tiers import TieredReads, retention_state
from fieldmesh.stream.alerts import RuleError, parse_rule

__all__ = ["DEVICE_ROUTES", "OPEN_ROUTES", "create_app", "parse_time"]

#: Routes served without credentials: liveness probes cannot carry a token. An unauthenticated
#: caller gets only ``status`` and ``version``; the components (which may quote log lines) need a viewer.
OPEN_ROUTES: Final = frozenset({"/api/v1/health"})
_BEARER = HTTPBearer(auto_error=False, scheme_name="bearer", bearerFormat="API key (fmk_...) or JWT",
                     description="Authorization: Bearer <an API key fmk_... or a JWT of the OpenID Connect issuer>")
_API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey",
                        description="X-API-Key: <an API key fmk_...>")
# what Confluent's schema registry clients send (basic.auth.user.info): docs/schemas.md
_BASIC = HTTPBasic(auto_error=False, scheme_name="basic",
                   description="HTTP Basic: user <key id> and password <the key's secret>, or any user and the "
                               "whole key fmk_... as the password")

Limit = Annotated[int, Query(ge=1, le=100_000, description="at most this many rows")]
#: The largest import file ``POST /devices/import`` takes.
MAX_IMPORT_BYTES: Final = 8 * 1024 * 1024
_IMPORT_EXAMPLE: Final = ("device_id,groups,tags,status,attr.site\n"
                           "pump-7,plant-1;west,fw:1.2,active,north\nvalve-2,plant-1,,suspended,\n")
#: The store's part of the row of a registered device that has not sent yet.
_UNSEEN: Final[dict[str, Any]] = {"first_seen": None, "last_seen": None, "first_ts": None, "last_ts": None,
                                  "readings": 0, "metrics": [], "gaps": 0}
Device = Annotated[str | None, device_query()]
DevicePath = Annotated[str, Path(pattern=f"^{DEVICE_ID_RE.pattern}$")]
Metric = Annotated[str | None, metric_query()]
RuleName = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
AlertId = Annotated[int, Path(ge=1, le=2**62)]
RuleBody = Annotated[dict[str, Any], Body(openapi_examples={"threshold": {"value": {
    "name": "hot", "kind": "threshold", "metric": "temperature", "op": ">", "value": 30, "clear_value": 28,
    "for_s": 0, "severity": "major", "devices": "pump-*", "notify": [{"webhook": "http://127.0.0.1:9000/hook"}]}}})]
# the values of stream.alerts.SEVERITIES
Severity = Annotated[Literal["info", "warning", "minor", "major", "critical"] | None, Query()]
DeviceSort = Literal["device_id", "-device_id", "last_seen", "-last_seen", "readings", "-readings", "status",
                     "-status", "gaps", "-gaps"]
HealthFn = Callable[[], Awaitable[dict[str, Any]]]
LagFn = Callable[[], Awaitable[dict[str, int]]]
PartitionLagFn = Callable[[], Awaitable[dict[str, dict[int, int]]]]


def _auth_failures(access: Access) -> dict[str, int]:
    """``auth_failures`` of ``/stats``: the total and each reason."""
    counts = dict(access.failures)
    return {"total": sum(counts.values()), **counts}


def create_app(
    store_url: str,
    *,
    health: HealthFn | None = None,
    lag: LagFn | None = None,
    partition_lag: PartitionLagFn | None = None,
    store: HotStore | None = None,
    access: Access | None = None,
    ca_dir: FsPath | None = None,
    provisioner: Provisioner | None = None,
    schema_registry: SchemaRegistry | None = None,
    door_refused: Callable[[], dict[str, int]] | None = None,
    metrics_dir: FsPath | None = None,
    collectors: Sequence[Collector] = (),
    online_url: str | None = None,
    twin_stats: Callable[[], dict[str, Any] | None] | None = None,
    lake: tuple[LakeSettings, FsPath] | None = None,
) -> FastAPI:
    """Build the API app over the hot store at ``store_url``.

    ``lag`` gives each stage's total lag, ``partition_lag`` the lag per stage and partition.
    ``access`` authenticates callers; by default API keys in the same store, in local-only mode
    (the caller binds the API to loopback; beyond it, pass ``Access(..., local_only=False)``).
    ``ca_dir`` (or ``provisioner``) serves provisioning (:mod:`fieldmesh.api.provision`); the app's
    ``state.provision`` holds it, for the caller to close.
    ``schema_registry``: the schema registry (by default opened on first use over the same store).
    ``door_refused`` gives what the MQTT door refused by reason (``fieldmesh up``:
    :class:`fieldmesh.runtime.doorlog.DoorRefusals`), served in ``/stats`` and ``/metrics``.
    ``metrics_dir``: the directory where the stage workers write their metrics (prometheus-client's
    multiprocess mode, :mod:`fieldmesh.obs.metrics`), merged into ``/metrics``; ``collectors`` are served
    there too (the SLO status of ``fieldmesh up``).
    ``twin_stats`` gives the twin service's counters (``twins`` in ``/stats``, ``fieldmesh_twin_*`` metrics).
    ``lake``: the lake's settings and data dir; the raw and rollup reads then reach below the hot store's
    retention cut into the lake (:class:`fieldmesh.store.tiers.TieredReads`).
    """
    acc = access if access is not None else Access(store_url)
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
    state: dict[str, Any] = {"store": store, "schema_registry": schema_registry}
    lag_cache: dict[str, int] = {}
    jobs_holder: list[JobStore] = []

    def job_store() -> JobStore:  # opened on first use, like the schema registry
        if not jobs_holder:
            jobs_holder.append(JobStore(store_url))
        return jobs_holder[0]

    partition_cache: dict[str, dict[int, int]] = {}

    def get_store() -> HotStore:
        if state["store"] is None:
            try:
                state["store"] = load_store(store_url, readonly=True)
            except FieldmeshError as exc:
                raise HTTPException(503, f"store not ready: {exc}") from None
        s: HotStore = state["store"]
        return s

    def get_reads() -> HotStore | TieredReads:
        """The raw and rollup reads: across the tiers when there is a lake."""
        store = get_store()
        if lake is None:
            return store
        reads: TieredReads | None = state.get("tiers")
        if reads is None or reads.store is not store:
            settings, lake_dir = lake

            def catalog() -> Any:
                from fieldmesh.store.lake import open_catalog

                return open_catalog(settings, lake_dir)

            reads = state["tiers"] = TieredReads(store, open_catalog=catalog, namespace=settings.namespace)
        return reads

    def get_schema_registry() -> SchemaRegistry:
        if state["schema_registry"] is None:
            from fieldmesh.store.schemas import SchemaStore

            state["schema_registry"] = SchemaRegistry(SchemaStore(store_url))
        reg: SchemaRegistry = state["schema_registry"]
        return reg

    def _schema_registry_path(request: Request) -> bool:
        return request.url.path.startswith(REGISTRY_PREFIX + "/")

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'] if p != 'query')}: {e['msg']}" for e in exc.errors()
        ]
        if _schema_registry_path(request):  # Confluent's clients read error_code and message
            code = 42201 if any(e["loc"][:1] == ("body",) for e in exc.errors()) else 42202 if any(
                e["loc"][-1:] == ("version",) for e in exc.errors()) else 400
            status = 422 if code != 400 else 400
            return RegistryResponse(status_code=status, content={**error_body(status, code, "; ".join(problems)),
                                                                 "errors": problems})
        return JSONResponse(status_code=400, content={"detail": "; ".join(problems), "errors": problems})

    @app.exception_handler(RegistryError)
    async def _schema_registry_error(request: Request, exc: RegistryError) -> JSONResponse:
        return RegistryResponse(status_code=exc.status, content=error_body(exc.status, exc.error_code, exc.message))

    @app.exception_handler(BackendError)
    async def _backend_error(request: Request, exc: BackendError) -> JSONResponse:
        return JSONResponse(status_code=503, content={**error_body(503, 50001, str(exc)), "detail": str(exc)})

    @app.exception_handler(ConfigError)
    async def _config_error(request: Request, exc: ConfigError) -> JSONResponse:
        return JSONResponse(status_code=400, content={"detail": str(exc)})

    @app.exception_handler(ConflictError)
    async def _conflict(request: Request, exc: ConflictError) -> JSONResponse:
        return JSONResponse(status_code=409, content={"detail": str(exc)})

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse(status_code=404, content={"detail": str(exc)})

    @app.exception_handler(PermissionDenied)
    async def _denied(request: Request, exc: PermissionDenied) -> JSONResponse:
        acc.count_failure("wrong_group")  # a change reaching beyond the caller's device groups
        return JSONResponse(status_code=403, content={"detail": str(exc)})

    @app.exception_handler(RowsRejected)
    async def _rows(request: Request, exc: RowsRejected) -> JSONResponse:
        return JSONResponse(status_code=422, content={
            "detail": str(exc), "errors": [{"line": n, "message": m} for n, m in exc.errors]})

    @app.exception_handler(BackendError)
    async def _backend(request: Request, exc: BackendError) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": f"store unavailable: {exc}"})

    routes: list[APIRoute] = []  # every operation, for the Allow header of a 405

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # name every method of the path, not only those of the first route matched
            path = request.url.path
            matched = [rt for rt in routes if rt.path_regex.match(path)]
            # the path's own routes: /devices/import is not /devices/{device_id}, though both match it
            fewest = min((rt.path.count("{") for rt in matched), default=0)
            allowed = sorted({m for rt in matched if rt.path.count("{") == fewest for m in (rt.methods or ())})
            headers["Allow"] = ", ".join(allowed)
        if _schema_registry_path(request):
            code = exc.status_code * 100 + 1 if exc.status_code in (401, 403, 404) else exc.status_code
            return RegistryResponse(status_code=exc.status_code, headers=headers,
                                    content=error_body(exc.status_code, code, str(exc.detail)))
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=headers)

    guards: set[Any] = set()

    def need(role: str, *, every_device: bool = False) -> Any:
        """A dependency: the caller, authenticated, holding ``role`` (401 or 403 otherwise).

        ``every_device``: the answer spans all devices (counts, dead letters), so a caller limited
        to device groups is refused (403) rather than shown other groups' data.
        """

        async def guard(
            bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
            api_key: Annotated[str | None, Security(_API_KEY)],
            basic: Annotated[HTTPBasicCredentials | None, Security(_BASIC)],
        ) -> Principal:
            token = api_key or (bearer.credentials if bearer is not None else None)
            if token is None and basic is not None:
                token = basic_token(basic.username, basic.password)
            p = await _authenticate(token)
            if not p.may(role):
                acc.count_failure("wrong_role")
                raise HTTPException(403, f"this needs the {role} role; {p.subject} has "
                                         f"{p.role or 'no fieldmesh role'}")
            if every_device and p.groups is not None:
                acc.count_failure("wrong_group")
                raise HTTPException(403, "this answer spans every device: it needs a credential not limited "
                                         f"to device groups ({p.subject} is limited to {', '.join(p.groups)})")
            return p

        guards.add(guard)
        return Security(guard)

    async def _authenticate(token: str | None) -> Principal:
        try:
            if acc.checks_locally(token):  # a primary-key read of a local SQLite file: no thread hop
                return acc.authenticate(token)
            return await run_in_threadpool(acc.authenticate, token)
        except AuthError as exc:
            if exc.status != 401:
                raise HTTPException(exc.status, exc.detail) from None
            acc.count_failure(exc.reason)
            challenge = 'Bearer realm="fieldmesh"' + (', error="invalid_token"' if exc.invalid_token else "")
            raise HTTPException(401, exc.detail, headers={"WWW-Authenticate": challenge}) from None

    def visible(p: Principal, device_id: str | None) -> str | None:
        """``device_id`` if the caller may see it (else 404, as for a device that does not exist);
        no device_id is all devices, which a caller limited to groups may not ask for (403)."""
        if device_id is None:
            if p.groups is not None:
                acc.count_failure("wrong_group")
                raise HTTPException(403, f"{p.subject} is limited to device groups ({', '.join(p.groups)}): "
                                         "name a device_id")
            return None
        if not acc.groups.sees(p, device_id):
            raise HTTPException(404, f"no device {device_id!r}")
        return device_id

    # defaults, not Annotated aliases: FastAPI cannot resolve a local alias under postponed annotations
    viewer, all_devices, admin = need("viewer"), need("viewer", every_device=True), need("admin")
    operator = need("operator")
    operator_all = need("operator", every_device=True)  # rules apply to every device

    r = APIRouter(prefix="/api/v1", responses=STORE_UNAVAILABLE)
    _device = check_device

    @r.get("/health", response_model=None, description=(
        "Open without credentials (liveness probes): `status` and `version`. With a viewer credential (or in "
        "local-only mode) also one entry per component."), responses={
        200: {"model": Health}, 503: {"model": Health, "description": "degraded: the failing components say why"}})
    async def get_health(
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
        api_key: Annotated[str | None, Security(_API_KEY)],
    ) -> JSONResponse:
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
        body: dict[str, Any] = {"status": "ok" if ok else "degraded", "version": __version__}
        token = api_key or (bearer.credentials if bearer is not None else None)
        try:
            if (await run_in_threadpool(acc.authenticate, token)).may("viewer"):
                body.update(comps)
        except AuthError:
            pass  # open to probes: the status alone
        return JSONResponse(status_code=200 if ok else 503, content=body)

    @r.get("/stats", response_model=None, responses={200: {"model": Stats}})
    async def get_stats(_: Principal = all_devices) -> dict[str, Any]:
        st = get_store().stats()
        body: dict[str, Any] = {
            "received": st.received,
            "stored": st.stored,
            "duplicates": st.duplicates,
            "late": st.late,
            "unrouted": st.unrouted,
            "dead_lettered": {"total": sum(st.dead_lettered.values()), **st.dead_lettered},
            "gaps": st.gaps,
            "auth_failures": _auth_failures(acc),
        }
        if door_refused is not None:
            refused = await run_in_threadpool(door_refused)
            body["door_refused"] = {"total": sum(refused.values()), **refused}
        if twin_stats is not None:
            body["twins"] = await run_in_threadpool(twin_stats)
        if lag is not None:
            lag_cache.update(await lag())
            body["lag"] = dict(lag_cache)
        try:
            body["alerts"] = await run_in_threadpool(lambda: alert_tables().stats())
        except BackendError:
            body["alerts"] = None
        try:
            body["jobs_controller"] = await run_in_threadpool(lambda: job_store().controller_stats())
        except FieldmeshError:
            body["jobs_controller"] = None
        body["features"] = await run_in_threadpool(lambda: FeatureTables.stats(get_store()))
        if retention := await run_in_threadpool(retention_state, get_store()):
            body["retention"] = retention
        if partition_lag is not None:
            partition_cache.update(await partition_lag())
            body["lag_partitions"] = {stage: {str(p): n for p, n in sorted(parts.items())}
                                      for stage, parts in partition_cache.items()}
        return body

    def devreg() -> DeviceRegistry:
        return acc.registry

    def _all_registered() -> list[RegisteredDevice]:
        reg, out, after = devreg(), [], None
        while page := reg.list(after=after, limit=10_000):
            out.extend(page)
            after = page[-1].id
        return out

    def device_row(device_id: str, seen: dict[str, Any] | None, dev: RegisteredDevice | None) -> dict[str, Any]:
        """A device's row: what the store has seen of it, merged with its registry entry (``dev``; None:
        not registered, so in the groups the patterns give it)."""
        row: dict[str, Any] = {"device_id": device_id, **(seen or _UNSEEN)}
        if dev is not None:
            row.update({**dev.as_dict(), "registered": True})
        else:
            groups = acc.groups.pattern_groups(device_id)
            row.update({"registered": False, "status": None, "groups": list(groups), "tags": [],
                        "attributes": {}, "created_ms": None, "updated_ms": None})
        return row

    def check_change(p: Principal) -> Any:
        return lambda old, new: acc.groups.check_change(p, old, new)

    @r.get("/devices", response_model=None, responses={200: {"model": list[DeviceRow]}, **BAD_PARAMETER},
           description=(
               "Every device seen or registered, by id: the store's counts merged with the registry's status, "
               "groups, tags and attributes. A caller limited to device groups sees its groups' devices only."))
    def get_devices(
        response: Response,
        status: Annotated[Literal["active", "suspended", "retired"] | None, Query(
            description="registered devices of this status only")] = None,
        group: Annotated[str | None, Query(pattern=f"^{GROUP_RE.pattern}$", description=(
            "devices of this group only (the registry's groups; the patterns' for devices not registered)"))] = None,
        registered: Annotated[bool | None, Query(description="registered (true) or unregistered (false) only")] = None,
        q: Annotated[str | None, Query(max_length=128, description="device ids containing this text only")] = None,
        sort: Annotated[DeviceSort, Query(description="order by this field; a leading - for descending")] = "device_id",
        limit: Annotated[int | None, Query(ge=1, le=100_000, description=(
            "at most this many rows (the total is in the X-Total-Count header)"))] = None,
        offset: Annotated[int, Query(ge=0, description="skip this many rows first")] = 0,
        p: Principal = viewer,
    ) -> list[dict[str, Any]]:
        if limit is not None and status is None and sort.lstrip("-") in ("device_id", "last_seen"):
            # one page: choose its ids from two cheap maps, then build only its rows
            def keep(device_id: str, is_registered: bool, groups: tuple[str, ...]) -> bool:
                if registered is not None and is_registered != registered:
                    return False
                gs = groups if is_registered else acc.groups.pattern_groups(device_id)
                return (p.groups is None or not set(p.groups).isdisjoint(gs)) and (group is None or group in gs)

            total, ids = page_ids(devreg().group_map(), get_store().last_seen(), q=q, sort=sort, offset=offset,
                                  limit=limit, keep=keep)
            response.headers["X-Total-Count"] = str(total)
            return [device_row(i, next(iter(get_store().devices(i)), None), devreg().get(i)) for i in ids]
        seen = {d["device_id"]: d for d in get_store().devices()}
        devs = {d.id: d for d in _all_registered()}
        rows = []
        for device_id in sorted(set(devs) | set(seen)):
            if q is not None and q not in device_id:
                continue
            dev = devs.get(device_id)
            if registered is not None and (dev is not None) != registered:
                continue
            if status is not None and (dev is None or dev.status != status):
                continue
            row = device_row(device_id, seen.get(device_id), dev)
            if p.groups is not None and set(p.groups).isdisjoint(row["groups"]):
                continue
            if group is not None and group not in row["groups"]:
                continue
            rows.append(row)
        if sort != "device_id":
            rows = sort_devices(rows, sort)
        response.headers["X-Total-Count"] = str(len(rows))
        return rows[offset:offset + limit if limit is not None else None]

    not_found_device: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "no such device"}}

    @r.get("/devices/{device_id}", response_model=None, responses={
        200: {"model": DeviceRow}, **BAD_PARAMETER, **not_found_device})
    def get_device(device_id: DevicePath, p: Principal = viewer) -> dict[str, Any]:
        visible(p, _device(device_id))
        rows = get_store().devices(device_id)
        dev = devreg().get(device_id)
        if not rows and dev is None:
            raise HTTPException(404, f"no device {device_id!r}")
        return device_row(device_id, rows[0] if rows else None, dev)

    @r.post("/devices", status_code=201, response_model=None, description=(
        "Register a device (operator). A caller limited to device groups registers devices in its groups only."),
        responses={201: {"model": DeviceRow}, **BAD_PARAMETER,
                   409: {"model": ErrorBody, "description": "the device id is registered already"}})
    def post_device(body: Annotated[NewDevice, Body()], p: Principal = operator) -> dict[str, Any]:
        dev = devreg().add(body.device_id, groups=body.groups, tags=body.tags, attributes=body.attributes,
                             status=body.status, actor=p.subject, authorize=check_change(p))
        rows = get_store().devices(dev.id)
        return device_row(dev.id, rows[0] if rows else None, dev)

    @r.patch("/devices/{device_id}", response_model=None, description=(
        "Change a registered device (operator): status, groups and tags replaced, attributes merged "
        "(a null value removes one). Retire a device with `{\"status\": \"retired\"}`."),
        responses={200: {"model": DeviceRow}, **BAD_PARAMETER, **not_found_device})
    def patch_device(device_id: DevicePath, body: Annotated[DevicePatch, Body()],
                     p: Principal = operator) -> dict[str, Any]:
        visible(p, _device(device_id))
        dev = devreg().update(device_id, status=body.status, groups=body.groups, tags=body.tags,
                                attributes_patch=body.attributes, actor=p.subject, authorize=check_change(p))
        rows = get_store().devices(dev.id)
        return device_row(dev.id, rows[0] if rows else None, dev)

    @r.delete("/devices/{device_id}", response_model=None, description=(
        "Remove a device from the registry (admin) and revoke its certificates; the audit log keeps what it "
        "was, and readings stored stay. Answers the entry removed. To keep a device listed but out of "
        "service, PATCH its status to retired instead."),
        responses={200: {"model": DeviceRecord}, **BAD_PARAMETER, **not_found_device})
    def delete_device(device_id: DevicePath, p: Principal = admin) -> dict[str, Any]:
        visible(p, _device(device_id))
        return devreg().delete(device_id, actor=p.subject, authorize=check_change(p)).as_dict()

    @r.post("/devices/import", response_model=None, description=(
        "Register devices, or change registered ones, from a CSV file (operator; docs/registry.md): header "
        "`device_id,groups,tags,status,attr.<name>...`, groups and tags separated by `;`. All or nothing: "
        "a bad row refuses the whole file (422, every bad line named)."),
        openapi_extra={"requestBody": {"required": True, "content": {"text/csv": {
            "schema": {"type": "string", "maxLength": MAX_IMPORT_BYTES, "examples": [_IMPORT_EXAMPLE]},
            "example": _IMPORT_EXAMPLE}}}},
        responses={200: {"model": DeviceImported}, **BAD_PARAMETER,
                   413: {"model": ErrorBody, "description": f"larger than {MAX_IMPORT_BYTES} bytes"},
                   415: {"model": ErrorBody, "description": "not text/csv"},
                   422: {"model": ImportRejectedBody, "description": "bad rows: nothing imported"}})
    async def import_devices(request: Request, p: Principal = operator) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in ("text/csv", "text/plain"):
            raise HTTPException(415, f"send the file as text/csv, not {ctype or 'no content type'}")
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_IMPORT_BYTES:
                raise HTTPException(413, f"the file is larger than {MAX_IMPORT_BYTES} bytes: split it")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HTTPException(400, f"the file is not UTF-8: {exc}") from None
        counts: dict[str, Any] = await run_in_threadpool(devreg().import_csv, text, actor=p.subject,
                                                         authorize=check_change(p))
        return counts

    @r.get("/telemetry/raw", response_model=None, responses={200: {"model": list[RawRow]}, **BAD_PARAMETER})
    def get_raw(
        device_id: Device = None, metric: Metric = None,
        start: Annotated[str | None, time_query("readings at or after")] = None,
        end: Annotated[str | None, time_query("readings before")] = None, limit: Limit = 1000,
        p: Principal = viewer,
    ) -> list[dict[str, Any]]:
        return get_reads().raw(device_id=visible(p, _device(device_id)), metric=check_metric(metric),
                               start_ms=parse_time(start, "start"), end_ms=parse_time(end, "end"), limit=limit)

    @r.get("/telemetry/rollups", response_model=None, responses={200: {"model": list[RollupRow]}, **BAD_PARAMETER})
    def get_rollups(
        device_id: Device = None, metric: Metric = None,
        interval: Literal["1m", "1h"] = "1m",
        start: Annotated[str | None, time_query("windows starting at or after")] = None,
        end: Annotated[str | None, time_query("windows starting before")] = None,
        limit: Limit = 10_000,
        p: Principal = viewer,
    ) -> list[dict[str, Any]]:
        return get_reads().rollups(interval=interval, device_id=visible(p, _device(device_id)),
                                   metric=check_metric(metric), start_ms=parse_time(start, "start"),
                                   end_ms=parse_time(end, "end"), limit=limit)

    @r.get("/dlq", response_model=None, responses={200: {"model": list[DeadLetterRow]}, **BAD_PARAMETER})
    def get_dlq(reason: Annotated[str | None, reason_query()] = None, limit: Limit = 100,
                _: Principal = all_devices) -> list[dict[str, Any]]:
        return get_store().dlq(reason=check_reason(reason), limit=limit)

    def alert_tables() -> AlertTables:
        return acc.alerts

    def rule_of(body: Any, name: str | None = None) -> Any:
        if name is not None and isinstance(body, dict) and body.setdefault("name", name) != name:
            raise HTTPException(400, f"the body's name {body['name']!r} is not the path's {name!r}")
        for k in ("source", "updated_ms", "updated_by"):  # what GET answers may be sent back as it is
            if isinstance(body, dict):
                body.pop(k, None)
        try:
            return parse_rule(body)
        except RuleError as exc:
            raise HTTPException(400, f"bad rule: {exc}" + (f" (field {exc.field})" if exc.field else "")) from None

    no_rule: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "no such rule"}}
    no_alert: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "no such alert"}}

    @r.get("/rules", response_model=None, responses={200: {"model": list[AlertRuleRow]}})
    def get_rules(_: Principal = viewer) -> list[dict[str, Any]]:
        return alert_tables().rules()

    @r.get("/rules/{name}", response_model=None, responses={200: {"model": AlertRuleRow}, **BAD_PARAMETER,
                                                            **no_rule})
    def get_rule(name: RuleName, _: Principal = viewer) -> dict[str, Any]:
        return alert_tables().rule(name)

    @r.post("/rules", status_code=201, response_model=None, description=(
        "Add an alert rule (operator; docs/alerts.md). Processors apply it from their next batch."),
        responses={201: {"model": AlertRuleRow}, **BAD_PARAMETER,
                   409: {"model": ErrorBody, "description": "a rule of that name exists (PUT changes it)"}})
    def post_rule(body: RuleBody, p: Principal = operator_all
                  ) -> dict[str, Any]:
        return alert_tables().put_rule(rule_of(body), actor=p.subject, create=True)

    @r.put("/rules/{name}", response_model=None, description=(
        "Add or replace the rule `name` (operator). Its state per device is kept when the kind is unchanged."),
        responses={200: {"model": AlertRuleRow}, **BAD_PARAMETER})
    def put_rule(name: RuleName, body: RuleBody,
                 p: Principal = operator_all) -> dict[str, Any]:
        return alert_tables().put_rule(rule_of(body, name), actor=p.subject)

    @r.delete("/rules/{name}", status_code=204, description=(
        "Remove a rule (operator). Its alerts stay, for operators to clear; its state goes."),
        responses={**BAD_PARAMETER, **no_rule})
    def delete_rule(name: RuleName, p: Principal = operator_all) -> Response:
        alert_tables().delete_rule(name, actor=p.subject)
        return Response(status_code=204)

    @r.get("/alerts", response_model=None, description=(
        "Alerts, newest first. A caller limited to device groups names a device_id."),
        responses={200: {"model": list[AlertRow]}, **BAD_PARAMETER})
    def get_alerts(
        device_id: Device = None, since: Annotated[str | None, time_query("alerts opened at or after")] = None,
        state_: Annotated[Literal["open", "acknowledged", "cleared", "active"] | None, Query(
            alias="state", description="active: open or acknowledged")] = None,
        rule: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = None,
        severity: Severity = None,
        limit: Limit = 1000,
        p: Principal = viewer,
    ) -> list[dict[str, Any]]:
        dev = visible(p, _device(device_id))
        rows = alert_tables().alerts(state=None if state_ == "active" else state_, device_id=dev, rule=rule,
                                     severity=severity, since_ms=parse_time(since, "since"), limit=limit)
        if state_ == "active":
            rows = [a for a in rows if a["state"] != "cleared"]
        return rows

    @r.get("/alerts/notifications", response_model=None, description=(
        "The notification outbox, newest first: `failed` ones were not delivered after every try and are kept."),
        responses={200: {"model": list[NotificationRow]}, **BAD_PARAMETER})
    def get_notifications(
        status: Annotated[Literal["pending", "delivered", "failed"] | None, Query()] = None, limit: Limit = 1000,
        _: Principal = all_devices,
    ) -> list[dict[str, Any]]:
        return alert_tables().notifications(status=status, limit=limit)

    def visible_alert(p: Principal, alert_id: int) -> dict[str, Any]:
        a = alert_tables().alert(alert_id)
        if p.groups is not None and not acc.groups.sees(p, a["device_id"]):
            raise HTTPException(404, f"no alert {alert_id}")
        return a

    @r.get("/alerts/{alert_id}", response_model=None,
           responses={200: {"model": AlertDetail}, **BAD_PARAMETER, **no_alert})
    def get_alert(alert_id: AlertId, p: Principal = viewer) -> dict[str, Any]:
        return visible_alert(p, alert_id)

    conflict_step: dict[int | str, dict[str, Any]] = {
        409: {"model": ErrorBody, "description": "the alert is acknowledged or cleared already"}}

    @r.post("/alerts/{alert_id}/ack", response_model=None, description=(
        "Acknowledge an open alert (operator), with an optional note; notified like every step."),
        responses={200: {"model": AlertDetail}, **BAD_PARAMETER, **no_alert, **conflict_step})
    def ack_alert(alert_id: AlertId, body: Annotated[AlertStep | None, Body()] = None,
                  p: Principal = operator) -> dict[str, Any]:
        visible_alert(p, alert_id)
        return alert_tables().ack(alert_id, actor=p.subject, note=body.note if body else None)

    @r.post("/alerts/{alert_id}/clear", response_model=None, description=(
        "Clear an alert by hand (operator). It opens again only once its condition has cleared and returned."),
        responses={200: {"model": AlertDetail}, **BAD_PARAMETER, **no_alert, **conflict_step})
    def clear_alert(alert_id: AlertId, body: Annotated[AlertStep | None, Body()] = None,
                    p: Principal = operator) -> dict[str, Any]:
        visible_alert(p, alert_id)
        return alert_tables().clear(alert_id, actor=p.subject, note=body.note if body else None)

    @r.get("/whoami", response_model=None, responses={200: {"model": WhoAmI}})
    def get_whoami(p: Principal = viewer) -> dict[str, Any]:
        return {"subject": p.subject, "role": p.role, "groups": None if p.groups is None else list(p.groups),
                "local_only": p.subject == "local"}

    not_found: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "no such key"}}

    @r.get("/keys", response_model=None, responses={200: {"model": list[KeyRow]}})
    def get_keys(_: Principal = admin) -> list[dict[str, Any]]:
        return [k.as_dict() for k in acc.store.list_keys()]

    @r.post("/keys", status_code=201, response_model=None,
            responses={201: {"model": NewKeyRow, "description": "the key, shown this once"}, **BAD_PARAMETER})
    def post_key(body: Annotated[NewKey, Body()], p: Principal = admin) -> dict[str, Any]:
        key, secret = acc.store.create_key(role=body.role, groups=body.groups, name=body.name, actor=p.subject)
        return {**key.as_dict(), "key": secret}

    @r.delete("/keys/{key_id}", response_model=None,
              responses={200: {"model": KeyRow}, **BAD_PARAMETER, **not_found})
    def delete_key(key_id: Annotated[str, Path(pattern="^[0-9a-f]{12}$")], p: Principal = admin) -> dict[str, Any]:
        try:
            return acc.store.revoke_key(key_id, actor=p.subject).as_dict()
        except ConfigError:
            raise HTTPException(404, f"no API key {key_id!r}") from None

    @r.get("/audit", response_model=None, responses={200: {"model": list[AuditRow]}, **BAD_PARAMETER})
    def get_audit(since: Annotated[str | None, time_query("actions at or after")] = None,
                  limit: Limit = 100, _: Principal = admin) -> list[dict[str, Any]]:
        return [e.as_dict() for e in acc.store.audit_log(since_ms=parse_time(since, "since"), limit=limit)]

    registry = CollectorRegistry()
    app.state.provision = ProvisionService(store_url, ca_dir, provisioner)
    add_provision_routes(app, r, admin=admin, guards=guards, service=app.state.provision, metrics=registry)
    add_job_routes(r, store=job_store, registry=devreg, viewer=all_devices, operator=operator_all)

    add_console_routes(
        app, r, get_store=get_store, stats=get_stats, visible=visible, viewer=viewer, all_devices=all_devices,
        active_alerts=lambda p, dev: get_alerts(device_id=dev, state_="active", limit=100_000, p=p),
        registered_ids=lambda: list(devreg().group_map()))
    # the online features first: models' serving path, matched before the other ~90 routes (the OpenAPI
    # document still lists them after the registry's, _documented)
    app.include_router(similar_router(reader=all_devices, get_store=get_store, enabled=online_url is not None))
    app.include_router(features_router(online_url, reader=all_devices, get_store=get_store))
    app.include_router(r)
    app.state.twins = TwinStoreHolder(store_url)
    app.include_router(twins_router(app.state.twins, viewer=viewer, operator=operator, visible=visible))
    app.include_router(registry_router(get_schema_registry, viewer=viewer, operator=operator, admin=admin))
    # data products and their quality (docs/products.md)
    from fieldmesh.api.products import products_router
    from fieldmesh.obs.quality import QualityCollector

    get_products = _opened_once(lambda: ProductTables(store_url), state, "products")
    app.include_router(products_router(get_products, viewer=all_devices, operator=operator_all))
    registry.register(QualityCollector(get_products))
    from fieldmesh.api.canaries import canaries_router  # canary routing (docs/canary.md)
    from fieldmesh.store.canary import CanaryTables

    app.include_router(canaries_router(_opened_once(lambda: CanaryTables(store_url), state, "canaries"), store_url,
                                       viewer=all_devices, operator=operator_all))
    from fieldmesh.api.lineage import lineage_router
    from fieldmesh.store.lineage import LineageTables

    app.include_router(lineage_router(_opened_once(lambda: LineageTables(store_url), state, "lineage"), get_store,
                                      viewer=all_devices))

    registry.register(AuthCollector(lambda: acc.failures))
    registry.register(FeatureCollector(get_store))
    if door_refused is not None:
        registry.register(DoorCollector(door_refused))
    if metrics_dir is not None:
        multiprocess_collector(registry, metrics_dir)
    for extra in collectors:
        registry.register(extra)
    if twin_stats is not None:
        registry.register(TwinCollector(twin_stats))
    collector: StoreCollector | None = None

    @app.get("/metrics", response_class=PlainTextResponse, responses={
        200: {"description": "Prometheus text exposition format",
              "content": {"text/plain": {"schema": {"type": "string"}}}}, **STORE_UNAVAILABLE})
    async def metrics(_: Principal = all_devices) -> Response:
        nonlocal collector
        if collector is None:
            collector = StoreCollector(get_store(), lag_cache, partition_cache, alert_tables, reasons=REASONS,
                                       retention=retention_state)
            registry.register(collector)
            registry.register(FreshnessCollector(get_store().last_seen))
        if lag is not None:
            lag_cache.update(await lag())
        if partition_lag is not None:
            partition_cache.update(await partition_lag())
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        """The OpenAPI document without FastAPI's 422 answers: a bad parameter is a 400 here (422 is only
        a CSV import whose rows are refused)."""
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=_documented(app.routes))
            for path, ops in doc.get("paths", {}).items():
                for op in ops.values():
                    answers = op.get("responses", {})
                    if "HTTPValidationError" in str(answers.get("422", "")):  # FastAPI's, not one we answer
                        answers.pop("422")
                    if path in OPEN_ROUTES or path in DEVICE_ROUTES:
                        op.pop("security", None)  # open, or the device's proof is in the body
                    if op.get("security"):
                        if acc.oidc is not None:
                            op["security"].append({"oidc": []})
                        op["responses"].update(_AUTH_RESPONSES)
                    if path.startswith(REGISTRY_PREFIX + "/"):
                        _both_content_types(op)
            if acc.oidc is not None:
                doc["components"]["securitySchemes"]["oidc"] = {
                    "type": "openIdConnect", "openIdConnectUrl": acc.oidc.discovery_url}
            for name in ("HTTPValidationError", "ValidationError"):
                doc.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    routes.extend(rt for rt in [*r.routes, *app.routes] if isinstance(rt, APIRoute))
    _check_guarded(routes, guards)
    return app


T = TypeVar("T")


def _documented(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """The routes in the OpenAPI document's order: the feature routes, served first (:func:`create_app`), are
    listed after the schema registry's, where they always were."""
    def path(rt: BaseRoute) -> str:  # a route's path, or an included router's prefix (FastAPI >= 0.16x)
        return str(getattr(rt, "path", None) or getattr(getattr(rt, "original_router", None), "prefix", ""))

    def features(rt: BaseRoute) -> bool:
        return path(rt).startswith("/api/v1/features")

    rest = [rt for rt in routes if not features(rt)]
    at = max((i + 1 for i, rt in enumerate(rest) if path(rt).startswith(REGISTRY_PREFIX)), default=len(rest))
    return [*rest[:at], *(rt for rt in routes if features(rt)), *rest[at:]]


def _opened_once(open_: Callable[[], T], state: dict[str, Any], key: str) -> Callable[[], T]:
    """``open_()`` on the first call, kept in ``state[key]`` (closed with the app's other handles)."""
    lock = threading.Lock()

    def get() -> T:
        with lock:
            if state.get(key) is None:
                state[key] = open_()
            got: T = state[key]
            return got

    return get


_AUTH_RESPONSES: Final = {
    "401": {"description": "no credential, or an invalid, expired or revoked one (WWW-Authenticate: Bearer)",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}},
    "403": {"description": "the caller's role or device groups do not allow this",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}},
}


def _both_content_types(op: dict[str, Any]) -> None:
    """Registry answers: Confluent's content type, or JSON (errors raised before the route runs); each
    documented under both."""
    for resp in op.get("responses", {}).values():
        content = resp.get("content")
        if not content:
            continue
        schema = next((c["schema"] for c in content.values() if c.get("schema")), None)
        if schema is None:
            continue
        resp["content"] = {t: {"schema": schema} for t in ("application/json", REGISTRY_CONTENT_TYPE)}


def _check_guarded(routes: list[APIRoute], guards: set[Any]) -> None:
    """Refuse an app with a route that checks no credential (other than :data:`OPEN_ROUTES`)."""

    def calls(dep: Any) -> Iterator[Any]:
        for d in dep.dependencies:
            yield d.call
            yield from calls(d)

    for route in routes:
        if not route.include_in_schema or route.path in OPEN_ROUTES:
            continue
        if not any(c in guards for c in calls(route.dependant)):
            raise RuntimeError(f"API route {route.path} has no authorization guard (need(...))")
