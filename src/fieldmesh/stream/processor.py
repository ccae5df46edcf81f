"""The processor: bus -> de-duplicate -> raw readings + rollups in the hot store.

Per batch of bus records, one store transaction writes the new readings, their rollup
corrections, the dead letters, the counters, the event-time watermarks **and the bus positions**
of the records. Only then are the records acknowledged to the bus. So:

* a crash before the commit: nothing of the batch is stored; the bus redelivers it;
* a crash after the commit, before the ack: the bus redelivers records whose positions are
  stored; they are skipped (not even counted as duplicates);
* a reading that arrives twice for any other reason (device retry, gateway redelivery, edge
  replay) is found by its identity in the store and counted as a duplicate.

Lateness: a reading is *late* when its 1-minute window had already been emitted for its device, i.e.
the device's watermark (the latest event time seen from it) minus ``grace_ms`` had passed the
window's end: a replay from an edge buffer is late, a device whose messages merely interleave with
others' is not. Late readings are stored and correct their rollups like any other; they are counted
in ``late``. (Per-partition watermarks are kept too, for monitoring.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from fieldmesh.bus.base import Bus, BusRecord, Consumer
from fieldmesh.core.codec import decode_bus_readings, decode_dead_letter
from fieldmesh.core.errors import BackendUnavailable
from fieldmesh.core.model import DeadLetter, Reading
from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.core.topics import DLQ_TOPIC, READINGS_TOPIC
from fieldmesh.store.base import INTERVALS, ApplyResult, HotStore, Position

__all__ = ["Enricher", "Processor", "ProcessorStats"]

log = logging.getLogger(__name__)

_RETRY_MAX_S = 5.0  # cap of the backoff between tries of a batch the store refused
_WINDOW_MS = INTERVALS["1m"]
#: Fetched-but-unapplied bus records are held up to this many ``fetch_max_bytes`` per consumer; beyond
#: it the fetcher waits, so that under overload the backlog stays in the bus, not in this process.
_QUEUED_FETCHES = 2


class Enricher(Protocol):
    """Adds fields to readings (e.g. as-of joins with CDC state) before they are stored."""

    def enrich(self, readings: list[Reading]) -> list[Reading]: ...


class ProcessorStats:
    """In-process counters of one processor."""

    def __init__(self) -> None:
        self.batches = 0
        self.stored = 0
        self.duplicates = 0
        self.late = 0
        self.dead_lettered = 0
        self.skipped = 0
        self.corrupt = 0
        self.store_retries = 0  # batches the store refused (full disk, lost connection) and that were retried


class Processor:
    """Consumes readings and dead letters from the bus and applies them to a hot store."""

    def __init__(
        self,
        *,
        bus: Bus,
        store: HotStore,
        settings: ProcessorSettings,
        group: str = "fm-processor",
        partitions: Sequence[int] | None = None,
        enricher: Enricher | None = None,
        total_partitions: int | None = None,
    ) -> None:
        self.bus = bus
        self.store = store
        self.settings = settings
        self.group = group
        # NATS needs the explicit list to resume per partition; Kafka balances when given None.
        self.partitions = (
            list(partitions) if partitions is not None
            else list(range(total_partitions)) if total_partitions and not bus.balances_groups else None
        )
        self.enricher = enricher
        self.stats = ProcessorStats()
        self._positions: dict[Position, int] = {}
        self._watermarks: dict[Position, int] = {}
        self._device_wm: dict[str, int] | None = None  # per-device event-time watermarks (lateness)
        # One thread applies every batch, of every consumer, in turn: the store has one writer, and a
        # single thread keeps the batches' garbage in one malloc arena (pool threads each grow their own).
        self._executor: ThreadPoolExecutor | None = None

    async def _consumer(self, topic: str, partitions: Sequence[int] | None, group: str) -> Consumer:
        def positions(parts: list[int]) -> dict[int, int]:
            # Read from the store: it is the truth, also for partitions another replica applied.
            stored = self.store.positions()
            self._positions.update(stored)
            return {p: o for (t, p), o in stored.items() if t == topic and p in parts}

        return await self.bus.consumer(topic, group=group, partitions=partitions, positions=positions)

    def apply_records(self, records: Sequence[BusRecord]) -> ApplyResult:
        """Decode bus records and apply them in one store transaction (synchronous core)."""
        readings: list[Reading] = []
        late: list[bool] = []
        dead: list[DeadLetter] = []
        positions: dict[Position, int] = {}
        wms: dict[Position, int] = {}
        dev_wm: dict[str, int] = {}
        if self._device_wm is None:  # the devices table holds each device's latest event time
            self._device_wm = self.store.device_watermarks()
        known = self._device_wm
        grace = self.settings.grace_ms
        for rec in records:
            pos = (rec.topic, rec.partition)
            if rec.offset <= self._positions.get(pos, -1):
                self.stats.skipped += 1
                continue
            positions[pos] = max(positions.get(pos, -1), rec.offset)
            # A record that does not decode (corrupt, or nested past the decoder's recursion limit) is
            # dead-lettered and its position committed: redelivering it would fail the same way forever.
            if rec.topic == DLQ_TOPIC:
                try:
                    dead.append(decode_dead_letter(rec.value))
                except Exception as exc:
                    self.stats.corrupt += 1
                    dead.append(_corrupt(rec, exc))
                continue
            try:
                # either bus encoding (v1 readings, v2 columns): gateways may be upgraded before or after us
                batch = decode_bus_readings(rec.value)
            except Exception as exc:  # an encoding version this processor does not know is dead-lettered too
                self.stats.corrupt += 1
                dead.append(_corrupt(rec, exc))
                continue
            wm = wms.get(pos) or self._watermarks.get(pos, 0)
            for r in batch:
                readings.append(r)
                ts = r.ts_ms
                dev = r.device_id
                dwm = dev_wm.get(dev) or known.get(dev, 0)
                # late: its device had already passed the window's end by more than the grace
                late.append(ts - ts % _WINDOW_MS + _WINDOW_MS <= dwm - grace)
                if ts > dwm:
                    dev_wm[dev] = ts
                if ts > wm:
                    wm = ts
            wms[pos] = wm
        if self.enricher is not None and readings:
            readings = self.enricher.enrich(readings)
        if not positions:
            return ApplyResult(0, 0, 0, 0)
        res = self.store.apply(
            readings=readings,
            late=late,
            dead_letters=dead,
            positions=positions,
            watermarks=wms,
        )
        self._positions.update(positions)
        self._watermarks.update(wms)
        known.update(dev_wm)
        st = self.stats
        st.batches += 1
        st.stored += res.stored
        st.duplicates += res.duplicates
        st.late += res.late
        st.dead_lettered += res.dead_lettered
        return res

    async def _loop(self, consumer: Consumer, stop: asyncio.Event) -> None:
        """Fetch and apply in a two-stage pipeline: the next batch is fetched while one is applied.

        Fetches are sized in bytes (``fetch_max_bytes``); the fetcher waits while the queue holds more
        than ``_QUEUED_FETCHES`` such fetches, so memory stays bounded under overload and the backlog
        stays in the bus. Batches waiting when the applier is free are applied together, up to
        ``fetch_max_bytes`` (one bigger transaction). Records are applied and acknowledged in fetch order.
        """
        s = self.settings
        queue = _ByteQueue(_QUEUED_FETCHES * s.fetch_max_bytes)
        loop = asyncio.get_running_loop()
        assert self._executor is not None, "run() owns the apply thread"
        executor = self._executor

        async def fetcher() -> None:
            try:
                while not stop.is_set():
                    recs = await consumer.fetch(s.fetch_max, s.fetch_timeout_s, max_bytes=s.fetch_max_bytes)
                    if recs:
                        await queue.put(recs)
            finally:
                await queue.close()

        async def applier() -> None:
            while (recs := await queue.get(s.fetch_max_bytes)) is not None:
                attempt = 0
                applied: list[BusRecord] = []
                while True:
                    try:
                        # fenced: records of a partition a rebalance took away are dropped, not acked
                        applied, _ = await loop.run_in_executor(executor, consumer.apply_fenced, recs,
                                                                self.apply_records)
                        break
                    except Exception as exc:
                        # A full disk or a lost database connection: nothing is acknowledged, the same
                        # batch is applied again once the store takes writes (no crash, no restart loop).
                        if not _retryable(exc) or stop.is_set():
                            raise
                        attempt += 1
                        self.stats.store_retries += 1
                        delay = min(_RETRY_MAX_S, 0.25 * 2**attempt)
                        log.warning("store write failed: %s; nothing acknowledged, retrying the batch in %.1fs "
                                    "(try %d)", exc, delay, attempt)
                        await asyncio.sleep(delay)
                if attempt:
                    log.warning("store write succeeded again after %d tries", attempt + 1)
                await consumer.ack(applied)
                await queue.release(recs)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(fetcher(), name="processor-fetch")
            tg.create_task(applier(), name="processor-apply")

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set; finishes the batch in hand before returning."""
        self._positions = self.store.positions()
        self._watermarks = self.store.watermarks()
        consumers = [await self._consumer(READINGS_TOPIC, self.partitions, self.group)]
        # The DLQ topic has one partition: with static partitions the replica that owns partition 0
        # applies it; in a balanced group (Kafka) it joins its own group, so one member owns it.
        if self.partitions is None:
            consumers.append(await self._consumer(DLQ_TOPIC, None, f"{self.group}-dlq"))
        elif 0 in self.partitions:
            consumers.append(await self._consumer(DLQ_TOPIC, [0], f"{self.group}-dlq"))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fm-apply")
        try:
            async with asyncio.TaskGroup() as tg:
                for c in consumers:
                    tg.create_task(self._loop(c, stop), name=f"processor-{c!r}")
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None
            for c in consumers:
                await c.close()


class _ByteQueue:
    """Fetched batches waiting for the applier, bounded in bytes of record values.

    ``put`` waits while the batches queued *or being applied* hold ``limit`` bytes or more (one batch
    is always let in, however big, so a record larger than the limit still passes); the applier takes
    batches merged up to a byte budget and releases them once acknowledged.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._items: deque[tuple[list[BusRecord], int]] = deque()
        self._held = 0  # bytes queued or being applied
        self._sizes: dict[int, int] = {}  # id(merged batch) -> its bytes, until released
        self._closed = False
        self._cond = asyncio.Condition()

    async def put(self, recs: list[BusRecord]) -> None:
        size = sum(len(r.value) for r in recs)
        async with self._cond:
            await self._cond.wait_for(lambda: self._held == 0 or self._held + size <= self._limit)
            self._items.append((recs, size))
            self._held += size
            self._cond.notify_all()

    async def close(self) -> None:
        """No more batches: ``get`` returns None once the queue is empty."""
        async with self._cond:
            self._closed = True
            self._cond.notify_all()

    async def get(self, max_bytes: int) -> list[BusRecord] | None:
        """The next batch, with the batches queued behind it merged up to ``max_bytes``; None when closed."""
        async with self._cond:
            await self._cond.wait_for(lambda: bool(self._items) or self._closed)
            if not self._items:
                return None
            recs, size = self._items.popleft()
            while self._items and size + self._items[0][1] <= max_bytes:
                more, n = self._items.popleft()
                recs = recs + more
                size += n
            self._sizes[id(recs)] = size
            return recs

    async def release(self, recs: list[BusRecord]) -> None:
        """The batch ``get`` returned is done (acknowledged): its bytes no longer count."""
        async with self._cond:
            self._held -= self._sizes.pop(id(recs))
            self._cond.notify_all()


def _retryable(exc: BaseException) -> bool:
    """Store errors a retry can cure: I/O (ENOSPC), SQLite ``database or disk is full``/locked, a
    PostgreSQL ``OperationalError`` (disk full, connection lost). Matched by name so this stage does
    not import the drivers."""
    if isinstance(exc, (OSError, BackendUnavailable)):
        return True
    return any(c.__name__ == "OperationalError" for c in type(exc).__mro__)


def _corrupt(rec: BusRecord, exc: Exception) -> DeadLetter:
    return DeadLetter(
        reason="too_deep" if isinstance(exc, RecursionError) else "schema_violation",
        detail=f"corrupt bus record {rec.topic}[{rec.partition}]@{rec.offset}: {type(exc).__name__}: {exc}"[:300],
        topic=f"{rec.topic}.{rec.partition}",
        received_ms=int(time.time() * 1000),
        payload=rec.value[:65536],
    )
