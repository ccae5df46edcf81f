"""Twin routes of the REST API (docs/twins.md): read a device's twin and delta, change its desired state.

Authorization is the device routes': a viewer reads the twins of the devices it sees, an operator
changes them; another group's device is a 404, as for ``GET /devices/{id}``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path as FsPath
from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, Header, HTTPException, Path
from fastapi.responses import JSONResponse
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from fieldmesh.api.auth import Principal
from fieldmesh.api.params import BAD_PARAMETER, ErrorBody
from fieldmesh.core.topics import DEVICE_ID_RE
from fieldmesh.core.twins import MAX_DOC_BYTES, TwinTooLarge
from fieldmesh.store.twins import TwinStore

__all__ = ["TwinCollector", "TwinStoreHolder", "twin_stats_reader", "twins_router"]

DevicePath = Annotated[str, Path(pattern=f"^{DEVICE_ID_RE.pattern}$")]
_ETAG: Final = re.compile(r'^\s*(?:W/)?"?(\d{1,18})"?\s*$')


class TwinDoc(BaseModel):
    """A device's twin."""

    model_config = ConfigDict(extra="allow")
    device_id: str
    version: int = Field(description="bumped by every change of either document; 0: never written")
    desired: dict[str, Any]
    reported: dict[str, Any]
    delta: dict[str, Any] = Field(description="desired members whose value differs from reported's")
    metadata: dict[str, dict[str, int]] = Field(description=(
        "desired and reported: JSON pointer of each leaf -> epoch ms it was last written"))
    created_ms: int | None
    updated_ms: int | None


class DeltaDoc(BaseModel):
    """A device's delta, with the metadata of its members."""

    device_id: str
    version: int
    delta: dict[str, Any]
    metadata: dict[str, int]


class DesiredPatch(BaseModel):
    """``PATCH /devices/{id}/twin/desired``: a merge patch of the desired document."""

    model_config = ConfigDict(extra="forbid")
    desired: dict[str, Any] = Field(description=(
        "merged into desired (RFC 7396): objects merged member by member, null removes a member, "
        f"anything else replaces it; the result at most {MAX_DOC_BYTES} bytes as JSON"))
    version: int | None = Field(None, ge=0, description=(
        "the twin's version this change was made against: refused (409) if it has moved since "
        "(or send If-Match)"))


class TwinStoreHolder:
    """The twin store, opened on first use (the API may start before the store exists)."""

    def __init__(self, store_url: str) -> None:
        self.store_url = store_url
        self._store: TwinStore | None = None
        self._lock = threading.Lock()

    def __call__(self) -> TwinStore:
        with self._lock:
            if self._store is None:
                self._store = TwinStore(self.store_url)
            return self._store

    def close(self) -> None:
        """Close the store if it was opened."""
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


def twin_stats_reader(path: FsPath) -> Callable[[], dict[str, Any] | None]:
    """What the twin service last wrote to ``path`` (its counters), or None before it has."""

    def read() -> dict[str, Any] | None:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    return read


class TwinCollector(Collector):
    """``fieldmesh_twin_messages_total{kind}`` and ``fieldmesh_twin_rejected_total{reason}``."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Any]:
        st = self.stats() or {}
        m = CounterMetricFamily("fieldmesh_twin_messages", "Twin messages the twin service handled, by kind",
                                labels=["kind"])
        for kind in ("reported", "gets", "desired_published", "store_errors"):
            m.add_metric([kind], float(st.get(kind, 0)))
        yield m
        r = CounterMetricFamily("fieldmesh_twin_rejected", "Device twin messages refused (answered rejected), "
                                "by reason", labels=["reason"])
        for reason, n in sorted(dict(st.get("rejected", {})).items()):
            r.add_metric([reason], float(n))
        yield r


def _version_of(if_match: str | None, body_version: int | None) -> int | None:
    if if_match is None:
        return body_version
    m = _ETAG.match(if_match)
    if m is None:
        raise HTTPException(400, f"If-Match: expected the twin's version as an entity tag, e.g. \"3\", not "
                                 f"{if_match!r}")
    v = int(m[1])
    if body_version is not None and body_version != v:
        raise HTTPException(400, f"If-Match names version {v} and the body version {body_version}: send one")
    return v


def twins_router(twins: Callable[[], TwinStore], *, viewer: Any, operator: Any,
                 visible: Callable[[Principal, str | None], str | None]) -> APIRouter:
    """The routes under ``/api/v1/devices/{device_id}/twin``.

    ``viewer``/``operator``: the app's guards (``need(...)``); ``visible``: its device-visibility check.
    """
    r = APIRouter(prefix="/api/v1")
    no_device: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "no such device"}}

    def answer(doc: dict[str, Any]) -> JSONResponse:
        return JSONResponse(doc, headers={"ETag": f'"{doc["version"]}"'})

    @r.get("/devices/{device_id}/twin", response_model=None, description=(
        "The device's twin: desired, reported, delta, per-field metadata and version (ETag). A device without "
        "a twin yet has version 0 and empty documents."),
        responses={200: {"model": TwinDoc}, **BAD_PARAMETER, **no_device})
    async def get_twin(device_id: DevicePath, p: Principal = viewer) -> JSONResponse:
        visible(p, device_id)
        twin = await run_in_threadpool(lambda: twins().get(device_id))
        return answer(twin.as_dict())

    @r.get("/devices/{device_id}/twin/delta", response_model=None, description=(
        "What the device's desired state asks that its reported state does not have."),
        responses={200: {"model": DeltaDoc}, **BAD_PARAMETER, **no_device})
    async def get_delta(device_id: DevicePath, p: Principal = viewer) -> JSONResponse:
        visible(p, device_id)
        twin = await run_in_threadpool(lambda: twins().get(device_id))
        return answer(twin.delta_doc())

    @r.patch("/devices/{device_id}/twin/desired", response_model=None, description=(
        "Change the device's desired state (operator) by a merge patch: `{\"desired\": {...}}`. With "
        "`If-Match: \"<version>\"` (or `version` in the body) the change is refused (409) if the twin has "
        "moved since that version. The twin service sends the device its new delta."),
        responses={200: {"model": TwinDoc}, **BAD_PARAMETER, **no_device,
                   409: {"model": ErrorBody, "description": "the twin is not at the version named"},
                   413: {"model": ErrorBody, "description": f"desired would exceed {MAX_DOC_BYTES} bytes"}})
    async def patch_desired(device_id: DevicePath, body: Annotated[DesiredPatch, Body()],
                            if_match: Annotated[str | None, Header(description='the twin\'s version, e.g. "3"')] = None,
                            p: Principal = operator) -> JSONResponse:
        visible(p, device_id)
        version = _version_of(if_match, body.version)
        try:
            twin = await run_in_threadpool(lambda: twins().update_desired(device_id, body.desired, actor=p.subject,
                                                                           expect_version=version))
        except TwinTooLarge as exc:
            raise HTTPException(413, str(exc)) from None
        return answer(twin.as_dict())

    return r
