"""The registry over the real hot store (SQLite and PostgreSQL): ids, versions, concurrency, deletes, references.

Replicas are separate :class:`SchemaStore` instances (separate connections), as separate API
processes would be; they race on purpose.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fieldmesh.schema.base import (
    IncompatibleSchema,
    InvalidSchema,
    ReferenceExists,
    SchemaNotFound,
    SubjectNotFound,
    SubjectNotSoftDeleted,
    SubjectSoftDeleted,
    VersionNotFound,
    VersionNotSoftDeleted,
    VersionSoftDeleted,
)
from fieldmesh.schema.registry import SchemaRegistry
from fieldmesh.store.access import AccessStore
from fieldmesh.store.schemas import SchemaStore


def avro(*fields: tuple[str, Any] | tuple[str, Any, Any], name: str = "Reading") -> str:
    out = []
    for fl in fields:
        d: dict[str, Any] = {"name": fl[0], "type": fl[1]}
        if len(fl) == 3:
            d["default"] = fl[2]
        out.append(d)
    return json.dumps({"type": "record", "name": name, "fields": out})


V1 = avro(("device", "string"), ("value", "int"))


@pytest.fixture
def replicas(registry_url: str) -> Iterator[Callable[[], SchemaRegistry]]:
    """``replicas()``: a registry over a new connection to the same store (closed at the end)."""
    made: list[SchemaRegistry] = []

    def make() -> SchemaRegistry:
        made.append(SchemaRegistry(SchemaStore(registry_url)))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_ids_are_global_stable_and_never_reused(replicas: Callable[[], SchemaRegistry]) -> None:
    reg = replicas()
    a = reg.register("a-value", V1)
    b = reg.register("b-value", json.dumps(json.loads(V1), indent=2))  # the same schema, laid out otherwise
    assert (a.schema_id, a.version) == (b.schema_id, 1)
    v2 = reg.register("a-value", avro(("device", "string"), ("value", "long")))
    assert v2.schema_id > a.schema_id and v2.version == 2
    assert reg.register("a-value", V1).version == 1  # already there: its version, no new one
    # permanently deleted, then registered again: the same id (ids belong to schemas, not versions)
    reg.delete_subject("b-value")
    reg.delete_subject("b-value", permanent=True)
    reg.delete_version("a-value", 1)
    reg.delete_version("a-value", 1, permanent=True)
    with pytest.raises(SchemaNotFound):
        reg.schema(a.schema_id)
    assert reg.register("c-value", V1).schema_id == a.schema_id
    v3 = reg.register("c-value", avro(("device", "string"), ("value", "int"), ("unit", "string", "C")))
    assert v3.schema_id > v2.schema_id
    # another replica sees all of it
    other = replicas()
    assert other.schema(v3.schema_id).schema == v3.schema
    assert other.subjects() == ["a-value", "c-value"]


def test_concurrent_registrations_of_one_schema_give_one_id_and_version(
        replicas: Callable[[], SchemaRegistry]) -> None:
    regs = [replicas() for _ in range(6)]
    barrier = threading.Barrier(len(regs))
    got: list[Any] = []
    errors: list[BaseException] = []

    def run(reg: SchemaRegistry, subject: str) -> None:
        try:
            barrier.wait(30)
            got.append(reg.register(subject, V1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r, "race-value" if i % 2 else "race2-value"))
               for i, r in enumerate(regs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(got) == 6 and {g.schema_id for g in got} == {got[0].schema_id}
    assert {(g.subject, g.version) for g in got} == {("race-value", 1), ("race2-value", 1)}
    assert regs[0].versions("race-value") == [1] and regs[0].versions("race2-value") == [1]


def test_two_replicas_cannot_both_pass_against_the_same_latest(replicas: Callable[[], SchemaRegistry]) -> None:
    """Each candidate is BACKWARD-compatible with v1, but not with the other: one must lose."""
    first = replicas()
    first.register("evo-value", V1)
    x = avro(("device", "string"), ("value", "int"), ("extra", "int", 0))
    y = avro(("device", "string"), ("value", "int"), ("extra", "string", ""))
    regs = [replicas(), replicas()]
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def run(reg: SchemaRegistry, schema: str) -> None:
        barrier.wait(30)
        try:
            reg.register("evo-value", schema)
            outcomes.append("ok")
        except IncompatibleSchema as exc:
            assert any("TYPE_MISMATCH" in r for r in exc.reasons), exc.reasons
            outcomes.append("refused")

    threads = [threading.Thread(target=run, args=(r, s)) for r, s in zip(regs, (x, y), strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["ok", "refused"]
    assert first.versions("evo-value") == [1, 2]


@pytest.mark.parametrize(("level", "new", "ok"), [
    ("BACKWARD", avro(("device", "string"), ("value", "int"), ("unit", "string", "C")), True),
    ("BACKWARD", avro(("device", "string"), ("value", "int"), ("unit", "string")), False),
    ("FORWARD", avro(("device", "string"), ("value", "int"), ("unit", "string")), True),
    ("FORWARD", avro(("device", "string")), False),
    ("FULL", avro(("device", "string"), ("value", "int"), ("unit", "string", "C")), True),
    ("FULL", avro(("device", "string"), ("value", "long")), False),
    ("NONE", avro(("other", "bytes")), True),
])
def test_levels(replicas: Callable[[], SchemaRegistry], level: str, new: str, ok: bool) -> None:
    reg = replicas()
    reg.register("lv-value", V1)
    reg.set_config("lv-value", level)
    assert (reg.check("lv-value", new) == []) == ok
    if ok:
        assert reg.register("lv-value", new).version == 2
    else:
        with pytest.raises(IncompatibleSchema):
            reg.register("lv-value", new)


def test_transitive_levels_check_every_live_version(replicas: Callable[[], SchemaRegistry]) -> None:
    reg = replicas()
    reg.set_config(None, "NONE")
    reg.register("t-value", avro(("a", "int")))
    reg.register("t-value", avro(("a", "int"), ("b", "int", 0)))
    # b without a default: BACKWARD-compatible with v2 (it has b), not with v1 (which lacks b)
    new = avro(("a", "int"), ("b", "int"))
    reg.set_config("t-value", "BACKWARD")
    assert reg.check("t-value", new) == []
    reg.set_config("t-value", "BACKWARD_TRANSITIVE")
    reasons = reg.check("t-value", new, version=None)
    assert any("version 1" in r for r in reasons), reasons
    with pytest.raises(IncompatibleSchema):
        reg.register("t-value", new)
    reg.delete_version("t-value", 1)  # a soft-deleted version no longer counts
    assert reg.register("t-value", new).version == 3


def test_delete_rules(replicas: Callable[[], SchemaRegistry], registry_url: str) -> None:
    reg = replicas()
    v1 = reg.register("d-value", V1)
    reg.register("d-value", avro(("device", "string"), ("value", "int"), ("u", "string", "")))
    with pytest.raises(VersionNotSoftDeleted):
        reg.delete_version("d-value", 1, permanent=True)
    assert reg.delete_version("d-value", 1) == 1
    with pytest.raises(VersionSoftDeleted):
        reg.delete_version("d-value", 1)
    assert reg.versions("d-value") == [2] and reg.versions("d-value", deleted=True) == [1, 2]
    with pytest.raises(VersionNotFound):
        reg.version("d-value", 1)
    assert reg.version("d-value", 1, deleted=True).deleted
    assert reg.schema(v1.schema_id).schema == v1.schema  # soft-deleted: its id still reads (deserializers)
    with pytest.raises(SubjectNotSoftDeleted):
        reg.delete_subject("d-value", permanent=True)
    assert reg.delete_subject("d-value") == [2]
    with pytest.raises(SubjectSoftDeleted):
        reg.delete_subject("d-value")
    assert reg.subjects() == [] and reg.subjects(deleted=True) == ["d-value"]
    assert reg.subjects(deleted_only=True) == ["d-value"]
    with pytest.raises(SubjectNotFound):
        reg.versions("d-value")
    assert reg.delete_subject("d-value", permanent=True) == [1, 2]
    with pytest.raises(SubjectNotFound):
        reg.delete_subject("d-value", permanent=True)
    assert reg.subjects(deleted=True) == []
    # the audit log has each change, written with it
    keys = AccessStore(registry_url)
    try:
        actions = [(e.action, e.target) for e in keys.audit_log(limit=20)]
    finally:
        keys.close()
    assert actions[:3] == [("schema.delete", "d-value")] * 3 and ("schema.register", "d-value") in actions


def test_references(replicas: Callable[[], SchemaRegistry]) -> None:
    reg = replicas()
    point = json.dumps({"type": "record", "name": "Point", "namespace": "geo", "fields": [
        {"name": "x", "type": "double"}, {"name": "y", "type": "double"}]})
    p = reg.register("point", point)
    refs = [{"name": "geo.Point", "subject": "point", "version": -1}]
    shape = json.dumps({"type": "record", "name": "Shape", "fields": [{"name": "at", "type": "geo.Point"}]})
    s = reg.register("shape-value", shape, references=refs)
    assert [r.as_dict() for r in s.references] == [{"name": "geo.Point", "subject": "point", "version": 1}]
    assert reg.referenced_by("point", 1) == [s.schema_id]
    assert reg.lookup("shape-value", shape, references=refs).schema_id == s.schema_id
    with pytest.raises(ReferenceExists):
        reg.delete_version("point", 1)
    with pytest.raises(InvalidSchema):
        reg.register("shape2-value", shape)  # geo.Point unknown without the reference
    with pytest.raises(InvalidSchema):
        reg.register("shape2-value", shape, references=[{"name": "geo.Point", "subject": "point", "version": 9}])
    reg.delete_subject("shape-value")
    assert reg.referenced_by("point", 1) == []
    assert reg.delete_version("point", 1) == 1 and p.version == 1


def test_json_and_protobuf_registration(replicas: Callable[[], SchemaRegistry]) -> None:
    reg = replicas()
    js = json.dumps({"type": "object", "properties": {"t": {"type": "number"}}, "additionalProperties": False})
    v = reg.register("j-value", js, schema_type="JSON")
    assert v.schema_type == "JSON" and reg.lookup("j-value", js, schema_type="JSON").version == 1
    wider = json.dumps({"type": "object", "properties": {"t": {"type": "number"}, "u": {"type": "string"}},
                        "additionalProperties": False})
    assert reg.register("j-value", wider, schema_type="JSON").version == 2
    with pytest.raises(IncompatibleSchema):
        reg.register("j-value", js.replace('"number"', '"integer"'), schema_type="JSON")
    with pytest.raises(IncompatibleSchema):  # a subject holds one type
        reg.register("j-value", V1)
    proto = 'syntax = "proto3"; package t; message R { string id = 1; double v = 2; }'
    assert reg.register("p-value", proto, schema_type="PROTOBUF").version == 1
    with pytest.raises(IncompatibleSchema):
        reg.register("p-value", proto.replace("double v", "string v"), schema_type="PROTOBUF")
    assert reg.register("p-value", proto.replace("}", "int64 n = 3; }"), schema_type="PROTOBUF").version == 2
