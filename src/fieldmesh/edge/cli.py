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


async def run_agent(config: Path, duration_s: float | None, drain_s: float, *, metrics_port: int | None = None,
                    metrics_host: str = "127.0.0.1") -> dict[str, object]:
    """Load the config, run the agent until SIGINT/SIGTERM or ``duration_s``, return its stats.

    ``metrics_port``: serve the agent's metrics (buffer depth, egress bytes; :class:`fieldmesh.obs.metrics.
    EdgeCollector`) on ``http://metrics_host:metrics_port/metrics`` while it runs."""
    from fieldmesh.edge.agent import EdgeAgent
    from fieldmesh.edge.config import load_config

    cfg = load_config(config)
    agent = EdgeAgent(cfg)
    if metrics_port is not None:
        from fieldmesh.obs.metrics import serve_edge_metrics

        server = serve_edge_metrics(agent.stats, port=metrics_port, host=metrics_host)
        logging.getLogger("fieldmesh.edge").info("metrics on http://%s:%d/metrics", metrics_host,
                                                 server.server_port)
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
    metrics_port: Annotated[int | None, typer.Option(
        "--metrics-port", min=0, max=65535, help="serve Prometheus metrics (buffer depth, egress bytes) on this port")
    ] = None,
    metrics_host: Annotated[str, typer.Option("--metrics-host", help="address of --metrics-port")] = "127.0.0.1",
    log_json: Annotated[
        bool, typer.Option("--log-json", help="log lines as JSON with trace ids (env FIELDMESH_LOG_JSON=1)")
    ] = False,
) -> None:
    """Run the agent (Ctrl-C stops it cleanly; the buffer keeps what was not delivered).

    Traces go to the OTLP endpoint of ``OTEL_EXPORTER_OTLP_ENDPOINT`` when it is set (docs/observability.md).
    """
    from fieldmesh.obs import logs, tracing

    logs.setup_logging(
        "edge",
        level=logging.DEBUG if verbose else logging.INFO,
        fmt="%(asctime)s %(levelname)s %(name)s: %(message)s",
        json_lines=True if log_json else None,
    )
    tracing.setup("fieldmesh-edge")
    try:
        stats = asyncio.run(run_agent(config, duration, drain, metrics_port=metrics_port, metrics_host=metrics_host))
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


@app.command()
def provision(
    url: Annotated[str, typer.Option("--url", help="the fieldmesh API, e.g. https://fieldmesh.example:8000")],
    device_id: Annotated[str, typer.Option("--device-id", help="this device's id (the certificate's CN)")],
    out: Annotated[Path, typer.Option("--out", help="directory for device.key, device.pem, chain.pem (0600)")],
    token: Annotated[str | None, typer.Option("--token", envvar="FIELDMESH_ENROLLMENT_TOKEN",
                                              help="a one-time enrollment token (fieldmesh ca token)")] = None,
    claim_cert: Annotated[Path | None, typer.Option("--claim-cert", help="a claim certificate (PEM)")] = None,
    claim_key: Annotated[Path | None, typer.Option("--claim-key", help="the claim certificate's key")] = None,
    rotate: Annotated[bool, typer.Option("--rotate", help="renew with the current device.pem/device.key in --out")]
    = False,
    if_due: Annotated[bool, typer.Option("--if-due", help="with --rotate: only past 2/3 of the validity")] = False,
    key_type: Annotated[str, typer.Option("--key-type", help="ec-p256, ec-p384, rsa-2048, ed25519")] = "ec-p256",
    ca_file: Annotated[Path | None, typer.Option("--ca-file", help="CA bundle to verify an https API")] = None,
) -> None:
    """Get this device's certificate from the API (token, claim certificate, or rotation)."""
    from fieldmesh.edge.provision import CERT_FILE, due_for_rotation
    from fieldmesh.edge.provision import provision as run_provision

    try:
        if rotate and if_due and not due_for_rotation((out / CERT_FILE).read_bytes()):
            typer.echo(f"{out / CERT_FILE}: not due for rotation yet")
            return
        done = run_provision(url, device_id=device_id, out_dir=out, token=token, claim_cert=claim_cert,
                             claim_key=claim_key, rotate=rotate, key_type=key_type, ca_file=ca_file)
    except (FieldmeshError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps({"certificate": str(done.certificate), "key": str(done.key), "chain": str(done.chain),
                           "serial": done.serial, "not_after": done.not_after_ms}))


def main() -> None:
    """Entry point of ``python -m fieldmesh.edge``."""
    app()
