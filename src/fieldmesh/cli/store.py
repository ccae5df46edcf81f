"""``fieldmesh store``: the hot store's tiers (``prune``: retention, docs/lake.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fieldmesh.core.errors import FieldmeshError

__all__ = ["app"]

app = typer.Typer(name="store", no_args_is_help=True, help="The hot store: retention of its tiers (docs/lake.md).")
err = Console(stderr=True)

Days = Annotated[float | None, typer.Option(min=0, show_default=False)]


@app.command("prune")
def prune(
    data_dir: Annotated[Path, typer.Option("--data-dir", envvar="FIELDMESH_DATA_DIR", help="the data dir of 'up'")]
    = Path(".fieldmesh"),
    store_url: Annotated[str | None, typer.Option(help="the hot store (default: the data dir's)")] = None,
    lake_url: Annotated[str | None, typer.Option(
        help="Iceberg catalog URL (default: the data dir's) [env FIELDMESH__LAKE__URL]")] = None,
    raw_days: Days = None,
    rollup_1m_days: Days = None,
    rollup_1h_days: Days = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print what would be deleted, delete nothing")] = False,
    no_lake: Annotated[bool, typer.Option(
        "--no-lake", help="there is no lake: with --without-lake, delete old rows unverified")] = False,
    without_lake: Annotated[bool, typer.Option(
        "--without-lake", help="allow deleting the only copy when the lake is off (the rows are lost)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Delete hot rows older than each tier's retention that the lake holds (defaults: raw 7 days, 1m rollups
    90 days, 1h forever; FIELDMESH__RETENTION__*). Rows the lake lacks stay and are counted as held."""
    from fieldmesh.core.settings import load_settings
    from fieldmesh.store import default_store_url, load_store
    from fieldmesh.store.tiers import LakeCopy
    from fieldmesh.store.tiers import prune as run

    days = {k: v for k, v in (("raw_days", raw_days), ("rollup_1m_days", rollup_1m_days),
                              ("rollup_1h_days", rollup_1h_days)) if v is not None}
    try:
        settings = load_settings(retention={**days, **({"without_lake": True} if without_lake else {})},
                                 **({"lake": {"url": lake_url}} if lake_url else {}))
        lake = None
        if not no_lake and settings.lake.enabled:
            from fieldmesh.store.lake import open_catalog

            lake = LakeCopy(open_catalog(settings.lake, data_dir), settings.lake.namespace)
        store = load_store(store_url or default_store_url(data_dir))
        try:
            reports = run(store, settings=settings.retention, lake=lake, dry_run=dry_run)
        finally:
            store.close()
    except FieldmeshError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    out: list[dict[str, Any]] = [r.as_dict() for r in reports]
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    verb = "would delete" if dry_run else "deleted"
    for r in reports:
        typer.echo(f"{r.tier}: before {r.as_dict()['cut']}: {r.candidates} rows older, {verb} {r.deleted}, "
                   f"held {r.held} (not in the lake yet)")
    if not reports:
        typer.echo("nothing to prune: every tier is kept forever")
