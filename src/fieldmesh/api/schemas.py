"""What the API's 200 answers look like, for the OpenAPI document.

These models document the rows ``fieldmesh.store.rows`` builds; the routes return plain dicts (no
validation on the hot read path), and ``tests/api/test_schemathesis.py`` checks every real answer
against these schemas. Extra fields are allowed: new fields may be added, none removed or retyped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

__all__ = [
    "AuditRow", "DeadLetterRow", "DeviceImported", "DevicePatch", "DeviceRecord", "DeviceRow", "Health",
    "ImportRejectedBody", "KeyRow", "NewDevice", "NewKey", "NewKeyRow", "RawRow", "RollupRow", "Stats", "WhoAmI",
]


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
    auth_failures: dict[str, int] | None = Field(None, description=(
        'API requests refused since the API started: {"total": N, "<reason>": n, ...}, reasons missing_credentials, '
        "bad_key, bad_token (401) and wrong_role, wrong_group (403)"))
    door_refused: dict[str, int] | None = Field(None, description=(
        'what the MQTT door of `fieldmesh up` refused since it started, from the door\'s log: {"total": N, '
        '"<reason>": n, ...}, reasons tls_handshake, unknown_device, publish_denied, subscribe_denied, '
        "bus_authentication (docs/security.md)"))
    lag: dict[str, int] | None = Field(None, description="messages not yet consumed per stage")
    lag_partitions: dict[str, dict[str, int]] | None = Field(
        None, description="messages not yet consumed per stage and bus partition (the processor's counted "
        "from the positions its store has applied)")
    alerts: dict[str, Any] | None = Field(
        None, description="active alerts by severity, notifications by status, delivery latency (docs/alerts.md)")
    jobs_controller: dict[str, Any] | None = Field(
        None, description="the job controller's counters as it saved them last (updates, stale_updates, "
        "invalid_updates, notifies, notify_failures, timeouts, retries, halts, tick_errors, reasons, updated_ms); "
        "null if it never ran (docs/rollouts.md)")
    features: dict[str, int] | None = Field(
        None, description="the feature stage: rows_written, late, unkeyed, online_write_failures (docs/features.md); "
        "null when no feature views ever ran")


class DeviceRow(_Open):
    """A row of ``GET /devices``: what the store has seen of a device, merged with its registry entry.

    A registered device that has not sent yet has ``null`` times, ``readings`` 0 and no ``metrics``;
    a device seen but not registered has ``registered: false``, ``status: null`` and the groups the
    ``FIELDMESH__ACCESS__GROUPS`` patterns give it.
    """

    device_id: str
    first_seen: str | None
    last_seen: str | None
    first_ts: str | None
    last_ts: str | None
    readings: int
    metrics: list[str]
    registered: bool = Field(description="whether the device registry holds the device")
    status: Literal["active", "suspended", "retired"] | None = Field(
        description="the registry's status; null: not registered")
    groups: list[str] = Field(description="the registry's groups, or the patterns' for a device not registered")
    tags: list[str]
    attributes: dict[str, Any]
    created_ms: int | None = Field(None, description="when it was registered")
    updated_ms: int | None = Field(None, description="when its registry entry last changed")


class DeviceRecord(_Open):
    """A device's registry entry (``DELETE /devices/{device_id}`` answers the one removed)."""

    device_id: str
    status: Literal["active", "suspended", "retired"]
    groups: list[str]
    tags: list[str]
    attributes: dict[str, Any]
    created_ms: int
    updated_ms: int


_Group = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
_Tag = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:=/-]{1,64}$")]
_AttrKey = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
_ATTRS_HELP = "name -> any JSON value; 16 KiB at most as JSON"
#: Attribute names are checked: say so in the document (pydantic alone leaves other names allowed there).
_Attributes = Annotated[dict[_AttrKey, Any], WithJsonSchema({
    "type": "object", "patternProperties": {r"^[A-Za-z0-9_.-]{1,64}$": {}}, "additionalProperties": False})]


class NewDevice(BaseModel):
    """The body of ``POST /devices``: register a device."""

    model_config = ConfigDict(extra="forbid")

    device_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")
    status: Literal["active", "suspended", "retired"] = "active"
    groups: list[_Group] = Field(default_factory=list, max_length=100, description=(
        "device groups; a caller limited to groups must name one or more of its own, and only those"))
    tags: list[_Tag] = Field(default_factory=list, max_length=100)
    attributes: _Attributes = Field(default_factory=dict, description=_ATTRS_HELP)


class DevicePatch(BaseModel):
    """The body of ``PATCH /devices/{device_id}``: what is absent (or null) stays as it is."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["active", "suspended", "retired"] | None = None
    groups: list[_Group] | None = Field(None, max_length=100, description="replaces the device's groups")
    tags: list[_Tag] | None = Field(None, max_length=100, description="replaces the device's tags")
    attributes: _Attributes | None = Field(None, description=(
        "merged into the device's attributes (JSON merge patch): a null value removes that attribute"))


class DeviceImported(_Open):
    """``POST /devices/import``: how many rows registered, changed or left a device as it was."""

    added: int
    updated: int
    unchanged: int


class ImportRejectedBody(_Open):
    """``POST /devices/import`` refused (422): nothing was imported; every bad line is named."""

    detail: str
    errors: list[dict[str, Any]] = Field(description='[{"line": n, "message": "..."}], line 1 is the header')


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


class KeyRow(_Open):
    """A row of ``GET /keys``: an API key as stored (never its secret)."""

    id: str
    name: str
    role: str = Field(description="viewer, operator or admin")
    groups: list[str] = Field(description="device groups the key is limited to; empty: every device")
    created_ms: int
    created_by: str = Field(description="who created it (key:<id>, jwt:<subject>, cli:<user>, local)")
    revoked_ms: int | None
    revoked_by: str | None


class NewKeyRow(KeyRow):
    """``POST /keys``: the new key, with its secret form shown this once."""

    key: str = Field(description="fmk_<id>_<secret>: shown once, stored only as a hash")


class NewKey(BaseModel):
    """The body of ``POST /keys``."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["viewer", "operator", "admin"]
    groups: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]] = Field(
        default_factory=list, max_length=100, description="device groups the key is limited to; empty: every device")
    name: str = Field("", max_length=128, description="a label (default: the key id)")


class AuditRow(_Open):
    """A row of ``GET /audit``: one administrative action."""

    id: int
    at_ms: int
    actor: str = Field(description="who: key:<id>, jwt:<subject>, cli:<user> or local")
    action: str = Field(description="what: key.create, key.revoke, ...")
    target: str = Field(description="on what (a key id, ...)")
    detail: dict[str, Any]


class WhoAmI(_Open):
    """``GET /whoami``: the caller as the API sees it."""

    subject: str
    role: str | None
    groups: list[str] | None = Field(description="device groups the caller is limited to; null: every device")
    local_only: bool = Field(description="true: local-only mode, no credential needed")


class AlertRuleRow(_Open):
    """An alert rule (docs/alerts.md): the fields of its kind, plus where it came from and when it changed."""

    name: str
    kind: Literal["threshold", "rate", "anomaly", "absence"]
    severity: str
    devices: list[str]
    labels: dict[str, str]
    notify: list[dict[str, Any]]
    enabled: bool
    source: str = Field(description="api, or file:<path> for rules from a --rules file")
    updated_ms: int
    updated_by: str


class AlertRow(_Open):
    """An alert: at most one per (rule, device) is not cleared."""

    id: int
    rule: str
    device_id: str
    severity: str
    labels: dict[str, str]
    state: Literal["open", "acknowledged", "cleared"]
    value: float | None = Field(description="the reading's value that opened it (null for absence)")
    opened_ts_ms: int = Field(description="event time of the reading that opened it (absence: wall clock)")
    opened_ms: int
    acked_ms: int | None
    acked_by: str | None
    note: str | None
    cleared_ts_ms: int | None
    cleared_ms: int | None
    cleared_by: str | None = Field(description="rule when its condition cleared, else who cleared it")
    clear_value: float | None


class NotificationRow(_Open):
    """A notification of one alert step to one target (the outbox)."""

    id: int
    notification_id: str = Field(description="stable across tries: receivers de-duplicate on it")
    alert_id: int
    event: Literal["open", "acknowledged", "cleared"]
    target: dict[str, Any]
    created_ms: int
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_ms: int
    delivered_ms: int | None
    last_error: str | None


class AlertHistoryRow(_Open):
    """One step of an alert."""

    at_ms: int
    event: Literal["open", "acknowledged", "cleared"]
    actor: str
    note: str | None
    value: float | None


class AlertDetail(AlertRow):
    """An alert with its history and notifications."""

    history: list[AlertHistoryRow]
    notifications: list[NotificationRow]


class AlertStep(BaseModel):
    """The body of an ack or a clear (optional)."""

    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(None, max_length=2000)
