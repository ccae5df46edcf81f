"""``fieldmesh features``: point-in-time training sets and the Feast export (docs/features.md)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fieldmesh.core.errors import ConfigError, FieldmeshError

__all__ = ["app"]

app = typer.Typer(name="features", no_args_is_help=True,
                  help="The feature store: point-in-time training sets, Feast export (docs/features.md).")
err = Console(stderr=True)

DataDir = Annotated[Path, typer.Option("--data-dir", envvar="FIELDMESH_DATA_DIR", help="the data dir of 'up'")]
LakeUrl = Annotated[str | None, typer.Option(help="Iceberg catalog URL (default: the data dir's) "
                                             "[env FIELDMESH__LAKE__URL]")]
StoreUrl = Annotated[str | None, typer.Option(help="the hot store (default: the data dir's), for --source store")]
FeaturesFile = Annotated[Path, typer.Option("--features", envvar="FIELDMESH_FEATURES",
                                            help="the feature views YAML the pipeline runs with")]
Source = Annotated[str, typer.Option(help="where feature rows are read: lake (the Iceberg table "
                                     "<namespace>.features), store (the hot store's feature_rows), or auto "
                                     "(the lake when it has the table)")]


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


def _lake_settings(lake_url: str | None) -> Any:
    from fieldmesh.core.settings import load_settings

    return load_settings(**({"lake": {"url": lake_url}} if lake_url else {})).lake


def _views(path: Path, names: str | None) -> list[Any]:
    from fieldmesh.stream.featureviews import load_feature_views

    views = load_feature_views(path)
    if not names:
        return views
    by = {v.name: v for v in views}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    missing = [n for n in wanted if n not in by]
    if missing:
        raise ConfigError(f"no feature view {', '.join(map(repr, missing))} in {path} (has {', '.join(by)})",
                          key="views")
    return [by[n] for n in wanted]


def read_rows(views: list[Any], *, source: str, data_dir: Path, lake_url: str | None,
              store_url: str | None) -> tuple[str, dict[str, Any]]:
    """Feature rows of ``views`` from the lake or the hot store: ``(where, {view: FeatureRows})``."""
    from fieldmesh.store.offline import FEATURES_TABLE, read_feature_rows, read_store_feature_rows

    names = {v.name: v.feature_names() for v in views}
    if source not in ("auto", "lake", "store"):
        raise ConfigError(f"--source {source!r}: use lake, store or auto", key="source")
    if source in ("auto", "lake"):
        from fieldmesh.store.lake import open_catalog

        s = _lake_settings(lake_url)
        catalog = open_catalog(s, data_dir)
        if source == "lake" or catalog.table_exists(f"{s.namespace}.{FEATURES_TABLE}"):
            where = f"lake {s.namespace}.{FEATURES_TABLE}"
            return where, read_feature_rows(catalog, s.namespace, [v.name for v in views], names=names)
    from fieldmesh.store import default_store_url, load_store

    url = store_url or default_store_url(data_dir)
    store = load_store(url, readonly=True)
    try:
        return "hot store feature_rows", read_store_feature_rows(store, [v.name for v in views], names=names)
    finally:
        store.close()


@app.command("training-set")
def training_set(
    entities: Annotated[Path, typer.Option(help="CSV or Parquet with columns entity, ts[, label]")],
    out: Annotated[Path, typer.Option(help="the training set to write (Parquet)")],
    features: FeaturesFile,
    views: Annotated[str | None, typer.Option(help="comma-separated view names (default: every view)")] = None,
    data_dir: DataDir = Path(".fieldmesh"),
    lake_url: LakeUrl = None,
    store_url: StoreUrl = None,
    source: Source = "auto",
    label_table: Annotated[str | None, typer.Option(
        help="a CDC-captured table whose changes are labels, e.g. public.maintenance")] = None,
    label_column: Annotated[str | None, typer.Option(help="the label table's column holding the label")] = None,
    label_horizon: Annotated[str, typer.Option(
        help="a label event counts for ts when committed in (ts, ts + horizon], e.g. 24h")] = "24h",
    label_entity_column: Annotated[str, typer.Option(help="the label table's column naming the entity")
                                   ] = "device_id",
    label_agg: Annotated[str, typer.Option(help="first | last (the event's label value), any (bool), count")
                         ] = "first",
    label_name: Annotated[str, typer.Option(help="the label's output column")] = "label",
    label_db: Annotated[str | None, typer.Option(help="the PostgreSQL database of --label-table")] = None,
    label_topic: Annotated[str | None, typer.Option(help="read this CDC topic instead (e.g. Debezium's)")] = None,
    bus_url: Annotated[str, typer.Option(envvar="FIELDMESH_BUS_URL", help="the bus holding the CDC topics")
                       ] = "nats://127.0.0.1:4222",
) -> None:
    """Point-in-time training set: per entity row, each view's features as known at its ts (known_at <= ts,
    latest window, TTL), and optionally a label from a CDC table committed within a horizon after ts."""
    import pyarrow.parquet as pq

    from fieldmesh.store.offline import LabelSpec, build_training_set, read_entities
    from fieldmesh.stream.featureviews import format_duration_ms, parse_duration_ms
    from fieldmesh.stream.pointintime import LABEL_AGGS, LabelEvents

    t0 = time.perf_counter()
    try:
        chosen = _views(features, views)
        if label_table or label_topic:
            if not label_column and label_agg in ("first", "last"):
                raise ConfigError("--label-column is needed with --label-agg first/last", key="label_column")
            if label_agg not in LABEL_AGGS:
                raise ConfigError(f"--label-agg {label_agg!r}: use one of {', '.join(LABEL_AGGS)}", key="label_agg")
            try:
                horizon_ms = parse_duration_ms(label_horizon, what="--label-horizon")
            except ValueError as exc:
                raise ConfigError(str(exc), key="label_horizon") from exc
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=err, transient=False) as bar:
            steps = 3 + len(chosen) * 2 + (1 if label_table or label_topic else 0)
            task = bar.add_task("entities", total=steps)
            table = read_entities(entities)
            bar.update(task, advance=1, description=f"read {table.num_rows:,} entity rows")
            where, rows = read_rows(chosen, source=source, data_dir=data_dir, lake_url=lake_url, store_url=store_url)
            bar.update(task, advance=1, description=f"read {sum(len(r) for r in rows.values()):,} feature rows "
                                                    f"from the {where}")
            label = None
            if label_table or label_topic:
                from fieldmesh.runtime.labels import label_topic as topic_of
                from fieldmesh.runtime.labels import read_label_events

                topic = topic_of(label_table or "", database=label_db, topic=label_topic)
                events = LabelEvents(entity_column=label_entity_column, label_column=label_column or "")
                asyncio.run(read_label_events(bus_url, topic, events))
                bar.update(task, advance=1, description=f"read {len(events):,} label events from {topic}")
                label = LabelSpec(events, horizon_ms, label_agg, label_name)  # type: ignore[arg-type]

            def progress(step: str, n: int) -> None:
                bar.update(task, advance=1, description=f"{step}: {n:,} rows")

            result, summary = build_training_set(table, rows, ttl_ms={v.name: v.ttl_ms for v in chosen},
                                                 label=label, progress=progress)
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(result, out)
            bar.update(task, advance=1, description=f"wrote {out}")
    except FieldmeshError as exc:
        _fail(exc)
        return
    summary_table = Table(title=f"training set {out}: {summary.rows:,} rows, {len(result.column_names)} columns, "
                                f"{time.perf_counter() - t0:.2f} s")
    for col in ("view", "feature rows", "found", "expired (ttl)", "nothing known", "ttl"):
        summary_table.add_column(col, justify="left" if col == "view" else "right")
    for v in chosen:
        s = summary.views[v.name]
        summary_table.add_row(v.name, f"{s['feature_rows']:,}", f"{s['found']:,}", f"{s['expired']:,}",
                              f"{s['none']:,}", format_duration_ms(v.ttl_ms))
    err.print(summary_table)
    if label is not None:
        err.print(f"label {label_name!r}: {summary.labelled:,} of {summary.rows:,} rows have a label event within "
                  f"{label_horizon} after ts ({summary.label_events:,} events)")


@app.command("feast-export")
def feast_export(
    out: Annotated[Path, typer.Option(help="the directory of the Feast repository to write")],
    features: FeaturesFile,
    views: Annotated[str | None, typer.Option(help="comma-separated view names (default: every view)")] = None,
    data_dir: DataDir = Path(".fieldmesh"),
    lake_url: LakeUrl = None,
    store_url: StoreUrl = None,
    source: Source = "auto",
    project: Annotated[str, typer.Option(help="the Feast project name")] = "fieldmesh",
) -> None:
    """A Feast repository over our offline features: feature_store.yaml, a Parquet file per view, and
    Entity/FileSource/FeatureView definitions matching the views (then `feast apply` in it)."""
    from fieldmesh.store.feast import export_feast_repo

    try:
        chosen = _views(features, views)
        where, rows = read_rows(chosen, source=source, data_dir=data_dir, lake_url=lake_url, store_url=store_url)
        written = export_feast_repo(out, chosen, rows, project=project)
    except FieldmeshError as exc:
        _fail(exc)
        return
    for path, n in written.items():
        err.print(f"wrote {path}" + (f" ({n:,} rows)" if n is not None else ""))
    err.print(f"Feast repository in {out} (features from the {where}); next: cd {out} && feast apply")
