"""Keep an in-memory as-of state (e.g. :class:`~fieldmesh.stream.enrich.AsOfEnricher`) fed from CDC topics.

The state lives in memory, so every start reads the topics from their beginning: :meth:`CdcFollower.catch_up`
returns once everything that was in the topics when it was called has been applied. Call it *before*
the processor starts enriching, otherwise the first readings would be enriched from a partial state.
Then :meth:`CdcFollower.run` keeps applying new change events until stopped.

Works with fieldmesh's CDC topics and with topics written by a real Debezium (same envelope).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Iterable, Sequence
from typing import Protocol

from fieldmesh.bus.base import Bus, BusRecord, Consumer

__all__ = ["CdcFollower", "ChangeApplier"]

log = logging.getLogger(__name__)


class ChangeApplier(Protocol):
    """What the follower feeds: ``AsOfEnricher`` implements it."""

    def apply_change_events(self, records: Iterable[BusRecord]) -> int: ...


class CdcFollower:
    """Applies the change events of ``topics`` to ``state``, from the beginning of each topic."""

    def __init__(
        self,
        bus: Bus,
        state: ChangeApplier,
        topics: Sequence[str],
        *,
        fetch: int = 2000,
        group: str | None = None,
    ) -> None:
        self.bus = bus
        self.state = state
        self.topics = list(topics)
        self.fetch = fetch
        # A fresh consumer per process: the state is rebuilt from the start, never resumed.
        self.group = group or f"fm-asof-{uuid.uuid4().hex[:12]}"
        self._consumers: dict[str, Consumer] = {}
        self.applied = 0

    async def _consumer(self, topic: str) -> Consumer:
        c = self._consumers.get(topic)
        if c is None:
            c = self._consumers[topic] = await self.bus.consumer(topic, group=self.group)
        return c

    async def poll(self, timeout_s: float = 0.2) -> int:
        """Fetch and apply what is available on every topic; return how many events were applied."""
        n = 0
        for topic in self.topics:
            c = await self._consumer(topic)
            recs = await c.fetch(self.fetch, timeout_s)
            if recs:
                n += self.state.apply_change_events(recs)
                await c.ack(recs)
        self.applied += n
        return n

    async def catch_up(self, *, timeout_s: float = 300.0) -> int:
        """Apply everything the topics hold now; return how many events were applied.

        Raises:
            TimeoutError: the topics could not be read within ``timeout_s``.
        """
        async with asyncio.timeout(timeout_s):
            for topic in self.topics:
                await self._consumer(topic)
            start = self.applied
            while True:
                await self.poll(0.2)
                lag = [await self.bus.pending(t, group=self.group) for t in self.topics]
                if not any(lag):
                    break
        log.info("as-of state caught up: %d change events from %s", self.applied - start, self.topics)
        return self.applied - start

    async def run(self, stop: asyncio.Event, *, idle_s: float = 1.0) -> None:
        """Keep applying new change events until ``stop`` is set."""
        while not stop.is_set():
            if not await self.poll(idle_s / max(1, len(self.topics))):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.05)

    async def close(self) -> None:
        """Close the consumers and delete this follower's consumer state on the bus."""
        for topic, c in self._consumers.items():
            with contextlib.suppress(Exception):
                await c.close()
            with contextlib.suppress(Exception):
                await self.bus.drop_consumer(topic, group=self.group)
        self._consumers.clear()
