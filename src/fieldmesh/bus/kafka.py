"""Kafka bus adapter (confluent-kafka / librdkafka).

URL: ``kafka://host:port[,host:port]?param=value&...``. Every query parameter is a librdkafka
setting passed through unchanged (``security.protocol``, ``sasl.mechanism``, ``sasl.username``,
``sasl.password``, ``ssl.ca.location``, ``linger.ms``, ``session.timeout.ms`` ...). A
``producer.`` or ``consumer.`` prefix limits a setting to that client (``consumer.fetch.max.bytes``);
``replication_factor`` (default 1) and ``partitioner`` are fieldmesh parameters. Credentials:
``kafka://user:password@host:port`` sets ``sasl.username``/``sasl.password``; ``password_file=PATH``
reads ``sasl.password`` from a file instead, so that no secret is on a command line (docs/security.md).

What an acknowledgement means: :meth:`KafkaProducer.send` returns when librdkafka reported a
successful delivery for every record with ``acks=all`` and the idempotent producer, i.e. every
in-sync replica of the partition has the record (with replication factor 1: the leader's log, not
necessarily fsynced). Consumer offsets committed by :meth:`KafkaConsumer.ack` are a hint only:
processors keep the positions they applied in their store, in the same transaction as the results,
and seek to ``position + 1`` whenever a partition is assigned (``positions=`` hook), so a
rebalance or a crash neither loses nor double-counts records.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from fieldmesh.bus.base import BusRecord, IngestSpec, OutRecord, RecordFields, TopicSpec, fitting, split_by_bytes
from fieldmesh.core.errors import BackendError, BackendUnavailable, ConfigError, MissingDependency

__all__ = ["PRODUCER_DEFAULTS", "KafkaBus", "KafkaConsumer", "KafkaProducer", "parse_kafka_url"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Producer settings fieldmesh uses unless the URL overrides them (measured on tansu, 2 cores).
PRODUCER_DEFAULTS: Final[dict[str, Any]] = {
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 5,
    # a record the cluster does not take within 30 s fails (default 5 min), so send() answers in time
    "message.timeout.ms": 30_000,
    "batch.size": 1_000_000,
    "queue.buffering.max.messages": 500_000,
    "queue.buffering.max.kbytes": 1_048_576,
    # Java-client compatible: a device id lands on the same partition whichever client produced it
    "partitioner": "murmur2_random",
}
_CONSUMER_DEFAULTS: Final[dict[str, Any]] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "session.timeout.ms": 10_000,
    "heartbeat.interval.ms": 1_000,
    "max.poll.interval.ms": 300_000,
    "allow.auto.create.topics": False,
    # librdkafka prefetches up to this much per consumer: the backlog stays in the broker, not in memory
    "queued.max.messages.kbytes": 32 * 1024,
}
_FM_PARAMS: Final = {"replication_factor", "password_file"}
#: The headers of a record that has none (shared: records are read, never changed).
_NO_HEADERS: Final[Mapping[str, str]] = MappingProxyType({})
_first, _second = itemgetter(0), itemgetter(1)
_TRANSIENT_CODES: Final = {"_TRANSPORT", "_ALL_BROKERS_DOWN", "_TIMED_OUT", "_RESOLVE", "_MSG_TIMED_OUT"}


def _kafka() -> Any:
    try:
        import confluent_kafka
        import confluent_kafka.admin
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingDependency("confluent-kafka", "kafka") from exc
    return confluent_kafka


def parse_kafka_url(url: str) -> tuple[str, dict[str, str], dict[str, str], dict[str, str], dict[str, str]]:
    """Split a ``kafka://`` URL into bootstrap servers and settings.

    Returns:
        ``(bootstrap, common, producer_only, consumer_only, fieldmesh_params)``.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "kafka" or not parts.netloc:
        raise ConfigError(
            f"bad Kafka URL {redact_url(url)!r}: use kafka://host:port[,host:port]?setting=value", key="bus_url"
        )
    netloc = parts.netloc
    if "@" in netloc:  # kafka://user:pass@host:port -> SASL credentials
        cred, netloc = netloc.rsplit("@", 1)
        user, _, pw = cred.partition(":")
        creds = {"sasl.username": unquote(user), "sasl.password": unquote(pw)}
    else:
        creds = {}
    common: dict[str, str] = dict(creds)
    prod: dict[str, str] = {}
    cons: dict[str, str] = {}
    fm: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in _FM_PARAMS:
            fm[k] = v
        elif k.startswith("producer."):
            prod[k[len("producer.") :]] = v
        elif k.startswith("consumer."):
            cons[k[len("consumer.") :]] = v
        else:
            common[k] = v
    if "password_file" in fm:  # the SASL password from a file: no secret on a command line
        path = fm.pop("password_file")
        try:
            common["sasl.password"] = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"Kafka URL password_file {path}: {exc.strerror}", key="bus_url") from exc
    return netloc, common, prod, cons, fm


def redact_url(url: str) -> str:
    """A bus URL as shown in messages: its password (``user:password@``, ``sasl.password=``) is ``***``."""
    url = re.sub(r"(://[^:/@]*:)[^@/]*@", r"\1***@", url)
    return re.sub(r"((?:^|[?&])(?:[a-z]+\.)?sasl\.password=)[^&]*", r"\1***", url)


def _backoff(attempt: int, *, base_s: float = 0.2, cap_s: float = 5.0) -> float:
    """Capped exponential backoff with full jitter."""
    return random.uniform(0, min(cap_s, base_s * 2**attempt))


class KafkaProducer:
    """Idempotent producer; :meth:`send` returns when every record was acknowledged."""

    def __init__(self, producer: Any, *, timeout_s: float = 40.0, brokers: str = "") -> None:
        self._p = producer
        self._timeout = timeout_s
        self._brokers = brokers
        self._lock = asyncio.Lock()

    async def send(self, records: Sequence[OutRecord]) -> None:
        """Send all records; raise :class:`BackendError` unless each one was delivered.

        A record with ``partition < 0`` goes to the partition of its key (murmur2, like Java
        clients), so readings keyed by device id keep their per-device order.
        """
        if not records:
            return
        async with self._lock:  # one flush at a time: delivery reports are counted per call
            errors: list[Any] = []

            def on_delivery(err: Any, msg: Any) -> None:
                if err is not None:
                    errors.append((err, f"{msg.topic()}[{msg.partition()}]"))

            await asyncio.to_thread(self._produce_all, records, on_delivery)
            left = await asyncio.to_thread(self._p.flush, self._timeout)
            if errors or left:
                first, where = errors[0] if errors else (None, "")
                msg = f"Kafka delivery failed for {len(errors) + left} of {len(records)} records" + (
                    f" (first: {where}: {first})"
                    if first is not None
                    else f" ({left} still queued after {self._timeout}s)"
                )
                if first is None or first.name() in _TRANSIENT_CODES:
                    raise BackendUnavailable(f"{msg} (brokers {self._brokers})")
                raise BackendError(msg)

    def _produce_all(self, records: Sequence[OutRecord], on_delivery: Callable[[Any, Any], None]) -> None:
        produce = self._p.produce
        for n, r in enumerate(records, 1):
            headers = dict(r.headers) if r.headers else {}
            if r.msg_id:
                headers["Fm-Msg-Id"] = r.msg_id
            kw: dict[str, Any] = {"value": r.value, "key": r.key, "on_delivery": on_delivery}
            if headers:
                kw["headers"] = headers
            if r.partition >= 0:
                kw["partition"] = r.partition
            while True:
                try:
                    produce(r.topic, **kw)
                    break
                except BufferError:  # local queue full: let deliveries drain, then retry
                    self._p.poll(0.05)
                except Exception as exc:
                    raise BackendError(f"cannot produce to Kafka topic {r.topic!r}: {exc}") from exc
            if n % 1000 == 0:  # serve delivery reports as we go
                self._p.poll(0)

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued."""
        self._p.flush(timeout_s)


#: A fetch waits for a first message at most this long in one call of the client (its calls share a thread).
_WAIT_SLICE_S: Final = 0.05


class KafkaConsumer:
    """A consumer-group member (or a manual assignment) over one topic.

    Every call into librdkafka runs on one dedicated thread, so the ``positions`` hook (called on
    partition assignment) runs on that thread too.
    """

    def __init__(
        self,
        conf: dict[str, Any],
        topic: str,
        *,
        partitions: Sequence[int] | None,
        start_offset: int | None,
        positions: Callable[[list[int]], dict[int, int]] | None,
        brokers: str,
    ) -> None:
        self._topic = topic
        self._brokers = brokers
        self._start_offset = start_offset
        self._positions = positions
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kafka-{topic}")
        self._closed = False
        self._assigned: set[int] = set()
        self._conf = conf
        self._manual = None if partitions is None else sorted(partitions)
        self._c: Any = None
        self._fatal: BaseException | None = None
        # held while records are applied, and by a revocation: a partition's new owner reads the
        # positions only after the old owner's batch of it is committed (eager rebalancing)
        self._fence = threading.Lock()
        self._held: list[BusRecord] = []  # fetched beyond a fetch's max_bytes: served first next time

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def start(self) -> None:
        """Create the client and join the group (or take the manual assignment)."""
        await self._call(self._start)

    def _start(self) -> None:
        ck = _kafka()
        self._c = ck.Consumer(self._conf)
        if self._manual is None:
            self._c.subscribe([self._topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        else:
            self._c.assign(self._initial_offsets(self._manual))
            self._assigned = set(self._manual)

    def _initial_offsets(self, parts: list[int]) -> list[Any]:
        """TopicPartitions at the offset to resume from: stored position + 1, else ``start_offset``."""
        ck = _kafka()
        stored: dict[int, int] = {}
        if self._positions is not None:
            stored = self._positions(list(parts))
        out = []
        for p in parts:
            if p in stored:
                out.append(ck.TopicPartition(self._topic, p, int(stored[p]) + 1))
            elif self._start_offset is not None:
                out.append(ck.TopicPartition(self._topic, p, int(self._start_offset)))
            else:  # the group's committed offset, else auto.offset.reset
                out.append(ck.TopicPartition(self._topic, p, ck.OFFSET_STORED))
        return out

    def _on_assign(self, consumer: Any, tps: list[Any]) -> None:
        parts = sorted(tp.partition for tp in tps)
        try:
            offsets = self._initial_offsets(parts)
        except BaseException as exc:  # surfaces from the next fetch(); librdkafka swallows it otherwise
            self._fatal = exc
            offsets = tps
        consumer.assign(offsets)
        with self._fence:
            self._assigned = set(parts)
        log.info("kafka %s: assigned partitions %s", self._topic, parts)

    def _on_revoke(self, consumer: Any, tps: list[Any]) -> None:
        with self._fence:  # waits for a batch being applied
            self._assigned -= {tp.partition for tp in tps}
        log.info("kafka %s: revoked partitions %s", self._topic, sorted(tp.partition for tp in tps))

    def apply_fenced(
        self, records: Sequence[BusRecord], fn: Callable[[Sequence[BusRecord]], T]
    ) -> tuple[list[BusRecord], T | None]:
        """Call ``fn`` on the records of partitions this consumer still owns, holding off revocation.

        Records fetched before a rebalance took their partition away are dropped: the new owner
        applies them from the positions in the store. Returns the records given to ``fn`` (only those
        may be acknowledged: a commit past a dropped record would skip it on reassignment) and its result.
        """
        with self._fence:
            kept = list(records) if self._manual is not None else [r for r in records if r.partition in self._assigned]
            return (kept, fn(kept)) if kept else ([], None)

    @property
    def assignment(self) -> list[int]:
        """Partitions this consumer currently owns."""
        return sorted(self._assigned)

    async def fetch(self, max_records: int, timeout_s: float, *, max_bytes: int | None = None) -> list[BusRecord]:
        """Fetch up to ``max_records`` (about ``max_bytes`` at most); an empty list when none arrived
        within ``timeout_s``. Records beyond ``max_bytes`` are kept for the next fetch."""
        if self._held:
            held, self._held = self._held, []
            recs = [r for r in held if r.partition in self._assigned or self._manual is not None]
            if recs:
                out, self._held = split_by_bytes(recs, max_records, max_bytes)
                return out
        out = self._records(await self._consume(max_records, timeout_s))
        if max_bytes is None:
            return out
        out, self._held = split_by_bytes(out, max_records, max_bytes)
        return out

    async def fetch_fields(self, max_records: int, timeout_s: float, *, max_bytes: int | None = None) -> RecordFields:
        """Like :meth:`fetch`, the records field by field: no object per record (see :class:`RecordFields`); no
        handles (Kafka acknowledges by position)."""
        if self._held:  # records a fetch's max_bytes held back: fetch() serves them first
            return RecordFields.of(self._topic, await self.fetch(max_records, timeout_s, max_bytes=max_bytes))
        msgs = await self._consume(max_records, timeout_s)
        values = self._values(msgs)
        n = fitting(map(len, values), len(msgs), max_bytes)
        if n < len(msgs):
            self._held = self._records(msgs[n:])
            msgs, values = msgs[:n], values[:n]
        m_type = _kafka().Message
        return RecordFields(self._topic, list(map(m_type.partition, msgs)), list(map(m_type.offset, msgs)),
                          values, list(map(m_type.key, msgs)), self._headers(msgs))

    async def _consume(self, max_records: int, timeout_s: float) -> list[Any]:
        """Messages consumed as soon as there are any, without the errors to skip (those to raise raise).

        The wait for a first message goes in slices of ``_WAIT_SLICE_S``: the client's calls share one thread,
        and an acknowledgement (an offset commit) queued behind a wait of a second held the processor's next
        fetch (its queue's bytes are released at the acknowledgement) between two of the gateway's rounds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        msgs = await self._call(self._first, max_records, min(timeout_s, _WAIT_SLICE_S))
        while not msgs and (left := deadline - loop.time()) > 0:
            msgs = await self._call(self._first, max_records, min(left, _WAIT_SLICE_S))
        if self._fatal is not None:
            exc, self._fatal = self._fatal, None
            raise BackendError(f"partition assignment on {self._topic!r} failed: {exc}") from exc
        errors = list(map(_kafka().Message.error, msgs))
        if errors.count(None) != len(msgs):
            msgs = [m for m, err in zip(msgs, errors, strict=True) if err is None or not self._skip(err)]
        return msgs  # type: ignore[no-any-return]

    def _first(self, max_records: int, timeout_s: float) -> list[Any]:
        """Up to ``max_records`` messages, without waiting for that many (as a NATS pull answers).

        ``consume(n, timeout)`` waits until it has ``n`` messages or the timeout passed: a fetch that waits long
        for a first record would hold the records that came at part load. So: what the client has now; when it
        has nothing, one message waited for up to ``timeout_s``, and what came with it.
        """
        consume = self._c.consume
        msgs = consume(max_records, 0)
        if msgs or timeout_s <= 0:
            return msgs  # type: ignore[no-any-return]
        msgs = consume(1, timeout_s)
        if msgs and max_records > 1:
            msgs += consume(max_records - 1, 0)
        return msgs  # type: ignore[no-any-return]

    @staticmethod
    def _values(msgs: list[Any]) -> list[bytes]:
        values = list(map(_kafka().Message.value, msgs))
        return [v or b"" for v in values] if None in values else values  # a tombstone: empty

    @staticmethod
    def _headers(msgs: list[Any]) -> list[Mapping[str, str]]:
        raw: list[list[tuple[str, bytes | None]] | None] = list(map(_kafka().Message.headers, msgs))
        if not any(raw):
            return [_NO_HEADERS] * len(msgs)
        return [{k: (v.decode(errors="replace") if v is not None else "") for k, v in h} if h else _NO_HEADERS
                for h in raw]

    def _records(self, msgs: list[Any]) -> list[BusRecord]:
        """BusRecords of consumed messages (errors filtered out by :meth:`_consume`).

        Each field is read for all messages at once (``map`` over the message type's methods, in C), and the
        records are built by ``map`` too: no Python frame per message, which a gateway pays a million times.
        """
        m_type = _kafka().Message
        n = len(msgs)
        topic = self._topic  # the one topic this consumer reads
        stamps = list(map(m_type.timestamp, msgs))
        times = (list(map(_second, stamps)) if all(map(_first, stamps))
                 else [ts if ts_type else 0 for ts_type, ts in stamps])
        return list(map(
            BusRecord, repeat(topic, n), map(m_type.partition, msgs), map(m_type.offset, msgs), self._values(msgs),
            map(m_type.key, msgs), self._headers(msgs), times, repeat(None, n), repeat(topic, n),
        ))

    def _skip(self, err: Any) -> bool:
        """True for a consume error to skip (end of partition, or logged); raises for one that is not."""
        if err.code() == _kafka().KafkaError._PARTITION_EOF:
            return True
        if err.fatal():
            raise BackendError(f"Kafka consumer on {self._topic!r} failed: {err}")
        if err.name() in _TRANSIENT_CODES:
            raise BackendUnavailable(f"Kafka brokers {self._brokers} unreachable: {err}")
        log.warning("kafka %s: %s", self._topic, err)
        return True

    async def ack(self, records: Sequence[BusRecord]) -> None:
        """Commit the offsets after ``records`` asynchronously (a hint: the store's positions rule)."""
        if not records:
            return
        last: dict[tuple[str, int], int] = {}
        for r in records:
            k = (r.topic, r.partition)
            if r.offset >= last.get(k, -1):
                last[k] = r.offset
        await self._commit_async(last)

    async def _commit_async(self, last: Mapping[tuple[str, int], int]) -> None:
        """Commit ``{(topic, partition): last processed offset}`` asynchronously (offset + 1)."""
        ck = _kafka()
        tps = [ck.TopicPartition(t, p, o + 1) for (t, p), o in last.items()]

        def commit() -> None:
            try:
                self._c.commit(offsets=tps, asynchronous=True)
            except ck.KafkaException as exc:  # e.g. no longer assigned after a rebalance
                log.debug("kafka %s: commit hint not taken: %s", self._topic, exc)

        await self._call(commit)

    async def commit_sync(self, records: Sequence[BusRecord]) -> None:
        """Commit the offsets after ``records`` and wait for the broker's answer."""
        ck = _kafka()
        last: dict[tuple[str, int], int] = {}
        for r in records:
            last[(r.topic, r.partition)] = max(last.get((r.topic, r.partition), -1), r.offset)
        tps = [ck.TopicPartition(t, p, o + 1) for (t, p), o in last.items()]
        try:
            await self._call(lambda: self._c.commit(offsets=tps, asynchronous=False))
        except ck.KafkaException as exc:
            raise BackendError(f"Kafka commit on {self._topic!r} failed: {exc}") from exc

    def behind(self) -> None:
        """Unknown here (the processor then fetches as records come, as before)."""
        return None

    async def close(self) -> None:
        """Leave the group (partitions move to the other members at once)."""
        if self._closed:
            return
        self._closed = True
        if self._c is not None:
            with contextlib.suppress(Exception):
                await self._call(self._c.close)
        self._pool.shutdown(wait=False)


class KafkaBus:
    """A connection to a Kafka cluster (Apache Kafka, Redpanda, MSK, Confluent, tansu ...)."""

    #: a consumer group's partitions are balanced among its members by the brokers
    balances_groups = True

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0) -> None:
        self.url = url
        self.brokers, self._common, self._prod, self._cons, fm = parse_kafka_url(url)
        try:
            self.replication_factor = int(fm.get("replication_factor", "1"))
        except ValueError as exc:
            raise ConfigError(f"replication_factor must be an integer in {redact_url(url)!r}", key="bus_url") from exc
        self._timeout = connect_timeout_s
        self._admin: Any = None
        self._producer: KafkaProducer | None = None
        self._consumers: list[KafkaConsumer] = []
        self._lock = threading.Lock()

    def _base(self) -> dict[str, Any]:
        return {"bootstrap.servers": self.brokers, "error_cb": self._on_error, **self._common}

    def _on_error(self, err: Any) -> None:
        """librdkafka client errors (mostly transient: it reconnects by itself)."""
        log.warning("kafka %s: %s", self.brokers, err)

    def producer_config(self) -> dict[str, Any]:
        """The librdkafka producer settings: defaults, then the URL's."""
        return {**PRODUCER_DEFAULTS, **self._base(), **self._prod}

    def consumer_config(self, group: str) -> dict[str, Any]:
        """The librdkafka consumer settings of ``group``."""
        return {**_CONSUMER_DEFAULTS, **self._base(), **self._cons, "group.id": group}

    async def __aenter__(self) -> Self:
        ck = _kafka()
        try:
            self._admin = ck.admin.AdminClient(self._base())
        except ck.KafkaException as exc:
            raise ConfigError(f"invalid Kafka settings in {redact_url(self.url)!r}: {exc}", key="bus_url") from exc
        await self._wait_reachable()
        return self

    async def _wait_reachable(self) -> None:
        ck = _kafka()
        deadline = time.monotonic() + self._timeout
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            try:
                await asyncio.to_thread(self._admin.list_topics, timeout=max(0.5, min(left, 2.0)))
                return
            except ck.KafkaException as exc:
                err = exc.args[0] if exc.args else None
                name = err.name() if err is not None and hasattr(err, "name") else ""
                if name and name not in _TRANSIENT_CODES:
                    raise BackendError(f"Kafka brokers {self.brokers} refused the connection: {err}") from exc
                if time.monotonic() + 0.1 >= deadline:
                    raise BackendUnavailable(
                        f"cannot reach Kafka brokers {self.brokers} within {self._timeout:.0f}s: {err}"
                        " (check the bus URL, the listener/advertised address and security settings)"
                    ) from exc
                delay = min(_backoff(attempt), max(0.0, deadline - time.monotonic()))
                log.warning(
                    "kafka %s unreachable (try %d): %s; retrying in %.2fs",
                    self.brokers,
                    attempt + 1,
                    err,
                    delay,
                )
                await asyncio.sleep(delay)
                attempt += 1

    async def __aexit__(self, *exc: object) -> None:
        for c in list(self._consumers):
            await c.close()
        self._consumers.clear()
        if self._producer is not None:
            await asyncio.to_thread(self._producer.close)
            self._producer = None
        self._admin = None

    @property
    def admin(self) -> Any:
        """The confluent-kafka AdminClient (connected)."""
        if self._admin is None:
            raise BackendError("KafkaBus is not connected: use 'async with load_bus(url) as bus'")
        return self._admin

    async def partition_count(self, topic: str) -> int | None:
        """Partitions of an existing topic, or None when it does not exist."""
        # list all topics: asking for one by name can auto-create it on some brokers
        md = await asyncio.to_thread(self.admin.list_topics, timeout=self._timeout)
        t = md.topics.get(topic)
        return None if t is None or t.error is not None else len(t.partitions)

    async def ensure_topic(self, spec: TopicSpec) -> None:
        """Create a topic with explicit configs; check an existing one has ``spec.partitions``.

        Raises:
            ConfigError: the topic exists with another partition count.
        """
        ck = _kafka()
        config = {
            "retention.ms": str(spec.retention_s * 1000),
            "cleanup.policy": "delete",
            "retention.bytes": str(spec.max_bytes),
        }
        nt = ck.admin.NewTopic(
            spec.name,
            num_partitions=spec.partitions,
            replication_factor=self.replication_factor,
            config=config,
        )
        fut = self.admin.create_topics([nt], request_timeout=self._timeout)[spec.name]
        try:
            await asyncio.wrap_future(fut)
        except ck.KafkaException as exc:
            err = exc.args[0]
            if err.code() != ck.KafkaError.TOPIC_ALREADY_EXISTS:
                raise BackendError(f"cannot create Kafka topic {spec.name!r}: {err}") from exc
        n = await self.partition_count(spec.name)
        if n is not None and n != spec.partitions:
            raise ConfigError(
                f"Kafka topic {spec.name!r} has {n} partitions but fieldmesh is configured for "
                f"{spec.partitions}: set the partition count to {n}, or recreate the topic "
                "(partitions can only grow, and growing them moves device ids to other partitions)",
                key="partitions",
            )

    def producer(self) -> KafkaProducer:
        """The bus's producer (one per connection; librdkafka batches across callers)."""
        with self._lock:
            if self._producer is None:
                ck = _kafka()
                try:
                    p = ck.Producer(self.producer_config())
                except ck.KafkaException as exc:
                    raise ConfigError(
                        f"invalid Kafka producer settings in {redact_url(self.url)!r}: {exc}", key="bus_url"
                    ) from exc
                conf = self.producer_config()
                timeout = float(conf.get("message.timeout.ms", 300_000)) / 1000 + 10
                self._producer = KafkaProducer(p, timeout_s=timeout, brokers=self.brokers)
            return self._producer

    async def consumer(
        self,
        topic: str,
        *,
        group: str,
        partitions: Sequence[int] | None = None,
        start_offset: int | None = None,
        positions: Callable[[list[int]], dict[int, int]] | None = None,
    ) -> KafkaConsumer:
        """A consumer of ``topic`` in consumer group ``group``.

        Args:
            topic: The topic.
            group: Consumer group id (offset commits and, without ``partitions``, membership).
            partitions: A fixed assignment (no group membership) instead of the group's balancing.
            start_offset: Where partitions without a stored position start (default: the group's
                committed offset, else the earliest).
            positions: ``partitions -> {partition: last applied offset}`` read from the caller's
                store; called on every assignment to seek each partition to ``offset + 1``.
        """
        ck = _kafka()
        c = KafkaConsumer(
            self.consumer_config(group),
            topic,
            partitions=partitions,
            start_offset=start_offset,
            positions=positions,
            brokers=self.brokers,
        )
        try:
            await c.start()
        except ck.KafkaException as exc:
            await c.close()
            raise BackendError(f"cannot create Kafka consumer {group!r} on {topic!r}: {exc}") from exc
        self._consumers.append(c)
        return c

    async def pending(self, topic: str, *, group: str) -> int:
        """The group's lag: records after its committed offsets, summed over partitions."""
        return sum((await self.lag(topic, group=group)).values())

    async def topic_exists(self, topic: str) -> bool:
        """Whether ``topic`` exists."""
        return await self.partition_count(topic) is not None

    async def ingest(self, spec: IngestSpec, *, group: str, sole: bool = False) -> KafkaConsumer:
        """A consumer of group ``group`` on the topic ``spec.name`` (balanced among the group's members).

        ``own`` and ``adopt`` create the topic when it is missing (``spec.partitions``); ``existing``
        requires it. ``sole`` changes nothing here: the topic's retention removes old records.
        """
        if await self.partition_count(spec.name) is None:
            if spec.mode == "existing":
                raise ConfigError(
                    f"Kafka ingest topic {spec.name!r} does not exist on {self.brokers}: create it, or fix "
                    "the topic in --ingest-url",
                    key="ingest_url",
                )
            await self.ensure_topic(TopicSpec(spec.name, spec.partitions, spec.retention_s, max_bytes=spec.max_bytes))
        return await self.consumer(spec.name, group=group)

    async def _offsets(self, topic: str, group: str) -> tuple[dict[int, int], dict[int, tuple[int, int]]]:
        """``({partition: committed next offset}, {partition: (low, high) watermarks})``."""
        ck = _kafka()
        n = await self.partition_count(topic)
        if not n:
            return {}, {}

        def read() -> tuple[dict[int, int], dict[int, tuple[int, int]]]:
            c = ck.Consumer({**self.consumer_config(group), "enable.auto.commit": False})
            try:
                tps = [ck.TopicPartition(topic, p) for p in range(n)]
                committed = {tp.partition: tp.offset for tp in c.committed(tps, timeout=self._timeout)}
                marks = {p: c.get_watermark_offsets(ck.TopicPartition(topic, p), timeout=self._timeout)
                         for p in committed}
                return committed, marks
            finally:
                c.close()

        try:
            return await asyncio.to_thread(read)
        except ck.KafkaException as exc:
            raise BackendUnavailable(
                f"cannot read the offsets of {group!r} on {topic!r} from {self.brokers}: {exc}"
            ) from exc

    async def lag(
        self, topic: str, *, group: str, positions: Mapping[int, int] | None = None
    ) -> dict[int, int]:
        """Per-partition lag: high watermark minus ``positions[p] + 1`` where given, else minus the
        group's committed offset (the low watermark when it has none)."""
        committed, marks = await self._offsets(topic, group)
        out = {}
        for p, (low, high) in marks.items():
            if positions is not None and p in positions:
                start = max(int(positions[p]) + 1, low)
            else:
                start = committed[p] if committed[p] >= 0 else low
            out[p] = max(0, high - start)
        return out

    async def committed(self, topic: str, *, group: str) -> dict[int, int]:
        """Per partition, the last offset the group committed as processed (committed offset - 1)."""
        committed, _ = await self._offsets(topic, group)
        return {p: o - 1 for p, o in committed.items() if o > 0}

    async def drop_consumer(self, topic: str, *, group: str) -> None:
        """Delete consumer group ``group`` (nothing when it does not exist).

        Raises:
            BackendError: the brokers refused (the group still has live members, or the broker does not
                implement DeleteGroups).
        """
        ck = _kafka()
        fut = self.admin.delete_consumer_groups([group], request_timeout=self._timeout)[group]
        try:
            await asyncio.wrap_future(fut)
        except ck.KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if err is not None and hasattr(err, "code") and err.code() == ck.KafkaError.GROUP_ID_NOT_FOUND:
                return
            raise BackendError(f"cannot delete Kafka consumer group {group!r}: {err}") from exc

    async def delete_topic(self, topic: str) -> None:
        """Delete a topic (tests and tools)."""
        fut = self.admin.delete_topics([topic], request_timeout=self._timeout)[topic]
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(fut)


if TYPE_CHECKING:  # the adapter implements the whole contract (checked by mypy, not at run time)
    from fieldmesh.bus.base import Bus, Consumer

    def _implements(b: KafkaBus, c: KafkaConsumer) -> tuple[Bus, Consumer]:
        return b, c
