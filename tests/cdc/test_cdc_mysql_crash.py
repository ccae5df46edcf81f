"""kill -9 of the MariaDB CDC process mid-stream, then restart: every committed change, in order per key."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from cdc_helpers import MY_URL, my_conn, my_exec, read_topic, write_load

from fieldmesh.cdc.base import cdc_topic
from fieldmesh.runtime.natsserver import EmbeddedNats

pytestmark = pytest.mark.integration

KEYS = 40


def _start(db: str, bus_url: str, state: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "fieldmesh.cdc",
        "--source",
        f"{MY_URL}/{db}",
        "--tables",
        "assets",
        "--bus-url",
        bus_url,
        "--name",
        f"fmk_{db}",
        "--state-dir",
        str(state),
        "--partitions",
        "3",
        "--batch-size",
        "200",
    ]
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _wait_streaming(log: Path, times: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while log.read_text().count("streaming binlog from") < times:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def _writer(db: str, stop: threading.Event, counter: list[int]) -> None:
    conn = my_conn(db)
    conn.autocommit(False)
    write_load(conn, stop, counter, keys=KEYS, seed=11)


def test_kill_9_mid_stream_then_restart(my_db: str, nats_server: EmbeddedNats, tmp_path: Path) -> None:
    my_exec(
        my_db,
        "CREATE TABLE assets (id INT PRIMARY KEY, v INT NOT NULL)",
        "INSERT INTO assets SELECT seq, 0 FROM seq_0_to_39",
    )
    topic = cdc_topic(my_db, None, "assets")
    log, state = tmp_path / "cdc.log", tmp_path / "state"
    proc = _start(my_db, nats_server.url, state, log)
    try:
        assert len(asyncio.run(read_topic(nats_server.url, topic, expect=KEYS))) == KEYS, log.read_text()
        stop_writer, counter = threading.Event(), [0]
        w = threading.Thread(target=_writer, args=(my_db, stop_writer, counter))
        w.start()
        for i in range(2):
            _wait_streaming(log, i + 1)  # the kill must land while this process streams
            time.sleep(0.8)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            time.sleep(0.3)
            proc = _start(my_db, nats_server.url, state, log)
        _wait_streaming(log, 3)
        time.sleep(0.8)
        stop_writer.set()
        w.join(60)
        evs = asyncio.run(read_topic(nats_server.url, topic, expect=KEYS + counter[0], timeout_s=30))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert proc.returncode == 0, log.read_text()[-3000:]
    changes = [e for e in evs if e.op != "r"]
    assert len(changes) == counter[0], f"{len(changes)} change events for {counter[0]} committed changes"
    seen: dict[int, list[int]] = defaultdict(list)
    for e in changes:
        assert e.after is not None
        seen[e.after["id"]].append(e.after["v"])
    conn = my_conn(my_db)
    with conn.cursor() as cur:
        cur.execute("SELECT id, v FROM assets")
        final = dict(cur.fetchall())
    conn.close()
    for key, vs in seen.items():
        assert vs == list(range(1, final[key] + 1)), f"key {key}: {vs[:20]}..."
    assert log.read_text().count("streaming binlog from") == 3
