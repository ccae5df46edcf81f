"""The device side of provisioning: make a key and a CSR, ask the API for a certificate, keep them.

Speaks HTTP to ``POST /api/v1/provision`` (docs/provisioning.md) with the standard library only: the edge
agent imports neither the API nor the stores. Files written to the output directory, all ``0600``:
``device.key`` (the private key, never sent), ``device.pem`` (the certificate) and ``chain.pem`` (the CA
certificates above it). The proof is an enrollment token, a claim certificate and its key, or, to rotate,
the current ``device.pem``/``device.key`` (:func:`due_for_rotation` says when: at 2/3 of the validity).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from fieldmesh.core.errors import ConfigError, FieldmeshError

__all__ = [
    "ProvisionError", "Provisioned", "build_csr", "due_for_rotation", "finish_pending", "new_key", "provision", "sign",
]

KEY_FILE: Final = "device.key"
CERT_FILE: Final = "device.pem"
CHAIN_FILE: Final = "chain.pem"
DeviceKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class ProvisionError(FieldmeshError):
    """The API refused (``status``, ``reason``) or could not be reached (``status`` 0)."""

    def __init__(self, message: str, *, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Provisioned:
    """Where the key, certificate and chain were written, and the certificate's serial and end."""

    key: Path
    certificate: Path
    chain: Path
    serial: str
    not_after_ms: int


def new_key(key_type: str = "ec-p256") -> DeviceKey:
    """A new device key: ``ec-p256`` (default), ``ec-p384``, ``rsa-2048`` or ``ed25519``."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ConfigError(f"unknown key type {key_type!r}: use ec-p256, ec-p384, rsa-2048 or ed25519", key="key_type")


def build_csr(key: DeviceKey, device_id: str) -> str:
    """A PEM CSR with subject CN = ``device_id``, signed by ``key``."""
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
    csr = b.sign(key, None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def sign(key: DeviceKey, data: bytes) -> bytes:
    """``key``'s signature over ``data``: ECDSA/SHA-256, RSA PKCS#1 v1.5/SHA-256 or Ed25519."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(data)


def _csr_der(csr_pem: str) -> bytes:
    return x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)


def _load_key(path: Path) -> DeviceKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not a readable, unencrypted PEM private key ({exc})", key=str(path)) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path}: use an EC, RSA or Ed25519 key", key=str(path))
    return key


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}", key=str(path)) from None


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _endpoint(url: str) -> str:
    base = url.rstrip("/")
    if base.endswith("/provision"):
        return base
    return base + ("/provision" if base.endswith("/api/v1") else "/api/v1/provision")


def _post(url: str, body: dict[str, Any], *, ca_file: Path | None, timeout_s: float) -> dict[str, Any]:
    req = urllib.request.Request(_endpoint(url), data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Accept": "application/json"})
    ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout_s, context=ctx) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            err = json.loads(exc.read())
        except ValueError:
            err = {}
        detail, reason = str(err.get("detail", exc.reason)), str(err.get("reason", ""))
        raise ProvisionError(f"provisioning refused ({exc.code}{', ' + reason if reason else ''}): {detail}",
                             status=exc.code, reason=reason) from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ProvisionError(f"cannot reach {_endpoint(url)}: {exc}") from None
    if not isinstance(answer, dict) or "certificate" not in answer:
        raise ProvisionError(f"{_endpoint(url)} answered no certificate")
    return answer


def provision(url: str, *, device_id: str, out_dir: Path, token: str | None = None,
              claim_cert: Path | None = None, claim_key: Path | None = None, rotate: bool = False,
              key_type: str = "ec-p256", ca_file: Path | None = None, timeout_s: float = 30.0) -> Provisioned:
    """Get a certificate for ``device_id`` from the API at ``url`` and write key, certificate and chain to
    ``out_dir``: with an enrollment ``token``, a ``claim_cert`` + ``claim_key``, or (``rotate``) the current
    ``device.pem`` + ``device.key`` in ``out_dir``. A new key every time; the old files are replaced only
    once the new certificate is in hand.

    Raises:
        ConfigError: no proof, or more than one; unreadable files.
        ProvisionError: the API refused (its status and reason) or was unreachable.
    """
    if sum((token is not None, claim_cert is not None, rotate)) != 1:
        raise ConfigError("give one proof: --token, --claim-cert (with --claim-key) or --rotate", key="token")
    if (claim_cert is None) != (claim_key is None):
        raise ConfigError("--claim-cert needs --claim-key", key="claim_key")
    if out_dir.is_dir():
        finish_pending(out_dir)
    key = new_key(key_type)
    csr = build_csr(key, device_id)
    body: dict[str, Any] = {"csr": csr}
    if token is not None:
        body["token"] = token
    elif claim_cert is not None and claim_key is not None:
        body["claim_certificate"] = _read(claim_cert)
        body["signature"] = base64.b64encode(sign(_load_key(claim_key), _csr_der(csr))).decode()
    else:
        body["certificate"] = _read(out_dir / CERT_FILE)
        body["signature"] = base64.b64encode(sign(_load_key(out_dir / KEY_FILE), _csr_der(csr))).decode()
    answer = _post(url, body, ca_file=ca_file, timeout_s=timeout_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = Provisioned(key=out_dir / KEY_FILE, certificate=out_dir / CERT_FILE, chain=out_dir / CHAIN_FILE,
                        serial=str(answer.get("serial", "")), not_after_ms=int(answer.get("not_after", 0)))
    # both new files first, then the two renames; a stop between them is completed by finish_pending
    _write_private(out_dir / (KEY_FILE + ".new"), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    _write_private(out_dir / (CERT_FILE + ".new"), str(answer["certificate"]).encode())
    _write_private(paths.chain, str(answer.get("chain", "")).encode())
    finish_pending(out_dir)
    return paths


def finish_pending(out_dir: Path) -> bool:
    """Complete a key and certificate swap a stop interrupted. ``device.key.new`` and ``device.pem.new`` are
    written before either is renamed; whichever is still pending replaces its file when the key then matches
    the certificate, else it is stale and removed (the old pair stands). Returns whether it moved anything;
    :func:`provision` calls it first, so a rotation never signs with a key its certificate does not hold."""
    key_new, cert_new = out_dir / (KEY_FILE + ".new"), out_dir / (CERT_FILE + ".new")
    pending = [p for p in (key_new, cert_new) if p.exists()]
    if not pending:
        return False
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        key = _load_key(key_new if key_new.exists() else out_dir / KEY_FILE)
        cert = x509.load_pem_x509_certificate((cert_new if cert_new.exists() else out_dir / CERT_FILE).read_bytes())
        matched = cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)
    except (OSError, ValueError, ConfigError):
        matched = False
    if not matched:
        for p in pending:
            p.unlink()
        return False
    if key_new.exists():
        os.replace(key_new, out_dir / KEY_FILE)
    if cert_new.exists():
        os.replace(cert_new, out_dir / CERT_FILE)
    return True


def due_for_rotation(cert_pem: str | bytes, *, fraction: float = 2 / 3, now_ms: int | None = None) -> bool:
    """Whether a certificate has lived ``fraction`` of its validity (time to rotate it)."""
    cert = x509.load_pem_x509_certificate(cert_pem.encode() if isinstance(cert_pem, str) else cert_pem)
    start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    now = (now_ms / 1000) if now_ms is not None else time.time()
    return now >= start + (end - start) * fraction
