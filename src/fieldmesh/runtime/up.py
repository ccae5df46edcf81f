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
import json
import logging
import os
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fieldmesh.bus import TopicSpec, load_bus
from fieldmesh.core.errors import ConfigError
from fieldmesh.core.settings import Settings
from fieldmesh.core.topics import DLQ_TOPIC, READINGS_TOPIC
from fieldmesh.gateway.sources import MqttSource
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
from fieldmesh.runtime.worker import ensure_topics
from fieldmesh.store import default_store_url, load_store

__all__ = ["UpOptions", "run_up"]

log = logging.getLogger("fieldmesh.up")


@dataclass
class UpOptions:
    """What ``fieldmesh up`` was asked to run."""

    data_dir: Path
    mqtt_port: int = 1883
    http_port: int = 8000
    mqtt_url: str | None = None
    bus_url: str | None = None
    store_url: str | None = None
    simulate: int = 0
    sim_rate: float = 1.0
    sim_per_message: int = 1
    duration_s: float | None = None
    settings: Settings = field(default_factory=Settings)
    quiet: bool = False


class _Child:
    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.failed: str | None = None  # why it is left stopped (an error a restart cannot fix)
        self._log: IO[bytes] | None = None

    def start(self) -> None:
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


def check_ports(opts: UpOptions) -> None:
    """Fail early, naming the flag to change, when a port the user chose is taken."""
    if opts.mqtt_url is None and port_in_use(opts.mqtt_port):
        raise ConfigError(
            f"MQTT port {opts.mqtt_port} is already in use (another broker?). Pass --mqtt-port with a free "
            f"port (e.g. --mqtt-port {opts.mqtt_port + 1}), or use that broker with "
            f"--mqtt-url mqtt://127.0.0.1:{opts.mqtt_port}",
            key="mqtt_port",
        )
    if port_in_use(opts.http_port):
        raise ConfigError(
            f"HTTP port {opts.http_port} is already in use: pass --http-port with a free port "
            f"(e.g. --http-port {opts.http_port + 1})",
            key="http_port",
        )


async def run_up(opts: UpOptions, *, ready: asyncio.Event | None = None) -> dict[str, Any]:
    """Run the pipeline until Ctrl-C, SIGTERM or ``duration_s``; return the final summary."""
    from rich.console import Console

    console = Console(stderr=True, quiet=opts.quiet)
    data_dir = opts.data_dir.resolve()
    lock = _lock(data_dir)
    if opts.mqtt_port == 0 and opts.mqtt_url is None:
        opts.mqtt_port = free_port()
    if opts.http_port == 0:
        opts.http_port = free_port()
    check_ports(opts)
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)
    settings = _with_cdc_database(opts.settings)
    door = resolve_door(settings.gateway.door, external_mqtt=opts.mqtt_url is not None)
    nats: EmbeddedNats | None = None
    children: list[_Child] = []
    sim: _Child | None = None
    server: Any = None
    t_start = time.monotonic()
    try:
        if opts.bus_url is None:
            nats = EmbeddedNats(store_dir=data_dir / "nats", mqtt_port=opts.mqtt_port if door == "nats" else None,
                                fsync=settings.bus.fsync)
            await asyncio.to_thread(nats.start)
            bus_url = nats.url
        else:
            bus_url = opts.bus_url
        store_url = opts.store_url or default_store_url(data_dir)
        load_store(store_url).close()  # creates or checks the schema before anything writes
        (data_dir / "runtime.json").write_text(json.dumps({"bus_url": bus_url, "store_url": store_url,
                                                           "pid": os.getpid()}))
        # the CDC source URL (it may hold a password) goes to the capture alone, through its environment
        cfg_settings = json.loads(settings.model_dump_json(exclude={"data_dir", "cdc"}))
        async with load_bus(bus_url) as bus:
            await ensure_topics(bus, settings)
            if settings.cdc.source is not None:
                cdc = await _start_cdc(bus, bus_url, settings, data_dir, logs)
                children.append(cdc)
                console.print(f"CDC: tables {settings.cdc.tables} captured into the bus "
                              f"(snapshot done; log {cdc.log_path})")
            door_child = None
            if door == "mosquitto":
                door_child = await asyncio.to_thread(_start_mosquitto, data_dir, opts.mqtt_port, logs)
            gw_mqtt = f"mqtt://127.0.0.1:{opts.mqtt_port}" if door_child else opts.mqtt_url
            gw_settings = cfg_settings
            if door_child is not None:
                # The door has one gateway: a plain subscription, which Mosquitto 2.0 restores with the
                # session after a crash (it did not restore the shared one: messages published before
                # the gateway re-subscribed were lost).
                gw_settings = {**cfg_settings, "gateway": {**cfg_settings["gateway"], "share_group": ""}}
            gw_cfg = {"bus_url": bus_url, "mqtt_url": gw_mqtt, "settings": gw_settings, "sole": True,
                      # stable across restarts of this data dir, so the broker keeps its persistent session
                      "client_id": f"fm-gw-{settings.gateway.share_group}-{zlib.crc32(str(data_dir).encode()):08x}"}
            if door_child is not None:
                await asyncio.to_thread(ensure_session, opts.mqtt_port, client_id=str(gw_cfg["client_id"]),
                                        filters=MqttSource.filters(None),
                                        expiry_s=settings.gateway.session_expiry_s)
            pr_cfg = {"bus_url": bus_url, "store_url": store_url, "settings": cfg_settings}
            py = [sys.executable, "-m", "fieldmesh.runtime.worker"]
            stages = [
                _Child("gateway", [*py, "gateway", json.dumps(gw_cfg)], logs / "gateway.log"),
                _Child("processor", [*py, "processor", json.dumps(pr_cfg)], logs / "processor.log"),
            ]
            for c in stages:
                c.start()
            children.extend(stages)
            if door_child is not None:
                children.append(door_child)  # after the workers: stopped last, once the gateway has drained it

            async def lag() -> dict[str, int]:
                out: dict[str, int] = {}
                with contextlib.suppress(Exception):
                    if door == "nats" and hasattr(bus, "raw_pending"):
                        out["gateway"] = await bus.raw_pending("FM_INGEST", "fm-gateway")
                    out["processor"] = await bus.pending(READINGS_TOPIC, group="fm-processor")
                    out["dlq"] = await bus.pending(DLQ_TOPIC, group="fm-processor-dlq")
                return out

            async def health() -> dict[str, Any]:
                h: dict[str, Any] = {c.name: "ok" if c.alive() else f"failed: {c.failed}" if c.failed else "down"
                                     for c in children}
                h["bus"] = "ok" if nats is None or (nats.proc and nats.proc.poll() is None) else "down"
                return h

            import uvicorn

            from fieldmesh.api.app import create_app

            app = create_app(store_url, health=health, lag=lag)
            server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=opts.http_port,
                                                   log_level="warning", lifespan="off"))
            api_task = asyncio.create_task(server.serve(), name="api")
            mqtt_url = opts.mqtt_url or f"mqtt://127.0.0.1:{opts.mqtt_port}"
            if opts.simulate:
                sim = _Child("simulator", [sys.executable, "-m", "fieldmesh.runtime.devices", "--mqtt-url",
                                           mqtt_url, "--devices", str(opts.simulate), "--rate", str(opts.sim_rate),
                                           "--per-message", str(opts.sim_per_message)], logs / "simulator.log")
                sim.start()
            console.print(
                f"[bold green]fieldmesh up[/]: devices publish to [bold]{mqtt_url}[/] "
                f"(topic devices/<id>/telemetry); API [bold]http://127.0.0.1:{opts.http_port}/api/v1[/]; "
                f"{_door_line(door)}; bus {bus_url}; store {store_url}"
                + (f"; simulating {opts.simulate} devices" if opts.simulate else "")
            )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            if ready is not None:
                ready.set()
            deadline = time.monotonic() + opts.duration_s if opts.duration_s else None
            while not stop.is_set():
                if deadline and time.monotonic() >= deadline:
                    break
                for c in children:
                    if not c.alive() and c.failed is None and _cdc_gave_up(c):
                        c.failed = _last_line(c.log_path)
                        console.print(f"[bold red]the CDC capture stopped on an error a restart cannot fix:[/] "
                                      f"{c.failed}\nReadings are still stored, enriched from the state so far; "
                                      f"fix the source and restart fieldmesh up (see {c.log_path})")
                    if not c.alive() and c.failed is None:
                        c.restarts += 1
                        console.print(f"[yellow]{c.name} exited ({c.proc and c.proc.returncode}); "
                                      f"restarting (see {c.log_path})[/]")
                        await asyncio.sleep(min(0.5 * c.restarts, 5))
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
        if nats is not None:
            nats.stop()
        lock.close()
    summary = _summary(load_store(store_url, readonly=True), time.monotonic() - t_start)
    _print_summary(console, summary)
    return summary


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


def _start_mosquitto(data_dir: Path, port: int, logs: Path) -> _Child:
    """Start the Mosquitto door and wait until it accepts connections (the gateway connects next)."""
    binary = find_mosquitto()
    assert binary is not None  # resolve_door checked
    conf = write_config(port=port, state_dir=data_dir / "mosquitto")
    child = _Child("mosquitto", [binary, "-c", str(conf)], logs / "mosquitto.log")
    child.start()
    deadline = time.monotonic() + 20
    while not accepts(port):
        if not child.alive() or time.monotonic() > deadline:
            child.stop()
            raise ConfigError(f"the Mosquitto door did not start on port {port}: {_last_line(child.log_path)}",
                              key="gateway.door")
        time.sleep(0.05)
    return child


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


async def _start_cdc(bus: Any, bus_url: str, settings: Settings, data_dir: Path, logs: Path) -> _Child:
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
        env={**os.environ, "FIELDMESH_CDC_SOURCE": cdc.source.get_secret_value()},
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


def _summary(store: Any, elapsed_s: float) -> dict[str, Any]:
    st = store.stats()
    n_dev = store.query("SELECT count(*) FROM devices").rows[0][0]
    store.close()
    return {
        "elapsed_s": round(elapsed_s, 1),
        "received": st.received,
        "stored": st.stored,
        "duplicates": st.duplicates,
        "late": st.late,
        "dead_lettered": dict(st.dead_lettered),
        "devices": n_dev,
    }


def _print_summary(console: Any, s: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="fieldmesh summary (all time, this data dir)")
    t.add_column("what")
    t.add_column("count", justify="right")
    for k in ("received", "stored", "duplicates", "late", "devices"):
        t.add_row(k, f"{s[k]:,}")
    for reason, n in sorted(s["dead_lettered"].items()):
        t.add_row(f"dead-lettered: {reason}", f"{n:,}")
    t.add_row("ran for", f"{s['elapsed_s']} s")
    console.print(t)
