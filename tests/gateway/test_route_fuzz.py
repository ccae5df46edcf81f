"""Fuzzing the door: whatever arrives, ``route`` never raises and accounts for every message.

Each message yields reading records or dead letters (with a reason from ``REASONS``), except the known
side topics (``devices/{id}/state|config|anomalies``), which are ignored by design. Every record that
``route`` returns decodes again, as the processor will decode it.
"""

from __future__ import annotations

import json
import math

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.core.codec import REASONS, decode_bus_readings, decode_dead_letter
from fieldmesh.core.settings import GatewaySettings
from fieldmesh.core.topics import DLQ_TOPIC, READINGS_TOPIC, route_of_topic
from fieldmesh.gateway.base import IngestMessage
from fieldmesh.gateway.gateway import route

NOW = 1_763_812_345_123
GW = GatewaySettings(max_payload_bytes=64 * 1024)  # bus encoding 2, the default
GW_V1 = GatewaySettings(max_payload_bytes=64 * 1024, bus_encoding=1)


def nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    if kind == "dict":
        return b'{"a":' * depth + b"1" + b"}" * depth
    # a reading whose meta is nested
    return (b'{"ts":%d,"measurements":{"t":1},"meta":' % (NOW - 1000)) + b'{"a":' * depth + b"1" + b"}" * (depth + 1)


#: text with lone surrogates too (JSON can escape them; MQTT cannot carry them, a bridge might)
wild_text = st.one_of(st.text(max_size=20), st.text(st.characters(exclude_categories=()), max_size=6),
                      st.sampled_from(["\ud800", "a\udfffb", "\x00", "é" * 3]))
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    wild_text,
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
reading_like = st.fixed_dictionaries(
    {"ts": st.one_of(st.integers(NOW - 10**9, NOW), json_values, st.text(max_size=30),
                       st.sampled_from(["2025-11-22T11:52:26Z", "0001-01-01T00:00:00+14:00",
                                        "9999-12-31T23:59:59-14:00", "2025-11-22T11:52:26"]))},
    optional={
        "measurements": st.one_of(
            st.dictionaries(st.sampled_from(["t", "h", "bad name", "x" * 70]), json_values, max_size=3),
            json_values,
        ),
        "device_id": st.one_of(st.just("dev-1"), json_values),
        "seq": json_values,
        "boot_id": json_values,
        "event_id": json_values,
        "meta": json_values,
        "extra": json_values,
    },
)


def _dump(obj: object) -> bytes:
    # stdlib json writes NaN/Infinity and huge ints, as a careless device would
    return json.dumps(obj).encode("utf-8", errors="surrogatepass")


payloads = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=60).map(lambda b: b"\x91" * 3000 + b),  # msgpack nested past the limit
    json_values.map(_dump),
    reading_like.map(_dump),
    st.lists(reading_like, max_size=5).map(_dump),
    st.fixed_dictionaries({"device_id": st.just("dev-1"), "readings": st.lists(reading_like, max_size=4)}).map(_dump),
    st.builds(nested, st.sampled_from([10, 40, 999, 1000, 1500, 10_000]), st.sampled_from(["list", "dict", "meta"])),
    st.integers(GW.max_payload_bytes - 2, GW.max_payload_bytes + 70_000).map(lambda n: b"[" + b" " * n + b"]"),
)
topics = st.one_of(
    st.just("devices/dev-1/telemetry"),
    st.sampled_from([
        "devices/dev-1/telemetry/msgpack", "devices/dev-1/telemetry/zstd", "devices/dev-1/telemetry/json",
        "devices/dev-1/telemetry/bogus", "devices/dev-1/other", "devices/dev-1/telemetry.zst",
        "devices/../telemetry", "devices//telemetry", "devices/dev-1/state", "devices/dev-1/anomalies",
        "devices/dev-1/config", "devices/dev-1/telemetry/", "devices/dev-1/telemetry/a/b", "devices",
    ]),
    st.text(max_size=40).map(lambda t: "devices/" + t),
    wild_text.map(lambda t: "devices/dev-1/telemetry/" + t),
    wild_text.map(lambda t: "devices/dev-1/" + t),
)
messages = st.lists(
    st.builds(
        lambda i, t, p, ct: IngestMessage(topic=t, payload=p, received_ms=NOW, content_type=ct, source_id=f"i{i}"),
        st.integers(0, 10**6), topics, payloads,
        st.one_of(st.none(), st.sampled_from(["application/msgpack", "application/json+zstd", "text/x-bad"])),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(messages, st.integers(1, 8), st.sampled_from([GW, GW_V1]))
def test_route_never_raises_and_accounts_for_every_message(
    msgs: list[IngestMessage], partitions: int, gw: GatewaySettings
):
    records, n, dead = route(msgs, settings=gw, partitions=partitions, now_ms=NOW)
    # every record decodes as the processor will decode it
    readings = []
    letters = []
    for r in records:
        if r.topic == READINGS_TOPIC:
            assert 0 <= r.partition < partitions
            readings.extend(decode_bus_readings(r.value))
        else:
            assert r.topic == DLQ_TOPIC
            letters.append(decode_dead_letter(r.value))
    assert len(readings) == n
    clean = lambda t: t.encode("utf-8", "backslashreplace").decode()  # noqa: E731 - a lone surrogate is escaped
    assert [(d.reason, d.payload, d.truncated, d.topic) for d in letters] == [
        (d.reason, d.payload, d.truncated, clean(d.topic)) for d in dead]
    assert {d.reason for d in dead} <= set(REASONS)
    # account for every message, one by one: a telemetry topic gives readings or dead letters, a side
    # topic nothing, an unserved topic exactly one unknown_topic dead letter; together, the same as the batch
    n_sum, reasons = 0, []
    for m in msgs:
        _, n1, dead1 = route([m], settings=GW, partitions=partitions, now_ms=NOW)
        kind = route_of_topic(m.topic).kind
        if kind == "side":
            assert (n1, dead1) == (0, [])
        elif kind == "unknown":
            assert (n1, [(d.reason, d.topic) for d in dead1]) == (0, [("unknown_topic", m.topic)])
        else:
            assert n1 + len(dead1) >= 1, m
        n_sum += n1
        reasons += [d.reason for d in dead1]
    assert n_sum == n
    assert sorted(reasons) == sorted(d.reason for d in dead)
    for r in readings:
        assert all(type(v) is bool or math.isfinite(v) for v in r.measurements.values())
        msgspec.msgpack.encode(r)  # nothing in a reading trips a later encoder


def test_poison_between_valid_messages_costs_only_itself():
    """The issue's case: a 10,000-deep payload among valid readings, through one ``route`` call."""
    good = [
        IngestMessage(topic="devices/dev-1/telemetry", received_ms=NOW, source_id=f"i{i}",
                      payload=json.dumps({"ts": NOW - 1000 + i, "seq": i, "measurements": {"t": i}}).encode())
        for i in range(20)
    ]
    poison = IngestMessage(topic="devices/dev-1/telemetry", payload=nested(10_000, "list"), received_ms=NOW,
                           source_id="i99")
    records, n, dead = route([good[0], poison, *good[1:]], settings=GW, partitions=4, now_ms=NOW)
    assert n == 20
    assert [(d.reason, d.topic) for d in dead] == [("too_deep", "devices/dev-1/telemetry")]
    assert sum(1 for r in records if r.topic == DLQ_TOPIC) == 1


def test_unserved_topics_are_dead_lettered_and_side_topics_ignored():
    body = json.dumps({"ts": NOW - 1000, "measurements": {"t": 1}}).encode()
    topics_ = ["devices/x/other", "devices/x/telemetry.zst", "devices/../telemetry", "devices/x/state",
               "devices/x/config", "devices/x/anomalies", "devices/x/telemetry/a/b"]
    msgs = [IngestMessage(topic=t, payload=body, received_ms=NOW, source_id=f"i{i}") for i, t in enumerate(topics_)]
    records, n, dead = route(msgs, settings=GW, partitions=2, now_ms=NOW)
    assert n == 0
    assert sorted((d.reason, d.topic) for d in dead) == sorted(
        ("unknown_topic", t) for t in ["devices/x/other", "devices/x/telemetry.zst", "devices/../telemetry",
                                       "devices/x/telemetry/a/b"])
    assert len(records) == 4


def test_an_unforeseen_exception_costs_one_message(caplog):
    """The per-message guard: a message the codec is not even reached for (a bridge's bad content type)."""
    good = IngestMessage(topic="devices/dev-1/telemetry", received_ms=NOW, source_id="i1",
                         payload=json.dumps({"ts": NOW - 1000, "measurements": {"t": 1}}).encode())
    odd = IngestMessage(topic="devices/dev-1/telemetry", received_ms=NOW, source_id="i2", payload=b"{}",
                        content_type=5)  # type: ignore[arg-type]  # not a str: encoding_for fails on it
    _, n, dead = route([odd, good], settings=GW, partitions=2, now_ms=NOW)
    assert n == 1
    assert [(d.reason, d.topic) for d in dead] == [("malformed_json", "devices/dev-1/telemetry")]
    assert "AttributeError" in dead[0].detail
    assert "routing a message" in caplog.text


def test_a_reading_the_bus_cannot_encode_is_dead_lettered_alone():
    from fieldmesh.core.model import Reading
    from fieldmesh.gateway.gateway import _encodable

    ok = Reading(device_id="d", ts_ms=NOW, measurements={"t": 1.0}, key=1, chk=2)
    bad = Reading(device_id="d", ts_ms=NOW, measurements={"t": 1.0}, key=3, chk=4, meta={"x": 10**30})
    kept, dead = _encodable([ok, bad, ok])
    assert kept == [ok, ok]
    assert [(d.reason, d.device_id) for d in dead] == [("schema_violation", "d")]
