"""A Python client for the online feature store: ``GET /api/v1/features/{entity}?views=...``.

    >>> with FeatureClient("http://127.0.0.1:8000", api_key="...") as fc:   # doctest: +SKIP
    ...     f = fc.get("pump-7", ["pump_stats"])
    ...     f.values("pump_stats")["temperature__mean__5m"]

Values are floats, ``None`` for a feature without a value; a view without a value (never computed, or
older than its TTL) is ``None``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from fieldmesh.core.errors import BackendError, BackendUnavailable, FieldmeshError

__all__ = ["FeatureClient", "OnlineFeatures"]


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


class FeatureClient:
    """Reads online features over HTTP (keep one open: it reuses its connection).

    Args:
        base_url: the API, e.g. ``http://127.0.0.1:8000``.
        api_key: an API key (``Authorization: Bearer``); none on a loopback-only API.
        timeout_s: per request.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout_s: float = 5.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s,
                                  transport=transport)

    def get(self, entity: str, views: Sequence[str]) -> OnlineFeatures:
        """The latest values of ``views`` for ``entity``."""
        if not views:
            raise ValueError("views: name at least one feature view")
        try:
            r = self._http.get(f"/api/v1/features/{quote(entity, safe='')}", params={"views": ",".join(views)})
        except httpx.TransportError as exc:
            raise BackendUnavailable(f"feature API unreachable: {exc}") from exc
        if r.status_code >= 500:
            raise BackendError(f"feature API: {r.status_code} {r.text[:200]}")
        if r.status_code != 200:
            raise FieldmeshError(f"feature API: {r.status_code} {r.text[:200]}")
        body = r.json()
        return OnlineFeatures(entity=body["entity"], views=body["views"])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
