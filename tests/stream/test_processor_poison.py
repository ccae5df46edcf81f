"""A bus record that does not decode is dead-lettered and its position committed: no crash loop."""

from __future__ import annotations

from pathlib import Path

import msgspec

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.codec import decode_telemetry, encode_bus_batch, encode_reading_json
from fieldmesh.core.model import BusBatch
from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.core.topics import DLQ_TOPIC, READINGS_TOPIC
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.processor import Processor

NOW = 1_763_812_345_123


def _good(offset: int) -> BusRecord:
    res = decode_telemetry(encode_reading_json("p-1", NOW - 60_000 + offset, {"t": float(offset)}, seq=offset),
                           device_id="p-1", topic="devices/p-1/telemetry", received_ms=NOW)
    return BusRecord(topic=READINGS_TOPIC, partition=0, offset=offset,
                     value=encode_bus_batch(BusBatch(readings=res.readings)), timestamp_ms=NOW)


def _deep_meta() -> bytes:
    """A bus batch whose one reading's ``meta`` nests 5,000 msgpack arrays (RecursionError in the decoder)."""
    r = decode_telemetry(b'{"ts": %d, "measurements": {"t": 1}, "meta": {"m": "XXXX"}}' % (NOW - 1),
                         device_id="p-1", topic="devices/p-1/telemetry", received_ms=NOW).readings[0]
    raw = encode_bus_batch(BusBatch(readings=[r]))
    assert raw.count(b"\xa4XXXX") == 1
    return raw.replace(b"\xa4XXXX", b"\x91" * 5000 + b"\xc0")


def test_poison_bus_records_are_dead_lettered_and_skipped(tmp_path: Path):
    deep = _deep_meta()
    assert msgspec.msgpack.decode(b"\x91\xc0") == [None]
    records = [
        _good(1),
        BusRecord(topic=READINGS_TOPIC, partition=0, offset=2, value=deep, timestamp_ms=NOW),
        BusRecord(topic=READINGS_TOPIC, partition=0, offset=3, value=b"\xff garbage", timestamp_ms=NOW),
        _good(4),
        BusRecord(topic=DLQ_TOPIC, partition=0, offset=1, value=b"{" * 5000, timestamp_ms=NOW),
    ]
    store = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    try:
        p = Processor(bus=None, store=store, settings=ProcessorSettings())  # type: ignore[arg-type]
        res = p.apply_records(records)
        assert (res.stored, res.dead_lettered) == (2, 3)
        st = store.stats()
        assert st.stored == 2
        assert st.dead_lettered == {"too_deep": 1, "schema_violation": 2}
        assert p.stats.corrupt == 3
        # the positions are committed: a redelivery (after a restart) skips them instead of failing again
        assert store.positions()[(READINGS_TOPIC, 0)] == 4
        assert store.positions()[(DLQ_TOPIC, 0)] == 1
        p2 = Processor(bus=None, store=store, settings=ProcessorSettings())  # type: ignore[arg-type]
        p2._positions = store.positions()
        p2.apply_records(records)
        assert p2.stats.skipped == len(records)
        assert store.stats().received == 5
    finally:
        store.close()
