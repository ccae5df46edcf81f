"""Start ``fieldmesh up`` as a real process on free ports, talk to it like a user would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Up:
    """A ``fieldmesh up`` process."""

    def __init__(self, data_dir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.extra = extra
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> Up:
        args = [sys.executable, "-m", "fieldmesh", "up", "--data-dir", str(self.data_dir),
                "--mqtt-port", str(self.mqtt_port), "--http-port", str(self.http_port), *self.extra]
        self.log = open(self.data_dir.parent / f"{self.data_dir.name}-up.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.tail()
            try:
                if self.get("/health")["status"] == "ok":
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"fieldmesh up not healthy in {timeout_s}s:\n{self.tail()}")

    def tail(self) -> str:
        p = self.data_dir.parent / f"{self.data_dir.name}-up.log"
        return p.read_text(errors="replace")[-3000:] if p.exists() else ""

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/api/v1{path}", timeout=10) as r:
            return json.loads(r.read())

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        time.sleep(0.5)  # children die with their parent (PDEATHSIG)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def wait_for(self, pred: Any, timeout_s: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        stats: dict[str, Any] = {}
        while time.monotonic() < deadline:
            stats = self.get("/stats")
            if pred(stats):
                return stats
            time.sleep(0.3)
        raise TimeoutError(f"stats never satisfied the condition: {stats}\n{self.tail()}")


def publisher(port: int, *, v5: bool = False, host: str = "127.0.0.1") -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                    client_id=f"fm-test-{free_port()}")
    c.max_inflight_messages_set(200)
    c.connect(host, port)
    c.loop_start()
    return c


def publish_all(c: mqtt.Client, msgs: list[tuple[str, bytes]], qos: int = 1) -> None:
    infos = [c.publish(t, p, qos=qos) for t, p in msgs]
    for i in infos:
        i.wait_for_publish(30)
        assert i.is_published()
