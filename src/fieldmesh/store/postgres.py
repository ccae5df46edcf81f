"""The PostgreSQL hot store (psycopg 3): for deployments beyond one machine.

URL: ``postgresql://user:password@host:port/db?schema=fieldmesh&...``; ``schema`` (default
``public``) is a fieldmesh parameter, every other query parameter is a libpq setting
(``sslmode``, ``sslrootcert``, ``connect_timeout``, ``application_name`` ...).

Layout: ``readings`` is range-partitioned by event time (``ts_ms``), one partition per UTC day,
created on demand; ``reading_keys`` (not partitioned) holds every stored identity key, so a
duplicate is found whatever day it claims. With the TimescaleDB extension available,
``readings`` is a hypertable instead (1-day chunks). ``rollup_1m``/``rollup_1h`` hold the exact
rollups (``sum_exact`` is the exact sum, see :mod:`fieldmesh.core.exact`), maintained on write by
the same arithmetic as the SQLite store; ``positions``/``watermarks`` the applied bus positions.

One :meth:`PostgresStore.apply` is one transaction: the readings (COPY into a temporary table,
then ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` to learn which are new), rollups, devices,
dead letters, counters and positions commit together or not at all. Rows that two writers may
touch at once (rollups, devices) are created first and locked in key order, so processor
replicas handing a partition over never lose an update nor deadlock.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, Final, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.batch import BatchResult
from fieldmesh.core.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    FieldmeshError,
    MissingDependency,
    StoreSchemaError,
)
from fieldmesh.core.exact import parse_exact
from fieldmesh.store.base import INTERVALS, DeviceSummary, HotTxn, Position, QueryResult, SqlTxn, StoreStats
from fieldmesh.store.batchrows import answers, device_aggs, raw_columns, window_accs, write_via_commit
from fieldmesh.store.rollup import Acc, RollupKey, exact_columns, merge_acc
from fieldmesh.store.rows import device_row, dlq_row, raw_row, rollup_query, rollup_row, where_clause
from fieldmesh.store.seqgaps import SeqBatch, SeqKey, SeqRange, listing, merge_ranges, range_gaps, seq_batch, seq_spans

__all__ = ["SCHEMA_VERSION", "PostgresStore", "check_read_only_sql"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: 2 added ``seqs`` and ``seq_ranges`` (sequence gaps); 3 added ``reading_keys.origin`` (the bus record
#: that claimed the key, so a replay decides as before). Older stores are migrated on open.
SCHEMA_VERSION: Final = 3
_DAY_MS: Final = 86_400_000
_SAFE_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_enc = msgspec.json.Encoder()
#: SQLSTATEs worth retrying the whole transaction for.
_RETRY_STATES: Final = {"40001", "40P01", "55P03"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reading_keys (id BIGINT PRIMARY KEY, chk BIGINT NOT NULL, origin BIGINT);
CREATE TABLE IF NOT EXISTS rollup_1m (
    device_id TEXT NOT NULL, metric TEXT NOT NULL, window_start_ms BIGINT NOT NULL,
    count BIGINT NOT NULL, sum DOUBLE PRECISION NOT NULL, min DOUBLE PRECISION NOT NULL,
    max DOUBLE PRECISION NOT NULL, avg DOUBLE PRECISION NOT NULL, sum_exact TEXT NOT NULL,
    PRIMARY KEY (device_id, metric, window_start_ms)
) WITH (fillfactor = 70);
CREATE TABLE IF NOT EXISTS rollup_1h (LIKE rollup_1m INCLUDING ALL) WITH (fillfactor = 70);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, first_seen_ms BIGINT NOT NULL, last_seen_ms BIGINT NOT NULL,
    first_ts_ms BIGINT NOT NULL, last_ts_ms BIGINT NOT NULL, readings BIGINT NOT NULL
) WITH (fillfactor = 70);
CREATE TABLE IF NOT EXISTS device_metrics (
    device_id TEXT NOT NULL, metric TEXT NOT NULL, PRIMARY KEY (device_id, metric)
);
CREATE TABLE IF NOT EXISTS dlq (
    id BIGSERIAL PRIMARY KEY, reason TEXT NOT NULL, detail TEXT NOT NULL, topic TEXT NOT NULL,
    device_id TEXT, received_ms BIGINT NOT NULL, payload BYTEA NOT NULL, truncated BOOLEAN NOT NULL
);
CREATE INDEX IF NOT EXISTS dlq_reason ON dlq (reason, id);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS positions (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, "offset" BIGINT NOT NULL, updated_ms BIGINT NOT NULL,
    PRIMARY KEY (topic, partition)
);
CREATE TABLE IF NOT EXISTS watermarks (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, ts_ms BIGINT NOT NULL, PRIMARY KEY (topic, partition)
);
CREATE TABLE IF NOT EXISTS seqs (
    device_id TEXT NOT NULL, boot_id TEXT NOT NULL, seq BIGINT NOT NULL, PRIMARY KEY (device_id, boot_id, seq)
);
CREATE TABLE IF NOT EXISTS seq_ranges (
    device_id TEXT NOT NULL, boot_id TEXT NOT NULL, min_seq BIGINT NOT NULL, max_seq BIGINT NOT NULL,
    n BIGINT NOT NULL, listed BOOLEAN NOT NULL, PRIMARY KEY (device_id, boot_id)
) WITH (fillfactor = 70);
"""
#: Version 1 -> 2: the seq set, ranges and gap count of the readings already stored.
_MIGRATE_1_2 = """
INSERT INTO seq_ranges SELECT device_id, coalesce(boot_id, ''), min(seq), max(seq), count(DISTINCT seq),
    bool_or(event_id IS NOT NULL) FROM readings WHERE seq IS NOT NULL GROUP BY 1, 2 ON CONFLICT DO NOTHING;
INSERT INTO seqs SELECT DISTINCT r.device_id, g.boot_id, r.seq FROM readings r JOIN seq_ranges g
    ON g.device_id = r.device_id AND g.boot_id = coalesce(r.boot_id, '') WHERE g.listed AND r.seq IS NOT NULL
    ON CONFLICT DO NOTHING;
INSERT INTO counters VALUES ('gaps', (SELECT coalesce(sum(max_seq - min_seq + 1 - n), 0) FROM seq_ranges))
    ON CONFLICT (name) DO UPDATE SET value = excluded.value;
UPDATE meta SET value = '2' WHERE key = 'schema_version';
"""
#: Version 2 -> 3: a nullable column (no table rewrite); a NULL origin answers DUPLICATE, as before.
_MIGRATE_2_3 = """
ALTER TABLE reading_keys ADD COLUMN IF NOT EXISTS origin BIGINT;
UPDATE meta SET value = '3' WHERE key = 'schema_version';
"""
_READINGS_COLS = """
    id BIGINT NOT NULL, chk BIGINT NOT NULL, device_id TEXT NOT NULL, ts_ms BIGINT NOT NULL,
    seq BIGINT, boot_id TEXT, event_id TEXT, measurements JSONB NOT NULL, meta JSONB,
    received_ms BIGINT NOT NULL, stored_ms BIGINT NOT NULL, enrichment JSONB
"""


# -- read-only queries ----------------------------------------------------------------------------
# ``fieldmesh query`` runs user SQL. A READ ONLY transaction stops writes to tables, but not what a
# privileged login may do to the server's files: ``COPY ... TO 'file'`` and ``TO PROGRAM``,
# ``lo_export``, ``pg_read_file`` all run in a read-only transaction. Three layers, each enough for
# the common case, together for a superuser login (the usual single-host setup):
#   1. the text: one statement, starting with SELECT, WITH, VALUES, TABLE, EXPLAIN or SHOW, calling
#      none of the functions that touch files or change the role (``set_config('role', ...)``), and
#      no U&"..." escapes (which could spell those names);
#   2. it is sent as a prepared statement, which the server refuses to hold more than one command;
#   3. when the login may touch server files (superuser or a pg_*_server_* role) the transaction runs
#      ``SET LOCAL ROLE pg_read_all_data``: reads everything, and the server itself refuses COPY to or
#      from files and programs, lo_import/lo_export and pg_read_file.
_QUERY_VERBS: Final = frozenset({"select", "with", "values", "table", "explain", "show"})
_DENIED_CALLS: Final = re.compile(
    r"\b(set_config|query_to_xml\w*|cursor_to_xml\w*|lo_\w+|pg_read_file|pg_read_binary_file|pg_ls_\w+"
    r"|pg_stat_file|pg_file_\w+|pg_logdir_ls|dblink\w*|pg_reload_conf|pg_rotate_logfile|pg_switch_wal"
    r"|pg_terminate_backend|pg_cancel_backend|pg_promote)\b|\bu&['\"]",
    re.IGNORECASE,
)
_LEADING: Final = re.compile(r"(\s+|--[^\n]*(\n|$)|/\*.*?\*/|\()", re.DOTALL)


def check_read_only_sql(sql: str) -> None:
    """Refuse (:class:`ConfigError`) SQL that is not one plain read (layer 1 above)."""
    pos = 0
    while m := _LEADING.match(sql, pos):
        pos = m.end()
    verb = re.match(r"[A-Za-z]+", sql[pos:])
    if verb is None or verb[0].lower() not in _QUERY_VERBS:
        word = verb[0] if verb else sql[pos : pos + 20]
        raise ConfigError(
            f"query refused: {word!r} is not a read; queries are one SELECT, WITH, VALUES, TABLE, EXPLAIN"
            " or SHOW statement, run in a read-only transaction that touches no file",
            key="sql",
        )
    bad = _DENIED_CALLS.search(sql)
    if bad is not None:
        raise ConfigError(
            f"query refused: {bad[0]!r} can read or write server files, run code or change the role;"
            " queries are plain reads in a read-only transaction",
            key="sql",
        )


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependency("psycopg", "postgres") from exc
    return psycopg


def _split_url(url: str) -> tuple[str, str]:
    """``(libpq conninfo URL, schema)``: the ``schema`` parameter is ours, the rest is libpq's."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        raise ConfigError(f"bad PostgreSQL URL {url!r}: use postgresql://user@host:port/db", key="store_url")
    params = parse_qsl(parts.query, keep_blank_values=True)
    schema = "public"
    rest = []
    for k, v in params:
        if k == "schema":
            schema = v
        else:
            rest.append((k, v))
    if not _SAFE_IDENT.match(schema):
        raise ConfigError(
            f"bad schema name {schema!r} in the store URL: use [A-Za-z_][A-Za-z0-9_]*", key="store_url"
        )
    return urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest), "")), schema


def _redact(url: str) -> str:
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _num(v: Any) -> float | bool:
    return v if isinstance(v, bool) else float(v)


def _arr(values: Sequence[Any]) -> str:
    """``values`` (ints, floats, bools or strs; None as NULL) as a PostgreSQL array literal, for a parameter the SQL
    casts to an array (``%s::bigint[]``).

    Why: psycopg dumps a list parameter element by element in Python, and tests each element's text against a
    regular expression (quoting): 0.6-1.6 CPU-µs an element for names and numbers, over 8 for a JSON text
    (docs/benchmarks.md). Here the elements are joined by C calls. Numbers are written as Python writes them
    (``repr`` of a float round-trips, and PostgreSQL reads it back to the same double); strings are quoted, a
    backslash or a double quote in one escaped with a backslash (the array literal's only escapes).
    """
    if None in values:
        return "{" + ",".join("NULL" if v is None else _quoted(v) if isinstance(v, str) else str(v)
                              for v in values) + "}"
    if not values:
        return "{}"
    if isinstance(values[0], str):
        body = '","'.join(values)
        if "\\" in body or body.count('"') != 2 * (len(values) - 1):  # a value holds a quote or a backslash
            return "{" + ",".join(map(_quoted, values)) + "}"
        return '{"' + body + '"}'
    return "{" + ",".join(map(str, values)) + "}"


def _quoted(v: str) -> str:
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Ints:
    """A ``bigint[]`` parameter in PostgreSQL's binary array format (:func:`_dumpers`): int64 values, no NULL."""

    __slots__ = ("array",)
    dtype: ClassVar[str] = ">i8"  # big-endian, as PostgreSQL sends
    elem_oid: ClassVar[int] = 20  # int8
    array_oid: ClassVar[int] = 1016  # int8[]

    def __init__(self, values: Any) -> None:
        self.array = np.asarray(values, dtype=self.dtype[1:])


class _Doubles(_Ints):
    """A ``float8[]`` parameter in PostgreSQL's binary array format: float64 values, no NULL."""

    __slots__ = ()
    dtype = ">f8"
    elem_oid = 701  # float8
    array_oid = 1022  # float8[]


def _binary_array(p: _Ints) -> bytes:
    """One dimension, no NULL (PostgreSQL's ``array_send``): the header, then each element's length (8) and its
    big-endian bytes, made by numpy, not an element at a time (text costs 0.14-0.5 CPU-µs a number, mostly a
    float's shortest repr)."""
    a = p.array
    if not len(a):
        return struct.pack(">iiI", 0, 0, p.elem_oid)
    out = np.empty(len(a), dtype=[("len", ">i4"), ("v", p.dtype)])
    out["len"] = 8
    out["v"] = a
    return struct.pack(">iiIii", 1, 0, p.elem_oid, len(a), 1) + out.tobytes()


@functools.cache
def _dumpers() -> tuple[tuple[type, type], ...]:
    """psycopg dumpers of :class:`_Ints` and :class:`_Doubles` (registered on each connection: psycopg is imported
    only when a PostgreSQL store is used)."""
    from psycopg.adapt import Dumper
    from psycopg.pq import Format

    def dumper(kind: type[_Ints]) -> type:
        class BinaryArrayDumper(Dumper):
            format = Format.BINARY
            oid = kind.array_oid

            def dump(self, obj: Any) -> bytes:
                return _binary_array(obj)

        return BinaryArrayDumper

    return tuple((kind, dumper(kind)) for kind in (_Ints, _Doubles))


class _NeedDays(Exception):
    """Rolls a commit back whose result needs day partitions that do not exist yet."""

    def __init__(self, days: set[int]) -> None:
        super().__init__(f"day partitions {sorted(days)} missing")
        self.days = days


class _Sql:
    """:class:`~fieldmesh.store.base.SqlTxn` over the writer's open transaction (``?`` becomes ``%s``)."""

    dialect = "postgresql"

    def __init__(self, w: Any) -> None:
        self._w = w

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._w.cursor() as cur:
            cur.execute(sql.replace("?", "%s"), params)
            return list(cur.fetchall()) if cur.description is not None else []

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._w.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), list(rows))


class _Txn(_Sql):
    """:class:`~fieldmesh.store.base.HotTxn` of :meth:`PostgresStore.commit`: claims in its open transaction."""

    def claim_keys(
        self, keys: NDArray[np.int64], chks: NDArray[np.int64], origins: NDArray[np.int64]
    ) -> NDArray[np.int8]:
        """Insert absent keys in key order (two writers claiming overlapping keys lock them alike), then
        read the rest; answer per key (see :class:`~fieldmesh.store.base.HotTxn`)."""
        keys = np.asarray(keys, dtype=np.int64)
        out = np.zeros(len(keys), dtype=np.int8)  # CLAIMED
        if not len(keys):
            return out
        if origins.min() < 0:  # -1: no origin, stored as NULL
            org: Any = _arr([None if o < 0 else o for o in origins.tolist()])
        else:
            org = _Ints(origins)
        with self._w.cursor() as cur:
            claimed = [
                r[0]
                for r in cur.execute(  # (fetchall: the rows made in one call, not one Python step each)
                    "INSERT INTO reading_keys (id, chk, origin) SELECT * FROM unnest(%s::bigint[], %s::bigint[],"
                    " %s::bigint[]) ORDER BY 1 ON CONFLICT (id) DO NOTHING RETURNING id",
                    (_Ints(keys), _Ints(chks), org),
                ).fetchall()
            ]
            held = np.flatnonzero(~np.isin(keys, np.array(claimed, dtype=np.int64)))
            if len(held):
                found = {
                    k: (c, -1 if o is None else o)
                    for k, c, o in cur.execute(
                        "SELECT id, chk, origin FROM reading_keys WHERE id = ANY(%s::bigint[])",
                        (_Ints(keys[held]),),
                    )
                }
                stored = [found[k] for k in keys[held].tolist()]
                out[held] = answers(
                    chks[held], origins[held], np.array([c for c, _ in stored], np.int64),
                    np.array([o for _, o in stored], np.int64),
                )  # fmt: skip
        return out


class PostgresStore:
    """PostgreSQL hot store. A writer (``readonly=False``) creates or checks the schema."""

    #: the sink's name (logs, stats): the hot store
    name: str = "hot"

    def __init__(self, url: str, *, readonly: bool = False, connect_timeout_s: float = 10.0) -> None:
        self.url = url
        self.readonly = readonly
        self._conninfo, self.schema = _split_url(url)
        self._timeout = connect_timeout_s
        self._local = threading.local()
        self._readers: list[Any] = []
        self._readers_lock = threading.Lock()
        self._write_lock = threading.RLock()  # commit() and transact() share the writer's connection
        self._parts: set[int] = set()  # days with a readings partition
        self._known_metrics: set[tuple[str, str]] = set()  # (device, metric) pairs committed
        self._pending_metrics: list[tuple[str, str]] = []
        self.timescale = False
        self._privileged: bool | None = None  # may the login touch server files? (see query)
        self._w: Any = None
        if not readonly:
            self._w = self._connect(readonly=False)
            self._init_schema()
        else:
            self._check_version(self._reader())

    # -- connections -------------------------------------------------------------------------
    def _connect(self, *, readonly: bool) -> Any:
        """Connect, retrying transient faults with capped jittered backoff until the timeout."""
        pg = _psycopg()
        opts = f"-c search_path={self.schema},public"
        if readonly:
            opts += " -c default_transaction_read_only=on"
        deadline = time.monotonic() + self._timeout
        attempt = 0
        while True:
            try:
                con = pg.connect(
                    self._conninfo,
                    autocommit=True,
                    connect_timeout=max(1, int(min(5.0, self._timeout))),
                    options=opts,
                    application_name="fieldmesh-reader" if readonly else "fieldmesh-writer",
                )
                for cls, dumper in _dumpers():
                    con.adapters.register_dumper(cls, dumper)
                return con
            except pg.OperationalError as exc:
                msg = str(exc).strip()
                low = msg.lower()
                if any(
                    s in low
                    for s in (
                        "authentication failed",
                        "does not exist",
                        "no password supplied",
                        "not permitted",
                    )
                ):
                    raise ConfigError(
                        f"PostgreSQL at {_redact(self._conninfo)} refused the login: {msg} "
                        "(fix the user, password or database in --store-url)",
                        key="store_url",
                    ) from exc
                if time.monotonic() >= deadline:
                    raise BackendUnavailable(
                        f"cannot reach PostgreSQL at {_redact(self._conninfo)}"
                        f" within {self._timeout:.0f}s: {msg}"
                    ) from exc
                delay = min(
                    random.uniform(0, min(5.0, 0.2 * 2**attempt)), max(0.05, deadline - time.monotonic())
                )
                log.warning("PostgreSQL unreachable (try %d): %s; retrying in %.2fs", attempt + 1, msg, delay)
                time.sleep(delay)
                attempt += 1

    def _reader(self) -> Any:
        con: Any = getattr(self._local, "con", None)
        if con is None or con.closed:
            con = self._connect(readonly=True)
            self._local.con = con
            with self._readers_lock:
                self._readers.append(con)
        return con

    def _init_schema(self) -> None:
        pg = _psycopg()
        w = self._w
        try:
            with w.transaction():
                # one initialiser at a time: replicas may start together
                w.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"fieldmesh-schema-{self.schema}",))
                w.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
                exists = w.execute(
                    "SELECT 1 FROM information_schema.tables"
                    " WHERE table_schema = %s AND table_name = 'readings'",
                    (self.schema,),
                ).fetchone()
                foreign = (
                    exists
                    and not w.execute(
                        "SELECT 1 FROM information_schema.tables"
                        " WHERE table_schema = %s AND table_name = 'meta'",
                        (self.schema,),
                    ).fetchone()
                )
                if foreign:
                    raise StoreSchemaError(
                        f"schema {self.schema!r} at {_redact(self._conninfo)} has a 'readings' table"
                        " that fieldmesh"
                        " did not create: use another ?schema= or database"
                    )
                w.execute(_SCHEMA)
                row = w.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    self._create_readings(w)
                    w.execute("INSERT INTO meta VALUES ('schema_version', %s)", (str(SCHEMA_VERSION),))
                    w.execute(
                        "INSERT INTO meta VALUES ('layout', %s)",
                        ("timescaledb" if self.timescale else "partitioned",),
                    )
                else:
                    if not w.execute(
                        "SELECT 1 FROM information_schema.columns"
                        " WHERE table_schema = %s AND table_name = 'readings' AND column_name = 'enrichment'",
                        (self.schema,),
                    ).fetchone():
                        # stores made before as-of enrichment: add the column (no rewrite, nullable)
                        w.execute("ALTER TABLE readings ADD COLUMN enrichment JSONB")
                    if row[0] == "1":
                        w.execute(_MIGRATE_1_2)
                    if row[0] in ("1", "2"):
                        w.execute(_MIGRATE_2_3)
        except pg.Error as exc:
            raise BackendError(f"cannot create the fieldmesh schema in {self.schema!r}: {exc}") from exc
        self._check_version(w)
        row = w.execute("SELECT value FROM meta WHERE key = 'layout'").fetchone()
        self.timescale = bool(row and row[0] == "timescaledb")
        self._parts = {
            int(r[0])
            for r in w.execute(
                "SELECT substring(c.relname from 'readings_d(\\d+)') FROM pg_inherits i"
                " JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent"
                " JOIN pg_namespace n ON n.oid = p.relnamespace"
                " WHERE p.relname = 'readings' AND n.nspname = %s AND c.relname ~ '^readings_d\\d+$'",
                (self.schema,),
            )
        }

    def _create_readings(self, w: Any) -> None:
        """``readings``: a TimescaleDB hypertable when the extension exists, else day partitions."""
        has_ts = w.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone()
        if has_ts:
            try:
                with w.transaction():
                    w.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                    w.execute(f"CREATE TABLE readings ({_READINGS_COLS})")
                    w.execute(
                        "SELECT create_hypertable('readings', 'ts_ms', chunk_time_interval => %s)", (_DAY_MS,)
                    )
                self.timescale = True
            except _psycopg().Error as exc:  # e.g. not in shared_preload_libraries
                log.warning("TimescaleDB is available but unusable (%s): using plain partitions", exc)
        if not self.timescale:
            w.execute(f"CREATE TABLE readings ({_READINGS_COLS}) PARTITION BY RANGE (ts_ms)")
        w.execute("CREATE INDEX IF NOT EXISTS readings_device_ts ON readings (device_id, ts_ms)")
        w.execute("CREATE INDEX IF NOT EXISTS readings_ts ON readings (ts_ms)")

    def _check_version(self, con: Any) -> None:
        pg = _psycopg()
        try:
            row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except pg.Error as exc:
            raise StoreSchemaError(
                f"no fieldmesh store in schema {self.schema!r} at {_redact(self._conninfo)}: {exc}".strip()
                + " (start a writer first, e.g. 'fieldmesh up --store-url ...')"
            ) from exc
        if row is None or int(row[0]) != SCHEMA_VERSION:
            found = row[0] if row else "none"
            raise StoreSchemaError(
                f"schema {self.schema!r} at {_redact(self._conninfo)} has store schema version {found}; "
                f"this fieldmesh uses {SCHEMA_VERSION}. "
                + (
                    "Start the processor ('fieldmesh up' or 'fieldmesh process') once: it migrates the store."
                    if row is not None and int(row[0]) < SCHEMA_VERSION
                    else "Use a fieldmesh of that version or another ?schema=."
                )
            )

    def close(self) -> None:
        """Close connections."""
        if self._w is not None:
            self._w.close()
            self._w = None
        with self._readers_lock:
            for con in self._readers:
                con.close()
            self._readers.clear()
        self._local = threading.local()

    # -- the write path ----------------------------------------------------------------------
    def applied(self) -> dict[Position, int]:
        """The positions committed with the data (:class:`~fieldmesh.store.base.Sink`)."""
        return self.positions()

    def write(self, result: BatchResult) -> bool:
        """Make a result decided elsewhere durable here; False when every position is at or below :meth:`applied`.

        As for SQLite: the keys of ``result.new`` are claimed here without origin, and a key held already
        raises :class:`~fieldmesh.store.batchrows.StaleResult` (nothing written; decide again through
        :meth:`commit`).
        """

        def positions_in_txn() -> dict[Position, int]:
            rows = self._w.execute('SELECT topic, partition, "offset" FROM positions').fetchall()
            return {(t, p): o for t, p, o in rows}

        return write_via_commit(self, result, positions_in_txn)

    def commit(self, build: Callable[[HotTxn], BatchResult], *, ts_ms: NDArray[np.int64] | None = None) -> BatchResult:
        """One transaction: ``build`` claims keys and returns the result, which is then written and committed.

        The day partitions of ``ts_ms`` are created first (own short transaction). Should the result
        need a day they miss (``ts_ms`` not given, or other), the transaction is rolled back, the
        partitions created and ``build`` run again; likewise after a deadlock or serialization failure
        (replicas handing partitions over). An exception inside ``build`` or later leaves nothing.
        """
        if self.readonly or self._w is None:
            raise FieldmeshError("this store was opened read-only")
        with self._write_lock:
            return self._commit(build, ts_ms)

    def flush(self) -> bool:
        """Nothing to write: every batch writes its rollup rows in its own transaction."""
        return False

    def transact(self, fn: Callable[[SqlTxn], T]) -> T:
        """``fn`` in a write transaction of its own on the writer's connection (see
        :meth:`~fieldmesh.store.base.HotStore.transact`); rerun after a deadlock or serialization failure."""
        if self.readonly or self._w is None:
            raise FieldmeshError("this store was opened read-only")
        pg = _psycopg()
        with self._write_lock:
            attempt = 0
            while True:
                try:
                    with self._w.transaction():
                        return fn(_Sql(self._w))
                except pg.Error as exc:
                    if getattr(exc, "sqlstate", None) in _RETRY_STATES and attempt < 7:
                        time.sleep(random.uniform(0, 0.05 * 2**attempt))
                        attempt += 1
                        continue
                    if isinstance(exc, pg.OperationalError) and self._w.closed:
                        self._w = self._connect(readonly=False)
                        raise BackendUnavailable(f"lost the PostgreSQL connection: {exc}") from exc
                    raise BackendError(f"PostgreSQL transaction failed (rolled back): {exc}") from exc

    def _commit(self, build: Callable[[HotTxn], BatchResult], ts_ms: NDArray[np.int64] | None) -> BatchResult:
        pg = _psycopg()
        days: NDArray[np.int64] | set[int] | None = ts_ms
        attempt = 0
        while True:
            try:
                if days is not None:
                    self._ensure_days(days)
                    days = None
                self._pending_metrics = []
                with self._w.transaction():
                    result = build(_Txn(self._w))
                    missing = self._missing_days(result.new.ts_ms)
                    if missing:
                        raise _NeedDays(missing)
                    self._write_result(result)
                if len(self._known_metrics) > 1_000_000:  # a cache, not a registry: keep it bounded
                    self._known_metrics.clear()
                self._known_metrics.update(self._pending_metrics)
                return result
            except _NeedDays as need:
                days = need.days
            except pg.Error as exc:
                state = getattr(exc, "sqlstate", None)
                if state in _RETRY_STATES and attempt < 7:
                    time.sleep(random.uniform(0, 0.05 * 2**attempt))
                    attempt += 1
                    continue
                if isinstance(exc, pg.OperationalError) and self._w.closed:
                    self._w = self._connect(readonly=False)
                    raise BackendUnavailable(f"lost the PostgreSQL connection during a batch: {exc}") from exc
                raise BackendError(f"PostgreSQL batch failed (rolled back): {exc}") from exc

    def _missing_days(self, ts_ms: NDArray[np.int64]) -> set[int]:
        if self.timescale or not len(ts_ms):
            return set()
        return set(np.unique(ts_ms // _DAY_MS).tolist()) - self._parts

    def _write_result(self, r: BatchResult) -> None:
        """Everything of a decided batch but the claims, in the open transaction; rows that two writers may
        touch are written in key order (rollups, devices, seq ranges, counters, positions)."""
        for interval in r.windows:
            if interval not in INTERVALS:
                raise ConfigError(
                    f"the hot store keeps rollups of {sorted(INTERVALS)} only, not {interval!r}", key="intervals"
                )
        w = self._w
        now = int(time.time() * 1000)
        new = r.new
        gaps = 0
        with w.cursor() as cur:
            if len(new):
                cols = raw_columns(new, r.store_key, now)
                cols.insert(1, new.chk.tolist())
                # COPY, not arrays bound as parameters: psycopg dumps a list element by element in Python (and
                # escapes each JSON text with a regular expression), about 8 CPU-µs for a reading's measurements
                # alone; COPY's rows are formatted in C (docs/benchmarks.md)
                with cur.copy(
                    "COPY readings (id, chk, device_id, ts_ms, seq, boot_id, event_id, measurements, meta,"
                    " received_ms, stored_ms, enrichment) FROM STDIN"
                ) as cp:
                    deque(map(cp.write_row, zip(*cols, strict=True)), 0)
            for interval in INTERVALS:  # fixed order: writers lock 1m rows before 1h rows
                wd = r.windows.get(interval)
                if wd is not None and len(wd):
                    self._merge_rollups(cur, interval, window_accs(wd))
            if len(r.devices):
                self._upsert_devices(cur, device_aggs(r.devices), r.devices.metric_pairs)
            if len(new):
                gaps = self._update_gaps(cur, seq_batch(new))
            if r.dead_letters:
                with cur.copy(
                    "COPY dlq (reason, detail, topic, device_id, received_ms, payload, truncated) FROM STDIN"
                ) as cp:
                    for d in r.dead_letters:
                        cp.write_row(
                            (d.reason, d.detail, d.topic, d.device_id, d.received_ms, d.payload, d.truncated)
                        )
            counts = dict(r.counts)
            counts["gaps"] = counts.get("gaps", 0) + gaps
            self._write_marks(cur, counts, r.positions, r.watermarks, now)

    def _write_marks(
        self, cur: Any, counts: Mapping[str, int], positions: Mapping[Position, int],
        watermarks: Mapping[Position, int], now: int,
    ) -> None:
        """Counters, positions and watermarks (key order)."""
        rows = sorted((k, v) for k, v in counts.items() if v)
        if rows:
            cur.executemany(
                "INSERT INTO counters VALUES (%s, %s) ON CONFLICT (name) DO UPDATE"
                " SET value = counters.value + excluded.value",
                rows,
            )
        if positions:
            cur.executemany(
                "INSERT INTO positions VALUES (%s, %s, %s, %s) ON CONFLICT (topic, partition) DO UPDATE"
                ' SET "offset" = GREATEST(positions."offset", excluded."offset"),'
                " updated_ms = excluded.updated_ms",
                sorted((t, p, o, now) for (t, p), o in positions.items()),
            )
        if watermarks:
            cur.executemany(
                "INSERT INTO watermarks VALUES (%s, %s, %s) ON CONFLICT (topic, partition) DO UPDATE SET"
                " ts_ms = GREATEST(watermarks.ts_ms, excluded.ts_ms)",
                sorted((t, p, ts) for (t, p), ts in watermarks.items()),
            )

    def _ensure_days(self, ts_ms: NDArray[np.int64] | set[int]) -> None:
        """Create the day partitions of these event times (or days) (own short transaction; DDL is idempotent)."""
        days = ts_ms if isinstance(ts_ms, set) else self._missing_days(ts_ms)
        if self.timescale or not days:
            return
        w = self._w
        with w.transaction():
            w.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"fieldmesh-parts-{self.schema}",))
            for d in sorted(days):
                name = f"readings_d{d}" if d >= 0 else f"readings_dm{-d}"
                lo, hi = d * _DAY_MS, (d + 1) * _DAY_MS
                w.execute(
                    f'CREATE TABLE IF NOT EXISTS "{name}" PARTITION OF readings'
                    f" FOR VALUES FROM ({lo}) TO ({hi})"
                )
        self._parts |= days

    def _merge_rollups(self, cur: Any, interval: str, deltas: dict[RollupKey, Acc]) -> None:
        """Merge accumulators into a rollup table.

        Existing rows are locked (key order) before they are read, and new rows are inserted with
        ``ON CONFLICT DO NOTHING``: a row another writer created meanwhile (replicas handing a
        partition over) is then locked and merged, so no update is ever lost.
        """
        table = f"rollup_{interval}"
        keys = sorted(deltas)
        old = self._lock_rollups(cur, table, keys)
        update = [k for k in keys if k in old]
        missing = [k for k in keys if k not in old]
        if missing:
            cols = self._rollup_columns(missing, deltas, {})
            inserted = set(
                cur.execute(
                    f"INSERT INTO {table} SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[],"
                    " %s::bigint[], %s::float8[], %s::float8[], %s::float8[], %s::float8[], %s::text[])"
                    " ON CONFLICT DO NOTHING RETURNING device_id, metric, window_start_ms",
                    cols,
                ).fetchall()
            )
            lost = [k for k in missing if k not in inserted]
            if lost:
                old.update(self._lock_rollups(cur, table, lost))
                update += lost
        if update:
            cur.execute(
                f"UPDATE {table} r SET count = j.c, sum = j.s, min = j.mn, max = j.mx, avg = j.a,"
                " sum_exact = j.x FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[],"
                " %s::float8[], %s::float8[], %s::float8[], %s::float8[], %s::text[])"
                " AS j(d, m, w, c, s, mn, mx, a, x)"
                " WHERE r.device_id = j.d AND r.metric = j.m AND r.window_start_ms = j.w",
                self._rollup_columns(update, deltas, old),
            )

    @staticmethod
    def _lock_rollups(cur: Any, table: str, keys: list[RollupKey]) -> dict[RollupKey, Acc]:
        """Lock the existing rows of ``keys`` (in key order) and return their accumulators."""
        old: dict[RollupKey, Acc] = {}
        for dev, metric, ws, count, mn, mx, sx in cur.execute(
            "SELECT r.device_id, r.metric, r.window_start_ms, r.count, r.min, r.max, r.sum_exact"
            f" FROM {table} r JOIN unnest(%s::text[], %s::text[], %s::bigint[]) AS j(d, m, w)"
            " ON r.device_id = j.d AND r.metric = j.m AND r.window_start_ms = j.w"
            " ORDER BY 1, 2, 3 FOR UPDATE OF r",
            (_arr([k[0] for k in keys]), _arr([k[1] for k in keys]), _Ints([k[2] for k in keys])),
        ).fetchall():
            m, e = parse_exact(sx)
            old[(dev, metric, ws)] = [count, m, e, mn, mx]
        return old

    @staticmethod
    def _rollup_columns(
        keys: list[RollupKey], deltas: dict[RollupKey, Acc], old: dict[RollupKey, Acc]
    ) -> list[Any]:
        """Column arrays (device, metric, window, count, sum, min, max, avg, sum_exact) after merging, as array
        parameters (:func:`_arr`, :class:`_Ints`, :class:`_Doubles`)."""
        accs = list(map(deltas.__getitem__, keys))
        if old:
            accs = [a if (o := old.get(k)) is None else merge_acc(o, a) for k, a in zip(keys, accs, strict=True)]
        if not accs:
            return [_arr([])] * 9
        count, m, e, mn, mx = (list(c) for c in zip(*accs, strict=True))
        values, avgs, texts = exact_columns(count, m, e)
        dev, met, ws = (list(c) for c in zip(*keys, strict=True))
        return [_arr(dev), _arr(met), _Ints(ws), _Ints(count), _Doubles(values), _Doubles(mn), _Doubles(mx),
                _Doubles(avgs), _arr(texts)]

    def _upsert_devices(self, cur: Any, agg: Mapping[str, list[int]], metrics: Iterable[tuple[str, str]]) -> None:
        items = sorted(agg.items())
        cur.execute(
            "INSERT INTO devices AS d SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[],"
            " %s::bigint[], %s::bigint[], %s::bigint[]) ON CONFLICT (device_id) DO UPDATE SET"
            " first_seen_ms = LEAST(d.first_seen_ms, excluded.first_seen_ms),"
            " last_seen_ms = GREATEST(d.last_seen_ms, excluded.last_seen_ms),"
            " first_ts_ms = LEAST(d.first_ts_ms, excluded.first_ts_ms),"
            " last_ts_ms = GREATEST(d.last_ts_ms, excluded.last_ts_ms),"
            " readings = d.readings + excluded.readings",
            (_arr([d for d, _ in items]), *(_Ints([a[i] for _, a in items]) for i in range(5))),
        )
        pairs = sorted(set(metrics) - self._known_metrics)
        if pairs:
            cur.execute(
                "INSERT INTO device_metrics SELECT * FROM unnest(%s::text[], %s::text[])"
                " ON CONFLICT DO NOTHING",
                (_arr([d for d, _ in pairs]), _arr([m for _, m in pairs])),
            )
            self._pending_metrics = pairs

    def _update_gaps(self, cur: Any, new: SeqBatch) -> int:
        """Fold the new readings' seqs into their ranges (:mod:`fieldmesh.store.seqgaps`); return the change in gaps.

        Each key's range row is created if missing and locked (key order) before anything is
        decided, so writers of one key (replicas handing a partition over) take turns; the set's
        insert counts only triples no transaction had stored.
        """
        triples = new.triples
        if not triples:
            return 0
        spans = new.spans or seq_spans(triples)
        keys = sorted(spans)
        kd, kb = [k[0] for k in keys], [k[1] for k in keys]
        # a placeholder (no seqs, no gaps) for new keys: it is ours and locked until we set it below
        created = set(
            cur.execute(
                "INSERT INTO seq_ranges SELECT d, b, 0, -1, 0, false FROM unnest(%s::text[], %s::text[]) AS j(d, b)"
                " ON CONFLICT DO NOTHING RETURNING device_id, boot_id",
                (_arr(kd), _arr(kb)),
            ).fetchall()
        )
        stored = {
            (d, b): ((lo, hi, n), ls)
            for d, b, lo, hi, n, ls in cur.execute(
                "SELECT r.device_id, r.boot_id, r.min_seq, r.max_seq, r.n, r.listed FROM seq_ranges r"
                " JOIN unnest(%s::text[], %s::text[]) AS j(d, b) ON r.device_id = j.d AND r.boot_id = j.b"
                " ORDER BY 1, 2 FOR UPDATE OF r",
                (_arr(kd), _arr(kb)),
            )
            if (d, b) not in created
        }
        old = {k: v[0] for k, v in stored.items()}
        listed = {k: v[1] for k, v in stored.items()}
        to_list, added, start, backfill = listing(new, listed)
        explicit: dict[SeqKey, SeqRange] = {}
        for k in sorted(backfill):  # a plain key meets its first event_id: list the seqs it has (batch included)
            cur.execute(
                "INSERT INTO seqs SELECT DISTINCT device_id, %s, seq FROM readings"
                " WHERE device_id = %s AND coalesce(boot_id, '') = %s AND seq IS NOT NULL ON CONFLICT DO NOTHING",
                (k[1], k[0], k[1]),
            )
            row = cur.execute(
                "SELECT min(seq), max(seq), count(*) FROM seqs WHERE device_id = %s AND boot_id = %s", k
            ).fetchone()
            explicit[k] = (row[0], row[1], row[2])
        rest = sorted({t for t in to_list if (t[0], t[1]) not in backfill})  # key order: writers lock alike
        if rest:
            added.update(
                ((d, b), n)
                for d, b, n in cur.execute(
                    "WITH ins AS (INSERT INTO seqs SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[])"
                    " ON CONFLICT DO NOTHING RETURNING device_id, boot_id)"
                    " SELECT device_id, boot_id, count(*) FROM ins GROUP BY 1, 2",
                    (_arr([t[0] for t in rest]), _arr([t[1] for t in rest]), _Ints([t[2] for t in rest])),
                )
            )
        ranges, delta = merge_ranges(spans, added, old)
        ranges.update(explicit)
        for k, rng in explicit.items():
            delta += range_gaps(rng) - range_gaps(old.get(k))
        rows = sorted((k, v) for k, v in ranges.items())
        if rows:
            cur.execute(
                "UPDATE seq_ranges r SET min_seq = j.lo, max_seq = j.hi, n = j.n, listed = j.ls FROM unnest("
                "%s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::boolean[])"
                " AS j(d, b, lo, hi, n, ls) WHERE r.device_id = j.d AND r.boot_id = j.b",
                (
                    _arr([k[0] for k, _ in rows]), _arr([k[1] for k, _ in rows]),
                    *(_Ints([v[i] for _, v in rows]) for i in range(3)),
                    _arr([listed.get(k, False) or k in start for k, _ in rows]),
                ),
            )  # fmt: skip
        return delta

    # -- the read path -----------------------------------------------------------------------
    def _read(self, fn: Callable[[Any], T]) -> T:
        """Run a read on this thread's read-only connection, reconnecting once if it dropped."""
        pg = _psycopg()
        try:
            return fn(self._reader())
        except pg.OperationalError:
            self._local.con = None
            return fn(self._reader())

    def positions(self) -> dict[Position, int]:
        """Applied bus positions: (topic, partition) -> last offset applied."""
        rows = self._read(lambda c: c.execute('SELECT topic, partition, "offset" FROM positions').fetchall())
        return {(t, p): o for t, p, o in rows}

    def watermarks(self) -> dict[Position, int]:
        """Event-time watermarks: (topic, partition) -> max event time seen."""
        rows = self._read(lambda c: c.execute("SELECT topic, partition, ts_ms FROM watermarks").fetchall())
        return {(t, p): ts for t, p, ts in rows}

    def device_watermarks(self) -> dict[str, int]:
        """Per device, the latest event time stored (where the processor's lateness resumes)."""
        return dict(self._read(lambda c: c.execute("SELECT device_id, last_ts_ms FROM devices").fetchall()))

    def device_summary(self) -> DeviceSummary:
        """How many devices the store knows and when it last heard from any."""
        n, last = self._read(lambda c: c.execute("SELECT count(*), max(last_seen_ms) FROM devices").fetchone())
        return DeviceSummary(devices=n, last_seen_ms=last)

    def last_seen(self) -> dict[str, int]:
        """Per device, when its last reading was received (wall-clock ms)."""
        rows = self._read(lambda c: c.execute("SELECT device_id, last_seen_ms FROM devices").fetchall())
        return {d: int(ms) for d, ms in rows}

    def stats(self) -> StoreStats:
        """Durable counters."""
        c = dict(self._read(lambda con: con.execute("SELECT name, value FROM counters").fetchall()))
        dl = {k[4:]: v for k, v in c.items() if k.startswith("dlq.")}
        return StoreStats(
            stored=c.get("stored", 0),
            duplicates=c.get("duplicates", 0),
            late=c.get("late", 0),
            dead_lettered=dl,
            gaps=c.get("gaps", 0),
        )

    def devices(self, device_id: str | None = None) -> list[dict[str, Any]]:
        """Known devices with their counts, times and metrics."""
        sql = "SELECT device_id, first_seen_ms, last_seen_ms, first_ts_ms, last_ts_ms, readings FROM devices"
        q = "SELECT device_id, metric FROM device_metrics"
        g = "SELECT device_id, sum(max_seq - min_seq + 1 - n)::bigint FROM seq_ranges"

        def read(con: Any) -> tuple[list[Any], list[Any], list[Any]]:
            with con.transaction(), con.cursor() as cur:  # one snapshot for all three
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                if device_id is not None:
                    rows = cur.execute(sql + " WHERE device_id = %s", (device_id,)).fetchall()
                    ms = cur.execute(q + " WHERE device_id = %s ORDER BY metric", (device_id,)).fetchall()
                    gs = cur.execute(g + " WHERE device_id = %s GROUP BY device_id", (device_id,)).fetchall()
                else:
                    rows = cur.execute(sql + " ORDER BY device_id").fetchall()
                    ms = cur.execute(q + " ORDER BY device_id, metric").fetchall()
                    gs = cur.execute(g + " GROUP BY device_id").fetchall()
            return rows, ms, gs

        rows, ms, gs = self._read(read)
        mets: dict[str, list[str]] = {}
        for d, m in ms:
            mets.setdefault(d, []).append(m)
        gaps = dict(gs)
        return [
            device_row(d, fs, ls, ft, lt, n, mets.get(d, []), gaps=gaps.get(d, 0)) for d, fs, ls, ft, lt, n in rows
        ]

    def raw(
        self,
        *,
        device_id: str | None,
        metric: str | None,
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """Stored readings, newest first."""
        where, params = where_clause(device_id, start_ms, end_ms, col="ts_ms", ph="%s")
        if metric is not None:
            where.append("measurements ? %s")
            params.append(metric)
        sql = (
            "SELECT device_id, ts_ms, seq, boot_id, event_id, measurements, meta, received_ms, enrichment"
            " FROM readings"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY ts_ms DESC, id LIMIT %s"
        )
        rows = self._read(lambda c: c.execute(sql, (*params, limit)).fetchall())
        return [
            raw_row(dev, ts, seq, boot, ev, {k: _num(v) for k, v in ms.items()}, meta, rx, enr, metric)
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
        """Rollup rows ordered by device, metric, window."""
        sql, params = rollup_query(interval, device_id, metric, start_ms, end_ms, limit, ph="%s")
        rows = self._read(lambda con: con.execute(sql, params).fetchall())
        return [rollup_row(*r) for r in rows]

    def dlq(self, *, reason: str | None, limit: int) -> list[dict[str, Any]]:
        """Dead letters, newest first; payloads as text where they are UTF-8."""
        sql = "SELECT id, reason, detail, topic, device_id, received_ms, payload, truncated FROM dlq"
        params: list[Any] = []
        if reason is not None:
            sql += " WHERE reason = %s"
            params.append(reason)
        sql += " ORDER BY id DESC LIMIT %s"
        return [dlq_row(*r) for r in self._read(lambda c: c.execute(sql, (*params, limit)).fetchall())]

    def query(self, sql: str, params: Sequence[Any] = ()) -> QueryResult:
        """Run one read-only SQL statement (``%s`` placeholders); nothing that touches a file runs.

        See the three layers at the top of this module.
        """
        pg = _psycopg()
        check_read_only_sql(sql)

        def run(con: Any) -> QueryResult:
            with con.transaction():
                con.execute("SET TRANSACTION READ ONLY")
                if self._needs_role_drop(con):
                    try:
                        con.execute("SET LOCAL ROLE pg_read_all_data")
                    except pg.Error as exc:
                        raise ConfigError(
                            "query refused: the store's login may read or write server files, and it cannot"
                            f" drop to the role pg_read_all_data ({exc}); grant it that role (PostgreSQL 14+)"
                            " or query with a login without superuser and pg_*_server_* roles",
                            key="store_url",
                        ) from None
                # prepare=True: a prepared statement holds exactly one command
                cur = con.execute(sql, tuple(params) if params else None, prepare=True)
                cols = [d.name for d in cur.description] if cur.description else []
                return QueryResult(columns=cols, rows=[tuple(r) for r in cur.fetchall()] if cols else [])

        try:
            return self._read(run)
        except pg.errors.InsufficientPrivilege as exc:
            raise ConfigError(f"query refused: {exc}".strip(), key="sql") from None
        except pg.Error as exc:
            raise ConfigError(f"query failed: {exc}", key="sql") from None

    def _needs_role_drop(self, con: Any) -> bool:
        """Whether this login is a superuser or holds a role that touches server files (cached)."""
        if self._privileged is None:
            row = con.execute(
                "SELECT rolsuper OR pg_has_role(current_user, 'pg_write_server_files', 'USAGE')"
                " OR pg_has_role(current_user, 'pg_read_server_files', 'USAGE')"
                " OR pg_has_role(current_user, 'pg_execute_server_program', 'USAGE')"
                " FROM pg_roles WHERE rolname = current_user"
            ).fetchone()
            self._privileged = bool(row and row[0])
        return self._privileged
