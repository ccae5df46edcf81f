"""Avro schemas: parsing (fastavro) and compatibility by the Avro specification's schema resolution.

``incompatibilities(reader, writer)`` applies the specification's rules ("Schema Resolution"):

- primitives match themselves; the writer's type may be *promoted*: int to long, float or double;
  long to float or double; float to double; string to bytes and bytes to string;
- records match by full name (or a reader alias); each reader field takes the writer field of the
  same name (or of one of its aliases) and must read it, else it needs a default; writer fields the
  reader lacks are skipped;
- enums match by full name; every writer symbol must be a reader symbol, unless the reader has a
  ``default`` symbol;
- fixed match by full name and size; arrays by items; maps by values;
- a writer union: every branch must be readable; a reader union: some branch must read the writer.

Logical types resolve as their underlying types (as the specification says). Recursive types are
followed once per pair of named types. Named types of referenced schemas (Confluent references: the
reference name is the full type name) are parsed first and then known by name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from fieldmesh.schema.base import InvalidSchema

__all__ = ["AvroFormat", "AvroSchema"]

_PRIMITIVES: Final = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_PROMOTIONS: Final = {
    "int": {"long", "float", "double"},
    "long": {"float", "double"},
    "float": {"double"},
    "string": {"bytes"},
    "bytes": {"string"},
}
_NAMED: Final = frozenset({"record", "error", "enum", "fixed"})


@dataclass(frozen=True)
class AvroSchema:
    """A parsed Avro schema: its JSON, fastavro's parsed form and every named type it can use."""

    raw: Any
    parsed: Any
    named: dict[str, Any] = field(compare=False)
    schema_type: str = "AVRO"

    def canonical(self, *, normalize: bool = False) -> str:
        """Compact JSON (``normalize``: also with the object keys sorted)."""
        return json.dumps(self.raw, separators=(",", ":"), ensure_ascii=False, sort_keys=normalize)


def _load(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        # a bare primitive name ("string") is a valid Avro schema, as Confluent accepts it
        if text.strip() in _PRIMITIVES:
            return text.strip()
        raise InvalidSchema(f"Invalid schema: not JSON: {text[:200]!r}") from None


def _check_records(raw: Any) -> None:
    """What fastavro lets pass and the specification requires: a record has a list of fields."""
    if isinstance(raw, list):
        for b in raw:
            _check_records(b)
    elif isinstance(raw, dict):
        if raw.get("type") in ("record", "error"):
            if not isinstance(raw.get("fields"), list):
                raise InvalidSchema(f"Invalid schema: record {raw.get('name')!r} has no list of fields")
            for fld in raw["fields"]:
                if not isinstance(fld, dict) or "type" not in fld or not isinstance(fld.get("name"), str):
                    raise InvalidSchema(f"Invalid schema: a field of record {raw.get('name')!r} needs a name, a type")
                _check_records(fld["type"])
        elif raw.get("type") == "array":
            _check_records(raw.get("items"))
        elif raw.get("type") == "map":
            _check_records(raw.get("values"))
        elif isinstance(raw.get("type"), dict | list):
            _check_records(raw["type"])


def _parse(raw: Any, named: dict[str, Any]) -> Any:
    import fastavro

    _check_records(raw)
    try:
        return fastavro.parse_schema(raw, named_schemas=named, _write_hint=False)
    except Exception as exc:  # fastavro raises SchemaParseException, ValueError, TypeError, KeyError
        raise InvalidSchema(f"Invalid schema: {exc}") from None


class AvroFormat:
    """Avro: :meth:`parse` with fastavro, :meth:`incompatibilities` by the specification's resolution rules."""

    schema_type = "AVRO"

    def parse(self, text: str, references: Mapping[str, str]) -> AvroSchema:
        """Parse ``text``; ``references`` (full type name -> schema text) are parsed first, in order.

        Raises:
            InvalidSchema: not JSON, not a valid Avro schema, or a name no reference defines.
        """
        named: dict[str, Any] = {}
        for name, ref_text in references.items():
            _parse(_load(ref_text), named)
            if name not in named:
                raise InvalidSchema(f"Invalid schema: the reference {name!r} defines no type of that name")
        raw = _load(text)
        parsed = _parse(raw, named)
        return AvroSchema(raw=raw, parsed=parsed, named=dict(named))

    def incompatibilities(self, reader: Any, writer: Any) -> list[str]:
        """Why data written with ``writer`` cannot be read with ``reader`` (empty: it can)."""
        assert isinstance(reader, AvroSchema) and isinstance(writer, AvroSchema)
        check = _Resolution(reader.named, writer.named)
        check.resolve(reader.parsed, writer.parsed, "")
        return check.reasons


def _type_name(s: Any) -> str:
    if isinstance(s, str):
        return s
    if isinstance(s, list):
        return "union"
    t = s.get("type")
    return "record" if t == "error" else str(t)


class _Resolution:
    def __init__(self, reader_named: dict[str, Any], writer_named: dict[str, Any]) -> None:
        self.rn = reader_named
        self.wn = writer_named
        self.reasons: list[str] = []
        self._seen: set[tuple[str, str]] = set()

    def _deref(self, s: Any, named: dict[str, Any]) -> Any:
        if isinstance(s, str) and s not in _PRIMITIVES:
            return named.get(s, s)
        if isinstance(s, dict) and s.get("type") in _PRIMITIVES and len(s) >= 1 and "name" not in s:
            return s["type"]  # {"type": "long", "logicalType": ...}: its underlying type
        return s

    def fail(self, path: str, kind: str, text: str) -> None:
        self.reasons.append(f"{kind} at {path or '/'}: {text}")

    def readable(self, reader: Any, writer: Any) -> bool:
        """Whether reader reads writer, with no reasons recorded (for picking a union branch)."""
        probe = _Resolution(self.rn, self.wn)
        probe._seen = set(self._seen)
        probe.resolve(reader, writer, "")
        return not probe.reasons

    @staticmethod
    def _names_match(r: dict[str, Any], w: dict[str, Any]) -> bool:
        if r.get("name") == w.get("name"):
            return True
        rname = str(r.get("name", ""))
        ns = rname.rsplit(".", 1)[0] if "." in rname else ""
        aliases = {a if "." in a or not ns else f"{ns}.{a}" for a in r.get("aliases", ())}
        wname = str(w.get("name", ""))
        return wname in aliases or wname.rsplit(".", 1)[-1] in {a.rsplit(".", 1)[-1] for a in aliases}

    def resolve(self, reader: Any, writer: Any, path: str) -> None:
        r, w = self._deref(reader, self.rn), self._deref(writer, self.wn)
        rt, wt = _type_name(r), _type_name(w)
        if wt == "union":
            for i, branch in enumerate(w):
                self.resolve(r, branch, f"{path}/{i}")
            return
        if rt == "union":
            if not any(self.readable(branch, w) for branch in r):
                self.fail(path, "MISSING_UNION_BRANCH",
                          f"the reader's union {_describe(r)} has no branch that reads the writer's {_describe(w)}")
            return
        if rt != wt:
            if wt in _PROMOTIONS and rt in _PROMOTIONS[wt]:
                return
            self.fail(path, "TYPE_MISMATCH", f"the reader's type {rt} cannot read the writer's {wt}")
            return
        if rt in _PRIMITIVES:
            return
        if rt in ("record", "enum", "fixed"):
            if not self._names_match(r, w):
                self.fail(path, "NAME_MISMATCH",
                          f"the reader's {rt} {r.get('name')} does not match the writer's {w.get('name')} "
                          "(nor by an alias)")
                return
            key = (str(r.get("name")), str(w.get("name")))
            if key in self._seen:
                return  # a recursive type: this pair is being checked further up
            self._seen.add(key)
        if rt == "record":
            self._record(r, w, path)
        elif rt == "enum":
            rsyms, wsyms = list(r.get("symbols", ())), list(w.get("symbols", ()))
            missing = [s for s in wsyms if s not in rsyms]
            if missing and r.get("default") is None:
                self.fail(path, "MISSING_ENUM_SYMBOLS",
                          f"the reader's enum {r.get('name')} lacks the writer's symbols {missing} and has no default")
        elif rt == "fixed":
            if r.get("size") != w.get("size"):
                self.fail(path, "FIXED_SIZE_MISMATCH",
                          f"the reader's fixed {r.get('name')} has size {r.get('size')}, the writer's {w.get('size')}")
        elif rt == "array":
            self.resolve(r["items"], w["items"], f"{path}/items")
        elif rt == "map":
            self.resolve(r["values"], w["values"], f"{path}/values")

    def _record(self, r: dict[str, Any], w: dict[str, Any], path: str) -> None:
        wfields = {f["name"]: f for f in w.get("fields", ())}
        for i, rf in enumerate(r.get("fields", ())):
            wf = wfields.get(rf["name"])
            if wf is None:
                wf = next((wfields[a] for a in rf.get("aliases", ()) if a in wfields), None)
            fpath = f"{path}/fields/{i}"
            if wf is None:
                if "default" not in rf:
                    self.fail(fpath, "READER_FIELD_MISSING_DEFAULT_VALUE",
                              f"the reader's field '{rf['name']}' of {r.get('name')} has no default and the writer "
                              "has no such field")
                continue
            self.resolve(rf["type"], wf["type"], f"{fpath}/type")


def _describe(s: Any) -> str:
    if isinstance(s, list):
        return "[" + ", ".join(_describe(b) for b in s) + "]"
    if isinstance(s, dict):
        return str(s.get("name") or s.get("type"))
    return str(s)
