"""OpenLineage run events of fieldmesh's jobs (docs/lineage.md): gateway, processor, its sinks and CDC.

Each long-running job is one OpenLineage *run*: START when it starts, RUNNING every ``interval_s`` while
it runs, COMPLETE when it stops cleanly, FAIL (with an ``errorMessage`` run facet) when it stops on an
error. Events name the job's input and output datasets (MQTT topics, bus topics, hot-store and lake
tables, CDC source tables, data products) and, on the processor's product datasets, a
``dataQualityMetrics`` facet from the product's latest quality window (docs/products.md).

Events are built with the ``openlineage-python`` client's classes (so they follow the standard), kept in
the hot store (:class:`~fieldmesh.store.lineage.LineageTables`, read by ``GET /api/v1/lineage``) and, when
an endpoint is configured (``--lineage-url``, or ``OPENLINEAGE_URL`` as the standard client reads it), sent
there by the client's HTTP transport. A lineage failure never stops a job: it is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    data_quality_metrics_dataset,
    error_message_run,
    job_type_job,
)
from openlineage.client.serde import Serde
from openlineage.client.uuid import generate_new_uuid

from fieldmesh import __version__

__all__ = ["Dataset", "Lineage", "LineageStats", "bus_namespace", "mqtt_namespace", "store_namespace"]

log = logging.getLogger(__name__)

PRODUCER: Final = f"https://github.com/fieldmesh/fieldmesh/tree/v{__version__}"


def _host_ns(scheme: str, url: str) -> str:
    u = urlsplit(url)
    host = u.hostname or "localhost"
    return f"{scheme}://{host}:{u.port}" if u.port else f"{scheme}://{host}"


def bus_namespace(url: str) -> str:
    """A bus's dataset namespace (``nats://host:port``, ``kafka://host:port``), credentials left out."""
    return _host_ns(url.split("://", 1)[0].lower() if "://" in url else "nats", url.split(",")[0])


def mqtt_namespace(url: str) -> str:
    """An MQTT broker's dataset namespace."""
    return _host_ns("mqtt", url)


def store_namespace(url: str) -> str:
    """A hot store's dataset namespace: ``sqlite:///path`` as it is, ``postgres://host:port/db``."""
    if url.startswith("sqlite:"):
        return url.split("?", 1)[0]
    u = urlsplit(url)
    return f"postgres://{u.hostname or 'localhost'}:{u.port or 5432}{u.path}"


@dataclass(frozen=True, slots=True)
class Dataset:
    """An input or output of a job; ``quality`` (outputs only): a ``dataQualityMetrics`` facet's fields."""

    namespace: str
    name: str
    quality: Mapping[str, Any] | None = None


@dataclass(slots=True)
class LineageStats:
    """Events kept locally and sent, and what failed (never fatal to the job)."""

    emitted: int = 0
    sent: int = 0
    send_failed: int = 0
    store_failed: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


class Lineage:
    """Builds, keeps and sends the run events of fieldmesh's jobs.

    ``store_url``: where events are kept (None: not kept); ``url``: an OpenLineage HTTP endpoint (default:
    ``OPENLINEAGE_URL``; ``OPENLINEAGE_ENDPOINT`` and ``OPENLINEAGE_API_KEY`` apply as in the standard client).
    """

    def __init__(self, *, store_url: str | None, url: str | None = None, namespace: str = "fieldmesh",
                 interval_s: float = 60.0) -> None:
        self.namespace = namespace
        self.interval_s = interval_s
        self.stats = LineageStats()
        self._tables: Any = None
        if store_url is not None:
            from fieldmesh.store.lineage import LineageTables

            try:
                self._tables = LineageTables(store_url)
            except Exception as exc:  # lineage never stops a job: its events are then not kept
                self.stats.store_failed += 1
                log.warning("lineage: events will not be kept, the store cannot be opened: %s", exc)
        self._client: Any = None
        target = url or os.environ.get("OPENLINEAGE_URL")
        if target:
            from openlineage.client.transport.http import HttpConfig, HttpTransport

            cfg: dict[str, Any] = {"url": target, "timeout": 5.0,
                                   "endpoint": os.environ.get("OPENLINEAGE_ENDPOINT", "api/v1/lineage")}
            if key := os.environ.get("OPENLINEAGE_API_KEY"):
                cfg["auth"] = {"type": "api_key", "apiKey": key}
            self._client = HttpTransport(HttpConfig.from_dict(cfg))
        self.target = target

    def close(self) -> None:
        """Close the local table."""
        if self._tables is not None:
            self._tables.close()

    def event(self, state: str, job: str, run_id: str, *, inputs: Sequence[Dataset] = (),
              outputs: Sequence[Dataset] = (), error: BaseException | None = None,
              now: dt.datetime | None = None) -> dict[str, Any]:
        """The JSON shape of one run event (built with the client's classes)."""
        at = now or dt.datetime.now(dt.UTC)
        run_facets: dict[str, Any] = {}
        if error is not None:
            run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
                message=f"{type(error).__name__}: {error}"[:4000], programmingLanguage="python")
        ev = RunEvent(
            eventType=RunState[state], eventTime=at.isoformat().replace("+00:00", "Z"),
            run=Run(runId=run_id, facets=run_facets), producer=PRODUCER,
            job=Job(namespace=self.namespace, name=job, facets={"jobType": job_type_job.JobTypeJobFacet(
                processingType="STREAMING", integration="FIELDMESH", jobType=job.rsplit(".", 1)[-1].upper())}),
            inputs=[InputDataset(namespace=d.namespace, name=d.name) for d in inputs],
            outputs=[OutputDataset(namespace=d.namespace, name=d.name, facets=_quality_facet(d.quality))
                     for d in outputs],
        )
        out: dict[str, Any] = Serde.to_dict(ev)
        return out

    def emit(self, state: str, job: str, run_id: str, **kw: Any) -> dict[str, Any]:
        """Build, keep and send one event (blocking; failures logged and counted)."""
        ev = self.event(state, job, run_id, **kw)
        st = self.stats
        st.emitted += 1
        st.by_type[state] = st.by_type.get(state, 0) + 1
        if self._tables is not None:
            try:
                self._tables.keep(ev, event_time_ms=int(time.time() * 1000))
            except Exception as exc:
                st.store_failed += 1
                log.warning("lineage: %s event of %s not kept: %s", state, job, exc)
        if self._client is not None:
            try:
                self._client.emit(ev)  # the transport serializes a dict as it is
                st.sent += 1
            except Exception as exc:
                st.send_failed += 1
                log.warning("lineage: %s event of %s not sent to %s: %s", state, job, self.target, exc)
        return ev

    @contextlib.asynccontextmanager
    async def run(self, job: str, *, inputs: Sequence[Dataset] = (),
                  outputs: Callable[[], Sequence[Dataset]] | Sequence[Dataset] = ()) -> AsyncIterator[str]:
        """START now, RUNNING every ``interval_s`` (outputs recomputed: quality changes), COMPLETE on a clean
        exit, FAIL on an exception (re-raised); yields the run id."""
        run_id = str(generate_new_uuid())

        def outs() -> Sequence[Dataset]:
            return outputs() if callable(outputs) else outputs

        async def emit(state: str, error: BaseException | None = None) -> None:
            try:
                o = await asyncio.to_thread(outs)
            except Exception as exc:  # the quality read failed: the datasets without it
                log.warning("lineage: outputs of %s unavailable: %s", job, exc)
                o = []
            await asyncio.to_thread(self.emit, state, job, run_id, inputs=inputs, outputs=o, error=error)

        async def beat() -> None:
            while True:
                await asyncio.sleep(self.interval_s)
                await emit("RUNNING")

        await emit("START")
        task = asyncio.create_task(beat(), name=f"lineage-{job}")
        try:
            yield run_id
        except BaseException as exc:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            state = "ABORT" if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt)) else "FAIL"
            await asyncio.shield(emit(state, None if state == "ABORT" else exc))
            raise
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await emit("COMPLETE")


def _quality_facet(q: Mapping[str, Any] | None) -> dict[str, Any]:
    if not q:
        return {}
    cols = {name: data_quality_metrics_dataset.ColumnMetrics(
        nullCount=m.get("nullCount"), count=m.get("count"), min=m.get("min"), max=m.get("max"))
        for name, m in q.get("columns", {}).items()}
    return {"dataQualityMetrics": data_quality_metrics_dataset.DataQualityMetricsDatasetFacet(
        columnMetrics=cols, rowCount=q.get("rowCount"))}
