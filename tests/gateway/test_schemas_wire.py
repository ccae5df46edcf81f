"""Schemas on the wire: Avro, Protobuf and JSON payloads written against our registry, through the gateway.

The payloads are made by confluent-kafka's own serializers (``AvroSerializer``, ``JSONSerializer``,
``ProtobufSerializer``) with a ``SchemaRegistryClient`` talking to our registry's API, served by uvicorn
on a free port over a real store; the gateway fetches the schemas by id from that store. Violations and
unknown schema ids end in the DLQ with the schema id and the failing path, and are counted.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from operator import attrgetter
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.schema_registry.json_schema import JSONSerializer
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from fieldmesh.api.app import create_app
from fieldmesh.api.auth import Access
from fieldmesh.core.codec import REASONS, decode_bus_readings
from fieldmesh.core.model import DeadLetter, Reading
from fieldmesh.core.settings import GatewaySettings, load_settings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.gateway.base import IngestMessage
from fieldmesh.gateway.gateway import route
from fieldmesh.gateway.schemas import WireSchemas, registry_schemas, telemetry_of
from fieldmesh.runtime.worker import run_gateway, run_processor
from fieldmesh.schema.registry import SchemaRegistry
from fieldmesh.store.schemas import SchemaStore
from fieldmesh.store.sqlite import SqliteStore
from fmtest.procs import free_port

NOW = 1_763_812_345_000
S = GatewaySettings()

AVRO = json.dumps({"type": "record", "name": "Pump", "namespace": "fieldmesh.test", "fields": [
    {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "seq", "type": "long"},
    {"name": "temp", "type": "double"},
    {"name": "running", "type": "boolean"},
    {"name": "humidity", "type": ["null", "double"], "default": None},
    {"name": "site", "type": "string"},
]})
JSON_SCHEMA = json.dumps({
    "$schema": "http://json-schema.org/draft-07/schema#", "title": "Valve", "type": "object",
    "properties": {"ts": {"type": "integer"}, "seq": {"type": "integer", "minimum": 0},
                   "measurements": {"type": "object", "properties": {"open": {"type": "number", "maximum": 1}},
                                    "required": ["open"]}},
    "required": ["ts", "measurements"], "additionalProperties": False})


class Registry:
    """Our API on a free port (loopback, no credentials), a Confluent client of it, and the gateway's
    view of the same store."""

    def __init__(self, store_url: str) -> None:
        self.access = Access(store_url)
        self.registry = SchemaRegistry(SchemaStore(store_url))
        port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            create_app(store_url, access=self.access, schema_registry=self.registry), host="127.0.0.1", port=port,
            log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="api", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the API did not start"
            time.sleep(0.05)
        self.client = SchemaRegistryClient({"url": f"http://127.0.0.1:{port}/api/v1/registry", "max.retries": 0})
        self.opened: list[SchemaRegistry] = []
        self.store_url = store_url

    def wire(self) -> WireSchemas:
        """A fresh gateway cache over the store (nothing cached)."""

        def open_registry() -> SchemaRegistry:
            r = SchemaRegistry(SchemaStore(self.store_url))
            self.opened.append(r)
            return r

        return registry_schemas(open_registry)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.access.close()
        self.registry.close()
        for r in self.opened:
            r.close()


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    r = Registry(f"sqlite:///{tmp_path}/store.db")
    yield r
    r.close()


def pump_message_class() -> Any:
    """A Protobuf message class (as protoc would generate) with a map of measurements and a nested type."""
    fdp = descriptor_pb2.FileDescriptorProto(name=f"pump_{uuid.uuid4().hex[:6]}.proto", package="fmtest",
                                             syntax="proto3")
    m = fdp.message_type.add(name="Reading")
    entry = m.nested_type.add(name="MeasurementsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=9, label=1)
    entry.field.add(name="value", number=2, type=1, label=1)
    m.field.add(name="ts", number=1, type=3, label=1)
    m.field.add(name="seq", number=2, type=4, label=1)
    m.field.add(name="measurements", number=3, type=11, label=3, type_name=".fmtest.Reading.MeasurementsEntry")
    m.field.add(name="boot_id", number=4, type=9, label=1, proto3_optional=True, oneof_index=0)
    m.oneof_decl.add(name="_boot_id")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("fmtest.Reading"))


def msg(device: str, payload: bytes, i: int = 0, **kw: Any) -> IngestMessage:
    return IngestMessage(topic=f"devices/{device}/telemetry", payload=payload, received_ms=NOW, source_id=f"s{i}",
                         **kw)


def routed(msgs: list[IngestMessage], schemas: WireSchemas | None,
           settings: GatewaySettings = S) -> tuple[list[Reading], list[DeadLetter]]:
    records, n, dead = route(msgs, settings=settings, partitions=2, now_ms=NOW, schemas=schemas)
    readings = [r for rec in records if rec.topic == READINGS_TOPIC for r in decode_bus_readings(rec.value)]
    assert n == len(readings)
    return readings, dead


def test_telemetry_mapping_of_flat_and_batch_records() -> None:
    assert telemetry_of({"ts": 5, "seq": 1, "t": 2.5, "on": True, "site": "x", "h": None}) == {
        "ts": 5, "seq": 1, "measurements": {"t": 2.5, "on": True}, "meta": {"site": "x"}}
    assert telemetry_of({"device_id": "d", "readings": [{"ts": 1, "measurements": {"a": 1.0, "b": None}}]}) == {
        "device_id": "d", "readings": [{"ts": 1, "measurements": {"a": 1.0}}]}


def test_schema_id_headers_of_ingest_topics() -> None:
    from fieldmesh.gateway.base import schema_id_of
    from fieldmesh.gateway.ingress import _content_and_schema

    assert [schema_id_of(h) for h in (None, {}, {"schema_id": "12"}, {"Schema_ID": "7"}, {"schema_id": "x"},
                                      {"schema_id": "\u00b2"}, {"schema_id": "1" * 12})] == [
        None, None, 12, 7, -1, -1, -1]
    # a message naming a schema always has a content type (which keeps it off the bulk JSON path)
    assert _content_and_schema([{"schema_id": "3"}, {"content-type": "application/avro", "schema_id": "4"},
                                {"x": "y"}, None]) == (
        ["application/octet-stream", "application/avro", None, None], [3, 4, None, None])


def test_framed_avro_json_and_protobuf_become_readings(reg: Registry) -> None:
    ctx = SerializationContext("pumps", MessageField.VALUE)
    avro = AvroSerializer(reg.client, AVRO)({"ts": NOW - 1000, "seq": 7, "temp": 21.5, "running": True,
                                              "humidity": None, "site": "north"}, ctx)
    avro2 = AvroSerializer(reg.client, AVRO)({"ts": NOW - 900, "seq": 8, "temp": 0.0, "running": False,
                                               "humidity": 40.0, "site": "north"}, ctx)
    js = JSONSerializer(JSON_SCHEMA, reg.client)({"ts": NOW - 800, "seq": 3, "measurements": {"open": 0.25}},
                                                SerializationContext("valves", MessageField.VALUE))
    Pump = pump_message_class()
    pb = ProtobufSerializer(Pump, reg.client, {"use.deprecated.format": False})(
        Pump(ts=NOW - 700, seq=0, measurements={"rpm": 1200.0, "zero": 0.0}, boot_id="b1"),
        SerializationContext("pb", MessageField.VALUE))
    assert avro[0] == js[0] == pb[0] == 0
    readings, dead = routed([msg("p-1", avro, 0), msg("p-1", avro2, 1), msg("v-1", js, 2), msg("r-1", pb, 3)],
                            reg.wire())
    assert dead == []
    got = sorted((r.device_id, r.seq, r.ts_ms, r.measurements, r.boot_id, r.meta) for r in readings)
    ids = {"p": avro[1:5], "v": js[1:5], "r": pb[1:5]}
    sid = {k: int.from_bytes(v, "big") for k, v in ids.items()}
    assert len(set(sid.values())) == 3
    # the schema each reading was decoded with travels in its meta (canaries select schema versions by it)
    assert got == [
        ("p-1", 7, NOW - 1000, {"temp": 21.5, "running": True}, None, {"site": "north", "schema_id": sid["p"]}),
        ("p-1", 8, NOW - 900, {"temp": 0.0, "running": False, "humidity": 40.0}, None,
         {"site": "north", "schema_id": sid["p"]}),
        ("r-1", 0, NOW - 700, {"rpm": 1200.0, "zero": 0.0}, "b1", {"schema_id": sid["r"]}),
        ("v-1", 3, NOW - 800, {"open": 0.25}, None, {"schema_id": sid["v"]}),
    ]


def test_protobuf_importing_another_registered_file_and_a_well_known_type(reg: Registry) -> None:
    from google.protobuf import timestamp_pb2

    tag = uuid.uuid4().hex[:6]
    common = descriptor_pb2.FileDescriptorProto(name=f"site_{tag}.proto", package="fmtest", syntax="proto3")
    site = common.message_type.add(name="Site")
    site.field.add(name="plant", number=1, type=9, label=1)
    main = descriptor_pb2.FileDescriptorProto(name=f"pump_{tag}.proto", package="fmtest", syntax="proto3",
                                              dependency=[common.name, "google/protobuf/timestamp.proto"])
    m = main.message_type.add(name="Reading")
    m.field.add(name="ts", number=1, type=11, label=1, type_name=".google.protobuf.Timestamp")
    m.field.add(name="site", number=2, type=11, label=1, type_name=".fmtest.Site")
    m.field.add(name="flow", number=3, type=1, label=1)
    m.nested_type.add(name="Unused")
    pool = descriptor_pool.DescriptorPool()
    ts_fdp = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(ts_fdp)
    for f in (ts_fdp, common, main):
        pool.Add(f)
    Reading = message_factory.GetMessageClass(pool.FindMessageTypeByName("fmtest.Reading"))
    Site = message_factory.GetMessageClass(pool.FindMessageTypeByName("fmtest.Site"))
    r = Reading(site=Site(plant="p7"), flow=2.5)
    r.ts.FromMilliseconds(NOW - 10)
    data = ProtobufSerializer(Reading, reg.client, {"use.deprecated.format": False})(
        r, SerializationContext("flows", MessageField.VALUE))
    latest = reg.client.get_latest_version("flows-value")
    assert [r.name for r in latest.schema.references] == [common.name]  # the serializer registered the import
    readings, dead = routed([msg("fl-1", data)], reg.wire())
    assert dead == [] and [(r.ts_ms, r.measurements, r.meta) for r in readings] == [
        (NOW - 10, {"flow": 2.5}, {"site": {"plant": "p7"}, "schema_id": latest.schema_id})]


def test_a_batch_mixing_framed_and_plain_json_gives_what_routing_one_by_one_gives(reg: Registry) -> None:
    ser = AvroSerializer(reg.client, AVRO)
    ctx = SerializationContext("pumps", MessageField.VALUE)
    msgs = [msg(f"m-{i % 7}", json.dumps({"ts": NOW - i, "seq": i, "measurements": {"t": i / 4}}).encode(), i)
            if i % 10 else msg(f"m-{i % 7}", ser({"ts": NOW - i, "seq": i, "temp": i / 4, "running": True,
                                                  "site": "s"}, ctx), i)
            for i in range(60)]
    schemas = reg.wire()
    together, dead = routed(msgs, schemas)
    alone = [r for m in msgs for r in routed([m], schemas)[0]]
    assert dead == [] and len(together) == 60
    key = attrgetter("device_id", "seq", "ts_ms", "measurements", "meta")
    assert sorted(map(key, together)) == sorted(map(key, alone))
    # within each device, arrival order is kept among the plain and among the framed messages
    for d in {r.device_id for r in together}:
        seqs = [r.seq for r in together if r.device_id == d]
        assert [q for q in seqs if q % 10] == sorted(q for q in seqs if q % 10)


def test_schema_id_announced_by_user_property_with_an_unframed_body(reg: Registry) -> None:
    ctx = SerializationContext("pumps", MessageField.VALUE)
    framed = AvroSerializer(reg.client, AVRO)({"ts": NOW, "seq": 1, "temp": 1.5, "running": True, "site": "s"}, ctx)
    sid = int.from_bytes(framed[1:5], "big")
    m = msg("p-2", framed[5:], schema_id=sid, content_type="application/octet-stream")
    readings, dead = routed([m], reg.wire())
    assert dead == [] and [(r.device_id, r.seq, r.measurements) for r in readings] == [
        ("p-2", 1, {"temp": 1.5, "running": True})]


def test_violations_and_unknown_ids_are_dead_lettered_with_id_and_path(reg: Registry) -> None:
    assert "unknown_schema" in REASONS
    ctx = SerializationContext("valves", MessageField.VALUE)
    good = JSONSerializer(JSON_SCHEMA, reg.client)({"ts": NOW, "measurements": {"open": 0.5}}, ctx)
    head = good[:5]
    sid = int.from_bytes(head[1:5], "big")
    avro = AvroSerializer(reg.client, AVRO)({"ts": NOW, "seq": 1, "temp": 1.5, "running": True, "site": "s"},
                                            SerializationContext("pumps", MessageField.VALUE))
    bad = [
        head + json.dumps({"ts": NOW, "measurements": {"open": 3}}).encode(),  # over the maximum
        head + json.dumps({"ts": NOW, "seq": -1, "measurements": {"open": 0.1}}).encode(),
        head + b"{not json",
        avro[:-3],  # truncated Avro
        avro + b"\x01",  # a byte after the record
        b"\x00\x00\x0f\x42\x3f" + json.dumps({"ts": NOW}).encode(),  # id 999999: not registered
        b"\x00\x01",  # shorter than the header
        head + json.dumps({"ts": 5, "measurements": {"open": 0.5}}).encode(),  # the schema passes, the contract not
    ]
    schemas = reg.wire()
    readings, dead = routed([msg("v-9", p, i) for i, p in enumerate(bad)], schemas)
    assert readings == []
    by = [(d.reason, d.detail) for d in dead]
    assert [r for r, _ in by] == ["schema_violation"] * 5 + ["unknown_schema", "schema_violation",
                                                              "schema_violation"]
    assert by[0][1].startswith(f"schema id {sid} (JSON): at $.measurements.open: 3 is greater than the maximum")
    assert by[1][1].startswith(f"schema id {sid} (JSON): at $.seq: -1 is less than the minimum")
    assert "at $: not JSON" in by[2][1]
    assert "(AVRO): at $ (at byte" in by[3][1]
    assert "(AVRO): at $ (at byte" in by[4][1] and "1 bytes after the record" in by[4][1]
    assert by[5][1] == "schema id 999999 is not in the registry"
    assert "of 2 bytes" in by[6][1]
    assert by[7][1].startswith(f"schema id {sid} (JSON): ts 5 is before 2000-01-01")
    assert all(d.device_id == "v-9" and d.payload for d in dead)
    # the unknown id is asked once, then remembered for a while; known ids are cached for good
    fetches = schemas.fetches
    routed([msg("v-9", bad[5], 20), msg("v-9", good, 21)], schemas)
    assert schemas.fetches == fetches
    # a gateway without a registry: such payloads are unknown_schema, plain JSON unchanged
    readings, dead = routed([msg("v-9", good, 30), msg("v-9", b'{"ts": %d, "measurements": {"t": 1}}' % NOW, 31)],
                            None)
    assert [d.reason for d in dead] == ["unknown_schema"] and len(readings) == 1
    assert "reads no schema registry" in dead[0].detail


def test_topics_bound_to_a_subject_are_validated_against_its_latest_schema(reg: Registry) -> None:
    from confluent_kafka.schema_registry import Schema

    reg.client.register_schema("valves-value", Schema(JSON_SCHEMA, "JSON"))
    bound = GatewaySettings(schema_subjects={"devices/valve-*/telemetry": "valves-value",
                                             "devices/ghost-*/telemetry": "ghosts-value"})
    avro = AvroSerializer(reg.client, AVRO)({"ts": NOW, "seq": 9, "temp": 1.5, "running": True, "site": "s"},
                                            SerializationContext("pumps", MessageField.VALUE))
    plain = [msg(f"pump-{i}", json.dumps({"ts": NOW, "seq": i, "measurements": {"open": 7}}).encode(), i)
             for i in range(20)]  # not bound: the bulk path, as before
    msgs = [*plain[:10],
            msg("valve-1", json.dumps({"ts": NOW, "seq": 1, "measurements": {"open": 0.5}}).encode(), 100),
            msg("valve-1", json.dumps({"ts": NOW, "seq": 2, "measurements": {"open": 7}}).encode(), 101),
            msg("valve-2", avro, 102),  # names its own schema: that one wins
            msg("ghost-1", json.dumps({"ts": NOW, "measurements": {"open": 0.5}}).encode(), 103),
            *plain[10:]]
    readings, dead = routed(msgs, reg.wire(), bound)
    assert sorted((r.device_id, r.seq) for r in readings) == sorted(
        [(f"pump-{i}", i) for i in range(20)] + [("valve-1", 1), ("valve-2", 9)])
    assert [(d.reason, d.device_id) for d in dead] == [("schema_violation", "valve-1"), ("unknown_schema", "ghost-1")]
    sid = reg.client.get_latest_version("valves-value").schema_id
    assert dead[0].detail.startswith(f"schema id {sid} (JSON): at $.measurements.open: 7 is greater than the max")
    assert dead[1].detail == "subject 'ghosts-value' has no schema in the registry"
    # without the binding the same payload is a plain reading (the contract has no maximum)
    readings, dead = routed(msgs[11:12], reg.wire())
    assert dead == [] and [r.measurements for r in readings] == [{"open": 7.0}]


def test_any_bytes_after_a_frame_cost_only_their_message(reg: Registry) -> None:
    """Whatever follows the magic byte and a registered id, each message ends as readings or dead letters
    with a known reason; nothing raises, nothing is lost."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    Pump = pump_message_class()
    frames = [
        AvroSerializer(reg.client, AVRO)({"ts": NOW, "seq": 1, "temp": 1.0, "running": True, "site": "s"},
                                         SerializationContext("pumps", MessageField.VALUE)),
        JSONSerializer(JSON_SCHEMA, reg.client)({"ts": NOW, "measurements": {"open": 0.5}},
                                                SerializationContext("valves", MessageField.VALUE)),
        ProtobufSerializer(Pump, reg.client, {"use.deprecated.format": False})(
            Pump(ts=NOW, seq=1, measurements={"a": 1.0}), SerializationContext("pb", MessageField.VALUE)),
    ]
    schemas = reg.wire()

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(frames), st.integers(0, 40), st.binary(max_size=40),
                              st.booleans()), min_size=1, max_size=8))
    def check(items: list[tuple[bytes, int, bytes, bool]]) -> None:
        msgs = []
        for i, (frame, cut, tail, keep) in enumerate(items):
            body = frame if keep else frame[: 5 + cut] + tail
            msgs.append(msg(f"f-{i}", body, i))
        records, n, dead = route(msgs, settings=S, partitions=2, now_ms=NOW, schemas=schemas)
        assert {d.reason for d in dead} <= set(REASONS)
        assert n == sum(len(decode_bus_readings(r.value)) for r in records if r.topic == READINGS_TOPIC)
        per_device: dict[str, int] = {}
        for rec in records:
            if rec.topic == READINGS_TOPIC:
                for r in decode_bus_readings(rec.value):
                    per_device[r.device_id] = per_device.get(r.device_id, 0) + 1
        for d in dead:
            assert d.device_id is not None
            per_device[d.device_id] = per_device.get(d.device_id, 0) + 1
        assert set(per_device) == {f"f-{i}" for i in range(len(items))}  # every message accounted for
        for i, (_, _, _, keep) in enumerate(items):
            if keep:
                assert per_device[f"f-{i}"] == 1 and not any(d.device_id == f"f-{i}" for d in dead)

    check()


# ---- through a real bus: NATS subjects -> gateway -> JetStream -> processor -> store -----------------


@pytest.mark.integration
def test_framed_payloads_through_the_bus_land_in_the_store_and_the_dlq(reg: Registry, tmp_path: Path) -> None:
    from fieldmesh.runtime.natsserver import EmbeddedNats

    ctx = SerializationContext("pumps", MessageField.VALUE)
    ser = AvroSerializer(reg.client, AVRO)
    jser = JSONSerializer(JSON_SCHEMA, reg.client)
    prefix = f"sw{uuid.uuid4().hex[:6]}"
    payloads = [ser({"ts": NOW + i, "seq": i, "temp": float(i), "running": i % 2 == 0, "site": "a"}, ctx)
                for i in range(5)]
    payloads += [jser({"ts": NOW + 10 + i, "seq": 10 + i, "measurements": {"open": i / 10}},
                      SerializationContext("valves", MessageField.VALUE)) for i in range(3)]
    announced = ser({"ts": NOW + 20, "seq": 20, "temp": 20.0, "running": True, "site": "a"}, ctx)[5:]
    head = payloads[-1][:5]
    payloads += [head + b'{"ts": 1, "measurements": {}}', b"\x00\x7f\xff\xff\xfe{}", payloads[0][:8]]
    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()
    store_url = f"sqlite:///{tmp_path / 'hot.db'}"
    store = SqliteStore(store_url)
    cfg = load_settings(bus={"partitions": 2})
    try:
        async def publish() -> None:
            import nats

            nc = await nats.connect(srv.url)
            js = nc.jetstream()
            await js.add_stream(name="SW", subjects=[f"{prefix}.>"])
            for i, p in enumerate(payloads):
                await js.publish(f"{prefix}.dev-{i % 2}.tm", p)
            # unframed, the schema named by a header
            await js.publish(f"{prefix}.dev-0.tm", announced,
                             headers={"schema_id": str(int.from_bytes(payloads[0][1:5], "big"))})
            await nc.close()

        async def run() -> None:
            stop = asyncio.Event()
            ingest = f"{srv.url}/{prefix}.*.tm?stream=SW&durable=gw&device_template={prefix}.{{device}}.tm"
            tasks = [asyncio.create_task(run_gateway(bus_url=srv.url, mqtt_url=None, ingest_urls=[ingest],
                                                     settings=cfg, stop=stop, schemas_url=reg.store_url)),
                     asyncio.create_task(run_processor(bus_url=srv.url, store_url=store_url, settings=cfg, stop=stop))]
            try:
                for _ in range(900):
                    if store.stats().received >= len(payloads) + 1:
                        break
                    for t in tasks:
                        if t.done():
                            t.result()
                    await asyncio.sleep(0.1)
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 60)

        asyncio.run(publish())
        asyncio.run(run())
        st = store.stats()
        assert st.stored == 9 and st.dead_lettered == {"schema_violation": 2, "unknown_schema": 1}, st
        rows = store.dlq(reason=None, limit=100)
        details = sorted(r["detail"] for r in rows)
        assert any(d.startswith("schema id ") and "(JSON): at $.measurements: \"open\" is a required property" in d
                   for d in details), details
        assert "schema id 2147483646 is not in the registry" in details
        assert any("(AVRO): at $ (at byte" in d for d in details), details
        raw = store.raw(device_id="dev-0", metric="temp", start_ms=None, end_ms=None, limit=100)
        assert sorted(r["seq"] for r in raw) == [0, 2, 4, 20]
    finally:
        store.close()
        srv.stop()


# ---- end to end: MQTT 5 devices -> fieldmesh up (Mosquitto door) -> store --------------------------


@pytest.mark.integration
def test_mqtt5_devices_send_framed_and_announced_avro_through_fieldmesh_up(tmp_path: Path) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    from fmtest.procs import Up

    up = Up(tmp_path / "data", "--door", "mosquitto").start()
    c: Any = None
    try:
        client = SchemaRegistryClient({"url": f"http://127.0.0.1:{up.http_port}/api/v1/registry", "max.retries": 0})
        ser = AvroSerializer(client, AVRO)
        ctx = SerializationContext("pumps", MessageField.VALUE)
        now = int(time.time() * 1000)
        dev = f"e2e-{uuid.uuid4().hex[:6]}"
        framed = [ser({"ts": now - 5000 + i, "seq": i, "temp": 20.0 + i, "running": True, "site": "s"}, ctx)
                  for i in range(3)]
        sid = int.from_bytes(framed[0][1:5], "big")
        announced = ser({"ts": now - 4000, "seq": 3, "temp": 30.0, "running": False, "site": "s"}, ctx)[5:]
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=f"v5-{dev}")
        c.connect("127.0.0.1", up.mqtt_port)
        c.loop_start()
        topic = f"devices/{dev}/telemetry"
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/vnd.apache.avro+binary"
        props.UserProperty = ("schema_id", str(sid))
        bad = Properties(PacketTypes.PUBLISH)
        bad.UserProperty = ("schema_id", "424242")
        infos = [c.publish(topic, p, qos=1) for p in framed]
        infos += [c.publish(topic, announced, qos=1, properties=props),
                  c.publish(topic, framed[0][:-2], qos=1),  # truncated: a violation
                  c.publish(topic, announced, qos=1, properties=bad)]  # an id nobody registered
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()
        st = up.wait_for(lambda s: s["stored"] >= 4 and s["dead_lettered"].get("total", 0) >= 2)
        assert st["stored"] == 4 and st["dead_lettered"] == {"schema_violation": 1, "unknown_schema": 1,
                                                             "total": 2}, st
        rows = up.get(f"/telemetry/raw?device_id={dev}&limit=10")
        assert sorted((r["seq"], r["measurements"]["temp"], r["measurements"]["running"], r["meta"]) for r in rows) == [
            (0, 20.0, True, {"site": "s", "schema_id": sid}), (1, 21.0, True, {"site": "s", "schema_id": sid}),
            (2, 22.0, True, {"site": "s", "schema_id": sid}), (3, 30.0, False, {"site": "s", "schema_id": sid})], rows
        [unknown] = up.get("/dlq?reason=unknown_schema")
        assert unknown["detail"] == "schema id 424242 is not in the registry" and unknown["device_id"] == dev
        [violation] = up.get("/dlq?reason=schema_violation")
        assert violation["detail"].startswith(f"schema id {sid} (AVRO): at $ (at byte "), violation
    finally:
        if c is not None:
            c.loop_stop()
            c.disconnect()
        assert up.stop() == 0, up.tail()


@pytest.mark.integration
def test_framed_avro_through_the_default_door_of_fieldmesh_up(tmp_path: Path) -> None:
    """nats-server's MQTT listener (the default door) speaks MQTT 3.1.1: no user properties, so framing."""
    from fmtest.procs import Up, publish_all, publisher

    up = Up(tmp_path / "data").start()
    c: Any = None
    try:
        client = SchemaRegistryClient({"url": f"http://127.0.0.1:{up.http_port}/api/v1/registry", "max.retries": 0})
        ser = AvroSerializer(client, AVRO)
        ctx = SerializationContext("pumps", MessageField.VALUE)
        now = int(time.time() * 1000)
        dev = f"door-{uuid.uuid4().hex[:6]}"
        c = publisher(up.mqtt_port)
        publish_all(c, [(f"devices/{dev}/telemetry", ser(
            {"ts": now - 100 + i, "seq": i, "temp": 1.0 + i, "running": False, "site": "d"}, ctx)) for i in range(5)])
        st = up.wait_for(lambda s: s["stored"] >= 5)
        assert st["stored"] == 5 and st["dead_lettered"].get("total", 0) == 0, st
        rows = up.get(f"/telemetry/raw?device_id={dev}&limit=10")
        assert sorted((r["seq"], r["measurements"]["temp"]) for r in rows) == [(i, 1.0 + i) for i in range(5)]
    finally:
        if c is not None:
            c.loop_stop()
            c.disconnect()
        assert up.stop() == 0, up.tail()
