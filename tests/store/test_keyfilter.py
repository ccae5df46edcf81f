"""The identity-key Bloom filter never forgets a key, and the store keeps it in step with the table."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fieldmesh.core.codec import decode_telemetry
from fieldmesh.store.keyfilter import KeyFilter
from fieldmesh.store.sqlite import SqliteStore
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
    many = keys + [rnd.getrandbits(63) for _ in range(2_000_000)]
    f.add(many[50_000:])
    assert f.full
    f.rebuild(many, expected=2 * len(many))
    assert not f.full and f.may_contain(many).all()


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
    assert f.bits.nbytes == keyfilter._MAX_BITS // 8 and not f.full
    keys = np.random.default_rng(3).integers(0, 2**63, 100_000, dtype=np.int64)
    f.add(keys)
    f.count = 10**12  # however many keys it has seen: no rebuild, no growth
    assert not f.full and f.may_contain(keys).all()
