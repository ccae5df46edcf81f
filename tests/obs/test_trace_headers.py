"""Trace context across the bus: gateway -> NATS / Kafka record headers -> processor -> hot store.

Real servers (the session's embedded nats-server and tansu broker), the real gateway routing and
processor; spans collected in memory. Also the untraced path: no headers, no spans.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fieldmesh.bus import BusRecord, Consumer, TopicSpec, load_bus
from fieldmesh.core.settings import GatewaySettings, ProcessorSettings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.gateway.base import IngestMessage
from fieldmesh.gateway.gateway import Gateway
from fieldmesh.obs import tracing
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.alerting import AlertEngine
from fieldmesh.stream.processor import Processor
from fmtest.otlp import memory_spans

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    yield from memory_spans()

PARTITIONS = 4


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _Source:
    """An in-memory ingest source (the gateway's contract): the given messages, once."""

    name = "memory"

    def __init__(self, msgs: list[IngestMessage]) -> None:
        self.msgs = msgs
        self.acked: list[IngestMessage] = []

    async def start(self) -> None: ...

    async def fetch(self, max_messages: int, timeout_s: float, *, max_bytes: int | None = None) -> list[IngestMessage]:
        out, self.msgs = self.msgs, []
        return out

    async def ack(self, messages: Sequence[IngestMessage]) -> None:
        self.acked.extend(messages)

    async def close(self) -> None: ...


def _msg(device: str, seq: int, traceparent: str | None = None, meta_tp: str | None = None) -> IngestMessage:
    body: dict[str, Any] = {"ts": int(time.time() * 1000), "seq": seq, "boot_id": "b", "measurements": {"t": 1.0}}
    if meta_tp:
        body["meta"] = {"traceparent": meta_tp}
    return IngestMessage(topic=f"devices/{device}/telemetry", payload=json.dumps(body).encode(),
                         received_ms=int(time.time() * 1000), traceparent=traceparent)


async def _fetch_all(c: Consumer, n: int) -> list[BusRecord]:
    out: list[BusRecord] = []
    deadline = time.monotonic() + 30
    while len(out) < n and time.monotonic() < deadline:
        out += await c.fetch(100, 0.5)
    return out


async def _through_bus(url: str, gw: Gateway, src: _Source) -> list[BusRecord]:
    """Route the source's messages, send the readings records to a topic of this test, fetch them back."""
    topic = f"t.trace.{secrets.token_hex(4)}"
    async with load_bus(url) as bus:
        await bus.ensure_topic(TopicSpec(topic, PARTITIONS, 3600))
        gw.producer = bus.producer()
        got = await gw._fetch_routed()
        assert got is not None
        msgs, records, n, dead = got
        assert not dead
        assert all(r.topic == READINGS_TOPIC for r in records)
        records[:] = [dataclasses.replace(r, topic=topic) for r in records]  # the same list: its spans end on send
        mine = records
        await gw._deliver(msgs, mine, n, dead, None)
        c = await bus.consumer(topic, group=f"g{secrets.token_hex(3)}")
        try:
            fetched = await _fetch_all(c, len(mine))
        finally:
            await c.close()
    assert len(fetched) == len(mine)
    # the processor reads them as fieldmesh's readings topic
    return [msgspec.structs.replace(r, topic=READINGS_TOPIC) for r in fetched]


@pytest.mark.parametrize("encoding", [1, 2])
@pytest.mark.parametrize("backend", ["embedded_nats_url", "tansu_url"])
async def test_context_crosses_the_bus_in_headers(
    backend: str, encoding: int, request: pytest.FixtureRequest, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    url = request.getfixturevalue(backend)
    t1, s1, t2, s2, t3, s3 = (secrets.token_hex(n) for n in (16, 8, 16, 8, 16, 8))
    dev = f"d{secrets.token_hex(3)}"
    # one device: one partition, so one bus record carries all three readings and all three traces
    msgs = [_msg(dev, 1, f"00-{t1}-{s1}-01"), _msg(dev, 2, f"00-{t2}-{s2}-01"), _msg(dev, 3, None, f"00-{t3}-{s3}-01"),
            _msg(dev, 4)]
    gw = Gateway(source=_Source(msgs), producer=None, settings=GatewaySettings(bus_encoding=encoding),  # type: ignore[arg-type]
                 partitions=PARTITIONS)
    records = await _through_bus(url, gw, gw.source)  # type: ignore[arg-type]
    assert len(records) == 1
    hdr = records[0].headers
    gws = [s for s in spans.get_finished_spans() if s.name == "gateway.publish"]
    assert len(gws) == 1
    g = gws[0]
    # the record's span continues the first message's trace and links the others (header and meta)
    assert g.context.trace_id == int(t1, 16) and g.parent is not None and g.parent.span_id == int(s1, 16)
    assert {(ln.context.trace_id, ln.context.span_id) for ln in g.links} == {(int(t2, 16), int(s2, 16)),
                                                                             (int(t3, 16), int(s3, 16))}
    assert hdr["traceparent"] == f"00-{t1}-{g.context.span_id:016x}-{int(g.context.trace_flags):02x}"
    assert g.context.trace_flags.sampled

    store = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    try:
        p = Processor(bus=None, store=store, settings=ProcessorSettings(),  # type: ignore[arg-type]
                      alerts=AlertEngine(store))
        res = p.apply_records(records)
        assert res.stored == 4
    finally:
        store.close()
    done = {s.name: s for s in spans.get_finished_spans()}
    apply, commit = done["processor.apply"], done["store.hot.commit"]
    assert apply.context.trace_id == int(t1, 16) and apply.parent.span_id == g.context.span_id  # type: ignore[union-attr]
    assert commit.parent.span_id == apply.context.span_id  # type: ignore[union-attr]
    assert commit.attributes["fieldmesh.stored"] == 4
    assert done["alerts.evaluate"].parent.span_id == commit.context.span_id  # type: ignore[union-attr]


@pytest.mark.parametrize("backend", ["embedded_nats_url", "tansu_url"])
async def test_untraced_messages_start_a_sampled_root_and_off_means_no_headers(
    backend: str, request: pytest.FixtureRequest, spans: InMemorySpanExporter
) -> None:
    url = request.getfixturevalue(backend)
    devs = [f"d{secrets.token_hex(3)}" for _ in range(6)]
    gw = Gateway(source=_Source([_msg(d, 1) for d in devs]), producer=None,  # type: ignore[arg-type]
                 settings=GatewaySettings(), partitions=PARTITIONS)
    records = await _through_bus(url, gw, gw.source)  # type: ignore[arg-type]
    roots = [s for s in spans.get_finished_spans() if s.name == "gateway.publish"]
    assert len(roots) == len(records) and all(s.parent is None for s in roots)
    assert {r.headers["traceparent"] for r in records} == {tracing.traceparent_of(s.context) for s in roots}
    assert all(s.context.trace_flags.sampled for s in roots)

    tracing.set_enabled(False)  # tracing off: no span, no header
    spans.clear()
    gw = Gateway(source=_Source([_msg(d, 2, f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01") for d in devs]),
                 producer=None, settings=GatewaySettings(), partitions=PARTITIONS)  # type: ignore[arg-type]
    records = await _through_bus(url, gw, gw.source)  # type: ignore[arg-type]
    assert records and all("traceparent" not in r.headers for r in records)
    assert not spans.get_finished_spans()


@pytest.mark.parametrize("kind", ["kafka", "nats"])
async def test_ingress_topics_read_the_producers_trace_headers(
    kind: str, request: pytest.FixtureRequest, spans: InMemorySpanExporter
) -> None:
    """A Kafka topic or NATS subject of raw device payloads: its records' ``traceparent``/``tracestate``
    headers become the messages' trace context (the gateway's spans continue them)."""
    from fieldmesh.gateway.ingress import load_ingest

    tp = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    dev = f"d{secrets.token_hex(3)}"
    body = json.dumps({"device_id": dev, "ts": int(time.time() * 1000), "measurements": {"t": 1.0}}).encode()
    if kind == "kafka":
        from fmtest.scale import produce

        url = request.getfixturevalue("tansu_url")
        topic = f"raw-{secrets.token_hex(4)}"
        records = [(dev.encode(), body, {"traceparent": tp, "tracestate": "fm=2"}), (None, body, {})]
        await asyncio.to_thread(produce, url, topic, records)  # it runs its own event loop
        base, query = url.split("?", 1) if "?" in url else (url, "")
        src = load_ingest(f"{base}/{topic}?group=g{secrets.token_hex(3)}&{query}".rstrip("&"))
    else:
        import nats

        url = request.getfixturevalue("embedded_nats_url")
        subject = f"plant{secrets.token_hex(3)}"
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name=subject.upper(), subjects=[f"{subject}.>"])
        await js.publish(f"{subject}.{dev}", body, headers={"traceparent": tp, "tracestate": "fm=2"})
        await js.publish(f"{subject}.{dev}", body)
        await nc.close()
        src = load_ingest(f"{url}/{subject}.*?stream={subject.upper()}&durable=gw")
    await src.start()
    try:
        got: list[IngestMessage] = []
        deadline = time.monotonic() + 30
        while len(got) < 2 and time.monotonic() < deadline:
            got += await src.fetch(10, 0.5)
    finally:
        await src.close()
    assert len(got) == 2
    assert {(m.traceparent, m.tracestate) for m in got} == {(tp, "fm=2"), (None, None)}
