"""PostgreSQL change data capture over logical replication with the built-in ``pgoutput`` plugin.

Set-up (:meth:`PostgresCdc.prepare`): checks ``wal_level=logical``, the REPLICATION privilege, that
every table exists, is readable and has a primary key; creates (or extends) the publication.

First run: the replication slot is created with ``EXPORT_SNAPSHOT``; a second connection imports
that snapshot (``SET TRANSACTION SNAPSHOT``) and reads every table as ``op="r"`` events. The slot's
consistent point is exactly the snapshot's position, so the stream that follows starts where the
snapshot ends: no gap, no overlap. Only once the whole snapshot is acknowledged by the bus is it
marked done in the offset file; a crash during the snapshot drops the slot and takes a new one on
restart (snapshot rows are then seen again: at-least-once).

Streaming: changes are published in batches; after the bus acknowledged a batch, the end LSN of the
last transaction that is complete in it is sent as the slot's flush position
(``confirmed_flush_lsn``). A restart resumes from there: transactions after it are replayed whole
and their re-sent messages carry the same ids (``<slot>:<commit LSN>:<ordinal>``). While idle, the
server's sent position is confirmed too, so the slot does not hold WAL back.

Failures that would open a silent gap are errors: a slot that is gone after a completed snapshot
raises :class:`~fieldmesh.cdc.base.SourcePositionLost` (recover with ``resnapshot=True``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from fieldmesh.cdc.pgoutput import PgOutputDecoder, converter_for, lsn_from_str, lsn_to_str
from fieldmesh.cdc.sink import CdcSink, OffsetFile
from fieldmesh.core.errors import BackendUnavailable, MissingDependency

__all__ = ["PgTable", "PostgresCdc", "check_wal_level", "parse_tables"]

log = logging.getLogger(__name__)

_SESSION_OPTIONS = "-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c IntervalStyle=iso_8601"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")


def _psycopg2() -> Any:
    try:
        import psycopg2
        import psycopg2.errors
        import psycopg2.extensions
        import psycopg2.extras
    except ImportError as exc:
        raise MissingDependency("psycopg2-binary", "cdc") from exc
    return psycopg2


def parse_tables(tables: str | Sequence[str], *, default_schema: str = "public") -> list[tuple[str, str]]:
    """``"public.assets,maintenance"`` -> ``[("public", "assets"), ("public", "maintenance")]``."""
    items = [t.strip() for t in (tables.split(",") if isinstance(tables, str) else tables) if t.strip()]
    if not items:
        raise CdcError("no tables given: pass --tables schema.table[,schema.table...]")
    out = []
    for t in items:
        schema, _, name = t.rpartition(".")
        out.append((schema or default_schema, name))
    return out


def check_wal_level(wal_level: str) -> None:
    """Raise :class:`SourceConfigError` unless ``wal_level`` is ``logical``."""
    if wal_level != "logical":
        raise SourceConfigError(
            f"PostgreSQL wal_level is {wal_level!r}, logical decoding needs 'logical': run "
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
        )


@dataclass(frozen=True, slots=True)
class PgTable:
    """A captured table: its qualified name, primary key, and columns with their type OIDs."""

    schema: str
    table: str
    key_columns: tuple[str, ...]
    columns: tuple[tuple[str, int], ...]

    @property
    def qualified(self) -> str:
        """``schema.table``."""
        return f"{self.schema}.{self.table}"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class PostgresCdc:
    """Captures committed changes of some tables of one PostgreSQL database into the bus."""

    def __init__(
        self,
        *,
        dsn: str,
        tables: str | Sequence[str],
        state_dir: Path,
        slot: str = "fieldmesh",
        publication: str = "fieldmesh",
        server_name: str = "fieldmesh",
        snapshot: str = "initial",
        resnapshot: bool = False,
        decimal_mode: str = "string",
        batch_size: int = 8000,
        snapshot_fetch: int = 10_000,
        topic_prefix: str = "fm.cdc",
        slot_wait_s: float = 15.0,
    ) -> None:
        for what, name in (("slot", slot), ("publication", publication)):
            if not _IDENT.match(name):
                raise CdcError(f"invalid {what} name {name!r}: use letters, digits and _")
        if snapshot not in ("initial", "never"):
            raise CdcError(f"snapshot must be 'initial' or 'never', got {snapshot!r}")
        if decimal_mode not in ("string", "float"):
            raise CdcError(f"decimal_mode must be 'string' or 'float', got {decimal_mode!r}")
        self.dsn = dsn
        self.table_names = parse_tables(tables)
        self.slot = slot.lower()
        self.publication = publication
        self.server_name = server_name
        self.snapshot_mode = snapshot
        self.resnapshot = resnapshot
        self.decimal_mode = decimal_mode
        self.batch_size = batch_size
        self.snapshot_fetch = snapshot_fetch
        self.topic_prefix = topic_prefix
        self.slot_wait_s = slot_wait_s
        self.offsets = OffsetFile(Path(state_dir) / f"pg-{self.slot}.json")
        self.tables: list[PgTable] = []
        self.db = ""
        self.confirmed_lsn = 0
        self.events = 0
        self.snapshot_rows = 0
        self.decoder: PgOutputDecoder | None = None
        self._pg = _psycopg2()

    # -- connections -----------------------------------------------------------------------------

    def _connect(self, *, replication: bool = False) -> Any:
        pg = self._pg
        try:
            if replication:
                return pg.connect(
                    self.dsn,
                    connection_factory=pg.extras.LogicalReplicationConnection,
                    options=_SESSION_OPTIONS,
                )
            conn = pg.connect(self.dsn, options=_SESSION_OPTIONS)
            conn.autocommit = True
            return conn
        except pg.OperationalError as exc:
            msg = str(exc).strip()
            if "replication" in msg and ("permission" in msg or "must be" in msg or "pg_hba" in msg):
                raise SourcePrivilegeError(
                    f"PostgreSQL refused a replication connection: {msg}. The user needs the REPLICATION "
                    "attribute (ALTER ROLE <user> REPLICATION) and pg_hba.conf must allow it"
                ) from exc
            if "does not exist" in msg or "authentication failed" in msg or "no password" in msg:
                raise CdcError(f"cannot connect to PostgreSQL: {msg}") from exc
            raise BackendUnavailable(f"cannot connect to PostgreSQL: {msg}") from exc

    # -- set-up ----------------------------------------------------------------------------------

    def prepare(self) -> list[PgTable]:
        """Check the server, user and tables; create or extend the publication."""
        pg = self._pg
        conn = self._connect()
        try:
            cur = conn.cursor()
            cur.execute("SHOW wal_level")
            check_wal_level(cur.fetchone()[0])
            cur.execute(
                "SELECT current_database(), current_user, r.rolreplication, r.rolsuper "
                "FROM pg_roles r WHERE r.rolname = current_user"
            )
            self.db, user, can_replicate, is_super = cur.fetchone()
            if not (can_replicate or is_super):
                raise SourcePrivilegeError(
                    f"PostgreSQL user {user!r} lacks the REPLICATION attribute: ALTER ROLE {user} REPLICATION"
                )
            self.tables = [self._describe(cur, user, s, t) for s, t in self.table_names]
            self._ensure_publication(cur, user)
        except pg.Error as exc:
            raise CdcError(f"PostgreSQL set-up failed: {str(exc).strip()}") from exc
        finally:
            conn.close()
        return self.tables

    def _describe(self, cur: Any, user: str, schema: str, table: str) -> PgTable:
        qual = f"{schema}.{table}"
        cur.execute("SELECT to_regclass(%s)::oid", (f"{_quote(schema)}.{_quote(table)}",))
        row = cur.fetchone()
        if row is None or row[0] is None:
            raise TableNotCapturable(f"table {qual} does not exist in database {self.db}", table=qual)
        oid = row[0]
        cur.execute("SELECT has_table_privilege(%s, %s::oid, 'SELECT')", (user, oid))
        if not cur.fetchone()[0]:
            raise SourcePrivilegeError(
                f"PostgreSQL user {user!r} cannot SELECT {qual}: GRANT SELECT ON {qual} TO {user}"
            )
        cur.execute(
            "SELECT a.attname FROM pg_index i "
            "JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, n) ON true "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
            "WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.n",
            (oid,),
        )
        keys = tuple(r[0] for r in cur.fetchall())
        if not keys:
            raise TableNotCapturable(
                f"table {qual} has no primary key: CDC keys every change by primary key; add one "
                f"(ALTER TABLE {qual} ADD PRIMARY KEY (...)) or leave the table out",
                table=qual,
            )
        cur.execute(
            "SELECT attname, atttypid FROM pg_attribute "
            "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped "
            "ORDER BY attnum",
            (oid,),
        )
        cols = tuple((r[0], int(r[1])) for r in cur.fetchall())
        return PgTable(schema=schema, table=table, key_columns=keys, columns=cols)

    def _ensure_publication(self, cur: Any, user: str) -> None:
        pg = self._pg
        cur.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (self.publication,))
        names = ", ".join(f"{_quote(t.schema)}.{_quote(t.table)}" for t in self.tables)
        try:
            if cur.fetchone() is None:
                cur.execute(f"CREATE PUBLICATION {_quote(self.publication)} FOR TABLE {names}")
                log.info("created publication %s for %s", self.publication, names)
                return
            cur.execute(
                "SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s",
                (self.publication,),
            )
            have = {(r[0], r[1]) for r in cur.fetchall()}
            for t in self.tables:
                if (t.schema, t.table) not in have:
                    cur.execute(
                        f"ALTER PUBLICATION {_quote(self.publication)} "
                        f"ADD TABLE {_quote(t.schema)}.{_quote(t.table)}"
                    )
                    log.info("added %s to publication %s", t.qualified, self.publication)
        except pg.errors.InsufficientPrivilege as exc:
            raise SourcePrivilegeError(
                f"PostgreSQL user {user!r} cannot create/alter publication {self.publication}: only the "
                f"tables' owner (or a superuser) can; have it run "
                f"CREATE PUBLICATION {self.publication} FOR TABLE {names}"
            ) from exc

    def _slot_info(self) -> dict[str, Any] | None:
        conn = self._connect()
        try:
            cur = conn.cursor()
            cur.execute(
                "SELECT plugin, database, confirmed_flush_lsn::text, active_pid FROM pg_replication_slots "
                "WHERE slot_name = %s",
                (self.slot,),
            )
            row = cur.fetchone()
        finally:
            conn.close()
        if row is None:
            return None
        return {"plugin": row[0], "database": row[1], "confirmed": row[2], "active_pid": row[3]}

    def drop_slot(self) -> None:
        """Drop the replication slot (if any) and forget the offsets: the next run re-snapshots."""
        conn = self._connect()
        try:
            cur = conn.cursor()
            cur.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                (self.slot,),
            )
        finally:
            conn.close()
        self.offsets.delete()

    # -- run -------------------------------------------------------------------------------------

    async def run(self, sink: CdcSink, stop: asyncio.Event) -> None:
        """Snapshot (first run) then stream into ``sink`` until ``stop`` is set."""
        if not self.tables:
            await asyncio.to_thread(self.prepare)
        for t in self.tables:
            await sink.ensure_topic(cdc_topic(self.db, t.schema, t.table, prefix=self.topic_prefix))
        state = self.offsets.load()
        slot = await asyncio.to_thread(self._slot_info)
        # After a crash the old walsender may hold the slot until it notices its client is gone.
        deadline = time.monotonic() + self.slot_wait_s
        while slot is not None and slot["active_pid"] is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            slot = await asyncio.to_thread(self._slot_info)
        if slot is not None and slot["database"] != self.db:
            raise CdcError(
                f"replication slot {self.slot} belongs to database {slot['database']}, not {self.db}"
            )
        if slot is not None and slot["plugin"] != "pgoutput":
            raise CdcError(f"replication slot {self.slot} uses plugin {slot['plugin']}, not pgoutput")
        if slot is not None and slot["active_pid"] is not None:
            raise CdcError(f"replication slot {self.slot} is in use by backend pid {slot['active_pid']}")
        done = state.get("slot") == self.slot and state.get("snapshot_done") is True
        if self.resnapshot:
            if slot is not None:
                await asyncio.to_thread(self.drop_slot)
            slot, done = None, False
        elif slot is None and done:
            raise SourcePositionLost(
                f"replication slot {self.slot} is gone (it was at {state.get('confirmed_lsn', '?')}): "
                "changes since then may be lost. Take a new snapshot with --resnapshot "
                "(the stream then restarts from it)"
            )
        elif slot is not None and not done and self.snapshot_mode == "initial":
            log.warning(
                "slot %s exists but its snapshot never completed: dropping it and starting over", self.slot
            )
            await asyncio.to_thread(self.drop_slot)
            slot = None
        repl = self._connect(replication=True)
        try:
            if slot is None:
                await self._create_and_snapshot(repl, sink)
            else:
                self.confirmed_lsn = lsn_from_str(slot["confirmed"])
            await self._stream(repl, sink, stop)
        finally:
            with contextlib.suppress(Exception):
                repl.close()

    async def _create_and_snapshot(self, repl: Any, sink: CdcSink) -> None:
        pg = self._pg
        cur = repl.cursor()
        export = "EXPORT_SNAPSHOT" if self.snapshot_mode == "initial" else "NOEXPORT_SNAPSHOT"
        try:
            cur.execute(f"CREATE_REPLICATION_SLOT {_quote(self.slot)} LOGICAL pgoutput {export}")
            _name, point, snap_name, _plugin = cur.fetchone()
        except pg.Error as exc:
            msg = str(exc).strip()
            if "max_replication_slots" in msg or "all replication slots are in use" in msg:
                raise SourceConfigError(
                    f"cannot create slot {self.slot}: {msg} (raise max_replication_slots)"
                ) from exc
            raise CdcError(f"cannot create replication slot {self.slot}: {msg}") from exc
        self.confirmed_lsn = lsn_from_str(point)
        log.info("created slot %s at %s", self.slot, point)
        self.offsets.save({"slot": self.slot, "snapshot_done": False, "confirmed_lsn": point})
        if self.snapshot_mode == "initial":
            await self._snapshot(snap_name, sink)
        self.offsets.save({"slot": self.slot, "snapshot_done": True, "confirmed_lsn": point})

    async def _snapshot(self, snapshot_name: str, sink: CdcSink) -> None:
        conn = self._connect()
        conn.autocommit = False
        conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
        point = self.confirmed_lsn
        now_ms = time.time_ns() // 1_000_000
        try:
            cur = conn.cursor()
            cur.execute("SET TRANSACTION SNAPSHOT %s", (snapshot_name,))
            for t in self.tables:
                topic = cdc_topic(self.db, t.schema, t.table, prefix=self.topic_prefix)
                names = [c for c, _ in t.columns]
                convs = [converter_for(oid, decimal_mode=self.decimal_mode) for _, oid in t.columns]
                cols = ", ".join(_quote(c) for c in names)
                # Values as the type's output function writes them (as pgoutput sends them), not
                # psycopg2's Python objects: one converter per type for snapshot and stream alike.
                raw = self._pg.extensions.new_type(tuple({oid for _, oid in t.columns}), "FM_RAW", _raw)
                self._pg.extensions.register_type(raw, conn)
                named = conn.cursor(name=f"fm_snap_{self.slot}")
                named.itersize = self.snapshot_fetch
                named.execute(f"SELECT {cols} FROM {_quote(t.schema)}.{_quote(t.table)}")
                src = SourceInfo(
                    connector="postgresql",
                    name=self.server_name,
                    db=self.db,
                    schema=t.schema,
                    table=t.table,
                    ts_ms=now_ms,
                    snapshot="true",
                    lsn=point,
                )
                n = 0
                while True:
                    rows = named.fetchmany(self.snapshot_fetch)
                    if not rows:
                        break
                    batch: list[Change] = []
                    for r in rows:
                        after = {
                            c: (None if v is None else f(v)) for c, f, v in zip(names, convs, r, strict=True)
                        }
                        ev = ChangeEvent(op="r", source=src, ts_ms=now_ms, after=after)
                        key = encode_key(after, t.key_columns)
                        batch.append(Change(topic, key, f"{self.slot}:{point:X}:s:{t.qualified}:{n}", ev))
                        n += 1
                    await sink.send(batch)
                    self.snapshot_rows += len(batch)
                named.close()
                log.info("snapshot of %s: %d rows", t.qualified, n)
        finally:
            conn.rollback()
            conn.close()

    async def _stream(self, repl: Any, sink: CdcSink, stop: asyncio.Event) -> None:
        pg = self._pg
        dec = PgOutputDecoder(
            db=self.db,
            slot=self.slot,
            server_name=self.server_name,
            key_columns={t.qualified: list(t.key_columns) for t in self.tables},
            decimal_mode=self.decimal_mode,
            topic_prefix=self.topic_prefix,
        )
        self.decoder = dec
        cur = repl.cursor()
        try:
            cur.start_replication(
                slot_name=self.slot,
                decode=False,
                start_lsn=0,
                options={"proto_version": "1", "publication_names": self.publication},
                status_interval=10,
            )
        except pg.Error as exc:
            err = str(exc).strip()
            if "does not exist" in err:
                raise SourcePositionLost(f"replication slot {self.slot} does not exist: {err}") from exc
            raise CdcError(f"cannot start replication on slot {self.slot}: {err}") from exc
        log.info("streaming slot %s from %s", self.slot, lsn_to_str(self.confirmed_lsn))
        loop = asyncio.get_running_loop()
        fd = repl.fileno()
        pending: list[Change] = []
        # One send is in flight while the next batch is decoded; a batch is published only after
        # the previous one was acknowledged, so per-key order holds. LSNs are confirmed only when
        # nothing is in flight: ``free_lsn`` is the end of the last transaction whose changes were
        # all handed to a send (confirmable once that send is acknowledged).
        complete_lsn = self.confirmed_lsn  # end of the last transaction fully decoded
        free_lsn = self.confirmed_lsn
        inflight: asyncio.Task[None] | None = None
        inflight_n = 0
        try:
            while not stop.is_set():
                msg = None
                for _ in range(self.batch_size):
                    msg = self._read(cur)
                    if msg is None:
                        break
                    end = dec.feed(msg.payload, msg.data_start, pending)
                    if end:
                        complete_lsn = end
                        if not pending:
                            free_lsn = end
                    if len(pending) >= self.batch_size:
                        break
                if pending and (msg is None or len(pending) >= self.batch_size):
                    if inflight is not None:
                        await inflight
                        self.events += inflight_n
                    inflight, inflight_n = asyncio.create_task(sink.send(pending)), len(pending)
                    pending = []
                    free_lsn = complete_lsn
                if inflight is not None and (inflight.done() or msg is None):
                    await inflight
                    self.events += inflight_n
                    inflight, inflight_n = None, 0
                if inflight is None:
                    if msg is None and not pending and not dec.in_txn:
                        # Everything the server sent is in hand and acknowledged: confirm its sent position.
                        free_lsn = max(free_lsn, int(cur.wal_end or 0))
                    if free_lsn > self.confirmed_lsn:
                        self._confirm(cur, free_lsn)
                if msg is None:
                    await _readable(loop, fd, 1.0)
            if inflight is not None:
                await inflight
                self.events += inflight_n
                inflight = None
                if free_lsn > self.confirmed_lsn:
                    self._confirm(cur, free_lsn)
        finally:
            if inflight is not None:  # an error is propagating: unacknowledged changes are replayed later
                inflight.cancel()
                with contextlib.suppress(BaseException):
                    await inflight
            with contextlib.suppress(Exception):
                cur.send_feedback(write_lsn=self.confirmed_lsn, flush_lsn=self.confirmed_lsn, force=True)

    def _read(self, cur: Any) -> Any:
        pg = self._pg
        try:
            return cur.read_message()
        except pg.Error as exc:
            msg = str(exc).strip()
            if "does not exist" in msg or "was terminated" in msg or "invalidated" in msg:
                raise SourcePositionLost(f"replication slot {self.slot} is gone: {msg}") from exc
            raise BackendUnavailable(f"PostgreSQL replication stream failed: {msg}") from exc

    def _confirm(self, cur: Any, lsn: int) -> None:
        cur.send_feedback(write_lsn=lsn, flush_lsn=lsn, force=True)
        self.confirmed_lsn = lsn


def _raw(value: str | None, _cur: Any) -> str | None:
    return value


async def _readable(loop: asyncio.AbstractEventLoop, fd: int, timeout_s: float) -> None:
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await asyncio.wait_for(fut, timeout_s)
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)
