"""MQTT clients for door tests: TLS contexts, and a client that records what the broker did to it
(CONNACK, SUBACK codes, disconnects, messages) instead of raising."""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def tls_context(ca: Path, cert: Path | None = None, key: Path | None = None, *,
                max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client context trusting ``ca``, presenting ``cert``/``key`` when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    if max_version is not None:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this OpenSSL speak the old protocol at all
        ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        ctx.maximum_version = max_version
    return ctx


def telemetry(device_id: str, value: float, *, ts_ms: int | None = None) -> bytes:
    """One reading of metric ``temp`` for ``device_id``."""
    return json.dumps({"device_id": device_id, "ts": ts_ms or int(time.time() * 1000),
                       "measurements": {"temp": value}}).encode()


class Probe:
    """An MQTT 3.1.1 client that records the broker's answers; :meth:`connect` never raises."""

    def __init__(self, port: int, ctx: ssl.SSLContext | None = None, *, client_id: str | None = None,
                 clean_session: bool = True, user: str | None = None, password: str | None = None,
                 reconnect: bool = False) -> None:
        self.port = port
        self.client_id = client_id or f"probe-{uuid.uuid4().hex[:8]}"
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv311,
                             clean_session=clean_session, reconnect_on_failure=reconnect)
        if ctx is not None:
            self.c.tls_set_context(ctx)
        if user is not None:
            self.c.username_pw_set(user, password)
        self.connack: str | None = None
        self.error: str | None = None
        self.disconnected_at: float | None = None
        self.subacks: list[list[int]] = []
        self.messages: list[tuple[str, bytes]] = []
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = self._on_subscribe
        self.c.on_message = self._on_message

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.connack = str(rc)
        self._event.set()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if self.disconnected_at is None:
            self.disconnected_at = time.monotonic()
        self._event.set()

    def _on_subscribe(self, c: Any, u: Any, mid: Any, codes: Any, props: Any = None) -> None:
        with self._lock:
            self.subacks.append([int(getattr(x, "value", x)) for x in codes])
        self._event.set()

    def _on_message(self, c: Any, u: Any, m: Any) -> None:
        with self._lock:
            self.messages.append((m.topic, bytes(m.payload)))

    def connect(self, timeout_s: float = 10.0) -> bool:
        """Connect and wait for the CONNACK; True when the broker accepted the client (and kept it)."""
        try:
            self.c.connect("127.0.0.1", self.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            self.error = repr(exc)
            return False
        self.c.loop_start()
        self._event.wait(timeout_s)
        time.sleep(0.3)  # a broker that maps the certificate after the handshake may close at once
        return self.connack == "Success" and self.disconnected_at is None and self.c.is_connected()

    def subscribe(self, *filters: str, timeout_s: float = 10.0) -> list[int]:
        """Subscribe at QoS 1; the SUBACK's codes (128: refused)."""
        n = len(self.subacks)
        self.c.subscribe([(f, 1) for f in filters])
        deadline = time.monotonic() + timeout_s
        while len(self.subacks) == n:
            assert time.monotonic() < deadline, f"no SUBACK for {filters}"
            time.sleep(0.02)
        return self.subacks[-1]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout_s: float = 10.0) -> bool:
        """Publish at QoS 1; whether the broker acknowledged it (a PUBACK says nothing about access)."""
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout_s)
        return info.is_published()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()
