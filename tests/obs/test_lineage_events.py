"""OpenLineage run events: validated against the standard's JSON schemas (tests/data/openlineage, no network),
received by a real HTTP endpoint, kept in the hot store and served as a graph by the API."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource

from fieldmesh.api.app import create_app
from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.obs.lineage import Dataset, Lineage
from fieldmesh.runtime.lineage import processor_outputs
from fieldmesh.store import load_store
from fieldmesh.store.lineage import LineageTables
from fieldmesh.store.products import ProductTables
from fieldmesh.stream.processor import Processor
from fieldmesh.stream.products import ProductEngine
from fieldmesh.stream.quality import parse_product

SPEC = Path(__file__).resolve().parents[1] / "data" / "openlineage"
FACET_FILES = {"dataQualityMetrics": "DataQualityMetricsDatasetFacet", "errorMessage": "ErrorMessageRunFacet",
               "jobType": "JobTypeJobFacet"}


def _registry() -> Registry:  # type: ignore[type-arg]
    resources = []
    for f in SPEC.glob("*.json"):
        doc = json.loads(f.read_text())
        resources.append((doc["$id"], Resource.from_contents(doc)))
    return Registry().with_resources(resources)


REGISTRY = _registry()
CORE = json.loads((SPEC / "OpenLineage.json").read_text())


def validate(event: dict[str, Any]) -> None:
    """The event against RunEvent, and each facet against its own schema."""
    Draft202012Validator({"$ref": f"{CORE['$id']}#/$defs/RunEvent"}, registry=REGISTRY).validate(event)
    facets: list[tuple[str, Any]] = [*event["run"].get("facets", {}).items(), *event["job"].get("facets", {}).items()]
    for d in [*event.get("inputs", []), *event.get("outputs", [])]:
        facets += list(d.get("facets", {}).items())
    for name, facet in facets:
        schema_file = FACET_FILES[name]  # every facet fieldmesh emits has its schema here
        doc = json.loads((SPEC / f"{schema_file}.json").read_text())
        Draft202012Validator({"$ref": f"{doc['$id']}#/$defs/{schema_file}"}, registry=REGISTRY).validate(facet)


def test_the_schemas_catch_a_bad_event() -> None:
    ev = Lineage(store_url=None).event("START", "fieldmesh.gateway", "0190a1b2-0000-7000-8000-000000000001")
    validate(ev)
    with pytest.raises(ValidationError, match=r"'STARTED' is not one of"):
        validate({**ev, "eventType": "STARTED"})
    with pytest.raises(ValidationError, match=r"'runId' is a required property"):
        validate({**ev, "run": {"facets": {}}})


class _Receiver(BaseHTTPRequestHandler):
    got: list[tuple[str, dict[str, Any]]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.got.append((self.path, json.loads(body)))
        self.send_response(201)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    got: list[tuple[str, dict[str, Any]]] = []
    handler = type("Handler", (_Receiver,), {"got": got})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", got
    server.shutdown()
    server.server_close()


def _product_batch(url: str) -> None:
    from fieldmesh.bus.base import BusRecord
    from fieldmesh.core.codec import decode_telemetry, encode_bus_batch, encode_reading_json
    from fieldmesh.core.model import BusBatch
    from fieldmesh.core.topics import READINGS_TOPIC

    t0 = 1_767_225_600_000
    readings = [decode_telemetry(encode_reading_json("m-1", t0 + i * 1000, {"temp": 20.0} if i % 4 else {"x": 1.0},
                                                     i), device_id="m-1", topic="devices/m-1/telemetry",
                                 received_ms=t0 + i * 1000, max_skew_ms=10**12).readings[0] for i in range(12)]
    store = load_store(url)
    try:
        Processor(bus=None, store=store, settings=ProcessorSettings(),  # type: ignore[arg-type]
                  products=ProductEngine(store)).apply_records(
            [BusRecord(topic=READINGS_TOPIC, partition=0, offset=1, value=encode_bus_batch(BusBatch(readings)))])
    finally:
        store.close()


def test_runs_are_sent_kept_valid_and_form_the_graph(
        tmp_path: Path, receiver: tuple[str, list[tuple[str, dict[str, Any]]]]) -> None:
    url, got = receiver
    store_url = f"sqlite:///{tmp_path}/s.db"
    products = ProductTables(store_url)
    products.put(parse_product({"name": "line-a", "devices": {"ids": ["m-1"]}, "window_s": 10,
                                "metrics": {"temp": {"min": 0, "max": 50}}}), actor="test")
    products.close()
    _product_batch(store_url)
    lineage = Lineage(store_url=store_url, url=url, interval_s=0.2)
    bus = "nats://127.0.0.1:4222"

    async def main() -> None:
        async with (
            lineage.run("fieldmesh.gateway", inputs=[Dataset("mqtt://127.0.0.1:1883", "devices/+/telemetry")],
                        outputs=[Dataset(bus, "fm.readings")]),
            lineage.run("fieldmesh.processor", inputs=[Dataset(bus, "fm.readings")],
                        outputs=processor_outputs(store_url)),
        ):
            await asyncio.sleep(0.5)
        with pytest.raises(RuntimeError, match="disk on fire"):
            async with lineage.run("fieldmesh.sink.lake", inputs=[Dataset(bus, "fm.readings")],
                                   outputs=[Dataset("iceberg+sqlite:///c.db", "fieldmesh.readings")]):
                raise RuntimeError("disk on fire")

    asyncio.run(main())
    lineage.close()
    assert lineage.stats.send_failed == 0 and lineage.stats.sent == len(got) == lineage.stats.emitted
    assert {p for p, _ in got} == {"/api/v1/lineage"}
    events = [e for _, e in got]
    for e in events:
        validate(e)
    by_job: dict[str, list[str]] = {}
    for e in events:
        by_job.setdefault(e["job"]["name"], []).append(e["eventType"])
    for job in ("fieldmesh.gateway", "fieldmesh.processor"):
        states = by_job[job]
        assert states[0] == "START" and states[-1] == "COMPLETE" and "RUNNING" in states
        assert len({e["run"]["runId"] for e in events if e["job"]["name"] == job}) == 1
    assert by_job["fieldmesh.sink.lake"] == ["START", "FAIL"]
    fail = next(e for e in events if e["eventType"] == "FAIL")
    assert "disk on fire" in fail["run"]["facets"]["errorMessage"]["message"]
    # the product's quality in the processor's events: 12 new readings, 3 lacking temp
    proc = next(e for e in events if e["job"]["name"] == "fieldmesh.processor" and e["eventType"] == "RUNNING")
    (prod,) = [d for d in proc["outputs"] if d["name"] == "product.line-a"]
    dq = prod["facets"]["dataQualityMetrics"]
    assert dq["columnMetrics"]["temp"]["nullCount"] + dq["columnMetrics"]["temp"]["count"] == dq["rowCount"]
    assert dq["rowCount"] > 0
    # kept locally, the same events
    kept = LineageTables(store_url)
    try:
        assert sorted(json.dumps(e, sort_keys=True) for e in kept.events(limit=1000)) == sorted(
            json.dumps(e, sort_keys=True) for e in events)
    finally:
        kept.close()
    # the graph: device -> MQTT topic -> gateway -> bus topic -> processor -> tables and the product
    writer = load_store(store_url)
    reader = load_store(store_url, readonly=True)
    client = TestClient(create_app(store_url, store=reader))
    try:
        g = client.get("/api/v1/lineage", params={"dataset": "device:m-1"}).json()
        edges = {(e["from"], e["to"]) for e in g["edges"]}
        mqtt, readings = "mqtt://127.0.0.1:1883/devices/+/telemetry", f"{bus}/fm.readings"
        assert ("device:m-1", mqtt) in edges
        assert (mqtt, "job:fieldmesh/fieldmesh.gateway") in edges
        assert ("job:fieldmesh/fieldmesh.gateway", readings) in edges
        assert (readings, "job:fieldmesh/fieldmesh.processor") in edges
        assert ("job:fieldmesh/fieldmesh.processor", f"{store_url}/readings") in edges
        assert ("job:fieldmesh/fieldmesh.processor", f"{store_url}/product.line-a") in edges
        # narrowed to the product: its upstream only (no lake sink, which is downstream of the topic only)
        g = client.get("/api/v1/lineage", params={"dataset": "product.line-a"}).json()
        ids = {n["id"] for n in g["nodes"]}
        assert "device:m-1" in ids and "job:fieldmesh/fieldmesh.sink.lake" not in ids
        assert client.get("/api/v1/lineage/events", params={"job": "fieldmesh.sink.lake"}).json()[0][
            "eventType"] == "FAIL"
    finally:
        client.close()
        reader.close()
        writer.close()
