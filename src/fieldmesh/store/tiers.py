"""Hot tiers with retention, and reads across the hot store and the lake (docs/lake.md).

**Retention** (:func:`prune`): raw readings older than ``raw_days``, 1-minute rollups older than
``rollup_1m_days`` and 1-hour rollups older than ``rollup_1h_days`` (0: kept forever) leave the hot
store, but only rows the lake holds: never the only copy.

Which rows the lake holds is read from the lake itself, not inferred: the hot store's rows carry no bus
position, so a lake commit's positions cannot say which rows it covers (a reading stored late into an
old day, a window corrected by a late reading). So retention reads each lake table at its current
snapshot (:func:`fieldmesh.store.lake.committed_snapshots`: the sink never rolls a table back) and deletes

* a raw reading only when its identity key is in the lake's ``readings`` (SQLite deletes whole segments,
  so a segment goes when every reading in it is there);
* a rollup row only when the lake's row for the same window has the same count and exact sum; the delete
  repeats that condition, so a row a late reading changed meanwhile stays.

Everything else stays (counted as ``held``) and is tried again at the next run. With the lake off,
:func:`prune` refuses unless ``without_lake`` says the rows may be lost.

**The boundary.** Before it deletes, :func:`prune` records per tier the cut it prunes at (table
``tier_cuts``). Every hot row at or after the cut is still in the hot store; older ones are in the lake
(and perhaps, not yet verified, still in the hot store). :class:`TieredReads` answers the API's and
``fieldmesh query``'s reads from that: ranges at or after the cut from the hot store alone; older raw
readings from the lake **and** what the hot store still holds there, each identity key once; older
rollup windows from the lake (its rows are the merged values; a hot row below the cut is either the same
or not yet committed to the lake, at most one commit interval behind).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.errors import BackendError, ConfigError, FieldmeshError
from fieldmesh.core.settings import RetentionSettings
from fieldmesh.store.base import INTERVALS, HotStore, QueryResult, SqlTxn
from fieldmesh.store.lake import committed_snapshots
from fieldmesh.store.rows import iso, raw_row, rollup_row

if TYPE_CHECKING:
    import pyarrow as pa
    from pyiceberg.catalog import Catalog

__all__ = [
    "TIERS", "LakeCopy", "RetentionLoop", "TierReport", "TieredReads", "boundaries", "cuts", "prune",
    "retention_state", "tiered_query",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

TIERS: Final = ("raw", "rollup_1m", "rollup_1h")
_DAY_MS: Final = 86_400_000
_ALIGN: Final = {"raw": 60_000, "rollup_1m": 60_000, "rollup_1h": 3_600_000}
_CHUNK: Final = 20_000  # rows or segments per statement / transaction
_MIN_MS: Final = -(2**53)
_MAX_MS: Final = 2**53
#: per tier: the cut it was last pruned at, when, the rows deleted in all, and those held at the last run
_CUTS_DDL: Final = {
    "sqlite": "CREATE TABLE IF NOT EXISTS tier_cuts (tier TEXT PRIMARY KEY, cut_ms INTEGER NOT NULL,"
              " pruned_ms INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, held INTEGER NOT NULL DEFAULT 0)",
    "postgresql": "CREATE TABLE IF NOT EXISTS tier_cuts (tier TEXT PRIMARY KEY, cut_ms BIGINT NOT NULL,"
                  " pruned_ms BIGINT NOT NULL, deleted BIGINT NOT NULL DEFAULT 0, held BIGINT NOT NULL DEFAULT 0)",
}
_dec = msgspec.json.Decoder()

Transact = Callable[[Callable[[SqlTxn], Any]], Any]


def _dialect(store: HotStore) -> str:
    return "sqlite" if store.url.split(":", 1)[0].lower() == "sqlite" else "postgresql"


def _read(store: HotStore, sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
    """A read through the store's read-only query path (``?`` placeholders on both backends)."""
    if _dialect(store) == "postgresql":
        sql = sql.replace("?", "%s")
    return store.query(sql, params).rows


def cuts(settings: RetentionSettings, now_ms: int) -> dict[str, int]:
    """Per tier with a retention, the time before which its rows may leave the hot store (aligned to the
    tier's window, so a rollup window is on one side)."""
    days = {"raw": settings.raw_days, "rollup_1m": settings.rollup_1m_days, "rollup_1h": settings.rollup_1h_days}
    return {t: (now_ms - int(d * _DAY_MS)) // _ALIGN[t] * _ALIGN[t] for t, d in days.items() if d > 0}


def boundaries(store: HotStore) -> dict[str, int]:
    """The cut each tier was last pruned at (none: the hot store holds everything of that tier)."""
    try:
        return {str(t): int(c) for t, c in store.query("SELECT tier, cut_ms FROM tier_cuts").rows}
    except ConfigError:  # no table: never pruned
        return {}


def retention_state(store: HotStore) -> dict[str, dict[str, Any]]:
    """Per tier pruned: its cut, when it was last pruned, rows deleted in all and held at the last run (``/stats``)."""
    try:
        rows = store.query("SELECT tier, cut_ms, pruned_ms, deleted, held FROM tier_cuts ORDER BY tier").rows
    except ConfigError:
        return {}
    return {str(t): {"cut": iso(int(c)), "pruned_at": iso(int(p)), "deleted": int(d), "held": int(h)}
            for t, c, p, d, h in rows}


@dataclass(frozen=True, slots=True)
class TierReport:
    """What one prune did (or, dry, would do) to one tier."""

    tier: str
    cut_ms: int
    candidates: int  # hot rows older than the cut
    deleted: int  # of them, in the lake and deleted (dry run: would be)
    held: int  # of them, not (yet) in the lake: kept
    dry_run: bool

    def as_dict(self) -> dict[str, Any]:
        """JSON form (with the cut as RFC 3339)."""
        return {**asdict(self), "cut": iso(self.cut_ms)}


class LakeCopy:
    """What the lake holds for good: each table read at its current snapshot."""

    def __init__(self, catalog: Catalog, namespace: str) -> None:
        self.catalog = catalog
        self.namespace = namespace
        self.flush, self.snapshots = committed_snapshots(catalog, namespace)

    def _scan(self, table: str, where: Any, fields: tuple[str, ...]) -> pa.Table | None:
        snap = self.snapshots.get(table)
        if snap is None:
            return None
        t = self.catalog.load_table(f"{self.namespace}.{table}")
        return t.scan(row_filter=where, selected_fields=fields, snapshot_id=snap).to_arrow()

    def keys(self, lo_ms: int, hi_ms: int) -> NDArray[np.int64]:
        """Identity keys of the lake's readings with ``lo_ms <= ts < hi_ms``, sorted."""
        data = self._scan("readings", _ts_range("ts", lo_ms, hi_ms), ("key",))
        if data is None or not data.num_rows:
            return np.zeros(0, np.int64)
        return np.sort(np.asarray(data.column("key").to_numpy(), dtype=np.int64))

    def rollups(self, table: str, lo_ms: int, hi_ms: int) -> dict[tuple[str, str, int], tuple[int, str]]:
        """(device, metric, window_start_ms) -> (count, sum_exact) of the lake's windows in ``[lo_ms, hi_ms)``."""
        data = self._scan(table, _ts_range("window_start", lo_ms, hi_ms),
                          ("device_id", "metric", "window_start", "count", "sum_exact"))
        if data is None or not data.num_rows:
            return {}
        ws = (np.asarray(data.column("window_start").cast("int64").to_numpy()) // 1000).tolist()
        return dict(zip(zip(data.column("device_id").to_pylist(), data.column("metric").to_pylist(), ws, strict=True),
                        zip(data.column("count").to_pylist(), data.column("sum_exact").to_pylist(), strict=True),
                        strict=True))


class _LakeOnFirstRead(LakeCopy):
    """A :class:`LakeCopy` opened at its first read: a prune that finds nothing old enough to delete never opens
    the lake, so the processor does not load pyiceberg and pyarrow for it (about 75 MB of libraries resident
    from then on)."""

    def __init__(self, open_lake: Callable[[], LakeCopy]) -> None:  # (no super().__init__: nothing opened yet)
        self._open = open_lake
        self._lake: LakeCopy | None = None

    def _get(self) -> LakeCopy:
        if self._lake is None:
            self._lake = self._open()
        return self._lake

    def keys(self, lo_ms: int, hi_ms: int) -> NDArray[np.int64]:
        return self._get().keys(lo_ms, hi_ms)

    def rollups(self, table: str, lo_ms: int, hi_ms: int) -> dict[tuple[str, str, int], tuple[int, str]]:
        return self._get().rollups(table, lo_ms, hi_ms)


def _ts_range(col: str, lo_ms: int, hi_ms: int) -> Any:
    from pyiceberg.expressions import And, GreaterThanOrEqual, LessThan

    return And(GreaterThanOrEqual(col, lo_ms * 1000), LessThan(col, hi_ms * 1000))  # type: ignore[call-arg,misc]


def _days(lo_ms: int, cut_ms: int, span_ms: int = _DAY_MS) -> Iterator[tuple[int, int]]:
    """``[start, end)`` spans of at most one UTC day (or ``span_ms``) from ``lo_ms`` up to ``cut_ms``."""
    start = lo_ms
    while start < cut_ms:
        end = min((start // span_ms + 1) * span_ms, cut_ms)
        yield start, end
        start = end


# ---- retention --------------------------------------------------------------------------------


def prune(store: HotStore, *, settings: RetentionSettings, lake: LakeCopy | None, now_ms: int | None = None,
          dry_run: bool = False, transact: Transact | None = None) -> list[TierReport]:
    """Delete what each tier keeps no longer and the lake holds (module docstring); one report per tier pruned.

    ``transact`` runs the deleting transactions (default ``store.transact``; the processor passes its own,
    so they take turns with its batches). Reads go through the store's read-only query path.

    Raises:
        ConfigError: the lake is off (``lake`` None) and ``settings.without_lake`` is not set.
    """
    todo = cuts(settings, int(time.time() * 1000) if now_ms is None else now_ms)
    if not todo:
        return []
    if lake is None and not settings.without_lake:
        raise ConfigError(
            "retention with the lake off would delete the only copy of old readings and rollups: turn the lake "
            "on, or allow the loss with --without-lake (FIELDMESH__RETENTION__WITHOUT_LAKE=true)",
            key="RETENTION__WITHOUT_LAKE")
    run: Transact = transact if transact is not None else store.transact
    dialect = _dialect(store)
    if not dry_run:
        def record(tx: SqlTxn) -> None:
            tx.execute(_CUTS_DDL[tx.dialect])
            bigger = "max" if tx.dialect == "sqlite" else "GREATEST"
            tx.executemany(
                "INSERT INTO tier_cuts (tier, cut_ms, pruned_ms) VALUES (?, ?, ?) ON CONFLICT (tier) DO UPDATE SET"
                f" cut_ms = {bigger}(tier_cuts.cut_ms, excluded.cut_ms), pruned_ms = excluded.pruned_ms",
                [(t, c, int(time.time() * 1000)) for t, c in sorted(todo.items())])

        run(record)  # first: a read never meets a deleted row on the hot side of its boundary
    out = []
    for tier, cut in todo.items():
        if tier == "raw":
            fn = _prune_segments if dialect == "sqlite" else _prune_rows
            out.append(fn(store, cut, lake, dry_run, run))
        else:
            out.append(_prune_rollups(store, tier, cut, lake, dry_run, run))
    if not dry_run:
        def tally(tx: SqlTxn) -> None:
            tx.executemany("UPDATE tier_cuts SET deleted = deleted + ?, held = ? WHERE tier = ?",
                           [(r.deleted, r.held, r.tier) for r in out])

        run(tally)
    return out


#: The last segment a prune may delete: rolled up (``meta.rollups_sid``), and not the last one.
_SEGMENTS_ROLLED_UP: Final = (
    "SELECT min(coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'rollups_sid'), 0),"
    " coalesce((SELECT max(sid) FROM segments), 0) - 1)"
)


def _prune_segments(store: HotStore, cut: int, lake: LakeCopy | None, dry: bool, run: Transact) -> TierReport:
    """SQLite: raw readings live in segments (:mod:`fieldmesh.store.segments`); whole segments older than the
    cut go, when every reading in them is in the lake.

    Never a segment whose readings are not in the rollup rows yet (above ``meta.rollups_sid``: the writer holds
    their deltas, or reads them back from there), nor the last segment (``sid`` must keep counting up); those
    are held, and go at a later prune."""
    # devices drive the join so that the (device_id, max_ts_ms) index picks each device's old segments
    segs = _read(store, "SELECT s.sid, s.min_ts_ms, s.max_ts_ms, s.n FROM devices d JOIN segments s"
                        " ON s.device_id = d.device_id AND s.max_ts_ms < ? ORDER BY s.max_ts_ms", [cut])
    candidates = sum(int(r[3]) for r in segs)
    if not segs:
        return TierReport("raw", cut, 0, 0, 0, dry)
    arr = np.array(segs, dtype=np.int64)
    ((upto,),) = _read(store, _SEGMENTS_ROLLED_UP, [])
    arr = arr[arr[:, 0] <= int(upto)]
    deleted = 0
    day = arr[:, 2] // _DAY_MS
    for d in np.unique(day).tolist():
        group = arr[day == d]
        if lake is None:
            ok = group[:, 0]
        else:
            keys = lake.keys(int(group[:, 1].min()), int(group[:, 2].max()) + 1)
            ok_parts = []
            for s in range(0, len(group), _CHUNK // 10):
                sids = group[s : s + _CHUNK // 10, 0]
                rows = _read(store, "SELECT s.sid, j.value->>0 FROM segments s, json_each(s.rows) j"
                                    " WHERE s.sid IN (SELECT value FROM json_each(?))",
                             [msgspec.json.encode(sids.tolist()).decode()])
                if not rows:
                    continue
                pairs = np.array(rows, dtype=np.int64)
                missing = np.unique(pairs[~np.isin(pairs[:, 1], keys), 0])
                ok_parts.append(np.setdiff1d(sids, missing))
            ok = np.concatenate(ok_parts) if ok_parts else np.zeros(0, np.int64)
        n_ok = int(group[np.isin(group[:, 0], ok), 3].sum())
        if not dry:
            for s in range(0, len(ok), _CHUNK):
                part = msgspec.json.encode(ok[s : s + _CHUNK].tolist()).decode()

                def delete(tx: SqlTxn, part: str = part) -> None:
                    tx.execute(f"DELETE FROM segments WHERE sid IN (SELECT value FROM json_each(?))"
                               f" AND sid <= ({_SEGMENTS_ROLLED_UP})", [part])

                run(delete)
        deleted += n_ok
    return TierReport("raw", cut, candidates, deleted, candidates - deleted, dry)


def _prune_rows(store: HotStore, cut: int, lake: LakeCopy | None, dry: bool, run: Transact) -> TierReport:
    """PostgreSQL: raw readings are rows (day partitions); a row older than the cut goes when its key is in
    the lake."""
    (lo,), = _read(store, "SELECT min(ts_ms) FROM readings WHERE ts_ms < ?", [cut])
    if lo is None:
        return TierReport("raw", cut, 0, 0, 0, dry)
    candidates = deleted = 0
    for day_a, day_b in _days(int(lo), cut):
        keys = None if lake is None else lake.keys(day_a, day_b)  # one lake scan a day
        for a, b in _days(day_a, day_b, 3_600_000):  # the hot keys an hour at a time (a day's: tens of millions)
            ids = np.array([r[0] for r in _read(store, "SELECT id FROM readings WHERE ts_ms >= ? AND ts_ms < ?",
                                                [a, b])], dtype=np.int64)
            candidates += len(ids)
            ok = ids if keys is None else ids[np.isin(ids, keys)]
            if not dry:
                for s in range(0, len(ok), _CHUNK):
                    part = ok[s : s + _CHUNK].tolist()

                    def delete(tx: SqlTxn, part: list[int] = part, a: int = a, b: int = b) -> None:
                        tx.execute("DELETE FROM readings WHERE ts_ms >= ? AND ts_ms < ? AND id = ANY(?::bigint[])",
                                   [a, b, part])

                    run(delete)
            deleted += len(ok)
    return TierReport("raw", cut, candidates, deleted, candidates - deleted, dry)


def _prune_rollups(store: HotStore, tier: str, cut: int, lake: LakeCopy | None, dry: bool,
                   run: Transact) -> TierReport:
    """Rollup rows of windows before the cut go when the lake has the same window with the same count and exact
    sum; the delete repeats that condition in its transaction (a late reading may change a row meanwhile)."""
    # (device, metric) pairs drive the join: each pair's old windows are a range of the primary key
    join = f"FROM device_metrics dm JOIN {tier} r ON r.device_id = dm.device_id AND r.metric = dm.metric"
    (lo,), = _read(store, f"SELECT min(r.window_start_ms) {join} AND r.window_start_ms < ?", [cut])
    if lo is None:
        return TierReport(tier, cut, 0, 0, 0, dry)
    candidates = deleted = 0
    for a, b in _days(int(lo), cut):
        rows = _read(store, f"SELECT r.device_id, r.metric, r.window_start_ms, r.count, r.sum_exact {join}"
                            " AND r.window_start_ms >= ? AND r.window_start_ms < ?", [a, b])
        candidates += len(rows)
        if lake is None:
            ok = rows
        else:
            have = lake.rollups(tier, a, b)
            ok = [r for r in rows if have.get((r[0], r[1], int(r[2]))) == (int(r[3]), r[4])]
        if not dry:
            for s in range(0, len(ok), _CHUNK):
                part = [tuple(r) for r in ok[s : s + _CHUNK]]

                def delete(tx: SqlTxn, part: list[tuple[Any, ...]] = part) -> None:
                    if tx.dialect == "sqlite":
                        tx.executemany(f"DELETE FROM {tier} WHERE device_id = ? AND metric = ? AND window_start_ms = ?"
                                       " AND count = ? AND sum_exact = ?", part)
                        return
                    cols = list(zip(*part, strict=True))
                    tx.execute(
                        f"DELETE FROM {tier} r USING unnest(?::text[], ?::text[], ?::bigint[], ?::bigint[], ?::text[])"
                        " AS j(d, m, w, c, s) WHERE r.device_id = j.d AND r.metric = j.m AND r.window_start_ms = j.w"
                        " AND r.count = j.c AND r.sum_exact = j.s", [list(c) for c in cols])

                run(delete)
        deleted += len(ok)
    return TierReport(tier, cut, candidates, deleted, candidates - deleted, dry)


class RetentionLoop:
    """Retention on a schedule inside ``fieldmesh up``'s processor: a thread that prunes every ``interval_s``
    (the first run a minute after the start, or one interval when that is shorter). Failures are logged and
    tried again at the next interval."""

    def __init__(self, store: HotStore, *, settings: RetentionSettings, open_lake: Callable[[], LakeCopy] | None,
                 transact: Transact | None = None, first_after_s: float = 60.0) -> None:
        self.store = store
        self.settings = settings
        self.open_lake = open_lake
        self.transact = transact
        self.runs = 0
        self.last: list[TierReport] = []
        self._stop = threading.Event()
        self._first = min(first_after_s, settings.interval_s)
        self._thread = threading.Thread(target=self._loop, name="fm-retention", daemon=True)

    def start(self) -> RetentionLoop:
        """Start the thread (nothing when retention is off or nothing has a retention)."""
        s = self.settings
        if s.interval_s <= 0 or not cuts(s, 0):
            return self
        if self.open_lake is None and not s.without_lake:
            log.warning("retention: off, the lake is off and the hot store holds the only copy "
                        "(FIELDMESH__RETENTION__WITHOUT_LAKE=true deletes old rows anyway)")
            return self
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (a prune under way finishes its current transaction first)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def run_once(self) -> list[TierReport]:
        """One prune now."""
        lake = _LakeOnFirstRead(self.open_lake) if self.open_lake is not None else None
        self.last = prune(self.store, settings=self.settings, lake=lake, transact=self.transact)
        self.runs += 1
        return self.last

    def _loop(self) -> None:
        wait = self._first
        while not self._stop.wait(wait):
            wait = self.settings.interval_s
            try:
                reports = self.run_once()
                log.info("retention: %s", ", ".join(f"{r.tier} before {iso(r.cut_ms)}: {r.deleted} deleted, "
                                                    f"{r.held} held (not in the lake yet)" for r in reports))
            except Exception as exc:
                log.warning("retention failed (%s: %s); trying again in %.0fs", type(exc).__name__, exc, wait)


# ---- reads across tiers --------------------------------------------------------------------------


class TieredReads:
    """The hot store's ``raw`` and ``rollups`` reads, answered across the hot store and the lake (module
    docstring). Without a lake, or for ranges the hot store holds whole, they are the hot store's reads."""

    def __init__(self, store: HotStore, *, open_catalog: Callable[[], Catalog] | None, namespace: str = "fieldmesh",
                 boundary_ttl_s: float = 2.0) -> None:
        self.store = store
        self.namespace = namespace
        self._open_catalog = open_catalog
        self._catalog: Catalog | None = None
        self._ttl = boundary_ttl_s
        self._cuts: tuple[float, dict[str, int]] = (-1e9, {})
        self._lock = threading.Lock()

    def boundaries(self) -> dict[str, int]:
        """:func:`boundaries`, cached for a moment."""
        with self._lock:
            at, value = self._cuts
            if time.monotonic() - at < self._ttl:
                return value
        value = boundaries(self.store)
        with self._lock:
            self._cuts = (time.monotonic(), value)
        return value

    def _lake_table(self, name: str) -> Any:
        if self._open_catalog is None:
            return None
        if self._catalog is None:
            self._catalog = self._open_catalog()
        ident = f"{self.namespace}.{name}"
        if not self._catalog.table_exists(ident):
            return None
        return self._catalog.load_table(ident)

    def _below(self, tier: str, start_ms: int | None) -> int | None:
        """The tier's cut when the range reaches below it and a lake is there to read (else None)."""
        if self._open_catalog is None:
            return None
        cut = self.boundaries().get(tier)
        if cut is None or (start_ms is not None and start_ms >= cut):
            return None
        return cut

    def raw(self, *, device_id: str | None, metric: str | None, start_ms: int | None, end_ms: int | None,
            limit: int) -> list[dict[str, Any]]:
        """Readings newest first, as :meth:`HotStore.raw`, older than the raw cut from the lake too."""
        hot = self.store.raw(device_id=device_id, metric=metric, start_ms=start_ms, end_ms=end_ms, limit=limit)
        cut = self._below("raw", start_ms)
        if cut is None or (len(hot) >= limit and hot[-1]["ts_ms"] >= cut):
            return hot  # the newest ``limit`` are all at or after the cut: nothing older can be among them
        lo, hi = _MIN_MS if start_ms is None else start_ms, cut if end_ms is None else min(end_ms, cut)
        try:
            older = self._lake_readings(device_id, metric, lo, hi, limit, self._hot_keys(device_id, lo, hi))
        except FieldmeshError:
            raise
        except Exception as exc:
            raise BackendError(f"the lake could not be read for the range before {iso(cut)}: {exc}") from exc
        if not older:
            return hot
        # hot rows first among equal times (a stable sort), each side newest first already
        merged = sorted([*hot, *older], key=lambda r: -int(r["ts_ms"]))
        return merged[:limit]

    def _hot_keys(self, device_id: str | None, lo: int, hi: int) -> NDArray[np.int64]:
        """Identity keys of what the hot store still holds in ``[lo, hi)`` (below the cut: few)."""
        dev = " AND s.device_id = ?" if device_id is not None else ""
        dev_pg = " AND device_id = ?" if device_id is not None else ""
        params: list[Any] = [lo, hi] + ([device_id] if device_id is not None else [])
        if _dialect(self.store) == "sqlite":
            rows = _read(self.store, "SELECT j.value->>0 FROM segments s, json_each(s.rows) j WHERE s.max_ts_ms >= ?"
                                     f" AND s.min_ts_ms < ?{dev} AND j.value->>1 >= ? AND j.value->>1 < ?",
                         [*params, lo, hi])
        else:
            rows = _read(self.store, f"SELECT id FROM readings WHERE ts_ms >= ? AND ts_ms < ?{dev_pg}", params)
        return np.array([r[0] for r in rows], dtype=np.int64)

    def _lake_readings(self, device_id: str | None, metric: str | None, lo: int, hi: int, limit: int,
                       exclude: NDArray[np.int64]) -> list[dict[str, Any]]:
        import duckdb
        from pyiceberg.expressions import And, EqualTo

        table = self._lake_table("readings")
        if table is None or lo >= hi:
            return []
        where = _ts_range("ts", lo, hi)
        if device_id is not None:
            where = And(where, EqualTo("device_id", device_id))  # type: ignore[call-arg,misc]
        # streamed into DuckDB batch by batch (its top-N keeps ``limit`` rows), not read whole into memory
        data = table.scan(row_filter=where, selected_fields=(
            "device_id", "ts", "received", "key", "seq", "boot_id", "event_id", "measurements", "measurements_json",
            "meta", "enrichment")).to_arrow_batch_reader()
        import pyarrow as pa

        con = duckdb.connect()
        try:
            con.register("lake", data)
            con.register("hot_keys", pa.table({"key": pa.array(exclude, pa.int64())}))
            sql = ("SELECT device_id, epoch_ms(ts) AS ts_ms, seq, boot_id, event_id, measurements_json, meta,"
                   " epoch_ms(received) AS rx, enrichment FROM lake WHERE key NOT IN (SELECT key FROM hot_keys)"
                   + (" AND list_contains(map_keys(measurements), ?)" if metric is not None else "")
                   + " ORDER BY ts DESC, received, key LIMIT ?")
            rows = con.execute(sql, [*([metric] if metric is not None else []), limit]).fetchall()
        finally:
            con.close()
        floats = _dialect(self.store) == "postgresql"  # the PostgreSQL store answers numbers as floats
        out = []
        for dev, ts, seq, boot, ev, ms, meta, rx, enr in rows:
            m = _dec.decode(ms)
            if floats:
                m = {k: v if isinstance(v, bool) else float(v) for k, v in m.items()}
            out.append(raw_row(dev, int(ts), seq, boot, ev, m, None if meta is None else _dec.decode(meta), int(rx),
                               None if enr is None else _dec.decode(enr), metric))
        return out

    def rollups(self, *, interval: str, device_id: str | None, metric: str | None, start_ms: int | None,
                end_ms: int | None, limit: int) -> list[dict[str, Any]]:
        """Rollup rows by device, metric and window, as :meth:`HotStore.rollups`; windows before the tier's cut
        from the lake."""
        if interval not in INTERVALS:
            raise ConfigError(f"interval must be one of {sorted(INTERVALS)}", key="interval")
        name = f"rollup_{interval}"
        cut = self._below(name, start_ms)
        if cut is None:
            return self.store.rollups(interval=interval, device_id=device_id, metric=metric, start_ms=start_ms,
                                      end_ms=end_ms, limit=limit)
        hot: list[dict[str, Any]] = []
        if end_ms is None or end_ms > cut:
            hot = self.store.rollups(interval=interval, device_id=device_id, metric=metric, start_ms=cut,
                                     end_ms=end_ms, limit=limit)
        lo, hi = _MIN_MS if start_ms is None else start_ms, cut if end_ms is None else min(end_ms, cut)
        # Below the cut a window may be in both tiers: the lake's row, and a hot row not pruned yet (the lake
        # had not committed its last change: the hot row has the larger count) or made again by a reading
        # later than the retention (it holds that reading alone: the lake's row has the larger count). A
        # window the lake never got (a lake started after the hot store) is the hot row. Each window once,
        # the row with the larger count.
        best: dict[tuple[str, str, int], dict[str, Any]] = {}
        held = self.store.rollups(interval=interval, device_id=device_id, metric=metric, start_ms=start_ms,
                                  end_ms=hi, limit=limit)
        try:
            older = self._lake_rollups(name, device_id, metric, lo, hi, limit)
        except Exception as exc:
            raise BackendError(f"the lake could not be read for the windows before {iso(cut)}: {exc}") from exc
        for r in [*held, *older]:
            k = (r["device_id"], r["metric"], r["window_start_ms"])
            if k not in best or r["count"] > best[k]["count"]:
                best[k] = r
        merged = sorted([*best.values(), *hot], key=lambda r: (r["device_id"], r["metric"], r["window_start_ms"]))
        return merged[:limit]

    def _lake_rollups(self, name: str, device_id: str | None, metric: str | None, lo: int, hi: int,
                      limit: int) -> list[dict[str, Any]]:
        import duckdb
        from pyiceberg.expressions import And, EqualTo

        table = self._lake_table(name)
        if table is None or lo >= hi:
            return []
        where = _ts_range("window_start", lo, hi)
        if device_id is not None:
            where = And(where, EqualTo("device_id", device_id))  # type: ignore[call-arg,misc]
        if metric is not None:
            where = And(where, EqualTo("metric", metric))  # type: ignore[call-arg,misc]
        data = table.scan(row_filter=where, selected_fields=(  # streamed, as for readings
            "device_id", "metric", "window_start", "count", "sum", "min", "max", "avg")).to_arrow_batch_reader()
        con = duckdb.connect()
        try:
            con.register("lake", data)
            rows = con.execute('SELECT device_id, metric, epoch_ms(window_start), "count", "sum", "min", "max", avg'
                               " FROM lake ORDER BY device_id, metric, window_start LIMIT ?", [limit]).fetchall()
        finally:
            con.close()
        return [rollup_row(d, m, int(ws), int(c), s, mn, mx, a) for d, m, ws, c, s, mn, mx, a in rows]



_VIEW_LIMIT: Final = 2**62


def tiered_query(reads: TieredReads, sql: str, *, start_ms: int | None = None, end_ms: int | None = None,
                 device_id: str | None = None) -> QueryResult:
    """Run ``sql`` (DuckDB's dialect, read-only) over ``readings``, ``rollup_1m`` and ``rollup_1h`` as they are
    across both tiers (:class:`TieredReads`), limited to ``[start_ms, end_ms)`` and ``device_id``.

    Only the tables ``sql`` names are read. Columns: ``readings``: device_id, ts_ms, seq, boot_id, event_id,
    measurements (JSON), meta (JSON), received_ms, enrichment (JSON); the rollups: device_id, metric,
    window_start_ms, count, sum, min, max, avg.
    """
    import re

    import duckdb
    import pyarrow as pa

    con = duckdb.connect()
    try:
        names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", sql.lower()))
        if "readings" in names:
            rows = reads.raw(device_id=device_id, metric=None, start_ms=start_ms, end_ms=end_ms, limit=_VIEW_LIMIT)
            enc = msgspec.json.encode
            con.register("readings", pa.table({
                "device_id": pa.array([r["device_id"] for r in rows], pa.string()),
                "ts_ms": pa.array([r["ts_ms"] for r in rows], pa.int64()),
                "seq": pa.array([r.get("seq") for r in rows], pa.int64()),
                "boot_id": pa.array([r.get("boot_id") for r in rows], pa.string()),
                "event_id": pa.array([r.get("event_id") for r in rows], pa.string()),
                "measurements": pa.array([enc(r["measurements"]).decode() for r in rows], pa.string()),
                "meta": pa.array([enc(r["meta"]).decode() if "meta" in r else None for r in rows], pa.string()),
                "received_ms": pa.array([r["received_ms"] for r in rows], pa.int64()),
                "enrichment": pa.array([enc(r["enrichment"]).decode() if "enrichment" in r else None for r in rows],
                                       pa.string()),
            }))
        for interval in INTERVALS:
            name = f"rollup_{interval}"
            if name not in names:
                continue
            rows = reads.rollups(interval=interval, device_id=device_id, metric=None, start_ms=start_ms,
                                 end_ms=end_ms, limit=_VIEW_LIMIT)
            cols = ("device_id", "metric", "window_start_ms", "count", "sum", "min", "max", "avg")
            types = (pa.string(), pa.string(), pa.int64(), pa.int64(), *[pa.float64()] * 4)
            con.register(name, pa.table({c: pa.array([r[c] for r in rows], t) for c, t in zip(cols, types,
                                                                                              strict=True)}))
        try:
            # the query reads the views: no file, URL or extension, and it cannot turn that back on
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            cur = con.execute(sql)
        except duckdb.Error as exc:
            raise ConfigError(f"query failed: {exc}", key="sql") from None
        columns = [d[0] for d in cur.description] if cur.description else []
        return QueryResult(columns=columns, rows=[tuple(r) for r in cur.fetchall()])
    finally:
        con.close()
