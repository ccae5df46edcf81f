"""MariaDB CDC on the real server (row binlog): snapshot then stream, resume, types, errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from cdc_helpers import MY_URL, my_exec, read_topic

from fieldmesh.cdc.base import SourcePositionLost, SourcePrivilegeError, TableNotCapturable, cdc_topic
from fieldmesh.cdc.mysql import MySqlCdc
from fieldmesh.cdc.runner import run_cdc
from fieldmesh.runtime.natsserver import EmbeddedNats

pytestmark = pytest.mark.integration

ASSETS = """CREATE TABLE assets (
    id INT PRIMARY KEY, device_id VARCHAR(64) NOT NULL, threshold DECIMAL(10,3), rating DOUBLE,
    installed DATE, serviced DATETIME(6), seen TIMESTAMP NULL, uptime TIME, spec JSON, blob_ VARBINARY(8),
    flags SET('a','b','c'), active TINYINT(1))"""


async def _capture(
    db: str, url: str, state: Path, *, expect: int, resnapshot: bool = False, **kw: object
) -> list:
    topic = cdc_topic(db, None, "assets")
    stop = asyncio.Event()
    task = asyncio.create_task(
        run_cdc(
            f"{MY_URL}/{db}",
            "assets",
            url,
            state_dir=state,
            name=f"fmt_{db}",
            partitions=2,
            stop=stop,
            resnapshot=resnapshot,
            **kw,
        )  # type: ignore[arg-type]
    )
    try:
        evs = await read_topic(url, topic, expect=expect, timeout_s=20)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    return evs


def test_snapshot_stream_resume_and_types(my_db: str, nats_server: EmbeddedNats, tmp_path: Path) -> None:
    my_exec(
        my_db,
        ASSETS,
        "INSERT INTO assets VALUES (1, 'pump-1', 1.5, 0.25, '2024-03-01', '2024-03-01 10:00:00.5', "
        "'2024-03-01 10:00:00', '01:00:00', '{\"a\": 1}', x'0102', 'a,c', 1)",
        "INSERT INTO assets (id, device_id) VALUES (2, 'pump-2')",
    )
    topic = cdc_topic(my_db, None, "assets")
    state = tmp_path / "state"

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_cdc(
                f"{MY_URL}/{my_db}",
                "assets",
                nats_server.url,
                state_dir=state,
                name=f"fmt_{my_db}",
                partitions=2,
                stop=stop,
            )
        )
        try:
            snap = await read_topic(nats_server.url, topic, expect=2)
            assert [e.op for e in snap] == ["r", "r"]
            my_exec(
                my_db,
                "INSERT INTO assets (id, device_id, threshold) VALUES (3, 'pump-3', 7.25)",
                "UPDATE assets SET threshold = 2.0 WHERE id = 1",
                "DELETE FROM assets WHERE id = 2",
            )
            evs = await read_topic(nats_server.url, topic, expect=5)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
        a = next(e for e in evs if e.op == "r" and e.after and e.after["id"] == 1).after
        assert a is not None
        assert a["threshold"] == "1.500" and a["rating"] == 0.25 and a["active"] == 1
        assert (
            a["installed"] == 19783
            and a["serviced"] == 1709287200_500_000
            and a["seen"] == 1709287200_000_000
        )
        assert a["uptime"] == 3_600_000_000 and json.loads(a["spec"]) == {"a": 1} and a["blob_"] == "AQI="
        assert a["flags"] == "a,c"  # snapshot: MySQL's text form of a SET
        c, u, d = evs[2:]
        assert c.op == "c" and c.after["threshold"] == "7.250"  # type: ignore[index]
        assert u.op == "u" and u.before["threshold"] == "1.500" and u.after["threshold"] == "2.000"  # type: ignore[index]
        assert u.after["serviced"] == a["serviced"] and u.after["seen"] == a["seen"]  # type: ignore[index]
        assert json.loads(u.after["spec"]) == {"a": 1} and u.after["blob_"] == "AQI="  # type: ignore[index]
        assert d.op == "d" and d.before["id"] == 2 and d.after is None  # type: ignore[index]
        for e in (c, u, d):
            s = e.source
            assert s.connector == "mysql" and s.db == my_db and s.table == "assets" and s.schema is None
            assert s.file and s.pos and s.ts_ms % 1000 == 0 and s.ts_ms > 1_700_000_000_000
        assert c.source.pos < u.source.pos < d.source.pos  # type: ignore[operator]

        # restart: resumes after the last acknowledged transaction (no repeat), then new changes
        my_exec(my_db, "UPDATE assets SET rating = 9 WHERE id = 3", "TRUNCATE TABLE assets")
        evs = await _capture(my_db, nats_server.url, state, expect=7)
        assert [e.op for e in evs] == ["r", "r", "c", "u", "d", "u", "t"]
        assert evs[5].after["rating"] == 9.0  # type: ignore[index]

    asyncio.run(scenario())


def test_schema_change_mid_stream(my_db: str, nats_server: EmbeddedNats, tmp_path: Path) -> None:
    my_exec(
        my_db,
        "CREATE TABLE assets (id INT PRIMARY KEY, device_id VARCHAR(20), vib_max DOUBLE)",
        "INSERT INTO assets VALUES (1, 'p1', 1)",
    )
    topic = cdc_topic(my_db, None, "assets")

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_cdc(
                f"{MY_URL}/{my_db}",
                "assets",
                nats_server.url,
                state_dir=tmp_path,
                name=f"fms_{my_db}",
                stop=stop,
            )
        )
        try:
            await read_topic(nats_server.url, topic, expect=1)
            my_exec(
                my_db,
                "UPDATE assets SET vib_max = 2 WHERE id = 1",
                "ALTER TABLE assets ADD COLUMN site VARCHAR(20) DEFAULT 'north'",
                "UPDATE assets SET vib_max = 3, site = 'south' WHERE id = 1",
                "ALTER TABLE assets DROP COLUMN device_id",
                "INSERT INTO assets (id, vib_max) VALUES (2, 4)",
            )
            evs = await read_topic(nats_server.url, topic, expect=4)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)
        _, u1, u2, c = evs
        assert u1.after == {"id": 1, "device_id": "p1", "vib_max": 2.0}
        assert u2.before == {"id": 1, "device_id": "p1", "vib_max": 2.0, "site": "north"}
        assert u2.after == {"id": 1, "device_id": "p1", "vib_max": 3.0, "site": "south"}
        assert c.after == {"id": 2, "vib_max": 4.0, "site": "north"}

    asyncio.run(scenario())


def test_table_without_primary_key_and_missing_privileges(my_db: str, tmp_path: Path) -> None:
    my_exec(my_db, "CREATE TABLE events (device_id VARCHAR(20), note TEXT)", ASSETS)
    with pytest.raises(TableNotCapturable, match=r"events has no primary key"):
        MySqlCdc(url=f"{MY_URL}/{my_db}", tables="events", state_dir=tmp_path).prepare()
    user = f"u{my_db[-8:]}"
    my_exec(
        my_db, f"CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'", f"GRANT SELECT ON `{my_db}`.* TO '{user}'@'%'"
    )
    try:
        cdc = MySqlCdc(url=f"mysql://{user}:pw@127.0.0.1:3306/{my_db}", tables="assets", state_dir=tmp_path)
        with pytest.raises(SourcePrivilegeError, match=r"cannot read binlog positions.*REPLICATION"):
            cdc.prepare()
    finally:
        my_exec(my_db, f"DROP USER '{user}'@'%'")


def test_purged_binlog_position_is_an_error_not_a_gap(
    my_db: str, nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    my_exec(my_db, ASSETS, "INSERT INTO assets (id, device_id) VALUES (1, 'p')")
    state = tmp_path / "state"
    asyncio.run(_capture(my_db, nats_server.url, state, expect=1))
    off = state / f"mysql-fmt_{my_db}.json"
    doc = json.loads(off.read_text())
    doc["file"] = "mariadb-bin.999999"  # as if the server had purged the saved binlog
    off.write_text(json.dumps(doc))
    with pytest.raises(SourcePositionLost, match=r"was purged.*--resnapshot"):
        asyncio.run(_capture(my_db, nats_server.url, state, expect=1))
    my_exec(my_db, "INSERT INTO assets (id, device_id) VALUES (2, 'q')")
    evs = asyncio.run(_capture(my_db, nats_server.url, state, expect=3, resnapshot=True))
    assert [(e.op, e.after["id"]) for e in evs if e.after] == [("r", 1), ("r", 1), ("r", 2)]
