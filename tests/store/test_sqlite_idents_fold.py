"""SQLite identity keys in two tables: new keys land in ``idents_recent`` (in arrival order, a row of packed
keys per commit) and are folded into ``idents_blocks`` (sorted blocks of packed keys, schema 6; ``idents``, a
row per key, before) in key order, a generation at a time, a slice per commit. Whatever table holds a key,
claims answer alike: across folds, re-opens, rolled-back commits, the migration of a version-3 store, of version
4's ``idents_recent`` (a row per key, keyed by ``id`` or in arrival order mid-fold) and of version 5's ``idents``
mid-fold; what is stored equals the oracle and a store that never folded."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_sink_behaviour import _empty, assert_oracle, commit_in_chunks, records, sent, snapshot

from fieldmesh.core.batch import CLAIMED, COLLISION, DUPLICATE, BatchResult
from fieldmesh.core.errors import FieldmeshError, StoreSchemaError
from fieldmesh.store import keyblocks, load_store
from fieldmesh.store import sqlite as sqlite_store
from fieldmesh.store.base import HotTxn
from fmtest.sqlitekeys import blocks_to_rows, fold_recent_by_hand, main_keys, recent_keys, unpack_recent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _counts(path: Path) -> tuple[int, int]:
    """Keys in ``idents``, and keys of ``idents_recent`` not folded into it yet. A folded key still in
    ``idents_recent`` (its generation not done) must say there what it says in ``idents``."""
    con = sqlite3.connect(path)
    try:
        recent = recent_keys(con)
        assert len({k[1] for k in recent}) == len(recent), "a key twice in idents_recent"
        main = main_keys(con)
        both = [k for k in recent if k[1] in main]
        assert all(main[k[1]] == (k[2], k[3]) for k in both), "a key folded into idents differs from idents_recent"
        return len(main), len(recent) - len(both)
    finally:
        con.close()


def _stop_mid_fold(path: Path, recs: list[Any]) -> tuple[int, int, dict[str, Any]]:
    """Commit ``recs`` two at a time into a new store at ``path`` until a generation is being folded (some keys in
    both tables); closed then. Returns ``_counts`` of that moment and the store's snapshot."""
    s = load_store(f"sqlite:///{path}")
    try:
        for i in range(0, len(recs), 2):
            commit_in_chunks(s, recs[i : i + 2], 2)
            main, pending = _counts(path)
            con = sqlite3.connect(path)
            held = len(recent_keys(con))
            con.close()
            if main and held > pending:
                return main, pending, snapshot(s)
        pytest.fail("no commit left keys in both tables")
    finally:
        s.close()


def _assert_migrated(path: Path, shape: Callable[[sqlite3.Connection], None], counts: tuple[int, int],
                     before: dict[str, Any], items: Any, rs: list[Any], recs: list[Any]) -> None:
    """A store made older by hand: a reader refuses it and says who migrates it; the writer migrates it to the
    ``shape`` of the tables it checks, every key where it was (``counts``), the same data (``before``); the
    readings again, then again in new records, are stored exactly once (the oracle)."""
    url = f"sqlite:///{path}"
    with pytest.raises(StoreSchemaError, match="migrates"):
        load_store(url, readonly=True)
    s = load_store(url)
    try:
        con = sqlite3.connect(path)
        shape(con)
        con.close()
        assert _counts(path) == counts
        assert snapshot(s) == before
        commit_in_chunks(s, recs, 2)
        assert_oracle(s, items)
        commit_in_chunks(s, records(rs, [4], start=10_000), 3)
        assert s.stats().duplicates == len(rs) - len(items) + len(rs)
        assert sum(_counts(path)) == s.stats().stored
    finally:
        s.close()


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
        claim(keys, chks, [7, -1, 9])  # three keys: a generation, frozen by this commit
        assert _counts(path) == (0, 3)
        claim(np.array([14], dtype=np.int64), np.array([4], dtype=np.int64), [5])  # folds the three (its budget)
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


def test_a_version_3_store_migrates(tmp_path: Path) -> None:
    items, rs = sent(5)
    recs = records(rs, [4])
    path = tmp_path / "store.db"
    url = f"sqlite:///{path}"
    s = load_store(url)
    commit_in_chunks(s, recs[: len(recs) // 2], 2)
    before = snapshot(s)
    s.close()
    con = sqlite3.connect(path)  # what version 3 was: one identity table
    fold_recent_by_hand(con)
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


@pytest.mark.parametrize("seed", [3, 4])
def test_generations_fold_across_reopens_and_rolled_back_commits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """Many generations with a small threshold; the store re-opened and a claiming commit rolled back at
    random points, mid-generation too: the same store as one that never folded, every key once."""
    items, rs = sent(seed, 300)
    rnd = random.Random(seed)
    recs = records(rs, [rnd.randint(1, 5) for _ in range(5)])
    plain = load_store(f"sqlite:///{tmp_path / 'plain.db'}")
    commit_in_chunks(plain, recs, 2)
    monkeypatch.setattr(sqlite_store, "_FOLD_MIN", 16)
    path = tmp_path / "folded.db"
    folded = load_store(f"sqlite:///{path}")
    mids = 0
    try:
        for s in range(0, len(recs), 2):
            commit_in_chunks(folded, recs[s : s + 2], 2)
            main, recent = _counts(path)
            assert main + recent == folded.stats().stored
            mids += main > 0 and recent > 0
            if rnd.random() < 0.3:
                def build(txn: HotTxn) -> BatchResult:  # claims new keys, then fails: nothing of it stays
                    txn.claim_keys(np.array([rnd.randrange(1, 2**62) for _ in range(20)], dtype=np.int64),
                                   np.arange(20, dtype=np.int64), np.full(20, -1, dtype=np.int64))
                    raise RuntimeError("rolled back")

                with pytest.raises(RuntimeError):
                    folded.commit(build)
            if rnd.random() < 0.3:
                folded.close()
                folded = load_store(f"sqlite:///{path}")
        assert mids > 5  # generations were folded in slices
        assert_oracle(folded, items)
        a, b = snapshot(folded), snapshot(plain)
        for k in ("raw", "1m", "1h", "stats", "devices"):
            assert a[k] == b[k], k
        before = folded.stats()
        commit_in_chunks(folded, records(rs, [3], start=10_000), 2)  # everything again: duplicates
        after = folded.stats()
        assert (after.stored, after.duplicates) == (before.stored, before.duplicates + len(rs))
    finally:
        folded.close()
        plain.close()


@pytest.mark.parametrize("keyed", [False, True])
def test_a_version_4_store_migrates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keyed: bool) -> None:
    """Version 4's ``idents_recent`` had a row per key: in arrival order, its marks in ``meta`` counting those
    rows (here mid-fold: a generation frozen, part of it folded), or keyed by ``id`` as version 4 was first made.
    A writer packs the keys not in ``idents`` yet into a row; every key stays claimed once, alike."""
    monkeypatch.setattr(sqlite_store, "_FOLD_MIN", 16)
    items, rs = sent(6, 200)
    recs = records(rs, [3])
    path = tmp_path / "store.db"
    main, pending, before = _stop_mid_fold(path, recs)
    con = sqlite3.connect(path)
    last = unpack_recent(con, keyed=keyed)
    marks = ("idents_frozen_upto", "idents_dropped_upto")
    for key, value in con.execute("SELECT key, value FROM meta WHERE key IN (?, ?)", marks).fetchall():
        moved = max((v for n, v in last.items() if n <= int(value)), default=0)
        con.execute("UPDATE meta SET value = ? WHERE key = ?", (str(moved), key))
    if keyed:  # that table never had generations: its keys are all in one of the two tables
        con.execute("DELETE FROM idents_recent WHERE id IN (SELECT id FROM idents)")
        con.execute("DELETE FROM meta WHERE key LIKE 'idents_%'")
    con.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    con.commit()
    con.close()

    def shape(con: sqlite3.Connection) -> None:
        assert "keys" in [c[1] for c in con.execute("PRAGMA table_info(idents_recent)")]
        assert len(recent_keys(con)) == pending  # only the keys not in idents yet

    _assert_migrated(path, shape, (main, pending), before, items, rs, recs)


def test_a_generation_is_folded_in_even_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each commit folds a slice in proportion to the keys it claims, so no commit carries the bulk of a
    generation (the slowest batch of a stream was the one that folded 131,072 keys at once)."""
    monkeypatch.setattr(sqlite_store, "_FOLD_MIN", 2000)
    path = tmp_path / "store.db"
    store = load_store(f"sqlite:///{path}")
    rnd = random.Random(9)
    folded: list[int] = []
    try:
        for _ in range(400):  # 20 new keys a commit: a generation of 2,000 is folded over 50 commits
            keys = np.array(rnd.sample(range(1, 2**62), 20), dtype=np.int64)

            def build(txn: HotTxn, keys: np.ndarray = keys) -> BatchResult:
                assert (txn.claim_keys(keys, keys % 97, np.full(len(keys), -1, dtype=np.int64)) == CLAIMED).all()
                return _empty()

            before = _counts(path)[0]
            store.commit(build)
            folded.append(_counts(path)[0] - before)
    finally:
        store.close()
    assert sum(folded) >= 5000  # generations were folded
    assert max(folded) <= 60, sorted(folded)[-5:]  # ~40 a commit (2,000 over 50), never the rest at once


def test_a_recent_table_made_again_starts_new_generations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The generations' marks in ``meta`` outlive an ``idents_recent`` made again (its keys moved to ``idents``
    by hand, as the downgrade tests do): its new rows are new keys, not a generation already folded."""
    monkeypatch.setattr(sqlite_store, "_FOLD_MIN", 16)
    items, rs = sent(8, 200)
    recs = records(rs, [2])
    path = tmp_path / "store.db"
    url = f"sqlite:///{path}"
    s = load_store(url)
    commit_in_chunks(s, recs[: len(recs) // 2], 2)
    s.close()
    con = sqlite3.connect(path)
    assert con.execute("SELECT value FROM meta WHERE key = 'idents_frozen_upto'").fetchone()[0] != "0"
    fold_recent_by_hand(con)
    con.execute("CREATE TABLE idents_recent (n INTEGER PRIMARY KEY, keys BLOB NOT NULL)")
    con.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")  # idents a row per key, as in 5
    con.commit()
    con.close()
    s = load_store(url)
    try:
        for i in range(0, len(recs), 2):  # re-opened after each commit: each time from the table
            commit_in_chunks(s, recs[i : i + 2], 2)
            s.close()
            s = load_store(url)
        assert_oracle(s, items)
        commit_in_chunks(s, records(rs, [3], start=10_000), 2)
        assert s.stats().duplicates == len(rs) - len(items) + len(rs)
        main, recent = _counts(path)
        assert main + recent == s.stats().stored
    finally:
        s.close()


def test_a_version_5_store_migrates_mid_fold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Version 5 folded keys into ``idents``, a row per key. A writer packs them into blocks of at most
    ``BLOCK_KEYS`` (4 here, so there are many), and a generation half folded goes on from its cursor."""
    monkeypatch.setattr(sqlite_store, "_FOLD_MIN", 16)
    monkeypatch.setattr(sqlite_store, "BLOCK_KEYS", 4)
    monkeypatch.setattr(keyblocks, "BLOCK_KEYS", 4)
    items, rs = sent(7, 200)
    recs = records(rs, [3])
    path = tmp_path / "store.db"
    main, pending, before = _stop_mid_fold(path, recs)
    con = sqlite3.connect(path)
    blocks_to_rows(con)
    con.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
    con.commit()
    con.close()

    def shape(con: sqlite3.Connection) -> None:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "idents" not in tables
        assert con.execute("SELECT count(*) FROM idents_blocks").fetchone()[0] == -(-main // 4)

    _assert_migrated(path, shape, (main, pending), before, items, rs, recs)


@pytest.mark.parametrize("seed", range(6))
def test_key_blocks_hold_what_was_merged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    """Merges of sorted slices (of any size, anywhere in the key space, rolled back or not) into blocks of at most
    ``BLOCK_KEYS`` keys, a few blocks at a time: every block within the bound and starting at its ``lo``, ranges
    disjoint, the ``lo`` column returned that of the table, and each key found with its chk and origin, absent
    keys not."""
    monkeypatch.setattr(keyblocks, "BLOCK_KEYS", 1 + seed * 3)
    monkeypatch.setattr(keyblocks, "_MERGE_BLOCKS", (1, 2, 5, 512)[seed % 4])
    rnd = np.random.default_rng(seed)
    con = sqlite3.connect(tmp_path / "k.db", isolation_level=None)
    con.execute("CREATE TABLE idents_blocks (lo INTEGER PRIMARY KEY, keys BLOB NOT NULL)")
    blocks = keyblocks.KeyBlocks()
    held: dict[int, tuple[int, int]] = {}
    for _ in range(40):
        lo, hi = sorted(rnd.integers(-(2**62), 2**62, 2).tolist())
        ids = np.unique(rnd.integers(lo, hi + 1, int(rnd.integers(1, 60))))
        ids = ids[[i not in held for i in ids.tolist()]]
        chks = rnd.integers(0, 2**62, len(ids))
        origins = np.where(rnd.random(len(ids)) < 0.2, -1, rnd.integers(0, 2**40, len(ids)))
        con.execute("BEGIN")
        los = blocks.merge(con, ids, chks, origins)
        if rnd.random() < 0.2:  # rolled back: the table and the lo column stay as they were
            con.execute("ROLLBACK")
            continue
        con.execute("COMMIT")
        blocks.los = los
        held.update(zip(ids.tolist(), zip(chks.tolist(), origins.tolist(), strict=True), strict=True))
        assert los.tolist() == [r[0] for r in con.execute("SELECT lo FROM idents_blocks ORDER BY lo")]
        sizes = [n // 24 for (n,) in con.execute("SELECT length(keys) FROM idents_blocks")]
        assert max(sizes) <= keyblocks.BLOCK_KEYS
        stored = main_keys(con)  # (checks each block's lo and order)
        assert {k: (c, -1 if o is None else o) for k, (c, o) in stored.items()} == held
        probe = np.array(list(held)[:50] + rnd.integers(-(2**63), 2**63 - 1, 50).tolist(), dtype=np.int64)
        hit, chk, origin = blocks.find(con, probe)
        for k, h, c, o in zip(probe.tolist(), hit.tolist(), chk.tolist(), origin.tolist(), strict=True):
            assert h == (k in held) and (not h or (c, o) == held[k]), k
    loaded, n = keyblocks.KeyBlocks.load(con)
    assert loaded.los.tolist() == blocks.los.tolist() and n == len(held)
    with pytest.raises(FieldmeshError, match="held already"):
        first = next(iter(held))
        blocks.merge(con, np.array([first]), np.array([1]), np.array([1]))
    con.close()
