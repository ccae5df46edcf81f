"""The SQLite writer merges a pair's latest rollup window from memory (the row as it last wrote it) instead of
reading it back. Rollups must be the same as a store that reads every window back: over many small commits into
the same windows, after a transaction of another kind changed rollup rows (a tier prune), and after a re-open."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from test_sink_behaviour import BASE, commit_in_chunks, readings_of, records

from fieldmesh.core.model import Reading
from fieldmesh.store import load_store
from fieldmesh.store.base import INTERVALS, HotStore, SqlTxn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _dense(seed: int, n: int) -> list[Reading]:
    """Readings of 3 devices in a few minutes (every commit touches the windows of the one before), with values
    of any magnitude, integers, booleans and both zeros, a little out of order."""
    rnd = random.Random(seed)
    items: list[tuple[str, dict[str, Any]]] = []
    for i in range(n):
        ts = BASE + 3_540_000 + i * 250 + rnd.randint(-2_000, 2_000)  # across an hour's end
        items.append((rnd.choice(["d1", "d2", "d-3"]), {"ts": ts, "seq": i, "measurements": {
            m: rnd.choice([rnd.uniform(-1e300, 1e300), rnd.uniform(-1, 1) * 1e-300, rnd.randint(-5, 5), 0.0,
                           -0.0, rnd.random() < 0.5, 1e16, 1.0])
            for m in rnd.sample(["t", "h", "v"], rnd.randint(1, 3))}}))
    rs = readings_of(items)
    return rs + [rnd.choice(rs) for _ in range(n // 10)]


def _rollups(store: HotStore) -> dict[str, Any]:
    return {i: store.rollups(interval=i, device_id=None, metric=None, start_ms=None, end_ms=None, limit=10**6)
            for i in INTERVALS}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_small_commits_equal_one_commit(tmp_path: Path, seed: int) -> None:
    rs = _dense(seed, 600)
    small = load_store(f"sqlite:///{tmp_path / 'small.db'}")
    one = load_store(f"sqlite:///{tmp_path / 'one.db'}")
    try:
        commit_in_chunks(small, records(rs, [random.Random(seed).randint(1, 4)]), 1)
        commit_in_chunks(one, records(rs, [len(rs)]), 1)
        a, b = _rollups(small), _rollups(one)
        assert a == b
        assert max(r["count"] for r in a["1m"]) > 20  # windows were merged over many commits
    finally:
        small.close()
        one.close()


def _prune(tx: SqlTxn) -> None:
    """What a tier prune does: rollup rows go, among them each pair's latest window."""
    for interval in INTERVALS:
        tx.execute(f"DELETE FROM rollup_{interval} WHERE window_start_ms < ?", (BASE + 3_600_000 + 30_000,))


def test_a_transaction_that_changes_rollups_is_not_merged_over(tmp_path: Path) -> None:
    rs = _dense(7, 600)
    recs = records(rs, [2])
    half = len(recs) // 2
    kept = load_store(f"sqlite:///{tmp_path / 'kept.db'}")
    reopened = load_store(f"sqlite:///{tmp_path / 'reopened.db'}")
    try:
        for s in (kept, reopened):
            commit_in_chunks(s, recs[:half], 1)
            s.transact(_prune)
        reopened.close()
        reopened = load_store(f"sqlite:///{tmp_path / 'reopened.db'}")  # reads every window back
        for s in (kept, reopened):
            commit_in_chunks(s, recs[half:], 1)
        a, b = _rollups(kept), _rollups(reopened)
        assert a == b
        # the pruned windows came back with only what arrived after the prune
        first = min(r["window_start_ms"] for r in a["1m"])
        assert first < BASE + 3_600_000 + 30_000
        assert sum(r["count"] for r in a["1m"]) < sum(len(r.measurements) for r in rs)
    finally:
        kept.close()
        reopened.close()


def _other_tables(tx: SqlTxn) -> None:
    """What the alert rules, the notifier or the features do between batches: tables the write caches do not hold."""
    tx.execute("INSERT INTO counters VALUES ('test_other', 1) ON CONFLICT(name) DO UPDATE SET value = value + 1")
    tx.execute("SELECT count(*) FROM rollup_1m")


def test_a_transaction_of_other_tables_keeps_the_windows_in_memory(tmp_path: Path) -> None:
    rs = _dense(11, 300)
    recs = records(rs, [2])
    store = load_store(f"sqlite:///{tmp_path / 's.db'}")
    try:
        commit_in_chunks(store, recs[:50], 1)
        assert store.flush()  # the windows held are those written
        held = {i: dict(store._latest_acc[i]) for i in INTERVALS}  # type: ignore[attr-defined]
        assert all(held.values())
        for _ in range(3):
            store.transact(_other_tables)
        assert {i: dict(store._latest_acc[i]) for i in INTERVALS} == held  # type: ignore[attr-defined]
        store.transact(_prune)
        assert not any(store._latest_acc[i] for i in INTERVALS)  # type: ignore[attr-defined]
    finally:
        store.close()


def test_a_repeated_transaction_is_seen_each_time(tmp_path: Path) -> None:
    """The same statements again (prepared already, from the connection's cache) are seen changing rollups too;
    and a row written ahead of the writer (a later window of a pair) is merged into, not written over."""
    rs = _dense(13, 900)
    recs = records(rs, [3])
    third = len(recs) // 3
    kept = load_store(f"sqlite:///{tmp_path / 'kept.db'}")
    reopened = load_store(f"sqlite:///{tmp_path / 'reopened.db'}")
    window = (BASE + 7_200_000) // 60_000 * 60_000

    def ahead(tx: SqlTxn) -> None:  # a row of a window the writer has not written yet
        tx.execute("INSERT OR REPLACE INTO rollup_1m VALUES ('d1', 'zz', ?, 1, 2.0, 2.0, 2.0, 2.0, '1:1')",
                   (window,))

    try:
        early = readings_of([("d1", {"ts": window - 300_000, "seq": 9_999, "measurements": {"zz": 1.0}})])
        for s in (kept, reopened):  # the writer knows the pair's latest window: an earlier one
            commit_in_chunks(s, records(early, [1], start=9_999), 1)
        for i in range(3):
            for s in (kept, reopened):
                commit_in_chunks(s, recs[i * third : (i + 1) * third], 1)
                s.transact(_prune)
                s.transact(ahead)
            reopened.close()
            reopened = load_store(f"sqlite:///{tmp_path / 'reopened.db'}")  # reads every window back
        late = readings_of([("d1", {"ts": window + 5, "seq": 10_000, "measurements": {"zz": 3.0}})])
        for s in (kept, reopened):
            commit_in_chunks(s, records(late, [1], start=10_000), 1)
        a, b = _rollups(kept), _rollups(reopened)
        assert a == b
        zz = [r for r in a["1m"] if r["metric"] == "zz"]
        assert [(r["count"], r["sum"]) for r in zz] == [(1, 1.0), (2, 5.0)]
    finally:
        kept.close()
        reopened.close()
