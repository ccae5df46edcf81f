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

The stream engine (``settings.engine``: :mod:`fieldmesh.stream.columnar` or the per-reading
:mod:`fieldmesh.stream.reference`) decodes a batch outside the transaction and decides it inside the hot
store's (:meth:`~fieldmesh.store.base.HotStore.commit`), claiming identity keys there. The committed
:class:`~fieldmesh.core.batch.BatchResult` then goes to each extra sink (``sinks``), and the records are
acknowledged only once every sink has it. A sink that fell behind (a failed write, a restart) first
catches up: the records it lacks, up to the hot store's positions, are decided again against the hot
store's claims in a transaction rolled back at once; a key answers as it did for the same record
(its origin), so the sink receives the readings, windows and devices the hot store stored. Only
``late`` may differ there: lateness is judged from the device watermarks of now, not of then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Final, Protocol

import numpy as np
from numpy.typing import NDArray

from fieldmesh.bus.base import Bus, BusRecord, Consumer
from fieldmesh.core import heap
from fieldmesh.core.aio import unless_stopped
from fieldmesh.core.batch import BatchResult, ReadingColumns
from fieldmesh.core.errors import BackendUnavailable, FieldmeshError
from fieldmesh.core.model import Reading
from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.core.topics import DLQ_TOPIC, READINGS_TOPIC
from fieldmesh.obs import tracing
from fieldmesh.obs.metrics import (
    EVENT_TO_STORED,
    PROCESSOR_APPLY_SECONDS,
    PROCESSOR_BATCH_READINGS,
    PROCESSOR_BATCHES,
    PROCESSOR_CPU_SECONDS,
    PROCESSOR_READINGS,
    PROCESSOR_STORE_RETRIES,
    RECEIVED_TO_STORED,
    SINK_COMMIT_SECONDS,
    count_parts,
    observe_many,
)
from fieldmesh.store.base import INTERVALS, ApplyResult, HotStore, HotTxn, Position, Sink, SqlTxn, T
from fieldmesh.stream.alerting import AlertEngine
from fieldmesh.stream.base import DecodedBatch, EnrichFn, StreamEngine, StreamState
from fieldmesh.stream.canary import Routed
from fieldmesh.stream.engines import ENGINES
from fieldmesh.stream.products import ProductEngine

__all__ = ["Enricher", "Processor", "ProcessorStats"]

log = logging.getLogger(__name__)

_RETRY_MAX_S = 5.0  # cap of the backoff between tries of a batch the store refused
#: Fetched-but-unapplied bus records are held up to this many ``fetch_max_bytes`` per consumer; beyond
#: it the fetcher waits, so that under overload the backlog stays in the bus, not in this process.
_QUEUED_FETCHES = 2
#: How long a free applier waits for the fetch it asked for (a caught-up fetcher's top-up) before it applies
#: what is queued without it: about a round trip to a local bus.
_TOP_UP_S = 0.002
#: After records came, how long the bus has nothing before the hot store writes what it deferred (the rollup rows
#: of the last batches): SQL over the rollup tables then lags the readings by about this once a stream stops.
_QUIET_S = 0.05


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
        sinks: Sequence[Sink] = (),
        alerts: AlertEngine | None = None,
        alert_tick_s: float = 1.0,
        products: ProductEngine | None = None,
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
        self.sinks = list(sinks)
        # alert rules evaluated in each batch's transaction (stream/alerting.py); absence every alert_tick_s
        self.alerts = alerts
        self.alert_tick_s = alert_tick_s
        # data-product quality counters, added in each batch's transaction (stream/products.py)
        self.products = products
        self.engine: StreamEngine = ENGINES[settings.engine]
        self._enrich: EnrichFn | None = _enrich_fn(enricher) if enricher is not None else None
        self._sink_applied: list[dict[Position, int] | None] = [None] * len(self.sinks)  # loaded on first use
        self.stats = ProcessorStats()
        #: Called once :meth:`run` starts fetching (its consumers made): the worker says "processor running" then.
        self.on_running: Callable[[], None] | None = None
        self._positions: dict[Position, int] = {}
        self._watermarks: dict[Position, int] = {}
        self._device_wm: dict[str, int] | None = None  # per-device event-time watermarks (lateness)
        # One thread applies every batch, of every consumer, in turn: the store has one writer, and a
        # single thread keeps the batches' garbage in one malloc arena (pool threads each grow their own).
        self._executor: ThreadPoolExecutor | None = None
        # Freed heap goes back to the system (core/heap.py): large blocks at once, the rest after a batch at
        # most once a second; without it RSS grows with the largest batches and merges ever seen.
        heap.configure()
        self._trimmer = heap.Trimmer(1.0)

    def in_apply_thread(self, fn: Callable[[SqlTxn], T]) -> T:
        """``store.transact(fn)`` queued on the apply thread while the processor runs (in turn with the
        batches: no contention for the writer), directly otherwise. For the notifier."""
        executor = self._executor
        if executor is None:
            return self.store.transact(fn)
        return executor.submit(self.store.transact, fn).result()

    def submit_in_apply_thread(self, fn: Callable[[SqlTxn], T]) -> Future[T]:
        """:meth:`in_apply_thread` without waiting: the transaction's future."""
        executor = self._executor
        if executor is None:
            done: Future[T] = Future()
            try:
                done.set_result(self.store.transact(fn))
            except Exception as exc:
                done.set_exception(exc)
            return done
        return executor.submit(self.store.transact, fn)

    async def _consumer(self, topic: str, partitions: Sequence[int] | None, group: str) -> Consumer:
        def positions(parts: list[int]) -> dict[int, int]:
            # Read from the store: it is the truth, also for partitions another replica applied. A sink
            # behind it resumes the bus earlier (a partition it never applied: -1, from the start).
            stored = self.store.positions()
            self._positions.update(stored)
            out = {p: o for (t, p), o in stored.items() if t == topic and p in parts}
            for sink in self.sinks:
                mine = sink.applied()
                out = {p: min(o, mine.get((topic, p), -1)) for p, o in out.items()}
            return out

        return await self.bus.consumer(topic, group=group, partitions=partitions, positions=positions)

    def apply_records(self, records: Sequence[BusRecord]) -> ApplyResult:
        """Decode bus records, decide and commit them in one hot-store transaction, then write the
        result to each extra sink (synchronous core; see the module docstring).

        While tracing is on, all of it runs in a ``processor.apply`` span: a child of the first trace
        context in the records' headers, linked to the others; the hot-store commit, the alert rules and
        each sink's write are its children."""
        if tracing.enabled():
            parents = (tracing.context_of(r.headers.get("traceparent"), r.headers.get("tracestate"))
                       for r in records if r.headers)
            with tracing.batch_span("fieldmesh.stream", "processor.apply", parents,
                                    {"fieldmesh.records": len(records)}) as s:
                applied = self._apply_records(records)
                s.set_attribute("fieldmesh.stored", applied.stored)
                s.set_attribute("fieldmesh.duplicates", applied.duplicates)
                return applied
        return self._apply_records(records)

    def _apply_records(self, records: Sequence[BusRecord]) -> ApplyResult:
        t_apply = time.perf_counter()
        cpu0 = time.thread_time()
        cpu = dict.fromkeys(_CPU_PARTS, 0.0)  # CPU seconds of this thread by part (PROCESSOR_CPU_SECONDS)
        if self._device_wm is None:  # each device's latest event time stored: lateness resumes there
            self._device_wm = self.store.device_watermarks()
        state = StreamState(positions=self._positions, watermarks=self._watermarks,
                            device_watermarks=self._device_wm)
        c = time.thread_time()
        batch = self.engine.decode(records, state)
        cpu["decode"] = time.thread_time() - c
        self.stats.skipped += batch.skipped
        result: BatchResult | None = None
        before = dict(self._positions)
        if batch.positions:
            alerted: list[Any] = []
            alert_s = [0.0]
            touched: list[int] = []

            def build(txn: HotTxn) -> BatchResult:
                c = time.thread_time()
                routed = self._route(batch, state, txn)  # active canaries' readings apart (stream/canary.py)
                decided = routed.result
                cpu["decide"] += (c1 := time.thread_time()) - c
                if self.alerts is not None:  # alert transitions commit with the batch (or not at all)
                    t = time.perf_counter()
                    if traced:
                        with tracing.span("fieldmesh.stream", "alerts.evaluate"):
                            alerted[:] = [self.alerts.in_txn(txn, routed.every_new(), state.device_watermarks)]
                    else:
                        alerted[:] = [self.alerts.in_txn(txn, routed.every_new(), state.device_watermarks)]
                    alert_s[0] = time.perf_counter() - t
                    cpu["alerts"] += (c2 := time.thread_time()) - c1
                    c1 = c2
                if self.products is not None:  # so do the products' quality counters
                    touched[:] = [self.products.in_txn(txn, routed)]
                    cpu["products"] += time.thread_time() - c1
                return decided

            traced = tracing.enabled()
            t_commit = time.perf_counter()
            c_commit = time.thread_time()
            if traced:
                with tracing.span("fieldmesh.store", "store.hot.commit",
                                  {"db.system": self.store.url.split(":", 1)[0],
                                   "fieldmesh.readings": len(batch.cols.ts_ms)}) as s:
                    result = self.store.commit(build, ts_ms=batch.cols.ts_ms)
                    s.set_attribute("fieldmesh.stored", len(result.new))
            else:
                result = self.store.commit(build, ts_ms=batch.cols.ts_ms)
            # the store's own work: the commit's CPU less what build did in it
            cpu["store"] = max(0.0, time.thread_time() - c_commit - cpu["decide"] - cpu["alerts"] - cpu["products"])
            _count_commit(result, len(batch.cols), time.perf_counter() - t_commit,
                          alert_s[0] if self.alerts is not None else None)
            if self.alerts is not None and alerted:
                self.alerts.committed(alerted[0])
            if self.products is not None and touched:
                self.products.committed(touched[0])
            self._positions.update(result.positions)
            self._watermarks.update(result.watermarks)
            self._device_wm.update(result.device_watermarks)
            st = self.stats
            st.batches += 1
            st.stored += len(result.new)
            st.duplicates += result.counts.get("duplicates", 0)
            st.late += result.counts.get("late", 0)
            st.dead_lettered += len(result.dead_letters)
            st.corrupt += result.corrupt
        if self.sinks:
            c = time.thread_time()
            for i, sink in enumerate(self.sinks):
                if tracing.enabled():
                    with tracing.span("fieldmesh.store", f"sink.{sink.name}.write"):
                        self._fan_out(i, sink, records, before, result)
                else:
                    self._fan_out(i, sink, records, before, result)
            cpu["sinks"] = time.thread_time() - c
        PROCESSOR_APPLY_SECONDS.observe(time.perf_counter() - t_apply)
        self._trimmer.maybe_trim()
        cpu["other"] = max(0.0, time.thread_time() - cpu0 - sum(cpu.values()))
        count_parts(_CPU_COUNTERS, cpu)
        if result is None:
            return ApplyResult(0, 0, 0, 0)
        return ApplyResult(stored=len(result.new), duplicates=result.counts.get("duplicates", 0),
                           late=result.counts.get("late", 0), dead_lettered=len(result.dead_letters))

    def _decide(self, batch: DecodedBatch, state: StreamState, txn: HotTxn) -> BatchResult:
        return self.engine.decide(batch, state, txn.claim_keys, grace_ms=self.settings.grace_ms,
                                  intervals=INTERVALS, enrich=self._enrich)

    def _route(self, batch: DecodedBatch, state: StreamState, txn: HotTxn) -> Routed:
        if self.products is None:
            return Routed(self._decide(batch, state, txn), batch.cols)
        return self.products.route(batch, state, txn, self._decide)

    def _fan_out(self, i: int, sink: Sink, records: Sequence[BusRecord], before: dict[Position, int],
                 result: BatchResult | None) -> None:
        """Bring sink ``i`` up to the hot store: the records it lacks up to ``before`` (the hot store's
        positions before this batch) decided again, then this batch's ``result``."""
        applied = self._sink_applied[i]
        if applied is None:
            applied = self._sink_applied[i] = sink.applied()
        lacking = [r for r in records
                   if applied.get((r.topic, r.partition), -1) < r.offset <= before.get((r.topic, r.partition), -1)]
        if lacking:
            redone = self._redecide(lacking, applied)
            if redone is not None:
                with SINK_COMMIT_SECONDS.labels(sink.name).time():
                    sink.write(redone)
                applied.update(redone.positions)
                log.info("sink %s caught up %d records (to %s)", sink.name, len(lacking), dict(redone.positions))
        if result is None:
            return
        behind = {p: (applied.get(p, -1), before[p])
                  for p in result.positions if applied.get(p, -1) < before.get(p, -1)}
        if behind:  # records the sink lacks were acknowledged without it: writing on would hide the hole
            raise FieldmeshError(
                f"sink {sink.name} lacks records the hot store has and the bus did not deliver again "
                f"(position: (sink, hot) {behind}); rebuild the sink or replay the bus from its positions")
        if any(o > applied.get(p, -1) for p, o in result.positions.items()):
            with SINK_COMMIT_SECONDS.labels(sink.name).time():
                sink.write(result)
            applied.update(result.positions)

    def _redecide(self, records: Sequence[BusRecord], applied: dict[Position, int]) -> BatchResult | None:
        """Decide committed records again, against the hot store's claims, committing nothing."""
        state = StreamState(positions=applied, watermarks=self._watermarks, device_watermarks=self._device_wm or {})
        batch = self.engine.decode(records, state)
        if not batch.positions:
            return None

        def build(txn: HotTxn) -> BatchResult:
            raise _Decided(self._route(batch, state, txn).result)

        try:
            self.store.commit(build, ts_ms=batch.cols.ts_ms)
        except _Decided as d:
            return d.result
        raise AssertionError("unreachable: build always raises")

    async def _loop(self, consumer: Consumer, stop: asyncio.Event, *, readings: bool = True) -> None:
        """Fetch and apply in a two-stage pipeline: the next batch is fetched while one is applied.

        Fetches are sized in bytes (``fetch_max_bytes``); the fetcher waits while the queue holds more
        than ``_QUEUED_FETCHES`` such fetches, so memory stays bounded under overload and the backlog
        stays in the bus. Batches waiting when the applier is free are applied together, up to
        ``fetch_max_bytes`` (one bigger transaction). Records are applied and acknowledged in fetch order;
        a batch's acknowledgement (a round trip to the bus) goes out while the next batch is applied.

        The fetch adapts to the backlog. Behind (:meth:`~fieldmesh.bus.base.Consumer.behind`: more records
        were waiting), the fetcher fetches again at once: the next batch is ready when the applier is. Caught
        up (nothing was waiting, or nothing came), it fetches again when the applier is free
        (:meth:`_ByteQueue.park`), so each batch is what arrived during the one before, taken in one fetch,
        instead of many small fetches that cost the applier CPU (the event loop shares the process): at part
        load the batches stay small and their cycle short. A bus that cannot tell (``behind()`` None) is
        fetched as records come.
        """
        s = self.settings
        queue = _ByteQueue(_QUEUED_FETCHES * s.fetch_max_bytes, min_interval_s=s.min_batch_interval_ms / 1000,
                           max_records=s.fetch_max)
        loop = asyncio.get_running_loop()
        assert self._executor is not None, "run() owns the apply thread"
        executor = self._executor

        async def fetcher() -> None:
            deferred = False  # records came since the store last wrote what it deferred
            try:
                while not stop.is_set():
                    # Records came: a short wait first, so that the store writes what it deferred soon after they
                    # stop. Then the long one (fetch_timeout_s): an idle processor asks the bus seldom.
                    wait = min(s.fetch_timeout_s, _QUIET_S) if deferred else s.fetch_timeout_s
                    # a stop ends the wait at once: records fetched meanwhile are not acknowledged, so they come again
                    fetched, got = await unless_stopped(consumer.fetch(s.fetch_max, wait, max_bytes=s.fetch_max_bytes),
                                                        stop)
                    if not fetched:
                        break
                    recs = got or []
                    if recs:
                        deferred = readings
                    elif deferred:  # nothing came: the store writes what it deferred (in the apply thread)
                        deferred = not await loop.run_in_executor(executor, self._idle)
                    await queue.put(recs)
                    if not recs or consumer.behind() is False:  # caught up with the bus
                        await queue.park()
            finally:
                await queue.close()

        # Acknowledgements go out in order on a task of their own: the next batch is applied meanwhile (an
        # ack waits for the bus's answer; the records are committed already, a crash redelivers and skips them).
        acks: asyncio.Queue[tuple[list[BusRecord], list[BusRecord]] | None] = asyncio.Queue()

        async def acker() -> None:
            while (item := await acks.get()) is not None:
                applied, recs = item
                await consumer.ack(applied)
                await queue.release(recs)

        async def applier() -> None:
            try:
                await apply_all()
            finally:
                acks.put_nowait(None)  # the acker acknowledges what was applied, then ends

        async def apply_all() -> None:
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
                        PROCESSOR_STORE_RETRIES.inc()
                        delay = min(_RETRY_MAX_S, 0.25 * 2**attempt)
                        log.warning("store write failed: %s; nothing acknowledged, retrying the batch in %.1fs "
                                    "(try %d)", exc, delay, attempt)
                        await asyncio.sleep(delay)
                if attempt:
                    log.warning("store write succeeded again after %d tries", attempt + 1)
                acks.put_nowait((applied, recs))

        async with asyncio.TaskGroup() as tg:
            tg.create_task(fetcher(), name="processor-fetch")
            tg.create_task(applier(), name="processor-apply")
            tg.create_task(acker(), name="processor-ack")

    def _idle(self) -> bool:
        """The bus had nothing: the hot store writes what it deferred (:meth:`~fieldmesh.store.base.HotStore.flush`);
        True when it did. A store outage is left to the next batch, which meets it and retries, or the next quiet
        moment."""
        c0 = time.thread_time()
        try:
            self.store.flush()
            return True
        except Exception as exc:
            if not _retryable(exc):
                raise
            log.warning("idle flush of the hot store failed: %s; the next batch or idle moment tries again", exc)
            return False
        finally:
            _CPU_COUNTERS["store"].inc(time.thread_time() - c0)

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
        if self.on_running is not None:  # consumers made, sinks' positions read: records are fetched from now
            self.on_running()
        try:
            async with asyncio.TaskGroup() as tg:
                for i, c in enumerate(consumers):  # (the first: the readings; then the dead letters')
                    tg.create_task(self._loop(c, stop, readings=i == 0), name=f"processor-{c!r}")
                if self.alerts is not None:
                    tg.create_task(self._alert_ticks(stop), name="processor-alert-ticks")
        finally:
            self._executor.shutdown(wait=True)
            self._executor = None
            for c in consumers:
                await c.close()


    async def _alert_ticks(self, stop: asyncio.Event) -> None:
        """Absence and rule changes on the wall clock, between batches (the apply thread serialises them)."""
        assert self.alerts is not None and self._executor is not None
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                await loop.run_in_executor(self._executor, self.alerts.tick)
            except Exception as exc:  # a store outage: the next tick tries again
                if not _retryable(exc):
                    raise
                log.warning("alert tick failed: %s; trying again", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.alert_tick_s)


class _ByteQueue:
    """Fetched batches waiting for the applier, bounded in bytes of record values.

    ``put`` waits while the batches queued *or being applied* hold ``limit`` bytes or more (one batch
    is always let in, however big, so a record larger than the limit still passes); the applier takes
    batches merged up to a byte budget and releases them once acknowledged.

    A fetcher that caught up with the bus waits (``park``) until the applier is free (``get``): the applier then
    waits up to ``top_up_s`` for that fetch, so its batch holds what arrived while it applied the last one.
    Caught up after a small batch (under half of ``max_records`` and of the ``max_bytes`` it was taken with), the
    next starts no sooner than ``min_interval_s`` after it began (the processor's ``min_batch_interval_ms``): a
    batch's fixed cost (its transaction, the bus round trips) is then paid at most that often, not once for every
    few records that came, and the batch holds what arrived meanwhile. After a large batch there is no wait: its
    fixed cost is spread already, and a processor that is behind overall but catches up with each fetch (a
    backlog growing as fast as it is applied) would otherwise idle between batches and fall further behind.
    """

    def __init__(self, limit: int, top_up_s: float = _TOP_UP_S, min_interval_s: float = 0.0,
                 max_records: int | None = None) -> None:
        self._limit = limit
        self._max_records = max_records
        self._last_small = False  # the last batch taken was under half of both bounds
        self._top_up_s = top_up_s
        self._min_interval_s = min_interval_s
        self._last_get = -1e18  # monotonic time the applier last took a batch
        self._parked = False  # the fetcher waits for the applier to ask
        self._getting = False  # the applier waits in get() for a batch
        self._asked = 0  # fetches the applier asked for (unparked the fetcher)
        self._landed = 0  # fetches put (empty ones too)
        self._items: deque[tuple[list[BusRecord], int]] = deque()
        self._held = 0  # bytes queued or being applied
        self._sizes: dict[int, int] = {}  # id(merged batch) -> its bytes, until released
        self._closed = False
        self._cond = asyncio.Condition()

    async def put(self, recs: list[BusRecord]) -> None:
        """Queue a fetch; an empty one only tells a waiting applier its top-up landed."""
        size = sum(len(r.value) for r in recs)
        async with self._cond:
            if recs:
                await self._cond.wait_for(lambda: self._held == 0 or self._held + size <= self._limit)
                self._items.append((recs, size))
                self._held += size
            self._landed += 1
            self._cond.notify_all()

    async def park(self) -> None:
        """The fetcher caught up: wait until the applier is free (at once if it waits already) or closed."""
        async with self._cond:
            if self._getting or self._closed:
                return
            self._parked = True
            await self._cond.wait_for(lambda: not self._parked or self._closed)

    async def close(self) -> None:
        """No more batches: ``get`` returns None once the queue is empty."""
        async with self._cond:
            self._closed = True
            self._parked = False
            self._cond.notify_all()

    async def get(self, max_bytes: int) -> list[BusRecord] | None:
        """The next batch, with the batches queued behind it merged up to ``max_bytes``; None when closed."""
        async with self._cond:
            wait = self._last_get + self._min_interval_s - time.monotonic()
            if wait > 0 and self._last_small and (self._parked or not self._items) and not self._closed:
                # Caught up (the fetcher parked, or waits on the bus with nothing queued), and the last batch
                # began less than min_interval_s ago: let more arrive first. Behind, the fetcher fetches again
                # at once and its fetches queue up: no wait then.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._cond.wait_for(lambda: self._closed), wait)
            if self._parked:  # fetch what arrived meanwhile, and wait a round trip for it
                self._parked = False
                self._asked = self._landed + 1
                self._cond.notify_all()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._cond.wait_for(lambda: self._landed >= self._asked or self._closed),
                                           self._top_up_s)
            self._getting = True
            try:
                await self._cond.wait_for(lambda: bool(self._items) or self._closed)
            finally:
                self._getting = False
            if not self._items:
                return None
            self._last_get = time.monotonic()
            recs, size = self._items.popleft()
            while self._items and size + self._items[0][1] <= max_bytes:
                more, n = self._items.popleft()
                recs = recs + more
                size += n
            self._sizes[id(recs)] = size
            self._last_small = 2 * size < max_bytes and (self._max_records is None or 2 * len(recs) < self._max_records)
            return recs

    async def release(self, recs: list[BusRecord]) -> None:
        """The batch ``get`` returned is done (acknowledged): its bytes no longer count."""
        async with self._cond:
            self._held -= self._sizes.pop(id(recs))
            self._cond.notify_all()


class _Decided(Exception):
    """Ends a hot-store transaction whose decision is wanted but whose writes are not."""

    def __init__(self, result: BatchResult) -> None:
        super().__init__("decided")
        self.result = result


#: The parts of a batch whose CPU the apply thread counts (``fieldmesh_processor_cpu_seconds{part}``).
_CPU_PARTS: Final = ("decode", "decide", "alerts", "products", "store", "sinks", "other")
_CPU_COUNTERS: Final = {part: PROCESSOR_CPU_SECONDS.labels(part) for part in _CPU_PARTS}

def _count_commit(result: BatchResult, decoded: int, commit_s: float, alert_s: float | None) -> None:
    """The stage metrics of one committed batch (docs/observability.md): sizes, outcomes, commit times and
    each new reading's latency from its event time and from the gateway's receipt to this commit."""
    PROCESSOR_BATCHES.inc()
    PROCESSOR_BATCH_READINGS.observe(decoded)
    SINK_COMMIT_SECONDS.labels("hot").observe(commit_s)
    if alert_s is not None:
        SINK_COMMIT_SECONDS.labels("alerts").observe(alert_s)
    counts = result.counts
    for outcome, n in (("stored", len(result.new)), ("duplicate", counts.get("duplicates", 0)),
                       ("late", counts.get("late", 0)), ("dead_lettered", len(result.dead_letters))):
        if n:
            PROCESSOR_READINGS.labels(outcome).inc(n)
    if len(result.new):
        now_ms = time.time() * 1000
        observe_many(EVENT_TO_STORED, (now_ms - result.new.ts_ms) / 1000)
        observe_many(RECEIVED_TO_STORED, (now_ms - result.new.received_ms) / 1000)


def _enrich_fn(enricher: Enricher) -> EnrichFn:
    """The stream contract's enrichment (per row: the fields joined, or None) from an :class:`Enricher`."""

    def enrich(cols: ReadingColumns) -> NDArray[np.object_]:
        out = np.empty(len(cols), dtype=object)
        out[:] = [r.enrichment for r in enricher.enrich(cols.to_readings())]
        return out

    return enrich


def _retryable(exc: BaseException) -> bool:
    """Store errors a retry can cure: I/O (ENOSPC), SQLite ``database or disk is full``/locked, a
    PostgreSQL ``OperationalError`` (disk full, connection lost). Matched by name so this stage does
    not import the drivers."""
    if isinstance(exc, (OSError, BackendUnavailable)):
        return True
    return any(c.__name__ == "OperationalError" for c in type(exc).__mro__)
