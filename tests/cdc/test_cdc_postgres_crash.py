"""kill -9 of the CDC process mid-stream, then restart: every committed change, in commit order per key."""

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

import psycopg2
import pytest
from cdc_helpers import pg_db_url, pg_exec, read_topic, write_load

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
        pg_db_url(db),
        "--tables",
        "public.assets",
        "--bus-url",
        bus_url,
        "--name",
        "fmk",
        "--state-dir",
        str(state),
        "--partitions",
        "3",
        "--batch-size",
        "200",
    ]  # small batches: the kill lands between a publish and its LSN confirm
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def _wait_streaming(log: Path, times: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while log.read_text().count("streaming slot fmk") < times:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def _writer(db: str, stop: threading.Event, done: threading.Event, counter: list[int]) -> None:
    """Transactions of 1-6 changes: each bumps v of a row by one, or inserts a new row with v=1."""
    try:
        write_load(psycopg2.connect(pg_db_url(db)), stop, counter, keys=KEYS, seed=7)
    finally:
        done.set()


def test_kill_9_mid_stream_then_restart(pg_db: str, nats_server: EmbeddedNats, tmp_path: Path) -> None:
    pg_exec(
        pg_db,
        "CREATE TABLE public.assets (id int PRIMARY KEY, v int NOT NULL)",
        f"INSERT INTO assets SELECT g, 0 FROM generate_series(0, {KEYS - 1}) g",
    )
    topic = cdc_topic(pg_db, "public", "assets")
    log = tmp_path / "cdc.log"
    state = tmp_path / "state"
    proc = _start(pg_db, nats_server.url, state, log)
    kills = 0
    try:
        assert len(asyncio.run(read_topic(nats_server.url, topic, expect=KEYS))) == KEYS, log.read_text()
        stop_writer, done, counter = threading.Event(), threading.Event(), [0]
        w = threading.Thread(target=_writer, args=(pg_db, stop_writer, done, counter))
        w.start()
        # kill -9 twice while transactions are streaming, restarting after each
        for i in range(2):
            _wait_streaming(log, i + 1)  # the kill must land while this process streams
            time.sleep(0.8)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            kills += 1
            time.sleep(0.3)
            proc = _start(pg_db, nats_server.url, state, log)
        _wait_streaming(log, 3)
        time.sleep(0.8)
        stop_writer.set()
        w.join(60)
        assert done.is_set()
        with psycopg2.connect(pg_db_url(pg_db)) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_current_wal_lsn()")
            end_lsn = cur.fetchone()[0]
        evs = asyncio.run(read_topic(nats_server.url, topic, expect=KEYS + counter[0], timeout_s=30))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert kills == 2
    assert proc.returncode == 0, log.read_text()[-3000:]
    changes = [e for e in evs if e.op != "r"]
    assert len(changes) == counter[0], f"{len(changes)} change events for {counter[0]} committed changes"
    # per key: v goes 1, 2, 3, ... with no gap, no repeat, in commit order
    seen: dict[int, list[int]] = defaultdict(list)
    for e in changes:
        assert e.after is not None
        seen[e.after["id"]].append(e.after["v"])
    with psycopg2.connect(pg_db_url(pg_db)) as conn, conn.cursor() as cur:
        cur.execute("SELECT id, v FROM assets")
        final = dict(cur.fetchall())
    for key, vs in seen.items():
        assert vs == list(range(1, final[key] + 1)), f"key {key}: {vs[:20]}..."
    # and the slot was confirmed past the last commit: nothing left to replay, no WAL held back
    with psycopg2.connect(pg_db_url(pg_db)) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots WHERE slot_name = 'fmk'",
            (end_lsn,),
        )
        assert cur.fetchone()[0]
    assert log.read_text().count("streaming slot fmk") == 3
