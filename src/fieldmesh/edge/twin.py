"""Twin-lite: desired config per device on ``devices/{id}/config`` (retained), applied live.

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
import time
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from fieldmesh.core.errors import ConfigError
from fieldmesh.edge.config import DeviceRule, format_validation_error
from fieldmesh.edge.frame import DeviceIndex
from fieldmesh.edge.preprocess import Aggregate, Preprocessor

__all__ = ["Twin", "config_topic", "state_topic"]

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
