"""The job and rollout controller: sends executions to devices, collects their answers, times them out,
retries them, and drives rollouts through their stages and gates (docs/rollouts.md).

One controller runs per store (it is the only writer of executions and rollout progress). It is a
process of its own (``fieldmesh jobs controller``), not a task inside the API: the API may run as
several replicas behind a balancer, while the controller must be single; it holds a privileged MQTT
session (it writes every device's ``jobs/notify``), which the API process does not need; and a slow
store or broker then stalls job pacing, never API requests. Its state is in the store, so a restarted
controller carries on where the last one stopped (a rate limit restarts from empty).

The MQTT side runs on paho's network thread; answers are queued and applied by :meth:`JobController.tick`
in the controller's own thread, so no store access ever runs on the network thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from fieldmesh.control.jobs import (
    Execution,
    JobSpec,
    Targets,
    cancel,
    dispatch,
    expire,
    notify_payload,
    notify_topic,
    parse_update,
    retry,
    transition,
)
from fieldmesh.control.rollouts import (
    CohortStats,
    GateResult,
    RolloutSpec,
    Telemetry,
    device_order,
    evaluate_gates,
    stage_bounds,
)
from fieldmesh.core.errors import ConfigError, FieldmeshError, MissingDependency
from fieldmesh.core.topics import DEVICE_ID_RE
from fieldmesh.store.jobs import JobRow, JobStore

__all__ = ["UPDATE_FILTER", "ControllerStats", "JobController", "MqttLink", "run_controller"]

log = logging.getLogger("fieldmesh.jobs")

#: What the controller subscribes to: every device's execution updates.
UPDATE_FILTER: Final = "devices/+/jobs/+/update"
_FAILED: Final = frozenset({"failed", "rejected", "timed_out"})
_INBOX_MAX: Final = 200_000

Publish = Callable[[str, bytes, bool], bool]


@dataclass
class ControllerStats:
    """Counters (served by ``fieldmesh jobs controller`` in its log and by :meth:`JobController.stats`)."""

    updates: int = 0
    stale_updates: int = 0
    invalid_updates: int = 0
    notifies: int = 0
    notify_failures: int = 0
    timeouts: int = 0
    retries: int = 0
    halts: int = 0
    ticks: int = 0
    tick_errors: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class _Bucket:
    """Token bucket of one job's dispatch rate."""

    def __init__(self, rate: float, now_ms: int) -> None:
        self.rate = rate
        self.tokens = min(1.0, rate)
        self.last = now_ms

    def take(self, now_ms: int, want: int) -> int:
        self.tokens = min(max(self.rate, 1.0), self.tokens + self.rate * (now_ms - self.last) / 1000)
        self.last = now_ms
        n = min(want, int(self.tokens))
        self.tokens -= n
        return n


class JobController:
    """Drives jobs and rollouts kept in ``store``.

    Args:
        store: jobs, executions, rollouts.
        publish: ``(topic, payload, retain) -> sent`` (QoS 1); a notify that could not be sent is retried
            on the next tick.
        devices: registered devices (``.id``, ``.status``, ``.groups``, ``.tags``, ``.attributes``) for
            group and query targets; None: only explicit device ids resolve.
        telemetry: fleet telemetry for rollout gates; None: only job-failure gates judge.
    """

    def __init__(self, store: JobStore, *, publish: Publish,
                 devices: Callable[[], Iterable[Any]] | None = None, telemetry: Telemetry | None = None) -> None:
        self.store = store
        self.publish = publish
        self.devices = devices
        self.telemetry = telemetry
        self.stats = ControllerStats()
        self._inbox: deque[tuple[str, str, bytes]] = deque()
        self._buckets: dict[str, _Bucket] = {}
        self._specs: dict[str, JobSpec] = {}
        self._unsent: set[str] = set()  # devices whose notify must be (re)published
        self._lock = threading.Lock()

    # -- input -------------------------------------------------------------------------------
    def handle_message(self, topic: str, payload: bytes) -> None:
        """An MQTT message on ``devices/{id}/jobs/{job_id}/update`` (any thread)."""
        parts = topic.split("/")
        if len(parts) != 5 or parts[0] != "devices" or parts[2] != "jobs" or parts[4] != "update":
            return
        if len(self._inbox) >= _INBOX_MAX:
            # the loop is far behind: the execution times out (and is retried) rather than memory growing
            self._invalid("inbox_full")
            return
        self._inbox.append((parts[1], parts[3], payload))

    def resolve(self, targets: Targets) -> list[str]:
        """The device ids ``targets`` names now."""
        if targets.groups or targets.query:
            if self.devices is None:
                raise ConfigError("targets: groups and queries need the device registry", key="targets")
            return targets.resolve(self.devices())
        return sorted(set(targets.devices))

    def create_job(self, spec: JobSpec, *, actor: str) -> JobRow:
        """Resolve the targets and record the job (the next tick sends it)."""
        return self.store.create_job(spec, self.resolve(spec.targets), actor=actor)

    # -- the loop ----------------------------------------------------------------------------
    def tick(self, now_ms: int | None = None) -> None:
        """Apply answers, then advance every active job and rollout once."""
        with self._lock:
            now = int(time.time() * 1000) if now_ms is None else now_ms
            self.stats.ticks += 1
            touched: set[str] = set(self._unsent)
            self._unsent.clear()
            self._apply_updates(now, touched)
            for job in self.store.list_jobs(status="canceling", limit=10_000):
                self._cancel_job(job.spec.job_id, now, touched, reason="canceled")
                self.store.set_job_status(job.spec.job_id, "canceled", expect=("canceling",))
            for job in self.store.list_jobs(status="in_progress", limit=10_000):
                try:
                    self._advance_job(job, now, touched)
                except FieldmeshError:
                    raise  # the store: the whole pass fails and is retried
                except Exception:  # one bad job must not stop the others
                    self.stats.tick_errors += 1
                    log.exception("jobs controller: job %s", job.spec.job_id)
            for ro in self.store.list_rollouts(limit=10_000):
                if ro.status in ("pending", "running", "halted", "canceling"):
                    try:
                        self._advance_rollout(ro.rollout_id, ro.spec, ro.status, dict(ro.progress), now, touched)
                    except ConfigError as exc:  # a spec this version cannot run: it stops, and says why
                        self.stats.tick_errors += 1
                        log.error("jobs controller: rollout %s cannot run: %s", ro.rollout_id, exc)
                        self.store.save_rollout(ro.rollout_id, status="canceled",
                                                progress={**ro.progress, "halt_reason": f"invalid: {exc}"})
                    except FieldmeshError:
                        raise
                    except Exception:
                        self.stats.tick_errors += 1
                        log.exception("jobs controller: rollout %s", ro.rollout_id)
            self._notify(touched)

    def _spec(self, job_id: str) -> JobSpec | None:
        spec = self._specs.get(job_id)
        if spec is None:
            try:
                spec = self._specs[job_id] = self.store.get_job(job_id).spec
            except FieldmeshError:
                return None
        return spec

    def _apply_updates(self, now: int, touched: set[str]) -> None:
        batch: dict[str, list[tuple[str, bytes]]] = {}
        while self._inbox:
            dev, job_id, payload = self._inbox.popleft()
            batch.setdefault(job_id, []).append((dev, payload))
        for job_id, items in batch.items():
            spec = self._spec(job_id)
            if spec is None:
                self._invalid("unknown_job", len(items))
                continue
            current = {e.device_id: e for e in self.store.executions(job_id=job_id,
                                                                     states=("queued", "in_progress"))}
            changed: dict[str, Execution] = {}
            for dev, payload in items:
                try:
                    n, status, details = parse_update(payload)
                except ValueError as exc:
                    log.warning("job %s: bad update from %s: %s", job_id, dev, exc)
                    self._invalid("bad_update")
                    continue
                ex = changed.get(dev) or current.get(dev)
                if ex is None or ex.execution != n or ex.sent_ms is None:
                    self.stats.stale_updates += 1  # an answer to an execution no longer pending
                    continue
                self.stats.updates += 1
                new = transition(ex, status, now_ms=now, details=details)
                if new.final:
                    again = retry(new, now_ms=now, max_attempts=spec.max_attempts) if status == "failed" else None
                    if again is not None:
                        self.stats.retries += 1
                        new = again
                    touched.add(dev)
                changed[dev] = new
            self.store.save_executions(list(changed.values()))

    def _invalid(self, reason: str, n: int = 1) -> None:
        self.stats.invalid_updates += n
        self.stats.reasons[reason] = self.stats.reasons.get(reason, 0) + n

    def _cancel_job(self, job_id: str, now: int, touched: set[str], *, reason: str) -> list[Execution]:
        out = []
        for ex in self.store.executions(job_id=job_id, states=("queued", "in_progress")):
            c = cancel(ex, now_ms=now, reason=reason)
            if c is not None:
                out.append(c)
                if ex.sent_ms is not None:
                    touched.add(ex.device_id)
        self.store.save_executions(out)
        return out

    def _advance_job(self, job: JobRow, now: int, touched: set[str]) -> None:
        spec = job.spec
        self._specs.setdefault(spec.job_id, spec)
        exs = self.store.executions(job_id=spec.job_id, states=("queued", "in_progress"))  # the final ones rest
        changed: list[Execution] = []
        in_flight = 0
        queued: list[Execution] = []
        for ex in exs:
            if ex.in_flight:
                t = expire(ex, now_ms=now, timeout_s=spec.timeout_s)
                if t is not None:
                    self.stats.timeouts += 1
                    touched.add(ex.device_id)
                    again = retry(t, now_ms=now, max_attempts=spec.max_attempts)
                    if again is not None:
                        self.stats.retries += 1
                    changed.append(again or t)
                    if again is not None:
                        queued.append(again)
                    continue
                in_flight += 1
            elif ex.state == "queued" and ex.sent_ms is None:
                queued.append(ex)
        if queued:
            # a per-job random order: a stage's devices are not sent in id order (ids cluster by site or batch)
            queued.sort(key=lambda e: (e.queued_ms, hashlib.sha256(f"{spec.job_id}/{e.device_id}".encode()).digest()))
            room = len(queued)
            if spec.max_in_flight:
                room = max(0, min(room, spec.max_in_flight - in_flight))
            if spec.rate_per_s:
                bucket = self._buckets.get(spec.job_id)
                if bucket is None:
                    bucket = self._buckets[spec.job_id] = _Bucket(spec.rate_per_s, now)
                room = bucket.take(now, room)
            by_dev = {e.device_id: e for e in changed}
            for ex in queued[:room]:
                sent = dispatch(ex, now_ms=now)
                by_dev[ex.device_id] = sent
                touched.add(ex.device_id)
            changed = list(by_dev.values())
        self.store.save_executions(changed)
        final = {e.device_id for e in changed if e.final}
        if all(e.device_id in final for e in exs):
            self.store.set_job_status(spec.job_id, "completed", expect=("in_progress",))
            self._buckets.pop(spec.job_id, None)

    def _notify(self, devices: set[str]) -> None:
        if not devices:
            return
        pending = self.store.pending(devices)
        for dev, exs in pending.items():
            pairs = [(e, s) for e in exs if e.sent_ms is not None and (s := self._spec(e.job_id)) is not None]
            if self.publish(notify_topic(dev), notify_payload(pairs), True):
                self.stats.notifies += 1
            else:
                self.stats.notify_failures += 1
                self._unsent.add(dev)

    # -- rollouts ----------------------------------------------------------------------------
    def _advance_rollout(self, rid: str, raw: dict[str, Any], status: str, p: dict[str, Any], now: int,
                         touched: set[str]) -> None:
        spec = RolloutSpec.from_dict(raw)
        was = status
        if status == "pending":
            self._start_rollout(spec, p, now)
            status = "running"
        if status == "running":
            status = self._run_rollout(spec, p, now, touched)
        elif status == "canceling" and p.get("halted_ms") is None:
            self._halt(spec, p, now, touched, reason="canceled by the operator")
        if status in ("halted", "canceling"):
            rb = p.get("rollback_job")
            if rb is None or self.store.get_job(rb).status in ("completed", "canceled"):
                if rb is not None:
                    p["rollback"] = _counts(self.store.executions(job_id=rb))
                p["finished_ms"] = now
                status = "rolled_back" if status == "halted" else "canceled"
        if not self.store.save_rollout(rid, status=status, progress=p, expect=(was,)):
            # the operator canceled meanwhile: keep what this tick did (its jobs), and halt next tick
            self.store.save_rollout(rid, status="canceling", progress=p)

    def _start_rollout(self, spec: RolloutSpec, p: dict[str, Any], now: int) -> None:
        targets = self.resolve(spec.targets)
        canary: list[str] = []
        if spec.canary_group is not None:
            canary = self.resolve(Targets(groups=(spec.canary_group,)))
            canary = [d for d in canary if d in set(targets)]
        order = device_order(spec.rollout_id, targets, canary)
        bounds = stage_bounds(len(order), len(canary) if spec.canary_group else spec.canary, spec.stages)
        names = ["canary", *(f"{s:g}%" for s in spec.stages)]
        p.update({"order": order, "total": len(order), "started_ms": now, "stage": -1,
                  "stages": [{"name": n, "end": b, "job_id": None, "started_ms": None, "done_ms": None}
                             for n, b in zip(names, bounds, strict=True)],
                  "gates": [], "halt_reason": None, "rollback_job": None})

    def _stage_job(self, spec: RolloutSpec, p: dict[str, Any], k: int, now: int) -> None:
        st = p["stages"]
        begin = st[k - 1]["end"] if k > 0 else 0
        devs = p["order"][begin:st[k]["end"]]
        a = spec.artifact
        job = JobSpec(job_id=f"{spec.rollout_id}-s{k}", document={"op": "install", "artifact": dict(a)},
                      targets=Targets(devices=tuple(devs)),
                      timeout_s=spec.timeout_s, max_attempts=1, rate_per_s=spec.rate_per_s,
                      max_in_flight=spec.max_in_flight, rollout_id=spec.rollout_id)
        self.store.create_job(job, devs, actor="controller")
        self._specs[job.job_id] = job
        p["stage"] = k
        st[k]["job_id"] = job.job_id
        st[k]["started_ms"] = now

    def _installs(self, p: dict[str, Any]) -> list[Execution]:
        out: list[Execution] = []
        for s in p["stages"]:
            if s["job_id"] is not None:
                out.extend(self.store.executions(job_id=s["job_id"]))
        return out

    def _run_rollout(self, spec: RolloutSpec, p: dict[str, Any], now: int, touched: set[str]) -> str:
        if p["stage"] < 0:
            self._stage_job(spec, p, 0, now)
        exs = self._installs(p)
        final = [e for e in exs if e.final and e.state != "canceled"]
        failures = sum(e.state in _FAILED for e in final)
        updated = [e.device_id for e in exs if e.state == "succeeded"]
        sent = {e.device_id for e in exs if e.sent_ms is not None}
        upd_stats = base_stats = None
        if self.telemetry is not None and updated:
            g = spec.gates
            fresh_since = now - int(g.freshness_s * 1000)
            upd_stats = self.telemetry.cohort(updated, since_ms=p["started_ms"], fresh_since_ms=fresh_since,
                                              metric=g.metric)
            rest = [d for d in p["order"] if d not in sent]
            base_stats = self.telemetry.cohort(rest, since_ms=p["started_ms"], fresh_since_ms=fresh_since,
                                               metric=g.metric) if rest else CohortStats()
        verdict = None
        if self.telemetry is not None and spec.gates.canary is not None:
            verdict = self.telemetry.canary_verdict(spec.gates.canary)
        gates = evaluate_gates(spec.gates, final=len(final), failures=failures, updated=upd_stats,
                               baseline=base_stats, canary_verdict=verdict)
        p["gates"] = [g.as_dict() for g in gates]
        p["exposed"] = len(sent)
        p["counts"] = _counts(exs)
        bad = [g for g in gates if g.ok is False]
        if bad:
            self._halt(spec, p, now, touched, reason="; ".join(_why(g) for g in bad))
            return "halted"
        k = p["stage"]
        cur = p["stages"][k]
        if self.store.get_job(cur["job_id"]).status != "completed":
            return "running"
        if cur["done_ms"] is None:
            cur["done_ms"] = now
        if now - cur["done_ms"] < spec.bake_s * 1000 and k + 1 < len(p["stages"]):
            return "running"
        if k + 1 >= len(p["stages"]):
            if now - cur["done_ms"] < spec.bake_s * 1000:
                return "running"
            p["finished_ms"] = now
            return "completed"
        self._stage_job(spec, p, k + 1, now)
        return "running"

    def _halt(self, spec: RolloutSpec, p: dict[str, Any], now: int, touched: set[str], *, reason: str) -> None:
        self.stats.halts += 1
        log.warning("rollout %s halted: %s", spec.rollout_id, reason)
        exposed: set[str] = set()
        for s in p.get("stages", []):
            if s["job_id"] is None:
                continue
            for c in self._cancel_job(s["job_id"], now, touched, reason=f"rollout halted: {reason}"):
                if c.sent_ms is not None:
                    exposed.add(c.device_id)
            self.store.set_job_status(s["job_id"], "canceled", expect=("in_progress", "canceling"))
            exposed |= {e.device_id for e in self.store.executions(job_id=s["job_id"]) if e.sent_ms is not None}
        p["halt_reason"] = reason
        p["halted_ms"] = now
        p["exposed"] = len(exposed)
        p["counts"] = _counts(self._installs(p)) if p.get("stages") else {}
        if not exposed:
            return
        a = spec.artifact
        job = JobSpec(job_id=f"{spec.rollout_id}-rollback",
                      document={"op": "rollback", "kind": a["kind"], "name": a["name"], "from_version": a["version"]},
                      targets=Targets(devices=tuple(sorted(exposed))), timeout_s=spec.timeout_s, max_attempts=3,
                      rollout_id=spec.rollout_id)
        self.store.create_job(job, sorted(exposed), actor="controller")
        self._specs[job.job_id] = job
        p["rollback_job"] = job.job_id
        p["rollback_started_ms"] = now
        # send it in this tick: every second a bad version runs counts
        self._advance_job(self.store.get_job(job.job_id), now, touched)


def _why(g: GateResult) -> str:
    if g.name.startswith("canary:"):
        return f"{g.name} verdict hold (GET /api/v1/canaries/{g.name[7:]}/compare)"
    return f"{g.name} {g.value:.4g} beyond {g.threshold:g}" if g.value is not None else f"{g.name} failed"


def _counts(exs: Sequence[Execution]) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in exs:
        out[e.state] = out.get(e.state, 0) + 1
    return out


class MqttLink:
    """The controller's MQTT session: subscribes to device updates, publishes notifies (QoS 1).

    MQTT 3.1.1 (nats-server's listener speaks only that). ``url``: ``mqtt://[user:password@]host:port``.
    """

    def __init__(self, url: str, *, on_message: Callable[[str, bytes], None], client_id: str = "fm-jobs",
                 username: str | None = None, password: str | None = None) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise MissingDependency("paho-mqtt", "edge") from exc
        u = urlsplit(url)
        if u.scheme not in ("mqtt", "tcp") or not u.hostname:
            raise ConfigError(f"bad MQTT URL {url!r}: use mqtt://host:port", key="mqtt_url")
        self._connected = threading.Event()
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                        clean_session=False)
        user = username or (unquote(u.username) if u.username else None)
        pw = password or (unquote(u.password) if u.password else None)
        if user:
            c.username_pw_set(user, pw)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)

        def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
            if not getattr(rc, "is_failure", False):
                client.subscribe(UPDATE_FILTER, qos=1)
                self._connected.set()
            else:
                log.error("jobs controller: MQTT connection refused: %s", rc)

        def on_disconnect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
            self._connected.clear()
            log.warning("jobs controller: MQTT connection lost (%s); reconnecting", rc)

        c.on_connect = on_connect
        c.on_disconnect = on_disconnect
        c.on_message = lambda client, userdata, msg: on_message(msg.topic, bytes(msg.payload))
        c.reconnect_delay_set(1, 10)
        c.connect_async(u.hostname, u.port or 1883, keepalive=30)
        c.loop_start()
        self._client = c

    def wait_connected(self, timeout_s: float) -> bool:
        """Whether the session is up within ``timeout_s``."""
        return self._connected.wait(timeout_s)

    def publish(self, topic: str, payload: bytes, retain: bool) -> bool:
        """Queue a QoS 1 publish; False when not connected."""
        if not self._connected.is_set():
            return False
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        return bool(info.rc == 0)

    def close(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()


async def run_controller(controller: JobController, *, stop: asyncio.Event, tick_s: float = 0.2,
                         stats_s: float = 30.0, save_stats_s: float = 5.0) -> None:
    """Tick ``controller`` every ``tick_s`` until ``stop``; a failing tick is logged and retried.

    Its counters are logged every ``stats_s`` and saved to the store every ``save_stats_s`` (``/stats``).
    """
    last = saved = time.monotonic()
    while not stop.is_set():
        if time.monotonic() - saved >= save_stats_s:
            saved = time.monotonic()
            try:
                await asyncio.to_thread(controller.store.save_controller_stats, asdict(controller.stats))
            except FieldmeshError as exc:
                log.warning("jobs controller: cannot save its counters: %s", exc)
        try:
            await asyncio.to_thread(controller.tick)
        except FieldmeshError as exc:
            controller.stats.tick_errors += 1
            log.error("jobs controller: tick failed: %s", exc)
        except Exception:
            controller.stats.tick_errors += 1
            log.exception("jobs controller: tick failed")
        if time.monotonic() - last >= stats_s:
            last = time.monotonic()
            log.info("jobs controller: %s", controller.stats)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=tick_s)


def valid_device(device_id: str) -> bool:
    """Whether ``device_id`` is a device id."""
    return DEVICE_ID_RE.fullmatch(device_id) is not None
