"""``GET /api/v1/features/{entity}``: shape, nulls, errors; the answer against its pydantic model; and the
Python client (HTTP, and straight from the online store) against the API served by a real uvicorn, over the
embedded SQLite store and a real Redis."""

from __future__ import annotations

import http.client
import json
import math
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from fieldmesh.api.app import create_app
from fieldmesh.api.auth import Access
from fieldmesh.api.features import EntityFeatures, row_json
from fieldmesh.client import FeatureClient, OnlineFeatures
from fieldmesh.core.errors import BackendError, BackendUnavailable, FieldmeshError
from fieldmesh.store.access import AccessStore
from fieldmesh.store.features import RedisOnlineStore, SqliteOnlineStore, encode_answer, load_online_store
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
    # what the route encodes with msgspec is what its response model (the OpenAPI document) says
    assert EntityFeatures.model_validate_json(r.content).model_dump() == body


@pytest.mark.parametrize("views", ["", "a,,b", "bad name", "1x", "a;b"])
def test_bad_views_are_a_400_naming_the_parameter(tmp_path: Path, views: str) -> None:
    r = _app(tmp_path).get("/api/v1/features/pump-7", params={"views": views})
    assert r.status_code == 400 and "views" in r.json()["detail"], r.text


def test_features_off_is_a_404(tmp_path: Path) -> None:
    r = _app(tmp_path, online=False).get("/api/v1/features/pump-7", params={"views": "pump"})
    assert r.status_code == 404 and "--features" in r.json()["detail"]


def test_the_answer_is_row_json_through_the_model(tmp_path: Path) -> None:
    """encode_answer (the route's msgspec body) == row_json through EntityFeatures, on awkward values."""
    rows: dict[str, FeatureRow | None] = {
        "b_view": FeatureRow("b_view", "e/1 x", -86_400_001, 0, 1_764_741_600_123, 7,
                             {"z": 1e-320, "a": -0.0, "m": math.inf, "n": -math.inf, "q": math.nan, "big": 1.7e308,
                              "third": 1 / 3, "int_like": 3.0}),
        "a_view": None}
    raw = encode_answer("e/1 x", rows)
    want = EntityFeatures(entity="e/1 x", views={
        v: None if row is None else row_json(row) for v, row in rows.items()}).model_dump()  # type: ignore[misc]
    assert json.loads(raw) == want
    assert list(json.loads(raw)["views"]) == ["b_view", "a_view"]  # the asked order
    assert list(json.loads(raw)["views"]["b_view"]["values"]) == sorted(rows["b_view"].values)  # type: ignore[union-attr]


# -- the client against a real server ------------------------------------------------------------------


class _Api:
    """The API served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, store_url: str, online_url: str | None, *, access: Access | None = None,
                 keep_alive_s: int = 5) -> None:
        app = create_app(store_url, online_url=online_url, access=access)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off", timeout_keep_alive=keep_alive_s))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def connections(self) -> int:
        return len(self.server.server_state.connections)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _five_rows(entity: str, *, nan: bool = True) -> list[FeatureRow]:
    now = int(time.time() * 1000)
    return [FeatureRow(f"view{v}", entity, now - 3_600_000, now - 1, now, v,
                       {f"t__agg{i}__5m": (math.nan if nan and i == 3 else 20.0 + v + i * 0.37) for i in range(42)})
            for v in range(5)]


@pytest.fixture(params=["redis", "sqlite"])
def online_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "redis":
        url = f"redis://127.0.0.1:6379/0?prefix=tapi{uuid.uuid4().hex[:10]}"
        store = load_online_store(url)
        yield url
        assert isinstance(store, RedisOnlineStore)
        store.clear()
        store.close()
    else:
        yield f"sqlite:///{tmp_path / 'features.db'}"


def test_client_over_http_and_direct_give_the_api_answer(tmp_path: Path, online_url: str) -> None:
    """The client's answer (HTTP; and read straight from the store) equals the API's body, over one kept-alive
    connection; a view without a row and a value that is NaN come back as None."""
    store = load_online_store(online_url)
    store.put(_five_rows("pump-7"))
    api = _Api(f"sqlite:///{tmp_path / 'store.db'}", online_url)
    views = [f"view{v}" for v in range(5)] + ["never"]
    try:
        conn = http.client.HTTPConnection("127.0.0.1", api.port)
        conn.request("GET", f"/api/v1/features/pump-7?views={','.join(views)}")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("content-type") == "application/json"
        body = json.loads(resp.read())
        conn.close()
        with FeatureClient(api.url) as fc, FeatureClient(online_url=online_url) as direct:
            for _ in range(20):
                got = fc.get("pump-7", views)
                assert got == OnlineFeatures(entity="pump-7", views=body["views"])
            assert api.connections() == 1  # twenty gets, one connection
            assert direct.get("pump-7", views) == got  # the same answer without the API
            assert list(got.views) == views and got.views["never"] is None
            assert got.vector("view0", ["t__agg0__5m", "t__agg3__5m", "absent"]) == [20.0, None, None]
            assert got.known_at("view0") is not None and got.values("never") is None
            assert direct.get("pump-7", ["view1", "view1"]) == fc.get("pump-7", ["view1", "view1"])  # dedupe
            with pytest.raises(FieldmeshError, match="400"):
                fc.get("pump-7", ["bad name"])
            with pytest.raises(FieldmeshError, match="bad view"):
                direct.get("pump-7", ["bad name"])
    finally:
        api.stop()
        store.close()


def test_client_replaces_a_connection_the_server_closed(tmp_path: Path) -> None:
    """uvicorn closes an idle keep-alive connection after its timeout (1 s here): the next get reconnects."""
    online = f"sqlite:///{tmp_path / 'features.db'}"
    store = load_online_store(online)
    store.put(_five_rows("pump-7"))
    api = _Api(f"sqlite:///{tmp_path / 'store.db'}", online, keep_alive_s=1)
    try:
        with FeatureClient(api.url) as fc:
            first = fc.get("pump-7", ["view0"])
            deadline = time.monotonic() + 10
            while api.connections():  # the server closes the idle connection
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert fc.get("pump-7", ["view0"]) == first
    finally:
        api.stop()
        store.close()


def test_client_shared_by_threads(tmp_path: Path) -> None:
    online = f"sqlite:///{tmp_path / 'features.db'}"
    store = load_online_store(online)
    store.put(_five_rows("pump-7"))
    api = _Api(f"sqlite:///{tmp_path / 'store.db'}", online)
    errors: list[BaseException] = []
    try:
        with FeatureClient(api.url) as fc:
            want = fc.get("pump-7", ["view0", "view4"])

            def work() -> None:
                try:
                    for _ in range(30):
                        assert fc.get("pump-7", ["view0", "view4"]) == want
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=work) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert not errors, errors
            assert 1 <= api.connections() <= 4  # kept, at most one per concurrent caller
    finally:
        api.stop()
        store.close()


def test_client_with_a_key_and_its_revocation(tmp_path: Path) -> None:
    """Outside local-only mode the client sends its key; a revoked key is refused from the next request."""
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    online = f"sqlite:///{tmp_path / 'features.db'}"
    load_online_store(online).put(_five_rows("pump-7"))
    keys = AccessStore(store_url)
    key, secret = keys.create_key(role="viewer", actor="test")
    api = _Api(store_url, online, access=Access(store_url, local_only=False))
    try:
        with FeatureClient(api.url, api_key=secret) as fc, FeatureClient(api.url) as anonymous:
            assert fc.get("pump-7", ["view0"]).views["view0"] is not None
            with pytest.raises(FieldmeshError, match="401"):
                anonymous.get("pump-7", ["view0"])
            keys.revoke_key(key.id, actor="test")
            with pytest.raises(FieldmeshError, match="401"):
                fc.get("pump-7", ["view0"])
    finally:
        api.stop()
        keys.close()


def test_client_errors(tmp_path: Path) -> None:
    """Redis down behind the API: 503 -> BackendError; the API down: BackendUnavailable; features off: 404."""
    down = "redis://127.0.0.1:1/0?prefix=t"  # nothing listens on port 1
    api = _Api(f"sqlite:///{tmp_path / 'store.db'}", down)
    off = _Api(f"sqlite:///{tmp_path / 'store2.db'}", None)
    try:
        with FeatureClient(api.url) as fc, pytest.raises(BackendError, match="503"):
            fc.get("pump-7", ["view0"])
        with FeatureClient(off.url) as fc, pytest.raises(FieldmeshError, match="404"):
            fc.get("pump-7", ["view0"])
        with FeatureClient(online_url=down) as direct, pytest.raises(BackendUnavailable):
            direct.get("pump-7", ["view0"])
    finally:
        api.stop()
        off.stop()
    with FeatureClient(api.url, timeout_s=1) as fc, pytest.raises(BackendUnavailable, match="unreachable"):
        fc.get("pump-7", ["view0"])
    with pytest.raises(ValueError):
        FeatureClient()
    with pytest.raises(ValueError):
        FeatureClient("ftp://x")
    with pytest.raises(ValueError, match="views"), FeatureClient(api.url) as fc:
        fc.get("pump-7", [])


def test_openapi_lists_the_feature_routes_where_they_were(tmp_path: Path) -> None:
    """They are served first (the serving path of models), but the document keeps its order: after the schema
    registry's paths, before the data products'."""
    paths = list(create_app(f"sqlite:///{tmp_path / 'store.db'}", online_url=None).openapi()["paths"])
    at = paths.index("/api/v1/features/similar")
    assert paths[at + 1] == "/api/v1/features/{entity}"
    assert paths[at - 1].startswith("/api/v1/registry/") and not paths[at + 2].startswith("/api/v1/registry")
    assert paths.index("/api/v1/stats") < at
