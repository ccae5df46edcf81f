"""Jobs and rollouts in the REST API (docs/rollouts.md): create, list, show, cancel; the rollout view.

The API records what operators ask for; the job controller (``fieldmesh jobs controller``) does it.
Writes need the operator role without a device-group limit (a job or rollout may reach any device);
reads need the viewer role, also without a limit (they list devices of every group).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, Path, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from fieldmesh.api.auth import Principal
from fieldmesh.api.params import BAD_PARAMETER, ErrorBody
from fieldmesh.control.jobs import STATES, JobSpec, Targets, job_counts
from fieldmesh.control.rollouts import RolloutSpec
from fieldmesh.store.jobs import JOB_STATUSES, JobStore, RolloutRow
from fieldmesh.store.registry import DeviceRegistry

__all__ = ["add_job_routes", "rollout_view"]

_NOT_FOUND: Final[dict[int | str, dict[str, Any]]] = {
    404: {"model": ErrorBody, "description": "no such job or rollout"}}
_CONFLICT: Final[dict[int | str, dict[str, Any]]] = {409: {"model": ErrorBody, "description": "the id is taken"}}
_ID_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"


class TargetsBody(BaseModel):
    """Which devices: ids, registry groups, a registry query (the union)."""

    model_config = ConfigDict(extra="forbid")
    devices: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")]] = Field(default_factory=list,
                                                                                     max_length=100_000)
    groups: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list, max_length=100)
    query: dict[str, Any] | None = Field(None, description="status, groups (any of), tags (all of), attributes "
                                                           "(equal)")


class JobBody(BaseModel):
    """``POST /jobs``."""

    model_config = ConfigDict(extra="forbid")
    job_id: str | None = Field(None, pattern=_ID_PATTERN, description="default: a random id")
    document: dict[str, Any] = Field(description="what the device runs: {op: install|rollback|report|...}")
    targets: TargetsBody
    timeout_s: float = Field(60.0, gt=0, le=7 * 86400)
    max_attempts: int = Field(1, ge=1, le=10)
    rate_per_s: float = Field(0.0, ge=0, le=1e6)
    max_in_flight: int = Field(0, ge=0, le=1_000_000)


class RolloutBody(BaseModel):
    """``POST /rollouts`` (docs/rollouts.md)."""

    model_config = ConfigDict(extra="forbid")
    rollout_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,48}$")
    artifact: dict[str, Any] = Field(description="the signed manifest (fieldmesh jobs sign): kind, name, version, "
                                                 "sha256, size, signature, key_id, url")
    targets: TargetsBody
    canary_group: str | None = Field(None, min_length=1, max_length=64)
    canary: int = Field(10, ge=0, le=1_000_000)
    stages: list[float] = Field(default_factory=lambda: [10.0, 50.0, 100.0], min_length=1, max_length=100,
                                description="cumulative percentages of the targets after the canary, ending at 100")
    rate_per_s: float = Field(20.0, ge=0, le=1e6)
    max_in_flight: int = Field(20, ge=0, le=1_000_000)
    timeout_s: float = Field(120.0, gt=0, le=7 * 86400)
    bake_s: float = Field(5.0, ge=0, le=30 * 86400)
    gates: dict[str, Any] = Field(default_factory=dict, description="max_failure_rate, max_failures, min_samples, "
                                  "max_anomaly_rate_delta, min_fresh_ratio, freshness_s, metric, max_metric_delta, "
                                  "min_devices, canary (docs/canary.md)")


class JobView(BaseModel):
    """A job and its executions per state."""

    model_config = ConfigDict(extra="allow")
    job_id: str
    status: str = Field(description=" | ".join(JOB_STATUSES))
    counts: dict[str, int]


class ExecutionView(BaseModel):
    """One device's execution."""

    model_config = ConfigDict(extra="allow")
    job_id: str
    device_id: str
    state: str = Field(description=" | ".join(STATES))
    attempt: int
    execution: int


class RolloutView(BaseModel):
    """A rollout: status, stage, gate values, exposure, rollback."""

    model_config = ConfigDict(extra="allow")
    rollout_id: str
    status: str
    stage: dict[str, Any] | None
    gates: list[dict[str, Any]]


def rollout_view(ro: RolloutRow) -> dict[str, Any]:
    """The operator's view of a rollout (``GET /rollouts/{id}``, ``fieldmesh jobs rollout show``)."""
    p = ro.progress
    stages = p.get("stages") or []
    k = int(p.get("stage", -1))
    total = int(p.get("total", 0))
    exposed = int(p.get("exposed", 0))
    counts = dict(p.get("counts") or {})
    return {
        "rollout_id": ro.rollout_id, "status": ro.status,
        "artifact": {k2: ro.spec["artifact"].get(k2) for k2 in ("kind", "name", "version", "sha256", "size")},
        "stage": ({"index": k, "name": stages[k]["name"], "of": len(stages), "job_id": stages[k]["job_id"]}
                  if 0 <= k < len(stages) else None),
        "stages": [{kk: s.get(kk) for kk in ("name", "end", "job_id", "started_ms", "done_ms")} for s in stages],
        "devices": total, "exposed": exposed, "exposed_ratio": exposed / total if total else None,
        "updated": counts.get("succeeded", 0), "counts": counts,
        "gates": list(p.get("gates") or []), "halt_reason": p.get("halt_reason"),
        "rollback_job": p.get("rollback_job"), "rollback": p.get("rollback"),
        "created_ms": ro.created_ms, "created_by": ro.created_by, "updated_ms": ro.updated_ms,
        "started_ms": p.get("started_ms"), "halted_ms": p.get("halted_ms"), "finished_ms": p.get("finished_ms"),
        "spec": {k2: v for k2, v in ro.spec.items() if k2 != "artifact"},
    }


def add_job_routes(r: APIRouter, *, store: Callable[[], JobStore], registry: Callable[[], DeviceRegistry],
                   viewer: Any, operator: Any) -> None:
    """Add the job and rollout routes to ``r`` (``viewer``/``operator``: the role guards, every device)."""

    def job_view(job_id: str) -> dict[str, Any]:
        js = store()
        row = js.get_job(job_id)
        return {**row.as_dict(), "counts": job_counts(js.executions(job_id=job_id))}

    @r.post("/jobs", status_code=201, response_model=JobView, responses={**BAD_PARAMETER, **_CONFLICT},
            description="Create a job: one execution per targeted device (resolved now from the registry); the "
                        "job controller sends them over MQTT.")
    def post_job(body: Annotated[JobBody, Body()], p: Principal = operator) -> dict[str, Any]:
        targets = Targets(devices=tuple(body.targets.devices), groups=tuple(body.targets.groups),
                          query=body.targets.query).check()
        spec = JobSpec(job_id=body.job_id or f"job-{secrets.token_hex(6)}", document=body.document,
                       targets=targets, timeout_s=body.timeout_s, max_attempts=body.max_attempts,
                       rate_per_s=body.rate_per_s, max_in_flight=body.max_in_flight)
        devices = targets.resolve(registry().list(limit=1_000_000)) if (targets.groups or targets.query) \
            else sorted(set(targets.devices))
        store().create_job(spec, devices, actor=p.subject)
        return job_view(spec.job_id)

    @r.get("/jobs", response_model=list[JobView], responses=BAD_PARAMETER)
    def get_jobs(status: Annotated[str | None, Query(pattern="^(" + "|".join(JOB_STATUSES) + ")$")] = None,
                 limit: Annotated[int, Query(ge=1, le=1000)] = 100, _: Principal = viewer) -> list[dict[str, Any]]:
        js = store()
        return [{**j.as_dict(), "counts": job_counts(js.executions(job_id=j.spec.job_id))}
                for j in js.list_jobs(status=status, limit=limit)]

    @r.get("/jobs/{job_id}", response_model=JobView, responses={**BAD_PARAMETER, **_NOT_FOUND})
    def get_job(job_id: Annotated[str, Path(pattern=_ID_PATTERN)], _: Principal = viewer) -> dict[str, Any]:
        return job_view(job_id)

    @r.get("/jobs/{job_id}/executions", response_model=list[ExecutionView], responses={**BAD_PARAMETER, **_NOT_FOUND})
    def get_executions(job_id: Annotated[str, Path(pattern=_ID_PATTERN)],
                       state: Annotated[str | None, Query(pattern="^(" + "|".join(STATES) + ")$")] = None,
                       limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
                       _: Principal = viewer) -> list[dict[str, Any]]:
        js = store()
        js.get_job(job_id)
        return [e.as_dict() for e in js.executions(job_id=job_id, states=None if state is None else (state,),
                                                   limit=limit)]

    @r.post("/jobs/{job_id}/cancel", response_model=JobView, responses={**BAD_PARAMETER, **_NOT_FOUND},
            description="Ask the controller to cancel the executions not final yet (status `canceling`, then "
                        "`canceled`). A job already completed or canceled is answered as it is.")
    def cancel_job(job_id: Annotated[str, Path(pattern=_ID_PATTERN)], p: Principal = operator) -> dict[str, Any]:
        store().set_job_status(job_id, "canceling", actor=p.subject, expect=("in_progress",))
        return job_view(job_id)

    @r.post("/rollouts", status_code=201, response_model=RolloutView, responses={**BAD_PARAMETER, **_CONFLICT},
            description="Start a rollout of a signed artifact (docs/rollouts.md): canary, then stages, gated.")
    async def post_rollout(body: Annotated[RolloutBody, Body()], p: Principal = operator) -> dict[str, Any]:
        spec = RolloutSpec.from_dict(body.model_dump(exclude_unset=True))
        spec.targets.check()
        ro = await run_in_threadpool(store().create_rollout, spec.rollout_id, spec.as_dict(), actor=p.subject)
        return rollout_view(ro)

    @r.get("/rollouts", response_model=list[RolloutView], responses=BAD_PARAMETER)
    def get_rollouts(limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                     _: Principal = viewer) -> list[dict[str, Any]]:
        return [rollout_view(ro) for ro in store().list_rollouts(limit=limit)]

    @r.get("/rollouts/{rollout_id}", response_model=RolloutView, responses={**BAD_PARAMETER, **_NOT_FOUND},
           description="Progress of a rollout: status, current stage, devices exposed, executions per state, "
                       "every gate's value against its threshold, why it halted, the rollback.")
    def get_rollout(rollout_id: Annotated[str, Path(pattern=_ID_PATTERN)], _: Principal = viewer) -> dict[str, Any]:
        return rollout_view(store().get_rollout(rollout_id))

    @r.post("/rollouts/{rollout_id}/cancel", response_model=RolloutView, responses={**BAD_PARAMETER, **_NOT_FOUND},
            description="Stop a rollout: pending installs are canceled and the devices that got the artifact are "
                        "rolled back (status `canceling`, then `canceled`).")
    def cancel_rollout(rollout_id: Annotated[str, Path(pattern=_ID_PATTERN)],
                       p: Principal = operator) -> dict[str, Any]:
        js = store()
        js.cancel_rollout(rollout_id, actor=p.subject)
        return rollout_view(js.get_rollout(rollout_id))
