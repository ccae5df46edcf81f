"""The processor reads both bus encodings: a pipeline through v1 and through v2 stores identical state.

The real path: device JSON -> ``gateway.route`` (validation, identity, the configured bus encoding)
-> ``Processor.apply_records`` -> SQLite. During an upgrade a partition carries both versions mixed;
a record of a version the processor does not know is dead-lettered with a reason that names it,
and its position committed (no crash loop), as any other poison record.
"""

from __future__ import annotations

import random
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.codec import BUS_V2_MAGIC, encode_reading_json
from fieldmesh.core.settings import GatewaySettings, ProcessorSettings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.gateway.base import IngestMessage
from fieldmesh.gateway.gateway import route
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.processor import Processor
from fmtest import oracle

NOW = 1_763_812_345_123
BASE = NOW - 3 * 3_600_000
PARTS = 3

values = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.integers(-1000, 1000))
reading = st.fixed_dictionaries(
    {"ts": st.integers(BASE, NOW - 1),
     "measurements": st.dictionaries(st.sampled_from(["t", "h", "v"]), values, min_size=1, max_size=3)},
    optional={"seq": st.integers(0, 40), "event_id": st.sampled_from(["a", "b", "c"]),
              "boot_id": st.sampled_from(["b1", "b2"]), "meta": st.just({"site": "n"})},
)
sent_items = st.lists(st.tuples(st.sampled_from(["d1", "d2", "d-3"]), reading), min_size=1, max_size=50)


def _records(items: list[tuple[str, dict]], encodings: list[int], per_message: int = 3) -> list[BusRecord]:
    """Bus records as the gateway writes them, message by message, cycling through ``encodings``."""
    out: list[BusRecord] = []
    offsets = [0] * PARTS
    for k, i in enumerate(range(0, len(items), per_message)):
        msgs = []
        for dev, r in items[i : i + per_message]:
            extra = {f: r[f] for f in ("event_id", "boot_id", "meta") if f in r}
            msgs.append(IngestMessage(topic=f"devices/{dev}/telemetry", received_ms=NOW,
                                      payload=encode_reading_json(dev, r["ts"], r["measurements"], r.get("seq"),
                                                                  **extra)))
        gs = GatewaySettings(bus_encoding=encodings[k % len(encodings)])  # type: ignore[arg-type]
        recs, _, dead = route(msgs, settings=gs, partitions=PARTS, now_ms=NOW)
        assert not dead, dead
        for rec in recs:
            offsets[rec.partition] += 1
            out.append(BusRecord(topic=rec.topic, partition=rec.partition, offset=offsets[rec.partition],
                                 value=rec.value))
    return out


def _state(store: SqliteStore) -> dict:
    q = store.query
    return {
        "raw": sorted(map(str, q("SELECT id, device_id, ts_ms, seq, boot_id, event_id, measurements, meta,"
                                 " received_ms, enrichment FROM readings").rows)),
        "1m": q("SELECT * FROM rollup_1m ORDER BY 1,2,3").rows,
        "1h": q("SELECT * FROM rollup_1h ORDER BY 1,2,3").rows,
        "devices": q("SELECT * FROM devices ORDER BY 1").rows,
        "stats": store.stats(),
        "positions": store.positions(),
        "watermarks": store.watermarks(),
    }


def _run(path: Path, records: list[BusRecord], cut: int) -> dict:
    store = SqliteStore(f"sqlite:///{path}")
    try:
        p = Processor(bus=None, store=store, settings=ProcessorSettings())  # type: ignore[arg-type]
        p.apply_records(records[:cut])
        p.apply_records(records[cut:])
        assert p.stats.corrupt == 0
        return _state(store)
    finally:
        store.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=sent_items, seed=st.integers(0, 2**32 - 1))
def test_v1_v2_and_mixed_pipelines_store_identical_state(tmp_path_factory, items, seed):
    items = list(oracle.unique_readings(items).values())
    rnd = random.Random(seed)
    dup = items + [rnd.choice(items) for _ in range(rnd.randint(0, len(items)))]
    rnd.shuffle(dup)
    d = tmp_path_factory.mktemp("enc")
    v1 = _records(dup, [1])
    v2 = _records(dup, [2])
    assert [r.value[:2] == BUS_V2_MAGIC for r in v2] == [True] * len(v2)
    assert not any(r.value[:1] == b"\xc1" for r in v1)
    cut = rnd.randint(0, len(v1))
    states = [_run(d / "v1.db", v1, cut), _run(d / "v2.db", v2, cut),
              _run(d / "mixed.db", _records(dup, [2, 1, 1]), cut)]  # an upgrade: both on one partition
    assert states[0]["raw"]
    assert states[0] == states[1] == states[2]
    st_ = states[1]["stats"]
    assert (st_.stored, st_.duplicates) == (len(items), len(dup) - len(items))


def test_an_unknown_encoding_version_is_dead_lettered_and_its_position_committed(tmp_path: Path):
    items = [("d1", {"ts": BASE + i * 1000, "seq": i, "measurements": {"t": float(i)}}) for i in range(6)]
    good = _records(items, [2, 1])
    assert len(good) == 2
    future = BusRecord(topic=READINGS_TOPIC, partition=good[0].partition, offset=good[-1].offset + 1,
                       value=b"\xc1\x03" + good[0].value[2:])
    store = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    try:
        p = Processor(bus=None, store=store, settings=ProcessorSettings())  # type: ignore[arg-type]
        res = p.apply_records([*good, future])
        assert (res.stored, res.dead_lettered, p.stats.corrupt) == (6, 1, 1)
        (dl,) = store.dlq(reason=None, limit=10)
        assert dl["reason"] == "schema_violation"
        assert "encoding version 3 is not known" in dl["detail"]
        assert store.positions()[(READINGS_TOPIC, future.partition)] == future.offset
        p2 = Processor(bus=None, store=store, settings=ProcessorSettings())  # type: ignore[arg-type]
        p2._positions = store.positions()
        p2.apply_records([*good, future])  # redelivered after a restart: skipped, not failed again
        assert p2.stats.skipped == 3
        assert store.stats().received == 7
    finally:
        store.close()
