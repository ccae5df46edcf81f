"""Jobs, their executions and rollouts, in the hot store (SQLite or PostgreSQL) beside the registry.

Who writes what: the API creates jobs and rollouts and asks for their cancellation (a status); the job
controller (:mod:`fieldmesh.control.jobrunner`) is the only writer of executions and of a rollout's
progress. Creating and canceling are audited.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from fieldmesh.control.jobs import ACTIVE, Execution, JobSpec, Targets
from fieldmesh.core.errors import ConflictError, NotFoundError
from fieldmesh.store.access import HotTables

__all__ = ["JOB_STATUSES", "JobRow", "JobStore", "RolloutRow"]

#: A job is ``in_progress`` until every execution is final (``completed``); ``canceling`` asks the
#: controller to cancel what is pending (then ``canceled``).
JOB_STATUSES: Final = ("in_progress", "completed", "canceling", "canceled")

_COMMON: Final = (
    "CREATE TABLE IF NOT EXISTS fm_jobs (job_id TEXT PRIMARY KEY, spec TEXT NOT NULL, status TEXT NOT NULL,"
    " rollout_id TEXT, created_ms BIGINT NOT NULL, created_by TEXT NOT NULL, updated_ms BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS fm_job_executions (job_id TEXT NOT NULL, device_id TEXT NOT NULL,"
    " state TEXT NOT NULL, attempt INTEGER NOT NULL, execution INTEGER NOT NULL, queued_ms BIGINT NOT NULL,"
    " sent_ms BIGINT, updated_ms BIGINT NOT NULL, details TEXT NOT NULL, PRIMARY KEY (job_id, device_id))",
    "CREATE INDEX IF NOT EXISTS fm_job_executions_device ON fm_job_executions (device_id, state)",
    "CREATE TABLE IF NOT EXISTS fm_job_controller (id INTEGER PRIMARY KEY, stats TEXT NOT NULL,"
    " updated_ms BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS fm_rollouts (rollout_id TEXT PRIMARY KEY, spec TEXT NOT NULL,"
    " status TEXT NOT NULL, progress TEXT NOT NULL, created_ms BIGINT NOT NULL, created_by TEXT NOT NULL,"
    " updated_ms BIGINT NOT NULL)",
)
_EX_COLS: Final = "job_id, device_id, state, attempt, execution, queued_ms, sent_ms, updated_ms, details"


def _now_ms() -> int:
    return int(time.time() * 1000)


def spec_to_json(spec: JobSpec) -> str:
    """A job spec as stored."""
    return json.dumps({"job_id": spec.job_id, "document": dict(spec.document), "targets": spec.targets.as_dict(),
                       "timeout_s": spec.timeout_s, "max_attempts": spec.max_attempts,
                       "rate_per_s": spec.rate_per_s, "max_in_flight": spec.max_in_flight,
                       "rollout_id": spec.rollout_id}, sort_keys=True)


def spec_from_json(text: str) -> JobSpec:
    """A stored job spec."""
    o = json.loads(text)
    return JobSpec(job_id=o["job_id"], document=o["document"], targets=Targets.from_dict(o["targets"]),
                   timeout_s=o["timeout_s"], max_attempts=o["max_attempts"], rate_per_s=o["rate_per_s"],
                   max_in_flight=o["max_in_flight"], rollout_id=o.get("rollout_id"))


def _row_ex(r: Sequence[Any]) -> Execution:
    return Execution(job_id=r[0], device_id=r[1], state=r[2], attempt=int(r[3]), execution=int(r[4]),
                     queued_ms=int(r[5]), sent_ms=None if r[6] is None else int(r[6]), updated_ms=int(r[7]),
                     details=json.loads(r[8]))


@dataclass(frozen=True)
class JobRow:
    """A stored job."""

    spec: JobSpec
    status: str
    created_ms: int
    created_by: str
    updated_ms: int

    def as_dict(self) -> dict[str, Any]:
        """JSON shape (API)."""
        s = self.spec
        return {"job_id": s.job_id, "status": self.status, "document": dict(s.document),
                "targets": s.targets.as_dict(), "timeout_s": s.timeout_s, "max_attempts": s.max_attempts,
                "rate_per_s": s.rate_per_s, "max_in_flight": s.max_in_flight, "rollout_id": s.rollout_id,
                "created_ms": self.created_ms, "created_by": self.created_by, "updated_ms": self.updated_ms}


@dataclass(frozen=True)
class RolloutRow:
    """A stored rollout: its spec and progress as JSON objects."""

    rollout_id: str
    spec: dict[str, Any]
    status: str
    progress: dict[str, Any]
    created_ms: int
    created_by: str
    updated_ms: int


class JobStore(HotTables):
    """Jobs, executions and rollouts at ``url`` (``sqlite:///path`` or ``postgresql://...``)."""

    SQLITE_DDL = _COMMON
    PG_DDL = _COMMON
    APP_NAME = "fieldmesh-jobs"
    WHAT = "job store"

    def _many(self, con: Any, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        if self._pg:
            with con.cursor() as cur:
                cur.executemany(self._sql(sql), rows)
        else:
            con.executemany(sql, rows)

    # -- jobs --------------------------------------------------------------------------------
    def create_job(self, spec: JobSpec, devices: Sequence[str], *, actor: str,
                   now_ms: int | None = None) -> JobRow:
        """Record a job and one queued execution per device; ConflictError if the id is taken."""
        now = _now_ms() if now_ms is None else now_ms
        with self._tx() as con:
            if con.execute(self._sql("SELECT 1 FROM fm_jobs WHERE job_id = ?"), (spec.job_id,)).fetchall():
                raise ConflictError(f"job {spec.job_id!r} exists", kind="job", key=spec.job_id)
            status = "in_progress" if devices else "completed"
            con.execute(self._sql("INSERT INTO fm_jobs (job_id, spec, status, rollout_id, created_ms, created_by,"
                                  " updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"),
                        (spec.job_id, spec_to_json(spec), status, spec.rollout_id, now, actor, now))
            self._many(con, f"INSERT INTO fm_job_executions ({_EX_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       [(spec.job_id, d, "queued", 1, 1, now, None, now, "{}") for d in devices])
            if spec.rollout_id is None:  # a rollout's stage jobs are audited as the rollout
                self._audit(con, actor, "job.create", spec.job_id,
                            {"devices": len(devices), "op": spec.document.get("op")})
        return JobRow(spec, status, now, actor, now)

    def get_job(self, job_id: str) -> JobRow:
        """A job; NotFoundError if none."""
        rows = self._fetch("SELECT spec, status, created_ms, created_by, updated_ms FROM fm_jobs WHERE job_id = ?",
                           (job_id,))
        if not rows:
            raise NotFoundError(f"no job {job_id!r}", kind="job", key=job_id)
        r = rows[0]
        return JobRow(spec_from_json(r[0]), r[1], int(r[2]), r[3], int(r[4]))

    def list_jobs(self, *, status: str | None = None, rollout_id: str | None = None,
                  limit: int = 100) -> builtins.list[JobRow]:
        """Jobs, newest first."""
        where, params = ["1 = 1"], []
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if rollout_id is not None:
            where.append("rollout_id = ?")
            params.append(rollout_id)
        rows = self._fetch(f"SELECT spec, status, created_ms, created_by, updated_ms FROM fm_jobs WHERE "
                           f"{' AND '.join(where)} ORDER BY created_ms DESC, job_id LIMIT ?", (*params, int(limit)))
        return [JobRow(spec_from_json(r[0]), r[1], int(r[2]), r[3], int(r[4])) for r in rows]

    def set_job_status(self, job_id: str, status: str, *, actor: str | None = None, expect: Iterable[str] = ()) -> bool:
        """Change a job's status (only from one of ``expect`` when given); False when it did not apply."""
        exp = tuple(expect)
        with self._tx() as con:
            rows = con.execute(self._sql("SELECT status FROM fm_jobs WHERE job_id = ?"), (job_id,)).fetchall()
            if not rows:
                raise NotFoundError(f"no job {job_id!r}", kind="job", key=job_id)
            if exp and rows[0][0] not in exp:
                return False
            con.execute(self._sql("UPDATE fm_jobs SET status = ?, updated_ms = ? WHERE job_id = ?"),
                        (status, _now_ms(), job_id))
            if actor is not None:
                self._audit(con, actor, f"job.{status}", job_id, {"from": rows[0][0]})
        return True

    # -- executions --------------------------------------------------------------------------
    def executions(self, *, job_id: str | None = None, device_id: str | None = None,
                   states: Iterable[str] | None = None, limit: int = 100_000) -> builtins.list[Execution]:
        """Executions, by job then device."""
        where, params = ["1 = 1"], []
        if job_id is not None:
            where.append("job_id = ?")
            params.append(job_id)
        if device_id is not None:
            where.append("device_id = ?")
            params.append(device_id)
        if states is not None:
            st = sorted(set(states))
            where.append(f"state IN ({', '.join('?' for _ in st)})")
            params.extend(st)
        rows = self._fetch(f"SELECT {_EX_COLS} FROM fm_job_executions WHERE {' AND '.join(where)}"
                           " ORDER BY job_id, device_id LIMIT ?", (*params, int(limit)))
        return [_row_ex(r) for r in rows]

    def save_executions(self, changed: Sequence[Execution]) -> None:
        """Write changed executions (one transaction)."""
        with self._tx() as con:
            self._many(con, "UPDATE fm_job_executions SET state = ?, attempt = ?, execution = ?, queued_ms = ?,"
                            " sent_ms = ?, updated_ms = ?, details = ? WHERE job_id = ? AND device_id = ?",
                       [(e.state, e.attempt, e.execution, e.queued_ms, e.sent_ms, e.updated_ms,
                         json.dumps(dict(e.details)), e.job_id, e.device_id) for e in changed])

    def pending(self, device_ids: Iterable[str]) -> dict[str, builtins.list[Execution]]:
        """Active executions of these devices (for their notify messages)."""
        ids = sorted(set(device_ids))
        out: dict[str, list[Execution]] = {d: [] for d in ids}
        st = sorted(ACTIVE)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = self._fetch(f"SELECT {_EX_COLS} FROM fm_job_executions WHERE state IN (?, ?) AND device_id IN"
                               f" ({', '.join('?' for _ in chunk)})", (*st, *chunk))
            for r in rows:
                out[r[1]].append(_row_ex(r))
        return out

    # -- the controller's counters -----------------------------------------------------------
    def save_controller_stats(self, stats: dict[str, Any]) -> None:
        """The controller's counters, for ``/stats`` (one row, replaced)."""
        with self._tx() as con:
            con.execute(self._sql("DELETE FROM fm_job_controller WHERE id = 1"))
            con.execute(self._sql("INSERT INTO fm_job_controller (id, stats, updated_ms) VALUES (1, ?, ?)"),
                        (json.dumps(stats, sort_keys=True), _now_ms()))

    def controller_stats(self) -> dict[str, Any] | None:
        """The counters the controller saved last, with ``updated_ms``; None if it never ran."""
        rows = self._fetch("SELECT stats, updated_ms FROM fm_job_controller WHERE id = 1")
        if not rows:
            return None
        out: dict[str, Any] = json.loads(rows[0][0])
        out["updated_ms"] = int(rows[0][1])
        return out

    # -- rollouts ----------------------------------------------------------------------------
    def create_rollout(self, rollout_id: str, spec: dict[str, Any], *, actor: str) -> RolloutRow:
        """Record a rollout (status ``pending``); ConflictError if the id is taken."""
        now = _now_ms()
        with self._tx() as con:
            if con.execute(self._sql("SELECT 1 FROM fm_rollouts WHERE rollout_id = ?"), (rollout_id,)).fetchall():
                raise ConflictError(f"rollout {rollout_id!r} exists", kind="rollout", key=rollout_id)
            con.execute(self._sql("INSERT INTO fm_rollouts (rollout_id, spec, status, progress, created_ms,"
                                  " created_by, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?)"),
                        (rollout_id, json.dumps(spec, sort_keys=True), "pending", "{}", now, actor, now))
            self._audit(con, actor, "rollout.create", rollout_id,
                        {"artifact": spec.get("artifact", {}).get("version")})
        return RolloutRow(rollout_id, spec, "pending", {}, now, actor, now)

    def get_rollout(self, rollout_id: str) -> RolloutRow:
        """A rollout; NotFoundError if none."""
        rows = self._fetch("SELECT rollout_id, spec, status, progress, created_ms, created_by, updated_ms"
                           " FROM fm_rollouts WHERE rollout_id = ?", (rollout_id,))
        if not rows:
            raise NotFoundError(f"no rollout {rollout_id!r}", kind="rollout", key=rollout_id)
        r = rows[0]
        return RolloutRow(r[0], json.loads(r[1]), r[2], json.loads(r[3]), int(r[4]), r[5], int(r[6]))

    def list_rollouts(self, *, status: str | None = None, limit: int = 100) -> builtins.list[RolloutRow]:
        """Rollouts, newest first."""
        where, params = ("status = ?", [status]) if status is not None else ("1 = 1", [])
        rows = self._fetch("SELECT rollout_id, spec, status, progress, created_ms, created_by, updated_ms"
                           f" FROM fm_rollouts WHERE {where} ORDER BY created_ms DESC, rollout_id LIMIT ?",
                           (*params, int(limit)))
        return [RolloutRow(r[0], json.loads(r[1]), r[2], json.loads(r[3]), int(r[4]), r[5], int(r[6]))
                for r in rows]

    def cancel_rollout(self, rollout_id: str, *, actor: str) -> bool:
        """Ask the controller to stop a pending or running rollout (status ``canceling``; its progress, which
        only the controller writes, is left alone); False when it is past that."""
        with self._tx() as con:
            rows = con.execute(self._sql("SELECT status FROM fm_rollouts WHERE rollout_id = ?"),
                               (rollout_id,)).fetchall()
            if not rows:
                raise NotFoundError(f"no rollout {rollout_id!r}", kind="rollout", key=rollout_id)
            if rows[0][0] not in ("pending", "running"):
                return False
            con.execute(self._sql("UPDATE fm_rollouts SET status = 'canceling', updated_ms = ? WHERE rollout_id = ?"),
                        (_now_ms(), rollout_id))
            self._audit(con, actor, "rollout.cancel", rollout_id, {"from": rows[0][0]})
        return True

    def save_rollout(self, rollout_id: str, *, status: str, progress: dict[str, Any],
                     actor: str | None = None, expect: Iterable[str] = ()) -> bool:
        """Write a rollout's status and progress (only from one of ``expect`` when given)."""
        exp = tuple(expect)
        with self._tx() as con:
            rows = con.execute(self._sql("SELECT status FROM fm_rollouts WHERE rollout_id = ?"),
                               (rollout_id,)).fetchall()
            if not rows:
                raise NotFoundError(f"no rollout {rollout_id!r}", kind="rollout", key=rollout_id)
            if exp and rows[0][0] not in exp:
                return False
            con.execute(self._sql("UPDATE fm_rollouts SET status = ?, progress = ?, updated_ms = ?"
                                  " WHERE rollout_id = ?"),
                        (status, json.dumps(progress, sort_keys=True), _now_ms(), rollout_id))
            if actor is not None or status != rows[0][0]:
                self._audit(con, actor or "controller", f"rollout.{status}", rollout_id,
                            {"from": rows[0][0], "reason": progress.get("halt_reason")})
        return True
