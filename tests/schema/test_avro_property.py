"""Property test: our Avro compatibility verdict against fastavro's schema resolution, on generated schemas.

For random pairs of record schemas (fields drawn from a few names, primitive and union types, with or
without defaults) and random data of the writer: when we say the reader reads the writer, fastavro reads
every datum, giving each field its promoted value or its default; when we say it does not and no union is
involved, fastavro refuses the datum.
"""

from __future__ import annotations

import io
import json
from typing import Any

import fastavro
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.schema.avro import AvroFormat

FMT = AvroFormat()
TYPES: list[Any] = ["int", "long", "float", "double", "string", "bytes", "boolean", ["null", "int"],
                    ["null", "string"], ["int", "string"]]
DEFAULTS = {"int": 1, "long": 2, "float": 0.5, "double": 1.5, "string": "s", "bytes": "b", "boolean": True}


def _default(t: Any) -> Any:
    return None if isinstance(t, list) and t[0] == "null" else DEFAULTS[t[0] if isinstance(t, list) else t]


@st.composite
def records(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from("abcd"), min_size=1, max_size=4, unique=True))
    fields = []
    for n in names:
        t = draw(st.sampled_from(TYPES))
        f: dict[str, Any] = {"name": n, "type": t}
        if draw(st.booleans()):
            f["default"] = _default(t)
        fields.append(f)
    return {"type": "record", "name": "R", "fields": fields}


def values(t: Any) -> st.SearchStrategy[Any]:
    """Data of Avro type ``t`` (bytes are UTF-8 text: the specification's bytes -> string promotion
    assumes it, and fastavro refuses other bytes read as a string)."""
    if isinstance(t, list):
        return st.one_of([values(b) for b in t])
    return {"null": st.none(), "int": st.integers(-(2**31), 2**31 - 1), "long": st.integers(-(2**40), 2**40),
            "float": st.floats(-1e6, 1e6, width=32), "double": st.floats(-1e6, 1e6),
            "string": st.text(max_size=5), "bytes": st.text(max_size=5).map(str.encode), "boolean": st.booleans()}[t]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(writer=records(), reader=records(), data=st.data())
def test_verdict_matches_fastavro(writer: dict[str, Any], reader: dict[str, Any], data: st.DataObject) -> None:
    reasons = FMT.incompatibilities(FMT.parse(json.dumps(reader), {}), FMT.parse(json.dumps(writer), {}))
    datum = {f["name"]: data.draw(values(f["type"])) for f in writer["fields"]}
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(writer), datum)
    buf.seek(0)
    try:
        got = fastavro.schemaless_reader(buf, fastavro.parse_schema(writer), fastavro.parse_schema(reader))
        error = None
    except Exception as exc:
        got, error = None, exc
    if not reasons:
        assert error is None, (reader, writer, datum, error)
        wnames = {f["name"] for f in writer["fields"]}
        for f in reader["fields"]:
            assert f["name"] in got
            if f["name"] not in wnames:
                default = f["default"]  # a bytes default is written as a JSON string; fastavro may keep it so
                assert got[f["name"]] in (default, default.encode() if isinstance(default, str) else default)
    elif not any(isinstance(f["type"], list) for f in reader["fields"] + writer["fields"]):
        assert error is not None, (reader, writer, datum, reasons)
