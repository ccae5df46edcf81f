"""The offline feature store: feature rows from the lake, and training sets built from them (docs/features.md).

Reads the Iceberg table ``<namespace>.features`` (view, entity, window_start, window_end, known_at, version,
values map<string,double>) through pyiceberg scans into Arrow, turns each view's rows into
:class:`~fieldmesh.stream.pointintime.FeatureRows`, and assembles a training set: one output row per entity
row of the input, with each view's features as known at the row's ``ts``
(:func:`~fieldmesh.stream.pointintime.as_of_features`) and, optionally, a label from a CDC table
(:func:`~fieldmesh.stream.pointintime.label_join`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import msgspec
import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.errors import ConfigError, FieldmeshError, MissingDependency
from fieldmesh.stream.pointintime import (
    AsOfIndex,
    FeatureRows,
    LabelAgg,
    LabelEvents,
    as_of_features,
    codes_of,
    label_join,
)

if TYPE_CHECKING:
    import pyarrow as pa
    from pyiceberg.catalog import Catalog

    from fieldmesh.store.base import HotStore
    from fieldmesh.stream.featureviews import FeatureRow

__all__ = ["FEATURES_TABLE", "LabelSpec", "StoreRow", "TrainingSummary", "build_training_set", "feature_rows_arrow",
           "feature_rows_from_arrow", "feature_rows_from_rows", "feature_rows_from_store", "read_entities",
           "read_feature_rows", "read_store_feature_rows", "split_views", "store_rows_since"]

FEATURES_TABLE: Final = "features"
_COLUMNS: Final = ("view", "entity", "window_start", "window_end", "known_at", "version", "values")

Progress = Callable[[str, int], None]  # (step name, rows done in it)


def _pa() -> Any:
    try:
        import pyarrow as pa
    except ImportError as exc:
        raise MissingDependency("pyarrow", "lake") from exc
    return pa


def _ms(col: Any) -> NDArray[np.int64]:
    """Timestamps (any unit, or integers of ms) as int64 ms since the epoch."""
    pa = _pa()
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if pa.types.is_timestamp(t):
        per_ms = {"s": None, "ms": 1, "us": 1000, "ns": 1_000_000}[t.unit]
        raw = np.asarray(pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)
        return raw * 1000 if per_ms is None else np.floor_divide(raw, per_ms)
    if pa.types.is_integer(t):
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.int64)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            ts = pc.cast(col, pa.timestamp("us", tz="UTC"))
        except pa.ArrowInvalid as exc:
            raise ConfigError(f"cannot read times: {exc}") from exc
        return _ms(ts)
    raise ConfigError(f"a time column of type {t}: use timestamps, ISO 8601 strings or integer ms")


def _map_chunks(column: Any) -> list[tuple[int, NDArray[np.int64], list[str], NDArray[np.int64], NDArray[np.float64]]]:
    """Per chunk of a map<string, double> column: (first row, entries per row, the chunk's key names, each
    entry's key index, each entry's value). Keys read as a dictionary (Parquet's own) are used as they are."""
    import pyarrow.compute as pc

    pa = _pa()
    out = []
    first = 0
    for ch in column.chunks:
        offsets = ch.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
        lo, hi = int(offsets[0]), int(offsets[-1])  # a sliced map array's children are not sliced
        keys = ch.keys.slice(lo, hi - lo)
        if not pa.types.is_dictionary(keys.type):
            keys = pc.dictionary_encode(keys)
        names = [str(x) for x in keys.dictionary.to_pylist()]
        idx = keys.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        items = np.asarray(ch.items.slice(lo, hi - lo).to_numpy(zero_copy_only=False), dtype=np.float64)
        out.append((first, np.diff(offsets), names, idx, items))
        first += len(ch)
    return out


def feature_rows_from_arrow(view: str, table: pa.Table, *, names: Sequence[str] | None = None) -> FeatureRows:
    """The rows of ``table`` (the features table's columns, one view) as :class:`FeatureRows`.

    ``names``: the features in this order (others dropped); default every key found, sorted. A null value
    (the stream's NaN) is NaN, present.
    """
    n = table.num_rows
    entity = np.asarray(table.column("entity").to_numpy(zero_copy_only=False), dtype=object)
    chunks = _map_chunks(table.column("values"))
    key_names = list(names) if names is not None else sorted({k for c in chunks for k in c[2]})
    at = {k: j for j, k in enumerate(key_names)}
    mat = np.empty((n, len(key_names)))
    present = np.zeros((n, len(key_names)), dtype=bool)
    for first, lengths, found, idx, items in chunks:
        rows_in = len(lengths)
        if not len(idx):
            continue
        cols = np.array([at.get(k, -1) for k in found], dtype=np.int64)
        width = int(lengths[0])
        if width and (lengths == width).all() and (cols[idx[:width]] >= 0).all():
            grid = idx.reshape(rows_in, width)
            if (grid == grid[0]).all():  # the usual case: every row has the same keys in the same order
                c = cols[grid[0]]
                mat[first:first + rows_in, c] = items.reshape(rows_in, width)
                present[first:first + rows_in, c] = True
                continue
        row_of = first + np.repeat(np.arange(rows_in), lengths)
        item_col = cols[idx]
        keep = item_col >= 0
        mat[row_of[keep], item_col[keep]] = items[keep]
        present[row_of[keep], item_col[keep]] = True
    mat[~present] = np.nan
    return FeatureRows(view, entity, _ms(table.column("window_end")), _ms(table.column("known_at")),
                       np.asarray(table.column("version").to_numpy(zero_copy_only=False), np.int64),
                       tuple(key_names), mat, present)


def feature_rows_arrow(rows: FeatureRows, *, window_ms: NDArray[np.int64] | int | None = None) -> pa.Table:
    """:class:`FeatureRows` as the features table's Arrow columns (``window_start`` = end - ``window_ms``,
    default the end itself: the widest window of a view starts before it anyway)."""
    pa = _pa()
    n = len(rows)
    lengths = rows.present.sum(axis=1)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    r, c = np.nonzero(rows.present)
    keys = pa.DictionaryArray.from_arrays(pa.array(c.astype(np.int32)), pa.array(list(rows.names), pa.string())
                                          ).cast(pa.string())
    items = pa.array(rows.values[r, c], pa.float64())
    values = pa.MapArray.from_arrays(pa.array(offsets), keys, items)
    start = rows.window_end_ms - (window_ms if window_ms is not None else 0)
    ts = pa.timestamp("us", tz="UTC")
    return pa.table({
        "view": pa.array([rows.view] * n, pa.string()),
        "entity": pa.array(rows.entity.tolist(), pa.string()),
        "window_start": pa.array(np.asarray(start, np.int64) * 1000, pa.int64()).cast(ts),
        "window_end": pa.array(rows.window_end_ms * 1000, pa.int64()).cast(ts),
        "known_at": pa.array(rows.known_at_ms * 1000, pa.int64()).cast(ts),
        "version": pa.array(rows.version, pa.int64()),
        "values": values,
    })


def read_feature_rows(catalog: Catalog, namespace: str, views: Sequence[str], *,
                      names: Mapping[str, Sequence[str]] | None = None) -> dict[str, FeatureRows]:
    """Each view's rows from ``<namespace>.features`` (one pyiceberg scan for all of them).

    Raises:
        FieldmeshError: no features table in the lake.
    """
    from pyiceberg.expressions import EqualTo, In

    ident = f"{namespace}.{FEATURES_TABLE}"
    if not catalog.table_exists(ident):
        raise FieldmeshError(f"no table {ident} in the lake: run the pipeline with feature views (--features) "
                             "and the lake on, and wait for a lake commit")
    table = catalog.load_table(ident)
    filt = (EqualTo(term="view", literal=views[0]) if len(views) == 1  # type: ignore[call-arg]
            else In(term="view", literals=list(views)))
    scan = table.scan(row_filter=filt, selected_fields=_COLUMNS)
    tasks = list(scan.plan_files())
    paths = [urlsplit(t.file.file_path).path for t in tasks
             if t.file.file_path.startswith(("file:", "/")) and not t.delete_files]
    if tasks and len(paths) == len(tasks):
        # local data files without deletes (what the lake sink writes): read them with Arrow directly, the map's
        # keys as Parquet's dictionary (no string per entry), the views' rows only
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        data = pq.read_table(paths, columns=list(_COLUMNS), partitioning=None,
                             filters=pc.field("view").isin(list(views)), read_dictionary=["values.key_value.key"])
    else:  # object stores, delete files: pyiceberg's own reader
        data = scan.to_arrow()
    return split_views(data, views, names=names)


def split_views(data: pa.Table, views: Sequence[str], *,
                names: Mapping[str, Sequence[str]] | None = None) -> dict[str, FeatureRows]:
    """The rows of each view in ``data`` (the features table's columns)."""
    import pyarrow.compute as pc

    out: dict[str, FeatureRows] = {}
    view_col = data.column("view")
    for v in views:
        part = data.filter(pc.equal(view_col, v)) if len(views) > 1 else data
        out[v] = feature_rows_from_arrow(v, part, names=(names or {}).get(v))
    return out


def feature_rows_from_rows(view: str, rows: Sequence[FeatureRow], *,
                           names: Sequence[str] | None = None) -> FeatureRows:
    """:class:`FeatureRows` of ``rows`` (one view's :class:`~fieldmesh.stream.featureviews.FeatureRow` s).

    ``names``: the features in this order (others dropped); default every name found, sorted.
    """
    cols = list(names) if names is not None else sorted({k for r in rows for k in r.values})
    at = {k: j for j, k in enumerate(cols)}
    n = len(rows)
    values = np.full((n, len(cols)), np.nan)
    present = np.zeros((n, len(cols)), dtype=bool)
    for i, r in enumerate(rows):
        for k, v in r.values.items():
            j = at.get(k)
            if j is not None:
                values[i, j] = np.nan if v is None else v
                present[i, j] = True
    return FeatureRows(view, np.array([r.entity for r in rows], dtype=object),
                       np.array([r.window_end_ms for r in rows], np.int64),
                       np.array([r.known_at_ms for r in rows], np.int64),
                       np.array([r.version for r in rows], np.int64), tuple(cols), values, present)


_ROWS_SQL: Final = 'SELECT view, entity, window_start, window_end, known_at, version, "values" FROM feature_rows'
_VIEW_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


StoreRow = tuple[Any, ...]  # (view, entity, window_start, window_end, known_at, version, values JSON)


def _store_rows(store: HotStore, where: str) -> list[StoreRow]:
    """Rows of ``feature_rows`` through the store's read-only query (placeholders differ per backend: the
    callers inline only an integer or a checked identifier)."""
    try:
        res = store.query(f"{_ROWS_SQL} WHERE {where}")
    except Exception as exc:  # the driver's own error for a missing table (sqlite3, psycopg)
        if "feature_rows" not in str(exc):
            raise
        raise FieldmeshError(f"the hot store has no feature rows ({exc}): run the pipeline with feature views "
                             "(--features)") from exc
    return res.rows


_values_json = msgspec.json.Decoder(dict[str, float | None])


def feature_rows_from_store(view: str, rows: Sequence[StoreRow], *,
                            names: Sequence[str] | None = None) -> FeatureRows:
    """:class:`FeatureRows` of one view's ``feature_rows`` rows (values JSON decoded by msgspec; rows that
    share one key order, the usual case, are converted as one block). A null value (NaN) is NaN, present."""
    n = len(rows)
    parsed = [_values_json.decode(r[6]) for r in rows]
    cols = list(names) if names is not None else sorted({k for d in parsed for k in d})
    at = {k: j for j, k in enumerate(cols)}
    values = np.full((n, len(cols)), np.nan)
    present = np.zeros((n, len(cols)), dtype=bool)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, d in enumerate(parsed):
        groups.setdefault(tuple(d), []).append(i)
    for keys, idx in groups.items():
        kept = [c for c, k in enumerate(keys) if k in at]
        if not kept:
            continue
        block = np.array([list(parsed[i].values()) for i in idx], dtype=np.float64)  # None -> NaN
        target = np.array([at[keys[c]] for c in kept], dtype=np.intp)
        rows_at = np.array(idx, dtype=np.intp)
        values[np.ix_(rows_at, target)] = block[:, kept]
        present[np.ix_(rows_at, target)] = True
    return FeatureRows(view, np.array([r[1] for r in rows], dtype=object),
                       np.array([r[3] for r in rows], np.int64), np.array([r[4] for r in rows], np.int64),
                       np.array([r[5] for r in rows], np.int64), tuple(cols), values, present)


def store_rows_since(store: HotStore, since_ms: int) -> list[StoreRow]:
    """The hot store's feature rows known at or after ``since_ms``, every view (read-only), as
    ``(view, entity, window_start, window_end, known_at, version, values JSON)``.

    Raises:
        FieldmeshError: the store has no ``feature_rows`` table (features never ran on it).
    """
    return _store_rows(store, f"known_at >= {int(since_ms)}")


def read_store_feature_rows(store: HotStore, views: Sequence[str], *,
                            names: Mapping[str, Sequence[str]] | None = None) -> dict[str, FeatureRows]:
    """Each view's rows from the hot store's ``feature_rows`` table (the embedded offline store, no lake).

    Raises:
        FieldmeshError: the store has no ``feature_rows`` table.
    """
    out: dict[str, FeatureRows] = {}
    for v in views:
        if not _VIEW_NAME.match(v):
            raise ConfigError(f"not a view name: {v!r}", key="views")
        out[v] = feature_rows_from_store(v, _store_rows(store, f"view = '{v}'"), names=(names or {}).get(v))
    return out


def read_entities(path: Path) -> pa.Table:
    """The entity rows of a training set: CSV or Parquet with columns ``entity``, ``ts`` and maybe ``label``.

    Raises:
        ConfigError: a missing file or column, or times that do not parse.
    """
    pa = _pa()
    if not path.exists():
        raise ConfigError(f"no entities file {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            from pyarrow import csv

            table = csv.read_csv(path, convert_options=csv.ConvertOptions(column_types={"entity": pa.string()}))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"cannot read entities file {path}: {exc}") from exc
    missing = [c for c in ("entity", "ts") if c not in table.column_names]
    if missing:
        raise ConfigError(f"entities file {path} lacks column(s) {', '.join(missing)} "
                          f"(has {', '.join(table.column_names)}): it needs entity, ts[, label]")
    return table


@dataclass(frozen=True, slots=True)
class LabelSpec:
    """A label from CDC events: ``name`` is the output column."""

    events: LabelEvents
    horizon_ms: int
    agg: LabelAgg = "first"
    name: str = "label"


@dataclass(slots=True)
class TrainingSummary:
    """What a training set holds, for the CLI's summary."""

    rows: int = 0
    views: dict[str, dict[str, int]] = None  # type: ignore[assignment]  # view -> {"found", "expired", "none"}
    labelled: int = 0
    label_events: int = 0

    def __post_init__(self) -> None:
        if self.views is None:
            self.views = {}


def build_training_set(entities: pa.Table, rows: Mapping[str, FeatureRows], *, ttl_ms: Mapping[str, int | None],
                       label: LabelSpec | None = None, progress: Progress | None = None,
                       ) -> tuple[pa.Table, TrainingSummary]:
    """The training set: ``entities``' columns, then per view ``<view>__window_end``, ``<view>__known_at`` and
    one column ``<view>__<feature>`` per feature (null where nothing was known at ``ts``, it had expired, or
    the window had no value, e.g. a NaN rate), then the label column and ``<label>__committed_at`` if ``label``.

    Raises:
        ConfigError: the label column already exists in ``entities``.
    """
    import pyarrow.compute as pc

    pa = _pa()
    ts_ms = _ms(entities.column("ts"))
    ent_col = entities.column("entity")
    if ent_col.type != pa.string():
        ent_col = pc.cast(ent_col, pa.string())
    # the entities dictionary-encoded by Arrow: distinct names (few) looked up per view, codes by indexing
    enc = pc.dictionary_encode(ent_col)
    enc = enc.combine_chunks() if isinstance(enc, pa.ChunkedArray) else enc
    if isinstance(enc, pa.ChunkedArray):  # no chunks at all
        enc = pa.array([], pa.dictionary(pa.int32(), pa.string()))
    names = [str(x) for x in enc.dictionary.to_pylist()]
    ind = pc.fill_null(enc.indices, len(names)).to_numpy(zero_copy_only=False).astype(np.int64)
    summary = TrainingSummary(rows=len(ts_ms))
    out = entities
    ts_type = pa.timestamp("ms", tz="UTC")
    for view, fr in rows.items():
        index = AsOfIndex(fr)
        if progress:
            progress(f"index {view}", len(fr))
        per_name = np.append(codes_of(names, index.entity_code), -1)  # the last: a null entity
        found = as_of_features(index, None, ts_ms, ttl_ms=ttl_ms.get(view), codes=per_name[ind])
        live = found.row >= 0
        summary.views[view] = {"found": int(live.sum()), "expired": int(found.expired.sum()),
                               "none": int((~live & ~found.expired).sum()), "feature_rows": len(fr)}
        out = out.append_column(f"{view}__window_end",
                                pa.array(found.window_end_ms, pa.int64(), mask=~live).cast(ts_type))
        out = out.append_column(f"{view}__known_at", pa.array(found.known_at_ms, pa.int64(), mask=~live).cast(ts_type))
        null = ~found.present | np.isnan(found.values)  # NaN (a rate over one reading) is null, as online
        for j, name in enumerate(fr.names):
            out = out.append_column(f"{view}__{name}", pa.array(found.values[:, j], pa.float64(), mask=null[:, j]))
        if progress:
            progress(f"join {view}", len(ts_ms))
    if label is not None:
        if label.name in out.column_names:
            raise ConfigError(f"the entities file has a column {label.name!r} already: name the CDC label "
                              "otherwise (--label-name)")
        entity = np.array([*names, ""], dtype=object)[ind]
        lj = label_join(label.events, entity, ts_ms, horizon_ms=label.horizon_ms, agg=label.agg)
        try:
            arr = pa.array(lj.value)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed types in the column: keep them as text
            arr = pa.array([None if v is None else str(v) for v in lj.value], pa.string())
        out = out.append_column(label.name, arr)
        has = lj.commit_ms >= 0
        out = out.append_column(f"{label.name}__committed_at",
                                pa.array(lj.commit_ms, pa.int64(), mask=~has).cast(ts_type))
        summary.labelled = int(has.sum())
        summary.label_events = len(label.events)
        if progress:
            progress("labels", len(ts_ms))
    return out, summary
