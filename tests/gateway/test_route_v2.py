"""``route`` with ``bus_encoding = 2``: the same readings and dead letters as v1, in v2 records.

The door's guarantees do not depend on the encoding: the per-message guard, the per-reading
fallback when a batch does not encode, and the accounting of every message.
"""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.core.codec import BUS_V2_MAGIC, decode_bus_readings, decode_dead_letter
from fieldmesh.core.model import Reading
from fieldmesh.core.settings import GatewaySettings
from fieldmesh.core.topics import DLQ_TOPIC, READINGS_TOPIC
from fieldmesh.gateway.base import IngestMessage
from fieldmesh.gateway.gateway import MAX_READINGS_PER_RECORD, _encodable, route

NOW = 1_763_812_345_123
V1 = GatewaySettings(bus_encoding=1)
V2 = GatewaySettings(bus_encoding=2)

value = st.one_of(st.floats(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=3), st.none())
reading = st.fixed_dictionaries(
    {"ts": st.one_of(st.integers(NOW - 10**9, NOW + 10**6), st.just("2025-11-22T11:52:26Z"), st.just("x"))},
    optional={"measurements": st.dictionaries(st.sampled_from(["t", "h", "bad name"]), value, max_size=3),
              "seq": st.one_of(st.integers(-2, 2**64), st.none()), "boot_id": st.sampled_from(["b", 5]),
              "event_id": st.sampled_from(["e1", "", None]), "meta": st.sampled_from([{"k": 1}, {"k": 10**30}, 3])},
)
payload = st.one_of(
    reading.map(json.dumps),
    st.lists(reading, max_size=6).map(json.dumps),
    st.binary(max_size=20).map(lambda b: b.decode("latin-1")),
)
messages = st.lists(
    st.builds(lambda i, dev, p: IngestMessage(topic=f"devices/{dev}/telemetry", payload=p.encode(), received_ms=NOW,
                                              source_id=f"i{i}"),
              st.integers(0, 10**6), st.sampled_from(["d1", "d-2", "pump_3"]), payload),
    min_size=1, max_size=8,
)


def _split(records):
    readings, letters = [], []
    for r in records:
        if r.topic == READINGS_TOPIC:
            readings.append((r.partition, decode_bus_readings(r.value)))
        else:
            assert r.topic == DLQ_TOPIC
            letters.append(decode_dead_letter(r.value))
    return readings, letters


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=messages, partitions=st.integers(1, 4))
def test_v2_routes_the_same_readings_and_dead_letters_as_v1(msgs, partitions):
    r1, n1, d1 = route(msgs, settings=V1, partitions=partitions, now_ms=NOW)
    r2, n2, d2 = route(msgs, settings=V2, partitions=partitions, now_ms=NOW)
    assert (n1, d1) == (n2, d2)
    assert [(r.topic, r.partition, r.msg_id) for r in r1] == [(r.topic, r.partition, r.msg_id) for r in r2]
    assert all(r.value.startswith(BUS_V2_MAGIC) for r in r2 if r.topic == READINGS_TOPIC)
    assert _split(r1) == _split(r2)
    assert sum(len(rs) for _, rs in _split(r2)[0]) == n2


def test_v2_records_are_split_like_v1():
    rs = [{"ts": NOW - 10_000 + i, "seq": i, "measurements": {"t": i}} for i in range(MAX_READINGS_PER_RECORD + 5)]
    m = IngestMessage(topic="devices/d1/telemetry", payload=json.dumps(rs).encode(), received_ms=NOW, source_id="i1")
    records, n, _ = route([m], settings=GatewaySettings(bus_encoding=2, max_payload_bytes=2**20), partitions=2,
                          now_ms=NOW)
    assert n == len(rs)
    assert [len(decode_bus_readings(r.value)) for r in records] == [MAX_READINGS_PER_RECORD, 5]


def test_a_reading_v2_cannot_encode_is_dead_lettered_alone():
    ok = Reading(device_id="d", ts_ms=NOW, measurements={"t": 1.0}, key=1, chk=2)
    bad = Reading(device_id="d", ts_ms=NOW, measurements={"t": 1.0}, key=3, chk=4, meta={"x": 10**30})
    kept, dead = _encodable([ok, bad, ok], 2)
    assert kept == [ok, ok]
    assert [(d.reason, d.device_id) for d in dead] == [("schema_violation", "d")]


def test_bus_encoding_setting_is_checked(monkeypatch):
    import pytest

    from fieldmesh.core.errors import ConfigError
    from fieldmesh.core.settings import load_settings

    assert load_settings().gateway.bus_encoding == 2  # the default since processors read both
    monkeypatch.setenv("FIELDMESH__GATEWAY__BUS_ENCODING", "1")
    assert load_settings().gateway.bus_encoding == 1
    monkeypatch.setenv("FIELDMESH__GATEWAY__BUS_ENCODING", "3")
    with pytest.raises(ConfigError, match="FIELDMESH__GATEWAY__BUS_ENCODING"):
        load_settings()


plain = st.fixed_dictionaries(
    {"ts": st.integers(NOW - 10**9, NOW),
     "measurements": st.dictionaries(st.sampled_from(["t", "h"]),
                                     st.one_of(st.floats(-1e300, 1e300), st.booleans(), st.integers(-(2**53), 2**53)),
                                     min_size=1, max_size=2)},
    optional={"seq": st.integers(0, 2**62), "boot_id": st.sampled_from(["b", "b2"]), "event_id": st.just("e1")},
)
several = st.one_of(
    st.lists(plain, min_size=2, max_size=6).map(json.dumps),  # the path that builds columns from fields
    st.lists(plain, min_size=2, max_size=6).map(lambda rs: json.dumps({"readings": rs})),
    plain.map(json.dumps),
    st.lists(plain, min_size=2, max_size=3).map(lambda rs: json.dumps([*rs, {**rs[0], "meta": {"k": 1}}])),
    st.just('[{"ts": 1, "measurements": {"t": 1}}, {"ts": 2}]'),  # not valid: dead-lettered as in v1
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=st.lists(st.builds(lambda i, dev, p: IngestMessage(topic=f"devices/{dev}/telemetry", payload=p.encode(),
                                                                   received_ms=NOW, source_id=f"i{i}"),
                                   st.integers(0, 10**6), st.sampled_from(["d1", "d-2", "pump_3"]), several),
                         min_size=1, max_size=8),
       partitions=st.integers(1, 4))
def test_v2_columns_of_several_readings_a_message_equal_v1(msgs, partitions):
    """Messages of several plain readings go to columns field by field (no Reading each); the records hold the
    same readings, in the same order, as v1's, with the messages taken as readings among them."""
    r1, n1, d1 = route(msgs, settings=V1, partitions=partitions, now_ms=NOW)
    r2, n2, d2 = route(msgs, settings=V2, partitions=partitions, now_ms=NOW)
    assert (n1, d1) == (n2, d2)
    assert [(r.topic, r.partition, r.msg_id) for r in r1] == [(r.topic, r.partition, r.msg_id) for r in r2]
    assert _split(r1) == _split(r2)
    assert sum(len(rs) for _, rs in _split(r2)[0]) == n2


def test_a_message_of_several_plain_readings_takes_the_field_path():
    from fieldmesh.core.batch import reading_fields
    from fieldmesh.gateway.gateway import _route_fields, _route_one

    rs = [{"ts": NOW - 3000 + i, "seq": i, "measurements": {"t": i / 3, "h": i % 2 == 0}} for i in range(3)]
    m = IngestMessage(topic="devices/d1/telemetry", payload=json.dumps(rs).encode(), received_ms=NOW, source_id="i1")
    got = _route_fields(m, V2, 4, NOW)
    assert got is not None
    part, res = _route_one(m, V2, 4, NOW)  # type: ignore[misc]
    assert got == (part, tuple(reading_fields(res.readings)))
    # anything else is left to the general path: one reading, a meta, a reading that is not valid
    for other in (rs[:1], [*rs, {**rs[0], "meta": {"k": 1}}], [*rs, {"ts": "x", "measurements": {"t": 1}}]):
        assert _route_fields(IngestMessage(topic="devices/d1/telemetry", payload=json.dumps(other).encode(),
                                           received_ms=NOW), V2, 4, NOW) is None


def test_the_field_path_hashes_and_checks_each_message_as_the_general_path():
    """A message's readings share its device and, commonly, a boot: the field path then formats each identity
    from one prefix. Identities, sums that overflow and values that are not finite as the general path has them."""
    from fieldmesh.core.batch import reading_fields
    from fieldmesh.core.identity import identity_digest, identity_string
    from fieldmesh.gateway.gateway import _route_fields, _route_one

    def both(rs: list[dict[str, object]]) -> tuple[object, object]:
        m = IngestMessage(topic="devices/d1/telemetry", payload=json.dumps(rs).encode(), received_ms=NOW)
        routed = _route_one(m, V2, 4, NOW)
        assert routed is not None
        part, res = routed
        return _route_fields(m, V2, 4, NOW), (part, tuple(reading_fields(res.readings)), res.rejects)

    for boot in ("b%d%s", "bö 1", ""):  # a % in the prefix, a character beyond ASCII, an empty boot
        rs = [{"ts": NOW - 10 + i, "seq": s, "boot_id": boot, "measurements": {"t": 1.5}}
              for i, s in enumerate([0, 7, 2**63 - 1])]
        fast, (part, fields, rejects) = both(rs)
        assert not rejects and fast == (part, fields)
        assert [(k, c) for k, c in zip(fields[3], fields[4], strict=True)] == [
            identity_digest(identity_string("d1", r["ts"], r["measurements"], r["seq"], boot)) for r in rs]
    # two boots in one message, and readings without a seq: each identity formatted on its own
    rs = [{"ts": NOW - 10, "seq": 1, "boot_id": "a", "measurements": {"t": 1.0}},
          {"ts": NOW - 9, "seq": 1, "boot_id": "b", "measurements": {"t": 1.0}},
          {"ts": NOW - 8, "measurements": {"t": 2.0}}]
    for chosen in (rs[:2], rs):
        fast, (part, fields, rejects) = both(chosen)
        assert not rejects and fast == (part, fields)
    # values whose sum overflows are finite still: the field path takes them
    big = [{"ts": NOW - 10 + i, "measurements": {"t": 1.7e308, "h": 1.7e308}} for i in range(3)]
    fast, (part, fields, rejects) = both(big)
    assert not rejects and fast == (part, fields)
    # a value that is not finite (1e999 decodes to an infinity): the general path rejects that reading
    m = IngestMessage(topic="devices/d1/telemetry", received_ms=NOW,
                      payload=b'[{"ts": %d, "measurements": {"t": 1.0}}, {"ts": %d, "measurements": {"t": 1e999}}]'
                      % (NOW - 2, NOW - 1))
    assert _route_fields(m, V2, 4, NOW) is None
    routed = _route_one(m, V2, 4, NOW)
    assert routed is not None and len(routed[1].readings) == 1 and len(routed[1].rejects) == 1
