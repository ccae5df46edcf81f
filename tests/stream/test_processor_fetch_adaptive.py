"""The processor's fetch adapts to the backlog (a real nats-server and SQLite store): behind, it fetches full
batches back to back; caught up, one fetch per batch, taken when the applier is free, so a trickle of records
gives small batches whose cycle is the apply time, not many small fetches that cost the applier CPU."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from fieldmesh.bus import OutRecord, load_bus
from fieldmesh.bus.base import BusRecord, Consumer
from fieldmesh.core.codec import decode_telemetry, encode_bus_batch, encode_reading_json
from fieldmesh.core.model import BusBatch
from fieldmesh.core.settings import ProcessorSettings, Settings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.runtime.natsserver import EmbeddedNats
from fieldmesh.runtime.worker import ensure_topics
from fieldmesh.store.base import ApplyResult
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.processor import Processor

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

APPLY_S = 0.03  # each batch takes at least this long: the applier is busy while records arrive


def _record(seq: int) -> OutRecord:
    now = int(time.time() * 1000)
    r = decode_telemetry(encode_reading_json("fa-1", now, {"t": float(seq)}, seq=seq), device_id="fa-1",
                         topic="devices/fa-1/telemetry", received_ms=now).readings
    return OutRecord(READINGS_TOPIC, 0, encode_bus_batch(BusBatch(r)), msg_id=f"fa-{seq}")


class _CountingConsumer:
    """The real consumer, its non-empty fetches counted."""

    def __init__(self, inner: Consumer, fetches: list[int]) -> None:
        self._inner = inner
        self._fetches = fetches

    async def fetch(self, max_records: int, timeout_s: float, *, max_bytes: int | None = None) -> list[BusRecord]:
        recs = await self._inner.fetch(max_records, timeout_s, max_bytes=max_bytes)
        if recs:
            self._fetches.append(len(recs))
        return recs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _SlowProcessor(Processor):
    """Applies as the processor does, taking at least ``APPLY_S`` a batch; notes each batch's size."""

    batches: list[int]
    fetches: list[int]

    def apply_records(self, records: Sequence[BusRecord]) -> ApplyResult:
        self.batches.append(len(records))
        time.sleep(APPLY_S)
        return super().apply_records(records)

    async def _consumer(self, topic: str, partitions: Sequence[int] | None, group: str) -> Consumer:
        return _CountingConsumer(await super()._consumer(topic, partitions, group), self.fetches)  # type: ignore[return-value]


def test_backlog_gives_full_batches_and_a_trickle_one_fetch_per_small_batch(tmp_path: Path) -> None:
    nats = EmbeddedNats(store_dir=tmp_path / "nats")
    nats.start()
    store = SqliteStore(f"sqlite:///{tmp_path / 'hot.db'}")
    settings = ProcessorSettings(fetch_max=64)
    proc = _SlowProcessor(bus=None, store=store, settings=settings, partitions=[0])  # type: ignore[arg-type]
    proc.batches, proc.fetches = [], []
    backlog, trickle = 600, 200

    async def run() -> tuple[int, int]:
        async with load_bus(nats.url) as bus:
            await ensure_topics(bus, Settings(bus={"partitions": 1}))  # type: ignore[arg-type]
            proc.bus = bus
            prod = bus.producer()
            await prod.send([_record(i) for i in range(backlog)])
            stop = asyncio.Event()
            task = asyncio.create_task(proc.run(stop))
            while store.stats().stored < backlog:
                await asyncio.sleep(0.01)
            caught_up = (len(proc.batches), len(proc.fetches))
            for i in range(backlog, backlog + trickle):  # one record every 2 ms: ~15 per apply
                await prod.send([_record(i)])
                await asyncio.sleep(0.002)
            while store.stats().stored < backlog + trickle:
                await asyncio.sleep(0.01)
            stop.set()
            await task
            return caught_up

    try:
        (b0, f0) = asyncio.run(run())
    finally:
        store.close()
        nats.stop()
    behind, during = proc.batches[:b0], proc.batches[b0:]
    assert sum(proc.batches) == backlog + trickle  # each record applied once
    assert max(behind) >= settings.fetch_max  # behind: full fetches, merged while the applier was busy
    # caught up: about one fetch per batch (before, the fetcher fetched every record or two as it came)
    fetches = len(proc.fetches) - f0
    assert fetches <= 1.5 * len(during) + 3, (fetches, len(during), during)
    assert sum(during) / len(during) >= 4, during  # each batch took what arrived while the last one applied
    assert max(during) <= 60, during  # and no more: small batches, short cycles
