"""The bulk path of ``route``: a batch of plain one-reading JSON messages decoded at once.

It must give exactly what the message-by-message path gives (the same readings, identities and bus
records), and step aside (None) for any batch holding anything else, so that path reports it.
"""

from __future__ import annotations

import json
from unittest.mock import patch

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.core import codec
from fieldmesh.core.batch import ReadingColumns
from fieldmesh.core.codec import decode_single_readings, decode_telemetry, decode_telemetry_body, encode_bus_columns
from fieldmesh.core.identity import identity_digest, identity_string
from fieldmesh.core.settings import GatewaySettings
from fieldmesh.gateway import gateway
from fieldmesh.gateway.base import IngestMessage
from fieldmesh.gateway.gateway import _route_bulk, _route_one, route

NOW = 1_763_812_345_123
V1 = GatewaySettings(bus_encoding=1)
V2 = GatewaySettings(bus_encoding=2)

good = st.fixed_dictionaries(
    {"ts": st.integers(NOW - 10**9, NOW + 300_000),
     "measurements": st.dictionaries(st.sampled_from(["t", "h", "rpm", "on"]),
                                     st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                                               st.integers(-(10**6), 10**6)), min_size=1, max_size=3)},
    optional={"seq": st.integers(0, 2**63 - 1), "boot_id": st.sampled_from(["b1", "", "x" * 128]),
              "event_id": st.sampled_from(["e1", "x" * 256])},
)
# one value each that the one-by-one path rejects, or that the bulk path leaves to it
odd = st.sampled_from([
    {"ts": "2025-11-22T11:52:26Z", "measurements": {"t": 1.0}}, {"ts": NOW, "measurements": {}},
    {"ts": NOW + 400_000, "measurements": {"t": 1.0}}, {"ts": 1_000, "measurements": {"t": 1.0}},
    {"ts": NOW, "measurements": {"bad name": 1.0}}, {"ts": NOW, "seq": 2**63, "measurements": {"t": 1.0}},
    {"ts": NOW, "seq": -1, "measurements": {"t": 1.0}}, {"ts": NOW, "boot_id": "x" * 129, "measurements": {"t": 1.0}},
    {"ts": NOW, "event_id": "", "measurements": {"t": 1.0}}, {"ts": NOW, "meta": {"k": 1}, "measurements": {"t": 1.0}},
    {"ts": NOW, "device_id": "other", "measurements": {"t": 1.0}}, {"ts": 2**64, "measurements": {"t": 1.0}},
    [{"ts": NOW, "measurements": {"t": 1.0}}], {"readings": [{"ts": NOW, "measurements": {"t": 1.0}}]},
])


def _messages(objs: list[object], devices: list[str]) -> list[IngestMessage]:
    return [IngestMessage(topic=f"devices/{d}/telemetry", payload=json.dumps(o).encode(), received_ms=NOW - i,
                          source_id=f"i{i}") for i, (o, d) in enumerate(zip(objs, devices, strict=True))]


devices = st.sampled_from(["d1", "d-2", "pump_3", "x9"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(good, devices), min_size=1, max_size=30), st.integers(1, 5))
def test_bulk_gives_what_one_by_one_gives(items: list[tuple[dict[str, object], str]], partitions: int):
    for o, d in items:
        if "device_id" not in o and len(o) % 2:
            o["device_id"] = d  # sometimes the payload names its (own) device
    msgs = _messages([o for o, _ in items], [d for _, d in items])
    bulk = _route_bulk(msgs, V2, partitions, NOW)
    assert bulk is not None
    by_part: dict[int, list[object]] = {}
    for m in msgs:
        routed = _route_one(m, V2, partitions, NOW)
        assert routed is not None and not routed[1].rejects
        by_part.setdefault(routed[0], []).extend(routed[1].readings)
    assert list(bulk[0].items()) == list(by_part.items())  # same partitions, in the same order
    assert bulk[1] == len(msgs)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(good, min_size=0, max_size=10), odd, st.lists(good, max_size=10))
def test_bulk_steps_aside_for_anything_else(before: list[object], bad: object, after: list[object]):
    objs = [*before, bad, *after]
    payloads = [json.dumps(o).encode() for o in objs]
    assert decode_single_readings(payloads, ["d1"] * len(objs), [NOW] * len(objs), now_ms=NOW) is None
    one = decode_telemetry(payloads[len(before)], device_id="d1", topic="devices/d1/telemetry", received_ms=NOW,
                           now_ms=NOW)
    # what it stepped aside for is rejected, or is another shape or a meta the one-by-one path accepts
    assert one.rejects or isinstance(bad, list) or "readings" in bad or "meta" in bad or isinstance(bad["ts"], str)


def test_a_batch_with_other_topics_or_encodings_goes_one_by_one():
    ok = _messages([{"ts": NOW, "seq": 1, "boot_id": "b", "measurements": {"t": 1.5}}] * 3, ["d1", "d2", "d3"])
    assert _route_bulk(ok, V1, 4, NOW) is not None
    for other in (IngestMessage(topic="devices/d1/telemetry/msgpack", payload=b"\x80", received_ms=NOW),
                  IngestMessage(topic="devices/d1/state", payload=b"{}", received_ms=NOW),
                  IngestMessage(topic="weather/x", payload=b"{}", received_ms=NOW),
                  IngestMessage(topic="devices/d1/telemetry", payload=ok[0].payload, received_ms=NOW,
                                content_type="application/msgpack")):
        batch = [*ok, other]
        assert _route_bulk(batch, V1, 4, NOW) is None
        _, n, _ = route(batch, settings=V1, partitions=4, now_ms=NOW)
        assert n == 3  # the one-by-one path took the batch: the plain ones pass, the other is not a reading


def test_route_records_are_the_same_either_way():
    """The bus records of a bulk-routed batch equal those of the same batch routed one by one."""
    objs: list[object] = [{"ts": NOW - i, "seq": i, "boot_id": "b1", "measurements": {"t": i / 4}} for i in range(4500)]
    msgs = _messages(objs, [f"dev{i % 37}" for i in range(len(objs))])
    for s in (V1, V2):
        fast = route(msgs, settings=s, partitions=8, now_ms=NOW)
        # a trailing side-topic message sends the batch one by one and adds nothing
        slow = route([*msgs, IngestMessage(topic="devices/d1/state", payload=b"{}", received_ms=NOW)],
                     settings=s, partitions=8, now_ms=NOW)
        assert fast[1] == slow[1] == len(msgs) and not fast[2] and not slow[2]
        assert [(r.topic, r.partition, r.value) for r in fast[0]] == [(r.topic, r.partition, r.value) for r in slow[0]]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(good, devices), min_size=1, max_size=30), st.integers(1, 5), st.data())
def test_bulk_columns_equal_the_columns_of_its_readings(items: list[tuple[dict[str, object], str]], partitions: int,
                                                       data: st.DataObject):
    """With the columnar bus encoding the bulk path makes columns from the decoded fields, never a Reading: they
    equal ``from_readings`` of the readings it would make, partition by partition (the same record bytes)."""
    msgs = _messages([o for o, _ in items], [d for _, d in items])
    k = data.draw(st.integers(0, len(msgs)))  # one payload for another device: set aside, the rest stays in bulk
    msgs[k:k] = [_messages([{"ts": NOW, "device_id": "other", "measurements": {"t": 1.0}}], ["d1"])[0]]
    readings = _route_bulk(msgs, V2, partitions, NOW)
    columns = _route_bulk(msgs, V2, partitions, NOW, columns=True)
    assert readings is not None and columns is not None
    assert list(columns[0]) == list(readings[0]) and columns[1:] == readings[1:] and columns[2] == [k]
    for p, cols in columns[0].items():
        assert isinstance(cols, ReadingColumns)
        assert encode_bus_columns(cols) == encode_bus_columns(ReadingColumns.from_readings(readings[0][p]))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(good, min_size=1, max_size=20), st.lists(good, max_size=20), st.integers(1, 3))
def test_a_partition_of_bulk_columns_and_readings_routed_alone_is_one_batch(
    bulk: list[dict[str, object]], alone: list[dict[str, object]], size: int
):
    """Columns of the bulk path, then readings routed one by one (schema-bound payloads): the records equal those
    of all the readings in that order, cut every ``size`` readings."""
    rs = _route_bulk(_messages([*bulk, *alone], ["d1"] * (len(bulk) + len(alone))), V2, 1, NOW)
    assert rs is not None
    want = rs[0][0]
    cols = ReadingColumns.from_readings(want[: len(bulk)])
    extra = want[len(bulk):]
    with patch.object(gateway, "MAX_READINGS_PER_RECORD", size):
        chunks = gateway._chunks(cols, extra or None)
    got = [encode_bus_columns(c) if isinstance(c, ReadingColumns) else encode_bus_columns(
        ReadingColumns.from_readings(c)) for c in chunks]
    assert got == [encode_bus_columns(ReadingColumns.from_readings(want[s : s + size]))
                   for s in range(0, len(want), size)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(good, good, good, odd), min_size=1, max_size=30), st.booleans())
def test_a_payload_of_many_readings_decodes_as_the_general_path_does(items: list[object], batch: bool):
    """A payload of many plain readings is checked over columns: the readings (and dead letters) are exactly
    those of the general path, reading by reading."""
    payload = json.dumps({"device_id": "d1", "readings": items} if batch else items).encode()
    fast = decode_telemetry(payload, device_id="d1", topic="devices/d1/telemetry", received_ms=NOW, now_ms=NOW)
    general = decode_telemetry_body(json.loads(payload), payload, device_id="d1", topic="devices/d1/telemetry",
                                    received_ms=NOW, now_ms=NOW)
    assert fast.readings == general.readings
    assert [msgspec.json.encode(r) for r in fast.readings] == [msgspec.json.encode(r) for r in general.readings]
    assert [(d.reason, d.detail) for d in fast.rejects] == [(d.reason, d.detail) for d in general.rejects]


def test_a_partitions_columns_keep_only_the_names_they_use_in_order_of_first_use():
    """A batch split into partitions keeps in each partition's columns only the names its rows use, in the
    order they first appear, and drops a column no row of the part has: the same bytes as columns made from
    that partition's readings alone."""
    objs: list[object] = []
    devs = []
    for i in range(60):
        o: dict[str, object] = {"ts": NOW - i, "measurements": {("h" if i % 3 else "t"): i / 4}}
        if i % 4 == 0:
            o["boot_id"] = f"b{i % 8}"
        if i % 8 == 0:
            o["event_id"] = f"e{i}"
        objs.append(o)
        devs.append(f"dev{(i * 7) % 11}")
    msgs = _messages(objs, devs)
    for partitions in (1, 2, 3, 8):
        readings = _route_bulk(msgs, V2, partitions, NOW)
        columns = _route_bulk(msgs, V2, partitions, NOW, columns=True)
        assert readings is not None and columns is not None and list(columns[0]) == list(readings[0])
        for p, cols in columns[0].items():
            assert isinstance(cols, ReadingColumns)
            alone = ReadingColumns.from_readings(readings[0][p])
            assert cols.devices == alone.devices and cols.boots == alone.boots and cols.metrics == alone.metrics
            assert (cols.event_id is None) == (alone.event_id is None)
            assert encode_bus_columns(cols) == encode_bus_columns(alone)


@pytest.mark.parametrize("content", [False, True])
def test_identity_digests_of_a_batch_larger_than_a_hash_block_are_each_readings_own(content: bool):
    """The digests are made in blocks (``codec._HASH_BLOCK``): every block, the last one short, is right."""
    n = 3 * codec._HASH_BLOCK + 7
    objs: list[object] = [{"ts": NOW - i, "seq": i, "boot_id": "b1", "measurements": {"t": float(i)}} for i in range(n)]
    if content:
        objs[5] = {"ts": NOW, "measurements": {"t": 0.5}}  # no seq: identified by its content
    msgs = _messages(objs, [f"d{i % 7}" for i in range(n)])
    readings = decode_single_readings([m.payload for m in msgs], [f"d{i % 7}" for i in range(n)],
                                      [m.received_ms for m in msgs], now_ms=NOW)
    assert readings is not None and len(readings) == n
    for r in readings:
        assert (r.key, r.chk) == identity_digest(identity_string(r.device_id, r.ts_ms, r.measurements, r.seq,
                                                                 r.boot_id, r.event_id))
