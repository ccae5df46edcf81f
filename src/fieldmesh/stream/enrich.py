"""As-of enrichment: join each reading with the enterprise row that was valid at its event time.

State is built from change events (fieldmesh CDC or a real Debezium, same envelope) and is free of
I/O. Each row version is valid from its source commit time (``source.ts_ms``) until the next
change of the same join key; a delete (or a truncate, or the row moving to another join key) ends
its validity. :meth:`AsOfTable.lookup` returns the version valid at a given event time, so a reading
is enriched with the asset as it was *when the reading was taken*, whatever the arrival order of
readings and changes, and a later change never alters how an earlier reading is enriched.

Rules worth knowing:

* Snapshot rows (``op="r"``) are valid from the beginning of time: they are the best knowledge of
  the past a fresh capture has. A change after the snapshot starts a new version as usual.
* Versions of one key are ordered by commit time, then source position (LSN or binlog position):
  two commits in the same millisecond stay in commit order.
* Re-delivered events (at-least-once) replace the version they already created: applying is
  idempotent.
* Keys are compared as strings (``device_id`` "7" matches an integer column value 7).
* :attr:`AsOfEnricher.watermark_ms` is the latest commit time applied: a reading newer than it may
  be enriched with a row that a change not yet consumed will supersede.
* Enrichment dicts are shared between readings of the same version: treat them as read-only.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from fieldmesh.bus.base import BusRecord
from fieldmesh.cdc.base import ChangeEvent, decode_change_event, event_order
from fieldmesh.core.errors import ConfigError
from fieldmesh.core.model import Reading

__all__ = ["BEGINNING_MS", "AsOfEnricher", "AsOfJoin", "AsOfTable"]

#: Valid-from time of snapshot rows: before any reading.
BEGINNING_MS: Final = -(2**62)

_Order = tuple[int, int, int]


class _Versions:
    """The versions of one join key, sorted by (valid-from ms, position)."""

    __slots__ = ("orders", "rows", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.orders: list[_Order] = []
        self.rows: list[dict[str, Any] | None] = []

    def put(self, order: _Order, row: dict[str, Any] | None) -> None:
        i = bisect.bisect_left(self.orders, order)
        if i < len(self.orders) and self.orders[i] == order:
            self.rows[i] = row  # the same change again (redelivery): idempotent
            return
        self.orders.insert(i, order)
        self.starts.insert(i, order[0])
        self.rows.insert(i, row)

    def at(self, ts_ms: int) -> dict[str, Any] | None:
        starts = self.starts
        if starts[-1] <= ts_ms:  # the common case: the current version
            return self.rows[-1]
        i = bisect.bisect_right(starts, ts_ms)
        return self.rows[i - 1] if i else None


class AsOfTable:
    """Versioned state of one table, indexed by a join column (not necessarily the primary key).

    Args:
        key_column: the column readings are joined on (e.g. ``device_id``).
        fields: the columns to keep (all when None); the join column is always available.
        prefix: prepended to field names in the enrichment (e.g. ``"asset."``).
        pk_columns: the primary key, used to follow a row whose join key changes or that is deleted
            without its old values; when None the record key (CDC) or the join column is used.
    """

    def __init__(
        self,
        *,
        key_column: str,
        fields: Sequence[str] | None = None,
        prefix: str = "",
        pk_columns: Sequence[str] | None = None,
    ) -> None:
        self.key_column = key_column
        self.fields = tuple(fields) if fields is not None else None
        self.prefix = prefix
        self.pk_columns = tuple(pk_columns) if pk_columns else None
        self._keys: dict[str, _Versions] = {}
        self._pk: dict[Any, tuple[_Order, str | None]] = {}
        self.applied = 0
        self.unresolved = 0
        self.watermark_ms = BEGINNING_MS

    def __len__(self) -> int:
        return len(self._keys)

    def _project(self, row: dict[str, Any]) -> dict[str, Any]:
        p = self.prefix
        if self.fields is None:
            return {p + k: v for k, v in row.items()}
        return {p + k: row.get(k) for k in self.fields}

    def _identity(self, event: ChangeEvent, key: bytes | None) -> Any:
        row = event.row
        if self.pk_columns is not None and row is not None:
            return tuple(row.get(c) for c in self.pk_columns)
        if key is not None:
            return key
        return None if row is None else _str(row.get(self.key_column))

    def apply(self, event: ChangeEvent, key: bytes | None = None) -> None:
        """Apply one change event; ``key`` is its bus record key (the primary key as JSON)."""
        op = event.op
        order = event_order(event)
        if op == "r":
            order = (BEGINNING_MS, order[1], order[2])
        else:
            self.watermark_ms = max(self.watermark_ms, order[0])
        self.applied += 1
        if op == "t":
            for versions in self._keys.values():
                versions.put(order, None)
            self._pk.clear()
            return
        ident = self._identity(event, key)
        prev = self._pk.get(ident) if ident is not None else None
        # An older event of this row arriving late must not take over the newer row's mapping.
        stale = prev is not None and prev[0] > order
        mapped = prev[1] if prev is not None and not stale else None
        if op == "d":
            old = _str((event.before or {}).get(self.key_column)) or mapped
            if old is None:
                self.unresolved += 1
                return
            self._key(old).put(order, None)
            if ident is not None and not stale:
                self._pk[ident] = (order, None)
            return
        after = event.after
        if after is None:
            return
        new = _str(after.get(self.key_column))
        old = (_str(event.before.get(self.key_column)) if event.before else None) or mapped
        if old is not None and old != new:
            self._key(old).put(order, None)  # the row moved to another join key: the old one ends
        if new is not None:
            self._key(new).put(order, self._project(after))
        if ident is not None and not stale:
            self._pk[ident] = (order, new)

    def _key(self, key: str) -> _Versions:
        v = self._keys.get(key)
        if v is None:
            v = self._keys[key] = _Versions()
        return v

    def lookup(self, key: Any, event_ts_ms: int) -> dict[str, Any] | None:
        """The (projected, prefixed) row valid for ``key`` at ``event_ts_ms``, or None."""
        v = self._keys.get(key if isinstance(key, str) else str(key))
        return v.at(event_ts_ms) if v is not None else None

    def versions(self, key: Any) -> list[tuple[int, dict[str, Any] | None]]:
        """``(valid_from_ms, row)`` of every version of ``key``, oldest first."""
        v = self._keys.get(key if isinstance(key, str) else str(key))
        return [] if v is None else list(zip(v.starts, v.rows, strict=True))

    def compact(self, before_ts_ms: int) -> int:
        """Forget versions no reading at or after ``before_ts_ms`` can see; return how many."""
        dropped = 0
        for key in list(self._keys):
            v = self._keys[key]
            i = bisect.bisect_right(v.starts, before_ts_ms) - 1
            if i > 0:
                del v.starts[:i], v.orders[:i], v.rows[:i]
                dropped += i
            if len(v.rows) == 1 and v.rows[0] is None:
                del self._keys[key]
                dropped += 1
        return dropped


def _str(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


@dataclass(frozen=True, slots=True)
class AsOfJoin:
    """How readings join one table.

    Args:
        table: ``schema.table`` (``db.table`` for MySQL), as in the change events' source.
        reading_field: a :class:`Reading` attribute (``device_id``) or ``meta.<name>``.
        column: the table column matched against it.
        fields: the columns copied into ``Reading.enrichment`` (all when None).
        prefix: prepended to the copied names, e.g. ``"asset."``.
        pk_columns: the table's primary key (optional, see :class:`AsOfTable`).
    """

    table: str
    reading_field: str = "device_id"
    column: str = "device_id"
    fields: tuple[str, ...] | None = None
    prefix: str = ""
    pk_columns: tuple[str, ...] | None = None


class AsOfEnricher:
    """Fills ``Reading.enrichment`` from as-of joins with tables captured by CDC.

    Implements the processor's ``Enricher`` hook: ``enrich(readings) -> readings``.
    """

    def __init__(self, joins: Sequence[AsOfJoin]) -> None:
        if not joins:
            raise ConfigError("AsOfEnricher needs at least one join", key="enrich.joins")
        self.joins = list(joins)
        self.tables: dict[str, list[AsOfTable]] = {}
        self._plan: list[tuple[str, str | None, AsOfTable]] = []
        for j in self.joins:
            t = AsOfTable(key_column=j.column, fields=j.fields, prefix=j.prefix, pk_columns=j.pk_columns)
            self.tables.setdefault(j.table, []).append(t)
            attr, _, meta_key = j.reading_field.partition(".")
            if attr == "meta":
                self._plan.append(("meta", meta_key, t))
            elif attr in Reading.__struct_fields__ and not meta_key:
                self._plan.append((attr, None, t))
            else:
                raise ConfigError(
                    f"unknown reading field {j.reading_field!r}: use a Reading field or meta.<name>",
                    key="enrich.reading_field",
                )
        self.ignored = 0

    @property
    def watermark_ms(self) -> int:
        """The latest source commit time applied to any table."""
        return max((t.watermark_ms for ts in self.tables.values() for t in ts), default=BEGINNING_MS)

    def table(self, name: str) -> AsOfTable:
        """The (first) state of a joined table."""
        return self.tables[name][0]

    def _targets(self, event: ChangeEvent) -> list[AsOfTable]:
        s = event.source
        found = self.tables.get(f"{s.schema or s.db}.{s.table}")
        if found is None and s.schema:
            found = self.tables.get(f"{s.db}.{s.schema}.{s.table}")
        if found is None:
            found = self.tables.get(s.table)
        return found or []

    def apply(self, event: ChangeEvent, key: bytes | None = None) -> None:
        """Apply one change event to every join of its table (other tables are ignored)."""
        targets = self._targets(event)
        if not targets:
            self.ignored += 1
        for t in targets:
            t.apply(event, key)

    def apply_change_events(self, records: Iterable[BusRecord]) -> int:
        """Apply bus records of CDC topics (fieldmesh's or Debezium's); return how many applied.

        Tombstones (empty values after Debezium deletes) are skipped.

        Raises:
            msgspec.DecodeError: a record is not a change event.
        """
        n = 0
        for r in records:
            ev = decode_change_event(r.value)
            if ev is None:
                continue
            self.apply(ev, r.key)
            n += 1
        return n

    def enrich(self, readings: list[Reading]) -> list[Reading]:
        """Readings with ``enrichment`` set from the rows valid at their event time."""
        replace = msgspec.structs.replace
        out: list[Reading] = []
        append = out.append
        plan = self._plan
        if len(plan) == 1 and plan[0][0] == "device_id":
            table = plan[0][2]
            keys = table._keys
            for r in readings:
                v = keys.get(r.device_id)
                row = v.at(r.ts_ms) if v is not None else None
                if row is None:
                    append(r)
                elif r.enrichment:
                    append(replace(r, enrichment={**r.enrichment, **row}))
                else:
                    append(replace(r, enrichment=row))
            return out
        for r in readings:
            extra: dict[str, Any] | None = None
            for attr, meta_key, table in plan:
                k = _key_of(r, attr, meta_key)
                if k is None:
                    continue
                row = table.lookup(k, r.ts_ms)
                if row is not None:
                    extra = row if extra is None else {**extra, **row}
            if extra is None:
                append(r)
            else:
                append(replace(r, enrichment={**r.enrichment, **extra} if r.enrichment else extra))
        return out


def _key_of(r: Reading, attr: str, meta_key: str | None) -> Any:
    """The join key of a reading: an attribute, or a key of its ``meta``."""
    if attr == "meta":
        return (r.meta or {}).get(meta_key) if meta_key else None
    return getattr(r, attr)
