"""What ``fieldmesh up``'s supervisor does about a stalled stage and a stage that cannot start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import uuid
from pathlib import Path
from typing import Any

import pytest

from e2e.dataset import make_stream
from faults.test_kill9 import child_of, health
from fmtest import oracle
from fmtest.faults import FaultReport
from fmtest.procs import Up, free_port, publish_all, publisher

pytestmark = pytest.mark.integration


def wait_health(up: Up, pred: Any, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    h: dict[str, Any] = {}
    while time.monotonic() < deadline:
        h = health(up)
        if pred(h):
            return h
        time.sleep(0.2)
    raise AssertionError(f"/health never matched: {h}; stats {up.get('/stats')}")


def http_status(up: Up) -> int:
    try:
        with __import__("urllib.request").request.urlopen(
                f"http://127.0.0.1:{up.http_port}/api/v1/health", timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_a_paused_processor_turns_health_degraded_then_ok(tmp_path: Path) -> None:
    prefix = f"st{uuid.uuid4().hex[:6]}"
    stream = make_stream(prefix, devices=10, per_device=60, seed=9)
    up = Up(tmp_path / "data", env={"FIELDMESH__RUNTIME__STALL_AFTER_S": "2"}).start()
    try:
        proc = child_of(up, "processor")
        assert proc is not None
        c = publisher(up.mqtt_port)
        half = len(stream["messages"]) // 2
        publish_all(c, stream["messages"][:half])
        os.kill(proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            publish_all(c, stream["messages"][half:])  # the gateway keeps taking readings in: lag grows
            h = wait_health(up, lambda h: str(h.get("processor", "")).startswith("stalled"), 20)
            took = time.monotonic() - t0
            assert h["status"] == "degraded" and h["gateway"] == "ok", h
            assert http_status(up) == 503
            print(f"[fault] processor paused: /health degraded after {took:.1f}s: {h['processor']}")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        wait_health(up, lambda h: h["status"] == "ok", 30)
        uniq = oracle.unique_readings(stream["sent"])
        stats = up.wait_for(lambda s: s["stored"] >= len(uniq) and sum(s["lag"].values()) == 0, timeout_s=60)
        assert stats["stored"] == len(uniq), stats
        assert child_of(up, "processor").pid == proc.pid  # paused, not restarted
        FaultReport("processor paused (SIGSTOP) past stall_after_s", sent=len(stream["sent"]),
                    acknowledged=len(stream["sent"]), stored=stats["stored"], duplicates=stats["duplicates"],
                    counted_losses={k: v for k, v in stats["dead_lettered"].items() if k != "total"}).show()
        c.disconnect()
    finally:
        assert up.stop() == 0, up.tail()


def test_a_worker_that_cannot_start_is_stopped_and_reported_not_restarted_forever(tmp_path: Path) -> None:
    # Enrichment asks for a table no CDC capture provides: the processor fails at every start.
    env = {"FIELDMESH__ENRICH__JOINS": "public.no_such_table:device_id=device_id",
           "FIELDMESH__ENRICH__CATCH_UP_TIMEOUT_S": "0.5",
           "FIELDMESH__RUNTIME__START_FAILURES": "3"}
    data = tmp_path / "data"
    data.mkdir()
    mqtt_port, http_port = free_port(), free_port()
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fieldmesh", "up", "--data-dir", str(data), "--mqtt-port",
                                 str(mqtt_port), "--http-port", str(http_port)], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **env})
    up = Up(data)
    up.http_port, up.proc = http_port, proc
    try:
        h = wait_health(up, lambda h: str(h.get("processor", "")).startswith("failed"), 60)
        assert "no_such_table" in h["processor"], h
        assert h["status"] == "degraded" and h["gateway"] == "ok" and h["bus"] == "ok", h
        time.sleep(3)  # and it stays stopped: no restart loop
        assert child_of(up, "processor") is None
        text = log.read_text(errors="replace")
        assert text.count("processor exited (") == 2, text  # restarted twice, then given up on the third
        assert "left stopped" in text and "Fix what it names" in text, text
        print(f"[fault] broken processor config: /health processor = {h['processor']!r}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_readings_published_as_soon_as_the_door_opens_are_stored(tmp_path: Path) -> None:
    # The MQTT listener PUBACKs whether or not a stream captures the subject: FM_INGEST must exist
    # before the door opens, not once the gateway gets round to creating it.
    from fmtest.retry import RetryingPublisher

    prefix = f"ea{uuid.uuid4().hex[:6]}"
    stream = make_stream(prefix, devices=5, per_device=20, seed=2)
    up = Up(tmp_path / "data")
    args = [sys.executable, "-m", "fieldmesh", "up", "--data-dir", str(up.data_dir), "--mqtt-port",
            str(up.mqtt_port), "--http-port", str(up.http_port)]
    up.data_dir.mkdir()
    with open(tmp_path / "data-up.log", "wb") as out:
        up.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        dev = RetryingPublisher(up.mqtt_port).connect(timeout_s=60)  # the moment the port accepts
        acked = dev.send(stream["messages"])
        assert acked == len(stream["messages"])
        uniq = oracle.unique_readings(stream["sent"])
        wait_health(up, lambda h: h["status"] == "ok", 60)
        stats = up.wait_for(lambda s: s["stored"] >= len(uniq), timeout_s=30)
        assert stats["stored"] == len(uniq), stats
        FaultReport("publishing as soon as the MQTT door opens", sent=len(stream["sent"]),
                    acknowledged=len(stream["sent"]),
                    stored=stats["stored"], duplicates=stats["duplicates"]).show()
        dev.close()
    finally:
        assert up.stop() == 0, up.tail()
