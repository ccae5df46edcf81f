"""kill -9 of the processor under ``fieldmesh up`` while it commits to the lake: the lake stays exact.

``up`` runs with the lake on and a short commit interval, so the processor is killed again and again
while lake commits are under way (between the tables of one flush, in the middle of a table's
commit, with a buffer not yet committed). The supervisor restarts it each time; the lake sink
resumes from the positions its tables' snapshots record, rolls back a flush that reached only some
tables, and the bus redelivers the rest. Read back with pyiceberg, the lake must hold every reading
exactly once (0 duplicate, 0 missing rows) and rollups equal to the oracle.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from e2e.dataset import make_stream
from faults.test_kill9 import health
from fieldmesh.core.settings import LakeSettings
from fieldmesh.store import default_store_url, load_store
from fieldmesh.store.lake import lake_lag, open_catalog
from fmtest import oracle
from fmtest.procs import Up, publish_all, publisher

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _processor(up: Up) -> psutil.Process | None:
    assert up.proc is not None
    for child in psutil.Process(up.proc.pid).children():
        try:
            if "worker" in " ".join(child.cmdline()) and "processor" in child.cmdline():
                return child
        except psutil.NoSuchProcess:
            continue
    return None


def _lake(data: Path) -> Any:
    return open_catalog(LakeSettings(), data)


def _lake_behind(catalog: Any, data: Path) -> int:
    """Partitions where a table of the lake is behind the hot store."""
    hot = load_store(default_store_url(data), readonly=True)
    try:
        return lake_lag(catalog, LakeSettings().namespace, hot.positions())[0]
    finally:
        hot.close()


def _rows(catalog: Any, table: str) -> list[dict[str, Any]]:
    return catalog.load_table(f"fieldmesh.{table}").scan().to_arrow().to_pylist()  # type: ignore[no-any-return]


def _assert_rollups(catalog: Any, sent: list[tuple[str, dict[str, Any]]]) -> None:
    for interval in ("1m", "1h"):
        expected = oracle.rollups(sent, interval)
        lake = _rows(catalog, f"rollup_{interval}")
        have = {(r["device_id"], r["metric"], int(r["window_start"].timestamp() * 1000)): r for r in lake}
        assert len(have) == len(lake), f"rollup_{interval}: two rows for one window"
        assert set(have) == set(expected), f"rollup_{interval}"
        for k, e in expected.items():
            g = have[k]
            assert (g["count"], g["sum"], g["min"], g["max"], g["avg"]) == (
                e["count"], e["sum"], e["min"], e["max"], e["avg"]), k


def test_kill_9_of_the_processor_during_lake_commits_loses_and_doubles_nothing(tmp_path: Path) -> None:
    prefix = f"lk{uuid.uuid4().hex[:6]}"
    stream = make_stream(prefix, devices=20, per_device=200, seed=23)
    msgs = stream["messages"]
    uniq = oracle.unique_readings(stream["sent"])
    data = tmp_path / "data"
    # a processor that ran 1 s counts as started: the supervisor restarts it after each kill (not "failing")
    up = Up(data, "--lake-commit-interval", "0.2", env={"FIELDMESH__RUNTIME__START_GRACE_S": "1"}).start()
    rnd = random.Random(4)
    kills = 0
    try:
        c = publisher(up.mqtt_port)

        def publish() -> None:  # a steady flow while the processor is killed: kills land mid-commit
            for i in range(0, len(msgs), 40):
                publish_all(c, msgs[i : i + 40])
                time.sleep(0.05)

        flow = threading.Thread(target=publish, name="devices")
        flow.start()
        for _ in range(6):
            time.sleep(rnd.uniform(1.1, 2.0))  # > the 1 s start grace: a restart, not a failed start
            proc = _processor(up)
            if proc is not None:
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            deadline = time.monotonic() + 60  # the supervisor restarts it
            while _processor(up) is None and time.monotonic() < deadline:
                time.sleep(0.2)
        flow.join()
        c.disconnect()
        up.wait_for(lambda s: s["stored"] >= len(uniq) and sum(s["lag"].values()) == 0, timeout_s=180)
        catalog = _lake(data)
        # visible in the lake without stopping anything, in every table: each resumes at its own positions, so
        # readings may be complete while a kill between one flush's commits left rollup_1h behind, and the
        # replay to it runs only once the restarted processor has opened the lake (seconds, under load)
        deadline = time.monotonic() + 120
        while _lake_behind(catalog, data) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _lake_behind(catalog, data) == 0
        assert len(_rows(catalog, "readings")) == len(uniq)
        # /health answers 503 while any stage is degraded (a processor restarted moments ago is `starting`):
        # its body still says how the lake is
        deadline = time.monotonic() + 30
        while (h := health(up)).get("lake") != "ok" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert h.get("lake") == "ok", h
    finally:
        assert up.stop() == 0, up.tail()
    assert kills >= 5
    log = (data / "logs" / "processor.log").read_text()
    assert "sink lake caught up" in log, "no kill left the lake behind the hot store: the replay was not exercised"

    catalog = _lake(data)
    rows = _rows(catalog, "readings")
    got = [(r["device_id"], int(r["ts"].timestamp() * 1000), r["seq"]) for r in rows]
    assert len(got) == len(set(got)), "duplicate rows in the lake"
    assert sorted(got) == sorted((d, r["ts"], r.get("seq")) for d, r in uniq.values()), "missing rows"
    _assert_rollups(catalog, stream["sent"])


def test_a_rollup_table_a_kill_left_behind_readings_is_completed_by_the_next_start(tmp_path: Path) -> None:
    """Deterministic: what a kill between the commits of one flush leaves (readings and rollup_1m with the
    flush, rollup_1h without: its earlier snapshot current) is made here by a rollback of rollup_1h. The lake
    is then behind although readings hold every reading; the next start replays to rollup_1h what it lacks."""
    stream = make_stream(f"lb{uuid.uuid4().hex[:6]}", devices=6, per_device=80, seed=11)
    msgs = stream["messages"]
    uniq = oracle.unique_readings(stream["sent"])
    data = tmp_path / "data"

    def caught_up(up: Up, n: int) -> None:
        up.wait_for(lambda s: s["stored"] >= n and sum(s["lag"].values()) == 0, timeout_s=120)
        deadline = time.monotonic() + 120
        while _lake_behind(_lake(data), data) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert _lake_behind(_lake(data), data) == 0

    up = Up(data, "--lake-commit-interval", "0.2").start()
    try:
        c = publisher(up.mqtt_port)
        half = len(msgs) // 2
        publish_all(c, msgs[:half])
        caught_up(up, 1)
        earlier = _lake(data).load_table("fieldmesh.rollup_1h").current_snapshot().snapshot_id
        publish_all(c, msgs[half:])
        c.disconnect()
        caught_up(up, len(uniq))
    finally:
        assert up.stop() == 0, up.tail()

    catalog = _lake(data)
    catalog.load_table("fieldmesh.rollup_1h").manage_snapshots().rollback_to_snapshot(earlier).commit()
    assert _lake_behind(catalog, data) > 0
    assert len(_rows(catalog, "readings")) == len(uniq)

    up = Up(data, "--lake-commit-interval", "0.2").start()
    try:
        caught_up(up, len(uniq))
    finally:
        assert up.stop() == 0, up.tail()
    assert "sink lake caught up" in (data / "logs" / "processor.log").read_text()
    _assert_rollups(_lake(data), stream["sent"])


def test_up_with_no_lake_writes_none(tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = Up(data, "--no-lake").start()
    try:
        c = publisher(up.mqtt_port)
        stream = make_stream(f"nl{uuid.uuid4().hex[:6]}", devices=2, per_device=10, seed=3)
        publish_all(c, stream["messages"])
        c.disconnect()
        up.wait_for(lambda s: s["stored"] >= len(oracle.unique_readings(stream["sent"])))
        assert "lake" not in up.get("/health")
    finally:
        assert up.stop() == 0, up.tail()
    assert not (data / "lake").exists()
