"""Avro compatibility against the Avro specification's schema resolution rules.

Each case is (reader, writer): whether data written with the writer schema can be read with the reader
schema, and the kind of reason given when not. The cases follow the specification's "Schema Resolution"
section one rule at a time, and the examples of Confluent's "Schema Evolution and Compatibility" page.
fastavro's own reader is the oracle where it applies: a datum written with the writer is read with the
reader (``fastavro.schemaless_reader(..., reader_schema)``) and must succeed exactly when we say compatible.
"""

from __future__ import annotations

import io
import json
from typing import Any

import fastavro
import pytest

from fieldmesh.schema.avro import AvroFormat
from fieldmesh.schema.base import InvalidSchema

FMT = AvroFormat()


def rec(*fields: dict[str, Any], name: str = "R", **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "fields": list(fields), **extra}


def f(name: str, type_: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, **extra}


ENUM_AB = {"type": "enum", "name": "E", "symbols": ["A", "B"]}
ENUM_ABC = {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]}

# (id, reader, writer, compatible, reason kind, a datum of the writer)
CASES: list[tuple[str, Any, Any, bool, str, Any]] = [
    ("same primitive", "int", "int", True, "", 1),
    ("int promoted to long", "long", "int", True, "", 7),
    ("int promoted to float", "float", "int", True, "", 7),
    ("int promoted to double", "double", "int", True, "", 7),
    ("long promoted to float", "float", "long", True, "", 7),
    ("long promoted to double", "double", "long", True, "", 7),
    ("float promoted to double", "double", "float", True, "", 1.5),
    ("string read as bytes", "bytes", "string", True, "", "x"),
    ("bytes read as string", "string", "bytes", True, "", b"x"),
    ("long not demoted to int", "int", "long", False, "TYPE_MISMATCH", 7),
    ("double not demoted to float", "float", "double", False, "TYPE_MISMATCH", 1.5),
    ("int is not a string", "string", "int", False, "TYPE_MISMATCH", 1),
    ("field added with a default", rec(f("a", "int"), f("b", "string", default="x")), rec(f("a", "int")),
     True, "", {"a": 1}),
    ("field added without a default", rec(f("a", "int"), f("b", "string")), rec(f("a", "int")),
     False, "READER_FIELD_MISSING_DEFAULT_VALUE", {"a": 1}),
    ("field removed (writer's extra field skipped)", rec(f("a", "int")), rec(f("a", "int"), f("b", "string")),
     True, "", {"a": 1, "b": "x"}),
    ("field type promoted", rec(f("a", "long")), rec(f("a", "int")), True, "", {"a": 1}),
    ("field type changed", rec(f("a", "string")), rec(f("a", "int")), False, "TYPE_MISMATCH", {"a": 1}),
    ("field renamed with an alias", rec(f("b", "int", aliases=["a"])), rec(f("a", "int")), True, "", {"a": 1}),
    ("field renamed without an alias", rec(f("b", "int")), rec(f("a", "int")), False,
     "READER_FIELD_MISSING_DEFAULT_VALUE", {"a": 1}),
    ("record renamed", rec(f("a", "int"), name="S"), rec(f("a", "int")), False, "NAME_MISMATCH", {"a": 1}),
    ("record renamed with an alias", rec(f("a", "int"), name="S", aliases=["R"]), rec(f("a", "int")), True, "",
     {"a": 1}),
    ("enum symbol added", ENUM_ABC, ENUM_AB, True, "", "B"),
    ("enum symbol removed", ENUM_AB, ENUM_ABC, False, "MISSING_ENUM_SYMBOLS", "C"),
    ("enum symbol removed, reader default", {**ENUM_AB, "default": "A"}, ENUM_ABC, True, "", "C"),
    ("fixed same size", {"type": "fixed", "name": "F", "size": 4}, {"type": "fixed", "name": "F", "size": 4},
     True, "", b"abcd"),
    ("fixed size changed", {"type": "fixed", "name": "F", "size": 8}, {"type": "fixed", "name": "F", "size": 4},
     False, "FIXED_SIZE_MISMATCH", b"abcd"),
    ("array items promoted", {"type": "array", "items": "long"}, {"type": "array", "items": "int"}, True, "", [1]),
    ("array items changed", {"type": "array", "items": "string"}, {"type": "array", "items": "int"}, False,
     "TYPE_MISMATCH", [1]),
    ("map values promoted", {"type": "map", "values": "double"}, {"type": "map", "values": "float"}, True, "",
     {"k": 1.0}),
    ("map values changed", {"type": "map", "values": "int"}, {"type": "map", "values": "string"}, False,
     "TYPE_MISMATCH", {"k": "v"}),
    ("writer non-union read by a union with its type", ["null", "int"], "int", True, "", 3),
    ("writer non-union read by a union that promotes it", ["null", "long"], "int", True, "", 3),
    ("writer non-union and a union without it", ["null", "string"], "int", False, "MISSING_UNION_BRANCH", 3),
    ("union branch added", ["null", "int", "string"], ["null", "int"], True, "", None),
    ("union branch removed", ["null", "int"], ["null", "int", "string"], False, "MISSING_UNION_BRANCH", "x"),
    ("writer union read by a non-union covering all", "long", ["int", "long"], True, "", 1),
    ("writer union read by a non-union missing a branch", "long", ["null", "long"], False, "TYPE_MISMATCH", None),
    ("nested record field added without default",
     rec(f("n", rec(f("x", "int"), f("y", "int"), name="N"))), rec(f("n", rec(f("x", "int"), name="N"))),
     False, "READER_FIELD_MISSING_DEFAULT_VALUE", {"n": {"x": 1}}),
    ("nested record in an array evolves with a default",
     rec(f("l", {"type": "array", "items": rec(f("x", "int"), f("y", "int", default=0), name="N")})),
     rec(f("l", {"type": "array", "items": rec(f("x", "int"), name="N")})), True, "", {"l": [{"x": 1}]}),
    ("optional field added with a null default (Confluent's example)",
     rec(f("a", "int"), f("b", ["null", "string"], default=None)), rec(f("a", "int")), True, "", {"a": 1}),
    ("logical types resolve as their underlying type", {"type": "long", "logicalType": "timestamp-millis"},
     {"type": "int", "logicalType": "date"}, True, "", 1),
    ("recursive record",
     rec(f("v", "int"), f("next", ["null", "R"], default=None), f("w", "int", default=0)),
     rec(f("v", "int"), f("next", ["null", "R"], default=None)), True, "", {"v": 1, "next": {"v": 2, "next": None}}),
]


def _parse(schema: Any) -> Any:
    return FMT.parse(json.dumps(schema), {})


@pytest.mark.parametrize(("reader", "writer", "compatible", "kind", "datum"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_resolution_rules(reader: Any, writer: Any, compatible: bool, kind: str, datum: Any) -> None:
    reasons = FMT.incompatibilities(_parse(reader), _parse(writer))
    assert (not reasons) == compatible, reasons
    if not compatible:
        assert any(r.startswith(kind) for r in reasons), reasons
    # the oracle: fastavro resolves the datum exactly when we call the schemas compatible
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(writer), datum)
    if compatible:
        buf.seek(0)
        fastavro.schemaless_reader(buf, fastavro.parse_schema(writer), fastavro.parse_schema(reader))


def test_fastavro_refuses_what_we_call_incompatible() -> None:
    """For the incompatible cases fastavro can resolve at all, it refuses them too (the oracle's other side)."""
    refused = 0
    for name, reader, writer, compatible, _, datum in CASES:
        if compatible:
            continue
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, fastavro.parse_schema(writer), datum)
        buf.seek(0)
        try:
            fastavro.schemaless_reader(buf, fastavro.parse_schema(writer), fastavro.parse_schema(reader))
        except Exception:
            refused += 1
        else:
            # a union whose written branch happens to be readable: fastavro reads this datum, not every one
            assert "union" in name or "alias" in name, name
    assert refused >= 10


def test_invalid_schemas_are_refused() -> None:
    for bad in ('{"type": "record", "name": "R"}', '{"type": "nope"}', "not json", '{"type": "enum", "name": "E"}',
                '{"type":"record","name":"R","fields":[{"name":"a","type":"Missing"}]}'):
        with pytest.raises(InvalidSchema):
            FMT.parse(bad, {})


def test_canonical_text_ignores_layout() -> None:
    a = FMT.parse('{"type": "record", "name": "R",\n "fields": [{"name": "a", "type": "int"}]}', {})
    b = FMT.parse('{"type":"record","name":"R","fields":[{"name":"a","type":"int"}]}', {})
    assert a.canonical() == b.canonical()
    c = FMT.parse('{"name":"R","type":"record","fields":[{"type":"int","name":"a"}]}', {})
    assert c.canonical() != a.canonical() and c.canonical(normalize=True) == a.canonical(normalize=True)


def test_references_define_named_types() -> None:
    ref = json.dumps({"type": "record", "name": "Point", "namespace": "geo", "fields": [f("x", "double")]})
    s = FMT.parse(json.dumps(rec(f("p", "geo.Point"))), {"geo.Point": ref})
    assert "geo.Point" in s.named
    with pytest.raises(InvalidSchema):
        FMT.parse(json.dumps(rec(f("p", "geo.Point"))), {})
