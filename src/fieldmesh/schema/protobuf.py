"""Protobuf schemas: ``.proto`` text (proto2/proto3) or a base64 ``FileDescriptorProto`` (what
confluent-kafka's Python ``ProtobufSerializer`` registers), read into a small model of messages and
fields; compatibility by the wire-format rules Confluent applies.

Parsing is our own: a tokenizer and a recursive descent over the ``.proto`` grammar's declarations
(syntax, package, import, option, message with fields, map fields, oneofs, nested messages and enums,
reserved, extensions; service and extend bodies are skipped). It checks structure and field numbers,
not everything ``protoc`` does (option names and values, type existence in imported files, json-name
clashes are not checked). Imports must be references (or well-known ``google/protobuf/*`` files).

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
import binascii
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
    schema_type: str = "PROTOBUF"

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


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = [m.group(m.lastindex or 0) for m in _tokens(text)]
        self.i = 0
        self.package = ""
        self.imports: list[str] = []
        self.messages: dict[str, dict[int, ProtoField]] = {}
        self.enums: set[str] = set()
        self.syntax = "proto2"

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
        while self.i < len(self.toks):
            t = self.take()
            if t in ("syntax", "edition"):
                self.take("=")
                self.syntax = self.take().strip("\"'")
                self.take(";")
            elif t == "package":
                self.package = self.take()
                self.take(";")
            elif t == "import":
                name = self.take()
                if name in ("public", "weak"):
                    name = self.take()
                self.imports.append(name.strip("\"'"))
                self.take(";")
            elif t == "message":
                self.message(self.package)
            elif t == "enum":
                self.enum(self.package)
            elif t in ("option", "service", "extend"):
                self.skip_statement()
            elif t == ";":
                continue
            else:
                raise InvalidSchema(f"Invalid schema: unexpected {t!r} at the top level of the .proto text")

    def enum(self, scope: str) -> None:
        name = self.take()
        self.enums.add(f"{scope}.{name}".lstrip("."))
        self.take("{")
        while self.peek() != "}":
            self.skip_statement()
        self.take("}")

    def message(self, scope: str) -> None:
        name = self.take()
        full = f"{scope}.{name}".lstrip(".")
        fields: dict[int, ProtoField] = {}
        self.messages[full] = fields
        self.take("{")
        self.body(full, fields, None)

    def body(self, full: str, fields: dict[int, ProtoField], oneof: str | None) -> None:
        while True:
            t = self.peek()
            if t == "}":
                self.take()
                return
            if t == "message" and oneof is None:
                self.take()
                self.message(full)
            elif t == "enum" and oneof is None:
                self.take()
                self.enum(full)
            elif t == "oneof" and oneof is None:
                self.take()
                name = self.take()
                self.take("{")
                self.body(full, fields, name)
            elif t in ("option", "reserved", "extensions", "extend", ";"):
                self.skip_statement() if t != ";" else self.take()
            else:
                self.field(full, fields, oneof)

    def field(self, full: str, fields: dict[int, ProtoField], oneof: str | None) -> None:
        label = ""
        if self.peek() in ("optional", "required", "repeated"):
            label = self.take()
        ftype = self.take()
        if ftype == "map":
            self.take("<")
            k = self.take()
            self.take(",")
            v = self.take()
            self.take(">")
            ftype = f"map<{k},{v}>"
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
        if number in fields:
            raise InvalidSchema(f"Invalid schema: field number {number} is used twice in {full}")
        if self.peek() == "[":
            while self.take() != "]":
                pass
        self.take(";")
        fields[number] = ProtoField(name=name, type=ftype, label=label, oneof=oneof)


def _resolve_types(messages: dict[str, dict[int, ProtoField]], enums: set[str], package: str) -> None:
    """Replace relative type names by full ones (scope search as protoc does); scalars stay."""
    known = set(messages) | enums
    for full, fields in messages.items():
        for num, f in list(fields.items()):
            t = f.type
            if t in _SCALARS or t.startswith("map<"):
                continue
            if t.startswith("."):
                resolved = t[1:]
            else:
                scope = full
                resolved = t
                while True:
                    cand = f"{scope}.{t}" if scope else t
                    if cand in known:
                        resolved = cand
                        break
                    if not scope:
                        break
                    scope = scope.rsplit(".", 1)[0] if "." in scope else ""
            kind = "enum" if resolved in enums else resolved
            fields[num] = ProtoField(name=f.name, type=kind, label=f.label, oneof=f.oneof)


def _from_descriptor(text: str) -> ProtobufSchema:
    try:
        from google.protobuf import descriptor_pb2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InvalidSchema("Invalid schema: a serialized descriptor needs the protobuf package") from exc
    try:
        fdp = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(text, validate=False))
    except (binascii.Error, ValueError, Exception) as exc:
        raise InvalidSchema(f"Invalid schema: neither .proto text nor a base64 FileDescriptorProto: {exc}") from None
    messages: dict[str, dict[int, ProtoField]] = {}
    enums: set[str] = set()
    labels = {1: "optional", 2: "required", 3: "repeated"}

    def walk(msgs: Any, scope: str) -> None:
        for m in msgs:
            full = f"{scope}.{m.name}".lstrip(".")
            entries = {f"{full}.{n.name}" for n in m.nested_type if n.options.map_entry}
            fields: dict[int, ProtoField] = {}
            for f in m.field:
                t = _DESC_TYPES.get(f.type, "?")
                if t in ("message", "enum"):
                    t = "enum" if t == "enum" else f.type_name.lstrip(".")
                if t in entries:
                    t = f"map<{t}>"
                label = labels.get(f.label, "")
                if fdp.syntax == "proto3" and label == "optional" and not f.proto3_optional:
                    label = ""
                oneof = m.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
                fields[f.number] = ProtoField(name=f.name, type=t, label=label, oneof=oneof)
            messages[full] = fields
            enums.update(f"{full}.{e.name}" for e in m.enum_type)
            walk([n for n in m.nested_type if not n.options.map_entry], full)

    walk(fdp.message_type, fdp.package)
    enums.update(f"{fdp.package}.{e.name}".lstrip(".") for e in fdp.enum_type)
    if not messages and not enums:
        raise InvalidSchema("Invalid schema: the descriptor declares no message")
    return ProtobufSchema(text=text.strip(), package=fdp.package, messages=messages, enums=frozenset(enums))


class ProtobufFormat:
    """Protobuf: ``.proto`` text or base64 descriptors; compatibility by wire-format groups."""

    schema_type = "PROTOBUF"

    def parse(self, text: str, references: Mapping[str, str]) -> ProtobufSchema:
        """Parse ``text``; every import must be among ``references`` (import path -> text) or well known.

        Raises:
            InvalidSchema: the text does not parse, or imports a file that no reference provides.
        """
        if _is_base64(text) and text.strip():
            return _from_descriptor(text)
        p = _Parser(text)
        p.file()
        if not p.messages and not p.enums:
            raise InvalidSchema("Invalid schema: the .proto text declares no message")
        missing = [i for i in p.imports if i not in references and not i.startswith(_WELL_KNOWN)]
        if missing:
            raise InvalidSchema(f"Invalid schema: imports {missing} are not among the schema's references")
        _resolve_types(p.messages, p.enums, p.package)
        return ProtobufSchema(text=text, package=p.package, messages=p.messages, enums=frozenset(p.enums))

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
