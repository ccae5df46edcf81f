"""``fieldmesh up`` runs the job controller: a job created over REST reaches a device on the embedded MQTT door
(nats-server's listener, MQTT 3.1.1, retained notify) and its answer comes back; the gateway leaves the job
topics alone (nothing dead-lettered)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fieldmesh.edge.fleetsim import SimFleet
from fmtest.fleet import signing_key, wait_for

pytestmark = pytest.mark.integration


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("door", ["nats", "mosquitto"])
def test_a_job_through_fieldmesh_up(tmp_path: Path, door: str) -> None:
    mqtt_port, http_port = _port(), _port()
    log = (tmp_path / "up.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "fieldmesh", "up", "--data-dir", str(tmp_path / "data"),
                             "--mqtt-port", str(mqtt_port), "--http-port", str(http_port), "--for", "90",
                             "--no-lake", "--door", door], stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{http_port}/api/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.3)
        _, trusted = signing_key()

        async def go() -> None:
            async with SimFleet(host="127.0.0.1", port=mqtt_port, devices=["dev-1", "dev-2"],
                                root=tmp_path / "fleet", trusted_keys=trusted):
                r = httpx.post(f"{api}/jobs", json={"job_id": "j1", "document": {"op": "report"},
                                                     "targets": {"devices": ["dev-1", "dev-2"]}, "timeout_s": 30})
                assert r.status_code == 201, r.text

                def done() -> bool:
                    return bool(httpx.get(f"{api}/jobs/j1").json()["status"] == "completed")

                await wait_for(done, 45, "the job to complete through fieldmesh up")
        asyncio.run(go())
        exs = httpx.get(f"{api}/jobs/j1/executions").json()
        assert [(e["device_id"], e["state"]) for e in exs] == [("dev-1", "succeeded"), ("dev-2", "succeeded")]
        stats = httpx.get(f"{api}/stats").json()
        assert stats["dead_lettered"]["total"] == 0, stats
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
    jobs_log = (tmp_path / "data" / "logs" / "jobs.log").read_text()
    assert "refused" not in jobs_log and "jobs controller stopped" in jobs_log, jobs_log
    if door == "nats":  # its own user, not the internal one
        assert 'user: "fm:jobs"' in (tmp_path / "data" / "nats" / "nats-server.conf").read_text()
