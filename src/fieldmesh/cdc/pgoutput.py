"""A decoder of PostgreSQL's ``pgoutput`` logical replication protocol (version 1), free of I/O.

It turns the payloads of ``XLogData`` messages into :class:`~fieldmesh.cdc.base.ChangeEvent` s.
Values arrive in PostgreSQL's text output format; :func:`converter_for` maps the common types to
JSON values the way Debezium's JSON converter does, and falls back to the text form for any other
type (documented rule: *an unmapped type arrives as its PostgreSQL text representation*).

The replication session must use ``DateStyle=ISO`` and ``TimeZone=UTC`` (the driver sets both), so
timestamps parse without guessing.

Type mapping (PostgreSQL -> JSON)::

    bool                         -> true/false
    int2, int4, int8, oid        -> integer
    float4, float8               -> number ("NaN", "Infinity" stay strings)
    numeric                      -> string (exact; ``decimal_mode="float"`` gives a number)
    text, varchar, char, name,
    uuid, json, jsonb            -> string
    timestamp                    -> integer microseconds since the epoch (Debezium MicroTimestamp)
    timestamptz                  -> string ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (Debezium ZonedTimestamp)
    date                         -> integer days since the epoch (Debezium Date)
    time                         -> integer microseconds since midnight (Debezium MicroTime)
    bytea                        -> string, base64
    anything else (arrays, inet, ranges, enums, ...) -> the text representation
    ``infinity`` / BC dates      -> the text representation
"""

from __future__ import annotations

import base64
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from typing import Any, Final

from fieldmesh.cdc.base import UNAVAILABLE, Change, ChangeEvent, SourceInfo, cdc_topic, encode_key

__all__ = [
    "PG_EPOCH_US",
    "Column",
    "PgOutputDecoder",
    "Relation",
    "converter_for",
    "lsn_from_str",
    "lsn_to_str",
]

log = logging.getLogger(__name__)

#: Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
PG_EPOCH_US: Final = 946_684_800_000_000

Converter = Callable[[str], Any]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_EPOCH_DATE = date(1970, 1, 1)


def lsn_from_str(text: str) -> int:
    """``'0/1D746D0'`` -> integer LSN."""
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) + int(lo, 16)


def lsn_to_str(lsn: int) -> str:
    """Integer LSN -> ``'0/1D746D0'``."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _bool(s: str) -> bool:
    return s in ("t", "true")


def _float(s: str) -> float | str:
    try:
        v = float(s)
    except ValueError:
        return s
    return v if v == v and v not in (float("inf"), float("-inf")) else s


def _timestamptz(s: str) -> str:
    # With TimeZone=UTC the server writes "2024-01-02 03:04:05.123456+00".
    if s.endswith("+00") and len(s) >= 22 and s[4] == "-":
        body = s[:-3]
        if "." not in body:
            body += ".000000"
        else:
            body = body.ljust(26, "0")
        return body.replace(" ", "T", 1) + "Z"
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        return s  # infinity, BC dates, years > 9999
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _timestamp(s: str) -> int | str:
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        return s
    d = dt - _EPOCH_NAIVE
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


def _date(s: str) -> int | str:
    try:
        return (date.fromisoformat(s) - _EPOCH_DATE).days
    except ValueError:
        return s


def _time(s: str) -> int | str:
    try:
        t = time.fromisoformat(s)
    except ValueError:
        return s
    return ((t.hour * 60 + t.minute) * 60 + t.second) * 1_000_000 + t.microsecond


def _bytea(s: str) -> str:
    if s.startswith("\\x"):
        return base64.b64encode(bytes.fromhex(s[2:])).decode()
    return s


def _text(s: str) -> str:
    return s


_CONVERTERS: Final[dict[int, Converter]] = {
    16: _bool,
    20: int,
    21: int,
    23: int,
    26: int,
    700: _float,
    701: _float,
    1114: _timestamp,
    1184: _timestamptz,
    1082: _date,
    1083: _time,
    17: _bytea,
}


def converter_for(type_oid: int, *, decimal_mode: str = "string") -> Converter:
    """The text -> JSON value converter of a PostgreSQL type (text for unmapped types)."""
    if type_oid == 1700:
        return _float if decimal_mode == "float" else _text
    return _CONVERTERS.get(type_oid, _text)


@dataclass(slots=True)
class Column:
    """A column of a replicated relation."""

    name: str
    type_oid: int
    is_key: bool
    convert: Converter


@dataclass(slots=True)
class Relation:
    """A table as last described by a pgoutput Relation message."""

    relid: int
    schema: str
    table: str
    replica_identity: str
    columns: list[Column]
    key_columns: list[str]
    topic: str
    names: list[str] = field(default_factory=list)
    #: (name, converter or None for text) per column: the decoding loop's plan.
    plan: list[tuple[str, Converter | None]] = field(default_factory=list)


_U8 = struct.Struct(">B")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_BEGIN = struct.Struct(">qqI")
_COMMIT = struct.Struct(">bqqq")


class PgOutputDecoder:
    """Stateful pgoutput decoder: relations, the current transaction, and ordinals for message ids.

    ``feed`` appends the changes of one message to ``out`` and returns the commit's end LSN when
    the message was a Commit (else 0). Message ids are ``<slot>:<commit LSN>:<ordinal>``: the same
    transaction replayed after a restart yields the same ids, so the bus drops the re-sends.
    """

    def __init__(
        self,
        *,
        db: str,
        slot: str,
        server_name: str = "fieldmesh",
        key_columns: dict[str, list[str]] | None = None,
        decimal_mode: str = "string",
        topic_prefix: str = "fm.cdc",
        clock_ms: Callable[[], int] | None = None,
    ) -> None:
        import time as _time_mod

        self.db = db
        self.slot = slot
        self.server_name = server_name
        self.decimal_mode = decimal_mode
        self.topic_prefix = topic_prefix
        self._key_columns = dict(key_columns or {})
        self._clock = clock_ms or (lambda: _time_mod.time_ns() // 1_000_000)
        self.relations: dict[int, Relation] = {}
        self.schema_changes = 0
        self.in_txn = False
        self.xid = 0
        self.final_lsn = 0
        self.commit_ts_ms = 0
        self._ordinal = 0
        self._now_ms = 0

    # -- messages --------------------------------------------------------------------------------

    def feed(self, payload: bytes, data_start: int, out: list[Change]) -> int:
        """Decode one pgoutput message; append its changes to ``out``; return end LSN on Commit."""
        tag = payload[0]
        if tag == 0x49:  # I
            self._insert(payload, data_start, out)
        elif tag == 0x55:  # U
            self._update(payload, data_start, out)
        elif tag == 0x44:  # D
            self._delete(payload, data_start, out)
        elif tag == 0x42:  # B
            self.final_lsn, ts_us, self.xid = _BEGIN.unpack_from(payload, 1)
            self.commit_ts_ms = (ts_us + PG_EPOCH_US) // 1000
            self.in_txn = True
            self._ordinal = 0
            self._now_ms = self._clock()
        elif tag == 0x43:  # C
            _flags, _commit_lsn, end_lsn, _ts = _COMMIT.unpack_from(payload, 1)
            self.in_txn = False
            return int(end_lsn)
        elif tag == 0x52:  # R
            self._relation(payload)
        elif tag == 0x54:  # T
            self._truncate(payload, data_start, out)
        # Y (type), O (origin), M (logical message): nothing to emit.
        return 0

    def _relation(self, buf: bytes) -> None:
        (relid,) = _U32.unpack_from(buf, 1)
        pos = 5
        schema, pos = _cstring(buf, pos)
        table, pos = _cstring(buf, pos)
        ident = chr(buf[pos])
        (ncols,) = _I16.unpack_from(buf, pos + 1)
        pos += 3
        cols: list[Column] = []
        for _ in range(ncols):
            flags = buf[pos]
            name, pos = _cstring(buf, pos + 1)
            (oid,) = _U32.unpack_from(buf, pos)
            pos += 8  # type oid + typmod
            cols.append(
                Column(name, oid, bool(flags & 1), converter_for(oid, decimal_mode=self.decimal_mode))
            )
        qual = f"{schema}.{table}"
        keys = self._key_columns.get(qual) or [c.name for c in cols if c.is_key]
        names = [c.name for c in cols]
        missing = [k for k in keys if k not in names]
        if missing:  # the key changed under us: follow the replica identity the server sends now
            keys = [c.name for c in cols if c.is_key]
            self._key_columns[qual] = keys
        old = self.relations.get(relid)
        if old is not None and (
            [(c.name, c.type_oid) for c in old.columns] != [(c.name, c.type_oid) for c in cols]
        ):
            self.schema_changes += 1
            log.warning(
                "schema change on %s: columns %s -> %s",
                qual,
                [(c.name, c.type_oid) for c in old.columns],
                [(c.name, c.type_oid) for c in cols],
            )
        self.relations[relid] = Relation(
            relid=relid,
            schema=schema,
            table=table,
            replica_identity=ident,
            columns=cols,
            key_columns=keys,
            topic=cdc_topic(self.db, schema, table, prefix=self.topic_prefix),
            names=names,
            plan=[(c.name, None if c.convert is _text else c.convert) for c in cols],
        )

    def _tuple(self, rel: Relation, buf: bytes, pos: int) -> tuple[dict[str, Any], int]:
        (n,) = _I16.unpack_from(buf, pos)
        pos += 2
        plan = rel.plan
        if n != len(plan):
            raise ValueError(
                f"pgoutput tuple of {rel.schema}.{rel.table} has {n} columns, relation has {len(plan)}"
            )
        row: dict[str, Any] = {}
        i32 = _I32.unpack_from
        for name, convert in plan:
            kind = buf[pos]
            if kind == 0x74:  # t: text
                (ln,) = i32(buf, pos + 1)
                pos += 5
                text = buf[pos : pos + ln].decode()
                row[name] = text if convert is None else convert(text)
                pos += ln
            elif kind == 0x6E:  # n: null
                row[name] = None
                pos += 1
            elif kind == 0x75:  # u: unchanged TOAST value, not sent
                row[name] = UNAVAILABLE
                pos += 1
            else:
                raise ValueError(f"unsupported pgoutput tuple kind {chr(kind)!r} (binary mode is not used)")
        return row, pos

    def _source(self, rel: Relation, lsn: int) -> SourceInfo:
        return SourceInfo(
            connector="postgresql",
            name=self.server_name,
            db=self.db,
            schema=rel.schema,
            table=rel.table,
            ts_ms=self.commit_ts_ms,
            lsn=lsn,
            txId=self.xid,
        )

    def _emit(
        self,
        rel: Relation,
        op: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        lsn: int,
        out: list[Change],
    ) -> None:
        row = after if after is not None else before
        key = encode_key(row, rel.key_columns) if row is not None else None
        ev = ChangeEvent(op=op, source=self._source(rel, lsn), ts_ms=self._now_ms, before=before, after=after)
        out.append(Change(rel.topic, key, f"{self.slot}:{self.final_lsn:X}:{self._ordinal}", ev))
        self._ordinal += 1

    def _rel(self, buf: bytes) -> Relation:
        (relid,) = _U32.unpack_from(buf, 1)
        rel = self.relations.get(relid)
        if rel is None:
            raise ValueError(f"pgoutput change for relation {relid} before its Relation message")
        return rel

    def _insert(self, buf: bytes, lsn: int, out: list[Change]) -> None:
        rel = self._rel(buf)
        after, _ = self._tuple(rel, buf, 6)  # relid(4) + 'N'
        self._emit(rel, "c", None, after, lsn, out)

    def _update(self, buf: bytes, lsn: int, out: list[Change]) -> None:
        rel = self._rel(buf)
        pos = 5
        before: dict[str, Any] | None = None
        kind = buf[pos]
        if kind in (0x4B, 0x4F):  # K: old key only; O: whole old row (REPLICA IDENTITY FULL)
            before, pos = self._tuple(rel, buf, pos + 1)
            if kind == 0x4B:
                before = _key_only(rel, before)
            kind = buf[pos]
        after, _ = self._tuple(rel, buf, pos + 1)
        if before is not None:
            # With REPLICA IDENTITY FULL an unchanged TOAST column is known from the old row.
            for k, v in after.items():
                if v == UNAVAILABLE and before.get(k, UNAVAILABLE) != UNAVAILABLE:
                    after[k] = before[k]
        self._emit(rel, "u", before, after, lsn, out)

    def _delete(self, buf: bytes, lsn: int, out: list[Change]) -> None:
        rel = self._rel(buf)
        kind = buf[5]
        before, _ = self._tuple(rel, buf, 6)
        if kind == 0x4B:
            before = _key_only(rel, before)
        self._emit(rel, "d", before, None, lsn, out)

    def _truncate(self, buf: bytes, lsn: int, out: list[Change]) -> None:
        (n,) = _U32.unpack_from(buf, 1)
        pos = 6  # count(4) + options(1)
        for _ in range(n):
            (relid,) = _U32.unpack_from(buf, pos)
            pos += 4
            rel = self.relations.get(relid)
            if rel is not None:
                self._emit(rel, "t", None, None, lsn, out)


def _key_only(rel: Relation, row: dict[str, Any]) -> dict[str, Any]:
    """An old-key tuple as Debezium shows it: key columns set, every other column null."""
    keys = set(rel.key_columns) | {c.name for c in rel.columns if c.is_key}
    return {c.name: (row.get(c.name) if c.name in keys else None) for c in rel.columns}


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(b"\x00", pos)
    return buf[pos:end].decode(), end + 1
