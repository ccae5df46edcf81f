"""End to end: ``fieldmesh up --cdc-source ... --enrich ...`` enriches readings as of their event time.

A PostgreSQL table of assets is captured by the CDC child of ``fieldmesh up``; readings published over
MQTT are joined in the processor with the asset row valid at their event time, whatever the arrival
order; a kill -9 of the whole pipeline rebuilds the state from the CDC topics.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fmtest.procs import Up, publish_all, publisher

pytestmark = pytest.mark.integration

PG_ADMIN = os.environ.get("FIELDMESH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg(url: str) -> Any:
    import psycopg2

    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


@pytest.fixture
def assets_db() -> Iterator[tuple[str, str]]:
    """A database of its own with an ``assets`` table; (url, slot name). Slot and database dropped after."""
    name = f"fm_e2e_{uuid.uuid4().hex[:10]}"
    admin = _pg(PG_ADMIN)
    with admin.cursor() as cur:
        cur.execute("SHOW wal_level")
        assert cur.fetchone()[0] == "logical", "wal_level is not logical: run scripts/ci-services first"
        cur.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    try:
        yield url, name
    finally:
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                        " WHERE slot_name = %s AND active_pid IS NOT NULL", (name,))
            for _ in range(50):
                cur.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                            " WHERE slot_name = %s AND active_pid IS NULL", (name,))
                cur.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (name,))
                if cur.fetchone()[0] == 0:
                    break
                time.sleep(0.1)
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _exec(url: str, *sql: str) -> None:
    conn = _pg(url)
    try:
        with conn.cursor() as cur:
            for s in sql:
                cur.execute(s)
    finally:
        conn.close()


def _commit_times(up: Up, db: str, expect: int) -> list[int]:
    """Commit times (ms) of the update events on the assets topic, oldest first."""
    from fieldmesh.bus import load_bus
    from fieldmesh.cdc.base import cdc_topic, decode_change_event

    bus_url = json.loads((up.data_dir / "runtime.json").read_text())["bus_url"]

    async def read() -> list[int]:
        async with load_bus(bus_url) as bus:
            cons = await bus.consumer(cdc_topic(db, "public", "assets"), group=f"t_{uuid.uuid4().hex[:8]}")
            out: list[int] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                for rec in await cons.fetch(500, 0.5):
                    ev = decode_change_event(rec.value)
                    if ev is not None and ev.op == "u":
                        out.append(ev.source.ts_ms)
                if len(out) >= expect:
                    break
            await cons.close()
            return sorted(out)

    return asyncio.run(read())


def _follower_consumers(up: Up, db: str) -> list[str]:
    """Names of the processors' as-of follower consumers on the assets topic."""
    from fieldmesh.bus import load_bus
    from fieldmesh.bus.nats import stream_name
    from fieldmesh.cdc.base import cdc_topic

    bus_url = json.loads((up.data_dir / "runtime.json").read_text())["bus_url"]

    async def names() -> list[str]:
        async with load_bus(bus_url) as bus:
            infos = await bus.js.consumers_info(stream_name(cdc_topic(db, "public", "assets")))  # type: ignore[attr-defined]
            return sorted(i.name for i in infos if "-asof-" in i.name)

    return asyncio.run(names())


class Devices:
    """Publishes readings over MQTT and reads their enrichment back through the REST API."""

    def __init__(self, up: Up, first_seq: int = 0) -> None:
        self.up = up
        self.client = publisher(up.mqtt_port)
        self.seq = first_seq  # seq is the reading's identity: never reuse one

    def send(self, readings: list[tuple[str, int]]) -> list[int]:
        seqs = []
        msgs = []
        for dev, ts in readings:
            self.seq += 1
            seqs.append(self.seq)
            body = {"device_id": dev, "ts": ts, "seq": self.seq, "measurements": {"vib": 1.0}}
            msgs.append((f"devices/{dev}/telemetry", json.dumps(body).encode()))
        publish_all(self.client, msgs)
        return seqs

    def enrichment(self, dev: str, seqs: list[int], timeout_s: float = 20) -> list[dict[str, Any] | None]:
        deadline = time.monotonic() + timeout_s
        while True:
            rows = {r["seq"]: r for r in self.up.get(f"/telemetry/raw?device_id={dev}&limit=10000")}
            if all(s in rows for s in seqs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        missing = [s for s in seqs if s not in rows]
        assert not missing, f"readings {missing} of {dev} never stored\n{self.up.tail()}"
        return [rows[s].get("enrichment") for s in seqs]

    def wait_state(self, dev: str, field: str, value: Any, timeout_s: float = 20) -> None:
        """Probe with current readings until the processor's as-of state shows ``value``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            [got] = self.enrichment(dev, self.send([(dev, int(time.time() * 1000))]))
            if got and got.get(field) == value:
                return
            time.sleep(0.3)
        raise AssertionError(f"the processor never saw {field}={value!r} for {dev}\n{self.up.tail()}")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_enrichment_as_of_event_time_and_after_kill9(tmp_path: Path, assets_db: tuple[str, str]) -> None:
    url, db = assets_db
    p = f"e{uuid.uuid4().hex[:5]}"
    a, b, c = f"{p}-pump-a", f"{p}-pump-b", f"{p}-nobody"
    _exec(url,
          "CREATE TABLE assets (id int PRIMARY KEY, device_id text UNIQUE, threshold float8, site text,"
          " model text)",
          f"INSERT INTO assets VALUES (1, '{a}', 4.0, 'north', 'P100'), (2, '{b}', 6.0, 'south', 'P200')")
    args = ("--cdc-source", url, "--cdc-tables", "public.assets", "--cdc-name", db,
            "--enrich", "public.assets:device_id=device_id:fields=threshold,site:pk=id")
    data = tmp_path / "data"
    up = Up(data, *args).start(timeout_s=90)
    dev = Devices(up)
    try:
        # the snapshot is there before the first reading: enriched at once, only the chosen fields
        [e] = dev.enrichment(b, dev.send([(b, int(time.time() * 1000))]))
        assert e == {"assets.threshold": 6.0, "assets.site": "south"}

        _exec(url, "UPDATE assets SET threshold = 5.5 WHERE id = 1")  # committed at T
        [t1] = _commit_times(up, db, 1)
        dev.wait_state(a, "assets.threshold", 5.5)
        # these readings arrive after the change; their event times straddle T
        seqs = dev.send([(a, t1 - 60_000), (a, t1 - 1), (a, t1), (a, t1 + 1), (b, t1 - 1), (c, t1)])
        got = [dev.enrichment(d, [s])[0] for d, s in zip([a, a, a, a, b, c], seqs, strict=True)]
        assert [g and g["assets.threshold"] for g in got] == [4.0, 4.0, 5.5, 5.5, 6.0, None]
        assert got[0] == {"assets.threshold": 4.0, "assets.site": "north"}
    finally:
        dev.close()
    up.kill9()

    # while everything is down, the asset changes again at T2
    _exec(url, "UPDATE assets SET threshold = 7.0, site = 'east' WHERE id = 1")
    up2 = Up(data, *args)
    up2.mqtt_port, up2.http_port = up.mqtt_port, up.http_port
    up2.start(timeout_s=90)
    dev = Devices(up2, first_seq=10_000)
    try:
        t1b, t2 = _commit_times(up2, db, 2)
        assert t1b == t1
        dev.wait_state(a, "assets.threshold", 7.0)
        seqs = dev.send([(a, t1 - 1), (a, t1 + 1), (a, t2 - 1), (a, t2), (b, t2 + 5)])
        got = [dev.enrichment(d, [s])[0] for d, s in zip([a, a, a, a, b], seqs, strict=True)]
        assert [(g["assets.threshold"], g["assets.site"]) for g in got if g] == [
            (4.0, "north"), (5.5, "north"), (5.5, "north"), (7.0, "east"), (6.0, "south")]
        # earlier readings keep the enrichment they were stored with
        assert dev.enrichment(a, [seqs[0]])[0] == got[0]
        health = up2.get("/health")
        assert health.get("cdc") == "ok", health
        # the killed processor's follower consumer was replaced, not left behind
        assert _follower_consumers(up2, db) == ["fm-processor-asof-all"]
    finally:
        dev.close()
        assert up2.stop() == 0, up2.tail()


def _up_fails(tmp_path: Path, *args: str) -> str:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "fieldmesh", "up", "--data-dir", str(tmp_path / "bad"),
                          "--mqtt-port", "0", "--http-port", "0", "--for", "20", *args],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res
    return " ".join(res.stderr.split())


def test_up_refuses_a_capture_that_cannot_start_and_a_join_on_an_uncaptured_table(
    tmp_path: Path, assets_db: tuple[str, str]
) -> None:
    url, db = assets_db
    _exec(url, "CREATE TABLE nokey (device_id text, threshold float8)",
          "CREATE TABLE assets (id int PRIMARY KEY, device_id text, threshold float8)")
    # a table without primary key: the capture's own error, before any reading is processed
    err = _up_fails(tmp_path, "--cdc-source", url, "--cdc-tables", "public.nokey", "--cdc-name", db,
                    "--enrich", "public.nokey")
    assert "snapshot" in err and "primary key" in err.lower(), err
    err = _up_fails(tmp_path, "--cdc-source", url, "--cdc-tables", "public.assets", "--cdc-name", db,
                    "--enrich", "public.maintenance")
    assert "--enrich public.maintenance: the table is not captured" in err, err
    err = _up_fails(tmp_path, "--cdc-source", url.rsplit("/", 1)[0] + "/no_such_db", "--cdc-tables",
                    "public.assets", "--cdc-name", db)
    assert "no_such_db" in err and "does not exist" in err, err


def test_a_processor_waiting_for_a_cdc_topic_that_never_comes_fails_naming_it(tmp_path: Path) -> None:
    from fieldmesh.core.errors import ConfigError
    from fieldmesh.core.settings import load_settings
    from fieldmesh.runtime.natsserver import EmbeddedNats
    from fieldmesh.runtime.worker import run_processor

    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()
    try:
        settings = load_settings(enrich={"joins": "public.assets", "database": "nodb", "catch_up_timeout_s": 1.5})
        with pytest.raises(ConfigError, match=r"CDC topic fm\.cdc\.nodb\.public\.assets does not exist"):
            asyncio.run(run_processor(bus_url=srv.url, store_url=f"sqlite:///{tmp_path / 's.db'}",
                                      settings=settings, stop=asyncio.Event()))
    finally:
        srv.stop()


def test_up_with_a_mariadb_source_enriches_from_the_binlog(tmp_path: Path) -> None:
    import pymysql

    db = f"fm_e2e_{uuid.uuid4().hex[:10]}"
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
    with conn.cursor() as cur:
        cur.execute("SELECT @@log_bin, @@binlog_format")
        assert cur.fetchone() == (1, "ROW"), "MariaDB binlog is off or not ROW: run scripts/ci-services first"
        cur.execute(f"CREATE DATABASE `{db}`")
        cur.execute(f"CREATE TABLE `{db}`.assets (id int PRIMARY KEY, device_id varchar(64), threshold double)")
        cur.execute(f"INSERT INTO `{db}`.assets VALUES (1, 'my-pump', 3.0)")
    up = Up(tmp_path / "data", "--cdc-source", "mysql://root@127.0.0.1:3306/", "--cdc-tables", f"{db}.assets",
            "--cdc-name", db, "--enrich", f"{db}.assets:fields=threshold:prefix=asset.").start(timeout_s=90)
    dev = Devices(up)
    try:
        [e] = dev.enrichment("my-pump", dev.send([("my-pump", int(time.time() * 1000))]))
        assert e == {"asset.threshold": 3.0}
        with conn.cursor() as cur:
            cur.execute(f"UPDATE `{db}`.assets SET threshold = 3.5 WHERE id = 1")
        dev.wait_state("my-pump", "asset.threshold", 3.5)
        # a reading taken well before the change, arriving after it, keeps the old threshold
        [old] = dev.enrichment("my-pump", dev.send([("my-pump", int(time.time() * 1000) - 120_000)]))
        assert old == {"asset.threshold": 3.0}
    finally:
        dev.close()
        assert up.stop() == 0, up.tail()
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{db}`")
        conn.close()


def _health(up: Up) -> dict[str, Any]:
    import urllib.error

    try:
        return up.get("/health")  # type: ignore[no-any-return]
    except urllib.error.HTTPError as exc:  # 503 when degraded, with the same body
        return json.loads(exc.read())  # type: ignore[no-any-return]


def test_a_dropped_slot_is_reported_not_restarted_in_a_loop(tmp_path: Path, assets_db: tuple[str, str]) -> None:
    url, db = assets_db
    _exec(url, "CREATE TABLE assets (id int PRIMARY KEY, device_id text, threshold float8)",
          "INSERT INTO assets VALUES (1, 'slot-pump', 2.0)")
    up = Up(tmp_path / "data", "--cdc-source", url, "--cdc-tables", "public.assets", "--cdc-name", db,
            "--enrich", "public.assets:fields=threshold").start(timeout_s=90)
    dev = Devices(up)
    try:
        admin = _pg(PG_ADMIN)
        with admin.cursor() as cur:  # an operator drops the slot under the running capture
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                cur.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                            " WHERE slot_name = %s AND active_pid IS NOT NULL", (db,))
                cur.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                            " WHERE slot_name = %s AND active_pid IS NULL", (db,))
                cur.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (db,))
                if cur.fetchone()[0] == 0:
                    break
                time.sleep(0.05)
        admin.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            h = _health(up)
            if str(h.get("cdc", "")).startswith("failed"):
                break
            time.sleep(0.3)
        assert h["status"] == "degraded" and "resnapshot" in h["cdc"], h
        time.sleep(2)
        assert str(_health(up)["cdc"]).startswith("failed")  # left stopped, not restarted
        # the rest of the pipeline goes on, enriching from the state it has
        [e] = dev.enrichment("slot-pump", dev.send([("slot-pump", int(time.time() * 1000))]))
        assert e == {"assets.threshold": 2.0}
    finally:
        dev.close()
        assert up.stop() == 0, up.tail()
