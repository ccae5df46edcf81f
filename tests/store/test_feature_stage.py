"""The feature stage on both hot stores (SQLite, PostgreSQL): rows equal the oracle; an online store that is
down is counted (in-process and durably), the rows stay committed, and the next start puts them online."""

from __future__ import annotations

import dataclasses
import uuid

from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.store import HotStore
from fieldmesh.store.features import FeatureTables, RedisOnlineStore, load_online_store
from fieldmesh.stream.featuring import FeatureStage
from fieldmesh.stream.processor import Processor
from fmtest.features import check_rows, features_oracle
from stream.test_features_oracle import SITE, VIEW, _readings, _records, _stream

LONG = dataclasses.replace(VIEW, ttl_ms=10**13)  # the test stream's times are in the past: keep them online


def test_rows_on_each_hot_store_and_an_online_store_that_is_down(store: HotStore) -> None:
    stream = _stream(8)
    recs = _records(_readings(stream), [23, 6])
    down = load_online_store("redis://127.0.0.1:1/0?prefix=down")  # nothing listens on port 1
    stage = FeatureStage(store=store, views=[LONG, SITE], online=down)
    p = Processor(bus=None, store=store, settings=ProcessorSettings(), sinks=[stage])  # type: ignore[arg-type]
    for rec in recs:
        p.apply_records([rec])
    rows = store.transact(lambda tx: FeatureTables.rows(tx, view=LONG.name))
    check_rows(rows, features_oracle(stream, LONG))
    check_rows(store.transact(lambda tx: FeatureTables.rows(tx, view=SITE.name)), features_oracle(stream, SITE))
    assert stage.stats.online_failures > 0 and stage.stats.online_written == 0
    assert stage.stats.online_pending == len({(r.view, r.entity) for r in rows}) + 2  # + the site view's
    st = FeatureTables.stats(store)
    assert st is not None
    assert st["rows_written"] == stage.stats.rows_written == len(rows) + len(features_oracle(stream, SITE))
    assert 0 < st["online_write_failures"] <= stage.stats.online_failures  # the last failure is after the commit

    up = RedisOnlineStore(f"redis://127.0.0.1:6379/0?prefix=t{uuid.uuid4().hex[:10]}")
    try:
        FeatureStage(store=store, views=[LONG, SITE], online=up)  # a start: the rows within their TTL go online
        for ent in ("d1", "d2", "d3"):
            latest = max((r for r in rows if r.entity == ent), key=lambda r: r.window_end_ms)
            got = up.get(LONG.name, ent)
            assert got is not None
            assert (got.window_end_ms, got.known_at_ms) == (latest.window_end_ms, latest.known_at_ms)
            assert got.values.keys() == latest.values.keys()
    finally:
        up.clear()
        up.close()
