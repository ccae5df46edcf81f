"""The agent's twins: :class:`ShadowTwin` (``devices/{id}/twin/...``, shadow semantics, docs/twins.md)
and the older twin-lite :class:`Twin`, kept working (deprecated).

Twin-lite: desired config per device on ``devices/{id}/config`` (retained), applied live.

A desired config is a JSON object with an integer ``version`` and any of the per-device rule keys
(``mode``, ``heartbeat_ms``, ``window_ms``, ``threshold``, ``metrics: {name: {deadband, min, max,
gain, offset, unit}}``). The agent applies it without a restart and reports, retained, on
``devices/{id}/state``::

    {"device_id": "pump-7", "version": 3, "status": "applied", "ts": 1763812345123}
    {"device_id": "pump-7", "version": 4, "status": "rejected", "error": "metrics.temperature.unit: ..."}

A version not newer than the applied one is not applied again (retained messages are re-delivered
on every connection) but is reported again.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from fieldmesh.core.errors import ConfigError
from fieldmesh.core.twins import device_of_twin_topic, merge_patch, twin_topic
from fieldmesh.edge.config import DeviceRule, format_validation_error
from fieldmesh.edge.frame import DeviceIndex
from fieldmesh.edge.preprocess import Aggregate, Preprocessor

__all__ = ["RULE_KEYS", "ShadowTwin", "Twin", "config_topic", "state_topic"]

log = logging.getLogger("fieldmesh.edge.twin")


def config_topic(device_id: str) -> str:
    """Where a device's desired config is (retained)."""
    return f"devices/{device_id}/config"


def state_topic(device_id: str) -> str:
    """Where the agent reports a device's applied config (retained)."""
    return f"devices/{device_id}/state"


class Twin:
    """Applies desired configs to the preprocessor and reports them.

    Args:
        pre: the agent's preprocessor.
        devices: the agent's device index (only its devices are handled).
        publish: ``(topic, payload, retain) -> bool`` (the uplink's immediate publish).
        subscribe: ``(topics) -> bool`` (the uplink's subscribe).
        on_aggregates: receives windows closed by a config change (they are buffered like any).
    """

    def __init__(
        self,
        pre: Preprocessor,
        devices: DeviceIndex,
        *,
        publish: Callable[[str, bytes, bool], bool],
        subscribe: Callable[[list[str]], bool],
        on_aggregates: Callable[[list[Aggregate]], None] | None = None,
    ) -> None:
        self.pre = pre
        self.devices = devices
        self.publish = publish
        self.subscribe = subscribe
        self.on_aggregates = on_aggregates
        self.applied: dict[str, int] = {}
        self.pending_reports: dict[str, dict[str, Any]] = {}
        self.rejected = 0
        devices.on_new(lambda i, d: self.subscribe([config_topic(d)]))

    def on_connect(self) -> None:
        """Subscribe to every known device's config and re-send unsent reports."""
        self.subscribe([config_topic(d) for d in self.devices.ids])
        for dev, report in list(self.pending_reports.items()):
            if self._report(dev, report):
                self.pending_reports.pop(dev, None)

    def _report(self, device_id: str, report: dict[str, Any]) -> bool:
        return self.publish(state_topic(device_id), json.dumps(report).encode(), True)

    def handle(self, topic: str, payload: bytes) -> None:
        """A message on ``devices/{id}/config``."""
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != "devices" or parts[2] != "config" or not payload:
            return
        dev = parts[1]
        if dev not in self.devices.ids:
            return
        now = int(time.time() * 1000)
        try:
            report = self.apply(dev, payload)
        except ConfigError as exc:
            self.rejected += 1
            log.warning("twin: rejected config for %s: %s", dev, exc)
            report = {
                "device_id": dev,
                "version": getattr(exc, "version", None),
                "status": "rejected",
                "error": str(exc),
                "ts": now,
            }
        if not self._report(dev, report):
            self.pending_reports[dev] = report

    def apply(self, device_id: str, payload: bytes) -> dict[str, Any]:
        """Validate and apply one desired config; returns the state report."""
        try:
            obj = json.loads(payload)
        except ValueError as exc:
            raise ConfigError(f"config is not JSON: {exc}", key="(root)") from exc
        if not isinstance(obj, dict) or type(obj.get("version")) is not int:
            err = ConfigError("version: an integer version is required", key="version")
            raise err
        version = obj.pop("version")
        now = int(time.time() * 1000)
        if version <= self.applied.get(device_id, -1):
            return {
                "device_id": device_id,
                "version": self.applied[device_id],
                "status": "applied",
                "ts": now,
            }
        try:
            rule = DeviceRule.model_validate(obj)
            aggs = self.pre.set_device_rule(device_id, rule)
        except ValidationError as exc:
            err = ConfigError(format_validation_error(exc, source=config_topic(device_id)), key="config")
            err.version = version  # type: ignore[attr-defined]
            raise err from exc
        except ConfigError as exc:
            exc.version = version  # type: ignore[attr-defined]
            raise
        if aggs and self.on_aggregates is not None:
            self.on_aggregates(aggs)
        self.applied[device_id] = version
        log.info("twin: applied config version %s to %s", version, device_id)
        return {"device_id": device_id, "version": version, "status": "applied", "ts": now}


#: The desired members the agent acts on: a device rule's fields (docs/twins.md). Other members stay
#: in the delta, for whatever else on the device handles them.
RULE_KEYS: Final = ("mode", "heartbeat_ms", "window_ms", "threshold", "metrics")
#: Reports kept for a device until the service answers them (beyond, the oldest are dropped).
_MAX_PENDING: Final = 64
#: Unanswered reports and gets are sent again after this long, then twice as long each time, up to the max.
RETRY_FIRST_S: Final = 10.0
RETRY_MAX_S: Final = 300.0


class ShadowTwin:
    """The device side of a twin with shadow semantics (``devices/{id}/twin/...``, docs/twins.md).

    For each device of the agent: subscribes to its ``twin/delta``; on every connection reports the
    rule it runs (the members of :data:`RULE_KEYS`) and asks (``twin/get``) for the delta, so a
    device that was offline while its desired state changed converges when it is back; applies each
    delta to the preprocessor (validated as a :class:`DeviceRule`) and reports what it applied.
    A report is sent again on every connection until the service answers its ``client_token``.
    What it applied is kept in ``state_path`` (JSON) and applied again at the next start.

    Args:
        pre: the agent's preprocessor.
        devices: the agent's device index.
        publish: ``(topic, payload, retain) -> bool``.
        subscribe: ``(topics) -> bool``.
        on_aggregates: receives windows closed by a change.
        state_path: where the applied rules are kept (None: in memory only).
    """

    def __init__(self, pre: Preprocessor, devices: DeviceIndex, *, publish: Callable[[str, bytes, bool], bool],
                 subscribe: Callable[[list[str]], bool],
                 on_aggregates: Callable[[list[Aggregate]], None] | None = None,
                 state_path: Path | None = None) -> None:
        self.pre = pre
        self.devices = devices
        self.publish = publish
        self.subscribe = subscribe
        self.on_aggregates = on_aggregates
        self.state_path = state_path
        #: The rule members applied per device (JSON), as reported.
        self.applied: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self._handled: dict[str, str] = {}  # the last delta acted on per device (JSON), so it is not redone
        self.counters = {"deltas_applied": 0, "deltas_rejected": 0, "reports": 0, "reports_answered": 0,
                         "reports_rejected": 0, "reports_dropped": 0, "gets": 0, "retries": 0}
        self._connected = False
        self._get_token: dict[str, str] = {}  # the get of each device not answered yet
        self._retry: dict[str, tuple[float, float]] = {}  # device -> (when to send again, interval)
        if state_path is not None and state_path.exists():
            try:
                saved = json.loads(state_path.read_text())
                for dev, rule in dict(saved).items():
                    self._apply_rule(dev, dict(rule))
                    self.applied[dev] = dict(rule)
            except (ValueError, TypeError, ConfigError, ValidationError) as exc:
                log.warning("twin: ignoring unreadable state %s: %s", state_path, exc)
        devices.on_new(lambda i, d: self._hello(d) if self._connected else None)

    # -- connection --------------------------------------------------------------------------
    def on_connect(self) -> None:
        """Subscribe, report, ask for the delta: for every known device."""
        self._connected = True
        devs = list(self.devices.ids)
        self.subscribe([twin_topic(d, "delta") for d in devs])  # one SUBSCRIBE per 100 devices
        for dev in devs:
            self._hello(dev, subscribed=True)

    def on_disconnect(self) -> None:
        """The session is gone: the next connection says hello again."""
        self._connected = False

    def _hello(self, dev: str, *, subscribed: bool = False) -> None:
        if not subscribed:
            self.subscribe([twin_topic(dev, "delta")])
        if not self.pending.get(dev):
            self.report(dev, {k: self.applied.get(dev, {}).get(k) for k in RULE_KEYS})
        else:
            for token, state in self.pending[dev]:
                self._send(dev, token, state)
        self._get(dev)
        self._retry[dev] = (time.monotonic() + RETRY_FIRST_S, RETRY_FIRST_S)

    def _get(self, dev: str) -> None:
        token = f"get-{secrets.token_hex(4)}"
        self._get_token[dev] = token
        self.counters["gets"] += 1
        self.publish(twin_topic(dev, "get"), json.dumps({"client_token": token}).encode(), False)

    def tick(self, now: float | None = None) -> int:
        """Send again what got no answer (reports, a ``get``), with a doubling interval (10 s .. 5 min):
        an answer lost on the way (a broker restart, a service down) does not leave a device behind.
        Returns how many devices were retried."""
        if not self._connected:
            return 0
        t = time.monotonic() if now is None else now
        n = 0
        for dev, (due, interval) in list(self._retry.items()):
            if not self.pending.get(dev) and dev not in self._get_token:
                del self._retry[dev]  # everything answered
                continue
            if t < due:
                continue
            for token, state in self.pending.get(dev, []):
                self._send(dev, token, state)
            self._get(dev)
            nxt = min(interval * 2, RETRY_MAX_S)
            self._retry[dev] = (t + nxt, nxt)
            self.counters["retries"] += 1
            n += 1
        return n

    def report(self, dev: str, state: dict[str, Any]) -> None:
        """Report ``state`` (a merge patch of the reported document); kept until answered."""
        token = secrets.token_hex(6)
        queue = self.pending.setdefault(dev, [])
        queue.append((token, state))
        if len(queue) > _MAX_PENDING:
            del queue[0]  # never answered while 64 newer ones were made: counted, the newest kept
            self.counters["reports_dropped"] += 1
        self.counters["reports"] += 1
        self._retry.setdefault(dev, (time.monotonic() + RETRY_FIRST_S, RETRY_FIRST_S))
        self._send(dev, token, state)

    def _send(self, dev: str, token: str, state: dict[str, Any]) -> None:
        self.publish(twin_topic(dev, "reported"), json.dumps({"state": state, "client_token": token}).encode(),
                     False)

    # -- messages ---------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes) -> bool:
        """A message on ``devices/{id}/twin/delta``; False when it is not one of this agent's."""
        where = device_of_twin_topic(topic)
        if where is None or where[1] != "delta" or where[0] not in self.devices.ids:
            return False
        dev = where[0]
        try:
            msg = json.loads(payload)
        except (ValueError, RecursionError):
            log.warning("twin: ignoring a delta of %s that is not JSON", dev)
            return True
        if not isinstance(msg, dict):
            return True
        token = msg.get("client_token")
        if msg.get("status") == "get":  # the answer to a get (an earlier one's does as well)
            self._get_token.pop(dev, None)
        if token is not None and dev in self.pending:
            before = len(self.pending[dev])
            self.pending[dev] = [(t, s) for t, s in self.pending[dev] if t != token]
            if len(self.pending[dev]) < before:
                key = "reports_rejected" if msg.get("status") == "rejected" else "reports_answered"
                self.counters[key] += 1
                if msg.get("status") == "rejected":
                    log.warning("twin: report of %s rejected: %s", dev, msg.get("error"))
        if msg.get("status") == "rejected" or not isinstance(msg.get("delta"), dict):
            return True
        self.apply_delta(dev, msg["delta"], version=msg.get("version"))
        return True

    def apply_delta(self, dev: str, delta_doc: dict[str, Any], *, version: Any = None) -> None:
        """Apply the rule members of a delta and report them (or report why they were refused)."""
        mine = {k: v for k, v in delta_doc.items() if k in RULE_KEYS}
        if not mine:
            return
        key = json.dumps(mine, sort_keys=True)
        if self._handled.get(dev) == key:
            return  # acted on already (the answer to our own report repeats it)
        self._handled[dev] = key
        current = self.applied.get(dev, {})
        candidate, _ = merge_patch(current, mine)
        try:
            self._apply_rule(dev, candidate)
        except (ConfigError, ValidationError) as exc:
            text = format_validation_error(exc, source=twin_topic(dev, "delta")) if isinstance(
                exc, ValidationError) else str(exc)
            self.counters["deltas_rejected"] += 1
            log.warning("twin: refused the delta of %s (version %s): %s", dev, version, text)
            self.report(dev, {"config_error": {"version": version, "error": text}})
            return
        self.applied[dev] = candidate
        self._save()
        self.counters["deltas_applied"] += 1
        log.info("twin: applied the delta of %s (version %s): %s", dev, version, sorted(mine))
        self.report(dev, {**mine, "config_error": None})

    def _apply_rule(self, dev: str, rule: dict[str, Any]) -> None:
        parsed = DeviceRule.model_validate({k: v for k, v in rule.items() if k in RULE_KEYS})
        aggs = self.pre.set_device_rule(dev, parsed)
        if aggs and self.on_aggregates is not None:
            self.on_aggregates(aggs)

    def _save(self) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.applied))
        os.replace(tmp, self.state_path)
