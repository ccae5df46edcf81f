"""The schema registry's REST API with Confluent's own client and serializers, end to end.

The API is served by uvicorn on a free port over a real store (SQLite, and PostgreSQL in a schema of
its own); ``confluent_kafka.schema_registry.SchemaRegistryClient`` talks to
``http://127.0.0.1:<port>/api/v1/registry`` with an API key sent as HTTP Basic
(``basic.auth.user.info``), exactly as it would talk to Confluent's registry. Authentication is
required (not local-only mode).
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.json_schema import JSONDeserializer, JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

from fieldmesh.api.app import create_app
from fieldmesh.api.auth import Access
from fieldmesh.schema.registry import SchemaRegistry
from fieldmesh.store.access import AccessStore
from fieldmesh.store.schemas import SchemaStore
from fmtest.procs import free_port

CT = "application/vnd.schemaregistry.v1+json"


class Server:
    """The API on a free port; ``url`` is the registry's base URL; keys of each role."""

    def __init__(self, store_url: str) -> None:
        keys = AccessStore(store_url)
        self.keys = {role: keys.create_key(role=role, actor="test")[1] for role in ("viewer", "operator", "admin")}
        keys.close()
        self.access = Access(store_url, local_only=False)
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
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/api/v1/registry"

    def client(self, role: str = "operator", *, style: str = "id") -> SchemaRegistryClient:
        """A Confluent client with a key of ``role`` as HTTP Basic: user = key id, password = secret
        (``style="id"``) or any user and the whole key as the password (``style="whole"``)."""
        key = self.keys[role]
        _, key_id, secret = key.split("_", 2)
        info = f"{key_id}:{secret}" if style == "id" else f"key:{key}"
        return SchemaRegistryClient({"url": self.url, "basic.auth.user.info": info, "max.retries": 0})

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.access.close()
        self.registry.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def srv(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/store.db"
    else:
        url = f"{request.getfixturevalue('pg_url')}?schema=sr_{secrets.token_hex(5)}"
    s = Server(url)
    yield s
    s.close()


def record(*fields: tuple[str, Any] | tuple[str, Any, Any], name: str = "Reading") -> str:
    out = []
    for f in fields:
        d: dict[str, Any] = {"name": f[0], "type": f[1]}
        if len(f) == 3:
            d["default"] = f[2]
        out.append(d)
    return json.dumps({"type": "record", "name": name, "namespace": "fieldmesh.test", "fields": out})


def code(exc: pytest.ExceptionInfo[SchemaRegistryError]) -> tuple[int, int]:
    return exc.value.http_status_code, exc.value.error_code


V1 = record(("device", "string"), ("value", "double"))
V2 = record(("device", "string"), ("value", "double"), ("unit", "string", "C"))


def test_avro_serializers_end_to_end(srv: Server) -> None:
    ctx = SerializationContext("pumps", MessageField.VALUE)
    c = srv.client(style="id")
    ser = AvroSerializer(c, V1)  # auto-registers under pumps-value (TopicNameStrategy)
    data = ser({"device": "p-1", "value": 21.5}, ctx)
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") >= 1
    # a fresh client (nothing cached) deserializes by the id in the frame
    reader = srv.client("viewer", style="whole")
    assert AvroDeserializer(reader)(data, ctx) == {"device": "p-1", "value": 21.5}
    # evolve: a field with a default is BACKWARD-compatible; old data read with the new schema gets it
    data2 = AvroSerializer(c, V2)({"device": "p-1", "value": 1.0, "unit": "K"}, ctx)
    assert data2[1:5] != data[1:5]
    assert c.get_versions("pumps-value") == [1, 2]
    assert AvroDeserializer(reader, V2)(data, ctx) == {"device": "p-1", "value": 21.5, "unit": "C"}
    # an incompatible change is refused with 409
    with pytest.raises(SchemaRegistryError) as e:
        AvroSerializer(c, record(("device", "string"), ("value", "string")))({"device": "x", "value": "y"}, ctx)
    assert code(e) == (409, 409) and "TYPE_MISMATCH" in e.value.error_message
    # lookups as the serializer does them without auto-registration
    fixed = AvroSerializer(c, V1, conf={"auto.register.schemas": False})
    assert fixed({"device": "p-2", "value": 2.0}, ctx)[1:5] == data[1:5]
    latest = AvroSerializer(c, None, conf={"auto.register.schemas": False, "use.latest.version": True})
    assert latest({"device": "p-2", "value": 2.0, "unit": "F"}, ctx)[1:5] == data2[1:5]
    reg = c.get_latest_version("pumps-value")
    assert reg.version == 2 and json.loads(reg.schema.schema_str) == json.loads(V2)
    assert c.get_schema(reg.schema_id).schema_str == reg.schema.schema_str


def test_json_serializers_end_to_end(srv: Server) -> None:
    ctx = SerializationContext("valves", MessageField.VALUE)
    c = srv.client()
    v1 = json.dumps({"$schema": "http://json-schema.org/draft-07/schema#", "title": "Valve", "type": "object",
                     "properties": {"device": {"type": "string"}, "open": {"type": "number"}},
                     "required": ["device"], "additionalProperties": False})
    data = JSONSerializer(v1, c)({"device": "v-1", "open": 0.5}, ctx)
    assert JSONDeserializer(None, schema_registry_client=srv.client("viewer"))(data, ctx) == {
        "device": "v-1", "open": 0.5}
    # a closed content model may gain an optional property (Confluent's rule), not narrow a type
    v2 = v1.replace('"open": {"type": "number"}', '"open": {"type": "number"}, "note": {"type": "string"}')
    JSONSerializer(v2, c)({"device": "v-1", "note": "ok"}, ctx)
    with pytest.raises(SchemaRegistryError) as e:
        JSONSerializer(v1.replace('"number"', '"integer"'), c)({"device": "v-1", "open": 1}, ctx)
    assert code(e) == (409, 409)
    assert c.get_latest_version("valves-value").schema.schema_type == "JSON"


def _proto_message(fields: list[tuple[str, int, int]]) -> Any:
    """A message class ``fmtest.Tick`` compiled at run time (type numbers of FieldDescriptorProto)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="fmtest/tick.proto", package="fmtest", syntax="proto3")
    msg = fdp.message_type.add(name="Tick")
    for name, number, type_ in fields:
        msg.field.add(name=name, number=number, type=type_, label=1)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("fmtest.Tick"))


def test_protobuf_serializer_end_to_end(srv: Server) -> None:
    from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer, ProtobufSerializer

    ctx = SerializationContext("ticks", MessageField.VALUE)
    c = srv.client()
    tick = _proto_message([("device", 1, 9), ("value", 2, 1)])  # string, double
    conf = {"use.deprecated.format": False}
    data = ProtobufSerializer(tick, c, conf)(tick(device="d-1", value=2.5), ctx)
    got = ProtobufDeserializer(tick, conf, schema_registry_client=srv.client("viewer"))(data, ctx)
    assert (got.device, got.value) == ("d-1", 2.5)
    assert c.get_latest_version("ticks-value").schema.schema_type == "PROTOBUF"
    # a new optional field is compatible; a field whose wire type changes is refused
    ProtobufSerializer(_proto_message([("device", 1, 9), ("value", 2, 1), ("seq", 3, 3)]), c, conf)
    wider = _proto_message([("device", 1, 9), ("value", 2, 1), ("seq", 3, 3)])
    ProtobufSerializer(wider, c, conf)(wider(device="d", value=1.0, seq=4), ctx)
    assert c.get_versions("ticks-value") == [1, 2]
    changed = _proto_message([("device", 1, 9), ("value", 2, 9)])  # double -> string
    with pytest.raises(SchemaRegistryError) as e:
        ProtobufSerializer(changed, c, conf)(changed(device="d", value="x"), ctx)
    assert code(e) == (409, 409) and "FIELD_KIND_CHANGED" in e.value.error_message


def test_protobuf_registered_as_text_serves_python_deserializers(srv: Server) -> None:
    """A .proto text (as Java producers register it) is served as a descriptor to confluent-kafka's Python
    deserializer (format=serialized), with a reference to another subject and a well-known import."""
    from confluent_kafka.schema_registry import SchemaReference
    from confluent_kafka.schema_registry.protobuf import ProtobufDeserializer, ProtobufSerializer

    c = srv.client()
    unit = 'syntax = "proto3"; package fm.units; enum Unit { UNIT_UNSPECIFIED = 0; CELSIUS = 1; }'
    c.register_schema("fm-units", Schema(unit, "PROTOBUF"))
    text = """syntax = "proto3";
package fm.text;
import "fm/units.proto";
import "google/protobuf/timestamp.proto";
message Reading {
  string device = 1;
  optional double value = 2;
  fm.units.Unit unit = 3;
  google.protobuf.Timestamp at = 4;
  map<string, string> tags = 5;
}
"""
    ref = SchemaReference("fm/units.proto", "fm-units", 1)
    sid = c.register_schema("readings-value", Schema(text, "PROTOBUF", [ref]))
    assert c.get_schema(sid).schema_str.startswith("syntax")  # as registered
    r = httpx.get(f"{srv.url}/schemas/ids/{sid}", params={"format": "serialized"},
                  headers={"X-API-Key": srv.keys["viewer"]})
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

    fdp = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(r.json()["schema"]))
    assert [f.name for f in fdp.message_type[0].field] == ["device", "value", "unit", "at", "tags"]
    # a producer with the same messages (compiled here from the served descriptors), using the latest version
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    units = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(httpx.get(
        f"{srv.url}/subjects/fm-units/versions/1", params={"format": "serialized"},
        headers={"X-API-Key": srv.keys["viewer"]}).json()["schema"]))
    units.name = "fm/units.proto"
    pool.Add(units)
    fdp.name = "fm/reading.proto"
    pool.Add(fdp)
    reading = message_factory.GetMessageClass(pool.FindMessageTypeByName("fm.text.Reading"))
    ctx = SerializationContext("readings", MessageField.VALUE)
    conf = {"use.deprecated.format": False, "auto.register.schemas": False, "use.latest.version": True}
    msg = reading(device="d-9", value=0.0, unit=1)
    msg.at.seconds = 7
    msg.tags["site"] = "p1"
    data = ProtobufSerializer(reading, c, conf)(msg, ctx)
    assert int.from_bytes(data[1:5], "big") == sid
    got = ProtobufDeserializer(reading, {"use.deprecated.format": False},
                               schema_registry_client=srv.client("viewer"))(data, ctx)
    assert got.device == "d-9" and got.HasField("value") and got.unit == 1 and got.at.seconds == 7
    assert dict(got.tags) == {"site": "p1"}


# (level, a compatible next schema, an incompatible one): v1 = device, value
LEVEL_CASES = [
    ("BACKWARD", V2, record(("device", "string"), ("value", "double"), ("unit", "string"))),
    ("FORWARD", record(("device", "string"), ("value", "double"), ("unit", "string")), record(("device", "string"))),
    ("FULL", V2, record(("device", "string"), ("value", "double"), ("unit", "string"))),
    ("NONE", record(("other", "bytes")), None),
]


@pytest.mark.parametrize(("level", "good", "bad"), LEVEL_CASES, ids=[c[0] for c in LEVEL_CASES])
def test_each_level(srv: Server, level: str, good: str, bad: str | None) -> None:
    c = srv.client()
    subject = f"lv-{level.lower()}-value"
    c.register_schema(subject, Schema(V1, "AVRO"))
    assert c.set_compatibility(subject, level) == {"compatibility": level}
    assert c.get_compatibility(subject) == level
    if bad is not None:
        assert c.test_compatibility(subject, Schema(bad, "AVRO")) is False
        with pytest.raises(SchemaRegistryError) as e:
            c.register_schema(subject, Schema(bad, "AVRO"))
        assert code(e) == (409, 409)
    assert c.test_compatibility(subject, Schema(good, "AVRO")) is True
    assert c.register_schema_full_response(subject, Schema(good, "AVRO")).version == 2


@pytest.mark.parametrize("level", ["BACKWARD_TRANSITIVE", "FORWARD_TRANSITIVE", "FULL_TRANSITIVE"])
def test_transitive_levels(srv: Server, level: str) -> None:
    c = srv.client()
    s = "tr-value"
    c.set_compatibility(s, "NONE")
    a = record(("a", "int"), ("x", "int"))
    b = record(("a", "int"), ("x", "int", 0), ("y", "int", 0))
    c.register_schema(s, Schema(a, "AVRO"))
    c.register_schema(s, Schema(b, "AVRO"))
    # c3 is fine against the latest (b) in the non-transitive level, not against a
    c3 = {"BACKWARD_TRANSITIVE": record(("a", "int"), ("y", "int")),
          "FORWARD_TRANSITIVE": record(("a", "int")),
          "FULL_TRANSITIVE": record(("a", "int"), ("y", "int", 0))}[level]
    c.set_compatibility(s, level.removesuffix("_TRANSITIVE"))
    assert c.test_compatibility(s, Schema(c3, "AVRO")) is True
    c.set_compatibility(s, level)
    assert c.test_compatibility_all_versions(s, Schema(c3, "AVRO")) is False
    with pytest.raises(SchemaRegistryError) as e:
        c.register_schema(s, Schema(c3, "AVRO"))
    assert code(e) == (409, 409)
    r = httpx.post(f"{srv.url}/compatibility/subjects/{s}/versions?verbose=true", json={"schema": c3},
                   headers={"X-API-Key": srv.keys["viewer"]})
    body = r.json()
    assert r.headers["content-type"] == CT and body["is_compatible"] is False
    assert any("version 1" in m for m in body["messages"]), body


def test_delete_semantics_and_listing(srv: Server) -> None:
    c = srv.client()
    s = "del-value"
    id1 = c.register_schema(s, Schema(V1, "AVRO"))
    c.register_schema(s, Schema(V2, "AVRO"))
    assert c.get_subjects() == [s] and c.get_versions(s) == [1, 2]
    assert c.delete_version(s, 1) == 1
    with pytest.raises(SchemaRegistryError) as e:
        c.delete_version(s, 1)
    assert code(e) == (404, 40406)
    assert c.get_versions(s) == [2] and c.get_versions(s, deleted=True) == [1, 2]
    assert c.get_version(s, 1, deleted=True).version == 1
    fresh = srv.client("viewer")
    with pytest.raises(SchemaRegistryError) as e:
        fresh.get_version(s, 1)
    assert code(e) == (404, 40402)
    assert fresh.get_schema(id1).schema_str  # soft-deleted: deserializers still read the id
    with pytest.raises(SchemaRegistryError) as e:
        c.delete_subject(s, permanent=True)
    assert code(e) == (404, 40405)
    assert c.delete_subject(s) == [2]
    with pytest.raises(SchemaRegistryError) as e:
        c.delete_subject(s)
    assert code(e) == (404, 40404)
    assert c.get_subjects() == [] and c.get_subjects(deleted=True) == [s]
    with pytest.raises(SchemaRegistryError) as e:
        fresh.get_versions(s)
    assert code(e) == (404, 40401)
    assert c.delete_subject(s, permanent=True) == [1, 2]
    assert c.get_subjects(deleted=True) == []
    with pytest.raises(SchemaRegistryError) as e:
        srv.client("viewer").get_schema(id1)
    assert code(e) == (404, 40403)
    # registered again: the same id, version 1
    again = c.register_schema_full_response(s, Schema(V1, "AVRO"))
    assert (again.schema_id, again.version) == (id1, 1)


def test_config_per_subject_and_global(srv: Server) -> None:
    c = srv.client("admin")
    assert c.get_compatibility() == "BACKWARD"
    with pytest.raises(SchemaRegistryError) as e:
        c.get_compatibility("cfg-value")
    assert code(e) == (404, 40408)
    c.set_compatibility("cfg-value", "FULL_TRANSITIVE")
    assert c.get_config("cfg-value").compatibility_level.value == "FULL_TRANSITIVE"
    c.set_compatibility(level="FORWARD")
    assert c.get_compatibility() == "FORWARD" and c.get_compatibility("cfg-value") == "FULL_TRANSITIVE"
    assert c.delete_config("cfg-value").compatibility_level.value == "FULL_TRANSITIVE"
    r = httpx.get(f"{srv.url}/config/cfg-value?defaultToGlobal=true", headers={"X-API-Key": srv.keys["viewer"]})
    assert r.json() == {"compatibilityLevel": "FORWARD"}
    with pytest.raises(SchemaRegistryError) as e:
        c.set_compatibility("cfg-value", "SIDEWAYS")
    assert code(e) == (422, 42203)
    assert c.get_global_mode() == "READWRITE"
    assert c.update_mode("cfg-value", "READONLY") == "READONLY"
    with pytest.raises(SchemaRegistryError) as e:
        c.register_schema("cfg-value", Schema(V1, "AVRO"))
    assert code(e) == (422, 42205)
    assert c.delete_mode("cfg-value") == "READONLY"
    assert c.register_schema("cfg-value", Schema(V1, "AVRO")) >= 1


def test_errors_content_type_and_references(srv: Server) -> None:
    c = srv.client()
    h = {"X-API-Key": srv.keys["operator"], "Content-Type": CT}
    r = httpx.post(f"{srv.url}/subjects/bad-value/versions", headers=h, content=json.dumps({"schema": "{nope"}))
    assert r.status_code == 422 and r.headers["content-type"] == CT and r.json()["error_code"] == 42201
    r = httpx.post(f"{srv.url}/subjects/bad-value/versions", headers=h, content=json.dumps({
        "schema": V1, "schemaType": "XML"}))
    assert r.json()["error_code"] == 42201
    r = httpx.get(f"{srv.url}/subjects/none/versions/abc", headers=h)
    assert (r.status_code, r.json()["error_code"]) == (422, 42202)
    r = httpx.get(f"{srv.url}/subjects/none/versions/1", headers=h)
    assert (r.status_code, r.json()["error_code"]) == (404, 40401)
    # the newer fields (metadata, ruleSet) that broke other registries are accepted and kept
    meta = {"properties": {"owner": "plant-1"}}
    rules = {"domainRules": [{"name": "r", "kind": "CONDITION", "mode": "WRITE", "type": "CEL", "expr": "true"}]}
    r = httpx.post(f"{srv.url}/subjects/meta-value/versions?normalize=true", headers=h, content=json.dumps({
        "schema": V1, "schemaType": "AVRO", "references": [], "metadata": meta, "ruleSet": rules}))
    assert r.status_code == 200, r.text
    got = c.get_latest_with_metadata("meta-value", {"owner": "plant-1"})
    assert got.version == 1 and got.schema.metadata is not None
    with pytest.raises(SchemaRegistryError) as e:
        c.get_latest_with_metadata("meta-value", {"owner": "plant-2"})
    assert code(e) == (404, 40402)
    # references: an Avro type defined in another subject
    point = json.dumps({"type": "record", "name": "Point", "namespace": "geo", "fields": [
        {"name": "x", "type": "double"}]})
    c.register_schema("point", Schema(point, "AVRO"))
    from confluent_kafka.schema_registry import SchemaReference

    shape = json.dumps({"type": "record", "name": "Shape", "fields": [{"name": "at", "type": "geo.Point"}]})
    sid = c.register_schema("shape-value", Schema(shape, "AVRO", [SchemaReference("geo.Point", "point", 1)]))
    assert c.get_referenced_by("point", 1) == [sid]
    # the serializers resolve the reference through the registry too (named schemas)
    ctx = SerializationContext("shape", MessageField.VALUE)
    data = AvroSerializer(c, None, conf={"auto.register.schemas": False, "use.latest.version": True,
                                         "subject.name.strategy": lambda *_: "shape-value"})({"at": {"x": 1.5}}, ctx)
    assert int.from_bytes(data[1:5], "big") == sid
    assert AvroDeserializer(srv.client("viewer"))(data, ctx) == {"at": {"x": 1.5}}
    assert [r.name for r in c.get_schema(sid).references] == ["geo.Point"]
    with pytest.raises(SchemaRegistryError) as e:
        c.delete_version("point", 1)
    assert code(e) == (422, 42206)
    assert c.get_schema_types() == ["AVRO", "JSON", "PROTOBUF"]
    assert c.get_subjects_by_schema_id(sid) == ["shape-value"]
    assert [(v.subject, v.version) for v in c.get_schema_versions(sid)] == [("shape-value", 1)]


def test_credentials_and_roles(srv: Server) -> None:
    with pytest.raises(SchemaRegistryError) as e:
        SchemaRegistryClient({"url": srv.url, "max.retries": 0}).get_subjects()
    assert code(e) == (401, 40101)
    bad = SchemaRegistryClient({"url": srv.url, "basic.auth.user.info": "0123456789ab:nope", "max.retries": 0})
    with pytest.raises(SchemaRegistryError) as e:
        bad.get_subjects()
    assert code(e) == (401, 40101)
    viewer = srv.client("viewer")
    assert viewer.get_subjects() == []
    bearer = SchemaRegistryClient({"url": srv.url, "bearer.auth.credentials.source": "STATIC_TOKEN",
                                   "bearer.auth.token": srv.keys["viewer"], "bearer.auth.logical.cluster": "any"})
    assert bearer.get_subjects() == []
    with pytest.raises(SchemaRegistryError) as e:
        viewer.register_schema("x-value", Schema(V1, "AVRO"))
    assert code(e) == (403, 40301)
    with pytest.raises(SchemaRegistryError) as e:
        srv.client("operator").set_compatibility(level="NONE")  # the global level needs an admin
    assert code(e) == (403, 40301)


@pytest.mark.integration
def test_two_api_replicas_share_one_registry(pg_url: str) -> None:
    """Two API processes' worth of servers over one PostgreSQL store: clients of both race to register the
    same schema (one id, one version) and read each other's registrations at once."""
    url = f"{pg_url}?schema=sr_{secrets.token_hex(5)}"
    a, b = Server(url), Server(url)
    try:
        clients = [s.client() for s in (a, b) for _ in range(3)]
        barrier = threading.Barrier(len(clients))
        ids: list[int] = []
        errors: list[BaseException] = []

        def run(c: SchemaRegistryClient) -> None:
            try:
                barrier.wait(30)
                ids.append(c.register_schema("shared-value", Schema(V1, "AVRO")))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors and len(ids) == 6 and len(set(ids)) == 1, (ids, errors)
        assert b.client("viewer").get_versions("shared-value") == [1]
        sid = a.client().register_schema("shared-value", Schema(V2, "AVRO"))
        assert b.client("viewer").get_latest_version("shared-value").schema_id == sid
        b.client().set_compatibility("shared-value", "NONE")
        assert a.client("viewer").get_compatibility("shared-value") == "NONE"
    finally:
        a.close()
        b.close()
