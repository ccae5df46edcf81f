"""Codecs for every payload shape of docs/contract.md, and validation with its reason codes.

All functions here are pure (bytes in, values out): no I/O, so they are fuzzable and fast to test.

Device payloads (topic ``devices/{id}/telemetry``) are one reading, an array of readings, or a
batch ``{"device_id", "readings": [...]}``. Validation rejects each bad reading on its own, so one
bad reading never costs the rest of its batch; a payload that cannot be decoded at all is rejected
whole.

:func:`decode_telemetry` never raises: whatever one payload holds (any bytes, nesting deep enough to
exhaust the decoder's recursion limit, integers no wire format carries, lone surrogates), the worst it
can cost is that payload, as a dead letter with a reason.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime
from hashlib import blake2b
from itertools import chain, repeat
from operator import attrgetter
from typing import Any, Final

import msgspec
import numpy as np

from fieldmesh.core.batch import ReadingColumns
from fieldmesh.core.identity import identity_digest, identity_string
from fieldmesh.core.model import BusBatch, DeadLetter, Reading
from fieldmesh.core.topics import METRIC_RE

__all__ = [
    "BUS_V2_MAGIC",
    "DLQ_PAYLOAD_LIMIT",
    "MAX_META_DEPTH",
    "REASONS",
    "DecodeResult",
    "decode_bus_batch",
    "decode_bus_columns",
    "decode_bus_columns_many",
    "decode_bus_readings",
    "decode_dead_letter",
    "decode_plain_fields",
    "decode_single_fields",
    "decode_single_readings",
    "decode_telemetry",
    "decode_telemetry_body",
    "encode_bus_batch",
    "encode_bus_columns",
    "encode_dead_letter",
    "encode_reading_json",
    "encoding_for",
    "register_encoding",
]

#: Reason codes of dead letters (docs/contract.md).
REASONS: Final = (
    "malformed_json",
    "too_deep",
    "schema_violation",
    "device_mismatch",
    "clock_skew",
    "too_large",
    "unknown_device",
    "unauthorized",
    "unsupported_encoding",
    "unknown_topic",
    "rate_limited",
    "unknown_schema",
)
#: How much of a rejected payload the DLQ keeps.
DLQ_PAYLOAD_LIMIT: Final = 64 * 1024
#: Event times before 2000-01-01 are taken as a unit mistake (seconds instead of ms) and rejected.
MIN_TS_MS: Final = 946_684_800_000
#: Nesting levels a reading's ``meta`` may have: deeper is rejected (``too_deep``) at the door, before
#: any later stage (bus encoding, the processor, the store, the API) could trip over it.
MAX_META_DEPTH: Final = 32

_READING_KEYS: Final = frozenset(
    {"device_id", "ts", "seq", "boot_id", "event_id", "measurements", "meta"}
)
_json_decoder = msgspec.json.Decoder()
_json_encoder = msgspec.json.Encoder()
_bus_encoder = msgspec.msgpack.Encoder()
_bus_decoder = msgspec.msgpack.Decoder(BusBatch)
_dl_encoder = msgspec.json.Encoder()
_dl_decoder = msgspec.json.Decoder(DeadLetter)

# Content decoders by encoding name: bytes -> bytes of JSON, or -> Python objects.
_ENCODINGS: dict[str, Callable[[bytes], Any]] = {}


def register_encoding(name: str, decode: Callable[[bytes], Any]) -> None:
    """Register a payload encoding (announced by MQTT 5 content type or topic suffix).

    ``decode`` turns the payload into the same Python objects a JSON payload decodes to.
    """
    _ENCODINGS[name] = decode


register_encoding("msgpack", msgspec.msgpack.decode)


def _zstd_json(payload: bytes) -> Any:
    import zstandard  # lazy: only gateways that receive compressed uplinks need it

    raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=64 * 1024 * 1024)
    try:
        return _json_decoder.decode(raw)
    except msgspec.DecodeError:
        return json.loads(raw)


register_encoding("json+zstd", _zstd_json)

#: MQTT 5 content types and topic suffixes (``devices/{id}/telemetry/<suffix>``) -> encoding name.
CONTENT_TYPES: Final = {
    "application/json": "json",
    "application/msgpack": "msgpack",
    "application/x-msgpack": "msgpack",
    "application/json+zstd": "json+zstd",
    "application/zstd+json": "json+zstd",
}
TOPIC_SUFFIXES: Final = {"json": "json", "msgpack": "msgpack", "zstd": "json+zstd", "json+zstd": "json+zstd"}


def encoding_for(content_type: str | None, topic_suffix: str | None = None) -> str:
    """The payload encoding announced by a content type or topic suffix (JSON when neither says).

    An unknown announcement yields its own name, which :func:`decode_telemetry` rejects as
    ``unsupported_encoding``.
    """
    if content_type:
        ct = content_type.split(";", 1)[0].strip().lower()
        return CONTENT_TYPES.get(ct, ct)
    if topic_suffix:
        return TOPIC_SUFFIXES.get(topic_suffix.lower(), topic_suffix)
    return "json"


class DecodeResult(msgspec.Struct):
    """Readings that passed validation, and the dead letters of those that did not."""

    readings: list[Reading]
    rejects: list[DeadLetter]


class _Reject(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail


def _dead(
    reason: str,
    detail: str,
    topic: str,
    received_ms: int,
    payload: bytes,
    device_id: str | None,
) -> DeadLetter:
    truncated = len(payload) > DLQ_PAYLOAD_LIMIT
    return DeadLetter(
        reason=reason,
        detail=detail,
        topic=topic,
        received_ms=received_ms,
        payload=payload[:DLQ_PAYLOAD_LIMIT] if truncated else payload,
        device_id=device_id,
        truncated=truncated,
    )


def _parse_ts(ts: Any) -> int:
    if type(ts) is int:
        return ts
    if isinstance(ts, str):
        try:
            dt = datetime.fromisoformat(ts)
        except ValueError:
            raise _Reject("schema_violation", f"ts {ts[:64]!r} is not RFC 3339") from None
        if dt.tzinfo is None:
            raise _Reject("schema_violation", "ts string has no UTC offset")
        return int(dt.timestamp() * 1000)
    raise _Reject("schema_violation", "ts must be epoch milliseconds (int) or an RFC 3339 string")


def _check_reading(
    obj: Any, device_id: str, now_ms: int, max_skew_ms: int, received_ms: int
) -> Reading:
    if type(obj) is not dict:
        raise _Reject("schema_violation", "a reading must be a JSON object")
    extra = obj.keys() - _READING_KEYS
    if extra:
        raise _Reject("schema_violation", f"unknown field(s) {sorted(extra)[:5]}")
    dev = obj.get("device_id", device_id)
    if dev != device_id:
        raise _Reject("device_mismatch", f"device_id {str(dev)[:128]!r} does not match topic {device_id!r}")
    if "ts" not in obj:
        raise _Reject("schema_violation", "missing field 'ts'")
    ts_ms = _parse_ts(obj["ts"])
    if ts_ms < MIN_TS_MS:
        raise _Reject("schema_violation", f"ts {ts_ms} is before 2000-01-01 (seconds instead of ms?)")
    if ts_ms - now_ms > max_skew_ms:
        raise _Reject("clock_skew", f"ts is {(ts_ms - now_ms) / 1000:.1f}s ahead of the server clock")
    ms = obj.get("measurements")
    if type(ms) is not dict or not ms:
        raise _Reject("schema_violation", "measurements must be a non-empty object")
    clean: dict[str, float | bool] = {}
    for name, v in ms.items():
        if not METRIC_RE.fullmatch(name):
            raise _Reject("schema_violation", f"invalid measurement name {name[:80]!r}")
        tv = type(v)
        if tv is float:
            if not math.isfinite(v):
                raise _Reject("schema_violation", f"measurement {name!r} is not finite ({v})")
            clean[name] = v
        elif tv is bool:
            clean[name] = v
        elif tv is int:
            try:
                clean[name] = float(v)
            except OverflowError:
                raise _Reject("schema_violation", f"measurement {name!r} is out of range") from None
        else:
            raise _Reject("schema_violation", f"measurement {name!r} must be a number or bool")
    seq = obj.get("seq")
    if seq is not None and (type(seq) is not int or seq < 0 or seq >= 2**63):
        raise _Reject("schema_violation", "seq must be an integer >= 0")
    boot_id = obj.get("boot_id")
    if boot_id is not None and (type(boot_id) is not str or len(boot_id) > 128):
        raise _Reject("schema_violation", "boot_id must be a string of at most 128 chars")
    event_id = obj.get("event_id")
    if event_id is not None and (type(event_id) is not str or not 0 < len(event_id) <= 256):
        raise _Reject("schema_violation", "event_id must be a string of 1-256 chars")
    meta = obj.get("meta")
    if meta is not None:
        if type(meta) is not dict:
            raise _Reject("schema_violation", "meta must be an object")
        _check_meta(meta)
    key, chk = identity_digest(identity_string(device_id, ts_ms, clean, seq, boot_id, event_id))
    return Reading(
        device_id=device_id,
        ts_ms=ts_ms,
        measurements=clean,
        key=key,
        chk=chk,
        seq=seq,
        boot_id=boot_id,
        event_id=event_id,
        meta=meta,
        received_ms=received_ms,
    )


def _too_deep(what: str) -> _Reject:
    return _Reject("too_deep", f"{what} is nested deeper than the decoder allows (about 1,000 levels)")


def _check_meta(meta: dict[str, Any]) -> None:
    """Reject a ``meta`` nested deeper than :data:`MAX_META_DEPTH` or that the bus cannot carry.

    Both would otherwise pass validation and fail later, at encoding, for a whole batch.
    """
    stack: list[tuple[Any, int]] = [(meta, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_META_DEPTH:
            raise _Reject("too_deep", f"meta is nested deeper than {MAX_META_DEPTH} levels")
        children = node.values() if type(node) is dict else node
        stack.extend((c, depth + 1) for c in children if type(c) is dict or type(c) is list)
    try:
        _bus_encoder.encode(meta)
    except (OverflowError, TypeError, ValueError) as exc:  # huge ints, lone surrogates (UnicodeEncodeError)
        raise _Reject("schema_violation", f"meta cannot be carried: {exc}"[:200]) from None


def _decode_body(payload: bytes, encoding: str) -> Any:
    if encoding == "json":
        try:
            return _json_decoder.decode(payload)
        except RecursionError:
            raise _too_deep("the JSON payload") from None
        except msgspec.DecodeError:
            # JSON with NaN/Infinity literals: decode leniently so the bad readings are rejected one
            # by one (as non-finite) and the rest of the batch survives.
            try:
                return json.loads(payload)
            except RecursionError:
                raise _too_deep("the JSON payload") from None
            except ValueError as exc:
                raise _Reject("malformed_json", str(exc)[:200]) from None
    dec = _ENCODINGS.get(encoding)
    if dec is None:
        raise _Reject("unsupported_encoding", f"unknown payload encoding {encoding!r}")
    try:
        return dec(payload)
    except RecursionError:
        raise _too_deep(f"the {encoding} payload") from None
    except Exception as exc:
        raise _Reject("malformed_json", f"{encoding} payload does not decode: {exc}"[:200]) from None


class _WireReading(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One reading as devices send it, for the typed fast path (types checked in C).

    Not tracked by the garbage collector (``gc=False``): a decoded reading is a tree, never in a cycle,
    and a gateway decodes a million a minute.
    """

    ts: int | str
    measurements: dict[str, float | bool]
    device_id: str | None = None
    seq: int | None = None
    boot_id: str | None = None
    event_id: str | None = None
    meta: dict[str, Any] | None = None


class _WireBatch(msgspec.Struct, forbid_unknown_fields=True):
    readings: list[_WireReading]
    device_id: str | None = None


#: Metric names already validated: a device sends the same few names in every reading, and a set lookup
#: costs a tenth of the regular expression. Bounded: names are device input.
_valid_metrics: set[str] = set()
_VALID_METRICS_MAX: Final = 10_000


def _valid_metric(name: str) -> bool:
    if not METRIC_RE.fullmatch(name):
        return False
    if len(_valid_metrics) >= _VALID_METRICS_MAX:
        _valid_metrics.clear()
    _valid_metrics.add(name)
    return True


_fast_decoder = msgspec.json.Decoder(_WireReading)
_fast_list_decoder = msgspec.json.Decoder(list[_WireReading])
_fast_batch_decoder = msgspec.json.Decoder(_WireBatch)


def _wire_readings(payload: bytes, device_id: str) -> list[_WireReading] | None:
    """The readings of a JSON payload (one, a list, or a ``readings`` batch) as typed structs (types checked in
    C); None when it is not that shape, or names another device (the general path says what is wrong)."""
    try:
        if payload[:1] == b"[":
            return _fast_list_decoder.decode(payload)  # type: ignore[no-any-return]
        if b'"readings"' in payload:
            batch = _fast_batch_decoder.decode(payload)
            if batch.device_id is not None and batch.device_id != device_id:
                return None
            return batch.readings  # type: ignore[no-any-return]
        return [_fast_decoder.decode(payload)]
    except (msgspec.DecodeError, RecursionError):
        return None  # the general path says what is wrong (``too_deep`` for the recursion)


def decode_plain_fields(
    payload: bytes, *, device_id: str, received_ms: int, now_ms: int, max_skew_ms: int = 300_000,
    max_bytes: int = 256 * 1024,
) -> tuple[list[Any], ...] | None:
    """The readings of a JSON payload of several valid plain readings (no ``meta``), field by field.

    Exactly the readings :func:`decode_telemetry` gives for it, as :func:`decode_single_fields` gives them (a
    list per field of :class:`Reading`, the arguments of :meth:`ReadingColumns.from_fields`), so a columnar
    bus record is made without an object per reading. None for anything else (one reading, a ``meta``, a
    problem to report): :func:`decode_telemetry` then takes the payload.
    """
    if len(payload) > max_bytes:
        return None
    ws = _wire_readings(payload, device_id)
    if ws is None or len(ws) < 2 or list(map(_meta_of, ws)).count(None) != len(ws):
        return None
    n = len(ws)
    return _checked_fields(ws, [device_id] * n, [received_ms] * n, now_ms, max_skew_ms)


def _fast_path(payload: bytes, device_id: str, now: int, max_skew_ms: int, received_ms: int) -> list[Reading] | None:
    """The common case, valid JSON readings, decoded by msgspec into typed structs (types checked in C).

    Returns None for anything unusual (a problem to report, an RFC 3339 ``ts``): the general path
    then decodes the payload again and says precisely what is wrong with which reading.
    """
    ws = _wire_readings(payload, device_id)
    if not ws:
        return None
    if len(ws) > 1 and list(map(_meta_of, ws)).count(None) == len(ws):  # plain readings: checked over columns
        fields = _checked_fields(ws, [device_id] * len(ws), [received_ms] * len(ws), now, max_skew_ms)
        return None if fields is None else list(map(Reading, *fields))
    out = []
    for w in ws:
        ts = w.ts
        ms = w.measurements
        seq = w.seq
        if (
            type(ts) is not int
            or ts < MIN_TS_MS
            or ts - now > max_skew_ms
            or (w.device_id is not None and w.device_id != device_id)
            or not ms
            or (seq is not None and not 0 <= seq < 2**63)
            or (w.boot_id is not None and len(w.boot_id) > 128)
            or (w.event_id is not None and not 0 < len(w.event_id) <= 256)
        ):
            return None
        if w.meta is not None:
            try:
                _check_meta(w.meta)
            except _Reject:
                return None
        for name, v in ms.items():
            if (name not in _valid_metrics and not _valid_metric(name)) or (
                type(v) is float and not math.isfinite(v)
            ):
                return None
        key, chk = identity_digest(identity_string(device_id, ts, ms, seq, w.boot_id, w.event_id))
        out.append(
            Reading(
                device_id=device_id, ts_ms=ts, measurements=ms, key=key, chk=chk, seq=seq, boot_id=w.boot_id,
                event_id=w.event_id, meta=w.meta, received_ms=received_ms,
            )
        )
    return out


_S_IDENTITY: Final = "s\x1f{}\x1f{}\x1f{}".format  # identity_string of a reading with a seq, no event_id
_BLAKE2B_16: Final = blake2b(digest_size=16)  # never updated: each identity's hash starts as a copy of it
_U8_PAIRS: Final = np.dtype(">u8")
_HASH_BLOCK: Final = 256
_ts_of, _ms_of, _dev_of, _seq_of, _boot_of, _event_of, _meta_of = map(
    attrgetter, ("ts", "measurements", "device_id", "seq", "boot_id", "event_id", "meta"))


def _digests16(data: list[bytes]) -> bytes:
    """The 16-byte BLAKE2b digests of ``data``, joined (:func:`~fieldmesh.core.identity.identity_digest`'s).

    Each hash is a copy of one empty hash object rather than a new one: ``blake2b(x, digest_size=16)``
    parses its keyword arguments and sets up its parameter block every time, a fifth of the cost of a
    short identity's digest. Three C iterators, no Python frame per reading, over blocks of ``_HASH_BLOCK``
    identities: the hash objects of a block stay in the CPU's caches between the iterators (each is about
    half a kilobyte; for 5,000 identities at once the three passes cost 441 ns an identity against 278).
    """
    if len(data) <= _HASH_BLOCK:
        hashes = list(map(blake2b.copy, repeat(_BLAKE2B_16, len(data))))
        deque(map(blake2b.update, hashes, data), 0)
        return b"".join(map(blake2b.digest, hashes))
    return b"".join(map(_digests16, (data[s : s + _HASH_BLOCK] for s in range(0, len(data), _HASH_BLOCK))))


def decode_single_readings(
    payloads: Sequence[bytes],
    device_ids: Sequence[str],
    received_ms: Sequence[int],
    *,
    now_ms: int,
    max_skew_ms: int = 300_000,
    max_bytes: int = 256 * 1024,
    aside: list[int] | None = None,
) -> list[Reading] | None:
    """Many JSON payloads of one valid reading each, as readings (:func:`decode_single_fields` has them)."""
    fields = decode_single_fields(payloads, device_ids, received_ms, now_ms=now_ms, max_skew_ms=max_skew_ms,
                                  max_bytes=max_bytes, aside=aside)
    return None if fields is None else list(map(Reading, *fields))


def decode_single_fields(
    payloads: Sequence[bytes],
    device_ids: Sequence[str],
    received_ms: Sequence[int],
    *,
    now_ms: int,
    max_skew_ms: int = 300_000,
    max_bytes: int = 256 * 1024,
    aside: list[int] | None = None,
) -> tuple[list[Any], ...] | None:
    """Many JSON payloads of one valid reading each (the commonest device message), checked all at once.

    Payload ``i`` is from device ``device_ids[i]``. Each payload is decoded by msgspec into a typed struct
    (types checked in C); the checks of :func:`decode_telemetry` then run over whole columns (numpy, sets,
    C iterators), and the identity digests are read as two numpy columns: no Python frame per message.

    Returns the readings field by field (a list per field of :class:`Reading`, in its order: the arguments
    of ``Reading`` or of :meth:`ReadingColumns.from_fields`, so the columnar bus encoding needs no object per
    reading), exactly those :func:`decode_telemetry` gives payload by payload; or None when any payload is
    not one valid plain reading (another shape, a problem to report, an RFC 3339 ``ts``, a ``meta``): the
    caller then takes the payloads one by one, which says what is wrong with which.

    ``aside``: when given, a payload whose ``device_id`` is not its device's does not make the whole call
    step aside: its index is appended to ``aside`` (for the caller to take it one by one, and reject it),
    and the readings are those of the other payloads, in order. One such payload in a batch (a device
    publishing for another) then costs only itself.
    """
    n = len(payloads)
    if not n or max(map(len, payloads)) > max_bytes:
        return None
    try:
        ws = list(map(_fast_decoder.decode, payloads))
    except (msgspec.DecodeError, RecursionError):
        return None
    return _checked_fields(ws, device_ids, received_ms, now_ms, max_skew_ms, aside)


def _checked_fields(
    ws: list[_WireReading], device_ids: Sequence[str], received_ms: Sequence[int], now_ms: int, max_skew_ms: int,
    aside: list[int] | None = None,
) -> tuple[list[Any], ...] | None:
    """The fields of the readings ``ws`` (reading ``i`` from device ``device_ids[i]``) if every one is valid and
    plain (no ``meta``), checked over whole columns; else None (see :func:`decode_single_fields`)."""
    n = len(ws)
    dev_in = list(map(_dev_of, ws))
    if dev_in.count(None) != n and dev_in != list(device_ids):  # (all naming their own: one C comparison)
        bad = [i for i, (d, dev) in enumerate(zip(dev_in, device_ids, strict=True)) if d is not None and d != dev]
        if bad:
            if aside is None or len(bad) == n:
                return None
            aside.extend(bad)
            skip = set(bad)
            keep = [i for i in range(n) if i not in skip]
            ws = [ws[i] for i in keep]
            device_ids = [device_ids[i] for i in keep]
            received_ms = [received_ms[i] for i in keep]
            n = len(keep)
    if list(map(_meta_of, ws)).count(None) != n:
        return None  # meta has its own checks (depth, what the bus carries): the one-by-one path runs them
    ts = list(map(_ts_of, ws))
    try:  # (builtins: for a message's hundred readings, a third of the cost of an array's min and max)
        if min(ts) < MIN_TS_MS or max(ts) > now_ms + max_skew_ms:
            return None
    except TypeError:  # a str ts (RFC 3339): the general path parses it
        return None
    ms = list(map(_ms_of, ws))
    if not all(ms):
        return None
    names = set(chain.from_iterable(ms))
    if not names <= _valid_metrics and not all(map(_valid_metric, names - _valid_metrics)):
        return None
    # every value finite: their sum is, unless it overflows (an infinity or a NaN makes it one); only then
    # the values are checked one by one, in an array
    if not math.isfinite(sum(chain.from_iterable(map(dict.values, ms)))) and not np.isfinite(
            np.fromiter(chain.from_iterable(map(dict.values, ms)), np.float64)).all():
        return None
    seqs = list(map(_seq_of, ws))
    no_seq = seqs.count(None)
    if no_seq != n:
        present = seqs if not no_seq else [s for s in seqs if s is not None]
        if min(present) < 0 or max(present) >= 2**63:
            return None
    boots = list(map(_boot_of, ws))
    boot_set = set(boots)
    boot_set.discard(None)
    if any(len(b) > 128 for b in boot_set):
        return None
    events = list(map(_event_of, ws))
    no_event = events.count(None)
    if no_event != n and not all(0 < len(e) <= 256 for e in events if e is not None):
        return None
    if no_event == n and no_seq == 0 and None not in boots:
        if len(boot_set) == 1 and device_ids.count(device_ids[0]) == n:
            # one device and boot (a message's readings): the identity's prefix once, then each seq formatted
            # into bytes (``b"%d" % seq`` is ``str(seq).encode()``), half the cost of a string each, encoded
            pattern = _S_IDENTITY(device_ids[0], boots[0], "").encode().replace(b"%", b"%%") + b"%d"
            ids = list(map(pattern.__mod__, seqs))
        else:
            ids = list(map(str.encode, map(_S_IDENTITY, device_ids, boots, seqs)))
    else:
        ids = list(map(str.encode, map(identity_string, device_ids, ts, ms, seqs, boots, events)))
    digests = np.frombuffer(_digests16(ids), dtype=_U8_PAIRS).reshape(n, 2)
    keys = (digests[:, 0] >> 1).tolist()
    chks = digests[:, 1].view(">i8").tolist()
    nones = [None] * n
    return list(device_ids), ts, ms, keys, chks, seqs, boots, events, nones, list(received_ms), nones


def _item_bytes(obj: Any) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), default=repr).encode()
    except (TypeError, ValueError, RecursionError):
        try:
            return repr(obj).encode("utf-8", errors="backslashreplace")
        except RecursionError:
            return b"<nested too deep to show>"


def decode_telemetry(
    payload: bytes,
    *,
    device_id: str,
    topic: str,
    received_ms: int,
    now_ms: int | None = None,
    max_skew_ms: int = 300_000,
    max_bytes: int = 256 * 1024,
    encoding: str = "json",
) -> DecodeResult:
    """Decode and validate one device payload; never raises (a payload that breaks it is dead-lettered).

    Args:
        payload: the raw MQTT payload.
        device_id: the device id taken from the topic.
        topic: the topic it arrived on (kept in dead letters).
        received_ms: when the gateway received it (epoch ms).
        now_ms: the server clock for the skew check (defaults to ``received_ms``).
        max_skew_ms: how far ahead of the server clock an event time may be.
        max_bytes: payloads larger than this are rejected as ``too_large``.
        encoding: ``json`` or a registered encoding.
    """
    try:
        return _decode_telemetry(payload, device_id, topic, received_ms, now_ms, max_skew_ms, max_bytes, encoding)
    except RecursionError:
        r = _too_deep("the payload")
        return DecodeResult([], [_dead(r.reason, r.detail, topic, received_ms, payload, device_id)])
    except Exception as exc:  # a case validation does not foresee costs this payload, never the caller
        detail = f"payload does not decode: {type(exc).__name__}: {exc}"[:200]
        return DecodeResult([], [_dead("malformed_json", detail, topic, received_ms, payload, device_id)])


def _decode_telemetry(
    payload: bytes,
    device_id: str,
    topic: str,
    received_ms: int,
    now_ms: int | None,
    max_skew_ms: int,
    max_bytes: int,
    encoding: str,
) -> DecodeResult:
    now = received_ms if now_ms is None else now_ms
    if len(payload) > max_bytes:
        return DecodeResult(
            [], [_dead("too_large", f"{len(payload)} bytes > {max_bytes}", topic, received_ms, payload, device_id)]
        )
    if encoding == "json":
        fast = _fast_path(payload, device_id, now, max_skew_ms, received_ms)
        if fast is not None:
            return DecodeResult(fast, [])
    try:
        body = _decode_body(payload, encoding)
    except _Reject as r:
        return DecodeResult([], [_dead(r.reason, r.detail, topic, received_ms, payload, device_id)])
    return _readings_of_body(body, payload, device_id, topic, received_ms, now, max_skew_ms)


def decode_telemetry_body(
    body: Any,
    payload: bytes,
    *,
    device_id: str,
    topic: str,
    received_ms: int,
    now_ms: int | None = None,
    max_skew_ms: int = 300_000,
) -> DecodeResult:
    """Validate an already decoded payload ``body`` (the objects a JSON payload decodes to: one reading,
    an array of them, or ``{"device_id", "readings"}``) as :func:`decode_telemetry` does; never raises.
    ``payload`` is what dead letters keep."""
    now = received_ms if now_ms is None else now_ms
    try:
        return _readings_of_body(body, payload, device_id, topic, received_ms, now, max_skew_ms)
    except RecursionError:
        r = _too_deep("the payload")
        return DecodeResult([], [_dead(r.reason, r.detail, topic, received_ms, payload, device_id)])
    except Exception as exc:  # a case validation does not foresee costs this payload, never the caller
        detail = f"payload does not decode: {type(exc).__name__}: {exc}"[:200]
        return DecodeResult([], [_dead("schema_violation", detail, topic, received_ms, payload, device_id)])


def _readings_of_body(
    body: Any, payload: bytes, device_id: str, topic: str, received_ms: int, now: int, max_skew_ms: int,
) -> DecodeResult:
    if type(body) is list:
        items = body
    elif type(body) is dict and "readings" in body:
        dev = body.get("device_id", device_id)
        if dev != device_id:
            return DecodeResult(
                [],
                [_dead("device_mismatch", f"batch device_id {str(dev)[:128]!r} does not match topic",
                       topic, received_ms, payload, device_id)],
            )
        items = body["readings"]
        if type(items) is not list:
            return DecodeResult(
                [], [_dead("schema_violation", "readings must be an array", topic, received_ms, payload, device_id)]
            )
    elif type(body) is dict:
        items = [body]
    else:
        return DecodeResult(
            [], [_dead("schema_violation", "payload must be an object or an array", topic, received_ms,
                       payload, device_id)]
        )
    readings: list[Reading] = []
    rejects: list[DeadLetter] = []
    many = len(items) > 1
    for i, obj in enumerate(items):
        try:
            readings.append(_check_reading(obj, device_id, now, max_skew_ms, received_ms))
        except (_Reject, TypeError, ValueError, OverflowError, RecursionError) as exc:
            reason, detail = (
                (exc.reason, exc.detail) if isinstance(exc, _Reject)
                else ("too_deep", "the reading is nested too deep") if isinstance(exc, RecursionError)
                else ("schema_violation", str(exc)[:200])
            )
            # In a batch, the dead letter keeps the one bad reading (stdlib json writes NaN back as NaN).
            raw = _item_bytes(obj) if many else payload
            rejects.append(_dead(reason, f"reading[{i}]: {detail}" if many else detail, topic, received_ms,
                                 raw, device_id))
    if not items:
        rejects.append(_dead("schema_violation", "no readings in payload", topic, received_ms, payload, device_id))
    return DecodeResult(readings, rejects)


def encode_reading_json(
    device_id: str,
    ts_ms: int,
    measurements: dict[str, float | bool],
    seq: int | None = None,
    **extra: Any,
) -> bytes:
    """Encode one reading in the device JSON shape (for simulators, tests and edge uplinks)."""
    obj: dict[str, Any] = {"device_id": device_id, "ts": ts_ms}
    if seq is not None:
        obj["seq"] = seq
    obj["measurements"] = measurements
    obj.update(extra)
    return _json_encoder.encode(obj)


def encode_bus_batch(batch: BusBatch) -> bytes:
    """Encode a bus batch (msgpack, array-like structs: compact and fast)."""
    return _bus_encoder.encode(batch)


def decode_bus_batch(data: bytes) -> BusBatch:
    """Decode a bus batch; raises ``msgspec.DecodeError`` on a corrupt message."""
    return _bus_decoder.decode(data)


# ---- the version-2 (columnar) bus encoding ---------------------------------------------------------
#
# Version 1 is a msgpack ``BusBatch``: an array of array-like readings. Version 2 is ``BUS_V2_MAGIC``
# followed by one msgpack array of columns (``_BusV2``): fixed-width columns as little-endian bytes (read
# with ``np.frombuffer``, no object per value), repeated strings as dictionaries plus codes, each
# reading's measurements as the JSON the stores write. 0xc1 is the one byte msgpack never uses, so no
# version-1 record starts with it: a reader tells the versions apart by the first byte, and a record
# of a later version (0xc1 then another byte) is refused with a message naming it, never misread.

#: The first two bytes of a version-2 bus record.
BUS_V2_MAGIC: Final = b"\xc1\x02"
_V2_PREFIX: Final = 0xC1
_I4: Final = np.dtype("<i4")
_I8: Final = np.dtype("<i8")
_F8: Final = np.dtype("<f8")


class _BusV2(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    produced_ms: int
    devices: list[str]
    device: bytes  # <i4 codes into devices
    ts_ms: bytes  # <i8
    received_ms: bytes  # <i8
    key: bytes  # <i8
    chk: bytes  # <i8
    seq: bytes  # <i8, -1: none
    boots: list[str]
    boot: bytes  # <i4 codes into boots, -1: none
    event_id: list[str | None] | None
    meta: list[dict[str, Any] | None] | None
    enrichment: list[dict[str, Any] | None] | None
    measurements_json: list[str]
    metrics: list[str]
    m_row: bytes  # <i4
    m_metric: bytes  # <i4 codes into metrics
    m_value: bytes  # <f8


_v2_decoder = msgspec.msgpack.Decoder(_BusV2)
#: One reading's measurements, as v2 carries them in ``measurements_json`` (and the stores write them).
_measurements_decoder = msgspec.json.Decoder(dict[str, float | bool])


def _bytes(a: np.ndarray[Any, Any], dtype: np.dtype[Any]) -> bytes:
    return a.astype(dtype, copy=False).tobytes()


def encode_bus_columns(cols: ReadingColumns, *, produced_ms: int = 0) -> bytes:
    """Encode a batch of readings in the version-2 (columnar) bus encoding."""

    def objects(a: np.ndarray[Any, Any] | None) -> list[Any] | None:
        return None if a is None else a.tolist()

    body = _BusV2(
        produced_ms=produced_ms,
        devices=list(cols.devices),
        device=_bytes(cols.device, _I4),
        ts_ms=_bytes(cols.ts_ms, _I8),
        received_ms=_bytes(cols.received_ms, _I8),
        key=_bytes(cols.key, _I8),
        chk=_bytes(cols.chk, _I8),
        seq=_bytes(cols.seq, _I8),
        boots=list(cols.boots),
        boot=_bytes(cols.boot, _I4),
        event_id=objects(cols.event_id),
        meta=objects(cols.meta),
        enrichment=objects(cols.enrichment),
        measurements_json=cols.measurements_json.tolist(),
        metrics=list(cols.metrics),
        m_row=_bytes(cols.m_row, _I4),
        m_metric=_bytes(cols.m_metric, _I4),
        m_value=_bytes(cols.m_value, _F8),
    )
    return BUS_V2_MAGIC + _bus_encoder.encode(body)


def _fail(detail: str) -> msgspec.DecodeError:
    return msgspec.DecodeError(f"bus record v2: {detail}")


def _body_v2(data: bytes) -> tuple[_BusV2, int, int]:
    """The decoded body of a v2 record with its rows and measurement entries; every column's length checked."""
    b = _v2_decoder.decode(memoryview(data)[len(BUS_V2_MAGIC):])
    n = len(b.measurements_json)
    for name in ("event_id", "meta", "enrichment"):
        col = getattr(b, name)
        if col is not None and len(col) != n:
            raise _fail(f"column {name} has {len(col)} rows, expected {n}")
    m = len(b.m_row) // 4
    for name, size, rows in (("device", 4, n), ("ts_ms", 8, n), ("received_ms", 8, n), ("key", 8, n), ("chk", 8, n),
                             ("seq", 8, n), ("boot", 4, n), ("m_row", 4, m), ("m_metric", 4, m), ("m_value", 8, m)):
        got = len(getattr(b, name))
        if got != rows * size:
            raise _fail(f"column {name} has {got} bytes, expected {rows * size}")
    return b, n, m


def _dictionary(
    bodies: Sequence[_BusV2], field: str, codes: np.ndarray[Any, Any], counts: Sequence[int], *, none: bool = False
) -> tuple[tuple[str, ...], np.ndarray[Any, Any]]:
    """Merge the bodies' dictionaries ``field`` and map their local ``codes`` (``counts[i]`` of body i) to it."""
    if len(bodies) == 1:  # one record (the common call): its dictionary as it is
        names = getattr(bodies[0], field)
        if len(codes) and (codes.min() < (-1 if none else 0) or codes.max() >= len(names)):
            raise _fail(f"column {_CODE_COLUMN[field]} has codes outside its dictionary of {len(names)}")
        return tuple(names), codes
    index: dict[str, int] = {}
    tables: list[int] = []
    sizes = []
    for b in bodies:
        names = getattr(b, field)
        tables.extend(index.setdefault(s, len(index)) for s in names)
        sizes.append(len(names))
    if not len(codes):
        return tuple(index), codes.astype(np.int32)
    size = np.repeat(np.array(sizes, dtype=np.int64), counts)
    if codes.min() < (-1 if none else 0) or np.any(codes >= size):
        of = sizes[0] if len(sizes) == 1 else "its record"
        raise _fail(f"column {_CODE_COLUMN[field]} has codes outside its dictionary of {of}")
    offset = np.repeat(np.cumsum([0, *sizes[:-1]]), counts)
    table = np.array([*tables, _NONE_CODE], dtype=np.int32)
    return tuple(index), table[np.where(codes < 0, len(tables), codes + offset)]


_CODE_COLUMN: Final = {"devices": "device", "boots": "boot", "metrics": "m_metric"}
_NONE_CODE: Final = -1


def _join_v2(bodies: Sequence[_BusV2], ns: Sequence[int], ms: Sequence[int]) -> ReadingColumns:
    """One batch of the rows of ``bodies`` in order: numpy over the whole batch, not per record."""
    n = sum(ns)

    def column(name: str, dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
        raw = getattr(bodies[0], name) if len(bodies) == 1 else b"".join(getattr(b, name) for b in bodies)
        return np.frombuffer(raw, dtype=dtype)

    devices, device = _dictionary(bodies, "devices", column("device", _I4), ns)
    boots, boot = _dictionary(bodies, "boots", column("boot", _I4), ns, none=True)
    metrics, m_metric = _dictionary(bodies, "metrics", column("m_metric", _I4), ms)
    seq, key, m_value = column("seq", _I8), column("key", _I8), column("m_value", _F8)
    local_row = column("m_row", _I4)
    if n and (seq.min() < -1 or key.min() < 0):
        raise _fail("a seq below -1 or a negative key")
    if not np.isfinite(m_value).all():
        raise _fail("a measurement is not finite")
    if len(local_row) and (local_row.min() < 0 or np.any(local_row >= np.repeat(np.array(ns), ms))):
        raise _fail(f"column m_row has codes outside its record's {ns[0] if len(ns) == 1 else ''} rows")
    m_row = local_row if len(bodies) == 1 else local_row + np.repeat(np.cumsum([0, *ns[:-1]]), ms).astype(np.int32)
    # the long format is grouped by row in row order, every reading with at least one measurement (the
    # windows rely on both)
    if n and (len(m_row) == 0 or m_row[0] != 0 or np.any(np.diff(m_row) < 0)
              or np.count_nonzero(np.diff(m_row)) + 1 != n):
        raise _fail("the measurement rows are not each reading's, in order")

    def objects(name: str) -> np.ndarray[Any, Any] | None:
        cols = [getattr(b, name) for b in bodies]
        if all(c is None for c in cols):
            return None
        out = np.empty(n, dtype=object)
        out[:] = [v for c, k in zip(cols, ns, strict=True) for v in (c if c is not None else [None] * k)]
        return out

    measurements_json = np.empty(n, dtype=object)
    measurements_json[:] = [s for b in bodies for s in b.measurements_json]
    # The stores write this column as it is: each row must be one JSON object of numbers (one decode per
    # row; joining rows into one document could be fooled by a row that closes another's brackets).
    decode_measurements = _measurements_decoder.decode
    try:
        for s in measurements_json:
            decode_measurements(s)
    except (msgspec.DecodeError, TypeError) as exc:
        raise _fail(f"column measurements_json holds a row that is not an object of numbers: {exc}") from exc
    return ReadingColumns(
        devices=devices, device=device, ts_ms=column("ts_ms", _I8), received_ms=column("received_ms", _I8),
        key=key, chk=column("chk", _I8), seq=seq, boots=boots, boot=boot, event_id=objects("event_id"),
        meta=objects("meta"), enrichment=objects("enrichment"), measurements_json=measurements_json,
        metrics=metrics, m_row=m_row.astype(np.int32, copy=False), m_metric=m_metric, m_value=m_value,
    )


def _decode_v2(data: bytes) -> ReadingColumns:
    b, n, m = _body_v2(data)
    return _join_v2([b], [n], [m])


def _version(data: bytes) -> int:
    """The bus encoding version of a record: 1 unless it starts with 0xc1 (then its second byte)."""
    if data[:1] != b"\xc1":
        return 1
    version = data[1] if len(data) > 1 else -1
    if version != 2:
        raise msgspec.DecodeError(
            f"bus record encoding version {version} is not known to this fieldmesh (it reads versions 1 and 2):"
            " upgrade the processors before the gateways"
        )
    return 2


def decode_bus_columns(data: bytes) -> ReadingColumns:
    """Decode a bus record of either version into columns.

    Raises:
        msgspec.DecodeError: a corrupt record, or an encoding version this fieldmesh does not know.
    """
    if _version(data) == 2:
        return _decode_v2(data)
    return ReadingColumns.from_readings(_bus_decoder.decode(data).readings)


def decode_bus_readings(data: bytes) -> list[Reading]:
    """Decode a bus record of either version into readings.

    Raises:
        msgspec.DecodeError: a corrupt record, or an encoding version this fieldmesh does not know.
    """
    if _version(data) == 2:
        return _decode_v2(data).to_readings()
    return _bus_decoder.decode(data).readings


def decode_bus_columns_many(
    values: Sequence[bytes],
) -> tuple[ReadingColumns, list[int], dict[int, Exception]]:
    """Decode many bus records (either version, mixed) into one batch of columns, rows in record order.

    Consecutive version-2 records are checked and joined with numpy over all of them at once, so the cost
    per record is one msgpack decode. A record that does not decode costs only itself.

    Returns:
        The columns; the number of rows of each record (0 for one that failed); the error of each record
        that failed, by its index in ``values`` (``msgspec.DecodeError``, or ``RecursionError`` for nesting
        past the decoder's limit).
    """
    rows = [0] * len(values)
    errors: dict[int, Exception] = {}
    parts: list[ReadingColumns] = []
    run: list[tuple[int, _BusV2, int, int]] = []
    run_v1: list[tuple[int, list[Reading]]] = []

    def flush_v1() -> None:
        # one conversion to columns for the run: its numpy work is per batch, not per record
        if not run_v1:
            return
        try:
            parts.append(ReadingColumns.from_readings(list(chain.from_iterable(r for _, r in run_v1))))
        except Exception:  # a record's readings do not convert: find the culprit(s) record by record
            for i, readings in run_v1:
                try:
                    parts.append(ReadingColumns.from_readings(readings))
                except Exception as exc:
                    errors[i] = exc
                    rows[i] = 0
        run_v1.clear()

    def flush() -> None:
        flush_v1()
        if not run:
            return
        try:
            parts.append(_join_v2([b for _, b, _, _ in run], [n for *_, n, _ in run], [m for *_, m in run]))
        except Exception:  # a check failed over the run: find the culprit(s) record by record
            for i, b, n, m in run:
                try:
                    parts.append(_join_v2([b], [n], [m]))
                except Exception as exc:
                    errors[i] = exc
                    rows[i] = 0
        run.clear()

    for i, data in enumerate(values):
        try:
            if _version(data) == 2:
                b, n, m = _body_v2(data)
                flush_v1()
                run.append((i, b, n, m))
                rows[i] = n
                continue
            readings = _bus_decoder.decode(data).readings
        except Exception as exc:  # corrupt, an unknown version, nested past the decoder's limit (RecursionError)
            errors[i] = exc
            continue
        if run:
            flush()
        run_v1.append((i, readings))
        rows[i] = len(readings)
    flush()
    return ReadingColumns.concat(parts), rows, errors


def encode_dead_letter(dl: DeadLetter) -> bytes:
    """Encode a dead letter as JSON (the payload as base64), readable by any consumer."""
    return _dl_encoder.encode(dl)


def decode_dead_letter(data: bytes) -> DeadLetter:
    """Decode a dead letter."""
    return _dl_decoder.decode(data)
