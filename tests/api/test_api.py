"""The REST API over a real store (SQLite, PostgreSQL): shapes, and clear 4xx answers to bad parameters."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fieldmesh.api.app import create_app, parse_time
from fieldmesh.api.auth import Access
from fieldmesh.core.codec import decode_telemetry
from fieldmesh.core.model import DeadLetter
from fieldmesh.store import load_store
from fmtest.drive import commit_readings

NOW = 1_763_812_345_123


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def client(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestClient]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/s.db"
    else:
        url = f"{request.getfixturevalue('pg_url')}?schema=t_{secrets.token_hex(5)}"
    w = load_store(url)
    body = b"[" + b",".join(b'{"ts":%d,"seq":%d,"measurements":{"t":%d,"h":1.5}}' % (NOW - 120_000 + i * 1000, i, i)
                            for i in range(100)) + b"]"
    rs = decode_telemetry(body, device_id="pump-7", topic="devices/pump-7/telemetry", received_ms=NOW).readings
    dl = DeadLetter(reason="clock_skew", detail="ahead", topic="devices/pump-7/telemetry", received_ms=NOW,
                    payload=b'{"ts": 1}', device_id="pump-7")
    commit_readings(w, rs, dead_letters=[dl])
    w.close()
    access = Access(url)  # the default, closed at the end: PostgreSQL connections are a shared budget
    yield TestClient(create_app(url, access=access))
    access.close()


def test_shapes(client: TestClient):
    assert client.get("/api/v1/health").json()["status"] == "ok"
    st = client.get("/api/v1/stats").json()
    assert (st["received"], st["stored"], st["duplicates"], st["dead_lettered"]) == (
        101, 100, 0, {"total": 1, "clock_skew": 1})
    dev = client.get("/api/v1/devices/pump-7").json()
    assert dev["readings"] == 100 and dev["metrics"] == ["h", "t"]
    rows = client.get("/api/v1/telemetry/rollups", params={"device_id": "pump-7", "metric": "t"}).json()
    assert sum(r["count"] for r in rows) == 100 and sum(r["sum"] for r in rows) == sum(range(100))
    assert all(r["window_start"].endswith("Z") for r in rows)
    hour = client.get("/api/v1/telemetry/rollups", params={"interval": "1h", "metric": "h"}).json()
    assert sum(r["count"] for r in hour) == 100
    raw = client.get("/api/v1/telemetry/raw", params={"device_id": "pump-7", "metric": "h", "limit": 3}).json()
    assert len(raw) == 3 and raw[0]["measurements"] == {"h": 1.5} and raw[0]["seq"] == 99
    start = client.get("/api/v1/telemetry/raw", params={"start": str(NOW - 30_000), "limit": 1000}).json()
    iso = client.get("/api/v1/telemetry/raw", params={"start": "2025-11-22T11:51:55.123Z", "limit": 1000}).json()
    assert len(start) == len(iso) == 10  # readings at NOW-30s .. NOW-21s
    assert client.get("/api/v1/dlq", params={"reason": "clock_skew"}).json()[0]["payload"] == '{"ts": 1}'
    metrics = client.get("/metrics").text
    assert "fieldmesh_readings_stored_total 100.0" in metrics
    assert 'fieldmesh_dead_letters_total{reason="clock_skew"} 1.0' in metrics


@pytest.mark.parametrize(
    ("path", "params", "status", "names"),
    [
        ("/api/v1/telemetry/rollups", {"interval": "5m"}, 400, "interval"),
        ("/api/v1/telemetry/rollups", {"start": "yesterday"}, 400, "start"),
        ("/api/v1/telemetry/raw", {"end": "2025-01-01T00:00:00"}, 400, "end"),
        ("/api/v1/telemetry/raw", {"limit": 0}, 400, "limit"),
        ("/api/v1/telemetry/raw", {"device_id": "no/slashes"}, 400, "device_id"),
        ("/api/v1/dlq", {"limit": "many"}, 400, "limit"),
        ("/api/v1/devices/nobody", {}, 404, "nobody"),
        ("/api/v1/alerts", {}, 501, "alert"),
        # out of range or malformed numbers (issue 8, defect 6: these were HTTP 500)
        ("/api/v1/telemetry/rollups", {"start": "99999999999999999999"}, 400, "start"),
        ("/api/v1/telemetry/rollups", {"start": "-99999999999999999999"}, 400, "start"),
        ("/api/v1/telemetry/rollups", {"end": "9223372036854775808"}, 400, "end"),
        ("/api/v1/telemetry/raw", {"end": "9223372036854775808"}, 400, "end"),
        ("/api/v1/telemetry/raw", {"start": "-9223372036854775809"}, 400, "start"),
        ("/api/v1/telemetry/raw", {"start": "9" * 5000}, 400, "start"),
        ("/api/v1/telemetry/raw", {"start": "--5"}, 400, "start"),
        ("/api/v1/telemetry/raw", {"start": "\u00b2"}, 400, "start"),
        ("/api/v1/telemetry/raw", {"end": "2025-13-01T00:00:00Z"}, 400, "end"),
        ("/api/v1/telemetry/raw", {"limit": "99999999999999999999"}, 400, "limit"),
        ("/api/v1/telemetry/raw", {"limit": "-99999999999999999999"}, 400, "limit"),
        ("/api/v1/telemetry/rollups", {"limit": "100001"}, 400, "limit"),
        ("/api/v1/dlq", {"limit": "1e3"}, 400, "limit"),
        ("/api/v1/alerts", {"since": "99999999999999999999"}, 400, "since"),
        ("/api/v1/alerts", {"device_id": "a b"}, 400, "device_id"),
        # strings the stores cannot take (a quote in a JSON path, NUL bytes): also 400, not 500
        ("/api/v1/telemetry/raw", {"metric": 'a"b'}, 400, "metric"),
        ("/api/v1/telemetry/rollups", {"metric": "t\x00"}, 400, "metric"),
        ("/api/v1/dlq", {"reason": "x\x00"}, 400, "reason"),
        ("/api/v1/devices/a%20b", {}, 400, "device_id"),
    ],
)
def test_bad_parameters_get_a_json_error_naming_them(client: TestClient, path, params, status, names):
    r = client.get(path, params=params)
    assert r.status_code == status, r.text
    assert names in r.json()["detail"]


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        ("9223372036854775807", 2**63 - 1),
        ("-9223372036854775808", -(2**63)),
        ("0", 0),
        ("2025-11-22T11:51:55.123Z", 1_763_812_315_123),
        ("2025-11-22t12:51:55.123456789+01:00", 1_763_812_315_123),
        ("2016-12-31T23:59:60Z", 1_483_228_800_000),  # a leap second is the next second's start
        ("0001-01-01T00:00:00Z", -62_135_596_800_000),
        ("", None),
    ],
)
def test_time_parameters_take_the_whole_documented_range(client: TestClient, value: str, ms: int | None):
    assert parse_time(value, "start") == ms
    for path in ("/api/v1/telemetry/raw", "/api/v1/telemetry/rollups"):
        assert client.get(path, params={"start": value, "end": value}).status_code == 200


def test_openapi_describes_the_real_answers(client: TestClient):
    doc = client.get("/api/v1/openapi.json").json()
    ops = {(p, m): op for p, ms in doc["paths"].items() for m, op in ms.items()}
    raw = ops[("/api/v1/telemetry/raw", "get")]
    assert set(raw["responses"]) == {"200", "400", "401", "403", "503"}
    assert raw["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"}
    assert doc["components"]["schemas"]["ErrorBody"]["required"] == ["detail"]
    # FastAPI's 422 is gone (a bad parameter is a 400); only an import whose rows are refused answers 422
    assert [k for k, op in ops.items() if "422" in op["responses"]] == [("/api/v1/devices/import", "post")]
    assert ops[("/api/v1/devices/import", "post")]["responses"]["422"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ImportRejectedBody"}
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert set(ops[("/api/v1/alerts", "get")]["responses"]) >= {"400", "501"}
    assert set(ops[("/api/v1/devices/{device_id}", "get")]["responses"]) >= {"400", "404"}
    assert list(ops[("/metrics", "get")]["responses"]["200"]["content"]) == ["text/plain"]
    start = {p["name"]: p for p in raw["parameters"]}["start"]["schema"]
    assert {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1} in start["anyOf"]


def test_lag_per_partition_in_stats_and_metrics(tmp_path: Path) -> None:
    """The old ``lag`` shape stays; ``lag_partitions`` and a per-partition gauge come beside it."""
    url = f"sqlite:///{tmp_path}/s.db"
    load_store(url).close()

    async def lag() -> dict[str, int]:
        return {"gateway": 2, "processor": 7}

    async def partition_lag() -> dict[str, dict[int, int]]:
        return {"gateway": {0: 2}, "processor": {0: 3, 1: 4}}

    client = TestClient(create_app(url, lag=lag, partition_lag=partition_lag))
    st = client.get("/api/v1/stats").json()
    assert st["lag"] == {"gateway": 2, "processor": 7}
    assert st["lag_partitions"] == {"gateway": {"0": 2}, "processor": {"0": 3, "1": 4}}
    metrics = client.get("/metrics").text
    assert 'fieldmesh_bus_lag_messages{stage="processor"} 7.0' in metrics
    assert 'fieldmesh_bus_partition_lag_messages{partition="1",stage="processor"} 4.0' in metrics
    assert 'fieldmesh_bus_partition_lag_messages{partition="0",stage="gateway"} 2.0' in metrics
