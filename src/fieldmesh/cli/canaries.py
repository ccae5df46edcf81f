"""``fieldmesh canaries``: canary routing on the hot store (docs/canary.md).

``apply FILE`` declares the canaries of a YAML file (a list, or ``{canaries: [...]}``, possibly beside
``products:``); ``list``, ``show NAME``, ``readings NAME`` and ``compare NAME`` read; ``promote NAME``,
``abort NAME`` and ``delete NAME`` change (audited). Each opens the hot store (``--store-url``, or the data
dir's store by default).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from fieldmesh.cli.products import AsJson, DataDir, StoreUrl, _actor, _usage, apply_canaries, err, out
from fieldmesh.core.errors import FieldmeshError

__all__ = ["app"]

app = typer.Typer(help="Canaries: a share of a product's devices routed apart, compared, promoted or aborted.",
                  no_args_is_help=True)


def _url(store_url: str | None, data_dir: Path) -> str:
    from fieldmesh.store import default_store_url

    url = store_url or default_store_url(data_dir)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        _usage(f"no store at {url} (give --store-url or --data-dir of an existing store)")
    return url


def _tables(url: str) -> Any:
    from fieldmesh.store.canary import CanaryTables

    try:
        return CanaryTables(url)
    except FieldmeshError as exc:
        _usage(str(exc))


@app.command("apply")
def apply_(file: Path, store_url: StoreUrl = None, data_dir: DataDir = Path(".fieldmesh")) -> None:
    """Declare the canaries of a YAML file; those declared already are left as they are."""
    from fieldmesh.stream.canary import CanaryError, canaries_from_yaml

    try:
        canaries = canaries_from_yaml(file.read_text())
    except (OSError, CanaryError) as exc:
        _usage(f"{file}: {exc}")
    apply_canaries(canaries, _url(store_url, data_dir))


@app.command("list")
def list_(store_url: StoreUrl = None, data_dir: DataDir = Path(".fieldmesh"), as_json: AsJson = False) -> None:
    """Every canary."""
    tables = _tables(_url(store_url, data_dir))
    try:
        rows = tables.canaries()
    finally:
        tables.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    t = Table("name", "product", "state", "share %", "meta", "readings held", "merged")
    for c in rows:
        t.add_row(c["name"], c["product"], c["state"], f"{c['share_percent']:g}",
                  " ".join(f"{k}={v}" for k, v in c["meta"].items()), str(c["readings"]), str(c["merged"]))
    out.print(t)


@app.command("show")
def show(name: str, store_url: StoreUrl = None, data_dir: DataDir = Path(".fieldmesh")) -> None:
    """One canary, as JSON."""
    _run(store_url, data_dir, lambda t: t.canary(name))


@app.command("readings")
def readings(name: str, store_url: StoreUrl = None, data_dir: DataDir = Path(".fieldmesh"),
             limit: Annotated[int, typer.Option(min=1, max=100_000)] = 100) -> None:
    """The readings a canary holds, newest first, as JSON."""
    _run(store_url, data_dir, lambda t: t.readings(name, limit=limit))


@app.command("compare")
def compare(name: str, store_url: StoreUrl = None, data_dir: DataDir = Path(".fieldmesh"),
            windows: Annotated[int, typer.Option(min=1, max=1440, help="windows to compare")] = 60,
            as_json: AsJson = False) -> None:
    """The canary against its baseline; exit 0 on `promote`, 1 on `hold`, 3 on `no_data`."""
    tables = _tables(_url(store_url, data_dir))
    try:
        c = tables.compare(name, windows=windows)
    except FieldmeshError as exc:
        _usage(str(exc))
    finally:
        tables.close()
    if as_json:
        typer.echo(json.dumps(c, indent=2))
    else:
        t = Table("side", "received", "stored", "duplicates", "dead letters", "dlq rate", "latency s")
        for side in ("canary", "baseline"):
            s = c["counts"][side]
            t.add_row(side, str(s["received"]), str(s["stored"]), str(s["duplicates"]), str(s["dead_letters"]),
                      "-" if s["dlq_rate"] is None else f"{s['dlq_rate']:.4g}",
                      "-" if s["latency_s"] is None else f"{s['latency_s']:.3f}")
        out.print(t)
        out.print(f"verdict: {c['verdict']}")
        for r in c["reasons"]:
            out.print(f"  - {r}")
    if c["verdict"] != "promote":
        raise typer.Exit(1 if c["verdict"] == "hold" else 3)


@app.command("promote")
def promote_(name: str, store_url: StoreUrl = None, data_dir: DataDir = Path(".fieldmesh"),
             merge: Annotated[bool, typer.Option(help="merge its readings into the main tables")] = True) -> None:
    """Promote an active canary: its readings join the main tables, its traffic takes the main path."""
    from fieldmesh.store import load_store
    from fieldmesh.store.canary import promote

    url = _url(store_url, data_dir)
    _tables(url).close()  # the canary tables exist (an unknown name is then a clear "no canary")
    store = load_store(url)
    try:
        done = promote(store, name, actor=_actor(), merge=merge)
    except FieldmeshError as exc:
        _usage(str(exc))
    finally:
        store.close()
    err.print(f"canary {name} promoted: {done['merged']} readings merged into the main tables")


@app.command("abort")
def abort(name: str, store_url: StoreUrl = None, data_dir: DataDir = Path(".fieldmesh")) -> None:
    """Abort an active canary: its traffic takes the main path, its readings stay apart."""
    _run(store_url, data_dir, lambda t: t.abort(name, actor=_actor()))


@app.command("delete")
def delete(name: str, store_url: StoreUrl = None, data_dir: DataDir = Path(".fieldmesh")) -> None:
    """Remove a promoted or aborted canary with the readings it still holds."""
    _run(store_url, data_dir, lambda t: t.delete(name, actor=_actor()))


def _run(store_url: str | None, data_dir: Path, fn: Any) -> None:
    tables = _tables(_url(store_url, data_dir))
    try:
        typer.echo(json.dumps(fn(tables), indent=2))
    except FieldmeshError as exc:
        _usage(str(exc))
    finally:
        tables.close()
