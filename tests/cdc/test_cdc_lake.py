"""CDC into the lake (:mod:`fieldmesh.store.lakecdc`): PostgreSQL and MariaDB changes captured into the bus,
applied to an Iceberg mirror and change log. After a stream of inserts, updates and deletes (and a restart of
the lake writer in the middle, which loses nothing and doubles nothing) the mirror equals the source table."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest
from cdc_helpers import my_conn, my_exec, pg_db_url, pg_exec, read_topic

from fieldmesh.bus import load_bus
from fieldmesh.cdc.base import cdc_topic
from fieldmesh.cdc.runner import run_cdc
from fieldmesh.core.settings import LakeSettings
from fieldmesh.runtime.natsserver import EmbeddedNats
from fieldmesh.store.lake import open_catalog
from fieldmesh.store.lakecdc import CdcLakeSink, mirror_names, run_cdc_lake

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def changes(rnd: random.Random, n: int, first_id: int) -> tuple[list[str], int]:
    """``n`` random statements over ids below ``first_id`` and new ones: inserts, updates, deletes."""
    out, nid = [], first_id
    for _ in range(n):
        x = rnd.random()
        k = rnd.randrange(nid)
        if x < 0.3:
            price = rnd.uniform(0, 9)
            out.append(f"INSERT INTO items VALUES ({nid}, 'n{nid}', {rnd.randint(0, 9)}, {price:.3f}, NULL)")
            nid += 1
        elif x < 0.75:
            price = rnd.uniform(0, 9)
            out.append(f"UPDATE items SET qty = qty + 1, price = {price:.3f}, note = 'u{rnd.randint(0, 99)}'"
                       f" WHERE id = {k}")
        else:
            out.append(f"DELETE FROM items WHERE id = {k}")
    return out, nid


async def apply_until(bus_url: str, topic: str, table: str, cat: Any, total: int, *, crash_after: int | None) -> None:
    """Run the lake writer until the change log holds ``total`` changes; with ``crash_after``, stop it once
    about that many are in and start it again (a new consumer: the bus redelivers from the lake's positions)."""
    async with load_bus(bus_url) as bus:
        for phase in ((crash_after, total) if crash_after else (total,)):
            stop = asyncio.Event()
            # expiring every snapshot it may, every half second, while it commits: exactness must hold
            task = asyncio.create_task(run_cdc_lake(bus, {table: topic}, catalog=cat, namespace="fieldmesh",
                                                    stop=stop, fetch_max=7, snapshot_max_age_s=0.0,
                                                    maintenance_interval_s=0.5))
            log_id = mirror_names("fieldmesh", table)[1]
            for _ in range(600):
                if task.done() or (cat.table_exists(log_id)
                                   and cat.load_table(log_id).scan(selected_fields=("op",)).count() >= phase):
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.wait_for(task, 30)


def check(cat: Any, table: str, source_rows: list[tuple[Any, ...]], n_events: int) -> None:
    mirror_id, log_id = mirror_names("fieldmesh", table)
    got = sorted((r["id"], r["name"], r["qty"], r["price"], r["note"])
                 for r in cat.load_table(mirror_id).scan().to_arrow().to_pylist())
    assert got == sorted(source_rows)
    log = cat.load_table(log_id).scan().to_arrow().to_pylist()
    assert len(log) == n_events, "the change log has each change once"
    assert len({(r["bus_partition"], r["bus_offset"]) for r in log}) == n_events
    ops = {r["op"] for r in log}
    assert {"c", "u", "d"} <= ops | {"r"} and "d" in ops and "u" in ops


def test_postgres_changes_mirror_the_source(pg_db: str, nats_server: EmbeddedNats, tmp_path: Path) -> None:
    rnd = random.Random(7)
    pg_exec(pg_db, "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, qty int NOT NULL,"
                   " price float8 NOT NULL, note text)",
            *[f"INSERT INTO items VALUES ({i}, 'n{i}', {i % 5}, {i * 0.5}, NULL)" for i in range(30)])
    topic = cdc_topic(pg_db, "public", "items")
    cat = open_catalog(LakeSettings(), tmp_path)

    async def scenario() -> int:
        stop = asyncio.Event()
        cdc = asyncio.create_task(run_cdc(pg_db_url(pg_db), "public.items", nats_server.url,
                                          state_dir=tmp_path / "s", name="fmlake", partitions=3, stop=stop))
        try:
            await read_topic(nats_server.url, topic, expect=30)
            nid = 30
            for _ in range(6):  # transactions of several changes
                stmts, nid = changes(rnd, 25, nid)
                pg_exec(pg_db, "BEGIN; " + "; ".join(stmts) + "; COMMIT")
            events = await wait_events(nats_server.url, topic)
            await apply_until(nats_server.url, topic, "public.items", cat, events, crash_after=events // 2)
            return events
        finally:
            stop.set()
            await asyncio.wait_for(cdc, 20)

    n = asyncio.run(scenario())
    import psycopg2

    con = psycopg2.connect(pg_db_url(pg_db))
    with con.cursor() as cur:
        cur.execute("SELECT id, name, qty, price, note FROM items")
        rows = cur.fetchall()
    con.close()
    check(cat, "public.items", rows, n)
    # a new sink over the same tables holds the positions: the whole topic again changes nothing
    sink = CdcLakeSink(catalog=cat, namespace="fieldmesh", table_id="public.items")
    assert min(sink.applied().values()) >= 0
    check(cat, "public.items", rows, n)
    # expiry keeps what the sink resumes from: the same positions, the same rows, from two snapshots a table
    applied = sink.applied()
    expired = sink.expire(older_than_s=0.0, keep_last=2)
    assert all(v > 0 for v in expired.values()) and len(expired) == 2, expired
    assert all(len(cat.load_table(t).metadata.snapshots) == 2 for t in mirror_names("fieldmesh", "public.items"))
    assert CdcLakeSink(catalog=cat, namespace="fieldmesh", table_id="public.items").applied() == applied
    check(cat, "public.items", rows, n)


async def wait_events(bus_url: str, topic: str) -> int:
    """The number of change events on ``topic`` once it stops growing."""
    last, still = -1, 0
    while still < 10:
        n = len(await read_topic(bus_url, topic, expect=1, timeout_s=2))
        still = still + 1 if n == last else 0
        last = n
        await asyncio.sleep(0.2)
    return last


def test_mariadb_changes_mirror_the_source(my_db: str, nats_server: EmbeddedNats, tmp_path: Path) -> None:
    rnd = random.Random(8)
    my_exec(my_db, "CREATE TABLE items (id int PRIMARY KEY, name varchar(20) NOT NULL, qty int NOT NULL,"
                   " price double NOT NULL, note varchar(20))",
            *[f"INSERT INTO items VALUES ({i}, 'n{i}', {i % 5}, {i * 0.5}, NULL)" for i in range(30)])
    topic = cdc_topic(my_db, None, "items")
    cat = open_catalog(LakeSettings(), tmp_path)
    table = f"{my_db}.items"

    async def scenario() -> int:
        stop = asyncio.Event()
        cdc = asyncio.create_task(run_cdc(f"mysql://root@127.0.0.1:3306/{my_db}", table, nats_server.url,
                                          state_dir=tmp_path / "s", name="fmlake", partitions=3, stop=stop))
        try:
            await read_topic(nats_server.url, topic, expect=30)
            nid = 30
            conn = my_conn(my_db)
            conn.autocommit(False)
            with conn.cursor() as cur:
                for _ in range(6):
                    stmts, nid = changes(rnd, 25, nid)
                    for s in stmts:
                        cur.execute(s)
                    conn.commit()
            conn.close()
            events = await wait_events(nats_server.url, topic)
            await apply_until(nats_server.url, topic, table, cat, events, crash_after=events // 2)
            return events
        finally:
            stop.set()
            await asyncio.wait_for(cdc, 20)

    n = asyncio.run(scenario())
    conn = my_conn(my_db)
    with conn.cursor() as cur:
        cur.execute("SELECT id, name, qty, price, note FROM items")
        rows = [tuple(r) for r in cur.fetchall()]
    conn.close()
    check(cat, table, rows, n)
