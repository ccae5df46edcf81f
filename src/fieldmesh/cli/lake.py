"""``fieldmesh lake``: what a standard Iceberg client needs (``info``), and maintenance (``compact``, ``expire``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fieldmesh.core.errors import FieldmeshError

__all__ = ["app"]

app = typer.Typer(name="lake", no_args_is_help=True,
                  help="The lake: Iceberg tables of readings, rollups and dead letters (docs/lake.md).")
err = Console(stderr=True)

DataDir = Annotated[Path, typer.Option("--data-dir", envvar="FIELDMESH_DATA_DIR", help="the data dir of 'up'")]
LakeUrl = Annotated[str | None, typer.Option(help="Iceberg catalog URL (default: the data dir's) "
                                             "[env FIELDMESH__LAKE__URL]")]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON on stdout")]


def _settings(lake_url: str | None) -> Any:
    from fieldmesh.core.settings import load_settings

    return load_settings(**({"lake": {"url": lake_url}} if lake_url else {})).lake


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


def _out(data: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        Console().print_json(json.dumps(data, default=str))


@app.command("info")
def info(data_dir: DataDir = Path(".fieldmesh"), lake_url: LakeUrl = None, as_json: AsJson = False,
         show_secrets: Annotated[bool, typer.Option(help="print secret catalog properties unmasked")] = False,
         ) -> None:
    """Catalog properties (what pyiceberg's load_catalog takes), the tables, and what each has committed."""
    from fieldmesh.store.lake import lake_info

    try:
        _out(lake_info(_settings(lake_url), data_dir, show_secrets=show_secrets), as_json)
    except FieldmeshError as exc:
        _fail(exc)


@app.command("compact")
def compact(data_dir: DataDir = Path(".fieldmesh"), lake_url: LakeUrl = None, as_json: AsJson = False,
            target_file_mb: Annotated[int | None, typer.Option(min=1, help="target file size (default 128)")] = None,
            ) -> None:
    """Rewrite each partition's small files into large ones (safe while 'up' writes)."""
    from fieldmesh.store.lake import compact as run
    from fieldmesh.store.lake import open_catalog

    s = _settings(lake_url)
    try:
        out = run(open_catalog(s, data_dir), s.namespace, target_file_mb=target_file_mb or s.target_file_mb)
    except FieldmeshError as exc:
        _fail(exc)
        return
    _out(out, as_json)


@app.command("expire")
def expire(data_dir: DataDir = Path(".fieldmesh"), lake_url: LakeUrl = None, as_json: AsJson = False,
           older_than_s: Annotated[float | None, typer.Option(
               min=0, help="expire snapshots older than this (default FIELDMESH__LAKE__SNAPSHOT_MAX_AGE_S, an hour)")
           ] = None,
           keep_last: Annotated[int, typer.Option(min=1, help="always keep this many latest snapshots")] = 10,
           ) -> None:
    """Drop old snapshots (time travel before them ends; files only they used can then be deleted)."""
    from fieldmesh.store.lake import expire as run
    from fieldmesh.store.lake import open_catalog

    s = _settings(lake_url)
    try:
        out = run(open_catalog(s, data_dir), s.namespace, keep_last=keep_last,
                  older_than_s=s.snapshot_max_age_s if older_than_s is None else older_than_s)
    except FieldmeshError as exc:
        _fail(exc)
        return
    _out(out, as_json)
