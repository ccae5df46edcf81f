"""Similar windows: the brute-force index against a float64 oracle of z-normalized Euclidean distances."""

from __future__ import annotations

import numpy as np
import pytest

from fieldmesh.stream.pointintime import FeatureRows
from fieldmesh.stream.similar import SimilarityIndex


def _rows(rng: np.random.Generator, n: int, names: list[str], start: int, entities: int = 40,
          absent: float = 0.0) -> FeatureRows:
    scale = np.arange(1, len(names) + 1) * 10.0  # features on very different scales: normalization matters
    present = rng.random((n, len(names))) >= absent
    return FeatureRows("v", np.array([f"d{i}" for i in rng.integers(0, entities, n)], dtype=object),
                       (start + np.arange(n)) * 60_000, (start + np.arange(n)) * 60_000 + rng.integers(0, 50_000, n),
                       np.zeros(n, np.int64), tuple(names), rng.normal(size=(n, len(names))) * scale + scale,
                       present)


def _oracle(idx: SimilarityIndex, entity: str, ts: int, k: int, same: bool) -> tuple[int, list[int], np.ndarray]:
    n = idx.n
    raw = idx._raw[:n].astype(np.float64)
    mu, sd = np.nanmean(raw, axis=0), np.nanstd(raw, axis=0)
    z = np.where(np.isfinite(raw), (raw - mu) / sd, 0.0)
    ent = np.array([idx._entities[c] for c in idx._ent[:n]])
    known, end = idx._known[:n], idx._end[:n]
    mine = [i for i in range(n) if ent[i] == entity and known[i] <= ts]
    q = max(mine, key=lambda i: (end[i], idx._ver[i]))
    d = np.sqrt(((z - z[q]) ** 2).sum(axis=1))
    cand = (known <= ts) & ((ent != entity) if not same else (np.arange(n) != q))
    order = sorted(np.flatnonzero(cand).tolist(), key=lambda i: (d[i], i))[:k]
    return q, order, d


@pytest.mark.parametrize("same", [False, True])
def test_nearest_windows_are_the_oracles(same: bool) -> None:
    rng = np.random.default_rng(1)
    names = [f"f{i}" for i in range(12)]
    idx = SimilarityIndex("v")
    at = 0
    for size, cols in ((700, names[:8]), (300, names), (50, names[3:]), (25, names)):  # new features appear
        idx.add(_rows(rng, size, cols, at, absent=0.05))
        at += size
    idx.refit()
    for entity, ts in (("d3", 10**13), ("d7", 400 * 60_000 + 49_999), ("d11", 900 * 60_000)):
        res = idx.similar(entity, ts, 7, same_entity=same)
        assert res is not None
        q, want, d = _oracle(idx, entity, ts, 7, same)
        assert (res.query.entity, res.query.window_end_ms) == (entity, int(idx._end[q]))
        got_d = [m.distance for m in res.matches]
        assert np.allclose(got_d, [d[i] for i in want], rtol=1e-4, atol=1e-4), (got_d, [d[i] for i in want])
        assert [(m.entity, m.window_end_ms) for m in res.matches] == [
            (idx._entities[idx._ent[i]], int(idx._end[i])) for i in want]
        assert all(m.known_at_ms <= ts for m in res.matches)
        assert same or all(m.entity != entity for m in res.matches)


def test_nothing_known_and_small_candidate_sets() -> None:
    rng = np.random.default_rng(2)
    idx = SimilarityIndex("v")
    rows = _rows(rng, 100, ["a", "b"], 10, entities=3)
    idx.add(rows)
    first_known = int(rows.known_at_ms.min())
    assert idx.similar("d0", first_known - 1, 5) is None
    assert idx.similar("nobody", 10**13, 5) is None
    one = int(np.argmin(rows.known_at_ms))
    res = idx.similar(str(rows.entity[one]), first_known, 5)
    assert res is not None and res.matches == [] and res.searched == 0


def test_incremental_adds_keep_their_normalization_until_the_rows_grow() -> None:
    rng = np.random.default_rng(3)
    idx = SimilarityIndex("v")
    idx.add(_rows(rng, 1000, ["a", "b"], 0))
    mu = idx._mu.copy()
    idx.add(_rows(rng, 50, ["a", "b"], 1000))  # +5%: the new vectors use the same means and deviations
    assert np.array_equal(mu, idx._mu)
    idx.add(_rows(rng, 100, ["a", "b"], 1050))  # beyond +10%: refitted
    assert not np.array_equal(mu, idx._mu) and idx._normalized_at == 1150
