"""Change events in the Debezium envelope shape, their codec, and the CDC errors.

A change event is what one committed row change looks like on the bus::

    {"before": {...} | null, "after": {...} | null, "op": "c|u|d|r|t", "ts_ms": 1763812345123,
     "source": {"connector": "postgresql", "db": "shop", "schema": "public", "table": "assets",
                "ts_ms": <commit time>, "lsn": 24023128, "txId": 771, "snapshot": "false", ...}}

``op``: ``c`` insert, ``u`` update, ``d`` delete, ``r`` snapshot read, ``t`` truncate. ``ts_ms`` is
when fieldmesh emitted the event; ``source.ts_ms`` is the commit time in the source database, which
is the time an as-of join uses. The record key is the primary key as JSON (``{"id": 7}``), like
Debezium's key without schema. Events written by a real Debezium (JSON converter, with or without
``schemas.enable``, i.e. wrapped in ``{"schema": ..., "payload": ...}``) decode to the same struct.

Errors (all :class:`~fieldmesh.core.errors.FieldmeshError`)::

    CdcError                   a CDC source cannot be captured (message says what to fix)
    ├── SourcePrivilegeError   the source user lacks a privilege (REPLICATION, SELECT, ...)
    ├── SourceConfigError      the server is not set up for CDC (wal_level, binlog format, ...)
    ├── TableNotCapturable     a table is missing or has no primary key
    └── SourcePositionLost     the saved position is gone (dropped slot, purged binlog)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from fieldmesh.core.errors import FieldmeshError
from fieldmesh.core.topics import partition_for

__all__ = [
    "CDC_TOPIC_PREFIX",
    "UNAVAILABLE",
    "CdcError",
    "Change",
    "ChangeEvent",
    "SourceConfigError",
    "SourceInfo",
    "SourcePositionLost",
    "SourcePrivilegeError",
    "TableNotCapturable",
    "cdc_topic",
    "decode_change_event",
    "encode_change_event",
    "encode_key",
    "event_order",
    "key_partition",
]

#: Bus topics of change events are ``fm.cdc.<db>.<schema>.<table>``.
CDC_TOPIC_PREFIX: Final = "fm.cdc"

#: Value of a column the source did not send (PostgreSQL unchanged TOAST), as Debezium writes it.
UNAVAILABLE: Final = "__debezium_unavailable_value"

Op = Literal["c", "u", "d", "r", "t"]


class CdcError(FieldmeshError):
    """A CDC source cannot be captured; the message says what to fix."""


class SourcePrivilegeError(CdcError):
    """The source database user lacks a privilege CDC needs."""


class SourceConfigError(CdcError):
    """The source server is not configured for CDC (wal_level, binlog, ...)."""


class TableNotCapturable(CdcError):
    """A requested table does not exist or has no primary key."""

    def __init__(self, message: str, *, table: str) -> None:
        super().__init__(message)
        self.table = table


class SourcePositionLost(CdcError):
    """The saved source position no longer exists (dropped slot, purged binlog): a gap would follow."""


@dataclass(slots=True)
class Change:
    """A change ready for the bus: its topic, key, deterministic message id and event."""

    topic: str
    key: bytes | None
    msg_id: str
    event: ChangeEvent


class SourceInfo(msgspec.Struct, frozen=True, gc=False):
    """Where a change comes from (Debezium ``source`` block; fields a connector lacks are null)."""

    connector: str
    db: str
    table: str
    ts_ms: int
    name: str = "fieldmesh"
    version: str = "fieldmesh-0.1"
    schema: str | None = None
    snapshot: str = "false"
    # PostgreSQL
    lsn: int | None = None
    txId: int | None = None
    # MySQL / MariaDB
    server_id: int | None = None
    gtid: str | None = None
    file: str | None = None
    pos: int | None = None
    row: int | None = None


class ChangeEvent(msgspec.Struct, frozen=True, omit_defaults=False, gc=False):
    """One committed row change in the Debezium envelope shape."""

    op: str
    source: SourceInfo
    ts_ms: int
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None

    @property
    def table_id(self) -> str:
        """``schema.table`` (or ``db.table`` when the source has no schemas, like MySQL)."""
        s = self.source
        return f"{s.schema or s.db}.{s.table}"

    @property
    def row(self) -> dict[str, Any] | None:
        """The row after the change, or before it for a delete."""
        return self.after if self.after is not None else self.before


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ChangeEvent)


class _Wrapped(msgspec.Struct, gc=False):
    payload: ChangeEvent | None = None


_wrapped_decoder = msgspec.json.Decoder(_Wrapped)


def encode_change_event(event: ChangeEvent) -> bytes:
    """JSON bytes of an event, in the Debezium envelope (no schema wrapper)."""
    return _encoder.encode(event)


def decode_change_event(data: bytes) -> ChangeEvent | None:
    """Decode a change event: bare envelope or Debezium's ``{"schema", "payload"}`` wrapper.

    Returns None for a tombstone (empty value or ``{"payload": null}``), which Debezium sends after
    a delete for log compaction. Raises :class:`msgspec.DecodeError` on anything else malformed.
    """
    if not data:
        return None
    if data.lstrip()[:12].startswith((b'{"schema"', b'{"payload"')) or b'"payload"' in data[:4096]:
        try:
            return _wrapped_decoder.decode(data).payload
        except msgspec.ValidationError:
            pass
    return _decoder.decode(data)


def encode_key(row: Mapping[str, Any], key_columns: Sequence[str]) -> bytes:
    """The record key: the primary key columns as a JSON object, in key order."""
    return _encoder.encode({c: row.get(c) for c in key_columns})


def key_partition(key: bytes, partitions: int) -> int:
    """The bus partition of a key: a stable CRC-32 of its JSON, so one key keeps one partition."""
    return partition_for(key.decode(), partitions)


_SAFE: Final = re.compile(r"[^A-Za-z0-9_-]")


def cdc_topic(db: str, schema: str | None, table: str, *, prefix: str = CDC_TOPIC_PREFIX) -> str:
    """The bus topic of a table: ``fm.cdc.<db>.<schema>.<table>`` (characters outside
    ``[A-Za-z0-9_-]`` become ``_`` so the name is one subject token per part)."""
    parts = [db] + ([schema] if schema else []) + [table]
    return ".".join([prefix, *(_SAFE.sub("_", p) for p in parts)])


def event_order(event: ChangeEvent) -> tuple[int, int, int]:
    """A sort key that follows commit order within one source: (commit ms, position, row).

    The position is the LSN for PostgreSQL, ``(binlog file number << 32) + pos`` for MySQL.
    """
    s = event.source
    if s.lsn is not None:
        pos = s.lsn
    elif s.file is not None and s.pos is not None:
        num = s.file.rsplit(".", 1)[-1]
        pos = ((int(num) if num.isdigit() else 0) << 32) + s.pos
    else:
        pos = 0
    return (s.ts_ms, pos, s.row or 0)
