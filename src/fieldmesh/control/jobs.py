"""Jobs: a document sent to a set of devices, and one execution per device (docs/rollouts.md).

The state machine of an execution is pure (no I/O)::

    queued ──> in_progress ──> succeeded | failed | rejected
      │             │
      └─────────────┴──> timed_out (the controller: no final answer before the deadline)
                          canceled  (the operator, or a halted rollout)

``succeeded``, ``failed``, ``rejected``, ``timed_out`` and ``canceled`` are final. A ``failed`` or
``timed_out`` execution with attempts left is queued again under a new *execution number*: an answer that
names an older number is stale and ignored (a device that answers late cannot overwrite a retry).

Delivery (MQTT, :mod:`fieldmesh.control.jobrunner` and :mod:`fieldmesh.edge.jobs`):

- ``devices/{id}/jobs/notify`` (retained, QoS 1): every pending execution of the device
  (``{"jobs": [{"job_id", "execution", "document", "timeout_s"}]}``), republished on each change, so a
  device that was offline finds its work when it reconnects.
- ``devices/{id}/jobs/{job_id}/update`` (QoS 1, from the device):
  ``{"execution": n, "status": "in_progress|succeeded|failed|rejected", "details": {...}}``.

Targets are device ids, registry groups, and a registry query (``status``, ``groups`` (any of), ``tags``
(all of), ``attributes`` (equal)); a device matching any of the three is targeted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

from fieldmesh.core.errors import ConfigError, FieldmeshError
from fieldmesh.core.topics import DEVICE_ID_RE

__all__ = [
    "ACTIVE",
    "DEVICE_STATUSES",
    "FINAL",
    "STATES",
    "Execution",
    "InvalidTransition",
    "JobSpec",
    "Targets",
    "cancel",
    "dispatch",
    "expire",
    "job_counts",
    "notify_payload",
    "notify_topic",
    "parse_update",
    "retry",
    "transition",
    "update_topic",
]

State = Literal["queued", "in_progress", "succeeded", "failed", "rejected", "timed_out", "canceled"]
STATES: Final = ("queued", "in_progress", "succeeded", "failed", "rejected", "timed_out", "canceled")
FINAL: Final = frozenset({"succeeded", "failed", "rejected", "timed_out", "canceled"})
ACTIVE: Final = frozenset({"queued", "in_progress"})
#: What a device may report.
DEVICE_STATUSES: Final = frozenset({"in_progress", "succeeded", "failed", "rejected"})
_JOB_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_DOC: Final = 64 * 1024
_MAX_DETAILS: Final = 4096


class InvalidTransition(FieldmeshError):
    """A change an execution in its state cannot take (``.state``, ``.to``)."""

    def __init__(self, state: str, to: str) -> None:
        super().__init__(f"an execution {state} cannot become {to}")
        self.state = state
        self.to = to


def notify_topic(device_id: str) -> str:
    """Where a device finds its pending executions (retained)."""
    return f"devices/{device_id}/jobs/notify"


def update_topic(device_id: str, job_id: str) -> str:
    """Where a device reports on one execution."""
    return f"devices/{device_id}/jobs/{job_id}/update"


@dataclass(frozen=True)
class Targets:
    """Which devices a job is for: ids, groups, and/or a registry query (the union)."""

    devices: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    query: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        for d in self.devices:
            if not isinstance(d, str) or not DEVICE_ID_RE.fullmatch(d):
                raise ConfigError(f"targets.devices: bad device id {d!r}", key="targets.devices")
        if not all(isinstance(g, str) for g in self.groups):
            raise ConfigError("targets.groups: group names", key="targets.groups")
        q = self.query
        if q is not None:
            if not isinstance(q, Mapping):
                raise ConfigError("targets.query: a JSON object", key="targets.query")
            unknown = set(q) - {"status", "groups", "tags", "attributes"}
            if unknown:
                raise ConfigError(f"targets.query: unknown key(s) {sorted(unknown)} (status, groups, tags, "
                                  "attributes)", key="targets.query")
            if "status" in q and not isinstance(q["status"], str):
                raise ConfigError("targets.query.status: active, suspended or retired", key="targets.query")
            for k in ("groups", "tags"):
                if k in q and (not isinstance(q[k], list) or not all(isinstance(x, str) for x in q[k])):
                    raise ConfigError(f"targets.query.{k}: a list of names", key="targets.query")
            if "attributes" in q and not isinstance(q["attributes"], Mapping):
                raise ConfigError("targets.query.attributes: an object of name: value", key="targets.query")

    def check(self) -> Targets:
        """``self``, or ConfigError when it names nothing (what a caller asks for must name devices)."""
        if not (self.devices or self.groups or self.query):
            raise ConfigError("targets: name devices, groups or a query", key="targets")
        return self

    def matches(self, device_id: str, *, status: str = "active", groups: Sequence[str] = (),
                tags: Sequence[str] = (), attributes: Mapping[str, Any] | None = None) -> bool:
        """Whether a registered device is targeted."""
        if device_id in self.devices or set(groups) & set(self.groups):
            return True
        q = self.query
        if not q:
            return False
        if "status" in q and q["status"] != status:
            return False
        if "groups" in q and not set(groups) & set(q["groups"]):
            return False
        if "tags" in q and not set(q["tags"]) <= set(tags):
            return False
        attrs = attributes or {}
        return all(attrs.get(k) == v for k, v in dict(q.get("attributes") or {}).items())

    def resolve(self, registered: Iterable[Any]) -> list[str]:
        """The targeted device ids, sorted: explicit ids (registered or not) plus registry matches.

        ``registered``: registry devices (``.id``, ``.status``, ``.groups``, ``.tags``, ``.attributes``).
        """
        out = set(self.devices)
        for d in registered:
            if self.matches(d.id, status=d.status, groups=d.groups, tags=d.tags, attributes=d.attributes):
                out.add(d.id)
        return sorted(out)

    def as_dict(self) -> dict[str, Any]:
        """JSON shape."""
        return {"devices": list(self.devices), "groups": list(self.groups),
                "query": dict(self.query) if self.query is not None else None}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Targets:
        """From the JSON shape."""
        return cls(devices=tuple(obj.get("devices") or ()), groups=tuple(obj.get("groups") or ()),
                   query=obj.get("query"))


@dataclass(frozen=True)
class JobSpec:
    """A job: its document, targets, and how its executions are paced, timed and retried.

    Args:
        job_id: ``[A-Za-z0-9_-]{1,64}``.
        document: what the device executes (``{"op": ..., ...}``), at most 64 KiB of JSON.
        timeout_s: an execution without a final answer this long after it was sent times out.
        max_attempts: attempts per device (1: no retry); ``failed`` and ``timed_out`` are retried.
        rate_per_s: executions sent per second at most (0: no limit).
        max_in_flight: executions sent and not final at most (0: no limit).
    """

    job_id: str
    document: Mapping[str, Any]
    targets: Targets
    timeout_s: float = 60.0
    max_attempts: int = 1
    rate_per_s: float = 0.0
    max_in_flight: int = 0
    rollout_id: str | None = None

    def __post_init__(self) -> None:
        if not _JOB_ID.fullmatch(self.job_id):
            raise ConfigError(f"job_id: {self.job_id!r} is not [A-Za-z0-9_-]{{1,64}}", key="job_id")
        if not isinstance(self.document, Mapping) or not isinstance(self.document.get("op"), str):
            raise ConfigError("document: a JSON object with a string 'op' is required", key="document")
        if len(json.dumps(self.document)) > _MAX_DOC:
            raise ConfigError(f"document: larger than {_MAX_DOC} bytes", key="document")
        if not 0 < self.timeout_s <= 7 * 86400:
            raise ConfigError("timeout_s: between 0 and 7 days", key="timeout_s")
        if not 1 <= self.max_attempts <= 10:
            raise ConfigError("max_attempts: 1 to 10", key="max_attempts")
        if self.rate_per_s < 0 or self.max_in_flight < 0:
            raise ConfigError("rate_per_s, max_in_flight: not negative", key="rate_per_s")


@dataclass(frozen=True)
class Execution:
    """One device's execution of a job."""

    job_id: str
    device_id: str
    state: str = "queued"
    attempt: int = 1
    #: Raised on every (re)queue; a device's answer must name the current one.
    execution: int = 1
    queued_ms: int = 0
    sent_ms: int | None = None
    updated_ms: int = 0
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        """Whether the state is final."""
        return self.state in FINAL

    @property
    def in_flight(self) -> bool:
        """Sent and not final."""
        return self.sent_ms is not None and self.state in ACTIVE

    def as_dict(self) -> dict[str, Any]:
        """JSON shape (API)."""
        return {"job_id": self.job_id, "device_id": self.device_id, "state": self.state, "attempt": self.attempt,
                "execution": self.execution, "queued_ms": self.queued_ms, "sent_ms": self.sent_ms,
                "updated_ms": self.updated_ms, "details": dict(self.details)}


_ALLOWED: Final[dict[str, frozenset[str]]] = {
    "queued": frozenset({"in_progress", "succeeded", "failed", "rejected", "timed_out", "canceled"}),
    "in_progress": frozenset({"in_progress", "succeeded", "failed", "rejected", "timed_out", "canceled"}),
}


def transition(ex: Execution, to: str, *, now_ms: int, details: Mapping[str, Any] | None = None) -> Execution:
    """``ex`` in state ``to``; raises :class:`InvalidTransition` from a final state or to ``queued``."""
    if to not in _ALLOWED.get(ex.state, frozenset()):
        raise InvalidTransition(ex.state, to)
    merged = {**ex.details, **(details or {})}
    return replace(ex, state=to, updated_ms=now_ms, details=merged)


def dispatch(ex: Execution, *, now_ms: int) -> Execution:
    """Mark a queued execution as sent (its timeout starts now)."""
    if ex.state != "queued" or ex.sent_ms is not None:
        raise InvalidTransition(ex.state, "sent")
    return replace(ex, sent_ms=now_ms, updated_ms=now_ms)


def expire(ex: Execution, *, now_ms: int, timeout_s: float) -> Execution | None:
    """``ex`` timed out when it was sent more than ``timeout_s`` ago without a final answer, else None."""
    if ex.in_flight and ex.sent_ms is not None and now_ms - ex.sent_ms >= timeout_s * 1000:
        return transition(ex, "timed_out", now_ms=now_ms, details={"reason": f"no final answer in {timeout_s:g}s"})
    return None


def retry(ex: Execution, *, now_ms: int, max_attempts: int) -> Execution | None:
    """A new attempt (queued, new execution number) of a failed or timed-out execution with attempts left."""
    if ex.state not in ("failed", "timed_out") or ex.attempt >= max_attempts:
        return None
    return replace(ex, state="queued", attempt=ex.attempt + 1, execution=ex.execution + 1, queued_ms=now_ms,
                   sent_ms=None, updated_ms=now_ms, details={"previous": {"state": ex.state, **ex.details}})


def cancel(ex: Execution, *, now_ms: int, reason: str) -> Execution | None:
    """``ex`` canceled, or None when it is final already."""
    if ex.final:
        return None
    return transition(ex, "canceled", now_ms=now_ms, details={"reason": reason})


def parse_update(payload: bytes) -> tuple[int, str, dict[str, Any]]:
    """A device's update: ``(execution, status, details)``; raises ValueError on a bad one."""
    obj = json.loads(payload)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    n, status, details = obj.get("execution"), obj.get("status"), obj.get("details", {})
    details = {} if details is None else details
    if type(n) is not int or n < 1:
        raise ValueError("execution: a positive integer is required")
    if status not in DEVICE_STATUSES:
        raise ValueError(f"status: one of {sorted(DEVICE_STATUSES)}")
    if not isinstance(details, dict) or len(json.dumps(details)) > _MAX_DETAILS:
        raise ValueError(f"details: a JSON object of at most {_MAX_DETAILS} bytes")
    return n, str(status), details


def notify_payload(pending: Iterable[tuple[Execution, JobSpec]]) -> bytes:
    """The retained notify message of one device: its pending executions, oldest first."""
    jobs = [{"job_id": ex.job_id, "execution": ex.execution, "document": dict(spec.document),
             "timeout_s": spec.timeout_s}
            for ex, spec in sorted(pending, key=lambda p: (p[0].queued_ms, p[0].job_id)) if ex.state in ACTIVE]
    return json.dumps({"jobs": jobs}, separators=(",", ":")).encode()


def job_counts(executions: Iterable[Execution]) -> dict[str, int]:
    """Executions per state (every state named)."""
    out = dict.fromkeys(STATES, 0)
    for ex in executions:
        out[ex.state] += 1
    return out
