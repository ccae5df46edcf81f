"""REST routes of lineage (docs/lineage.md): ``GET /api/v1/lineage`` (the graph) and ``/api/v1/lineage/events``.

The graph joins the newest START/RUNNING event of each job (gateway, processor, sinks, CDC) into
``dataset -> job -> dataset`` edges, and adds each known device as the source of the MQTT telemetry
dataset the gateway reads (or of the bus's ingest topic when the gateway reads no MQTT itself): device ->
topic -> tables -> data products, canaries and features. ``dataset`` narrows it to what is up or down
stream of one dataset (``namespace/name``, a bare name, or ``device:<id>``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from fieldmesh.api.auth import Principal
from fieldmesh.api.params import BAD_PARAMETER
from fieldmesh.core.topics import INGEST_TOPIC
from fieldmesh.store.base import HotStore
from fieldmesh.store.lineage import LineageTables

__all__ = ["lineage_router"]

TELEMETRY = "devices/+/telemetry"


def lineage_router(tables: Callable[[], LineageTables], store: Callable[[], HotStore], *, viewer: Any) -> APIRouter:
    """The lineage routes; ``tables`` opens (once) the event table, ``store`` the hot store (its devices)."""
    r = APIRouter(prefix="/api/v1", tags=["lineage"])

    def graph(dataset: str | None) -> dict[str, Any]:
        lt = tables()
        base = lt.graph()
        # devices feed the MQTT telemetry dataset, or the bus's ingest topic where no gateway reads MQTT
        # itself (``fieldmesh up``: the broker's door publishes to it)
        mqtt = [n["id"] for n in base["nodes"] if n["kind"] == "dataset" and n["name"] == TELEMETRY]
        mqtt = mqtt or [n["id"] for n in base["nodes"] if n["kind"] == "dataset" and n["name"] == INGEST_TOPIC]
        devices = [d["device_id"] for d in store().devices()] if mqtt else []
        return lt.graph(dataset, extra_edges=[(f"device:{d}", m) for d in devices for m in mqtt])

    @r.get("/lineage", response_model=None, description=(
        "The lineage graph: nodes (devices, datasets, jobs) and edges, from the newest run event of each job; "
        "`dataset` keeps what is up or down stream of it."), responses={**BAD_PARAMETER})
    async def get_lineage(dataset: Annotated[str | None, Query(max_length=512, description=(
            "namespace/name, a bare dataset name, or device:<id>"))] = None,
            _: Principal = viewer) -> dict[str, Any]:
        out: dict[str, Any] = await run_in_threadpool(graph, dataset)
        return out

    @r.get("/lineage/events", response_model=None, description=(
        "OpenLineage run events kept locally, newest first (as sent to OPENLINEAGE_URL when configured)."),
        responses={**BAD_PARAMETER})
    def get_events(job: Annotated[str | None, Query(max_length=256)] = None,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 100, _: Principal = viewer) -> list[dict[str, Any]]:
        return tables().events(job=job, limit=limit)

    return r
