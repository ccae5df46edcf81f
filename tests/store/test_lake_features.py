"""Feature rows reach the lake's ``fieldmesh.features`` table exactly once, across lake crashes that lose its
buffer and a flush committed to some tables only; the table equals the hot store's ``feature_rows`` and
the oracle."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from fieldmesh.core.settings import LakeSettings, ProcessorSettings
from fieldmesh.store.features import FeatureTables
from fieldmesh.store.lake import PROP_FEATURES_SEQ, LakeSink, open_catalog
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.featureviews import FeatureRow
from fieldmesh.stream.featuring import FeatureStage
from fieldmesh.stream.processor import Processor
from fmtest.features import check_rows, features_oracle
from stream.test_features_oracle import VIEW, _readings, _records, _stream

pytestmark = pytest.mark.timeout(300)


def _lake(tmp_path: Path, hot: SqliteStore) -> LakeSink:
    sink = LakeSink(settings=LakeSettings(commit_interval_s=3600.0), data_dir=tmp_path)
    sink.features_source = lambda seq, limit: FeatureTables.after(hot, seq, limit)
    return sink


def _lake_rows(tmp_path: Path) -> list[FeatureRow]:
    table = open_catalog(LakeSettings(), tmp_path).load_table("fieldmesh.features")
    out = []
    for r in table.scan().to_arrow().to_pylist():
        out.append(FeatureRow(view=r["view"], entity=r["entity"],
                              window_start_ms=int(r["window_start"].timestamp() * 1000),
                              window_end_ms=int(r["window_end"].timestamp() * 1000),
                              known_at_ms=int(r["known_at"].timestamp() * 1000), version=r["version"],
                              values={k: math.nan if v is None else v for k, v in r["values"]}))
    return out


def _redeliver(recs: list[Any], hot: SqliteStore, sinks: list[Any]) -> list[Any]:
    """What the bus delivers to a restarted processor: records after the lowest position of the hot store
    and the sinks."""
    start = dict(hot.applied())
    for s in sinks:
        mine = s.applied()
        start = {p: min(o, mine.get(p, -1)) for p, o in start.items()}
    return [r for r in recs if r.offset > start.get((r.topic, r.partition), -1)]


def _processor(hot: SqliteStore, sinks: list[Any]) -> Processor:
    p = Processor(bus=None, store=hot, settings=ProcessorSettings(), sinks=sinks)  # type: ignore[arg-type]
    p._positions = hot.positions()
    return p


def test_feature_rows_reach_the_lake_once_across_crashes(tmp_path: Path) -> None:
    stream = _stream(21)
    recs = _records(_readings(stream), [17, 4, 9])
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    try:
        lake = _lake(tmp_path, hot)
        stage = FeatureStage(store=hot, views=[VIEW], online=None)
        p = _processor(hot, [lake, stage])
        third = len(recs) // 3
        p.apply_records(recs[:third])
        lake.flush()
        p.apply_records(recs[third:2 * third])  # feature rows committed to the hot store, the lake buffers
        lake._closing = True  # the lake dies with its buffer

        lake = _lake(tmp_path, hot)
        p = _processor(hot, [lake, stage])
        p.apply_records(_redeliver(recs[:2 * third], hot, [lake, stage]))
        p.apply_records(recs[2 * third:])
        # the crash comes after readings took the flush, before features did
        with lake._cond:
            buf = lake._take()
        lake._commit_table("readings", buf, lake._flush + 1)
        lake._closing = True

        lake = _lake(tmp_path, hot)  # each table resumes where it stands; the rows after the features seq come
        p = _processor(hot, [*lake.views(), stage])
        p.apply_records(_redeliver(recs, hot, [lake, stage]))
        p.apply_records(recs[-3:])  # a redelivery all have: nothing new
        lake.close()
        hot_rows = hot.transact(lambda tx: FeatureTables.rows(tx))
        lake_rows = _lake_rows(tmp_path)
        key = lambda r: (r.view, r.entity, r.window_end_ms, r.version)  # noqa: E731
        assert len(lake_rows) == len({key(r) for r in lake_rows}), "a feature row twice in the lake"
        assert sorted(map(key, lake_rows)) == sorted(map(key, hot_rows))
        expected = features_oracle(stream, VIEW)
        check_rows(hot_rows, expected)
        check_rows(lake_rows, features_oracle(stream, VIEW))
        snap = open_catalog(LakeSettings(), tmp_path).load_table("fieldmesh.features").current_snapshot()
        assert snap is not None and int(snap.summary[PROP_FEATURES_SEQ]) == len(hot_rows)
    finally:
        hot.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_the_lake_s_read_of_feature_rows_works_on_both_hot_stores(backend: str, tmp_path: Path,
                                                                   request: pytest.FixtureRequest) -> None:
    """``FeatureTables.after`` (the lake's outbox read) on SQLite and PostgreSQL: nothing before the table
    exists, then the rows after a seq in commit order (it once used ``?`` placeholders, which PostgreSQL's
    read-only query refuses, and the error was taken for a missing table: the lake got no feature rows)."""
    from fieldmesh.store import load_store

    url = f"sqlite:///{tmp_path}/hot.db" if backend == "sqlite" else request.getfixturevalue("pg_url")
    hot = load_store(url)
    try:
        assert FeatureTables.after(hot, 0, 10) == ([], 0)
        rows = [FeatureRow(view="v", entity=f"d{i}", window_start_ms=i * 60_000, window_end_ms=(i + 1) * 60_000,
                           known_at_ms=(i + 1) * 60_000 + 5, version=1, values={"x_mean": float(i)})
                for i in range(5)]

        def write(tx: Any) -> None:
            FeatureTables.ensure(tx)
            FeatureTables.commit(tx, rows, None, {"rows": 5, "late": 0, "unkeyed": 0, "online_failures": 0}, None)

        hot.transact(write)
        got, last = FeatureTables.after(hot, 0, 3)
        assert [r.entity for r in got] == ["d0", "d1", "d2"] and last == 3
        got, last = FeatureTables.after(hot, last, 10)
        assert [(r.entity, r.values) for r in got] == [("d3", {"x_mean": 3.0}), ("d4", {"x_mean": 4.0})]
        assert last == 5
        assert FeatureTables.after(hot, 5, 10) == ([], 5)
    finally:
        hot.close()
