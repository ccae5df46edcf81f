"""Read-side shapes shared by the hot stores: filters and the JSON rows the API returns.

Each store runs its own SQL; these functions turn the result tuples into the documented rows, so
both stores answer exactly alike.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from fieldmesh.core.errors import ConfigError
from fieldmesh.store.base import INTERVALS

__all__ = ["device_row", "dlq_row", "iso", "raw_row", "rollup_query", "rollup_row", "where_clause"]


def iso(ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def where_clause(
    device_id: str | None, start_ms: int | None, end_ms: int | None, *, col: str, ph: str
) -> tuple[list[str], list[Any]]:
    """Conditions and parameters for a device and a half-open time range; ``ph`` is the placeholder."""
    where: list[str] = []
    params: list[Any] = []
    if device_id is not None:
        where.append(f"device_id = {ph}")
        params.append(device_id)
    if start_ms is not None:
        where.append(f"{col} >= {ph}")
        params.append(start_ms)
    if end_ms is not None:
        where.append(f"{col} < {ph}")
        params.append(end_ms)
    return where, params


def rollup_query(
    interval: str, device_id: str | None, metric: str | None, start_ms: int | None, end_ms: int | None,
    limit: int, *, ph: str, extra: str = "",
) -> tuple[str, list[Any]]:
    """SQL and parameters of a rollup read (tables ``rollup_1m``/``rollup_1h``); ``ph`` is the placeholder,
    ``extra`` more columns after the row's (``, col, ...``)."""
    if interval not in INTERVALS:
        raise ConfigError(f"interval must be one of {sorted(INTERVALS)}", key="interval")
    where, params = where_clause(device_id, start_ms, end_ms, col="window_start_ms", ph=ph)
    if metric is not None:
        where.append(f"metric = {ph}")
        params.append(metric)
    sql = (
        f"SELECT device_id, metric, window_start_ms, count, sum, min, max, avg{extra} FROM rollup_{interval}"
        + (" WHERE " + " AND ".join(where) if where else "")
        + f" ORDER BY device_id, metric, window_start_ms LIMIT {ph}"
    )
    return sql, [*params, limit]


def device_row(
    d: str, fs: int, ls: int, ft: int, lt: int, n: int, metrics: list[str], *, gaps: int = 0
) -> dict[str, Any]:
    """A row of ``GET /devices`` (``gaps``: seqs missing, summed over the device's boots)."""
    return {
        "device_id": d, "first_seen": iso(fs), "last_seen": iso(ls), "first_ts": iso(ft), "last_ts": iso(lt),
        "readings": n, "metrics": metrics, "gaps": gaps,
    }  # fmt: skip


def raw_row(
    dev: str, ts: int, seq: int | None, boot: str | None, ev: str | None, measurements: Mapping[str, Any],
    meta: Any, rx: int, enrichment: Any, metric: str | None,
) -> dict[str, Any]:
    """A row of ``GET /telemetry/raw`` (only ``metric`` of the measurements when one is asked for)."""
    m = {metric: measurements[metric]} if metric is not None else dict(measurements)
    row: dict[str, Any] = {"device_id": dev, "ts": iso(ts), "ts_ms": ts, "measurements": m}
    if seq is not None:
        row["seq"] = seq
    if boot is not None:
        row["boot_id"] = boot
    if ev is not None:
        row["event_id"] = ev
    if meta is not None:
        row["meta"] = meta
    row["received_ms"] = rx
    if enrichment is not None:
        row["enrichment"] = enrichment
    return row


def rollup_row(d: str, m: str, ws: int, c: int, s: float, mn: float, mx: float, a: float) -> dict[str, Any]:
    """A row of ``GET /telemetry/rollups``."""
    return {
        "device_id": d, "metric": m, "window_start": iso(ws), "window_start_ms": ws,
        "count": c, "sum": s, "min": mn, "max": mx, "avg": a,
    }  # fmt: skip


def dlq_row(
    i: int, reason: str, detail: str, topic: str, dev: str | None, rx: int, payload: bytes, truncated: Any
) -> dict[str, Any]:
    """A row of ``GET /dlq``: the payload as text where it is UTF-8, else hex."""
    try:
        text, enc = bytes(payload).decode(), "utf-8"
    except UnicodeDecodeError:
        text, enc = bytes(payload).hex(), "hex"
    return {
        "id": i, "reason": reason, "detail": detail, "topic": topic, "device_id": dev, "received_at": iso(rx),
        "payload": text, "payload_encoding": enc, "truncated": bool(truncated),
    }  # fmt: skip
