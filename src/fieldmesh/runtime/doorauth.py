"""Who may use the embedded bus and the MQTT door of ``fieldmesh up``.

- The **internal bus** is closed: the embedded nats-server knows one internal user (random password,
  kept 0600 in ``<data-dir>/secrets/internal.json``) that every fieldmesh stage uses. Children find it
  through the bus URL's ``auth_file`` query parameter (a path, never the password, on a command line).
  An anonymous NATS client is refused.
- **Device clients** are confined to device topics (:mod:`fieldmesh.core.topics`): a device with a
  certificate publishes only ``devices/<its id>/telemetry[/<suffix>]``, ``.../state``,
  ``.../anomalies`` and ``.../jobs/+/update``, and subscribes only to ``devices/<its id>/config`` and
  ``.../jobs/notify`` (docs/rollouts.md). In local-only mode (loopback,
  no client certificates) an anonymous MQTT client may use any ``devices/...`` topic, nothing else.
- **Device certificates** come from the device registry: the valid, unrevoked certificates of active
  devices. :class:`DoorPolicy` is what they allow; it is rebuilt when the registry's version changes.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from fieldmesh.core.errors import ConfigError
from fieldmesh.core.topics import DEVICE_ID_RE, DEVICE_PUBLISH_LEAVES, DEVICE_SUBSCRIBE_LEAVES

__all__ = [
    "ANONYMOUS_DEVICE_USER",
    "INTERNAL_USER",
    "JOBS_USER",
    "DeviceIdentity",
    "DoorPolicy",
    "DoorTls",
    "InternalAuth",
    "RegistryLike",
    "device_publish_topics",
    "device_subscribe_topics",
    "internal_auth",
    "jobs_auth",
    "mosquitto_password_line",
    "nats_device_permissions",
    "nats_jobs_permissions",
    "policy_from_registry",
    "spki_sha256",
    "with_auth_file",
]

log = logging.getLogger("fieldmesh.doorauth")

#: The user every fieldmesh stage connects to the embedded bus (and the Mosquitto door) as.
INTERNAL_USER: Final = "fm-internal"
#: The nats-server user of anonymous MQTT clients in local-only mode.
ANONYMOUS_DEVICE_USER: Final = "fm-device"
#: The job controller's MQTT user at nats-server's door; the ``:`` keeps it out of reach of any device
#: certificate (device ids, and so certificate names, are ``[A-Za-z0-9_-]``).
JOBS_USER: Final = "fm:jobs"


@dataclass(frozen=True)
class InternalAuth:
    """The internal user's name, password and the file that holds them."""

    user: str
    password: str = field(repr=False)
    path: Path


def internal_auth(data_dir: Path, *, user: str = INTERNAL_USER, name: str = "internal.json") -> InternalAuth:
    """The internal credentials of a data dir, created on first use (a 0600 file in a 0700 dir).

    The file is JSON ``{"user": ..., "password": ...}``: the bus URL's ``auth_file`` reads it.
    (:func:`jobs_auth` keeps the job controller's in the same way.)
    """
    d = data_dir / "secrets"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    path = d / name
    with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError):
        doc = json.loads(path.read_text())
        if doc["user"] == user and isinstance(doc["password"], str) and len(doc["password"]) >= 32:
            os.chmod(path, 0o600)
            return InternalAuth(doc["user"], doc["password"], path)
    password = secrets.token_urlsafe(32)
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"user": user, "password": password}, f)
    os.replace(path.with_suffix(".tmp"), path)
    return InternalAuth(user, password, path)


def jobs_auth(data_dir: Path) -> InternalAuth:
    """The job controller's MQTT credentials at nats-server's door (``<data-dir>/secrets/jobs.json``)."""
    return internal_auth(data_dir, user=JOBS_USER, name="jobs.json")


def nats_jobs_permissions() -> dict[str, Any]:
    """What the job controller may do at nats-server's MQTT listener: write every device's notify, read every
    device's execution updates (docs/rollouts.md), nothing else."""
    return {"publish": {"allow": ["devices.*.jobs.notify"]}, "subscribe": {"allow": ["devices.*.jobs.*.update"]}}


def with_auth_file(url: str, path: Path) -> str:
    """``url`` with ``?auth_file=<path>`` (the NATS bus reads the user and password from that file)."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}auth_file={path}"


@dataclass(frozen=True)
class DoorTls:
    """TLS at the MQTT door: its port, server certificate and key, and the CA of client certificates."""

    port: int
    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False

    def check(self) -> None:
        """Raise a ConfigError naming the flag when a file is missing or the combination is invalid."""
        for flag, path in (("--mqtt-tls-cert", self.cert), ("--mqtt-tls-key", self.key), ("--mqtt-ca", self.ca)):
            if path is not None and not path.is_file():
                raise ConfigError(f"{flag} {path}: no such file", key=flag.strip("-").replace("-", "_"))
        if self.require_client_cert and self.ca is None:
            raise ConfigError("--require-client-cert needs --mqtt-ca (the CA that signs device certificates)",
                              key="mqtt_ca")


def device_publish_topics(device_id: str) -> list[str]:
    """MQTT topic filters a device may publish on."""
    out = []
    for leaf in DEVICE_PUBLISH_LEAVES:
        out.append(f"devices/{device_id}/{leaf}")
        if leaf == "telemetry":
            out.append(f"devices/{device_id}/telemetry/+")  # the encoding suffix (MQTT 3.1.1)
    return out


def device_subscribe_topics(device_id: str) -> list[str]:
    """MQTT topic filters a device may subscribe to."""
    return [f"devices/{device_id}/{leaf}" for leaf in DEVICE_SUBSCRIBE_LEAVES]


def _subject(mqtt_filter: str) -> str:
    return mqtt_filter.replace("/", ".").replace("+", "*").replace("#", ">")


def nats_device_permissions(device_id: str | None) -> dict[str, Any]:
    """nats-server permissions of one device, or (None) of anonymous local-only MQTT clients.

    The listener maps topics to subjects (``/`` is ``.``); it needs nothing else from the client's
    permissions: its JetStream work for QoS 1 runs as the server.
    """
    if device_id is None:
        # an MQTT "devices/#" is the subjects "devices.>" and "devices" (the parent level)
        return {"publish": {"allow": ["devices.>"]}, "subscribe": {"allow": ["devices", "devices.>"]}}
    return {"publish": {"allow": [_subject(t) for t in device_publish_topics(device_id)]},
            "subscribe": {"allow": [_subject(t) for t in device_subscribe_topics(device_id)]}}


@dataclass(frozen=True, order=True)
class DeviceIdentity:
    """A valid certificate of an active device, as the door sees it."""

    device_id: str
    subject: str        # RFC 4514 string of the certificate subject (nats-server maps it to a user)
    common_name: str    # Mosquitto's ``use_identity_as_username`` gives the CN
    spki_sha256: str    # nats-server's pinned_certs form: sha256 of the DER SubjectPublicKeyInfo
    serial: str


@dataclass(frozen=True)
class DoorPolicy:
    """What the registry allows at the door: identities, and whether nats-server must pin certificates.

    ``pin`` is set when a revoked, unexpired certificate has the subject of a still valid one (a renewal
    with the same subject, as ``fieldmesh ca`` issues: ``CN=<device id>``): the subject then no longer
    identifies one certificate, so the door also pins the valid certificates' keys, until the revoked
    one expires.
    """

    identities: tuple[DeviceIdentity, ...] = ()
    pin: bool = False

    def users(self) -> dict[str, str]:
        """nats-server user name (the certificate subject) -> device id.

        A subject on certificates of two devices identifies neither: it is left out.
        """
        out: dict[str, str] = {}
        clash: set[str] = set()
        for i in self.identities:
            if out.setdefault(i.subject, i.device_id) != i.device_id:
                clash.add(i.subject)
        for subject in clash:
            log.warning("certificate subject %r is on certificates of several devices: refused at the door", subject)
            del out[subject]
        return out

    def pins(self) -> list[str]:
        """Keys of every valid certificate (sorted)."""
        return sorted({i.spki_sha256 for i in self.identities})

    def mosquitto_users(self) -> dict[str, str]:
        """Mosquitto user name (the certificate CN, which must be the device id) -> device id."""
        return {i.device_id: i.device_id for i in self.identities if i.common_name == i.device_id}


class RegistryLike(Protocol):
    """What the door needs of ``fieldmesh.store.registry.DeviceRegistry``."""

    def version(self) -> int: ...

    def list(self, *, status: str | None = None, group: str | None = None, after: str | None = None,
             limit: int = 1000) -> builtins.list[Any]: ...

    def certificates(self, device_id: str | None = None, *,
                     valid_at_ms: int | None = None) -> builtins.list[Any]: ...


def spki_sha256(cert: Any) -> str:
    """sha256 (hex) of a certificate's DER SubjectPublicKeyInfo."""
    from cryptography.hazmat.primitives import serialization

    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _identity(device_id: str, pem: str, serial: str) -> DeviceIdentity | None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        log.warning("certificate %s of device %s is not PEM: left out of the door", serial, device_id)
        return None
    subject = cert.subject.rfc4514_string()
    if '"' in subject or "\\" in subject:  # kept out of generated configs rather than escaped
        log.warning("certificate %s of device %s: subject %r has quotes or backslashes: left out of the door",
                    serial, device_id, subject)
        return None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    return DeviceIdentity(device_id, subject, cn, spki_sha256(cert), serial)


def policy_from_registry(registry: RegistryLike, *, now_ms: int | None = None,
                         cache: dict[tuple[str, str], DeviceIdentity | None] | None = None) -> DoorPolicy:
    """The door policy of the registry now: valid, unrevoked certificates of active devices.

    ``cache`` (kept by the caller across calls) holds each certificate's parsed identity by (device,
    serial), so that a change re-parses only the certificates it added.
    """
    now = int(time.time() * 1000) if now_ms is None else now_ms
    seen: dict[tuple[str, str], DeviceIdentity | None] = {} if cache is None else cache

    def identity(c: Any) -> DeviceIdentity | None:
        key = (c.device_id, c.serial)
        if key not in seen:
            seen[key] = _identity(c.device_id, c.pem, c.serial)
        return seen[key]

    active: set[str] = set()
    after: str | None = None
    while True:
        page = registry.list(status="active", after=after, limit=1000)
        active.update(d.id for d in page if DEVICE_ID_RE.fullmatch(d.id))
        if len(page) < 1000:
            break
        after = page[-1].id
    ids: list[DeviceIdentity] = []
    invalid: list[Any] = []
    for c in registry.certificates():
        if c.device_id not in active:
            continue
        if not (c.not_before_ms <= now <= c.not_after_ms and (c.revoked_ms is None or c.revoked_ms > now)):
            invalid.append(c)
            continue
        ident = identity(c)
        if ident is not None:
            ids.append(ident)
    subjects = {i.subject for i in ids}
    pin = any((ident := identity(c)) is not None and ident.subject in subjects
              for c in invalid  # revoked, and not expired yet: TLS alone would still take it
              if c.revoked_ms is not None and c.revoked_ms <= now and c.not_after_ms >= now)
    return DoorPolicy(tuple(sorted(ids)), pin)


def mosquitto_password_line(user: str, password: str, *, iterations: int = 101) -> str:
    """A Mosquitto 2 password file line (``$7$``: PBKDF2-SHA512), as ``mosquitto_passwd`` writes it."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return f"{user}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def nats_string(s: str) -> str:
    """A double-quoted nats-server config string (callers keep quotes and backslashes out)."""
    if '"' in s or "\\" in s or "\n" in s:
        raise ValueError(f"not allowed in a generated nats-server config string: {s!r}")
    return f'"{s}"'


def nats_list(items: Iterable[str]) -> str:
    """A nats-server config list of strings."""
    return "[" + ", ".join(nats_string(i) for i in items) + "]"
