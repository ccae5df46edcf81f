"""MQTT helpers for tests: a private Mosquitto with stock limits, and session bookkeeping.

The shared Mosquitto on 127.0.0.1:1883 keeps a persistent session (and queues every matching
message for it) for each client id that connected with clean start off and a session expiry.
Tests that need such a session remove it at the end with :func:`end_session`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fmtest import oracle

SHARED_BROKER = ("127.0.0.1", 1883)
#: Debian's mosquitto 2.0 limits as shipped (also its built-in defaults).
STOCK_LIMITS = "max_queued_messages 1000\nmax_inflight_messages 20\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateMosquitto:
    """``/usr/sbin/mosquitto`` on a free loopback port, with its own config, data and log in ``d``."""

    def __init__(self, d: Path, extra: str = STOCK_LIMITS) -> None:
        d.mkdir(parents=True, exist_ok=True)
        self.dir = d
        self.port = _free_port()
        self.log = d / "mosquitto.log"
        conf = d / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                        f"persistence_location {d}/\nlog_dest file {self.log}\nuser root\n{extra}")
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mosquitto did not start: {self.log_text()}") from None
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def dropped_lines(self) -> int:
        """How often the broker logged that it dropped messages for a client."""
        return sum("are being dropped" in ln for ln in self.log_text().splitlines())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def end_session(client_id: str, host: str = SHARED_BROKER[0], port: int = SHARED_BROKER[1]) -> bool:
    """Whether the broker held a session for ``client_id``; afterwards it holds none.

    Connects with clean start off (so CONNACK says whether a session was present) and session
    expiry 0, which makes the broker discard the session when this connection closes.
    """
    present: list[bool] = []
    done = threading.Event()

    def on_connect(c: mqtt.Client, u: object, flags: mqtt.ConnectFlags, rc: object, props: object) -> None:
        present.append(bool(flags.session_present))
        done.set()

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=client_id)
    c.on_connect = on_connect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    c.connect(host, port, clean_start=False, properties=props)
    c.loop_start()
    try:
        if not done.wait(10):
            raise TimeoutError(f"no CONNACK from {host}:{port} for {client_id}")
    finally:
        c.disconnect()
        c.loop_stop()
    return present[0]


def assert_sessions_gone(client_ids: list[str], host: str = SHARED_BROKER[0], port: int = SHARED_BROKER[1]) -> None:
    """Fail when the broker still holds a session for any of ``client_ids`` (and remove it)."""
    left = [cid for cid in client_ids if end_session(cid, host, port)]
    assert not left, f"persistent MQTT sessions left behind at {host}:{port}: {left}"


def check_stored_once(up: Any, sent: list[Any], dead: dict[str, int] | None = None) -> dict[str, Any]:
    """Every reading stored once, every dead letter counted, 1m rollups exact, through an MQTT broker.

    A message the gateway had put on the bus but not yet PUBACKed when it was killed comes again
    (MQTT has no stable message id): its readings count as received and as duplicates, never stored
    twice. So ``received`` may exceed what was sent by exactly the extra ``duplicates``.
    """
    dead = dead or {}
    uniq = oracle.unique_readings(sent)
    expected = len(sent) + sum(dead.values())
    st = up.wait_for(lambda s: s["stored"] >= len(uniq) and s["received"] >= expected
                     and sum(s["lag"].values()) == 0)
    redelivered = st["received"] - expected
    assert st["stored"] == len(uniq), st
    assert redelivered >= 0 and st["duplicates"] == len(sent) - len(uniq) + redelivered, st
    got_dead = {k: v for k, v in st["dead_lettered"].items() if k != "total"}
    assert sum(got_dead.values()) >= sum(dead.values()) and set(got_dead) == set(dead), (got_dead, dead)
    for dev in sorted({d for d, _ in sent}):
        got = {(r["metric"], r["window_start_ms"]): (r["count"], r["sum"])
               for r in up.get(f"/telemetry/rollups?device_id={dev}&interval=1m&limit=100000")}
        exp = {(k[1], k[2]): (e["count"], e["sum"]) for k, e in oracle.rollups(sent, "1m").items() if k[0] == dev}
        assert got == exp, dev
    return dict(st)
