"""The stand-alone roles on Kafka + PostgreSQL, as a deployment runs them: exact through the HTTP API.

``fieldmesh gateway`` (Kafka ingress topic) -> Kafka bus (tansu) -> ``fieldmesh process`` ->
PostgreSQL (a database per test run, a schema per test) -> ``fieldmesh api`` and ``fieldmesh query``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from e2e.dataset import MALFORMED_REASONS, make_stream, malformed
from fmtest import oracle
from fmtest.procs import free_port
from fmtest.scale import Role, as_kafka, expected_received, produce

pytestmark = pytest.mark.integration


def test_gateway_process_api_on_kafka_and_postgres_exact(tmp_path: Path, tansu_factory, pg_url):
    bus, _ = tansu_factory()
    base, query = bus.split("?", 1)
    prefix = f"kp{uuid.uuid4().hex[:6]}"
    store_url = f"{pg_url}?schema={prefix}"
    stream = make_stream(prefix, devices=12, per_device=100, seed=13)
    bad, good_in_bad = malformed(prefix)
    produce(bus, f"raw-{prefix}", as_kafka(stream["messages"] + bad))
    port = free_port()
    roles = [
        Role(tmp_path, "process", "process", "--bus-url", bus, "--store-url", store_url, "--total-partitions", "4"),
        Role(tmp_path, "gateway", "gateway", "--bus-url", bus, "--partitions", "4",
             "--ingest-url", f"{base}/raw-{prefix}?group=gw-{prefix}&{query}"),
    ]
    api = Role(tmp_path, "api", "api", "--store-url", store_url, "--http-port", str(port))

    def get(path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1{path}", timeout=10) as r:
            return json.loads(r.read())

    sent = stream["sent"] + good_in_bad
    try:
        roles[0].start().wait_log("processor running")
        roles[1].start()
        api.start()
        deadline = time.monotonic() + 60
        stats: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                stats = get("/stats")
            except OSError:
                stats = {}
            if stats.get("received", 0) >= expected_received(sent, MALFORMED_REASONS):
                break
            time.sleep(0.3)
        uniq = oracle.unique_readings(sent)
        assert stats["received"] == expected_received(sent, MALFORMED_REASONS), (stats, roles[1].tail())
        assert stats["stored"] == len(uniq)
        assert stats["duplicates"] == len(sent) - len(uniq)
        assert {k: v for k, v in stats["dead_lettered"].items() if k != "total"} == MALFORMED_REASONS
        for interval in ("1m", "1h"):
            expected = oracle.rollups(sent, interval)
            got = {}
            for dev in sorted({d for d, _ in sent}):
                for row in get(f"/telemetry/rollups?device_id={dev}&interval={interval}&limit=100000"):
                    got[(row["device_id"], row["metric"], row["window_start_ms"])] = row
            assert set(got) == set(expected)
            for k, e in expected.items():
                g = got[k]
                assert (g["count"], g["sum"], g["min"], g["max"], g["avg"]) == (
                    e["count"], e["sum"], e["min"], e["max"], e["avg"]), (k, g, e)
        assert len(get(f"/telemetry/raw?device_id={prefix}-000&limit=100000")) == 100
        assert get("/health")["status"] == "ok"
        # fieldmesh query reads the same store
        out = subprocess.run(
            [sys.executable, "-m", "fieldmesh", "query", "SELECT count(*) AS n FROM readings", "--json",
             "--store-url", store_url], capture_output=True, text=True, timeout=60, check=True)
        assert json.loads(out.stdout) == [{"n": len(uniq)}]
    finally:
        for r in [*roles, api]:
            assert r.stop() in (0, -15), r.tail()  # uvicorn may exit by the signal itself
