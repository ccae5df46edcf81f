"""REST routes of canary routing (docs/canary.md), under ``/api/v1/canaries``.

Reads need a viewer of every device (a canary spans many devices); declaring, promoting, aborting and
deleting need an operator of every device. Every change is audited (``audit_log``) in its transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, HTTPException, Path, Query
from fastapi.concurrency import run_in_threadpool

from fieldmesh.api.auth import Principal
from fieldmesh.api.params import BAD_PARAMETER, ErrorBody
from fieldmesh.store.canary import CanaryTables, promote
from fieldmesh.stream.canary import CanaryError, parse_canary

__all__ = ["canaries_router"]

CanaryName = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="the canary's name")]
_EXAMPLE: Final = {
    "name": "fw-2-1", "product": "pump-temps", "description": "firmware 2.1 on 5 % of plant A's pumps",
    "devices": {"groups": ["plant-a"]}, "share_percent": 5, "meta": {"firmware": "2.1.*"},
    "thresholds": {"drift_psi": 0.1, "dlq_rate_delta": 0.01, "latency_delta_s": 5, "min_readings": 500},
}
CanaryBody = Annotated[dict[str, Any], Body(openapi_examples={"canary": {"value": _EXAMPLE}})]
_NO_CANARY: Final[dict[int | str, dict[str, Any]]] = {404: {"model": ErrorBody, "description": "no such canary"}}
_NOT_ACTIVE: Final[dict[int | str, dict[str, Any]]] = {
    409: {"model": ErrorBody, "description": "the canary is not in a state that allows it"}}


def _parse(body: Any) -> Any:
    if not isinstance(body, dict):
        raise HTTPException(400, "bad canary: a JSON object")
    extras = ("state", "created_ms", "updated_ms", "updated_by", "merged", "readings", "devices_seen")  # GET's
    try:
        return parse_canary({k: v for k, v in body.items() if k not in extras})
    except CanaryError as exc:
        raise HTTPException(400, f"bad canary: {exc}" + (f" (field {exc.field})" if exc.field else "")) from None


def canaries_router(tables: Callable[[], CanaryTables], store_url: str, *, viewer: Any, operator: Any
                    ) -> APIRouter:
    """The canary routes; ``tables`` opens (once) the canary tables; a promotion opens the hot store at
    ``store_url`` for its transaction. ``viewer``/``operator``: the API's guards of every device."""
    r = APIRouter(prefix="/api/v1", tags=["canaries"])

    @r.get("/canaries", response_model=None, description=(
        "Every canary: its declaration, `state` (active, promoted, aborted), readings held and merged."))
    def list_canaries(_: Principal = viewer) -> list[dict[str, Any]]:
        return tables().canaries()

    @r.post("/canaries", status_code=201, response_model=None, description=(
        "Declare a canary of a data product (operator): from their next batch, processors store the readings "
        "it selects in its own table, apart from the product's."),
        responses={**BAD_PARAMETER, 404: {"model": ErrorBody, "description": "no such product"},
                   409: {"model": ErrorBody, "description": "a canary of that name exists"}})
    def post_canary(body: CanaryBody, p: Principal = operator) -> dict[str, Any]:
        return tables().create(_parse(body), actor=p.subject)

    @r.get("/canaries/{name}", response_model=None, description="One canary, with the devices seen on its side.",
           responses={**BAD_PARAMETER, **_NO_CANARY})
    def get_canary(name: CanaryName, _: Principal = viewer) -> dict[str, Any]:
        return tables().canary(name)

    @r.get("/canaries/{name}/readings", response_model=None, description=(
        "The readings the canary holds (not in the main tables until promoted), newest first."),
        responses={**BAD_PARAMETER, **_NO_CANARY})
    def get_readings(name: CanaryName, limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
                     _: Principal = viewer) -> list[dict[str, Any]]:
        return tables().readings(name, limit=limit)

    @r.get("/canaries/{name}/compare", response_model=None, description=(
        "The canary against its baseline (the rest of its devices' readings): each side's counts, dead-letter "
        "rate and latency, quality window by window with the PSI of the canary's histograms against the "
        "baseline's, and a `verdict` (`promote`, `hold` with the `reasons`, `no_data`)."),
        responses={**BAD_PARAMETER, **_NO_CANARY})
    async def get_compare(name: CanaryName, windows: Annotated[int, Query(ge=1, le=1440)] = 60,
                          _: Principal = viewer) -> dict[str, Any]:
        out: dict[str, Any] = await run_in_threadpool(tables().compare, name, windows=windows)
        return out

    @r.post("/canaries/{name}/promote", response_model=None, description=(
        "Promote an active canary (operator): its readings join the main tables (readings, rollups, devices) "
        "in one transaction, and its devices' traffic takes the main path from the next batch. `merge=false` "
        "keeps its readings apart."), responses={**BAD_PARAMETER, **_NO_CANARY, **_NOT_ACTIVE})
    def post_promote(name: CanaryName, merge: bool = True, p: Principal = operator) -> dict[str, Any]:
        from fieldmesh.store import load_store

        tables().canary(name)  # 404 before opening the store
        store = load_store(store_url)
        try:
            done = promote(store, name, actor=p.subject, merge=merge)
        finally:
            store.close()
        return {**tables().canary(name), **done}

    @r.post("/canaries/{name}/abort", response_model=None, description=(
        "Abort an active canary (operator): its devices' traffic takes the main path from the next batch; "
        "the readings it holds stay apart for inspection."), responses={**BAD_PARAMETER, **_NO_CANARY, **_NOT_ACTIVE})
    def post_abort(name: CanaryName, p: Principal = operator) -> dict[str, Any]:
        return tables().abort(name, actor=p.subject)

    @r.delete("/canaries/{name}", response_model=None, description=(
        "Remove a promoted or aborted canary with the readings it still holds and its counters (operator); "
        "answers what it was."), responses={**BAD_PARAMETER, **_NO_CANARY, **_NOT_ACTIVE})
    def delete_canary(name: CanaryName, p: Principal = operator) -> dict[str, Any]:
        return tables().delete(name, actor=p.subject)

    return r
