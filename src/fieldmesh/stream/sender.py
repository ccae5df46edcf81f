"""The notifier's delivery process: webhook POSTs and MQTT publishes, outside the processor's interpreter.

A processor's apply thread and its bus client keep its interpreter lock busy; sends from threads of the
same process waited for that lock at every socket call, and the HTTP client's own Python work took the
lock from the batches in turn. So the notifier (:mod:`fieldmesh.stream.notifier`) keeps the decisions
(what to send, what the store records) and hands each try to this process over a pipe; it answers with
the try's outcome. Started as ``python -m fieldmesh.stream.sender CONFIG_JSON``; it exits when its input
closes (its notifier stopped, or its processor died), after the tries in hand.

Frames, both ways: a 4-byte big-endian length, then a msgpack array.

* request: ``[seq, kind, dest, body, notification_id]``; ``kind`` is ``webhook`` (``dest`` a URL, ``body``
  the JSON to POST) or ``mqtt`` (``dest`` a topic, published at QoS 1 to the configured broker);
* reply: ``[seq, error]``: ``error`` is None when the receiver acknowledged (HTTP 2xx, MQTT PUBACK).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import os
import random
import ssl
import struct
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import msgspec

__all__ = ["Deliverer", "FrameReader", "encode_frame", "serve", "write_frame"]

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")


def encode_frame(obj: Any) -> bytes:
    """``obj`` as one frame."""
    data = msgspec.msgpack.encode(obj)
    return _LEN.pack(len(data)) + data


def write_frame(out: IO[bytes], obj: Any) -> None:
    """Write ``obj`` as one frame (the caller serialises writers and flushes)."""
    out.write(encode_frame(obj))


class FrameReader:
    """Frames from a pipe, read in chunks: one wake-up of the reading thread takes every frame that came,
    (in the processor each wake-up waits for the interpreter lock, so a read per frame would queue them)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = bytearray()
        self._decoder = msgspec.msgpack.Decoder()

    def read(self) -> list[Any] | None:
        """The frames that came (at least one), or None at the end of the input."""
        while True:
            chunk = os.read(self._fd, 1 << 16)
            if not chunk:
                return None
            buf = self._buf
            buf += chunk
            out = []
            pos = 0
            while len(buf) - pos >= _LEN.size:
                size = _LEN.unpack_from(buf, pos)[0]
                end = pos + _LEN.size + size
                if end > len(buf):
                    break
                out.append(self._decoder.decode(memoryview(buf)[pos + _LEN.size:end]))
                pos = end
            del buf[:pos]
            if out:
                return out


class Deliverer:
    """One try of a notification: an HTTP POST (keep-alive connections) or an MQTT publish at QoS 1.

    Webhooks go through the standard library's ``http.client``, one keep-alive connection per sending
    thread and receiver (scheme, host, port): a POST costs a quarter of the CPU it took with httpx, which
    mattered when a batch hands over a few dozen at once. Redirects are not followed (a 3xx is a failed
    try, as before); HTTPS verifies the receiver's certificate against the system's CAs; proxies from the
    environment are not used (a webhook receiver is reached directly).
    """

    def __init__(self, *, timeout_s: float, mqtt_url: str | None) -> None:
        self.mqtt_url = mqtt_url
        self.timeout_s = timeout_s
        self._local = threading.local()  # per sending thread: {(scheme, host, port): connection}
        self._pools: list[dict[Any, http.client.HTTPConnection]] = []  # each thread's, closed at the end
        self._conns_lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self._mqtt_lock = threading.Lock()
        self._mqtt: Any = None

    def send(self, kind: str, dest: str, body: bytes, notification_id: str) -> str | None:
        """Send once: None when the receiver acknowledged it, else what went wrong."""
        try:
            if kind == "webhook":
                status = self._post(dest, body, {"Content-Type": "application/json",
                                                 "X-Fieldmesh-Notification-Id": notification_id})
                if status // 100 != 2:
                    raise OSError(f"HTTP {status} from {dest}")
            elif kind == "mqtt":
                with self._mqtt_lock:  # one client, connected once
                    self._publish(dest, body)
            else:
                raise ValueError(f"unknown notification target {dest}")
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        """POST ``body`` on this thread's connection to the receiver; its status. A kept-alive connection the
        receiver closed meanwhile is opened again once (the try goes out again, same id)."""
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        key = (u.scheme, u.hostname, u.port)
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        if u.username is not None:  # credentials in the URL: basic authentication, as httpx did
            cred = f"{unquote(u.username)}:{unquote(u.password or '')}".encode()
            headers = {**headers, "Authorization": "Basic " + base64.b64encode(cred).decode()}
        conns: dict[tuple[str, str, int | None], http.client.HTTPConnection] | None = getattr(
            self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
            with self._conns_lock:
                self._pools.append(conns)
        for again in (False, True):
            conn = conns.get(key)
            fresh = conn is None
            if conn is None:
                conn = conns[key] = self._connection(u.scheme, u.hostname, u.port)
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                if resp.will_close:
                    conn.close()
                    conns.pop(key, None)
                return resp.status
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                conn.close()
                conns.pop(key, None)
                if fresh or again:
                    raise OSError(f"{type(exc).__name__}: {exc}") from exc
            except Exception:
                conn.close()
                conns.pop(key, None)
                raise
        raise AssertionError("unreachable")

    def _connection(self, scheme: str, host: str, port: int | None) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout_s, context=self._tls)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout_s)
        return conn

    def _publish(self, topic: str, body: bytes) -> None:
        if not self.mqtt_url:
            raise OSError("no MQTT broker for alerts: set FIELDMESH__ALERTS__MQTT_URL")
        if self._mqtt is None:
            import paho.mqtt.client as mqtt
            from paho.mqtt.enums import CallbackAPIVersion

            u = urlsplit(self.mqtt_url)
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fm-alerts-{random.getrandbits(32):08x}")
            if u.username:
                client.username_pw_set(u.username, u.password)
            client.connect(u.hostname or "127.0.0.1", u.port or 1883)
            client.loop_start()
            self._mqtt = client
        info = self._mqtt.publish(topic, body, qos=1)
        info.wait_for_publish(timeout=10)
        if not info.is_published():
            self._mqtt.loop_stop()
            self._mqtt.disconnect()
            self._mqtt = None
            raise OSError(f"MQTT publish to {topic} not acknowledged")

    def close(self) -> None:
        """Close the connections."""
        with self._conns_lock:
            for pool in self._pools:
                for conn in pool.values():
                    conn.close()
                pool.clear()
        if self._mqtt is not None:
            self._mqtt.loop_stop()
            self._mqtt.disconnect()


def serve(inp: IO[bytes], out: IO[bytes], deliverer: Deliverer, *, workers: int = 8) -> None:
    """Read requests from ``inp`` until it ends, send each on a pool of ``workers`` threads, and write each
    outcome to ``out`` as it comes (not in request order); returns once the tries in hand are answered."""
    lock = threading.Lock()

    def answer(seq: int) -> Callable[[Any], None]:
        def done(fut: Any) -> None:
            err = fut.result() if fut.exception() is None else f"{type(fut.exception()).__name__}: {fut.exception()}"
            with lock, contextlib.suppress(OSError, ValueError):  # the notifier is gone: nobody reads it
                write_frame(out, [seq, err])
                out.flush()
        return done

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fm-send") as pool:
        frames = FrameReader(inp.fileno())
        while (reqs := frames.read()) is not None:
            for seq, kind, dest, body, nid in reqs:
                pool.submit(deliverer.send, kind, dest, body, nid).add_done_callback(answer(seq))


def main(argv: list[str] | None = None) -> None:
    """Entry point: ``python -m fieldmesh.stream.sender '{"timeout_s": 5, "mqtt_url": null}'``."""
    args = argv if argv is not None else sys.argv[1:]
    cfg = json.loads(args[0]) if args else {}
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s notify-sender %(levelname)s %(message)s")
    deliverer = Deliverer(timeout_s=float(cfg.get("timeout_s", 5.0)), mqtt_url=cfg.get("mqtt_url"))
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer, deliverer, workers=int(cfg.get("workers", 8)))
    finally:
        deliverer.close()


if __name__ == "__main__":
    main()
