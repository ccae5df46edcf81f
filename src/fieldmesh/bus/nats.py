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

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from fieldmesh.bus.base import BusRecord, OutRecord, TopicSpec
from fieldmesh.core.errors import BackendError, BackendUnavailable

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


class NatsConsumer:
    """A durable pull consumer over some (or all) partitions of a topic."""

    def __init__(self, sub: JetStreamContext.PullSubscription, topic: str) -> None:
        self._sub = sub
        self._topic = topic

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
        md = m.metadata
        hdrs = m.headers or {}
        key = hdrs.get("Fm-Key")
        return BusRecord(
            topic=self._topic,
            partition=_partition_of(m.subject),
            offset=md.sequence.stream,
            value=m.data,
            key=key.encode() if key is not None else None,
            headers=hdrs,
            timestamp_ms=int(md.timestamp.timestamp() * 1000) if md.timestamp else 0,
            handle=m,
        )

    async def ack(self, records: Sequence[BusRecord]) -> None:
        """Acknowledge records (after their effects are committed)."""
        for r in records:
            m: Msg = r.handle
            await m.ack()
        with contextlib.suppress(nats.errors.Error):
            await self._sub._nc.flush(timeout=5)  # noqa: SLF001 - make acks reach the server now

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
        """Create (or update) the stream of a topic with one subject token per partition."""
        await self.ensure_stream(
            stream_name(spec.name),
            [f"{spec.name}.*"],
            retention_s=spec.retention_s,
            dedupe_window_s=spec.dedupe_window_s,
            max_bytes=spec.max_bytes,
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
        start_offset: int | None = None,
        reset_pending: bool = True,
    ) -> NatsConsumer:
        """A durable pull consumer ``group`` over ``partitions`` (all when None) of ``topic``.

        ``start_offset`` (the lowest stream sequence still needed) applies when the consumer is
        created, e.g. after the partitions a replica owns changed.
        """
        subjects = [f"{topic}.*"] if partitions is None else [f"{topic}.{p}" for p in sorted(partitions)]
        return await self.raw_consumer(stream_name(topic), group, subjects, topic=topic, start_seq=start_offset,
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
    ) -> NatsConsumer:
        """A durable pull consumer on any stream and subject filters.

        ``reset_pending`` (for a single owner, such as a processor replica) redelivers at once what a
        crashed predecessor had fetched but not acknowledged, instead of after ``ack_wait``.
        """
        durable = _SAFE.sub("_", durable)
        cfg = api.ConsumerConfig(
            durable_name=durable,
            ack_policy=api.AckPolicy.EXPLICIT,
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
                same = sorted(info.config.filter_subjects or [info.config.filter_subject or ""]) == sorted(subjects)
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
        return NatsConsumer(sub, topic or stream)

    async def pending(self, topic: str, *, group: str) -> int:
        """Messages not yet acknowledged by consumer ``group`` (its lag)."""
        return await self.raw_pending(stream_name(topic), group)

    async def raw_pending(self, stream: str, durable: str) -> int:
        """Lag of a durable consumer: pending plus delivered-but-unacknowledged."""
        try:
            info = await self.js.consumer_info(stream, _SAFE.sub("_", durable))
        except nats.js.errors.NotFoundError:
            return 0
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)

    async def stream_info(self, stream: str) -> Any:
        """JetStream stream info (for stats and health)."""
        return await self.js.stream_info(stream)
