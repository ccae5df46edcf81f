"""The web console (docs/console.md): a page at ``/`` and the endpoints it needs beyond the REST API.

- ``GET /`` serves ``ui/index.html``; ``/ui/...`` the console's ES modules, CSS and the vendored uPlot
  (MIT, ``ui/vendor/``), all from the installed package: nothing loads from another host.
- ``GET /api/v1/telemetry/series``: one device's metric over a time range, downsampled on the server to
  at most ``max_points`` buckets (min/avg/max per bucket), read from the 1h or 1m rollups when a bucket
  spans an hour or a minute, from the raw readings otherwise.
- ``GET /api/v1/fleet/summary``: devices online/offline by last seen, active alerts by severity.
- ``GET /api/v1/events/stream?topics=stats,alerts,device:ID``: one server-sent events stream per page,
  about once a second, carrying what each topic asks (``/stats``, active alert counts, a device's new
  readings). Browsers read it with ``fetch()`` so the credential goes in the ``Authorization`` header,
  never in the URL.

The page itself carries no data and is open; every endpoint it calls is guarded like the rest of the API.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Final

import msgspec
import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from fieldmesh.api.params import BAD_PARAMETER, check_device, check_metric, device_query, metric_query, parse_time
from fieldmesh.store import HotStore

__all__ = ["UI_DIR", "add_console_routes", "downsample", "fleet_summary", "page_ids", "series", "sort_devices"]

UI_DIR: Final = Path(__file__).with_name("ui")
#: The most raw readings one series request reads before bucketing (older ones are left out, and said so).
RAW_CAP: Final = 200_000
#: Seconds between two events of a stream.
TICK_S: Final = 1.0
_enc = msgspec.json.Encoder()
_SEVERITIES: Final = ("critical", "major", "minor", "warning", "info")


def downsample(t: np.ndarray, count: np.ndarray, total: np.ndarray, lo: np.ndarray, hi: np.ndarray, *,
               start_ms: int, bucket_ms: int) -> dict[str, list[Any]]:
    """Merge windows (or single readings: count 1) into buckets of ``bucket_ms`` from ``start_ms``.

    Inputs are sorted by ``t``; an empty bucket is left out (uPlot draws a gap only where told).
    """
    if t.size == 0:
        return {"t": [], "avg": [], "min": [], "max": [], "count": []}
    idx = (t - start_ms) // bucket_ms
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    n = np.add.reduceat(count, starts)
    s = np.add.reduceat(total, starts)
    return {
        "t": (start_ms + idx[starts] * bucket_ms).tolist(),
        "avg": (s / n).tolist(),
        "min": np.minimum.reduceat(lo, starts).tolist(),
        "max": np.maximum.reduceat(hi, starts).tolist(),
        "count": n.tolist(),
    }


def series(store: HotStore, *, device_id: str, metric: str, start_ms: int, end_ms: int,
           max_points: int) -> dict[str, Any]:
    """``device_id``'s ``metric`` over ``[start_ms, end_ms)`` in at most ``max_points`` buckets."""
    bucket_ms = max(1, math.ceil((end_ms - start_ms) / max_points))
    source = "1h" if bucket_ms >= 3_600_000 else "1m" if bucket_ms >= 60_000 else "raw"
    truncated = False
    if source == "raw":
        rows = store.raw(device_id=device_id, metric=metric, start_ms=start_ms, end_ms=end_ms, limit=RAW_CAP)
        truncated = len(rows) >= RAW_CAP
        rows.reverse()  # newest first -> oldest first
        vals = [(r["ts_ms"], r["measurements"].get(metric)) for r in rows]
        vals = [(ts, float(v)) for ts, v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
        t = np.fromiter((ts for ts, _ in vals), dtype=np.int64, count=len(vals))
        v = np.fromiter((x for _, x in vals), dtype=np.float64, count=len(vals))
        if t.size <= max_points:  # every reading, at its own time
            out = {"t": t.tolist(), "avg": v.tolist(), "min": v.tolist(), "max": v.tolist(),
                   "count": [1] * int(t.size)}
            bucket_ms = 0
        else:
            out = downsample(t, np.ones(t.size, dtype=np.int64), v, v, v, start_ms=start_ms, bucket_ms=bucket_ms)
    else:
        # the buckets merged by the database: one row per bucket crosses into Python, not one per window
        ph = "%s" if "postgres" in type(store).__module__ else "?"
        res = store.query(
            f"SELECT (window_start_ms - {ph}) / {ph} AS b, sum(count), sum(sum), min(min), max(max)"
            f" FROM rollup_{source} WHERE device_id = {ph} AND metric = {ph} AND window_start_ms >= {ph}"
            f" AND window_start_ms < {ph} GROUP BY b ORDER BY b",
            (start_ms, bucket_ms, device_id, metric, start_ms, end_ms))
        b = [r for r in res.rows if r[1]]
        # float(): PostgreSQL's sum of a bigint is a numeric (Decimal)
        out = {"t": [start_ms + int(r[0]) * bucket_ms for r in b], "avg": [float(r[2]) / float(r[1]) for r in b],
               "min": [float(r[3]) for r in b], "max": [float(r[4]) for r in b], "count": [int(r[1]) for r in b]}
    return {"device_id": device_id, "metric": metric, "start_ms": start_ms, "end_ms": end_ms,
            "source": source, "bucket_ms": bucket_ms, "points": len(out["t"]), "truncated": truncated, **out}


def fleet_summary(store: HotStore, registered: list[str], active_alerts: list[dict[str, Any]], *,
                  now_ms: int, online_s: int) -> dict[str, Any]:
    """Devices online (seen within ``online_s``), offline (seen before) and never seen; alerts by severity."""
    last = store.last_seen()
    cutoff = now_ms - online_s * 1000
    online = sum(1 for ts in last.values() if ts >= cutoff)
    never = len(set(registered) - set(last))
    sev = dict.fromkeys(_SEVERITIES, 0)
    for a in active_alerts:
        sev[a["severity"]] = sev.get(a["severity"], 0) + 1
    return {"devices": len(last) + never, "online": online, "offline": len(last) - online, "never_seen": never,
            "online_s": online_s, "freshest_ms": max(last.values(), default=None),
            "alerts": {"active": len(active_alerts), **sev}}


def sort_devices(rows: list[dict[str, Any]], sort: str) -> list[dict[str, Any]]:
    """``GET /devices`` rows ordered by ``sort`` (a field, ``-`` first for descending); missing values last."""
    key = sort.lstrip("-")
    have = [r for r in rows if r.get(key) is not None]
    have.sort(key=lambda r: (r[key], r["device_id"]), reverse=sort.startswith("-"))
    return have + [r for r in rows if r.get(key) is None]


def page_ids(groups_of: dict[str, tuple[str, ...]], last_seen: dict[str, int], *, q: str | None, sort: str,
             offset: int, limit: int, keep: Callable[[str, bool, tuple[str, ...]], bool]) -> tuple[int, list[str]]:
    """The ids of one page of ``GET /devices`` and the total, without building every row (10,000 devices).

    ``groups_of``: registered ids and their groups; ``last_seen``: every device the store has seen;
    ``keep(device_id, registered, groups)`` says whether a device passes the other filters. ``sort`` is
    device_id or last_seen (``-`` first: descending; never seen last).
    """
    ids = [i for i in set(groups_of) | set(last_seen) if (q is None or q in i) and keep(i, i in groups_of,
                                                                                        groups_of.get(i, ()))]
    desc = sort.startswith("-")
    if sort.lstrip("-") == "last_seen":
        seen = sorted((i for i in ids if i in last_seen), key=lambda i: (last_seen[i], i), reverse=desc)
        ids = seen + sorted(i for i in ids if i not in last_seen)
    else:
        ids.sort(reverse=desc)
    return len(ids), ids[offset:offset + limit]


StatsFn = Callable[[Any], Awaitable[dict[str, Any]]]


def add_console_routes(
    app: FastAPI,
    r: APIRouter,
    *,
    get_store: Callable[[], HotStore],
    stats: StatsFn,
    active_alerts: Callable[[Any, str | None], list[dict[str, Any]]],
    registered_ids: Callable[[], list[str]],
    visible: Callable[[Any, str | None], str | None],
    viewer: Any,
    all_devices: Any,
) -> None:
    """Add the console's page, assets and endpoints; ``viewer``/``all_devices`` are the API's guards."""

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/ui", StaticFiles(directory=UI_DIR), name="console-ui")

    @r.get("/telemetry/series", response_model=None, responses=BAD_PARAMETER, description=(
        "One device's metric over [start, end) downsampled on the server into at most `max_points` buckets "
        "(min, avg, max, count each), read from the 1h or 1m rollups when a bucket spans an hour or a minute, "
        "from the raw readings otherwise (every reading when they fit). `source` says which."))
    def get_series(
        device_id: Annotated[str, device_query()], metric: Annotated[str, metric_query()],
        start: Annotated[str | None, Query(description="from (ISO 8601, epoch ms, or -1h/-7d); default -1h")] = None,
        end: Annotated[str | None, Query(description="until (default now)")] = None,
        max_points: Annotated[int, Query(ge=10, le=20_000, description="at most this many buckets")] = 1000,
        p: Any = viewer,
    ) -> Response:
        now = int(time.time() * 1000)
        end_ms = _when(end, "end", now) if end is not None else now
        start_ms = _when(start, "start", now) if start is not None else end_ms - 3_600_000
        if start_ms >= end_ms:
            raise HTTPException(400, "start must be before end")
        dev = visible(p, check_device(device_id))
        assert dev is not None
        body = series(get_store(), device_id=dev, metric=check_metric(metric) or metric, start_ms=start_ms,
                      end_ms=end_ms, max_points=max_points)
        # encoded by msgspec: FastAPI's encoder walks each of the ~10,000 numbers in Python
        return Response(_enc.encode(body), media_type="application/json")

    @r.get("/fleet/summary", response_model=None, responses=BAD_PARAMETER, description=(
        "Devices online (last seen within `online_s`), offline and never seen; active alerts by severity."))
    def get_fleet_summary(
        online_s: Annotated[int, Query(ge=1, le=86_400 * 30)] = 300, p: Any = all_devices,
    ) -> dict[str, Any]:
        return fleet_summary(get_store(), registered_ids(), active_alerts(p, None),
                             now_ms=int(time.time() * 1000), online_s=online_s)

    @r.get("/events/stream", response_model=None, description=(
        "Server-sent events, one stream per page, about once a second: `stats` (the body of /stats), "
        "`alerts` (active alerts by severity) and `device:<id>` (that device's readings stored since the last "
        "event, as `readings`). Read it with fetch() and an Authorization header."),
        responses={200: {"description": "one event a topic a round (data: JSON)", "content": {"text/event-stream": {
            "schema": {"type": "object", "required": ["event", "data"], "properties": {
                "event": {"type": "string", "enum": ["stats", "alerts", "readings"]},
                "data": {"type": "string", "contentMediaType": "application/json"}}}}}}, **BAD_PARAMETER})
    async def get_stream(
        request: Request,
        topics: Annotated[str, Query(pattern=r"^[A-Za-z0-9_:.,-]{1,400}$",
                                     description="comma-separated: stats, alerts, device:<id>")] = "stats",
        ticks: Annotated[int | None, Query(ge=1, le=86_400, description=(
            "end after this many rounds of events (scripts, probes); default: while the client reads"))] = None,
        p: Any = viewer,
    ) -> StreamingResponse:
        wanted = [t for t in topics.split(",") if t]
        devices: list[str] = []
        for t in wanted:
            if t.startswith("device:"):
                dev = visible(p, check_device(t[len("device:"):]))
                assert dev is not None
                devices.append(dev)
            elif t in ("stats", "alerts"):
                if p.groups is not None:
                    raise HTTPException(403, f"topic {t} spans every device: it needs a credential not limited "
                                             "to device groups")
            else:
                raise HTTPException(400, f"unknown topic {t!r}: stats, alerts or device:<id>")
        return StreamingResponse(_events(request, p, wanted, devices, ticks), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _new_readings(device_id: str, since_ms: int) -> list[dict[str, Any]]:
        return get_store().raw(device_id=device_id, metric=None, start_ms=since_ms, end_ms=None, limit=5000)

    async def _events(request: Request, p: Any, wanted: list[str], devices: list[str],
                      ticks: int | None) -> AsyncIterator[bytes]:
        cursors = {d: int(time.time() * 1000) - 60_000 for d in devices}
        yield b"retry: 2000\n\n"
        n = 0
        while not await request.is_disconnected() and (ticks is None or n < ticks):
            n += 1
            tick = time.monotonic()
            if "stats" in wanted:
                yield _event("stats", await stats(p))
            if "alerts" in wanted:
                rows = await run_in_threadpool(active_alerts, p, None)
                counts = dict.fromkeys(_SEVERITIES, 0)
                for a in rows:
                    counts[a["severity"]] = counts.get(a["severity"], 0) + 1
                yield _event("alerts", {"active": len(rows), **counts})
            for dev in devices:
                rows = await run_in_threadpool(_new_readings, dev, cursors[dev] + 1)
                if rows:
                    cursors[dev] = max(row["ts_ms"] for row in rows)
                    rows.reverse()
                yield _event("readings", {"device_id": dev, "rows": rows})
            if ticks is None or n < ticks:
                await asyncio.sleep(max(0.05, TICK_S - (time.monotonic() - tick)))


def _event(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _enc.encode(data) + b"\n\n"


def _when(value: str, name: str, now_ms: int) -> int:
    """A time parameter: relative (``-7d``, ``-15m``, ``-30s``, ``-2h``) or what :func:`parse_time` takes."""
    units = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    if value.startswith("-") and value[-1:] in units and value[1:-1].isdigit():
        return now_ms - int(value[1:-1]) * units[value[-1]]
    ms = parse_time(value, name)
    if ms is None:
        raise HTTPException(400, f"{name}: give a time (RFC 3339, epoch ms, or -7d, -15m, -30s, -2h)")
    return ms
