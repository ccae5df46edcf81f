"""Two ``fieldmesh process`` replicas (partitions 0-3 and 4-7) write one lake: 0 duplicate, 0 missing rows.

Both commit to the same Iceberg tables (the embedded SQLite catalog of one data dir) on a short commit
interval, so their commits conflict and are retried; each records its partitions' positions in the
snapshot summaries (``fieldmesh.writer``, ``fieldmesh.positions``). One replica is killed with -9 while
data flows and restarted with the same partitions: it resumes from the positions its tables hold. Read
back with pyiceberg, the lake holds every reading once and rollups equal to the oracle.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from e2e.dataset import make_stream
from fieldmesh.core.settings import LakeSettings
from fieldmesh.runtime.natsserver import EmbeddedNats
from fieldmesh.store import load_store
from fieldmesh.store.lake import PROP_WRITER, open_catalog
from fmtest import oracle
from fmtest.scale import Role, check_store_exact, expected_received, wait_store
from scale.test_nats_sharing import publish

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

PARTS = 8


def _rows(catalog: Any, table: str) -> list[dict[str, Any]]:
    return catalog.load_table(f"fieldmesh.{table}").scan().to_arrow().to_pylist()  # type: ignore[no-any-return]


def test_two_processors_write_one_lake_exactly_once(tmp_path: Path, pg_url: str) -> None:
    import asyncio

    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()
    prefix = f"lw{uuid.uuid4().hex[:6]}"
    store_url = f"{pg_url}?schema={prefix}"
    lake_dir = tmp_path / "lake-data"
    stream = make_stream(prefix, devices=40, per_device=60, seed=17)
    msgs = stream["messages"]
    ingest = f"{srv.url}/site.*.tm?stream=SITE&durable=gw&device_template=site.{{device}}.tm"

    async def make_site_stream() -> None:
        import nats

        nc = await nats.connect(srv.url)
        await nc.jetstream().add_stream(name="SITE", subjects=["site.*.tm"])
        await nc.close()

    asyncio.run(make_site_stream())

    def replica(i: int, parts: str) -> Role:
        return Role(tmp_path, f"process-{i}", "process", "--bus-url", srv.url, "--store-url", store_url,
                    "--partitions", parts, "--total-partitions", str(PARTS), "--lake", "--data-dir", str(lake_dir),
                    "--lake-commit-interval", "0.3")

    gw = Role(tmp_path, "gateway", "gateway", "--bus-url", srv.url, "--ingest-url", ingest,
              "--partitions", str(PARTS))
    reps = [replica(0, "0-3"), replica(1, "4-7")]
    store = None
    try:
        gw.start()
        gw.wait_log("gateway running")
        for r in reps:
            r.start()
        for r in reps:
            r.wait_log("processor running", timeout_s=60)
        third = len(msgs) // 3
        publish(srv.url, msgs[:third])
        store = load_store(store_url, readonly=True)
        wait_store(store, 1, what=lambda: gw.tail())
        feeder = threading.Thread(target=publish, args=(srv.url, msgs[third:]), kwargs={"pause_s": 0.2, "slices": 8})
        feeder.start()
        time.sleep(1.0)
        reps[1].kill9()  # its lake writer dies with it
        reps[1] = replica(1, "4-7").start()  # same partitions: resumes from what its tables hold
        feeder.join()
        total = expected_received(stream["sent"], {})
        wait_store(store, total, timeout_s=120, what=lambda: "\n".join(r.tail(2000) for r in [gw, *reps]))
        check_store_exact(store, stream["sent"], {})
        uniq = oracle.unique_readings(stream["sent"])
        catalog = open_catalog(LakeSettings(), lake_dir)
        deadline = time.monotonic() + 90  # visible in the lake without stopping anything
        while len(_rows(catalog, "readings")) < len(uniq) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        if store is not None:
            store.close()
        for r in [gw, *reps]:
            assert r.stop() == 0, r.tail()
        srv.stop()

    catalog = open_catalog(LakeSettings(), lake_dir)
    rows = _rows(catalog, "readings")
    got = [(r["device_id"], int(r["ts"].timestamp() * 1000), r["seq"]) for r in rows]
    assert len(got) == len(set(got)), "duplicate rows in the lake"
    assert sorted(got) == sorted((d, r["ts"], r.get("seq")) for d, r in uniq.values()), "missing rows"
    for interval in ("1m", "1h"):
        expected = oracle.rollups(stream["sent"], interval)
        lake = _rows(catalog, f"rollup_{interval}")
        have = {(r["device_id"], r["metric"], int(r["window_start"].timestamp() * 1000)): r for r in lake}
        assert len(have) == len(lake), f"two rows for one window in rollup_{interval}"
        assert set(have) == set(expected)
        for k, e in expected.items():
            g = have[k]
            assert (g["count"], g["sum"], g["min"], g["max"], g["avg"]) == (
                e["count"], e["sum"], e["min"], e["max"], e["avg"]), k
    table = catalog.load_table("fieldmesh.readings")
    writers = {s.summary.additional_properties.get(PROP_WRITER) for s in table.metadata.snapshots if s.summary}
    assert {"partitions 0,1,2,3", "partitions 4,5,6,7"} <= writers
    # the log holds both starts of replica 1 (a 3,000-character tail could cut the restart's line off)
    assert reps[1].tail(10**8).count("processor running") == 2
