"""``fieldmesh devices``: the device registry from the command line (docs/registry.md).

Every change is written to the audit log as ``cli:<user>``. Commands that print take ``--json``.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fieldmesh.cli.common import actor, fail, opened
from fieldmesh.core.errors import FieldmeshError, RowsRejected

__all__ = ["app"]

app = typer.Typer(name="devices", no_args_is_help=True, help=(
    "The device registry: add, list, show, update, suspend, activate, retire, delete, import a CSV file "
    "(docs/registry.md)."))
err = Console(stderr=True)

DataDir = Annotated[Path, typer.Option(
    "--data-dir", envvar="FIELDMESH_DATA_DIR", help="where the embedded bus and store keep data")]
StoreUrl = Annotated[str | None, typer.Option(help="the hot store (default: the data dir's)")]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON")]
Groups = Annotated[str | None, typer.Option(help="device groups, comma-separated, e.g. plant-1,lab")]
Tags = Annotated[str | None, typer.Option(help="tags, comma-separated, e.g. fw:1.2,outdoor")]
Attrs = Annotated[list[str] | None, typer.Option(
    "--attr", help="an attribute NAME=VALUE, VALUE a string (repeatable)")]
JsonAttrs = Annotated[list[str] | None, typer.Option(
    "--attr-json", help='an attribute NAME=JSON, e.g. floor=2, gps=\'{"lat": 1.5, "lon": 2}\' (repeatable)')]
Status = Annotated[str | None, typer.Option(help="active, suspended or retired")]
DeviceId = Annotated[str, typer.Argument(metavar="ID", help="the device id")]
DEFAULT_DATA_DIR = Path(".fieldmesh")


def _fail(exc: Exception | str) -> None:
    fail(exc)


_actor = actor


def _registry(data_dir: Path, store_url: str | None) -> Any:
    """The DeviceRegistry of the store, closed after; a FieldmeshError inside is a clear message and exit 2."""
    from fieldmesh.store.registry import DeviceRegistry

    return opened(DeviceRegistry, data_dir, store_url)


def _names(value: str | None) -> list[str] | None:
    return None if value is None else [v.strip() for v in value.split(",") if v.strip()]


def _attrs(pairs: list[str] | None, json_pairs: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for flag, items in (("--attr", pairs), ("--attr-json", json_pairs)):
        for pair in items or ():
            name, sep, value = pair.partition("=")
            if not sep or not name.strip():
                _fail(f"{flag} {pair!r}: use NAME=VALUE")
            if flag == "--attr":
                out[name.strip()] = value
                continue
            try:
                out[name.strip()] = json.loads(value)
            except ValueError as exc:
                _fail(f"--attr-json {pair!r}: not JSON ({exc}); use --attr for a string")
    return out


def _when(ms: int | None) -> str:
    return "" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_devices(devices: list[Any]) -> None:
    from rich.table import Table

    t = Table("id", "status", "groups", "tags", "attributes", "updated")
    for d in devices:
        attrs = ", ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in d.attributes.items())
        t.add_row(d.id, d.status, ",".join(d.groups), ",".join(d.tags), attrs, _when(d.updated_ms))
    Console().print(t)


def _done(dev: Any, as_json: bool, what: str) -> None:
    if as_json:
        typer.echo(json.dumps(dev.as_dict()))
    else:
        err.print(f"device {dev.id} {what} ({dev.status}{', groups ' + ','.join(dev.groups) if dev.groups else ''})")


@app.command("add")
def add(
    device_id: DeviceId,
    groups: Groups = None,
    tags: Tags = None,
    attr: Attrs = None,
    attr_json: JsonAttrs = None,
    status: Annotated[str, typer.Option(help="active, suspended or retired")] = "active",
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
    as_json: AsJson = False,
) -> None:
    """Register a device."""
    with _registry(data_dir, store_url) as reg:
        dev = reg.add(device_id, groups=_names(groups) or (), tags=_names(tags) or (),
                      attributes=_attrs(attr, attr_json), status=status, actor=_actor())
    _done(dev, as_json, "registered")


@app.command("list")
def list_(
    status: Status = None,
    group: Annotated[str | None, typer.Option(help="devices of this group only")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
    as_json: AsJson = False,
    as_csv: Annotated[bool, typer.Option("--csv", help=(
        "print the import format (fieldmesh devices import); attribute values that are not strings are written "
        "as their JSON text, which an import reads back as strings"))] = False,
) -> None:
    """List registered devices by id (the API's GET /devices also shows devices seen but not registered)."""
    devices: list[Any] = []
    with _registry(data_dir, store_url) as reg:
        after = None
        while page := reg.list(status=status, group=group, after=after, limit=10_000):
            devices += page
            after = page[-1].id
    if as_json:
        typer.echo(json.dumps([d.as_dict() for d in devices]))
    elif as_csv:
        names = sorted({k for d in devices for k in d.attributes})
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["device_id", "groups", "tags", "status", *(f"attr.{n}" for n in names)])
        for d in devices:
            values = [d.attributes.get(n) for n in names]
            w.writerow([d.id, ";".join(d.groups), ";".join(d.tags), d.status,
                        *("" if v is None else v if isinstance(v, str) else json.dumps(v) for v in values)])
        typer.echo(out.getvalue(), nl=False)
    else:
        _print_devices(devices)


@app.command("show")
def show(device_id: DeviceId, data_dir: DataDir = DEFAULT_DATA_DIR, store_url: StoreUrl = None,
         as_json: AsJson = False) -> None:
    """Show a registered device and its certificates."""
    with _registry(data_dir, store_url) as reg:
        dev = reg.get(device_id)
        certs = reg.certificates(device_id) if dev is not None else []
    if dev is None:
        _fail(f"no registered device {device_id!r} (fieldmesh devices list shows them)")
        return
    if as_json:
        typer.echo(json.dumps({**dev.as_dict(), "certificates": [
            {k: v for k, v in c.as_dict().items() if k != "pem"} for c in certs]}))
        return
    from rich.table import Table

    t = Table(show_header=False, box=None)
    for k, v in (("id", dev.id), ("status", dev.status), ("groups", ",".join(dev.groups)),
                 ("tags", ",".join(dev.tags)), ("registered", _when(dev.created_ms)),
                 ("updated", _when(dev.updated_ms))):
        t.add_row(k, v)
    for k, v in dev.attributes.items():
        t.add_row(f"attr.{k}", v if isinstance(v, str) else json.dumps(v))
    Console().print(t)
    if certs:
        c = Table("serial", "subject", "valid from", "valid until", "revoked", "sha256")
        for cert in certs:
            c.add_row(cert.serial, cert.subject, _when(cert.not_before_ms), _when(cert.not_after_ms),
                      _when(cert.revoked_ms), cert.fingerprint[:16] + "...")
        Console().print(c)


@app.command("update")
def update(
    device_id: DeviceId,
    groups: Annotated[str | None, typer.Option(help="replace the groups, comma-separated ('' for none)")] = None,
    tags: Annotated[str | None, typer.Option(help="replace the tags, comma-separated ('' for none)")] = None,
    attr: Attrs = None,
    attr_json: JsonAttrs = None,
    unset_attr: Annotated[list[str] | None, typer.Option(
        "--unset-attr", help="remove an attribute (repeatable)")] = None,
    status: Status = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
    as_json: AsJson = False,
) -> None:
    """Change a registered device: groups and tags replaced, attributes set or removed one by one."""
    patch: dict[str, Any] = {**_attrs(attr, attr_json), **dict.fromkeys(unset_attr or ())}
    with _registry(data_dir, store_url) as reg:
        dev = reg.update(device_id, groups=_names(groups), tags=_names(tags), status=status,
                         attributes_patch=patch or None, actor=_actor())
    _done(dev, as_json, "updated")


def _set_status(device_id: str, status: str, data_dir: Path, store_url: str | None, as_json: bool) -> None:
    with _registry(data_dir, store_url) as reg:
        dev = reg.update(device_id, status=status, actor=_actor())
    _done(dev, as_json, "is now")


@app.command("suspend")
def suspend(device_id: DeviceId, data_dir: DataDir = DEFAULT_DATA_DIR, store_url: StoreUrl = None,
            as_json: AsJson = False) -> None:
    """Suspend a device (refused until activated again)."""
    _set_status(device_id, "suspended", data_dir, store_url, as_json)


@app.command("activate")
def activate(device_id: DeviceId, data_dir: DataDir = DEFAULT_DATA_DIR, store_url: StoreUrl = None,
             as_json: AsJson = False) -> None:
    """Activate a suspended or retired device."""
    _set_status(device_id, "active", data_dir, store_url, as_json)


@app.command("retire")
def retire(device_id: DeviceId, data_dir: DataDir = DEFAULT_DATA_DIR, store_url: StoreUrl = None,
           as_json: AsJson = False) -> None:
    """Retire a device: out of service for good, kept in the registry for its history."""
    _set_status(device_id, "retired", data_dir, store_url, as_json)


@app.command("delete")
def delete(
    device_id: DeviceId,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask")] = False,
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
) -> None:
    """Remove a device from the registry and revoke its certificates (the audit log keeps what it was)."""
    if not yes and not typer.confirm(f"remove {device_id} from the registry and revoke its certificates?"):
        raise typer.Exit(1)
    with _registry(data_dir, store_url) as reg:
        dev = reg.delete(device_id, actor=_actor())
    err.print(f"device {dev.id} removed from the registry")


@app.command("import")
def import_(
    file: Annotated[str, typer.Argument(metavar="FILE.csv", help="the CSV file ('-': standard input)")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
    as_json: AsJson = False,
) -> None:
    """Register devices, or change registered ones, from a CSV file: all rows or none.

    Header: device_id,groups,tags,status,attr.<name>... (groups and tags separated by ';').
    """
    try:
        text = sys.stdin.read() if file == "-" else Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {file}: {exc}")
        return
    from fieldmesh.store import default_store_url
    from fieldmesh.store.registry import DeviceRegistry

    try:
        reg = DeviceRegistry(store_url or default_store_url(data_dir))
    except FieldmeshError as exc:
        _fail(exc)
        return
    try:
        counts = reg.import_csv(text, actor=_actor())
    except RowsRejected as exc:
        if as_json:
            typer.echo(json.dumps({"imported": False, "errors": [{"line": n, "message": m} for n, m in exc.errors]}))
        for n, m in exc.errors:
            err.print(f"{file}:{n}: {m}", markup=False, highlight=False)
        err.print(f"[bold red]error:[/] {len(exc.errors)} bad row(s): nothing imported")
        raise typer.Exit(2) from None
    except FieldmeshError as exc:
        _fail(exc)
        return
    finally:
        reg.close()
    if as_json:
        typer.echo(json.dumps({"imported": True, **counts}))
    else:
        err.print(f"imported {file}: {counts['added']} added, {counts['updated']} updated, "
                  f"{counts['unchanged']} unchanged")
