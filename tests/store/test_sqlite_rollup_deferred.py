"""The SQLite writer holds a batch's rollup deltas in memory up to ``rollup_flush_ms`` and writes them merged with
the later batches' (a window many batches touch is written once). Their readings are in the segments above
``meta.rollups_sid``: reads merge them in, a transaction that meets the rollups sees them written, a writer that
is killed leaves them there and the next one writes them, and another writer's segments are read back."""

from __future__ import annotations

import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_sink_behaviour import SRC, TESTS, assert_oracle, commit_in_chunks, records, sent

from fieldmesh.core.settings import RetentionSettings
from fieldmesh.store import load_store
from fieldmesh.store.base import INTERVALS, HotStore, SqlTxn
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.store.tiers import prune
from fmtest import oracle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

_HOLD = 3_600_000  # a flush interval no test reaches: only what the test does writes the rollups


def _rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` on the file itself (another connection, as `fieldmesh query` reads it)."""
    con = sqlite3.connect(path)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _table(path: Path, interval: str) -> dict[tuple[str, str, int], tuple[Any, ...]]:
    """The rollup rows as the table holds them."""
    cols = "device_id, metric, window_start_ms, count, sum, min, max, avg, sum_exact"
    return {(r[0], r[1], r[2]): r[3:] for r in _rows(path, f"SELECT {cols} FROM rollup_{interval}")}


def _mark(path: Path) -> int:
    return int(_rows(path, "SELECT value FROM meta WHERE key = 'rollups_sid'")[0][0])


def _top(path: Path) -> int:
    return int(_rows(path, "SELECT coalesce(max(sid), 0) FROM segments")[0][0])


def _all(store: HotStore, interval: str, **kw: Any) -> list[dict[str, Any]]:
    args: dict[str, Any] = {"device_id": None, "metric": None, "start_ms": None, "end_ms": None, "limit": 10**6}
    return store.rollups(interval=interval, **{**args, **kw})


@pytest.mark.parametrize("seed", [3, 4])
def test_held_and_written_at_any_moment_equal_each_batch_written(tmp_path: Path, seed: int) -> None:
    """Flushes at random moments (and none) give the same rows as a store that writes each batch's; reads
    (this writer's and a read-only store's) are exact before any flush."""
    items, rs = sent(seed, n=900)
    recs = records(rs, [random.Random(seed).randint(1, 5)])
    each = SqliteStore(f"sqlite:///{tmp_path / 'each.db'}", rollup_flush_ms=0)
    held_path = tmp_path / "held.db"
    held = SqliteStore(f"sqlite:///{held_path}", rollup_flush_ms=_HOLD)
    reader = load_store(f"sqlite:///{held_path}", readonly=True)
    rnd = random.Random(seed)
    flushes = 0
    try:
        commit_in_chunks(each, recs, 2)
        assert _mark(tmp_path / "each.db") == _top(tmp_path / "each.db")  # each batch moved the mark
        for s in range(0, len(recs), 2):
            commit_in_chunks(held, recs[s : s + 2], 2)
            if rnd.random() < 0.15:
                flushes += held.flush()
                assert _mark(held_path) == _top(held_path)
            # what is held is read merged in, by this writer and by a reader of the file
            if rnd.random() < 0.1:
                for i in INTERVALS:
                    assert _all(held, i) == _all(reader, i)
        assert flushes
        assert _mark(held_path) < _top(held_path)  # some batches' deltas are still held
        assert held.rollup_readbacks == 0  # every flush wrote what this writer held
        for i in INTERVALS:
            assert _all(held, i) == _all(each, i) == _all(reader, i)
        assert_oracle(held, items)
        assert_oracle(reader, items)
        assert held.flush()
        for i in INTERVALS:
            assert _table(held_path, i) == _table(tmp_path / "each.db", i)
    finally:
        reader.close()
        held.close()
        each.close()


def test_reads_with_a_selection_merge_only_what_they_select(tmp_path: Path) -> None:
    _, rs = sent(5, n=600)
    recs = records(rs, [3])
    path = tmp_path / "s.db"
    each = SqliteStore(f"sqlite:///{tmp_path / 'each.db'}", rollup_flush_ms=0)
    held = SqliteStore(f"sqlite:///{path}", rollup_flush_ms=_HOLD)
    try:
        half = len(recs) // 2
        for s in (each, held):
            commit_in_chunks(s, recs[:half], 1)
        held.flush()
        for s in (each, held):
            commit_in_chunks(s, recs[half:], 1)  # held: the second half is only in the segments
        windows = sorted({r["window_start_ms"] for r in _all(each, "1m")})
        devices = sorted({r["device_id"] for r in _all(each, "1m")})
        metrics = sorted({r["metric"] for r in _all(each, "1m")})
        rnd = random.Random(5)
        for _ in range(60):
            kw: dict[str, Any] = {"interval": rnd.choice(list(INTERVALS))}
            kw["device_id"] = rnd.choice([None, *devices])
            kw["metric"] = rnd.choice([None, *metrics])
            kw["start_ms"] = rnd.choice([None, *windows])
            kw["end_ms"] = rnd.choice([None, *windows])
            kw["limit"] = rnd.choice([1, 3, 10, 10**6])
            assert held.rollups(**kw) == each.rollups(**kw), kw
        assert len(_table(path, "1m")) < len(_table(tmp_path / "each.db", "1m"))  # (the test held some back)
    finally:
        held.close()
        each.close()


def test_a_transaction_that_meets_the_rollups_sees_them_written(tmp_path: Path) -> None:
    """A tier prune, or any transaction that reads or writes a rollup table, runs after the held deltas are
    written (its function runs again if it met them first); one that does not leaves them held."""
    items, rs = sent(6, n=300)
    path = tmp_path / "s.db"
    store = SqliteStore(f"sqlite:///{path}", rollup_flush_ms=_HOLD)
    calls = []

    def count(tx: SqlTxn) -> int:
        calls.append(1)
        return int(tx.execute("SELECT coalesce(sum(count), 0) FROM rollup_1m")[0][0])

    def other(tx: SqlTxn) -> None:
        tx.execute("INSERT INTO counters VALUES ('test_other', 1) ON CONFLICT(name) DO UPDATE SET value = value + 1")

    try:
        commit_in_chunks(store, records(rs, [4]), 2)
        top = _top(path)
        store.transact(other)
        assert _mark(path) < top  # still held
        expected = sum(len(r["measurements"]) for _, r in oracle.unique_readings(items).values())
        assert store.transact(count) == expected
        assert _mark(path) == top
        assert len(calls) == 2  # once rolled back (deltas held), once after the flush
        assert store.transact(count) == expected
        assert len(calls) == 3  # nothing held: once
    finally:
        store.close()


def test_another_writers_segments_are_read_back(tmp_path: Path) -> None:
    """Two writers on one file, each holding its own batches' deltas: a flush that finds the other's segments
    above the mark reads them back; the other's held deltas are then dropped, not written twice."""
    items, rs = sent(8, n=800)
    recs = records(rs, [3])
    url = f"sqlite:///{tmp_path / 's.db'}"
    a = SqliteStore(url, rollup_flush_ms=_HOLD)
    b = SqliteStore(url, rollup_flush_ms=_HOLD)
    try:
        for k in range(0, len(recs), 4):
            commit_in_chunks(a if k % 8 == 0 else b, recs[k : k + 4], 2)
            if k % 24 == 0:
                (a if k % 48 == 0 else b).flush()
        a.flush()
        b.flush()
        assert a.rollup_readbacks + b.rollup_readbacks > 0
        assert _mark(tmp_path / "s.db") == _top(tmp_path / "s.db")
        assert_oracle(a, items)
        one = SqliteStore(f"sqlite:///{tmp_path / 'one.db'}", rollup_flush_ms=0)
        try:
            commit_in_chunks(one, recs, 2)
            for i in INTERVALS:
                assert _table(tmp_path / "s.db", i) == _table(tmp_path / "one.db", i)
        finally:
            one.close()
    finally:
        a.close()
        b.close()


_CHILD = """
import pickle, sys
from fieldmesh.store.sqlite import SqliteStore
from fmtest.drive import commit_records
recs = pickle.load(open(sys.argv[2], "rb"))
store = SqliteStore(sys.argv[1], rollup_flush_ms=int(sys.argv[3]))
recs = recs[: int(sys.argv[4])]
print("ready", flush=True)
for s in range(0, len(recs), 2):
    commit_records(store, recs[s : s + 2])
print("done", flush=True)
import time; time.sleep(60)  # killed here at the latest: nothing written at close
"""


@pytest.mark.parametrize("flush_ms", [_HOLD, 20])
def test_kill_9_with_deltas_held_then_the_next_writer_writes_them(tmp_path: Path, flush_ms: int) -> None:
    items, rs = sent(9, n=1500)
    recs = records(rs, [2])
    pick = tmp_path / "recs.pickle"
    pick.write_bytes(pickle.dumps(recs))
    path = tmp_path / "s.db"
    url = f"sqlite:///{path}"
    SqliteStore(url).close()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    for delay in (0.1, 0.3, None):
        upto = len(recs) if delay is None else 2 * len(recs) // 3  # the last child has records of its own
        child = subprocess.Popen([sys.executable, "-c", _CHILD, url, str(pick), str(flush_ms), str(upto)], env=env,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        if delay is None:
            assert child.stdout.readline().strip() == "done"
        else:
            time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
        if delay is None:
            break
        # resumed by the next child: it writes what the killed one held when it opens
    held_back = _mark(path) < _top(path)
    assert held_back or flush_ms != _HOLD  # the last child died holding deltas (flushing every 20 ms: it may not)
    reader = load_store(url, readonly=True)
    try:
        assert_oracle(reader, items)  # read through the segments meanwhile
    finally:
        reader.close()
    store = SqliteStore(url, rollup_flush_ms=_HOLD)  # writes them as it opens
    try:
        assert _mark(path) == _top(path)
        assert store.rollup_readbacks == int(held_back)
        expected = {i: oracle.rollups(items, i) for i in INTERVALS}
        for i in INTERVALS:
            table = _table(path, i)
            assert set(table) == set(expected[i])
            for k, e in expected[i].items():
                assert table[k][:5] == (e["count"], e["sum"], e["min"], e["max"], e["avg"]), k
    finally:
        store.close()


def test_a_prune_keeps_the_segments_not_rolled_up_and_the_last(tmp_path: Path) -> None:
    """The tiers delete old segments only below the mark, and never the last: a new segment's sid stays above the
    mark (SQLite numbers a row after the largest), so the readings not rolled up are always above it."""
    _, rs = sent(10, n=300)
    path = tmp_path / "s.db"
    url = f"sqlite:///{path}"
    other = SqliteStore(url)  # another process's writer (the API's), opened before the batches: it holds nothing
    store = SqliteStore(url, rollup_flush_ms=_HOLD)
    settings = RetentionSettings(raw_days=30, without_lake=True)
    try:
        commit_in_chunks(store, records(rs, [4]), 2)
        top = _top(path)
        con = sqlite3.connect(path)
        try:  # every segment old enough to go
            con.execute("UPDATE segments SET min_ts_ms = min_ts_ms - 400 * 86400000,"
                        " max_ts_ms = max_ts_ms - 400 * 86400000")
            con.commit()
        finally:
            con.close()
        (raw,) = [r for r in prune(other, settings=settings, lake=None) if r.tier == "raw"]
        assert raw.deleted == 0 and raw.held > 0  # nothing rolled up yet: nothing goes
        assert _top(path) == top and _mark(path) < top
        (raw,) = [r for r in prune(store, settings=settings, lake=None) if r.tier == "raw"]
        # the writer holding the deltas wrote them first (its reads do): all but the last segment went
        assert _mark(path) == top
        assert raw.deleted > 0 and raw.held > 0
        assert _rows(path, "SELECT count(*), max(sid) FROM segments") == [(1, top)]
        _, more = sent(11, n=20)
        commit_in_chunks(store, records(more, [20], start=20_000), 1)
        assert _top(path) > top  # numbered after the last, above the mark
    finally:
        store.close()
        other.close()
