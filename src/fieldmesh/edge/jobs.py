"""Jobs on the device: take executions from ``devices/{id}/jobs/notify``, run them, report on
``devices/{id}/jobs/{job_id}/update`` (docs/rollouts.md).

Built-in operations:

- ``install``: fetch the artifact at ``artifact.url``, verify its signature and hash
  (:class:`~fieldmesh.edge.ota.SlotStore`), install it in the spare slot, start it and run the health
  check; a failed check reverts to the previous slot at once and the execution is ``failed``. A refused
  artifact (tampered, unknown key) is ``rejected`` and nothing is installed.
- ``rollback``: go back to the previous slot if ``from_version`` is active (already back: succeeded).
- ``report``: the active version of each kind.

Other operations come from ``handlers`` (``op -> async (device_id, document) -> details``). An unknown
operation is ``rejected``. An execution already answered is answered again (a redelivered notify),
never run twice. A device runs its executions one at a time, in the order they arrived.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fieldmesh.core.errors import ConfigError
from fieldmesh.edge.config import InferConfig
from fieldmesh.edge.frame import Frame
from fieldmesh.edge.infer import FEATURE_METRICS, make_scorer
from fieldmesh.edge.ota import ArtifactRefused, SlotInfo, SlotStore, fetch_artifact, load_trusted_keys

if TYPE_CHECKING:
    from fieldmesh.edge.agent import EdgeAgent

__all__ = ["Health", "JobClient", "attach_jobs", "firmware_health", "model_health"]

log = logging.getLogger("fieldmesh.edge.jobs")
#: Answers remembered (to answer a redelivered notify again rather than run it twice).
_ANSWERED_MAX = 10_000

#: ``(device_id, slot) -> None``: raises (any exception) when the new version does not work.
Health = Callable[[str, SlotInfo], Awaitable[None]]
Handler = Callable[[str, Mapping[str, Any]], Awaitable[dict[str, Any]]]


class JobClient:
    """Executes the jobs of a set of devices.

    Args:
        devices: device ids served (one per identity the agent holds).
        slots: each device's A/B slot store.
        publish: ``(topic, payload, retain) -> sent`` (QoS 1).
        subscribe: ``(topic filters) -> subscribed``.
        health: started after an install; raising means the new version failed.
        fetch: ``url -> bytes`` (blocking; run in a thread).
        on_active: told when a device's active slot changes (install or revert), e.g. to load a model.
        handlers: more operations.
        confirm_after_s: how long a new version runs before it is confirmed (0: once its check passed).
    """

    def __init__(self, devices: Iterable[str], *, slots: Callable[[str], SlotStore],
                 publish: Callable[[str, bytes, bool], bool], subscribe: Callable[[list[str]], bool],
                 health: Health | None = None, fetch: Callable[[str], bytes] = fetch_artifact,
                 on_active: Callable[[str, str, SlotInfo | None], None] | None = None,
                 handlers: Mapping[str, Handler] | None = None, confirm_after_s: float = 0.0) -> None:
        self.devices = list(devices)
        self._known = set(self.devices)
        self.slots = slots
        self.publish = publish
        self.subscribe = subscribe
        self.health = health
        self.fetch = fetch
        self.on_active = on_active
        self.handlers = dict(handlers or {})
        self.confirm_after_s = confirm_after_s
        self.answered: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
        self._running: set[tuple[str, str, int]] = set()
        self._unsent: list[tuple[str, bytes]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self.counts: dict[str, int] = {}

    def topics(self) -> list[str]:
        """The notify topics of the devices served."""
        return [f"devices/{d}/jobs/notify" for d in self.devices]

    def on_connect(self) -> None:
        """Subscribe, and send answers that could not be sent while disconnected."""
        self.subscribe(self.topics())
        unsent, self._unsent = self._unsent, []
        for topic, body in unsent:
            self._send(topic, body)

    def _send(self, topic: str, body: bytes) -> None:
        if not self.publish(topic, body, False):
            self._unsent.append((topic, body))

    def _report(self, dev: str, job_id: str, n: int, status: str, details: dict[str, Any]) -> None:
        self.counts[status] = self.counts.get(status, 0) + 1
        body = json.dumps({"execution": n, "status": status, "details": details}).encode()
        self._send(f"devices/{dev}/jobs/{job_id}/update", body)

    def handle(self, topic: str, payload: bytes) -> bool:
        """A message on a notify topic (in the event loop); False when it is not one of ours."""
        parts = topic.split("/")
        if len(parts) != 4 or parts[0] != "devices" or parts[2:] != ["jobs", "notify"]:
            return False
        dev = parts[1]
        if dev not in self._known:
            return False
        try:
            jobs = json.loads(payload).get("jobs", []) if payload else []
        except (ValueError, AttributeError):
            log.warning("jobs: unreadable notify for %s", dev)
            return True
        for j in jobs:
            try:
                job_id, n, doc = str(j["job_id"]), int(j["execution"]), j["document"]
            except (KeyError, TypeError, ValueError):
                log.warning("jobs: bad entry in the notify of %s: %r", dev, j)
                continue
            done = self.answered.get((dev, job_id))
            if done is not None and done[0] == n:
                self._report(dev, job_id, n, done[1]["status"], done[1]["details"])  # the answer was lost
                continue
            if (dev, job_id, n) in self._running:
                continue
            self._running.add((dev, job_id, n))
            t = asyncio.get_running_loop().create_task(self._execute(dev, job_id, n, doc), name=f"job-{dev}-{job_id}")
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        return True

    async def _execute(self, dev: str, job_id: str, n: int, doc: Mapping[str, Any]) -> None:
        # one execution at a time per device, in the order they came: a rollback sent while an install
        # runs must see the install's outcome, not race it
        lock = self._locks.setdefault(dev, asyncio.Lock())
        async with lock:
            await self._execute_locked(dev, job_id, n, doc)

    async def _execute_locked(self, dev: str, job_id: str, n: int, doc: Mapping[str, Any]) -> None:
        self._report(dev, job_id, n, "in_progress", {})
        op = doc.get("op")
        try:
            if op == "install":
                status, details = await self._install(dev, doc)
            elif op == "rollback":
                status, details = await self._rollback(dev, doc)
            elif op == "report":
                status, details = "succeeded", self._versions(dev)
            elif isinstance(op, str) and op in self.handlers:
                status, details = "succeeded", await self.handlers[op](dev, doc)
            else:
                status, details = "rejected", {"reason": "unknown_op", "op": str(op)[:64]}
        except ArtifactRefused as exc:
            status, details = "rejected", {"reason": exc.reason, "error": exc.detail[:500]}
        except Exception as exc:  # a job must end with an answer, whatever failed
            log.exception("jobs: %s on %s failed", op, dev)
            status, details = "failed", {"reason": "error", "error": str(exc)[:500]}
        self.answered[(dev, job_id)] = (n, {"status": status, "details": details})
        while len(self.answered) > _ANSWERED_MAX:  # the oldest first: their notify has long been rewritten
            del self.answered[next(iter(self.answered))]
        self._running.discard((dev, job_id, n))
        self._report(dev, job_id, n, status, details)

    def _versions(self, dev: str) -> dict[str, Any]:
        s = self.slots(dev)
        out: dict[str, Any] = {}
        for kind in ("firmware", "model"):
            a = s.active(kind)
            out[kind] = a.version if a is not None else None
        return out

    async def _install(self, dev: str, doc: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        art = doc.get("artifact")
        if not isinstance(art, Mapping) or not isinstance(art.get("url"), str):
            raise ArtifactRefused("bad_manifest", "artifact with a url is required")
        slots = self.slots(dev)
        kind = str(art.get("kind"))
        before = slots.active(kind) if kind in ("firmware", "model") else None
        from_version = before.version if before is not None else None
        data = await asyncio.to_thread(self.fetch, art["url"])
        info = await asyncio.to_thread(slots.install, art, data)
        if before is not None and info.slot == before.slot and not info.pending:
            return "succeeded", {"version": info.version, "from_version": from_version, "already": True}
        started = slots.boot(kind)
        if started is None or started.version != info.version:
            return "failed", {"reason": "crash_loop", "version": info.version, "from_version": from_version}
        try:
            if self.health is not None:
                await self.health(dev, started)
            if self.on_active is not None:
                self.on_active(dev, kind, started)  # e.g. the agent scores with the new model from now on
        except Exception as exc:
            back = slots.revert(kind, reason=f"health check failed: {exc}")
            if self.on_active is not None:
                self.on_active(dev, kind, back)
            return "failed", {"reason": "health_check", "error": str(exc)[:300], "version": info.version,
                              "reverted_to": back.version if back is not None else None,
                              "from_version": from_version}
        self._confirm_later(slots, kind, info.version)
        return "succeeded", {"version": info.version, "from_version": from_version}

    def _confirm_later(self, slots: SlotStore, kind: str, version: str) -> None:
        """Confirm the slot now, or after ``confirm_after_s`` of running with it: an agent that dies with the
        new version before then counts a trial start at its next start, and goes back after a few."""
        if self.confirm_after_s <= 0:
            slots.confirm(kind, version=version)
            return
        asyncio.get_running_loop().call_later(self.confirm_after_s, lambda: slots.confirm(kind, version=version))

    async def _rollback(self, dev: str, doc: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        kind = str(doc.get("kind"))
        slots = self.slots(dev)
        act = slots.active(kind)
        if act is None or act.version != doc.get("from_version"):
            return "succeeded", {"version": act.version if act is not None else None, "already": True}
        back = slots.revert(kind, reason="rollback job")
        if self.on_active is not None:
            self.on_active(dev, kind, back)
        return "succeeded", {"version": back.version if back is not None else None,
                             "from_version": act.version}

    async def drain(self) -> None:
        """Wait for running executions (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)



def model_health(infer: InferConfig) -> Health:
    """A model's health check: it loads as the agent's scorer and scores a probe batch to finite values."""

    def check(path: Path) -> None:
        scorer = make_scorer(infer.model_copy(update={"scorer": "onnx", "model_path": path}))
        n = 64
        rng = np.random.default_rng(0)
        frame = Frame(dev=np.zeros(n, dtype=np.int32), ts_ms=np.arange(n, dtype=np.int64) * 1000,
                      seq=np.arange(n, dtype=np.int64),
                      cols={m: rng.normal(20.0, 1.0, n) for m in FEATURE_METRICS}, boot_id="probe")
        score = np.asarray(scorer.score(frame), dtype=np.float64)
        if score.shape != (n,) or not np.isfinite(score).all():
            raise RuntimeError("the model's scores on a probe batch are not finite")

    async def health(device_id: str, slot: SlotInfo) -> None:
        if slot.kind == "model":
            await asyncio.to_thread(check, slot.path)

    return health


def firmware_health(cmd: list[str], timeout_s: float) -> Health:
    """A firmware health check: ``cmd`` with the image's path appended must exit 0 within ``timeout_s``."""

    async def health(device_id: str, slot: SlotInfo) -> None:
        if slot.kind != "firmware":
            return
        proc = await asyncio.create_subprocess_exec(*cmd, str(slot.path), stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"the firmware check did not finish in {timeout_s:g}s") from None
        if proc.returncode != 0:
            raise RuntimeError(f"the firmware check exited {proc.returncode}: {out.decode(errors='replace')[-200:]}")

    return health


def attach_jobs(agent: EdgeAgent) -> JobClient:
    """Give a running agent its jobs: A/B slots, the model from the active slot, MQTT wiring.

    Starting the active model slot counts a trial start (:meth:`SlotStore.boot`): an agent that keeps
    dying with a new model goes back to the previous one by itself. A model that does not load at start
    is reverted at once.
    """
    cfg = agent.cfg
    jc = cfg.jobs
    dev = jc.device_id or cfg.uplink.client_id
    if not dev:
        raise ConfigError("jobs.device_id: the device id jobs are addressed to (or set uplink.client_id)",
                          key="jobs.device_id")
    slots = SlotStore(jc.slots_path or Path(cfg.buffer.path) / "ota", trusted_keys=load_trusted_keys(jc.trusted_keys),
                      max_boot_attempts=jc.max_boot_attempts)
    check_model = model_health(cfg.infer)
    check_fw = firmware_health(jc.firmware_check, jc.firmware_check_timeout_s) if jc.firmware_check else None

    def use_model(slot: SlotInfo | None) -> None:
        infer = cfg.infer if slot is None else cfg.infer.model_copy(update={"scorer": "onnx", "model_path": slot.path})
        scorer = make_scorer(infer)
        agent.pipeline.scorer = scorer
        agent.pipeline.default_threshold = infer.threshold if infer.threshold is not None else scorer.default_threshold
        log.info("jobs: scoring with %s", "the configured model" if slot is None else f"model {slot.version}")

    active = slots.boot("model")
    while active is not None:
        try:
            use_model(active)
            break
        except Exception as exc:
            active = slots.revert("model", reason=f"does not load: {exc}")

    async def health(device_id: str, slot: SlotInfo) -> None:
        await check_model(device_id, slot)
        if check_fw is not None:
            await check_fw(device_id, slot)

    def on_active(device_id: str, kind: str, slot: SlotInfo | None) -> None:
        if kind == "model":
            use_model(slot)

    client = JobClient([dev], slots=lambda _d: slots, publish=lambda t, p, r: agent.uplink.publish_now(t, p, retain=r),
                       subscribe=agent.uplink.subscribe, health=health,
                       fetch=lambda url: fetch_artifact(url, max_bytes=jc.max_artifact_bytes), on_active=on_active,
                       confirm_after_s=jc.confirm_after_s)
    if active is not None and active.pending:  # on trial since an earlier run: confirmed if this one lasts
        trial = active.version
        agent.on_running.append(lambda: client._confirm_later(slots, "model", trial))
    prev_message, prev_connect = agent.uplink.on_message, agent.uplink.on_connect

    def on_message(topic: str, payload: bytes) -> None:
        if not client.handle(topic, payload) and prev_message is not None:
            prev_message(topic, payload)

    def on_connect() -> None:
        if prev_connect is not None:
            prev_connect()
        client.on_connect()

    agent.uplink.on_message = on_message
    agent.uplink.on_connect = on_connect
    return client
