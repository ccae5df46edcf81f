"""The SQLite hot store's WAL checkpoints run on a thread of their own, not in a batch's commit
(store/walcheckpoint.py): the writer's automatic checkpoint is off, the database file still receives every
commit, and a checkpoint thread that fails gives the checkpoints back to the writer."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from test_sink_behaviour import commit_in_chunks, records, sent

from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.store.walcheckpoint import WalCheckpointer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _keys(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return int(con.execute("SELECT (SELECT count(*) FROM idents) + (SELECT count(*) FROM idents_recent)")
                   .fetchone()[0])
    finally:
        con.close()


def _keys_in_db_file(path: Path, copy: Path) -> int:
    """Identity keys in the database file alone (without its WAL): what checkpoints moved there (0 before the
    first, which moves the tables there)."""
    shutil.copy(path, copy)
    try:
        return _keys(copy)
    except sqlite3.OperationalError:
        return 0


def test_commits_reach_the_database_file_through_the_checkpoint_thread(tmp_path: Path) -> None:
    store = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    try:
        _, rs = sent(1, 300)
        commit_in_chunks(store, records(rs, [7]), 4)
        assert store._w.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0  # no commit checkpoints
        stored = _keys(store.path)
        deadline = time.monotonic() + 10
        while _keys_in_db_file(store.path, tmp_path / "copy.db") < stored and time.monotonic() < deadline:
            time.sleep(0.05)
        # a few hundred pages: under the automatic checkpoint's 1,000 they would still be in the WAL only
        assert _keys_in_db_file(store.path, tmp_path / "copy.db") == stored > 0
        ck = store._checkpointer
        assert ck is not None and ck.checkpoints >= 1 and ck.failed is None
    finally:
        store.close()
    assert store._checkpointer is None  # stopped with the store


def test_a_failed_checkpoint_thread_gives_the_checkpoints_back_to_the_writer(tmp_path: Path) -> None:
    bad = WalCheckpointer(tmp_path / "no-such-dir" / "x.db")
    deadline = time.monotonic() + 10
    while bad.failed is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert isinstance(bad.failed, sqlite3.Error)
    bad.stop()

    store = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    try:
        _, rs = sent(2, 40)
        recs = records(rs, [5])
        commit_in_chunks(store, recs[:2], 2)
        assert store._checkpointer is not None
        before = store.stats().stored
        store._checkpointer.failed = sqlite3.OperationalError("disk I/O error")
        commit_in_chunks(store, recs[2:], 2)
        assert store._checkpointer is None
        assert store._w.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
        assert store.stats().stored > before  # the batches commit on, with SQLite's own checkpoints
    finally:
        store.close()


def test_a_wal_past_its_bound_is_checkpointed_by_the_writer_after_its_commit(tmp_path: Path) -> None:
    """A writer that never idles: the thread's checkpoints never cover its last commit, so SQLite would never
    start the WAL over; past ``max_pages`` the writer checkpoints the rest itself."""
    store = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    try:
        _, rs = sent(3, 60)
        recs = records(rs, [5])
        commit_in_chunks(store, recs[:2], 2)
        ck = store._checkpointer
        assert ck is not None
        ck.stop()  # the thread checkpoints no more: only the writer can
        commit_in_chunks(store, recs[2:4], 2)
        assert _keys_in_db_file(store.path, tmp_path / "copy.db") < _keys(store.path)  # in the WAL only
        ck.wal_pages = ck.max_pages + 1  # what the thread saw last
        commit_in_chunks(store, recs[4:6], 2)  # one commit
        assert ck.wal_pages == 0
        assert _keys_in_db_file(store.path, tmp_path / "copy.db") == _keys(store.path)  # at once, no thread
    finally:
        store.close()
