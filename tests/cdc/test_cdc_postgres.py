"""PostgreSQL CDC on the real server: snapshot then stream, types, schema change, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cdc_helpers import pg_db_url, pg_exec, read_topic

from fieldmesh.cdc.base import (
    UNAVAILABLE,
    SourceConfigError,
    SourcePositionLost,
    SourcePrivilegeError,
    TableNotCapturable,
    cdc_topic,
)
from fieldmesh.cdc.postgres import PostgresCdc, check_wal_level
from fieldmesh.cdc.runner import run_cdc
from fieldmesh.runtime.natsserver import EmbeddedNats

pytestmark = pytest.mark.integration

ASSETS = """CREATE TABLE public.assets (
    id int PRIMARY KEY, device_id text NOT NULL, model varchar(40), threshold numeric(10,3),
    rating float8, active bool, installed date, serviced timestamptz, seen timestamp,
    spec jsonb, addr inet, blob bytea, notes text)"""


async def _run_until(
    db: str, url: str, tmp: Path, expect: dict[str, int], *, name: str = "fmt", **kw: object
) -> None:
    """Run the CDC runner until every topic has its expected count."""
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_cdc(
            pg_db_url(db),
            "public.assets",
            url,
            state_dir=tmp / "state",
            name=name,
            partitions=2,
            stop=stop,
            **kw,
        )  # type: ignore[arg-type]
    )
    try:
        for topic, n in expect.items():
            await read_topic(url, topic, expect=n, timeout_s=20)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def test_snapshot_then_stream_types_and_ops(pg_db: str, nats_server: EmbeddedNats, tmp_path: Path) -> None:
    pg_exec(
        pg_db,
        ASSETS,
        "INSERT INTO assets VALUES (1, 'pump-1', 'P100', 1.5, 0.25, true, '2024-03-01', "
        "'2024-03-01 10:00:00.5+00', '2024-03-01 10:00:00', '{\"a\": 1}', '10.0.0.1', '\\x0102', 'n1')",
        "INSERT INTO assets (id, device_id, model) VALUES (2, 'pump-2', 'P200')",
    )
    topic = cdc_topic(pg_db, "public", "assets")

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_cdc(
                pg_db_url(pg_db),
                "public.assets",
                nats_server.url,
                state_dir=tmp_path / "s",
                name="fmt",
                partitions=2,
                stop=stop,
            )
        )
        try:
            snap = await read_topic(nats_server.url, topic, expect=2)
            assert [e.op for e in snap] == ["r", "r"]
            assert {e.after["id"] for e in snap if e.after} == {1, 2}
            pg_exec(
                pg_db,
                "INSERT INTO assets (id, device_id, model, threshold) VALUES (3, 'pump-3', 'P300', 7.25)",
                "UPDATE assets SET threshold = 2.0 WHERE id = 1",
                "DELETE FROM assets WHERE id = 2",
                "TRUNCATE assets",
            )
            evs = await read_topic(nats_server.url, topic, expect=6)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
        assert [e.op for e in evs] == ["r", "r", "c", "u", "d", "t"]
        r1 = next(e for e in evs if e.op == "r" and e.after and e.after["id"] == 1)
        a = r1.after
        assert a is not None
        assert a["device_id"] == "pump-1" and a["model"] == "P100"
        assert a["threshold"] == "1.500"  # numeric: exact string
        assert a["rating"] == 0.25 and a["active"] is True
        assert a["installed"] == 19783  # days since epoch
        assert a["serviced"] == "2024-03-01T10:00:00.500000Z"
        assert a["seen"] == 1709287200 * 1_000_000
        assert a["spec"] == '{"a": 1}'
        assert a["addr"] == "10.0.0.1"  # unmapped type: its text form
        assert a["blob"] == "AQI="
        assert r1.source.snapshot == "true" and r1.source.lsn is not None
        c, u, d, t = evs[2:]
        assert c.after is not None and c.after["threshold"] == "7.250" and c.before is None
        assert u.after is not None and u.after["threshold"] == "2.000"
        assert u.before is None  # REPLICA IDENTITY DEFAULT: no old row for a non-key update
        assert (
            d.before is not None and d.before["id"] == 2 and d.before["device_id"] is None and d.after is None
        )
        assert t.before is None and t.after is None
        for e in (c, u, d, t):
            assert e.source.connector == "postgresql" and e.source.db == pg_db
            assert e.source.schema == "public" and e.source.table == "assets"
            assert e.source.lsn and e.source.txId and e.source.ts_ms > 1_700_000_000_000
            assert e.source.snapshot == "false"
        # commit order: one transaction per statement, increasing LSNs
        assert c.source.lsn < u.source.lsn < d.source.lsn < t.source.lsn  # type: ignore[operator]

    asyncio.run(scenario())


def test_old_values_with_replica_identity_full_and_schema_change(
    pg_db: str, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    pg_exec(
        pg_db,
        ASSETS,
        "ALTER TABLE assets REPLICA IDENTITY FULL",
        "INSERT INTO assets (id, device_id, threshold) VALUES (1, 'pump-1', 1)",
    )
    topic = cdc_topic(pg_db, "public", "assets")

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_cdc(
                pg_db_url(pg_db),
                "public.assets",
                nats_server.url,
                state_dir=tmp_path / "s",
                name="fmt",
                stop=stop,
            )
        )
        try:
            await read_topic(nats_server.url, topic, expect=1)
            pg_exec(
                pg_db,
                "UPDATE assets SET threshold = 5 WHERE id = 1",
                # schema change mid-stream: pgoutput sends a new Relation message before the next change
                "ALTER TABLE assets ADD COLUMN site text DEFAULT 'north'",
                "ALTER TABLE assets DROP COLUMN notes",
                "UPDATE assets SET threshold = 6, site = 'south' WHERE id = 1",
                "ALTER TABLE assets ALTER COLUMN threshold TYPE float8",
                "INSERT INTO assets (id, device_id, threshold) VALUES (2, 'pump-2', 0.5)",
            )
            evs = await read_topic(nats_server.url, topic, expect=4)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
        _, u1, u2, c = evs
        assert (
            u1.before is not None and u1.before["threshold"] == "1.000" and u1.after["threshold"] == "5.000"
        )  # type: ignore[index]
        assert "site" not in u1.after  # type: ignore[operator]
        assert u2.before is not None and u2.before["site"] == "north" and u2.before["threshold"] == "5.000"
        assert u2.after is not None and u2.after["site"] == "south" and "notes" not in u2.after
        assert (
            c.after is not None and c.after["threshold"] == 0.5 and c.after["site"] == "north"
        )  # now a float8

    asyncio.run(scenario())


def test_wal_level_rule() -> None:
    check_wal_level("logical")
    with pytest.raises(
        SourceConfigError, match=r"wal_level is 'replica'.*ALTER SYSTEM SET wal_level = logical"
    ):
        check_wal_level("replica")


def test_table_without_primary_key_is_refused(pg_db: str, tmp_path: Path) -> None:
    pg_exec(pg_db, "CREATE TABLE public.events (device_id text, note text)")
    cdc = PostgresCdc(dsn=pg_db_url(pg_db), tables="public.events", state_dir=tmp_path)
    with pytest.raises(TableNotCapturable, match=r"public.events has no primary key"):
        cdc.prepare()
    cdc = PostgresCdc(dsn=pg_db_url(pg_db), tables="public.missing", state_dir=tmp_path)
    with pytest.raises(TableNotCapturable, match=r"does not exist"):
        cdc.prepare()


def test_missing_replication_privilege(pg_db: str, tmp_path: Path) -> None:
    role = f"{pg_db}_ro"
    pg_exec(pg_db, ASSETS, f"CREATE ROLE {role} LOGIN", f"GRANT SELECT ON assets TO {role}")
    try:
        url = pg_db_url(pg_db).replace("postgres@", f"{role}@")
        cdc = PostgresCdc(dsn=url, tables="public.assets", state_dir=tmp_path)
        with pytest.raises(SourcePrivilegeError, match=r"lacks the REPLICATION attribute"):
            cdc.prepare()
        pg_exec(pg_db, f"ALTER ROLE {role} REPLICATION", f"REVOKE SELECT ON assets FROM {role}")
        with pytest.raises(SourcePrivilegeError, match=r"cannot SELECT public.assets"):
            cdc.prepare()
        pg_exec(pg_db, f"GRANT SELECT ON assets TO {role}")
        with pytest.raises(SourcePrivilegeError, match=r"cannot create/alter publication"):
            cdc.prepare()
    finally:
        pg_exec(pg_db, f"DROP OWNED BY {role}", f"DROP ROLE {role}")


def test_dropped_slot_is_an_error_not_a_gap(pg_db: str, nats_server: EmbeddedNats, tmp_path: Path) -> None:
    pg_exec(pg_db, ASSETS, "INSERT INTO assets (id, device_id) VALUES (1, 'pump-1')")
    topic = cdc_topic(pg_db, "public", "assets")

    async def run_once(**kw: object) -> None:
        await _run_until(pg_db, nats_server.url, tmp_path, {topic: 1}, **kw)

    asyncio.run(run_once())
    pg_exec(
        pg_db, "SELECT pg_drop_replication_slot('fmt')", "INSERT INTO assets (id, device_id) VALUES (2, 'p2')"
    )
    with pytest.raises(SourcePositionLost, match=r"slot fmt is gone.*--resnapshot"):
        asyncio.run(run_once())
    # recovery: a new snapshot carries the current rows, then the stream goes on
    asyncio.run(run_once(resnapshot=True))
    evs = asyncio.run(read_topic(nats_server.url, topic, expect=3))
    assert [(e.op, e.after["id"]) for e in evs if e.after] == [("r", 1), ("r", 1), ("r", 2)]


def test_unchanged_toast_is_marked_unavailable(pg_db: str, nats_server: EmbeddedNats, tmp_path: Path) -> None:
    big = "x" * 20000
    pg_exec(pg_db, ASSETS, "ALTER TABLE assets ALTER COLUMN notes SET STORAGE EXTERNAL")
    topic = cdc_topic(pg_db, "public", "assets")

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_cdc(
                pg_db_url(pg_db),
                "public.assets",
                nats_server.url,
                state_dir=tmp_path / "s",
                name="fmt",
                stop=stop,
            )
        )
        try:
            await asyncio.sleep(1.0)
            pg_exec(
                pg_db,
                f"INSERT INTO assets (id, device_id, notes) VALUES (1, 'p', '{big}')",
                "UPDATE assets SET model = 'M' WHERE id = 1",
            )
            evs = await read_topic(nats_server.url, topic, expect=2)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
        assert evs[0].after["notes"] == big  # type: ignore[index]
        assert evs[1].after["notes"] == UNAVAILABLE and evs[1].after["model"] == "M"  # type: ignore[index]

    asyncio.run(scenario())
