"""The lake sink (:mod:`fieldmesh.store.lake`) behind ``Processor(sinks=[...])``, read back through pyiceberg.

A hot SQLite store claims the keys; the lake sink receives every committed result. What the lake holds
must equal :mod:`fmtest.oracle` after a stream with duplicates, disorder, forced key collisions and late
readings, across restarts that lose the sink's buffer (the bus redelivers from the lowest position of
the hot store and the sink) and a crash between the commits of one flush's tables.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.store.test_sink_behaviour import collide, make_items, readings_of, records

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.batch import Position
from fieldmesh.core.codec import decode_telemetry, encode_reading_json
from fieldmesh.core.errors import ConfigError
from fieldmesh.core.model import DeadLetter
from fieldmesh.core.settings import LakeSettings, ProcessorSettings
from fieldmesh.core.topics import DLQ_TOPIC, READINGS_TOPIC
from fieldmesh.store.lake import (
    PROP_FLUSH,
    PROP_POSITIONS,
    TABLE_PROPERTIES,
    LakeError,
    LakeSink,
    catalog_properties,
    compact,
    expire,
    lake_info,
    lake_lag,
    open_catalog,
)
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.processor import Processor
from fmtest import oracle

NOW = 1_763_812_345_123

pytestmark = pytest.mark.timeout(300)


def settings(**kw: Any) -> LakeSettings:
    return LakeSettings(commit_interval_s=kw.pop("commit_interval_s", 3600.0), **kw)


def sent(seed: int, n: int = 200) -> tuple[list[tuple[str, dict[str, Any]]], list[Any]]:
    """Distinct items and what was sent: collided keys, a third more duplicates, shuffled, and a tail of
    readings from hours before the rest (late: they correct closed windows)."""
    rnd = random.Random(seed)
    items = make_items(seed, n)
    rs = collide(readings_of(items), rnd)
    rs = rs + [rnd.choice(rs) for _ in range(len(rs) // 3)]
    rnd.shuffle(rs)
    old = [("d1", {"ts": min(r["ts"] for _, r in items) - 7_200_000 + k * 1000, "seq": 10_000 + k,
                   "measurements": {"t": k * 0.1}}) for k in range(20)]
    rs += readings_of(old)  # after the rest: late
    return items + old, rs


def processor(hot: SqliteStore, sink: LakeSink) -> Processor:
    """A processor without a bus (records handed to ``apply_records``) over ``hot``, fanning out to ``sink``."""
    return Processor(bus=None, store=hot, settings=ProcessorSettings(), sinks=[sink])  # type: ignore[arg-type]


def redeliver(recs: list[BusRecord], hot: SqliteStore, sink: LakeSink) -> list[BusRecord]:
    """What the bus delivers to a restarted processor: records after min(hot, sink) per partition."""
    hot_pos, mine = hot.applied(), sink.applied()
    start: dict[Position, int] = {p: min(o, mine[p]) for p, o in hot_pos.items() if p in mine}
    return [r for r in recs if r.offset > start.get((r.topic, r.partition), -1)]


def lake_rows(catalog: Any, table: str) -> list[dict[str, Any]]:
    return catalog.load_table(f"fieldmesh.{table}").scan().to_arrow().to_pylist()  # type: ignore[no-any-return]


def assert_lake_oracle(catalog: Any, items: list[tuple[str, dict[str, Any]]]) -> None:
    rows = lake_rows(catalog, "readings")
    got = sorted((r["device_id"], int(r["ts"].timestamp() * 1000), r["seq"]) for r in rows)
    assert len(got) == len(set(got)), "duplicate rows in the lake"
    assert got == sorted((d, r["ts"], r.get("seq")) for d, r in oracle.unique_readings(items).values())
    for r in rows:
        assert dict(r["measurements"]) == {k: float(v) for k, v in json.loads(r["measurements_json"]).items()}
    for interval in ("1m", "1h"):
        expected = oracle.rollups(items, interval)
        lake = lake_rows(catalog, f"rollup_{interval}")
        got_r = {(r["device_id"], r["metric"], int(r["window_start"].timestamp() * 1000)): r for r in lake}
        assert len(got_r) == len(lake), "two rows for one window"
        assert set(got_r) == set(expected)
        for k, e in expected.items():
            g = got_r[k]
            assert (g["count"], g["sum"], g["min"], g["max"], g["avg"]) == (
                e["count"], e["sum"], e["min"], e["max"], e["avg"]), k


class _Capture:
    """A sink that keeps every result (to hand them to a lake sink, or write them again)."""

    name = "capture"

    def __init__(self) -> None:
        self.results: list[Any] = []

    def applied(self) -> dict[Position, int]:
        return {}

    def write(self, result: Any) -> bool:
        self.results.append(result)
        return True

    def close(self) -> None:
        pass


def test_a_stream_with_restarts_that_lose_the_buffer_equals_the_oracle(tmp_path: Path) -> None:
    items, rs = sent(5)
    recs = records(rs, [7, 3, 11, 1])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    catalog = open_catalog(settings(), tmp_path)
    try:
        sink = LakeSink(settings=settings(), data_dir=tmp_path)
        p = processor(hot, sink)
        third = len(recs) // 3
        p.apply_records(recs[:third])
        sink.flush()
        committed = sink.applied()
        assert committed == hot.applied()
        p.apply_records(recs[third : 2 * third])  # buffered, never committed: the process dies
        assert sink.applied() == committed
        sink._closing = True  # the crash: the buffer is gone, the commit thread stops

        upto = 2 * third
        for _ in range(2):  # restart, and die again after a commit and some more buffered
            sink = LakeSink(settings=settings(), data_dir=tmp_path)
            assert sink.applied() == committed
            p = processor(hot, sink)
            p._positions = hot.positions()
            again = redeliver(recs[:upto], hot, sink)
            assert again, "the bus redelivers what the sink lacks"
            p.apply_records(again)
            sink.flush()
            committed = sink.applied()
            assert committed == hot.applied()
            p.apply_records(recs[upto : upto + 3])
            upto += 3
            sink._closing = True

        sink = LakeSink(settings=settings(), data_dir=tmp_path)
        p = processor(hot, sink)
        p._positions = hot.positions()
        p.apply_records(redeliver(recs, hot, sink))
        p.apply_records(recs[-5:])  # a redelivery both have: skipped
        sink.close()
        assert sink.applied() == hot.applied()
        assert_lake_oracle(catalog, items)
        late = [r for r in lake_rows(catalog, "readings") if r["late"]]
        assert len(late) >= 19  # the old tail was late (its first reading may open the window again)
    finally:
        hot.close()


def test_a_flush_committed_to_some_tables_only_is_completed_table_by_table(tmp_path: Path) -> None:
    items, rs = sent(9, n=120)
    recs = records(rs, [5])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    catalog = open_catalog(settings(), tmp_path)
    try:
        dead = _flushed_in_part(tmp_path, hot, recs, len(recs) // 2, len(recs))
        committed = dead.applied()  # what every table took: the first flush
        assert len(lake_rows(catalog, "readings")) > 0
        # readings hold all the hot store has, rollup_1h does not: the lake is behind (health, 'up', tests)
        assert lake_lag(catalog, "fieldmesh", hot.applied())[0] > 0

        sink = LakeSink(settings=settings(), data_dir=tmp_path)  # nothing rolled back: each table resumes
        assert sink.applied() == committed
        assert sink.applied_of(("readings",)) == hot.applied()
        views = sink.views()
        assert sorted(v.tables for v in views) == [("readings", "rollup_1m"), ("rollup_1h", "dead_letters")]
        for name in ("readings", "rollup_1m"):
            snap = catalog.load_table(f"fieldmesh.{name}").current_snapshot()
            assert snap.summary[PROP_FLUSH] == "2", name
        p = Processor(bus=None, store=hot, settings=ProcessorSettings(), sinks=views)  # type: ignore[arg-type]
        p._positions = hot.positions()
        p.apply_records(redeliver(recs, hot, sink))
        sink.close()
        assert sink.applied() == hot.applied()
        assert lake_lag(catalog, "fieldmesh", hot.applied())[0] == 0
        assert_lake_oracle(catalog, items)
    finally:
        hot.close()


def _flushed_in_part(tmp_path: Path, hot: SqliteStore, recs: list[BusRecord], half: int, upto: int) -> LakeSink:
    """A lake sink (dead) that committed ``recs[:half]`` to every table, then crashed in its flush of
    ``recs[half:upto]`` after readings and rollup_1m took it, before rollup_1h (``hot`` committed them all)."""
    sink = LakeSink(settings=settings(), data_dir=tmp_path)
    p = processor(hot, sink)
    p.apply_records(recs[:half])
    sink.flush()
    p.apply_records(recs[half:upto])
    with sink._cond:
        buf = sink._take()
    sink._commit_table("readings", buf, sink._flush + 1)
    sink._commit_table("rollup_1m", buf, sink._flush + 1)
    sink._closing = True
    return sink


def test_write_skips_results_already_applied(tmp_path: Path) -> None:
    _, rs = sent(2, n=60)
    recs = records(rs, [4])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    try:
        sink = LakeSink(settings=settings(), data_dir=tmp_path)
        p = processor(hot, sink)
        p.apply_records(recs)
        cap = _Capture()
        hot2 = SqliteStore(f"sqlite:///{tmp_path / 'hot2.db'}")
        Processor(bus=None, store=hot2, settings=ProcessorSettings(), sinks=[cap]).apply_records(  # type: ignore[arg-type]
            recs)
        hot2.close()
        results = cap.results
        assert results and all(sink.write(r) is False for r in results)  # buffered: skipped
        sink.flush()
        assert all(sink.write(r) is False for r in results)  # committed: skipped
        sink.close()
        sink = LakeSink(settings=settings(), data_dir=tmp_path)
        assert all(sink.write(r) is False for r in results)  # after a restart: skipped
        assert sink.applied() == hot.applied()
        sink.close()
    finally:
        hot.close()


def test_dead_letters_reach_the_lake(tmp_path: Path) -> None:
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    try:
        sink = LakeSink(settings=settings(), data_dir=tmp_path)
        p = processor(hot, sink)
        from fieldmesh.core.codec import encode_dead_letter

        dl = DeadLetter(reason="bad_json", detail="not JSON", topic="devices/d9/telemetry", received_ms=NOW,
                        payload=b"\xff{", device_id="d9")
        p.apply_records([BusRecord(topic=DLQ_TOPIC, partition=0, offset=1, value=encode_dead_letter(dl))])
        sink.close()
        rows = lake_rows(open_catalog(settings(), tmp_path), "dead_letters")
        assert [(r["reason"], r["device_id"], r["payload"]) for r in rows] == [("bad_json", "d9", b"\xff{")]
        assert sink.applied() == {(DLQ_TOPIC, 0): 1}
    finally:
        hot.close()


def test_commits_by_time_without_a_flush_call(tmp_path: Path) -> None:
    res = decode_telemetry(encode_reading_json("d1", NOW, {"t": 1.5}, 1), device_id="d1",
                           topic="devices/d1/telemetry", received_ms=NOW)
    recs = records(res.readings, [1])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    try:
        s = settings(commit_interval_s=0.5)
        sink = LakeSink(settings=s, data_dir=tmp_path)
        processor(hot, sink).apply_records(recs)
        catalog = open_catalog(s, tmp_path)
        import time

        deadline = time.monotonic() + 60
        while sink.applied() != hot.applied() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sink.applied() == hot.applied()
        assert len(lake_rows(catalog, "readings")) == 1
        assert sink.lag_ms() == 0
        sink.close()
    finally:
        hot.close()


def test_info_compact_and_expire(tmp_path: Path) -> None:
    items, rs = sent(4, n=150)
    recs = records(rs, [3])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    s = settings()
    try:
        sink = LakeSink(settings=s, data_dir=tmp_path)
        p = processor(hot, sink)
        for i in range(0, len(recs), 10):  # one flush per 10 records: small files
            p.apply_records(recs[i : i + 10])
            sink.flush()
        catalog = open_catalog(s, tmp_path)
        before = len(catalog.load_table("fieldmesh.readings").inspect.files())
        out = compact(catalog, "fieldmesh")
        after = len(catalog.load_table("fieldmesh.readings").inspect.files())
        assert out["fieldmesh.readings"]["partitions"] > 0 and after < before
        assert_lake_oracle(catalog, items)
        # the sink goes on after a compaction; its state is carried in the compaction's snapshot
        t = catalog.load_table("fieldmesh.readings").current_snapshot()
        assert PROP_POSITIONS in t.summary.additional_properties
        sink.close()
        sink = LakeSink(settings=s, data_dir=tmp_path)
        assert sink.applied() == hot.applied()
        sink.close()
        n = len(catalog.load_table("fieldmesh.readings").snapshots())
        expired = expire(catalog, "fieldmesh", older_than_s=0, keep_last=2)
        assert 0 < expired["fieldmesh.readings"] < n
        assert_lake_oracle(catalog, items)
        info = lake_info(s, tmp_path)
        assert info["catalog"]["type"] == "sql" and info["catalog"]["uri"].startswith("sqlite:///")
        assert set(info["tables"]) == {f"fieldmesh.{t}" for t in ("readings", "rollup_1m", "rollup_1h",
                                                                   "dead_letters", "features")}
    finally:
        hot.close()


def test_a_commit_reads_only_the_snapshots_it_has_not_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a table holds is read from its history once, at the start; a commit then reads the snapshots
    after the last one the sink saw (its own last commit), not every snapshot again: a day of commits once a
    minute would otherwise decode 1,440 x 1,440 / 2 snapshot summaries per table."""
    from fieldmesh.store import lake

    items, rs = sent(9, n=150)
    recs = records(rs, [2])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    try:
        sink = LakeSink(settings=settings(), data_dir=tmp_path)
        p = processor(hot, sink)
        step = len(recs) // 30 + 1
        chunks = [recs[i : i + step] for i in range(0, len(recs), step)]
        for chunk in chunks[:20]:  # a history of 20 flushes
            p.apply_records(chunk)
            sink.flush()
        decoded = 0
        real = lake._decode_positions

        def counting(text: str) -> dict[Position, int]:
            nonlocal decoded
            decoded += 1
            return real(text)

        monkeypatch.setattr(lake, "_decode_positions", counting)
        flushes = 0
        for chunk in chunks[20:]:
            p.apply_records(chunk)
            sink.flush()
            flushes += 1
        assert flushes >= 5
        # per table and flush: its own last snapshot (a rollup overwrite leaves two); 20+ if read again
        assert decoded <= flushes * 4 * 2, decoded
        monkeypatch.undo()
        sink.close()
        restarted = LakeSink(settings=settings(), data_dir=tmp_path)  # the full read, at the start
        assert restarted.applied() == hot.applied()
        restarted.close()
        assert_lake_oracle(open_catalog(settings(), tmp_path), items)
    finally:
        hot.close()


def test_exactly_once_holds_after_expiry_and_a_restart_that_loses_the_buffer(tmp_path: Path) -> None:
    """Expiry as aggressive as it goes (every snapshot is older than 0 s; keep only the last): what each table
    holds is still read correctly at a restart, so a lost buffer is replayed, and only it."""
    items, rs = sent(10, n=150)
    recs = records(rs, [3, 5])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    catalog = open_catalog(settings(), tmp_path)
    try:
        sink = LakeSink(settings=settings(), data_dir=tmp_path)
        p = processor(hot, sink)
        half = len(recs) // 2
        for i in range(0, half, 5):
            p.apply_records(recs[i : min(i + 5, half)])
            sink.flush()
        expired = expire(catalog, "fieldmesh", older_than_s=0, keep_last=1)
        assert expired["fieldmesh.readings"] > 5
        assert sink.maintain(older_than_s=0)[0]["fieldmesh.readings"] == 0  # kept: the one snapshot left
        committed = sink.applied()
        assert committed == hot.applied()
        p.apply_records(recs[half:])  # buffered, never committed: the process dies
        sink._closing = True
        sink = LakeSink(settings=settings(), data_dir=tmp_path)
        assert sink.applied() == committed
        p = processor(hot, sink)
        p._positions = hot.positions()
        p.apply_records(redeliver(recs, hot, sink))
        sink.flush()
        assert sink.applied() == hot.applied()
        expire(catalog, "fieldmesh", older_than_s=0, keep_last=1)
        sink.close()
        sink = LakeSink(settings=settings(), data_dir=tmp_path)
        assert sink.applied() == hot.applied()
        assert not redeliver(recs, hot, sink)
        sink.close()
        assert_lake_oracle(catalog, items)
    finally:
        hot.close()


def test_tables_merge_their_manifests_and_keep_few_metadata_files(tmp_path: Path) -> None:
    """The sink's tables merge manifests (a commit a minute would add 1,440 a day, each read by every commit and
    scan) and delete old metadata files; a table of an earlier version gets the properties when the sink opens
    it, a value set by hand stays."""
    s = settings()
    catalog = open_catalog(s, tmp_path)
    catalog.create_namespace("fieldmesh")
    sink = LakeSink(settings=s, data_dir=tmp_path)
    sink.close()
    t = catalog.load_table("fieldmesh.readings")
    assert {k: t.properties.get(k) for k in TABLE_PROPERTIES} == TABLE_PROPERTIES
    with t.transaction() as tx:  # as an earlier version left it, and a setting of the user's
        tx.remove_properties("commit.manifest-merge.enabled", "write.metadata.delete-after-commit.enabled")
        tx.set_properties({"commit.manifest.min-count-to-merge": "4", "write.metadata.previous-versions-max": "3"})
    items, rs = sent(11, n=100)
    recs = records(rs, [1])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    try:
        sink = LakeSink(settings=s, data_dir=tmp_path)
        t = catalog.load_table("fieldmesh.readings")
        assert t.properties["commit.manifest-merge.enabled"] == "true"
        assert t.properties["write.metadata.previous-versions-max"] == "3"
        p = processor(hot, sink)
        for i in range(0, len(recs), max(1, len(recs) // 12)):
            p.apply_records(recs[i : i + max(1, len(recs) // 12)])
            sink.flush()
        sink.close()
        t = catalog.load_table("fieldmesh.readings")
        assert len(t.snapshots()) > 10
        assert len(t.current_snapshot().manifests(t.io)) <= 4  # type: ignore[union-attr]
        metadata = Path(t.location().removeprefix("file://")) / "metadata"
        assert len(list(metadata.glob("*.metadata.json"))) <= 3 + 2  # the last 3, the current one, one in flight
        assert_lake_oracle(catalog, items)
    finally:
        hot.close()


def test_a_table_changed_outside_fieldmesh_is_named(tmp_path: Path) -> None:
    from pyiceberg.types import StringType

    s = settings()
    LakeSink(settings=s, data_dir=tmp_path).close()
    t = open_catalog(s, tmp_path).load_table("fieldmesh.rollup_1m")
    with t.update_schema() as u:
        u.delete_column("sum_exact")
        u.add_column("note", StringType())
    with pytest.raises(LakeError, match=r"fieldmesh.rollup_1m .*sum_exact"):
        LakeSink(settings=s, data_dir=tmp_path)


def test_catalog_urls() -> None:
    assert catalog_properties(LakeSettings(url="http://127.0.0.1:8181", warehouse="s3://w/"), Path("/x")) == {
        "type": "rest", "uri": "http://127.0.0.1:8181", "warehouse": "s3://w/"}
    with pytest.raises(ConfigError, match="LAKE__WAREHOUSE"):
        catalog_properties(LakeSettings(url="postgresql://h/db"), Path("/x"))
    with pytest.raises(ConfigError, match="LAKE__URL"):
        catalog_properties(LakeSettings(url="ftp://x"), Path("/x"))
    assert catalog_properties(LakeSettings(url="postgresql://h/db", warehouse="file:///w"), Path("/x"))["uri"] == (
        "postgresql+psycopg://h/db")
    assert READINGS_TOPIC


def test_maintenance_inside_the_sink_compacts_closed_partitions_while_it_commits(tmp_path: Path) -> None:
    import time

    items, rs = sent(6, n=150)
    recs = records(rs, [3])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    s = settings(commit_interval_s=0.1, maintenance_interval_s=1.0)
    try:
        sink = LakeSink(settings=s, data_dir=tmp_path)
        p = processor(hot, sink)
        catalog = open_catalog(s, tmp_path)

        def files() -> list[Any]:
            return catalog.load_table("fieldmesh.readings").inspect.files().to_pylist()  # type: ignore[no-any-return]

        step = len(recs) // 6 + 1
        for i in range(0, len(recs), step):  # one commit per chunk: small files
            p.apply_records(recs[i : i + step])
            deadline = time.monotonic() + 30
            while sink.applied() != hot.applied() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sink.applied() == hot.applied()
        before = files()
        partitions = {tuple(f["partition"].values()) for f in before}
        assert len(before) > len(partitions)  # several small files per partition
        # a round of maintenance ending after now ran after the last chunk's commit (the commit thread runs
        # both, one after the other), so it saw every small file: wait for one (rounds run only after a
        # commit, so commit something now and then), however long a loaded machine takes
        rounds = sink.maintenances
        deadline = time.monotonic() + 240
        k = 0
        while sink.maintenances <= rounds and time.monotonic() < deadline:
            time.sleep(0.3)
            if sink.lag_ms() == 0:
                k += 1  # redeliveries at new positions: a commit, with no new reading
                p.apply_records(records(rs[:1], [1], start=10_000 + k))
        assert sink.maintenances > rounds, "no maintenance ran inside the sink"
        assert len(files()) == len(partitions)  # every day of these readings is closed: one file each
        sink.close()
        assert_lake_oracle(catalog, items)
    finally:
        hot.close()


def test_lake_info_json_is_what_a_pyiceberg_client_needs(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from pyiceberg.catalog import load_catalog

    items, rs = sent(8, n=40)
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    try:
        sink = LakeSink(settings=settings(), data_dir=tmp_path)
        processor(hot, sink).apply_records(
            records(rs, [5]))
        sink.close()
        positions = {f"{t}:{p}": o for (t, p), o in hot.applied().items()}
    finally:
        hot.close()
    src = Path(__file__).resolve().parents[2] / "src"
    out = subprocess.run([sys.executable, "-m", "fieldmesh", "lake", "info", "--json", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "PYTHONPATH": str(src)})
    info = json.loads(out.stdout)
    assert info["tables"]["fieldmesh.readings"]["positions"] == positions
    # a plain pyiceberg client, nothing of fieldmesh (an SQL catalog keeps tables per catalog name)
    cat = load_catalog(info["catalog_name"], **info["catalog"])
    for cmd in (["compact"], ["expire", "--older-than-s", "0", "--keep-last", "1"]):
        done = subprocess.run([sys.executable, "-m", "fieldmesh", "lake", *cmd, "--json", "--data-dir", str(tmp_path)],
                              capture_output=True, text=True, timeout=120, check=True,
                              env={**os.environ, "PYTHONPATH": str(src)})
        assert set(json.loads(done.stdout)) == set(info["tables"]), done.stdout
    assert cat.load_table("fieldmesh.readings").scan().to_arrow().num_rows == len(oracle.unique_readings(items))


def test_commits_failing_meanwhile_are_retried_until_the_lake_takes_them(tmp_path: Path) -> None:
    import shutil
    import time

    items, rs = sent(10, n=80)
    recs = records(rs, [4])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    s = settings(commit_interval_s=0.1)
    try:
        sink = LakeSink(settings=s, data_dir=tmp_path)
        p = processor(hot, sink)
        warehouse = tmp_path / "lake" / "warehouse"
        shutil.move(warehouse, tmp_path / "aside")
        warehouse.write_text("not a directory")  # every data file write fails now
        p.apply_records(recs)  # the hot store commits; the processor is not held up
        time.sleep(2.0)
        assert sink.applied() == {} and sink.lag_ms() > 1000  # not committed, the lag shows
        warehouse.unlink()
        shutil.move(tmp_path / "aside", warehouse)
        deadline = time.monotonic() + 90  # the backoff is capped at 30 s
        while sink.applied() != hot.applied() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sink.applied() == hot.applied()
        sink.close()
        assert_lake_oracle(open_catalog(s, tmp_path), items)
    finally:
        hot.close()


def test_a_compaction_that_loses_to_a_sink_commit_retries_and_leaves_no_stray_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fieldmesh.store.lake as lake_mod

    items, rs = sent(6, n=120)
    recs = records(rs, [3])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    s = settings()
    try:
        sink = LakeSink(settings=s, data_dir=tmp_path)
        p = processor(hot, sink)
        half = len(recs) // 2
        for i in range(0, half, 8):  # small files
            p.apply_records(recs[i : i + 8])
            sink.flush()
        catalog = open_catalog(s, tmp_path)
        real = lake_mod._rewrite_files
        written: list[list[str]] = []

        def rewrite_then_the_sink_commits(table: Any, tasks: list[Any], target: int) -> list[Any]:
            files = real(table, tasks, target)
            written.append([f.file_path for f in files])
            if len(written) == 1:  # the sink commits while the first rewrite is under way
                p.apply_records(recs[half:])
                sink.flush()
            return files

        monkeypatch.setattr(lake_mod, "_rewrite_files", rewrite_then_the_sink_commits)
        out = compact(catalog, "fieldmesh", tables=["readings"])
        assert out["fieldmesh.readings"]["partitions"] > 0
        assert len(written) > 1, "the compaction did not retry after losing to the sink"
        first = written[0]
        assert first and not any(Path(f.removeprefix("file://")).exists() for f in first), "stray files left"
        live = {t.file.file_path for t in catalog.load_table("fieldmesh.readings").scan().plan_files()}
        assert not live & set(first)
        sink.close()
        assert_lake_oracle(catalog, items)
    finally:
        hot.close()


def test_processes_opening_a_new_catalog_at_once_all_open_it(tmp_path: Path) -> None:
    """pyiceberg's SQL catalog checks for its tables and then creates them, so two processors starting on a
    new lake at once raced: one failed with "table iceberg_tables already exists", and creating the namespace
    raced the same way. Each must open the lake."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    for k in range(3):
        data_dir = tmp_path / f"d{k}"
        barrier = ctx.Barrier(6)
        procs = [ctx.Process(target=_open_together, args=(data_dir, barrier)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0] * 6
        catalog = open_catalog(settings(), data_dir)
        assert catalog.list_namespaces() == [("fieldmesh",)]
        assert sorted(t for _, t in catalog.list_tables("fieldmesh")) == ["dead_letters", "features", "readings",
                                                                          "rollup_1h", "rollup_1m"]


def _open_together(data_dir: Path, barrier: Any) -> None:
    import pyiceberg.catalog.sql  # noqa: F401  (imported before the barrier: the opens start together)

    barrier.wait(60)
    LakeSink(settings=settings(), data_dir=data_dir).close()  # opens the catalog, creates the namespace, tables


def test_the_lake_process_holds_results_for_its_child_within_a_byte_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The processor hands results to the lake's child process through a queue bounded in bytes as well as in
    count: with a bound below one result, a write waits until the one before it is in the pipe, so the
    processor holds one result at most while the child commits (its buffer full: it stops reading the pipe).
    What the child commits equals the oracle all the same."""
    from fieldmesh.store import lakeproc

    monkeypatch.setattr(lakeproc, "_QUEUED_BYTES", 1)
    items, rs = sent(9)
    recs = records(rs, [2, 1, 3])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    lake = lakeproc.LakeProcess(settings=settings(commit_rows=8), data_dir=tmp_path)
    sizes: list[int] = []
    size_of = lakeproc._size
    monkeypatch.setattr(lakeproc, "_size", lambda r: sizes.append(size_of(r)) or sizes[-1])
    try:
        p = Processor(bus=None, store=hot, settings=ProcessorSettings(), sinks=[lake])  # type: ignore[arg-type]
        for i in range(0, len(recs), 4):
            p.apply_records(recs[i : i + 4])
            assert lake._queued_bytes <= sizes[-1], "more than the last result waits for the pipe"
        assert len(sizes) > 20
        lake.close()
        assert lake._queued_bytes == 0
        assert_lake_oracle(open_catalog(settings(), tmp_path), items)
    finally:
        lake.close()
        hot.close()


def test_the_lake_process_takes_a_batch_for_every_table_in_one_message(tmp_path: Path) -> None:
    """The processor holds one view of the lake's child per table (made before the child opens the tables). The
    first view's write hands the result over for every table that stands where its table does, and the other
    views find it handed over: one message to the child a batch, not one per table. What the child commits equals
    the oracle."""
    from fieldmesh.store import lakeproc

    items, rs = sent(13)
    recs = records(rs, [2, 1, 3])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    lake = lakeproc.LakeProcess(settings=settings(), data_dir=tmp_path)
    try:
        views = lake.views()
        assert len(views) == 4
        p = Processor(bus=None, store=hot, settings=ProcessorSettings(), sinks=views)  # type: ignore[arg-type]
        for i in range(0, len(recs), 4):
            p.apply_records(recs[i : i + 4])
        assert p.stats.batches > 20
        assert lake.handed == p.stats.batches, (lake.handed, p.stats.batches)
        lake.close()
        assert_lake_oracle(open_catalog(settings(), tmp_path), items)
    finally:
        lake.close()
        hot.close()


def test_the_lake_process_hands_tables_at_other_positions_their_own_results(tmp_path: Path) -> None:
    """After a flush that reached some tables only, the tables ahead do not take what the others lack: each view
    of the lake's child brings its own table up to the hot store, then the tables take each batch together again.
    What the child commits equals the oracle."""
    from fieldmesh.store import lakeproc

    items, rs = sent(9, n=120)
    recs = records(rs, [5])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    catalog = open_catalog(settings(), tmp_path)
    lake = None
    try:
        half = len(recs) // 2
        dead = _flushed_in_part(tmp_path, hot, recs, half, half + 20)
        lake = lakeproc.LakeProcess(settings=settings(), data_dir=tmp_path)
        assert lake.applied_of(("readings",)) == hot.applied() != lake.applied_of(("rollup_1h",))
        p = Processor(bus=None, store=hot, settings=ProcessorSettings(), sinks=lake.views())  # type: ignore[arg-type]
        p._positions = hot.positions()
        again = redeliver(recs[: half + 20], hot, dead)
        assert again
        p.apply_records(again)  # only rollup_1h and dead_letters lack these: one message for the two
        assert lake.handed == 1
        rest = recs[half + 20 :]
        for i in range(0, len(rest), 4):
            p.apply_records(rest[i : i + 4])
        assert lake.handed == 1 + (len(rest) + 3) // 4  # then every table together, a message a batch
        lake.close()
        assert lake_lag(catalog, "fieldmesh", hot.applied())[0] == 0
        assert_lake_oracle(catalog, items)
    finally:
        if lake is not None:
            lake.close()
        hot.close()


def test_the_buffer_commits_at_its_byte_bound(tmp_path: Path) -> None:
    """Buffered readings are counted by their arrow bytes: with a bound of a few results' worth (and no bound
    of rows or time that could bind), the sink commits as the bytes come, several times in one run, and what
    it commits equals the oracle."""
    items, rs = sent(11)
    recs = records(rs, [2, 1, 3])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    sink = LakeSink(settings=settings(commit_rows=10**9, commit_bytes=16_384), data_dir=tmp_path)
    try:
        p = Processor(bus=None, store=hot, settings=ProcessorSettings(), sinks=[sink])  # type: ignore[arg-type]
        for i in range(0, len(recs), 4):
            p.apply_records(recs[i : i + 4])
            assert sink._buf.nbytes < 2 * 16_384 + 16_384, "the buffer ran past twice its bound and a result"
        with sink._cond:
            sink._cond.wait_for(lambda: not sink._flushing, timeout=60)
        assert sink.commits >= 3, f"{sink.commits} commits: the byte bound did not make the sink commit"
        sink.close()
        assert_lake_oracle(open_catalog(settings(), tmp_path), items)
    finally:
        sink.close()
        hot.close()


def test_readings_files_are_what_pyicebergs_writer_writes_with_dictionaries_where_values_repeat(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sink writes the readings' Parquet files itself (``_FileWriter``), in the partitions its buffer knows;
    pyiceberg's ``write_file`` writes them for a table whose schema is not the sink's, in the partitions
    ``_append`` computes. Both give the same partitions, the same Parquet schema (field ids included), the
    same statistics in the manifests and the same rows; only the repeating columns are dictionary-encoded."""
    import pyarrow.parquet as pq

    from fieldmesh.store import lake

    items, rs = sent(7, 300)
    cap = _Capture()
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    try:
        Processor(bus=None, store=hot, settings=ProcessorSettings(), sinks=[cap]).apply_records(  # type: ignore[arg-type]
            records(rs, [7, 40, 13]))
    finally:
        hot.close()
    mine = LakeSink(settings=settings(namespace="mine"), data_dir=tmp_path)
    theirs = LakeSink(settings=settings(namespace="theirs"), data_dir=tmp_path)
    try:
        schema = mine._arrow["readings"]
        data, keys, starts = lake.readings_ordered_runs(
            [lake.readings_part(r, schema, mine.settings.readings_buckets) for r in cap.results if len(r.new)], schema)
        assert data.num_rows == len(oracle.unique_readings(items)) and data.num_rows > 200
        partitions = mine._readings_partitions(mine._tables["readings"], keys, starts)
        assert partitions is not None and len(partitions) > 1  # the sink's own table: the buffer's partitions
        lake._append(mine._tables["readings"], data, lake._props(1, {}), lake._DICTIONARY["readings"], partitions)
        init = lake._FileWriter.__init__
        used: list[bool] = []

        def through_pyiceberg(self: Any, *args: Any) -> None:
            init(self, *args)
            used.append(self.direct)
            self.direct = False

        monkeypatch.setattr(lake._FileWriter, "__init__", through_pyiceberg)
        lake._append(theirs._tables["readings"], data, lake._props(1, {}), lake._DICTIONARY["readings"])
        assert used == [True]  # the sink's own tables take the direct path

        def files(sink: LakeSink) -> dict[Any, Any]:
            table = sink.catalog.load_table(f"{sink.settings.namespace}.readings")
            return {tuple(t.file.partition): t.file for t in table.scan().plan_files()}

        a, b = files(mine), files(theirs)
        assert set(a) == set(b) and len(a) > 1  # one file per (day, device bucket), the same partitions
        for part, fa in a.items():
            fb = b[part]
            for field in ("record_count", "value_counts", "null_value_counts", "nan_value_counts", "lower_bounds",
                          "upper_bounds", "spec_id", "file_format"):
                assert getattr(fa, field) == getattr(fb, field), (part, field)
            pa_, pb = pq.ParquetFile(fa.file_path.removeprefix("file://")), pq.ParquetFile(fb.file_path.removeprefix("file://"))
            assert pa_.schema_arrow.equals(pb.schema_arrow, check_metadata=True)
            assert pa_.read().equals(pb.read())
            chunks = {pa_.metadata.row_group(0).column(i).path_in_schema: pa_.metadata.row_group(0).column(i).encodings
                      for i in range(pa_.metadata.num_columns)}
            dictionary = {p for p, enc in chunks.items() if any("DICTIONARY" in e for e in enc)}
            assert {"device_id", "measurements.key_value.key"} <= dictionary
            assert not dictionary & {"measurements_json", "ts", "key", "measurements.key_value.value"}
    finally:
        mine.close()
        theirs.close()


def test_readings_land_in_the_tables_partitions_when_the_bucket_setting_changed(tmp_path: Path) -> None:
    """A sink opened with another ``readings_buckets`` than the table was created with: its buffer's partition keys
    are not the table's, so the commit computes the partitions from the rows (the table's spec), and the lake
    still equals the oracle, every file in the partition its rows belong to."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from pyiceberg.transforms import BucketTransform
    from pyiceberg.types import StringType

    items, rs = sent(11, 150)
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    first = LakeSink(settings=settings(), data_dir=tmp_path)  # creates the table: 8 buckets
    first.close()
    sink = LakeSink(settings=settings(readings_buckets=3), data_dir=tmp_path)
    try:
        assert sink._readings_partitions(sink._tables["readings"], np.array([0]), [0]) is None
        processor(hot, sink).apply_records(records(rs, [5, 50, 9]))
        sink.flush()
        assert_lake_oracle(open_catalog(settings(), tmp_path), items)
        table = sink.catalog.load_table("fieldmesh.readings")
        bucket = BucketTransform(8).pyarrow_transform(StringType())
        tasks = list(table.scan().plan_files())
        devices = pa.array(sorted({d for d, _ in items}))
        assert bucket(devices) != BucketTransform(3).pyarrow_transform(StringType())(devices)  # the test can fail
        for t in tasks:
            rows = pq.read_table(t.file.file_path.removeprefix("file://"))
            assert pc.unique(bucket(rows.column("device_id"))).to_pylist() == [t.file.partition[1]]
    finally:
        sink.close()
        hot.close()


@pytest.mark.parametrize("texts", [[], ["{}"], ['{"t":1.5,"on":true}', '{"h":-0.0}'],
                                   ['{"température":2.0}', '{"x":1.0}']])
def test_the_pipe_carries_measurements_json_as_one_buffer_that_reads_back_as_the_column(texts: list[str]) -> None:
    """The lake process's wire form of a result (``lakeproc._packed``): its readings' measurements as one UTF-8
    buffer and offsets (byte offsets, also for text beyond ASCII), read by the child as the arrow column the sink
    would have made of the strings; the rest of the result is unchanged."""
    import dataclasses
    import pickle

    import numpy as np
    import pyarrow as pa

    from fieldmesh.core.batch import BatchResult, ReadingColumns
    from fieldmesh.store import lakeproc

    n = len(texts)
    new = dataclasses.replace(ReadingColumns.from_fields(
        ["d1"] * n, list(range(NOW, NOW + n)), [{"t": 1.0}] * n, list(range(n)), [0] * n, [None] * n, [None] * n,
        [None] * n, [None] * n, [NOW] * n, [None] * n), measurements_json=np.array([*texts, ""], dtype=object)[:n])
    result = BatchResult(positions={("r", 0): 5}, watermarks={}, device_watermarks={}, new=new,
                         store_key=new.key, late=np.zeros(n, dtype=bool), windows={}, devices=None,  # type: ignore[arg-type]
                         dead_letters=(), counts={"stored": n})
    wire, data, offsets = pickle.loads(pickle.dumps(lakeproc._packed(result)))
    got = lakeproc._unpacked(data, offsets)
    assert got.type == pa.large_string() and got.to_pylist() == texts
    assert got.equals(pa.array(texts, pa.large_string()))
    assert len(wire.new.measurements_json) == 0 and wire.new.ts_ms.tolist() == new.ts_ms.tolist()
    assert wire.positions == result.positions and wire.counts == result.counts


def test_the_child_reads_the_pipes_frames_into_one_buffer_and_unpickles_them() -> None:
    """``lakeproc._Frames`` reads what ``Connection.send`` and ``send_bytes`` write (small frames, frames larger than
    its buffer, a small one after a large one, protocol-5 pickles of numpy arrays) into a buffer it keeps, and gives
    the objects sent, intact after the buffer was used again; the pipe's end is an ``EOFError``."""
    import multiprocessing
    import pickle
    import threading

    from fieldmesh.store import lakeproc

    a, b = multiprocessing.get_context("fork").Pipe()
    big = np.arange(600_000, dtype=np.int64)  # 4.8 MB: more than the buffer's first 1 MiB
    sent = [("ok", None), ("write", big, "x" * 100), ("stats",), ("write", big[::-1].copy(), "é" * 3), ("", b"")]
    frames = lakeproc._Frames(b)

    def send() -> None:
        for i, m in enumerate(sent):
            if i % 2:
                a.send_bytes(pickle.dumps(m, protocol=5))
            else:
                a.send(m)
        a.close()

    t = threading.Thread(target=send)
    t.start()
    try:
        got = [frames.recv() for _ in sent]
        with pytest.raises(EOFError):
            frames.recv()
    finally:
        t.join()
        b.close()
    assert len(frames.buf) >= big.nbytes  # grown once, kept
    for g, m in zip(got, sent, strict=True):
        assert len(g) == len(m)
        for x, y in zip(g, m, strict=True):
            assert np.array_equal(x, y) if isinstance(y, np.ndarray) else x == y


def test_a_transaction_builds_its_metadata_once_per_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``lake.transaction``: pyiceberg's ``Transaction`` rebuilds its metadata (a deep copy of the table's) at
    every read, about a hundred times a commit; the sink's transactions build it once per state: reads of one
    state give the same object, staging an update or a new table metadata gives a new one, equal to what
    pyiceberg builds (but for ``last_updated_ms``, which pyiceberg stamps with the time of each build of a changed
    state; a commit stamps its own). A flush of the sink's four tables then builds it a few times a table."""
    from pyiceberg.table import update as table_update

    from fieldmesh.store import lake

    builds: list[int] = []
    real = table_update.update_table_metadata

    def counted(*args: Any, **kwargs: Any) -> Any:
        builds.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(table_update, "update_table_metadata", counted)
    lake._transaction_class.cache_clear()  # the class built now reads the counted function
    try:
        sink = LakeSink(settings=settings(), data_dir=tmp_path)
        table = sink._tables["dead_letters"]
        tx = lake.transaction(table)
        first = tx.table_metadata
        assert tx.table_metadata is first and first == real(table.metadata, ())
        tx.set_properties(owner="fieldmesh-test")
        staged = tx.table_metadata
        assert staged is not first and staged.properties["owner"] == "fieldmesh-test"
        theirs = real(table.metadata, tx._updates)
        assert staged.model_copy(update={"last_updated_ms": 0}) == theirs.model_copy(update={"last_updated_ms": 0})
        assert tx.table_metadata is staged
        tx.commit_transaction()
        assert sink.catalog.load_table("fieldmesh.dead_letters").properties["owner"] == "fieldmesh-test"

        items, rs = sent(5, 120)
        hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
        try:
            p = processor(hot, sink)
            recs = records(rs, [9, 30])
            p.apply_records(recs[: len(recs) // 2])
            sink.flush()
            builds.clear()
            p.apply_records(recs[len(recs) // 2 :])
            sink.flush()  # readings appended, both rollups merged and replaced, dead letters (none) appended
            assert 4 <= len(builds) <= 40, len(builds)
            sink.close()
            assert_lake_oracle(open_catalog(settings(), tmp_path), items)
        finally:
            hot.close()
    finally:
        lake._transaction_class.cache_clear()
