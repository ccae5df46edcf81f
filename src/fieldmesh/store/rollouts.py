"""Fleet telemetry for rollout gates, read from the hot store's readings (SQLite or PostgreSQL).

Per cohort of devices since a time: how many readings, how many the edge agent flagged
(``meta.decision == "anomaly"``), how many devices reported recently, and the mean of one metric.
One grouped statement per 500 devices, through the store's read-only query path.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

from fieldmesh.control.rollouts import CohortStats
from fieldmesh.core.errors import ConfigError
from fieldmesh.store import load_store
from fieldmesh.store.base import HotStore

__all__ = ["HotTelemetry", "telemetry_for"]

_METRIC: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CHUNK: Final = 500


class HotTelemetry:
    """Cohort statistics over the ``readings`` of ``store`` (``pg``: PostgreSQL SQL, else SQLite)."""

    def __init__(self, store: HotStore, *, pg: bool) -> None:
        self.store = store
        self.pg = pg

    def _sql(self, n: int, metric: str | None) -> str:
        ph = "%s" if self.pg else "?"
        ids = ", ".join(ph for _ in range(n))
        if self.pg:
            dec = "meta->>'decision'"
            val = f"(measurements->>{ph})::float8" if metric else "NULL::float8"  # sum(NULL) is ambiguous
        else:
            dec = "json_extract(meta, '$.decision')"
            val = f"json_extract(measurements, {ph})" if metric else "NULL"
        return (f"SELECT device_id, count(*), sum(CASE WHEN {dec} = 'anomaly' THEN 1 ELSE 0 END), max(ts_ms),"
                f" sum({val}), count({val}) FROM readings WHERE device_id IN ({ids}) AND ts_ms >= {ph}"
                " GROUP BY device_id")

    def cohort(self, device_ids: Sequence[str], *, since_ms: int, fresh_since_ms: int,
               metric: str | None) -> CohortStats:
        """Readings of ``device_ids`` at or after ``since_ms``."""
        if metric is not None and not _METRIC.fullmatch(metric):
            raise ConfigError(f"gates.metric: {metric!r} is not a metric name", key="gates.metric")
        path: Any = metric if self.pg else (f'$."{metric}"' if metric else None)
        reporting = readings = anomalies = fresh = 0
        total = 0.0
        counted = 0
        ids = list(dict.fromkeys(device_ids))
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i:i + _CHUNK]
            params: list[Any] = []
            if metric is not None:
                params += [path, path]
            params += [*chunk, since_ms]
            for _dev, n, an, last, s, c in self.store.query(self._sql(len(chunk), metric), params).rows:
                reporting += 1
                readings += int(n)
                anomalies += int(an or 0)
                fresh += int(last is not None and int(last) >= fresh_since_ms)
                if c:
                    total += float(s)
                    counted += int(c)
        return CohortStats(devices=len(ids), reporting=reporting, readings=readings, anomalies=anomalies,
                           fresh=fresh, metric_mean=total / counted if counted else None)


    def canary_verdict(self, name: str) -> str | None:
        """The verdict of canary ``name`` (:meth:`fieldmesh.store.canary.CanaryTables.compare`); None when
        there is none."""
        from fieldmesh.core.errors import NotFoundError
        from fieldmesh.store.canary import CanaryTables

        tables = CanaryTables(self.store.url)
        try:
            return str(tables.compare(name, windows=5)["verdict"])
        except NotFoundError:
            return None
        finally:
            tables.close()


def telemetry_for(url: str) -> HotTelemetry:
    """Telemetry over the hot store at ``url`` (opened read-only)."""
    pg = url.split("://", 1)[0].lower() in ("postgresql", "postgres")
    return HotTelemetry(load_store(url, readonly=True), pg=pg)

