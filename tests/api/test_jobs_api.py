"""The jobs and rollouts routes over a real store (SQLite and PostgreSQL), with the controller's tick."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fieldmesh.api.app import create_app
from fieldmesh.api.auth import Access
from fieldmesh.control.jobrunner import JobController
from fieldmesh.store import load_store
from fieldmesh.store.jobs import JobStore
from fieldmesh.store.registry import DeviceRegistry
from fmtest.fleet import artifact, signing_key


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/s.db"
    return f"{request.getfixturevalue('pg_url')}?schema=t_{secrets.token_hex(5)}"


@pytest.fixture
def client(url: str) -> Iterator[TestClient]:
    load_store(url).close()  # the hot store itself (for /stats)
    reg = DeviceRegistry(url)
    for i in range(8):
        reg.add(f"pump-{i}", groups=["north"] if i < 5 else ["south"], tags=["v2"] if i % 2 else [],
                actor="test")
    reg.close()
    access = Access(url)
    yield TestClient(create_app(url, access=access))
    access.close()


def test_jobs_create_list_show_cancel(client: TestClient, url: str) -> None:
    sent: list[tuple[str, bytes, bool]] = []
    store = JobStore(url)
    ctl = JobController(store, publish=lambda t, p, r: sent.append((t, p, r)) is None)
    r = client.post("/api/v1/jobs", json={"job_id": "j1", "document": {"op": "report"},
                                          "targets": {"groups": ["south"], "query": {"tags": ["v2"]}},
                                          "timeout_s": 30})
    assert r.status_code == 201, r.text
    body = r.json()
    # south: pump-5..7; tag v2: odd ids
    assert body["counts"]["queued"] == 5 and body["status"] == "in_progress"
    devs = [e["device_id"] for e in client.get("/api/v1/jobs/j1/executions").json()]
    assert devs == ["pump-1", "pump-3", "pump-5", "pump-6", "pump-7"]
    assert client.post("/api/v1/jobs", json={"job_id": "j1", "document": {"op": "report"},
                                             "targets": {"devices": ["pump-1"]}}).status_code == 409
    assert client.post("/api/v1/jobs", json={"document": {"op": "report"}, "targets": {}}).status_code == 400
    assert client.post("/api/v1/jobs", json={"document": {"no": "op"},
                                             "targets": {"devices": ["pump-1"]}}).status_code == 400
    assert client.get("/api/v1/jobs/nope").status_code == 404

    ctl.tick()
    notified = {t for t, _, retain in sent if retain}
    assert notified == {f"devices/{d}/jobs/notify" for d in devs}
    one = json.loads(next(p for t, p, _ in sent if t == "devices/pump-1/jobs/notify"))
    assert one["jobs"][0]["job_id"] == "j1" and one["jobs"][0]["execution"] == 1
    ctl.handle_message("devices/pump-1/jobs/j1/update", b'{"execution": 1, "status": "succeeded"}')
    ctl.handle_message("devices/pump-3/jobs/j1/update", b'{"execution": 7, "status": "succeeded"}')  # stale
    ctl.handle_message("devices/pump-5/jobs/j1/update", b'not json')
    ctl.tick()
    assert (ctl.stats.updates, ctl.stats.stale_updates, ctl.stats.invalid_updates) == (1, 1, 1)
    assert client.get("/api/v1/stats").json()["jobs_controller"] is None  # never saved
    store.save_controller_stats(asdict(ctl.stats))
    seen = client.get("/api/v1/stats").json()["jobs_controller"]
    assert (seen["updates"], seen["stale_updates"], seen["invalid_updates"]) == (1, 1, 1)
    assert seen["reasons"] == {"bad_update": 1}

    r = client.post("/api/v1/jobs/j1/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceling"
    sent.clear()
    ctl.tick()
    j = client.get("/api/v1/jobs/j1").json()
    assert j["status"] == "canceled" and j["counts"]["canceled"] == 4 and j["counts"]["succeeded"] == 1
    # the canceled devices' notify is republished empty
    assert {t for t, p, _ in sent if json.loads(p) == {"jobs": []}} == {
        f"devices/{d}/jobs/notify" for d in devs if d != "pump-1"}
    assert [x["job_id"] for x in client.get("/api/v1/jobs").json()] == ["j1"]
    store.close()


def test_rollout_view(client: TestClient, url: str) -> None:
    key, _ = signing_key()
    m, _ = artifact(key, "2.0")
    spec = {"rollout_id": "r1", "artifact": m, "targets": {"query": {"status": "active"}}, "canary": 2,
            "stages": [50, 100], "rate_per_s": 0, "gates": {"max_failure_rate": 0.2, "min_samples": 2}}
    r = client.post("/api/v1/rollouts", json=spec)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "pending" and r.json()["stage"] is None
    assert client.post("/api/v1/rollouts", json={**spec, "stages": [50]}).status_code == 400
    assert client.post("/api/v1/rollouts", json={**spec, "artifact": {**m, "sha256": "x"}}).status_code == 400
    store = JobStore(url)
    reg = DeviceRegistry(url)
    ctl = JobController(store, publish=lambda t, p, r: True, devices=lambda: reg.list(limit=100))
    ctl.tick()  # starts it: the canary job
    ctl.tick()  # sends the canary
    v = client.get("/api/v1/rollouts/r1").json()
    assert v["status"] == "running" and v["devices"] == 8 and v["exposed"] == 2
    assert v["stage"] == {"index": 0, "name": "canary", "of": 3, "job_id": "r1-s0"}
    assert [s["end"] for s in v["stages"]] == [2, 4, 8]
    assert v["gates"] == [{"name": "failure_rate", "value": None, "threshold": 0.2, "ok": None}]
    exs = store.executions(job_id="r1-s0")
    ctl.handle_message(f"devices/{exs[0].device_id}/jobs/r1-s0/update",
                       b'{"execution": 1, "status": "failed", "details": {"reason": "health_check"}}')
    ctl.tick()
    v = client.get("/api/v1/rollouts/r1").json()
    assert v["status"] == "halted" and v["halt_reason"].startswith("failure_rate")
    assert v["gates"][0]["ok"] is False and v["rollback_job"] == "r1-rollback"
    assert client.get("/api/v1/jobs/r1-rollback/executions").json()[0]["device_id"] in {e.device_id for e in exs}
    assert client.post("/api/v1/rollouts/r1/cancel").json()["status"] == "halted"  # halted already: as it is
    assert client.get("/api/v1/rollouts/nope").status_code == 404
    assert [x["rollout_id"] for x in client.get("/api/v1/rollouts").json()] == ["r1"]
    store.close()
    reg.close()


def test_canceling_a_running_rollout_rolls_its_devices_back(client: TestClient, url: str) -> None:
    key, _ = signing_key()
    m, _ = artifact(key, "2.0")
    spec = {"rollout_id": "r3", "artifact": m, "targets": {"devices": [f"pump-{i}" for i in range(8)]},
            "canary": 3, "stages": [100], "rate_per_s": 0}
    assert client.post("/api/v1/rollouts", json=spec).status_code == 201
    store = JobStore(url)
    ctl = JobController(store, publish=lambda t, p, r: True)
    ctl.tick()
    ctl.tick()
    canary = [e.device_id for e in store.executions(job_id="r3-s0")]
    ctl.handle_message(f"devices/{canary[0]}/jobs/r3-s0/update", b'{"execution": 1, "status": "succeeded"}')
    ctl.tick()
    assert client.post("/api/v1/rollouts/r3/cancel").json()["status"] == "canceling"
    ctl.tick()
    v = client.get("/api/v1/rollouts/r3").json()
    assert v["status"] == "canceling" and v["halt_reason"] == "canceled by the operator"
    rb = store.executions(job_id="r3-rollback")
    assert sorted(e.device_id for e in rb) == sorted(canary)  # every device sent the artifact, done or not
    assert {e.state for e in store.executions(job_id="r3-s0")} == {"succeeded", "canceled"}
    for e in rb:
        ctl.handle_message(f"devices/{e.device_id}/jobs/r3-rollback/update", b'{"execution": 1, "status": "succeeded"}')
    ctl.tick()
    ctl.tick()
    v = client.get("/api/v1/rollouts/r3").json()
    assert v["status"] == "canceled" and v["rollback"] == {"succeeded": 3}
    assert client.post("/api/v1/rollouts/r3/cancel").json()["status"] == "canceled"
    store.close()
