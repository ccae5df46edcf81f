"""An extra sink refuses writes (SQLite ``max_page_count``, as on a full disk) while the hot store takes them.

The processor must neither crash nor acknowledge the bus: the batch is retried, and once the sink takes
writes again it catches up (the records it lacks decided again against the hot store's claims), so both
stores hold every reading exactly once and the bus is acknowledged to the end.
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
from fieldmesh.store.base import INTERVALS
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.processor import Processor
from fmtest.faults import bus_batches

pytestmark = pytest.mark.integration

NOW = 1_763_812_345_123


def _batches(n_batches: int, per_batch: int) -> list[bytes]:
    return bus_batches(n_batches, per_batch, 3, "sk", NOW)


def _rollups(store: SqliteStore) -> dict[str, list[dict[str, object]]]:
    return {i: store.rollups(interval=i, device_id=None, metric=None, start_ms=None, end_ms=None, limit=10**6)
            for i in INTERVALS}


def test_a_full_sink_is_retried_then_caught_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fieldmesh.stream.processor")
    nats = EmbeddedNats(store_dir=tmp_path / "nats")
    nats.start()
    settings = Settings()
    hot = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    cold = SqliteStore(f"sqlite:///{tmp_path / 'cold.db'}")
    pages = cold._w.execute("PRAGMA page_count").fetchone()[0]
    cold._w.execute(f"PRAGMA max_page_count = {pages}")  # full: not one page more

    async def run() -> tuple[int, int, int]:
        async with load_bus(nats.url) as bus:
            await ensure_topics(bus, settings)
            await bus.producer().send([OutRecord(READINGS_TOPIC, i % 2, v, msg_id=f"sk-{i}")
                                       for i, v in enumerate(_batches(20, 50))])
            proc = Processor(bus=bus, store=hot, settings=settings.processor, partitions=[0, 1],
                             total_partitions=settings.bus.partitions, sinks=[cold])
            stop = asyncio.Event()
            task = asyncio.create_task(proc.run(stop))
            await asyncio.sleep(3)
            assert not task.done(), task.exception()  # still running: no crash
            lag_full = await bus.pending(READINGS_TOPIC, group="fm-processor")
            retries = proc.stats.store_retries
            cold._w.execute("PRAGMA max_page_count = 1073741823")  # space is back
            for _ in range(100):
                if cold.stats().stored == 1000 and await bus.pending(READINGS_TOPIC, group="fm-processor") == 0:
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.wait_for(task, 20)
            return lag_full, retries, await bus.pending(READINGS_TOPIC, group="fm-processor")

    try:
        lag_full, retries, lag_after = asyncio.run(run())
    finally:
        nats.stop()
    assert lag_full > 0 and retries >= 2  # nothing acknowledged while the sink was full
    assert "caught up" in caplog.text
    assert lag_after == 0
    h, c = hot.stats(), cold.stats()
    assert (h.stored, h.duplicates) == (c.stored, c.duplicates) == (1000, 0)
    assert _rollups(hot) == _rollups(cold)
    assert hot.applied() == cold.applied()
    hot.close()
    cold.close()
