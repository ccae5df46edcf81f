"""The gateway: raw device messages -> decode -> validate -> bus (keyed by device) or DLQ."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence

from fieldmesh.bus.base import OutRecord, Producer
from fieldmesh.core.codec import decode_telemetry, encode_bus_batch, encode_dead_letter, encoding_for
from fieldmesh.core.errors import FieldmeshError
from fieldmesh.core.model import BusBatch, DeadLetter, Reading
from fieldmesh.core.settings import GatewaySettings
from fieldmesh.core.topics import DLQ_TOPIC, READINGS_TOPIC, device_of_topic, partition_for
from fieldmesh.gateway.base import IngestMessage, IngestSource

__all__ = ["Gateway", "GatewayStats", "route"]

log = logging.getLogger(__name__)
#: Readings per bus message at most (keeps bus messages well under NATS's max payload).
MAX_READINGS_PER_RECORD = 2000


class GatewayStats:
    """In-process counters of one gateway."""

    def __init__(self) -> None:
        self.messages = 0
        self.readings = 0
        self.rejected: dict[str, int] = {}


_ROUTES: dict[tuple[str, int], tuple[str | None, str | None, int]] = {}
_ROUTES_MAX = 200_000


def _route_of(topic: str, partitions: int) -> tuple[str | None, str | None, int]:
    """(device id, topic suffix, partition) of a topic, cached: topics repeat, one per device."""
    device = device_of_topic(topic)
    parts = topic.split("/")
    r = (device, parts[3] if len(parts) > 3 else None, partition_for(device, partitions) if device else 0)
    if len(_ROUTES) >= _ROUTES_MAX:
        _ROUTES.clear()
    _ROUTES[(topic, partitions)] = r
    return r


def route(
    messages: Sequence[IngestMessage], *, settings: GatewaySettings, partitions: int, now_ms: int
) -> tuple[list[OutRecord], int, list[DeadLetter]]:
    """Turn raw messages into bus records: readings batched per partition, dead letters one each.

    Returns the records, the number of valid readings, and the dead letters.
    """
    by_part: dict[int, list[Reading]] = {}
    dead: list[DeadLetter] = []
    dead_ids: list[str | None] = []
    n = 0
    for m in messages:
        route_of = _ROUTES.get((m.topic, partitions))
        if route_of is None:
            route_of = _route_of(m.topic, partitions)
        device, suffix, part = route_of
        if device is None:
            d = DeadLetter(reason="schema_violation", detail=f"not a telemetry topic: {m.topic[:200]!r}",
                           topic=m.topic, received_ms=m.received_ms, payload=m.payload[:65536])
            dead.append(d)
            dead_ids.append(f"{m.source_id}-0" if m.source_id else None)
            continue
        enc = encoding_for(m.content_type, suffix)
        res = decode_telemetry(
            m.payload, device_id=device, topic=m.topic, received_ms=m.received_ms, now_ms=now_ms,
            max_skew_ms=settings.max_skew_ms, max_bytes=settings.max_payload_bytes, encoding=enc,
        )
        if res.readings:
            by_part.setdefault(part, []).extend(res.readings)
            n += len(res.readings)
        for i, d in enumerate(res.rejects):
            dead.append(d)
            dead_ids.append(f"{m.source_id}-{i}" if m.source_id else None)
    ids = [m.source_id for m in messages]
    span = f"{ids[0]}:{ids[-1]}" if ids and all(ids) else None
    produced = now_ms
    records: list[OutRecord] = []
    for p, rs in by_part.items():
        for k, s in enumerate(range(0, len(rs), MAX_READINGS_PER_RECORD)):
            chunk = rs[s : s + MAX_READINGS_PER_RECORD]
            records.append(
                OutRecord(
                    topic=READINGS_TOPIC,
                    partition=p,
                    value=encode_bus_batch(BusBatch(readings=chunk, produced_ms=produced)),
                    msg_id=f"r{span}-{p}-{k}" if span else None,
                )
            )
    for d, did in zip(dead, dead_ids, strict=True):
        records.append(OutRecord(topic=DLQ_TOPIC, partition=0, value=encode_dead_letter(d),
                                 msg_id=f"d{did}" if did else None))
    return records, n, dead


class Gateway:
    """Moves device messages from a source to the bus, with validation and a DLQ.

    Acknowledgement order: the source message is acknowledged only after the bus acknowledged
    every record derived from it.
    """

    def __init__(
        self, *, source: IngestSource, producer: Producer, settings: GatewaySettings, partitions: int
    ) -> None:
        self.source = source
        self.producer = producer
        self.settings = settings
        self.partitions = partitions
        self.stats = GatewayStats()

    async def _fetch_routed(
        self,
    ) -> tuple[list[IngestMessage], list[OutRecord], int, list[DeadLetter]] | None:
        msgs = await self.source.fetch(self.settings.batch_max_messages, self.settings.linger_ms / 1000 or 0.001)
        if not msgs:
            return None
        records, n, dead = route(msgs, settings=self.settings, partitions=self.partitions,
                                 now_ms=int(time.time() * 1000))
        return msgs, records, n, dead

    async def _deliver(
        self,
        msgs: list[IngestMessage],
        records: list[OutRecord],
        n: int,
        dead: list[DeadLetter],
        stop: asyncio.Event | None,
    ) -> None:
        """Send to the bus (retrying with capped, jittered backoff), then acknowledge the source.

        If ``stop`` is set while sends still fail, the messages stay unacknowledged for the source
        to redeliver.
        """
        delay = 0.1
        while True:
            try:
                await self.producer.send(records)
                break
            except FieldmeshError as exc:
                if stop is not None and stop.is_set():
                    raise
                log.warning("bus send failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
        await self.source.ack(msgs)
        self.stats.messages += len(msgs)
        self.stats.readings += n
        for d in dead:
            self.stats.rejected[d.reason] = self.stats.rejected.get(d.reason, 0) + 1

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set: decoding the next batch overlaps with sending the last one."""
        queue: asyncio.Queue[tuple[list[IngestMessage], list[OutRecord], int, list[DeadLetter]] | None]
        queue = asyncio.Queue(maxsize=2)

        async def reader() -> None:
            try:
                while not stop.is_set():
                    try:
                        got = await self._fetch_routed()
                    except FieldmeshError as exc:
                        log.warning("gateway fetch failed: %s", exc)
                        await asyncio.sleep(0.5)
                        continue
                    if got is not None:
                        await queue.put(got)
            finally:
                await queue.put(None)

        async def writer() -> None:
            while (item := await queue.get()) is not None:
                await self._deliver(*item, stop)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(reader(), name="gateway-read")
            tg.create_task(writer(), name="gateway-write")
