"""Alert rules and alerts over REST, on real SQLite and PostgreSQL stores: validation and clear 4xx,
the lifecycle (open by the processor's stage, ack and clear by operators, each step in the history and
the outbox), filters, device-group isolation, stats and metrics."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fieldmesh.api.app import Severity, create_app
from fieldmesh.api.auth import Access
from fieldmesh.core.batch import ReadingColumns
from fieldmesh.core.model import Reading
from fieldmesh.core.settings import AccessSettings
from fieldmesh.store import load_store
from fieldmesh.store.access import AccessStore
from fieldmesh.store.base import INTERVALS, HotStore
from fieldmesh.store.registry import DeviceRegistry
from fieldmesh.stream import reference
from fieldmesh.stream.alerting import AlertEngine
from fieldmesh.stream.alerts import SEVERITIES

NOW = 1_763_812_345_123
HOT = {"name": "hot", "kind": "threshold", "metric": "temperature", "op": ">", "value": 30, "clear_value": 28,
       "severity": "major", "devices": ["p1-*", "p2-*"], "labels": {"team": "pumps"},
       "notify": [{"webhook": "http://127.0.0.1:9/hook"},
                  {"webhook": "http://127.0.0.1:9/am", "format": "alertmanager"}]}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/s.db"
    return f"{request.getfixturevalue('pg_url')}?schema=t_{secrets.token_hex(5)}"


@pytest.fixture
def env(store_url: str) -> Iterator[dict[str, Any]]:
    keys = AccessStore(store_url)
    made = {role: keys.create_key(role=role, actor="test")[1] for role in ("viewer", "operator", "admin")}
    made["plant1"] = keys.create_key(role="operator", groups=["plant1"], actor="test")[1]
    access = Access(store_url, AccessSettings(groups={"plant1": ["p1-*"]}))
    writer = load_store(store_url)
    reader = load_store(store_url, readonly=True)
    client = TestClient(create_app(store_url, store=reader, access=access))
    engine = AlertEngine(writer)
    yield {"c": client, "keys": made, "writer": writer, "engine": engine}
    client.close()
    access.close()
    reader.close()
    writer.close()
    keys.close()


def _h(env: dict[str, Any], who: str) -> dict[str, str]:
    return {"X-API-Key": env["keys"][who]}


def _send(env: dict[str, Any], readings: Sequence[tuple[str, int, float]]) -> None:
    """Commit readings as the processor does: decided, and the alert stage in the same transaction."""
    store: HotStore = env["writer"]
    engine: AlertEngine = env["engine"]
    wall = int(time.time() * 1000)  # received now: absence reads the wall clock
    rs = [Reading(d, NOW + t, {"temperature": v}, key=secrets.randbits(62), chk=1, received_ms=wall)
          for d, t, v in readings]
    cols = ReadingColumns.from_readings(rs)
    wm = store.device_watermarks()
    applied: list[Any] = []

    def build(txn: Any) -> Any:
        res = reference.settle(cols, np.zeros(len(rs), dtype=bool), np.full(len(rs), -1, dtype=np.int64),
                               txn.claim_keys, intervals=INTERVALS)
        applied[:] = [engine.in_txn(txn, res, wm)]
        return res

    store.commit(build, ts_ms=cols.ts_ms)
    engine.committed(applied[0])


def test_severities_of_the_api_are_the_rules(env: dict[str, Any]) -> None:
    optional = get_args(Severity)[0]  # Annotated[Literal[...] | None, Query()]
    assert set(get_args(get_args(optional)[0])) == set(SEVERITIES)


def test_rules_crud_with_clear_errors(env: dict[str, Any]) -> None:
    c, op, viewer = env["c"], _h(env, "operator"), _h(env, "viewer")
    r = c.post("/api/v1/rules", json=HOT, headers=op)
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "api" and r.json()["updated_by"].startswith("key:")
    assert c.post("/api/v1/rules", json=HOT, headers=op).status_code == 409
    bad = c.post("/api/v1/rules", json={**HOT, "name": "x", "clear_value": 35}, headers=op)
    assert bad.status_code == 400 and "clear_value" in bad.json()["detail"]
    assert c.post("/api/v1/rules", json=[HOT], headers=op).status_code == 400
    assert c.post("/api/v1/rules", json={**HOT, "name": "y"}, headers=viewer).status_code == 403
    assert c.post("/api/v1/rules", json={**HOT, "name": "y"}, headers=_h(env, "plant1")).status_code == 403
    assert [x["name"] for x in c.get("/api/v1/rules", headers=viewer).json()] == ["hot"]
    v0 = c.get("/api/v1/stats", headers=viewer).json()["alerts"]["rules_version"]
    got = c.get("/api/v1/rules/hot", headers=viewer).json()
    changed = c.put("/api/v1/rules/hot", json={**got, "value": 31}, headers=op)  # a GET's answer sent back
    assert changed.status_code == 200 and changed.json()["value"] == 31
    assert c.get("/api/v1/stats", headers=viewer).json()["alerts"]["rules_version"] == v0 + 1
    assert c.put("/api/v1/rules/hot", json={**HOT, "name": "other"}, headers=op).status_code == 400
    assert c.get("/api/v1/rules/nope", headers=viewer).status_code == 404
    assert c.delete("/api/v1/rules/hot", headers=op).status_code == 204
    assert c.delete("/api/v1/rules/hot", headers=op).status_code == 404
    assert c.get("/api/v1/rules/bad%20name", headers=viewer).status_code == 400
    actions = [a["action"] for a in c.get("/api/v1/audit", headers=_h(env, "admin")).json()]
    assert actions[:3] == ["rule.delete", "rule.update", "rule.add"]


def test_lifecycle_filters_and_group_isolation(env: dict[str, Any]) -> None:
    c, op, viewer = env["c"], _h(env, "operator"), _h(env, "viewer")
    assert c.post("/api/v1/rules", json=HOT, headers=op).status_code == 201
    _send(env, [("p1-a", 0, 25.0), ("p2-b", 0, 25.0)])
    assert c.get("/api/v1/alerts", headers=viewer).json() == []
    _send(env, [("p1-a", 1000, 31.5), ("p2-b", 1000, 33.0), ("p1-a", 2000, 32.0)])
    alerts = c.get("/api/v1/alerts", params={"state": "open"}, headers=viewer).json()
    assert sorted((a["device_id"], a["value"], a["opened_ts_ms"] - NOW) for a in alerts) == [
        ("p1-a", 31.5, 1000), ("p2-b", 33.0, 1000)]
    assert {a["severity"] for a in alerts} == {"major"} and alerts[0]["labels"] == {"team": "pumps"}
    mine = c.get("/api/v1/alerts", params={"device_id": "p1-a"}, headers=viewer).json()
    assert len(mine) == 1
    aid = mine[0]["id"]
    assert c.get("/api/v1/alerts", params={"rule": "nope"}, headers=viewer).json() == []
    assert c.get("/api/v1/alerts", params={"severity": "minor"}, headers=viewer).json() == []
    assert c.get("/api/v1/alerts", params={"severity": "loud"}, headers=viewer).status_code == 400
    assert c.get("/api/v1/alerts", params={"since": "2099-01-01T00:00:00Z"}, headers=viewer).json() == []
    assert c.get("/api/v1/alerts", params={"state": "closed"}, headers=viewer).status_code == 400
    # ack: operator only, once
    assert c.post(f"/api/v1/alerts/{aid}/ack", json={"note": "x"}, headers=viewer).status_code == 403
    r = c.post(f"/api/v1/alerts/{aid}/ack", json={"note": "looking"}, headers=op)
    assert r.status_code == 200 and r.json()["state"] == "acknowledged" and r.json()["note"] == "looking"
    assert c.post(f"/api/v1/alerts/{aid}/ack", headers=op).status_code == 409
    assert c.post(f"/api/v1/alerts/{aid}/ack", json={"nope": 1}, headers=op).status_code == 400
    assert c.post("/api/v1/alerts/999999/ack", headers=op).status_code == 404
    assert c.get("/api/v1/alerts", params={"state": "active"}, headers=viewer).json()[0]["state"] in (
        "open", "acknowledged")
    # the condition clears: the acknowledged alert is cleared by the rule
    _send(env, [("p1-a", 3000, 27.0)])
    detail = c.get(f"/api/v1/alerts/{aid}", headers=viewer).json()
    assert detail["state"] == "cleared" and detail["cleared_by"] == "rule" and detail["clear_value"] == 27.0
    assert [h["event"] for h in detail["history"]] == ["open", "acknowledged", "cleared"]
    # two targets per step: 3 steps, 6 notifications, stable ids
    notes = detail["notifications"]
    assert sorted((n["event"], n["target"].get("format", "json")) for n in notes) == sorted(
        (e, f) for e in ("open", "acknowledged", "cleared") for f in ("json", "alertmanager"))
    assert len({n["notification_id"] for n in notes}) == 6
    assert c.post(f"/api/v1/alerts/{aid}/clear", headers=op).status_code == 409
    # group isolation: plant1 (p1-*) sees and acts on p1 alerts only; a listing needs a device_id
    p1 = _h(env, "plant1")
    other = c.get("/api/v1/alerts", params={"device_id": "p2-b"}, headers=viewer).json()[0]["id"]
    assert c.get("/api/v1/alerts", headers=p1).status_code == 403
    assert c.get(f"/api/v1/alerts/{other}", headers=p1).status_code == 404
    assert c.post(f"/api/v1/alerts/{other}/clear", headers=p1).status_code == 404
    assert c.get(f"/api/v1/alerts/{aid}", headers=p1).status_code == 200
    assert c.get("/api/v1/alerts/notifications", headers=p1).status_code == 403
    r = c.post(f"/api/v1/alerts/{other}/clear", json={"note": "replaced"}, headers=op)
    assert r.json()["cleared_by"].startswith("key:")
    st = c.get("/api/v1/stats", headers=viewer).json()["alerts"]
    assert st["active"] == 0 and st["notifications"]["pending"] == 10 and st["rules"] == 1
    _send(env, [("p2-b", 4000, 35.0)])  # still over: a hand-cleared alert does not open again
    assert c.get("/api/v1/stats", headers=viewer).json()["alerts"]["active"] == 0
    _send(env, [("p2-b", 5000, 20.0), ("p2-b", 6000, 40.0)])  # cleared, then over again: a new alert
    st = c.get("/api/v1/stats", headers=viewer).json()["alerts"]
    assert st["active_by_severity"] == {"major": 1}
    metrics = c.get("/metrics", headers=viewer).text
    assert 'fieldmesh_alerts_active{severity="major"} 1.0' in metrics
    assert 'fieldmesh_alert_notifications{status="pending"} 12.0' in metrics
    assert "fieldmesh_alert_notification_failed_tries_total 0.0" in metrics
    assert "fieldmesh_alert_rules_file_refused_total 0.0" in metrics and st["rules_file_refused"] == 0
    assert len(c.get("/api/v1/alerts/notifications", params={"status": "pending"}, headers=viewer).json()) == 12


def test_absence_of_a_registered_device_that_never_reports(env: dict[str, Any], store_url: str) -> None:
    c, op, viewer = env["c"], _h(env, "operator"), _h(env, "viewer")
    reg = DeviceRegistry(store_url)
    reg.add("p1-ghost", actor="test")
    reg.add("p1-off", status="suspended", actor="test")
    reg.close()
    body = {"name": "silent", "kind": "absence", "after_s": 2, "devices": "p1-*", "severity": "critical"}
    assert c.post("/api/v1/rules", json=body, headers=op).status_code == 201
    _send(env, [("p1-a", 0, 20.0)])
    engine: AlertEngine = env["engine"]
    engine.tick()
    assert c.get("/api/v1/alerts", headers=viewer).json() == []  # not silent long enough yet
    engine.tick(int(time.time() * 1000) + 3000)
    got = {a["device_id"]: a for a in c.get("/api/v1/alerts", headers=viewer).json()}
    # seen and silent, registered and never seen; not the suspended one, nor devices the rule does not select
    assert set(got) == {"p1-a", "p1-ghost"}
    assert engine.tick(int(time.time() * 1000) + 4000).opened == 0  # once
    assert len(c.get("/api/v1/alerts", headers=viewer).json()) == 2
    _send(env, [("p1-ghost", 5000, 1.0)])  # the ghost reports: cleared
    assert c.get(f"/api/v1/alerts/{got['p1-ghost']['id']}", headers=viewer).json()["state"] == "cleared"
