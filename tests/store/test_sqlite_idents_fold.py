"""SQLite identity keys in two tables: new keys land in ``idents_recent`` and are folded into ``idents`` in
key order many commits at a time (schema 4). Whatever table holds a key, claims answer alike: across
folds, re-opens and the migration of a version-3 store; what is stored equals the oracle and a store
that never folded."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from test_sink_behaviour import _empty, assert_oracle, commit_in_chunks, records, sent, snapshot

from fieldmesh.core.batch import CLAIMED, COLLISION, DUPLICATE, BatchResult
from fieldmesh.core.errors import StoreSchemaError
from fieldmesh.store import load_store
from fieldmesh.store import sqlite as sqlite_store
from fieldmesh.store.base import HotTxn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _counts(path: Path) -> tuple[int, int]:
    con = sqlite3.connect(path)
    try:
        return (con.execute("SELECT count(*) FROM idents").fetchone()[0],
                con.execute("SELECT count(*) FROM idents_recent").fetchone()[0])
    finally:
        con.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_folding_keys_changes_nothing_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    items, rs = sent(seed, 200)
    rnd = random.Random(seed)
    recs = records(rs, [rnd.randint(1, 9) for _ in range(4)])
    plain = load_store(f"sqlite:///{tmp_path / 'plain.db'}")  # folds never (the default threshold)
    commit_in_chunks(plain, recs, 3)
    monkeypatch.setattr(sqlite_store, "_FOLD_MIN", 16)
    folded = load_store(f"sqlite:///{tmp_path / 'folded.db'}")
    try:
        commit_in_chunks(folded, recs, 3)
        main, recent = _counts(tmp_path / "folded.db")
        assert main > 0 and main + recent == folded.stats().stored  # folds happened; every key once
        assert _counts(tmp_path / "plain.db")[0] == 0
        assert_oracle(folded, items)
        a, b = snapshot(folded), snapshot(plain)
        for k in ("raw", "1m", "1h", "stats", "devices"):
            assert a[k] == b[k], k
        # the same readings again in new records (new offsets), on a re-opened store: all duplicates
        folded.close()
        folded = load_store(f"sqlite:///{tmp_path / 'folded.db'}")
        before = folded.stats()
        commit_in_chunks(folded, records(rs, [7], start=10_000), 2)
        after = folded.stats()
        assert (after.stored, after.duplicates) == (before.stored, before.duplicates + len(rs))
    finally:
        folded.close()
        plain.close()


def test_claims_answer_alike_before_and_after_a_fold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_store, "_FOLD_MIN", 3)
    path = tmp_path / "store.db"
    store = load_store(f"sqlite:///{path}")
    keys = np.array([11, 12, 13], dtype=np.int64)
    chks = np.array([1, 2, 3], dtype=np.int64)
    got: list[list[int]] = []

    def claim(k: np.ndarray, c: np.ndarray, o: list[int]) -> None:
        def build(txn: HotTxn) -> BatchResult:
            got.append(txn.claim_keys(k, c, np.array(o, dtype=np.int64)).tolist())
            return _empty()

        store.commit(build)

    try:
        claim(keys, chks, [7, -1, 9])  # three keys: folded into idents by this commit
        assert _counts(path) == (3, 0)
        claim(np.array([14], dtype=np.int64), np.array([4], dtype=np.int64), [5])  # one key: stays recent
        assert _counts(path) == (3, 1)
        for s in (store, None):  # the open store, then a re-opened one (filter loaded from both tables)
            if s is None:
                store.close()
                store = load_store(f"sqlite:///{path}")
            claim(np.array([11, 12, 13, 14], dtype=np.int64), np.array([1, 2, 4, 4], dtype=np.int64), [7, -1, 9, 6])
            claim(np.array([14], dtype=np.int64), np.array([4], dtype=np.int64), [5])
        assert got[2:] == [[CLAIMED, DUPLICATE, COLLISION, DUPLICATE], [CLAIMED]] * 2
    finally:
        store.close()


def test_a_version_3_store_migrates_to_version_4(tmp_path: Path) -> None:
    items, rs = sent(5)
    recs = records(rs, [4])
    path = tmp_path / "store.db"
    url = f"sqlite:///{path}"
    s = load_store(url)
    commit_in_chunks(s, recs[: len(recs) // 2], 2)
    before = snapshot(s)
    s.close()
    con = sqlite3.connect(path)  # what version 3 was: one identity table
    con.execute("INSERT INTO idents SELECT * FROM idents_recent")
    con.execute("DROP TABLE idents_recent")
    con.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    with pytest.raises(StoreSchemaError, match="migrates"):  # a reader cannot migrate: it says who can
        load_store(url, readonly=True)
    s = load_store(url)
    try:
        assert snapshot(s) == before
        commit_in_chunks(s, recs, 2)  # the first half again (skipped by position) and the rest
        assert_oracle(s, items)
        commit_in_chunks(s, records(rs, [5], start=10_000), 3)  # everything again: duplicates
        assert s.stats().duplicates == len(rs) - len(items) + len(rs)
    finally:
        s.close()
