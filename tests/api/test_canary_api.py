"""Canaries over REST and the CLI, on real SQLite and PostgreSQL stores: declaration with its 4xx answers and
roles, readings routed by the real processor, the comparison, promotion (readings merged into the main
tables), abort and delete; a products file declaring canaries."""

from __future__ import annotations

import json
import secrets
import zlib
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
from fieldmesh.core.codec import decode_telemetry, encode_bus_batch
from fieldmesh.core.model import BusBatch
from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.obs.metrics import CANARY_READINGS
from fieldmesh.store import load_store
from fieldmesh.store.access import AccessStore
from fieldmesh.stream.processor import Processor
from fieldmesh.stream.products import ProductEngine

T0 = 1_767_225_600_000
PRODUCT = {"name": "pumps", "owner": "ops", "devices": {"globs": ["pump-*"]}, "window_s": 10,
           "metrics": {"temp": {"min": 0, "max": 50, "bins": 5}}}
CANARY = {"name": "fw2", "product": "pumps", "share_percent": 50, "meta": {"firmware": "2.*"},
          "thresholds": {"min_readings": 10}}
DEVICES = [f"pump-{i}" for i in range(8)]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/s.db"
    return f"{request.getfixturevalue('pg_url')}?schema=c_{secrets.token_hex(5)}"


@pytest.fixture
def env(store_url: str) -> Iterator[dict[str, Any]]:
    keys = AccessStore(store_url)
    made = {role: keys.create_key(role=role, actor="test")[1] for role in ("viewer", "operator")}
    access = Access(store_url)
    writer = load_store(store_url)
    reader = load_store(store_url, readonly=True)
    client = TestClient(create_app(store_url, store=reader, access=access))
    yield {"c": client, "keys": made, "url": store_url}
    client.close()
    access.close()
    reader.close()
    writer.close()
    keys.close()


def _h(env: dict[str, Any], role: str) -> dict[str, str]:
    return {"X-API-Key": env["keys"][role]}


def _send(url: str, n: int = 6, offset: int = 1) -> None:
    """``n`` readings of firmware 2.0 per device, through the processor."""
    store = load_store(url)
    try:
        proc = Processor(bus=None, store=store, settings=ProcessorSettings(),  # type: ignore[arg-type]
                         products=ProductEngine(store))
        proc._positions = store.positions()
        rs = []
        for d in DEVICES:
            for i in range(n):
                body = json.dumps({"ts": T0 + (offset * 100 + i) * 1000, "seq": offset * 100 + i,
                                   "measurements": {"temp": 20.0 + i}, "meta": {"firmware": "2.0"}}).encode()
                rs += decode_telemetry(body, device_id=d, topic=f"devices/{d}/telemetry", received_ms=T0,
                                       max_skew_ms=10**12).readings
        proc.apply_records([BusRecord(topic=READINGS_TOPIC, partition=0, offset=offset,
                                      value=encode_bus_batch(BusBatch(rs)))])
    finally:
        store.close()


def _raw_count(url: str) -> int:
    store = load_store(url)
    try:
        return len(store.raw(device_id=None, metric=None, start_ms=None, end_ms=None, limit=100_000))
    finally:
        store.close()


def test_canary_routes_roles_errors_promote_and_delete(env: dict[str, Any]) -> None:
    c, url = env["c"], env["url"]
    r = c.post("/api/v1/canaries", json=CANARY, headers=_h(env, "operator"))
    assert r.status_code == 404 and "pumps" in r.json()["detail"]  # no product yet
    assert c.post("/api/v1/products", json=PRODUCT, headers=_h(env, "operator")).status_code == 201
    r = c.post("/api/v1/canaries", json={**CANARY, "share_percent": 0}, headers=_h(env, "operator"))
    assert r.status_code == 400 and "share_percent" in r.json()["detail"]
    assert c.post("/api/v1/canaries", json=CANARY, headers=_h(env, "viewer")).status_code == 403
    r = c.post("/api/v1/canaries", json=CANARY, headers=_h(env, "operator"))
    assert r.status_code == 201 and r.json()["state"] == "active"
    assert c.post("/api/v1/canaries", json=CANARY, headers=_h(env, "operator")).status_code == 409
    assert c.get("/api/v1/canaries/nope", headers=_h(env, "viewer")).status_code == 404
    assert c.get("/api/v1/canaries/fw2/compare", headers=_h(env, "viewer")).json()["verdict"] == "no_data"

    before = CANARY_READINGS.labels("fw2")._value.get()
    _send(url)
    side = [d for d in DEVICES if zlib.crc32(d.encode()) * 100 / 2**32 < 50]
    assert CANARY_READINGS.labels("fw2")._value.get() - before == 6 * len(side)  # counted once committed
    assert 0 < len(side) < len(DEVICES)
    got = c.get("/api/v1/canaries/fw2", headers=_h(env, "viewer")).json()
    assert got["readings"] == 6 * len(side) and got["devices_seen"] == sorted(side)
    held = c.get("/api/v1/canaries/fw2/readings?limit=1000", headers=_h(env, "viewer")).json()
    assert {h["device_id"] for h in held} == set(side) and len(held) == 6 * len(side)
    assert _raw_count(url) == 6 * (len(DEVICES) - len(side))
    cmp = c.get("/api/v1/canaries/fw2/compare", headers=_h(env, "viewer")).json()
    assert cmp["counts"]["canary"]["stored"] == 6 * len(side)
    assert cmp["counts"]["baseline"]["stored"] == 6 * (len(DEVICES) - len(side))
    assert cmp["verdict"] in ("promote", "hold") and cmp["windows"]

    assert c.post("/api/v1/canaries/fw2/promote", headers=_h(env, "viewer")).status_code == 403
    assert c.delete("/api/v1/canaries/fw2", headers=_h(env, "operator")).status_code == 409  # active
    r = c.post("/api/v1/canaries/fw2/promote", headers=_h(env, "operator"))
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["merged"], r.json()["readings"]) == ("promoted", 6 * len(side), 0)
    assert _raw_count(url) == 6 * len(DEVICES)
    assert c.post("/api/v1/canaries/fw2/promote", headers=_h(env, "operator")).status_code == 409
    assert c.post("/api/v1/canaries/fw2/abort", headers=_h(env, "operator")).status_code == 409
    _send(url, offset=2)  # after promotion: the main path
    assert _raw_count(url) == 12 * len(DEVICES)
    r = c.delete("/api/v1/canaries/fw2", headers=_h(env, "operator"))
    assert r.status_code == 200 and r.json()["name"] == "fw2"
    assert c.get("/api/v1/canaries", headers=_h(env, "viewer")).json() == []
    audit = AccessStore(url)
    try:
        actions = [e.action for e in audit.audit_log(limit=50)]
    finally:
        audit.close()
    assert {"canary.create", "canary.promote", "canary.delete"} <= set(actions)


def test_cli_products_file_with_canaries_compare_abort(env: dict[str, Any], tmp_path: Path) -> None:
    url = env["url"]
    f = tmp_path / "products.yaml"
    f.write_text(yaml.safe_dump({"products": [PRODUCT], "canaries": [CANARY]}))
    runner = CliRunner()
    r = runner.invoke(cli, ["products", "apply", str(f), "--store-url", url])
    assert r.exit_code == 0, r.output
    assert "1 canaries: 1 created" in r.output
    r = runner.invoke(cli, ["canaries", "list", "--store-url", url, "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["state"] == "active"
    r = runner.invoke(cli, ["canaries", "compare", "fw2", "--store-url", url])
    assert r.exit_code == 3, r.output  # no data yet
    _send(url)
    r = runner.invoke(cli, ["canaries", "compare", "fw2", "--store-url", url, "--json"])
    assert r.exit_code in (0, 1) and json.loads(r.stdout)["counts"]["canary"]["stored"] > 0
    r = runner.invoke(cli, ["canaries", "abort", "fw2", "--store-url", url])
    assert r.exit_code == 0 and json.loads(r.stdout)["state"] == "aborted"
    held = json.loads(r.stdout)["readings"]
    assert held > 0
    r = runner.invoke(cli, ["canaries", "promote", "fw2", "--store-url", url])
    assert r.exit_code == 2 and "aborted" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"canaries": [{"name": "x", "product": "pumps", "colour": 1}]}))
    r = runner.invoke(cli, ["canaries", "apply", str(bad), "--store-url", url])
    assert r.exit_code == 2 and "colour" in r.output
