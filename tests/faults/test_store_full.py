"""The hot store refuses writes (SQLite ``max_page_count``, as on a full disk): the processor retries.

It must neither crash (a restart loop under ``fieldmesh up``) nor acknowledge the bus: once the store
takes writes again, every reading is stored exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from fieldmesh.bus import OutRecord, load_bus
from fieldmesh.core.settings import Settings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.runtime.natsserver import EmbeddedNats
from fieldmesh.runtime.worker import ensure_topics
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.processor import Processor
from fmtest.faults import FaultReport, bus_batches

pytestmark = pytest.mark.integration

NOW = 1_763_812_345_123


def _batches(n_batches: int, per_batch: int) -> list[bytes]:
    return bus_batches(n_batches, per_batch, 1, "sf", NOW)


def test_a_full_store_is_retried_not_acked_not_crashed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fieldmesh.stream.processor")
    nats = EmbeddedNats(store_dir=tmp_path / "nats")
    nats.start()
    settings = Settings()
    store = SqliteStore(f"sqlite:///{tmp_path / 'store.db'}")
    pages = store._w.execute("PRAGMA page_count").fetchone()[0]
    store._w.execute(f"PRAGMA max_page_count = {pages}")  # full: not one page more

    async def run() -> tuple[int, int, int, int]:
        async with load_bus(nats.url) as bus:
            await ensure_topics(bus, settings)
            await bus.producer().send([OutRecord(READINGS_TOPIC, 0, v, msg_id=f"sf-{i}")
                                       for i, v in enumerate(_batches(20, 50))])
            proc = Processor(bus=bus, store=store, settings=settings.processor, partitions=[0],
                             total_partitions=settings.bus.partitions)
            stop = asyncio.Event()
            task = asyncio.create_task(proc.run(stop))
            await asyncio.sleep(3)
            assert not task.done(), task.exception()  # still running: no crash
            lag_full = await bus.pending(READINGS_TOPIC, group="fm-processor")
            retries = proc.stats.store_retries
            stored_full = store.stats().stored
            store._w.execute("PRAGMA max_page_count = 1073741823")  # space is back
            for _ in range(100):
                if store.stats().stored == 1000 and await bus.pending(READINGS_TOPIC, group="fm-processor") == 0:
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.wait_for(task, 20)
            return lag_full, retries, stored_full, await bus.pending(READINGS_TOPIC, group="fm-processor")

    try:
        lag_full, retries, stored_full, lag_after = asyncio.run(run())
    finally:
        nats.stop()
    assert stored_full == 0 and lag_full == 20 and retries >= 2  # nothing acknowledged while full
    st = store.stats()
    assert st.stored == 1000 and st.duplicates == 0 and lag_after == 0
    assert "store write failed: database or disk is full" in caplog.text
    FaultReport("SQLite full (max_page_count), then room again", sent=1000, acknowledged=1000, stored=st.stored,
                duplicates=st.duplicates, counted_losses={}).show()
    store.close()
