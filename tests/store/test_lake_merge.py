"""The lake's rollup merge a range of windows at a time (:func:`fieldmesh.store.lake._merged_chunks`) gives what
one merge of everything gives, whatever the chunk size, with the table's rows among the parts."""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from fieldmesh.core.exact import add_float
from fieldmesh.store.lake import _Accs, _merge, _merged_chunks, _rollup_table, _schemas


def _accs(rnd: random.Random, n: int) -> _Accs:
    """``n`` entries over few devices, metrics and windows (so keys repeat within and across parts)."""
    device = np.array([f"d{rnd.randrange(4)}" for _ in range(n)], dtype=object)
    metric = np.array([rnd.choice(("t", "p")) for _ in range(n)], dtype=object)
    ws = np.array([60_000 * rnd.randrange(9) for _ in range(n)], dtype=np.int64)
    values = [rnd.uniform(-1e6, 1e6) * 2.0 ** rnd.randrange(-40, 40) for _ in range(n)]
    exact = [add_float(0, 0, v) for v in values]
    m = np.empty(n, dtype=object)
    m[:] = [x[0] for x in exact]
    e = np.array([x[1] for x in exact], dtype=np.int64)
    return _Accs(device, metric, ws, np.ones(n, dtype=np.int64), m, e, np.array(values), np.array(values))


def _by_key(parts: list[_Accs]) -> dict[tuple[Any, ...], tuple[int, tuple[int, int], float, float]]:
    out: dict[tuple[Any, ...], tuple[int, tuple[int, int], float, float]] = {}
    for a in parts:
        for i in range(len(a)):
            k = (a.device[i], a.metric[i], int(a.window_start_ms[i]))
            assert k not in out, f"key {k} in two chunks"
            out[k] = (int(a.count[i]), (int(a.m[i]), int(a.e[i])), float(a.min[i]), float(a.max[i]))
    return out


def _canonical(d: dict[tuple[Any, ...], tuple[int, tuple[int, int], float, float]]) -> dict[Any, Any]:
    """Exact sums compared as values (``m * 2**e`` has many spellings)."""
    return {k: (c, Fraction(m) * Fraction(2) ** e, lo, hi) for k, (c, (m, e), lo, hi) in d.items()}


@pytest.mark.parametrize("rows", [1, 2, 7, 50_000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merging_a_range_of_windows_at_a_time_equals_one_merge(rows: int, seed: int) -> None:
    rnd = random.Random(seed)
    parts = [_accs(rnd, rnd.randrange(0, 40)) for _ in range(5)]
    old_accs = _merge([_accs(rnd, 60)])
    assert old_accs is not None
    schema = _schemas(8)["rollup_1m"][0].as_arrow()
    old = _rollup_table(old_accs, schema)
    whole = _merge([*parts, _Accs.of_rows(old)])
    assert whole is not None
    chunks = list(_merged_chunks(parts, old, rows=rows))
    assert _canonical(_by_key(chunks)) == _canonical(_by_key([whole]))
    if rows == 1:  # a chunk per window
        assert len(chunks) == len(np.unique(whole.window_start_ms))
    if rows == 50_000:
        assert len(chunks) == 1


def test_no_parts_and_no_rows_merge_to_nothing() -> None:
    assert list(_merged_chunks([])) == []
