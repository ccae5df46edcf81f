"""The Mosquitto door of ``fieldmesh up --door mosquitto``: a private broker for MQTT 3.1.1 and 5.

Its config is generated in the data dir: a loopback listener on the MQTT port, persistence in the
data dir, and queue and in-flight limits raised for the one subscriber it has, the gateway (which
consumes it with a plain subscription, a stable client id and a persistent session: Mosquitto 2.0
restores a plain subscription after a crash, not a shared one). The binary is ``mosquitto`` on PATH,
else ``/usr/sbin/mosquitto`` (Debian's package).

What a PUBACK means here: Mosquitto acknowledges a device once the message is in its memory, before
the gateway has put it into JetStream; it writes its memory to disk every ``autosave_interval`` (1 s),
so a crash of Mosquitto itself loses what it acknowledged since its last save and the gateway had not
yet put into JetStream (see docs/operations.md, "The embedded MQTT door").
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

from fieldmesh.core.errors import ConfigError
from fieldmesh.runtime.doorauth import (
    DoorPolicy,
    DoorTls,
    InternalAuth,
    device_publish_topics,
    device_subscribe_topics,
    mosquitto_password_line,
)

__all__ = ["DOORS", "accepts", "ensure_session", "find_mosquitto", "mosquitto_config", "mosquitto_version",
           "resolve_door", "write_acls", "write_config"]

#: The values of ``--door`` / ``FIELDMESH__GATEWAY__DOOR``.
DOORS = ("auto", "nats", "mosquitto")
#: What the broker keeps for the gateway beyond its in-flight window (stock: 1,000, then it drops).
MAX_QUEUED = 1_000_000
#: Unacknowledged QoS 1 messages per connection, both ways (stock: 20). A device's window towards
#: the broker is what the broker announces as its Receive Maximum; the gateway asks for its own.
MAX_INFLIGHT = 1_000


def find_mosquitto() -> str | None:
    """Path of a ``mosquitto`` binary, or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def mosquitto_version(binary: str) -> str:
    """``2.0.11`` or ``unknown``."""
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    m = re.search(r"mosquitto version (\S+)", out.stdout + out.stderr)
    return m.group(1) if m else "unknown"


def resolve_door(door: str, *, external_mqtt: bool) -> str:
    """The door ``up`` runs: ``external`` (``--mqtt-url``), ``nats`` or ``mosquitto``.

    ``auto`` is the nats-server listener: it PUBACKs a device only after JetStream stored the
    message, which Mosquitto cannot promise. ``mosquitto`` is the opt-in for MQTT 5.
    """
    if door not in DOORS:
        raise ConfigError(f"--door {door!r}: use one of {', '.join(DOORS)}", key="gateway.door")
    if external_mqtt:
        return "external"
    if door == "mosquitto":
        if find_mosquitto() is None:
            raise ConfigError("--door mosquitto needs the mosquitto binary (apt-get install mosquitto, or put it "
                              "on PATH); --door nats serves MQTT 3.1.1 without it", key="gateway.door")
        return "mosquitto"
    return "nats"


def mosquitto_config(*, port: int, state_dir: Path, host: str = "127.0.0.1", auth: InternalAuth | None = None,
                     tls: DoorTls | None = None, tls_host: str = "127.0.0.1", anonymous: bool = True,
                     crl: Path | None = None) -> str:
    """The door's config: loopback listener, persistence in ``state_dir``, raised limits.

    With ``auth`` each listener has its own settings: the loopback listener takes the internal user
    (password file) and, when ``anonymous``, anonymous clients confined to ``devices/#`` (ACL file
    ``acl-local``); the TLS listener on ``tls_host:tls.port`` (TLS 1.2 and up) takes device
    certificates when ``tls.require_client_cert`` (the CN is the user name and the client id; ACL
    file ``acl-tls`` names what each device may use; ``crl`` is checked at every handshake).
    """
    lines = []
    if auth is not None:
        lines += [
            "per_listener_settings true",
            f"listener {port} {host}",
            f"allow_anonymous {'true' if anonymous else 'false'}",
            f"password_file {state_dir / 'passwd'}",
            f"acl_file {state_dir / 'acl-local'}",
        ]
        if tls is not None:
            lines += [
                f"listener {tls.port} {tls_host}",
                f"certfile {tls.cert}",
                f"keyfile {tls.key}",
                *([f"cafile {tls.ca}"] if tls.ca is not None else []),
                "tls_version tlsv1.2",
                f"acl_file {state_dir / 'acl-tls'}",
            ]
            if tls.require_client_cert:
                lines += ["require_certificate true", "use_identity_as_username true", "allow_anonymous false",
                          # a device cannot take another one's client id (and session) over
                          "use_username_as_clientid true",
                          *([f"crlfile {crl}"] if crl is not None and crl.is_file() else [])]
            else:
                lines.append(f"allow_anonymous {'true' if anonymous else 'false'}")
    else:
        lines += [f"listener {port} {host}", "allow_anonymous true"]
    if tls is not None:
        # A TLS handshake is several small writes each way: with Nagle's algorithm each waits for the
        # peer's delayed ACK (~40 ms), which held mutual-TLS connection set-ups to ~44/s (bench/door_tls.py).
        lines.append("set_tcp_nodelay true")
    lines += [
        "persistence true",
        f"persistence_location {state_dir}/",
        # Mosquitto saves its in-memory state (sessions, queued messages) to disk only every
        # autosave_interval seconds and at shutdown: a short interval narrows what kill -9 loses.
        "autosave_interval 1",
        f"max_queued_messages {MAX_QUEUED}",
        f"max_inflight_messages {MAX_INFLIGHT}",
        "log_dest stdout",
        # notices carry connections and "Outgoing messages are being dropped"; the once-a-second
        # "Saving in-memory database" line is information and left out
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        lines.append("user root")  # as root without it, Mosquitto drops to user 'mosquitto' and cannot write here
    return "\n".join(lines) + "\n"


def write_config(*, port: int, state_dir: Path, auth: InternalAuth | None = None, tls: DoorTls | None = None,
                 tls_host: str = "127.0.0.1", anonymous: bool = True, crl: Path | None = None,
                 policy: DoorPolicy | None = None) -> Path:
    """Write the door's config (and with ``auth`` its password and ACL files) into ``state_dir``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    conf = state_dir / "mosquitto.conf"
    if auth is not None:
        _write_private(state_dir / "passwd", mosquitto_password_line(auth.user, auth.password) + "\n")
        write_acls(state_dir, auth=auth, anonymous=anonymous, policy=policy or DoorPolicy())
    _write_private(conf, mosquitto_config(port=port, state_dir=state_dir, auth=auth, tls=tls, tls_host=tls_host,
                                          anonymous=anonymous, crl=crl))
    return conf


def write_acls(state_dir: Path, *, auth: InternalAuth, anonymous: bool, policy: DoorPolicy | None = None) -> None:
    """The ACL files: ``acl-local`` (internal user; anonymous clients confined to ``devices/#``) and
    ``acl-tls``: each certificate's identity (its CN, the device id) its own topics, as ``pattern`` lines,
    so a device is confined from its first packet on, without waiting for a reload; anonymous TLS clients
    as on loopback. Whether the device may publish at all (registered, active) is the gateway's check
    (``gateway.require_registration``), which dead-letters what it refuses, counted; revocation is the
    CRL's. (Mosquitto skips a ``%u`` pattern for a user name with ``/``, ``+`` or ``#``.)"""
    del policy  # the registry's view decides at the gateway and through the CRL, not in the ACL
    anon = ["# anonymous clients: device topics only", "topic readwrite devices/#", ""] if anonymous else []
    _write_private(state_dir / "acl-local", "\n".join([*anon, f"user {auth.user}", "topic readwrite #", ""]))
    lines = [*anon, "# a device (its certificate's CN, the device id): its own topics only"]
    lines += [f"pattern write {t}" for t in device_publish_topics("%u")]
    lines += [f"pattern read {t}" for t in device_subscribe_topics("%u")]
    _write_private(state_dir / "acl-tls", "\n".join(lines) + "\n")


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def accepts(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def ensure_session(port: int, *, client_id: str, filters: list[str], expiry_s: int, timeout_s: float = 10.0,
                   auth: InternalAuth | None = None) -> None:
    """Create the gateway's persistent session with its subscriptions at the door, then leave.

    From then on Mosquitto queues device messages for the gateway even before the gateway process
    has connected: without it, what devices publish in between has no subscriber and is dropped
    after its PUBACK.
    """
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    done = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=client_id)
    if auth is not None:
        c.username_pw_set(auth.user, auth.password)
    c.on_connect = lambda cl, u, f, rc, p=None: cl.subscribe([(t, 1) for t in filters])
    c.on_subscribe = lambda cl, u, mid, codes, p=None: done.set()
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = expiry_s
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    try:
        if not done.wait(timeout_s):
            raise ConfigError(f"the Mosquitto door on port {port} did not take the gateway's subscription",
                              key="gateway.door")
    finally:
        c.disconnect()
        c.loop_stop()
