"""Device twins: desired, reported and delta documents, with shadow semantics (docs/twins.md). No I/O.

A twin holds two JSON objects per device: **desired** (what operators want, written through the
API) and **reported** (what the device says it has, written by the device over MQTT). Both change
by **merge patch** (RFC 7396): a patch's object members are merged into the document's, recursively;
a ``null`` removes a member; any other value (a number, a string, a list) replaces the old one whole.
The **delta** is what desired asks that reported does not have: every desired member whose value
differs from reported's (recursively inside objects on both sides); a member only in reported is
not in it. A device converges by applying the delta and reporting what it then has.

**Metadata**: each document has a map from the JSON pointer (RFC 6901) of every leaf it holds (a
value that is not an object, or an empty object) to the time, epoch ms, it was last written. A
pointer is unambiguous whatever the member names are (``/a~1b`` is member ``a/b``).

Limits (:data:`MAX_DOC_BYTES`, :data:`MAX_DEPTH`) are checked on the document a patch gives, so a
twin never grows past them; :class:`TwinTooLarge` and :class:`TwinInvalid` say which one and why.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from fieldmesh.core.errors import ConfigError
from fieldmesh.core.topics import DEVICE_ID_RE

__all__ = [
    "MAX_DEPTH",
    "MAX_DOC_BYTES",
    "TWIN_LEAVES",
    "Twin",
    "TwinInvalid",
    "TwinTooLarge",
    "check_document",
    "delta",
    "depth",
    "device_of_twin_topic",
    "doc_bytes",
    "leaf_pointers",
    "merge_patch",
    "prune_meta",
    "twin_topic",
]

#: The largest desired or reported document, as compact JSON (AWS IoT shadows: 8 KB per section).
MAX_DOC_BYTES: Final = 8192
#: The deepest nesting of objects in a document (the document itself is level 1; AWS allows 6 below it).
MAX_DEPTH: Final = 8
#: Twin topics under ``devices/{id}/twin/``: ``desired`` and ``delta`` go to the device, ``reported``
#: and ``get`` come from it.
TWIN_LEAVES: Final = ("desired", "reported", "delta", "get")


class TwinInvalid(ConfigError):
    """A patch that is not a JSON object of JSON values, or nests deeper than :data:`MAX_DEPTH` (a 400)."""


class TwinTooLarge(ConfigError):
    """A patch whose result would exceed :data:`MAX_DOC_BYTES` (a 413); ``size`` is what it would be."""

    def __init__(self, message: str, *, key: str, size: int, limit: int) -> None:
        super().__init__(message, key=key)
        self.size = size
        self.limit = limit


def twin_topic(device_id: str, leaf: str) -> str:
    """``devices/{id}/twin/{leaf}`` (``leaf`` one of :data:`TWIN_LEAVES`)."""
    return f"devices/{device_id}/twin/{leaf}"


def device_of_twin_topic(topic: str) -> tuple[str, str] | None:
    """``(device id, leaf)`` of a twin topic, or None."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "devices" or parts[2] != "twin" or parts[3] not in TWIN_LEAVES:
        return None
    if not DEVICE_ID_RE.fullmatch(parts[1]):
        return None
    return parts[1], parts[3]


def _same(a: Any, b: Any) -> bool:
    """JSON equality: a boolean is never a number (Python's ``True == 1``), 1 and 1.0 are one number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def merge_patch(doc: Mapping[str, Any], patch: Mapping[str, Any], meta: Mapping[str, int] | None = None,
                ts_ms: int = 0) -> tuple[dict[str, Any], dict[str, int]]:
    """``doc`` with ``patch`` merged into it (RFC 7396), and its metadata updated.

    Returns a new document and a new metadata map (pointer -> ``ts_ms`` of each leaf written);
    neither argument is changed. A member set to the value it has keeps its old timestamp.
    """
    out_meta = dict(meta or {})
    return _merge(doc, patch, out_meta, "", ts_ms), out_meta


def _merge(doc: Mapping[str, Any], patch: Mapping[str, Any], meta: dict[str, int], prefix: str,
           ts_ms: int) -> dict[str, Any]:
    out = dict(doc)
    for name, value in patch.items():
        ptr = f"{prefix}/{_escape(name)}"
        old = out.get(name)
        if value is None:
            if name in out:
                del out[name]
                _drop(meta, ptr)
        elif isinstance(value, dict):
            base = old if isinstance(old, dict) else {}
            if not isinstance(old, dict):
                _drop(meta, ptr)
            merged = _merge(base, value, meta, ptr, ts_ms)
            if not merged and (not isinstance(old, dict) or old):
                meta[ptr] = ts_ms  # an empty object is a leaf
            elif merged:
                meta.pop(ptr, None)
            out[name] = merged
        else:
            if not (name in out and _same(old, value)):
                _drop(meta, ptr)
                meta[ptr] = ts_ms
            out[name] = value
    return out


def _drop(meta: dict[str, int], ptr: str) -> None:
    """Remove ``ptr`` and every pointer below it."""
    meta.pop(ptr, None)
    below = ptr + "/"
    for k in [k for k in meta if k.startswith(below)]:
        del meta[k]


def delta(desired: Mapping[str, Any], reported: Mapping[str, Any]) -> dict[str, Any]:
    """What ``desired`` asks that ``reported`` does not have (recursively inside objects)."""
    out: dict[str, Any] = {}
    for name, want in desired.items():
        have = reported.get(name, _MISSING)
        if isinstance(want, dict) and isinstance(have, dict):  # an empty desired object asks only for an object
            sub = delta(want, have)
            if sub:
                out[name] = sub
        elif have is _MISSING or not _same(want, have):
            out[name] = want
    return out


_MISSING: Final = object()


def leaf_pointers(doc: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The JSON pointer of every leaf of ``doc`` (what its metadata has a timestamp for)."""
    out: list[str] = []
    for name, value in doc.items():
        ptr = f"{prefix}/{_escape(name)}"
        if isinstance(value, dict) and value:
            out.extend(leaf_pointers(value, ptr))
        else:
            out.append(ptr)
    return out


def prune_meta(meta: Mapping[str, int], pointers: list[str]) -> dict[str, int]:
    """The entries of ``meta`` at ``pointers`` and below them (the metadata of a delta)."""
    out: dict[str, int] = {}
    for p in pointers:
        below = p + "/"
        out.update((k, v) for k, v in meta.items() if k == p or k.startswith(below))
    return out


def depth(value: Any) -> int:
    """How deeply objects nest in ``value`` (0 for a scalar, 1 for an object of scalars; lists count
    as a level too, so that nesting cannot hide in them). Iterative: any depth is measured."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            items: Any = v.values()
        elif isinstance(v, list):
            items = v
        else:
            deepest = max(deepest, d)
            continue
        deepest = max(deepest, d + 1)
        stack.extend((x, d + 1) for x in items)
    return deepest


def doc_bytes(doc: Mapping[str, Any]) -> int:
    """The size of ``doc`` as compact JSON, UTF-8."""
    return len(json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode())


def check_document(doc: Any, *, key: str, max_bytes: int = MAX_DOC_BYTES, max_depth: int = MAX_DEPTH) -> int:
    """Check a patch or document: a JSON object of JSON values within the limits; returns its size.

    Raises:
        TwinInvalid: not an object, a value that is not JSON (NaN, a set...), too deep.
        TwinTooLarge: larger than ``max_bytes`` as compact JSON.
    """
    if not isinstance(doc, dict):
        raise TwinInvalid(f"{key} must be a JSON object, not {type(doc).__name__}", key=key)
    d = depth(doc)
    if d > max_depth:
        raise TwinInvalid(f"{key} nests {d} levels deep (at most {max_depth})", key=key)
    try:
        size = doc_bytes(doc)
    except (TypeError, ValueError) as exc:
        raise TwinInvalid(f"{key} holds a value that is not JSON: {exc}", key=key) from None
    if size > max_bytes:
        raise TwinTooLarge(f"{key} would be {size} bytes as JSON (at most {max_bytes})", key=key, size=size,
                           limit=max_bytes)
    return size


@dataclass(frozen=True)
class Twin:
    """A device's twin as stored: both documents, their metadata, its version (0: never written)."""

    device_id: str
    version: int = 0
    desired: dict[str, Any] = field(default_factory=dict, hash=False)
    reported: dict[str, Any] = field(default_factory=dict, hash=False)
    desired_meta: dict[str, int] = field(default_factory=dict, hash=False)
    reported_meta: dict[str, int] = field(default_factory=dict, hash=False)
    created_ms: int | None = None
    updated_ms: int | None = None

    @property
    def delta(self) -> dict[str, Any]:
        """What desired asks that reported does not have."""
        return delta(self.desired, self.reported)

    def delta_doc(self) -> dict[str, Any]:
        """The delta with the version and the metadata of its members (what a device receives)."""
        d = self.delta
        return {"device_id": self.device_id, "version": self.version, "delta": d,
                "metadata": prune_meta(self.desired_meta, leaf_pointers(d))}

    def as_dict(self) -> dict[str, Any]:
        """The twin's JSON shape (API, CLI, MQTT ``get`` answers)."""
        return {"device_id": self.device_id, "version": self.version, "desired": self.desired,
                "reported": self.reported, "delta": self.delta,
                "metadata": {"desired": self.desired_meta, "reported": self.reported_meta},
                "created_ms": self.created_ms, "updated_ms": self.updated_ms}
