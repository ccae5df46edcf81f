"""``fieldmesh cdc``: the change-data-capture role (PostgreSQL pgoutput, MariaDB/MySQL binlog -> bus)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path

import typer

from fieldmesh.core.errors import FieldmeshError

__all__ = ["app", "main"]

app = typer.Typer(help="Capture committed changes of database tables into the bus (Debezium envelope).")


@app.callback(invoke_without_command=True)
def cdc(
    source: str = typer.Option(
        ...,
        "--source",
        help="postgresql://user@host:5432/db or mysql://user:pass@host:3306/db",
        envvar="FIELDMESH_CDC_SOURCE",
    ),
    tables: str = typer.Option(..., "--tables", help="comma-separated schema.table (db.table for MySQL)"),
    bus_url: str = typer.Option("nats://127.0.0.1:4222", "--bus-url", envvar="FIELDMESH_BUS_URL"),
    name: str = typer.Option(
        "fieldmesh", "--name", help="slot and publication name (PostgreSQL), offsets name, source.name"
    ),
    state_dir: Path = typer.Option(Path(".fieldmesh/cdc"), "--state-dir", help="where offsets are kept"),  # noqa: B008
    partitions: int = typer.Option(4, "--partitions", help="partitions of each table topic"),
    retention_days: float = typer.Option(
        0, "--retention-days", help="keep change events this long (0: forever; as-of state needs them)"
    ),
    snapshot: str = typer.Option(
        "initial", "--snapshot", help="initial: snapshot then stream; never: stream only"
    ),
    resnapshot: bool = typer.Option(
        False, "--resnapshot", help="drop the saved position and take a new snapshot"
    ),
    decimal_mode: str = typer.Option(
        "string", "--decimal", help="numeric/decimal as 'string' (exact) or 'float'"
    ),
    batch_size: int = typer.Option(8000, "--batch-size", help="changes per bus send"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
    lineage_store: str | None = typer.Option(
        None, "--lineage-store", envvar="FIELDMESH_STORE_URL",
        help="hot store keeping the capture's OpenLineage run events (sent to OPENLINEAGE_URL when set; "
             "docs/lineage.md)"),
) -> None:
    """Snapshot the tables, then stream every committed change to ``fm.cdc.<db>.<schema>.<table>``."""
    from fieldmesh.cdc.runner import install_signal_handlers, run_cdc

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    async def go() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        async with contextlib.AsyncExitStack() as runs:
            from fieldmesh.runtime.lineage import cdc_lineage

            lineage = cdc_lineage(source, tables, bus_url, lineage_store)
            if lineage is not None:
                runs.callback(lineage[0].close)
                await runs.enter_async_context(lineage[0].run("fieldmesh.cdc", inputs=lineage[1], outputs=lineage[2]))
            await capture(stop)

    async def capture(stop: asyncio.Event) -> None:
        await run_cdc(
            source,
            tables,
            bus_url,
            state_dir=state_dir,
            name=name,
            partitions=partitions,
            retention_s=int(retention_days * 86400),
            snapshot=snapshot,
            resnapshot=resnapshot,
            decimal_mode=decimal_mode,
            batch_size=batch_size,
            stop=stop,
        )

    try:
        asyncio.run(go())
    except FieldmeshError as exc:
        typer.echo(f"fieldmesh cdc: {exc}", err=True)
        raise typer.Exit(2) from exc


def main() -> None:
    """Entry point of ``python -m fieldmesh.cdc``."""
    app(prog_name="fieldmesh cdc")


if __name__ == "__main__":
    main()
    sys.exit(0)
