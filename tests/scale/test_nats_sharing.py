"""NATS: processor replicas share the partitions by static assignment (``--partitions``).

Each replica owns a disjoint set of partitions and has its own durable consumer (one per
``--group``); all write to one PostgreSQL store. A replica killed with -9 and restarted with the same
partitions resumes from the positions stored in PostgreSQL: the totals stay exact.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path

import pytest

from e2e.dataset import make_stream
from fieldmesh.runtime.natsserver import EmbeddedNats
from fieldmesh.store import load_store
from fmtest.scale import Role, check_store_exact, expected_received, wait_store

pytestmark = pytest.mark.integration

PARTS = 8


def publish(url: str, msgs: list[tuple[str, bytes]], *, pause_s: float = 0.0, slices: int = 1) -> None:
    """Publish device payloads on the user's subjects ``site.<device>.tm`` (JetStream-acknowledged)."""

    async def run() -> None:
        import nats

        nc = await nats.connect(url)
        js = nc.jetstream()
        step = len(msgs) // slices + 1
        for i in range(0, len(msgs), step):
            acks = [await js.publish_async(f"site.{t.split('/')[1]}.tm", p) for t, p in msgs[i : i + step]]
            await asyncio.gather(*acks)
            await asyncio.sleep(pause_s)
        await nc.close()

    asyncio.run(run())


def test_static_partitions_disjoint_replicas_kill9_restart_exact(tmp_path: Path, pg_url):
    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()
    prefix = f"ns{uuid.uuid4().hex[:6]}"
    store_url = f"{pg_url}?schema={prefix}"
    stream = make_stream(prefix, devices=40, per_device=60, seed=9)
    msgs = stream["messages"]
    ingest = f"{srv.url}/site.*.tm?stream=SITE&durable=gw&device_template=site.{{device}}.tm"

    async def make_stream_first() -> None:
        import nats

        nc = await nats.connect(srv.url)
        await nc.jetstream().add_stream(name="SITE", subjects=["site.*.tm"])
        await nc.close()

    asyncio.run(make_stream_first())

    def replica(i: int, parts: str) -> Role:
        return Role(tmp_path, f"process-{i}", "process", "--bus-url", srv.url, "--store-url", store_url,
                    "--partitions", parts, "--total-partitions", str(PARTS))  # default group: one per partition set

    gw = Role(tmp_path, "gateway", "gateway", "--bus-url", srv.url, "--ingest-url", ingest,
              "--partitions", str(PARTS))
    reps = [replica(0, "0-3"), replica(1, "4-7")]
    store = None
    try:
        gw.start()
        gw.wait_log("gateway running")
        reps[0].start()
        reps[0].wait_log("processor running")
        reps[1].start()
        reps[1].wait_log("processor running")
        third = len(msgs) // 3
        publish(srv.url, msgs[:third])
        store = load_store(store_url, readonly=True)
        wait_store(store, 1, what=lambda: gw.tail())
        feeder = threading.Thread(target=publish, args=(srv.url, msgs[third:]), kwargs={"pause_s": 0.2, "slices": 8})
        feeder.start()
        time.sleep(0.5)
        before = store.stats().received
        reps[1].kill9()
        time.sleep(0.5)
        total = expected_received(stream["sent"], {})
        assert 0 < before < total
        mid = store.stats().received
        reps[1] = replica(1, "4-7").start()  # same partitions, same durable: resumes from PostgreSQL
        feeder.join()
        wait_store(store, total, timeout_s=60, what=lambda: "\n".join(r.tail(2000) for r in [gw, *reps]))
        time.sleep(1.0)
        check_store_exact(store, stream["sent"], {})
        assert mid < total
        # each replica applied only its own partitions
        rows = store.query("SELECT partition FROM positions WHERE topic = 'fm.readings' ORDER BY 1").rows
        assert [r[0] for r in rows] == list(range(PARTS))
    finally:
        if store is not None:
            store.close()
        for r in [gw, *reps]:
            assert r.stop() == 0, r.tail()
        srv.stop()

