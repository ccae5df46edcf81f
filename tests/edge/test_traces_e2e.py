"""One trace from the edge read to the sink commits, through the real pipeline: the edge agent and
``fieldmesh up`` as processes, exporting OTLP/HTTP to a receiver inside the test.

- through the nats door (MQTT 3.1.1: the context travels in ``meta.traceparent``) and the Mosquitto door
  (MQTT 5: user properties ``traceparent``/``tracestate``), and a reading a plain MQTT 5 client publishes
  with its own ``traceparent``;
- after an outage: readings buffered while the door is down, the agent killed -9 meanwhile, then
  replayed by the restarted agent, continue the traces their first process started.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import wait_for
from fmtest.otlp import OtlpReceiver, Span, connected, env, reached
from fmtest.procs import Up, publisher

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PIPELINE = ["edge.read", "edge.buffer", "edge.uplink", "gateway.publish", "processor.apply", "store.hot.commit",
            "sink.lake.write", "lake.commit"]
SERVICES = {"fieldmesh-edge", "fieldmesh-gateway", "fieldmesh-processor"}


@pytest.fixture
def otlp(monkeypatch: pytest.MonkeyPatch) -> Any:
    r = OtlpReceiver()
    for k, v in env(r.endpoint).items():
        monkeypatch.setenv(k, v)  # the agent and 'up' (and the workers it starts) inherit them
    yield r
    r.close()


def _agent_cfg(tmp_path: Path, port: int, prefix: str, *, devices: int, ticks: int) -> dict[str, Any]:
    return {
        "agent": {"boot_id": "agent1", "stats_interval_s": 0.2},
        "sources": [{"simulator": {"devices": devices, "interval_ms": 100, "prefix": prefix, "seed": 3,
                                   "max_ticks": ticks, "start_ts_ms": int(time.time() * 1000) - 5000}}],
        "infer": {"scorer": "ewma"},
        "buffer": {"path": str(tmp_path / "buf"), "fsync": "always"},
        "uplink": {"port": port, "linger_ms": 50, "backoff_initial_ms": 100, "backoff_max_ms": 500},
        "twin": {"enabled": False},
    }


def _full_trace(spans: list[Span]) -> list[Span] | None:
    """A trace that holds every stage, connected from its edge.read root, if one arrived."""
    by_trace: dict[str, list[Span]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s)
    for t in by_trace.values():
        names = {s.name for s in t}
        if set(PIPELINE) <= names and {s.service for s in t} >= SERVICES and connected(t):
            return t
    return None


def _orphans(spans: list[Span]) -> list[str]:
    """Spans of a stage that no span of the next stage picked up (as its parent, or through a link)."""
    return [f"{up} {s.span_id}" for up, down in [("edge.buffer", "edge.uplink"), ("edge.uplink", "gateway.publish"),
                                                 ("gateway.publish", "processor.apply")]
            for s in spans if s.name == up and not reached((s.trace_id, s.span_id), spans, down)]


@pytest.mark.parametrize("door", ["nats", "mosquitto"])
def test_one_trace_from_edge_read_to_sink_commit(
    door: str, tmp_path: Path, otlp: OtlpReceiver, agent_factory: Any, prefix: str
) -> None:
    devices, ticks = 2, 5
    up = Up(tmp_path / "data", "--door", door, "--lake-commit-interval", "1").start()
    try:
        agent = agent_factory(_agent_cfg(tmp_path, up.mqtt_port, prefix, devices=devices, ticks=ticks))
        agent.start()
        up.wait_for(lambda s: s["stored"] >= devices * ticks, 60)
        full = otlp.wait(_full_trace, 30, "a trace from edge.read to lake.commit")
        assert agent.stats()["uplink"]["protocol"] == ("3.1.1" if door == "nats" else "5")
        root = next(s for s in full if s.name == "edge.read")
        assert root.service == "fieldmesh-edge" and not root.parent_span_id
        store = next(s for s in full if s.name == "store.hot.commit")
        assert store.service == "fieldmesh-processor" and store.attributes["fieldmesh.stored"] >= 1
        # every stage's spans are picked up by the next one (spans arrive within the exporters' delay)
        otlp.wait(lambda spans: not _orphans(spans), 15, "no orphaned span")
        assert len(otlp.named("edge.buffer")) >= 1 and len(otlp.named("processor.apply")) >= 1
        assert agent.stop() == 0

        if door == "mosquitto":
            # a device of its own, MQTT 5, with a traceparent it made: the pipeline continues that trace
            trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
            c = publisher(up.mqtt_port, v5=True)
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.UserProperty = [("traceparent", f"00-{trace_id}-{span_id}-01"), ("tracestate", "fm=1")]
            body = json.dumps({"ts": int(time.time() * 1000), "seq": 1, "measurements": {"t": 1.5}}).encode()
            c.publish(f"devices/{prefix}-own/telemetry", body, qos=1, properties=props).wait_for_publish(10)
            got = otlp.wait(lambda spans: {s.name for s in spans if s.trace_id == trace_id} >= {
                "gateway.publish", "processor.apply", "store.hot.commit"}, 30, "the device's own trace")
            assert got
            t = otlp.trace(trace_id)
            gw = next(s for s in t if s.name == "gateway.publish")
            assert gw.parent_span_id == span_id and gw.service == "fieldmesh-gateway"
            ids = {s.span_id for s in t} | {span_id}
            assert all(s.parent_span_id in ids for s in t)
            c.disconnect()
    finally:
        assert up.stop() == 0, up.tail()


def test_replay_after_outage_continues_the_original_trace(
    tmp_path: Path, otlp: OtlpReceiver, agent_factory: Any, prefix: str
) -> None:
    devices, ticks = 2, 20
    up = Up(tmp_path / "data", "--lake-commit-interval", "1")  # not started yet: the door is down
    agent = agent_factory(_agent_cfg(tmp_path, up.mqtt_port, prefix, devices=devices, ticks=ticks))
    agent.start()
    # readings pile up in the buffer during the outage; their read and buffer spans are exported
    wait_for(lambda: agent.stats().get("buffer", {}).get("pending_readings", 0) >= 2 * devices, 30, "buffering")
    otlp.wait(lambda spans: len([s for s in spans if s.name == "edge.buffer"]) >= 2, 15, "edge.buffer spans")
    time.sleep(0.5)
    agent.kill9()  # the first process dies with its readings still buffered
    buffered = [s for s in otlp.snapshot() if s.name == "edge.buffer"]
    assert not otlp.named("edge.uplink"), "nothing can have been sent during the outage"

    up.start()
    try:
        agent.start()
        ticks_done = json.loads((tmp_path / "buf" / "state" / "source0-simulator.json").read_text())["next_tick"]
        up.wait_for(lambda s: s["stored"] >= devices * ticks_done, 60)
        # every reading the first process buffered was sent by the second within its original trace
        otlp.wait(lambda spans: all(reached((b.trace_id, b.span_id), spans, "edge.uplink") for b in buffered),
                  30, "the replayed records' uplink spans")
        first = {b.trace_id for b in buffered}
        full = otlp.wait(lambda spans: _full_trace([s for s in spans if s.trace_id in first]), 30,
                         "a trace of the first process, completed after the replay")
        read = next(s for s in full if s.name == "edge.read")
        uplink = next(s for s in full if s.name == "edge.uplink")
        assert uplink.start_ns > read.end_ns  # sent after the outage, by the next process
        assert agent.stop() == 0
    finally:
        assert up.stop() == 0, up.tail()
