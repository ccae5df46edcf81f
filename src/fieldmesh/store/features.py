"""Feature storage: the online store (Redis or embedded SQLite) and the feature tables in the hot store.

**Online store** (:class:`OnlineStore`, by URL through :func:`load_online_store`): the latest
:class:`~fieldmesh.stream.featureviews.FeatureRow` per (view, entity), for inference.

* ``redis://host:port/db?prefix=fm``: one hash per row, key ``{prefix}:feat:{view}:{entity}``, fields
  the feature values plus ``_window_end``, ``_known_at``, ``_version`` (ms ints) and ``_window_start``;
  it expires ``ttl`` after ``known_at`` (``PEXPIREAT``). A Lua script writes a row only when its
  ``(window_end, version)`` is newer than the stored one, so a replay never moves a value back.
  ``aget_many`` (the API) reads with ``redis.asyncio`` on the running loop, one pipeline of ``HGETALL`` s.
* ``sqlite:///path/features.db`` (the default under ``--data-dir``): table ``online_features``, same rule.

**Hot-store tables** (:class:`FeatureTables`, through :class:`~fieldmesh.store.base.SqlTxn`, so SQLite
and PostgreSQL alike), written in one transaction per batch by the feature stage:

* ``feature_rows(view, entity, window_start, window_end, known_at, version, "values", seq)``: every feature
  row emitted (times in ms since the epoch, ``values`` a JSON object ``{feature: number|null}``), the
  embedded offline table for point-in-time reads without a lake; primary key (view, entity, window_end,
  version); ``seq`` numbers the rows in commit order (the lake sink copies them to ``fieldmesh.features``
  by it);
* ``feature_state``: per shard (a processor's partitions: replicas with partitions of their own keep their
  own window state), the feature engine's snapshot and counters; ``feature_positions``: the bus positions
  the rows and the snapshots cover (the stage's :meth:`~fieldmesh.store.base.Sink.applied`).
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import parse_qs, urlsplit

import msgspec

from fieldmesh.core.batch import Position
from fieldmesh.core.errors import BackendError, BackendUnavailable, ConfigError, MissingDependency
from fieldmesh.store.base import HotStore, SqlTxn
from fieldmesh.stream.featureviews import FeatureRow

__all__ = [
    "FeatureTables", "OnlineRow", "OnlineStore", "RedisOnlineStore", "SqliteOnlineStore", "encode_answer",
    "load_online_store", "row_from_json", "row_to_json",
]


# put a row unless the stored one is as new: KEYS[1] the hash; ARGV: window_end, version, expire_at_ms, then
# field, value pairs. Returns 1 when written.
_PUT_LUA: Final = """
local cur = redis.call('HMGET', KEYS[1], '_window_end', '_version')
if cur[1] then
  local we, v = tonumber(cur[1]), tonumber(cur[2])
  local nwe, nv = tonumber(ARGV[1]), tonumber(ARGV[2])
  if we > nwe or (we == nwe and v >= nv) then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIREAT', KEYS[1], ARGV[3]) end
return 1
"""


#: What an online store answers: the latest :class:`~fieldmesh.stream.featureviews.FeatureRow` of a key.
OnlineRow = FeatureRow


def row_to_json(row: FeatureRow) -> str:
    """The row's values as a JSON object with sorted keys (NaN and infinities as null).

    msgspec writes each float as its shortest round-tripping text, so :func:`row_from_json` gives back
    the same floats bit for bit; about ten times cheaper than :func:`json.dumps` for a row of 42 values.
    """
    return _ROW_JSON.encode(row.values).decode()


_ROW_JSON: Final = msgspec.json.Encoder(order="sorted")  # non-finite floats are written as null


def row_from_json(view: str, entity: str, start: int, end: int, known: int, version: int, text: str) -> FeatureRow:
    """A row from its stored columns (null values come back as NaN)."""
    vals = {k: math.nan if v is None else float(v) for k, v in json.loads(text).items()}
    return FeatureRow(view=view, entity=entity, window_start_ms=int(start), window_end_ms=int(end),
                      known_at_ms=int(known), version=int(version), values=vals)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _AnswerRow(msgspec.Struct):
    """A view's row in an answer: the fields of the API's ``FeatureValues``, in its order."""

    window_start: str
    window_end: str
    known_at: str
    version: int
    values: dict[str, float]  # msgspec writes a NaN or an infinity as null


class _Answer(msgspec.Struct):
    entity: str
    views: dict[str, _AnswerRow | None]


_ANSWER_ENCODER: Final = msgspec.json.Encoder()


def encode_answer(entity: str, rows: Mapping[str, FeatureRow | None]) -> bytes:
    """The JSON answer of an online read (the body of ``GET /api/v1/features/{entity}``, and what
    ``FeatureClient(online_url=...)`` decodes): ``{"entity", "views": {view: row | null}}`` with the views in
    the order of ``rows``, times in ISO 8601 UTC to the millisecond, values sorted by name, a value that is
    not finite as null."""
    return _ANSWER_ENCODER.encode(_Answer(entity=entity, views={
        v: None if row is None else _AnswerRow(_iso(row.window_start_ms), _iso(row.window_end_ms),
                                               _iso(row.known_at_ms), row.version, dict(sorted(row.values.items())))
        for v, row in rows.items()}))


class OnlineStore(Protocol):
    """The latest feature row per (view, entity); expired rows (``now - known_at > ttl``) read as absent."""

    url: str

    def put(self, rows: Sequence[FeatureRow]) -> int:
        """Store ``rows`` where newer than what is stored (by (window_end, version)); how many were written."""
        ...

    def get(self, view: str, entity: str) -> FeatureRow | None: ...

    def get_many(self, entity: str, views: Sequence[str]) -> dict[str, FeatureRow | None]:
        """One read for several views of one entity."""
        ...

    async def aget_many(self, entity: str, views: Sequence[str]) -> dict[str, FeatureRow | None]:
        """:meth:`get_many` from an event loop, without blocking it."""
        ...

    def close(self) -> None: ...


class RedisOnlineStore:
    """:class:`OnlineStore` in Redis (see the module docstring). ``ttl_ms``: per view (none: no expiry)."""

    def __init__(self, url: str, *, ttl_ms: Mapping[str, int] | None = None) -> None:
        try:
            import redis
        except ImportError as exc:
            raise MissingDependency("redis", "features") from exc
        u = urlsplit(url)
        q = parse_qs(u.query)
        self.prefix = q.get("prefix", ["fm"])[0]
        if not self.prefix or ":" in self.prefix:
            raise ConfigError(f"online store URL: prefix must be non-empty and without ':': {self.prefix!r}",
                              key="online_url")
        self.url = url
        self.ttl_ms = dict(ttl_ms or {})
        self._clean_url = u._replace(query="").geturl()
        self._r = redis.Redis.from_url(self._clean_url, socket_timeout=5, socket_connect_timeout=5)
        self._async: tuple[asyncio.AbstractEventLoop, Any] | None = None
        self._put = self._r.register_script(_PUT_LUA)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError,)

    def key(self, view: str, entity: str) -> str:
        """The hash holding (view, entity)."""
        return f"{self.prefix}:feat:{view}:{entity}"

    def put(self, rows: Sequence[FeatureRow]) -> int:
        if not rows:
            return 0
        try:
            pipe = self._r.pipeline(transaction=False)
            for row in rows:
                ttl = self.ttl_ms.get(row.view)
                fields: list[Any] = ["_window_start", row.window_start_ms, "_window_end", row.window_end_ms,
                                     "_known_at", row.known_at_ms, "_version", row.version]
                for k, v in row.values.items():
                    fields += [k, repr(float(v))]
                self._put(keys=[self.key(row.view, row.entity)],
                          args=[row.window_end_ms, row.version, row.known_at_ms + ttl if ttl else 0, *fields],
                          client=pipe)
            return int(sum(int(x) for x in pipe.execute()))
        except self._errors as exc:
            raise BackendUnavailable(f"online store {self.url}: {exc}") from exc

    def get(self, view: str, entity: str) -> FeatureRow | None:
        return self.get_many(entity, [view])[view]

    def get_many(self, entity: str, views: Sequence[str]) -> dict[str, FeatureRow | None]:
        try:
            pipe = self._r.pipeline(transaction=False)
            for v in views:
                pipe.hgetall(self.key(v, entity))
            got = pipe.execute()
        except self._errors as exc:
            raise BackendUnavailable(f"online store {self.url}: {exc}") from exc
        return self._decode(entity, views, got)

    async def aget_many(self, entity: str, views: Sequence[str]) -> dict[str, FeatureRow | None]:
        """:meth:`get_many` for an event loop (the API): the same read with ``redis.asyncio``, on a
        connection pool of the running loop, so the loop does not hand the read to a thread."""
        try:
            async with self._async_client().pipeline(transaction=False) as pipe:
                for v in views:
                    pipe.hgetall(self.key(v, entity))
                got = await pipe.execute()
        except self._errors as exc:
            raise BackendUnavailable(f"online store {self.url}: {exc}") from exc
        return self._decode(entity, views, got)

    def _async_client(self) -> Any:
        """The ``redis.asyncio`` client of the running loop (a pool is bound to the loop that made it)."""
        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            import redis.asyncio

            self._async = (loop, redis.asyncio.Redis.from_url(self._clean_url, socket_timeout=5,
                                                              socket_connect_timeout=5))
        return self._async[1]

    def _decode(self, entity: str, views: Sequence[str], got: Sequence[dict[bytes, bytes]]
                ) -> dict[str, FeatureRow | None]:
        now = int(time.time() * 1000)
        out: dict[str, FeatureRow | None] = {}
        for v, h in zip(views, got, strict=True):
            out[v] = None
            if h:
                known = int(h[b"_known_at"])
                ttl = self.ttl_ms.get(v)
                if ttl is not None and now - known > ttl:
                    continue
                out[v] = FeatureRow(view=v, entity=entity, window_start_ms=int(h[b"_window_start"]),
                                    window_end_ms=int(h[b"_window_end"]), known_at_ms=known,
                                    version=int(h[b"_version"]),
                                    values={k.decode(): float(x) for k, x in h.items() if k[0] != 95})  # 95: "_"
        return out

    def clear(self) -> int:
        """Delete every key under the prefix (tests, rebuilds); how many."""
        n = 0
        for k in self._r.scan_iter(match=f"{self.prefix}:feat:*", count=1000):
            n += int(self._r.delete(k))
        return n

    def close(self) -> None:
        self._r.close()
        if self._async is not None:
            loop, client = self._async
            self._async = None
            try:
                running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            try:
                if running is loop:
                    loop.create_task(client.aclose())
                elif loop.is_running():  # the API's loop, closed from another thread
                    asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=5)
                elif not loop.is_closed():
                    loop.run_until_complete(client.aclose())
            except Exception:  # closing: nothing left to do with a connection that will not close
                pass


_SQLITE_ONLINE: Final = """
CREATE TABLE IF NOT EXISTS online_features (
  view TEXT NOT NULL, entity TEXT NOT NULL, window_start INTEGER NOT NULL, window_end INTEGER NOT NULL,
  known_at INTEGER NOT NULL, version INTEGER NOT NULL, expires_at INTEGER, "values" TEXT NOT NULL,
  PRIMARY KEY (view, entity))
"""


class SqliteOnlineStore:
    """:class:`OnlineStore` in a SQLite file (WAL: the API reads while the processor writes)."""

    def __init__(self, path: str | Path, *, ttl_ms: Mapping[str, int] | None = None) -> None:
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self.ttl_ms = dict(ttl_ms or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.execute(_SQLITE_ONLINE)

    def _conn(self) -> sqlite3.Connection:
        c: sqlite3.Connection | None = getattr(self._local, "c", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=True)
            c.execute("PRAGMA busy_timeout=10000")
            c.execute("PRAGMA synchronous=NORMAL")
            self._local.c = c
        return c

    def put(self, rows: Sequence[FeatureRow]) -> int:
        if not rows:
            return 0
        c = self._conn()
        try:
            c.execute("BEGIN IMMEDIATE")
            before = c.total_changes
            c.executemany(
                'INSERT INTO online_features (view, entity, window_start, window_end, known_at, version, expires_at, '
                '"values") VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (view, entity) DO UPDATE SET '
                'window_start = excluded.window_start, window_end = excluded.window_end, known_at = excluded.known_at, '
                'version = excluded.version, expires_at = excluded.expires_at, "values" = excluded."values" '
                "WHERE (excluded.window_end, excluded.version) > (online_features.window_end, online_features.version)",
                [(r.view, r.entity, r.window_start_ms, r.window_end_ms, r.known_at_ms, r.version,
                  r.known_at_ms + self.ttl_ms[r.view] if r.view in self.ttl_ms else None, row_to_json(r))
                 for r in rows])
            n = c.total_changes - before
            c.execute("COMMIT")
            return n
        except sqlite3.Error as exc:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise BackendError(f"online store {self.url}: {exc}") from exc

    def get(self, view: str, entity: str) -> FeatureRow | None:
        return self.get_many(entity, [view])[view]

    def get_many(self, entity: str, views: Sequence[str]) -> dict[str, FeatureRow | None]:
        out: dict[str, FeatureRow | None] = dict.fromkeys(views)
        if not views:
            return out
        now = int(time.time() * 1000)
        marks = ",".join("?" * len(views))
        try:
            rows = self._conn().execute(
                f'SELECT view, window_start, window_end, known_at, version, "values" FROM online_features '
                f"WHERE entity = ? AND view IN ({marks}) AND (expires_at IS NULL OR expires_at >= ?)",
                [entity, *views, now]).fetchall()
        except sqlite3.Error as exc:
            raise BackendError(f"online store {self.url}: {exc}") from exc
        for view, start, end, known, version, text in rows:
            out[view] = row_from_json(view, entity, start, end, known, version, text)
        return out

    async def aget_many(self, entity: str, views: Sequence[str]) -> dict[str, FeatureRow | None]:
        """:meth:`get_many` in a worker thread (each thread has its own connection)."""
        return await asyncio.to_thread(self.get_many, entity, views)

    def clear(self) -> int:
        """Delete every row (tests, rebuilds); how many."""
        c = self._conn()
        return c.execute("DELETE FROM online_features").rowcount

    def close(self) -> None:
        c = getattr(self._local, "c", None)
        if c is not None:
            c.close()
            self._local.c = None


def load_online_store(url: str, *, ttl_ms: Mapping[str, int] | None = None) -> OnlineStore:
    """An :class:`OnlineStore` by URL: ``redis://...?prefix=fm`` (``rediss://`` too) or ``sqlite:///path``."""
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        return RedisOnlineStore(url, ttl_ms=ttl_ms)
    if scheme == "sqlite":
        return SqliteOnlineStore(url.removeprefix("sqlite://").removeprefix("/") if url.startswith(
            "sqlite:////") else url.removeprefix("sqlite:///"), ttl_ms=ttl_ms)
    raise ConfigError(f"online store URL {url!r}: use redis://host:port/db?prefix=fm or sqlite:///path",
                      key="online_url")


# -- hot-store tables ------------------------------------------------------------------------------

_DDL_SQLITE: Final = (
    'CREATE TABLE IF NOT EXISTS feature_rows (view TEXT NOT NULL, entity TEXT NOT NULL, window_start INTEGER NOT '
    'NULL, window_end INTEGER NOT NULL, known_at INTEGER NOT NULL, version INTEGER NOT NULL, "values" TEXT NOT NULL, '
    "seq INTEGER NOT NULL, PRIMARY KEY (view, entity, window_end, version))",
    "CREATE UNIQUE INDEX IF NOT EXISTS feature_rows_seq ON feature_rows (seq)",
    "CREATE INDEX IF NOT EXISTS feature_rows_known ON feature_rows (view, entity, known_at)",
    "CREATE TABLE IF NOT EXISTS feature_state (shard TEXT PRIMARY KEY, snapshot BLOB NOT NULL, rows INTEGER NOT NULL, "
    "late INTEGER NOT NULL, unkeyed INTEGER NOT NULL, online_failures INTEGER NOT NULL, updated_ms INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS feature_last (view TEXT NOT NULL, entity TEXT NOT NULL, window_end INTEGER NOT NULL, "
    "PRIMARY KEY (view, entity))",
    "CREATE TABLE IF NOT EXISTS feature_positions (topic TEXT NOT NULL, part INTEGER NOT NULL, "
    "last_offset INTEGER NOT NULL, PRIMARY KEY (topic, part))",
)
_DDL_PG: Final = tuple(s.replace("INTEGER", "BIGINT").replace("BLOB", "BYTEA") for s in _DDL_SQLITE)


class FeatureTables:
    """The feature stage's hot-store tables, in the caller's transaction (module docstring)."""

    @staticmethod
    def ensure(tx: SqlTxn) -> None:
        """Create the tables where missing."""
        if tx.dialect != "sqlite":
            tx.execute("SELECT pg_advisory_xact_lock(hashtext('fieldmesh-features'))")
        for stmt in _DDL_SQLITE if tx.dialect == "sqlite" else _DDL_PG:
            tx.execute(stmt)

    @staticmethod
    def positions(tx: SqlTxn) -> dict[Position, int]:
        return {(str(t), int(p)): int(o) for t, p, o in
                tx.execute("SELECT topic, part, last_offset FROM feature_positions")}

    @staticmethod
    def last_ends(tx: SqlTxn) -> dict[tuple[str, str], int]:
        """The last window end committed per (view, entity)."""
        return {(str(v), str(e)): int(w) for v, e, w in tx.execute("SELECT view, entity, window_end FROM feature_last")}

    @staticmethod
    def state(tx: SqlTxn, shard: str) -> tuple[bytes | None, dict[str, int]]:
        """The stored snapshot of ``shard`` (None before its first write) and its counters."""
        rows = tx.execute("SELECT snapshot, rows, late, unkeyed, online_failures FROM feature_state WHERE shard = ?",
                          (shard,))
        if not rows:
            return None, {"rows": 0, "late": 0, "unkeyed": 0, "online_failures": 0}
        snap, n, late, unkeyed, failures = rows[0]
        return bytes(snap), {"rows": int(n), "late": int(late), "unkeyed": int(unkeyed),
                             "online_failures": int(failures)}

    @staticmethod
    def commit(tx: SqlTxn, rows: Sequence[FeatureRow], snapshot: bytes | None, counts: Mapping[str, int],
               positions: Mapping[Position, int] | None, shard: str = "all") -> None:
        """Append ``rows`` (and their window ends to ``feature_last``), update ``shard``'s counters; with a
        ``snapshot`` (a checkpoint) also replace it and record the ``positions`` it covers."""
        if rows:
            top = int(tx.execute("SELECT COALESCE(MAX(seq), 0) FROM feature_rows")[0][0])
            tx.executemany(
                'INSERT INTO feature_rows (view, entity, window_start, window_end, known_at, version, "values", seq) '
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.view, r.entity, r.window_start_ms, r.window_end_ms, r.known_at_ms, r.version, row_to_json(r),
                  top + 1 + i) for i, r in enumerate(rows)])
            last: dict[tuple[str, str], int] = {}
            for r in rows:
                last[(r.view, r.entity)] = max(r.window_end_ms, last.get((r.view, r.entity), -1))
            tx.executemany("INSERT INTO feature_last (view, entity, window_end) VALUES (?, ?, ?) ON CONFLICT "
                           "(view, entity) DO UPDATE SET window_end = excluded.window_end",
                           [(v, e, w) for (v, e), w in last.items()])
        now = int(time.time() * 1000)
        vals = (counts["rows"], counts["late"], counts["unkeyed"], counts.get("online_failures", 0), now)
        if snapshot is None:
            tx.execute("UPDATE feature_state SET rows = ?, late = ?, unkeyed = ?, online_failures = ?, updated_ms = ? "
                       "WHERE shard = ?", (*vals, shard))
            return
        tx.execute("DELETE FROM feature_state WHERE shard = ?", (shard,))
        tx.execute("INSERT INTO feature_state (shard, snapshot, rows, late, unkeyed, online_failures, updated_ms) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", (shard, snapshot, *vals))
        for (t, p), o in (positions or {}).items():
            tx.execute("DELETE FROM feature_positions WHERE topic = ? AND part = ?", (t, p))
            tx.execute("INSERT INTO feature_positions (topic, part, last_offset) VALUES (?, ?, ?)", (t, p, o))

    @staticmethod
    def stats(store: HotStore) -> dict[str, int] | None:
        """Durable counters for ``/stats`` and metrics: rows written, late, unkeyed, online write failures
        (None when no feature stage ever ran on ``store``)."""
        try:
            res = store.query("SELECT COALESCE(SUM(rows), 0), COALESCE(SUM(late), 0), COALESCE(SUM(unkeyed), 0), "
                              "COALESCE(SUM(online_failures), 0), COALESCE(MAX(updated_ms), 0) FROM feature_state")
        except Exception:  # no such table: features were never on
            return None
        n, late, unkeyed, failures, updated = res.rows[0]
        return {"rows_written": int(n), "late": int(late), "unkeyed": int(unkeyed),
                "online_write_failures": int(failures), "updated_ms": int(updated)}

    @staticmethod
    def after(store: HotStore, seq: int, limit: int) -> tuple[list[FeatureRow], int]:
        """Up to ``limit`` rows committed after ``seq`` (in commit order) and the last one's seq (the lake's
        outbox read: each lake flush takes the rows after the seq its previous flush recorded)."""
        # a read-only query (no write lock); the two integers inline, as the backends' placeholders differ
        sql = ('SELECT view, entity, window_start, window_end, known_at, version, "values", seq '
               f"FROM feature_rows WHERE seq > {int(seq)} ORDER BY seq LIMIT {int(limit)}")
        try:
            res = store.query(sql)
        except Exception as exc:  # no such table yet: no feature rows; any other failure is the caller's
            if "feature_rows" not in str(exc):
                raise
            return [], seq
        if not res.rows:
            return [], seq
        return [row_from_json(*r[:7]) for r in res.rows], int(res.rows[-1][7])

    @staticmethod
    def recent(tx: SqlTxn, since_ms: int) -> list[FeatureRow]:
        """Rows known at or after ``since_ms`` (to bring an online store up to date at a start)."""
        return [row_from_json(*r) for r in tx.execute(
            'SELECT view, entity, window_start, window_end, known_at, version, "values" FROM feature_rows '
            "WHERE known_at >= ? ORDER BY window_end, version", (since_ms,))]

    @staticmethod
    def rows(tx: SqlTxn, *, view: str | None = None, entity: str | None = None) -> list[FeatureRow]:
        """Feature rows (tests, small exports), by (view, entity, window_end, version)."""
        where, args = [], []
        for col, val in (("view", view), ("entity", entity)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        sql = ('SELECT view, entity, window_start, window_end, known_at, version, "values" FROM feature_rows'
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY view, entity, window_end, version")
        return [row_from_json(*r) for r in tx.execute(sql, args)]

