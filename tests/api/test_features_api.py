"""``GET /api/v1/features/{entity}``: shape, nulls, errors; and the client over the real HTTP answer."""

from __future__ import annotations

import math
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from fieldmesh.api.app import create_app
from fieldmesh.client import FeatureClient
from fieldmesh.store.features import SqliteOnlineStore
from fieldmesh.stream.featureviews import FeatureRow


def _app(tmp_path: Path, online: bool = True) -> TestClient:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    return TestClient(create_app(url, online_url=f"sqlite:///{tmp_path / 'features.db'}" if online else None))


def test_values_nulls_and_iso_times(tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    online = SqliteOnlineStore(tmp_path / "features.db", ttl_ms={"pump": 3_600_000, "gone": 1000})
    online.put([FeatureRow("pump", "pump-7", 1_764_738_000_000, 1_764_741_600_000, now, 0,
                           {"t__mean__5m": 61.25, "t__rate__1m": math.nan}),
                FeatureRow("gone", "pump-7", 0, 60_000, now - 10_000, 0, {"t__mean__1m": 1.0})])
    online.close()
    c = _app(tmp_path)
    r = c.get("/api/v1/features/pump-7", params={"views": "pump,gone,never"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["entity"] == "pump-7"
    assert body["views"]["gone"] is None and body["views"]["never"] is None  # expired; never computed
    pump = body["views"]["pump"]
    assert pump["window_start"] == "2025-12-03T05:00:00.000Z" and pump["window_end"] == "2025-12-03T06:00:00.000Z"
    assert pump["version"] == 0 and pump["values"] == {"t__mean__5m": 61.25, "t__rate__1m": None}

    fc = FeatureClient("http://test", transport=httpx.MockTransport(
        lambda req: httpx.Response(200, json=c.get(req.url.raw_path.decode()).json())))
    f = fc.get("pump-7", ["pump", "gone"])
    assert f.vector("pump", ["t__mean__5m", "absent"]) == [61.25, None]
    assert f.values("gone") is None and f.known_at("pump") is not None
    assert abs(f.known_at("pump").timestamp() * 1000 - now) < 1  # type: ignore[union-attr]


@pytest.mark.parametrize("views", ["", "a,,b", "bad name", "1x", "a;b"])
def test_bad_views_are_a_400_naming_the_parameter(tmp_path: Path, views: str) -> None:
    r = _app(tmp_path).get("/api/v1/features/pump-7", params={"views": views})
    assert r.status_code == 400 and "views" in r.json()["detail"], r.text


def test_features_off_is_a_404(tmp_path: Path) -> None:
    r = _app(tmp_path, online=False).get("/api/v1/features/pump-7", params={"views": "pump"})
    assert r.status_code == 404 and "--features" in r.json()["detail"]
