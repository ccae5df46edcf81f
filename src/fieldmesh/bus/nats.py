"""NATS JetStream bus adapter.

A fieldmesh topic ``fm.readings`` is the stream ``FM_READINGS`` with subjects ``fm.readings.<p>``,
one subject per partition. Records are published asynchronously and :meth:`NatsProducer.send`
returns once JetStream acknowledged every one (``PubAck``). ``msg_id`` becomes ``Nats-Msg-Id``,
which JetStream de-duplicates within the stream's duplicate window.

What a ``PubAck`` means: the stream's leader has the message in its store; with the default
``sync_interval`` (2 minutes) it is in the OS page cache, surviving a crash of nats-server but not
of the machine. ``fsync=always`` on the embedded server makes it survive power loss too.

Offsets are stream sequences, global to the stream: a partition's offsets grow but are not dense.
Ingest streams (:meth:`NatsBus.ingest`) are not partitioned: their records are partition 0.

Credentials: ``nats://user:password@host:port`` as nats-py takes them, or in a file named by the URL,
so that no secret is on a command line: ``?auth_file=PATH`` (JSON ``{"user": ..., "password": ...}``,
what ``fieldmesh up`` keeps in ``<data-dir>/secrets/internal.json``) or ``?creds=PATH`` (a NATS
``.creds`` file: JWT and nkey seed). ``tls://`` connects with TLS.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from operator import attrgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar
from urllib.parse import parse_qs, urlparse

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from fieldmesh.bus.base import (
    BusRecord,
    IngestSpec,
    OutRecord,
    PositionsFn,
    RecordFields,
    TopicSpec,
    fitting,
    split_by_bytes,
)
from fieldmesh.core.errors import BackendError, BackendUnavailable, ConfigError

__all__ = ["NatsBus", "NatsConsumer", "NatsProducer", "PipelinedNatsProducer", "stream_name"]

log = logging.getLogger(__name__)
_value_of = attrgetter("value")
_SAFE = re.compile(r"[^A-Za-z0-9_-]")
T = TypeVar("T")
#: how often a sole ingest consumer trims what it acknowledged from its stream
_TRIM_EVERY_S = 1.0


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


class _Pending:
    __slots__ = ("acked", "done", "error", "expected")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.acked = 0
        self.error: str | None = None
        self.done = asyncio.Event()


class PipelinedNatsProducer:
    """A JetStream producer that pipelines publishes and collects the PubAcks on one inbox.

    Same contract as :class:`NatsProducer` (``send`` returns once JetStream acknowledged every
    record; ``msg_id`` -> ``Nats-Msg-Id``; ``key`` -> ``Fm-Key``), about three times faster than one
    ``publish_async`` future per record here (measured ~100k vs ~36k msg/s with one record per
    message, as change events travel). :meth:`NatsBus.producer` returns one.
    """

    def __init__(self, nc: Client, *, max_in_flight: int = 20_000, timeout_s: float = 30.0) -> None:
        self._nc = nc
        self._max = max_in_flight
        self._timeout = timeout_s
        self._inbox = nc.new_inbox()
        self._sub: Any = None
        self._batches: dict[str, _Pending] = {}
        self._ids = itertools.count()
        self._room = asyncio.Event()

    async def _on_ack(self, msg: Msg) -> None:
        _, batch, _ = msg.subject.rsplit(".", 2)
        p = self._batches.get(batch)
        if p is None:
            return
        data = msg.data
        hdrs = msg.headers or {}
        if hdrs.get("Status") == "503" or not data:
            p.error = (
                p.error
                or f"no JetStream stream for subject of this batch ({hdrs.get('Status', 'empty ack')})"
            )
        elif data.startswith(b'{"error"'):
            p.error = p.error or data.decode(errors="replace")
        p.acked += 1
        if p.acked >= p.expected:
            p.done.set()
        self._room.set()

    async def send(self, records: Sequence[OutRecord]) -> None:
        """Publish all records; return once JetStream acknowledged each one."""
        items = []
        for r in records:
            headers: dict[str, str] = dict(r.headers) if r.headers else {}
            if r.msg_id:
                headers["Nats-Msg-Id"] = r.msg_id
            if r.key is not None:
                headers["Fm-Key"] = r.key.decode(errors="replace")
            items.append((f"{r.topic}.{r.partition}", r.value, headers or None))
        await self.publish(items)

    async def publish(self, items: Sequence[tuple[str, bytes, dict[str, str] | None]]) -> None:
        """Publish ``(subject, payload, headers)`` items; return once JetStream acknowledged each one."""
        if not items:
            return
        if self._sub is None:
            self._sub = await self._nc.subscribe(self._inbox + ".>", cb=self._on_ack, pending_msgs_limit=-1)
        batch = str(next(self._ids))
        p = self._batches[batch] = _Pending(len(items))
        prefix = f"{self._inbox}.{batch}."
        publish = self._nc.publish
        try:
            for i, (subject, payload, headers) in enumerate(items):
                await publish(subject, payload, reply=f"{prefix}{i}", headers=headers)
                while i + 1 - p.acked > self._max and p.error is None:
                    self._room.clear()
                    await asyncio.wait_for(self._room.wait(), self._timeout)
            await asyncio.wait_for(p.done.wait(), self._timeout)
        except (TimeoutError, nats.errors.Error) as exc:
            raise BackendError(
                f"JetStream publish failed: {p.acked} of {len(items)} acknowledged ({exc!r})"
            ) from exc
        finally:
            self._batches.pop(batch, None)
        if p.error is not None:
            raise BackendError(f"JetStream refused a record: {p.error}")

    async def close(self) -> None:
        """Stop listening for acks."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None


#: A fetch first asks for what the consumer has now (``no_wait``: the server answers at once, with a status
#: after the messages when it has fewer than asked); this bounds the wait should that answer never come.
_NO_WAIT_S = 1.0
#: A fetch with a timeout this short or shorter does not go on to wait for a first record.
_PROBE_S = 0.005
#: How long a sole fetcher resuming after a reconnect waits for its acknowledgements to be applied.
_ACKS_SETTLE_S = 2.0
#: How long a sole fetcher tries to resume after a reconnect before it is BackendUnavailable.
_RESUME_GIVE_UP_S = 60.0
#: The descriptions of a 409 status that end a pull request without anything being wrong with the consumer.
_TRANSIENT_409 = re.compile(r"MaxWaiting|Server Shutdown|Leadership Change", re.IGNORECASE)


def _pending_of(reply: str) -> int:
    """Messages the consumer had yet to deliver when this one was delivered (the ack subject's ``<pending>``)."""
    t = reply.split(".")
    return int(t[8 if len(t) == 9 else 10])


def _ack_tokens(reply: str) -> tuple[int, int]:
    """(stream sequence, timestamp ms) from a JetStream ack subject, without building metadata objects.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts_ns>.<pending>``, or the v2 form with
    domain and account hash after ``ACK`` (and a trailing token).
    """
    t = reply.split(".")
    i = 5 if len(t) == 9 else 7
    return int(t[i]), int(t[i + 2]) // 1_000_000


class _Puller:
    """Pull requests of one durable JetStream consumer, its messages collected by a subscription callback.

    nats-py's ``PullSubscription.fetch`` waits for each message of a batch with a task of its own
    (``Subscription.next_msg``: a task, a timer and a uuid per message). At part load that was a large share of
    the processor's event loop, which shares the interpreter with the apply thread: with this puller the
    alert benchmark's event -> webhook latency at 75,000 readings/s went from p50 44-48 ms to 24 ms. Here
    one inbox subscription with a callback (nats-py's single reader task per subscription) collects the
    messages, and a fetch waits once: until it has what it asked for, or the server ends the request (status
    404 or 408, sent after the request's messages), or its own timeout. A message that comes after a fetch gave
    up waiting is kept and served by the next fetch; it is never dropped.
    """

    def __init__(self, nc: Client, stream: str, durable: str) -> None:
        self.nc = nc
        self._subject = f"{api.DEFAULT_PREFIX}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._buf: collections.deque[Msg] = collections.deque()
        self._ended = 0  # pull requests the server ended (a status message)
        self._error: Msg | None = None  # a status that is an error (409 consumer deleted, 503 ...)
        self._want = 0
        self._wake = asyncio.Event()
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        hdrs = msg.headers or {}
        status = hdrs.get(api.Header.STATUS.value) if not msg.data else None
        if status is None:
            self._buf.append(msg)
            if len(self._buf) >= self._want:
                self._wake.set()
            return
        if status == "100":  # an idle heartbeat (not asked for): nothing ended
            return
        # 404 no messages, 408 expired, 409 too many waiting requests: the request ended, nothing wrong; 409 server
        # shutdown or leadership change: the server goes away or the consumer moves, the client reconnects and the
        # next fetch asks again (a sole fetcher resumes after what it acknowledged), so the stage keeps running
        transient = status == "409" and _TRANSIENT_409.search(hdrs.get("Description", "")) is not None
        if status not in ("404", "408") and not transient:
            self._error = msg
        self._ended += 1
        self._wake.set()

    def _take(self, n: int) -> list[Msg]:
        buf = self._buf
        return [buf.popleft() for _ in range(min(n, len(buf)))]

    async def fetch(self, n: int, timeout_s: float, *, expires_s: float | None = None) -> list[Msg]:
        """Up to ``n`` messages: those kept from before, else one pull request's.

        ``expires_s`` None: what the consumer has now (``no_wait``); else the server waits that long for a first
        message. Waits at most ``timeout_s`` here.

        Raises:
            nats.js.errors.APIError: the server ended the request with an error (the consumer was deleted).
        """
        if self._buf:
            return self._take(n)
        self._want, ended = n, self._ended
        self._wake.clear()
        body: dict[str, Any] = {"batch": n}
        if expires_s is None:
            body["no_wait"] = True
        else:
            body["expires"] = int(expires_s * 1e9)
        await self.nc.publish(self._subject, json.dumps(body).encode(), reply=self._inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self._buf) < n and self._ended == ended and (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), left)
            self._wake.clear()
        if self._error is not None:
            err, self._error = self._error, None
            nats.js.errors.APIError.from_msg(err)
        return self._take(n)

    async def unsubscribe(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None


class NatsConsumer:
    """A durable pull consumer over some (or all) partitions of a topic, or over an ingest stream."""

    def __init__(
        self,
        sub: _Puller,
        topic: str,
        *,
        ack_all: bool = False,
        partitioned: bool = True,
        trim: tuple[JetStreamContext, str] | None = None,
        remake: Callable[[int], Awaitable[_Puller]] | None = None,
        exists: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._sub = sub
        self._exists = exists  # whether the durable is still on the server (True while it cannot tell)
        self._remake = remake  # a sole fetcher's durable, made again after its acknowledged floor
        self._reconnects = sub.nc.stats["reconnects"]
        self._topic = topic
        self._ack_all = ack_all
        self._partitioned = partitioned
        self._trim = trim  # (js, stream): a sole ingest consumer purges what it acknowledged
        self._acked = 0
        self._trimmed_at = 0.0
        self._held: list[BusRecord] = []  # fetched beyond a fetch's max_bytes: served first next time
        self._avg_bytes = 0.0  # moving average of record sizes, to size fetches by bytes
        self._pending = 0  # the server's count of undelivered messages at the last fetch
        self._generation = 0  # the durable's remakes so far: a record's handle is (message, generation)
        self._ack_sent = 0  # the highest stream sequence acknowledged to this generation's durable
        self._resume_failing_since: float | None = None  # when resuming after a reconnect first failed

    async def fetch(self, max_records: int, timeout_s: float, *, max_bytes: int | None = None) -> list[BusRecord]:
        """Fetch up to ``max_records`` (about ``max_bytes`` at most); an empty list when none arrived
        within ``timeout_s``."""
        if self._reconnected() and not await self._resume():
            await asyncio.sleep(min(timeout_s, 0.5))
            return []
        if self._held:
            out, self._held = split_by_bytes(self._held, max_records, max_bytes)
            return out
        n = max_records
        if max_bytes is not None and self._avg_bytes > 0:
            n = max(1, min(max_records, int(max_bytes / self._avg_bytes)))
        try:
            msgs = await self._pull(n, timeout_s)
        except nats.errors.ConnectionClosedError as exc:
            raise BackendUnavailable("NATS connection closed") from exc
        except nats.js.errors.ServiceUnavailableError:
            # No responders: the consumer is gone (an error, not silence), or a restarted nats-server has not
            # loaded it yet (the stage waits a moment and fetches again, instead of exiting)
            if self._exists is None or not await self._exists():
                raise
            log.warning("NATS consumer of %s: the server did not answer a pull request (503; restarting?), "
                        "fetching again", self._topic)
            await asyncio.sleep(min(timeout_s, 0.5))
            return []
        if self._reconnected():
            await self._resume()  # what came may follow messages the cut lost: all of it comes again, in order
            self._pending = 0
            return []
        if not msgs:
            self._pending = 0
            return []
        self._pending = _pending_of(msgs[-1].reply)
        recs = [self._record(m) for m in msgs]
        if max_bytes is None:
            return recs
        sizes = list(map(len, map(_value_of, recs)))
        size = sum(sizes) / len(recs)
        self._avg_bytes = size if not self._avg_bytes else 0.8 * self._avg_bytes + 0.2 * size
        n = fitting(sizes, max_records, max_bytes)
        self._held = recs[n:]
        return recs[:n]

    async def fetch_fields(self, max_records: int, timeout_s: float, *, max_bytes: int | None = None) -> RecordFields:
        """:meth:`fetch`'s records field by field, each with its handle (a NATS message is acknowledged by it)."""
        return RecordFields.of(self._topic, await self.fetch(max_records, timeout_s, max_bytes=max_bytes))

    def _reconnected(self) -> bool:
        """Whether a sole fetcher's connection reconnected since its durable was last made."""
        return self._remake is not None and self._sub.nc.stats["reconnects"] != self._reconnects

    async def _resume(self) -> bool:
        """After a reconnect: JetStream counts the messages of an answer cut with the connection as delivered and
        sends them again only after ``ack_wait``, while later ones come at once; a caller that skips what its
        positions passed (the processor) would lose them. So a sole fetcher's durable is made again right after
        what it acknowledged, and they come first. Records fetched before and not yet acknowledged come again
        too (a caller skips what it applied), and :meth:`ack` leaves them out: the durable made again has the
        same name, so the server would apply their acknowledgements to it, counted in the old durable's delivery
        sequence (an acknowledged floor past what it delivered: lag that never goes, seen after a full disk).

        False: the server did not answer yet (a restarted one loading its streams); the next fetch tries again,
        and after ``_RESUME_GIVE_UP_S`` of that the consumer is :class:`BackendUnavailable`."""
        assert self._remake is not None
        reconnects = self._sub.nc.stats["reconnects"]
        try:
            sub = await self._remake(self._ack_sent)
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            now = time.monotonic()
            if self._resume_failing_since is None:
                self._resume_failing_since = now
            if now - self._resume_failing_since > _RESUME_GIVE_UP_S:
                raise BackendUnavailable(f"cannot resume the consumer after a reconnect: {exc!r}") from exc
            log.warning("NATS consumer of %s: cannot resume after a reconnect yet (%r); trying again", self._topic,
                        exc)
            return False
        self._resume_failing_since = None
        old, self._sub, self._held, self._reconnects = self._sub, sub, [], reconnects
        self._generation += 1
        log.info("NATS consumer of %s resumed after what it acknowledged (a reconnect)", self._topic)
        with contextlib.suppress(nats.errors.Error):
            await old.unsubscribe()
        return True

    async def _pull(self, n: int, timeout_s: float) -> list[Msg]:
        """Up to ``n`` messages as soon as there are any, without waiting for ``n``.

        What the consumer has now is asked for without waiting (``no_wait``); when it has nothing, one
        message is waited for, up to ``timeout_s`` (the next fetch takes what came meanwhile).
        """
        msgs = await self._sub.fetch(n, min(timeout_s, _NO_WAIT_S))
        if msgs or timeout_s <= _PROBE_S:
            return msgs
        # the server ends the request when it expires (status 408): wait a little longer than that
        return await self._sub.fetch(1, timeout_s + 0.5, expires_s=timeout_s)

    def _record(self, m: Msg) -> BusRecord:
        seq, ts_ms = _ack_tokens(m.reply)
        hdrs = m.headers or {}
        key = hdrs.get("Fm-Key")
        return BusRecord(
            topic=self._topic,
            partition=_partition_of(m.subject) if self._partitioned else 0,
            offset=seq,
            value=m.data,
            key=key.encode() if key is not None else None,
            headers=hdrs,
            timestamp_ms=ts_ms,
            handle=(m, self._generation),
            subject=m.subject,
        )

    async def ack(self, records: Sequence[BusRecord]) -> None:
        """Acknowledge records (after their effects are committed).

        With an ack-all consumer (one fetcher, in order) acknowledging the last record covers the rest.
        A sole ingest consumer also purges what it acknowledged from the stream, about once a second. Records
        fetched before a reconnect made the durable again are left out (they come again).
        """
        if not records:
            return
        # records fetched before the durable was made again (:meth:`_resume`) come again: not acknowledged here
        live = [r for r in records if r.handle[1] == self._generation]
        if live:  # before the acknowledgements go out: a resume meanwhile waits for the server to apply them
            self._ack_sent = max(self._ack_sent, *(r.offset for r in live))
        if live and self._ack_all:
            await max(live, key=lambda r: r.offset).handle[0].ack()
        else:
            for r in live:
                m: Msg = r.handle[0]
                await m.ack()
        with contextlib.suppress(nats.errors.Error):
            await self._sub.nc.flush(timeout=5)
        if self._trim is not None:  # what was acknowledged before, through the durable made again, is done too
            self._acked = max(self._acked, *(r.offset for r in records))
            now = time.monotonic()
            if now - self._trimmed_at > _TRIM_EVERY_S:
                self._trimmed_at = now
                js, stream = self._trim
                await js.purge_stream(stream, seq=self._acked + 1)

    def behind(self) -> bool:
        """Whether the server had more messages for this consumer, or records are held back, at the last fetch."""
        return self._pending > 0 or bool(self._held)

    def apply_fenced(
        self, records: Sequence[BusRecord], fn: Callable[[Sequence[BusRecord]], T]
    ) -> tuple[list[BusRecord], T | None]:
        """``fn(records)``: a NATS consumer is given its partitions, no rebalance takes them away."""
        recs = list(records)
        return (recs, fn(recs)) if recs else ([], None)

    async def close(self) -> None:
        """Stop fetching (the durable consumer and its position stay on the server)."""
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()


def _split_auth(url: str) -> tuple[str, dict[str, Any]]:
    """The server list of a bus URL and nats-py's credential arguments from its query."""
    servers, _, query = url.partition("?")
    kw: dict[str, Any] = {}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        path = values[-1]
        if key == "creds":
            kw["user_credentials"] = path
        elif key == "auth_file":
            try:
                doc = json.loads(Path(path).read_text())
                kw["user"], kw["password"] = str(doc["user"]), str(doc["password"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"bus URL auth_file {path}: cannot read a user and password from it ({exc})",
                                  key="bus_url") from exc
        else:
            raise ConfigError(f"bus URL parameter {key!r} is not known: use auth_file=PATH or creds=PATH",
                              key="bus_url")
    return servers, kw


class NatsBus:
    """A connection to NATS JetStream."""

    #: consumers are given their partitions (JetStream does not balance a group's subjects)
    balances_groups = False

    def __init__(self, url: str, *, connect_timeout_s: float = 5.0) -> None:
        self.url = url
        self._servers, self._auth = _split_auth(url)
        self._timeout = connect_timeout_s
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._ingest_streams: dict[str, str] = {}  # ingest names given as stream names -> stream

    def _stream_of(self, topic: str) -> str:
        return self._ingest_streams.get(topic) or stream_name(topic)

    async def __aenter__(self) -> Self:
        await self._probe()
        try:
            self._nc = await nats.connect(
                self._servers,
                **self._auth,
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
        for server in self._servers.split(","):
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

    def producer(self) -> PipelinedNatsProducer:
        """A (pipelined) producer on this connection."""
        return PipelinedNatsProducer(self.nc)

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

        A sole owner (``reset_pending``) acknowledges in fetch order (:meth:`Consumer.ack
        <fieldmesh.bus.base.Consumer.ack>`), so its durable acknowledges all up to a record (``AckPolicy.ALL``):
        one acknowledgement per batch instead of one per record.
        """
        subjects = [f"{topic}.*"] if partitions is None else [f"{topic}.{p}" for p in sorted(partitions)]
        start: int | None = None
        rewind: int | None = None
        if positions is not None and partitions is not None:
            pos = positions(sorted(partitions))
            start = 1 if not pos or len(pos) < len(set(partitions)) else min(pos.values()) + 1
            # a partition never applied (absent) needs everything: as if applied through 0
            rewind = await self._rewind_to(stream_name(topic), group, topic,
                                           {p: pos.get(p, 0) for p in partitions})
        return await self.raw_consumer(stream_name(topic), group, subjects, topic=topic, start_seq=start,
                                       reset_pending=reset_pending, ack_all=reset_pending, rewind_to=rewind)

    async def _rewind_to(self, stream: str, group: str, topic: str, pos: Mapping[int, int]) -> int | None:
        """Where an existing consumer must restart so that no record after ``pos`` is skipped: the lowest
        ``pos[p] + 1`` over partitions with records between their position and the acknowledged floor
        (a caller that acknowledged records another of its sinks has not made durable); None: its floor is fine.

        A partition with nothing after its position (an idle one) does not pull the start back.
        """
        info = await self._consumer_info(stream, group)
        if info is None or not info.ack_floor or not info.ack_floor.stream_seq:
            return None
        floor = int(info.ack_floor.stream_seq)
        behind = [(p, o) for p, o in pos.items() if o < floor]
        if not behind:
            return None
        beyond_floor = {p: await self._count_after(stream, [f"{topic}.{p}"], floor) for p, _ in behind}
        starts = [o + 1 for p, o in behind
                  if await self._count_after(stream, [f"{topic}.{p}"], o) > beyond_floor[p]]
        return min(starts) if starts else None

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
        partitioned: bool = True,
        trim: bool = False,
        rewind_to: int | None = None,
    ) -> NatsConsumer:
        """A durable pull consumer on any stream and subject filters.

        ``reset_pending`` (for a single owner, such as a processor replica) redelivers at once what a
        crashed predecessor had fetched but not acknowledged, instead of after ``ack_wait``.
        ``rewind_to``: an existing consumer whose acknowledged floor is at or beyond this sequence
        restarts there (records the caller acknowledged but needs again).
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
                same = sorted(info.config.filter_subjects or [info.config.filter_subject or ""]) == sorted(subjects)
                floor = info.ack_floor.stream_seq if info.ack_floor else 0
                rewind = rewind_to is not None and rewind_to <= floor
                policy = info.config.ack_policy == cfg.ack_policy  # a consumer's policy cannot be changed in place
                if not same or not policy or (reset_pending and info.num_ack_pending) or rewind:
                    # Delivered-but-unacknowledged messages would only come back after ack_wait: start a
                    # fresh consumer right after the acknowledged floor instead (or where the caller says
                    # when the filter changed, or when it needs acknowledged records again).
                    start = (start_seq or 1) if not same else floor + 1
                    if rewind and rewind_to is not None:
                        start = min(start, rewind_to)
                    await self._start_at(stream, cfg, max(start, 1))
            except nats.js.errors.NotFoundError:
                await self.js.add_consumer(stream, cfg)
            sub = _Puller(self.nc, stream, durable)
            await sub.start()
        except nats.js.errors.Error as exc:
            raise BackendError(f"cannot create consumer {durable} on {stream}: {exc}") from exc

        async def remake(acked: int) -> _Puller:
            # JetStream applies acknowledgements in the background: one sent before the reconnect, or buffered
            # through it, could reach the durable made again (same name) counted in the old delivery sequence,
            # leaving an acknowledged floor past what it delivered and lag that never goes. So wait (briefly)
            # until the floor has what was sent; one lost with the connection only means its records come again.
            info = await self.js.consumer_info(stream, durable)
            deadline = time.monotonic() + _ACKS_SETTLE_S
            while (info.ack_floor.stream_seq if info.ack_floor else 0) < acked and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                info = await self.js.consumer_info(stream, durable)
            # Made again even with nothing pending now: a pull request sent before the reconnect (buffered through
            # it, or still held by the server) can be answered by the old durable after this check, to the old
            # inbox, which nothing reads; deleting the durable ends those requests, and the new one starts after
            # its acknowledged floor.
            await self._start_at(stream, cfg, (info.ack_floor.stream_seq if info.ack_floor else 0) + 1)
            fresh = _Puller(self.nc, stream, durable)  # a new inbox: answers to the old one's requests go nowhere
            await fresh.start()
            return fresh

        async def exists() -> bool:
            try:
                await self.js.consumer_info(stream, durable, timeout=2.0)
            except nats.js.errors.NotFoundError:
                return False
            except (nats.errors.Error, nats.js.errors.Error):
                return True  # JetStream does not answer yet (a restart): the durable is on disk
            return True

        return NatsConsumer(sub, topic or stream, ack_all=ack_all, partitioned=partitioned,
                            trim=(self.js, stream) if trim else None, remake=remake if reset_pending else None,
                            exists=exists)

    async def _start_at(self, stream: str, cfg: api.ConsumerConfig, seq: int) -> None:
        """Make durable ``cfg`` again, delivering from stream sequence ``seq`` (what it had delivered is forgotten)."""
        assert cfg.durable_name is not None
        cfg.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
        cfg.opt_start_seq = seq
        await self.js.delete_consumer(stream, cfg.durable_name)
        await self.js.add_consumer(stream, cfg)

    async def pending(self, topic: str, *, group: str) -> int:
        """Messages not yet acknowledged by consumer ``group`` (its lag)."""
        return await self.raw_pending(self._stream_of(topic), group)

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

    async def topic_exists(self, topic: str) -> bool:
        """Whether the stream of ``topic`` exists."""
        try:
            await self.js.stream_info(self._stream_of(topic))
        except nats.js.errors.NotFoundError:
            return False
        return True

    async def partition_count(self, topic: str) -> int | None:
        """Partitions of a topic (an ingest stream has one), None when its stream does not exist."""
        try:
            info = await self.js.stream_info(self._stream_of(topic))
        except nats.js.errors.NotFoundError:
            return None
        return _partitions(info) or 1

    async def ingest(self, spec: IngestSpec, *, group: str, sole: bool = False) -> NatsConsumer:
        """The stream of ``spec`` (``fm.ingest`` -> ``FM_INGEST``; a name without a dot as it is) and the
        durable consumer ``group`` over ``spec.subjects``.

        A sole consumer acknowledges all up to a record at once and purges what it acknowledged about
        once a second; otherwise the stream's age limit removes old messages.
        """
        stream = stream_name(spec.name) if "." in spec.name else spec.name
        self._ingest_streams[spec.name] = stream
        subjects = list(spec.subjects)
        if spec.mode == "own":
            await self.ensure_stream(stream, subjects, retention_s=spec.retention_s, max_bytes=spec.max_bytes)
        else:
            try:
                await self.js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                if spec.mode == "existing":
                    raise ConfigError(f"NATS stream {stream!r} does not exist on {self.url}: create it, or fix "
                                      "the stream in --ingest-url", key="ingest_url") from None
                await self.ensure_stream(stream, subjects, retention_s=spec.retention_s, max_bytes=spec.max_bytes)
        start = await self._resume_seq(stream, group, spec.resume_from) if spec.resume_from else None
        return await self.raw_consumer(stream, group, subjects, topic=spec.name, ack_wait_s=30.0,
                                       reset_pending=sole, ack_all=sole, start_seq=start, partitioned=False,
                                       trim=sole)

    async def _resume_seq(self, stream: str, durable: str, old_filters: Sequence[str]) -> int | None:
        """Where a consumer found with the filters of an earlier version resumes: after its floor.

        The new filter covers the old one, so every message up to the floor was acknowledged; starting
        from 1 would only redeliver them.
        """
        try:
            info = await self.js.consumer_info(stream, _SAFE.sub("_", durable))
        except nats.js.errors.NotFoundError:
            return None
        if sorted(info.config.filter_subjects or [info.config.filter_subject or ""]) != sorted(old_filters):
            return None
        return (info.ack_floor.stream_seq if info.ack_floor else 0) + 1

    async def _consumer_info(self, stream: str, group: str) -> api.ConsumerInfo | None:
        try:
            info: api.ConsumerInfo = await self.js.consumer_info(stream, _SAFE.sub("_", group))
            return info
        except nats.js.errors.NotFoundError:
            return None

    async def lag(
        self, topic: str, *, group: str, positions: Mapping[int, int] | None = None
    ) -> dict[int, int]:
        """Messages per partition after ``positions``, else after the group's acknowledged floor.

        Counted by short-lived filtered consumers (one per partition) that only read ``num_pending``.
        """
        stream = self._stream_of(topic)
        try:
            sinfo = await self.js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            return {}
        positions = positions or {}
        info = await self._consumer_info(stream, group)
        floor = info.ack_floor.stream_seq if info is not None and info.ack_floor else 0
        n = _partitions(sinfo)
        if not n:  # an ingest stream: one partition
            if 0 not in positions and info is not None:
                return {0: int(info.num_pending or 0) + int(info.num_ack_pending or 0)}
            flt = (info.config.filter_subjects or [info.config.filter_subject or ""]) if info is not None else []
            return {0: await self._count_after(stream, [f for f in flt if f], positions.get(0, floor))}
        parts = _filter_partitions(info, topic, n) if info is not None else list(range(n))
        return {p: await self._count_after(stream, [f"{topic}.{p}"], positions.get(p, floor)) for p in parts}

    async def _count_after(self, stream: str, subjects: list[str], seq: int) -> int:
        """Messages on ``subjects`` (all when empty) with a sequence above ``seq``."""
        cfg = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=max(1, seq + 1),
            ack_policy=api.AckPolicy.NONE,
            filter_subject=subjects[0] if len(subjects) == 1 else None,
            filter_subjects=subjects if len(subjects) > 1 else None,
            inactive_threshold=10.0,
            mem_storage=True,
        )
        info = await self.js.add_consumer(stream, cfg)
        with contextlib.suppress(nats.js.errors.Error):
            await self.js.delete_consumer(stream, info.name)
        return int(info.num_pending or 0)

    async def committed(self, topic: str, *, group: str) -> dict[int, int]:
        """Per partition of the group's filter, the stream sequence through which it acknowledged all.

        JetStream keeps one acknowledged floor per consumer; it holds for each of its partitions.
        """
        stream = self._stream_of(topic)
        info = await self._consumer_info(stream, group)
        if info is None or not info.ack_floor or not info.ack_floor.stream_seq:
            return {}
        floor = int(info.ack_floor.stream_seq)
        n = _partitions(await self.js.stream_info(stream))
        return dict.fromkeys(_filter_partitions(info, topic, n) if n else [0], floor)

    async def drop_consumer(self, topic: str, *, group: str) -> None:
        """Delete the durable consumer ``group`` of the topic's stream (nothing when there is none)."""
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_consumer(self._stream_of(topic), _SAFE.sub("_", group))


def _filter_partitions(info: api.ConsumerInfo, topic: str, n: int) -> list[int]:
    """The partitions a consumer's subject filter selects out of ``n``."""
    parts: set[int] = set()
    for f in info.config.filter_subjects or [info.config.filter_subject or ""]:
        tail = f[len(topic) + 1:] if f.startswith(f"{topic}.") else ""
        if tail.isdigit():
            parts.add(int(tail))
        else:  # a wildcard (or no filter): all of them
            parts.update(range(n))
    return sorted(p for p in parts if p < n)


def _partitions(info: api.StreamInfo) -> int:
    """The partition count kept in a topic stream's metadata (0: not a partitioned topic)."""
    have = (info.config.metadata or {}).get("fm_partitions")
    return int(have) if have is not None else 0


if TYPE_CHECKING:  # the adapter implements the whole contract (checked by mypy, not at run time)
    from fieldmesh.bus.base import Bus, Consumer, Producer

    def _implements(b: NatsBus, c: NatsConsumer, p: PipelinedNatsProducer) -> tuple[Bus, Consumer, Producer]:
        return b, c, p
