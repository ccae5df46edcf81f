"""``fitting``: how many records a fetch sized in bytes hands over (every adapter's rule, and the gateway's rounds)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fieldmesh.bus.base import fitting


def _plain(sizes: list[int], max_records: int, max_bytes: int | None) -> int:
    """The rule spelled out: up to ``max_records``, while the sizes add up to ``max_bytes``, the first one always."""
    n = min(len(sizes), max(1, max_records))
    total = 0
    for i in range(n):
        total += sizes[i]
        if max_bytes is not None and total > max_bytes and i > 0:
            return i
    return n


@given(st.lists(st.integers(0, 300), max_size=30), st.integers(0, 40), st.one_of(st.none(), st.integers(0, 2000)))
def test_fitting_is_the_plain_rule(sizes: list[int], max_records: int, max_bytes: int | None) -> None:
    assert fitting(iter(sizes), max_records, max_bytes) == _plain(sizes, max_records, max_bytes)


def test_a_record_larger_than_the_bound_comes_alone_and_nothing_gives_nothing() -> None:
    assert fitting([500, 10], 10, 100) == 1
    assert fitting([10, 500], 10, 100) == 1
    assert fitting([], 10, 100) == 0
    assert fitting([40, 40, 40], 10, 100) == 2
