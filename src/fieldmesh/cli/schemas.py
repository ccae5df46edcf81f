"""``fieldmesh schemas``: check a schema file against a registry subject (exit 0 compatible, 1 not, 2 usage),
and small helpers to register, list and show schemas (docs/schemas.md).

It talks to a registry over HTTP (``--url``: ours at ``http://HOST:PORT/api/v1/registry`` or any
Confluent-compatible one) or opens the hot store's registry tables directly (``--store-url``, or the
data dir's store by default).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from fieldmesh.core.errors import FieldmeshError

__all__ = ["app"]

app = typer.Typer(help="Schema registry: check a schema's compatibility (CI), register, list, show.",
                  no_args_is_help=True)
err = Console(stderr=True)
_SUFFIX_TYPES = {".avsc": "AVRO", ".avro": "AVRO", ".json": "JSON", ".proto": "PROTOBUF"}

Url = Annotated[str | None, typer.Option(
    envvar="FIELDMESH_REGISTRY_URL",
    help="a registry over HTTP, e.g. http://127.0.0.1:8000/api/v1/registry (or a Confluent-compatible one)")]
StoreUrl = Annotated[str | None, typer.Option(
    help="open the hot store's registry directly (default, without --url: the data dir's store)")]
DataDir = Annotated[Path, typer.Option("--data-dir", envvar="FIELDMESH_DATA_DIR", help="the data dir (for its store)")]
ApiKey = Annotated[str | None, typer.Option(
    envvar="FIELDMESH_API_KEY", help="an API key (fmk_...) for --url (sent as Authorization: Bearer)")]
Basic = Annotated[str | None, typer.Option(
    envvar="FIELDMESH_REGISTRY_BASIC_AUTH", help="USER:PASSWORD for --url as HTTP Basic (Confluent-style)")]
Subject = Annotated[str, typer.Option("--subject", "-s", help="the subject, e.g. <topic>-value")]
SchemaType = Annotated[str | None, typer.Option(
    "--type", help="AVRO, JSON or PROTOBUF (default: by the file's suffix .avsc/.json/.proto, else AVRO)")]
Refs = Annotated[list[str] | None, typer.Option(
    "--reference", help="a reference NAME=SUBJECT:VERSION (repeatable), e.g. geo.Point=point:1")]


def _usage(message: str) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(2)


def _read(file: Path, schema_type: str | None, refs: list[str] | None) -> tuple[str, str, list[dict[str, Any]]]:
    try:
        text = file.read_text()
    except OSError as exc:
        _usage(f"cannot read {file}: {exc}")
    kind = (schema_type or _SUFFIX_TYPES.get(file.suffix.lower(), "AVRO")).upper()
    if kind not in ("AVRO", "JSON", "PROTOBUF"):
        _usage(f"--type {schema_type!r}: use AVRO, JSON or PROTOBUF")
    references = []
    for spec in refs or []:
        name, _, rest = spec.partition("=")
        subject, _, version = rest.rpartition(":")
        if not name or not subject or not (version.isdigit() or version == "-1"):
            _usage(f"--reference {spec!r}: use NAME=SUBJECT:VERSION")
        references.append({"name": name, "subject": subject, "version": int(version)})
    return text, kind, references


class _Http:
    def __init__(self, url: str, api_key: str | None, basic: str | None) -> None:
        import httpx

        headers = {"Accept": "application/vnd.schemaregistry.v1+json, application/json"}
        auth = None
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        elif basic:
            user, sep, password = basic.partition(":")
            if not sep:
                _usage("--basic must be USER:PASSWORD")
            auth = httpx.BasicAuth(user, password)
        self.http = httpx.Client(base_url=url.rstrip("/") + "/", headers=headers, auth=auth, timeout=30)
        self.url = url

    def call(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> tuple[int, Any]:
        import httpx

        try:
            r = self.http.request(method, path, json=body, params=params)
        except httpx.HTTPError as exc:
            _usage(f"cannot reach the registry at {self.url}: {exc}")
        try:
            doc = r.json()
        except ValueError:
            doc = {"message": r.text[:300]}
        if r.status_code in (401, 403):
            _usage(f"the registry refused the credentials ({r.status_code}): "
                   f"{doc.get('message') if isinstance(doc, dict) else doc}")
        return r.status_code, doc


def _local(store_url: str | None, data_dir: Path, *, create: bool = False) -> Any:
    from fieldmesh.schema.registry import SchemaRegistry
    from fieldmesh.store import default_store_url
    from fieldmesh.store.schemas import SchemaStore

    url = store_url or default_store_url(data_dir)
    if not create and url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        # a mistyped path must not become an empty registry that finds everything compatible
        _usage(f"no store at {url} (give --store-url or --data-dir of an existing store, or --url)")
    try:
        return SchemaRegistry(SchemaStore(url))
    except FieldmeshError as exc:
        _usage(str(exc))


@app.command()
def check(
    file: Annotated[Path, typer.Argument(help="the schema file (.avsc, .json, .proto)")],
    subject: Subject,
    schema_type: SchemaType = None,
    version: Annotated[str, typer.Option(
        help="check against this version: latest, a number, or 'all' (every version the level looks at)")] = "all",
    reference: Refs = None,
    url: Url = None,
    store_url: StoreUrl = None,
    data_dir: DataDir = Path(".fieldmesh"),
    api_key: ApiKey = None,
    basic: Basic = None,
    as_json: Annotated[bool, typer.Option("--json", help="print {compatible, reasons} as JSON")] = False,
) -> None:
    """Is FILE compatible with SUBJECT under its compatibility level? Exit 0 yes, 1 no (reasons
    printed; an invalid schema is a no), 2 on a usage or configuration error."""
    if url and store_url:
        _usage("give --url or --store-url, not both")
    text, kind, refs = _read(file, schema_type, reference)
    body: dict[str, Any] = {"schema": text, "schemaType": kind, **({"references": refs} if refs else {})}
    if version != "all" and version != "latest" and not version.isdigit():
        _usage(f"--version {version!r}: use latest, a number or all")
    reasons: list[str]
    if url:
        h = _Http(url, api_key, basic)
        path = f"compatibility/subjects/{subject}/versions" + ("" if version == "all" else f"/{version}")
        status, doc = h.call("POST", path, body, params={"verbose": "true"})
        if status == 200:
            reasons = [] if doc.get("is_compatible") else (doc.get("messages") or ["not compatible"])
        elif status == 404 and isinstance(doc, dict) and doc.get("error_code") == 40401:
            reasons = []  # no version yet: anything is compatible
        elif status == 422 and isinstance(doc, dict) and doc.get("error_code") == 42201:
            reasons = [f"invalid schema: {doc.get('message')}"]
        else:
            _usage(f"the registry answered {status}: {doc}")
    else:
        from fieldmesh.schema.base import InvalidSchema, RegistryError, SubjectNotFound

        reg = _local(store_url, data_dir)
        try:
            reasons = reg.check(subject, text, version=None if version == "all" else version, schema_type=kind,
                                references=refs or None)
        except InvalidSchema as exc:
            reasons = [f"invalid schema: {exc.message}"]
        except SubjectNotFound:
            reasons = []
        except (RegistryError, FieldmeshError) as exc:
            _usage(str(exc))
        finally:
            reg.close()
    if as_json:
        typer.echo(json.dumps({"compatible": not reasons, "subject": subject, "reasons": reasons}))
    elif reasons:
        err.print(f"[bold red]incompatible[/] with {subject}:")
        for r in reasons:
            err.print(f"  - {r}")
    else:
        err.print(f"[green]compatible[/] with {subject}")
    raise typer.Exit(1 if reasons else 0)


@app.command()
def register(
    file: Annotated[Path, typer.Argument(help="the schema file (.avsc, .json, .proto)")],
    subject: Subject,
    schema_type: SchemaType = None,
    reference: Refs = None,
    url: Url = None,
    store_url: StoreUrl = None,
    data_dir: DataDir = Path(".fieldmesh"),
    api_key: ApiKey = None,
    basic: Basic = None,
) -> None:
    """Register FILE under SUBJECT; print its id and version (exit 1 when refused as incompatible or invalid)."""
    text, kind, refs = _read(file, schema_type, reference)
    if url:
        status, doc = _Http(url, api_key, basic).call(
            "POST", f"subjects/{subject}/versions", {"schema": text, "schemaType": kind, "references": refs})
        if status != 200:
            err.print(f"[bold red]refused[/] ({status}): {doc.get('message') if isinstance(doc, dict) else doc}")
            raise typer.Exit(1 if status in (409, 422) else 2)
        typer.echo(json.dumps({"id": doc.get("id"), "version": doc.get("version"), "subject": subject}))
        return
    from fieldmesh.schema.base import IncompatibleSchema, InvalidSchema, RegistryError

    reg = _local(store_url, data_dir, create=True)
    try:
        v = reg.register(subject, text, schema_type=kind, references=refs or None, actor=_actor())
    except (IncompatibleSchema, InvalidSchema) as exc:
        err.print(f"[bold red]refused:[/] {exc.message}")
        raise typer.Exit(1) from None
    except (RegistryError, FieldmeshError) as exc:
        _usage(str(exc))
    finally:
        reg.close()
    typer.echo(json.dumps({"id": v.schema_id, "version": v.version, "subject": subject}))


@app.command("list")
def list_(
    subject: Annotated[str | None, typer.Option("--subject", "-s", help="list this subject's versions")] = None,
    deleted: Annotated[bool, typer.Option(help="include soft-deleted ones")] = False,
    url: Url = None,
    store_url: StoreUrl = None,
    data_dir: DataDir = Path(".fieldmesh"),
    api_key: ApiKey = None,
    basic: Basic = None,
) -> None:
    """List subjects (or one subject's versions) as JSON."""
    if url:
        path = "subjects" if subject is None else f"subjects/{subject}/versions"
        status, doc = _Http(url, api_key, basic).call("GET", path, params={"deleted": str(deleted).lower()})
        if status != 200:
            _usage(f"the registry answered {status}: {doc}")
        typer.echo(json.dumps(doc))
        return
    from fieldmesh.schema.base import RegistryError

    reg = _local(store_url, data_dir)
    try:
        out: Any = reg.subjects(deleted=deleted) if subject is None else reg.versions(subject, deleted=deleted)
    except (RegistryError, FieldmeshError) as exc:
        _usage(str(exc))
    finally:
        reg.close()
    typer.echo(json.dumps(out))


@app.command()
def show(
    subject: Annotated[str | None, typer.Option("--subject", "-s", help="the subject")] = None,
    version: Annotated[str, typer.Option(help="its version: latest or a number")] = "latest",
    schema_id: Annotated[int | None, typer.Option("--id", help="a schema id instead of a subject")] = None,
    url: Url = None,
    store_url: StoreUrl = None,
    data_dir: DataDir = Path(".fieldmesh"),
    api_key: ApiKey = None,
    basic: Basic = None,
) -> None:
    """Print a version of a subject (or a schema by id) as JSON."""
    if (subject is None) == (schema_id is None):
        _usage("give --subject or --id")
    if url:
        path = f"schemas/ids/{schema_id}" if schema_id is not None else f"subjects/{subject}/versions/{version}"
        status, doc = _Http(url, api_key, basic).call("GET", path)
        if status != 200:
            _usage(f"the registry answered {status}: {doc}")
        typer.echo(json.dumps(doc))
        return
    from fieldmesh.schema.base import RegistryError

    reg = _local(store_url, data_dir)
    try:
        if schema_id is not None:
            s = reg.schema(schema_id)
            out: dict[str, Any] = {"id": s.schema_id, "schemaType": s.schema_type, "schema": s.schema,
                                   "references": [r.as_dict() for r in s.references]}
        else:
            out = reg.version(subject or "", version).as_dict()
    except (RegistryError, FieldmeshError) as exc:
        _usage(str(exc))
    finally:
        reg.close()
    typer.echo(json.dumps(out))


def _actor() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return f"cli:uid{os.getuid()}"
