"""What the API's 200 answers look like, for the OpenAPI document.

These models document the rows ``fieldmesh.store.rows`` builds; the routes return plain dicts (no
validation on the hot read path), and ``tests/api/test_schemathesis.py`` checks every real answer
against these schemas. Extra fields are allowed: new fields may be added, none removed or retyped.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DeadLetterRow", "DeviceRow", "Health", "RawRow", "RollupRow", "Stats"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Health(_Open):
    """``GET /health``: ``status`` plus one entry per component (``"ok"`` or what is wrong)."""

    status: str = Field(description='"ok" or "degraded"')
    version: str


class Stats(_Open):
    """``GET /stats``: durable counters; ``received == stored + duplicates + dead_lettered.total``."""

    received: int
    stored: int
    duplicates: int
    late: int
    dead_lettered: dict[str, int] = Field(description='{"total": N, "<reason>": n, ...}')
    lag: dict[str, int] | None = Field(None, description="messages not yet consumed per stage")
    lag_partitions: dict[str, dict[str, int]] | None = Field(
        None, description="messages not yet consumed per stage and bus partition (the processor's counted "
        "from the positions its store has applied)")


class DeviceRow(_Open):
    """A row of ``GET /devices``."""

    device_id: str
    first_seen: str
    last_seen: str
    first_ts: str
    last_ts: str
    readings: int
    metrics: list[str]


class RawRow(_Open):
    """A row of ``GET /telemetry/raw``."""

    device_id: str
    ts: str = Field(description="event time, RFC 3339 UTC")
    ts_ms: int
    measurements: dict[str, float | bool]
    seq: int | None = None
    boot_id: str | None = None
    event_id: str | None = None
    meta: Any = None
    received_ms: int
    enrichment: dict[str, Any] | None = None


class RollupRow(_Open):
    """A row of ``GET /telemetry/rollups``."""

    device_id: str
    metric: str
    window_start: str = Field(description="RFC 3339 UTC")
    window_start_ms: int
    count: int
    sum: float
    min: float
    max: float
    avg: float


class DeadLetterRow(_Open):
    """A row of ``GET /dlq``."""

    id: int
    reason: str
    detail: str
    topic: str
    device_id: str | None
    received_at: str
    payload: str = Field(description="the payload as text, or hex (see payload_encoding)")
    payload_encoding: str = Field(description='"utf-8" or "hex"')
    truncated: bool
