"""The embedded hot store: SQLite in WAL mode.

Why SQLite: one writer (the processor) and any number of readers in other processes (the API,
``fieldmesh query``) work at once without lock errors, because WAL readers see the last committed
snapshot and never block the writer. DuckDB is faster at scans but allows a single process per
database file. Durability: ``synchronous=NORMAL`` in WAL mode, so a commit survives a crash of
any process; a power loss can lose the last commits (they come back from the bus, which keeps
everything past the positions stored here).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from operator import itemgetter
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

import msgspec
import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.batch import BatchResult, ReadingColumns, WindowDeltas
from fieldmesh.core.errors import ConfigError, FieldmeshError, StoreSchemaError
from fieldmesh.core.exact import parse_exact
from fieldmesh.obs.metrics import PROCESSOR_SQLITE_CPU_SECONDS, count_parts
from fieldmesh.store import segments
from fieldmesh.store.base import INTERVALS, DeviceSummary, HotTxn, Position, QueryResult, SqlTxn, StoreStats
from fieldmesh.store.batchrows import answers, device_aggs, write_via_commit
from fieldmesh.store.checkpointer import Checkpointer
from fieldmesh.store.keyblocks import BLOCK_KEYS, KeyBlocks, pack_block, pack_keys, unpack_keys
from fieldmesh.store.keyfilter import KeyFilter
from fieldmesh.store.recentkeys import RecentKeys
from fieldmesh.store.rollup import exact_columns, merge_acc
from fieldmesh.store.rows import device_row, dlq_row, raw_row, rollup_query, rollup_row
from fieldmesh.store.seqgaps import SeqBatch, SeqKey, SeqRange, listing, merge_ranges, range_gaps, seq_batch, seq_spans
from fieldmesh.stream.columnar import combine_windows, window_deltas

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

T = TypeVar("T")
log = logging.getLogger(__name__)

#: 7: rollup rows may lag the segments (``meta.rollups_sid``, :meth:`SqliteStore.flush`); a store of version 6
#: has every rollup written, so its mark starts at its last segment.
#: 2 added ``seqs`` and ``seq_ranges`` (sequence gaps); 3 added ``idents.origin`` (the bus record that
#: claimed the key, so a replay decides as before); 4 added ``idents_recent`` (new keys land there first,
#: see :meth:`SqliteStore._fold_keys`); 5 packs a commit's new keys in one ``idents_recent`` row. Older
#: stores are migrated on open. 6 packs ``idents`` into sorted blocks of keys (``idents_blocks``,
#: :mod:`fieldmesh.store.keyblocks`).
SCHEMA_VERSION: Final = 7
#: How long the writer keeps a batch's rollup deltas in memory before it writes them, merged with the batches'
#: after it (ms; :meth:`SqliteStore.flush`). 0: each batch writes its own.
ROLLUP_FLUSH_MS: Final = 1000
#: Window deltas held in memory before a flush whatever the time: bounds the writer's memory in a backlog (about
#: 100 bytes an entry, three times that while they are merged). The processor's peak RSS under
#: `bench/e2e.py --overload 60` (bound 300 MB): 291 MB without deferral, 290 at 50,000, 295 at 150,000, 291 at
#: 200,000, 304 at 250,000 (one run each: a few MB is noise). Fewer, larger flushes write each rollup page fewer
#: times: `bench/processor.py` was about 5% faster at 200,000 than at 50,000 (two runs each, 2026-12-06).
_PENDING_MAX: Final = 150_000
#: ``idents_recent`` is folded into ``idents_blocks`` once it holds this many keys and an eighth as many as it
#: (or ``_FOLD_MAX``: the writer holds its keys in memory, 24 bytes each).
_FOLD_MIN: Final = 131_072
_FOLD_MAX: Final = 2_097_152
#: Rows of ``idents_recent`` (each the keys one commit claimed) of folded generations deleted per commit.
_PURGE_ROWS: Final = 4
#: Seq ranges kept in memory (they spare a read-back per device and boot); past it the cache starts over.
_CACHE_MAX: Final = 131_072
#: (device, metric) pairs whose latest rollup window is kept in memory, per interval (~200 bytes each);
#: past it the map starts over (each pair is then read again, one index seek, when next touched).
_LATEST_MAX: Final = 1_000_000
#: A rollup window's accumulator as written: (window start, count, m, e, min, max).
_Acc = tuple[int, int, int, int, float, float]
#: "No window stored" for a pair.
_NO_WINDOW: Final = -(2**63)
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Identities of stored readings: de-duplication looks them up here. A key is a 63-bit identity key, its
-- check value (tells duplicates from key collisions) and origin ((offset << 12) | partition of the record
-- that claimed it; -1: unknown). Folded keys: sorted blocks (fieldmesh.store.keyblocks), a block the ids
-- from its `lo` to the next block's; `keys` packs them as int64 little-endian (id, chk, origin) triples, ids
-- ascending. (Before version 6: `idents`, a row per key.)
CREATE TABLE IF NOT EXISTS idents_blocks (
    lo INTEGER PRIMARY KEY,
    keys BLOB NOT NULL
);
-- New identities land here first and are folded into `idents_blocks` in key order, many commits at a time:
-- random keys added straight to a large keyed table dirty nearly every leaf page at every commit. A key is in
-- one of the two tables (or, folded, in both alike until its generation's rows go). In arrival order, a
-- row per commit that claimed keys: `keys` packs them (fieldmesh.store.keyblocks.pack_keys), so a commit
-- writes a few pages at the table's end and no row per key; the writer answers lookups of these keys from
-- memory (fieldmesh.store.recentkeys). `n` counts up (a VACUUM keeps it); meta's idents_* keys say which
-- rows are which generation.
CREATE TABLE IF NOT EXISTS idents_recent (
    n INTEGER PRIMARY KEY,
    keys BLOB NOT NULL               -- int64 little-endian: the ids, then their chks, then origins (-1: none)
);
-- Raw readings: segments (fieldmesh.store.segments), read through the `readings` view.
CREATE TABLE IF NOT EXISTS rollup_1m (
    device_id TEXT NOT NULL, metric TEXT NOT NULL, window_start_ms INTEGER NOT NULL,
    count INTEGER NOT NULL, sum REAL NOT NULL, min REAL NOT NULL, max REAL NOT NULL, avg REAL NOT NULL,
    sum_exact TEXT NOT NULL,
    PRIMARY KEY (device_id, metric, window_start_ms)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup_1h (
    device_id TEXT NOT NULL, metric TEXT NOT NULL, window_start_ms INTEGER NOT NULL,
    count INTEGER NOT NULL, sum REAL NOT NULL, min REAL NOT NULL, max REAL NOT NULL, avg REAL NOT NULL,
    sum_exact TEXT NOT NULL,
    PRIMARY KEY (device_id, metric, window_start_ms)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, first_seen_ms INTEGER NOT NULL, last_seen_ms INTEGER NOT NULL,
    first_ts_ms INTEGER NOT NULL, last_ts_ms INTEGER NOT NULL, readings INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS device_metrics (
    device_id TEXT NOT NULL, metric TEXT NOT NULL, PRIMARY KEY (device_id, metric)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dlq (
    id INTEGER PRIMARY KEY AUTOINCREMENT, reason TEXT NOT NULL, detail TEXT NOT NULL, topic TEXT NOT NULL,
    device_id TEXT, received_ms INTEGER NOT NULL, payload BLOB NOT NULL, truncated INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dlq_reason ON dlq (reason, id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS positions (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS watermarks (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, ts_ms INTEGER NOT NULL, PRIMARY KEY (topic, partition)
) WITHOUT ROWID;
-- Sequence gaps (fieldmesh.store.seqgaps): the distinct seqs stored per device and boot, and their ranges.
CREATE TABLE IF NOT EXISTS seqs (
    device_id TEXT NOT NULL, boot_id TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (device_id, boot_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seq_ranges (
    device_id TEXT NOT NULL, boot_id TEXT NOT NULL, min_seq INTEGER NOT NULL, max_seq INTEGER NOT NULL,
    n INTEGER NOT NULL,
    listed INTEGER NOT NULL,         -- 1: every seq of the key is in seqs (it has readings with event_id)
    PRIMARY KEY (device_id, boot_id)
) WITHOUT ROWID;
"""
#: Version 1 -> 2: the seq set, ranges and gap count of the readings already stored.
_MIGRATE_1_2 = """
INSERT OR REPLACE INTO seq_ranges
    SELECT device_id, coalesce(boot_id, ''), min(seq), max(seq), count(DISTINCT seq), max(event_id IS NOT NULL)
    FROM readings WHERE seq IS NOT NULL GROUP BY 1, 2;
INSERT OR IGNORE INTO seqs SELECT r.device_id, g.boot_id, r.seq FROM readings r JOIN seq_ranges g
    ON g.device_id = r.device_id AND g.boot_id = coalesce(r.boot_id, '') WHERE g.listed AND r.seq IS NOT NULL;
INSERT INTO counters VALUES ('gaps', (SELECT coalesce(sum(max_seq - min_seq + 1 - n), 0) FROM seq_ranges))
    ON CONFLICT(name) DO UPDATE SET value = excluded.value;
UPDATE meta SET value = '2' WHERE key = 'schema_version';
"""
#: Version 2 -> 3: a nullable column, no table rewrite; a NULL origin answers DUPLICATE, as before.
#: Raw readings move to segments behind a ``readings`` view; the rows already stored stay in place as
#: ``readings_rows`` (:func:`fieldmesh.store.segments.migrate_rows_table`, run before this script).
_MIGRATE_2_3 = """
ALTER TABLE idents ADD COLUMN origin INTEGER;
UPDATE meta SET value = '3' WHERE key = 'schema_version';
"""
#: Version 3 -> 4: ``idents_recent`` (created empty by the schema script, in the shape of version 5).
_MIGRATE_3_4 = """
DELETE FROM meta WHERE key IN ('idents_frozen_upto', 'idents_dropped_upto', 'idents_fold_cursor');
UPDATE meta SET value = '4' WHERE key = 'schema_version';
"""
#: ``_KEY_COLUMNS`` int64 columns a key in ``idents_recent.keys``: id, chk, origin.
_KEY_COLUMNS: Final = 3


def _migrate_4_5(w: sqlite3.Connection) -> None:
    """Version 4 -> 5: the keys of ``idents_recent`` not in ``idents`` yet packed into one row (a row per key
    before: in arrival order, or keyed by ``id`` as version 4 was first made); they are then one generation,
    the marks start over. Keys already folded (their rows still there) are in ``idents``: left out."""
    cols = [c[1] for c in w.execute("PRAGMA table_info(idents_recent)")]
    if "keys" not in cols:
        where = "1"
        args: tuple[int, ...] = ()
        if "n" in cols:  # arrival order: the frozen generation's keys below its cursor, and older, are folded
            upto = _meta(w, "idents_frozen_upto", 0)
            where = "n > ? OR (n > ? AND id >= ?)"
            args = (upto, _meta(w, "idents_dropped_upto", 0), _meta(w, "idents_fold_cursor", _KEY_MIN))
        rows = w.execute(f"SELECT id, chk, coalesce(origin, -1) FROM idents_recent WHERE {where} ORDER BY id",
                         args).fetchall()
        w.execute("DROP TABLE idents_recent")
        w.execute("CREATE TABLE idents_recent (n INTEGER PRIMARY KEY, keys BLOB NOT NULL)")
        if rows:
            ids, chks, origins = np.array(rows, dtype=np.int64).reshape(-1, _KEY_COLUMNS).T
            w.execute("INSERT INTO idents_recent (keys) VALUES (?)", (pack_keys(ids, chks, origins),))
    w.execute("DELETE FROM meta WHERE key IN ('idents_frozen_upto', 'idents_dropped_upto', 'idents_fold_cursor')")
    w.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")


def _migrate_5_6(w: sqlite3.Connection) -> None:
    """Version 5 -> 6: the rows of ``idents`` (a row per key) packed into ``idents_blocks`` in key order, the
    table dropped. ``idents_recent`` and its marks in ``meta`` stay as they are (a generation being folded goes
    on from its cursor)."""
    w.execute("DELETE FROM idents_blocks")  # (made empty by the schema script)
    cur = w.execute("SELECT id, chk, coalesce(origin, -1) FROM idents ORDER BY id")
    while rows := cur.fetchmany(BLOCK_KEYS):
        ids, chks, origins = np.array(rows, dtype=np.int64).reshape(-1, _KEY_COLUMNS).T
        w.execute("INSERT INTO idents_blocks (lo, keys) VALUES (?, ?)", (int(ids[0]), pack_block(ids, chks, origins)))
    w.execute("DROP TABLE idents")
    w.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")


#: ``meta`` key: the last segment whose readings the rollup rows hold. Segments above it (``sid`` counts up:
#: SQLite gives a new row the largest ``sid`` + 1, and the tiers never delete the last segment nor one above the
#: mark) hold exactly the readings whose window deltas are not written yet.
_MARK: Final = "rollups_sid"


def _migrate_6_7(w: sqlite3.Connection) -> None:
    """Version 6 -> 7: every segment's rollups are written (version 6 wrote them with the segment)."""
    _set_meta(w, _MARK, w.execute("SELECT coalesce(max(sid), 0) FROM segments").fetchone()[0])
    w.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")


def segment_windows(con: sqlite3.Connection, where: str, params: Sequence[Any]) -> dict[str, WindowDeltas]:
    """Window deltas of every interval from the readings of the segments ``where`` selects (alias ``s``)."""
    segs = con.execute(f"SELECT s.device_id, s.rows FROM segments s WHERE {where}", tuple(params))
    return window_deltas(_segment_readings(segs), INTERVALS)


def _segment_readings(segs: Iterable[tuple[str, str]]) -> ReadingColumns:
    """The readings of segments (device, rows as JSON) as columns: device, event time, measurements (what windows
    need; the rest left empty)."""
    devices: list[str] = []
    ts: list[int] = []
    measurements: list[dict[str, float | bool]] = []
    for dev, rows in segs:  # a segment at a time, its readings' fields taken by C iterators
        readings = _seg_rows(rows)
        devices += [dev] * len(readings)
        ts += map(_TS, readings)
        measurements += map(_MEASUREMENTS, readings)
    n = len(ts)
    zeros: list[int] = [0] * n
    nones: list[Any] = [None] * n
    return ReadingColumns.from_fields(devices, ts, measurements, zeros, zeros, nones, nones, nones, nones, zeros,
                                      nones)  # fmt: skip


def _merge_tail(
    rows: list[tuple[Any, ...]], segs: list[tuple[str, str]], interval: str, metric: str | None,
    start_ms: int | None, end_ms: int | None, limit: int,
) -> list[tuple[Any, ...]]:
    """Rollup rows (``device, metric, window, count, sum, min, max, avg, sum_exact``, sorted, at most ``limit``)
    with the deltas of the readings of ``segs`` (device, its rows as JSON) merged in, in the rows' selection.

    The rows were read up to ``limit``: a window beyond them that the deltas touch is beyond the limit anyway."""
    wd = window_deltas(_segment_readings(segs), {interval: INTERVALS[interval]})[interval]
    keep = np.ones(len(wd), dtype=np.bool_)
    if metric is not None:
        keep &= wd.metric == metric
    if start_ms is not None:
        keep &= wd.window_start_ms >= start_ms
    if end_ms is not None:
        keep &= wd.window_start_ms < end_ms
    at = {(r[0], r[1], r[2]): i for i, r in enumerate(rows)}
    merged = list(rows)
    keys, accs = [], []
    for i in np.flatnonzero(keep).tolist():
        k = (wd.device[i], wd.metric[i], int(wd.window_start_ms[i]))
        a = [int(wd.count[i]), int(wd.sum_m[i]), int(wd.sum_e[i]), float(wd.min[i]), float(wd.max[i])]
        j = at.get(k)
        if j is not None:
            m, e = parse_exact(rows[j][8])
            a = merge_acc([rows[j][3], m, e, rows[j][5], rows[j][6]], a)
        keys.append((k, j))
        accs.append(a)
    if not keys:
        return rows
    values, avgs, texts = exact_columns([int(a[0]) for a in accs], [int(a[1]) for a in accs],
                                        [int(a[2]) for a in accs])
    for ((d, mt, w), j), a, v, av, t in zip(keys, accs, values, avgs, texts, strict=True):
        row = (d, mt, w, a[0], v, a[3], a[4], av, t)
        if j is None:
            merged.append(row)
        else:
            merged[j] = row
    merged.sort(key=lambda r: (r[0], r[1], r[2]))
    return merged[:limit]


_TS, _MEASUREMENTS = itemgetter(1), itemgetter(5)
_seg_rows = msgspec.json.Decoder(list[tuple[Any, int, Any, Any, Any, dict[str, float | bool], Any, Any, Any]]).decode

#: The writer checkpoints the WAL into the database once it holds this many pages (SQLite's default is 1,000).
#: A commit of a small batch over many devices dirties a page per device in each table it touches (often more
#: than 1,000), so with the default nearly every commit also checkpointed: copied its pages into the database
#: and synced both files (a quarter of a small batch's wall time in a profile). A checkpoint now comes every ~10
#: small batches and copies each page once however often it changed meanwhile (docs/alerts.md#latency: a small
#: batch's median apply 12 -> 6-9 ms; bulk throughput unchanged). The cost: a WAL file of up to ~40 MB beside
#: the store (SQLite reuses it; it goes when the last connection closes). The checkpoint runs on a thread of its
#: own (:mod:`fieldmesh.store.checkpointer`) at this mark; the writer's own, in its commit, only at 4x it.
_WAL_AUTOCHECKPOINT_PAGES: Final = 10_000

# -- the read-only guard -------------------------------------------------------------------------
# A reader opens the file with mode=ro and PRAGMA query_only, which stops writes to the store; they do
# not stop statements that open or create OTHER files (ATTACH and VACUUM [INTO] attach a file, some
# PRAGMAs move, checkpoint or switch journal files, load_extension loads a shared library). The
# authorizer below lets through only what reads: everything else is refused when it is prepared,
# before SQLite touches anything.

#: PRAGMAs that only report (their argument, if any, names a table or an index).
_REPORT_PRAGMAS: Final = frozenset({
    "table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo", "foreign_key_list",
    "database_list", "collation_list", "function_list", "module_list", "pragma_list", "compile_options",
    "data_version", "page_count", "freelist_count", "integrity_check", "quick_check", "foreign_key_check",
})
#: PRAGMAs that report their value when given no argument (and change something when given one).
_VALUE_PRAGMAS: Final = frozenset({
    "user_version", "schema_version", "application_id", "page_size", "encoding", "journal_mode",
    "query_only", "busy_timeout", "foreign_keys", "auto_vacuum", "cache_size", "synchronous", "temp_store",
    "mmap_size", "max_page_count", "locking_mode", "journal_size_limit", "wal_autocheckpoint",
})
#: SQL functions that read or write files or load code (some exist only in SQLite's shell builds).
_FILE_FUNCTIONS: Final = frozenset({"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"})
_READ_ACTIONS: Final = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE})
_ACTION_NAMES: Final = {
    getattr(sqlite3, n): n[len("SQLITE_"):]
    for n in (
        "SQLITE_CREATE_INDEX", "SQLITE_CREATE_TABLE", "SQLITE_CREATE_TEMP_INDEX", "SQLITE_CREATE_TEMP_TABLE",
        "SQLITE_CREATE_TEMP_TRIGGER", "SQLITE_CREATE_TEMP_VIEW", "SQLITE_CREATE_TRIGGER", "SQLITE_CREATE_VIEW",
        "SQLITE_DELETE", "SQLITE_DROP_INDEX", "SQLITE_DROP_TABLE", "SQLITE_DROP_TEMP_INDEX",
        "SQLITE_DROP_TEMP_TABLE", "SQLITE_DROP_TEMP_TRIGGER", "SQLITE_DROP_TEMP_VIEW", "SQLITE_DROP_TRIGGER",
        "SQLITE_DROP_VIEW", "SQLITE_INSERT", "SQLITE_UPDATE", "SQLITE_ALTER_TABLE",
        "SQLITE_REINDEX", "SQLITE_ANALYZE", "SQLITE_CREATE_VTABLE", "SQLITE_DROP_VTABLE",
    )
}


#: The tables whose rows the writer keeps in memory between batches (:meth:`SqliteStore._forget`).
_CACHED_TABLES: Final = frozenset({*(f"rollup_{i}" for i in INTERVALS), "device_metrics", "seq_ranges", "seqs"})
_ROLLUP_TABLES: Final = frozenset(f"rollup_{i}" for i in INTERVALS)
_WRITE_ACTIONS: Final = frozenset({sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE})


class _CacheWatch:
    """SQLite authorizer of the writer during :meth:`SqliteStore.transact`: which cached tables its statements
    write (SQLite asks it while preparing each statement; setting it expires the statements prepared before,
    so a statement from the connection's cache is prepared again and asked about too). Allows everything.

    Why: a transaction of the alert rules, the notifier or the features runs between batches many times a
    second in ``fieldmesh up``; dropping the rollup windows kept in memory at each one made the next batches
    read them back from the table (about a fifth of the windows of a stream of one reading a message)."""

    def __init__(self) -> None:
        self.written: set[str] = set()
        self.rollups = False  # a statement read or wrote a rollup table

    def __call__(self, action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
        if action in _WRITE_ACTIONS and arg1 in _CACHED_TABLES:
            self.written.add(arg1)
        if arg1 in _ROLLUP_TABLES and (action in _WRITE_ACTIONS or action == sqlite3.SQLITE_READ):
            self.rollups = True
        return sqlite3.SQLITE_OK


class _ReadOnlyGuard:
    """SQLite authorizer of reader connections; remembers why it refused, for the error message."""

    def __init__(self) -> None:
        self.refused: str | None = None

    def __call__(self, action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
        why = self._why(action, arg1, arg2)
        if why is None:
            return sqlite3.SQLITE_OK
        self.refused = why
        return sqlite3.SQLITE_DENY

    @staticmethod
    def _why(action: int, arg1: str | None, arg2: str | None) -> str | None:
        if action in _READ_ACTIONS:
            return None
        if action == sqlite3.SQLITE_FUNCTION:
            return f"the function {arg2}() touches files" if (arg2 or "").lower() in _FILE_FUNCTIONS else None
        if action == sqlite3.SQLITE_PRAGMA:
            name = (arg1 or "").lower()
            if name in _REPORT_PRAGMAS or (name in _VALUE_PRAGMAS and arg2 is None):
                return None
            return f"PRAGMA {arg1}{'' if arg2 is None else '=' + arg2} can change or create files"
        if action == sqlite3.SQLITE_UPDATE and arg1 == "sqlite_master":
            # table-valued functions (json_each, pragma_table_info) declare their columns through the
            # schema parser, which asks for this; a real write to sqlite_master is impossible (query_only)
            return None
        if action == sqlite3.SQLITE_ATTACH:
            return f"ATTACH/VACUUM of {arg1!r} opens or creates a database file" if arg1 else (
                "VACUUM rewrites the database file")
        if action == sqlite3.SQLITE_DETACH:
            return f"DETACH of {arg1!r} changes the attached database files"
        if action in (sqlite3.SQLITE_TRANSACTION, sqlite3.SQLITE_SAVEPOINT):
            return "transaction control is not a query (each query is its own read)"
        return f"{_ACTION_NAMES.get(action, f'action {action}')} {arg1 or ''} writes".replace("  ", " ")


class _ReaderConnection(sqlite3.Connection):
    """A read-only connection with its guard."""

    guard: _ReadOnlyGuard


def _path_of(url: str) -> Path:
    if not url.startswith("sqlite:///"):
        raise ConfigError(f"bad SQLite URL {url!r}: use sqlite:///path/to/store.db", key="store_url")
    return Path(url[len("sqlite:///") :])


def _wal(con: sqlite3.Connection, wait_s: float = 30.0) -> None:
    """Switch ``con`` to WAL. Another writer creating the same file holds a lock while it converts it, and
    SQLite answers a journal-mode change with "database is locked" without waiting on the busy handler:
    so wait here (bounded), as the busy timeout would."""
    deadline = time.monotonic() + wait_s
    delay = 0.005
    while True:
        try:
            con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


#: Below every identity key (the fold cursor of a generation not started).
_KEY_MIN: Final = -(2**63)


class _FoldStep(NamedTuple):
    """What a commit's fold step did (applied to the writer's memory once it commits)."""

    folded: int  # keys of the frozen generation moved into idents_blocks
    frozen_upto: int  # the frozen generation's last n now
    dropped_upto: int  # rows of idents_recent up to this n are folded generations' (deleted a slice at a time)
    purged_to: int  # the rows of those below this n are deleted
    swapped: bool  # the generation of new keys was frozen
    los: NDArray[np.int64]  # idents_blocks' lo column after the fold


def _meta(con: sqlite3.Connection, key: str, default: int) -> int:
    row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return default if row is None else int(row[0])


#: What changes whenever a writer changes the identity keys: each commit that claims keys adds a row to
#: ``idents_recent`` (``n`` counts up; the last row is never deleted), a purge deletes its first rows, and each
#: fold slice moves the cursor or ends its generation (``meta``), and a freeze sets ``idents_frozen_upto``.
_IDENTS_MARK: Final = (
    "SELECT (SELECT coalesce(min(n), 0) FROM idents_recent), (SELECT coalesce(max(n), 0) FROM idents_recent),"
    " (SELECT group_concat(key || '=' || value, ',') FROM (SELECT key, value FROM meta WHERE key IN"
    " ('idents_frozen_upto', 'idents_dropped_upto', 'idents_fold_cursor') ORDER BY key))"
)


def _idents_mark(con: sqlite3.Connection) -> tuple[Any, ...]:
    """The state of the identity-key tables in a few index reads (:data:`_IDENTS_MARK`): equal marks, equal keys."""
    return tuple(con.execute(_IDENTS_MARK).fetchone())


@contextmanager
def _rolled_back_on_error(w: sqlite3.Connection) -> Iterator[None]:
    """The open transaction is rolled back if the block raises (SQLite may have rolled it back already:
    SQLITE_FULL), and the error goes on."""
    try:
        yield
    except BaseException:
        if w.in_transaction:
            w.execute("ROLLBACK")
        raise


def _set_meta(con: sqlite3.Connection, key: str, value: int) -> None:
    con.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))


#: The parts of a batch's commit whose CPU is counted (``fieldmesh_processor_sqlite_cpu_seconds{part}``).
_CPU_PARTS: Final = ("begin", "segments", "gaps", "rollups", "devices", "rows", "keys", "commit", "finish")
_CPU_COUNTERS: Final = {part: PROCESSOR_SQLITE_CPU_SECONDS.labels(part) for part in _CPU_PARTS}


class _Sql:
    """:class:`~fieldmesh.store.base.SqlTxn` over the writer's open transaction."""

    dialect = "sqlite"

    def __init__(self, w: sqlite3.Connection) -> None:
        self._w = w

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._w.execute(sql, params).fetchall()

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._w.executemany(sql, rows)


class _Txn(_Sql):
    """:class:`~fieldmesh.store.base.HotTxn` of :meth:`SqliteStore.commit`: claims in its open transaction."""

    def __init__(self, w: sqlite3.Connection, keys: KeyFilter, held: Sequence[RecentKeys], blocks: KeyBlocks) -> None:
        super().__init__(w)
        self._filter = keys
        self._held = held  # the keys of idents_recent not in idents_blocks (committed)
        self._blocks = blocks
        self.mine = RecentKeys()  # keys inserted in this transaction (not in the filter nor ``held`` yet)
        self.claimed: list[tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]] = []

    def claim_keys(
        self, keys: NDArray[np.int64], chks: NDArray[np.int64], origins: NDArray[np.int64]
    ) -> NDArray[np.int8]:
        """Insert absent keys; answer per key (see :class:`~fieldmesh.store.base.HotTxn`).

        Only keys the Bloom filter (or this transaction) may hold are looked up: on a stream of new
        readings that is the filter's ~0.2% false positives plus the duplicates. Keys of ``idents_recent``
        are looked up in memory, the others in ``idents_blocks`` (a block read per block they fall in).
        """
        keys = np.asarray(keys, dtype=np.int64)
        out = np.zeros(len(keys), dtype=np.int8)  # CLAIMED
        if not len(keys):
            return out
        maybe = self._filter.may_contain(keys)
        mine = self.mine.find(keys)
        maybe |= mine[0]
        ask = np.flatnonzero(maybe)
        absent = np.ones(len(keys), dtype=bool)
        if len(ask):
            look = keys[ask]
            hit = mine[0][ask]
            stored_chk, stored_origin = mine[1][ask], mine[2][ask]
            for held in self._held:
                h, c, o = held.find(look)
                stored_chk[h] = c[h]
                stored_origin[h] = o[h]
                hit |= h
            rest = np.flatnonzero(~hit)
            if len(rest):
                h, c, o = self._blocks.find(self._w, look[rest])
                rows = rest[h]
                stored_chk[rows] = c[h]
                stored_origin[rows] = o[h]
                hit[rows] = True
            at = ask[hit]
            out[at] = answers(chks[at], origins[at], stored_chk[hit], stored_origin[hit])
            absent[at] = False
        new = np.flatnonzero(absent)
        if len(new):
            new = new[np.argsort(keys[new], kind="stable")]
            if len(new) > 1 and not np.all(np.diff(keys[new])):  # the engines claim each key once a call
                raise FieldmeshError("claim_keys was given the same new key twice")
            claim = (keys[new], np.asarray(chks, dtype=np.int64)[new], np.asarray(origins, dtype=np.int64)[new])
            self._w.execute("INSERT INTO idents_recent (keys) VALUES (?)", (pack_keys(*claim),))
            self.claimed.append(claim)
            self.mine.add(*claim)
        return out


class SqliteStore:
    """SQLite hot store. A writer (``readonly=False``) creates the schema; readers open per thread."""

    #: the sink's name (logs, stats): the hot store
    name: str = "hot"

    def __init__(self, url: str, *, readonly: bool = False, rollup_flush_ms: int = ROLLUP_FLUSH_MS) -> None:
        self.url = url
        #: how long a batch's rollup deltas may wait in memory, merged with later batches', before they are written
        self.rollup_flush_ms = rollup_flush_ms
        self.path = _path_of(url)
        self.readonly = readonly
        self._local = threading.local()
        self._write_lock = threading.RLock()  # commit() and transact() share the writer's connection
        # Write-side caches, valid while no other connection writes (checked with PRAGMA data_version).
        # per interval, (device, metric) -> the latest window start stored (no later window is in the table)
        self._latest: dict[str, dict[tuple[str, str], int]] = {i: {} for i in INTERVALS}
        self._staged_latest: dict[str, dict[tuple[str, str], int]] = {i: {} for i in INTERVALS}
        # per interval, (device, metric) -> (window start, count, m, e, min, max) of the window this writer last
        # wrote for the pair, mostly its latest (merged from memory when touched again); dropped by any
        # transact() (its SQL may change rollup rows without another connection's commit)
        self._latest_acc: dict[str, dict[tuple[str, str], _Acc]] = {i: {} for i in INTERVALS}
        self._staged_acc: dict[str, dict[tuple[str, str], _Acc]] = {i: {} for i in INTERVALS}
        self._known_metrics: set[tuple[str, str]] = set()
        self._pending_metrics: set[tuple[str, str]] = set()
        # seq ranges committed (with their listed flag), cached like the rollups
        self._ranges: dict[SeqKey, tuple[SeqRange, bool]] = {}
        self._staged_ranges: dict[SeqKey, tuple[SeqRange, bool]] = {}
        self._data_version = -1
        self._keys: KeyFilter | None = None  # identity keys stored, for de-dup without a read per key
        self._keys_mark: tuple[Any, ...] = ()  # _idents_mark() as the writer last saw it (with the filter)
        self.key_loads = 0  # times the writer loaded the identity keys (on open, and after another writer's)
        self._keys_main = self._keys_recent = 0  # keys of idents_blocks and idents_recent (with the filter)
        self._blocks = KeyBlocks()  # idents_blocks' lo column (loaded with the filter)
        # The keys of idents_recent (loaded with the filter): the generation new keys join, and the frozen one
        # being folded into idents_blocks in key order, a slice per commit (only its keys not folded yet).
        self._recent = RecentKeys()
        self._frozen = RecentKeys()
        # n of idents_recent: (dropped_upto, frozen_upto] the frozen generation, above it the new one, up to
        # dropped_upto generations folded whole, whose rows are deleted a slice per commit (from purged_to on)
        self._frozen_upto = self._dropped_upto = self._purged_to = 0
        self._fold: _FoldStep | None = None  # what the open transaction's fold step did
        self._cpu: dict[str, float] = dict.fromkeys(_CPU_PARTS, 0.0)  # the open commit's CPU by part
        self._checkpointer: Checkpointer | None = None
        # Rollup deltas of committed batches not written yet (their readings are in the segments above the mark),
        # per interval; the mark as this writer last set it, and how many segments it added above it since.
        self._pending: dict[str, list[WindowDeltas]] = {i: [] for i in INTERVALS}
        self._pending_n = 0
        self._pending_segments = 0
        self._mark = -1
        self._flushed_at = time.monotonic()
        self._staged_windows: dict[str, WindowDeltas] = {}  # the open transaction's batch
        self._staged_segments = 0
        self._staged_mark: int | None = None  # the mark a flush in the open transaction set
        self.rollup_flushes = 0  # flushes that wrote rollup rows
        self.rollup_readbacks = 0  # of them, those that read the deltas back from the segments
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._w = self._connect(write=True)
            self._init_schema()
            self._checkpointer = Checkpointer(self.path, _WAL_AUTOCHECKPOINT_PAGES)
            self.flush(catch_up=True)  # a writer that stopped before it wrote its rollups: written now
        elif not self.path.exists():
            raise ConfigError(
                f"no fieldmesh store at {self.path}: run 'fieldmesh up' first or pass --data-dir/--store-url",
                key="data_dir",
            )
        else:
            self._check_version(self._reader())

    # -- connections -------------------------------------------------------------------------
    def _connect(self, *, write: bool) -> sqlite3.Connection:
        if write:
            con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            _wal(con)
            con.execute("PRAGMA synchronous=NORMAL")
            con.execute(f"PRAGMA wal_autocheckpoint={4 * _WAL_AUTOCHECKPOINT_PAGES}")
            con.execute("PRAGMA cache_size=-32768")  # 32 MiB: the page cache is a large part of a processor's memory
            # no mmap: pages read are then the kernel's page cache, not resident in this process; its own
            # memory stays bounded by cache_size
        else:
            con = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False, timeout=30,
                factory=_ReaderConnection,
            )
            con.execute("PRAGMA query_only=ON")
        con.execute("PRAGMA busy_timeout=30000")
        if isinstance(con, _ReaderConnection):
            con.guard = _ReadOnlyGuard()
            con.set_authorizer(con.guard)  # last: the PRAGMAs above are ours
        return con

    def _reader(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            con = self._connect(write=False) if self.readonly else self._connect(write=True)
            self._local.con = con
        return con

    def _init_schema(self) -> None:
        w = self._w
        w.executescript(_SCHEMA + segments.SCHEMA)
        # one transaction: a crash leaves the old version (and empty new tables), migrated again next time;
        # the version is read inside it, so two writers opening a new file do not both initialise it
        w.execute("BEGIN IMMEDIATE")
        try:
            row = w.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            segments.migrate_rows_table(w)  # the readings view (over a pre-segment table, if there is one)
            if row is None:
                w.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                _set_meta(w, _MARK, 0)
            elif row[0] in ("1", "2", "3", "4", "5", "6"):
                if row[0] in ("1", "2", "3", "4"):
                    script = (_MIGRATE_1_2 if row[0] == "1" else "") + (_MIGRATE_2_3 if row[0] in "12" else "")
                    script += _MIGRATE_3_4 if row[0] != "4" else ""
                    if any(c[1] == "origin" for c in w.execute("PRAGMA table_info(idents)")):
                        script = script.replace("ALTER TABLE idents ADD COLUMN origin INTEGER;", "")
                    for stmt in script.split(";"):
                        if stmt.strip():
                            w.execute(stmt)
                    _migrate_4_5(w)
                if row[0] != "6":
                    _migrate_5_6(w)
                _migrate_6_7(w)
            w.execute("COMMIT")
        except BaseException:
            w.execute("ROLLBACK")
            raise
        self._check_version(w)

    def _check_version(self, con: sqlite3.Connection) -> None:
        try:
            row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreSchemaError(f"{self.path} is not a fieldmesh store: {exc}") from exc
        if row is None or int(row[0]) != SCHEMA_VERSION:
            found = row[0] if row else "none"
            raise StoreSchemaError(
                f"{self.path} has store schema version {found}; this fieldmesh uses {SCHEMA_VERSION}. "
                + (
                    "Start the processor ('fieldmesh up' or 'fieldmesh process') once: it migrates the store."
                    if row is not None and int(row[0]) < SCHEMA_VERSION
                    else "Use a fieldmesh of that version or a new --data-dir."
                )
            )

    def close(self) -> None:
        """Close connections (a writer first writes the rollup deltas it holds)."""
        if not self.readonly:
            try:
                self.flush()
            except sqlite3.Error as exc:  # the segments keep them: the next writer to open the store writes them
                log.warning("rollups not written at close (%s): the next writer to open %s writes them", exc,
                            self.path)
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
            self._w.close()
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None

    # -- the write path ----------------------------------------------------------------------
    def applied(self) -> dict[Position, int]:
        """The positions committed with the data (:class:`~fieldmesh.store.base.Sink`)."""
        return self.positions()

    def commit(self, build: Callable[[HotTxn], BatchResult], *, ts_ms: NDArray[np.int64] | None = None) -> BatchResult:
        """One transaction: ``build`` claims keys and returns the result, which is then written and committed.

        An exception inside ``build`` or while writing rolls everything back, claims included.
        ``ts_ms`` is for stores that prepare partitions; SQLite needs none.
        """
        if self.readonly:
            raise FieldmeshError("this store was opened read-only")
        with self._write_lock:
            w = self._w
            now = int(time.time() * 1000)
            cpu = self._cpu = dict.fromkeys(_CPU_PARTS, 0.0)  # this thread's CPU by part (not build's)
            tc = time.thread_time()
            keys = self._begin(w)
            txn = _Txn(w, keys, (self._recent, self._frozen), self._blocks)
            cpu["begin"] = time.thread_time() - tc
            with _rolled_back_on_error(w):
                result = build(txn)
                claimed = np.concatenate([c[0] for c in txn.claimed]) if txn.claimed else None
                self._write_result(w, result, now, 0 if claimed is None else len(claimed))
                tc = time.thread_time()
                mark = _idents_mark(w)  # in the transaction: no other writer can come between
                w.execute("COMMIT")
                cpu["commit"] = time.thread_time() - tc
            tc = time.thread_time()
            self._keys_mark = mark
            self._finish(w, claimed, txn)
            cpu["finish"] = time.thread_time() - tc
            count_parts(_CPU_COUNTERS, cpu)
            return result

    def transact(self, fn: Callable[[SqlTxn], T]) -> T:
        """``fn`` in a write transaction of its own on the writer's connection (see
        :meth:`~fieldmesh.store.base.HotStore.transact`). Its commits do not count as another connection's
        (``PRAGMA data_version``), so the write caches stay valid."""
        if self.readonly:
            raise FieldmeshError("this store was opened read-only")
        with self._write_lock:
            # fn met the rollup tables while this writer held deltas: they are written first, then fn runs again
            while not (out := self._transact_once(fn)):
                self.flush()
            return out[0]

    def _transact_once(self, fn: Callable[[SqlTxn], T]) -> list[T]:
        """``fn`` in a transaction and its result; nothing, rolled back, if it read or wrote a rollup table while this
        writer holds deltas not written yet (:meth:`flush`): ``fn`` must see the rollups as they are."""
        w = self._w
        w.execute("BEGIN IMMEDIATE")
        watch = _CacheWatch()
        w.set_authorizer(watch)  # (expires the prepared statements: fn's are prepared again, and seen)
        try:
            with _rolled_back_on_error(w):
                out = fn(_Sql(w))
                if watch.rollups and self._pending_segments:
                    w.execute("ROLLBACK")
                    return []
                w.execute("COMMIT")
        finally:
            w.set_authorizer(None)
            self._forget(watch.written)  # (rolled back: the caches are still right, and forgetting is safe)
        return [out]

    def _forget(self, tables: set[str]) -> None:
        """Drop the write caches of ``tables`` (changed by a :meth:`transact` function, not by a batch's merge)."""
        for interval in INTERVALS:
            if f"rollup_{interval}" in tables:  # merge from the table again
                self._latest[interval].clear()
                self._latest_acc[interval].clear()
        if "device_metrics" in tables:
            self._known_metrics.clear()
        if tables & {"seq_ranges", "seqs"}:
            self._ranges.clear()

    def write(self, result: BatchResult) -> bool:
        """Make a result decided elsewhere durable here; False when every position is at or below :meth:`applied`.

        The hot store is where keys are claimed, so it does not take another store's word: it claims
        ``result.store_key`` itself (no origin), and a key it holds already means the result was decided
        against another state; that raises :class:`~fieldmesh.core.errors.FieldmeshError` and writes
        nothing (decide again through :meth:`commit`). Used to rebuild a hot store from another sink.
        """
        return write_via_commit(self, result, lambda: self._positions_of(self._w))

    def _begin(self, w: sqlite3.Connection) -> KeyFilter:
        """Start the write transaction; drop caches another connection's commits may have made stale.

        Returns the key filter, loaded if it had to be."""
        ck = self._checkpointer
        if ck is not None:
            ck.commits += 1  # the checkpoint thread paces itself by them
            if ck.due():  # what came since the thread's last full copy; the WAL then starts over
                try:
                    busy, frames, done = w.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:  # a full disk: the transaction says so, or the automatic checkpoint does it
                    ck.tried(False)
                else:
                    ck.tried(not busy and frames == done)
        # After another connection's commit, the identity keys only if another writer changed them: loading them
        # reads every stored key (seconds at tens of millions), and the API, the twins or the jobs commit here
        # all the time.
        if self._begin_caches(w) and self._keys is not None and _idents_mark(w) != self._keys_mark:
            self._keys = None
        if self._keys is None:
            self._keys = self._load_keys(w)
        self._fold = None
        self._pending_metrics = set()
        self._staged_ranges = {}
        return self._keys

    def _begin_caches(self, w: sqlite3.Connection) -> bool:
        """``BEGIN IMMEDIATE``; drop the row caches if another connection committed (then True); nothing staged."""
        w.execute("BEGIN IMMEDIATE")
        dv = w.execute("PRAGMA data_version").fetchone()[0]
        stale: bool = dv != self._data_version
        if stale:  # another connection committed: our caches may be stale
            for c in self._latest.values():
                c.clear()
            for a in self._latest_acc.values():
                a.clear()
            self._known_metrics.clear()
            self._ranges.clear()
        for st in self._staged_latest.values():
            st.clear()
        for sa in self._staged_acc.values():
            sa.clear()
        self._staged_windows = {}
        self._staged_segments = 0
        self._staged_mark = None
        return stale

    def _finish(self, w: sqlite3.Connection, claimed: NDArray[np.int64] | None, txn: _Txn) -> None:
        """After a commit: what was staged joins the caches."""
        self._data_version = w.execute("PRAGMA data_version").fetchone()[0]
        if claimed is not None and self._keys is not None:
            self._keys.add(claimed)
        if claimed is not None:
            self._keys_recent += len(claimed)
            for ids, chks, origins in txn.claimed:
                self._recent.add(ids, chks, origins)
        if (step := self._fold) is not None:
            self._keys_main += step.folded
            if step.folded:
                self._blocks.los = step.los
            self._frozen.drop_front(step.folded)
            self._frozen_upto = step.frozen_upto
            self._dropped_upto = step.dropped_upto
            self._purged_to = step.purged_to
            if step.swapped:  # the generation of new keys is frozen now, a new one starts
                self._frozen, self._recent = self._recent, RecentKeys()
                self._frozen.compact()
                self._keys_recent = 0
        self._finish_rollups()
        self._known_metrics |= self._pending_metrics
        if len(self._ranges) + len(self._staged_ranges) > _CACHE_MAX:
            self._ranges.clear()
        self._ranges.update(self._staged_ranges)

    def _finish_rollups(self) -> None:
        """After a commit: the rollup rows written join the caches; the batch's deltas join those held, or a flush
        ends them."""
        for interval, staged in self._staged_latest.items():
            latest = self._latest[interval]
            acc = self._latest_acc[interval]
            if len(latest) + len(staged) > _LATEST_MAX:
                latest.clear()  # read again per pair when next touched
                acc.clear()
            latest.update(staged)
            acc.update(self._staged_acc[interval])
        if self._staged_mark is not None:
            for parts in self._pending.values():
                parts.clear()
            self._pending_n = self._pending_segments = 0
            self._mark = self._staged_mark
            self._flushed_at = time.monotonic()
        else:
            for interval, wd in self._staged_windows.items():
                self._pending[interval].append(wd)
                self._pending_n += len(wd)
            self._pending_segments += self._staged_segments
        self._staged_windows = {}
        self._staged_segments = 0
        self._staged_mark = None

    def flush(self, *, catch_up: bool = False) -> bool:
        """Write the rollup deltas this writer holds, in a transaction of its own; True if it wrote any.

        A batch's window deltas wait in memory up to :attr:`rollup_flush_ms`, merged with the later batches', so
        a window that many batches touch is written once (a batch then writes its segments, and no rollup row);
        the batch that finds them due writes them in its own transaction. The processor also calls this when it
        has nothing to do, and :meth:`close` does. Their readings are in the segments above the mark
        (``meta.rollups_sid``), committed with their batch: a writer that stops without writing them (kill -9)
        leaves them there, and the next one writes them (``catch_up``: whatever is above the mark, as a writer
        does when it opens). :meth:`rollups` reads them from there meanwhile.
        """
        if self.readonly:
            return False
        with self._write_lock:
            if not catch_up and not self._pending_segments:
                return False
            w = self._w
            c0 = time.thread_time()
            self._begin_caches(w)  # (the identity keys' staleness is left for the next batch to see)
            try:
                with _rolled_back_on_error(w):
                    wrote = self._flush_in(w)
                    w.execute("COMMIT")
            finally:
                _CPU_COUNTERS["rollups"].inc(time.thread_time() - c0)
            self._finish_rollups()
            return wrote

    def _flush_in(self, w: sqlite3.Connection) -> bool:
        """Merge the deltas of every segment above the mark into the rollup rows, and move the mark to the last
        segment, in the open transaction; True if there were any.

        From memory when the segments above the mark are exactly those this writer added since it set the mark
        (held, and the open transaction's batch); else, as after another writer's segments or a crash, read back
        from the segments.
        """
        mark = _meta(w, _MARK, 0)
        top = w.execute("SELECT coalesce(max(sid), 0) FROM segments").fetchone()[0]
        self._staged_mark = top
        if top <= mark:  # nothing above the mark (what this writer held, another one wrote)
            if top < mark:  # (cannot happen while sids count up; a mark above them would hide new segments)
                _set_meta(w, _MARK, top)
            return False
        if mark == self._mark and top - mark == self._pending_segments + self._staged_segments:
            parts = {i: [*self._pending[i], *([wd] if (wd := self._staged_windows.get(i)) is not None else [])]
                     for i in INTERVALS}
            windows = {i: combine_windows(p) for i, p in parts.items()}
        else:
            windows = segment_windows(w, "s.sid > ?", (mark,))
            self.rollup_readbacks += 1
        for interval, wd in windows.items():
            if len(wd):
                self._merge_rollups(w, interval, wd)
        _set_meta(w, _MARK, top)
        self.rollup_flushes += 1
        return True

    def _write_result(self, w: sqlite3.Connection, r: BatchResult, now: int, claimed: int) -> None:
        """Everything of a decided batch but the claims (made by ``build``), in the open transaction."""
        for interval in r.windows:
            if interval not in INTERVALS:
                raise ConfigError(
                    f"the hot store keeps rollups of {sorted(INTERVALS)} only, not {interval!r}", key="intervals"
                )
        new = r.new
        gaps = 0
        cpu, clock = self._cpu, time.thread_time
        c0 = clock()
        if len(new):
            self._staged_segments = segments.append(w, new, r.store_key, now)
            cpu["segments"] += (c1 := clock()) - c0
            gaps = self._update_gaps(w, seq_batch(new))
            cpu["gaps"] += (c0 := clock()) - c1
        self._staged_windows = {i: wd for i, wd in r.windows.items() if len(wd)}
        if self._staged_segments and (
            time.monotonic() - self._flushed_at >= self.rollup_flush_ms / 1000
            or self._pending_n + sum(map(len, self._staged_windows.values())) > _PENDING_MAX
        ):
            self._flush_in(w)
        cpu["rollups"] += (c1 := clock()) - c0
        if len(r.devices):
            self._update_devices(w, device_aggs(r.devices), r.devices.metric_pairs)
        cpu["devices"] += (c0 := clock()) - c1
        if r.dead_letters:
            w.executemany(
                "INSERT INTO dlq (reason, detail, topic, device_id, received_ms, payload, truncated)"
                " VALUES (?,?,?,?,?,?,?)",
                [
                    (d.reason, d.detail, d.topic, d.device_id, d.received_ms, d.payload, int(d.truncated))
                    for d in r.dead_letters
                ],
            )
        counts = dict(r.counts)
        counts["gaps"] = counts.get("gaps", 0) + gaps
        w.executemany(
            "INSERT INTO counters VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            [(k, v) for k, v in counts.items() if v],
        )
        w.executemany(
            'INSERT INTO positions VALUES (?,?,?,?) ON CONFLICT(topic, partition) DO UPDATE SET'
            ' "offset" = max("offset", excluded."offset"), updated_ms = excluded.updated_ms',
            [(t, p, o, now) for (t, p), o in r.positions.items()],
        )
        w.executemany(
            "INSERT INTO watermarks VALUES (?,?,?) ON CONFLICT(topic, partition) DO UPDATE SET"
            " ts_ms = max(ts_ms, excluded.ts_ms)",
            [(t, p, ts) for (t, p), ts in r.watermarks.items()],
        )
        cpu["rows"] += (c1 := clock()) - c0
        self._fold = self._fold_keys(w, claimed)
        cpu["keys"] += clock() - c1

    def _load_keys(self, w: sqlite3.Connection) -> KeyFilter:
        self.key_loads += 1
        self._keys_mark = _idents_mark(w)
        first, last = self._keys_mark[:2]  # idents_recent's first and last n
        self._frozen_upto = int(_meta(w, "idents_frozen_upto", 0))
        self._dropped_upto = int(_meta(w, "idents_dropped_upto", 0))
        if last < self._frozen_upto:  # the table was made again (n counts up, its last row stays): all new keys
            for key in ("idents_frozen_upto", "idents_dropped_upto", "idents_fold_cursor"):
                w.execute("DELETE FROM meta WHERE key = ?", (key,))
            self._frozen_upto = self._dropped_upto = 0
        self._purged_to = first
        cursor = int(_meta(w, "idents_fold_cursor", _KEY_MIN))
        size = w.execute("SELECT (SELECT coalesce(sum(length(keys)), 0) FROM idents_blocks),"
                         " (SELECT coalesce(sum(length(keys)), 0) FROM idents_recent)").fetchone()
        main, total = (b // (8 * _KEY_COLUMNS) for b in size)
        f = KeyFilter(2 * (main + total))
        self._blocks, self._keys_main = KeyBlocks.load(w, f.add)
        self._recent, self._frozen = RecentKeys(), RecentKeys()
        for into, sql, args in (
            (self._recent, "n > ?", (self._frozen_upto,)),
            (self._frozen, "n > ? AND n <= ?", (self._dropped_upto, self._frozen_upto)),
        ):
            cur = w.execute(f"SELECT keys FROM idents_recent WHERE {sql}", args)
            while rows := cur.fetchmany(256):
                ids, chks, origins = (np.concatenate(c) for c in zip(*(unpack_keys(r[0]) for r in rows), strict=True))
                if into is self._frozen:  # its keys from the cursor on (those below it are in idents_blocks)
                    at = ids >= cursor
                    ids, chks, origins = ids[at], chks[at], origins[at]
                f.add(ids)
                into.add(ids, chks, origins)
        self._frozen.compact()
        self._keys_recent = len(self._recent)
        return f

    def _fold_keys(self, w: sqlite3.Connection, claimed: int) -> _FoldStep:
        """Move keys of ``idents_recent`` into ``idents_blocks`` in key order, a slice per commit (in its transaction).

        Why: the keys of a batch are random, and added straight to a large keyed table they dirty nearly every
        leaf page, which each commit then writes (and the checkpoint writes again). ``idents_recent`` is in arrival
        order, a row of packed keys per commit: they fill a few pages at its end. Its keys come in generations: once
        the new generation holds an eighth as many keys as ``idents_blocks`` (at least ``_FOLD_MIN``, at most
        ``_FOLD_MAX``) it is frozen, and the commits that follow fold it into ``idents_blocks`` in key order, each a
        slice in proportion to the keys it claims (merged into the blocks it falls in, :mod:`~fieldmesh.store.
        keyblocks`), so that the whole generation is folded by the time the next one is half full. Each block is
        then written about once per generation, and no commit carries a whole fold (it took 0.3 s for 131,072
        keys inserted as rows, more as the table grows). Folded keys of the frozen generation stay in
        ``idents_recent`` (below the cursor kept in ``meta``) until the generation is done; then its rows are
        deleted ``_PURGE_ROWS`` per commit (with a row per key, all at once took 60-90 ms).
        """
        target = max(_FOLD_MIN, min(self._keys_main // 8, _FOLD_MAX))
        remaining = len(self._frozen)
        upto, dropped, purged = self._frozen_upto, self._dropped_upto, self._purged_to
        if purged <= dropped:  # rows of folded generations left: a few (each a commit's keys) a commit
            purged = min(dropped + 1, purged + _PURGE_ROWS)
            # (never the last row: n would start again at 1 in an empty table)
            w.execute("DELETE FROM idents_recent WHERE n < ? AND n < (SELECT max(n) FROM idents_recent)", (purged,))
        n = 0
        los = self._blocks.los
        if remaining and claimed:
            budget = target // 2 - self._keys_recent  # new keys to come before the generation should be done
            n = remaining if budget <= claimed else -(-remaining * claimed // budget)
            ids, chks, origins = self._frozen.compact()
            los = self._blocks.merge(w, ids[:n], chks[:n], origins[:n])
            if n < remaining:
                _set_meta(w, "idents_fold_cursor", int(ids[n]))
            else:  # the generation is in idents_blocks: its rows go, a slice per commit from the next on
                dropped = upto
                _set_meta(w, "idents_dropped_upto", dropped)
        swapped = False
        if remaining == n and self._keys_recent + claimed >= target:  # freeze the new generation
            upto = w.execute("SELECT coalesce(max(n), 0) FROM idents_recent").fetchone()[0]
            _set_meta(w, "idents_frozen_upto", upto)
            _set_meta(w, "idents_fold_cursor", _KEY_MIN)
            swapped = True
        return _FoldStep(n, upto, dropped, purged, swapped, los)

    def _merge_rollups(self, w: sqlite3.Connection, interval: str, wd: WindowDeltas) -> None:
        """Merge one interval's deltas into its rollup rows.

        A window later than the latest one stored for its (device, metric) cannot be in the table: its
        delta is the row (most windows of a stream). Only the others are looked up, merged one by one
        (their exact sums need Python ints) and replaced. The latest window per (device, metric) is kept
        in memory (read once per pair from the primary key), staged until the commit. Sums, averages and
        ``sum_exact`` of every row come from :func:`exact_columns`.
        """
        table = f"rollup_{interval}"
        latest = self._latest[interval]
        dev, met, ws = wd.device.tolist(), wd.metric.tolist(), wd.window_start_ms.tolist()
        # Entries come sorted by (device, metric, window): each pair is a run of entries, looked up once (a pair in
        # several runs is looked up in each: the result holds for any order).
        starts = np.flatnonzero(np.r_[True, (wd.device[1:] != wd.device[:-1]) | (wd.metric[1:] != wd.metric[:-1])])
        lengths = np.diff(np.r_[starts, len(ws)])
        pairs = list(zip(wd.device[starts].tolist(), wd.metric[starts].tolist(), strict=True))  # a run's pair
        bound = list(map(latest.get, pairs))
        if None in bound:  # pairs not seen since the store opened: their latest window, one index seek each
            unknown = sorted({p for p, b in zip(pairs, bound, strict=True) if b is None})
            for s in range(0, len(unknown), 5000):
                for d, mt, top in w.execute(
                    f"SELECT j.value->>0, j.value->>1, (SELECT max(r.window_start_ms) FROM {table} r"
                    " WHERE r.device_id = j.value->>0 AND r.metric = j.value->>1) FROM json_each(?) j",
                    (_enc.encode(unknown[s : s + 5000]).decode(),),
                ):
                    latest[(d, mt)] = _NO_WINDOW if top is None else top  # the truth now: no staging needed
            bound = list(map(latest.__getitem__, pairs))
        run_hw = np.array(bound, dtype=np.int64)
        hw = np.repeat(run_hw, lengths)
        wsa = wd.window_start_ms
        count, m, e = wd.count.tolist(), wd.sum_m.tolist(), wd.sum_e.tolist()
        mn, mx = wd.min.tolist(), wd.max.tolist()
        maybe_at = np.flatnonzero(wsa <= hw)  # may be stored already
        maybe = maybe_at.tolist()
        remembered: list[tuple[tuple[str, str], int]] = []
        if maybe:
            acc = self._latest_acc[interval]
            rest = []
            runs = (np.searchsorted(starts, maybe_at, side="right") - 1).tolist()
            for i, p in zip(maybe, map(pairs.__getitem__, runs), strict=True):
                a = acc.get(p)  # the window this writer last wrote for the pair: merged without a read
                if a is not None and a[0] == ws[i]:
                    count[i], m[i], e[i], mn[i], mx[i] = merge_acc(
                        [a[1], a[2], a[3], a[4], a[5]], [count[i], m[i], e[i], mn[i], mx[i]])
                    remembered.append((p, i))
                else:
                    rest.append(i)
            maybe = rest
        if maybe:
            at = {(dev[i], met[i], ws[i]): i for i in maybe}
            keys = list(at)
            for s in range(0, len(keys), 5000):
                for d, mt, st, n, lo, hi, sx in w.execute(
                    f"SELECT r.device_id, r.metric, r.window_start_ms, r.count, r.min, r.max, r.sum_exact "
                    f"FROM json_each(?) j JOIN {table} r ON r.device_id = j.value->>0 AND r.metric = j.value->>1"
                    f" AND r.window_start_ms = j.value->>2",
                    (_enc.encode(keys[s : s + 5000]).decode(),),
                ):
                    i = at[(d, mt, st)]
                    om, oe = parse_exact(sx)
                    count[i], m[i], e[i], mn[i], mx[i] = merge_acc(
                        [n, om, oe, lo, hi], [count[i], m[i], e[i], mn[i], mx[i]]
                    )
        # staged: the latest window per pair after this batch: a run's last entry is its latest window (sorted),
        # the maximum is taken per run all the same.
        ends = np.r_[starts[1:], len(wsa)] - 1
        top = np.maximum(np.maximum.reduceat(wsa, starts), run_hw).tolist()
        staged = self._staged_latest[interval] = {}
        for p, t in zip(pairs, top, strict=True):
            if t > staged.get(p, _NO_WINDOW):
                staged[p] = t
        # A window's row as written, per pair: those merged from memory, then each pair's latest window if this
        # batch wrote it (the one the next batch most likely touches). Any row written is right to remember.
        latest_runs = np.flatnonzero(wsa[ends] >= run_hw)
        latest_rows = zip(map(pairs.__getitem__, latest_runs.tolist()), ends[latest_runs].tolist(), strict=True)
        self._staged_acc[interval] = {
            p: (ws[i], count[i], m[i], e[i], mn[i], mx[i]) for p, i in (*remembered, *latest_rows)
        }
        values, avgs, texts = exact_columns(count, m, e)
        w.executemany(
            # (an upsert measured no cheaper over rows that exist: bench/rollup_write.py)
            f"INSERT OR REPLACE INTO {table} VALUES (?,?,?,?,?,?,?,?,?)",
            zip(dev, met, ws, count, values, mn, mx, avgs, texts, strict=True),
        )

    def _update_devices(
        self, w: sqlite3.Connection, agg: dict[str, list[int]], pairs: Iterable[tuple[str, str]]
    ) -> None:
        w.executemany(
            "INSERT INTO devices VALUES (?,?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET"
            " first_seen_ms = min(first_seen_ms, excluded.first_seen_ms),"
            " last_seen_ms = max(last_seen_ms, excluded.last_seen_ms),"
            " first_ts_ms = min(first_ts_ms, excluded.first_ts_ms),"
            " last_ts_ms = max(last_ts_ms, excluded.last_ts_ms), readings = readings + excluded.readings",
            [(d, *a) for d, a in agg.items()],
        )
        new = set(pairs) - self._known_metrics
        if new:
            w.executemany("INSERT OR IGNORE INTO device_metrics VALUES (?, ?)", sorted(new))
            self._pending_metrics = new

    def _update_gaps(self, w: sqlite3.Connection, new: SeqBatch) -> int:
        """Fold the new readings' seqs into their ranges (:mod:`fieldmesh.store.seqgaps`); return the change in gaps."""
        triples = new.triples
        if not triples:
            return 0
        spans = new.spans or seq_spans(triples)
        cache = self._ranges
        stored = {k: cache[k] for k in spans if k in cache}
        if len(stored) < len(spans):
            stored.update(
                ((d, b), ((lo, hi, n), bool(ls)))
                for d, b, lo, hi, n, ls in w.execute(
                    "SELECT r.device_id, r.boot_id, r.min_seq, r.max_seq, r.n, r.listed FROM json_each(?) j"
                    " JOIN seq_ranges r ON r.device_id = j.value->>0 AND r.boot_id = j.value->>1",
                    (_enc.encode([k for k in spans if k not in stored]).decode(),),
                )
            )
        old = {k: v[0] for k, v in stored.items()}
        listed = {k: v[1] for k, v in stored.items()}
        to_list, added, start, backfill = listing(new, listed)
        explicit: dict[SeqKey, SeqRange] = {}
        for k in sorted(backfill):  # a plain key meets its first event_id: list the seqs it has (batch included)
            w.execute(
                "INSERT OR IGNORE INTO seqs SELECT device_id, ?, seq FROM readings"
                " WHERE device_id = ? AND coalesce(boot_id, '') = ? AND seq IS NOT NULL",
                (k[1], k[0], k[1]),
            )
            lo, hi, n = w.execute(
                "SELECT min(seq), max(seq), count(*) FROM seqs WHERE device_id = ? AND boot_id = ?", k
            ).fetchone()
            explicit[k] = (lo, hi, n)
        rest = [t for t in to_list if (t[0], t[1]) not in backfill]
        if rest:
            # Fast path: every triple is new. Only when one was there already or twice in the batch (a
            # seq carried by several identities) is the insert redone with RETURNING, which yields just
            # the new ones, each once.
            before = w.total_changes
            w.execute("SAVEPOINT seqs")
            w.executemany("INSERT OR IGNORE INTO seqs VALUES (?, ?, ?)", rest)
            if w.total_changes - before == len(rest):
                added.update(Counter((d, b) for d, b, _ in rest))
            else:
                w.execute("ROLLBACK TO seqs")
                added.update(
                    Counter(
                        (d, b)
                        for d, b in w.execute(
                            "INSERT INTO seqs SELECT value->>0, value->>1, value->>2 FROM json_each(?) WHERE true"
                            " ON CONFLICT DO NOTHING RETURNING device_id, boot_id",
                            (_enc.encode(rest).decode(),),
                        )
                    )
                )
            w.execute("RELEASE seqs")
        ranges, delta = merge_ranges(spans, added, old)
        for k, rng in explicit.items():
            ranges[k] = rng
            delta += range_gaps(rng) - range_gaps(old.get(k))
        staged = {k: (v, listed.get(k, False) or k in start) for k, v in ranges.items()}
        self._staged_ranges = staged
        w.executemany(
            "INSERT OR REPLACE INTO seq_ranges VALUES (?,?,?,?,?,?)",
            [(*k, *v, int(ls)) for k, (v, ls) in staged.items()],
        )
        return delta

    # -- the read path -----------------------------------------------------------------------
    def positions(self) -> dict[Position, int]:
        """Applied bus positions: (topic, partition) -> last offset applied."""
        return self._positions_of(self._reader())

    @staticmethod
    def _positions_of(con: sqlite3.Connection) -> dict[Position, int]:
        rows = con.execute('SELECT topic, partition, "offset" FROM positions').fetchall()
        return {(t, p): o for t, p, o in rows}

    def device_watermarks(self) -> dict[str, int]:
        """Per device, the latest event time stored (where the processor's lateness resumes)."""
        return dict(self._reader().execute("SELECT device_id, last_ts_ms FROM devices").fetchall())

    def device_summary(self) -> DeviceSummary:
        """How many devices the store knows and when it last heard from any."""
        n, last = self._reader().execute("SELECT count(*), max(last_seen_ms) FROM devices").fetchone()
        return DeviceSummary(devices=n, last_seen_ms=last)

    def last_seen(self) -> dict[str, int]:
        """Per device, when its last reading was received (wall-clock ms)."""
        return dict(self._reader().execute("SELECT device_id, last_seen_ms FROM devices").fetchall())

    def watermarks(self) -> dict[Position, int]:
        """Event-time watermarks: (topic, partition) -> max event time seen."""
        rows = self._reader().execute("SELECT topic, partition, ts_ms FROM watermarks").fetchall()
        return {(t, p): ts for t, p, ts in rows}

    def stats(self) -> StoreStats:
        """Durable counters."""
        c = dict(self._reader().execute("SELECT name, value FROM counters").fetchall())
        dl = {k[4:]: v for k, v in c.items() if k.startswith("dlq.")}
        return StoreStats(
            stored=c.get("stored", 0), duplicates=c.get("duplicates", 0), late=c.get("late", 0), dead_lettered=dl,
            gaps=c.get("gaps", 0),
        )  # fmt: skip

    def devices(self, device_id: str | None = None) -> list[dict[str, Any]]:
        """Known devices with their counts, times and metrics."""
        con = self._reader()
        sql = "SELECT device_id, first_seen_ms, last_seen_ms, first_ts_ms, last_ts_ms, readings FROM devices"
        rows = (
            con.execute(sql + " WHERE device_id = ?", (device_id,)).fetchall()
            if device_id is not None
            else con.execute(sql + " ORDER BY device_id").fetchall()
        )
        mets: dict[str, list[str]] = {}
        q = "SELECT device_id, metric FROM device_metrics" + (" WHERE device_id = ?" if device_id else "")
        for d, m in con.execute(q + " ORDER BY device_id, metric", (device_id,) if device_id else ()):
            mets.setdefault(d, []).append(m)
        g = "SELECT device_id, sum(max_seq - min_seq + 1 - n) FROM seq_ranges" + (
            " WHERE device_id = ?" if device_id else ""
        )
        gaps = dict(con.execute(g + " GROUP BY device_id", (device_id,) if device_id else ()).fetchall())
        return [
            device_row(d, fs, ls, ft, lt, n, mets.get(d, []), gaps=gaps.get(d, 0))
            for d, fs, ls, ft, lt, n in rows
        ]

    def raw(
        self, *, device_id: str | None, metric: str | None, start_ms: int | None, end_ms: int | None, limit: int
    ) -> list[dict[str, Any]]:
        """Stored readings, newest first."""
        rows = segments.raw_query(
            self._reader(), device_id=device_id, metric=metric, start_ms=start_ms, end_ms=end_ms, limit=limit
        )
        return [
            raw_row(dev, ts, seq, boot, ev, _dec.decode(ms), None if meta is None else _dec.decode(meta), rx,
                    None if enr is None else _dec.decode(enr), metric)
            for dev, ts, seq, boot, ev, ms, meta, rx, enr in rows
        ]

    def rollups(
        self,
        *,
        interval: str,
        device_id: str | None,
        metric: str | None,
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """Rollup rows ordered by device, metric, window; with the deltas not written yet (:meth:`flush`) merged in.

        One statement reads the rows and the segments above the mark (one snapshot): the rows it returns, and the
        readings whose deltas they lack.
        """
        sql, params = rollup_query(interval, device_id, metric, start_ms, end_ms, limit, ph="?",
                                   extra=", sum_exact, NULL")
        tail = ("SELECT s.device_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, s.rows FROM segments s"
                f" WHERE s.sid > (SELECT CAST(value AS INTEGER) FROM meta WHERE key = '{_MARK}')")
        targs: list[Any] = []
        if device_id is not None:
            tail += " AND s.device_id = ?"
            targs.append(device_id)
        if start_ms is not None:  # a window from start_ms on holds readings from start_ms on
            tail += " AND s.max_ts_ms >= ?"
            targs.append(start_ms)
        rows: list[tuple[Any, ...]] = []
        segs: list[tuple[str, str]] = []
        for r in self._reader().execute(f"SELECT * FROM ({sql}) UNION ALL {tail}", (*params, *targs)):
            if r[9] is None:
                rows.append(r)
            else:
                segs.append((r[0], r[9]))
        rows.sort(key=lambda r: (r[0], r[1], r[2]))  # (as the subquery ordered them, whatever UNION ALL does)
        if segs:
            rows = _merge_tail(rows, segs, interval, metric, start_ms, end_ms, limit)
        return [rollup_row(*r[:8]) for r in rows]

    def dlq(self, *, reason: str | None, limit: int) -> list[dict[str, Any]]:
        """Dead letters, newest first; payloads as text where they are UTF-8."""
        sql = "SELECT id, reason, detail, topic, device_id, received_ms, payload, truncated FROM dlq"
        params: list[Any] = []
        if reason is not None:
            sql += " WHERE reason = ?"
            params.append(reason)
        sql += " ORDER BY id DESC LIMIT ?"
        return [dlq_row(*r) for r in self._reader().execute(sql, (*params, limit))]

    def query(self, sql: str, params: Sequence[Any] = ()) -> QueryResult:
        """Run one read-only SQL statement; one that could touch a file is refused before it runs. A writer first
        writes the rollup deltas it holds (:meth:`flush`)."""
        if not self.readonly:
            self.flush()
        con = self._reader() if self.readonly else self._connect(write=False)
        guard: _ReadOnlyGuard | None = getattr(con, "guard", None)
        if guard is not None:
            guard.refused = None
        try:
            cur = con.execute(sql, tuple(params))
            cols = [d[0] for d in cur.description] if cur.description else []
            return QueryResult(columns=cols, rows=[tuple(r) for r in cur.fetchall()])
        except sqlite3.Error as exc:
            if guard is not None and guard.refused is not None:
                raise ConfigError(
                    f"query refused: {guard.refused}. Queries are read-only: SELECT, WITH, EXPLAIN and"
                    " PRAGMAs that only report; nothing may attach, create or change a file",
                    key="sql",
                ) from None
            if "cannot modify" in str(exc):  # a write to a view (readings) fails before the authorizer sees it
                raise ConfigError(f"query refused: {exc}. Queries are read-only", key="sql") from None
            raise ConfigError(f"query failed: {exc}", key="sql") from None
        finally:
            if not self.readonly:
                con.close()
