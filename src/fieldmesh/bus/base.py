"""The bus contract: partitioned, durable topics with explicit acknowledgement.

A topic has N partitions. Producers send records to ``(topic, partition)`` and return only once the
bus has acknowledged every one of them. Consumers fetch records with their position
``(topic, partition, offset)``; offsets grow within a partition. Processors store the positions they
applied in their own store transaction and skip records at or below them on redelivery, so the
bus's own acknowledgement is only a hint for where to resume.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

__all__ = ["Bus", "BusRecord", "Consumer", "OutRecord", "PositionsFn", "Producer", "TopicSpec"]

PositionsFn = Callable[[list[int]], dict[int, int]]
"""partitions -> {partition: last applied offset}; partitions never applied are absent."""


@dataclass(frozen=True, slots=True)
class OutRecord:
    """A record to send: ``msg_id`` lets the bus drop a re-send of the same record."""

    topic: str
    partition: int
    value: bytes
    key: bytes | None = None
    msg_id: str | None = None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class BusRecord:
    """A record fetched from the bus, with its position and the adapter's ack handle."""

    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timestamp_ms: int = 0
    handle: Any = None


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """How a topic is created: partitions, retention and de-duplication window."""

    name: str
    partitions: int
    retention_s: int = 7 * 86400
    dedupe_window_s: int = 600
    max_bytes: int = -1


class Producer(Protocol):
    """Sends records; ``send`` returns when the bus acknowledged all of them."""

    async def send(self, records: Sequence[OutRecord]) -> None: ...


class Consumer(Protocol):
    """Fetches records of the partitions it was given, in offset order per partition."""

    async def fetch(self, max_records: int, timeout_s: float) -> list[BusRecord]: ...

    async def ack(self, records: Sequence[BusRecord]) -> None: ...

    async def close(self) -> None: ...


class Bus(Protocol):
    """A connection to a bus: creates topics, producers and consumers."""

    url: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def ensure_topic(self, spec: TopicSpec) -> None: ...

    def producer(self) -> Producer: ...

    async def consumer(
        self,
        topic: str,
        *,
        group: str,
        partitions: Sequence[int] | None = None,
        positions: PositionsFn | None = None,
    ) -> Consumer:
        """A consumer of ``partitions`` (all, balanced by the bus, when None).

        ``positions(partitions)`` returns the last offset the caller applied per partition (from its
        own store); the consumer resumes right after them wherever the bus's own position is behind
        or unknown (a new consumer, a partition newly assigned, a changed assignment).
        """
        ...

    async def pending(self, topic: str, *, group: str) -> int: ...
