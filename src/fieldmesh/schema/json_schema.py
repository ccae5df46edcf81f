"""JSON Schema: validation of the schema itself (``jsonschema``) and compatibility as Confluent defines it.

Compatibility of JSON Schemas is about the documents they accept: ``incompatibilities(reader,
writer)`` lists why some document the writer accepts might be refused by the reader. What is checked
(the names are Confluent's ``errorType`` names):

- ``type``: the reader's types must cover the writer's (``integer`` is within ``number``):
  TYPE_CHANGED / TYPE_NARROWED; a writer without ``type`` accepts anything;
- objects: a property the reader adds is fine when the writer's content model is closed
  (``additionalProperties: false``), needs a schema accepting what the writer's
  ``additionalProperties`` schema allows when partially open, and is refused on an open one
  (PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL); a property the reader removes is fine when the reader is
  open, must fit the reader's ``additionalProperties`` schema when partially open, is refused when
  closed (PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL); properties in both are compared recursively;
  a property the reader requires must be required by the writer (REQUIRED_PROPERTY_ADDED...);
  ``additionalProperties`` narrowed (ADDITIONAL_PROPERTIES_NARROWED/REMOVED); min/maxProperties;
- arrays: ``items`` (one schema, or tuples as ``items`` lists / ``prefixItems``), ``additionalItems``,
  min/maxItems, ``uniqueItems`` added;
- strings: min/maxLength, ``pattern`` added or changed, ``format`` added or changed;
- numbers: minimum, maximum, exclusiveMinimum/Maximum (draft 4 booleans and draft 6+ numbers),
  ``multipleOf`` (the reader's must divide the writer's);
- ``enum`` and ``const``: the reader must accept every writer value;
- ``anyOf``/``oneOf``: each writer branch must be read by some reader branch; ``allOf`` in the
  reader: each part must read the writer; in the writer: some part (or the rest of the writer) must
  be read (a sufficient condition, so a safe change may be reported, never the reverse);
- ``$ref`` within the document (``#/definitions/..``, ``#/$defs/..``, JSON pointers) and to
  referenced schemas by their reference name; recursion is followed once per pair.

Not checked (a reader using them is assumed to accept what the writer accepts only if they are
equal): ``not``, ``if``/``then``/``else``, ``patternProperties``, ``dependencies``/``dependentSchemas``,
``propertyNames``, ``contains``, ``unevaluated*``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import unquote

from fieldmesh.schema.base import InvalidSchema

__all__ = ["JsonSchema", "JsonSchemaFormat"]

_UNCHECKED: Final = ("not", "if", "then", "else", "patternProperties", "dependencies", "dependentSchemas",
                     "dependentRequired", "propertyNames", "contains", "unevaluatedProperties", "unevaluatedItems")
_TYPES: Final = ("null", "boolean", "object", "array", "number", "integer", "string")


@dataclass(frozen=True)
class JsonSchema:
    """A parsed JSON Schema and the referenced schemas it may ``$ref`` by name."""

    raw: Any
    refs: dict[str, Any] = field(compare=False)
    schema_type: str = "JSON"

    def canonical(self, *, normalize: bool = False) -> str:
        """Compact JSON (``normalize``: also with the object keys sorted)."""
        return json.dumps(self.raw, separators=(",", ":"), ensure_ascii=False, sort_keys=normalize)


def _load(text: str) -> Any:
    try:
        raw = json.loads(text)
    except ValueError:
        raise InvalidSchema(f"Invalid schema: not JSON: {text[:200]!r}") from None
    if not isinstance(raw, dict | bool):
        raise InvalidSchema("Invalid schema: a JSON Schema is an object or a boolean")
    import jsonschema

    try:
        jsonschema.validators.validator_for(raw, default=jsonschema.Draft7Validator).check_schema(raw)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        raise InvalidSchema(f"Invalid schema: {exc.message}" + (f" at /{where}" if where else "")) from None
    return raw


class JsonSchemaFormat:
    """JSON Schema: :meth:`parse` checks the schema against its draft's meta-schema."""

    schema_type = "JSON"

    def parse(self, text: str, references: Mapping[str, str]) -> JsonSchema:
        """Parse and check ``text``; ``references`` (``$ref`` name -> schema text) are parsed too.

        Raises:
            InvalidSchema: not JSON, or not valid against its meta-schema (draft 7 when ``$schema`` is absent).
        """
        refs = {name: _load(t) for name, t in references.items()}
        return JsonSchema(raw=_load(text), refs=refs)

    def incompatibilities(self, reader: Any, writer: Any) -> list[str]:
        """Why a document ``writer`` accepts might be refused by ``reader`` (empty: never)."""
        assert isinstance(reader, JsonSchema) and isinstance(writer, JsonSchema)
        check = _Check(reader, writer)
        check.compare(reader.raw, writer.raw, "#", reader.raw, writer.raw)
        return check.reasons


def _types(s: dict[str, Any]) -> set[str] | None:
    t = s.get("type")
    if t is None:
        if "enum" in s or "const" in s:
            vals = s.get("enum", [s.get("const")])
            return {_type_of(v) for v in vals}
        return None
    return {t} if isinstance(t, str) else set(t)


def _type_of(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "integer" if v.is_integer() else "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def _covers(reader: set[str], t: str) -> bool:
    return t in reader or (t == "integer" and "number" in reader)


class _Check:
    def __init__(self, reader: JsonSchema, writer: JsonSchema) -> None:
        self.reader, self.writer = reader, writer
        self.reasons: list[str] = []
        self._seen: set[tuple[int, int]] = set()
        self._alive: list[Any] = []  # the pairs in _seen, kept alive so that no id is reused by a new dict

    def fail(self, path: str, kind: str, text: str) -> None:
        self.reasons.append(f"{kind} at {path}: {text}")

    def _resolve(self, s: Any, root: Any, refs: dict[str, Any]) -> tuple[Any, Any]:
        """Follow ``$ref`` (local pointers and named references) until a schema without one."""
        for _ in range(32):
            if not isinstance(s, dict) or "$ref" not in s:
                return s, root
            ref = str(s["$ref"])
            base, _, pointer = ref.partition("#")
            if base:
                if base not in refs:
                    raise InvalidSchema(f"Invalid schema: unresolved $ref {ref!r} (no reference named {base!r})")
                root = refs[base]
            target = root
            for part in [p for p in pointer.split("/") if p]:
                part = unquote(part).replace("~1", "/").replace("~0", "~")
                if isinstance(target, dict) and part in target:
                    target = target[part]
                elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                    target = target[int(part)]
                else:
                    raise InvalidSchema(f"Invalid schema: unresolved $ref {ref!r}")
            extra = {k: v for k, v in s.items() if k != "$ref"}
            s = {**target, **extra} if extra and isinstance(target, dict) else target
        raise InvalidSchema("Invalid schema: $ref chain too long")

    def compare(self, r: Any, w: Any, path: str, rroot: Any, wroot: Any) -> None:
        r, rroot = self._resolve(r, rroot, self.reader.refs)
        w, wroot = self._resolve(w, wroot, self.writer.refs)
        if r is True or r == {} or w is False:
            return
        if r is False:
            self.fail(path, "SCHEMA_NARROWED", "the reader accepts nothing where the writer accepts values")
            return
        if w is True:
            w = {}
        key = (id(r), id(w))
        if key in self._seen:
            return
        self._seen.add(key)
        self._alive.append((r, w))
        if self._combined(r, w, path, rroot, wroot):
            return
        rtypes, wtypes = _types(r), _types(w)
        if rtypes is not None:
            if wtypes is None:
                self.fail(path, "TYPE_NARROWED", f"the reader allows only {sorted(rtypes)}, the writer any type")
                return
            lost = sorted(t for t in wtypes if not _covers(rtypes, t))
            if lost:
                kind = "TYPE_NARROWED" if rtypes & wtypes else "TYPE_CHANGED"
                self.fail(path, kind, f"the reader does not accept {lost} (it allows {sorted(rtypes)})")
                return
        active = wtypes if wtypes is not None else set(_TYPES)
        self._values(r, w, path)
        if "object" in active:
            self._object(r, w, path, rroot, wroot)
        if "array" in active:
            self._array(r, w, path, rroot, wroot)
        if active & {"string"}:
            self._string(r, w, path)
        if active & {"number", "integer"}:
            self._number(r, w, path)
        for k in _UNCHECKED:
            if k in r and r.get(k) != w.get(k):
                self.fail(path, "UNCHECKED_KEYWORD_CHANGED",
                          f"'{k}' differs between the reader and the writer (changes to it are not analysed)")

    def _combined(self, r: dict[str, Any], w: dict[str, Any], path: str, rroot: Any, wroot: Any) -> bool:
        """anyOf/oneOf/allOf; True when the comparison is decided here."""
        for key in ("anyOf", "oneOf"):
            if key in w:
                rest = {k: v for k, v in w.items() if k != key}
                for i, branch in enumerate(w[key]):
                    self.compare(r, {**rest, **branch} if isinstance(branch, dict) else branch, f"{path}/{key}/{i}",
                                 rroot, wroot)
                return True
        for key in ("anyOf", "oneOf"):
            if key in r:
                rest = {k: v for k, v in r.items() if k != key}
                if not any(self._reads({**rest, **b} if isinstance(b, dict) else b, w, rroot, wroot) for b in r[key]):
                    kind = "COMBINED_TYPE_SUBSCHEMAS_CHANGED"
                    self.fail(path, kind, f"no branch of the reader's {key} accepts everything the writer does")
                return True
        if "allOf" in r:
            rest = {k: v for k, v in r.items() if k != "allOf"}
            for i, part in enumerate(r["allOf"]):
                self.compare(part, w, f"{path}/allOf/{i}", rroot, wroot)
            if rest:
                self.compare(rest, w, path, rroot, wroot)
            return True
        if "allOf" in w:
            rest = {k: v for k, v in w.items() if k != "allOf"}
            candidates = [p for p in w["allOf"]] + ([rest] if rest else [])
            merged: dict[str, Any] = {}
            for p in candidates:
                p, _ = self._resolve(p, wroot, self.writer.refs)
                if isinstance(p, dict):
                    merged.update(p)
            if not self._reads(r, merged, rroot, wroot) and not any(
                    self._reads(r, p, rroot, wroot) for p in candidates):
                self.compare(r, merged, path, rroot, wroot)
            return True
        return False

    def _reads(self, r: Any, w: Any, rroot: Any, wroot: Any) -> bool:
        probe = _Check(self.reader, self.writer)
        probe._seen = set(self._seen)
        probe._alive = self._alive
        probe.compare(r, w, "#", rroot, wroot)
        return not probe.reasons

    def _values(self, r: dict[str, Any], w: dict[str, Any], path: str) -> None:
        rvals = r.get("enum", [r["const"]] if "const" in r else None)
        if rvals is None:
            return
        wvals = w.get("enum", [w["const"]] if "const" in w else None)
        if wvals is None:
            self.fail(path, "ENUM_ARRAY_NARROWED", f"the reader allows only the values {rvals}, the writer any")
            return
        lost = [v for v in wvals if v not in rvals]
        if lost:
            self.fail(path, "ENUM_ARRAY_NARROWED", f"the reader does not accept the writer's values {lost}")

    def _object(self, r: dict[str, Any], w: dict[str, Any], path: str, rroot: Any, wroot: Any) -> None:
        rprops, wprops = r.get("properties", {}), w.get("properties", {})
        radd, wadd = r.get("additionalProperties", True), w.get("additionalProperties", True)
        for name, wp in wprops.items():
            ppath = f"{path}/properties/{name}"
            if name in rprops:
                self.compare(rprops[name], wp, ppath, rroot, wroot)
            elif radd is False:
                self.fail(ppath, "PROPERTY_REMOVED_FROM_CLOSED_CONTENT_MODEL",
                          f"the reader has no property '{name}' and allows no additional properties")
            elif radd is not True:
                self.compare(radd, wp, ppath, rroot, wroot)  # PROPERTY_REMOVED_NOT_COVERED_BY_PARTIALLY_OPEN...
        for name, rp in rprops.items():
            if name in wprops:
                continue
            ppath = f"{path}/properties/{name}"
            if wadd is False:
                continue  # the writer never writes it
            if wadd is True or wadd == {}:
                probe = _Check(self.reader, self.writer)
                probe.compare(rp, {}, ppath, rroot, wroot)
                if probe.reasons:
                    self.fail(ppath, "PROPERTY_ADDED_TO_OPEN_CONTENT_MODEL",
                              f"the reader adds property '{name}' but the writer's open content model may carry "
                              "it with any value")
            else:
                self.compare(rp, wadd, ppath, rroot, wroot)
        if wadd is not False:
            if radd is False and wadd is not False:
                self.fail(path, "ADDITIONAL_PROPERTIES_REMOVED",
                          "the reader allows no additional properties, the writer does")
            elif radd is not True and radd != {}:
                self.compare(radd, wadd, f"{path}/additionalProperties", rroot, wroot)
        rreq, wreq = set(r.get("required", ())), set(w.get("required", ()))
        added = sorted(rreq - wreq)
        if added:
            self.fail(path, "REQUIRED_PROPERTY_ADDED_TO_UNOPEN_CONTENT_MODEL" if wadd is False
                      else "REQUIRED_ATTRIBUTE_ADDED", f"the reader requires {added}, which the writer does not")
        self._bounds(r, w, path, "minProperties", "maxProperties", "PROPERTIES")

    def _array(self, r: dict[str, Any], w: dict[str, Any], path: str, rroot: Any, wroot: Any) -> None:
        def tuple_of(s: dict[str, Any]) -> tuple[list[Any], Any]:
            if "prefixItems" in s:
                return list(s["prefixItems"]), s.get("items", True)
            items = s.get("items", True)
            if isinstance(items, list):
                return list(items), s.get("additionalItems", True)
            return [], items

        rtup, rrest = tuple_of(r)
        wtup, wrest = tuple_of(w)
        for i in range(max(len(rtup), len(wtup))):
            rs = rtup[i] if i < len(rtup) else rrest
            ws = wtup[i] if i < len(wtup) else wrest
            self.compare(rs, ws, f"{path}/items/{i}", rroot, wroot)
        self.compare(rrest, wrest, f"{path}/items", rroot, wroot)
        self._bounds(r, w, path, "minItems", "maxItems", "ITEMS")
        if r.get("uniqueItems") and not w.get("uniqueItems"):
            self.fail(path, "UNIQUE_ITEMS_ADDED", "the reader requires unique items, the writer does not")

    def _string(self, r: dict[str, Any], w: dict[str, Any], path: str) -> None:
        self._bounds(r, w, path, "minLength", "maxLength", "LENGTH")
        for key, kind in (("pattern", "PATTERN"), ("format", "FORMAT")):
            if key in r and r[key] != w.get(key):
                self.fail(path, f"{kind}_ADDED" if key not in w else f"{kind}_CHANGED",
                          f"the reader's {key} {r[key]!r} differs from the writer's {w.get(key)!r}")

    def _number(self, r: dict[str, Any], w: dict[str, Any], path: str) -> None:
        rlo, rlo_x = _low(r)
        wlo, wlo_x = _low(w)
        if rlo is not None and (wlo is None or wlo < rlo or (wlo == rlo and rlo_x and not wlo_x)):
            self.fail(path, "MINIMUM_ADDED" if wlo is None else "MINIMUM_INCREASED",
                      f"the reader's minimum {rlo} is above the writer's {wlo}")
        rhi, rhi_x = _high(r)
        whi, whi_x = _high(w)
        if rhi is not None and (whi is None or whi > rhi or (whi == rhi and rhi_x and not whi_x)):
            self.fail(path, "MAXIMUM_ADDED" if whi is None else "MAXIMUM_DECREASED",
                      f"the reader's maximum {rhi} is below the writer's {whi}")
        rm, wm = r.get("multipleOf"), w.get("multipleOf")
        if rm is not None and (wm is None or (wm / rm) != int(wm / rm)):
            self.fail(path, "MULTIPLE_OF_ADDED" if wm is None else "MULTIPLE_OF_CHANGED",
                      f"the reader's multipleOf {rm} does not divide the writer's {wm}")

    def _bounds(self, r: dict[str, Any], w: dict[str, Any], path: str, lo: str, hi: str, what: str) -> None:
        if lo in r and r[lo] > w.get(lo, 0):
            self.fail(path, f"MIN_{what}_INCREASED" if lo in w else f"MIN_{what}_ADDED",
                      f"the reader's {lo} {r[lo]} is above the writer's {w.get(lo)}")
        if hi in r and (hi not in w or r[hi] < w[hi]):
            self.fail(path, f"MAX_{what}_DECREASED" if hi in w else f"MAX_{what}_ADDED",
                      f"the reader's {hi} {r[hi]} is below the writer's {w.get(hi)}")


def _low(s: dict[str, Any]) -> tuple[float | None, bool]:
    """The lower bound and whether it is exclusive (draft 4: a boolean beside ``minimum``)."""
    ex = s.get("exclusiveMinimum")
    if isinstance(ex, bool):
        return s.get("minimum"), ex
    if ex is not None and (s.get("minimum") is None or ex >= s["minimum"]):
        return float(ex), True
    return s.get("minimum"), False


def _high(s: dict[str, Any]) -> tuple[float | None, bool]:
    ex = s.get("exclusiveMaximum")
    if isinstance(ex, bool):
        return s.get("maximum"), ex
    if ex is not None and (s.get("maximum") is None or ex <= s["maximum"]):
        return float(ex), True
    return s.get("maximum"), False
