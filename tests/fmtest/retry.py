"""A QoS 1 device that keeps what was not acknowledged and sends it again, as real devices do."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from fmtest.procs import free_port


class RetryingPublisher:
    """Publishes QoS 1 messages through broker outages until each one is acknowledged (PUBACK).

    paho reconnects by itself; what was in flight when the connection broke is published again
    (a new packet id) once acknowledgements stop coming, so the broker may get a message twice,
    never zero times. ``acked`` counts the messages the broker acknowledged.
    """

    def __init__(self, port: int, *, host: str = "127.0.0.1", settle_s: float = 3.0) -> None:
        self.port = port
        self.host = host
        self.settle_s = settle_s
        self.acked_mids: set[int] = set()
        self.acked = 0
        self.publishes = 0
        self.progress = threading.Event()  # set after each settled round
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                             client_id=f"fm-retry-{free_port()}", clean_session=True)
        self.c.on_publish = self._on_publish
        self.c.max_inflight_messages_set(100)
        self.c.max_queued_messages_set(0)
        self.c.reconnect_delay_set(0.1, 1.0)

    def _on_publish(self, client: Any, userdata: Any, mid: int, rc: Any = None, props: Any = None) -> None:
        self.acked_mids.add(mid)  # set.add is atomic under the GIL: no lock (paho holds its own here)

    def connect(self, timeout_s: float = 20.0) -> RetryingPublisher:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.c.connect(self.host, self.port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.c.loop_start()
        return self

    def send(self, msgs: list[tuple[str, bytes]], *, timeout_s: float = 90.0) -> int:
        """Publish ``msgs`` until every one is acknowledged; return how many were acknowledged."""
        todo = list(range(len(msgs)))
        done: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while todo and time.monotonic() < deadline:
            mids: dict[int, int] = {}
            for i in todo:
                info = self.c.publish(msgs[i][0], msgs[i][1], qos=1)
                mids[info.mid] = i
                self.publishes += 1
            last, since = -1, time.monotonic()
            while time.monotonic() < deadline:
                n = sum(1 for m in mids if m in self.acked_mids)
                if n == len(mids):
                    break
                if n != last or not self.c.is_connected():  # paho sends its queue once reconnected
                    last, since = n, time.monotonic()
                elif time.monotonic() - since > self.settle_s:
                    break  # acknowledgements stopped: what is missing gets published again
                time.sleep(0.05)
            for m, i in mids.items():
                if m in self.acked_mids:
                    done.add(i)
            self.acked_mids.difference_update(mids)  # packet ids are reused after 65535
            todo = [i for i in todo if i not in done]
            self.acked = len(done)
            self.progress.set()
        return len(done)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def readings_of(msg: tuple[str, bytes]) -> list[tuple[str, dict[str, Any]]]:
    """The ``(device, reading)`` pairs in one telemetry message (as the oracle wants them)."""
    dev = msg[0].split("/")[1]
    body = json.loads(msg[1])
    if isinstance(body, dict) and "readings" in body:
        body = body["readings"]
    if isinstance(body, dict):
        body = [body]
    return [(dev, {k: v for k, v in r.items() if k != "device_id"}) for r in body]
