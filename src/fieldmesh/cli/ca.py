"""``fieldmesh ca``: the certificate authority and provisioning (docs/provisioning.md)."""

from __future__ import annotations

import getpass
import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from fieldmesh.core.errors import ConfigError, FieldmeshError

__all__ = ["app", "parse_duration_ms"]

app = typer.Typer(name="ca", no_args_is_help=True, help=(
    "The certificate authority: init, server and claim certificates, enrollment tokens, revocation "
    "(docs/provisioning.md)."))
err = Console(stderr=True)

DataDir = Annotated[Path, typer.Option(
    "--data-dir", envvar="FIELDMESH_DATA_DIR", help="the data dir; the CA lives in <data-dir>/ca")]
StoreUrl = Annotated[str | None, typer.Option(help="the hot store (default: the data dir's)")]
DEFAULT_DATA_DIR = Path(".fieldmesh")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str) -> int:
    """``90s``, ``30m``, ``24h``, ``7d`` (a bare number is seconds) in milliseconds.

    Raises:
        ConfigError: not a duration.
    """
    m = _DURATION.fullmatch(text.strip())
    if m is None:
        raise ConfigError(f"bad duration {text!r}: use e.g. 90s, 30m, 24h or 7d", key="ttl")
    return int(float(m[1]) * _UNIT_MS[m[2] or "s"])


def _fail(exc: Exception) -> None:
    err.print(f"[bold red]error:[/] {exc}")
    raise typer.Exit(2)


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:
        return f"cli:uid{os.getuid()}"


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _audit(data_dir: Path, store_url: str | None, action: str, target: str, detail: dict[str, Any]) -> None:
    """Record a CA action done on files (init, a server certificate) in the store's audit log."""
    from fieldmesh.store import default_store_url
    from fieldmesh.store.access import AccessStore

    try:
        store = AccessStore(store_url or default_store_url(data_dir))
        try:
            store.record(actor=_actor(), action=action, target=target, detail=detail)
        finally:
            store.close()
    except FieldmeshError as exc:
        err.print(f"[yellow]warning:[/] not recorded in the audit log: {exc}")


def _provisioner(data_dir: Path, store_url: str | None) -> Any:
    from fieldmesh.control.provision import Provisioner
    from fieldmesh.store import default_store_url

    return Provisioner.open(data_dir / "ca", store_url or default_store_url(data_dir))


@app.command("init")
def init(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    key_type: Annotated[str, typer.Option(help="ec-p256, ec-p384, rsa-3072 or ed25519")] = "ec-p256",
    name: Annotated[str, typer.Option(help="organization name in the CA subjects")] = "fieldmesh",
    root_days: Annotated[int, typer.Option(min=1, help="validity of a root fieldmesh makes")] = 3650,
    issuing_days: Annotated[int, typer.Option(min=1, help="validity of the issuing CA fieldmesh makes")] = 1095,
    device_days: Annotated[int, typer.Option(min=1, help="validity of device certificates")] = 90,
    server_days: Annotated[int, typer.Option(min=1, help="validity of server certificates")] = 365,
    claim_days: Annotated[int, typer.Option(min=1, help="validity of claim certificates")] = 365,
    crl_days: Annotated[int, typer.Option(min=1, help="a CRL's next update, in days")] = 7,
    root_cert: Annotated[Path | None, typer.Option(help="the operator's root CA certificate (PEM)...")] = None,
    root_key: Annotated[Path | None, typer.Option(help="...and its key: signs a new issuing CA, not kept")] = None,
    issuing_cert: Annotated[Path | None, typer.Option(
        help="the operator's own issuing CA (PEM, its chain up to the root may follow)...")] = None,
    issuing_key: Annotated[Path | None, typer.Option(help="...and its key (copied 0600 into the CA dir)")] = None,
    force: Annotated[bool, typer.Option(help="replace an existing CA (its certificates stop verifying)")] = False,
    store_url: StoreUrl = None,
) -> None:
    """Create the root and issuing CA (or adopt the operator's) in <data-dir>/ca."""
    from fieldmesh.control.ca import CaPolicy, CertificateAuthority

    try:
        policy = CaPolicy(key_type=key_type, root_days=root_days, issuing_days=issuing_days, device_days=device_days,
                          server_days=server_days, claim_days=claim_days, crl_days=crl_days)
        ca = CertificateAuthority.init(data_dir / "ca", policy=policy, name=name, root_cert=root_cert,
                                       root_key=root_key, issuing_cert=issuing_cert, issuing_key=issuing_key,
                                       force=force)
    except FieldmeshError as exc:
        _fail(exc)
        return
    _audit(data_dir, store_url, "ca.init", str(ca.dir), {
        "issuing": ca.issuing_cert.subject.rfc4514_string(), "issuing_serial": f"{ca.issuing_cert.serial_number:x}",
        "root": ca.chain[-1].subject.rfc4514_string() if ca.chain else None, "own_root": root_cert is not None,
        "own_issuing": issuing_cert is not None, "force": force})
    err.print(f"CA in {ca.dir}: issuing CA '{ca.issuing_cert.subject.rfc4514_string()}' valid until "
              f"{ca.issuing_cert.not_valid_after_utc:%Y-%m-%d}; servers verify devices with {ca.bundle_path}, "
              f"revocations in {ca.crl_path}")
    if (ca.dir / "root.key").exists():
        err.print(f"[yellow]note:[/] {ca.dir / 'root.key'} is needed only to make a new issuing CA: keep it offline")


@app.command("policy")
def policy(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    device_days: Annotated[int | None, typer.Option(min=1, help="validity of device certificates")] = None,
    server_days: Annotated[int | None, typer.Option(min=1, help="validity of server certificates")] = None,
    claim_days: Annotated[int | None, typer.Option(min=1, help="validity of claim certificates")] = None,
    crl_days: Annotated[int | None, typer.Option(min=1, help="a CRL's next update, in days")] = None,
) -> None:
    """Show the CA's policy, or change the validity of what it issues from now on (restart the API after)."""
    from dataclasses import asdict

    from fieldmesh.control.ca import CertificateAuthority

    changes = {k: v for k, v in (("device_days", device_days), ("server_days", server_days),
                                 ("claim_days", claim_days), ("crl_days", crl_days)) if v is not None}
    try:
        ca = CertificateAuthority.open(data_dir / "ca")
        current = ca.set_policy(**changes) if changes else ca.policy
    except FieldmeshError as exc:
        _fail(exc)
        return
    typer.echo(json.dumps(asdict(current)))


@app.command("server-cert")
def server_cert(
    host: Annotated[list[str], typer.Option("--host", help="a DNS name or IP address (repeatable; first = CN)")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    valid_days: Annotated[int | None, typer.Option(min=1, help="default: the CA's server_days")] = None,
    out_cert: Annotated[Path | None, typer.Option(help="default: <data-dir>/ca/server.pem (with the chain)")] = None,
    out_key: Annotated[Path | None, typer.Option(help="default: <data-dir>/ca/server.key (0600)")] = None,
    store_url: StoreUrl = None,
) -> None:
    """Issue a TLS server certificate (MQTT door, API) for the given hosts."""
    from cryptography import x509

    from fieldmesh.control.ca import CertificateAuthority, write_file

    try:
        ca = CertificateAuthority.open(data_dir / "ca")
        chain, key = ca.issue_server(host, days=valid_days)
        cert_path, key_path = out_cert or ca.dir / "server.pem", out_key or ca.dir / "server.key"
        write_file(key_path, key.encode(), private=True)
        write_file(cert_path, chain.encode())
    except (FieldmeshError, OSError) as exc:
        _fail(exc)
        return
    leaf = x509.load_pem_x509_certificate(chain.encode())
    _audit(data_dir, store_url, "cert.server", f"{leaf.serial_number:032x}",
           {"hosts": list(host), "not_after_ms": int(leaf.not_valid_after_utc.timestamp() * 1000)})
    err.print(f"server certificate for {', '.join(host)}: {cert_path} (key {key_path}); "
              f"e.g. fieldmesh up --tls-cert {cert_path} --tls-key {key_path}")


@app.command("claim-cert")
def claim_cert(
    name: Annotated[str, typer.Option(help="the batch name, e.g. batch-7")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
    valid_days: Annotated[int | None, typer.Option(min=1, help="default: the CA's claim_days")] = None,
    groups: Annotated[str | None, typer.Option(help="device groups a device registered by this claim joins")] = None,
    devices: Annotated[str, typer.Option(help="device ids this claim may register (a glob, e.g. 'pump-*')")] = "*",
    out: Annotated[Path | None, typer.Option(help="directory for claim.pem and claim.key (default ./claim-<name>)")]
    = None,
) -> None:
    """Issue a claim (bootstrap) certificate for a batch of devices to flash at the factory."""
    from fieldmesh.control.ca import write_file

    group_list = tuple(g.strip() for g in (groups or "").split(",") if g.strip())
    try:
        prov = _provisioner(data_dir, store_url)
    except FieldmeshError as exc:
        _fail(exc)
        return
    try:
        cert, key, rec = prov.create_claim(name, days=valid_days, groups=group_list, devices=devices, actor=_actor())
        target = out or Path(f"claim-{name}")
        target.mkdir(parents=True, exist_ok=True)
        write_file(target / "claim.key", key.encode(), private=True)
        write_file(target / "claim.pem", cert.encode())
    except (FieldmeshError, OSError) as exc:
        _fail(exc)
        return
    finally:
        prov.close()
    err.print(f"claim certificate {rec.serial} for batch {name!r} (devices {devices!r}"
              f"{', groups ' + ','.join(rec.groups) if rec.groups else ''}) until {_when(rec.not_after_ms)}: "
              f"{target / 'claim.pem'}, key {target / 'claim.key'}")


@app.command("revoke-claim")
def revoke_claim(
    name: Annotated[str, typer.Argument(metavar="NAME_OR_SERIAL", help="a batch name or one claim's serial")],
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
) -> None:
    """Revoke claim certificates: refused from the next provisioning request on."""
    try:
        prov = _provisioner(data_dir, store_url)
    except FieldmeshError as exc:
        _fail(exc)
        return
    try:
        done = prov.enrollment.revoke_claim(name, actor=_actor())
    except FieldmeshError as exc:
        _fail(exc)
        return
    finally:
        prov.close()
    err.print(f"{len(done)} claim certificate(s) revoked: {', '.join(r.serial for r in done)}")


@app.command("token")
def token(
    device_id: Annotated[str, typer.Argument(metavar="DEVICE_ID")],
    ttl: Annotated[str, typer.Option(help="how long the token stays valid: 90s, 30m, 24h, 7d")] = "24h",
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the token and its record as JSON")] = False,
) -> None:
    """Make a one-time enrollment token for a device and print it, this once (only its hash is stored)."""
    try:
        ttl_ms = parse_duration_ms(ttl)
        prov = _provisioner(data_dir, store_url)
    except FieldmeshError as exc:
        _fail(exc)
        return
    try:
        tok, secret = prov.create_token(device_id, ttl_ms=ttl_ms, actor=_actor())
    except FieldmeshError as exc:
        _fail(exc)
        return
    finally:
        prov.close()
    if as_json:
        typer.echo(json.dumps({**tok.as_dict(), "token": secret}))
        return
    typer.echo(secret)
    err.print(f"token {tok.id} for {device_id}, single use, until {_when(tok.expires_ms)}: "
              f"fieldmesh edge provision --url <api> --device-id {device_id} --token <token> --out <dir>")


@app.command("revoke")
def revoke(
    serial: Annotated[str | None, typer.Argument(metavar="[SERIAL]", help="a certificate serial (hex)")] = None,
    device: Annotated[str | None, typer.Option("--device", help="revoke every certificate of this device")] = None,
    reason: Annotated[str, typer.Option(help="why (kept in the registry and audit log)")] = "",
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
) -> None:
    """Revoke a certificate (or every one of a device) and rewrite crl.pem."""
    if (serial is None) == (device is None):
        raise typer.BadParameter("give a SERIAL or --device ID")
    try:
        prov = _provisioner(data_dir, store_url)
    except FieldmeshError as exc:
        _fail(exc)
        return
    try:
        done = prov.revoke(serial=serial, device_id=device, actor=_actor(), reason=reason)
    except FieldmeshError as exc:
        _fail(exc)
        return
    finally:
        prov.close()
    for c in done:
        err.print(f"revoked {c.serial} ({c.device_id})")
    err.print(f"{len(done)} certificate(s) revoked; {prov.ca.crl_path} rewritten")


@app.command("crl")
def crl(
    data_dir: DataDir = DEFAULT_DATA_DIR,
    store_url: StoreUrl = None,
) -> None:
    """Rewrite crl.pem now (the API does it on each revocation and before its next update; cron this
    where no API runs)."""
    try:
        prov = _provisioner(data_dir, store_url)
    except FieldmeshError as exc:
        _fail(exc)
        return
    try:
        prov.refresh_crl(force=True)
    except FieldmeshError as exc:
        _fail(exc)
        return
    finally:
        prov.close()
    err.print(f"{prov.ca.crl_path} rewritten")
