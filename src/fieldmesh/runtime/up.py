"""``fieldmesh up``: the whole pipeline on one machine, supervised.

Processes: nats-server (JetStream + MQTT listener), a gateway worker, a processor worker, the
optional device simulator, the optional CDC capture (``settings.cdc.source``; the processor then
enriches readings as of their event time per ``settings.enrich``), and this supervisor, which also
serves the API. Every child dies with the supervisor (even on kill -9 of the supervisor), so a
restart on the same data dir is clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, Final

from fieldmesh.api.auth import Access
from fieldmesh.api.twins import twin_stats_reader
from fieldmesh.bus import Bus, TopicSpec, load_bus
from fieldmesh.core.errors import ConfigError, FieldmeshError, MissingDependency
from fieldmesh.core.settings import RuntimeSettings, Settings
from fieldmesh.core.topics import DLQ_TOPIC, GATEWAY_GROUP, INGEST_TOPIC, READINGS_TOPIC
from fieldmesh.gateway.admission import describe_checks
from fieldmesh.gateway.sources import MqttSource, ingest_spec
from fieldmesh.obs.metrics import MULTIPROC_ENV, mark_dead, prepare_multiproc_dir
from fieldmesh.runtime.doorauth import DoorPolicy, DoorTls, InternalAuth, internal_auth, jobs_auth, policy_from_registry
from fieldmesh.runtime.doorlog import REASONS as DOOR_REFUSALS
from fieldmesh.runtime.doorlog import DoorRefusals
from fieldmesh.runtime.enrichment import join_topic, source_database
from fieldmesh.runtime.mosquitto import (
    accepts,
    ensure_session,
    find_mosquitto,
    mosquitto_version,
    resolve_door,
    write_config,
)
from fieldmesh.runtime.natsserver import EmbeddedNats, free_port, port_in_use
from fieldmesh.runtime.procs import child_preexec
from fieldmesh.runtime.supervise import Restarts, StallWatch, free_bytes
from fieldmesh.runtime.worker import ensure_topics
from fieldmesh.store import StoreStats, default_store_url, load_store

__all__ = ["DEFAULT_HTTP_PORT", "DEFAULT_MQTT_PORT", "UpOptions", "check_access", "check_door", "check_ports",
           "is_loopback", "run_up"]

log = logging.getLogger("fieldmesh.up")

DEFAULT_MQTT_PORT: Final = 1883
DEFAULT_HTTP_PORT: Final = 8000


@dataclass
class UpOptions:
    """What ``fieldmesh up`` was asked to run."""

    data_dir: Path
    mqtt_port: int = DEFAULT_MQTT_PORT  # 0: a free one
    http_port: int = DEFAULT_HTTP_PORT  # 0: a free one
    # False when the port is only the default: if it is taken, a free one is used and said in the start line
    mqtt_port_chosen: bool = True
    http_port_chosen: bool = True
    http_host: str = "127.0.0.1"  # beyond loopback, authentication must be configured (docs/security.md)
    tls_cert: Path | None = None  # HTTPS for the API: certificate chain (PEM) and its key
    tls_key: Path | None = None
    mqtt_host: str = "127.0.0.1"  # the MQTT door's TLS listener (or its only one); beyond loopback it needs mTLS
    mqtt_tls: DoorTls | None = None  # TLS (and client certificates) at the MQTT door
    mqtt_url: str | None = None
    bus_url: str | None = None
    store_url: str | None = None
    simulate: int = 0
    sim_rate: float = 1.0
    sim_per_message: int = 1
    duration_s: float | None = None
    settings: Settings = field(default_factory=Settings)
    quiet: bool = False
    summary_table: bool = True  # False with --json: the summary goes to stdout as JSON only
    slo_file: Path | None = None  # SLOs (YAML, docs/observability.md): status in /metrics, breaches as alerts
    slo_interval_s: float = 2.0


class _Child:
    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 policy: RuntimeSettings | None = None, ready_line: str | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = Restarts(policy or RuntimeSettings())
        self.failed: str | None = None  # why it is left stopped (an error a restart cannot fix)
        self._log: IO[bytes] | None = None
        # A stage that logs ``ready_line`` once it works (the processor once it fetches) is "starting" until then.
        self._ready_line = ready_line.encode() if ready_line is not None else None
        self._ready = ready_line is None
        self._log_from = 0  # where this start's lines begin in the log

    def ready(self) -> bool:
        """Whether this start of the stage said it works (always, for a stage without a ready line)."""
        if not self._ready and self._ready_line is not None:
            with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
                f.seek(self._log_from)
                self._ready = self._ready_line in f.read()
                # the next look reads only what came since (keeping enough for a line written in two parts)
                self._log_from = max(self._log_from, f.tell() - len(self._ready_line) + 1)
        return self._ready

    def start(self) -> None:
        if self._log is not None:
            self._log.close()
        self.restarts.started()
        self._ready = self._ready_line is None
        with contextlib.suppress(OSError):
            self._log_from = self.log_path.stat().st_size
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child
        # Own session: Ctrl-C reaches the supervisor only, which stops the children in order (drain first).
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     preexec_fn=child_preexec, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def _lock(data_dir: Path) -> IO[str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    f = open(data_dir / ".lock", "w")  # noqa: SIM115 - held for the process lifetime
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(
            f"another 'fieldmesh up' is running on {data_dir}: stop it or pass another --data-dir",
            key="data_dir",
        ) from None
    f.write(str(os.getpid()))
    f.flush()
    return f


def check_ports(opts: UpOptions) -> list[str]:
    """Settle the MQTT and HTTP ports; return the notes the start line must carry.

    A port 0 becomes a free one. A taken port the user chose is an error naming the flag to change; a
    taken default port (1883 is often another broker's) is replaced by a free one, and a note says so.
    """
    notes: list[str] = []
    if opts.mqtt_url is None:
        if opts.mqtt_port == 0:
            opts.mqtt_port = free_port()
        elif port_in_use(opts.mqtt_port):
            if opts.mqtt_port_chosen:
                raise ConfigError(
                    f"MQTT port {opts.mqtt_port} is already in use (another broker?). Pass --mqtt-port with a "
                    f"free port (e.g. --mqtt-port {opts.mqtt_port + 1}, or 0 for any), or use that broker with "
                    f"--mqtt-url mqtt://127.0.0.1:{opts.mqtt_port}",
                    key="mqtt_port",
                )
            taken, opts.mqtt_port = opts.mqtt_port, free_port()
            notes.append(f"MQTT port {taken} is taken, so MQTT is on {opts.mqtt_port} (choose with --mqtt-port)")
    http_taken = opts.http_port != 0 and port_in_use(opts.http_port, opts.http_host)
    if http_taken and opts.http_port_chosen:
        raise ConfigError(
            f"HTTP port {opts.http_port} is already in use: pass --http-port with a free port "
            f"(e.g. --http-port {opts.http_port + 1}, or 0 for any)",
            key="http_port",
        )
    if opts.http_port == 0 or http_taken:
        taken = opts.http_port
        opts.http_port = free_port()
        while opts.mqtt_url is None and opts.http_port == opts.mqtt_port:  # neither is bound yet
            opts.http_port = free_port()
        if taken:
            notes.append(f"HTTP port {taken} is taken, so the API is on {opts.http_port} (choose with --http-port)")
    return notes


def is_loopback(host: str) -> bool:
    """Whether a listener on ``host`` is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond loopback


def check_door(opts: UpOptions, door: str) -> None:
    """Refuse a door that would be open beyond loopback without authentication (a ConfigError naming
    what to configure), and flag combinations that cannot work."""
    tls = opts.mqtt_tls
    if door == "external":
        if tls is not None or not is_loopback(opts.mqtt_host):
            raise ConfigError("--mqtt-url uses an external broker: configure TLS and access control on that broker "
                              "(--mqtt-tls-*/--mqtt-host apply to the embedded door only)", key="mqtt_url")
        return
    if tls is not None:
        tls.check()
    if not is_loopback(opts.mqtt_host) and (tls is None or not tls.require_client_cert):
        raise ConfigError(
            f"--mqtt-host {opts.mqtt_host} opens the MQTT door beyond loopback, and devices would not authenticate: "
            "configure TLS with device certificates (--mqtt-tls-cert, --mqtt-tls-key, --mqtt-ca and "
            "--require-client-cert; the certificates come from the device registry); see docs/security.md",
            key="mqtt_host")
    if opts.simulate and tls is not None and (door == "nats" or tls.require_client_cert):
        raise ConfigError("--simulate publishes plain MQTT without a certificate, which this door does not take: "
                          "run it without --mqtt-tls-* (or point 'fieldmesh simulate' at another door)",
                          key="simulate")
    if tls is not None and tls.port == opts.mqtt_port and door == "mosquitto":
        raise ConfigError(f"--mqtt-tls-port {tls.port} is the plain MQTT port too: choose another one",
                          key="mqtt_tls_port")
    if tls is not None and port_in_use(tls.port, "127.0.0.1" if opts.mqtt_host in ("0.0.0.0", "::")
                                        else opts.mqtt_host.strip("[]")):
        raise ConfigError(f"MQTT TLS port {tls.port} is already in use: pass --mqtt-tls-port with a free port",
                          key="mqtt_tls_port")


def _door_mode(opts: UpOptions, door: str, policy: DoorPolicy | None) -> str:
    """What the start line says about who may use the door."""
    tls = opts.mqtt_tls
    if door == "external":
        return "door: the external broker's own access control"
    if tls is None:
        return ("door: local-only (loopback, anonymous MQTT clients confined to devices/#; internal bus closed "
                "to them)")
    where = f"{opts.mqtt_host}:{tls.port}"
    if tls.require_client_cert:
        n = len(policy.identities) if policy else 0
        return (f"door: mutual TLS on {where} (device certificates from the registry: {n} valid; each device "
                "confined to its own topics)")
    return f"door: TLS on {where} without client certificates (loopback only; anonymous clients confined to devices/#)"


def _open_registry(store_url: str) -> Any:
    """The device registry of the hot store (the door's certificates), or a ConfigError."""
    try:
        from fieldmesh.store.registry import DeviceRegistry
    except ImportError as exc:
        raise ConfigError("--require-client-cert needs the device registry (fieldmesh.store.registry), which this "
                          "installation lacks", key="require_client_cert") from exc
    return DeviceRegistry(store_url)


def check_access(store_url: str, settings: Settings, *, http_host: str, tls_cert: Path | None,
                 tls_key: Path | None) -> Access:
    """The API's authentication, or a ConfigError naming what to configure.

    Local-only mode (no credentials) needs every listener on loopback: the MQTT doors of ``up``
    always are; the API is unless ``--http-host`` says otherwise. Beyond loopback, ``up`` starts
    only once an admin key exists or an OpenID Connect issuer is set (like Mosquitto 2).
    """
    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("HTTPS needs both --tls-cert and --tls-key",
                          key="tls_cert" if tls_cert is None else "tls_key")
    for flag, path in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag} {path}: no such file", key=flag.strip("-").replace("-", "_"))
    access = Access(store_url, settings.access, local_only=is_loopback(http_host))
    if not access.local_only and not access.configured():
        access.close()
        raise ConfigError(
            f"--http-host {http_host} serves the API beyond loopback, and no authentication is configured: "
            "create an admin key first ('fieldmesh keys create --role admin', same --data-dir/--store-url) or "
            "set an OpenID Connect issuer (FIELDMESH__ACCESS__OIDC_ISSUER); see docs/security.md",
            key="http_host",
        )
    return access


async def run_up(opts: UpOptions, *, ready: asyncio.Event | None = None) -> dict[str, Any]:
    """Run the pipeline until Ctrl-C, SIGTERM or ``duration_s``; return the final summary."""
    from rich.console import Console

    console = Console(stderr=True, quiet=opts.quiet)
    data_dir = opts.data_dir.resolve()
    lock = _lock(data_dir)
    try:
        access = check_access(opts.store_url or default_store_url(data_dir), opts.settings, http_host=opts.http_host,
                              tls_cert=opts.tls_cert, tls_key=opts.tls_key)
    except BaseException:
        lock.close()
        raise
    try:
        port_notes = check_ports(opts)
        settings = _with_cdc_database(opts.settings)
        door_kind = resolve_door(settings.gateway.door, external_mqtt=opts.mqtt_url is not None)
        check_door(opts, door_kind)
        slos = _load_slos(opts.slo_file)
    except BaseException:
        access.close()
        lock.close()
        raise
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)
    policy = settings.runtime
    tls = opts.mqtt_tls
    mtls = tls is not None and tls.require_client_cert
    if mtls and door_kind != "external":
        # The door confines each device to its own topics: a payload naming another device is a device
        # publishing for another one (unauthorized), not a bridge's mistake (device_mismatch). Mosquitto
        # takes every certificate of the CA that is not on the CRL: the gateway refuses devices that are
        # not registered as active (dead letters, counted), which nats-server does at CONNECT itself.
        gw = {"authenticated_topics": True}
        if door_kind == "mosquitto":
            gw["require_registration"] = True
        settings = settings.model_copy(update={"gateway": settings.gateway.model_copy(update=gw)})
    auth = internal_auth(data_dir)  # the internal user of the embedded bus and the Mosquitto door
    nats: EmbeddedNats | None = None
    children: list[_Child] = []
    sim: _Child | None = None
    server: Any = None
    door_registry: Any = None  # the device registry the door's certificates come from (mutual TLS)
    refusals: list[DoorRefusals] = []  # what the door (and the closed bus) refused, counted from their logs
    t_start = time.monotonic()
    try:
        store_url = opts.store_url or default_store_url(data_dir)
        store = load_store(store_url)  # creates or checks the schema before anything writes
        at_start = store.stats()  # before any worker runs: the summary's "this run" is the difference
        store.close()
        door_policy: DoorPolicy | None = None
        if mtls and door_kind != "external":
            door_registry = _open_registry(store_url)
            door_policy = await asyncio.to_thread(policy_from_registry, door_registry)
        nats_door = door_kind == "nats"  # the nats-server MQTT listener is the door (not Mosquitto, not external)
        if opts.bus_url is None or nats_door:
            # The embedded nats-server is the bus, or (with --bus-url) only the MQTT door and the
            # FM_INGEST stream that captures what devices publish, before the gateway forwards it.
            # Either way it is closed: the internal user for fieldmesh, device topics for MQTT clients.
            # its client port: not one chosen for a listener that is not bound yet (the API's, the door's)
            taken = {opts.http_port, opts.mqtt_port, tls.port if tls else 0}
            nats = EmbeddedNats(store_dir=data_dir / "nats", port=free_port(avoid=taken),
                                mqtt_port=(tls.port if tls else opts.mqtt_port) if nats_door else None,
                                fsync=settings.bus.fsync, disk_reserve=policy.disk_reserve_mb * 2**20,
                                auth=auth, mqtt_host=opts.mqtt_host, mqtt_tls=tls if nats_door else None,
                                mqtt_anonymous=not mtls, policy=door_policy,
                                jobs_auth=jobs_auth(data_dir) if nats_door and tls is None else None)
            refusals.append(DoorRefusals(nats.log_path, "nats"))  # from here on: not what earlier runs logged
            await _start_door(nats, settings)
        bus_url = opts.bus_url or (nats.url if nats else "")
        door_url = nats.url if nats is not None and nats_door else None  # where FM_INGEST lives
        bus_name = "bus" if door_url is None or door_url == bus_url else "door"  # the nats-server's health key
        (data_dir / "runtime.json").write_text(json.dumps({"bus_url": bus_url, "store_url": store_url,
                                                           "pid": os.getpid()}))
        # the CDC source URL (it may hold a password) goes to the capture alone, through its environment
        cfg_settings = json.loads(settings.model_dump_json(exclude={"data_dir", "cdc"}))
        async with contextlib.AsyncExitStack() as stack:
            bus = await stack.enter_async_context(load_bus(bus_url))
            door: Bus = (bus if door_url in (None, bus_url)
                         else await stack.enter_async_context(load_bus(door_url or "")))
            await ensure_topics(bus, settings)
            if settings.cdc.source is not None:
                cdc = await _start_cdc(bus, bus_url, settings, data_dir, logs, store_url)
                children.append(cdc)
                console.print(f"CDC: tables {settings.cdc.tables} captured into the bus "
                              f"(snapshot done; log {cdc.log_path})")
            door_child = None
            mosq_conf: dict[str, Any] = {"port": opts.mqtt_port, "state_dir": data_dir / "mosquitto", "auth": auth,
                                         "tls": tls, "tls_host": opts.mqtt_host, "anonymous": not mtls,
                                         "crl": data_dir / "ca" / "crl.pem", "policy": door_policy}
            if door_kind == "mosquitto":
                refusals.append(DoorRefusals(logs / "mosquitto.log", "mosquitto"))
                door_child = await asyncio.to_thread(_start_mosquitto, mosq_conf, logs)
            # the gateway's password reaches it in a file (mqtt_auth_file), not on its command line
            gw_mqtt = f"mqtt://{auth.user}@127.0.0.1:{opts.mqtt_port}" if door_child else opts.mqtt_url
            gw_settings = cfg_settings
            if door_child is not None:
                # The door has one gateway: a plain subscription, which Mosquitto 2.0 restores with the
                # session after a crash (it did not restore the shared one: messages published before
                # the gateway re-subscribed were lost).
                gw_settings = {**cfg_settings, "gateway": {**cfg_settings["gateway"], "share_group": ""}}
            gw_cfg = {"bus_url": bus_url, "mqtt_url": gw_mqtt, "settings": gw_settings, "sole": True,
                      "ingest_bus_url": door_url if door_url != bus_url else None,
                      "mqtt_auth_file": str(auth.path) if door_child else None,
                      # stable across restarts of this data dir, so the broker keeps its persistent session
                      "client_id": f"fm-gw-{settings.gateway.share_group}-{zlib.crc32(str(data_dir).encode()):08x}",
                      # the schema registry (payloads written against a registered schema) and the device
                      # registry live in the hot store
                      "schemas_url": store_url, "lineage_store": store_url,  # its lineage events (docs/lineage.md)
                      **({"registry_url": store_url} if settings.gateway.require_registration else {})}
            if door_child is not None:
                await asyncio.to_thread(ensure_session, opts.mqtt_port, client_id=str(gw_cfg["client_id"]),
                                        filters=MqttSource.filters(None),
                                        expiry_s=settings.gateway.session_expiry_s, auth=auth)
            pr_cfg: dict[str, Any] = {"bus_url": bus_url, "store_url": store_url, "settings": cfg_settings}
            if settings.features.views_file is not None:  # the worker has no data dir: the online URL in full
                cfg_settings["features"]["online_url"] = settings.features.online(data_dir)
                console.print(f"features: views from {settings.features.views_file}, online store "
                              f"{settings.features.online(data_dir).split('?')[0]}")
            if settings.lake.enabled and not _lake_installed():
                if settings.lake.url is not None:
                    raise MissingDependency("pyiceberg", "lake")
                console.print("lake: off (pyiceberg is not installed: pip install 'fieldmesh[lake]'; "
                              "--no-lake silences this)")
                settings = settings.model_copy(update={"lake": settings.lake.model_copy(update={"enabled": False})})
            if settings.lake.enabled and settings.cdc.source is not None:
                from fieldmesh.runtime.cdclake import start_cdc_lake

                stack.push_async_callback(await start_cdc_lake(bus, settings, data_dir, _captured(settings)))
                console.print("lake: captured tables mirrored as Iceberg tables cdc_<schema>_<table>, with their "
                              "change logs cdc_<schema>_<table>_changes")
            if settings.lake.enabled:
                pr_cfg["lake_dir"] = str(data_dir)
                console.print(f"lake: Iceberg tables {settings.lake.namespace}.* in "
                              f"{settings.lake.url or data_dir / 'lake'}, committed every "
                              f"{settings.lake.commit_interval_s:g}s at most ('fieldmesh lake info')")
            py = [sys.executable, "-m", "fieldmesh.runtime.worker"]
            # the workers write their metrics to files the API merges: one /metrics (obs/metrics.py)
            metrics_dir = prepare_multiproc_dir(data_dir / "metrics")
            stage_env = {**os.environ, MULTIPROC_ENV: str(metrics_dir)}
            stages = [
                _Child("gateway", [*py, "gateway", json.dumps(gw_cfg)], logs / "gateway.log", env=stage_env,
                       policy=policy, ready_line="gateway running"),
                _Child("processor", [*py, "processor", json.dumps(pr_cfg)], logs / "processor.log", env=stage_env,
                       policy=policy, ready_line="processor running"),
            ]
            jobs_child = _jobs_child(opts, store_url, door_kind, nats, auth, tls is not None, logs, policy)
            if jobs_child is not None:
                stages.append(jobs_child)
            else:
                console.print("jobs: the job controller is not started (the nats door takes TLS only here); run "
                              "'fieldmesh jobs controller' against a door it can reach (docs/rollouts.md)")
            if door_child is not None or (nats_door and tls is None):
                # the twin service (docs/twins.md): a client of the door, like the devices it serves
                tw_cfg = {"store_url": store_url, "mqtt_url": f"mqtt://127.0.0.1:{opts.mqtt_port}",
                          "mqtt_auth_file": str(auth.path) if door_child else None,
                          "client_id": f"fm-twins-{zlib.crc32(str(data_dir).encode()):08x}",
                          "stats_path": str(logs / "twins-stats.json")}
                stages.append(_Child("twins", [*py, "twins", json.dumps(tw_cfg)], logs / "twins.log", policy=policy))
            for c in stages:
                c.start()
            children.extend(stages)
            if door_child is not None:
                children.append(door_child)  # after the workers: stopped last, once the gateway has drained it

            async def lag() -> dict[str, int]:
                out: dict[str, int] = {}
                with contextlib.suppress(Exception):
                    if door_url is not None:
                        out["gateway"] = await door.pending(INGEST_TOPIC, group=GATEWAY_GROUP)
                    out["processor"] = await bus.pending(READINGS_TOPIC, group="fm-processor")
                    out["dlq"] = await bus.pending(DLQ_TOPIC, group="fm-processor-dlq")
                return out

            watch = StallWatch(policy.stall_after_s)
            progress_store = load_store(store_url, readonly=True)
            stack.callback(progress_store.close)

            async def sample() -> None:
                """Feed the stall watch: each stage's lag and what it has acknowledged or committed."""
                lags = await asyncio.wait_for(lag(), 5)
                if door_url is not None and "gateway" in lags:
                    with contextlib.suppress(Exception):
                        acked = await asyncio.wait_for(door.committed(INGEST_TOPIC, group=GATEWAY_GROUP), 2)
                        watch.observe("gateway", lag=lags["gateway"], marker=tuple(sorted(acked.items())))
                if "processor" in lags:
                    st = progress_store.stats()  # the processor commits its counters with the readings
                    watch.observe("processor", lag=lags["processor"] + lags.get("dlq", 0),
                                  marker=(st.received, st.stored, st.duplicates, sum(st.dead_lettered.values())))

            async def sampler() -> None:
                while True:
                    with contextlib.suppress(Exception):
                        await sample()
                    await asyncio.sleep(0.5)

            sampler_task = asyncio.create_task(sampler(), name="progress")
            stack.callback(sampler_task.cancel)
            nats_restarts = Restarts(policy)
            nats_failed: str | None = None
            door_closed: str | None = None  # why the MQTT door is closed (the disk is nearly full)
            reserve = policy.disk_reserve_mb * 2**20

            def stage_health(c: _Child) -> str:
                if c.failed:
                    return f"failed: {c.failed}"
                if not c.alive():
                    return "restarting" if c.restarts.next_start_at is not None else "down"
                if not c.ready():
                    return "starting"
                stalled = watch.stalled(c.name)
                if stalled is None:
                    return "ok"
                return (f"stalled: {stalled[0]} waiting, no progress for {stalled[1]:.0f}s "
                        f"(last log line: {_last_line(c.log_path)[:300]})")

            lake_cache: list[Any] = [-1.0, "ok", None]  # (when, value, catalog)

            def lake_health() -> str:
                """"ok" unless the lake is behind the hot store with no commit for 3 intervals (+30 s)."""
                if time.monotonic() - lake_cache[0] < 2.0:
                    return str(lake_cache[1])
                from fieldmesh.store.lake import lake_lag

                try:
                    if lake_cache[2] is None:
                        from fieldmesh.store.lake import open_catalog

                        lake_cache[2] = open_catalog(settings.lake, data_dir)
                    behind, age_s = lake_lag(lake_cache[2], settings.lake.namespace, progress_store.positions())
                    value = "ok"
                    if behind and age_s is not None and age_s > 3 * settings.lake.commit_interval_s + 30:
                        value = (f"stalled: last commit {age_s:.0f}s ago, behind the hot store on {behind} "
                                 f"partitions (see {logs / 'processor.log'})")
                except Exception as exc:  # the catalog unreachable: the hot store keeps everything meanwhile
                    value = f"unreachable: {type(exc).__name__}: {exc}"[:300]
                lake_cache[:2] = [time.monotonic(), value]
                return value

            registry: list[Any] = []  # the device registry, opened on first use when registration is enforced

            def registry_health() -> str:
                """Whether the registry the gateway reads can be read (it keeps the last devices it read)."""
                from fieldmesh.store.registry import DeviceRegistry

                try:
                    if not registry:
                        registry.append(DeviceRegistry(store_url))
                        stack.callback(registry[0].close)
                    registry[0].version()
                    return "ok"
                except Exception as exc:
                    return (f"error: the device registry cannot be read ({type(exc).__name__}: {exc}"[:300]
                            + "); the gateway keeps the devices it read last")

            async def health() -> dict[str, Any]:
                h: dict[str, Any] = {c.name: stage_health(c) for c in children}
                if settings.lake.enabled:
                    h["lake"] = await asyncio.to_thread(lake_health)
                if nats is not None:
                    h[bus_name] = ("ok" if nats.alive() else f"failed: {nats_failed}" if nats_failed
                                   else f"restarting (restart {nats_restarts.restarts})")
                    h["disk"] = "ok" if door_closed is None else door_closed
                if settings.gateway.require_registration:
                    h["registry"] = await asyncio.to_thread(registry_health)
                return h

            import uvicorn

            from fieldmesh.api.app import create_app

            plag: list[Any] = [-1.0, {}]  # (when, value): counting per partition costs a request per partition

            async def partition_lag() -> dict[str, dict[int, int]]:
                """Lag per partition, at most a second old: the processor's from the store's positions."""
                if time.monotonic() - plag[0] < 1.0:
                    return dict(plag[1])
                out: dict[str, dict[int, int]] = {}
                with contextlib.suppress(Exception):
                    if door_url is not None:
                        out["gateway"] = await door.lag(INGEST_TOPIC, group=GATEWAY_GROUP)
                    pos = progress_store.positions()
                    for stage, topic, group in (("processor", READINGS_TOPIC, "fm-processor"),
                                                ("dlq", DLQ_TOPIC, "fm-processor-dlq")):
                        out[stage] = await bus.lag(topic, group=group,
                                                   positions={p: o for (t, p), o in pos.items() if t == topic})
                plag[:] = [time.monotonic(), out]
                return out

            def door_refused() -> dict[str, int]:
                total = dict.fromkeys(DOOR_REFUSALS, 0)
                for r in refusals:
                    for reason, n in r.counts().items():
                        total[reason] += n
                return total

            slo_collectors = _start_slos(slos, stack, store_url, metrics_dir, opts.slo_interval_s)
            app = create_app(store_url, health=health, lag=lag, partition_lag=partition_lag, access=access,
                             ca_dir=data_dir / "ca", door_refused=door_refused if refusals else None,
                             metrics_dir=metrics_dir, collectors=slo_collectors,
                             online_url=settings.features.online(data_dir)
                             if settings.features.views_file or settings.features.online_url else None,
                             twin_stats=twin_stats_reader(logs / "twins-stats.json"),
                             lake=(settings.lake, data_dir) if settings.lake.enabled else None)
            app.state.provision.start_crl_refresher()
            server = _api_server(uvicorn.Config(
                app, host=opts.http_host, port=opts.http_port, log_level="warning", lifespan="off",
                ssl_certfile=opts.tls_cert, ssl_keyfile=opts.tls_key))
            api_task = asyncio.create_task(server.serve(), name="api")
            mqtt_url = opts.mqtt_url or f"mqtt://127.0.0.1:{opts.mqtt_port}"
            if tls is not None and door_kind != "external":
                tls_host = f"[{opts.mqtt_host}]" if ":" in opts.mqtt_host else opts.mqtt_host
                tls_url = f"mqtts://{tls_host}:{tls.port}"
                mqtt_url = tls_url if nats_door else f"{tls_url} (and {mqtt_url} on loopback)"
            api_host = f"[{opts.http_host}]" if ":" in opts.http_host else opts.http_host
            api_url = f"{'https' if opts.tls_cert else 'http'}://{api_host}:{opts.http_port}/api/v1"
            if opts.simulate:
                sim = _Child("simulator", [sys.executable, "-m", "fieldmesh.runtime.devices", "--mqtt-url",
                                           mqtt_url, "--devices", str(opts.simulate), "--rate", str(opts.sim_rate),
                                           "--per-message", str(opts.sim_per_message)], logs / "simulator.log")
                sim.start()
            console.print(
                f"[bold green]fieldmesh up[/]: devices publish to [bold]{mqtt_url}[/] "
                f"(topic devices/<id>/telemetry); API [bold]{api_url}[/] ({access.describe()}); "
                f"{_door_line(door_kind)}; {_door_mode(opts, door_kind, door_policy)}; bus {bus_url}; store {store_url}"
                + (f"; simulating {opts.simulate} devices" if opts.simulate else "")
                + (f"; {checks}" if (checks := describe_checks(settings.gateway)) else "")
                + "".join(f"; {note}" for note in port_notes)
            )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            if ready is not None:
                ready.set()
            deadline = time.monotonic() + opts.duration_s if opts.duration_s else None
            watch_door = _DoorWatch(door_registry, door_policy, nats if nats_door else None, door_child, mosq_conf,
                                    console) if door_registry is not None else None
            while not stop.is_set():
                if deadline and time.monotonic() >= deadline:
                    break
                if watch_door is not None:
                    try:
                        await watch_door.poll()
                    except Exception as exc:  # a registry outage keeps the door as it is; said once a minute
                        watch_door.failed(exc)
                if nats is not None and nats_failed is None:
                    if door_url is not None and reserve:
                        door_closed = await _watch_disk(nats, data_dir, reserve, door_closed, console)
                    if not nats.alive():
                        nats_failed = await _restart_nats(nats, nats_restarts, console)
                bus_ok = nats is None or nats.alive()
                for c in children:
                    if c.alive() or c.failed is not None:
                        continue
                    if c.restarts.next_start_at is None:  # it has just exited
                        if c.env is stage_env and c.proc is not None:
                            mark_dead(metrics_dir, c.proc.pid)
                        if _cdc_gave_up(c):
                            c.failed = _last_line(c.log_path)
                            console.print(f"[bold red]the CDC capture stopped on an error a restart cannot fix:[/] "
                                          f"{c.failed}\nReadings are still stored, enriched from the state so "
                                          f"far; fix the source and restart fieldmesh up (see {c.log_path})")
                            continue
                        # an exit while the bus was down is not the worker's fault: it never adds to a give-up
                        if c.restarts.exited(count=bus_ok):
                            c.failed = _last_line(c.log_path)
                            console.print(
                                f"[bold red]{c.name} exited {policy.start_failures} times in a row within "
                                f"{policy.start_grace_s:.0f}s of starting; it is left stopped (a restart cannot "
                                f"fix this):[/] {c.failed}\nFix what it names (see {c.log_path}) and restart "
                                f"fieldmesh up")
                            log.error("%s left stopped after %d failed starts: %s", c.name,
                                      policy.start_failures, c.failed)
                            continue
                        console.print(f"[yellow]{c.name} exited ({c.proc and c.proc.returncode}); restarting in "
                                      f"{c.restarts.wait_s():.1f}s (see {c.log_path})[/]")
                    if c.restarts.due():
                        watch.forget(c.name)
                        c.start()
                if api_task.done():
                    raise ConfigError(f"the API server stopped: {api_task.exception()!r}", key="http_port")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
            console.print("stopping: draining the pipeline ...")
            if sim is not None:
                sim.stop()
            drain_until = time.monotonic() + 30
            while time.monotonic() < drain_until and all(c.alive() for c in children if c.failed is None):
                if sum((await lag()).values()) == 0:
                    break
                await asyncio.sleep(0.2)
    finally:
        for c in [*([sim] if sim else []), *children]:
            c.stop()
        if server is not None:
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(api_task, 5)
            server.config.app.state.provision.close()
        if nats is not None:
            nats.stop()
        if door_registry is not None:
            door_registry.close()
        access.close()
        lock.close()
    summary = _summary(load_store(store_url, readonly=True), time.monotonic() - t_start, at_start)
    if opts.summary_table:
        _print_summary(console, summary)
    return summary


def _load_slos(path: Path | None) -> list[Any]:
    """The SLOs of ``--slo FILE`` (a ConfigError, exit 2, before anything starts)."""
    if path is None:
        return []
    from fieldmesh.obs.slo import load_slos

    return load_slos(path.resolve())


def _start_slos(slos: list[Any], stack: contextlib.AsyncExitStack, store_url: str, metrics_dir: Path,
                interval_s: float) -> list[Any]:
    """Evaluate the SLOs in the background (status as metrics, breaches as alerts ``slo:<name>``); the
    collectors ``/metrics`` serves."""
    if not slos:
        return []
    from fieldmesh.obs.metrics import merged_histogram
    from fieldmesh.obs.slo import SloAlerts, SloCollector, SloEvaluator, SloRunner
    from fieldmesh.store.alerts import AlertTables

    store = load_store(store_url, readonly=True)
    stack.callback(store.close)
    tables = AlertTables(store_url)
    stack.callback(tables.close)
    evaluator = SloEvaluator(slos, last_seen=store.last_seen, counters=store.stats,
                             latency=partial(merged_histogram, metrics_dir, "fieldmesh_event_to_stored_seconds"))
    task = asyncio.create_task(SloRunner(evaluator, SloAlerts(tables), interval_s=interval_s).run(), name="slo")
    stack.callback(task.cancel)
    log.info("SLOs: %s", ", ".join(f"{s.name} ({s.kind})" for s in slos))
    return [SloCollector(evaluator)]


async def _start_door(nats: EmbeddedNats, settings: Settings) -> None:
    """Start nats-server with FM_INGEST in place before its MQTT listener opens.

    The listener PUBACKs a QoS 1 publish whether or not a stream captures the subject: a device
    publishing before FM_INGEST exists would be acknowledged and lost. So the server starts without
    the listener, the stream is created (or checked), then the server restarts with it.
    """
    mqtt_port, nats.mqtt_port = nats.mqtt_port, None
    await asyncio.to_thread(nats.start)
    if mqtt_port is None:
        return
    async with load_bus(nats.url) as b:
        # the gateway's own consumer, as it will make it (so a consumer of an older data dir keeps its place)
        consumer = await b.ingest(ingest_spec(settings.bus.retention_s), group=GATEWAY_GROUP, sole=True)
        await consumer.close()
    nats.stop()
    nats.mqtt_port = mqtt_port
    await asyncio.to_thread(nats.start)


async def _restart_nats(nats: EmbeddedNats, restarts: Restarts, console: Any) -> str | None:
    """Restart a dead nats-server on its ports and store dir, with the workers' backoff policy.

    Returns:
        The error it gave up on (it failed at start ``start_failures`` times in a row), else None.
    """
    if restarts.next_start_at is None:  # it has just died
        rc = nats.proc.returncode if nats.proc else None
        if restarts.exited():
            return _gave_up_nats(nats, console)
        console.print(f"[yellow]nats-server exited ({rc}); restarting it on the same ports and store dir "
                      f"in {restarts.wait_s():.1f}s (see {nats.log_path})[/]")
        log.warning("nats-server exited (%s); restarting", rc)
    if not restarts.due():
        return None
    restarts.started()
    try:
        await asyncio.to_thread(nats.start)
    except FieldmeshError as exc:
        log.warning("nats-server restart failed: %s", exc)
        if restarts.exited():
            return _gave_up_nats(nats, console)
        return None
    console.print(f"nats-server is back (restart {restarts.restarts}): streams and consumer positions recovered "
                  f"from {nats.store_dir}")
    return None


def _gave_up_nats(nats: EmbeddedNats, console: Any) -> str:
    err = _last_line(nats.log_path) if nats.log_path.exists() else "no output"
    console.print(f"[bold red]nats-server failed at every start; it is left stopped:[/] {err}\n"
                  f"Fix what it names (see {nats.log_path}) and restart fieldmesh up")
    log.error("nats-server left stopped: %s", err)
    return err


async def _watch_disk(nats: EmbeddedNats, data_dir: Path, reserve: int, closed: str | None,
                      console: Any) -> str | None:
    """Guard the disk of the data dir; return what /health should say about it (None: ok).

    nats-server's MQTT listener acknowledges a QoS 1 publish once its own ``$MQTT_msgs`` store took
    it, not once the stream capturing the subject (FM_INGEST) stored it; on a full disk the write
    fails after the acknowledgement, and the reading is lost. Two guards keep that from happening:

    - JetStream's file budget (``max_file_store``, set at each start to what it holds plus the free
      space above the reserve): past it, JetStream refuses at once, so the device gets no PUBACK and
      retries. When space comes back while JetStream is at its budget, nats-server is restarted with
      a larger one.
    - Below the reserve (other files grew, such as the SQLite store), the MQTT door is closed
      (nats-server restarted without its MQTT listener) until free space is 1.5 x the reserve.
    """
    free = free_bytes(data_dir)
    mib = 2**20
    budget = nats.max_file_store or 0
    used = nats.file_store_used() if budget else 0
    restart = False
    if nats.mqtt_port and free < reserve:
        closed = (f"low: {free // mib} MiB free on {data_dir}, below the reserve of {reserve // mib} MiB "
                  f"(FIELDMESH__RUNTIME__DISK_RESERVE_MB): the MQTT door is closed until space is freed")
        console.print(f"[bold red]disk {closed}[/]")
        log.error("disk %s", closed)
        nats.mqtt_port, nats.mqtt_port_closed = None, nats.mqtt_port
        restart = True
    elif nats.mqtt_port_closed and free >= reserve * 3 // 2:
        console.print(f"disk: {free // mib} MiB free again on {data_dir}: the MQTT door is open again")
        log.warning("disk space is back (%d MiB free): the MQTT door is open again", free // mib)
        nats.mqtt_port, nats.mqtt_port_closed = nats.mqtt_port_closed, None
        closed, restart = None, True
    elif nats.mqtt_port and budget and used >= budget - mib:
        if nats.file_budget() >= budget + max(reserve // 2, mib):
            console.print(f"disk: space is back on {data_dir}: raising JetStream's budget (restarting nats-server)")
            log.warning("disk space is back: raising JetStream's file budget")
            closed, restart = None, True
        elif closed is None:
            closed = (f"full: JetStream holds {used // mib} MiB, its budget on {data_dir} (free space minus the "
                      f"reserve of {reserve // mib} MiB): devices get no PUBACK and retry until space is freed")
            console.print(f"[bold red]disk {closed}[/]")
            log.error("disk %s", closed)
    elif nats.mqtt_port and closed is not None:
        log.warning("disk: JetStream is below its budget again")
        closed = None
    if restart:
        nats.stop()
        with contextlib.suppress(FieldmeshError):
            await asyncio.to_thread(nats.start)
    return closed


def _api_server(config: Any) -> Any:
    """A uvicorn server that leaves SIGINT and SIGTERM to ``up``.

    uvicorn (0.29+) takes both signals while it serves and stops on them: on Ctrl-C or SIGTERM it
    then raced ``up``'s own handler, and ``up`` sometimes reported "the API server stopped" (exit 2)
    instead of draining the pipeline. ``up`` stops the server itself, after the drain.
    """
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return _Server(config)


def _jobs_child(opts: UpOptions, store_url: str, door_kind: str, nats: EmbeddedNats | None, auth: InternalAuth,
                tls: bool, logs: Path, policy: Any) -> _Child | None:
    """The job and rollout controller (docs/rollouts.md), a process of its own, on the MQTT door: at
    nats-server's as its own user (it may write devices' jobs/notify and read their updates, nothing
    else), at Mosquitto's as the internal user (on the loopback listener), at an external broker as
    configured there. None when it cannot reach the door (nats-server's door with TLS only)."""
    argv = [sys.executable, "-m", "fieldmesh.cli.jobs", "controller", "--store-url", store_url]
    if door_kind == "external":
        argv += ["--mqtt-url", opts.mqtt_url or ""]
    elif door_kind == "mosquitto":
        argv += ["--mqtt-url", f"mqtt://127.0.0.1:{opts.mqtt_port}", "--auth-file", str(auth.path)]
    elif nats is not None and nats.jobs_auth is not None and not tls:
        argv += ["--mqtt-url", f"mqtt://127.0.0.1:{opts.mqtt_port}", "--auth-file", str(nats.jobs_auth.path)]
    else:
        return None
    return _Child("jobs", argv, logs / "jobs.log", policy=policy)


def _door_line(door: str) -> str:
    """Which MQTT versions are served, by what, and what a PUBACK means (docs/pipeline.md, "Doors")."""
    if door == "nats":
        return ("MQTT 3.1.1 by nats-server (PUBACK once JetStream stored the message; "
                "--door mosquitto for MQTT 5)")
    if door == "mosquitto":
        binary = find_mosquitto() or "mosquitto"
        return (f"MQTT 3.1.1 and 5 by Mosquitto {mosquitto_version(binary)} "
                "(PUBACK once Mosquitto has the message in memory)")
    return "an external MQTT broker"


def _start_mosquitto(conf_kw: dict[str, Any], logs: Path, child: _Child | None = None) -> _Child:
    """Start (or restart) the Mosquitto door and wait until it accepts connections (the gateway connects next)."""
    binary = find_mosquitto()
    assert binary is not None  # resolve_door checked
    port = int(conf_kw["port"])
    conf = write_config(**conf_kw)
    if child is None:
        # Mosquitto logs to stdout (our file) through stdio, which a file makes block-buffered: line buffering
        # (coreutils' stdbuf, where present) puts each line in the log as it happens, for operators and for
        # the refusals counted from it (runtime/doorlog.py)
        stdbuf = shutil.which("stdbuf")
        cmd = [binary, "-c", str(conf)]
        child = _Child("mosquitto", [stdbuf, "-oL", *cmd] if stdbuf else cmd, logs / "mosquitto.log")
    child.start()
    deadline = time.monotonic() + 20
    while not accepts(port):
        if not child.alive() or time.monotonic() > deadline:
            child.stop()
            raise ConfigError(f"the Mosquitto door did not start on port {port}: {_last_line(child.log_path)}",
                              key="gateway.door")
        time.sleep(0.05)
    return child


class _DoorWatch:
    """Keep the door in step with the device registry: poll its version about every second (and rebuild
    the policy once a minute anyway, as certificates expire without a change), then reload or restart
    the door. nats-server reloads users in place and closes the connections of removed ones; Mosquitto
    reloads its ACLs on SIGHUP, and is restarted when a certificate left (it checks certificates and
    its CRL only at a handshake), which closes every connection so that devices reconnect."""

    def __init__(self, registry: Any, policy: DoorPolicy | None, nats: EmbeddedNats | None, mosquitto: _Child | None,
                 mosq_conf: dict[str, Any], console: Any) -> None:
        self.registry = registry
        self.policy = policy or DoorPolicy()
        self.nats = nats
        self.mosquitto = mosquitto
        self.mosq_conf = mosq_conf
        self.console = console
        self.version: int | None = None
        self.next_poll = 0.0
        self.rebuild_at = time.monotonic() + 60
        self.crl_mtime = _mtime(mosq_conf["crl"])
        self.warned_at = 0.0
        self.parsed: dict[tuple[str, str], Any] = {}  # certificates parsed so far, by (device, serial)

    async def poll(self) -> None:
        now = time.monotonic()
        if now < self.next_poll:
            return
        self.next_poll = now + 1.0
        version = await asyncio.to_thread(self.registry.version)
        crl_mtime = _mtime(self.mosq_conf["crl"])
        if version == self.version and now < self.rebuild_at and crl_mtime == self.crl_mtime:
            return
        first = self.version is None
        self.version, self.rebuild_at = version, now + 60
        new = await asyncio.to_thread(partial(policy_from_registry, self.registry, cache=self.parsed))
        crl_changed, self.crl_mtime = crl_mtime != self.crl_mtime, crl_mtime
        if new == self.policy and not (crl_changed and self.mosquitto is not None):
            return
        self.policy = new
        t0 = time.monotonic()
        what: str | None = None
        if self.nats is not None:
            what = await asyncio.to_thread(self.nats.set_policy, new)
        elif self.mosquitto is not None and crl_changed:
            # Mosquitto checks the CRL at a handshake only, and reads it at start: a restart closes the
            # connections of revoked certificates (a clean stop saves its sessions and queues)
            self.mosquitto.stop()
            await asyncio.to_thread(_start_mosquitto, self.mosq_conf, Path(), self.mosquitto)
            what = "restart (new CRL)"
        if what is not None and not first:
            took = (time.monotonic() - t0) * 1000
            self.console.print(f"door: the device registry changed (version {version}): "
                               f"{len(new.identities)} valid device certificates; {what} in {took:.0f} ms")
            log.info("door %s after registry version %s: %d certificates (%.0f ms)", what, version,
                     len(new.identities), took)

    def failed(self, exc: Exception) -> None:
        if time.monotonic() - self.warned_at >= 60:
            self.warned_at = time.monotonic()
            log.warning("door: cannot read the device registry (the door keeps its last policy): %r", exc)


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _with_cdc_database(settings: Settings) -> Settings:
    """Settings whose enrichment knows the CDC source's database (it names the PostgreSQL topics)."""
    src = settings.cdc.source
    if src is None or settings.enrich.database is not None:
        return settings
    db = source_database(src.get_secret_value())
    if db is None:
        return settings
    return settings.model_copy(update={"enrich": settings.enrich.model_copy(update={"database": db})})


def _captured(settings: Settings) -> dict[str, str]:
    """``schema.table`` (or ``db.table``) -> CDC topic of every table the capture is asked for."""
    from fieldmesh.cdc.base import cdc_topic

    assert settings.cdc.source is not None
    db = source_database(settings.cdc.source.get_secret_value())  # as the capture names its topics
    out: dict[str, str] = {}
    for raw in settings.cdc.tables.split(","):
        name = raw.strip()
        if not name:
            continue
        parts = name.split(".")
        if len(parts) == 1 and db is not None:
            parts = ["public", parts[0]]
        if len(parts) != 2 or not all(parts):
            raise ConfigError(
                f"--cdc-tables: {name!r} is not schema.table (PostgreSQL) or db.table (MySQL)", key="cdc.tables"
            )
        out[".".join(parts)] = cdc_topic(db, parts[0], parts[1]) if db else cdc_topic(parts[0], None, parts[1])
    if not out:
        raise ConfigError("--cdc-source needs --cdc-tables (FIELDMESH__CDC__TABLES), e.g. public.assets",
                          key="cdc.tables")
    return out


async def _start_cdc(bus: Bus, bus_url: str, settings: Settings, data_dir: Path, logs: Path,
                     store_url: str | None = None) -> _Child:
    """Start the CDC capture and wait for its initial snapshot to be on the bus.

    The processor starts after this, so it never enriches from a partial snapshot. The topics of the
    joined tables are created first (the capture creates a table's topic on its first event only).
    """
    cdc = settings.cdc
    assert cdc.source is not None
    captured = _captured(settings)
    for spec in settings.enrich.joins:
        topic = join_topic(spec, settings.enrich.database)
        if spec.topic is None and topic not in captured.values():
            raise ConfigError(
                f"--enrich {spec.table}: the table is not captured; add it to --cdc-tables "
                f"(now {cdc.tables!r}) or give the topic that holds its changes with topic=",
                key="enrich.joins",
            )
        if topic in captured.values():
            await bus.ensure_topic(TopicSpec(topic, cdc.partitions, retention_s=0, dedupe_window_s=600))
    state_dir = data_dir / "cdc"
    state_dir.mkdir(exist_ok=True)
    child = _Child(
        "cdc",
        [sys.executable, "-m", "fieldmesh.cdc", "--tables", ",".join(captured), "--bus-url", bus_url,
         "--name", cdc.name, "--state-dir", str(state_dir), "--partitions", str(cdc.partitions)],
        logs / "cdc.log",
        env={**os.environ, "FIELDMESH_CDC_SOURCE": cdc.source.get_secret_value(),
             **({"FIELDMESH_STORE_URL": store_url} if store_url else {})},  # its lineage events (docs/lineage.md)
    )
    child.start()
    deadline = time.monotonic() + cdc.snapshot_timeout_s
    while not _snapshot_done(state_dir, cdc.name):
        if not child.alive():
            child.stop()
            tail = child.log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise ConfigError("the CDC capture stopped before its snapshot was done:\n  " + "\n  ".join(tail),
                              key="cdc.source")
        if time.monotonic() > deadline:
            child.stop()
            raise ConfigError(f"the CDC snapshot took longer than {cdc.snapshot_timeout_s:.0f}s "
                              f"(FIELDMESH__CDC__SNAPSHOT_TIMEOUT_S); see {child.log_path}", key="cdc.source")
        await asyncio.sleep(0.2)
    return child


def _cdc_gave_up(c: _Child) -> bool:
    """The capture exits with 2 on errors a retry cannot fix (privileges, lost slot, schema): no restart loop."""
    return c.name == "cdc" and c.proc is not None and c.proc.returncode == 2


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no output"


def _snapshot_done(state_dir: Path, name: str) -> bool:
    for path in state_dir.glob(f"*-{name}.json"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("snapshot_done") is True:
                return True
    return False


#: Counts shown for this run beside the data dir's totals (``gaps`` may fall: late readings fill them).
_RUN_KEYS: Final = ("received", "stored", "duplicates", "late", "unrouted", "gaps")


def _lake_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("pyiceberg", "pyarrow", "duckdb"))


def _counts(st: StoreStats) -> dict[str, Any]:
    return {"received": st.received, "stored": st.stored, "duplicates": st.duplicates, "late": st.late,
            "unrouted": st.unrouted, "gaps": st.gaps, "dead_lettered": dict(st.dead_lettered)}


def _summary(store: Any, elapsed_s: float, at_start: StoreStats) -> dict[str, Any]:
    """Totals of the data dir (top level, as before) and ``this_run``: totals at exit minus totals at start."""
    st = store.stats()
    n_dev = store.device_summary().devices
    store.close()
    total, start = _counts(st), _counts(at_start)
    this_run: dict[str, Any] = {k: total[k] - start[k] for k in _RUN_KEYS}
    this_run["dead_lettered"] = {r: n - start["dead_lettered"].get(r, 0) for r, n in total["dead_lettered"].items()}
    return {"elapsed_s": round(elapsed_s, 1), **total, "devices": n_dev, "this_run": this_run}


def _print_summary(console: Any, s: dict[str, Any]) -> None:
    from rich.table import Table

    run = s["this_run"]
    t = Table(title="fieldmesh summary")
    t.add_column("what")
    t.add_column("this run", justify="right")
    t.add_column("total (this data dir)", justify="right")
    for k in _RUN_KEYS:
        t.add_row(k if k != "gaps" else "gaps (seq missing upstream)", f"{run[k]:+,}" if k == "gaps" else f"{run[k]:,}",
                  f"{s[k]:,}")
    for reason, n in sorted(s["dead_lettered"].items()):
        t.add_row(f"dead-lettered: {reason}", f"{run['dead_lettered'][reason]:,}", f"{n:,}")
    t.add_row("devices", "", f"{s['devices']:,}")
    t.add_row("ran for", f"{s['elapsed_s']} s", "")
    console.print(t)
