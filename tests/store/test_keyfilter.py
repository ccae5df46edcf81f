"""The identity-key Bloom filter never forgets a key, and the store keeps it in step with the table."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fieldmesh.core.codec import decode_telemetry
from fieldmesh.store import sqlite as sqlite_store
from fieldmesh.store.alerts import AlertTables
from fieldmesh.store.keyfilter import KeyFilter
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.alerts import parse_rule
from fmtest.drive import commit_readings

NOW = 1_763_812_345_123


@given(st.lists(st.integers(0, 2**63 - 1), max_size=300), st.lists(st.integers(0, 2**63 - 1), max_size=300))
def test_no_false_negatives(added: list[int], others: list[int]):
    f = KeyFilter(len(added))
    f.add(added)
    assert f.may_contain(added).all()
    assert len(f.may_contain(others)) == len(others)


def test_false_positives_are_rare_and_growth_keeps_every_key():
    rnd = random.Random(1)
    keys = [rnd.getrandbits(63) for _ in range(50_000)]
    f = KeyFilter(10)
    f.add(keys)
    assert f.may_contain(keys).all()
    assert f.may_contain([rnd.getrandbits(63) for _ in range(50_000)]).mean() < 0.01
    many = keys + [rnd.getrandbits(63) for _ in range(3_000_000)]
    for i in range(50_000, len(many), 100_000):  # batch after batch: past the first layer's capacity
        f.add(many[i:i + 100_000])
    assert f.layers == 2 and f.count == len(many)  # grew by a layer, without the keys it had
    assert f.may_contain(many).all()
    assert f.may_contain([rnd.getrandbits(63) for _ in range(200_000)]).mean() < 0.02


def _readings(dev: str, seqs: range):
    body = b"[" + b",".join(b'{"ts":%d,"seq":%d,"measurements":{"t":%d}}' % (NOW - 1000, s, s) for s in seqs) + b"]"
    return decode_telemetry(body, device_id=dev, topic="t", received_ms=NOW).readings


def _apply(store: SqliteStore, rs):
    return commit_readings(store, rs)


def test_two_writers_on_one_file_still_deduplicate(tmp_path: Path):
    """Another writer's commits invalidate the filter (PRAGMA data_version), so its keys are seen."""
    url = f"sqlite:///{tmp_path}/s.db"
    a, b = SqliteStore(url), SqliteStore(url)
    assert _apply(a, _readings("d1", range(0, 100))).stored == 100
    assert _apply(b, _readings("d1", range(50, 150))).stored == 50  # b's filter is loaded from the table
    r = _apply(a, _readings("d1", range(100, 200)))  # a must see b's keys 100..149
    assert (r.stored, r.duplicates) == (50, 50)
    assert a.stats().stored == 200


def test_a_commit_that_leaves_the_keys_alone_keeps_the_filter(tmp_path: Path):
    """Another connection's commit drops the writer's caches, but the identity keys are loaded again (every stored
    key read) only when that commit changed them: here the API's rule tables commit in between."""
    url = f"sqlite:///{tmp_path}/s.db"
    a = SqliteStore(url)
    try:
        assert _apply(a, _readings("d1", range(0, 100))).stored == 100
        assert a.key_loads == 1
        rules = AlertTables(url)
        rules.put_rule(parse_rule({"name": "hot", "kind": "threshold", "metric": "t", "op": ">", "value": 30}),
                       actor="test")
        rules.close()
        r = _apply(a, _readings("d1", range(50, 150)))  # the other commit is seen (data_version), keys kept
        assert (r.stored, r.duplicates) == (50, 50)
        assert a.key_loads == 1
        b = SqliteStore(url)  # another writer claims keys: now they are loaded again
        assert _apply(b, _readings("d1", range(140, 200))).stored == 50
        b.close()
        r = _apply(a, _readings("d1", range(190, 210)))
        assert (r.stored, r.duplicates) == (10, 10)
        assert a.key_loads == 2 and a.stats().stored == 210
    finally:
        a.close()


def test_another_writers_fold_is_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Writers taking turns on one file while generations fold (a writer's fold moves keys between the tables):
    each sees every key the other stored, whichever table holds it."""
    monkeypatch.setattr(sqlite_store, "_FOLD_MIN", 16)
    url = f"sqlite:///{tmp_path}/s.db"
    a, b = SqliteStore(url), SqliteStore(url)
    try:
        stored = 0
        for i in range(12):  # 30 new keys a turn: generations freeze and fold under both writers
            w, other = (a, b) if i % 2 == 0 else (b, a)
            lo = 100 + i * 30
            r = _apply(w, _readings("d1", range(lo, lo + 30)))  # the first 5 the other stored last turn
            assert (r.stored, r.duplicates) == ((25, 5) if i else (30, 0)), i
            again = _apply(other, _readings("d1", range(lo - 5, lo + 35)))  # 35 of these 40 are stored
            assert (again.stored, again.duplicates) == ((5, 35) if i else (10, 30)), i
            stored += r.stored + again.stored
        assert a.stats().stored == stored == 370
        assert a.key_loads > 1 and b.key_loads > 1
        con = sqlite3.connect(tmp_path / "s.db")
        assert con.execute("SELECT count(*) FROM idents_blocks").fetchone()[0] > 0  # keys were folded
        con.close()
    finally:
        a.close()
        b.close()


def test_a_restarted_store_loads_its_keys(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/s.db"
    a = SqliteStore(url)
    _apply(a, _readings("d1", range(0, 100)))
    a.close()
    b = SqliteStore(url)
    r = _apply(b, _readings("d1", range(0, 120)))
    assert (r.stored, r.duplicates) == (20, 100)


def test_the_filter_stops_growing_at_its_cap_and_still_misses_no_key():
    from fieldmesh.store import keyfilter

    f = KeyFilter(10**9)  # asks for far more room than the cap
    assert f.nbytes == keyfilter._MAX_BITS // 8
    keys = np.random.default_rng(3).integers(0, 2**63, 100_000, dtype=np.int64)
    f.add(keys)
    f._layers[-1].count = 10**12  # however many keys it has seen: no more layers past the cap
    f.add(keys[:10])
    assert f.layers == 1 and f.may_contain(keys).all()
    g = KeyFilter(10)
    for layer in range(1, 8):  # layers of 2, 4, 8, 16 and 32 MiB; the 2 MiB left of the 64 MiB stay unused
        assert g.layers == min(layer, 5)
        g._layers[-1].count = g._layers[-1].capacity
        g.add(keys[10 * layer:10 * layer + 10])
    assert g.layers == 5 and g.nbytes == 62 << 20 and g.may_contain(keys[10:80]).all()


def test_past_its_cap_the_filter_still_rules_out_most_keys(monkeypatch: pytest.MonkeyPatch):
    """At 1/1024 the size (layers of 2 to 32 KiB under a 64 KiB cap, room for ~31,000 keys), twice as many keys
    as the room: the largest layer takes the keys past the cap and most keys never added still answer "no".
    With a smaller layer in the 2 KiB left under the cap, 96% answered "maybe" (each then a read of the store)."""
    from fieldmesh.store import keyfilter

    monkeypatch.setattr(keyfilter, "_MIN_BITS", 1 << 14)
    monkeypatch.setattr(keyfilter, "_MAX_BITS", 1 << 19)
    rng = np.random.default_rng(1)
    f = KeyFilter(10)
    added = rng.integers(0, 2**63, 64_000, dtype=np.int64)
    for s in range(0, len(added), 2000):
        f.add(added[s : s + 2000])
    assert f.layers == 5 and f.nbytes == 62 << 10
    assert f.may_contain(added).all()
    assert f.may_contain(rng.integers(0, 2**63, 200_000, dtype=np.int64)).mean() < 0.2
