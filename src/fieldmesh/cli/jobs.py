"""``fieldmesh jobs``: jobs, rollouts, artifact signing and the job controller (docs/rollouts.md).

Commands read and write the store directly (like ``fieldmesh devices``); the controller
(``fieldmesh jobs controller``) sends the work to devices over MQTT. Commands that print take ``--json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fieldmesh.cli.common import actor, fail, opened
from fieldmesh.core.errors import ConfigError, FieldmeshError

__all__ = ["app"]

app = typer.Typer(name="jobs", no_args_is_help=True, help=(
    "Jobs sent to devices, staged rollouts of signed firmware and models, and the controller that runs them "
    "(docs/rollouts.md)."))
rollout_app = typer.Typer(name="rollout", no_args_is_help=True, help="Staged rollouts of a signed artifact.")
app.add_typer(rollout_app, name="rollout")
out = Console()
err = Console(stderr=True)

DataDir = Annotated[Path, typer.Option(
    "--data-dir", envvar="FIELDMESH_DATA_DIR", help="where the embedded bus and store keep data")]
StoreUrl = Annotated[str | None, typer.Option(help="the hot store (default: the data dir's)")]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON")]
DEFAULT_DATA_DIR = Path(".fieldmesh")


def _fail(exc: Exception | str) -> None:
    fail(exc)


_actor = actor


def _store(data_dir: Path, store_url: str | None) -> Any:
    """The JobStore of the store, closed after; a FieldmeshError inside is a clear message and exit 2."""
    from fieldmesh.store.jobs import JobStore

    return opened(JobStore, data_dir, store_url)


def _names(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _json_arg(value: str | None, name: str) -> Any:
    if value is None:
        return None
    try:
        if value.startswith("@"):
            return json.loads(Path(value[1:]).read_text())
        return json.loads(value)
    except (OSError, ValueError) as exc:
        _fail(ConfigError(f"{name}: not JSON (or @file of JSON): {exc}", key=name))
    return None


@app.command("create")
def create(
    op: Annotated[str, typer.Option(help="the operation: report, install, rollback, or the agent's own")],
    devices: Annotated[str | None, typer.Option(help="device ids, comma-separated")] = None,
    groups: Annotated[str | None, typer.Option(help="registry groups, comma-separated")] = None,
    query: Annotated[str | None, typer.Option(help='a registry query as JSON, e.g. \'{"tags": ["fw:1.2"]}\'')] = None,
    document: Annotated[str | None, typer.Option(help="more of the job document, JSON or @file")] = None,
    job_id: Annotated[str | None, typer.Option("--id", help="the job id (default: random)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds for a device to finish once sent")] = 60.0,
    attempts: Annotated[int, typer.Option(help="attempts per device (failed and timed out are retried)")] = 1,
    rate: Annotated[float, typer.Option(help="executions sent per second at most (0: no limit)")] = 0.0,
    in_flight: Annotated[int, typer.Option(help="executions in flight at most (0: no limit)")] = 0,
    data_dir: DataDir = DEFAULT_DATA_DIR, store_url: StoreUrl = None, as_json: AsJson = False,
) -> None:
    """Create a job for devices, groups and/or a registry query."""
    from fieldmesh.control.jobs import JobSpec, Targets
    from fieldmesh.store import default_store_url
    from fieldmesh.store.registry import DeviceRegistry

    try:
        doc = {**(_json_arg(document, "document") or {}), "op": op}
        targets = Targets(devices=_names(devices), groups=_names(groups), query=_json_arg(query, "query")).check()
        spec = JobSpec(job_id=job_id or f"job-{secrets.token_hex(6)}", document=doc, targets=targets,
                       timeout_s=timeout, max_attempts=attempts, rate_per_s=rate, max_in_flight=in_flight)
    except FieldmeshError as exc:
        _fail(exc)
        return
    url = store_url or default_store_url(data_dir)
    ids = sorted(set(targets.devices))
    if targets.groups or targets.query:
        try:
            reg = DeviceRegistry(url)
        except FieldmeshError as exc:
            _fail(exc)
            return
        try:
            ids = targets.resolve(reg.list(limit=1_000_000))
        finally:
            reg.close()
    with _store(data_dir, store_url) as js:
        row = js.create_job(spec, ids, actor=_actor())
        if as_json:
            out.print_json(json.dumps(row.as_dict()))
        else:
            err.print(f"job {spec.job_id}: {len(ids)} device(s) queued")


@app.command("list")
def list_jobs(
    status: Annotated[str | None, typer.Option(help="in_progress, completed, canceling, canceled")] = None,
    limit: int = 100, data_dir: DataDir = DEFAULT_DATA_DIR, store_url: StoreUrl = None, as_json: AsJson = False,
) -> None:
    """Jobs, newest first, with their executions per state."""
    from rich.table import Table

    from fieldmesh.control.jobs import job_counts

    with _store(data_dir, store_url) as js:
        rows = [{**j.as_dict(), "counts": job_counts(js.executions(job_id=j.spec.job_id))}
                for j in js.list_jobs(status=status, limit=limit)]
    if as_json:
        out.print_json(json.dumps(rows))
        return
    t = Table("job", "status", "op", "queued", "in_progress", "succeeded", "failed", "rejected", "timed_out",
              "canceled")
    for r in rows:
        c = r["counts"]
        t.add_row(r["job_id"], r["status"], str(r["document"].get("op")),
                  *(str(c[s]) for s in ("queued", "in_progress", "succeeded", "failed", "rejected", "timed_out",
                                        "canceled")))
    out.print(t)


@app.command("show")
def show(job_id: Annotated[str, typer.Argument(metavar="ID")], data_dir: DataDir = DEFAULT_DATA_DIR,
         store_url: StoreUrl = None, as_json: AsJson = False) -> None:
    """A job and each device's execution."""
    from rich.table import Table

    from fieldmesh.control.jobs import job_counts

    with _store(data_dir, store_url) as js:
        job = js.get_job(job_id)
        exs = js.executions(job_id=job_id)
    body = {**job.as_dict(), "counts": job_counts(exs), "executions": [e.as_dict() for e in exs]}
    if as_json:
        out.print_json(json.dumps(body))
        return
    err.print(f"job {job_id}: {job.status}; " + ", ".join(f"{k} {v}" for k, v in body["counts"].items() if v))
    t = Table("device", "state", "attempt", "details")
    for e in exs:
        t.add_row(e.device_id, e.state, str(e.attempt), json.dumps(dict(e.details))[:100])
    out.print(t)


@app.command("cancel")
def cancel(job_id: Annotated[str, typer.Argument(metavar="ID")], data_dir: DataDir = DEFAULT_DATA_DIR,
           store_url: StoreUrl = None) -> None:
    """Cancel what is not final yet (the controller carries it out)."""
    with _store(data_dir, store_url) as js:
        if js.set_job_status(job_id, "canceling", actor=_actor(), expect=("in_progress",)):
            err.print(f"job {job_id}: canceling")
        else:
            err.print(f"job {job_id} is {js.get_job(job_id).status}: nothing to cancel")


@app.command("controller")
def controller(
    mqtt_url: Annotated[str, typer.Option(help="the MQTT door devices use (mqtt://host:port)")] = "mqtt://127.0.0.1:1883",
    auth_file: Annotated[Path | None, typer.Option(
        help="JSON {user, password} for the MQTT session, e.g. <data-dir>/secrets/internal.json for the door of "
             "fieldmesh up")] = None,
    tick: Annotated[float, typer.Option(help="seconds between passes")] = 0.2,
    data_dir: DataDir = DEFAULT_DATA_DIR, store_url: StoreUrl = None,
) -> None:
    """Run the job and rollout controller (one per store) until interrupted."""
    import logging

    from fieldmesh.control.jobrunner import JobController, MqttLink, run_controller
    from fieldmesh.store import default_store_url
    from fieldmesh.store.jobs import JobStore
    from fieldmesh.store.registry import DeviceRegistry
    from fieldmesh.store.rollouts import telemetry_for

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    url = store_url or default_store_url(data_dir)
    user = password = None
    if auth_file is not None:
        try:
            c = json.loads(auth_file.read_text())
            user, password = c["user"], c["password"]
        except (OSError, ValueError, KeyError) as exc:
            _fail(ConfigError(f"--auth-file {auth_file}: {exc}", key="auth_file"))
    try:
        store, reg = JobStore(url), DeviceRegistry(url)
        telemetry = telemetry_for(url)
    except FieldmeshError as exc:
        _fail(exc)
        return
    holder: list[JobController] = []
    link = MqttLink(mqtt_url, on_message=lambda t, p: holder[0].handle_message(t, p), username=user,
                    password=password, client_id="fm-jobs")  # one per store: a stable session, kept
                    # by the broker while the controller restarts (device updates wait in it)
    ctl = JobController(store, publish=link.publish, devices=lambda: reg.list(limit=1_000_000), telemetry=telemetry)
    holder.append(ctl)

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_controller(ctl, stop=stop, tick_s=tick)

    err.print(f"jobs controller: store {url.split('?')[0]}, MQTT {mqtt_url}")
    try:
        asyncio.run(go())
    finally:
        link.close()
        store.close()
        reg.close()
    err.print(f"jobs controller stopped: {ctl.stats}")


@app.command("keygen")
def keygen(out_dir: Annotated[Path, typer.Argument(help="where to write signing.key (0600) and signing.pub")]) -> None:
    """Make an Ed25519 signing key pair for artifacts (devices trust signing.pub)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    from fieldmesh.control.rollouts import key_id

    out_dir.mkdir(parents=True, exist_ok=True)
    priv = out_dir / "signing.key"
    if priv.exists():
        _fail(f"{priv} exists: not overwriting a signing key")
    k = Ed25519PrivateKey.generate()
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(k.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    pub = k.public_key()
    (out_dir / "signing.pub").write_bytes(pub.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    err.print(f"key {key_id(pub.public_bytes(Encoding.Raw, PublicFormat.Raw))}: {priv}, {out_dir / 'signing.pub'}")


@app.command("sign")
def sign(
    artifact: Annotated[Path, typer.Argument(help="the firmware image or model file")],
    key: Annotated[Path, typer.Option(help="the Ed25519 private key (PEM)")],
    kind: Annotated[str, typer.Option(help="firmware or model")],
    name: Annotated[str, typer.Option(help="the artifact's name, e.g. anomaly")],
    version: Annotated[str, typer.Option(help="its version, e.g. 2.1.0")],
    url: Annotated[str, typer.Option(help="where devices fetch it (https://..., file://...)")],
) -> None:
    """Print the signed manifest (JSON) of an artifact: the ``artifact`` of a rollout."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from fieldmesh.control.rollouts import sign_artifact

    try:
        k = load_pem_private_key(key.read_bytes(), password=None)
        data = artifact.read_bytes()
    except (OSError, ValueError) as exc:
        _fail(exc)
        return
    if not isinstance(k, Ed25519PrivateKey):
        _fail(f"{key} is not an Ed25519 private key")
        return
    try:
        m = sign_artifact(k, data, kind=kind, name=name, version=version)
    except ValueError as exc:
        _fail(ConfigError(str(exc), key="artifact"))
        return
    out.print_json(json.dumps({**m, "url": url}))


@rollout_app.command("create")
def rollout_create(
    spec: Annotated[str, typer.Argument(help="the rollout as JSON or @file (docs/rollouts.md)")],
    data_dir: DataDir = DEFAULT_DATA_DIR, store_url: StoreUrl = None,
) -> None:
    """Start a rollout (the controller runs it)."""
    from fieldmesh.control.rollouts import RolloutSpec

    try:
        s = RolloutSpec.from_dict(_json_arg(spec, "spec") or {})
        s.targets.check()
    except FieldmeshError as exc:
        _fail(exc)
        return
    with _store(data_dir, store_url) as js:
        js.create_rollout(s.rollout_id, s.as_dict(), actor=_actor())
    err.print(f"rollout {s.rollout_id}: pending")


@rollout_app.command("show")
def rollout_show(rollout_id: Annotated[str, typer.Argument(metavar="ID")], data_dir: DataDir = DEFAULT_DATA_DIR,
                 store_url: StoreUrl = None, as_json: AsJson = False) -> None:
    """A rollout's status, stage, exposure, gates and rollback."""
    from fieldmesh.api.jobs import rollout_view

    with _store(data_dir, store_url) as js:
        v = rollout_view(js.get_rollout(rollout_id))
    if as_json:
        out.print_json(json.dumps(v))
        return
    st = v["stage"]
    err.print(f"rollout {rollout_id}: {v['status']}, stage {st['name'] if st else '-'}, exposed {v['exposed']} of "
              f"{v['devices']} device(s), updated {v['updated']}")
    for g in v["gates"]:
        err.print(f"  gate {g['name']}: {g['value']} (threshold {g['threshold']}) "
                  f"{'ok' if g['ok'] else 'FAILED' if g['ok'] is False else 'waiting'}")
    if v["halt_reason"]:
        err.print(f"  halted: {v['halt_reason']}; rollback {v['rollback_job']}: {v['rollback']}")


@rollout_app.command("list")
def rollout_list(data_dir: DataDir = DEFAULT_DATA_DIR, store_url: StoreUrl = None, as_json: AsJson = False) -> None:
    """Rollouts, newest first."""
    from fieldmesh.api.jobs import rollout_view

    with _store(data_dir, store_url) as js:
        vs = [rollout_view(r) for r in js.list_rollouts()]
    if as_json:
        out.print_json(json.dumps(vs))
        return
    for v in vs:
        out.print(f"{v['rollout_id']}  {v['status']}  {v['artifact']['kind']} {v['artifact']['name']} "
                  f"{v['artifact']['version']}  exposed {v['exposed']}/{v['devices']}")


@rollout_app.command("cancel")
def rollout_cancel(rollout_id: Annotated[str, typer.Argument(metavar="ID")], data_dir: DataDir = DEFAULT_DATA_DIR,
                   store_url: StoreUrl = None) -> None:
    """Stop a rollout and roll back the devices that got the artifact."""
    with _store(data_dir, store_url) as js:
        if js.cancel_rollout(rollout_id, actor=_actor()):
            err.print(f"rollout {rollout_id}: canceling")
        else:
            err.print(f"rollout {rollout_id} is {js.get_rollout(rollout_id).status}: nothing to cancel")


if __name__ == "__main__":  # fieldmesh up runs the controller as ``python -m fieldmesh.cli.jobs controller``
    app()
