"""``fieldmesh edge``: run the edge agent."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from fieldmesh.core.errors import FieldmeshError

__all__ = ["app", "run_agent"]

app = typer.Typer(
    help="The edge agent: read, clean, infer and buffer next to the devices.", no_args_is_help=True
)


async def run_agent(config: Path, duration_s: float | None, drain_s: float) -> dict[str, object]:
    """Load the config, run the agent until SIGINT/SIGTERM or ``duration_s``, return its stats."""
    from fieldmesh.edge.agent import EdgeAgent
    from fieldmesh.edge.config import load_config

    cfg = load_config(config)
    agent = EdgeAgent(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, agent.stop)
    return await agent.run(duration_s=duration_s, drain_s=drain_s)


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="edge.yaml")] = Path("edge.yaml"),
    duration: Annotated[float | None, typer.Option("--for", help="stop after this many seconds")] = None,
    drain: Annotated[float, typer.Option("--drain", help="seconds to drain the buffer on stop")] = 5.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the agent (Ctrl-C stops it cleanly; the buffer keeps what was not delivered)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        stats = asyncio.run(run_agent(config, duration, drain))
    except FieldmeshError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(stats, indent=2))


@app.command()
def check(config: Annotated[Path, typer.Option("--config", "-c")] = Path("edge.yaml")) -> None:
    """Validate a config file (errors name the key to fix)."""
    from fieldmesh.edge.config import load_config

    try:
        load_config(config)
    except FieldmeshError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{config}: ok")


def main() -> None:
    """Entry point of ``python -m fieldmesh.edge``."""
    app()
