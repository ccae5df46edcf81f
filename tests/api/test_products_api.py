"""Data products over REST and the CLI, on real SQLite and PostgreSQL stores: the catalog's CRUD with its
4xx answers and roles, a registry-group selector, quality after the processor's stage counted a batch,
and the quality gauges in /metrics."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fieldmesh.api.app import create_app
from fieldmesh.api.auth import Access
from fieldmesh.bus.base import BusRecord
from fieldmesh.cli.main import app as cli
from fieldmesh.core.codec import decode_telemetry, encode_bus_batch, encode_reading_json
from fieldmesh.core.model import BusBatch
from fieldmesh.core.settings import AccessSettings, ProcessorSettings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.store import load_store
from fieldmesh.store.access import AccessStore
from fieldmesh.store.registry import DeviceRegistry
from fieldmesh.stream.processor import Processor
from fieldmesh.stream.products import ProductEngine

T0 = 1_767_225_600_000
PRODUCT = {"name": "line-a", "owner": "ops", "description": "line A", "schema_subject": "line-a-value",
           "devices": {"groups": ["line-a"]}, "expected_interval_s": 1, "window_s": 10,
           "metrics": {"temp": {"min": 0, "max": 50, "bins": 5}},
           "slo": {"completeness": 0.9, "null_rate": 0.05, "duplicate_rate": 0.5}}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/s.db"
    return f"{request.getfixturevalue('pg_url')}?schema=p_{secrets.token_hex(5)}"


@pytest.fixture
def env(store_url: str) -> Iterator[dict[str, Any]]:
    keys = AccessStore(store_url)
    made = {role: keys.create_key(role=role, actor="test")[1] for role in ("viewer", "operator")}
    made["plant1"] = keys.create_key(role="operator", groups=["plant1"], actor="test")[1]
    access = Access(store_url, AccessSettings(groups={"plant1": ["p1-*"]}))
    writer = load_store(store_url)  # creates the store's tables
    reader = load_store(store_url, readonly=True)
    client = TestClient(create_app(store_url, store=reader, access=access))
    yield {"c": client, "keys": made, "url": store_url}
    client.close()
    access.close()
    reader.close()
    writer.close()
    keys.close()


def _h(env: dict[str, Any], who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {env['keys'][who]}"}


def _batch(url: str) -> None:
    """Through the processor: 10 s of one reading a second from m-1 (in group line-a) with one reading lacking
    temp, one sent twice and seq 4 lost; and m-9 (not in the group)."""
    readings = []
    for dev in ("m-1", "m-9"):
        for i in range(10):
            if dev == "m-1" and i == 4:
                continue
            m: dict[str, float | bool] = {"temp": 20.0 + i} if i != 6 else {"rpm": 3.0}
            readings.append(decode_telemetry(encode_reading_json(dev, T0 + i * 1000, m, i), device_id=dev,
                                             topic=f"devices/{dev}/telemetry", received_ms=T0 + i * 1000 + 5,
                                             max_skew_ms=10**12).readings[0])
    readings.append(readings[2])
    store = load_store(url)
    try:
        proc = Processor(bus=None, store=store, settings=ProcessorSettings(),  # type: ignore[arg-type]
                         products=ProductEngine(store))
        proc.apply_records([BusRecord(topic=READINGS_TOPIC, partition=0, offset=1,
                                      value=encode_bus_batch(BusBatch(readings)))])
    finally:
        store.close()


def test_catalog_crud_roles_and_errors(env: dict[str, Any]) -> None:
    c = env["c"]
    assert c.post("/api/v1/products", json=PRODUCT, headers=_h(env, "viewer")).status_code == 403
    assert c.post("/api/v1/products", json=PRODUCT, headers=_h(env, "plant1")).status_code == 403
    bad = c.post("/api/v1/products", json={**PRODUCT, "slo": {"speed": 1}}, headers=_h(env, "operator"))
    assert bad.status_code == 400 and "slo.speed" in bad.json()["detail"]
    r = c.post("/api/v1/products", json=PRODUCT, headers=_h(env, "operator"))
    assert r.status_code == 201, r.text
    assert r.json()["source"] == "api" and r.json()["devices"]["groups"] == ["line-a"]
    assert c.post("/api/v1/products", json=PRODUCT, headers=_h(env, "operator")).status_code == 409
    listed = c.get("/api/v1/products", headers=_h(env, "viewer")).json()
    assert [p["name"] for p in listed] == ["line-a"]
    assert c.get("/api/v1/products/line-a", headers=_h(env, "plant1")).status_code == 403  # every device's data
    assert c.get("/api/v1/products/nope", headers=_h(env, "viewer")).status_code == 404
    changed = {**c.get("/api/v1/products/line-a", headers=_h(env, "viewer")).json(), "owner": "quality"}
    r = c.put("/api/v1/products/line-a", json=changed, headers=_h(env, "operator"))
    assert r.status_code == 200 and r.json()["owner"] == "quality"
    assert c.put("/api/v1/products/other", json=changed, headers=_h(env, "operator")).status_code == 400
    assert c.put("/api/v1/products/nope", json={**changed, "name": "nope"},
                 headers=_h(env, "operator")).status_code == 404
    audit = AccessStore(env["url"])
    try:
        actions = [e.action for e in audit.audit_log() if e.target == "line-a"]
    finally:
        audit.close()
    assert actions == ["product.update", "product.create"]
    assert c.delete("/api/v1/products/line-a", headers=_h(env, "operator")).status_code == 200
    assert c.get("/api/v1/products", headers=_h(env, "viewer")).json() == []


def test_quality_by_group_after_the_processor_and_in_metrics(env: dict[str, Any]) -> None:
    c = env["c"]
    reg = DeviceRegistry(env["url"])
    try:
        reg.add("m-1", groups=["line-a"], actor="test")
        reg.add("m-9", groups=["line-b"], actor="test")
    finally:
        reg.close()
    assert c.post("/api/v1/products", json=PRODUCT, headers=_h(env, "operator")).status_code == 201
    _batch(env["url"])
    q = c.get("/api/v1/products/line-a/quality", headers=_h(env, "viewer")).json()
    (w,) = q["windows"]
    # m-1 only: 9 readings new (seq 4 lost), 1 duplicate, 1 lacks temp; expected 10 from its first reading
    assert (w["received"], w["new"], w["duplicates"], w["expected"]) == (10, 9, 1, 10.0)
    assert w["completeness"] == pytest.approx(0.9) and w["null_rate"] == pytest.approx(1 / 9)
    assert w["duplicate_rate"] == pytest.approx(0.1)
    assert q["sequence"] == {"expected": 10, "received": 9, "gaps": 1, "completeness": 0.9}
    assert q["slo"]["null_rate"]["ok"] is False and q["slo"]["completeness"]["ok"] is True
    assert q["slo_ok"] is False
    text = c.get("/metrics", headers=_h(env, "viewer")).text
    assert 'fieldmesh_product_null_rate{product="line-a"} 0.111' in text
    assert 'fieldmesh_product_sequence_gaps{product="line-a"} 1.0' in text
    assert 'fieldmesh_product_slo_ok{objective="null_rate",product="line-a"} 0.0' in text
    assert 'fieldmesh_product_slo_ok{objective="completeness",product="line-a"} 1.0' in text


def test_cli_apply_list_show_quality(env: dict[str, Any], tmp_path: Path) -> None:
    runner = CliRunner()
    f = tmp_path / "products.yaml"
    f.write_text(yaml.safe_dump({"products": [PRODUCT, {**PRODUCT, "name": "line-b",
                                                         "devices": {"groups": ["line-b"]}}]}))
    url = env["url"]
    r = runner.invoke(cli, ["products", "apply", str(f), "--store-url", url])
    assert r.exit_code == 0, r.output
    assert "2 created" in r.output
    r = runner.invoke(cli, ["products", "apply", str(f), "--store-url", url])
    assert "2 unchanged" in r.output
    r = runner.invoke(cli, ["products", "list", "--store-url", url, "--json"])
    assert [p["name"] for p in json.loads(r.output)] == ["line-a", "line-b"]
    assert json.loads(r.output)[0]["source"] == f"file:{f.resolve()}"
    r = runner.invoke(cli, ["products", "show", "line-b", "--store-url", url])
    assert json.loads(r.output)["devices"]["groups"] == ["line-b"]
    reg = DeviceRegistry(url)
    try:
        reg.add("m-1", groups=["line-a"], actor="test")
    finally:
        reg.close()
    _batch(url)
    r = runner.invoke(cli, ["products", "quality", "line-a", "--store-url", url, "--json"])
    assert r.exit_code == 1  # the null-rate objective is broken
    assert json.loads(r.output)["slo"]["null_rate"]["ok"] is False
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump([{"name": "x", "window_s": 0}]))
    r = runner.invoke(cli, ["products", "apply", str(bad), "--store-url", url])
    assert r.exit_code == 2 and "window_s" in r.output


def _fleet(url: str, *, canary_shift: float) -> None:
    """20 devices, 30 s of one reading a second; devices in the canary share read ``canary_shift`` higher."""
    import random

    from fieldmesh.stream.quality import device_share

    rnd = random.Random(3)
    readings = []
    for d in range(20):
        dev = f"f-{d}"
        shift = canary_shift if device_share(dev) < 0.3 else 0.0
        for i in range(30):
            readings.append(decode_telemetry(
                encode_reading_json(dev, T0 + i * 1000, {"temp": round(rnd.gauss(20 + shift, 2), 2)}, i),
                device_id=dev, topic=f"devices/{dev}/telemetry", received_ms=T0 + i * 1000, max_skew_ms=10**12
            ).readings[0])
    store = load_store(url)
    try:
        Processor(bus=None, store=store, settings=ProcessorSettings(),  # type: ignore[arg-type]
                  products=ProductEngine(store)).apply_records(
            [BusRecord(topic=READINGS_TOPIC, partition=0, offset=1, value=encode_bus_batch(BusBatch(readings)))])
    finally:
        store.close()


@pytest.mark.parametrize(("shift", "verdict"), [(0.0, "promote"), (6.0, "hold")])
def test_canary_share_against_its_control(env: dict[str, Any], shift: float, verdict: str) -> None:
    from fieldmesh.stream.quality import device_share

    c = env["c"]
    base = {"devices": {"globs": ["f-*"]}, "expected_interval_s": 1, "window_s": 10,
            "metrics": {"temp": {"min": 0, "max": 40, "bins": 8}}, "slo": {"completeness": 0.9, "drift_psi": 0.25}}
    canary = {**base, "name": "fleet-canary", "devices": {"globs": ["f-*"], "share": [0, 0.3]}}
    control = {**base, "name": "fleet", "devices": {"globs": ["f-*"], "share": [0.3, 1]}}
    for p in (canary, control):
        assert c.post("/api/v1/products", json=p, headers=_h(env, "operator")).status_code == 201
    _fleet(env["url"], canary_shift=shift)
    in_canary = sum(device_share(f"f-{d}") < 0.3 for d in range(20))
    assert 0 < in_canary < 20
    q = c.get("/api/v1/products/fleet-canary/quality", headers=_h(env, "viewer")).json()
    assert sum(w["new"] for w in q["windows"]) == 30 * in_canary and q["devices"] == in_canary
    r = c.get("/api/v1/products/fleet-canary/compare", params={"control": "fleet"}, headers=_h(env, "viewer"))
    assert r.status_code == 200, r.text
    cmp = r.json()
    assert len(cmp["windows"]) == 3 and all(w["control"]["new"] == 10 * (20 - in_canary) for w in cmp["windows"])
    assert cmp["verdict"] == verdict, cmp["reasons"]
    if verdict == "hold":
        assert any("drifts from the control" in m for m in cmp["reasons"])
    assert c.get("/api/v1/products/fleet-canary/compare", params={"control": "nope"},
                 headers=_h(env, "viewer")).status_code == 404
    assert c.post("/api/v1/products", json={**canary, "name": "x", "devices": {"share": [0.5, 0.2]}},
                  headers=_h(env, "operator")).status_code == 400
