"""Canary routing: a share of a product's devices (new firmware, new schema version) kept apart until promoted.

A :class:`Canary` names a data product (its metrics, ranges, objectives and window), narrows its devices
(``devices``: ids, globs, registry groups; default the product's) to a stable hash share
(``share_percent``, :func:`~fieldmesh.stream.quality.device_share`: a device is on one side in every
process and run) and, optionally, to readings whose ``meta`` matches (``meta: {firmware: "2.1.*"}``: the
readings the new firmware or schema sends). While the canary is ``active``, the processor
(:class:`CanaryRouter`, called by :class:`~fieldmesh.stream.products.ProductEngine` inside each batch's
transaction) splits every batch:

- the canary's readings are de-duplicated like all others (their identity keys are claimed in the same
  transaction, so a reading is stored once whichever side it lands on) and written to ``canary_readings``
  instead of the raw readings, rollups, device tables and extra sinks (lake, features);
- the rest is decided and stored as before.

Each side's quality is counted as two products of their own (``<canary>@canary`` and ``<canary>@baseline``:
the baseline is the canary's devices' readings that stayed on the main path), and per side the readings
received, stored, duplicated, dead-lettered and their receipt-to-commit latency (``canary_stats``), all
in the batch's transaction. :func:`verdict` compares them; :func:`merge_promoted` folds a promoted
canary's readings into the main tables (rollups and device tables included) in one transaction.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Final

import msgspec
import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.batch import BatchResult, ReadingColumns
from fieldmesh.core.errors import FieldmeshError
from fieldmesh.core.model import Reading
from fieldmesh.stream.base import DecodedBatch, StreamState
from fieldmesh.stream.quality import Product, Selector, device_share

__all__ = [
    "STATES", "Canary", "CanaryError", "CanaryRouter", "Routed", "canaries_from_yaml", "canary_products",
    "parse_canary", "verdict",
]

#: A canary's states: ``active`` routes; ``promoted`` and ``aborted`` are final (traffic on the main path).
STATES: Final = ("active", "promoted", "aborted")
_NAME_OK: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_THRESHOLDS: Final = {"drift_psi": 0.1, "dlq_rate_delta": 0.01, "latency_delta_s": None, "min_readings": 1.0}
_KEYS: Final = frozenset({"name", "product", "description", "devices", "share_percent", "meta", "thresholds"})


class CanaryError(FieldmeshError):
    """A canary declaration that does not validate; ``field`` names what to fix."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Canary:
    """A canary as declared (docs/canary.md)."""

    name: str
    product: str
    description: str = ""
    #: None: the product's devices (its share, if any, left out)
    devices: Selector | None = None
    share_percent: float = 100.0
    #: reading ``meta`` fields and the globs their values must match (all of them)
    meta: Mapping[str, str] = field(default_factory=dict)
    thresholds: Mapping[str, float] = field(default_factory=dict)

    def threshold(self, key: str) -> float | None:
        """A verdict threshold: declared, or its default (None: not checked)."""
        return self.thresholds.get(key, _THRESHOLDS[key])

    def selector(self, product: Product) -> Selector:
        """The devices this canary splits (before the share)."""
        d = self.devices if self.devices is not None else product.devices
        return Selector(d.ids, d.globs, d.groups)

    def in_share(self, device_id: str) -> bool:
        """Whether ``device_id`` falls in the canary's share (its stable hash below ``share_percent``)."""
        return device_share(device_id) * 100.0 < self.share_percent

    def meta_matches(self, meta: Mapping[str, Any] | None) -> bool:
        """Whether a reading's ``meta`` matches every declared field (no fields: every reading)."""
        if not self.meta:
            return True
        if not meta:
            return False
        return all(k in meta and fnmatchcase(str(meta[k]), g) for k, g in self.meta.items())

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape (what :func:`parse_canary` reads back)."""
        return {"name": self.name, "product": self.product, "description": self.description,
                "devices": None if self.devices is None else {
                    "ids": list(self.devices.ids), "globs": list(self.devices.globs),
                    "groups": list(self.devices.groups)},
                "share_percent": self.share_percent, "meta": dict(self.meta), "thresholds": dict(self.thresholds)}


def _name(v: Any, where: str) -> str:
    if not isinstance(v, str) or not 1 <= len(v) <= 64 or set(v) - _NAME_OK:
        raise CanaryError(f"{where}: 1-64 of [A-Za-z0-9_.-]", field=where)
    return v


def _strs(v: Any, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise CanaryError(f"{where}: a list of names", field=where)
    return tuple(v)


def parse_canary(doc: Any) -> Canary:
    """A canary from its JSON/YAML shape; :class:`CanaryError` naming the field otherwise."""
    if not isinstance(doc, dict):
        raise CanaryError("a canary is a mapping")
    extra = sorted(set(doc) - _KEYS)
    if extra:
        raise CanaryError(f"unknown field {extra[0]!r}", field=extra[0])
    name = _name(doc.get("name"), "name")
    product = _name(doc.get("product"), "product")
    desc = doc.get("description") or ""
    if not isinstance(desc, str):
        raise CanaryError("description: a string", field="description")
    dev = doc.get("devices")
    selector = None
    if dev is not None:
        if not isinstance(dev, dict) or set(dev) - {"ids", "globs", "groups"}:
            raise CanaryError("devices: a mapping of ids, globs and groups", field="devices")
        selector = Selector(_strs(dev.get("ids"), "devices.ids"), _strs(dev.get("globs"), "devices.globs"),
                            _strs(dev.get("groups"), "devices.groups"))
    share = doc.get("share_percent", 100)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 100:
        raise CanaryError("share_percent: a number in (0, 100]", field="share_percent")
    meta = doc.get("meta") or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and k and isinstance(v, (str, int, float))
                                             and not isinstance(v, bool) for k, v in meta.items()):
        raise CanaryError("meta: a mapping of reading meta fields to globs of their values", field="meta")
    thresholds = doc.get("thresholds") or {}
    if not isinstance(thresholds, dict):
        raise CanaryError("thresholds: a mapping", field="thresholds")
    for k, v in thresholds.items():
        if k not in _THRESHOLDS:
            raise CanaryError(f"unknown threshold {k!r} (one of {', '.join(_THRESHOLDS)})", field=f"thresholds.{k}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise CanaryError(f"thresholds.{k}: a number >= 0", field=f"thresholds.{k}")
    return Canary(name, product, desc, selector, float(share), {k: str(v) for k, v in meta.items()},
                  {k: float(v) for k, v in thresholds.items()})


def canaries_from_yaml(text: str, *, beside_products: bool = False) -> list[Canary]:
    """The canaries of a YAML file: a list, or ``{canaries: [...]}`` (a products file may hold both: with
    ``beside_products`` a list is the file's products, and no canary)."""
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CanaryError(f"not YAML: {exc}") from exc
    if beside_products and not isinstance(doc, dict):
        return []
    items = doc.get("canaries") or [] if isinstance(doc, dict) else doc or []
    if not isinstance(items, list):
        raise CanaryError("canaries: a list")
    out: list[Canary] = []
    for i, item in enumerate(items):
        try:
            c = parse_canary(item)
        except CanaryError as exc:
            raise CanaryError(f"canary {i + 1}: {exc}", field=exc.field) from exc
        if any(c.name == o.name for o in out):
            raise CanaryError(f"canary {c.name!r} declared twice", field="name")
        out.append(c)
    return out


def canary_products(canary: Canary, product: Product) -> tuple[Product, Product]:
    """The two products whose quality the processor counts for ``canary``: its readings (``<name>@canary``)
    and the rest of its devices' readings (``<name>@baseline``); metrics, window and objectives are the
    product's."""
    slo = {**product.slo, "drift_psi": canary.threshold("drift_psi") or 0.0}
    side = dataclasses.replace(product, name=f"{canary.name}@canary", devices=Selector(), slo=slo)
    base = dataclasses.replace(product, name=f"{canary.name}@baseline", devices=canary.selector(product))
    return side, base


@dataclass(frozen=True, slots=True)
class Part:
    """One canary's share of a batch, as decided."""

    canary: Canary
    received: ReadingColumns
    result: BatchResult
    dead_letters: int


@dataclass(frozen=True, slots=True)
class Routed:
    """A batch routed: the main path's decided result and received readings, and each canary's part."""

    result: BatchResult
    received: ReadingColumns
    parts: tuple[Part, ...] = ()
    #: per canary name: the dead letters of its baseline devices (devices outside its share)
    baseline_dead: Mapping[str, int] = field(default_factory=dict)

    def every_new(self) -> BatchResult:
        """The main result with the canaries' new readings too (for alert rules: a canary device is not
        silent, and its readings may breach a threshold like any other)."""
        if not self.parts:
            return self.result
        news = [self.result.new, *(p.result.new for p in self.parts)]
        return dataclasses.replace(self.result, new=ReadingColumns.concat([n for n in news if len(n)] or news[:1]))


Decide = Callable[[DecodedBatch, StreamState, Any], BatchResult]
Groups = Callable[[Sequence[str]], Mapping[str, Sequence[str]]]


class CanaryRouter:
    """Splits decoded batches between the main path and the active canaries (pure: no SQL; the caller
    writes what :meth:`route` decides, in the same transaction)."""

    def __init__(self, canaries: Sequence[tuple[Canary, Product]] = ()) -> None:
        self.canaries = [(c, p) for c, p in canaries]
        self._selectors = [c.selector(p) for c, p in self.canaries]
        # per canary, device -> (selected, in share): fixed for a router unless selected by registry group
        self._cache: list[dict[str, tuple[bool, bool]]] = [{} for _ in self.canaries]

    def _device(self, i: int, device_id: str, groups: Mapping[str, Sequence[str]]) -> tuple[bool, bool]:
        sel = self._selectors[i]
        if sel.groups:
            return sel.matches(device_id, groups.get(device_id, ())), self.canaries[i][0].in_share(device_id)
        cache = self._cache[i]
        got = cache.get(device_id)
        if got is None:
            if len(cache) >= 1_000_000:
                cache.clear()
            got = cache[device_id] = (sel.matches(device_id), self.canaries[i][0].in_share(device_id))
        return got

    def selected(self, i: int, cols: ReadingColumns, groups: Mapping[str, Sequence[str]]) -> NDArray[np.bool_]:
        """Per row of ``cols``: whether canary ``i`` selects its device (share aside)."""
        ok = np.fromiter((self._device(i, d, groups)[0] for d in cols.devices), bool, len(cols.devices))
        return ok[cols.device] if len(cols) else np.zeros(0, bool)

    def assign(self, cols: ReadingColumns, groups: Mapping[str, Sequence[str]]) -> NDArray[np.int32]:
        """Per row: the index (in :attr:`canaries`) of the canary it goes to, or -1 (the main path). A row
        goes to the first canary that selects its device, has the device in its share and matches its meta."""
        out = np.full(len(cols), -1, dtype=np.int32)
        if not self.canaries or not len(cols):
            return out
        for i, (c, _) in enumerate(self.canaries):
            dev_ok = np.fromiter((all(self._device(i, d, groups)) for d in cols.devices), bool, len(cols.devices))
            rows = dev_ok[cols.device] & (out < 0)
            if c.meta and rows.any():
                idx = np.flatnonzero(rows)
                metas = cols.meta
                ok = np.fromiter((c.meta_matches(None if metas is None else metas[r]) for r in idx.tolist()),
                                 bool, len(idx))
                rows[idx[~ok]] = False
            out[rows] = i
        return out

    def needs_groups(self) -> bool:
        """Whether some active canary selects by registry group."""
        return any(sel.groups for sel in self._selectors)

    def route(self, batch: DecodedBatch, state: StreamState, txn: Any, decide: Decide,
              groups: Mapping[str, Sequence[str]]) -> Routed:
        """Decide ``batch``: the main path's rows through ``decide``, each canary's rows alike (claiming their
        keys in ``txn`` too, without positions). The main result carries the batch's positions and dead
        letters, and the canaries' watermarks."""
        cols = batch.cols
        where = self.assign(cols, groups)
        dead = self._dead_by_side(batch, groups)
        if not (where >= 0).any():
            return Routed(decide(batch, state, txn), cols, (), dead[1])
        main = np.flatnonzero(where < 0)
        main_batch = dataclasses.replace(batch, cols=cols.take(main), origin=batch.origin[main],
                                         row_position=batch.row_position[main])
        result = decide(main_batch, state, txn)
        parts = []
        wms = dict(result.watermarks)
        dwm = dict(result.device_watermarks)
        for i, (c, _) in enumerate(self.canaries):
            rows = np.flatnonzero(where == i)
            if not len(rows):
                continue
            sub = DecodedBatch(cols=cols.take(rows), origin=batch.origin[rows], row_position=batch.row_position[rows],
                               reading_positions=batch.reading_positions, positions={}, dead_letters=(), corrupt=0,
                               skipped=0)
            res = decide(sub, state, txn)
            for pos, v in res.watermarks.items():
                wms[pos] = max(v, wms.get(pos, v))
            for dev, v in res.device_watermarks.items():
                dwm[dev] = max(v, dwm.get(dev, v))
            parts.append(Part(c, sub.cols, res, dead[0].get(c.name, 0)))
        # the durable counters count every reading stored, on either side (received == stored + duplicates +
        # dead letters still holds); ``canary.stored`` tells how many of them are held by canaries
        counts = dict(result.counts)
        for part in parts:
            for k in ("stored", "duplicates", "late"):
                counts[k] = counts.get(k, 0) + int(part.result.counts.get(k, 0))
            counts["canary.stored"] = counts.get("canary.stored", 0) + len(part.result.new)
        result = dataclasses.replace(result, watermarks=wms, device_watermarks=dwm, counts=counts)
        return Routed(result, main_batch.cols, tuple(parts), dead[1])

    def _dead_by_side(self, batch: DecodedBatch, groups: Mapping[str, Sequence[str]]
                      ) -> tuple[dict[str, int], dict[str, int]]:
        """Dead letters of each canary's devices: (in its share, outside it). A dead letter has no meta to
        match: a device in the share counts on the canary's side."""
        canary: dict[str, int] = {}
        base: dict[str, int] = {}
        for d in batch.dead_letters:
            dev = d.device_id
            if dev is None:
                continue
            for i, (c, _) in enumerate(self.canaries):
                selected, share = self._device(i, dev, groups)
                if selected:
                    side = canary if share else base
                    side[c.name] = side.get(c.name, 0) + 1
                    break
        return canary, base


_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(Reading)


def reading_rows(name: str, result: BatchResult, now_ms: int) -> list[tuple[Any, ...]]:
    """``canary_readings`` rows of a canary part's new readings: (canary, id, device_id, ts_ms, received_ms,
    stored_ms, body) with ``body`` the reading as it travels (its JSON array)."""
    new = result.new
    if not len(new):
        return []
    readings = new.to_readings()
    keys = result.store_key.tolist()
    return [(name, k, r.device_id, r.ts_ms, r.received_ms, now_ms, _enc.encode(r).decode())
            for k, r in zip(keys, readings, strict=True)]


def readings_of(rows: Iterable[tuple[int, str]]) -> list[Reading]:
    """Readings back from ``(id, body)`` rows of ``canary_readings``, keyed by the key they were stored under."""
    return [msgspec.structs.replace(_dec.decode(body), key=int(k)) for k, body in rows]


def now_ms() -> int:
    """Wall-clock milliseconds (commit time of canary rows)."""
    return int(time.time() * 1000)


def verdict(canary: Canary, quality: Mapping[str, Any], stats: Mapping[str, Mapping[str, Any]]
            ) -> tuple[str, list[str]]:
    """``promote``, ``hold`` or ``no_data`` and the reasons: the quality comparison's verdict
    (:func:`fieldmesh.stream.quality.compare`: objectives, drift against the baseline), then the dead-letter
    rate difference, the latency difference and the readings needed (``thresholds``)."""
    reasons = list(quality["reasons"]) if quality["verdict"] != "promote" else []
    c, b = stats["canary"], stats["baseline"]
    need = canary.threshold("min_readings") or 0
    if c["stored"] < need:
        return "no_data", [f"the canary stored {c['stored']} readings, fewer than min_readings {need:g}", *reasons]
    if quality["verdict"] == "no_data":
        return "no_data", reasons
    limit = canary.threshold("dlq_rate_delta")
    if limit is not None and c["dlq_rate"] is not None and b["dlq_rate"] is not None \
            and c["dlq_rate"] - b["dlq_rate"] > limit:
        reasons.append(f"dead-letter rate {c['dlq_rate']:.4g} exceeds the baseline's {b['dlq_rate']:.4g} by more "
                       f"than {limit:g}")
    lat = canary.threshold("latency_delta_s")
    if lat is not None and c["latency_s"] is not None and b["latency_s"] is not None \
            and c["latency_s"] - b["latency_s"] > lat:
        reasons.append(f"latency {c['latency_s']:.3f}s exceeds the baseline's {b['latency_s']:.3f}s by more than "
                       f"{lat:g}s")
    return ("hold" if reasons else "promote"), reasons
