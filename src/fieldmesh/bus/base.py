"""The bus contract: partitioned, durable topics with explicit acknowledgement.

A topic has N partitions. Producers send records to ``(topic, partition)`` and return only once the
bus has acknowledged every one of them. Consumers fetch records with their position
``(topic, partition, offset)``; offsets grow within a partition. Processors store the positions they
applied in their own store transaction and skip records at or below them on redelivery, so the
bus's own acknowledgement is only a hint for where to resume.

Stages use only what this module declares: a stage that needs something else from a bus gets a
method here, implemented by every adapter (``tests/test_layering.py`` checks it).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate, islice
from operator import attrgetter
from typing import Any, Final, Literal, Protocol, Self, TypeVar

import msgspec

__all__ = [
    "Bus", "BusRecord", "Consumer", "IngestSpec", "OutRecord", "PositionsFn", "Producer", "RecordFields", "TopicSpec",
]

T = TypeVar("T")

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


class BusRecord(msgspec.Struct, frozen=True, gc=False):
    """A record fetched from the bus, with its position and the adapter's ack handle.

    A msgspec struct: adapters make one per record fetched, and it is built in a tenth of the time of a
    frozen dataclass (whose ``__init__`` sets each field through ``object.__setattr__``). Not tracked by the
    garbage collector: nothing a record holds (bytes, strings, headers, the adapter's message) refers back
    to it, so it is never in a reference cycle.
    """

    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None
    headers: Mapping[str, str] = msgspec.field(default_factory=dict)
    timestamp_ms: int = 0
    handle: Any = None
    #: the subject or topic it was published on (NATS subject, Kafka topic)
    subject: str = ""


#: Getters of the :class:`BusRecord` fields :class:`RecordFields` holds, in its order (read by C iterators).
_RECORD_FIELDS: Final = tuple(map(attrgetter, ("partition", "offset", "value", "key", "headers", "handle")))


class RecordFields(msgspec.Struct, frozen=True, gc=False):
    """Records of one topic fetched field by field: row ``i`` of every list is record ``i``, in fetch order.

    For a stage that reads every record of a batch the same way (the gateway's Kafka ingest): a list per
    field costs one C iteration per field, where a :class:`BusRecord` per record costs an object (a million
    a second at the gateway's rate). :meth:`Consumer.fetch_fields` returns it.
    """

    topic: str
    partitions: list[int]
    offsets: list[int]
    values: list[bytes]
    keys: list[bytes | None]
    headers: list[Mapping[str, str]]
    #: each record's ack handle (:attr:`BusRecord.handle`); no list, or None entries, when the bus acknowledges
    #: by position alone (Kafka: a :class:`BusRecord` with the topic, partition and offset is all
    #: :meth:`Consumer.ack` needs)
    handles: list[Any] | None = None

    def __len__(self) -> int:
        return len(self.offsets)

    @classmethod
    def of(cls, topic: str, records: Sequence[BusRecord]) -> RecordFields:
        """The records field by field (for a consumer that fetches :class:`BusRecord` s anyway)."""
        return cls(topic, *(list(map(get, records)) for get in _RECORD_FIELDS))


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """How a topic is created: partitions, retention and de-duplication window."""

    name: str
    partitions: int
    retention_s: int = 7 * 86400
    dedupe_window_s: int = 600
    max_bytes: int = -1


@dataclass(frozen=True, slots=True)
class IngestSpec:
    """Raw device messages a gateway consumes: fieldmesh's own ingest stream, or a user's stream/topic.

    ``name`` is a fieldmesh topic (``fm.ingest``: the NATS stream ``FM_INGEST``), or, without a dot, a
    NATS stream or Kafka topic named as it is. ``mode``: ``own`` creates or updates it, ``adopt``
    creates it only when missing (one you already have is used as it is), ``existing`` must exist
    (else a :class:`~fieldmesh.core.errors.ConfigError` naming ``ingest_url``).
    """

    name: str
    subjects: tuple[str, ...] = ()
    mode: Literal["own", "adopt", "existing"] = "own"
    retention_s: int = 7 * 86400
    max_bytes: int = -1
    #: partitions of a topic the bus creates (Kafka; a NATS ingest stream is not partitioned)
    partitions: int = 1
    #: subject filters an earlier version of this consumer used: a consumer found with exactly these
    #: resumes after what it acknowledged (the new filter must cover the old one)
    resume_from: tuple[str, ...] = ()


class Producer(Protocol):
    """Sends records; ``send`` returns when the bus acknowledged all of them."""

    async def send(self, records: Sequence[OutRecord]) -> None: ...


class Consumer(Protocol):
    """Fetches records of the partitions it was given, in offset order per partition."""

    async def fetch(self, max_records: int, timeout_s: float, *, max_bytes: int | None = None) -> list[BusRecord]:
        """Up to ``max_records`` records (an empty list after ``timeout_s``).

        With ``max_bytes`` the values of a batch add up to about that many bytes at most (always at
        least one record); what was fetched beyond it comes first next time.
        """
        ...

    async def fetch_fields(self, max_records: int, timeout_s: float, *, max_bytes: int | None = None) -> RecordFields:
        """What :meth:`fetch` gives, field by field (:class:`RecordFields`)."""
        ...

    async def ack(self, records: Sequence[BusRecord]) -> None:
        """Acknowledge records whose effects are durable (a sole ingest consumer also trims them).

        A consumer's one owner acknowledges in the order it fetched and skips none: a bus may take a record's
        acknowledgement as covering every record fetched before it (Kafka commits an offset; a sole NATS
        consumer acknowledges all up to a record).
        """
        ...

    def apply_fenced(
        self, records: Sequence[BusRecord], fn: Callable[[Sequence[BusRecord]], T]
    ) -> tuple[list[BusRecord], T | None]:
        """Call ``fn`` on the records of partitions this consumer still owns, holding off revocation.

        Records of a partition a rebalance took away are dropped (the new owner applies them from the
        stored positions). Returns the records given to ``fn`` (only those may be acknowledged) and
        its result (None when no record was left). Synchronous: run it in a thread.
        """
        ...

    def behind(self) -> bool | None:
        """Whether more records were waiting when the last fetch returned (None: this bus cannot tell).

        The processor fetches again at once when behind, and when caught up only once its applier is free.
        """
        ...

    async def close(self) -> None: ...


class Bus(Protocol):
    """A connection to a bus: creates topics, producers and consumers."""

    url: str
    #: True when the bus balances a group's partitions among its members (Kafka); False when each
    #: consumer must be given its partitions to resume per partition (NATS)
    balances_groups: bool

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
        or unknown (a new consumer, a partition newly assigned, a changed assignment), and also where
        the group acknowledged records after them (a sink that buffers had not made them durable:
        they are delivered again). A partition with no record after its position never moves the
        start back; position -1 means nothing applied (from the partition's first record).
        """
        ...

    async def pending(self, topic: str, *, group: str) -> int:
        """Records ``group`` has not acknowledged yet, summed (a group never seen: every record)."""
        ...

    async def topic_exists(self, topic: str) -> bool: ...

    async def partition_count(self, topic: str) -> int | None:
        """Partitions of an existing topic, None when it does not exist."""
        ...

    async def ingest(self, spec: IngestSpec, *, group: str, sole: bool = False) -> Consumer:
        """Set up an ingest stream or topic per ``spec`` and a consumer ``group`` over it.

        ``sole``: this consumer is the stream's only reader (``fieldmesh up``): it takes over what a
        crashed predecessor had fetched at once, and acknowledged records are trimmed from the stream.
        Its records carry ``subject``; acknowledge them through the consumer.
        """
        ...

    async def lag(
        self, topic: str, *, group: str, positions: Mapping[int, int] | None = None
    ) -> dict[int, int]:
        """Records per partition after ``positions`` (the store's, the truth) where given, else after
        the group's acknowledgements (a group never seen: every record)."""
        ...

    async def committed(self, topic: str, *, group: str) -> dict[int, int]:
        """Per partition, the offset through which ``group`` acknowledged every record (absent: none)."""
        ...

    async def drop_consumer(self, topic: str, *, group: str) -> None:
        """Delete the consumer state of ``group`` on ``topic`` (nothing when there is none)."""
        ...


_value_of = attrgetter("value")


def fitting(sizes: Iterable[int], max_records: int, max_bytes: int | None) -> int:
    """How many of the first ``sizes`` make a batch: at most ``max_records``, adding up to ``max_bytes`` at most,
    and at least one when there is any (a record larger than the bound comes alone). Sums by C iterators."""
    head = list(islice(sizes, max(1, max_records)))
    if max_bytes is None or not head:
        return len(head)
    return max(1, bisect_right(list(accumulate(head)), max_bytes))


def split_by_bytes(
    records: Sequence[BusRecord], max_records: int, max_bytes: int | None
) -> tuple[list[BusRecord], list[BusRecord]]:
    """``(head, rest)``: the first :func:`fitting` records and the others, in order; adapters keep ``rest`` for the
    next fetch."""
    n = fitting(map(len, map(_value_of, records)), max_records, max_bytes)
    return list(records[:n]), list(records[n:])
