"""What the MQTT door refused, counted from the door's own log.

A refused TLS handshake, a CONNECT without a user for its certificate, or a publish the ACL denies never
reaches fieldmesh: the broker (nats-server or Mosquitto) refuses it and writes a log line. ``fieldmesh
up`` owns that log, so it counts those lines by reason, from where the log stood when it started, and
serves the counts in ``/stats`` (``door_refused``) and ``/metrics`` (``fieldmesh_door_refused_total``).

Reasons:

``tls_handshake``
    the handshake failed: no client certificate, another CA's, an expired or revoked one, TLS below 1.2.
    A connection closed before it said anything (a port probe, ``EOF``) is not counted.
``unknown_device``
    (nats door) a certificate of the CA for which the registry holds no valid certificate of an active
    device: unregistered, suspended, retired or revoked. (The Mosquitto door lets such a device in and the
    gateway dead-letters its messages, counted in ``dead_lettered``.)
``publish_denied``, ``subscribe_denied``
    (nats door) a device published or subscribed beyond its own topics.
``bus_authentication``
    a NATS client on the internal bus without valid credentials.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Final

__all__ = ["REASONS", "DoorRefusals"]

REASONS: Final = ("tls_handshake", "unknown_device", "publish_denied", "subscribe_denied", "bus_authentication")

_NATS: Final = (
    # "unable to connect: authentication error" repeats the line before it: only the plain one counts
    (re.compile(r' - mid:\d+ - "[^"]*" - authentication error'), "unknown_device"),
    (re.compile(r" - mid:\d+ - TLS handshake error: (?!EOF\s*$)"), "tls_handshake"),
    (re.compile(r' - mid:\d+ - "[^"]*" - Publish Violation'), "publish_denied"),
    (re.compile(r' - mid:\d+ - "[^"]*" - Subscription Violation'), "subscribe_denied"),
    (re.compile(r" - cid:\d+ - authentication error"), "bus_authentication"),
)
_MOSQUITTO: Final = (
    # one of these per refused handshake: OpenSSL's error, or (a CRL, the protocol version) the failed connection
    (re.compile(r"OpenSSL Error\[0\]:|Client connection from \S+ failed:"), "tls_handshake"),
)


class DoorRefusals:
    """Counts of refusals in a door's log file, read on demand from where it stood at construction.

    ``kind`` is ``"nats"`` (nats-server's log: its MQTT listener and the internal bus) or
    ``"mosquitto"``. The file is only appended to (nats-server and Mosquitto keep writing it across
    restarts); a file that shrank is read again from its start.
    """

    def __init__(self, path: Path, kind: str) -> None:
        if kind not in ("nats", "mosquitto"):
            raise ValueError(f"unknown door kind {kind!r}")
        self.path = path
        self._patterns = _NATS if kind == "nats" else _MOSQUITTO
        self._counts = dict.fromkeys(REASONS, 0)
        self._offset = path.stat().st_size if path.exists() else 0
        self._partial = b""
        self._lock = threading.Lock()

    def counts(self) -> dict[str, int]:
        """Refusals by reason since construction (every reason, 0 included)."""
        with self._lock:
            self._read()
            return dict(self._counts)

    def _read(self) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size < self._offset:  # replaced or truncated: what it holds now is new
            self._offset, self._partial = 0, b""
        if size == self._offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read(size - self._offset)
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # a line still being written
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            for pattern, reason in self._patterns:
                if pattern.search(line):
                    self._counts[reason] += 1
                    break
