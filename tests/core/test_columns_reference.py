"""Readings to columns (``ReadingColumns.from_readings`` / ``from_fields``, and decoding v1 bus records into
columns) equal a plain per-reading reference implementation for any batch.

The fast path reads each field with a C iterator; the reference below builds every column with a loop, one
reading at a time, the obvious way. Batches hold any NaN-free float (subnormals, -0.0, +-1.8e308), bools,
unicode device, boot and metric ids, empty measurements, every optional field present or absent.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.core.batch import ReadingColumns, _json_texts
from fieldmesh.core.codec import decode_bus_columns, decode_bus_columns_many, encode_bus_batch
from fieldmesh.core.model import BusBatch, Reading

_json = msgspec.json.Encoder()
I64 = st.integers(-(2**63), 2**63 - 1)
ids = st.text(min_size=0, max_size=6)  # any unicode, the empty string too
value = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.booleans())
json_leaf = st.one_of(st.none(), st.booleans(), I64, st.text(max_size=4),
                      st.floats(allow_nan=False, allow_infinity=False))
doc = st.dictionaries(st.text(max_size=4), st.recursive(json_leaf, lambda c: st.lists(c, max_size=3), max_leaves=4),
                      max_size=3)
reading = st.builds(
    Reading,
    device_id=st.sampled_from(["d1", "pompe-é", "设备", ""]) | ids,
    ts_ms=I64,
    measurements=st.dictionaries(st.sampled_from(["t", "h", "温度", "a.b_c-d"]) | ids, value, max_size=4),
    key=st.integers(0, 2**63 - 1),
    chk=I64,
    seq=st.none() | st.integers(0, 2**63 - 1),
    boot_id=st.none() | st.sampled_from(["b1", "", "é"]) | ids,
    event_id=st.none() | st.text(min_size=1, max_size=6),
    meta=st.none() | doc,
    received_ms=I64,
    enrichment=st.none() | doc,
)
batches = st.lists(reading, max_size=30)


def reference(readings: list[Reading]) -> dict[str, Any]:
    """Every column of ``readings``, built reading by reading (dictionaries in order of first appearance)."""
    devices: dict[str, int] = {}
    boots: dict[str, int] = {}
    metrics: dict[str, int] = {}
    cols: dict[str, list[Any]] = {k: [] for k in (
        "device", "ts_ms", "received_ms", "key", "chk", "seq", "boot", "event_id", "meta", "enrichment",
        "measurements_json", "m_row", "m_metric", "m_value")}
    for i, r in enumerate(readings):
        cols["device"].append(devices.setdefault(r.device_id, len(devices)))
        cols["ts_ms"].append(r.ts_ms)
        cols["received_ms"].append(r.received_ms)
        cols["key"].append(r.key)
        cols["chk"].append(r.chk)
        cols["seq"].append(-1 if r.seq is None else r.seq)
        cols["boot"].append(-1 if r.boot_id is None else boots.setdefault(r.boot_id, len(boots)))
        cols["event_id"].append(r.event_id)
        cols["meta"].append(r.meta)
        cols["enrichment"].append(r.enrichment)
        cols["measurements_json"].append(_json.encode(r.measurements).decode())
        for name, v in r.measurements.items():
            cols["m_row"].append(i)
            cols["m_metric"].append(metrics.setdefault(name, len(metrics)))
            cols["m_value"].append(1.0 if v is True else 0.0 if v is False else v)
    for name in ("event_id", "meta", "enrichment"):
        if all(v is None for v in cols[name]):
            cols[name] = None  # type: ignore[assignment]
    return {"devices": tuple(devices), "boots": tuple(boots), "metrics": tuple(metrics), **cols}


def assert_equal(got: ReadingColumns, want: dict[str, Any]) -> None:
    dtypes = {"device": np.int32, "ts_ms": np.int64, "received_ms": np.int64, "key": np.int64, "chk": np.int64,
              "seq": np.int64, "boot": np.int32, "m_row": np.int32, "m_metric": np.int32, "m_value": np.float64}
    for name in ("devices", "boots", "metrics"):
        assert getattr(got, name) == want[name], name
    for name, dtype in dtypes.items():
        col = getattr(got, name)
        assert col.dtype == dtype, name
        # bit for bit: -0.0 is not 0.0, a bool's 1.0 is 1.0
        assert col.tobytes() == np.array(want[name], dtype=dtype).tobytes(), name
    for name in ("event_id", "meta", "enrichment", "measurements_json"):
        col = getattr(got, name)
        assert (None if col is None else col.tolist()) == want[name], name
        if col is not None:
            assert col.dtype == object and col.ndim == 1, name


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches)
def test_from_readings_equals_the_reference(readings: list[Reading]) -> None:
    assert_equal(ReadingColumns.from_readings(readings), reference(readings))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches)
def test_from_fields_equals_from_readings(readings: list[Reading]) -> None:
    fields = [list(map(lambda r, n=name: getattr(r, n), readings)) for name in Reading.__struct_fields__]
    assert_equal(ReadingColumns.from_fields(*fields), reference(readings))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(batches, max_size=5))
def test_v1_records_decode_into_the_reference_columns(records: list[list[Reading]]) -> None:
    values = [encode_bus_batch(BusBatch(readings=rs, produced_ms=1)) for rs in records]
    for rs, v in zip(records, values, strict=True):
        assert_equal(decode_bus_columns(v), reference(rs))
    cols, rows, errors = decode_bus_columns_many(values)
    assert not errors and rows == [len(rs) for rs in records]
    assert_equal(cols, reference([r for rs in records for r in rs]))


# keys that hold what the one-encode split of measurements_json splits at, or what it splits with
tricky_key = st.sampled_from(["},{", "}\x1e{", "\x1e", "a},{b", "}", "{", ","]) | ids
json_objects = st.lists(st.dictionaries(tricky_key, value | doc, max_size=3), max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_objects)
def test_measurements_json_is_each_objects_own_encoding(objects: list[dict[str, Any]]) -> None:
    assert _json_texts(objects) == [_json.encode(o).decode() for o in objects]


def test_measurements_json_split_falls_back_when_a_key_holds_the_boundary() -> None:
    objects = [{"a},{b": 1.0}, {"c": 2.0}]
    # the list's own text has three boundaries for two objects: each object is encoded on its own
    assert _json.encode(objects).decode().count("},{") == 2
    assert _json_texts(objects) == ['{"a},{b":1.0}', '{"c":2.0}']
