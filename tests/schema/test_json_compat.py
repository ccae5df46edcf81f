"""JSON Schema compatibility as Confluent defines it (the "JSON Schema compatibility rules" of its docs).

Each case is (reader, writer): the reader (for BACKWARD the new schema) must accept every document the
writer (the old one) accepts. Each case carries a witness document the writer accepts; ``jsonschema`` is
the oracle: for an incompatible case the reader must refuse the witness (the reason is real), for a
compatible one it must accept it.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from fieldmesh.schema.base import InvalidSchema
from fieldmesh.schema.json_schema import JsonSchemaFormat

FMT = JsonSchemaFormat()


def obj(props: dict[str, Any], *, required: list[str] | None = None, additional: Any = None) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        s["required"] = required
    if additional is not None:
        s["additionalProperties"] = additional
    return s


S, INT, N = {"type": "string"}, {"type": "integer"}, {"type": "number"}

# (id, reader, writer, compatible, reason kind, a document the writer accepts)
CASES: list[tuple[str, Any, Any, bool, str, Any]] = [
    ("property added to an open content model", obj({"a": S, "b": INT}), obj({"a": S}), False,
     "PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL", {"a": "x", "b": "not an int"}),
    ("optional property added to a closed content model", obj({"a": S, "b": INT}, additional=False),
     obj({"a": S}, additional=False), True, "", {"a": "x"}),
    ("required property added to a closed content model", obj({"a": S, "b": INT}, required=["b"], additional=False),
     obj({"a": S}, additional=False), False, "REQUIRED_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL", {"a": "x"}),
    ("property removed from an open content model", obj({"a": S}), obj({"a": S, "b": INT}), True, "",
     {"a": "x", "b": 1}),
    ("property removed from a closed content model", obj({"a": S}, additional=False),
     obj({"a": S, "b": INT}, additional=False), False, "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
     {"a": "x", "b": 1}),
    ("property added, covered by a partially open model", obj({"a": S, "b": S}, additional=S),
     obj({"a": S}, additional=S), True, "", {"a": "x", "b": "y"}),
    ("property added, not covered by a partially open model", obj({"a": S, "b": INT}, additional=S),
     obj({"a": S}, additional=S), False, "TYPE_CHANGED", {"a": "x", "b": "y"}),
    ("property removed into a partially open model that covers it", obj({"a": S}, additional=INT),
     obj({"a": S, "b": INT}, additional=INT), True, "", {"a": "x", "b": 2}),
    ("additional properties closed", obj({"a": S}, additional=False), obj({"a": S}), False,
     "ADDITIONAL_PROPERTIES_REMOVED", {"a": "x", "z": 1}),
    ("additional properties opened", obj({"a": S}), obj({"a": S}, additional=False), True, "", {"a": "x"}),
    ("required attribute added", obj({"a": S}, required=["a"]), obj({"a": S}), False, "REQUIRED_ATTRIBUTE_ADDED",
     {}),
    ("required attribute removed", obj({"a": S}), obj({"a": S}, required=["a"]), True, "", {"a": "x"}),
    ("type extended integer -> number", N, INT, True, "", 3),
    ("type narrowed number -> integer", INT, N, False, "TYPE_CHANGED", 1.5),
    ("type changed string -> integer", INT, S, False, "TYPE_CHANGED", "x"),
    ("type union extended", {"type": ["string", "null"]}, S, True, "", "x"),
    ("type union narrowed", S, {"type": ["string", "null"]}, False, "TYPE_NARROWED", None),
    ("type added where there was none", S, {}, False, "TYPE_NARROWED", 5),
    ("enum extended", {"enum": ["a", "b", "c"]}, {"enum": ["a", "b"]}, True, "", "b"),
    ("enum narrowed", {"enum": ["a"]}, {"enum": ["a", "b"]}, False, "ENUM_ARRAY_NARROWED", "b"),
    ("maxLength increased", {**S, "maxLength": 10}, {**S, "maxLength": 5}, True, "", "abcde"),
    ("maxLength decreased", {**S, "maxLength": 3}, {**S, "maxLength": 5}, False, "MAX_LENGTH_DECREASED", "abcde"),
    ("maxLength added", {**S, "maxLength": 3}, S, False, "MAX_LENGTH_ADDED", "abcde"),
    ("minLength increased", {**S, "minLength": 3}, {**S, "minLength": 1}, False, "MIN_LENGTH_INCREASED", "a"),
    ("pattern added", {**S, "pattern": "^a"}, S, False, "PATTERN_ADDED", "b"),
    ("pattern removed", S, {**S, "pattern": "^a"}, True, "", "a"),
    ("minimum increased", {**N, "minimum": 5}, {**N, "minimum": 0}, False, "MINIMUM_INCREASED", 1),
    ("minimum decreased", {**N, "minimum": 0}, {**N, "minimum": 5}, True, "", 6),
    ("maximum decreased", {**N, "maximum": 5}, {**N, "maximum": 10}, False, "MAXIMUM_DECREASED", 7),
    ("exclusiveMaximum added", {**N, "exclusiveMaximum": 10}, {**N, "maximum": 10}, False, "MAXIMUM_DECREASED", 10),
    ("multipleOf changed to a divisor", {**INT, "multipleOf": 2}, {**INT, "multipleOf": 4}, True, "", 8),
    ("multipleOf changed to a non-divisor", {**INT, "multipleOf": 3}, {**INT, "multipleOf": 2}, False,
     "MULTIPLE_OF_CHANGED", 4),
    ("array items type changed", {"type": "array", "items": S}, {"type": "array", "items": INT}, False,
     "TYPE_CHANGED", [1]),
    ("array items type extended", {"type": "array", "items": N}, {"type": "array", "items": INT}, True, "", [1]),
    ("maxItems added", {"type": "array", "maxItems": 1}, {"type": "array"}, False, "MAX_ITEMS_ADDED", [1, 2]),
    ("uniqueItems added", {"type": "array", "uniqueItems": True}, {"type": "array"}, False, "UNIQUE_ITEMS_ADDED",
     [1, 1]),
    ("oneOf branch added", {"oneOf": [S, INT, {"type": "boolean"}]}, {"oneOf": [S, INT]}, True, "", 1),
    ("oneOf branch removed", {"oneOf": [S]}, {"oneOf": [S, INT]}, False, "COMBINED_TYPE_SUBSCHEMAS_CHANGED", 1),
    ("anyOf read by a wider type", N, {"anyOf": [INT, {**N, "minimum": 0}]}, True, "", 2.5),
    ("nested property type changed", obj({"n": obj({"x": INT})}), obj({"n": obj({"x": N})}), False, "TYPE_CHANGED",
     {"n": {"x": 1.5}}),
    ("local $ref to a definition that widens", {"definitions": {"v": N}, **obj({"a": {"$ref": "#/definitions/v"}})},
     {"definitions": {"v": INT}, **obj({"a": {"$ref": "#/definitions/v"}})}, True, "", {"a": 3}),
    ("local $ref to a definition that narrows", {"$defs": {"v": INT}, **obj({"a": {"$ref": "#/$defs/v"}})},
     obj({"a": N}), False, "TYPE_CHANGED", {"a": 1.5}),
    ("reader true accepts anything", True, obj({"a": S}), True, "", {"a": "x"}),
    ("reader false accepts nothing", False, obj({"a": S}), False, "SCHEMA_NARROWED", {"a": "x"}),
    ("allOf in the reader", {"allOf": [obj({"a": S}), {"required": ["a"]}]}, obj({"a": S}, required=["a"]), True, "",
     {"a": "x"}),
]


@pytest.mark.parametrize(("reader", "writer", "compatible", "kind", "witness"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_confluent_rules(reader: Any, writer: Any, compatible: bool, kind: str, witness: Any) -> None:
    r, w = FMT.parse(json.dumps(reader), {}), FMT.parse(json.dumps(writer), {})
    reasons = FMT.incompatibilities(r, w)
    assert (not reasons) == compatible, reasons
    if not compatible:
        assert any(x.startswith(kind) for x in reasons), reasons
    # the oracle: the writer accepts the witness, the reader accepts it exactly when compatible
    assert jsonschema.Draft7Validator(writer).is_valid(witness)
    assert jsonschema.Draft7Validator(reader).is_valid(witness) == compatible


def test_a_schema_is_compatible_with_itself() -> None:
    for _, reader, writer, *_ in CASES:
        for s in (reader, writer):
            p = FMT.parse(json.dumps(s), {})
            assert FMT.incompatibilities(p, p) == [], s


def test_named_references_are_followed() -> None:
    ref = json.dumps({"type": "object", "properties": {"x": {"type": "integer"}}})
    wider = json.dumps({"type": "object", "properties": {"x": {"type": "number"}}})
    main = json.dumps({"type": "object", "properties": {"p": {"$ref": "point.json"}}})
    new = FMT.parse(main, {"point.json": wider})
    old = FMT.parse(main, {"point.json": ref})
    assert FMT.incompatibilities(new, old) == []
    assert FMT.incompatibilities(old, new)[0].startswith("TYPE_CHANGED")


def test_invalid_schemas_are_refused() -> None:
    for bad in ("not json", "[1]", '{"type": "strnig"}', '{"properties": {"a": {"minLength": -1}}}'):
        with pytest.raises(InvalidSchema):
            FMT.parse(bad, {})
