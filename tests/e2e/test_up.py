"""End to end through real processes: MQTT -> gateway -> JetStream -> processor -> SQLite -> HTTP API."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from e2e.dataset import MALFORMED_REASONS, make_stream, malformed
from fmtest import oracle
from fmtest.procs import Up, publish_all, publisher
from fmtest.retry import readings_of

pytestmark = pytest.mark.integration


def check_exact(up: Up, sent, dead: dict[str, int]) -> None:
    expected_received = len(sent) + sum(dead.values())
    stats = up.wait_for(lambda s: s["received"] >= expected_received and sum(s["lag"].values()) == 0)
    uniq = oracle.unique_readings(sent)
    assert stats["received"] == expected_received, stats
    assert stats["stored"] == len(uniq), stats
    assert stats["duplicates"] == len(sent) - len(uniq), stats
    assert {k: v for k, v in stats["dead_lettered"].items() if k != "total"} == dead
    devices = sorted({d for d, _ in sent})
    for interval in ("1m", "1h"):
        expected = oracle.rollups(sent, interval)
        got = {}
        for dev in devices:
            for row in up.get(f"/telemetry/rollups?device_id={dev}&interval={interval}&limit=100000"):
                got[(row["device_id"], row["metric"], row["window_start_ms"])] = row
        assert set(got) == set(expected)
        for k, e in expected.items():
            g = got[k]
            assert (g["count"], g["sum"], g["min"], g["max"], g["avg"]) == (
                e["count"], e["sum"], e["min"], e["max"], e["avg"]), (k, g, e)


def test_exact_through_the_whole_pipeline(tmp_path: Path):
    prefix = f"e2e{uuid.uuid4().hex[:6]}"
    stream = make_stream(prefix)
    bad, good_in_bad = malformed(prefix)
    up = Up(tmp_path / "data").start()
    try:
        c = publisher(up.mqtt_port)
        publish_all(c, stream["messages"] + bad)
        sent = stream["sent"] + good_in_bad
        check_exact(up, sent, MALFORMED_REASONS)
        assert up.get("/stats")["late"] >= 5  # the very late readings
        dl = up.get("/dlq?reason=too_large&limit=5")
        assert dl and dl[0]["truncated"] and dl[0]["topic"].endswith("/telemetry")
        assert len(up.get(f"/telemetry/raw?device_id={prefix}-000&limit=100000")) == 120
        metrics = __import__("urllib.request").request.urlopen(
            f"http://127.0.0.1:{up.http_port}/metrics").read().decode()
        assert 'fieldmesh_dead_letters_total{reason="clock_skew"} 1.0' in metrics
        # lag per partition: every partition of the readings topic, the processor's from the store's positions
        parts = up.wait_for(lambda s: all(sum(lag.values()) == 0 for lag in s["lag_partitions"].values())
                            and {"gateway", "processor", "dlq"} <= set(s["lag_partitions"]))["lag_partitions"]
        from fieldmesh.core.settings import Settings

        assert set(parts["processor"]) == {str(p) for p in range(Settings().bus.partitions)}, parts
        assert parts["gateway"] == {"0": 0} and parts["dlq"] == {"0": 0}, parts
        assert sum(parts["processor"].values()) == 0, parts
        metrics = __import__("urllib.request").request.urlopen(
            f"http://127.0.0.1:{up.http_port}/metrics").read().decode()
        assert 'fieldmesh_bus_partition_lag_messages{partition="0",stage="processor"} 0.0' in metrics
        c.disconnect()
    finally:
        assert up.stop() == 0, up.tail()
    assert "stored" in up.tail()  # the summary


def test_kill9_mid_stream_then_restart_is_still_exact(tmp_path: Path):
    prefix = f"k9{uuid.uuid4().hex[:6]}"
    stream = make_stream(prefix, devices=20, per_device=150, seed=11)
    msgs = stream["messages"]
    half = len(msgs) // 2
    data = tmp_path / "data"
    up = Up(data).start()
    c = publisher(up.mqtt_port)
    publish_all(c, msgs[:half])
    time.sleep(0.3)
    s = up.get("/stats")
    up.kill9()  # mid-stream: the pipeline is still working through the first half
    c.loop_stop()
    assert s["received"] < len(stream["sent"])
    up2 = Up(data)
    up2.mqtt_port, up2.http_port = up.mqtt_port, up.http_port
    up2.start()
    try:
        c2 = publisher(up2.mqtt_port)
        # A device re-sends what it is unsure of: here everything of the first half, then the rest.
        bad, good_in_bad = malformed(prefix)
        publish_all(c2, msgs[:half] + msgs[half:] + bad)
        resent = [x for m in msgs[:half] for x in readings_of(m)]
        sent = stream["sent"] + resent + good_in_bad
        check_exact(up2, sent, MALFORMED_REASONS)
    finally:
        assert up2.stop() == 0, up2.tail()



def test_a_crashed_stage_is_restarted_and_nothing_is_lost(tmp_path: Path):
    import os
    import signal

    import psutil

    prefix = f"cr{uuid.uuid4().hex[:6]}"
    stream = make_stream(prefix, devices=10, per_device=100, seed=5)
    msgs = stream["messages"]
    up = Up(tmp_path / "data").start()
    try:
        c = publisher(up.mqtt_port)
        publish_all(c, msgs[: len(msgs) // 2])
        for child in psutil.Process(up.proc.pid).children():
            if "worker" in " ".join(child.cmdline()) and "processor" in child.cmdline():
                os.kill(child.pid, signal.SIGKILL)
                break
        else:
            raise AssertionError("no processor worker found")
        publish_all(c, msgs[len(msgs) // 2 :])
        check_exact(up, stream["sent"], {})
        assert up.get("/health")["processor"] == "ok"
        c.disconnect()
    finally:
        assert up.stop() == 0, up.tail()
    assert "processor exited" in up.tail()
