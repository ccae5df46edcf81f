"""CDC into the lake: each captured table as an Iceberg mirror plus an append-only change log (docs/lake.md).

For a captured table ``schema.table`` (change events on its bus topic, :mod:`fieldmesh.cdc.base`):

* ``<ns>.cdc_<schema>_<table>`` mirrors the source: the source's columns, one row per primary key, as the
  source stands at the last change applied. Column types come from the values (integers: long, floats:
  double, booleans, strings; anything else as JSON text); a column seen later is added (schema evolution).
* ``<ns>.cdc_<schema>_<table>_changes`` is the change log: one row per change, append-only, with ``op``,
  the commit time (``commit_ts``), the source position (PostgreSQL ``lsn`` and ``tx_id``; MariaDB/MySQL
  ``gtid``, ``binlog_file``, ``binlog_pos``), the key, the row ``before`` and ``after`` (JSON), and the bus
  partition and offset. A row as of time *t*: its latest change with ``commit_ts <= t``.

**Upserts in commit order, by overwrite with a filter.** A bus batch is reduced to the final state per key
(every change of one key is on one partition, in commit order; a truncate wipes the keys whose last change
precedes it in commit order), then committed as one Iceberg transaction: a delete of the touched keys
(``In(pk, keys)``; everything after a truncate) and an append of their new rows. Why not equality deletes:
pyiceberg does not write them, and a copy-on-write table is read correctly by every engine, without
merge-on-read support; the cost is rewriting the data files that hold touched keys, which for the
reference tables CDC carries (assets, sites, thresholds) is small. A changed value PostgreSQL did not send
(an unchanged TOASTed column, ``__debezium_unavailable_value``) keeps the mirror's current value.

**Exactly once, as the readings sink**: each commit records the bus positions it covers in its snapshot
summary (``fieldmesh.positions``, per table). :meth:`CdcLakeSink.applied` is the lower of the two tables'
positions, where the consumer resumes; each table then skips what it already holds, so a crash between
the two commits writes the second one at the restart, and neither twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import msgspec

from fieldmesh.bus.base import Bus, BusRecord
from fieldmesh.cdc.base import UNAVAILABLE, ChangeEvent, decode_change_event, event_order
from fieldmesh.store.lake import LakeError, ensure_namespace, expire, transaction

if TYPE_CHECKING:
    import pyarrow as pa
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table

__all__ = ["PROP_CDC_POSITIONS", "CdcLakeSink", "mirror_names", "run_cdc_lake"]

log = logging.getLogger(__name__)

PROP_CDC_POSITIONS: Final = "fieldmesh.positions"
_SAFE: Final = re.compile(r"[^A-Za-z0-9_]")
_json = msgspec.json.Encoder()


def mirror_names(namespace: str, table_id: str) -> tuple[str, str]:
    """The mirror's and the change log's identifiers of a captured table (``schema.table``)."""
    base = "cdc_" + _SAFE.sub("_", table_id.replace(".", "_")).lower()
    return f"{namespace}.{base}", f"{namespace}.{base}_changes"


def _positions_of(table: Table) -> dict[int, int]:
    from pyiceberg.table.snapshots import ancestors_of

    for snap in ancestors_of(table.current_snapshot(), table.metadata):
        props = snap.summary.additional_properties if snap.summary is not None else {}
        if PROP_CDC_POSITIONS in props:
            return {int(p): int(o) for p, o in json.loads(props[PROP_CDC_POSITIONS]).items()}
    return {}


def _iceberg_type(value: Any) -> Any:
    from pyiceberg.types import BooleanType, DoubleType, LongType, StringType

    if isinstance(value, bool):
        return BooleanType()
    if isinstance(value, int):
        return LongType()
    if isinstance(value, float):
        return DoubleType()
    return StringType()


def _cell(value: Any, kind: str, table: str, column: str) -> Any:
    """``value`` as the column's arrow kind (long, double, boolean, string); a clear error when it cannot be."""
    if value is None:
        return None
    if kind == "string":
        return value if isinstance(value, str) else _json.encode(value).decode()
    if kind == "double" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind == "long" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "boolean" and isinstance(value, bool):
        return value
    raise LakeError(f"CDC mirror {table}: column {column} is {kind} in the lake, the source sent {value!r}; "
                    "a column's type changed at the source (drop the mirror table to rebuild it)")


class CdcLakeSink:
    """Applies the change events of one captured table's topic to its mirror and change log (module docstring)."""

    def __init__(self, *, catalog: Catalog, namespace: str, table_id: str) -> None:
        self.catalog = catalog
        self.table_id = table_id
        self.mirror_id, self.log_id = mirror_names(namespace, table_id)
        ensure_namespace(catalog, namespace)
        self._log = catalog.create_table_if_not_exists(self.log_id, schema=self._log_schema(),
                                                       partition_spec=self._log_spec())
        self._mirror: Table | None = catalog.load_table(self.mirror_id) if catalog.table_exists(self.mirror_id) \
            else None
        self.applied_changes = 0
        self._namespace = namespace

    def reload(self) -> None:
        """Load both tables again (after a failed commit, or another process's maintenance changed them)."""
        self._log = self.catalog.load_table(self.log_id)
        if self._mirror is not None or self.catalog.table_exists(self.mirror_id):
            self._mirror = self.catalog.load_table(self.mirror_id)

    def expire(self, *, older_than_s: float, keep_last: int = 10) -> dict[str, int]:
        """Drop the two tables' snapshots older than ``older_than_s`` but the last ``keep_last`` (the latest
        carries every position this sink resumes from), then load them again. A writer commits once per fetch,
        so without this the metadata every commit rewrites grows with each fetch. Returns expired per table."""
        ns = self._namespace
        names = [t[len(ns) + 1:] for t in (self.log_id, self.mirror_id) if self.catalog.table_exists(t)]
        out = expire(self.catalog, ns, older_than_s=older_than_s, keep_last=keep_last, tables=names)
        self.reload()
        return out

    @staticmethod
    def _log_schema() -> Any:
        from pyiceberg.schema import Schema
        from pyiceberg.types import BooleanType, LongType, NestedField, StringType, TimestamptzType

        return Schema(
            NestedField(1, "op", StringType(), required=True, doc="c, u, d, r (snapshot), t (truncate)"),
            NestedField(2, "commit_ts", TimestamptzType(), required=True, doc="commit time at the source"),
            NestedField(3, "lsn", LongType(), required=False),
            NestedField(4, "tx_id", LongType(), required=False),
            NestedField(5, "gtid", StringType(), required=False),
            NestedField(6, "binlog_file", StringType(), required=False),
            NestedField(7, "binlog_pos", LongType(), required=False),
            NestedField(8, "snapshot", BooleanType(), required=True),
            NestedField(9, "key", StringType(), required=False, doc="the primary key as JSON"),
            NestedField(10, "before", StringType(), required=False, doc="JSON"),
            NestedField(11, "after", StringType(), required=False, doc="JSON"),
            NestedField(12, "bus_partition", LongType(), required=True),
            NestedField(13, "bus_offset", LongType(), required=True),
            NestedField(14, "row", LongType(), required=False, doc="the change's place within its event"),
        )

    @staticmethod
    def _log_spec() -> Any:
        from pyiceberg.partitioning import PartitionField, PartitionSpec
        from pyiceberg.transforms import DayTransform

        return PartitionSpec(PartitionField(2, 1000, DayTransform(), "commit_day"))

    def applied(self, partitions: Sequence[int] | None = None) -> dict[int, int]:
        """Per partition, the last offset both tables hold (-1: none); the consumer resumes after it."""
        a = _positions_of(self._log)
        b = _positions_of(self._mirror) if self._mirror is not None else {}
        parts = set(a) | set(b) if partitions is None else set(partitions)
        return {p: min(a.get(p, -1), b.get(p, -1)) for p in parts}

    def apply(self, records: Sequence[BusRecord]) -> int:
        """Apply a batch of the topic's records (any partitions, offset order within each); returns the changes
        new to the change log."""
        if not records:
            return 0
        events: list[tuple[BusRecord, ChangeEvent]] = []
        for r in records:
            ev = decode_change_event(r.value)
            if ev is not None:  # a tombstone carries nothing
                events.append((r, ev))
        batch_pos: dict[int, int] = {}
        for r in records:
            batch_pos[r.partition] = max(batch_pos.get(r.partition, -1), r.offset)
        log_pos = _positions_of(self._log)
        new_log = [(r, e) for r, e in events if r.offset > log_pos.get(r.partition, -1)]
        mirror_pos = _positions_of(self._mirror) if self._mirror is not None else {}
        new_mirror = [(r, e) for r, e in events if r.offset > mirror_pos.get(r.partition, -1)]
        if any(o > mirror_pos.get(p, -1) for p, o in batch_pos.items()):
            self._apply_mirror(new_mirror, {**{str(p): o for p, o in mirror_pos.items()},
                                            **{str(p): max(o, mirror_pos.get(p, -1)) for p, o in batch_pos.items()}})
        if any(o > log_pos.get(p, -1) for p, o in batch_pos.items()):
            props = {PROP_CDC_POSITIONS: json.dumps({**{str(p): o for p, o in log_pos.items()},
                                                     **{str(p): max(o, log_pos.get(p, -1))
                                                        for p, o in batch_pos.items()}})}
            self._log.append(self._log_rows(new_log), snapshot_properties=props)
        self.applied_changes += len(new_log)
        return len(new_log)

    # -- the change log ---------------------------------------------------------------------------

    def _log_rows(self, events: list[tuple[BusRecord, ChangeEvent]]) -> pa.Table:
        import pyarrow as pa

        def js(v: Any) -> str | None:
            return None if v is None else _json.encode(v).decode()

        src = [e.source for _, e in events]
        cols = {
            "op": pa.array([e.op for _, e in events], pa.large_string()),
            "commit_ts": pa.array([s.ts_ms * 1000 for s in src], pa.timestamp("us", tz="UTC")),
            "lsn": pa.array([s.lsn for s in src], pa.int64()),
            "tx_id": pa.array([s.txId for s in src], pa.int64()),
            "gtid": pa.array([s.gtid for s in src], pa.large_string()),
            "binlog_file": pa.array([s.file for s in src], pa.large_string()),
            "binlog_pos": pa.array([s.pos for s in src], pa.int64()),
            "snapshot": pa.array([s.snapshot not in ("false", "") for s in src], pa.bool_()),
            "key": pa.array([None if r.key is None else bytes(r.key).decode() for r, _ in events], pa.large_string()),
            "before": pa.array([js(e.before) for _, e in events], pa.large_string()),
            "after": pa.array([js(e.after) for _, e in events], pa.large_string()),
            "bus_partition": pa.array([r.partition for r, _ in events], pa.int64()),
            "bus_offset": pa.array([r.offset for r, _ in events], pa.int64()),
            "row": pa.array([s.row for s in src], pa.int64()),
        }
        schema = self._log.schema().as_arrow()
        return pa.Table.from_arrays([cols[f.name].cast(f.type) for f in schema], schema=schema)

    # -- the mirror ---------------------------------------------------------------------------------

    def _apply_mirror(self, events: list[tuple[BusRecord, ChangeEvent]], positions: Mapping[str, int]) -> None:
        from pyiceberg.expressions import AlwaysTrue

        props = {PROP_CDC_POSITIONS: json.dumps(dict(positions))}
        truncated_at = max((event_order(e) for _, e in events if e.op == "t"), default=None)
        final: dict[bytes, tuple[list[str], ChangeEvent]] = {}
        for r, e in sorted(events, key=lambda x: (x[0].partition, x[0].offset)):  # a key's changes: one partition
            if e.op == "t" or r.key is None:
                continue
            key = json.loads(bytes(r.key))
            final[bytes(r.key)] = (list(key), e)
        if truncated_at is not None:
            final = {k: v for k, v in final.items() if event_order(v[1]) > truncated_at}
        rows = [(cols, e.after) for cols, e in final.values() if e.op != "d" and e.after is not None]
        if self._mirror is None:
            if not rows:  # nothing to mirror yet (deletes of rows never seen): these come again, harmless
                return
            self._mirror = self._create_mirror(rows[0][0], [a for _, a in rows])
        table = self._mirror
        self._evolve(table, [a for _, a in rows])
        table = self._mirror = self.catalog.load_table(self.mirror_id)
        key_cols = next(iter(final.values()))[0] if final else []
        where = AlwaysTrue() if truncated_at is not None else self._key_filter(
            key_cols, [json.loads(k) for k in final])
        after = [a for _, a in rows]
        if any(v == UNAVAILABLE for a in after for v in a.values()):
            after = self._fill_unavailable(table, key_cols, after)
        data = self._mirror_rows(table, after)
        with transaction(table) as tx:
            if where is not None:
                tx.delete(where, snapshot_properties=props)
            tx.append(data, snapshot_properties=props)
        self._mirror = self.catalog.load_table(self.mirror_id)

    def _create_mirror(self, key_cols: list[str], rows: list[dict[str, Any]]) -> Table:
        from pyiceberg.schema import Schema
        from pyiceberg.types import NestedField, StringType

        names: dict[str, Any] = {c: None for c in key_cols}
        for a in rows:
            for c, v in a.items():
                if names.get(c) is None and v is not None and v != UNAVAILABLE:
                    names[c] = _iceberg_type(v)
                names.setdefault(c, None)
        fields = [NestedField(i + 1, c, t if t is not None else StringType(), required=False)
                  for i, (c, t) in enumerate(names.items())]
        return self.catalog.create_table_if_not_exists(self.mirror_id, schema=Schema(*fields))

    def _evolve(self, table: Table, rows: list[dict[str, Any]]) -> None:
        """Add the columns the source has gained (typed by their first value)."""
        have = {f.name for f in table.schema().fields}
        new: dict[str, Any] = {}
        for a in rows:
            for c, v in a.items():
                if c not in have and (c not in new or new[c] is None):
                    new[c] = None if v is None or v == UNAVAILABLE else _iceberg_type(v)
        if new:
            from pyiceberg.types import StringType

            with table.update_schema() as up:
                for c, t in new.items():
                    up.add_column(c, t if t is not None else StringType())
            log.info("CDC mirror %s: columns added %s", self.mirror_id, sorted(new))

    @staticmethod
    def _key_filter(key_cols: list[str], keys: list[dict[str, Any]]) -> Any:
        from pyiceberg.expressions import And, EqualTo, In, Or

        if not keys:
            return None
        if len(key_cols) == 1:
            c = key_cols[0]
            return In(c, [k[c] for k in keys])  # type: ignore[call-arg,misc]
        terms = []
        for k in keys:
            parts = [EqualTo(c, k[c]) for c in key_cols]  # type: ignore[call-arg,misc]
            terms.append(parts[0] if len(parts) == 1 else And(*parts))
        return terms[0] if len(terms) == 1 else Or(*terms)

    def _fill_unavailable(self, table: Table, key_cols: list[str], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Values PostgreSQL did not send (unchanged TOAST) from the mirror's current row."""
        where = self._key_filter(key_cols, [{c: a.get(c) for c in key_cols} for a in rows])
        current = {tuple(r[c] for c in key_cols): r for r in table.scan(row_filter=where).to_arrow().to_pylist()}
        out = []
        for a in rows:
            old = current.get(tuple(a.get(c) for c in key_cols), {})
            out.append({c: (old.get(c) if v == UNAVAILABLE else v) for c, v in a.items()})
        return out

    def _mirror_rows(self, table: Table, rows: list[dict[str, Any]]) -> pa.Table:
        import pyarrow as pa

        schema = table.schema().as_arrow()
        kinds = {"int64": "long", "double": "double", "bool": "boolean"}
        cols = []
        for f in schema:
            kind = kinds.get(str(f.type), "string")
            cols.append(pa.array([_cell(a.get(f.name), kind, self.mirror_id, f.name) for a in rows], f.type))
        return pa.Table.from_arrays(cols, schema=schema)


async def run_cdc_lake(bus: Bus, topics: Mapping[str, str], *, catalog: Catalog, namespace: str,
                       stop: asyncio.Event, group: str = "fm-cdc-lake", fetch_max: int = 5000,
                       idle_s: float = 1.0, snapshot_max_age_s: float = 3600.0,
                       maintenance_interval_s: float = 3600.0) -> None:
    """Apply the change events of ``topics`` (table id -> bus topic) to their lake tables until ``stop``.

    One consumer per topic resumes after :meth:`CdcLakeSink.applied` (the lake's own positions) and
    acknowledges only what is committed. A failing commit is retried with capped backoff, on tables loaded
    again. Every ``maintenance_interval_s`` (0: never), between commits, snapshots older than
    ``snapshot_max_age_s`` are expired (:meth:`CdcLakeSink.expire`); a failure there is logged and tried at
    the next interval.
    """
    sinks = {t: CdcLakeSink(catalog=catalog, namespace=namespace, table_id=t) for t in topics}
    consumers = {}
    for table, topic in topics.items():
        sink = sinks[table]
        consumers[table] = await bus.consumer(topic, group=group, positions=sink.applied)
    maintained = time.monotonic()
    try:
        delay = 0.2
        while not stop.is_set():
            if maintenance_interval_s > 0 and time.monotonic() - maintained >= maintenance_interval_s:
                maintained = time.monotonic()
                await _expire_all(sinks.values(), snapshot_max_age_s)
            busy = False
            for table, cons in consumers.items():
                recs = await cons.fetch(fetch_max, idle_s / max(1, len(consumers)))
                if not recs:
                    continue
                busy = True
                try:
                    await asyncio.to_thread(sinks[table].apply, recs)
                except LakeError:
                    raise
                except Exception as exc:  # the catalog unreachable, a conflict: the records come again
                    log.warning("CDC lake commit of %s failed (%s: %s); retrying in %.1fs", table,
                                type(exc).__name__, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(30.0, delay * 2)
                    with contextlib.suppress(Exception):  # still unreachable: the next failure tries again
                        await asyncio.to_thread(sinks[table].reload)
                    await cons.close()
                    consumers[table] = await bus.consumer(topics[table], group=group,
                                                          positions=sinks[table].applied)
                    continue
                delay = 0.2
                await cons.ack(recs)
            if not busy:
                await asyncio.sleep(0)
    finally:
        for cons in consumers.values():
            with contextlib.suppress(Exception):
                await cons.close()


async def _expire_all(sinks: Iterable[CdcLakeSink], older_than_s: float) -> None:
    for sink in sinks:
        try:
            expired = await asyncio.to_thread(sink.expire, older_than_s=older_than_s)
        except Exception as exc:
            log.warning("CDC lake maintenance of %s failed (%s: %s); trying again at the next interval",
                        sink.table_id, type(exc).__name__, exc)
            continue
        if any(expired.values()):
            log.info("CDC lake maintenance of %s: expired %s snapshots", sink.table_id, expired)
