"""Protobuf schemas: ``.proto`` text (proto2/proto3) or a base64 ``FileDescriptorProto`` (what
confluent-kafka's Python ``ProtobufSerializer`` registers), both read as a ``FileDescriptorProto``;
compatibility by the wire-format rules Confluent applies.

The text is compiled by our own parser (a tokenizer and a recursive descent over the ``.proto``
grammar's declarations: syntax, package, imports, messages with fields, map fields (as protoc's
``...Entry`` types), oneofs, proto3 ``optional`` (as protoc's synthetic oneofs), nested messages and
enums with their values; options, reserved, extensions, services and extend bodies are skipped), with
type names resolved as protoc resolves them, against the file itself, its imports (the schema's
references) and the well-known ``google/protobuf/*`` files. ``struct.proto`` compiles to the descriptor
protoc made (tests/schema/test_protobuf.py), so text schemas are served as descriptors too
(``format=serialized``, what Python deserializers ask for). Not kept: field options (proto2 defaults,
``packed``, ``json_name``), services, extensions; editions are refused.

``incompatibilities(reader, writer)`` checks, per message of the writer (names as Confluent's):
MESSAGE_REMOVED, PACKAGE_CHANGED, FIELD_KIND_CHANGED (a field number whose type leaves its wire-compatible
group: int32/uint32/int64/uint64/bool/enum, sint32/sint64, fixed32/sfixed32, fixed64/sfixed64,
string/bytes, a message type), FIELD_NAMED_TYPE_CHANGED (another message type), REQUIRED_FIELD_ADDED,
REQUIRED_FIELD_REMOVED (proto2), MULTIPLE_FIELDS_MOVED_TO_ONEOF. Removing or adding optional
fields, renaming fields, and enum changes are compatible here. Not checked: field label changes between
repeated and singular, ``reserved`` reuse, and imported types' own evolution (check their subjects).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from fieldmesh.schema.base import InvalidSchema

__all__ = ["ProtoField", "ProtobufFormat", "ProtobufSchema"]

_TOKEN: Final = re.compile(r"""\s+|//[^\n]*|/\*.*?\*/|("(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|([A-Za-z_.][\w.]*)"""
                           r"""|([-+]?(?:0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?))|([{}\[\]()<>=;,:])""",
                           re.DOTALL)
_SCALARS: Final = frozenset({"double", "float", "int32", "int64", "uint32", "uint64", "sint32", "sint64", "fixed32",
                             "fixed64", "sfixed32", "sfixed64", "bool", "string", "bytes"})
_GROUPS: Final = ({"int32", "uint32", "int64", "uint64", "bool", "enum"}, {"sint32", "sint64"},
                  {"fixed32", "sfixed32"}, {"fixed64", "sfixed64"}, {"string", "bytes"})
# FieldDescriptorProto.Type numbers
_DESC_TYPES: Final = {1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64", 7: "fixed32",
                      8: "bool", 9: "string", 10: "group", 11: "message", 12: "bytes", 13: "uint32", 14: "enum",
                      15: "sfixed32", 16: "sfixed64", 17: "sint32", 18: "sint64"}
_WELL_KNOWN: Final = ("google/protobuf/", "google/type/", "confluent/")


@dataclass(frozen=True)
class ProtoField:
    """A field: its name, type (a scalar, ``map<K,V>``, or a message/enum name), label, oneof."""

    name: str
    type: str
    label: str  # "optional", "required", "repeated" or "" (proto3 singular)
    oneof: str | None = None


@dataclass(frozen=True)
class ProtobufSchema:
    """A parsed Protobuf file: its text as registered and its messages (full name -> number -> field)."""

    text: str
    package: str
    messages: dict[str, dict[int, ProtoField]] = field(compare=False)
    enums: frozenset[str] = field(compare=False)
    descriptor: bytes = field(default=b"", compare=False, repr=False)
    schema_type: str = "PROTOBUF"

    def serialized(self) -> str:
        """The schema as a base64 ``FileDescriptorProto`` (Confluent's ``format=serialized``)."""
        return self.text.strip() if _is_base64(self.text) else base64.b64encode(self.descriptor).decode()

    def canonical(self, *, normalize: bool = False) -> str:
        """The text as registered, trimmed (``normalize``: comments dropped and whitespace collapsed)."""
        if not normalize or _is_base64(self.text):
            return self.text.strip()
        return " ".join(m.group(0) for m in _tokens(self.text))


def _is_base64(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9+/=\s]+", text) is not None and "{" not in text


def _tokens(text: str) -> Iterator[re.Match[str]]:
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise InvalidSchema(f"Invalid schema: unexpected {text[pos:pos + 20]!r} at offset {pos}")
        pos = m.end()
        if m.lastindex is not None:
            yield m


_SCALAR_TYPES: Final = {name: num for num, name in _DESC_TYPES.items() if name not in ("group", "message", "enum")}
_LABELS: Final = {"": 1, "optional": 1, "required": 2, "repeated": 3}


def _camel(name: str) -> str:
    """protoc's name of a map field's entry type: ``my_tags`` -> ``MyTagsEntry``."""
    return "".join(p[:1].upper() + p[1:] for p in name.split("_")) + "Entry"


class _Parser:
    """Parses .proto text into a ``FileDescriptorProto`` (type names resolved in a later pass)."""

    def __init__(self, text: str, name: str) -> None:
        from google.protobuf import descriptor_pb2

        self.toks = [m.group(m.lastindex or 0) for m in _tokens(text)]
        self.i = 0
        self.fdp = descriptor_pb2.FileDescriptorProto(name=name)
        self.syntax = "proto2"
        # (field, scope, type as written): resolved once every name of the file and its imports is known
        self.pending: list[tuple[Any, str, str]] = []

    def peek(self) -> str:
        return self.toks[self.i] if self.i < len(self.toks) else ""

    def take(self, expect: str | None = None) -> str:
        if self.i >= len(self.toks):
            raise InvalidSchema("Invalid schema: unexpected end of the .proto text")
        t = self.toks[self.i]
        if expect is not None and t != expect:
            raise InvalidSchema(f"Invalid schema: expected {expect!r}, found {t!r}")
        self.i += 1
        return t

    def skip_statement(self) -> None:
        depth = 0
        while True:
            t = self.take()
            if t in "{[(" and len(t) == 1:
                depth += 1
            elif t in "}])" and len(t) == 1:
                depth -= 1
                if depth == 0 and t == "}":
                    return
            elif t == ";" and depth == 0:
                return

    def file(self) -> None:
        fdp = self.fdp
        while self.i < len(self.toks):
            t = self.take()
            if t in ("syntax", "edition"):
                self.take("=")
                self.syntax = self.take().strip("\"'")
                self.take(";")
                if t == "edition" or self.syntax not in ("proto2", "proto3"):
                    raise InvalidSchema(f"Invalid schema: {t} {self.syntax!r} is not supported (proto2 or proto3)")
                if self.syntax == "proto3":
                    fdp.syntax = "proto3"
            elif t == "package":
                fdp.package = self.take()
                self.take(";")
            elif t == "import":
                name = self.take()
                public = name == "public"
                if name in ("public", "weak"):
                    name = self.take()
                if public:
                    fdp.public_dependency.append(len(fdp.dependency))
                fdp.dependency.append(name.strip("\"'"))
                self.take(";")
            elif t == "message":
                self.message(fdp.message_type.add(), fdp.package)
            elif t == "enum":
                self.enum(fdp.enum_type.add())
            elif t in ("option", "service", "extend"):
                self.skip_statement()
            elif t == ";":
                continue
            else:
                raise InvalidSchema(f"Invalid schema: unexpected {t!r} at the top level of the .proto text")

    def enum(self, e: Any) -> None:
        e.name = self.take()
        self.take("{")
        while self.peek() != "}":
            t = self.take()
            if t == "option":
                opt = self.take()
                self.take("=")
                val = self.take()
                self.take(";")
                if opt == "allow_alias":
                    e.options.allow_alias = val == "true"
            elif t == "reserved":
                self.i -= 1
                self.skip_statement()
            elif t != ";":
                self.take("=")
                num = self.take()
                try:
                    number = int(num, 0)
                except ValueError:
                    raise InvalidSchema(f"Invalid schema: enum value {t} has the number {num!r}") from None
                e.value.add(name=t, number=number)
                if self.peek() == "[":
                    while self.take() != "]":
                        pass
                self.take(";")
        self.take("}")
        if not e.value:
            raise InvalidSchema(f"Invalid schema: enum {e.name} has no value")

    def message(self, m: Any, scope: str) -> None:
        m.name = self.take()
        full = f"{scope}.{m.name}".lstrip(".")
        self.take("{")
        synthetic: list[Any] = []
        self.body(m, full, None, synthetic)
        for f in synthetic:  # proto3 optional: a oneof of its own, after the real ones (as protoc orders them)
            f.oneof_index = len(m.oneof_decl)
            m.oneof_decl.add(name=f"_{f.name}")
        numbers = [f.number for f in m.field]
        if len(set(numbers)) != len(numbers):
            dup = next(n for n in numbers if numbers.count(n) > 1)
            raise InvalidSchema(f"Invalid schema: field number {dup} is used twice in {full}")

    def body(self, m: Any, full: str, oneof: int | None, synthetic: list[Any]) -> None:
        while True:
            t = self.peek()
            if t == "}":
                self.take()
                return
            if t == "message" and oneof is None:
                self.take()
                self.message(m.nested_type.add(), full)
            elif t == "enum" and oneof is None:
                self.take()
                self.enum(m.enum_type.add())
            elif t == "oneof" and oneof is None:
                self.take()
                index = len(m.oneof_decl)
                m.oneof_decl.add(name=self.take())
                self.take("{")
                self.body(m, full, index, synthetic)
            elif t in ("option", "reserved", "extensions", "extend"):
                self.skip_statement()
            elif t == ";":
                self.take()
            else:
                self.field(m, full, oneof, synthetic)

    def field(self, m: Any, full: str, oneof: int | None, synthetic: list[Any]) -> None:
        label = ""
        if self.peek() in ("optional", "required", "repeated"):
            label = self.take()
        ftype = self.take()
        key = value = None
        if ftype == "map":
            self.take("<")
            key = self.take()
            self.take(",")
            value = self.take()
            self.take(">")
        elif ftype == "group":
            raise InvalidSchema("Invalid schema: proto2 groups are not supported")
        name = self.take()
        self.take("=")
        num = self.take()
        try:
            number = int(num, 0)
        except ValueError:
            raise InvalidSchema(f"Invalid schema: field {name} of {full} has the number {num!r}") from None
        if not 1 <= number <= 536_870_911 or 19000 <= number <= 19999:
            raise InvalidSchema(f"Invalid schema: field {name} of {full} has the reserved or invalid number {number}")
        if self.peek() == "[":
            while self.take() != "]":
                pass
        self.take(";")
        f = m.field.add(name=name, number=number, label=_LABELS[label])
        if oneof is not None:
            f.oneof_index = oneof
        if key is not None and value is not None:
            entry = m.nested_type.add(name=_camel(name))
            entry.options.map_entry = True
            k = entry.field.add(name="key", number=1, label=1)
            v = entry.field.add(name="value", number=2, label=1)
            self._type(k, key, full)
            self._type(v, value, full)
            f.label = 3
            f.type = 11
            f.type_name = f".{full}.{entry.name}"
            return
        self._type(f, ftype, full)
        if label == "optional" and self.syntax == "proto3":
            f.proto3_optional = True
            synthetic.append(f)

    def _type(self, f: Any, written: str, scope: str) -> None:
        if written in _SCALAR_TYPES:
            f.type = _SCALAR_TYPES[written]
        else:
            self.pending.append((f, scope, written))


def _names(fdp: Any) -> dict[str, int]:
    """Full name (no leading dot) -> 11 (message) or 14 (enum), of every type ``fdp`` declares."""
    out: dict[str, int] = {}

    def walk(msgs: Any, enums: Any, scope: str) -> None:
        for e in enums:
            out[f"{scope}.{e.name}".lstrip(".")] = 14
        for m in msgs:
            full = f"{scope}.{m.name}".lstrip(".")
            out[full] = 11
            walk(m.nested_type, m.enum_type, full)

    walk(fdp.message_type, fdp.enum_type, fdp.package)
    return out


def _well_known(path: str) -> Any:
    """The descriptor of a well-known import (``google/protobuf/timestamp.proto``), or None."""
    import importlib

    from google.protobuf import descriptor_pb2, descriptor_pool

    module = path.removesuffix(".proto").replace("/", ".") + "_pb2"
    try:
        importlib.import_module(module)
        fd = descriptor_pool.Default().FindFileByName(path)
    except (ImportError, KeyError):
        return None
    fdp = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(fdp)
    return fdp


def _compile(text: str, name: str, references: Mapping[str, str], seen: tuple[str, ...] = ()) -> Any:
    """``text`` as a ``FileDescriptorProto`` named ``name``, its type names resolved against itself and
    its imports (references, parsed the same way, or well-known files)."""
    if name in seen:
        raise InvalidSchema(f"Invalid schema: {name} imports itself")
    if _is_base64(text) and text.strip():
        return _decode(text)
    p = _Parser(text, name)
    p.file()
    known = _names(p.fdp)
    for dep in p.fdp.dependency:
        if dep in references:
            known.update(_names(_compile(references[dep], dep, references, (*seen, name))))
        elif dep.startswith(_WELL_KNOWN):
            wk = _well_known(dep)
            if wk is not None:
                known.update(_names(wk))
        else:
            raise InvalidSchema(f"Invalid schema: import {dep!r} is not among the schema's references")
    for f, scope, written in p.pending:
        if written.startswith("."):
            candidates = [written[1:]]
        else:
            parts = scope.split(".") if scope else []
            candidates = [".".join([*parts[:i], written]) for i in range(len(parts), -1, -1)]
        full = next((c for c in candidates if c in known), None)
        if full is None:
            raise InvalidSchema(f"Invalid schema: unknown type {written!r} in {scope or 'the file'}")
        f.type = known[full]
        f.type_name = f".{full}"
    return p.fdp


def _decode(text: str) -> Any:
    try:
        from google.protobuf import descriptor_pb2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InvalidSchema("Invalid schema: a Protobuf schema needs the protobuf package") from exc
    try:
        return descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(text, validate=False))
    except Exception as exc:  # DecodeError, binascii.Error
        raise InvalidSchema(f"Invalid schema: neither .proto text nor a base64 FileDescriptorProto: {exc}") from None


def _from_descriptor(text: str, fdp: Any) -> ProtobufSchema:
    """The flat model of a descriptor (what compatibility compares)."""
    messages: dict[str, dict[int, ProtoField]] = {}
    enums: set[str] = set()
    labels = {1: "optional", 2: "required", 3: "repeated"}

    def kind(f: Any) -> str:
        t = _DESC_TYPES.get(f.type, "?")
        return "enum" if t == "enum" else f.type_name.lstrip(".") if t == "message" else t

    def walk(msgs: Any, scope: str) -> None:
        for m in msgs:
            full = f"{scope}.{m.name}".lstrip(".")
            entries = {f"{full}.{n.name}": n for n in m.nested_type if n.options.map_entry}
            fields: dict[int, ProtoField] = {}
            for f in m.field:
                t = kind(f)
                if t in entries:  # a map: its key and value types, as written
                    k, v = sorted(entries[t].field, key=lambda x: x.number)[:2]
                    t = f"map<{kind(k)},{kind(v)}>"
                label = labels.get(f.label, "")
                if fdp.syntax == "proto3" and label == "optional" and not f.proto3_optional:
                    label = ""
                if t.startswith("map<"):
                    label = ""
                real_oneof = f.HasField("oneof_index") and not f.proto3_optional
                oneof = m.oneof_decl[f.oneof_index].name if real_oneof else None
                fields[f.number] = ProtoField(name=f.name, type=t, label=label, oneof=oneof)
            messages[full] = fields
            enums.update(f"{full}.{e.name}" for e in m.enum_type)
            walk([n for n in m.nested_type if not n.options.map_entry], full)

    walk(fdp.message_type, fdp.package)
    enums.update(f"{fdp.package}.{e.name}".lstrip(".") for e in fdp.enum_type)
    if not messages and not enums:
        raise InvalidSchema("Invalid schema: the descriptor declares no message")
    return ProtobufSchema(text=text, package=fdp.package, messages=messages, enums=frozenset(enums),
                          descriptor=fdp.SerializeToString())


def file_descriptors(text: str, references: Mapping[str, str]) -> list[Any]:
    """The ``FileDescriptorProto`` of a schema and of every file it imports, imports first: a
    descriptor pool takes them in this order (references by their import path, well-known files from
    protobuf's own)."""
    out: dict[str, Any] = {}

    def add(fdp: Any, seen: tuple[str, ...]) -> None:
        for dep in fdp.dependency:
            if dep in out:
                continue
            if dep in references:
                add(_compile(references[dep], dep, references, seen), (*seen, dep))
            else:
                wk = _well_known(dep) if dep.startswith(_WELL_KNOWN) else None
                if wk is None:
                    raise InvalidSchema(f"Invalid schema: import {dep!r} is not among the schema's references")
                add(wk, (*seen, dep))
        out.setdefault(fdp.name, fdp)

    add(_compile(text, "default", references), ())
    return list(out.values())


class ProtobufFormat:
    """Protobuf: ``.proto`` text or base64 descriptors; compatibility by wire-format groups."""

    schema_type = "PROTOBUF"

    def parse(self, text: str, references: Mapping[str, str]) -> ProtobufSchema:
        """Parse ``text``; every import must be among ``references`` (import path -> text) or well known.

        Raises:
            InvalidSchema: the text does not parse, or imports a file that no reference provides.
        """
        fdp = _compile(text, "default", references)
        if not fdp.message_type and not fdp.enum_type:
            raise InvalidSchema("Invalid schema: the schema declares no message")
        return _from_descriptor(text, fdp)

    def incompatibilities(self, reader: Any, writer: Any) -> list[str]:
        """Why bytes written with ``writer``'s messages cannot be read with ``reader``'s."""
        assert isinstance(reader, ProtobufSchema) and isinstance(writer, ProtobufSchema)
        out: list[str] = []
        if reader.package != writer.package:
            out.append(f"PACKAGE_CHANGED: the package is {reader.package!r}, was {writer.package!r}")
        for name, wfields in writer.messages.items():
            rfields = reader.messages.get(name)
            if rfields is None:
                out.append(f"MESSAGE_REMOVED at {name}: the reader has no message {name}")
                continue
            for num, wf in wfields.items():
                rf = rfields.get(num)
                if rf is None:
                    if wf.label == "required":
                        out.append(f"REQUIRED_FIELD_REMOVED at {name}.{wf.name}: field {num} was required")
                    continue
                if rf.type != wf.type and not any(rf.type in g and wf.type in g for g in _GROUPS):
                    both_named = rf.type not in _SCALARS and wf.type not in _SCALARS
                    kind = "FIELD_NAMED_TYPE_CHANGED" if both_named else "FIELD_KIND_CHANGED"
                    out.append(f"{kind} at {name}.{rf.name}: field {num} is {rf.type}, was {wf.type}")
            for num, rf in rfields.items():
                if num not in wfields and rf.label == "required":
                    out.append(f"REQUIRED_FIELD_ADDED at {name}.{rf.name}: field {num} is required and new")
            oneofs: dict[str, list[int]] = {}
            for num, rf in rfields.items():
                if rf.oneof is not None and num in wfields and wfields[num].oneof is None:
                    oneofs.setdefault(rf.oneof, []).append(num)
            out += [f"MULTIPLE_FIELDS_MOVED_TO_ONEOF at {name}.{o}: fields {nums} moved into a oneof"
                    for o, nums in oneofs.items() if len(nums) > 1]
        return out
