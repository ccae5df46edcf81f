"""Feature rows through the processor equal an oracle computed directly from the readings.

The stream carries 5% duplicates and some late readings (beyond the allowed lateness); it goes through
:class:`~fieldmesh.stream.processor.Processor` (de-duplication in the stream) into the feature stage,
cut into batches of several sizes, and once with a failed feature commit and a restart: every run
gives the oracle's rows exactly (values, window bounds, known_at), once each.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.codec import decode_telemetry, encode_bus_batch, encode_reading_json
from fieldmesh.core.model import BusBatch, Reading
from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.store.features import FeatureTables, SqliteOnlineStore
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.featureviews import FeatureView
from fieldmesh.stream.featuring import FeatureStage
from fieldmesh.stream.processor import Processor
from fmtest.features import check_rows, features_oracle

NOW = 1_763_812_345_000
BASE = NOW - 40 * 60_000
VIEW = FeatureView(name="pump", entity="device", metrics=("t", "p"), windows_ms=(60_000, 300_000), hop_ms=60_000,
                   aggregations=("mean", "min", "max", "stddev", "count", "last", "rate"), ttl_ms=3_600_000,
                   allowed_lateness_ms=20_000)
SITE = FeatureView(name="site", entity="enrichment.site", metrics=("t",), windows_ms=(120_000,), hop_ms=60_000,
                   aggregations=("mean", "count"), ttl_ms=3_600_000)


def _stream(seed: int) -> list[tuple[str, dict[str, Any]]]:
    """(device, reading) in arrival order: mostly in order per device, some late, 5% duplicates."""
    rnd = random.Random(seed)
    out: list[tuple[str, dict[str, Any]]] = []
    clock = {d: BASE for d in ("d1", "d2", "d3")}
    for i in range(900):
        dev = rnd.choice(list(clock))
        clock[dev] += rnd.randrange(500, 8000)
        ts = clock[dev] - (rnd.randrange(30_000, 400_000) if rnd.random() < 0.04 else rnd.randrange(0, 15_000))
        meas = {m: round(rnd.uniform(-50, 150), rnd.randint(0, 6)) for m in rnd.sample(["t", "p", "x"], 2)}
        out.append((dev, {"ts": ts, "seq": i, "measurements": meas, "received": NOW + i * 37,
                          "site": "north" if dev != "d3" else "south"}))
    for _ in range(len(out) // 20):  # 5% duplicates, re-sent later
        j = rnd.randrange(len(out) - 1)
        dev, r = out[j]
        out.insert(rnd.randrange(j + 1, len(out)), (dev, {**r, "received": r["received"] + 1}))
    return out


def _readings(stream: list[tuple[str, dict[str, Any]]]) -> list[Reading]:
    rs: list[Reading] = []
    for dev, r in stream:
        p = encode_reading_json(dev, r["ts"], r["measurements"], r["seq"])
        (one,) = decode_telemetry(p, device_id=dev, topic=f"devices/{dev}/telemetry", received_ms=r["received"],
                                  now_ms=r["received"], max_skew_ms=10**9).readings
        rs.append(one.__class__(**{**{f: getattr(one, f) for f in one.__struct_fields__},
                                   "enrichment": {"site": r["site"]}}))
    return rs


def _records(rs: list[Reading], sizes: list[int]) -> list[BusRecord]:
    out, i, off = [], 0, 1
    while i < len(rs):
        n = sizes[off % len(sizes)]
        value = encode_bus_batch(BusBatch(rs[i:i + n]))
        out.append(BusRecord(topic=READINGS_TOPIC, partition=0, offset=off, value=value))
        i, off = i + n, off + 1
    return out


def _redeliver(recs: list[BusRecord], hot: SqliteStore, stage: FeatureStage) -> list[BusRecord]:
    """What the bus delivers to a restarted processor: the records after the lower of the hot store's and the
    stage's positions."""
    hot_pos, mine = hot.applied(), stage.applied()
    return [r for r in recs if r.offset > min(hot_pos.get((r.topic, r.partition), -1),
                                              mine.get((r.topic, r.partition), -1))]


def _run(tmp_path: Path, name: str, recs: list[BusRecord], *, fail_at: int | None = None,
         checkpoint_s: float = 10.0) -> tuple[list[Any], ...]:
    hot = SqliteStore(f"sqlite:///{tmp_path / (name + '.db')}")
    online = SqliteOnlineStore(tmp_path / (name + "-online.db"))
    views = [VIEW, SITE]
    try:
        stage = FeatureStage(store=hot, views=views, online=online, checkpoint_s=checkpoint_s)
        p = Processor(bus=None, store=hot, settings=ProcessorSettings(), sinks=[stage])  # type: ignore[arg-type]
        for i, rec in enumerate(recs):
            if i == fail_at:  # the feature commit fails after the hot store committed
                real = FeatureTables.commit
                FeatureTables.commit = staticmethod(lambda *a: (_ for _ in ()).throw(OSError("disk")))  # type: ignore[method-assign]
                try:
                    with pytest.raises(OSError):
                        p.apply_records([rec])
                    with pytest.raises(OSError):
                        p.apply_records([rec])  # retried in process: still failing
                finally:
                    FeatureTables.commit = real  # type: ignore[method-assign]
                p.apply_records([rec])  # retried once more: in
                # then the process dies (kill -9: no close, no checkpoint) and starts again
                stage = FeatureStage(store=hot, views=views, online=online, checkpoint_s=checkpoint_s)
                p = Processor(bus=None, store=hot, settings=ProcessorSettings(), sinks=[stage])  # type: ignore[arg-type]
                p._positions = hot.positions()
                p.apply_records(_redeliver(recs[:i + 1], hot, stage))
                continue
            p.apply_records([rec])
        return tuple(hot.transact(lambda tx, v=v: FeatureTables.rows(tx, view=v.name)) for v in views)
    finally:
        online.close()
        hot.close()


@pytest.mark.parametrize("sizes", [[1], [7, 40, 3], [500]])
def test_feature_rows_equal_the_oracle(tmp_path: Path, sizes: list[int]) -> None:
    stream = _stream(11)
    recs = _records(_readings(stream), sizes)
    pump, site = _run(tmp_path, "run", recs)
    exp = features_oracle(stream, VIEW)
    assert len(exp) > 50
    check_rows(pump, exp)
    check_rows(site, features_oracle(stream, SITE))


@pytest.mark.parametrize("checkpoint_s", [0.0, 10.0])
def test_a_failed_feature_commit_and_a_restart_lose_and_duplicate_nothing(tmp_path: Path, checkpoint_s: float) -> None:
    """Checkpoints every batch, or every 10 s (the restart then recomputes from the first batch's checkpoint:
    the rows committed since are recognised, not written again)."""
    stream = _stream(5)
    recs = _records(_readings(stream), [13, 5, 29])
    pump, site = _run(tmp_path, "crash", recs, fail_at=len(recs) // 2, checkpoint_s=checkpoint_s)
    check_rows(pump, features_oracle(stream, VIEW))
    check_rows(site, features_oracle(stream, SITE))


def test_two_replicas_with_partitions_of_their_own_keep_their_own_window_state(tmp_path: Path) -> None:
    stream = _stream(17)
    rs = _readings(stream)
    part = {"d1": 0, "d2": 0, "d3": 1}
    recs: list[BusRecord] = []
    for p in (0, 1):
        mine = [r for r in rs if part[r.device_id] == p]
        recs += [BusRecord(topic=READINGS_TOPIC, partition=p, offset=i + 1,
                           value=encode_bus_batch(BusBatch(mine[k:k + 9])))
                 for i, k in enumerate(range(0, len(mine), 9))]
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")

    def replica(p: int) -> Processor:
        stage = FeatureStage(store=hot, views=[VIEW], online=None, partitions=[p], checkpoint_s=0.0)
        proc = Processor(bus=None, store=hot, settings=ProcessorSettings(), sinks=[stage])  # type: ignore[arg-type]
        proc._positions = hot.positions()
        return proc

    try:
        procs = {0: replica(0), 1: replica(1)}
        by_part = {p: [r for r in recs if r.partition == p] for p in (0, 1)}
        half = {p: len(v) // 2 for p, v in by_part.items()}
        for i in range(max(half.values())):  # interleaved, as two processes would
            for p in (0, 1):
                if i < half[p]:
                    procs[p].apply_records([by_part[p][i]])
        procs = {0: replica(0), 1: replica(1)}  # both restart: each restores its own window state
        for p in (0, 1):
            for rec in by_part[p][half[p]:]:
                procs[p].apply_records([rec])
        check_rows(hot.transact(lambda tx: FeatureTables.rows(tx, view=VIEW.name)), features_oracle(stream, VIEW))
    finally:
        hot.close()
