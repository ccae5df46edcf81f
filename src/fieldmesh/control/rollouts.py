"""Rollouts of signed firmware and edge models in stages, with gates and automatic rollback.

A rollout installs one signed artifact (:mod:`fieldmesh.core.artifact`) on its target devices in
stages: a canary (a registry group, or the first ``canary`` devices), then cumulative percentages of
the targets (e.g. 10, 50, 100). Each stage is a job (``op: install``) paced by ``rate_per_s`` and
``max_in_flight``. Gates are evaluated on every controller tick, during a stage as well as between
stages, so a bad version is caught while few devices have it:

- ``max_failure_rate`` / ``max_failures``: install executions failed, rejected or timed out (over the
  final ones, once ``min_samples`` are final);
- ``max_anomaly_rate_delta``: the updated devices' share of readings the edge agent flagged
  (``meta.decision == "anomaly"``) minus that of the devices not yet updated;
- ``min_fresh_ratio``: the share of updated devices that sent a reading in the last ``freshness_s``;
- ``metric`` / ``max_metric_delta``: the mean of a chosen metric over updated devices minus its mean over
  devices not yet updated (absolute).
- ``canary``: the verdict of a routed canary (docs/canary.md) over the rollout's devices: ``hold`` fails
  the gate, ``promote`` passes it, ``no_data`` does not judge yet.

When a gate fails the rollout halts: pending installs are canceled and a rollback job
(``op: rollback`` to the version each device reported before) goes to every device that was sent the
artifact. The rollout is ``rolled_back`` when that job is done. Pure: the controller
(:mod:`fieldmesh.control.jobrunner`) does the I/O.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from fieldmesh.control.jobs import Targets
from fieldmesh.core.artifact import check_manifest, manifest_bytes
from fieldmesh.core.errors import ConfigError

__all__ = [
    "ROLLOUT_STATUSES",
    "CohortStats",
    "GateResult",
    "Gates",
    "RolloutSpec",
    "Telemetry",
    "device_order",
    "evaluate_gates",
    "key_id",
    "sign_artifact",
    "stage_bounds",
]

#: pending -> running -> completed | halted -> rolled_back; canceled by the operator (then rolled back
#: like a halt).
ROLLOUT_STATUSES: Final = ("pending", "running", "completed", "halted", "rolled_back", "canceling", "canceled")
_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,48}")
_METRIC: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v and v not in (float("inf"), -float("inf"))


def key_id(public_raw: bytes) -> str:
    """A public key's id: the first 16 hex digits of the SHA-256 of its raw 32 bytes."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def sign_artifact(private_key: Any, data: bytes, *, kind: str, name: str, version: str) -> dict[str, Any]:
    """The signed manifest of ``data``: the manifest fields plus ``signature`` (base64) and ``key_id``.

    ``private_key``: a ``cryptography`` Ed25519PrivateKey.
    """
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    m = {"kind": kind, "name": name, "version": version, "sha256": hashlib.sha256(data).hexdigest(),
         "size": len(data)}
    sig = private_key.sign(manifest_bytes(m))
    pub = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {**m, "signature": base64.b64encode(sig).decode(), "key_id": key_id(pub)}


@dataclass(frozen=True)
class Gates:
    """Thresholds that halt a rollout (None: not checked)."""

    max_failure_rate: float | None = 0.05
    max_failures: int | None = None
    min_samples: int = 10
    max_anomaly_rate_delta: float | None = None
    min_fresh_ratio: float | None = None
    freshness_s: float = 60.0
    metric: str | None = None
    max_metric_delta: float | None = None
    #: Telemetry gates need this many updated devices with readings before they judge.
    min_devices: int = 5
    #: A canary (docs/canary.md) whose verdict gates the rollout: ``hold`` halts it.
    canary: str | None = None

    def __post_init__(self) -> None:
        for k in ("max_failure_rate", "max_anomaly_rate_delta", "min_fresh_ratio", "max_metric_delta"):
            v = getattr(self, k)
            if v is not None and (not _number(v) or v < 0):
                raise ConfigError(f"gates.{k}: a number >= 0 or null", key=f"gates.{k}")
        for k in ("min_samples", "min_devices"):
            v = getattr(self, k)
            if type(v) is not int or v < 1:
                raise ConfigError(f"gates.{k}: an integer >= 1", key=f"gates.{k}")
        if self.max_failures is not None and (type(self.max_failures) is not int or self.max_failures < 0):
            raise ConfigError("gates.max_failures: an integer >= 0 or null", key="gates.max_failures")
        if not _number(self.freshness_s) or self.freshness_s <= 0:
            raise ConfigError("gates.freshness_s: a number > 0", key="gates.freshness_s")
        if self.metric is not None and (not isinstance(self.metric, str) or not _METRIC.fullmatch(self.metric)):
            raise ConfigError("gates.metric: a metric name ([A-Za-z0-9_.-]{1,64})", key="gates.metric")
        if self.canary is not None and (not isinstance(self.canary, str) or not _METRIC.fullmatch(self.canary)):
            raise ConfigError("gates.canary: a canary name ([A-Za-z0-9_.-]{1,64})", key="gates.canary")

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Gates:
        """From JSON; unknown keys are refused."""
        if not isinstance(obj, Mapping):
            raise ConfigError("gates: a JSON object", key="gates")
        unknown = set(obj) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"gates: unknown key(s) {sorted(unknown)}", key="gates")
        return cls(**obj)


@dataclass(frozen=True)
class RolloutSpec:
    """What to roll out, to whom, how fast, and when to stop.

    Args:
        rollout_id: ``[A-Za-z0-9_-]{1,48}``.
        artifact: the signed manifest plus ``url`` (where devices fetch the bytes).
        targets: the devices.
        canary_group: a registry group whose targeted devices form the canary stage.
        canary: the canary's size when no group is named.
        stages: cumulative percentages of the targets after the canary (ending at 100).
        rate_per_s, max_in_flight: pacing of each stage's job.
        timeout_s: an install with no final answer in this long times out (a failure).
        bake_s: how long a finished stage is watched before the next starts.
    """

    rollout_id: str
    artifact: Mapping[str, Any]
    targets: Targets
    canary_group: str | None = None
    canary: int = 10
    stages: tuple[float, ...] = (10.0, 50.0, 100.0)
    rate_per_s: float = 20.0
    max_in_flight: int = 20
    timeout_s: float = 120.0
    bake_s: float = 5.0
    gates: Gates = field(default_factory=Gates)

    def __post_init__(self) -> None:
        if not isinstance(self.rollout_id, str) or not _ID.fullmatch(self.rollout_id):
            raise ConfigError(f"rollout_id: {self.rollout_id!r} is not [A-Za-z0-9_-]{{1,48}}", key="rollout_id")
        try:
            check_manifest(self.artifact)
        except ValueError as exc:
            raise ConfigError(f"artifact.{exc}", key="artifact") from None
        for k in ("url", "signature", "key_id"):
            if not isinstance(self.artifact.get(k), str) or not self.artifact[k]:
                raise ConfigError(f"artifact.{k}: required", key=f"artifact.{k}")
        st = list(self.stages)
        if not st or not all(_number(s) for s in st) or st != sorted(st) or st[-1] != 100 or st[0] <= 0:
            raise ConfigError("stages: increasing percentages ending at 100", key="stages")
        for k in ("canary", "max_in_flight"):
            if type(getattr(self, k)) is not int or getattr(self, k) < 0:
                raise ConfigError(f"{k}: an integer >= 0", key=k)
        for k, low in (("rate_per_s", 0.0), ("bake_s", 0.0)):
            if not _number(getattr(self, k)) or getattr(self, k) < low:
                raise ConfigError(f"{k}: a number >= 0", key=k)
        if not _number(self.timeout_s) or not 0 < self.timeout_s <= 7 * 86400:
            raise ConfigError("timeout_s: a number of seconds, up to 7 days", key="timeout_s")
        if self.canary_group is not None and (not isinstance(self.canary_group, str) or not self.canary_group):
            raise ConfigError("canary_group: a group name or null", key="canary_group")

    def as_dict(self) -> dict[str, Any]:
        """JSON shape (stored, API)."""
        g = self.gates
        return {"rollout_id": self.rollout_id, "artifact": dict(self.artifact), "targets": self.targets.as_dict(),
                "canary_group": self.canary_group, "canary": self.canary, "stages": list(self.stages),
                "rate_per_s": self.rate_per_s, "max_in_flight": self.max_in_flight, "timeout_s": self.timeout_s,
                "bake_s": self.bake_s, "gates": {k: getattr(g, k) for k in g.__dataclass_fields__}}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> RolloutSpec:
        """From the JSON shape; ConfigError names what is wrong."""
        if not isinstance(obj, Mapping):
            raise ConfigError("rollout: a JSON object", key="rollout")
        unknown = set(obj) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"rollout: unknown key(s) {sorted(unknown)}", key="rollout")
        kw = dict(obj)
        try:
            t = obj.get("targets", {})
            if not isinstance(t, Mapping) or not all(
                    isinstance(t.get(k) or [], list) and all(isinstance(x, str) for x in t.get(k) or [])
                    for k in ("devices", "groups")) or not isinstance(t.get("query") or {}, Mapping):
                raise ConfigError("targets: {devices: [ids], groups: [names], query: {...}}", key="targets")
            kw["targets"] = Targets.from_dict(t)
            if "stages" in kw:
                if not isinstance(kw["stages"], list) or not all(_number(s) for s in kw["stages"]):
                    raise ConfigError("stages: a list of percentages", key="stages")
                kw["stages"] = tuple(float(s) for s in kw["stages"])
            if not isinstance(obj.get("artifact"), Mapping):
                raise ConfigError("artifact: the signed manifest (an object)", key="artifact")
            g = obj.get("gates", {})
            kw["gates"] = Gates.from_dict({} if g is None else g)
            return cls(**kw)
        except TypeError as exc:
            raise ConfigError(f"rollout: {exc}", key="rollout") from None


def device_order(rollout_id: str, devices: Sequence[str], canary: Sequence[str] = ()) -> list[str]:
    """The order devices get the artifact: the canary first, then the rest in a per-rollout random order.

    The order is a hash of rollout id and device id: stable across controller restarts, different per
    rollout (the same devices are not always first).
    """
    can = [d for d in sorted(set(canary)) if d in set(devices)]
    rest = sorted(set(devices) - set(can), key=lambda d: hashlib.sha256(f"{rollout_id}/{d}".encode()).digest())
    return can + rest


def stage_bounds(total: int, canary: int, stages: Sequence[float]) -> list[int]:
    """Cumulative device counts at the end of each stage: ``[canary, ceil(p1%), ..., total]``."""
    out = [min(canary, total)]
    for p in stages:
        n = min(total, -(-round(p * total * 100) // 10_000))
        out.append(max(n, out[-1]))
    return out


@dataclass(frozen=True)
class CohortStats:
    """Telemetry of a set of devices since a time."""

    devices: int = 0
    reporting: int = 0
    readings: int = 0
    anomalies: int = 0
    fresh: int = 0
    metric_mean: float | None = None

    @property
    def anomaly_rate(self) -> float | None:
        """Share of readings flagged anomalous (None without readings)."""
        return self.anomalies / self.readings if self.readings else None


class Telemetry(Protocol):
    """Fleet telemetry for gates (the hot store: :class:`fieldmesh.store.rollouts.HotTelemetry`)."""

    def cohort(self, device_ids: Sequence[str], *, since_ms: int, fresh_since_ms: int,
               metric: str | None) -> CohortStats:
        """Readings of ``device_ids`` at or after ``since_ms``."""
        ...

    def canary_verdict(self, name: str) -> str | None:
        """The verdict of canary ``name`` (``promote``, ``hold``, ``no_data``); None when there is no such canary."""
        ...


@dataclass(frozen=True)
class GateResult:
    """One gate's value against its threshold; ``ok`` None when there is not enough data yet."""

    name: str
    value: float | None
    threshold: float | None
    ok: bool | None

    def as_dict(self) -> dict[str, Any]:
        """JSON shape."""
        return {"name": self.name, "value": self.value, "threshold": self.threshold, "ok": self.ok}


def evaluate_gates(g: Gates, *, final: int, failures: int, updated: CohortStats | None = None,
                   baseline: CohortStats | None = None, canary_verdict: str | None = None) -> list[GateResult]:
    """Every configured gate's value and verdict (``canary_verdict``: the ``canary`` gate's canary's,
    ``promote``, ``hold``, ``no_data``, or None when unknown)."""
    out: list[GateResult] = []
    rate = failures / final if final else None
    if g.max_failure_rate is not None:
        ok = None if final < g.min_samples or rate is None else rate <= g.max_failure_rate
        # enough failures already fail the gate whatever comes next (no need to wait for min_samples)
        if ok is None and failures > g.max_failure_rate * max(g.min_samples, final):
            ok = False
        out.append(GateResult("failure_rate", rate, g.max_failure_rate, ok))
    if g.max_failures is not None:
        out.append(GateResult("failures", float(failures), float(g.max_failures), failures <= g.max_failures))
    enough = updated is not None and updated.reporting >= g.min_devices
    if g.max_anomaly_rate_delta is not None:
        val = None
        if enough and updated is not None and updated.anomaly_rate is not None:
            base = baseline.anomaly_rate if baseline is not None and baseline.anomaly_rate is not None else 0.0
            val = updated.anomaly_rate - base
        out.append(GateResult("anomaly_rate_delta", val, g.max_anomaly_rate_delta,
                              None if val is None else val <= g.max_anomaly_rate_delta))
    if g.min_fresh_ratio is not None:
        val = updated.fresh / updated.devices if updated is not None and updated.devices >= g.min_devices else None
        out.append(GateResult("fresh_ratio", val, g.min_fresh_ratio, None if val is None else val >= g.min_fresh_ratio))
    if g.metric is not None and g.max_metric_delta is not None:
        val = None
        if (enough and updated is not None and baseline is not None and updated.metric_mean is not None
                and baseline.metric_mean is not None):
            val = abs(updated.metric_mean - baseline.metric_mean)
        out.append(GateResult(f"metric_delta:{g.metric}", val, g.max_metric_delta,
                              None if val is None else val <= g.max_metric_delta))
    if g.canary is not None:  # value 1 promote, 0 hold; threshold 1
        val = {"promote": 1.0, "hold": 0.0}.get(canary_verdict or "")
        out.append(GateResult(f"canary:{g.canary}", val, 1.0, None if val is None else val >= 1.0))
    return out
