"""Shared benchmark helpers: processes, payloads, percentiles."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec

_enc = msgspec.json.Encoder()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def payloads(
    *, devices: int, readings: int, per_message: int, prefix: str, ts_ms: int | None = None
) -> list[tuple[str, bytes]]:
    """Pre-encoded device messages (``ts`` is replaced at send time when ts_ms is None)."""
    out = []
    seq = 0
    per_dev = readings // devices
    for i in range(0, per_dev, per_message):
        for d in range(devices):
            dev = f"{prefix}-{d:05d}"
            rs = [
                {
                    "ts": ts_ms or 0,
                    "seq": seq + k,
                    "boot_id": "b",
                    "measurements": {
                        "temperature": 20.0 + (seq + k) % 97 / 10,
                        "humidity": 45.5,
                        "vibration": 0.031,
                    },
                }
                for k in range(min(per_message, per_dev - i))
            ]
            body = {"device_id": dev, **rs[0]} if per_message == 1 else {"device_id": dev, "readings": rs}
            out.append((f"devices/{dev}/telemetry", _enc.encode(body)))
        seq += per_message
    return out


def publish_proc(args: dict[str, Any]) -> None:
    """Publisher process body: publish messages at ``rate`` msg/s (0 = as fast as possible), QoS 1.

    ``ts`` placeholders are stamped with the send time so latency is event-to-stored.
    """
    import paho.mqtt.client as mqtt

    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311, client_id=f"bench-{os.getpid()}"
    )
    c.max_inflight_messages_set(args.get("inflight", 1000))
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", args["port"])
    c.loop_start()
    msgs: list[tuple[str, bytes]] = args["msgs"]
    rate = args.get("rate", 0)
    t0 = time.monotonic()
    last = None
    for i, (topic, body) in enumerate(msgs):
        if rate:
            due = t0 + i / rate
            d = due - time.monotonic()
            if d > 0:
                time.sleep(d)
        if args.get("stamp"):
            body = body.replace(b'"ts":0', b'"ts":%d' % int(time.time() * 1000))
        while True:
            last = c.publish(topic, body, qos=1)
            if last.rc == 0:
                break
            time.sleep(0.0005)
    if last is not None:
        last.wait_for_publish(120)
    c.disconnect()
    c.loop_stop()


class UpProc:
    """``fieldmesh up`` under benchmark."""

    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.mqtt_port = free_port()
        self.http_port = free_port()
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fieldmesh",
                "up",
                "--data-dir",
                str(data_dir),
                "--mqtt-port",
                str(self.mqtt_port),
                "--http-port",
                str(self.http_port),
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(data_dir.parent / "up.log", "ab"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.get("/health")["status"] == "ok":
                    return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("fieldmesh up did not become healthy")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/api/v1{path}", timeout=10) as r:
            return json.loads(r.read())

    def stored(self) -> int:
        """Readings stored plus duplicates found so far: the store's durable counters, read from its file.

        Why not ``GET /stats``: it costs the supervisor about 4 CPU-ms a request (lag from the bus, alerts,
        jobs, features...), and polled every 50 ms that is a tenth of a core taken from what is measured.
        A read-only connection to the SQLite file costs a few tens of µs."""
        db = self.data_dir / "store.db"
        if not db.exists():  # another store (or not made yet): the API
            s = self.get("/stats")
            return int(s["stored"] + s["duplicates"])
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            rows = dict(con.execute("SELECT name, value FROM counters WHERE name IN ('stored', 'duplicates')"))
        finally:
            con.close()
        return int(rows.get("stored", 0) + rows.get("duplicates", 0))

    def wait_stored(self, n: int, timeout_s: float = 600) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.stored() >= n:
                return time.monotonic()
            time.sleep(0.05)
        raise TimeoutError(f"only {self.get('/stats')} of {n}")

    def stop(self) -> float:
        """SIGTERM, then wait for the exit: the seconds that took."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        return time.monotonic() - t0


def cpu_by_role(up: UpProc) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each process of ``fieldmesh up``, by role."""
    import psutil

    out: dict[str, float] = {}
    root = psutil.Process(up.proc.pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            cmd = p.cmdline()
            t = p.cpu_times()
        except psutil.Error:
            continue
        name = ("supervisor" if p.pid == root.pid else
                cmd[cmd.index("fieldmesh.runtime.worker") + 1] if "fieldmesh.runtime.worker" in cmd else p.name())
        with contextlib.suppress(psutil.Error):
            parent = p.parent()
            if p.pid != root.pid and parent is not None and parent.pid != root.pid and parent.cmdline() == cmd:
                name += "'s child"  # forked by the stage, same command line: the processor's lake sink
        out[name] = out.get(name, 0.0) + t.user + t.system
    return out
