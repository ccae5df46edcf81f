"""The in-memory index of ``idents_recent``: whatever the order keys are added in, a lookup answers as a
dict of what was added (minus what was dropped from the front, in key order)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldmesh.store.recentkeys import RecentKeys

_key = st.integers(0, 2**63 - 1)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_key, max_size=40, unique=True), max_size=12), st.lists(_key, max_size=30),
       st.integers(0, 50))
def test_find_answers_as_a_dict(batches: list[list[int]], probes: list[int], drop: int) -> None:
    held = RecentKeys()
    want: dict[int, tuple[int, int]] = {}
    for b in batches:
        b = [k for k in b if k not in want]  # the store adds keys it does not hold
        ids = np.array(b, dtype=np.int64)
        chks = ids % 1009
        origins = np.where(ids % 3 == 0, -1, ids % 7919)
        held.add(ids, chks, origins)
        want.update(zip(b, zip(chks.tolist(), origins.tolist(), strict=True), strict=True))
    assert len(held) == len(want)
    held.drop_front(drop)
    for k in sorted(want)[:drop]:
        del want[k]
    assert len(held) == len(want)
    ids, _, _ = held.compact()
    assert ids.tolist() == sorted(want)
    keys = np.array(probes + list(want), dtype=np.int64)
    found, chk, org = held.find(keys)
    for k, f, c, o in zip(keys.tolist(), found.tolist(), chk.tolist(), org.tolist(), strict=True):
        assert f == (k in want)
        assert (c, o) == (want[k] if f else (0, -1))


def test_merging_runs_holds_little_more_than_the_runs() -> None:
    """Two runs of a million keys each merge while the memory traced grows by at most 1.2 times what the two
    runs hold, the added run's sorted copy included (1.17 measured; the concatenations, the sort order and
    three permuted columns at once took 2.5 times)."""
    import tracemalloc

    tracemalloc.start()
    try:
        rng = np.random.default_rng(7)
        ids = rng.choice(2**62, size=2_000_000, replace=False).astype(np.int64)
        held = RecentKeys()
        held.add(ids[:1_000_000].copy(), ids[:1_000_000] % 97, ids[:1_000_000] % 5)
        b_cols = (ids[1_000_000:].copy(), ids[1_000_000:] % 97, ids[1_000_000:] % 5)
        del ids
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        held.add(*b_cols)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    runs = 2 * 3 * 8 * 1_000_000  # bytes the two runs hold
    assert len(held) == 2_000_000
    merged, _, _ = held.compact()
    assert bool((np.diff(merged) > 0).all())
    assert peak - before <= 1.2 * runs, (peak - before) / runs


def test_keys_dropped_from_the_front_give_their_memory_back() -> None:
    """The frozen generation is folded away a slice at a time: once half of what its arrays hold is dropped, the
    rest is copied and the arrays go, and lookups still answer for the keys left."""
    import tracemalloc

    tracemalloc.start()
    try:
        ids = np.random.default_rng(3).choice(2**62, size=400_000, replace=False).astype(np.int64)
        held = RecentKeys()
        held.add(ids, ids % 97, ids % 5)
        del ids
        full, _ = tracemalloc.get_traced_memory()
        kept = np.sort(held.compact()[0])
        for step in range(9):  # 10% each time
            held.drop_front(40_000)
            left = kept[(step + 1) * 40_000:]
            found, chk, org = held.find(np.concatenate((left[:50], kept[:50])))
            assert found[:50].all() and not found[50:].any()
            assert (chk[:50] == left[:50] % 97).all() and (org[:50] == left[:50] % 5).all()
        assert len(held) == 40_000
        now, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert now - kept.nbytes < 0.4 * full, (now, full)  # without the copies: all of it, until the last key goes
