"""Decoding and validation of device payloads: every shape, every reason code."""

from __future__ import annotations

import json
import math

import msgspec
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from fieldmesh.core.codec import decode_telemetry, encoding_for
from fieldmesh.core.identity import identity_digest, identity_string

NOW = 1_763_812_345_123
T = "devices/pump-7/telemetry"


def dec(payload: bytes | str, **kw: object):
    if isinstance(payload, str):
        payload = payload.encode()
    args = {"device_id": "pump-7", "topic": T, "received_ms": NOW}
    args.update(kw)
    return decode_telemetry(payload, **args)  # type: ignore[arg-type]


def test_one_reading():
    r = dec('{"device_id": "pump-7", "ts": 1763812345000, "seq": 42, "measurements": {"temperature": 21.5}}')
    assert not r.rejects
    (x,) = r.readings
    assert (x.device_id, x.ts_ms, x.seq, x.measurements) == ("pump-7", 1763812345000, 42, {"temperature": 21.5})


def test_array_and_batch_shapes():
    arr = dec('[{"ts": 1763812345000, "measurements": {"a": 1}}, {"ts": 1763812346000, "measurements": {"a": 2}}]')
    batch = dec('{"device_id": "pump-7", "readings": [{"ts": 1763812345000, "measurements": {"a": 1}},'
                ' {"ts": "2025-11-22T11:52:26Z", "measurements": {"a": 2}}]}')
    assert [r.ts_ms for r in arr.readings] == [1763812345000, 1763812346000]
    assert [r.ts_ms for r in batch.readings] == [1763812345000, 1763812346000]
    assert arr.readings[0].measurements == {"a": 1.0}


def test_rfc3339_with_offset():
    r = dec('{"ts": "2025-11-22T12:52:25.123+01:00", "measurements": {"a": 1}}')
    assert r.readings[0].ts_ms == 1763812345123


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("{not json", "malformed_json"),
        ('{"ts": "yesterday", "measurements": {"a": 1}}', "schema_violation"),
        ('{"ts": 1763812345000}', "schema_violation"),
        ('{"measurements": {"a": 1}}', "schema_violation"),
        ('{"ts": 1763812345000, "measurements": {}}', "schema_violation"),
        ('{"ts": 1763812345000, "measurements": {"a": "hot"}}', "schema_violation"),
        ('{"ts": 1763812345000, "measurements": {"bad name!": 1}}', "schema_violation"),
        ('{"ts": 1763812345000, "measurements": {"a": 1}, "seq": -1}', "schema_violation"),
        ('{"ts": 1763812345000, "measurements": {"a": 1}, "extra": 1}', "schema_violation"),
        ('{"ts": 1763812345, "measurements": {"a": 1}}', "schema_violation"),
        ('{"ts": 1763812345000, "measurements": {"a": NaN}}', "schema_violation"),
        ('{"ts": 1763812345000, "measurements": {"a": Infinity}}', "schema_violation"),
        ('{"ts": 1763812345000, "measurements": {"a": 1e999}}', "schema_violation"),
        ('{"device_id": "pump-8", "ts": 1763812345000, "measurements": {"a": 1}}', "device_mismatch"),
        ('{"ts": 1763822345000, "measurements": {"a": 1}}', "clock_skew"),
        ('"just a string"', "schema_violation"),
        ("[]", "schema_violation"),
    ],
)
def test_reasons(payload: str, reason: str):
    r = dec(payload)
    assert not r.readings
    assert [d.reason for d in r.rejects] == [reason]
    assert r.rejects[0].topic == T and r.rejects[0].received_ms == NOW and r.rejects[0].detail


def test_too_large_keeps_64k():
    big = b'{"ts": 1763812345000, "measurements": {"a": 1}, "meta": {"x": "' + b"x" * 300_000 + b'"}}'
    r = dec(big)
    (d,) = r.rejects
    assert d.reason == "too_large" and len(d.payload) == 65536 and d.truncated


def test_bad_reading_does_not_cost_its_batch():
    r = dec('[{"ts": 1763812345000, "measurements": {"a": 1}}, {"ts": 1763812345000, "measurements": {"a": NaN}},'
            ' {"ts": 1763812346000, "measurements": {"a": 3}}, {"ts": 9763812346000, "measurements": {"a": 3}}]')
    assert [x.measurements["a"] for x in r.readings] == [1.0, 3.0]
    assert sorted(d.reason for d in r.rejects) == ["clock_skew", "schema_violation"]
    assert b"NaN" in next(d.payload for d in r.rejects if d.reason == "schema_violation")


def test_clock_skew_bound_is_configurable():
    p = json.dumps({"ts": NOW + 60_000, "measurements": {"a": 1}})
    assert dec(p).readings
    assert dec(p, max_skew_ms=10_000).rejects[0].reason == "clock_skew"


def test_encodings():
    body = b'[{"ts": 1763812345000, "measurements": {"a": 1}}]'
    assert dec(zstandard.compress(body), encoding=encoding_for("application/json+zstd")).readings
    assert dec(zstandard.compress(body), encoding=encoding_for(None, "zstd")).readings
    assert dec(msgspec.msgpack.encode(json.loads(body)), encoding="msgpack").readings
    r = dec(body, encoding=encoding_for("text/csv"))
    assert r.rejects[0].reason == "unsupported_encoding"
    assert dec(b"\x00garbage", encoding="json+zstd").rejects[0].reason == "malformed_json"


def test_bools_are_kept():
    r = dec('{"ts": 1763812345000, "measurements": {"door_open": true, "t": 2}}')
    assert r.readings[0].measurements == {"door_open": True, "t": 2.0}


def test_identity_rules():
    m = {"a": 1.0}
    assert identity_string("d", 1, m, seq=5, event_id="x") == identity_string("d", 2, {"b": 2.0}, event_id="x")
    assert identity_string("d", 1, m, seq=5, boot_id="b") != identity_string("d", 1, m, seq=5, boot_id="c")
    assert identity_string("d", 1, m, seq=5) == identity_string("d", 9, {"z": 0.0}, seq=5)
    assert identity_string("d", 1, {"a": 1.0, "b": 2.0}) == identity_string("d", 1, {"b": 2.0, "a": 1.0})
    assert identity_string("d", 1, m) != identity_string("e", 1, m)
    k, c = identity_digest(identity_string("d", 1, m))
    assert 0 <= k < 2**63 and -(2**63) <= c < 2**63


@given(st.binary(max_size=2000))
def test_any_bytes_never_crash(data: bytes):
    r = dec(data)
    assert len(r.readings) + len(r.rejects) >= 1


@given(
    st.lists(
        st.fixed_dictionaries(
            {"ts": st.integers(946_684_800_000, NOW), "measurements": st.dictionaries(
                st.from_regex(r"[a-z]{1,8}", fullmatch=True),
                st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**20), 10**20),
                          st.booleans(), st.text(max_size=3)), max_size=4)}
        ),
        min_size=1, max_size=20,
    )
)
def test_every_reading_is_either_accepted_or_rejected(readings: list[dict]):
    r = dec(json.dumps(readings))
    assert len(r.readings) + len(r.rejects) == len(readings)
    for x in r.readings:
        assert all(isinstance(v, bool) or math.isfinite(v) for v in x.measurements.values())


@given(
    st.fixed_dictionaries(
        {"ts": st.integers(946_684_800_000, NOW + 250_000),
         "measurements": st.dictionaries(st.from_regex(r"[A-Za-z0-9_.-]{1,10}", fullmatch=True),
                                         st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                                                   st.integers(-(2**63), 2**63 - 1), st.booleans()),
                                         min_size=1, max_size=4)},
        optional={"seq": st.integers(0, 2**63 - 1), "boot_id": st.text(max_size=5), "event_id": st.text(min_size=1,
                  max_size=5), "device_id": st.just("pump-7"), "meta": st.dictionaries(st.text(max_size=3),
                  st.integers(-(2**63), 2**63 - 1), max_size=2)},
    )
)
def test_fast_path_equals_general_path(r: dict):
    # JSON takes the typed fast path; the same objects in msgpack take the general path.
    for body in (r, [r, r], {"device_id": "pump-7", "readings": [r]}):
        fast = dec(json.dumps(body))
        general = dec(msgspec.msgpack.encode(body), encoding="msgpack")
        assert fast.readings == general.readings and fast.readings and not fast.rejects


@pytest.mark.parametrize("depth", [1000, 10_000])
@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_nesting_past_the_decoders_limit_is_too_deep_never_raised(depth: int, encoding: str):
    payload = b"[" * depth + b"]" * depth if encoding == "json" else b"\x91" * depth + b"\xc0"
    r = dec(payload, encoding=encoding, max_bytes=10**6)
    assert not r.readings
    assert [d.reason for d in r.rejects] == ["too_deep"]


def test_meta_too_deep_or_not_carriable_is_rejected_at_the_door():
    deep = {"ts": NOW - 1, "measurements": {"a": 1}, "meta": json.loads('{"x":' * 40 + "1" + "}" * 40)}
    huge = {"ts": NOW - 1, "measurements": {"a": 1}, "meta": {"x": 10**30}}
    surrogate = b'{"ts": %d, "measurements": {"a": NaN}, "meta": {"x": "\\udc00"}}' % (NOW - 1)
    ok = {"ts": NOW - 1, "measurements": {"a": 1}, "meta": {"x": [1, {"y": 2}]}}
    assert [d.reason for d in dec(json.dumps(deep)).rejects] == ["too_deep"]
    assert [d.reason for d in dec(json.dumps(huge)).rejects] == ["schema_violation"]
    assert [d.reason for d in dec(surrogate).rejects] == ["schema_violation"]
    assert len(dec(json.dumps(ok)).readings) == 1


def test_metric_names_are_checked_whatever_the_cache_holds():
    """Valid names are remembered (a set lookup instead of the regex), boundedly; a bad name is always refused."""
    from fieldmesh.core import codec

    for i in range(codec._VALID_METRICS_MAX + 5):
        assert codec._valid_metric(f"m{i}")
    assert len(codec._valid_metrics) <= codec._VALID_METRICS_MAX
    for bad in ("bad name!", "x" * 65, ""):
        r = dec(json.dumps({"ts": 1763812345000, "measurements": {"t": 1.0, bad: 2.0}}))
        assert [d.reason for d in r.rejects] == ["schema_violation"], bad
        assert bad not in codec._valid_metrics
    ok = dec(json.dumps([{"ts": 1763812345000 + i, "measurements": {"t": 1.0, "h.2": i}} for i in range(3)]))
    assert not ok.rejects and len(ok.readings) == 3
    assert {"t", "h.2"} <= codec._valid_metrics
