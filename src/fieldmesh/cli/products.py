"""``fieldmesh products``: the data-product catalog and its quality, on the hot store (docs/products.md).

``apply FILE`` stores every product of a YAML file (created or changed, the rest left as they are);
``list``, ``show NAME`` and ``quality NAME`` read; ``delete NAME`` removes a product and its counters.
Each opens the hot store's product tables (``--store-url``, or the data dir's store by default).
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

from fieldmesh.core.errors import FieldmeshError

__all__ = ["app"]

app = typer.Typer(help="Data products: declare them (YAML), list them, read their quality.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

StoreUrl = Annotated[str | None, typer.Option(
    envvar="FIELDMESH_STORE_URL", help="the hot store (default: the data dir's store)")]
DataDir = Annotated[Path, typer.Option("--data-dir", envvar="FIELDMESH_DATA_DIR", help="the data dir (for its store)")]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON")]


def _usage(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _tables(store_url: str | None, data_dir: Path) -> Any:
    from fieldmesh.store import default_store_url
    from fieldmesh.store.products import ProductTables

    url = store_url or default_store_url(data_dir)
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        _usage(f"no store at {url} (give --store-url or --data-dir of an existing store)")
    try:
        return ProductTables(url)
    except FieldmeshError as exc:
        _usage(str(exc))


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return "cli"


@app.command("apply")
def apply_(file: Path, store_url: StoreUrl = None, data_dir: DataDir = Path(".fieldmesh")) -> None:
    """Store the products of a YAML file (a list, or {products: [...]}); a bad product changes nothing."""
    from fieldmesh.stream.quality import ProductError, products_from_yaml

    try:
        products = products_from_yaml(file.read_text())
    except (OSError, ProductError) as exc:
        _usage(f"{file}: {exc}")
    tables = _tables(store_url, data_dir)
    try:
        counts = tables.apply(products, actor=_actor(), source=f"file:{file.resolve()}")
    except FieldmeshError as exc:
        _usage(str(exc))
    finally:
        tables.close()
    err.print(f"{len(products)} products: {counts['created']} created, {counts['updated']} updated, "
              f"{counts['unchanged']} unchanged")
    _apply_canaries(file, tables.url)


def _apply_canaries(file: Path, url: str) -> None:
    """The file's ``canaries:`` beside its products (docs/canary.md), created when new."""
    import yaml

    from fieldmesh.stream.canary import canaries_from_yaml

    text = file.read_text()
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or not doc.get("canaries"):
        return
    try:
        canaries = canaries_from_yaml(text)
    except FieldmeshError as exc:
        _usage(f"{file}: {exc}")
    apply_canaries(canaries, url)


def apply_canaries(canaries: list[Any], url: str) -> None:
    """Create the canaries that are new in the store at ``url`` (``fieldmesh canaries apply`` and ``products
    apply``), and say how many."""
    from fieldmesh.store.canary import CanaryTables

    try:
        tables = CanaryTables(url)
    except FieldmeshError as exc:
        _usage(str(exc))
    try:
        counts = tables.apply(canaries, actor=_actor())
    except FieldmeshError as exc:
        _usage(str(exc))
    finally:
        tables.close()
    err.print(f"{len(canaries)} canaries: {counts['created']} created, {counts['unchanged']} unchanged")


@app.command("list")
def list_(store_url: StoreUrl = None, data_dir: DataDir = Path(".fieldmesh"), as_json: AsJson = False) -> None:
    """Every product."""
    tables = _tables(store_url, data_dir)
    try:
        rows = tables.products()
    finally:
        tables.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    t = Table("name", "owner", "schema subject", "devices", "source")
    for p in rows:
        d = p["devices"]
        t.add_row(p["name"], p["owner"], p["schema_subject"] or "",
                  " ".join([*d["ids"], *d["globs"], *(f"group:{g}" for g in d["groups"])]) or "*", p["source"])
    out.print(t)


@app.command("show")
def show(name: str, store_url: StoreUrl = None, data_dir: DataDir = Path(".fieldmesh")) -> None:
    """One product, as JSON."""
    tables = _tables(store_url, data_dir)
    try:
        typer.echo(json.dumps(tables.product(name), indent=2))
    except FieldmeshError as exc:
        _usage(str(exc))
    finally:
        tables.close()


@app.command("quality")
def quality(name: str, store_url: StoreUrl = None, data_dir: DataDir = Path(".fieldmesh"),
            windows: Annotated[int, typer.Option(min=1, max=1440, help="windows to show")] = 10,
            as_json: AsJson = False) -> None:
    """A product's quality: its latest window, SLO status and recent windows; exit 1 when an SLO is broken."""
    tables = _tables(store_url, data_dir)
    try:
        q = tables.quality(name, windows=windows)
    except FieldmeshError as exc:
        _usage(str(exc))
    finally:
        tables.close()
    if as_json:
        typer.echo(json.dumps(q, indent=2))
    else:
        t = Table("objective", "value", "threshold", "status")
        for obj, s in q["slo"].items():
            status = "-" if s["ok"] is None else "[green]ok[/]" if s["ok"] else "[red]broken[/]"
            t.add_row(obj, "-" if s["value"] is None else f"{s['value']:.4g}", f"{s['objective']} {s['threshold']:g}",
                      status)
        out.print(t)
        w = Table("window start (ms)", "received", "new", "dup", "completeness", "null", "out of range", "drift psi")
        for r in q["windows"]:
            def f(v: float | None) -> str:
                return "-" if v is None else f"{v:.4g}"
            w.add_row(str(r["start_ms"]), str(r["received"]), str(r["new"]), str(r["duplicates"]),
                      f(r["completeness"]), f(r["null_rate"]), f(r["out_of_range_rate"]), f(r["drift_psi"]))
        out.print(w)
        seq = q["sequence"]
        out.print(f"sequence gaps: {seq['gaps']} of {seq['expected']}")
    if not q["slo_ok"]:
        raise typer.Exit(1)


@app.command("delete")
def delete(name: str, store_url: StoreUrl = None, data_dir: DataDir = Path(".fieldmesh")) -> None:
    """Remove a product and its quality counters."""
    tables = _tables(store_url, data_dir)
    try:
        tables.delete(name, actor=_actor())
    except FieldmeshError as exc:
        _usage(str(exc))
    finally:
        tables.close()
    err.print(f"product {name} removed")
