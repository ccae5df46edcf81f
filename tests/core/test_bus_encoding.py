"""The bus encodings between gateway and processor: v1 (msgpack readings) and v2 (columns, 0xc1 0x02).

Any batch of valid readings survives v2 field by field (measurement order and bool/float types
included, as the stores write them); v1 records still decode; a record of an unknown version or a
corrupt v2 record is a ``msgspec.DecodeError`` that says what is wrong.
"""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.core.batch import ReadingColumns
from fieldmesh.core.codec import (
    BUS_V2_MAGIC,
    decode_bus_batch,
    decode_bus_columns,
    decode_bus_columns_many,
    decode_bus_readings,
    decode_telemetry,
    encode_bus_batch,
    encode_bus_columns,
)
from fieldmesh.core.model import BusBatch, Reading

NOW = 1_763_812_345_123
_json = msgspec.json.Encoder()

values = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),  # any magnitude: subnormals, -0.0, +-1.8e308
    st.booleans(),
    st.integers(-(2**53), 2**53),
)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=5),
                      st.floats(allow_nan=False, allow_infinity=False))
meta = st.dictionaries(st.text(max_size=5), st.recursive(json_leaf, lambda c: st.lists(c, max_size=3), max_leaves=5),
                       max_size=3)
reading = st.fixed_dictionaries(
    {"ts": st.integers(NOW - 10 * 86_400_000, NOW),
     "measurements": st.dictionaries(st.sampled_from(["t", "h", "v", "on", "a.b_c-d"]), values, min_size=1,
                                     max_size=5)},
    optional={"seq": st.integers(0, 2**63 - 1), "boot_id": st.sampled_from(["", "b1", "b2", "é"]),
              "event_id": st.text(min_size=1, max_size=8), "meta": meta},
)
sent = st.lists(st.tuples(st.sampled_from(["d1", "d-2", "pump_3"]), reading), max_size=40)


def _readings(items: list[tuple[str, dict]]) -> list[Reading]:
    out = []
    for i, (dev, r) in enumerate(items):
        res = decode_telemetry(json.dumps(r).encode(), device_id=dev, topic=f"devices/{dev}/telemetry",
                               received_ms=NOW + i)
        assert not res.rejects, res.rejects
        out.extend(res.readings)
    return out


def _same(a: list[Reading], b: list[Reading]) -> None:
    assert a == b
    # equal dicts may differ in order or type (1.0 == True): compare what the stores would write
    assert [_json.encode(r) for r in a] == [_json.encode(r) for r in b]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=sent, enrich=st.booleans())
def test_v2_round_trip_any_batch(items, enrich):
    readings = _readings(items)
    if enrich and readings:  # enrichment (joined CDC state) travels too
        readings[0] = msgspec.structs.replace(readings[0], enrichment={"site": "north", "n": 1})
    cols = ReadingColumns.from_readings(readings)
    data = encode_bus_columns(cols, produced_ms=NOW)
    assert data.startswith(BUS_V2_MAGIC)
    _same(decode_bus_readings(data), readings)
    back = decode_bus_columns(data)
    assert len(back) == len(readings)
    for name in ("devices", "boots", "metrics"):
        assert getattr(back, name) == getattr(cols, name)
    for name in ("device", "ts_ms", "received_ms", "key", "chk", "seq", "boot", "m_row", "m_metric", "m_value"):
        np.testing.assert_array_equal(getattr(back, name), getattr(cols, name), err_msg=name)
    assert back.measurements_json.tolist() == [_json.encode(r.measurements).decode() for r in readings]
    # the long format: one entry per reading and metric, bools as 0/1
    assert [(back.m_row[i], back.metrics[back.m_metric[i]], back.m_value[i]) for i in range(len(back.m_row))] == [
        (i, k, float(v)) for i, r in enumerate(readings) for k, v in r.measurements.items()]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=sent, data=st.data())
def test_take_and_concat_keep_every_field(items, data):
    readings = _readings(items)
    cols = ReadingColumns.from_readings(readings)
    rows = data.draw(st.permutations(range(len(readings))))
    k = data.draw(st.integers(0, len(rows)))
    picked = rows[:k]
    _same(cols.take(np.array(picked, dtype=np.intp)).to_readings(), [readings[i] for i in picked])
    cut = data.draw(st.integers(0, len(readings)))
    parts = [ReadingColumns.from_readings(readings[:cut]), ReadingColumns.from_readings(readings[cut:])]
    joined = ReadingColumns.concat(parts)
    _same(joined.to_readings(), readings)
    _same(decode_bus_readings(encode_bus_columns(joined)), readings)


def test_v1_records_still_decode():
    readings = _readings([("d1", {"ts": NOW - 5, "seq": 1, "measurements": {"t": 1.5, "on": True}}),
                          ("d-2", {"ts": NOW - 9, "event_id": "e", "meta": {"k": [1]}, "measurements": {"h": 2}})])
    v1 = encode_bus_batch(BusBatch(readings=readings, produced_ms=NOW))
    assert v1[:1] != b"\xc1"
    _same(decode_bus_readings(v1), readings)
    _same(decode_bus_columns(v1).to_readings(), readings)
    _same(decode_bus_batch(v1).readings, readings)


def test_v1_records_of_older_gateways_decode():
    """v1 as older gateways wrote it, built without today's structs: readings as arrays (also without the later
    ``enrichment`` field), then ``produced_ms``."""
    fields = ["d1", NOW - 5, {"t": 0.5, "on": True}, 12345, -678, 7, "b", None, {"k": [1]}, NOW]
    for row, batch_tail in ((fields, [NOW]), ([*fields, {"site": "n"}], [NOW]), (fields, [])):
        data = msgspec.msgpack.encode([[row], *batch_tail])
        (r,) = decode_bus_readings(data)
        assert (r.device_id, r.ts_ms, r.measurements, r.key, r.chk, r.seq, r.boot_id, r.event_id, r.meta,
                r.received_ms) == tuple(fields)
        assert r.enrichment == (row[10] if len(row) > 10 else None)
        assert type(r.measurements["on"]) is bool
        _same(decode_bus_columns(data).to_readings(), [r])


def test_an_older_processor_refuses_v2_instead_of_misreading_it():
    """Processors before v2 decode with ``decode_bus_batch`` only: 0xc1 is never valid msgpack, so they fail
    loudly (and dead-letter the record) rather than store wrong readings: hence processors upgrade first."""
    (r,) = _readings([("d1", {"ts": NOW - 5, "measurements": {"t": 0.5}})])
    with pytest.raises(msgspec.DecodeError, match="invalid opcode"):
        decode_bus_batch(encode_bus_columns(ReadingColumns.from_readings([r])))


def test_v2_wire_format_is_stable():
    """A v2 record written by this version, byte for byte: processors of later versions must read it."""
    (r,) = _readings([("d1", {"ts": NOW - 5, "seq": 7, "boot_id": "b", "measurements": {"t": 0.5, "on": False}})])
    data = encode_bus_columns(ReadingColumns.from_readings([r]), produced_ms=NOW)
    body = msgspec.msgpack.decode(data[2:])
    assert data[:2] == b"\xc1\x02"
    assert body == [
        NOW, ["d1"], b"\0" * 4, (NOW - 5).to_bytes(8, "little"), NOW.to_bytes(8, "little"),
        r.key.to_bytes(8, "little"), r.chk.to_bytes(8, "little", signed=True), (7).to_bytes(8, "little"), ["b"],
        b"\0" * 4, None, None, None, ['{"t":0.5,"on":false}'], ["t", "on"], bytes(4) + (0).to_bytes(4, "little"),
        bytes(4) + (1).to_bytes(4, "little"), np.array([0.5, 0.0], "<f8").tobytes(),
    ]


@pytest.mark.parametrize("data", [b"\xc1\x03" + BUS_V2_MAGIC[2:] + b"\x90", b"\xc1\xff", b"\xc1"])
def test_an_unknown_version_is_a_clear_error(data):
    for decode in (decode_bus_readings, decode_bus_columns):
        with pytest.raises(msgspec.DecodeError, match=r"bus record encoding version .* is not known.*reads versions 1"
                                                      r" and 2"):
            decode(data)


def _v2_body() -> list:
    (r,) = _readings([("d1", {"ts": NOW - 5, "seq": 7, "boot_id": "b", "measurements": {"t": 0.5}})])
    return msgspec.msgpack.decode(encode_bus_columns(ReadingColumns.from_readings([r]))[2:])


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        (3, b"\0" * 7, "column ts_ms has 7 bytes, expected 8"),
        (2, (5).to_bytes(4, "little"), "column device has codes outside its dictionary of 1"),
        (9, (-2).to_bytes(4, "little", signed=True), "column boot has codes outside"),
        (15, (1).to_bytes(4, "little"), "column m_row has codes outside"),
        (17, np.array([np.inf]).tobytes(), "not finite"),
        (13, [], "bus record v2"),
        (10, ["a", "b"], "column event_id has 2 rows, expected 1"),
    ],
)
def test_a_corrupt_v2_record_is_a_decode_error(field, value, match):
    body = _v2_body()
    body[field] = value
    with pytest.raises(msgspec.DecodeError, match=match):
        decode_bus_readings(BUS_V2_MAGIC + msgspec.msgpack.encode(body))


def _two_rows(m_row: list[int]) -> bytes:
    rs = _readings([("d1", {"ts": NOW - 5, "measurements": {"t": 0.5}}), ("d1", {"ts": NOW, "measurements": {"t": 1}})])
    body = msgspec.msgpack.decode(encode_bus_columns(ReadingColumns.from_readings(rs))[2:])
    body[15] = np.array(m_row, "<i4").tobytes()
    return BUS_V2_MAGIC + msgspec.msgpack.encode(body)


def test_v2_measurement_rows_must_be_grouped_in_order():
    assert len(decode_bus_readings(_two_rows([0, 1]))) == 2
    for bad in ([1, 0], [0, 0], [1, 1]):
        with pytest.raises(msgspec.DecodeError, match="not each reading's, in order"):
            decode_bus_columns(_two_rows(bad))


def test_a_truncated_v2_record_is_a_decode_error():
    data = encode_bus_columns(ReadingColumns.from_readings(_readings([("d1", {"ts": NOW, "measurements": {"t": 1}})])))
    for cut in (2, 3, len(data) // 2, len(data) - 1):
        with pytest.raises(msgspec.DecodeError):
            decode_bus_readings(data[:cut])


@pytest.mark.parametrize("rows", [
    ['{"t": 0.5', '{"t": 1}'],  # not JSON
    ['["t", 0.5]', '{"t": 1}'],  # not an object
    ['{"t": "hot"}', '{"t": 1}'],  # not a number
    ['{"a": [1', '2]}'],  # each row broken, though the two joined are one valid object
    ['{"a": 1} {"b": 2}', '{"c": 3}'],  # two objects in one row
])
def test_v2_measurements_json_must_hold_one_object_of_numbers_per_row(rows):
    """The stores write this column as it is: a malformed row makes the record a decode error (dead-lettered
    by the processor), in the single and the many-record decoders alike."""
    body = msgspec.msgpack.decode(_two_rows([0, 1])[2:])
    body[13] = rows
    data = BUS_V2_MAGIC + msgspec.msgpack.encode(body)
    with pytest.raises(msgspec.DecodeError, match="measurements_json"):
        decode_bus_columns(data)
    good = _two_rows([0, 1])
    cols, counts, errors = decode_bus_columns_many([good, data, good])
    assert counts == [2, 0, 2] and list(errors) == [1] and len(cols) == 4


def _bad_code(data: bytes) -> bytes:
    body = msgspec.msgpack.decode(data[2:])
    body[2] = (len(body[1]) + 3).to_bytes(4, "little") * (len(body[2]) // 4)
    return BUS_V2_MAGIC + msgspec.msgpack.encode(body)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.tuples(sent, st.sampled_from(["v1", "v2", "v2", "truncated", "v3", "garbage", "bad_code"])),
                        max_size=6))
def test_decoding_many_records_equals_decoding_each(batches):
    """One batch from many records (v1 and v2 mixed, some corrupt) is the records' columns in order; a bad record
    costs only itself, whatever its neighbours."""
    values = []
    for items, kind in batches:
        rs = _readings(items)
        v2 = encode_bus_columns(ReadingColumns.from_readings(rs))
        values.append({"v1": encode_bus_batch(BusBatch(rs)), "v2": v2, "truncated": v2[: len(v2) // 2],
                       "v3": b"\xc1\x03" + v2[2:], "garbage": b"\xff\x00",
                       "bad_code": _bad_code(v2) if rs else v2}[kind])
    cols, rows, errors = decode_bus_columns_many(values)
    expected, failed = [], set()
    for i, v in enumerate(values):
        try:
            expected.append(decode_bus_columns(v))
        except msgspec.DecodeError:
            failed.add(i)
    assert set(errors) == failed
    assert all(isinstance(e, msgspec.DecodeError) for e in errors.values())
    assert rows == [0 if i in failed else len(decode_bus_columns(v)) for i, v in enumerate(values)]
    want = [r for c in expected for r in c.to_readings()]
    _same(cols.to_readings(), want)
    ref = ReadingColumns.from_readings(want)
    assert (cols.devices, cols.boots, cols.metrics) == (ref.devices, ref.boots, ref.metrics)
    for name in ("device", "ts_ms", "received_ms", "key", "chk", "seq", "boot", "m_row", "m_metric", "m_value"):
        np.testing.assert_array_equal(getattr(cols, name), getattr(ref, name), err_msg=name)
    assert cols.measurements_json.tolist() == ref.measurements_json.tolist()
    # the joined path itself (a failing check falls back to record by record, which would hide a join bug)
    from fieldmesh.core import codec

    good = [codec._body_v2(v) for i, v in enumerate(values) if i not in failed and v[:1] == b"\xc1"]
    if good:
        joined = codec._join_v2(*zip(*good, strict=True))
        _same(joined.to_readings(), [r for b in good for r in codec._join_v2([b[0]], [b[1]], [b[2]]).to_readings()])
