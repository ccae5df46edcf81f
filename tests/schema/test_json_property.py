"""Exhaustive check: when we call two JSON Schemas compatible, every document the writer accepts, the reader
accepts (``jsonschema`` as the oracle).

Every pair of one-property object schemas over a set of property schemas (types, unions, bounds, enums,
absent), open, closed or partially open, with the property required or not, against every document of a
small universe (the property with each kind of value or absent, a stray property or not). The check is the
soundness that matters to producers: a "compatible" verdict never lets a refused document through.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import jsonschema

from fieldmesh.schema.json_schema import JsonSchemaFormat

FMT = JsonSchemaFormat()
PROPS: list[Any] = [None, {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": ["string", "null"]},
                    {"type": "integer", "minimum": 0}, {"type": "number", "maximum": 3}, {"enum": ["x", "y"]},
                    {"type": "string", "maxLength": 1}, {}]
ADDITIONAL: list[Any] = [None, False, {"type": "string"}]
VALUES: list[Any] = [-3, 0, 5, 2.5, "x", "zz", None, True]
_ABSENT = object()
DOCS = [{**({} if a is _ABSENT else {"a": a}), **({} if z is _ABSENT else {"z": z})}
        for a in [_ABSENT, *VALUES] for z in [_ABSENT, "s", 1]]


def schema(prop: Any, additional: Any, required: bool) -> dict[str, Any]:
    s: dict[str, Any] = {"type": "object", "properties": {} if prop is None else {"a": prop}}
    if required and prop is not None:
        s["required"] = ["a"]
    if additional is not None:
        s["additionalProperties"] = additional
    return s


SCHEMAS = [schema(p, a, r) for p, a, r in itertools.product(PROPS, ADDITIONAL, (False, True))
           if not (r and p is None)]


def test_compatible_means_every_writer_document_is_read() -> None:
    parsed = [(s, FMT.parse(json.dumps(s), {}), jsonschema.Draft7Validator(s)) for s in SCHEMAS]
    accepted = {id(s): [d for d in DOCS if v.is_valid(d)] for s, _, v in parsed}
    compatible = incompatible = 0
    for (rs, rp, rv), (ws, wp, _) in itertools.product(parsed, parsed):
        if FMT.incompatibilities(rp, wp):
            incompatible += 1
            continue
        compatible += 1
        for doc in accepted[id(ws)]:
            assert rv.is_valid(doc), (rs, ws, doc)
    assert compatible > 300 and incompatible > 300  # both verdicts are exercised


def test_the_oracle_sees_a_wrong_verdict() -> None:
    """A verdict that were wrong would be caught: some pair's writer accepts a document its reader refuses."""
    reader, writer = schema({"type": "integer", "minimum": 0}, None, False), schema({"type": "integer"}, None, False)
    assert FMT.incompatibilities(FMT.parse(json.dumps(reader), {}), FMT.parse(json.dumps(writer), {}))
    assert any(jsonschema.Draft7Validator(writer).is_valid(d) and not jsonschema.Draft7Validator(reader).is_valid(d)
               for d in DOCS)
