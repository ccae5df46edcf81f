"""NATS JetStream bus adapter.

A fieldmesh topic ``fm.readings`` is the stream ``FM_READINGS`` with subjects ``fm.readings.<p>``,
one subject per partition. Records are published asynchronously and :meth:`NatsProducer.send`
returns once JetStream acknowledged every one (``PubAck``). ``msg_id`` becomes ``Nats-Msg-Id``,
which JetStream de-duplicates within the stream's duplicate window.

What a ``PubAck`` means: the stream's leader has the message in its store; with the default
``sync_interval`` (2 minutes) it is in the OS page cache, surviving a crash of nats-server but not
of the machine. ``fsync=always`` on the embedded server makes it survive power loss too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Sequence
from typing import Any, Self
from urllib.parse import urlparse

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from fieldmesh.bus.base import BusRecord, OutRecord, PositionsFn, TopicSpec
from fieldmesh.core.errors import BackendError, BackendUnavailable, ConfigError

__all__ = ["NatsBus", "NatsConsumer", "NatsProducer", "stream_name"]

log = logging.getLogger(__name__)
_SAFE = re.compile(r"[^A-Za-z0-9_-]")


def stream_name(topic: str) -> str:
    """The JetStream stream of a fieldmesh topic: ``fm.readings`` -> ``FM_READINGS``."""
    return _SAFE.sub("_", topic).upper()


def _partition_of(subject: str) -> int:
    tail = subject.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class NatsProducer:
    """Publishes records asynchronously and waits for every PubAck."""

    def __init__(self, js: JetStreamContext) -> None:
        self._js = js

    async def send(self, records: Sequence[OutRecord]) -> None:
        """Publish all records; return once JetStream acknowledged each one."""
        if not records:
            return
        futures: list[asyncio.Future[api.PubAck]] = []
        try:
            for r in records:
                headers: dict[str, str] | None = dict(r.headers) if r.headers else None
                if r.msg_id:
                    headers = headers or {}
                    headers["Nats-Msg-Id"] = r.msg_id
                if r.key is not None:
                    headers = headers or {}
                    headers["Fm-Key"] = r.key.decode(errors="replace")
                futures.append(
                    await self._js.publish_async(f"{r.topic}.{r.partition}", r.value, headers=headers)
                )
            await asyncio.wait_for(asyncio.gather(*futures), timeout=30)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            for f in futures:
                f.cancel()
            raise BackendError(f"JetStream publish failed: {exc!r}") from exc


def _ack_tokens(reply: str) -> tuple[int, int]:
    """(stream sequence, timestamp ms) from a JetStream ack subject, without building metadata objects.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts_ns>.<pending>``, or the v2 form with
    domain and account hash after ``ACK`` (and a trailing token).
    """
    t = reply.split(".")
    i = 5 if len(t) == 9 else 7
    return int(t[i]), int(t[i + 2]) // 1_000_000


class NatsConsumer:
    """A durable pull consumer over some (or all) partitions of a topic."""

    def __init__(self, sub: JetStreamContext.PullSubscription, topic: str, *, ack_all: bool = False) -> None:
        self._sub = sub
        self._topic = topic
        self._ack_all = ack_all

    async def fetch(self, max_records: int, timeout_s: float) -> list[BusRecord]:
        """Fetch up to ``max_records``; an empty list when none arrived within ``timeout_s``."""
        try:
            msgs = await self._sub.fetch(max_records, timeout=timeout_s)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except nats.errors.ConnectionClosedError as exc:
            raise BackendUnavailable("NATS connection closed") from exc
        return [self._record(m) for m in msgs]

    def _record(self, m: Msg) -> BusRecord:
        seq, ts_ms = _ack_tokens(m.reply)
        hdrs = m.headers or {}
        key = hdrs.get("Fm-Key")
        return BusRecord(
            topic=self._topic,
            partition=_partition_of(m.subject),
            offset=seq,
            value=m.data,
            key=key.encode() if key is not None else None,
            headers=hdrs,
            timestamp_ms=ts_ms,
            handle=m,
        )

    async def ack(self, records: Sequence[BusRecord]) -> None:
        """Acknowledge records (after their effects are committed).

        With an ack-all consumer (one fetcher, in order) acknowledging the last record covers the rest.
        """
        if self._ack_all:
            if records:
                await max(records, key=lambda r: r.offset).handle.ack()
        else:
            for r in records:
                m: Msg = r.handle
                await m.ack()
        with contextlib.suppress(nats.errors.Error):
            await self._sub._nc.flush(timeout=5)

    async def close(self) -> None:
        """Stop fetching (the durable consumer and its position stay on the server)."""
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()


class NatsBus:
    """A connection to NATS JetStream."""

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0) -> None:
        self.url = url
        self._timeout = connect_timeout_s
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None

    async def __aenter__(self) -> Self:
        await self._probe()
        try:
            self._nc = await nats.connect(
                self.url,
                connect_timeout=self._timeout,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                allow_reconnect=True,
                pending_size=64 * 1024 * 1024,
            )
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            raise BackendUnavailable(f"cannot connect to NATS at {self.url}: {exc!r}") from exc
        self._js = self._nc.jetstream(timeout=10, publish_async_max_pending=8000)
        return self

    async def _probe(self) -> None:
        """Fail fast when no server listens (nats-py would otherwise retry the first connect forever)."""
        errors = []
        for server in self.url.split(","):
            u = urlparse(server if "://" in server else f"nats://{server}")
            try:
                _, w = await asyncio.wait_for(asyncio.open_connection(u.hostname or "127.0.0.1", u.port or 4222),
                                              self._timeout)
                w.close()
                return
            except (OSError, TimeoutError) as exc:
                errors.append(f"{u.hostname}:{u.port or 4222}: {exc}")
        raise BackendUnavailable(f"cannot connect to NATS at {self.url}: {'; '.join(errors)}")

    async def __aexit__(self, *exc: object) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.drain()
            self._nc = None

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context (connected)."""
        if self._js is None:
            raise BackendError("NatsBus is not connected: use 'async with load_bus(url) as bus'")
        return self._js

    @property
    def nc(self) -> Client:
        """The NATS client (connected)."""
        if self._nc is None:
            raise BackendError("NatsBus is not connected")
        return self._nc

    async def ensure_topic(self, spec: TopicSpec) -> None:
        """Create (or update) the stream of a topic with one subject token per partition.

        The partition count is kept in the stream's metadata; asking for another count is an error
        (devices would move between partitions and lose their per-partition order).
        """
        name = stream_name(spec.name)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            info = await self.js.stream_info(name)
            have = (info.config.metadata or {}).get("fm_partitions")
            if have is not None and int(have) != spec.partitions:
                raise ConfigError(
                    f"topic {spec.name} has {have} partitions, not {spec.partitions}: keep --partitions {have} "
                    "or use a new topic/data dir",
                    key="partitions",
                )
        await self.ensure_stream(
            name,
            [f"{spec.name}.*"],
            retention_s=spec.retention_s,
            dedupe_window_s=spec.dedupe_window_s,
            max_bytes=spec.max_bytes,
            metadata={"fm_partitions": str(spec.partitions)},
        )

    async def ensure_stream(
        self,
        name: str,
        subjects: list[str],
        *,
        retention_s: int,
        dedupe_window_s: int = 120,
        max_bytes: int = -1,
        work_queue: bool = False,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Create or update a file-backed stream."""
        cfg = api.StreamConfig(
            name=name,
            subjects=subjects,
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.WORK_QUEUE if work_queue else api.RetentionPolicy.LIMITS,
            max_age=float(retention_s),
            max_bytes=max_bytes,
            duplicate_window=float(dedupe_window_s),
            discard=api.DiscardPolicy.OLD,
            metadata=metadata,
        )
        try:
            try:
                await self.js.stream_info(name)
                await self.js.update_stream(cfg)
            except nats.js.errors.NotFoundError:
                await self.js.add_stream(cfg)
        except nats.js.errors.Error as exc:
            raise BackendError(f"cannot create stream {name}: {exc}") from exc

    def producer(self) -> NatsProducer:
        """A producer on this connection."""
        return NatsProducer(self.js)

    async def consumer(
        self,
        topic: str,
        *,
        group: str,
        partitions: Sequence[int] | None = None,
        positions: PositionsFn | None = None,
        reset_pending: bool = True,
    ) -> NatsConsumer:
        """A durable pull consumer ``group`` over ``partitions`` (all when None) of ``topic``.

        Stream sequences are global, so a new consumer (or one whose partitions changed) starts at
        the lowest stored position + 1 of its partitions, or at the stream's start when one of them
        was never applied. Records at or below a stored position are the caller's to skip.
        """
        subjects = [f"{topic}.*"] if partitions is None else [f"{topic}.{p}" for p in sorted(partitions)]
        start: int | None = None
        if positions is not None and partitions is not None:
            pos = positions(sorted(partitions))
            start = 1 if not pos or len(pos) < len(set(partitions)) else min(pos.values()) + 1
        return await self.raw_consumer(stream_name(topic), group, subjects, topic=topic, start_seq=start,
                                       reset_pending=reset_pending)

    async def raw_consumer(
        self,
        stream: str,
        durable: str,
        subjects: list[str],
        *,
        topic: str | None = None,
        ack_wait_s: float = 60.0,
        max_ack_pending: int = 50_000,
        start_seq: int | None = None,
        reset_pending: bool = False,
        ack_all: bool = False,
    ) -> NatsConsumer:
        """A durable pull consumer on any stream and subject filters.

        ``reset_pending`` (for a single owner, such as a processor replica) redelivers at once what a
        crashed predecessor had fetched but not acknowledged, instead of after ``ack_wait``.
        """
        durable = _SAFE.sub("_", durable)
        cfg = api.ConsumerConfig(
            durable_name=durable,
            ack_policy=api.AckPolicy.ALL if ack_all else api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if start_seq else api.DeliverPolicy.ALL,
            opt_start_seq=start_seq if start_seq else None,
            ack_wait=ack_wait_s,
            max_ack_pending=max_ack_pending,
            max_waiting=512,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None,
        )
        try:
            try:
                info = await self.js.consumer_info(stream, durable)
                same = sorted(info.config.filter_subjects or [info.config.filter_subject or ""]) == sorted(
                    subjects) and info.config.ack_policy == cfg.ack_policy
                if not same or (reset_pending and info.num_ack_pending):
                    # Delivered-but-unacknowledged messages would only come back after ack_wait: start a
                    # fresh consumer right after the acknowledged floor instead (or where the caller says
                    # when the filter changed). Acknowledged means applied, so nothing is skipped.
                    floor = info.ack_floor.stream_seq if info.ack_floor else 0
                    start = (start_seq or 1) if not same else floor + 1
                    cfg.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
                    cfg.opt_start_seq = max(start, 1)
                    await self.js.delete_consumer(stream, durable)
                    raise nats.js.errors.NotFoundError
            except nats.js.errors.NotFoundError:
                await self.js.add_consumer(stream, cfg)
            sub = await self.js.pull_subscribe_bind(durable=durable, stream=stream)
        except nats.js.errors.Error as exc:
            raise BackendError(f"cannot create consumer {durable} on {stream}: {exc}") from exc
        return NatsConsumer(sub, topic or stream, ack_all=ack_all)

    async def pending(self, topic: str, *, group: str) -> int:
        """Messages not yet acknowledged by consumer ``group`` (its lag)."""
        return await self.raw_pending(stream_name(topic), group)

    async def raw_pending(self, stream: str, durable: str) -> int:
        """Lag of a durable consumer: pending plus delivered-but-unacknowledged.

        A consumer not created yet has acknowledged nothing: its lag is every message in the stream
        (0 when the stream does not exist either), as Kafka counts a group without commits.
        """
        try:
            info = await self.js.consumer_info(stream, _SAFE.sub("_", durable))
        except nats.js.errors.NotFoundError:
            try:
                return int((await self.js.stream_info(stream)).state.messages or 0)
            except nats.js.errors.NotFoundError:
                return 0
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def stream_info(self, stream: str) -> Any:
        """JetStream stream info (for stats and health)."""
        return await self.js.stream_info(stream)
