"""A Python client for the online feature store: ``GET /api/v1/features/{entity}?views=...``.

    >>> with FeatureClient("http://127.0.0.1:8000", api_key="...") as fc:   # doctest: +SKIP
    ...     f = fc.get("pump-7", ["pump_stats"])
    ...     f.values("pump_stats")["temperature__mean__5m"]

Values are floats, ``None`` for a feature without a value; a view without a value (never computed, or
older than its TTL) is ``None``.

It is made for the serving path of a model (docs/features.md, "Latency"): keep one client open. It holds
its HTTP/1.1 connections open (keep-alive, ``TCP_NODELAY``; one per thread calling at the same time, a
connection the server closed while idle is replaced and the request sent again once), speaks through the
standard library's :mod:`http.client` and decodes with msgspec.

``FeatureClient(online_url="redis://host:6379/0?prefix=fm")`` reads the online store itself instead of the
API (the API's own store URL, ``--online-url``): the same answer (the same rows, encoded by the same
function, :func:`fieldmesh.store.features.encode_answer`), one network round trip fewer, and no API
credential: whoever holds the Redis address and its password reads every entity.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self
from urllib.parse import quote, urlsplit

import msgspec

from fieldmesh.core.errors import BackendError, BackendUnavailable, FieldmeshError

if TYPE_CHECKING:
    from fieldmesh.store.features import OnlineStore

__all__ = ["FeatureClient", "OnlineFeatures"]

_DECODER: Final = msgspec.json.Decoder()
_VIEW: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # the API's view names


@dataclass(frozen=True, slots=True)
class OnlineFeatures:
    """The answer for one entity: per view, its row (``window_end``, ``known_at``, ``version``, ``values``)."""

    entity: str
    views: dict[str, dict[str, Any] | None]

    def values(self, view: str) -> dict[str, float | None] | None:
        """The view's ``{feature: value}`` (None when the view has no value)."""
        row = self.views.get(view)
        return None if row is None else dict(row["values"])

    def known_at(self, view: str) -> datetime | None:
        """When the view's row became known (the arrival time of the reading that made it final)."""
        row = self.views.get(view)
        return None if row is None else datetime.fromisoformat(row["known_at"].replace("Z", "+00:00"))

    def vector(self, view: str, names: Sequence[str]) -> list[float | None]:
        """The view's values in the order of ``names`` (a model's input); missing ones are None."""
        vals = self.values(view) or {}
        return [vals.get(n) for n in names]


class _NoDelay(http.client.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _NoDelayTls(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FeatureClient:
    """Reads online features over HTTP, or straight from the online store (keep one open: it reuses its
    connections; safe to share between threads).

    Args:
        base_url: the API, e.g. ``http://127.0.0.1:8000`` (``https://`` verifies the server's certificate
            against the system's CAs, or ``ssl_context``'s).
        api_key: an API key (``Authorization: Bearer``); none on a loopback-only API.
        timeout_s: per request (connecting, and each wait for the server).
        online_url: instead of ``base_url``: the online store the API reads (``redis://...?prefix=fm`` or
            ``sqlite:///path/features.db``), read directly; the answers are the API's.
        ssl_context: for an ``https://`` API with a CA of its own.

    Raises:
        ValueError: neither or both of ``base_url`` and ``online_url``, or a URL that is not ``http(s)://``.
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout_s: float = 5.0,
                 online_url: str | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        if (base_url is None) == (online_url is None):
            raise ValueError("FeatureClient: give base_url (the API) or online_url (its online store), one of them")
        self._lock = threading.Lock()
        self._idle: list[http.client.HTTPConnection] = []
        self._closed = False
        self._store: OnlineStore | None = None
        if online_url is not None:
            from fieldmesh.store.features import load_online_store

            self._store = load_online_store(online_url)
            return
        assert base_url is not None
        u = urlsplit(base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"FeatureClient: base_url must be http://host:port or https://..., not {base_url!r}")
        self._tls = u.scheme == "https"
        self._host = u.hostname
        self._port = u.port or (443 if self._tls else 80)
        self._prefix = u.path.rstrip("/")
        self._timeout_s = timeout_s
        self._ssl = ssl_context or (ssl.create_default_context() if self._tls else None)
        self._headers = {"Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    def get(self, entity: str, views: Sequence[str]) -> OnlineFeatures:
        """The latest values of ``views`` for ``entity``.

        Raises:
            BackendUnavailable: the API (or the online store) cannot be reached.
            BackendError: the API answered a 5xx (its online store is unavailable).
            FieldmeshError: any other refusal (401, 403, 400 naming the bad parameter, 404: features off).
        """
        if not views:
            raise ValueError("views: name at least one feature view")
        if self._store is not None:
            bad = [v for v in views if not _VIEW.fullmatch(v)]
            if bad or not 1 <= len(entity) <= 256:  # what the API refuses (a 400)
                raise FieldmeshError(f"bad view names {bad}" if bad else "entity: 1 to 256 characters")
            from fieldmesh.store.features import encode_answer

            body = encode_answer(entity, self._store.get_many(entity, list(dict.fromkeys(views))))
        else:
            status, body = self._get(f"{self._prefix}/api/v1/features/{quote(entity, safe='')}"
                                     f"?views={quote(','.join(views), safe=',')}")
            if status != 200:
                text = body[:200].decode(errors="replace")
                raise (BackendError if status >= 500 else FieldmeshError)(f"feature API: {status} {text}")
        got = _DECODER.decode(body)
        return OnlineFeatures(entity=got["entity"], views=got["views"])

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection (True: it served before) or a new one."""
        with self._lock:
            if self._closed:
                raise FieldmeshError("FeatureClient is closed")
            if self._idle:
                return self._idle.pop(), True
        if self._tls:
            return _NoDelayTls(self._host, self._port, timeout=self._timeout_s, context=self._ssl), False
        return _NoDelay(self._host, self._port, timeout=self._timeout_s), False

    def _get(self, target: str) -> tuple[int, bytes]:
        for attempt in (1, 2):
            conn, reused = self._connection()
            try:
                conn.request("GET", target, headers=self._headers)
                resp = conn.getresponse()
                body = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                # a kept connection the server closed while idle (its keep-alive timeout): once more on a new
                # one; not after a timeout, which a new connection would only wait out again
                if reused and attempt == 1 and not isinstance(exc, TimeoutError):
                    continue
                raise BackendUnavailable(f"feature API unreachable: {exc}") from exc
            if resp.will_close:
                conn.close()
            else:
                with self._lock:
                    if self._closed:
                        conn.close()
                    else:
                        self._idle.append(conn)
            return resp.status, body
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connections (or the online store)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
