"""REST routes of the data-product catalog and its quality (docs/products.md), under ``/api/v1/products``.

Reads need a viewer of every device (a product's quality sums readings of many devices); changes need
an operator of every device. Every change is audited (``audit_log``) in its transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, HTTPException, Path, Query
from fastapi.concurrency import run_in_threadpool

from fieldmesh.api.auth import Principal
from fieldmesh.api.params import BAD_PARAMETER, ErrorBody
from fieldmesh.store.products import ProductTables
from fieldmesh.stream.quality import ProductError, parse_product

__all__ = ["products_router"]

ProductName = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="the product's name")]
_EXAMPLE: Final = {
    "name": "pump-temps", "owner": "plant-ops", "description": "Pump temperatures, one a second",
    "schema_subject": "pump-telemetry-value", "devices": {"globs": ["pump-*"], "groups": ["plant-a"]},
    "tables": {"hot": ["readings", "rollup_1m"], "lake": ["fieldmesh.readings"]},
    "expected_interval_s": 1, "window_s": 60, "baseline_windows": 60,
    "metrics": {"temperature": {"min": -20, "max": 120, "bins": 10}},
    "slo": {"completeness": 0.99, "null_rate": 0.01, "out_of_range_rate": 0.001, "duplicate_rate": 0.01,
            "drift_psi": 0.25, "freshness_s": 120},
}
ProductBody = Annotated[dict[str, Any], Body(openapi_examples={"product": {"value": _EXAMPLE}})]
_NO_PRODUCT: Final[dict[int | str, dict[str, Any]]] = {404: {"model": ErrorBody, "description": "no such product"}}


def _parse(body: Any, name: str | None = None) -> Any:
    if not isinstance(body, dict):
        raise HTTPException(400, "bad product: a JSON object")
    body = {k: v for k, v in body.items() if k not in ("source", "updated_ms", "updated_by")}  # GET's extras
    if name is not None and body.setdefault("name", name) != name:
        raise HTTPException(400, f"the body's name {body['name']!r} is not the path's {name!r}")
    try:
        return parse_product(body)
    except ProductError as exc:
        raise HTTPException(400, f"bad product: {exc}" + (f" (field {exc.field})" if exc.field else "")) from None


def products_router(tables: Callable[[], ProductTables], *, viewer: Any, operator: Any) -> APIRouter:
    """The catalog's routes; ``tables`` opens (once) the product tables, ``viewer``/``operator`` are the API's
    guards (``create_app``'s ``need``, of every device)."""
    r = APIRouter(prefix="/api/v1", tags=["data products"])

    @r.get("/products", response_model=None, description="Every data product, by name.")
    def list_products(_: Principal = viewer) -> list[dict[str, Any]]:
        return tables().products()

    @r.get("/products/{name}", response_model=None, responses={**BAD_PARAMETER, **_NO_PRODUCT})
    def get_product(name: ProductName, _: Principal = viewer) -> dict[str, Any]:
        return tables().product(name)

    @r.get("/products/{name}/quality", response_model=None, description=(
        "The product's quality: per event-time window (newest `windows`) completeness, null, out-of-range and "
        "duplicate rates and drift (PSI against the baseline windows), the latest closed window, freshness, "
        "sequence gaps, and each objective's SLO status (docs/products.md)."),
        responses={**BAD_PARAMETER, **_NO_PRODUCT})
    async def get_quality(name: ProductName, windows: Annotated[int, Query(ge=1, le=1440)] = 60,
                          _: Principal = viewer) -> dict[str, Any]:
        out: dict[str, Any] = await run_in_threadpool(tables().quality, name, windows=windows)
        return out

    @r.get("/products/{name}/compare", response_model=None, description=(
        "Canary comparison: this product's quality against the `control` product's, window by window (rates, "
        "their differences, PSI of this product's histograms against the control's) and a verdict, `promote` "
        "or `hold` with the reasons (docs/products.md, canary)."),
        responses={**BAD_PARAMETER, **_NO_PRODUCT})
    async def get_compare(name: ProductName,
                          control: Annotated[str, Query(pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                                                        description="the control product")],
                          windows: Annotated[int, Query(ge=1, le=1440)] = 60,
                          _: Principal = viewer) -> dict[str, Any]:
        out: dict[str, Any] = await run_in_threadpool(tables().compare, name, control, windows=windows)
        return out

    @r.post("/products", status_code=201, response_model=None, description=(
        "Declare a data product (operator). Processors count its quality from their next batch."),
        responses={**BAD_PARAMETER, 409: {"model": ErrorBody, "description": "a product of that name exists"}})
    def post_product(body: ProductBody, p: Principal = operator) -> dict[str, Any]:
        return tables().put(_parse(body), actor=p.subject, create=True)

    @r.put("/products/{name}", response_model=None, description="Change a data product (operator).",
           responses={**BAD_PARAMETER, **_NO_PRODUCT})
    def put_product(name: ProductName, body: ProductBody, p: Principal = operator) -> dict[str, Any]:
        return tables().put(_parse(body, name), actor=p.subject, create=False)

    @r.delete("/products/{name}", response_model=None, description=(
        "Remove a data product and its quality counters (operator); answers what it was."),
        responses={**BAD_PARAMETER, **_NO_PRODUCT})
    def delete_product(name: ProductName, p: Principal = operator) -> dict[str, Any]:
        return tables().delete(name, actor=p.subject)

    return r
