"""The gateway's input contract: a source of raw device messages with explicit acknowledgement.

A source acknowledges a message to its sender (MQTT PUBACK / JetStream ack) only when the gateway
calls :meth:`IngestSource.ack`, which it does after the bus acknowledged everything derived from
that message (readings and dead letters). A crash in between redelivers the message; the
processor's identity de-duplication absorbs the repeat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import msgspec

__all__ = ["NO_DEVICE_TOPIC_PREFIX", "IngestMessage", "IngestSource", "schema_id_of", "trace_of"]

#: The topic prefix a Kafka/NATS ingress gives a message whose device id none of its rules finds: the
#: gateway dead-letters it as ``schema_violation`` (not ``unknown_topic``: the topic is not the fault).
NO_DEVICE_TOPIC_PREFIX = "ingress/"


class IngestMessage(msgspec.Struct, frozen=True, gc=False):
    """A raw message as it arrived from a device (a msgspec struct: one is made per message)."""

    topic: str
    payload: bytes
    received_ms: int
    content_type: str | None = None
    #: A stable id of this message at its source (e.g. a stream sequence), for idempotent re-sends.
    source_id: str | None = None
    handle: Any = None
    #: The registered schema the payload (unframed) is written against, announced by the sender (an MQTT 5
    #: user property or a Kafka/NATS header ``schema_id``); a source that sets it must also set a content
    #: type, which keeps the message off the gateway's bulk JSON path.
    schema_id: int | None = None
    #: W3C trace context the sender attached (MQTT 5 user properties, Kafka/NATS headers ``traceparent``,
    #: ``tracestate``); read only while tracing is on (:mod:`fieldmesh.obs.tracing`).
    traceparent: str | None = None
    tracestate: str | None = None


def schema_id_of(headers: Mapping[str, str] | None) -> int | None:
    """The ``schema_id`` header (a registered schema's id, for an unframed body), whatever its case; -1 when
    it is not a number (the gateway then finds no such schema: ``unknown_schema``)."""
    if not headers:
        return None
    v = headers.get("schema_id")
    if v is None:
        v = next((x for k, x in headers.items() if k.lower() == "schema_id"), None)
        if v is None:
            return None
    return int(v) if v.isascii() and v.isdigit() and len(v) < 11 else -1


def trace_of(headers: Mapping[str, str] | Sequence[tuple[str, str]] | None) -> tuple[str | None, str | None]:
    """``(traceparent, tracestate)`` of headers or MQTT 5 user properties (pairs), whatever their case."""
    if not headers:
        return None, None
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    tp = ts = None
    for k, v in pairs:
        lk = k.lower()
        if lk == "traceparent":
            tp = v
        elif lk == "tracestate":
            ts = v
    return tp, ts


class IngestSource(Protocol):
    """Where the gateway reads device messages from."""

    name: str

    async def start(self) -> None: ...

    async def fetch(self, max_messages: int, timeout_s: float, *, max_bytes: int | None = None) -> list[IngestMessage]:
        """Up to ``max_messages`` messages (an empty list after ``timeout_s``); with ``max_bytes``, their payloads
        add up to that many bytes at most (always at least one message), and the rest comes next time."""
        ...

    async def ack(self, messages: Sequence[IngestMessage]) -> None: ...

    async def close(self) -> None: ...
