"""``GET /api/v1/features/similar`` over the hot store's feature rows, refreshed incrementally."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from fieldmesh.api.app import create_app
from fieldmesh.store import load_store
from fieldmesh.store.features import FeatureTables
from fieldmesh.stream.featureviews import FeatureRow

T0 = 1_767_225_600_000


def _rows(rng: np.random.Generator, n: int, start: int) -> list[FeatureRow]:
    out = []
    for i in range(start, start + n):
        dev = f"pump-{i % 7}"
        base = {"temperature__mean__5m": 60 + rng.normal() * 5, "pressure__max__5m": 2 + rng.normal() * 0.3,
                "vibration__stddev__5m": abs(rng.normal())}
        out.append(FeatureRow(view="pump_stats", entity=dev, window_start_ms=T0 + i * 60_000 - 300_000,
                              window_end_ms=T0 + i * 60_000, known_at_ms=T0 + i * 60_000 + 700, version=0,
                              values=base))
    return out


def _commit(store, rows: list[FeatureRow]) -> None:  # type: ignore[no-untyped-def]
    store.transact(lambda tx: (FeatureTables.ensure(tx),
                               FeatureTables.commit(tx, rows, b"", {"rows": 0, "late": 0, "unkeyed": 0}, {})))


def _oracle(rows: list[FeatureRow], entity: str, ts: int, k: int) -> list[tuple[str, int, float]]:
    names = sorted(rows[0].values)
    x = np.array([[r.values[n] for n in names] for r in rows])
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    mine = [i for i, r in enumerate(rows) if r.entity == entity and r.known_at_ms <= ts]
    q = max(mine, key=lambda i: rows[i].window_end_ms)
    d = np.sqrt(((z - z[q]) ** 2).sum(axis=1))
    cand = [i for i, r in enumerate(rows) if r.known_at_ms <= ts and r.entity != entity]
    cand.sort(key=lambda i: (d[i], i))
    return [(rows[i].entity, rows[i].window_end_ms, float(d[i])) for i in cand[:k]]


def test_similar_windows_api(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    writer = load_store(url)
    reader = load_store(url, readonly=True)
    client = TestClient(create_app(url, store=reader, online_url=f"sqlite:///{tmp_path}/f.db"))
    try:
        # before any feature row: the view is unknown
        assert client.get("/api/v1/features/similar", params={"view": "pump_stats", "entity": "pump-1"}
                          ).status_code == 404
        rng = np.random.default_rng(4)
        rows = _rows(rng, 600, 0)
        _commit(writer, rows[:400])
        _commit(writer, rows[400:])
        time.sleep(2.1)  # the index refreshes at most every 2 s (the first query above refreshed it)
        ts = T0 + 500 * 60_000 + 700
        r = client.get("/api/v1/features/similar", params={"view": "pump_stats", "entity": "pump-3", "ts": ts,
                                                           "k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["features"] == sorted(rows[0].values) and body["indexed"] == 600
        want = _oracle(rows, "pump-3", ts, 5)
        got = [(m["entity"], m["window_end"], m["distance"]) for m in body["matches"]]
        assert [g[0] for g in got] == [w[0] for w in want]
        assert np.allclose([g[2] for g in got], [w[2] for w in want], rtol=1e-4)
        assert body["query"]["entity"] == "pump-3" and body["query"]["window_end"].startswith("2026-01-01T08:")
        assert body["searched"] == sum(1 for x in rows if x.known_at_ms <= ts and x.entity != "pump-3")

        # rows committed later are picked up by the incremental refresh (at most every 2 s)
        _commit(writer, _rows(rng, 50, 600))
        time.sleep(2.1)
        body = client.get("/api/v1/features/similar", params={"view": "pump_stats", "entity": "pump-3"}).json()
        assert body["indexed"] == 650 and body["query"]["window_end"].startswith("2026-01-01T10:")

        for params, code in (({"view": "pump_stats", "entity": "pump-3", "ts": "yesterday"}, 400),
                             ({"view": "pump_stats", "entity": "pump-3", "k": 0}, 400),
                             ({"view": "nope", "entity": "pump-3"}, 404),
                             ({"view": "pump_stats", "entity": "pump-99"}, 404),
                             ({"view": "pump_stats", "entity": "pump-3", "ts": T0 - 1}, 404)):
            assert client.get("/api/v1/features/similar", params=params).status_code == code, params
        # the online route still answers for entities (the /similar route does not shadow it, nor it /similar)
        assert client.get("/api/v1/features/pump-3", params={"views": "pump_stats"}).status_code == 200
    finally:
        client.close()
        reader.close()
        writer.close()
