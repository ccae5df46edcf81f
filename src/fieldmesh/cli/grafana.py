"""``fieldmesh grafana export``: the shipped Grafana dashboards and Prometheus rules, as files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["app"]

app = typer.Typer(name="grafana", no_args_is_help=True,
                  help="Grafana dashboards and Prometheus rules for fieldmesh's metrics (docs/observability.md).")
err = Console(stderr=True)


@app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", help="directory to write the dashboards (*.json) and the "
                                      "Prometheus rules (fieldmesh-rules.yaml) to")],
) -> None:
    """Write the dashboards (pipeline health, fleet freshness, DLQ, edge) and the rules file to --out."""
    from fieldmesh.obs.dashboards import export as write_all

    written = write_all(out)
    for path in written:
        typer.echo(str(path))
    err.print(f"{len(written)} files written to {out}: import the *.json in Grafana (Dashboards > Import; "
              "data source: your Prometheus), add fieldmesh-rules.yaml to Prometheus's rule_files")
