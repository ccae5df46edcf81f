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
