"""The lake: committed batches in Apache Iceberg tables, exactly once (docs/lake.md).

:class:`LakeSink` is a :class:`~fieldmesh.store.base.Sink`. It buffers the results the processor hands
it (bounded) and commits them to four tables, ``<ns>.readings``, ``<ns>.rollup_1m``, ``<ns>.rollup_1h``
and ``<ns>.dead_letters``, when the oldest buffered result is about ``commit_interval_s`` old or the
buffer reaches ``commit_rows``/``commit_bytes``, whichever comes first. A flush commits **every** table
(an empty append when a table has nothing new) and each of those snapshots records in its summary the
flush number (``fieldmesh.flush``) and the bus positions it covers (``fieldmesh.positions``).

Exactly once, with the least machinery:

* :meth:`LakeSink.applied` answers the positions committed to the tables, never what is only buffered.
  The processor resumes the bus at the lowest of the hot store's and each sink's positions and re-decides,
  against the hot store's claims, what a sink lacks (:mod:`fieldmesh.stream.processor`); so after a crash
  the lost buffer comes back from the bus.
* Iceberg has no multi-table commit: a crash can leave a flush in some tables only. Nothing is rolled back:
  each table holds the positions of its own snapshots, and :meth:`LakeSink.views` gives the processor one
  sink per group of tables at the same positions, so the replay brings each group exactly what it lacks.
* A table's positions are, per bus partition, the highest over its snapshots' ``fieldmesh.positions``; each
  commit carries the others forward. So several writers (processors over disjoint partitions, ``writer``)
  can commit to the same tables: a conflict is retried (pyiceberg rebases an append; a rollup overwrite,
  limited to the writer's devices, is redone), and no writer's positions go back.
* Rollups are rows per (device, metric, window) with an exact sum (``sum_exact``, as in the hot store).
  A flush merges its window deltas (late readings included) into the rows of the windows they touch:
  it reads those windows' rows, merges exactly, and overwrites them (one delete + append commit). A
  reader sees finished values, never deltas to sum, and a replayed delta cannot count twice because
  it is only merged by a flush that the positions say is not in the table.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
import numpy as np
from numpy.typing import NDArray

from fieldmesh.core import heap
from fieldmesh.core.batch import BatchResult, Position, ReadingColumns, WindowDeltas
from fieldmesh.core.errors import ConfigError, FieldmeshError, MissingDependency
from fieldmesh.core.exact import parse_exact
from fieldmesh.core.model import DeadLetter
from fieldmesh.core.settings import LakeSettings
from fieldmesh.obs import tracing
from fieldmesh.store.rollup import exact_columns
from fieldmesh.stream.columnar import combine_windows
from fieldmesh.stream.featureviews import FeatureRow

if TYPE_CHECKING:
    import pyarrow as pa
    from pyiceberg.catalog import Catalog
    from pyiceberg.table import Table, Transaction

__all__ = [
    "POSITIONED", "PROP_FLUSH", "PROP_POSITIONS", "PROP_WRITER", "TABLES", "TABLE_PROPERTIES", "LakeError",
    "LakeSink", "LakeView",
    "catalog_properties",
    "committed_snapshots", "compact", "ensure_namespace", "expire", "lake_info", "lake_lag", "open_catalog",
    "transaction",
]

log = logging.getLogger(__name__)

TABLES: Final = ("readings", "rollup_1m", "rollup_1h", "dead_letters", "features")
PROP_FLUSH: Final = "fieldmesh.flush"
PROP_FEATURES_SEQ: Final = "fieldmesh.features_seq"  # the last feature_rows seq in the features table
_FEATURES_PER_FLUSH: Final = 200_000
PROP_POSITIONS: Final = "fieldmesh.positions"
PROP_WRITER: Final = "fieldmesh.writer"  # the partitions of the processor that made the commit
POSITIONED: Final = ("readings", "rollup_1m", "rollup_1h", "dead_letters")  # tables at bus positions
_ROLLUP_WIDTH: Final = {"rollup_1m": 60_000, "rollup_1h": 3_600_000}
#: Properties of the tables the sink creates (and adds to its tables of earlier versions when missing; a value
#: set by hand is kept). With one commit a minute per table: manifests merged once 100 accumulate (else each
#: commit adds one, 1,440 a day, all read by every commit, scan and rollup merge), and only the last 20
#: metadata files kept (else one file a commit, each listing the snapshots, stays on disk for good).
TABLE_PROPERTIES: Final = {
    "write.parquet.compression-codec": "zstd",  # at level 1: about the default level's size, a quarter faster
    "write.parquet.compression-level": "1",
    "commit.manifest-merge.enabled": "true",
    "write.metadata.delete-after-commit.enabled": "true",
    "write.metadata.previous-versions-max": "20",
}
_RETRY_MAX_S: Final = 30.0
_MERGE_ROWS: Final = 50_000  # rollup entries merged at a time (:func:`_merged_chunks`)
_SECRET_WORDS: Final = ("secret", "token", "credential", "password", "key")
_json = msgspec.json.Encoder()


class LakeError(FieldmeshError):
    """The lake cannot be used as configured (a table changed outside fieldmesh, a catalog refusing)."""


# ---- catalog -----------------------------------------------------------------------------------


def catalog_properties(settings: LakeSettings, data_dir: Path) -> dict[str, str]:
    """The properties a pyiceberg client passes to ``load_catalog`` to open this lake.

    Raises:
        ConfigError: an unsupported catalog URL.
    """
    props = dict(settings.properties)
    url = settings.url
    if url is None:
        lake = (data_dir / "lake").resolve()
        props.update(type="sql", uri=f"sqlite:///{lake / 'catalog.db'}",
                     warehouse=settings.warehouse or (lake / "warehouse").as_uri())
        return props
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        props.update(type="rest", uri=url)
    elif scheme in ("sqlite", "postgresql", "postgres", "postgresql+psycopg"):
        if scheme in ("postgresql", "postgres"):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        props.update(type="sql", uri=url)
        if settings.warehouse is None:
            raise ConfigError("an SQL catalog URL needs FIELDMESH__LAKE__WAREHOUSE (file://, s3://, ...)",
                              key="LAKE__WAREHOUSE")
    else:
        raise ConfigError(f"unsupported lake URL {url!r} (--lake-url, FIELDMESH__LAKE__URL): use http(s)://... "
                          "(REST catalog), sqlite:///path or postgresql://... (SQL catalog)", key="LAKE__URL")
    if settings.warehouse is not None:
        props["warehouse"] = settings.warehouse
    return props


def open_catalog(settings: LakeSettings, data_dir: Path) -> Catalog:
    """Open the lake's catalog (the embedded SQLite one is created under ``data_dir/lake``)."""
    try:
        from pyiceberg.catalog import load_catalog
    except ImportError as exc:
        raise MissingDependency("pyiceberg", "lake") from exc
    props = catalog_properties(settings, data_dir)
    if settings.url is None:
        (data_dir / "lake" / "warehouse").mkdir(parents=True, exist_ok=True)
    for attempt in range(4):
        try:
            return load_catalog("fieldmesh", **props)
        except Exception as exc:
            # pyiceberg's SQL catalog checks for its tables, then creates them: two processes opening a new
            # catalog at once (two processors starting) can both find them absent, and the second CREATE
            # fails. Opening again finds the tables the other one made.
            if "already exists" not in str(exc):
                raise
            time.sleep(0.05 * (attempt + 1))
    return load_catalog("fieldmesh", **props)


def ensure_namespace(catalog: Catalog, namespace: str) -> None:
    """Create ``namespace`` unless it exists, also when another process creates it at the same moment."""
    from pyiceberg.exceptions import NamespaceAlreadyExistsError

    try:
        catalog.create_namespace(namespace)
    except NamespaceAlreadyExistsError:
        pass
    except Exception:
        # Another writer created it between the catalog's check and its insert (a SQL catalog raises its
        # database's integrity error then): fine if it is there now.
        if not catalog.namespace_exists(namespace):
            raise


def _masked(props: Mapping[str, str]) -> dict[str, str]:
    return {k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) and k not in ("type",) else v)
            for k, v in props.items()}


def lake_info(settings: LakeSettings, data_dir: Path, *, show_secrets: bool = False) -> dict[str, Any]:
    """What a standard Iceberg client needs: catalog properties, table names, their snapshots and positions."""
    props = catalog_properties(settings, data_dir)
    catalog = open_catalog(settings, data_dir)
    tables: dict[str, Any] = {}
    for name in TABLES:
        ident = f"{settings.namespace}.{name}"
        if not catalog.table_exists(ident):
            continue
        t = catalog.load_table(ident)
        snap = t.current_snapshot()
        flush, positions = _state_of(t)
        tables[ident] = {
            "location": t.location(),
            "snapshot_id": snap.snapshot_id if snap else None,
            "committed_ms": snap.timestamp_ms if snap else None,
            "snapshots": len(t.metadata.snapshots),
            "flush": flush,
            "positions": {f"{tp}:{p}": o for (tp, p), o in sorted(positions.items())},
        }
    return {"catalog_name": "fieldmesh", "catalog": props if show_secrets else _masked(props),
            "namespace": settings.namespace, "tables": tables}


def lake_lag(catalog: Catalog, namespace: str, hot: Mapping[Position, int]) -> tuple[int, float | None]:
    """Partitions where any table of the lake at bus positions is behind ``hot`` (the hot store's positions),
    and the age in seconds of the last commit of the stalest table behind (of ``readings`` when none is;
    None: no table or no commit yet).

    Every table counts, not ``readings`` alone: each resumes at its own positions, so a crash between the
    commits of one flush leaves the later tables (``rollup_1h`` after ``readings``) behind until the
    restarted processor has replayed to them what they lack."""
    now = time.time()
    behind: set[Position] = set()
    ages: list[float] = []
    age: float | None = None
    for name in POSITIONED:
        ident = f"{namespace}.{name}"
        if not catalog.table_exists(ident):
            return 0, None
        table = catalog.load_table(ident)
        _, lake = _state_of(table)
        snap = table.current_snapshot()
        table_age = None if snap is None else now - snap.timestamp_ms / 1000
        if name == "readings":
            age = table_age
        lacking = {p for p, o in hot.items() if o > lake.get(p, -1)}
        if lacking:
            behind |= lacking
            if table_age is not None:
                ages.append(table_age)
    return len(behind), max(ages) if ages else age


# ---- table schemas -------------------------------------------------------------------------------


def _schemas(buckets: int) -> dict[str, tuple[Any, Any]]:
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.schema import Schema
    from pyiceberg.transforms import BucketTransform, DayTransform, MonthTransform
    from pyiceberg.types import (
        BinaryType,
        BooleanType,
        DoubleType,
        LongType,
        MapType,
        NestedField,
        StringType,
        TimestamptzType,
    )

    def rollup(transform: Any) -> tuple[Any, Any]:
        schema = Schema(
            NestedField(1, "device_id", StringType(), required=True),
            NestedField(2, "metric", StringType(), required=True),
            NestedField(3, "window_start", TimestamptzType(), required=True),
            NestedField(4, "count", LongType(), required=True),
            NestedField(5, "sum", DoubleType(), required=True),
            NestedField(6, "min", DoubleType(), required=True),
            NestedField(7, "max", DoubleType(), required=True),
            NestedField(8, "avg", DoubleType(), required=True),
            NestedField(9, "sum_exact", StringType(), required=True, doc="exact sum: '<hex m>:<e>' = m * 2**e"),
            identifier_field_ids=[1, 2, 3],
        )
        return schema, PartitionSpec(PartitionField(3, 1000, transform, "window_start_part"))

    readings = Schema(
        NestedField(1, "device_id", StringType(), required=True),
        NestedField(2, "ts", TimestamptzType(), required=True, doc="event time"),
        NestedField(3, "received", TimestamptzType(), required=True),
        NestedField(4, "key", LongType(), required=True, doc="identity key (63 bits)"),
        NestedField(5, "seq", LongType(), required=False),
        NestedField(6, "boot_id", StringType(), required=False),
        NestedField(7, "event_id", StringType(), required=False),
        NestedField(8, "measurements", MapType(13, StringType(), 14, DoubleType(), value_required=True),
                    required=True, doc="metric -> value (bools as 0/1)"),
        NestedField(9, "measurements_json", StringType(), required=True, doc="measurements as sent"),
        NestedField(10, "meta", StringType(), required=False, doc="JSON"),
        NestedField(11, "enrichment", StringType(), required=False, doc="JSON"),
        NestedField(12, "late", BooleanType(), required=True),
    )
    dead_letters = Schema(
        NestedField(1, "reason", StringType(), required=True),
        NestedField(2, "detail", StringType(), required=True),
        NestedField(3, "topic", StringType(), required=True),
        NestedField(4, "received", TimestamptzType(), required=True),
        NestedField(5, "device_id", StringType(), required=False),
        NestedField(6, "payload", BinaryType(), required=True),
        NestedField(7, "truncated", BooleanType(), required=True),
    )
    features = Schema(
        NestedField(1, "view", StringType(), required=True),
        NestedField(2, "entity", StringType(), required=True),
        NestedField(3, "window_start", TimestamptzType(), required=True, doc="start of the view's largest window"),
        NestedField(4, "window_end", TimestamptzType(), required=True),
        NestedField(5, "known_at", TimestamptzType(), required=True,
                    doc="arrival time of the reading that made the row final"),
        NestedField(6, "version", LongType(), required=True),
        NestedField(7, "values", MapType(8, StringType(), 9, DoubleType(), value_required=False), required=True,
                    doc="metric__agg__size -> value (null: no value, e.g. a rate over one reading)"),
    )
    return {
        "features": (features, PartitionSpec(PartitionField(4, 1000, DayTransform(), "window_end_day"))),
        "readings": (readings, PartitionSpec(PartitionField(2, 1000, DayTransform(), "ts_day"),
                                             PartitionField(1, 1001, BucketTransform(buckets), "device_bucket"))),
        "rollup_1m": rollup(DayTransform()),
        "rollup_1h": rollup(MonthTransform()),
        "dead_letters": (dead_letters, PartitionSpec(PartitionField(4, 1000, DayTransform(), "received_day"))),
    }


# ---- snapshot state --------------------------------------------------------------------------------


def _encode_positions(positions: Mapping[Position, int]) -> str:
    return json.dumps([[t, p, o] for (t, p), o in sorted(positions.items())], separators=(",", ":"))


def _decode_positions(text: str) -> dict[Position, int]:
    return {(str(t), int(p)): int(o) for t, p, o in json.loads(text)}


def _props_of(snapshot: Any) -> dict[str, str] | None:
    summary = snapshot.summary
    if summary is None:
        return None
    props = summary.additional_properties
    return props if PROP_FLUSH in props else None


def _ancestors(table: Table) -> Iterable[Any]:
    """The table's snapshots from the current one back to the oldest kept.

    Why not pyiceberg's ``ancestors_of``: it finds each parent by a linear search of the table's snapshots,
    so a walk over n snapshots costs n^2 (10,000 snapshots, a week of one commit a minute: 10^8 steps)."""
    by_id = {s.snapshot_id: s for s in table.metadata.snapshots}
    snap = table.current_snapshot()
    while snap is not None:
        yield snap
        snap = None if snap.parent_snapshot_id is None else by_id.get(snap.parent_snapshot_id)


def _tagged_ancestors(table: Table) -> Iterable[tuple[Any, dict[str, str]]]:
    """(snapshot, fieldmesh properties) from the current snapshot back, skipping snapshots without them."""
    for snap in _ancestors(table):
        props = _props_of(snap)
        if props is not None:
            yield snap, props


@dataclass(frozen=True, slots=True)
class _State:
    """What a table holds as of ``snapshot_id`` (None: no snapshot): the flush number of its latest tagged
    snapshot (None: never committed) and per bus partition the highest position over its tagged snapshots."""

    snapshot_id: int | None
    flush: int | None
    positions: dict[Position, int]


def _state_of(table: Table) -> tuple[int | None, dict[Position, int]]:
    """The flush number of the table's latest tagged snapshot (None: never committed) and the positions the
    table holds: per partition the highest over its tagged snapshots (docs/lake.md: several writers)."""
    state = _state_since(table, None)
    return state.flush, state.positions


def _state_since(table: Table, known: _State | None) -> _State:
    """The table's :class:`_State`, read from the snapshots after ``known`` only when ``known``'s snapshot is an
    ancestor of the current one (the sink's own last commit, mostly one or two steps back); from every
    snapshot otherwise (``known`` None, expired, or not in the history any more).

    Exact either way: the highest positions up to ``known``'s snapshot are ``known``'s, so the highest over
    the history is the highest of those and of the snapshots after it (an expiry that drops snapshots before
    it changes neither: each commit records the positions its table then holds, carried forward)."""
    current = table.current_snapshot()
    flush: int | None = None
    positions: dict[Position, int] = {}
    reached = False
    for snap in _ancestors(table):
        if known is not None and snap.snapshot_id == known.snapshot_id:
            reached = True
            break
        props = _props_of(snap)
        if props is None:
            continue
        if flush is None:
            flush = int(props[PROP_FLUSH])
        for p, o in _decode_positions(props[PROP_POSITIONS]).items():
            if o > positions.get(p, -1):
                positions[p] = o
    if reached and known is not None:
        flush = known.flush if flush is None else flush
        positions = {**known.positions, **{p: o for p, o in positions.items() if o > known.positions.get(p, -1)}}
    return _State(None if current is None else current.snapshot_id, flush, positions)


def committed_snapshots(catalog: Catalog, namespace: str) -> tuple[int | None, dict[str, int | None]]:
    """The lowest flush number over the tables, and per table the snapshot id of what it holds (None: no table
    or no commit yet).

    What a table holds it holds for good: the sink never rolls a table back (a flush that reached some tables
    only is completed by the replay, table by table), so a reader that deletes the hot copy (retention) may
    rely on each table's current snapshot.
    """
    latest: list[int] = []
    out: dict[str, int | None] = {}
    for name in TABLES:
        ident = f"{namespace}.{name}"
        if not catalog.table_exists(ident):
            return None, dict.fromkeys(TABLES)
        t = catalog.load_table(ident)
        flush, _ = _state_of(t)
        snap = t.current_snapshot()
        if flush is None or snap is None:
            return None, dict.fromkeys(TABLES)
        latest.append(flush)
        out[name] = snap.snapshot_id
    return min(latest), out


def _props(flush: int, positions: Mapping[Position, int], writer: str | None = None) -> dict[str, str]:
    props = {PROP_FLUSH: str(flush), PROP_POSITIONS: _encode_positions(positions)}
    if writer is not None:
        props[PROP_WRITER] = writer
    return props


# ---- results as arrow -------------------------------------------------------------------------------


def _ts(ms: Any) -> pa.Array:
    import pyarrow as pa

    return pa.array(np.asarray(ms, dtype=np.int64) * 1000, pa.timestamp("us", tz="UTC"))


def _json_or_none(values: Any) -> list[str | None]:
    return [None if v is None else _json.encode(v).decode() for v in values]


def readings_table(result: BatchResult, schema: pa.Schema) -> pa.Table:
    """The new readings of ``result`` as rows of ``readings``."""
    return _readings_arrow(result.new, result.store_key, np.asarray(result.late, dtype=bool), schema)


def readings_part(result: BatchResult, schema: pa.Schema, buckets: int, measurements_json: pa.Array | None = None,
                  ) -> tuple[pa.Table, NDArray[np.int64]]:
    """The new readings of ``result`` as rows of ``readings``, ordered by partition (day, device bucket; in
    arrival order within each), and each row's partition as a key (day times ``buckets`` plus the bucket):
    what the sink buffers until a commit puts the parts together (:func:`readings_ordered_runs`).
    ``measurements_json``: that column of the readings as arrow already (the lake child's pipe carries it so),
    else made from ``result.new.measurements_json``."""
    import pyarrow as pa
    from pyiceberg.transforms import BucketTransform
    from pyiceberg.types import StringType

    c = result.new
    table = _readings_arrow(c, result.store_key, np.asarray(result.late, dtype=bool), schema, measurements_json)
    bucket_of = BucketTransform(buckets).pyarrow_transform(StringType())(pa.array(c.devices, pa.large_string()))
    key = c.ts_ms // 86_400_000 * buckets + np.asarray(bucket_of.to_numpy(zero_copy_only=False), np.int64)[c.device]
    order = np.argsort(key, kind="stable")
    if len(order) > 1 and not bool((order[1:] > order[:-1]).all()):
        table, key = table.take(pa.array(order)), key[order]
    return table, key


def readings_ordered_runs(parts: list[tuple[pa.Table, NDArray[np.int64]]], schema: pa.Schema,
                          ) -> tuple[pa.Table, NDArray[np.int64], list[int]]:
    """The buffered parts (:func:`readings_part`) as one table ordered by partition, without a copy: each
    partition's slices of every part, one partition after the other (the append then writes each partition
    from its slices, :func:`_append`); with the key of each partition in the table (day times buckets plus the
    bucket, as :func:`readings_part` has it), in order, and the first row of each."""
    import pyarrow as pa

    if not parts:
        return schema.empty_table(), np.empty(0, np.int64), []
    keys = np.unique(np.concatenate([k for _, k in parts]))
    bounds = [(np.searchsorted(k, keys, "left"), np.searchsorted(k, keys, "right")) for _, k in parts]
    rows = np.sum([hi - lo for lo, hi in bounds], axis=0)
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).tolist()
    los, his = [lo.tolist() for lo, _ in bounds], [hi.tolist() for _, hi in bounds]
    slices = [t.slice(lo[i], hi[i] - lo[i]) for i in range(len(keys))
              for (t, _), lo, hi in zip(parts, los, his, strict=True) if hi[i] > lo[i]]
    return pa.concat_tables(slices), keys, starts


def _readings_arrow(c: ReadingColumns, store_key: NDArray[np.int64], late: NDArray[np.bool_],
                    schema: pa.Schema, measurements_json: pa.Array | None = None) -> pa.Table:
    """Readings columns as rows of ``readings`` (columns at once, no Python step per row except for meta and
    enrichment, when present)."""
    import pyarrow as pa

    n = len(c)
    counts = np.bincount(c.m_row, minlength=n) if n else np.zeros(0, np.int64)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    keys = pa.array(c.metrics, pa.large_string()).take(pa.array(c.m_metric))
    measurements = pa.MapArray.from_arrays(pa.array(offsets), keys, pa.array(c.m_value, pa.float64()))
    boots = pa.array(c.boots, pa.large_string()).take(pa.array(c.boot, mask=c.boot < 0))
    nulls = pa.nulls(n, pa.large_string())
    cols = [
        pa.array(c.devices, pa.large_string()).take(pa.array(c.device)),
        _ts(c.ts_ms),
        _ts(c.received_ms),
        pa.array(store_key, pa.int64()),
        pa.array(c.seq, pa.int64(), mask=c.seq < 0),
        boots,
        nulls if c.event_id is None else pa.array(c.event_id.tolist(), pa.large_string()),
        measurements,
        pa.array(c.measurements_json, pa.large_string()) if measurements_json is None else measurements_json,
        nulls if c.meta is None else pa.array(_json_or_none(c.meta.tolist()), pa.large_string()),
        nulls if c.enrichment is None else pa.array(_json_or_none(c.enrichment.tolist()), pa.large_string()),
        pa.array(late, pa.bool_()),
    ]
    return pa.Table.from_arrays([col.cast(f.type) for col, f in zip(cols, schema, strict=True)], schema=schema)


def features_table(rows: list[FeatureRow], schema: pa.Schema) -> pa.Table:
    """Feature rows as rows of ``features`` (NaN values as null)."""
    import pyarrow as pa

    cols = [
        pa.array([r.view for r in rows], pa.large_string()),
        pa.array([r.entity for r in rows], pa.large_string()),
        _ts([r.window_start_ms for r in rows]),
        _ts([r.window_end_ms for r in rows]),
        _ts([r.known_at_ms for r in rows]),
        pa.array([r.version for r in rows], pa.int64()),
        pa.array([[(k, v if math.isfinite(v) else None) for k, v in sorted(r.values.items())] for r in rows],
                 schema.field("values").type),
    ]
    return pa.Table.from_arrays(cols, schema=schema)


def dead_letters_table(letters: Iterable[DeadLetter], schema: pa.Schema) -> pa.Table:
    """Dead letters as rows of ``dead_letters``."""
    import pyarrow as pa

    ls = list(letters)
    cols = [
        pa.array([d.reason for d in ls], pa.large_string()),
        pa.array([d.detail for d in ls], pa.large_string()),
        pa.array([d.topic for d in ls], pa.large_string()),
        _ts([d.received_ms for d in ls]),
        pa.array([d.device_id for d in ls], pa.large_string()),
        pa.array([d.payload for d in ls], pa.large_binary()),
        pa.array([d.truncated for d in ls], pa.bool_()),
    ]
    return pa.Table.from_arrays([col.cast(f.type) for col, f in zip(cols, schema, strict=True)], schema=schema)


@dataclass(frozen=True, slots=True)
class _Accs:
    """Rollup accumulators as columns: per (device, metric, window_start_ms), the exact sum ``m * 2**e``."""

    device: NDArray[np.object_]
    metric: NDArray[np.object_]
    window_start_ms: NDArray[np.int64]
    count: NDArray[np.int64]
    m: NDArray[np.object_]  # Python ints
    e: NDArray[np.int64]
    min: NDArray[np.float64]
    max: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.window_start_ms)

    @classmethod
    def of(cls, wd: WindowDeltas) -> _Accs:
        return cls(wd.device, wd.metric, wd.window_start_ms, wd.count, wd.sum_m, wd.sum_e, wd.min, wd.max)

    @classmethod
    def of_rows(cls, rows: pa.Table) -> _Accs:
        """Rows of a rollup table as accumulators."""
        m_e = [parse_exact(x) for x in rows.column("sum_exact").to_pylist()]
        m = np.empty(len(m_e), dtype=object)
        m[:] = [x[0] for x in m_e]
        return cls(
            np.asarray(rows.column("device_id").to_pylist(), dtype=object),
            np.asarray(rows.column("metric").to_pylist(), dtype=object),
            np.asarray(rows.column("window_start").cast("int64").to_numpy()) // 1000,
            rows.column("count").to_numpy(), m, np.array([x[1] for x in m_e], dtype=np.int64),
            rows.column("min").to_numpy(), rows.column("max").to_numpy(),
        )

    def take(self, rows: NDArray[np.intp]) -> _Accs:
        return _Accs(*(getattr(self, f)[rows] for f in self.__slots__))


def _merge(parts: list[_Accs]) -> _Accs | None:
    """One accumulator per key of ``parts``, merged exactly (:func:`~fieldmesh.stream.columnar.combine_windows`:
    columns at once, the exact sums shifted to their group's lowest exponent)."""
    parts = [p for p in parts if len(p)]
    if not parts:
        return None
    return _Accs.of(combine_windows([
        WindowDeltas("", 0, p.device, p.metric, p.window_start_ms, p.count.astype(np.int64), p.m,
                     p.e.astype(np.int64), p.min.astype(np.float64), p.max.astype(np.float64))
        for p in parts
    ]))


def _merged_chunks(parts: list[_Accs], old: pa.Table | None = None, rows: int = _MERGE_ROWS) -> Iterator[_Accs]:
    """``parts`` and the rollup rows ``old`` merged into one accumulator per key (:func:`_merge`), a range of
    windows at a time: each chunk holds the entries of whole windows, about ``rows`` of them (more when one
    window has more). The merge's Python integers and strings are then those of one chunk, not of a whole
    commit: a backlog's commit merges hundreds of thousands of windows, and once merged all at once they held
    about 1 KB each and left the heap fragmented (docs/lake.md, "Memory")."""
    parts = [p for p in parts if len(p)]
    old_ws = None
    if old is not None and old.num_rows:
        old_ws = np.asarray(old.column("window_start").cast("int64").to_numpy()) // 1000
    every = [p.window_start_ms for p in parts] + ([] if old_ws is None else [old_ws])
    if not every:
        return
    windows, counts = np.unique(np.concatenate(every), return_counts=True)
    group = (np.cumsum(counts) - counts) // rows  # a window goes to the chunk its first entry falls in
    firsts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    lasts = np.r_[firsts[1:] - 1, len(windows) - 1]
    for lo, hi in zip(windows[firsts].tolist(), windows[lasts].tolist(), strict=True):
        chunk = []
        for p in parts:
            sel = np.flatnonzero((p.window_start_ms >= lo) & (p.window_start_ms <= hi))
            if len(sel) == len(p):
                chunk.append(p)
            elif len(sel):
                chunk.append(p.take(sel))
        if old is not None and old_ws is not None:
            sel = np.flatnonzero((old_ws >= lo) & (old_ws <= hi))
            if len(sel):
                chunk.append(_Accs.of_rows(old.take(sel)))
        merged = _merge(chunk)
        if merged is not None:
            yield merged


def _rollup_table(accs: _Accs, schema: pa.Schema) -> pa.Table:
    import pyarrow as pa

    count = accs.count.tolist()
    sums, avgs, exact = exact_columns(count, accs.m.tolist(), accs.e.tolist())
    cols = [
        pa.array(accs.device, pa.large_string()),
        pa.array(accs.metric, pa.large_string()),
        _ts(accs.window_start_ms),
        pa.array(accs.count, pa.int64()),
        pa.array(sums, pa.float64()),
        pa.array(accs.min, pa.float64()),
        pa.array(accs.max, pa.float64()),
        pa.array(avgs, pa.float64()),
        pa.array(exact, pa.large_string()),
    ]
    return pa.Table.from_arrays([col.cast(f.type) for col, f in zip(cols, schema, strict=True)], schema=schema)


# ---- the sink -------------------------------------------------------------------------------------


@dataclass
class _Buffer:
    #: new readings as arrow, ordered by partition, with each row's partition key (:func:`readings_part`; their
    #: bytes are what the buffer counts), one per batch; the commit writes them partition by partition
    readings: list[tuple[pa.Table, NDArray[np.int64]]]
    dead_letters: list[DeadLetter]
    rollups: dict[str, list[WindowDeltas]]  # merged by the commit, off the processor's thread
    positions: dict[str, dict[Position, int]]  # per table (POSITIONED): what it holds once this commits
    rows: int = 0
    nbytes: int = 0
    since: float | None = None  # monotonic time of the oldest result in it
    arrow: dict[str, pa.Table] = dc_field(default_factory=dict)  # converted by the commit
    traces: list[Any] = dc_field(default_factory=list)  # span contexts of the writes in it (tracing on)
    features_seq: int | None = None  # the feature_rows seq the features table reaches with this flush
    done: set[str] = dc_field(default_factory=set)  # tables committed (a retry of the flush skips them)

    @classmethod
    def empty(cls, positions: Mapping[str, Mapping[Position, int]]) -> _Buffer:
        return cls([], [], {"rollup_1m": [], "rollup_1h": []}, {t: dict(p) for t, p in positions.items()})


def _min_positions(maps: Iterable[Mapping[Position, int]]) -> dict[Position, int]:
    """Per partition the lowest of ``maps`` (a partition missing from one map: not there at all)."""
    ms = list(maps)
    if not ms:
        return {}
    keys = set(ms[0]).intersection(*ms[1:])
    return {p: min(m[p] for m in ms) for p in keys}


class LakeView:
    """The processor's :class:`~fieldmesh.store.base.Sink` for some of a :class:`LakeSink`'s tables (those that
    stood at the same positions when it opened; :meth:`LakeSink.views`)."""

    name = "lake"

    def __init__(self, sink: Any, tables: tuple[str, ...]) -> None:
        self.sink = sink  # a LakeSink, or a LakeProcess (fieldmesh.store.lakeproc)
        self.tables = tables

    def applied(self) -> dict[Position, int]:
        return dict(self.sink.applied_of(self.tables))

    def write(self, result: BatchResult) -> bool:
        return bool(self.sink.write(result, tables=self.tables))

    def close(self) -> None:
        self.sink.close()


class LakeSink:
    """Commits each committed batch to the lake's Iceberg tables, exactly once (module docstring).

    ``write`` only buffers (a background thread commits); it waits when the buffer holds twice
    ``commit_rows``/``commit_bytes`` and a commit is still under way (back-pressure: the backlog stays
    in the bus). ``writer``: the processor's partitions when several processors write the same tables (each
    its own partitions; recorded in each commit's summary); None: the only writer.
    """

    name = "lake"

    def __init__(self, *, settings: LakeSettings, data_dir: Path, catalog: Catalog | None = None,
                 writer: str | None = None) -> None:
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise MissingDependency("pyarrow", "lake") from exc
        # pyiceberg writes a commit's data files on its own thread pool (cores + 4 threads), each parquet
        # writer using arrow's pool too: on few cores that oversubscribes (300,000 readings: 0.70 s to write
        # with the default pool, 0.30 s with one thread). One writer thread unless PYICEBERG_MAX_WORKERS says.
        os.environ.setdefault("PYICEBERG_MAX_WORKERS", "1")
        self.settings = settings
        self.writer = writer
        self.catalog = catalog if catalog is not None else open_catalog(settings, data_dir)
        self._tables: dict[str, Table] = {}
        self._arrow: dict[str, pa.Schema] = {}
        # what each table holds as of a snapshot, read from its history once (at the start) and then from the
        # snapshots after that one only: re-reading every snapshot at every commit grew with the history
        self._states: dict[str, _State] = {}
        #: Where the features table reads feature rows from: ``(after seq, limit) -> (rows, last seq)``
        #: (:meth:`fieldmesh.store.features.FeatureTables.after`); None: feature views are off, or another
        #: writer copies them.
        self.features_source: Callable[[int, int], tuple[list[FeatureRow], int]] | None = None
        self._features_seq = 0
        self._closing = False
        self._flush, committed = self._recover()
        self._committed: dict[str, dict[Position, int]] = committed
        self._buf = _Buffer.empty(committed)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._flushing = False
        self._inflight_since: float | None = None  # the oldest result of the commit under way
        self._closed = False
        self._error: BaseException | None = None
        self._last_commit_s = 0.0
        self._maintained = time.monotonic()  # the first maintenance runs one interval after the start
        self.commits = 0  # flushes committed by this instance
        self.maintenances = 0  # rounds of maintain() completed by this instance
        self.rows_committed = 0
        self.last_commit_ms: int | None = None
        self._thread = threading.Thread(target=self._run, name="fm-lake-commit", daemon=True)
        self._thread.start()

    # -- opening ---------------------------------------------------------------------------------

    def _recover(self) -> tuple[int, dict[str, dict[Position, int]]]:
        """Load or create the tables; return the highest flush number and what each table holds."""
        ns = self.settings.namespace
        ensure_namespace(self.catalog, ns)
        schemas = _schemas(self.settings.readings_buckets)
        self._readings_spec = schemas["readings"][1]  # what readings_part's keys are made for
        states: dict[str, tuple[int | None, dict[Position, int]]] = {}
        for name, (schema, spec) in schemas.items():
            ident = f"{ns}.{name}"
            table = self.catalog.create_table_if_not_exists(ident, schema=schema, partition_spec=spec,
                                                            properties=TABLE_PROPERTIES)
            _check_schema(ident, table, schema)
            if missing := {k: v for k, v in TABLE_PROPERTIES.items() if k not in table.properties}:
                with table.transaction() as tx:  # a table of an earlier version: metadata only, no snapshot
                    tx.set_properties(missing)
            self._tables[name] = table
            self._arrow[name] = schema.as_arrow()
            self._states[name] = _state_since(table, None)
            states[name] = self._states[name].flush, self._states[name].positions
        top = max((f for f, _ in states.values() if f is not None), default=0)
        for name, (f, _) in states.items():
            if f is None:  # new (or created and never committed): tagged, at no position
                self._commit_with_retry(name, lambda n=name: _append(  # type: ignore[misc]
                    self._tables[n], self._arrow[n].empty_table(), _props(0, {}, self.writer)))
        for _, props in _tagged_ancestors(self._tables["features"]):
            self._features_seq = int(props.get(PROP_FEATURES_SEQ, 0))
            break
        committed = {name: states[name][1] for name in POSITIONED}
        if len({_encode_positions(p) for p in committed.values()}) > 1:
            log.warning("lake: the tables stand at different positions (a flush that reached some tables only); "
                        "the bus replays to each table what it lacks")
        return top, committed

    def views(self) -> list[LakeView]:
        """The processor's sinks for this lake: one per group of tables at the same positions (one view in
        the usual case; after a flush that reached some tables only, the processor replays to each group
        what it lacks, exactly, because each group resumes at its own positions)."""
        groups: dict[str, list[str]] = {}
        for name in POSITIONED:
            groups.setdefault(_encode_positions(self._committed[name]), []).append(name)
        return [LakeView(self, tuple(names)) for names in groups.values()]

    def groups(self) -> list[tuple[str, ...]]:
        """The tables of each of :meth:`views`."""
        return [v.tables for v in self.views()]

    # -- the Sink contract -------------------------------------------------------------------------

    def applied(self) -> dict[Position, int]:
        """Positions committed to every table (never what is only buffered)."""
        return self.applied_of(POSITIONED)

    def applied_of(self, tables: Iterable[str]) -> dict[Position, int]:
        """Positions committed to each of ``tables``."""
        with self._lock:
            return _min_positions(self._committed[t] for t in tables)

    def write(self, result: BatchResult, *, tables: Iterable[str] = POSITIONED, trace: Any = None,
              measurements_json: pa.Array | None = None) -> bool:
        """Buffer ``result`` for the next commit of ``tables``; False when every position is already buffered
        or committed there. ``trace``: the span context of the write (default: the current span's).
        ``measurements_json``: the readings' column as arrow, when the caller has it so (:func:`readings_part`)."""
        s = self.settings
        tables = tuple(tables)
        # as arrow at once, outside the lock (the commit thread takes it): a reading holds about a third of its
        # columns' memory as arrow, and its size is then measured, not estimated
        part = (readings_part(result, self._arrow["readings"], s.readings_buckets, measurements_json)
                if "readings" in tables and len(result.new) else None)
        with self._cond:
            self._raise_error()
            seen = self._buf.positions
            todo = [t for t in tables if any(o > seen[t].get(p, -1) for p, o in result.positions.items())]
            if not todo:
                return False
            # bounded: twice the commit thresholds while a commit is under way
            self._cond.wait_for(lambda: self._error is not None or not (
                self._buf.rows >= 2 * s.commit_rows or self._buf.nbytes >= 2 * s.commit_bytes))
            self._raise_error()
            b = self._buf
            if "readings" in todo and part is not None:
                b.readings.append(part)
                b.rows += len(result.new)
                b.nbytes += part[0].nbytes + part[1].nbytes
            if "dead_letters" in todo and result.dead_letters:
                b.dead_letters.extend(result.dead_letters)
                b.rows += len(result.dead_letters)
                b.nbytes += sum(len(d.payload) + len(d.detail) + 64 for d in result.dead_letters)
            for interval, wd in result.windows.items():
                name = f"rollup_{interval}"
                if name in todo and len(wd):
                    b.rollups[name].append(wd)
                    b.nbytes += 120 * len(wd)
            for t in todo:
                pos = b.positions[t]
                for p, o in result.positions.items():
                    if o > pos.get(p, -1):
                        pos[p] = o
            if tracing.enabled() and len(b.traces) < tracing.MAX_LINKS:
                b.traces.append(trace if trace is not None else tracing.current_context())
            if b.since is None:  # the commit thread now has a deadline
                b.since = time.monotonic()
                self._cond.notify_all()
            elif b.rows >= s.commit_rows or b.nbytes >= s.commit_bytes:
                self._cond.notify_all()
        return True

    def flush(self) -> None:
        """Commit what is buffered now (and wait for it)."""
        with self._cond:
            self._cond.wait_for(lambda: not self._flushing)
            self._raise_error()
            if self._buf.since is None:
                return
            buf = self._take()
        self._commit(buf)

    def close(self) -> None:
        """Commit what is buffered and stop the commit thread (a second call does nothing)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        if self._error is None:
            self.flush()

    def lag_ms(self) -> int:
        """Age of the oldest buffered (not yet committed) result, in ms (0: nothing waiting)."""
        with self._lock:
            since = [t for t in (self._inflight_since, self._buf.since) if t is not None]
        return int((time.monotonic() - min(since)) * 1000) if since else 0

    # -- committing --------------------------------------------------------------------------------

    def _raise_error(self) -> None:
        if self._error is not None:
            raise LakeError(f"lake sink stopped: {self._error}") from self._error

    def _take(self) -> _Buffer:
        """Swap the buffer out for a commit (the lock is held)."""
        buf = self._buf
        self._buf = _Buffer.empty(buf.positions)
        self._inflight_since = buf.since
        self._flushing = True
        self._cond.notify_all()
        return buf

    def _due(self) -> float | None:
        """Seconds until the buffer is due (0: now; None: empty). The lock is held."""
        b = self._buf
        if b.since is None:
            return None
        s = self.settings
        if b.rows >= s.commit_rows or b.nbytes >= s.commit_bytes:
            return 0.0
        # start early by the last commit's duration (at least 1 s, at most half the interval), so that data
        # is visible within the interval of being stored: commits are then that much less than an interval apart
        lead = min(max(self._last_commit_s, 1.0), s.commit_interval_s / 2)
        return max(0.0, b.since + s.commit_interval_s - lead - time.monotonic())

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing:
                    due = None if self._flushing else self._due()  # flush() may be committing
                    if due == 0.0:
                        break
                    self._cond.wait(timeout=due)
                if self._closing:
                    return
                buf = self._take()
            try:
                self._commit(buf)
                self._maintain()
            except BaseException as exc:  # a schema conflict or a bug: the next write raises it
                log.exception("lake commit failed for good")
                with self._cond:
                    self._error = exc
                    self._flushing = False
                    self._cond.notify_all()
                return

    def _commit(self, buf: _Buffer) -> None:
        """Commit ``buf`` to every table, retrying each with backoff until it is in.

        While tracing is on, in a ``lake.commit`` span: a child of the first write's span, linked to the
        others (one commit carries many batches)."""
        if tracing.enabled():
            with tracing.batch_span("fieldmesh.store", "lake.commit", buf.traces,
                                    {"fieldmesh.batches": len(buf.readings), "fieldmesh.flush": self._flush + 1}):
                self._commit_untraced(buf)
        else:
            self._commit_untraced(buf)

    def _commit_with_retry(self, name: str, commit: Callable[[], int | None]) -> int:
        """Run ``commit`` (one table's) until it is in: a catalog unreachable or a conflict with another
        writer or a compaction is retried with capped backoff after the table is loaded again."""
        attempt = 0
        while True:
            try:
                return int(commit() or 0)
            except LakeError:
                raise
            except Exception as exc:
                attempt += 1
                if self._closing and attempt > 3:  # stopping: the bus replays this flush at the next start
                    raise LakeError(f"lake commit of {name} still failing at shutdown: {exc}") from exc
                delay = min(_RETRY_MAX_S, 0.2 * 2**attempt)
                log.warning("lake commit of %s failed (%s: %s); retrying in %.1fs (try %d)", name,
                            type(exc).__name__, exc, delay, attempt)
                time.sleep(delay)
                self._reload(name)

    def _commit_untraced(self, buf: _Buffer) -> None:
        t0 = time.monotonic()
        flush = self._flush + 1
        rows = 0
        try:
            for name in TABLES:
                if name in buf.done:
                    continue
                if name in POSITIONED and buf.positions[name] == self._committed[name]:
                    continue  # nothing new for this table (its view had nothing to write)
                if name == "features" and self.features_source is None:
                    continue
                rows += self._commit_with_retry(name, lambda n=name: self._commit_table(n, buf, flush))  # type: ignore[misc]
                buf.done.add(name)
                if name in POSITIONED:
                    with self._cond:
                        self._committed[name] = dict(buf.positions[name])
        finally:
            with self._cond:
                self._flushing = False
                self._cond.notify_all()
        with self._cond:
            self._inflight_since = None
            self._flush = flush
            if buf.features_seq is not None:
                self._features_seq = buf.features_seq
            self._last_commit_s = time.monotonic() - t0
            self.commits += 1
            self.rows_committed += rows
            self.last_commit_ms = int(time.time() * 1000)
        heap.trim()  # what the commit held (its arrow tables, the merged rollups) goes back to the system
        log.debug("lake flush %d: %d rows in %.2fs", flush, rows, self._last_commit_s)

    def _maintain(self) -> None:
        """Every ``maintenance_interval_s``, between commits: :meth:`maintain`. Failures are logged and
        retried at the next interval: they never stop the sink. Of several writers, the one that copies the
        feature rows (or with no feature views, each) maintains."""
        s = self.settings
        now = time.monotonic()
        if s.maintenance_interval_s <= 0 or now - self._maintained < s.maintenance_interval_s:
            return
        self._maintained = now
        try:
            self.maintain()
        except Exception as exc:
            log.warning("lake maintenance failed (%s: %s); trying again in %.0fs", type(exc).__name__, exc,
                        s.maintenance_interval_s)

    def maintain(self, *, older_than_s: float | None = None, closed_before_ms: int | None = None,
                 ) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """One round of the maintenance the sink runs between its commits: expire snapshots older than
        ``older_than_s`` (default ``snapshot_max_age_s``), compact the small files of partitions closed
        before ``closed_before_ms`` (default: the start of today UTC, so days before today; the month before
        this one for ``rollup_1h``), then load the tables again. Not while the sink commits (its commit
        thread calls it; a caller of its own, such as bench/lake.py, between commits).

        Returns:
            :func:`expire`'s and :func:`compact`'s answers.
        """
        s = self.settings
        expired = expire(self.catalog, s.namespace,
                         older_than_s=s.snapshot_max_age_s if older_than_s is None else older_than_s)
        today_ms = int(time.time() // 86_400) * 86_400_000
        compacted = compact(self.catalog, s.namespace, target_file_mb=s.target_file_mb,
                            closed_before_ms=today_ms if closed_before_ms is None else closed_before_ms)
        for name in TABLES:
            self._reload(name)
        self.maintenances += 1
        log.info("lake maintenance: expired %s snapshots, compacted %s", sum(expired.values()),
                 {k: v["partitions"] for k, v in compacted.items() if v["partitions"]})
        return expired, compacted

    def _reload(self, name: str) -> None:
        try:
            self._tables[name] = self.catalog.load_table(f"{self.settings.namespace}.{name}")
        except Exception as exc:  # still unreachable: the next try reloads again
            log.debug("reload of %s failed: %s", name, exc)

    def _commit_table(self, name: str, buf: _Buffer, flush: int) -> int:
        """One table's commit of ``buf``: its snapshot records the flush number, this writer and the positions
        the table then holds (its own and, carried forward, the other writers')."""
        table = self._tables[name]
        state = self._states[name] = _state_since(table, self._states.get(name))
        head_flush, held = state.flush, state.positions
        props = _props(max(flush, (head_flush or 0) + 1), {}, self.writer)
        if name in POSITIONED:
            mine = buf.positions[name]
            if all(o <= held.get(p, -1) for p, o in mine.items()):  # committed before a retry saw the answer
                return 0
            props[PROP_POSITIONS] = _encode_positions({**held, **mine})
        else:
            props[PROP_POSITIONS] = _encode_positions(held)
        schema = self._arrow[name]
        if name == "features":
            return self._commit_features(table, buf, props)
        if name in _ROLLUP_WIDTH:
            return self._commit_rollups(name, [_Accs.of(wd) for wd in buf.rollups[name]], props)
        data = buf.arrow.get(name)
        partitions = None
        if name == "readings":
            data, keys, starts = readings_ordered_runs(buf.readings, schema)
            partitions = self._readings_partitions(table, keys, starts)
        elif data is None:  # kept for a retry
            data = buf.arrow[name] = dead_letters_table(buf.dead_letters, schema)
        _append(table, data, props, _DICTIONARY.get(name, True), partitions)
        self._tables[name] = table
        return int(data.num_rows)

    def _readings_partitions(self, table: Table, keys: NDArray[np.int64], starts: list[int],
                             ) -> list[tuple[int, list[Any]]] | None:
        """The partitions of the buffered readings (:func:`readings_ordered_runs`) as :func:`_append` takes them:
        the first row of each and its values in the table's spec (the day, the device bucket); None when the
        table's spec is not the one the buffer's keys were made for (``readings_buckets`` changed since the
        table was created, or the spec evolved outside fieldmesh): :func:`_append` then computes them."""
        buckets = self.settings.readings_buckets
        if table.spec().fields != self._readings_spec.fields:
            return None
        days, bucket = np.divmod(keys, buckets)
        return list(zip(starts, map(list, zip(days.tolist(), bucket.tolist(), strict=True)), strict=True))

    def _commit_features(self, table: Table, buf: _Buffer, props: dict[str, str]) -> int:
        """Append the feature rows committed to the hot store since the last flush (an outbox read by seq):
        the snapshot records the last seq, so a replayed flush takes the same rows, never twice."""
        assert self.features_source is not None
        for _, tagged in _tagged_ancestors(table):  # where the table stands (a retry, or another writer)
            self._features_seq = max(self._features_seq, int(tagged.get(PROP_FEATURES_SEQ, 0)))
            break
        rows, seq = self.features_source(self._features_seq, _FEATURES_PER_FLUSH)
        data = features_table(rows, self._arrow["features"])
        buf.features_seq = seq
        _append(table, data, {**props, PROP_FEATURES_SEQ: str(seq)})
        self._tables["features"] = table
        return int(data.num_rows)

    def _commit_rollups(self, name: str, deltas: list[_Accs], props: dict[str, str]) -> int:
        """Merge ``deltas`` into the rows of the windows they touch: read, merge exactly, overwrite. With
        several writers, only the rows of this writer's devices are read and replaced."""
        import pyarrow as pa
        from pyiceberg.expressions import And, In

        table = self._tables[name]
        schema = self._arrow[name]
        deltas = [d for d in deltas if len(d)]
        if not deltas:
            with transaction(table) as tx:
                tx.append(schema.empty_table(), snapshot_properties=props)
            return 0
        windows = np.unique(np.concatenate([d.window_start_ms for d in deltas]))
        where: Any = In(term="window_start", literals=(windows * 1000).tolist())
        if self.writer is not None:
            where = And(where, In(term="device_id", literals=np.unique(np.concatenate([d.device for d in deltas]))
                                  .tolist()))
        old = table.scan(row_filter=where).to_arrow()
        data = pa.concat_tables([_rollup_table(a, schema) for a in _merged_chunks(deltas, old)]
                               or [schema.empty_table()])
        if not old.num_rows:  # windows new to the table: nothing to replace
            _append(table, data, props)
            return sum(len(d) for d in deltas)
        with transaction(table) as tx:
            tx.overwrite(data, overwrite_filter=where, snapshot_properties=props)
        return sum(len(d) for d in deltas)


def transaction(table: Table) -> Transaction:
    """``table.transaction()``, whose table metadata is built once per state of the transaction.

    pyiceberg 0.12's ``Transaction.table_metadata`` replays the staged updates onto a deep copy of the table's
    metadata at every read, and a commit reads it about a hundred times (apache/iceberg-python#2673; the fix
    proposed there, #3302 and #3784, is this one). The copy grows with the table's snapshots: small flushes of the
    sink's four tables took 0.14 CPU-s at first and 0.57 after 60 flushes (122 snapshots in each rollup table),
    most of it in ``copy.deepcopy`` (docs/benchmarks.md, ``bench/lake.py --parts 6``). Here the metadata is kept
    with the identity of what it was built from, the table's metadata and the tuple of staged updates (each
    update stages a new tuple), and built again only when either changed. The metadata is a frozen pydantic
    model: readers cannot change it. One difference: a changed state's ``last_updated_ms`` is the time of its build
    at every read (pyiceberg stamps each read); the commit stamps its own, as before.
    """
    return _transaction_class()(table)


@functools.cache
def _transaction_class() -> type[Transaction]:
    from pyiceberg.table import Transaction
    from pyiceberg.table.update import update_table_metadata

    class _Transaction(Transaction):
        _built: tuple[Any, Any, Any] | None = None  # (table metadata, updates, what they make)

        @property
        def table_metadata(self) -> Any:
            base, updates = self._table.metadata, self._updates
            built = self._built
            if built is None or built[0] is not base or built[1] is not updates:
                built = self._built = (base, updates, update_table_metadata(base, updates))
            return built[2]

    return _Transaction


def _append(table: Table, data: pa.Table, props: dict[str, str], dictionary: Sequence[str] | bool = True,
            partitions: Sequence[tuple[int, list[Any]]] | None = None) -> None:
    """Append ``data`` (exactly the table's arrow schema) as one snapshot with ``props``.

    Why not ``Table.append``: for a partitioned table pyiceberg 0.12 filters the whole batch once per
    partition (``_determine_partitions``), i.e. partitions x rows; here the rows are sorted by their
    partition values once, and each partition is a slice when they came in that order, else a copy of its own
    rows, written before the next partition is taken. The files are committed with pyiceberg's append (a merge
    append: it merges manifests when the table's ``commit.manifest-merge.enabled`` says so,
    :data:`TABLE_PROPERTIES`) and written by :class:`_FileWriter`.

    ``dictionary``: the columns Parquet dictionary-encodes (True: all), see :data:`_DICTIONARY`.

    ``partitions``: when the caller knows them, the rows of ``data`` are in partition order already and these are
    the first row of each partition and its values in the table's spec (:meth:`LakeSink._readings_partitions`):
    the transforms over every row, their sort and the scan for the partitions' bounds are skipped (0.13-0.18 of
    the readings' 0.8 CPU-µs a row, docs/benchmarks.md).
    """
    import uuid

    import pyarrow as pa
    from pyiceberg.partitioning import PartitionFieldValue, PartitionKey
    from pyiceberg.table import TableProperties
    from pyiceberg.utils.properties import property_as_int

    spec, schema, meta = table.spec(), table.schema(), table.metadata
    if spec.is_unpartitioned() or data.num_rows == 0:
        with transaction(table) as tx:
            tx.append(data, snapshot_properties=props)
        return
    target = property_as_int(meta.properties, TableProperties.WRITE_TARGET_FILE_SIZE_BYTES,
                             TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT) or 512 * 2**20
    n = data.num_rows
    if partitions is None:
        partitions, order = _partitions(spec, schema, data)
    else:
        order = None
    write = _FileWriter(table, data.schema, dictionary)
    write_uuid = uuid.uuid4()
    files: list[Any] = []
    for (s, values), e in zip(partitions, [*(p[0] for p in partitions[1:]), n], strict=True):
        key = PartitionKey(field_values=[PartitionFieldValue(field=f, value=v)
                                         for f, v in zip(spec.fields, values, strict=True)],
                           partition_spec=spec, schema=schema)
        # a partition's rows at a time (a slice, or a copy of that partition's rows only), written before the
        # next: the commit never holds a re-ordered copy of the whole batch beside it
        rows = data.slice(s, e - s) if order is None else data.take(pa.array(order[s:e]))
        files += write(rows, key, target, write_uuid, len(files))
        del rows
    with transaction(table) as tx, tx.update_snapshot(snapshot_properties=props).merge_append() as append:
        for data_file in files:
            append.append_data_file(data_file)


def _partitions(spec: Any, schema: Any, data: pa.Table) -> tuple[list[tuple[int, list[Any]]], NDArray[np.intp] | None]:
    """The partitions of ``data``'s rows (the first row of each in partition order, and its values in ``spec``), and
    the order that sorts the rows by partition (None: they are in that order already)."""
    import pyarrow.compute as pc

    keys = {}
    for i, f in enumerate(spec.fields):
        source = schema.find_field(f.source_id)
        keys[f"p{i}"] = f.transform.pyarrow_transform(source.field_type)(data.column(source.name))
    part = pa_table(keys)
    order = np.asarray(pc.sort_indices(part, sort_keys=[(k, "ascending") for k in keys]).to_numpy())
    in_order = len(order) < 2 or bool((order[1:] > order[:-1]).all())
    cols = [np.asarray(part.column(k).to_numpy(zero_copy_only=False))[order] for k in keys]
    change = np.zeros(data.num_rows, dtype=bool)
    change[0] = True
    for c in cols:
        change[1:] |= c[1:] != c[:-1]
    starts = np.flatnonzero(change).tolist()
    return [(s, [c[s].item() for c in cols]) for s in starts], None if in_order else order


#: Columns of ``readings`` whose values repeat (device ids, boot ids, metric names...), the only ones Parquet
#: dictionary-encodes: a dictionary of ``measurements_json``, the times, the keys or the values (nearly all
#: distinct) is built and then dropped at its size limit, which took about a sixth of the writer's time
#: (0.55 against 0.47 µs a row over a million readings, docs/benchmarks.md).
_DICTIONARY: Final = {"readings": ("device_id", "boot_id", "event_id", "meta", "enrichment",
                                   "measurements.key_value.key")}


class _FileWriter:
    """Writes one partition's rows as Parquet data files, as pyiceberg's ``write_file`` writes them (the same
    writer options from the table's properties, the same statistics, file names and locations) when ``schema``
    is exactly the table's arrow schema (:meth:`pyiceberg.schema.Schema.as_arrow`, field ids included, what the
    sink builds its tables with): without ``write_file``'s projection of each batch to the table's schema (a
    copy of every column), its thread pool, and with ``dictionary``. For any other schema (a table evolved
    outside fieldmesh), ``write_file`` itself."""

    def __init__(self, table: Table, schema: pa.Schema, dictionary: Sequence[str] | bool) -> None:
        from pyiceberg.io.pyarrow import (
            _get_parquet_writer_kwargs,
            compute_statistics_plan,
            parquet_path_to_id_mapping,
            pyarrow_to_schema,
        )
        from pyiceberg.table import TableProperties
        from pyiceberg.table.locations import load_location_provider
        from pyiceberg.utils.properties import property_as_int

        self.table, self.meta, self.schema = table, table.metadata, schema
        ischema = table.schema()
        self.direct = ischema.as_arrow().equals(schema, check_metadata=True)
        props = self.meta.properties
        self.kwargs = {**_get_parquet_writer_kwargs(props), "use_dictionary": dictionary}
        self.row_group = property_as_int(props, TableProperties.PARQUET_ROW_GROUP_LIMIT,
                                         TableProperties.PARQUET_ROW_GROUP_LIMIT_DEFAULT)
        self.plan = compute_statistics_plan(ischema, props)
        self.mapping = parquet_path_to_id_mapping(ischema)
        self.locations = load_location_provider(table_location=self.meta.location, table_properties=props)
        self.task_schema = pyarrow_to_schema(schema, name_mapping=ischema.name_mapping,
                                             format_version=self.meta.format_version)

    def __call__(self, rows: pa.Table, key: Any, target: int, write_uuid: Any, task_id: int) -> list[Any]:
        from pyiceberg.io.pyarrow import bin_pack_arrow_table, write_file
        from pyiceberg.table import WriteTask

        tasks = [WriteTask(write_uuid=write_uuid, task_id=task_id + i, record_batches=batches, partition_key=key,
                           schema=self.task_schema) for i, batches in enumerate(bin_pack_arrow_table(rows, target))]
        if not self.direct:
            return list(write_file(io=self.table.io, table_metadata=self.meta, tasks=iter(tasks)))
        return [self._write(task) for task in tasks]

    def _write(self, task: Any) -> Any:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from pyiceberg.io.pyarrow import data_file_statistics_from_parquet_metadata
        from pyiceberg.manifest import DataFile, DataFileContent, FileFormat

        path = self.locations.new_data_location(data_file_name=task.generate_data_file_filename("parquet"),
                                                partition_key=task.partition_key)
        out = self.table.io.new_output(path)
        with out.create(overwrite=True) as stream:
            writer = pq.ParquetWriter(stream, schema=self.schema, store_decimal_as_integer=True, **self.kwargs)
            with writer:
                writer.write_table(pa.Table.from_batches(task.record_batches), row_group_size=self.row_group)
        stats = data_file_statistics_from_parquet_metadata(
            parquet_metadata=writer.writer.metadata, stats_columns=self.plan, parquet_column_mapping=self.mapping)
        return DataFile.from_args(
            content=DataFileContent.DATA, file_path=path, file_format=FileFormat.PARQUET,
            partition=task.partition_key.partition, file_size_in_bytes=len(out), sort_order_id=None,
            spec_id=self.meta.default_spec_id, equality_ids=None, key_metadata=None, **stats.to_serialized_dict())


def pa_table(columns: Mapping[str, Any]) -> pa.Table:
    import pyarrow as pa

    return pa.table(dict(columns))


def _check_schema(ident: str, table: Table, expected: Any) -> None:
    """A table changed outside fieldmesh: name it and the difference (extra columns are allowed)."""
    have = {f.name: f for f in table.schema().fields}
    problems = []
    for f in expected.fields:
        got = have.get(f.name)
        if got is None:
            problems.append(f"column {f.name} ({f.field_type}) is missing")
        elif got.field_type != f.field_type:
            problems.append(f"column {f.name} is {got.field_type}, fieldmesh writes {f.field_type}")
    if problems:
        raise LakeError(f"lake table {ident} was changed outside fieldmesh: {'; '.join(problems)}")


# ---- maintenance ------------------------------------------------------------------------------------


def _carry(table: Table) -> dict[str, str]:
    """The fieldmesh properties of the table's latest tagged snapshot, for a maintenance commit."""
    for _, props in _tagged_ancestors(table):
        return {k: v for k, v in props.items() if k.startswith("fieldmesh.")}
    return {}


def compact(catalog: Catalog, namespace: str, *, target_file_mb: int = 128, tables: Iterable[str] = TABLES,
            min_files: int = 2, retries: int = 10, closed_before_ms: int | None = None,
            ) -> dict[str, dict[str, int]]:
    """Rewrite each partition's small files into files of about ``target_file_mb``.

    Per table: every partition with at least ``min_files`` files below the target has exactly those files
    read and written again as large files, one partition at a time; then one commit replaces them all (an
    Iceberg *replace*: the old files are removed by name, so no row filter is evaluated and no other file is
    read; one commit rewrites the table's manifests once, not once per partition) and carries the sink's
    flush properties forward. A concurrent sink commit makes this commit fail; the files written are then
    deleted, the small files listed again and the rewrite retried. ``closed_before_ms``: only partitions
    whose time range ends by then (the schedule inside ``up`` leaves the day being written alone).

    Returns:
        Per table: partitions rewritten, files before and after.
    """
    from pyiceberg.exceptions import CommitFailedException, ValidationException

    target = target_file_mb * 2**20
    out: dict[str, dict[str, int]] = {}
    for name in tables:
        ident = f"{namespace}.{name}"
        stats = {"partitions": 0, "files_before": 0, "files_after": 0}
        table = catalog.load_table(ident)
        table.manage_snapshots()  # loaded: fail early if the table is gone
        for attempt in range(retries):
            if attempt:
                table = catalog.load_table(ident)
            groups = {part: tasks for part, tasks in _small_tasks(table, target).items() if len(tasks) >= min_files
                      and (closed_before_ms is None or _partition_end_ms(table, part) <= closed_before_ms)}
            if not groups:
                break
            old: list[Any] = []
            new: list[Any] = []
            for tasks in groups.values():
                old += [t.file for t in tasks]
                new += _rewrite_files(table, tasks, target)
            try:
                with transaction(table) as tx, tx.update_snapshot(snapshot_properties=_carry(table)).overwrite() as r:
                    for f in old:
                        r.delete_data_file(f)
                    for f in new:
                        r.append_data_file(f)
            except (CommitFailedException, ValidationException):
                # a sink commit came first (pyiceberg retries a conflict itself, then refuses an overwrite
                # whose partitions gained files meanwhile): list the small files again, new ones included
                for f in new:  # never part of the table: remove them
                    with contextlib.suppress(Exception):
                        table.io.delete(f.file_path)
                time.sleep(min(5.0, 0.2 * 2**attempt))
                continue
            stats = {"partitions": len(groups), "files_before": len(old), "files_after": len(new)}
            break
        out[ident] = stats
    return out


def _small_tasks(table: Table, target: float) -> dict[tuple[Any, ...], list[Any]]:
    """Scan tasks of the data files below ``target`` bytes (and without delete files), by partition."""
    groups: dict[tuple[Any, ...], list[Any]] = {}
    if table.current_snapshot() is None:
        return groups
    for task in table.scan().plan_files():
        f = task.file
        if f.file_size_in_bytes < target and not task.delete_files:
            groups.setdefault(tuple(f.partition), []).append(task)  # type: ignore[arg-type]
    return groups


def _rewrite_files(table: Table, tasks: list[Any], target: int) -> list[Any]:
    """The rows of ``tasks`` (data files of one partition) written again as files of about ``target`` bytes
    (not committed); returns their data files."""
    import uuid

    from pyiceberg.expressions import AlwaysTrue
    from pyiceberg.io.pyarrow import ArrowScan, bin_pack_arrow_table, pyarrow_to_schema, write_file
    from pyiceberg.partitioning import PartitionFieldValue, PartitionKey
    from pyiceberg.table import WriteTask

    meta, spec, schema = table.metadata, table.spec(), table.schema()
    data = ArrowScan(meta, table.io, schema, AlwaysTrue()).to_table(tasks)
    part = tasks[0].file.partition
    key = None if spec.is_unpartitioned() else PartitionKey(
        field_values=[PartitionFieldValue(field=f, value=part[i]) for i, f in enumerate(spec.fields)],
        partition_spec=spec, schema=schema)
    task_schema = pyarrow_to_schema(data.schema, name_mapping=schema.name_mapping, format_version=meta.format_version)
    write_uuid = uuid.uuid4()
    writes = [WriteTask(write_uuid=write_uuid, task_id=i, record_batches=batches, partition_key=key,
                        schema=task_schema) for i, batches in enumerate(bin_pack_arrow_table(data, target))]
    return list(write_file(io=table.io, table_metadata=meta, tasks=iter(writes)))


def _partition_end_ms(table: Table, part: tuple[Any, ...]) -> int:
    """When the time range of a partition ends (ms; a partition without a time transform never ends)."""
    import datetime as dt

    from pyiceberg.transforms import DayTransform, MonthTransform

    end = 2**62
    for field, value in zip(table.spec().fields, part, strict=True):
        if isinstance(field.transform, DayTransform):
            end = min(end, (int(value) + 1) * 86_400_000)
        elif isinstance(field.transform, MonthTransform):
            y, m = divmod(int(value) + 1, 12)
            end = min(end, int(dt.datetime(1970 + y, m + 1, 1, tzinfo=dt.UTC).timestamp() * 1000))
    return end


def expire(catalog: Catalog, namespace: str, *, older_than_s: float, keep_last: int = 10,
           tables: Iterable[str] = TABLES) -> dict[str, int]:
    """Drop snapshots older than ``older_than_s`` (keeping the last ``keep_last``, and for each bus partition
    the latest snapshot that records its highest position: what the table holds is read from them, also
    for a writer that has not committed for longer). Returns snapshots expired per table."""
    out: dict[str, int] = {}
    cutoff_ms = int((time.time() - older_than_s) * 1000)
    for name in tables:
        ident = f"{namespace}.{name}"
        table = catalog.load_table(ident)
        current = table.current_snapshot()
        if current is None:
            out[ident] = 0
            continue
        keep = {s.snapshot_id for s, _ in zip(_ancestors(table), range(keep_last), strict=False)}
        best: dict[Position, tuple[int, int]] = {}  # partition -> (highest position, latest snapshot with it)
        for snap, props in _tagged_ancestors(table):
            for p, o in _decode_positions(props[PROP_POSITIONS]).items():
                if o > best.get(p, (-1, 0))[0]:
                    best[p] = (o, snap.snapshot_id)
        keep.update(s for _, s in best.values())
        ids = [s.snapshot_id for s in table.metadata.snapshots
               if s.timestamp_ms < cutoff_ms and s.snapshot_id not in keep]
        if ids:
            table.maintenance.expire_snapshots().by_ids(ids).commit()
        out[ident] = len(ids)
    return out
