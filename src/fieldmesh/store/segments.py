"""Raw readings in SQLite as segments: one row per device per batch, its readings in a JSON array.

Why: a row per reading costs SQLite two B-tree inserts per reading (the table and the
``(device_id, ts_ms)`` index), about 6 µs of CPU, more than the whole budget of the processor per
reading (``bench/store_layout.py`` measures it beside this layout). Raw readings are written once and
read by device and time, so they are stored the way they are read: per device, in segments of the
readings one batch brought, each with its event-time range, indexed by ``(device_id, max_ts_ms)``.
The per-reading work is one JSON encode in C (msgspec); ``measurements`` are embedded as the gateway
already encoded them (``ReadingColumns.measurements_json``).

Readers lose nothing: ``readings`` is a view with the same columns as the old table, so
``fieldmesh query "SELECT ... FROM readings"`` works as before; :func:`raw_query` (the API) first
picks segments by device and time range through the index, then unpacks only those.

A store written before this layout keeps its ``readings`` table under the name ``readings_rows``;
the view reads both (no rewrite on open).
"""

from __future__ import annotations

import sqlite3
from typing import Any, Final

import msgspec
import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.batch import ReadingColumns

__all__ = ["SCHEMA", "append", "migrate_rows_table", "raw_query", "view_sql"]

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS segments (
    sid INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL,
    min_ts_ms INTEGER NOT NULL,
    max_ts_ms INTEGER NOT NULL,
    n INTEGER NOT NULL,              -- readings in the segment
    stored_ms INTEGER NOT NULL,
    -- JSON array of [id, ts_ms, seq, boot_id, event_id, measurements, meta, received_ms, enrichment]
    rows TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS segments_device_ts ON segments (device_id, max_ts_ms);
"""

#: Row number of a reading in the view: ``2**62 + (sid << 20) + position`` (a segment holds < 2**20
#: readings), above every rid of a pre-segment ``readings_rows`` table, so order by rid is arrival order.
_SEG_BITS: Final = 20
_RID: Final = f"((1 << 62) + (s.sid << {_SEG_BITS}) + j.key)"
_COLUMNS: Final = (
    "rid, id, device_id, ts_ms, seq, boot_id, event_id, measurements, meta, received_ms, stored_ms, enrichment"
)
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(str | None).decode


def view_sql(*, legacy: bool) -> str:
    """The ``readings`` view over the segments (and the pre-segment table when ``legacy``)."""
    seg = (
        f"SELECT {_RID} AS rid, j.value->>0 AS id, s.device_id, j.value->>1 AS ts_ms,"
        " j.value->>2 AS seq, j.value->>3 AS boot_id, j.value->>4 AS event_id, j.value->>5 AS measurements,"
        " j.value->>6 AS meta, j.value->>7 AS received_ms, s.stored_ms, j.value->>8 AS enrichment"
        " FROM segments s, json_each(s.rows) j"
    )
    if legacy:
        seg = f"SELECT {_COLUMNS} FROM readings_rows UNION ALL {seg}"
    return f"CREATE VIEW readings ({_COLUMNS}) AS {seg}"


def migrate_rows_table(con: sqlite3.Connection) -> bool:
    """Turn a row-per-reading ``readings`` table into ``readings_rows`` behind the view; True if it did.

    Runs inside the caller's transaction. Nothing is rewritten: the old rows stay where they are.
    """
    kind = con.execute("SELECT type FROM sqlite_master WHERE name = 'readings'").fetchone()
    legacy = con.execute("SELECT 1 FROM sqlite_master WHERE name = 'readings_rows'").fetchone() is not None
    if kind is not None and kind[0] == "table":
        con.execute("ALTER TABLE readings RENAME TO readings_rows")
        legacy = True
    elif kind is not None:
        return False
    con.execute(view_sql(legacy=legacy))
    return legacy


def _objects_or_none(a: NDArray[np.object_] | None, rows: NDArray[np.intp]) -> list[Any]:
    return [None] * len(rows) if a is None else a[rows].tolist()


def append(
    con: sqlite3.Connection, cols: ReadingColumns, store_key: NDArray[np.int64], stored_ms: int
) -> int:
    """Append the readings of ``cols`` (stored under ``store_key``) as one segment per device; return segments.

    Readings keep their batch order within a segment.
    """
    n = len(cols)
    if not n:
        return 0
    order = np.argsort(cols.device, kind="stable")
    dev_sorted = cols.device[order]
    starts = np.flatnonzero(np.r_[True, dev_sorted[1:] != dev_sorted[:-1]])
    ends = np.r_[starts[1:], n]
    seq: NDArray[Any] = cols.seq[order]
    if seq.min() < 0:  # no seq: None, set over the column (no Python step per reading)
        none = seq < 0
        seq = seq.astype(object)
        seq[none] = None
    boot_of = np.array((*cols.boots, None), dtype=object)  # code -1 picks the trailing None
    rows = list(zip(
        store_key[order].tolist(), cols.ts_ms[order].tolist(), seq.tolist(), boot_of[cols.boot[order]].tolist(),
        _objects_or_none(cols.event_id, order),
        map(msgspec.Raw, cols.measurements_json[order].tolist()),
        _objects_or_none(cols.meta, order), cols.received_ms[order].tolist(),
        _objects_or_none(cols.enrichment, order),
        strict=True,
    ))
    ts = cols.ts_ms[order]
    mins = np.minimum.reduceat(ts, starts).tolist()
    maxs = np.maximum.reduceat(ts, starts).tolist()
    devices = cols.devices
    con.executemany(
        "INSERT INTO segments (device_id, min_ts_ms, max_ts_ms, n, stored_ms, rows) VALUES (?,?,?,?,?,?)",
        [
            (devices[d], lo, hi, e - s, stored_ms, _enc.encode(rows[s:e]).decode())
            for d, lo, hi, s, e in zip(
                dev_sorted[starts].tolist(), mins, maxs, starts.tolist(), ends.tolist(), strict=True
            )
        ],
    )
    return len(starts)


def raw_query(
    con: sqlite3.Connection,
    *,
    device_id: str | None,
    metric: str | None,
    start_ms: int | None,
    end_ms: int | None,
    limit: int,
) -> list[tuple[Any, ...]]:
    """``(device_id, ts_ms, seq, boot_id, event_id, measurements, meta, received_ms, enrichment)`` rows,
    newest first (ties in arrival order), ``measurements``, ``meta`` and ``enrichment`` as JSON text;
    segments chosen by the index first.

    (The ``readings`` view gives text columns with SQLite's ``->>``, which ends a string at an escaped
    NUL character; this query does not.)
    """
    seg_where: list[str] = []
    params: list[Any] = []
    if device_id is not None:
        seg_where.append("s.device_id = ?")
        params.append(device_id)
    if start_ms is not None:
        seg_where.append("s.max_ts_ms >= ?")
        params.append(start_ms)
    if end_ms is not None:
        seg_where.append("s.min_ts_ms < ?")
        params.append(end_ms)
    row_where: list[str] = []
    if start_ms is not None:
        row_where.append("ts_ms >= ?")
        params.append(start_ms)
    if end_ms is not None:
        row_where.append("ts_ms < ?")
        params.append(end_ms)
    if metric is not None:
        row_where.append("json_type(measurements, ?) IS NOT NULL")
        params.append(f'$."{metric}"')
    legacy = con.execute("SELECT 1 FROM sqlite_master WHERE name = 'readings_rows'").fetchone() is not None
    inner = (
        f"SELECT {_RID} AS rid, s.device_id, j.value->>1 AS ts_ms, j.value->>2 AS seq,"
        " j.value->3 AS boot_id, j.value->4 AS event_id, j.value->>5 AS measurements, j.value->>6 AS meta,"
        " j.value->>7 AS received_ms, j.value->>8 AS enrichment FROM segments s, json_each(s.rows) j"
        + (" WHERE " + " AND ".join(seg_where) if seg_where else "")
    )
    if legacy:
        old_where = [w.replace("s.max_ts_ms", "ts_ms").replace("s.min_ts_ms", "ts_ms").replace("s.", "")
                     for w in seg_where]
        old_params = params[: len(seg_where)]
        inner = (
            "SELECT rid, device_id, ts_ms, seq, json_quote(boot_id) AS boot_id, json_quote(event_id) AS event_id,"
            " measurements, meta, received_ms, enrichment FROM readings_rows"
            + (" WHERE " + " AND ".join(old_where) if old_where else "")
            + " UNION ALL " + inner
        )
        params = old_params + params
    sql = (
        "SELECT device_id, ts_ms, seq, boot_id, event_id, measurements, meta, received_ms, enrichment"
        f" FROM ({inner})" + (" WHERE " + " AND ".join(row_where) if row_where else "")
        + " ORDER BY ts_ms DESC, rid LIMIT ?"
    )
    # boot_id and event_id travel as JSON text: SQLite's ->> would cut a string at an escaped NUL
    return [
        (d, t, sq, _dec(b), _dec(e), *rest) for d, t, sq, b, e, *rest in con.execute(sql, (*params, limit))
    ]
