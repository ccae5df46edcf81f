"""``fieldmesh twins``: device twins from the command line (docs/twins.md).

Works on the hot store directly, like ``fieldmesh devices``; a desired change is audited as
``cli:<user>`` and reaches the device through the twin service of ``fieldmesh up``.
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fieldmesh.core.errors import ConflictError, FieldmeshError

__all__ = ["app"]

app = typer.Typer(name="twins", no_args_is_help=True, help=(
    "Device twins: show a twin or its delta, change its desired state, run the twin service (docs/twins.md)."))
err = Console(stderr=True)
out = Console()

DataDir = Annotated[Path, typer.Option(
    "--data-dir", envvar="FIELDMESH_DATA_DIR", help="where the embedded bus and store keep data")]
StoreUrl = Annotated[str | None, typer.Option(help="the hot store (default: the data dir's)")]
DeviceId = Annotated[str, typer.Argument(metavar="ID", help="the device id")]
DEFAULT_DATA_DIR = Path(".fieldmesh")


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return f"cli:uid{os.getuid()}"


@contextmanager
def _store(data_dir: Path, store_url: str | None) -> Iterator[Any]:
    from fieldmesh.store import default_store_url
    from fieldmesh.store.twins import TwinStore

    try:
        store = TwinStore(store_url or default_store_url(data_dir))
    except FieldmeshError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    try:
        yield store
    except ConflictError as exc:
        err.print(f"[bold red]conflict:[/] {exc}")
        raise typer.Exit(3) from None
    except FieldmeshError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    finally:
        store.close()


def _print(doc: dict[str, Any]) -> None:
    out.print_json(json.dumps(doc))


@app.command("get")
def get(device_id: DeviceId, data_dir: DataDir = DEFAULT_DATA_DIR, store_url: StoreUrl = None) -> None:
    """Print a device's twin (JSON): desired, reported, delta, metadata, version."""
    with _store(data_dir, store_url) as s:
        _print(s.get(device_id).as_dict())


@app.command("delta")
def delta(device_id: DeviceId, data_dir: DataDir = DEFAULT_DATA_DIR, store_url: StoreUrl = None) -> None:
    """Print what the device's desired state asks that its reported state does not have."""
    with _store(data_dir, store_url) as s:
        _print(s.get(device_id).delta_doc())


@app.command("set-desired")
def set_desired(
    device_id: DeviceId,
    patch: Annotated[str, typer.Argument(metavar="PATCH", help=(
        'a JSON merge patch of the desired state, e.g. \'{"mode": "window", "window_ms": 10000}\'; null removes'))],
    version: Annotated[int | None, typer.Option(help="refuse (exit 3) unless the twin is at this version")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
) -> None:
    """Change a device's desired state (merged; exit 3 when --version is stale)."""
    try:
        doc = json.loads(patch)
    except ValueError as exc:
        err.print(f"[bold red]error:[/] PATCH is not JSON: {exc}")
        raise typer.Exit(2) from None
    with _store(data_dir, store_url) as s:
        twin = s.update_desired(device_id, doc, actor=_actor(), expect_version=version)
        _print(twin.as_dict())


@app.command("serve")
def serve(
    mqtt_url: Annotated[str, typer.Option(help=(
        "the MQTT broker devices use (mqtt://host:port, mqtts://host:port?ca=PATH)"))] = "mqtt://127.0.0.1:1883",
    mqtt_auth_file: Annotated[str | None, typer.Option(help='JSON {"user", "password"} for the broker')] = None,
    client_id: Annotated[str, typer.Option(help="stable, so the broker keeps the session")] = "fm-twins",
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
) -> None:
    """Run the twin service against an MQTT broker (what 'fieldmesh up' runs beside its own door)."""
    import asyncio
    import logging

    from fieldmesh.runtime.twins import run_twins
    from fieldmesh.store import default_store_url

    logging.basicConfig(level=logging.INFO, format="%(asctime)s twins %(levelname)s %(message)s")
    try:
        asyncio.run(run_twins(store_url=store_url or default_store_url(data_dir), mqtt_url=mqtt_url,
                              mqtt_auth_file=mqtt_auth_file, client_id=client_id))
    except FieldmeshError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        pass
