"""The gateway: raw device messages -> decode -> validate -> bus (keyed by device) or DLQ.

Every message taken from the source ends as readings on the bus, as a dead letter with a reason, or
(for the known non-telemetry device topics, ``devices/{id}/state|config|anomalies``) acknowledged and
ignored. One message can cost only itself: an exception while routing it, whatever its cause,
becomes its dead letter; the worker goes on with the next.

Before decoding, an :class:`~fieldmesh.gateway.admission.Admission` may refuse messages by their
device: not registered (``unknown_device``), suspended or retired (``unauthorized``), over its rate
limit (``rate_limited``). Refused messages are dead-lettered like any other rejection.

A payload framed the Confluent way (magic byte 0 and a schema id) or announcing a ``schema_id`` is
decoded by its registered schema (:mod:`fieldmesh.gateway.schemas`): a body its schema refuses is a
``schema_violation``, an id the registry does not hold ``unknown_schema``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import logging
import random
import time
from collections.abc import Sequence
from operator import attrgetter, itemgetter
from typing import Any

import msgspec
import numpy as np

from fieldmesh.bus.base import OutRecord, Producer
from fieldmesh.core.aio import unless_stopped
from fieldmesh.core.batch import ReadingColumns, reading_fields
from fieldmesh.core.codec import (
    DLQ_PAYLOAD_LIMIT,
    DecodeResult,
    decode_plain_fields,
    decode_single_fields,
    decode_telemetry,
    decode_telemetry_body,
    encode_bus_batch,
    encode_bus_columns,
    encode_dead_letter,
    encoding_for,
)
from fieldmesh.core.errors import FieldmeshError
from fieldmesh.core.model import BusBatch, DeadLetter, Reading
from fieldmesh.core.settings import GatewaySettings
from fieldmesh.core.topics import DLQ_TOPIC, READINGS_TOPIC, partition_for, route_of_topic
from fieldmesh.gateway.admission import Admission
from fieldmesh.gateway.base import NO_DEVICE_TOPIC_PREFIX, IngestMessage, IngestSource
from fieldmesh.gateway.schemas import DecodeError, WireSchemas, telemetry_of
from fieldmesh.obs import tracing
from fieldmesh.obs.metrics import (
    GATEWAY_BATCH,
    GATEWAY_MESSAGES,
    GATEWAY_READINGS,
    GATEWAY_REJECTED,
    GATEWAY_SEND_SECONDS,
)

__all__ = ["Gateway", "GatewayStats", "route"]

log = logging.getLogger(__name__)
#: Readings per bus message at most (keeps bus messages well under NATS's max payload).
MAX_READINGS_PER_RECORD = 2000


class GatewayStats:
    """In-process counters of one gateway: messages and readings taken, dead letters by reason."""

    def __init__(self) -> None:
        self.messages = 0
        self.readings = 0
        self.rejected: dict[str, int] = {}


#: topic -> the device whose telemetry it carries, "" for any other topic (checked by an Admission).
_CHECKED: dict[str, str] = {}


def _checked_device(topic: str) -> str:
    kind, device, _ = route_of_topic(topic)
    d = device if kind == "telemetry" and device else ""
    if len(_CHECKED) >= _ROUTES_MAX:
        _CHECKED.clear()
    _CHECKED[topic] = d
    return d


def _admit(
    messages: Sequence[IngestMessage], topics: list[str], admission: Admission, now_ms: int
) -> tuple[Sequence[IngestMessage], list[DeadLetter], list[str | None]]:
    """The messages ``admission`` lets through, and the dead letters (with their ids) of those it refuses."""
    devices: list[str | None] = list(map(_CHECKED.get, topics))
    if None in devices:
        devices = [_checked_device(t) if d is None else d for t, d in zip(topics, devices, strict=True)]
    shown = list(devices)
    refused = admission.refuse(devices, list(map(_payload_of, messages)), now_ms)
    if not refused:
        return messages, [], []
    dead = []
    ids: list[str | None] = []
    for i, (reason, detail) in sorted(refused.items()):
        m = messages[i]
        dead.append(_dead_letter(reason, detail, m, shown[i] or None))
        ids.append(f"{m.source_id}-0" if m.source_id else None)
    return [m for i, m in enumerate(messages) if i not in refused], dead, ids


def _as_unauthorized(d: DeadLetter) -> DeadLetter:
    """A ``device_mismatch`` where the topic is the sender's authenticated identity: ``unauthorized``."""
    if d.reason != "device_mismatch":
        return d
    return msgspec.structs.replace(d, reason="unauthorized", detail=(
        f"{d.detail}: the topic names the authenticated sender, which may publish only its own readings")[:300])


_ROUTES: dict[tuple[str, int], tuple[str, str | None, str | None, int]] = {}
_ROUTES_MAX = 200_000


def _route_of(topic: str, partitions: int) -> tuple[str, str | None, str | None, int]:
    """(kind, device id, topic suffix, partition) of a topic, cached: topics repeat, one per device."""
    kind, device, suffix = route_of_topic(topic)
    r = (kind, device, suffix, partition_for(device, partitions) if device else 0)
    if len(_ROUTES) >= _ROUTES_MAX:
        _ROUTES.clear()
    _ROUTES[(topic, partitions)] = r
    return r


def _dead_letter(reason: str, detail: str, m: IngestMessage, device_id: str | None = None) -> DeadLetter:
    truncated = len(m.payload) > DLQ_PAYLOAD_LIMIT
    return DeadLetter(reason=reason, detail=detail, topic=m.topic, received_ms=m.received_ms,
                      payload=m.payload[:DLQ_PAYLOAD_LIMIT], device_id=device_id, truncated=truncated)


#: Encodings whose payloads may start with a zero byte: never taken as Confluent framing.
_BINARY_ENCODINGS = frozenset({"msgpack", "json+zstd"})


#: topic -> the schema subject ``gateway.schema_subjects`` binds it to (None: none), for the mapping in _BOUND_FOR.
_BOUND: dict[str, str | None] = {}
_BOUND_FOR: list[dict[str, str]] = [{}]


def _subject_of(topic: str, subjects: dict[str, str]) -> str | None:
    """The subject of the first pattern of ``subjects`` that ``topic`` matches (cached per topic)."""
    if _BOUND_FOR[0] is not subjects:
        _BOUND.clear()
        _BOUND_FOR[0] = subjects
    try:
        return _BOUND[topic]
    except KeyError:
        pass
    found = next((s for pat, s in subjects.items() if fnmatch.fnmatchcase(topic, pat)), None)
    if len(_BOUND) >= _ROUTES_MAX:
        _BOUND.clear()
    _BOUND[topic] = found
    return found


def _schema_dead(reason: str, detail: str, m: IngestMessage, device: str) -> DecodeResult:
    return DecodeResult([], [_dead_letter(reason, detail[:300], m, device)])


def _decode_with_schema(
    m: IngestMessage, device: str, settings: GatewaySettings, now_ms: int, schemas: WireSchemas | None,
    subject: str | None = None,
) -> DecodeResult:
    """Readings of a payload written against a registered schema: framed, announced by ``schema_id``,
    or else (unframed) the latest schema of ``subject``, the topic's binding."""
    p = m.payload
    if len(p) > settings.max_payload_bytes:
        return _schema_dead("too_large", f"{len(p)} bytes > {settings.max_payload_bytes}", m, device)
    framed = m.schema_id is None and subject is None
    sid: int | None = m.schema_id
    if framed:
        if len(p) < 5:
            return _schema_dead("schema_violation", f"a framed payload (magic byte 0) of {len(p)} bytes: the "
                                "header alone is 5 (magic byte, 4-byte schema id)", m, device)
        sid = int.from_bytes(p[1:5], "big")
    named = f"schema id {sid}" if sid is not None else f"subject {subject!r}"
    if schemas is None:
        return _schema_dead("unknown_schema", f"{named}: this gateway reads no schema registry", m, device)
    dec = schemas.get(sid) if sid is not None else schemas.latest(subject or "")
    if isinstance(dec, str):
        return _schema_dead("unknown_schema", dec, m, device)
    sid = dec.schema_id
    try:
        record = dec.decode(p, 5 if framed else 0, framed)
    except DecodeError as exc:
        return _schema_dead("schema_violation", f"schema id {sid} ({dec.schema_type}): at {exc.path}: {exc.detail}",
                            m, device)
    except RecursionError:
        return _schema_dead("too_deep", f"schema id {sid} ({dec.schema_type}): the record is nested too deep", m,
                            device)
    except Exception as exc:  # a decoder failing in a way nobody foresaw: this payload's fault, as a violation
        return _schema_dead("schema_violation", f"schema id {sid} ({dec.schema_type}): at $: does not decode: "
                            f"{type(exc).__name__}: {exc}", m, device)
    res = decode_telemetry_body(telemetry_of(record), p, device_id=device, topic=m.topic, received_ms=m.received_ms,
                                now_ms=now_ms, max_skew_ms=settings.max_skew_ms)
    if res.rejects:
        res.rejects = [msgspec.structs.replace(d, detail=f"schema id {sid} ({dec.schema_type}): {d.detail}"[:300])
                       for d in res.rejects]
    # the registered schema a reading was decoded with travels in its meta: canaries select a schema version
    # by it (docs/canary.md), and it stays with the stored reading
    res.readings = [msgspec.structs.replace(r, meta={**(r.meta or {}), "schema_id": sid}) for r in res.readings]
    return res


def _route_one(
    m: IngestMessage, settings: GatewaySettings, partitions: int, now_ms: int, schemas: WireSchemas | None = None,
) -> tuple[int, DecodeResult] | None:
    """(partition, readings and dead letters) of one message; None for a side topic to ignore."""
    route_of = _ROUTES.get((m.topic, partitions))
    if route_of is None:
        route_of = _route_of(m.topic, partitions)
    kind, device, suffix, part = route_of
    if kind == "side":
        return None
    if kind == "unknown" or device is None:
        if m.topic.startswith(NO_DEVICE_TOPIC_PREFIX):  # the ingress found no device id in the message
            d = _dead_letter("schema_violation", f"not a telemetry topic: {m.topic[:200]!r}", m)
        else:
            d = _dead_letter("unknown_topic", f"no telemetry is served on {m.topic[:200]!r}: publish on "
                             "devices/{id}/telemetry with id in [A-Za-z0-9_-]{1,128}", m, device)
        return part, DecodeResult([], [d])
    enc = encoding_for(m.content_type, suffix)
    if m.schema_id is not None or (m.payload[:1] == b"\x00" and enc not in _BINARY_ENCODINGS):
        return part, _decode_with_schema(m, device, settings, now_ms, schemas)
    if settings.schema_subjects:
        subject = _subject_of(m.topic, settings.schema_subjects)
        if subject is not None:
            return part, _decode_with_schema(m, device, settings, now_ms, schemas, subject)
    return part, decode_telemetry(
        m.payload, device_id=device, topic=m.topic, received_ms=m.received_ms, now_ms=now_ms,
        max_skew_ms=settings.max_skew_ms, max_bytes=settings.max_payload_bytes, encoding=enc,
    )


def _route_fields(
    m: IngestMessage, settings: GatewaySettings, partitions: int, now_ms: int,
) -> tuple[int, tuple[list[Any], ...]] | None:
    """(partition, readings field by field) of a plain JSON message of several valid readings (no schema, no
    ``meta``), as :func:`_route_one` would route them; None for any other message (it takes those)."""
    try:
        kind, device, suffix, part = _ROUTES.get((m.topic, partitions)) or _route_of(m.topic, partitions)
        if kind != "telemetry" or device is None or m.schema_id is not None or m.payload[:1] == b"\x00":
            return None
        if encoding_for(m.content_type, suffix) != "json" or (
                settings.schema_subjects and _subject_of(m.topic, settings.schema_subjects) is not None):
            return None
        fields = decode_plain_fields(m.payload, device_id=device, received_ms=m.received_ms, now_ms=now_ms,
                                     max_skew_ms=settings.max_skew_ms, max_bytes=settings.max_payload_bytes)
    except Exception:  # nothing foreseen raises here; if something does, the general path says what
        log.debug("decoding a message's readings as fields failed; routing it as readings", exc_info=True)
        return None
    return None if fields is None else (part, fields)


def _add_fields(into: dict[int, list[list[Any]]], part: int, fields: Sequence[list[Any]]) -> None:
    """Append a message's readings, field by field, to its partition's."""
    have = into.get(part)
    if have is None:
        into[part] = [list(f) for f in fields]
    else:
        for acc, f in zip(have, fields, strict=True):
            acc.extend(f)


#: partitions -> topic -> (device, partition) of plain JSON telemetry topics (no encoding suffix).
_PLAIN: dict[int, dict[str, tuple[str, int]]] = {}
_device_of, _part_of = itemgetter(0), itemgetter(1)
_topic_of, _payload_of, _ctype_of, _received_of, _source_of = map(
    attrgetter, ("topic", "payload", "content_type", "received_ms", "source_id"))


def _plain_routes(topics: Sequence[str], partitions: int) -> list[tuple[str, int]] | None:
    """(device, partition) of each topic, or None unless every one is plain JSON telemetry."""
    known = _PLAIN.get(partitions)
    if known is None:
        known = _PLAIN[partitions] = {}
    routes = list(map(known.get, topics))
    if None not in routes:
        return routes  # type: ignore[return-value]
    for i, r in enumerate(routes):
        if r is None:
            topic = topics[i]
            kind, device, suffix, part = _ROUTES.get((topic, partitions)) or _route_of(topic, partitions)
            if kind != "telemetry" or device is None or suffix is not None:
                return None
            if len(known) >= _ROUTES_MAX:
                known.clear()
            routes[i] = known[topic] = (device, part)
    return routes  # type: ignore[return-value]


#: The readings of one partition: readings, or columns (the bulk path when the bus encoding is columnar).
_Batch = list[Reading] | ReadingColumns


def _route_bulk(
    messages: Sequence[IngestMessage], settings: GatewaySettings, partitions: int, now_ms: int,
    topics: list[str] | None = None, *, columns: bool = False,
) -> tuple[dict[int, _Batch], int, list[int]] | None:
    """Readings by partition of a batch of plain one-reading JSON messages (the commonest), decoded at once.

    None when any message is something else (another shape, encoding or topic, anything to reject): the
    caller then routes the batch message by message. Both ways give the same readings in the same order.
    The exception, a payload naming another device (rejected, no reading): its index is in the list
    returned last, for the caller to route it alone, and the rest of the batch stays on this path.
    ``columns``: each partition's readings as :class:`ReadingColumns` (equal to ``from_readings`` of the
    readings), made from the decoded fields without a :class:`Reading` per message.
    """
    if not messages or list(map(_ctype_of, messages)).count(None) != len(messages):
        return None
    try:
        routes = _plain_routes(list(map(_topic_of, messages)) if topics is None else topics, partitions)
        if routes is None:
            return None
        aside: list[int] = []
        fields = decode_single_fields(
            list(map(_payload_of, messages)), list(map(_device_of, routes)), list(map(_received_of, messages)),
            now_ms=now_ms, max_skew_ms=settings.max_skew_ms, max_bytes=settings.max_payload_bytes, aside=aside,
        )
    except Exception:  # nothing foreseen raises here; if something does, the message-by-message path says what
        log.debug("bulk decoding failed; routing message by message", exc_info=True)
        return None
    if fields is None:
        return None
    if aside:
        skip = set(aside)
        routes = [r for i, r in enumerate(routes) if i not in skip]
    readings = None if columns else list(map(Reading, *fields))
    parts = np.fromiter(map(_part_of, routes), np.int64, len(routes))
    order = np.argsort(parts, kind="stable")  # by partition, arrival order within each
    sorted_parts = parts[order]
    starts = np.flatnonzero(np.r_[True, sorted_parts[1:] != sorted_parts[:-1]])
    ends = np.r_[starts[1:], len(order)]
    # partitions in the order of their first message, as the message-by-message path has them
    firsts = order[starts]
    by_part: dict[int, _Batch] = {}
    for g in np.argsort(firsts, kind="stable").tolist():
        rows = order[starts[g] : ends[g]]
        p = int(sorted_parts[starts[g]])
        if readings is not None:
            by_part[p] = list(map(readings.__getitem__, rows.tolist()))
        elif len(rows) == len(routes):  # one partition: every row, in order
            by_part[p] = ReadingColumns.from_fields(*fields)
        else:  # each partition's fields picked by a C getter, then its columns (cheaper than cutting one batch's)
            pick = itemgetter(*rows.tolist()) if len(rows) > 1 else lambda f, i=int(rows[0]): (f[i],)
            by_part[p] = ReadingColumns.from_fields(*map(list, map(pick, fields)))
    return by_part, len(routes), aside


def _message_traces(messages: Sequence[IngestMessage], partitions: int) -> dict[int, list[tuple[str, str | None]]]:
    """Per partition, the trace contexts (``traceparent``, ``tracestate``) messages routed there carry."""
    out: dict[int, list[tuple[str, str | None]]] = {}
    for m in messages:
        if m.traceparent:
            r = _ROUTES.get((m.topic, partitions)) or _route_of(m.topic, partitions)
            out.setdefault(r[3], []).append((m.traceparent, m.tracestate))
    return out


def _reading_traces(readings: _Batch) -> list[tuple[str, str | None]]:
    """``meta.traceparent`` (and ``meta.tracestate``) of readings that carry one (MQTT 3.1.1 senders)."""
    if isinstance(readings, ReadingColumns):
        metas = [] if readings.meta is None else readings.meta.tolist()
    else:
        metas = [r.meta for r in readings]
    out = []
    for meta in metas:
        if meta:
            tp = meta.get("traceparent")
            if isinstance(tp, str):
                ts = meta.get("tracestate")
                out.append((tp, ts if isinstance(ts, str) else None))
    return out


def route(
    messages: Sequence[IngestMessage], *, settings: GatewaySettings, partitions: int, now_ms: int,
    admission: Admission | None = None, schemas: WireSchemas | None = None,
    traces: list[tuple[int, list[tuple[str, str | None]]]] | None = None,
) -> tuple[list[OutRecord], int, list[DeadLetter]]:
    """Turn raw messages into bus records: readings batched per partition, dead letters one each.

    Never raises for what a message holds: each message yields readings, dead letters (an unserved
    topic: ``unknown_topic``), or nothing (a known side topic, ignored). ``admission`` first refuses
    the messages of devices that may not publish them (their dead letters come first). ``schemas``
    decodes the payloads written against a registered schema (without it they are ``unknown_schema``).

    Returns the records, the number of valid readings, and the dead letters. With ``traces`` (a list, while
    tracing is on) it also appends, per readings record, ``(index in the records, trace contexts)``: those
    of the messages routed to its partition and the ``meta.traceparent`` of its readings.
    """
    by_part: dict[int, _Batch] = {}
    extra: dict[int, list[Reading]] = {}  # readings of messages routed one by one, after the bulk ones
    # the same, field by field, when the records are columns (no Reading per reading of a plain message)
    extra_fields: dict[int, list[list[Any]]] = {}
    dead: list[DeadLetter] = []
    dead_ids: list[str | None] = []
    n = 0
    todo = messages
    topics: list[str] | None = None
    if admission is not None and admission.checks and messages:
        topics = list(map(_topic_of, messages))
        todo, dead, dead_ids = _admit(messages, topics, admission, now_ms)
        if dead:
            topics = None
    relabel = admission is not None and admission.authenticated_topics
    bound: list[IngestMessage] = []
    if settings.schema_subjects and todo:  # topics bound to a schema subject: message by message
        subjects = settings.schema_subjects
        flags = [_subject_of(t, subjects) is not None for t in (topics or map(_topic_of, todo))]
        if any(flags):
            bound = [m for m, f in zip(todo, flags, strict=True) if f]
            todo = [m for m, f in zip(todo, flags, strict=True) if not f]
            topics = None
    columns = settings.bus_encoding == 2
    bulk = _route_bulk(todo, settings, partitions, now_ms, topics, columns=columns) if todo else None
    if bulk is None and len(todo) > 1:  # payloads naming a schema among plain JSON: the rest in bulk still
        framed = [m.payload[:1] == b"\x00" or m.schema_id is not None for m in todo]
        if 0 < framed.count(True) < len(todo):
            bound += [m for m, f in zip(todo, framed, strict=True) if f]
            todo = [m for m, f in zip(todo, framed, strict=True) if not f]
            bulk = _route_bulk(todo, settings, partitions, now_ms, None, columns=columns)
    if bulk is not None:
        by_part, n, aside = bulk
    for m in [*bound, *(todo if bulk is None else [todo[i] for i in aside])]:
        if columns and (plain := _route_fields(m, settings, partitions, now_ms)) is not None:
            _add_fields(extra_fields, *plain)
            n += len(plain[1][1])
            continue
        try:
            routed = _route_one(m, settings, partitions, now_ms, schemas)
        except Exception as exc:  # a bug or a case nobody foresaw: it costs this message, not the worker
            log.exception("routing a message on %r failed; dead-lettered", m.topic[:200])
            reason = "too_deep" if isinstance(exc, RecursionError) else "malformed_json"
            routed = 0, DecodeResult([], [_dead_letter(reason, f"cannot route: {type(exc).__name__}: {exc}"[:300], m)])
        if routed is None:
            continue
        part, res = routed
        if relabel and res.rejects:
            res.rejects = list(map(_as_unauthorized, res.rejects))
        if res.readings:
            if columns:  # in message order with the plain messages' fields
                _add_fields(extra_fields, part, reading_fields(res.readings))
            else:
                extra.setdefault(part, []).extend(res.readings)
            n += len(res.readings)
        for i, d in enumerate(res.rejects):
            dead.append(d)
            dead_ids.append(f"{m.source_id}-{i}" if m.source_id else None)
    ids = list(map(_source_of, messages))
    span = f"{ids[0]}:{ids[-1]}" if ids and all(ids) else None
    produced = now_ms
    records: list[OutRecord] = []
    by_msg = _message_traces(messages, partitions) if traces is not None else {}
    for p in dict.fromkeys([*by_part, *extra, *extra_fields]):
        for k, chunk in enumerate(_chunks(by_part.get(p), extra.get(p), extra_fields.get(p))):
            try:
                value = _encode_readings(chunk, produced, settings.bus_encoding)
            except Exception:  # validation should make this impossible; if not, find the culprit(s)
                log.exception("a bus batch did not encode; encoding its readings one by one")
                chunk, bad = _encodable(chunk, settings.bus_encoding)
                n -= len(bad)
                for j, d in enumerate(bad):
                    dead.append(d)
                    dead_ids.append(f"{span}-{p}-{k}-{j}" if span else None)
                if not chunk:
                    continue
                value = _encode_readings(chunk, produced, settings.bus_encoding)
            if traces is not None:
                traces.append((len(records), [*(by_msg.pop(p, ()) if k == 0 else ()), *_reading_traces(chunk)]))
            records.append(OutRecord(topic=READINGS_TOPIC, partition=p, value=value,
                                     msg_id=f"r{span}-{p}-{k}" if span else None))
    for d, did in zip(dead, dead_ids, strict=True):
        records.append(OutRecord(topic=DLQ_TOPIC, partition=0, value=_encode_dead(d),
                                 msg_id=f"d{did}" if did else None))
    return records, n, dead


def _chunks(bulk: _Batch | None, extra: list[Reading] | None, fields: list[list[Any]] | None = None) -> list[_Batch]:
    """A partition's readings (the bulk path's, then those routed one by one: ``extra``, or ``fields`` when the
    records are columns) in bus records' sizes."""
    if fields is not None:
        total = len(fields[1])
        if bulk is None and total > MAX_READINGS_PER_RECORD:  # many readings a message: columns a record each
            return [ReadingColumns.from_fields(*(f[s : s + MAX_READINGS_PER_RECORD] for f in fields))
                    for s in range(0, total, MAX_READINGS_PER_RECORD)]
        cols = ReadingColumns.from_fields(*fields)
        if bulk is not None:  # the bulk path's readings are columns too when records are (rows: converted)
            cols = ReadingColumns.concat(
                [bulk if isinstance(bulk, ReadingColumns) else ReadingColumns.from_readings(bulk), cols])
        bulk = cols
    if bulk is None:
        batch: _Batch = extra or []
    elif not extra:
        batch = bulk
    elif isinstance(bulk, ReadingColumns):
        batch = ReadingColumns.concat([bulk, ReadingColumns.from_readings(extra)])
    else:
        batch = bulk + extra
    if len(batch) <= MAX_READINGS_PER_RECORD:
        return [batch] if len(batch) else []
    # rare (a gateway batch is 512 messages by default): each record then carries only its own dictionaries
    rs = batch.to_readings() if isinstance(batch, ReadingColumns) else batch
    return [rs[s : s + MAX_READINGS_PER_RECORD] for s in range(0, len(rs), MAX_READINGS_PER_RECORD)]


def _encode_readings(readings: _Batch, produced_ms: int, encoding: int) -> bytes:
    """A bus record of readings in the configured encoding (docs/pipeline.md: processors read both)."""
    if isinstance(readings, ReadingColumns):
        return encode_bus_columns(readings, produced_ms=produced_ms)
    if encoding == 2:
        return encode_bus_columns(ReadingColumns.from_readings(readings), produced_ms=produced_ms)
    return encode_bus_batch(BusBatch(readings=readings, produced_ms=produced_ms))


def _encode_dead(d: DeadLetter) -> bytes:
    try:
        return encode_dead_letter(d)
    except UnicodeEncodeError:  # a lone surrogate in a topic (no MQTT client sends one; a bridge might)
        def clean(x: str) -> str:
            return x.encode("utf-8", "backslashreplace").decode()

        return encode_dead_letter(msgspec.structs.replace(
            d, topic=clean(d.topic), detail=clean(d.detail),
            device_id=None if d.device_id is None else clean(d.device_id)))


def _encodable(readings: _Batch, encoding: int = 1) -> tuple[list[Reading], list[DeadLetter]]:
    """The readings the bus encoder takes, and dead letters of those it refuses."""
    ok: list[Reading] = []
    bad: list[DeadLetter] = []
    if isinstance(readings, ReadingColumns):
        readings = readings.to_readings()
    for r in readings:
        try:
            _encode_readings([r], 0, encoding)
        except Exception as exc:
            reason = "too_deep" if isinstance(exc, RecursionError) else "schema_violation"
            bad.append(DeadLetter(reason=reason, detail=f"reading does not encode: {type(exc).__name__}"[:300],
                                  topic=f"devices/{r.device_id}/telemetry", received_ms=r.received_ms,
                                  payload=f"ts_ms={r.ts_ms} seq={r.seq}".encode(),
                                  device_id=r.device_id))
        else:
            ok.append(r)
    return ok, bad


def _count(source: str, msgs: list[IngestMessage], n: int, dead: list[DeadLetter], send_s: float) -> None:
    """The stage metrics of one delivered batch (docs/observability.md)."""
    GATEWAY_MESSAGES.labels(source).inc(len(msgs))
    GATEWAY_READINGS.labels(source).inc(n)
    GATEWAY_BATCH.observe(len(msgs))
    GATEWAY_SEND_SECONDS.observe(send_s)
    reasons: dict[str, int] = {}
    for d in dead:
        reasons[d.reason] = reasons.get(d.reason, 0) + 1
    for reason, k in reasons.items():
        GATEWAY_REJECTED.labels(reason).inc(k)


class Gateway:
    """Moves device messages from a source to the bus, with validation and a DLQ.

    Acknowledgement order: the source message is acknowledged only after the bus acknowledged
    every record derived from it.
    """

    def __init__(
        self, *, source: IngestSource, producer: Producer, settings: GatewaySettings, partitions: int,
        admission: Admission | None = None, schemas: WireSchemas | None = None,
    ) -> None:
        self.source = source
        self.schemas = schemas
        self.producer = producer
        self.settings = settings
        self.partitions = partitions
        self.admission = admission
        self.stats = GatewayStats()
        self._spans: dict[int, list[Any]] = {}  # id(records) -> their gateway.publish spans, until sent

    async def _fetch_routed(
        self,
    ) -> tuple[list[IngestMessage], list[OutRecord], int, list[DeadLetter]] | None:
        msgs = await self.source.fetch(self.settings.batch_max_messages, self.settings.fetch_wait_ms / 1000,
                                       max_bytes=self.settings.batch_max_bytes)
        if not msgs:
            return None
        if tracing.enabled():
            return self._route_traced(msgs)
        records, n, dead = route(msgs, settings=self.settings, partitions=self.partitions,
                                 now_ms=int(time.time() * 1000), admission=self.admission, schemas=self.schemas)
        return msgs, records, n, dead

    def _behind(self, msgs: list[IngestMessage]) -> bool:
        """Whether a fetched round says the source may hold more: at least half of ``batch_max_messages``, or of
        ``batch_max_bytes`` in payloads. (Not "a full round": a source may size a fetch below the bounds, as the
        NATS consumer does from the average record size, and a backlog would then be paced.)"""
        s = self.settings
        return 2 * len(msgs) >= s.batch_max_messages or 2 * sum(map(len, map(_payload_of, msgs))) >= s.batch_max_bytes

    def _route_traced(self, msgs: list[IngestMessage]) -> tuple[list[IngestMessage], list[OutRecord], int,
                                                                  list[DeadLetter]]:
        """:func:`route` with a ``gateway.publish`` span per readings record (from routing until the bus has
        it): a child of the first trace context its readings carry, linked to the others; its context goes
        in the record's headers. The spans end in :meth:`_deliver`."""
        t0 = time.time_ns()
        traces: list[tuple[int, list[tuple[str, str | None]]]] = []
        records, n, dead = route(msgs, settings=self.settings, partitions=self.partitions,
                                 now_ms=t0 // 1_000_000, admission=self.admission, schemas=self.schemas,
                                 traces=traces)
        spans = []
        for i, ctxs in traces:
            rec = records[i]
            s = tracing.start_batch_span(
                "fieldmesh.gateway", "gateway.publish", (tracing.context_of(tp, ts) for tp, ts in ctxs),
                {"messaging.system": "fieldmesh-bus", "messaging.destination.name": rec.topic,
                 "messaging.destination.partition.id": str(rec.partition), "fieldmesh.fetched_messages": len(msgs)},
                start_time_ns=t0)
            records[i] = dataclasses.replace(rec, headers={**(rec.headers or {}), **tracing.headers_of(s)})
            spans.append(s)
        if spans:
            self._spans[id(records)] = spans
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
        spans = self._spans.pop(id(records), None) if self._spans else None
        delay = 0.1
        t0 = time.perf_counter()
        try:
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
        finally:
            for s in spans or ():  # the gateway.publish spans end once the bus has the records (or gave up)
                s.end()
        await self.source.ack(msgs)
        self.stats.messages += len(msgs)
        self.stats.readings += n
        for d in dead:
            self.stats.rejected[d.reason] = self.stats.rejected.get(d.reason, 0) + 1
        _count(self.source.name, msgs, n, dead, time.perf_counter() - t0)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set: decoding the next batch overlaps with sending the last one.

        With registration enforced, no message is taken before the registry was read once (whoever
        polls it: :meth:`RegisteredDevices.run`); until then they wait at the source.
        """
        registered = self.admission.registered if self.admission is not None else None
        if registered is not None and not registered.ready:
            log.info("waiting for the device registry before taking messages")
            if not await registered.wait_ready(stop):
                return
        queue: asyncio.Queue[tuple[list[IngestMessage], list[OutRecord], int, list[DeadLetter]] | None]
        queue = asyncio.Queue(maxsize=2)

        loop = asyncio.get_running_loop()
        linger = self.settings.linger_ms / 1000

        async def reader() -> None:
            started = -linger  # loop time the last round began
            caught_up = False  # the last round was small: less than half of either bound
            try:
                while not stop.is_set():
                    if caught_up and (wait := started + linger - loop.time()) > 0:
                        # Caught up: a round begins at least linger_ms after the one before, so it holds what
                        # arrived meanwhile. A source hands over what it has as soon as it has anything: without
                        # this, messages coming steadily below the maximum rate made rounds of a few messages
                        # each, whose fixed costs (bus publishes and acknowledgements, the source's ack) took
                        # the CPU the rate saved. Behind (a round half full or more), the next begins at once.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), wait)
                        if stop.is_set():
                            break
                    started = loop.time()
                    try:
                        # a stop ends the wait for a first message (up to fetch_wait_ms) at once; what the source
                        # gave meanwhile is not acknowledged, so it comes again
                        fetched, got = await unless_stopped(self._fetch_routed(), stop)
                        if not fetched:
                            break
                    except FieldmeshError as exc:
                        log.warning("gateway fetch failed: %s", exc)
                        caught_up = False
                        await asyncio.sleep(0.5)
                        continue
                    caught_up = got is not None and not self._behind(got[0])
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
