"""Twins over REST (docs/twins.md): GET the twin and its delta, PATCH desired with If-Match or a
version (409 when stale), limits (413, 400), roles and device groups as the device routes have them.
Real stores (SQLite, PostgreSQL), real API keys."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fieldmesh.api.app import create_app
from fieldmesh.api.auth import Access
from fieldmesh.core.settings import AccessSettings
from fieldmesh.store import load_store
from fieldmesh.store.access import AccessStore
from fieldmesh.store.twins import TwinStore


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, dict[str, str]], str]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/s.db"
    else:
        url = f"{request.getfixturevalue('pg_url')}?schema=t_{secrets.token_hex(5)}"
    load_store(url).close()
    keys = AccessStore(url)
    made = {name: keys.create_key(role=role, groups=groups, name=name, actor="test")[1] for name, role, groups in (
        ("viewer", "viewer", ()), ("operator", "operator", ()), ("p1-op", "operator", ("plant1",)))}
    keys.close()
    access = Access(url, AccessSettings(groups={"plant1": ("p1-*",)}), local_only=False)
    app = create_app(url, access=access)
    try:
        yield TestClient(app), {k: {"X-API-Key": v} for k, v in made.items()}, url
    finally:
        app.state.twins.close()
        access.close()


def test_get_patch_delta(api: tuple[TestClient, dict[str, dict[str, str]], str]) -> None:
    c, h, url = api
    r = c.get("/api/v1/devices/p1-a/twin", headers=h["viewer"])
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 0 and r.headers["etag"] == '"0"'
    r = c.patch("/api/v1/devices/p1-a/twin/desired", headers=h["operator"],
                json={"desired": {"mode": "window", "window_ms": 10000, "metrics": {"t": {"deadband": 0.5}}}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 1 and body["delta"] == body["desired"]
    assert set(body["metadata"]["desired"]) == {"/mode", "/window_ms", "/metrics/t/deadband"}
    # the device reports (over MQTT, through the twin service; here straight into the store)
    s = TwinStore(url)
    s.update_reported("p1-a", {"mode": "window", "window_ms": 10000})
    s.close()
    r = c.get("/api/v1/devices/p1-a/twin/delta", headers=h["viewer"])
    assert r.status_code == 200
    assert r.json()["delta"] == {"metrics": {"t": {"deadband": 0.5}}}
    assert r.json()["version"] == 2 and r.headers["etag"] == '"2"'
    assert list(r.json()["metadata"]) == ["/metrics/t/deadband"]
    # null removes
    r = c.patch("/api/v1/devices/p1-a/twin/desired", headers=h["operator"], json={"desired": {"metrics": None}})
    assert r.json()["delta"] == {} and r.json()["version"] == 3


def test_optimistic_concurrency(api: tuple[TestClient, dict[str, dict[str, str]], str]) -> None:
    c, h, _ = api
    c.patch("/api/v1/devices/d-1/twin/desired", headers=h["operator"], json={"desired": {"a": 1}})
    ok = c.patch("/api/v1/devices/d-1/twin/desired", headers={**h["operator"], "If-Match": '"1"'},
                 json={"desired": {"a": 2}})
    assert ok.status_code == 200 and ok.json()["version"] == 2
    stale = c.patch("/api/v1/devices/d-1/twin/desired", headers={**h["operator"], "If-Match": '"1"'},
                    json={"desired": {"a": 3}})
    assert stale.status_code == 409 and "version 2" in stale.json()["detail"]
    stale = c.patch("/api/v1/devices/d-1/twin/desired", headers=h["operator"], json={"desired": {"a": 3}, "version": 1})
    assert stale.status_code == 409
    both = c.patch("/api/v1/devices/d-1/twin/desired", headers={**h["operator"], "If-Match": '"2"'},
                   json={"desired": {"a": 3}, "version": 1})
    assert both.status_code == 400
    bad = c.patch("/api/v1/devices/d-1/twin/desired", headers={**h["operator"], "If-Match": "*x"},
                  json={"desired": {"a": 3}})
    assert bad.status_code == 400
    assert c.get("/api/v1/devices/d-1/twin", headers=h["viewer"]).json()["desired"] == {"a": 2}


def test_concurrent_patches_through_the_api(api: tuple[TestClient, dict[str, dict[str, str]], str]) -> None:
    """Writers read the twin and PATCH with If-Match: every one lands exactly once, the stale are 409."""
    c, h, _ = api
    writers, per_writer = 3, 10
    conflicts = [0] * writers

    def write(i: int) -> None:
        for _ in range(per_writer):
            while True:
                t = c.get("/api/v1/devices/c-1/twin", headers=h["operator"])
                n = t.json()["desired"].get("n", 0)
                r = c.patch("/api/v1/devices/c-1/twin/desired", json={"desired": {"n": n + 1}},
                            headers={**h["operator"], "If-Match": t.headers["etag"]})
                if r.status_code == 200:
                    break
                assert r.status_code == 409, r.text
                conflicts[i] += 1

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    final = c.get("/api/v1/devices/c-1/twin", headers=h["viewer"]).json()
    assert final["desired"]["n"] == writers * per_writer and final["version"] == writers * per_writer


def test_limits_roles_groups(api: tuple[TestClient, dict[str, dict[str, str]], str]) -> None:
    c, h, _ = api
    big = c.patch("/api/v1/devices/d-1/twin/desired", headers=h["operator"], json={"desired": {"a": "x" * 9000}})
    assert big.status_code == 413 and "8192" in big.json()["detail"]
    deep: dict[str, object] = {"v": 1}
    for _ in range(10):
        deep = {"n": deep}
    r = c.patch("/api/v1/devices/d-1/twin/desired", headers=h["operator"], json={"desired": deep})
    assert r.status_code == 400 and "levels deep" in r.json()["detail"]
    assert c.patch("/api/v1/devices/d-1/twin/desired", headers=h["operator"], json={"desired": [1]}).status_code == 400
    assert c.patch("/api/v1/devices/d-1/twin/desired", headers=h["operator"], json={"a": 1}).status_code == 400
    # a viewer reads, may not change
    assert c.patch("/api/v1/devices/d-1/twin/desired", headers=h["viewer"], json={"desired": {}}).status_code == 403
    assert c.get("/api/v1/devices/d-1/twin").status_code == 401
    # a caller limited to plant1 (p1-*) sees and changes its devices only; another's is a 404
    one = {"desired": {"a": 1}}
    assert c.patch("/api/v1/devices/p1-x/twin/desired", headers=h["p1-op"], json=one).status_code == 200
    assert c.get("/api/v1/devices/d-1/twin", headers=h["p1-op"]).status_code == 404
    assert c.patch("/api/v1/devices/d-1/twin/desired", headers=h["p1-op"], json=one).status_code == 404
    assert c.get("/api/v1/devices/bad.id/twin", headers=h["viewer"]).status_code == 400
