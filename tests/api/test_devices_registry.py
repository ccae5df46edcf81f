"""The device registry over REST (docs/registry.md): register, change, remove, import; GET /devices merged
with what the store has seen; device groups from the registry, and callers limited to groups kept to them.

Real stores (SQLite, PostgreSQL) with real readings; real API keys.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fieldmesh.api.app import create_app
from fieldmesh.api.auth import Access
from fieldmesh.core.codec import decode_telemetry
from fieldmesh.core.settings import AccessSettings
from fieldmesh.store import load_store
from fieldmesh.store.access import AccessStore
from fieldmesh.store.registry import DeviceRegistry
from fmtest.drive import commit_readings

NOW = 1_763_812_345_123
#: Device groups by pattern, for devices the registry does not hold.
GROUPS = {"plant1": ("p1-*",), "lab": ("lab-*",)}
SEEN = ("lab-7", "p1-a", "p2-b")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def api(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, dict[str, str]], str,
                                                                         Access]]:
    """A client of the API over a store that has seen three devices, a header per key, the store's URL,
    and the API's authentication (its device groups)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/s.db"
    else:
        url = f"{request.getfixturevalue('pg_url')}?schema=t_{secrets.token_hex(5)}"
    w = load_store(url)
    for dev in SEEN:
        body = b"[" + b",".join(b'{"ts":%d,"seq":%d,"measurements":{"t":%d}}' % (NOW - 60_000 + i * 1000, i, i)
                                for i in range(10)) + b"]"
        commit_readings(w, decode_telemetry(body, device_id=dev, topic=f"devices/{dev}/telemetry",
                                            received_ms=NOW).readings)
    w.close()
    keys = AccessStore(url)
    made = {name: keys.create_key(role=role, groups=groups, name=name, actor="test")[1] for name, role, groups in (
        ("viewer", "viewer", ()), ("operator", "operator", ()), ("admin", "admin", ()),
        ("p1-viewer", "viewer", ("plant1",)), ("p1-op", "operator", ("plant1",)), ("p1-admin", "admin", ("plant1",)),
        ("lab-op", "operator", ("lab",)))}
    keys.close()
    access = Access(url, AccessSettings(groups=GROUPS), local_only=False)
    store = load_store(url, readonly=True)
    try:
        yield (TestClient(create_app(url, access=access, store=store)),
               {k: {"X-API-Key": v} for k, v in made.items()}, url, access)
    finally:
        access.close()
        store.close()


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [r["device_id"] for r in rows]


def test_register_change_remove_and_the_merged_listing(api: Any) -> None:
    c, h, *_ = api
    before = c.get("/api/v1/devices", headers=h["viewer"]).json()
    assert ids(before) == list(SEEN)
    assert all(r["registered"] is False and r["status"] is None and r["readings"] == 10 for r in before)
    assert {r["device_id"]: r["groups"] for r in before} == {"lab-7": ["lab"], "p1-a": ["plant1"], "p2-b": []}

    r = c.post("/api/v1/devices", headers=h["operator"], json={
        "device_id": "new-1", "groups": ["plant1"], "tags": ["fw:2"], "attributes": {"site": "north", "floor": 2}})
    assert r.status_code == 201, r.text
    new = r.json()
    assert (new["registered"], new["status"], new["groups"], new["tags"], new["attributes"]) == (
        True, "active", ["plant1"], ["fw:2"], {"floor": 2, "site": "north"})
    assert (new["readings"], new["first_seen"], new["metrics"]) == (0, None, [])  # never sent
    r = c.post("/api/v1/devices", headers=h["operator"], json={"device_id": "p1-a", "groups": ["plant1", "west"]})
    assert r.status_code == 201 and r.json()["readings"] == 10  # seen and registered: both halves

    rows = {x["device_id"]: x for x in c.get("/api/v1/devices", headers=h["viewer"]).json()}
    assert list(rows) == ["lab-7", "new-1", "p1-a", "p2-b"]
    assert [x["registered"] for x in rows.values()] == [False, True, True, False]
    assert rows["p1-a"]["groups"] == ["plant1", "west"] and rows["p1-a"]["metrics"] == ["t"]
    assert c.get("/api/v1/devices/new-1", headers=h["viewer"]).json()["attributes"]["site"] == "north"

    r = c.patch("/api/v1/devices/new-1", headers=h["operator"], json={
        "status": "suspended", "tags": [], "attributes": {"floor": None, "rack": "r7"}})
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["tags"], r.json()["attributes"]) == (
        "suspended", [], {"rack": "r7", "site": "north"})
    assert c.patch("/api/v1/devices/new-1", headers=h["operator"], json={}).json()["status"] == "suspended"

    # filters
    def listed(**params: Any) -> list[str]:
        return ids(c.get("/api/v1/devices", headers=h["viewer"], params=params).json())

    assert listed(status="suspended") == ["new-1"]
    assert listed(status="active") == ["p1-a"]
    assert listed(group="plant1") == ["new-1", "p1-a"]
    assert listed(group="west") == ["p1-a"]
    assert listed(group="lab") == ["lab-7"]  # by its pattern: not registered
    assert listed(registered="true") == ["new-1", "p1-a"]
    assert listed(registered="false") == ["lab-7", "p2-b"]
    assert listed(registered="false", group="plant1") == []
    assert c.get("/api/v1/devices", headers=h["viewer"], params={"status": "gone"}).status_code == 400
    assert c.get("/api/v1/devices", headers=h["viewer"], params={"group": "a/b"}).status_code == 400

    # remove: admin only; the seen half stays, the audit log keeps the registry's history
    assert c.delete("/api/v1/devices/new-1", headers=h["operator"]).status_code == 403
    r = c.delete("/api/v1/devices/new-1", headers=h["admin"])
    assert r.status_code == 200 and r.json()["status"] == "suspended" and r.json()["device_id"] == "new-1"
    assert c.get("/api/v1/devices/new-1", headers=h["viewer"]).status_code == 404
    assert c.delete("/api/v1/devices/new-1", headers=h["admin"]).status_code == 404
    c.delete("/api/v1/devices/p1-a", headers=h["admin"])
    p1a = c.get("/api/v1/devices/p1-a", headers=h["viewer"]).json()
    assert (p1a["registered"], p1a["readings"], p1a["groups"]) == (False, 10, ["plant1"])
    log = c.get("/api/v1/audit", headers=h["admin"]).json()
    assert [(e["action"], e["target"]) for e in reversed(log) if e["action"].startswith("device.")] == [
        ("device.add", "new-1"), ("device.add", "p1-a"), ("device.update", "new-1"), ("device.delete", "new-1"),
        ("device.delete", "p1-a")]
    subjects = {e["actor"] for e in log if e["action"].startswith("device.")}
    assert len(subjects) == 2 and all(s.startswith("key:") for s in subjects)


def test_clear_errors(api: Any) -> None:
    c, h, *_ = api
    assert c.post("/api/v1/devices", headers=h["operator"], json={"device_id": "d1"}).status_code == 201
    dup = c.post("/api/v1/devices", headers=h["operator"], json={"device_id": "d1"})
    assert dup.status_code == 409 and "registered already" in dup.json()["detail"]
    missing = c.patch("/api/v1/devices/p2-b", headers=h["operator"], json={"tags": ["x"]})  # seen, not registered
    assert missing.status_code == 404 and "no registered device 'p2-b'" in missing.json()["detail"]
    for body, name in [({"device_id": "a/b"}, "device_id"), ({"device_id": "d2", "status": "asleep"}, "status"),
                       ({"device_id": "d2", "groups": ["bad group"]}, "groups"), ({"device_id": "d2", "x": 1}, "x"),
                       ({"device_id": "d2", "attributes": {"bad key": 1}}, "attributes"),
                       ({"device_id": "d2", "attributes": {"big": "x" * 20_000}}, "attributes too large")]:
        r = c.post("/api/v1/devices", headers=h["operator"], json=body)
        assert r.status_code == 400 and name in r.json()["detail"], (body, r.text)
    assert c.patch("/api/v1/devices/d1", headers=h["operator"], json={"status": "gone"}).status_code == 400
    assert c.post("/api/v1/devices", headers=h["viewer"], json={"device_id": "d3"}).status_code == 403
    assert c.post("/api/v1/devices", json={"device_id": "d3"}).status_code == 401
    assert c.get("/api/v1/devices/d2", headers=h["viewer"]).status_code == 404  # nothing half-registered


def test_import(api: Any) -> None:
    c, h, *_ = api
    csv_text = ("device_id,groups,tags,status,attr.site\n"
                "p1-a,plant1;west,fw:1,,north\n"
                "p1-new,plant1,,suspended,\n"
                "lab-9,lab,,,\n")
    hdr = {**h["operator"], "Content-Type": "text/csv"}
    r = c.post("/api/v1/devices/import", headers=hdr, content=csv_text.encode())
    assert r.status_code == 200, r.text
    assert r.json() == {"added": 3, "updated": 0, "unchanged": 0}
    assert c.post("/api/v1/devices/import", headers=hdr, content=csv_text.encode()).json() == {
        "added": 0, "updated": 0, "unchanged": 3}
    r = c.post("/api/v1/devices/import", headers=hdr, content=b"device_id,status\np1-new,active\n")
    assert r.json() == {"added": 0, "updated": 1, "unchanged": 0}
    assert c.get("/api/v1/devices/p1-new", headers=h["viewer"]).json()["status"] == "active"
    bad = c.post("/api/v1/devices/import", headers=hdr,
                 content=b"device_id,groups,status\nok-1,g,\nbad id,g,\nok-2,g,dormant\n")
    assert bad.status_code == 422
    assert [e["line"] for e in bad.json()["errors"]] == [3, 4] and "nothing imported" in bad.json()["detail"]
    assert c.get("/api/v1/devices/ok-1", headers=h["viewer"]).status_code == 404  # all or nothing
    wrong = c.post("/api/v1/devices/import", headers={**h["operator"], "Content-Type": "application/json"},
                   content=b"{}")
    assert wrong.status_code == 415
    assert c.post("/api/v1/devices/import", headers=hdr, content=b"\xff\xfe").status_code == 400
    big = b"device_id\n" + b"x\n" * (4 * 1024 * 1024 + 1)
    assert c.post("/api/v1/devices/import", headers=hdr, content=big).status_code == 413
    assert c.post("/api/v1/devices/import", headers={**h["viewer"], "Content-Type": "text/csv"},
                  content=csv_text.encode()).status_code == 403


def test_groups_come_from_the_registry(api: Any) -> None:
    """Registering moves a device into the registry's groups at the next request; the patterns place the rest."""
    c, h, url, access = api
    assert ids(c.get("/api/v1/devices", headers=h["p1-viewer"]).json()) == ["p1-a"]
    assert c.get("/api/v1/devices/p2-b", headers=h["p1-viewer"]).status_code == 404
    c.post("/api/v1/devices", headers=h["operator"], json={"device_id": "p2-b", "groups": ["plant1"]})
    c.post("/api/v1/devices", headers=h["operator"], json={"device_id": "p1-a", "groups": ["plant2"]})
    assert ids(c.get("/api/v1/devices", headers=h["p1-viewer"]).json()) == ["p2-b"]
    assert c.get("/api/v1/devices/p2-b", headers=h["p1-viewer"]).json()["readings"] == 10
    assert c.get("/api/v1/telemetry/raw", headers=h["p1-viewer"], params={"device_id": "p2-b"}).status_code == 200
    for path, params in (("/api/v1/devices/p1-a", {}), ("/api/v1/telemetry/raw", {"device_id": "p1-a"})):
        assert c.get(path, headers=h["p1-viewer"], params=params).status_code == 404, path
    # the registry's groups are read whole only when its version moved, not at every request
    reloads = access.groups.reloads
    for _ in range(5):
        assert c.get("/api/v1/devices/p2-b", headers=h["p1-viewer"]).status_code == 200
    assert access.groups.reloads == reloads
    # a change counts from the next request (the cache follows the registry's version), even made elsewhere
    reg = DeviceRegistry(url)
    try:
        reg.update("p1-a", groups=["plant1"], actor="test")
    finally:
        reg.close()
    assert c.get("/api/v1/devices/p1-a", headers=h["p1-viewer"]).status_code == 200
    assert access.groups.reloads == reloads + 1
    assert ids(c.get("/api/v1/devices", headers=h["p1-viewer"]).json()) == ["p1-a", "p2-b"]
    # a registered device in no group is seen by unlimited callers only; the patterns no longer apply
    c.patch("/api/v1/devices/p1-a", headers=h["operator"], json={"groups": []})
    assert c.get("/api/v1/devices/p1-a", headers=h["p1-viewer"]).status_code == 404
    assert c.get("/api/v1/devices/p1-a", headers=h["viewer"]).status_code == 200


def test_a_caller_limited_to_groups_changes_only_its_groups_devices(api: Any) -> None:
    c, h, *_ = api
    op = h["p1-op"]
    c.post("/api/v1/devices", headers=h["operator"], json={"device_id": "other", "groups": ["plant2"]})
    c.post("/api/v1/devices", headers=h["operator"], json={"device_id": "shared", "groups": ["plant1", "lab"]})
    # register: in its groups, and only those
    assert c.post("/api/v1/devices", headers=op, json={"device_id": "m1", "groups": ["plant1"]}).status_code == 201
    for body in ({"device_id": "m2"}, {"device_id": "m2", "groups": ["plant2"]},
                 {"device_id": "m2", "groups": ["plant1", "plant2"]},
                 {"device_id": "lab-8", "groups": ["plant1"]}):  # the lab's patterns claim lab-*
        r = c.post("/api/v1/devices", headers=op, json=body)
        assert r.status_code == 403 and "limited to device groups plant1" in r.json()["detail"], (body, r.text)
    assert c.post("/api/v1/devices", headers=op, json={"device_id": "p1-zz", "groups": ["plant1"]}).status_code == 201
    # change: its devices only; others' are not there (404), a device shared with a group not its own is refused
    assert c.patch("/api/v1/devices/m1", headers=op, json={"tags": ["ok"]}).status_code == 200
    assert c.patch("/api/v1/devices/other", headers=op, json={"tags": ["x"]}).status_code == 404
    assert c.patch("/api/v1/devices/shared", headers=op, json={"tags": ["x"]}).status_code == 403
    assert c.patch("/api/v1/devices/m1", headers=op, json={"groups": ["plant2"]}).status_code == 403
    assert c.patch("/api/v1/devices/m1", headers=op, json={"groups": []}).status_code == 403
    # a limited admin removes its groups' devices only
    assert c.delete("/api/v1/devices/other", headers=h["p1-admin"]).status_code == 404
    assert c.delete("/api/v1/devices/m1", headers=h["p1-admin"]).status_code == 200
    # import: a row beyond its groups refuses the file, naming the line
    hdr = {**op, "Content-Type": "text/csv"}
    r = c.post("/api/v1/devices/import", headers=hdr, content=b"device_id,groups\nm3,plant1\nother,plant1\nm4,\n")
    assert r.status_code == 403 and "line 3" in r.json()["detail"] and "line 4" in r.json()["detail"], r.text
    assert c.get("/api/v1/devices/m3", headers=h["viewer"]).status_code == 404
    r = c.post("/api/v1/devices/import", headers=hdr, content=b"device_id,groups\nm3,plant1\np1-zz,plant1\n")
    assert r.json() == {"added": 1, "updated": 0, "unchanged": 1}
    assert ids(c.get("/api/v1/devices", headers=h["p1-viewer"]).json()) == ["m3", "p1-a", "p1-zz", "shared"]
    other = c.get("/api/v1/devices/other", headers=h["viewer"]).json()
    assert other["groups"] == ["plant2"] and other["tags"] == []  # untouched
