"""Memory bounds of the processor under overload: the fetch queue is bounded in bytes, and the SQLite
store's rollup cache keeps the latest windows instead of growing (or forgetting them all)."""

from __future__ import annotations

import asyncio

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.store.rollup import Acc, RollupKey, evict_oldest
from fieldmesh.stream.processor import _ByteQueue


def _recs(first: int, n: int, size: int) -> list[BusRecord]:
    return [BusRecord(topic=READINGS_TOPIC, partition=0, offset=first + i, value=b"x" * size) for i in range(n)]


def test_byte_queue_holds_the_fetcher_back_and_merges_up_to_the_budget() -> None:
    async def run() -> tuple[list[int], list[int]]:
        q = _ByteQueue(limit=1000)
        puts: list[int] = []

        async def fetcher() -> None:
            for k in range(6):
                await q.put(_recs(k * 10, 4, 100))  # 400 bytes a fetch
                puts.append(k)
            await q.close()

        task = asyncio.create_task(fetcher())
        await asyncio.sleep(0.05)
        held_back = len(puts)  # 2 fetches (800 bytes) fit; the third (1200 > 1000) waits
        sizes = []
        while (recs := await q.get(max_bytes=900)) is not None:
            sizes.append(sum(len(r.value) for r in recs))
            await asyncio.sleep(0.01)
            await q.release(recs)
        await task
        return [held_back], sizes

    held_back, sizes = asyncio.run(run())
    assert held_back == [2]
    assert sum(sizes) == 6 * 400 and max(sizes) <= 900  # every record once, merged batches within the budget
    assert 800 in sizes  # queued fetches were merged


def test_byte_queue_lets_one_oversized_batch_through() -> None:
    async def run() -> int:
        q = _ByteQueue(limit=100)
        await q.put(_recs(0, 1, 500))  # bigger than the limit, and nothing held: let in
        recs = await q.get(max_bytes=100)
        assert recs is not None
        await q.release(recs)
        await q.close()
        assert await q.get(max_bytes=100) is None
        return len(recs)

    assert asyncio.run(run()) == 1


def test_rollup_cache_eviction_keeps_the_latest_windows() -> None:
    cache: dict[RollupKey, Acc] = {(f"d{i % 7}", "t", w * 60_000): [1, 1, 0, 1.0, 1.0]
                                   for i in range(7) for w in range(100)}
    evict_oldest(cache, 7 * 30)
    starts = sorted({k[2] for k in cache})
    assert len(cache) == 7 * 30 and starts == [w * 60_000 for w in range(70, 100)]
    evict_oldest(cache, 1000)  # under the bound: untouched
    assert len(cache) == 7 * 30
    evict_oldest(cache, 0)
    assert cache == {}
