"""The agent's shadow twin without a broker (edge/twin.py ShadowTwin): what it sends on connect, how it
applies a delta, that unanswered reports and gets are sent again with a doubling interval, that a delta is
not acted on twice, and what it keeps across a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fieldmesh.edge.config import PreprocessConfig
from fieldmesh.edge.frame import DeviceIndex
from fieldmesh.edge.preprocess import Preprocessor
from fieldmesh.edge.twin import RETRY_FIRST_S, ShadowTwin


def make(tmp_path: Path) -> tuple[ShadowTwin, list[tuple[str, dict[str, Any]]], Preprocessor]:
    devices = DeviceIndex()
    pre = Preprocessor(PreprocessConfig(), devices)
    devices.index("pump-1")
    sent: list[tuple[str, dict[str, Any]]] = []

    def publish(topic: str, payload: bytes, retain: bool) -> bool:
        sent.append((topic, json.loads(payload)))
        return True

    twin = ShadowTwin(pre, devices, publish=publish, subscribe=lambda topics: True, state_path=tmp_path / "twin.json")
    return twin, sent, pre


def test_connect_apply_retry_and_restart(tmp_path: Path) -> None:
    twin, sent, pre = make(tmp_path)
    twin.on_connect()
    assert [t for t, _ in sent] == ["devices/pump-1/twin/reported", "devices/pump-1/twin/get"]
    hello, get = sent[0][1], sent[1][1]
    assert hello["state"] == {"mode": None, "heartbeat_ms": None, "window_ms": None, "threshold": None,
                              "metrics": None}
    # no answer: nothing before the first interval, then both again, then after twice as long
    now = time.monotonic()
    assert twin.tick(now + 1) == 0
    sent.clear()
    assert twin.tick(now + RETRY_FIRST_S + 1) == 1
    assert [t for t, _ in sent] == ["devices/pump-1/twin/reported", "devices/pump-1/twin/get"]
    assert sent[0][1]["client_token"] == hello["client_token"]  # the same report again
    assert twin.tick(now + RETRY_FIRST_S + 2) == 0
    assert twin.tick(now + 3 * RETRY_FIRST_S + 2) == 1
    get = sent[-1][1]  # each get has a token of its own: the newest is the one to answer
    # the service answers the report and the get (with a delta)
    twin.handle("devices/pump-1/twin/delta", json.dumps(
        {"status": "accepted", "client_token": hello["client_token"], "version": 1, "delta": {}}).encode())
    sent.clear()
    delta = {"mode": "window", "window_ms": 4000, "firmware": "2.0"}
    twin.handle("devices/pump-1/twin/delta", json.dumps(
        {"status": "get", "client_token": get["client_token"], "version": 3, "delta": delta}).encode())
    i = pre.devices.index("pump-1")
    assert int(pre.win[i]) == 4000
    assert twin.applied["pump-1"] == {"mode": "window", "window_ms": 4000}  # firmware is not the agent's
    assert [t for t, _ in sent] == ["devices/pump-1/twin/reported"]
    report = sent[0][1]
    assert report["state"] == {"mode": "window", "window_ms": 4000, "config_error": None}
    # the same delta again (the answer to a get, say): not acted on twice
    twin.handle("devices/pump-1/twin/delta", json.dumps({"status": "desired", "version": 3, "delta": delta}).encode())
    assert len(sent) == 1 and twin.counters["deltas_applied"] == 1
    # answered: nothing left to retry
    twin.handle("devices/pump-1/twin/delta", json.dumps(
        {"status": "accepted", "client_token": report["client_token"], "version": 4, "delta": {}}).encode())
    assert twin.tick(now + 10_000) == 0 and twin.pending["pump-1"] == []
    # a delta it cannot apply: reported as such, the rule it runs stays
    twin.handle("devices/pump-1/twin/delta", json.dumps({"version": 5, "delta": {"window_ms": -1}}).encode())
    assert "window_ms" in sent[-1][1]["state"]["config_error"]["error"]
    assert int(pre.win[i]) == 4000 and twin.counters["deltas_rejected"] == 1
    # foreign or broken messages are not this agent's business, and do not break it
    assert not twin.handle("devices/other/twin/delta", b"{}")
    assert twin.handle("devices/pump-1/twin/delta", b'{"delta": ' * 3000)
    # a restart applies what it applied before, before any connection
    again, _, pre2 = make(tmp_path)
    assert again.applied["pump-1"] == {"mode": "window", "window_ms": 4000}
    assert int(pre2.win[pre2.devices.index("pump-1")]) == 4000
