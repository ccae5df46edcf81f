"""Schemas on the wire: device payloads in Avro, Protobuf or JSON, written against a registered schema.

A payload names its schema either by Confluent's framing (magic byte ``0``, the 4-byte big-endian
schema id, for Protobuf then the message indexes, then the body) or, unframed, by an MQTT 5 user
property ``schema_id`` (the :class:`~fieldmesh.gateway.base.IngestMessage`'s ``schema_id``). The
gateway fetches the schema by id from the registry (ids are immutable: cached for good, bounded),
decodes the body (fastavro for Avro, message classes built from the stored ``FileDescriptorProto`` for
Protobuf, JSON validated by jsonschema-rs), maps the record to the telemetry shape (:func:`telemetry_of`)
and validates it as any JSON payload. docs/schemas.md "Schemas on the wire" says how to use it.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Final

import msgspec

__all__ = ["DecodeError", "SchemaDecoder", "WireSchemas", "build_decoder", "registry_fetch", "registry_schemas",
           "telemetry_of"]

log = logging.getLogger(__name__)

#: Fields of a decoded record taken as they are; every other number or bool becomes a measurement.
_READING_FIELDS: Final = frozenset({"device_id", "ts", "seq", "boot_id", "event_id", "measurements", "meta"})
_json_decoder = msgspec.json.Decoder()


class DecodeError(Exception):
    """A body that its schema refuses: ``path`` names where (``$`` for the whole body)."""

    def __init__(self, path: str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail


def _ms(v: Any) -> Any:
    return int(v.timestamp() * 1000) if isinstance(v, datetime) else v


def _reading_of(obj: Any) -> Any:
    """One reading from a decoded record (see :func:`telemetry_of`)."""
    if type(obj) is not dict:
        return obj
    out: dict[str, Any] = {}
    meas: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    for k, v in obj.items():
        if v is None:  # an optional field left unset (Avro union with null, proto3 optional)
            continue
        if k in _READING_FIELDS:
            out[k] = _ms(v) if k == "ts" else v
        elif type(v) in (float, int, bool):
            meas[k] = v
        else:
            meta[k] = _ms(v)
    if meas:
        if "measurements" in out and type(out["measurements"]) is dict:
            out["measurements"] = {**meas, **out["measurements"]}
        elif "measurements" not in out:
            out["measurements"] = meas
    if meta and "meta" not in out:
        out["meta"] = meta
    if type(out.get("measurements")) is dict:  # a map with optional values: unset ones are not readings
        out["measurements"] = {k: v for k, v in out["measurements"].items() if v is not None}
    return out


def telemetry_of(obj: Any) -> Any:
    """The telemetry shape (docs/contract.md) of a record decoded by its schema.

    A record with a ``readings`` array is a batch (each item mapped alike); any other record is one
    reading: its fields ``device_id``, ``ts``, ``seq``, ``boot_id``, ``event_id``, ``measurements`` (a
    map) and ``meta`` are taken as such; every other number or bool field is a measurement of that
    name, every other field goes to ``meta``; unset (null) fields are dropped; a timestamp (Avro
    ``timestamp-millis``/``-micros``, ``google.protobuf.Timestamp``) becomes epoch milliseconds.
    """
    if type(obj) is dict and type(obj.get("readings")) is list:
        out = {k: v for k, v in obj.items() if v is not None}
        out["readings"] = list(map(_reading_of, obj["readings"]))
        return out
    if type(obj) is list:
        return list(map(_reading_of, obj))
    return _reading_of(obj)


class SchemaDecoder:
    """Decodes the bodies written against one schema."""

    def __init__(self, schema_id: int, schema_type: str, decode: Callable[[bytes, int, bool], Any]) -> None:
        self.schema_id = schema_id
        self.schema_type = schema_type
        self._decode = decode

    def decode(self, payload: bytes, start: int, framed: bool = True) -> Any:
        """The record in ``payload[start:]`` (Protobuf, ``framed``: after the message indexes, else the
        file's first message); raises DecodeError."""
        return self._decode(payload, start, framed)


def _avro(parsed: Any) -> Callable[[bytes, int, bool], Any]:
    from fastavro import schemaless_reader

    def decode(payload: bytes, start: int, framed: bool) -> Any:
        fo = io.BytesIO(payload)
        fo.seek(start)
        try:
            rec = schemaless_reader(fo, parsed, None)
        except Exception as exc:  # EOFError, UnicodeDecodeError, IndexError (a bad union branch), ...
            raise DecodeError(f"$ (at byte {fo.tell()})", f"not Avro of this schema: {type(exc).__name__}: "
                              f"{exc}"[:200]) from None
        left = len(payload) - fo.tell()
        if left:
            raise DecodeError(f"$ (at byte {fo.tell()})", f"{left} bytes after the record")
        return rec

    return decode


def _json_path(path: Any) -> str:
    return "$" + "".join(f"[{p}]" if type(p) is int else f".{p}" for p in path)


def _json(raw: Any, refs: dict[str, Any]) -> Callable[[bytes, int, bool], Any]:
    # jsonschema-rs: a tenth of the cost of the jsonschema package per document (bench/gateway_schemas.py);
    # offline: a $ref resolves among the schema's references only, never over the network
    import jsonschema_rs

    kw: dict[str, Any] = {"offline": True}
    if refs:
        kw["registry"] = jsonschema_rs.Registry(list(refs.items()))
    if isinstance(raw, dict) and "$schema" in raw:
        validator = jsonschema_rs.validator_for(raw, **kw)
    else:  # draft 7 when the schema does not say, as the registry reads it
        validator = jsonschema_rs.Draft7Validator(raw, **kw)

    def decode(payload: bytes, start: int, framed: bool) -> Any:
        try:
            obj = _json_decoder.decode(memoryview(payload)[start:])
        except msgspec.DecodeError as exc:
            raise DecodeError("$", f"not JSON: {exc}"[:200]) from None
        if not validator.is_valid(obj):
            err = next(iter(validator.iter_errors(obj)))
            raise DecodeError(_json_path(err.instance_path), err.message[:200])
        return obj

    return decode


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise DecodeError("$", "truncated message indexes")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos  # zigzag
        shift += 7


#: message descriptor -> its fields: (name, field descriptor, kind): 0 plain, 1 map, 2 repeated, 3 with presence.
_PLANS: dict[Any, list[tuple[str, Any, int]]] = {}


def _plan(desc: Any) -> list[tuple[str, Any, int]]:
    plan = _PLANS.get(desc)
    if plan is None:
        plan = []
        for fd in desc.fields:
            mt = fd.message_type
            if mt is not None and mt.GetOptions().map_entry:
                plan.append((fd.name, mt.fields_by_name["value"], 1))
            elif fd.is_repeated:
                plan.append((fd.name, fd, 2))
            else:
                plan.append((fd.name, fd, 3 if fd.has_presence else 0))
        if len(_PLANS) > 10_000:
            _PLANS.clear()
        _PLANS[desc] = plan
    return plan


def _proto_value(fd: Any, v: Any) -> Any:
    if fd.message_type is not None:
        if fd.message_type.full_name == "google.protobuf.Timestamp":
            return v.ToMilliseconds()
        return _proto_dict(v)
    return v


def _proto_dict(msg: Any) -> dict[str, Any]:
    """A message as a dict: every field (proto3 scalars at their default included), unset optional and
    message fields as None, maps as dicts, repeated fields as lists."""
    out: dict[str, Any] = {}
    for name, fd, kind in _plan(msg.DESCRIPTOR):
        v = getattr(msg, name)
        if kind == 0:
            out[name] = v if fd.message_type is None else _proto_value(fd, v)
        elif kind == 1:
            out[name] = dict(v) if fd.message_type is None else {k: _proto_value(fd, x) for k, x in v.items()}
        elif kind == 2:
            out[name] = [_proto_value(fd, x) for x in v]
        else:
            out[name] = _proto_value(fd, v) if msg.HasField(name) else None
    return out


def _protobuf(files: list[Any]) -> Callable[[bytes, int, bool], Any]:
    """``files``: the schema's ``FileDescriptorProto`` last, the files it imports before it."""
    from google.protobuf import descriptor_pool, message_factory
    from google.protobuf.message import DecodeError as ProtoDecodeError

    pool = descriptor_pool.DescriptorPool()
    for f in files:
        pool.Add(f)
    fdp = files[-1]
    file_desc = pool.FindFileByName(fdp.name)
    classes: dict[tuple[int, ...], Any] = {}

    def cls_of(indexes: tuple[int, ...]) -> Any:
        c = classes.get(indexes)
        if c is None:
            try:
                desc = file_desc.message_types_by_name[fdp.message_type[indexes[0]].name]
                for i in indexes[1:]:
                    desc = desc.nested_types[i]
            except IndexError:
                raise DecodeError("$", f"no message at indexes {list(indexes)} in the schema") from None
            c = classes[indexes] = message_factory.GetMessageClass(desc)
        return c

    def decode(payload: bytes, start: int, framed: bool) -> Any:
        n, pos = _read_varint(payload, start) if framed and start < len(payload) else (0, start)
        if n == 0:
            indexes: tuple[int, ...] = (0,)
        else:
            if n < 0 or n > 32:
                raise DecodeError("$", f"bad message index count {n}")
            got = []
            for _ in range(n):
                i, pos = _read_varint(payload, pos)
                got.append(i)
            indexes = tuple(got)
        msg = cls_of(indexes)()
        try:
            msg.ParseFromString(payload[pos:])
        except ProtoDecodeError as exc:
            raise DecodeError("$", f"not a {msg.DESCRIPTOR.full_name}: {exc}"[:200]) from None
        return _proto_dict(msg)

    return decode


def build_decoder(schema_id: int, schema_type: str, parsed: Any,
                  references: Mapping[str, str] | None = None) -> SchemaDecoder:
    """The decoder of a schema parsed by :class:`fieldmesh.schema.registry.SchemaRegistry`;
    ``references``: the texts of the schemas it references (name -> text), for Protobuf imports."""
    if schema_type == "AVRO":
        return SchemaDecoder(schema_id, schema_type, _avro(parsed.parsed))
    if schema_type == "JSON":
        return SchemaDecoder(schema_id, schema_type, _json(parsed.raw, parsed.refs))
    if schema_type == "PROTOBUF":
        from fieldmesh.schema.protobuf import file_descriptors

        return SchemaDecoder(schema_id, schema_type, _protobuf(file_descriptors(parsed.text, references or {})))
    raise ValueError(f"unknown schema type {schema_type!r}")


class WireSchemas:
    """Decoders by schema id, fetched from the registry on first use and kept (ids never change).

    ``fetch(schema_id)`` gives the decoder, or None for an id the registry does not have; such ids are
    remembered for ``unknown_ttl_s`` (then asked again: the schema may have been registered since).
    A registry that cannot be read raises from ``fetch``: the message is dead-lettered as an unknown
    schema with the error in its detail, and counted in :attr:`errors`.
    """

    def __init__(self, fetch: Callable[[int], SchemaDecoder | None], *, max_cached: int = 4096,
                 unknown_ttl_s: float = 10.0, latest: Callable[[str], int | None] | None = None,
                 latest_ttl_s: float = 30.0) -> None:
        self._fetch = fetch
        self._latest = latest
        self._latest_ids: dict[str, tuple[float, int | None]] = {}
        self.latest_ttl_s = latest_ttl_s
        self._known: dict[int, SchemaDecoder] = {}
        self._unknown: dict[int, float] = {}
        self.max_cached = max_cached
        self.unknown_ttl_s = unknown_ttl_s
        self.errors = 0
        self.fetches = 0

    def get(self, schema_id: int) -> SchemaDecoder | str:
        """The decoder of ``schema_id``, or why there is none."""
        d = self._known.get(schema_id)
        if d is not None:
            return d
        now = time.monotonic()
        until = self._unknown.get(schema_id)
        if until is not None and until > now:
            return f"schema id {schema_id} is not in the registry"
        self.fetches += 1
        try:
            got = self._fetch(schema_id)
        except Exception as exc:  # the registry unreadable, or a stored schema that does not build
            self.errors += 1
            log.warning("cannot load schema id %d: %s", schema_id, exc)
            self._unknown[schema_id] = now + min(self.unknown_ttl_s, 1.0)
            return f"schema id {schema_id} cannot be loaded: {type(exc).__name__}: {exc}"[:200]
        if got is None:
            if len(self._unknown) >= self.max_cached:
                self._unknown.clear()
            self._unknown[schema_id] = now + self.unknown_ttl_s
            return f"schema id {schema_id} is not in the registry"
        if len(self._known) >= self.max_cached:
            self._known.pop(next(iter(self._known)))
        self._known[schema_id] = got
        self._unknown.pop(schema_id, None)
        return got

    def latest(self, subject: str) -> SchemaDecoder | str:
        """The decoder of ``subject``'s latest schema (its id asked again after ``latest_ttl_s``), or why
        there is none."""
        now = time.monotonic()
        cached = self._latest_ids.get(subject)
        if cached is None or cached[0] <= now:
            if self._latest is None:
                return f"subject {subject!r}: no registry to ask"
            try:
                sid = self._latest(subject)
            except Exception as exc:  # the registry unreadable: keep what we had, if anything
                self.errors += 1
                log.warning("cannot read the latest schema of subject %r: %s", subject, exc)
                if cached is None or cached[1] is None:
                    return f"subject {subject!r}: the registry cannot be read: {type(exc).__name__}: {exc}"[:200]
                sid = cached[1]
            if len(self._latest_ids) >= self.max_cached:
                self._latest_ids.clear()
            self._latest_ids[subject] = cached = (now + self.latest_ttl_s, sid)
        sid = cached[1]
        if sid is None:
            return f"subject {subject!r} has no schema in the registry"
        return self.get(sid)


def _opener(open_registry: Callable[[], Any]) -> Callable[[], Any]:
    lock = threading.Lock()
    opened: list[Any] = []

    def registry() -> Any:
        with lock:
            if not opened:
                opened.append(open_registry())
        return opened[0]

    return registry


def registry_fetch(open_registry: Callable[[], Any]) -> Callable[[int], SchemaDecoder | None]:
    """A ``fetch`` for :class:`WireSchemas` from a :class:`fieldmesh.schema.registry.SchemaRegistry`,
    which ``open_registry`` opens at the first call (a gateway that never sees such a payload never
    opens it)."""
    registry = _opener(open_registry)

    def fetch(schema_id: int) -> SchemaDecoder | None:
        reg = registry()
        stored = reg.store.schema(schema_id)
        if stored is None:
            return None
        parsed = reg.parse(stored.schema_type, stored.schema, stored.references)[0]
        return build_decoder(schema_id, stored.schema_type, parsed, reg.reference_texts(stored.references))

    return fetch


def registry_schemas(open_registry: Callable[[], Any], *, latest_ttl_s: float = 30.0) -> WireSchemas:
    """:class:`WireSchemas` over a :class:`fieldmesh.schema.registry.SchemaRegistry` that
    ``open_registry`` opens at first use: schemas by id, and subjects' latest schemas."""
    registry = _opener(open_registry)

    def latest(subject: str) -> int | None:
        live = registry().store.versions(subject, deleted=False)
        return live[-1].schema_id if live else None

    return WireSchemas(registry_fetch(registry), latest=latest, latest_ttl_s=latest_ttl_s)
