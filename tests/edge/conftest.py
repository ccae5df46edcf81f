"""Edge test fixtures: private Mosquitto brokers, an MQTT collector, and the agent as a subprocess.

Every broker here is our own process on a free port (the shared Mosquitto on 1883 is never stopped);
device ids carry a unique prefix. A missing ``mosquitto`` binary FAILS the tests.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fieldmesh.core.codec import decode_telemetry, encoding_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}")


class Mosquitto:
    """A private mosquitto on a free port; ``stop()`` / ``start()`` make outages."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        extra: list[str] | None = None,
        persistence: bool = False,
    ) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(binary):
            pytest.fail("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.port = port or free_port()
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            "max_queued_messages 1000000",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        if extra:
            # extra lines may override the listener (TLS)
            lines = [
                ln
                for ln in lines
                if not (ln.startswith("listener") and any(e.startswith("listener") for e in extra))
            ]
            lines += extra
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.dir / "mosquitto.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto exited: {(self.dir / 'mosquitto.log').read_text()[-1500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        pytest.fail("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    made: list[Mosquitto] = []

    def make(**kw: Any) -> Mosquitto:
        m = Mosquitto(tmp_path / f"mosq{len(made)}", **kw)
        m.start()
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()


class Collector:
    """A paho MQTT 5 subscriber that decodes telemetry with the gateway's codec.

    Its session is persistent (clean_start false, long expiry), so with a persistent broker it gets
    what was published while it was reconnecting.
    """

    def __init__(
        self,
        port: int,
        prefix: str,
        *,
        v5: bool = True,
        tls: dict[str, Any] | None = None,
        topics: list[str] | None = None,
    ) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.prefix = prefix
        self.lock = threading.Lock()
        self.readings: list[tuple[str, dict[str, Any]]] = []  # (device, reading), arrival order
        self.messages: list[tuple[str, bytes, Any]] = []
        self.rejects: list[Any] = []
        self.subscribed = threading.Event()
        self.v5 = v5
        kw: dict[str, Any] = {} if v5 else {"clean_session": False}
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"coll-{prefix}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            **kw,
        )
        if tls:
            self.client.tls_set(**tls)
        self.topics = topics or [
            "devices/+/telemetry",
            "devices/+/telemetry/+",
            "devices/+/anomalies",
            "devices/+/state",
        ]
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.2)
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        else:
            self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            pytest.fail("collector did not subscribe")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        client.subscribe([(t, 1) for t in self.topics])
        self.subscribed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        if len(parts) < 3 or not parts[1].startswith(self.prefix):
            return
        props = getattr(msg, "properties", None)
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload), props))
        if parts[2] != "telemetry":
            return
        ct = getattr(props, "ContentType", None) if props is not None else None
        enc = encoding_for(ct, parts[3] if len(parts) > 3 else None)
        now = int(time.time() * 1000)
        res = decode_telemetry(
            bytes(msg.payload),
            device_id=parts[1],
            topic=msg.topic,
            received_ms=now,
            encoding=enc,
            max_bytes=16 * 1024 * 1024,
        )
        with self.lock:
            self.rejects.extend(res.rejects)
            for r in res.readings:
                self.readings.append(
                    (
                        r.device_id,
                        {
                            "ts": r.ts_ms,
                            "seq": r.seq,
                            "boot_id": r.boot_id,
                            "event_id": r.event_id,
                            "measurements": r.measurements,
                            "meta": r.meta,
                        },
                    )
                )

    def count(self) -> int:
        with self.lock:
            return len(self.readings)

    def topic_messages(self, kind: str) -> list[tuple[str, bytes, Any]]:
        with self.lock:
            return [m for m in self.messages if m[0].split("/")[2] == kind]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def collector_factory() -> Iterator[Callable[..., Collector]]:
    made: list[Collector] = []

    def make(port: int, prefix: str, **kw: Any) -> Collector:
        c = Collector(port, prefix, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


class AgentProc:
    """``python -m fieldmesh.edge run`` as a child process (so kill -9 is real)."""

    def __init__(self, workdir: Path, cfg: dict[str, Any]) -> None:
        self.workdir = workdir
        self.cfg_path = workdir / "edge.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg))
        self.buffer = Path(cfg["buffer"]["path"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    def start(self, *extra: str) -> None:
        self.started = time.time()
        self.runs += 1
        self.log = open(self.workdir / f"agent{self.runs}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fieldmesh.edge", "run", "--config", str(self.cfg_path), *extra],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def stats(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.buffer / "state" / "stats.json").read_text()))
        except (OSError, ValueError):
            return {}

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def running(self) -> bool:
        """The agent's loop is up (it rewrote stats.json since this start)."""
        p = self.buffer / "state" / "stats.json"
        return p.exists() and p.stat().st_mtime > self.started

    def stop(self, timeout_s: float = 30) -> int:
        assert self.proc is not None
        # a SIGINT during interpreter start-up is a KeyboardInterrupt, not a clean stop: wait for the loop
        wait_for(lambda: self.running() or self.proc.poll() is not None, 30, "the agent to start")
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("agent did not stop on SIGINT")

    def output(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("agent*.log")))


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], AgentProc]]:
    made: list[AgentProc] = []

    def make(cfg: dict[str, Any]) -> AgentProc:
        a = AgentProc(tmp_path, cfg)
        made.append(a)
        return a

    yield make
    for a in made:
        if a.proc is not None and a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()


@pytest.fixture
def prefix() -> str:
    return f"t{secrets.token_hex(3)}"
