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
        busy, frames, done = con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        con.close()
        assert busy == 0 and done == frames
    finally:
        store.close()
    assert store._checkpointer is None  # type: ignore[attr-defined]  # stopped with the store
