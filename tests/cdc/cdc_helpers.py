"""Helpers and fixtures of the CDC tests: a throw-away PostgreSQL database, embedded NATS, topic readers."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fieldmesh.bus import load_bus
from fieldmesh.bus.nats import NatsBus, stream_name
from fieldmesh.cdc.base import ChangeEvent, decode_change_event
from fieldmesh.runtime.natsserver import EmbeddedNats

PG_ADMIN = os.environ.get("FIELDMESH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def pg_db_url(db: str) -> str:
    """The URL of database ``db`` on the test server."""
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + db


def pg_admin() -> Any:
    """An autocommit connection to the test server's admin database; fails (never skips) when down."""
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN)
    conn.autocommit = True
    return conn


@pytest.fixture
def pg_db() -> Iterator[str]:
    """A fresh database ``fm_cdc_<random>``; its slots are dropped and the database removed after."""
    name = f"fm_cdc_{uuid.uuid4().hex[:10]}"
    admin = pg_admin()
    with admin.cursor() as cur:
        cur.execute("SHOW wal_level")
        level = cur.fetchone()[0]
        assert level == "logical", f"wal_level is {level}: run scripts/ci-services first"
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE database = %s "
                "AND active_pid IS NOT NULL",
                (name,),
            )
            for _ in range(50):
                cur.execute(
                    "SELECT count(*) FROM pg_replication_slots "
                    "WHERE database = %s AND active_pid IS NOT NULL",
                    (name,),
                )
                if cur.fetchone()[0] == 0:
                    break
                import time

                time.sleep(0.1)
            cur.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = %s",
                (name,),
            )
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def pg_exec(db: str, *sql: str, params: Any = None) -> None:
    """Run statements on ``db``, each in its own committed transaction."""
    import psycopg2

    conn = psycopg2.connect(pg_db_url(db))
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for s in sql:
                cur.execute(s, params)
    finally:
        conn.close()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """An embedded nats-server with JetStream in ``tmp_path``."""
    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


async def read_topic(bus_url: str, topic: str, *, expect: int, timeout_s: float = 20.0) -> list[ChangeEvent]:
    """All change events of ``topic`` (every partition), waiting until at least ``expect`` arrived."""
    events: list[tuple[int, int, ChangeEvent]] = []
    async with load_bus(bus_url) as bus:
        assert isinstance(bus, NatsBus)
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                info = await bus.stream_info(stream_name(topic))
                have = int(info.state.messages)
            except Exception:
                have = 0
            if have >= expect or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        if have == 0:
            return []
        cons = await bus.consumer(topic, group=f"reader_{uuid.uuid4().hex[:8]}")
        while len(events) < have:
            recs = await cons.fetch(1000, 2.0)
            if not recs:
                break
            for r in recs:
                ev = decode_change_event(r.value)
                assert ev is not None
                events.append((r.partition, r.offset, ev))
            await cons.ack(recs)
        await cons.close()
    events.sort(key=lambda e: e[1])  # stream sequence = publish order
    return [e for _, _, e in events]


MY_URL = os.environ.get("FIELDMESH_TEST_MYSQL", "mysql://root@127.0.0.1:3306")


def my_conn(db: str | None = None) -> Any:
    """An autocommit pymysql connection to the test MariaDB; fails (never skips) when it is down."""
    import pymysql

    return pymysql.connect(host="127.0.0.1", port=3306, user="root", database=db, autocommit=True)


def my_exec(db: str, *sql: str) -> None:
    """Run statements on MariaDB database ``db``, each committed on its own."""
    conn = my_conn(db)
    try:
        with conn.cursor() as cur:
            for s in sql:
                cur.execute(s)
    finally:
        conn.close()


@pytest.fixture
def my_db() -> Iterator[str]:
    """A fresh MariaDB database ``fm_cdc_<random>`` (the binlog must be on: scripts/ci-services)."""
    name = f"fm_cdc_{uuid.uuid4().hex[:10]}"
    conn = my_conn()
    with conn.cursor() as cur:
        cur.execute("SELECT @@log_bin, @@binlog_format")
        log_bin, fmt = cur.fetchone()
        assert log_bin == 1 and fmt == "ROW", (
            "MariaDB binlog is off or not ROW: run scripts/ci-services first"
        )
        cur.execute(f"CREATE DATABASE `{name}`")
    try:
        yield name
    finally:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        conn.close()


def write_load(conn: Any, stop: threading.Event, counter: list[int], *, keys: int, seed: int) -> None:
    """Transactions of 1-6 changes until ``stop``: each bumps ``v`` of a row, or inserts a row with v=1.

    ``counter[0]`` counts the changes committed or about to be; the connection is closed at the end.
    """
    rnd = random.Random(seed)
    next_id = keys
    try:
        with conn.cursor() as cur:
            while not stop.is_set():
                for _ in range(rnd.randint(1, 6)):
                    if rnd.random() < 0.1:
                        cur.execute("INSERT INTO assets (id, v) VALUES (%s, 1)", (next_id,))
                        next_id += 1
                    else:
                        cur.execute("UPDATE assets SET v = v + 1 WHERE id = %s", (rnd.randrange(keys),))
                    counter[0] += 1
                conn.commit()
    finally:
        conn.close()
