"""WAL checkpoints off the writer's thread: a store's checkpointer copies the WAL while the writer commits
on, paced by the frames the WAL gains, and stops with the store."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from test_sink_behaviour import assert_oracle, commit_in_chunks, records, sent

from fieldmesh.store import load_store
from fieldmesh.store import sqlite as sqlite_store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_the_store_checkpoints_on_its_own_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "_WAL_AUTOCHECKPOINT_PAGES", 40)  # the writer's own mark: 160
    path = tmp_path / "hot.db"
    store = load_store(f"sqlite:///{path}")
    try:
        cp = store._checkpointer  # type: ignore[attr-defined]
        assert cp is not None and cp.pages == 40
        items, rs = sent(11, 400)
        deadline = time.monotonic() + 30
        while cp.checkpoints < 2 and time.monotonic() < deadline:
            commit_in_chunks(store, records(rs, [3], start=1 + 10_000 * cp.checkpoints), 2)
        assert cp.checkpoints >= 2 and cp.copied >= 2 and cp.failures == 0
        assert_oracle(store, items)
        con = sqlite3.connect(path)  # what the thread left: little or nothing to copy
        for _ in range(50):  # (busy: the thread's own checkpoint was under way at that moment)
            busy, frames, done = con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if not busy:
                break
            time.sleep(0.05)
        con.close()
        assert busy == 0 and done == frames
    finally:
        store.close()
    assert store._checkpointer is None  # type: ignore[attr-defined]  # stopped with the store


def test_a_long_wal_starts_over_before_the_writers_own_checkpoint(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread's checkpoints end while the writer is inside a transaction, and only a writer that starts one
    with every frame copied starts the WAL over: without the writer's own checkpoint of what is left, the WAL grew
    to the writer's automatic checkpoint, which runs inside a commit (20-75 ms at the default size)."""
    monkeypatch.setattr(sqlite_store, "_WAL_AUTOCHECKPOINT_PAGES", 40)  # long at 40 frames; the writer's mark: 160
    path = tmp_path / "hot.db"
    store = load_store(f"sqlite:///{path}")
    try:
        cp = store._checkpointer  # type: ignore[attr-defined]
        items, rs = sent(12, 400)
        deadline = time.monotonic() + 60
        start = 1
        while cp.restarts < 3 and time.monotonic() < deadline:  # small commits, with room for the thread
            recs = records(rs, [2], start=start)
            for r in recs:
                commit_in_chunks(store, [r], 1)
                time.sleep(0.01)
            start += len(recs)
        assert cp.restarts >= 3 and cp.failures == 0  # the writer copied what was left and the WAL started over
        assert_oracle(store, items)
    finally:
        store.close()


def test_a_burst_after_a_quiet_spell_is_checkpointed_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread paces itself by the writer's count of transactions, not by a wait that grew while nothing was
    written (up to 2 s: a burst then filled the WAL to the writer's automatic checkpoint, inside a commit)."""
    monkeypatch.setattr(sqlite_store, "_WAL_AUTOCHECKPOINT_PAGES", 40)
    store = load_store(f"sqlite:///{tmp_path / 'hot.db'}")
    try:
        cp = store._checkpointer  # type: ignore[attr-defined]
        items, rs = sent(13, 300)
        recs = records(rs, [40])
        commit_in_chunks(store, recs[:2], 1)  # what a transaction adds is learnt
        time.sleep(2.5)  # quiet
        before, t0 = cp.checkpoints, time.monotonic()
        commit_in_chunks(store, recs[2:], 1)  # well over 40 frames
        while cp.checkpoints == before and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert cp.checkpoints > before and time.monotonic() - t0 < 0.5
        assert_oracle(store, items)
    finally:
        store.close()
