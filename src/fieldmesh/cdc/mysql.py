"""MariaDB / MySQL change data capture from the row-based binlog (``mysql-replication``).

Server requirements (checked by :meth:`MySqlCdc.prepare`): ``log_bin=ON``, ``binlog_format=ROW``,
``binlog_row_image=FULL``, ``binlog_row_metadata=FULL`` (column names travel in the binlog, so a
schema change mid-stream is picked up from the next table map). The user needs ``SELECT`` on the
tables, ``REPLICATION SLAVE`` and ``REPLICATION CLIENT`` (``BINLOG MONITOR`` on MariaDB >= 10.5).

Snapshot: on MariaDB ``START TRANSACTION WITH CONSISTENT SNAPSHOT`` gives the exact binlog position
of the snapshot (``binlog_snapshot_file/position``) with no lock; on MySQL the position is read
under a brief ``FLUSH TABLES WITH READ LOCK`` (needs ``RELOAD``). Streaming starts at that position:
no gap, no overlap. Resume is by file/position: the offset file keeps the position *after* the
last transaction whose changes the bus acknowledged, so a restart replays at most the transactions
after it, with the same message ids (``<server_id>:<file>:<pos>:<row>``) for the bus to drop. The
MariaDB GTID of each transaction is carried in ``source.gtid`` for reference.

Rows of a transaction are held until its commit (Xid) event so that every event carries the
commit time; a very large transaction is therefore held in memory whole. Binlog timestamps have
one-second resolution: ``source.ts_ms`` is a multiple of 1000.

Value mapping (MySQL -> JSON): integers, floats, strings as such; ``DECIMAL`` -> string (exact) or
number (``decimal_mode="float"``); ``DATETIME``/``TIMESTAMP`` -> microseconds since the epoch, UTC;
``DATE`` -> days since the epoch; ``TIME`` -> microseconds; ``JSON`` -> its text; ``SET`` -> a sorted
list; binary strings -> base64; anything else -> its ``str``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import queue
import re
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec

from fieldmesh.cdc.base import (
    CdcError,
    Change,
    ChangeEvent,
    SourceConfigError,
    SourceInfo,
    SourcePositionLost,
    SourcePrivilegeError,
    TableNotCapturable,
    cdc_topic,
    encode_key,
)
from fieldmesh.cdc.sink import CdcSink, OffsetFile
from fieldmesh.core.errors import BackendUnavailable, MissingDependency

__all__ = ["MySqlCdc", "MyTable", "json_value"]

log = logging.getLogger(__name__)

_EPOCH = dt.datetime(1970, 1, 1)
_EPOCH_DATE = dt.date(1970, 1, 1)
_json = msgspec.json.Encoder()


def json_value(v: Any, *, decimal_float: bool = False) -> Any:
    """A MySQL value (from pymysql or the binlog decoder) as a JSON value, by the module's rules."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, Decimal):
        return float(v) if decimal_float else format(v, "f")
    if isinstance(v, dt.datetime):
        if v.tzinfo is not None:
            v = v.astimezone(dt.UTC).replace(tzinfo=None)
        d = v - _EPOCH
        return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds
    if isinstance(v, dt.date):
        return (v - _EPOCH_DATE).days
    if isinstance(v, dt.timedelta):
        return (v.days * 86_400 + v.seconds) * 1_000_000 + v.microseconds
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(v).decode()
    if isinstance(v, (set, frozenset)):
        return sorted(v)
    if isinstance(v, (dict, list)):
        return _json.encode(v).decode()
    return str(v)


def _libs() -> tuple[Any, Any]:
    try:
        import pymysql
        import pymysqlreplication
    except ImportError as exc:
        raise MissingDependency("mysql-replication", "cdc") from exc
    return pymysql, pymysqlreplication


@dataclass(frozen=True, slots=True)
class MyTable:
    """A captured table: database, name and primary key."""

    db: str
    table: str
    key_columns: tuple[str, ...]

    @property
    def qualified(self) -> str:
        """``db.table``."""
        return f"{self.db}.{self.table}"


@dataclass(slots=True)
class _Row:
    table: MyTable
    op: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    file: str
    pos: int
    row: int


class MySqlCdc:
    """Captures committed row changes of some MariaDB/MySQL tables into the bus."""

    def __init__(
        self,
        *,
        url: str,
        tables: str | Sequence[str],
        state_dir: Path,
        server_name: str = "fieldmesh",
        snapshot: str = "initial",
        resnapshot: bool = False,
        decimal_mode: str = "string",
        batch_size: int = 8000,
        server_id: int | None = None,
        topic_prefix: str = "fm.cdc",
    ) -> None:
        if snapshot not in ("initial", "never"):
            raise CdcError(f"snapshot must be 'initial' or 'never', got {snapshot!r}")
        u = urlsplit(url)
        default_db = u.path.lstrip("/") or None
        self.conn_args: dict[str, Any] = {
            "host": u.hostname or "127.0.0.1",
            "port": u.port or 3306,
            "user": unquote(u.username or "root"),
            "password": unquote(u.password or ""),
        }
        names = [t.strip() for t in (tables.split(",") if isinstance(tables, str) else tables) if t.strip()]
        if not names:
            raise CdcError("no tables given: pass --tables db.table[,db.table...]")
        self.table_names: list[tuple[str, str]] = []
        for n in names:
            db, _, table = n.rpartition(".")
            if not (db or default_db):
                raise CdcError(f"table {n!r} needs a database: db.table, or a database in the URL")
            self.table_names.append((db or default_db or "", table))
        self.server_name = server_name
        self.snapshot_mode = snapshot
        self.resnapshot = resnapshot
        self.decimal_float = decimal_mode == "float"
        self.batch_size = batch_size
        # A replica needs a server id of its own; derive a stable one from the name.
        self.server_id = server_id or 100_000 + zlib.crc32(server_name.encode()) % 1_000_000_000
        self.topic_prefix = topic_prefix
        self.offsets = OffsetFile(Path(state_dir) / f"mysql-{server_name}.json")
        self.tables: dict[tuple[str, str], MyTable] = {}
        self.is_mariadb = False
        self.events = 0
        self.snapshot_rows = 0
        self.position: tuple[str, int] | None = None
        self._pymysql, self._repl = _libs()

    # -- set-up ----------------------------------------------------------------------------------

    def _connect(self, **extra: Any) -> Any:
        pymysql = self._pymysql
        try:
            return pymysql.connect(
                host=self.conn_args["host"],
                port=self.conn_args["port"],
                user=self.conn_args["user"],
                password=self.conn_args["password"],
                charset="utf8mb4",
                init_command="SET time_zone = '+00:00'",
                **extra,
            )
        except pymysql.err.OperationalError as exc:
            code = exc.args[0] if exc.args else 0
            if code in (1044, 1045):
                raise SourcePrivilegeError(f"MySQL refused the login: {exc.args[-1]}") from exc
            if code == 1049:
                raise CdcError(f"MySQL database does not exist: {exc.args[-1]}") from exc
            raise BackendUnavailable(f"cannot connect to MySQL at {self.conn_args['host']}: {exc}") from exc

    def prepare(self) -> list[MyTable]:
        """Check the server's binlog settings, the user's privileges and every table's primary key."""
        pymysql = self._pymysql
        conn = self._connect()
        try:
            cur = conn.cursor()
            cur.execute("SELECT VERSION(), @@log_bin, @@binlog_format, @@binlog_row_image")
            version, log_bin, fmt, image = cur.fetchone()
            self.is_mariadb = "mariadb" in str(version).lower()
            if not log_bin:
                raise SourceConfigError(
                    "the binlog is off: set log_bin (and server_id) in the server config and restart "
                    "(scripts/ci-services shows how)"
                )
            if str(fmt).upper() != "ROW":
                raise SourceConfigError(
                    f"binlog_format is {fmt}: CDC needs ROW (SET GLOBAL binlog_format = 'ROW')"
                )
            if str(image).upper() != "FULL":
                raise SourceConfigError(
                    f"binlog_row_image is {image}: CDC needs FULL (SET GLOBAL binlog_row_image = 'FULL')"
                )
            cur.execute("SHOW VARIABLES LIKE 'binlog_row_metadata'")
            row = cur.fetchone()
            if row is None or str(row[1]).upper() != "FULL":
                raise SourceConfigError(
                    "binlog_row_metadata is not FULL: column names must travel in the binlog "
                    "(SET GLOBAL binlog_row_metadata = 'FULL')"
                )
            try:
                cur.execute("SHOW BINARY LOGS")
                cur.fetchall()
            except pymysql.err.OperationalError as exc:
                raise SourcePrivilegeError(
                    f"MySQL user {self.conn_args['user']!r} cannot read binlog positions ({exc.args[-1]}): "
                    "GRANT REPLICATION CLIENT (BINLOG MONITOR on MariaDB), REPLICATION SLAVE ON *.* TO it"
                ) from exc
            for db, table in self.table_names:
                self.tables[(db, table)] = self._describe(cur, db, table)
        except pymysql.err.MySQLError as exc:
            raise CdcError(f"MySQL set-up failed: {exc}") from exc
        finally:
            conn.close()
        return list(self.tables.values())

    def _describe(self, cur: Any, db: str, table: str) -> MyTable:
        pymysql = self._pymysql
        qual = f"{db}.{table}"
        try:
            cur.execute(f"SELECT * FROM `{db}`.`{table}` LIMIT 0")
        except pymysql.err.ProgrammingError as exc:
            if exc.args and exc.args[0] in (1142, 1044):
                raise SourcePrivilegeError(
                    f"MySQL user {self.conn_args['user']!r} cannot SELECT {qual}: "
                    f"GRANT SELECT ON {qual} TO it"
                ) from exc
            raise TableNotCapturable(f"table {qual} does not exist ({exc.args[-1]})", table=qual) from exc
        except pymysql.err.OperationalError as exc:
            raise SourcePrivilegeError(f"cannot read {qual}: {exc.args[-1]}") from exc
        cur.execute(
            "SELECT COLUMN_NAME FROM information_schema.KEY_COLUMN_USAGE WHERE TABLE_SCHEMA = %s "
            "AND TABLE_NAME = %s AND CONSTRAINT_NAME = 'PRIMARY' ORDER BY ORDINAL_POSITION",
            (db, table),
        )
        keys = tuple(r[0] for r in cur.fetchall())
        if not keys:
            raise TableNotCapturable(
                f"table {qual} has no primary key: CDC keys every change by primary key; add one "
                f"(ALTER TABLE {qual} ADD PRIMARY KEY (...)) or leave the table out",
                table=qual,
            )
        return MyTable(db=db, table=table, key_columns=keys)

    def _binlogs(self) -> list[str]:
        conn = self._connect()
        try:
            cur = conn.cursor()
            cur.execute("SHOW BINARY LOGS")
            return [r[0] for r in cur.fetchall()]
        finally:
            conn.close()

    # -- run -------------------------------------------------------------------------------------

    async def run(self, sink: CdcSink, stop: asyncio.Event) -> None:
        """Snapshot (first run) then stream into ``sink`` until ``stop`` is set."""
        if not self.tables:
            await asyncio.to_thread(self.prepare)
        for t in self.tables.values():
            await sink.ensure_topic(self._topic(t))
        state = {} if self.resnapshot else self.offsets.load()
        if state.get("snapshot_done") or (state.get("file") and self.snapshot_mode == "never"):
            file, pos = str(state["file"]), int(state["pos"])
            logs = await asyncio.to_thread(self._binlogs)
            if file not in logs:
                raise SourcePositionLost(
                    f"binlog {file} (position {pos}) was purged from the server: changes since then may be "
                    "lost. Take a new snapshot with --resnapshot, and keep binlogs longer than CDC outages "
                    "(expire_logs_days / binlog_expire_logs_seconds)"
                )
        elif self.snapshot_mode == "initial":
            file, pos = await self._snapshot(sink)
        else:
            file, pos = await asyncio.to_thread(self._master_position)
            self._save(file, pos, None)
        self.position = (file, pos)
        await self._stream(sink, stop, file, pos)

    def _topic(self, t: MyTable) -> str:
        return cdc_topic(t.db, None, t.table, prefix=self.topic_prefix)

    def _save(self, file: str, pos: int, gtid: str | None) -> None:
        self.offsets.save(
            {"file": file, "pos": pos, "gtid": gtid, "snapshot_done": True, "server_id": self.server_id}
        )

    def _master_position(self) -> tuple[str, int]:
        conn = self._connect()
        try:
            cur = conn.cursor()
            cur.execute("SHOW MASTER STATUS")
            row = cur.fetchone()
            if row is None:
                raise SourceConfigError("SHOW MASTER STATUS is empty: the binlog is off")
            return str(row[0]), int(row[1])
        finally:
            conn.close()

    async def _snapshot(self, sink: CdcSink) -> tuple[str, int]:
        pymysql = self._pymysql
        conn = self._connect(cursorclass=pymysql.cursors.SSCursor)
        try:
            cur = conn.cursor()
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            if self.is_mariadb:
                cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                cur.execute("SHOW STATUS LIKE 'binlog_snapshot_%'")
                st = {r[0].lower(): r[1] for r in cur.fetchall()}
                file, pos = st["binlog_snapshot_file"], int(st["binlog_snapshot_position"])
            else:
                try:
                    cur.execute("FLUSH TABLES WITH READ LOCK")
                except pymysql.err.OperationalError as exc:
                    raise SourcePrivilegeError(f"the MySQL snapshot needs RELOAD: {exc.args[-1]}") from exc
                cur.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                cur.execute("SHOW MASTER STATUS")
                row = cur.fetchone()
                cur.execute("UNLOCK TABLES")
                file, pos = str(row[0]), int(row[1])
            now_ms = time.time_ns() // 1_000_000
            for t in self.tables.values():
                topic = self._topic(t)
                cur.execute(f"SELECT * FROM `{t.db}`.`{t.table}`")
                names = [d[0] for d in cur.description]
                src = SourceInfo(
                    connector="mysql",
                    name=self.server_name,
                    db=t.db,
                    table=t.table,
                    ts_ms=now_ms,
                    snapshot="true",
                    server_id=self.server_id,
                    file=file,
                    pos=pos,
                )
                n = 0
                while True:
                    rows = cur.fetchmany(5000)
                    if not rows:
                        break
                    batch = []
                    for r in rows:
                        after = {
                            c: json_value(v, decimal_float=self.decimal_float)
                            for c, v in zip(names, r, strict=True)
                        }
                        key = encode_key(after, t.key_columns)
                        batch.append(
                            Change(
                                topic,
                                key,
                                f"{self.server_id}:{file}:{pos}:s:{t.qualified}:{n}",
                                ChangeEvent(op="r", source=src, ts_ms=now_ms, after=after),
                            )
                        )
                        n += 1
                    await sink.send(batch)
                    self.snapshot_rows += len(batch)
                log.info("snapshot of %s: %d rows at %s:%d", t.qualified, n, file, pos)
            conn.rollback()
        except pymysql.err.MySQLError as exc:
            raise CdcError(f"MySQL snapshot failed: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        self._save(file, pos, None)
        return file, pos

    async def _stream(self, sink: CdcSink, stop: asyncio.Event, file: str, pos: int) -> None:
        q: queue.Queue[Any] = queue.Queue(maxsize=2048)
        halt = threading.Event()
        reader = threading.Thread(
            target=self._read_binlog, args=(file, pos, q, halt), name="fm-cdc-binlog", daemon=True
        )
        reader.start()
        log.info("streaming binlog from %s:%d as server_id %d", file, pos, self.server_id)
        try:
            while not stop.is_set():
                items = await asyncio.to_thread(_drain, q, 0.5)
                if not items:
                    continue
                failure = next((i for i in items if isinstance(i, BaseException)), None)
                done = [i for i in items if not isinstance(i, BaseException)]
                if done:
                    # many committed transactions in one send; then one durable offset for them all
                    changes = [c for item in done for c in item[0]]
                    for i in range(0, len(changes), self.batch_size):
                        await sink.send(changes[i : i + self.batch_size])
                    self.events += len(changes)
                    _, end_file, end_pos, gtid = done[-1]
                    # acknowledged by the bus: these transactions need never be read again
                    await asyncio.to_thread(self._save, end_file, end_pos, gtid)
                    self.position = (end_file, end_pos)
                if failure is not None:
                    raise failure
        finally:
            halt.set()
            await asyncio.to_thread(reader.join, 5)

    def _read_binlog(self, file: str, pos: int, q: queue.Queue[Any], halt: threading.Event) -> None:
        """Reader thread: decode the binlog, group rows by transaction, hand over committed ones."""
        r = self._repl
        ev_mod = r.event
        rows_mod = r.row_event
        wanted = {(t.db, t.table): t for t in self.tables.values()}
        stream = None
        try:
            stream = r.BinLogStreamReader(
                connection_settings=dict(self.conn_args),
                server_id=self.server_id,
                resume_stream=True,
                log_file=file,
                log_pos=pos,
                blocking=True,
                only_events=[
                    rows_mod.WriteRowsEvent,
                    rows_mod.UpdateRowsEvent,
                    rows_mod.DeleteRowsEvent,
                    ev_mod.XidEvent,
                    ev_mod.QueryEvent,
                    ev_mod.RotateEvent,
                    ev_mod.MariadbGtidEvent,
                    ev_mod.HeartbeatLogEvent,
                ],
                only_schemas=sorted({t.db for t in self.tables.values()}),
                # File/position dump (COM_BINLOG_DUMP) on MariaDB too: the library's MariaDB mode
                # resumes by GTID only and would start from the first binlog without one.
                is_mariadb=False,
                slave_heartbeat=1.0,
                enable_logging=False,
                ctl_connection_settings=dict(self.conn_args),
            )
            cur_file = file
            gtid: str | None = None
            txn: list[_Row] = []
            for event in stream:
                if halt.is_set():
                    break
                if isinstance(event, ev_mod.RotateEvent):
                    cur_file = event.next_binlog
                    continue
                if isinstance(event, ev_mod.MariadbGtidEvent):
                    gtid = event.gtid
                    continue
                if isinstance(event, ev_mod.HeartbeatLogEvent):
                    continue
                end_pos = int(event.packet.log_pos)
                if isinstance(event, ev_mod.XidEvent) or (
                    isinstance(event, ev_mod.QueryEvent) and event.query.strip().upper() == "COMMIT"
                ):
                    if txn:
                        commit_ms = int(event.timestamp) * 1000
                        q.put((self._changes(txn, commit_ms, gtid), cur_file, end_pos, gtid))
                        txn = []
                    continue
                if isinstance(event, ev_mod.QueryEvent):
                    query = event.query.strip()
                    m = _TRUNCATE.match(query)
                    if m:
                        db = _unquote_ident(m.group(1)) if m.group(1) else _schema(event.schema)
                        t = wanted.get((db, _unquote_ident(m.group(2))))
                        if t is not None:  # DDL commits on its own: emit at once
                            row = _Row(t, "t", None, None, cur_file, end_pos, 0)
                            q.put(
                                (
                                    self._changes([row], int(event.timestamp) * 1000, gtid),
                                    cur_file,
                                    end_pos,
                                    gtid,
                                )
                            )
                    elif query.upper().startswith(("ALTER", "RENAME", "DROP", "CREATE")):
                        log.warning("DDL in the binlog (schema %s): %s", _schema(event.schema), query[:300])
                    continue
                t = wanted.get((event.schema, event.table))
                if t is None:
                    continue
                if isinstance(event, rows_mod.WriteRowsEvent):
                    for i, row in enumerate(event.rows):
                        txn.append(_Row(t, "c", None, row["values"], cur_file, end_pos, i))
                elif isinstance(event, rows_mod.UpdateRowsEvent):
                    for i, row in enumerate(event.rows):
                        txn.append(
                            _Row(t, "u", row["before_values"], row["after_values"], cur_file, end_pos, i)
                        )
                elif isinstance(event, rows_mod.DeleteRowsEvent):
                    for i, row in enumerate(event.rows):
                        txn.append(_Row(t, "d", row["values"], None, cur_file, end_pos, i))
        except Exception as exc:
            q.put(self._wrap(exc))
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.close()

    def _wrap(self, exc: Exception) -> BaseException:
        pymysql = self._pymysql
        if isinstance(exc, pymysql.err.OperationalError) and exc.args:
            code = exc.args[0]
            if code in (1227, 1045):
                return SourcePrivilegeError(
                    f"binlog streaming refused ({exc.args[-1]}): "
                    "GRANT REPLICATION SLAVE ON *.* TO the CDC user"
                )
            if code == 1236:
                return SourcePositionLost(f"the saved binlog position is not readable: {exc.args[-1]}")
            return BackendUnavailable(f"binlog stream failed: {exc}")
        if isinstance(exc, pymysql.err.MySQLError):
            return BackendUnavailable(f"binlog stream failed: {exc}")
        return CdcError(f"binlog decoding failed: {exc!r}")

    def _changes(self, txn: list[_Row], commit_ms: int, gtid: str | None) -> list[Change]:
        now_ms = time.time_ns() // 1_000_000
        fl = self.decimal_float
        out = []
        for r in txn:
            before = {k: json_value(v, decimal_float=fl) for k, v in r.before.items()} if r.before else None
            after = {k: json_value(v, decimal_float=fl) for k, v in r.after.items()} if r.after else None
            src = SourceInfo(
                connector="mysql",
                name=self.server_name,
                db=r.table.db,
                table=r.table.table,
                ts_ms=commit_ms,
                server_id=self.server_id,
                gtid=gtid,
                file=r.file,
                pos=r.pos,
                row=r.row,
            )
            row = after if after is not None else before
            key = encode_key(row, r.table.key_columns) if row is not None else None
            out.append(
                Change(
                    self._topic(r.table),
                    key,
                    f"{self.server_id}:{r.file}:{r.pos}:{r.row}",
                    ChangeEvent(op=r.op, source=src, ts_ms=now_ms, before=before, after=after),
                )
            )
        return out


_TRUNCATE = re.compile(r"^TRUNCATE\s+(?:TABLE\s+)?(?:(`[^`]+`|\w+)\.)?(`[^`]+`|\w+)\s*;?$", re.IGNORECASE)


def _unquote_ident(s: str) -> str:
    return s[1:-1].replace("``", "`") if s.startswith("`") else s


def _schema(s: Any) -> str:
    return s.decode() if isinstance(s, bytes) else str(s)


def _drain(q: queue.Queue[Any], timeout_s: float) -> list[Any]:
    """Wait up to ``timeout_s`` for one item, then take whatever else is ready."""
    try:
        items = [q.get(timeout=timeout_s)]
    except queue.Empty:
        return []
    with contextlib.suppress(queue.Empty):
        while len(items) < 1024:
            items.append(q.get_nowait())
    return items
