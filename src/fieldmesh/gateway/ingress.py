"""Ingress from topics users already have: a Kafka topic or a NATS subject of raw device readings.

Many deployments land device telemetry in Kafka before fieldmesh sees it (an MQTT-to-Kafka
bridge, AWS IoT rules, Azure Event Hubs' Kafka endpoint) or publish it on NATS subjects. These
sources hand such messages to the gateway exactly like MQTT messages, so validation, the DLQ and
de-duplication are the same (:func:`fieldmesh.gateway.gateway.route`).

URLs::

    kafka://host:9092[,host:9092]/TOPIC?group=fm-ingest&device_template=...&<librdkafka settings>
    nats://host:4222/SUBJECT.FILTER?stream=NAME&durable=fm-ingest&device_template=...

Payloads are the docs/contract.md shapes (one reading, an array of readings, or a batch object), JSON
unless a ``content-type`` header names another registered encoding. **Device id rule**, first match
wins:

1. the message key (Kafka), when it is not empty;
2. the payload's ``device_id`` (of the object, or of the first reading of an array);
3. ``device_template`` matched against the topic or subject name: ``{device}`` stands for the
   device id, ``*`` for any one name token (``.``/``/``-separated), e.g. ``plant.*.{device}.tm``.
   A NATS subject ``devices.<id>.telemetry`` needs no template.

A message whose device id cannot be found goes to the DLQ (``schema_violation``); a key and a
payload ``device_id`` that differ are rejected as ``device_mismatch``, as on MQTT (``unauthorized`` when
the gateway takes topics as authenticated identities, ``gateway.authenticated_topics`` or enforced
registration, whose check applies to the device found here).

Acknowledgement: the gateway calls :meth:`ack` only after the bus acknowledged every record
derived from the messages; only then are the Kafka offsets committed (or the JetStream messages
acknowledged). A crash in between redelivers them (at least once); the processor's identity
de-duplication absorbs the repeats.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat
from operator import attrgetter
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec

from fieldmesh.bus import load_bus
from fieldmesh.bus.base import Bus, BusRecord, Consumer, IngestSpec
from fieldmesh.core.errors import ConfigError
from fieldmesh.core.topics import DEVICE_ID_RE, device_of_topic
from fieldmesh.gateway.base import NO_DEVICE_TOPIC_PREFIX, IngestMessage, IngestSource, schema_id_of, trace_of
from fieldmesh.obs import tracing

__all__ = ["DeviceResolver", "KafkaIngestSource", "NatsSubjectSource", "load_ingest"]


_handle_of = attrgetter("handle")


class _Peek(msgspec.Struct):
    device_id: str | None = None


_peek_decoder = msgspec.json.Decoder(_Peek | list[_Peek])


class DeviceResolver:
    """Finds a message's device id: key, then payload ``device_id``, then the topic template."""

    def __init__(self, template: str | None = None) -> None:
        self.template = template
        self._re: re.Pattern[str] | None = None
        if template:
            if template.count("{device}") != 1:
                raise ConfigError(
                    f"device_template {template!r} must contain '{{device}}' exactly once", key="device_template"
                )
            pat = "".join(
                "(?P<device>[A-Za-z0-9_-]{1,128})" if tok == "{device}" else "[^./]+" if tok == "*" else re.escape(tok)
                for tok in re.split(r"(\{device\}|\*)", template)
            )
            self._re = re.compile(pat)
        self._by_topic: dict[str, str | None] = {}

    def from_topic(self, topic: str) -> str | None:
        """The device id a topic or subject name carries (cached per name)."""
        try:
            return self._by_topic[topic]
        except KeyError:
            pass
        dev: str | None = None
        if self._re is not None:
            m = self._re.fullmatch(topic)
            dev = m.group("device") if m else None
        else:
            dev = device_of_topic(topic)
        if len(self._by_topic) < 100_000:
            self._by_topic[topic] = dev
        return dev

    def resolve(self, key: bytes | None, payload: bytes, topic: str) -> str | None:
        """The device id of one message, or None when none of the rules finds one."""
        if key:
            return key.decode("utf-8", errors="replace")
        try:
            peek = _peek_decoder.decode(payload)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            peek = None  # the gateway dead-letters the payload with its reason (too_deep for a RecursionError)
        if isinstance(peek, list):
            peek = peek[0] if peek else None
        if peek is not None and peek.device_id:
            return str(peek.device_id)
        return self.from_topic(topic)


def _device_topic(device: str | None, source_topic: str) -> str:
    """The MQTT-shaped topic the gateway routes by (a non-telemetry topic when no device is known)."""
    if device is None or not DEVICE_ID_RE.fullmatch(device):
        shown = "" if device is None else f" {device[:130]!r}"
        return f"{NO_DEVICE_TOPIC_PREFIX}{source_topic}/no valid device id{shown}"
    return f"devices/{device}/telemetry"


def _content_type(headers: Mapping[str, str]) -> str | None:
    """The content type header, whatever its case (Kafka headers are free-form)."""
    ct = headers.get("Content-Type")
    if ct is None:
        ct = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    return ct or None


def _content_and_schema(headers: Sequence[Mapping[str, str] | None]) -> tuple[list[str | None], list[int | None]]:
    """Content types and schema ids of messages with headers (a message naming a schema has a content type:
    it keeps it off the gateway's bulk JSON path)."""
    cts = [_content_type(h) if h else None for h in headers]
    sids = [schema_id_of(h) for h in headers]
    marked = [ct or ("application/octet-stream" if s is not None else None) for ct, s in zip(cts, sids, strict=True)]
    return marked, sids


def _split(url: str, own: set[str]) -> tuple[str, str, dict[str, str]]:
    """``(url without path and our own params, path, our params)``."""
    parts = urlsplit(url)
    mine: dict[str, str] = {}
    rest: list[tuple[str, str]] = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        (mine.__setitem__(k, v) if k in own else rest.append((k, v)))
    base = urlunsplit((parts.scheme, parts.netloc, "", urlencode(rest), ""))
    return base, parts.path.lstrip("/"), mine


class KafkaIngestSource:
    """A Kafka topic of raw device readings, consumed by a consumer group of gateways.

    Several gateways with the same ``group`` split the topic's partitions; offsets are committed
    only after the bus acknowledged what the gateway derived from them.
    """

    name = "kafka-ingest"

    def __init__(self, url: str, *, group: str = "fm-ingest", device_template: str | None = None) -> None:
        base, topic, mine = _split(url, {"group", "device_template"})
        if not topic or "/" in topic:
            raise ConfigError(
                f"Kafka ingest URL {url!r} must name one topic: kafka://host:port/TOPIC", key="ingest_url"
            )
        self.url = url
        self.topic = topic
        self.group = mine.get("group", group)
        self._bus: Bus = load_bus(base)
        self._resolver = DeviceResolver(mine.get("device_template", device_template))
        self._topic_of_key: dict[bytes | None, str] = {}
        self._consumer: Consumer | None = None
        #: ``k{topic}-{partition}-{offset}``: the message's stable id, for idempotent re-sends
        self._source_id = ("k" + topic.replace("{", "{{").replace("}", "}}") + "-{}-{}").format

    async def start(self) -> None:
        """Connect and join the consumer group (the topic must exist)."""
        await self._bus.__aenter__()
        try:
            self._consumer = await self._bus.ingest(IngestSpec(self.topic, mode="existing"), group=self.group)
        except BaseException:
            await self._bus.__aexit__(None, None, None)
            raise

    async def fetch(self, max_messages: int, timeout_s: float, *, max_bytes: int | None = None) -> list[IngestMessage]:
        """Fetch raw messages and give each the telemetry topic of its device.

        The records come field by field (:meth:`~fieldmesh.bus.base.Consumer.fetch_fields`): each message's only
        object is its :class:`IngestMessage`, whose ``handle`` is its ``(partition, offset)`` (a Kafka consumer
        acknowledges by position)."""
        assert self._consumer is not None, "start() first"
        raw = await self._consumer.fetch_fields(max_messages, timeout_s, max_bytes=max_bytes)
        now = int(time.time() * 1000)
        n = len(raw)
        keys, values, headers = raw.keys, raw.values, raw.headers
        # hot path: a keyed message's telemetry topic is cached per key (never an empty key: it says nothing)
        by_key = self._topic_of_key
        topics = list(map(by_key.get, keys))
        if None in topics:
            resolve = self._resolver.resolve
            for i, t in enumerate(topics):
                if t is None:
                    key = keys[i]
                    topics[i] = t = _device_topic(resolve(key, values[i], self.topic), self.topic)
                    if key and len(by_key) < 1_000_000:
                        by_key[key] = t
        cts: Iterable[str | None] = repeat(None, n)
        sids: Iterable[int | None] = repeat(None, n)
        if any(headers):
            cts, sids = _content_and_schema(headers)
        source_ids = map(self._source_id, raw.partitions, raw.offsets)
        handles = zip(raw.partitions, raw.offsets, strict=True)
        # map() calls the struct's constructor from C: no Python frame per message
        if tracing.enabled() and any(headers):
            tps, tss = zip(*map(trace_of, headers), strict=True)
            return list(map(IngestMessage, topics, values, repeat(now, n), cts, source_ids, handles, sids, tps, tss))
        return list(map(IngestMessage, topics, values, repeat(now, n), cts, source_ids, handles, sids))

    async def ack(self, messages: Sequence[IngestMessage]) -> None:
        """Commit the offsets after ``messages`` (they are on the bus now)."""
        if messages:
            assert self._consumer is not None, "start() first"
            # fetch order: a partition's last message is its highest offset (the dict keeps the last one)
            last = dict(map(_handle_of, messages))
            await self._consumer.ack([BusRecord(self.topic, p, o, b"") for p, o in last.items()])

    async def close(self) -> None:
        """Leave the group (its partitions move to the other gateways)."""
        await self._bus.__aexit__(None, None, None)

    async def pending(self) -> int:
        """The group's lag on the ingest topic (from the broker's watermarks)."""
        return int(await self._bus.pending(self.topic, group=self.group))


class NatsSubjectSource:
    """Raw device readings published on NATS subjects, captured by a JetStream stream.

    ``stream`` names the stream: created over the subject filter when it does not exist (a stream
    you already have that captures the subjects is used as it is). Gateways sharing ``durable``
    split the messages (JetStream hands each to one of them).
    """

    name = "nats-subject"

    def __init__(
        self, url: str, *, stream: str = "FM_INGRESS", durable: str = "fm-ingest", device_template: str | None = None,
        retention_s: int = 7 * 86400,
    ) -> None:
        base, subject, mine = _split(url, {"stream", "durable", "device_template"})
        if not subject:
            raise ConfigError(
                f"NATS ingest URL {url!r} must name a subject: nats://host:port/SUBJECT", key="ingest_url"
            )
        self.url = url
        self.subject = subject
        self.stream = mine.get("stream", stream)
        self.durable = mine.get("durable", durable)
        self._retention_s = retention_s
        self._bus: Bus = load_bus(base)
        self._resolver = DeviceResolver(mine.get("device_template", device_template))
        self._consumer: Consumer | None = None

    async def start(self) -> None:
        """Connect, create the stream if needed, and bind the durable consumer."""
        await self._bus.__aenter__()
        spec = IngestSpec(self.stream, (self.subject,), mode="adopt", retention_s=self._retention_s)
        self._consumer = await self._bus.ingest(spec, group=self.durable)

    async def fetch(self, max_messages: int, timeout_s: float, *, max_bytes: int | None = None) -> list[IngestMessage]:
        """Fetch raw messages and give each the telemetry topic of its device."""
        assert self._consumer is not None, "start() first"
        recs = await self._consumer.fetch(max_messages, timeout_s, max_bytes=max_bytes)
        now = int(time.time() * 1000)
        out = []
        for r in recs:
            subject = r.subject
            ct = r.headers.get("Content-Type") if r.headers else None
            sid = schema_id_of(r.headers) if r.headers else None
            tp, ts = trace_of(r.headers) if r.headers and tracing.enabled() else (None, None)
            out.append(
                IngestMessage(
                    topic=_device_topic(self._resolver.resolve(r.key, r.value, subject), subject),
                    payload=r.value,
                    received_ms=now,
                    content_type=ct or ("application/octet-stream" if sid is not None else None),
                    source_id=f"n{self.stream}-{r.offset}",
                    handle=r,
                    schema_id=sid,
                    traceparent=tp,
                    tracestate=ts,
                )
            )
        return out

    async def ack(self, messages: Sequence[IngestMessage]) -> None:
        """Acknowledge the messages (they are on the bus now)."""
        assert self._consumer is not None, "start() first"
        await self._consumer.ack([m.handle for m in messages])

    async def close(self) -> None:
        """Stop fetching (the durable consumer keeps its position)."""
        if self._consumer is not None:
            await self._consumer.close()
        await self._bus.__aexit__(None, None, None)

    async def pending(self) -> int:
        """Messages not yet taken through the gateway."""
        return int(await self._bus.pending(self.stream, group=self.durable))


def load_ingest(url: str, *, retention_s: int = 7 * 86400) -> IngestSource:
    """An ingest source for ``url``: ``kafka://host:port/TOPIC`` or ``nats://host:port/SUBJECT``."""
    scheme = url.split("://", 1)[0].lower()
    if scheme == "kafka":
        return KafkaIngestSource(url)
    if scheme in ("nats", "tls"):
        return NatsSubjectSource(url, retention_s=retention_s)
    raise ConfigError(
        f"unsupported ingest URL {url!r}: use kafka://host:port/TOPIC or nats://host:port/SUBJECT", key="ingest_url"
    )
