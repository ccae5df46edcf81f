"""Memory bounds of the processor under overload: the fetch queue is bounded in bytes, and the SQLite
store's rollup cache keeps the latest windows instead of growing (or forgetting them all)."""

from __future__ import annotations

import asyncio
import itertools
import time

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


def _caught_up_stream(min_interval_s: float, *, n: int = 60, every_s: float = 0.003, size: int = 10,
                     max_bytes: int = 10**6) -> tuple[list[int], list[float]]:
    """A record of ``size`` bytes arrives every ``every_s``; a fetcher as the processor's (fetch what arrived, park
    when caught up) and an applier taking batches of up to ``max_bytes``; the offsets applied, and the monotonic
    time each batch was taken."""
    async def run() -> tuple[list[int], list[float]]:
        q = _ByteQueue(limit=10**7, min_interval_s=min_interval_s, max_records=256)
        arrived: list[BusRecord] = []

        async def producer() -> None:
            for i in range(n):
                arrived.append(_recs(i, 1, size)[0])
                await asyncio.sleep(every_s)

        async def fetcher() -> None:
            taken = 0
            while True:
                if taken == n:
                    await q.close()
                    return
                if taken == len(arrived):  # nothing yet: wait a little for the next (a fetch's wait)
                    await asyncio.sleep(every_s / 3)
                    await q.put([])
                else:
                    recs, taken = arrived[taken:], len(arrived)
                    await q.put(recs)
                await q.park()  # caught up

        tasks = [asyncio.create_task(producer()), asyncio.create_task(fetcher())]
        offsets: list[int] = []
        starts: list[float] = []
        while (recs := await q.get(max_bytes=max_bytes)) is not None:
            starts.append(time.monotonic())
            offsets += [r.offset for r in recs]
            await q.release(recs)
        await asyncio.gather(*tasks)
        return offsets, starts

    return asyncio.run(run())


def test_byte_queue_spaces_caught_up_batches_by_the_minimum_interval() -> None:
    offsets, starts = _caught_up_stream(0.03)
    assert offsets == list(range(60))  # every record once, in order
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert min(gaps) >= 0.029  # caught up, no batch starts sooner than the interval after the one before
    assert len(starts) <= (starts[-1] - starts[0]) / 0.03 + 2
    plain_offsets, plain_starts = _caught_up_stream(0.0)
    assert plain_offsets == list(range(60))
    assert len(plain_starts) > len(starts)  # without it, a batch as soon as anything came


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


def test_byte_queue_does_not_wait_after_a_large_batch() -> None:
    """Each record is over half of the bytes a batch may take: every batch is large, its fixed cost spread, and the
    next one starts as soon as a record came, caught up or not (a backlog growing as fast as it is applied would
    otherwise leave the applier idle between batches)."""
    offsets, starts = _caught_up_stream(0.03, size=600, max_bytes=1000)
    assert offsets == list(range(60))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) > (starts[-1] - starts[0]) / 0.03 + 2, len(starts)  # more than the interval would let
    assert min(gaps) < 0.02, min(gaps)
