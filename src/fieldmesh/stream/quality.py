"""Data products and their quality: what a product declares, and the arithmetic of its quality (pure, no I/O).

A **data product** (docs/products.md) names a set of devices (ids, globs, registry groups), the schema
subject their readings follow, the tables it is served from, and what its readings should look like:
the expected interval between a device's readings, a range per metric, and objectives (SLOs).

Per batch the processor gives :func:`batch_deltas` the decoded readings (every reading of the batch's
records, duplicates included) and the new ones among them; it answers, per product and per event-time
window (``window_s``), counters that add up: readings received, new, duplicates, per declared metric the
readings lacking it (null), the values outside its range, and a histogram of its values. The store adds
them into durable rows in the batch's own transaction. :func:`readout` turns stored counters into rates
and SLO verdicts.

Drift is the **population stability index** (PSI) of a metric's histogram in the latest window against
the product's baseline (its first ``baseline_windows`` windows with data), over fixed bins of the
declared range plus one bin below and one above. PSI was chosen over the Kolmogorov-Smirnov statistic
because it is computed from binned counts that merge by addition (so the durable state per window is
a few integers, not a sample), it weighs every bin's shift rather than only the largest gap, and it
has thresholds in common use (< 0.1 stable, 0.1-0.25 moderate, > 0.25 a significant shift). The KS
statistic over the same bins (the largest distance between the two cumulative histograms) is
reported beside it for information.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.batch import ReadingColumns
from fieldmesh.core.errors import FieldmeshError

__all__ = [
    "OBJECTIVES", "MetricSpec", "Product", "ProductError", "Selector", "WindowCounts", "batch_deltas", "compare",
    "device_share", "ks_binned", "merge_counts", "parse_product", "products_from_yaml", "psi", "readout",
]

NAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: Objectives a product may declare, and how each compares: a rate at most (``max``) or at least (``min``).
OBJECTIVES: Final = {
    "completeness": "min", "null_rate": "max", "out_of_range_rate": "max", "duplicate_rate": "max",
    "drift_psi": "max", "freshness_s": "max",
}
#: Hot-store tables a product is served from unless it names its own.
DEFAULT_HOT_TABLES: Final = ("readings", "rollup_1m", "rollup_1h")
_EPS: Final = 1e-4  # added to empty bins' shares in PSI, so an empty bin does not make it infinite


class ProductError(FieldmeshError):
    """A product declaration that cannot be used; ``field`` names the offending field."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Selector:
    """Which devices a product takes: listed ids, ids matching a glob, or members of a registry group."""

    ids: tuple[str, ...] = ()
    globs: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    #: ``[from, to)`` of a device's stable hash share (:func:`device_share`): narrows the devices the
    #: rest selects to a fixed share of them, e.g. ``(0, 0.05)`` for a 5 % canary, ``(0.05, 1)`` its control.
    share: tuple[float, float] | None = None

    def matches(self, device_id: str, groups: Iterable[str] = ()) -> bool:
        """Whether ``device_id`` (member of ``groups``) belongs; no ids, globs nor groups: every device."""
        if self.share is not None and not self.share[0] <= device_share(device_id) < self.share[1]:
            return False
        if not (self.ids or self.globs or self.groups):
            return True
        return (device_id in self.ids or any(fnmatchcase(device_id, g) for g in self.globs)
                or bool(set(self.groups).intersection(groups)))


def device_share(device_id: str) -> float:
    """A device's stable place in ``[0, 1)``: CRC-32 of its id over 2**32 (the same in every process and run)."""
    return zlib.crc32(device_id.encode()) / 2**32


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A declared metric: its valid range (either end may be open) and the bins of its drift histogram."""

    name: str
    min: float | None = None
    max: float | None = None
    bins: int = 10

    @property
    def has_histogram(self) -> bool:
        """Drift needs both ends of the range (the bins span it)."""
        return self.min is not None and self.max is not None

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape."""
        return {"min": self.min, "max": self.max, "bins": self.bins}


@dataclass(frozen=True, slots=True)
class Product:
    """A data product as declared (docs/products.md)."""

    name: str
    owner: str = ""
    description: str = ""
    schema_subject: str | None = None
    devices: Selector = field(default_factory=Selector)
    tables_hot: tuple[str, ...] = DEFAULT_HOT_TABLES
    tables_lake: tuple[str, ...] = ()
    expected_interval_s: float | None = None
    window_s: int = 60
    baseline_windows: int = 1
    metrics: tuple[MetricSpec, ...] = ()
    slo: Mapping[str, float] = field(default_factory=dict)

    @property
    def window_ms(self) -> int:
        """The quality window in milliseconds."""
        return self.window_s * 1000

    def as_dict(self) -> dict[str, Any]:
        """The product's JSON shape (what :func:`parse_product` reads back)."""
        return {
            "name": self.name, "owner": self.owner, "description": self.description,
            "schema_subject": self.schema_subject,
            "devices": {"ids": list(self.devices.ids), "globs": list(self.devices.globs),
                        "groups": list(self.devices.groups),
                        **({"share": list(self.devices.share)} if self.devices.share is not None else {})},
            "tables": {"hot": list(self.tables_hot), "lake": list(self.tables_lake)},
            "expected_interval_s": self.expected_interval_s, "window_s": self.window_s,
            "baseline_windows": self.baseline_windows,
            "metrics": {m.name: m.as_dict() for m in self.metrics},
            "slo": dict(self.slo),
        }


def _strs(v: Any, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise ProductError(f"{where} must be a list of non-empty strings", field=where)
    return tuple(v)


def _num(v: Any, where: str, *, positive: bool = False) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProductError(f"{where} must be a finite number", field=where)
    if positive and v <= 0:
        raise ProductError(f"{where} must be > 0", field=where)
    return float(v)


_FIELDS: Final = frozenset({"name", "owner", "description", "schema_subject", "devices", "tables",
                            "expected_interval_s", "window_s", "baseline_windows", "metrics", "slo"})


def parse_product(doc: Any) -> Product:
    """A :class:`Product` from its JSON/YAML shape; :class:`ProductError` names what is wrong."""
    if not isinstance(doc, dict):
        raise ProductError("a product is a mapping")
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise ProductError(f"unknown field {unknown[0]!r} (fields: {', '.join(sorted(_FIELDS))})", field=unknown[0])
    name = doc.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ProductError("name: 1-64 of [A-Za-z0-9_.-]", field="name")
    for k in ("owner", "description", "schema_subject"):
        if doc.get(k) is not None and not isinstance(doc[k], str):
            raise ProductError(f"{k} must be a string", field=k)
    dev = doc.get("devices") or {}
    if not isinstance(dev, dict) or set(dev) - {"ids", "globs", "groups", "share"}:
        raise ProductError("devices: a mapping of ids, globs, groups and share", field="devices")
    share = dev.get("share")
    if share is not None:
        if (not isinstance(share, list) or len(share) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in share)
                or not 0 <= share[0] < share[1] <= 1):
            raise ProductError("devices.share: [from, to) with 0 <= from < to <= 1", field="devices.share")
        share = (float(share[0]), float(share[1]))
    tables = doc.get("tables") or {}
    if not isinstance(tables, dict) or set(tables) - {"hot", "lake"}:
        raise ProductError("tables: a mapping of hot and lake table lists", field="tables")
    window_s = doc.get("window_s", 60)
    if isinstance(window_s, bool) or not isinstance(window_s, int) or not 1 <= window_s <= 86_400:
        raise ProductError("window_s: whole seconds from 1 to 86400", field="window_s")
    base = doc.get("baseline_windows", 1)
    if isinstance(base, bool) or not isinstance(base, int) or not 1 <= base <= 10_000:
        raise ProductError("baseline_windows: 1 to 10000", field="baseline_windows")
    metrics_doc = doc.get("metrics") or {}
    if not isinstance(metrics_doc, dict):
        raise ProductError("metrics: a mapping of metric name to {min, max, bins}", field="metrics")
    metrics = []
    for mname, spec in metrics_doc.items():
        spec = spec or {}
        where = f"metrics.{mname}"
        if not isinstance(spec, dict) or set(spec) - {"min", "max", "bins"}:
            raise ProductError(f"{where}: a mapping of min, max, bins", field=where)
        lo, hi = _num(spec.get("min"), f"{where}.min"), _num(spec.get("max"), f"{where}.max")
        if lo is not None and hi is not None and lo >= hi:
            raise ProductError(f"{where}: min must be below max", field=where)
        bins = spec.get("bins", 10)
        if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= 100:
            raise ProductError(f"{where}.bins: 2 to 100", field=f"{where}.bins")
        metrics.append(MetricSpec(str(mname), lo, hi, bins))
    slo_doc = doc.get("slo") or {}
    if not isinstance(slo_doc, dict):
        raise ProductError("slo: a mapping of objective to threshold", field="slo")
    slo: dict[str, float] = {}
    for k, v in slo_doc.items():
        if k not in OBJECTIVES:
            raise ProductError(f"unknown objective {k!r} (objectives: {', '.join(OBJECTIVES)})", field=f"slo.{k}")
        val = _num(v, f"slo.{k}")
        assert val is not None or v is None
        if val is not None:
            slo[k] = val
    if "completeness" in slo and doc.get("expected_interval_s") is None:
        raise ProductError("slo.completeness needs expected_interval_s", field="slo.completeness")
    return Product(
        name=name, owner=doc.get("owner") or "", description=doc.get("description") or "",
        schema_subject=doc.get("schema_subject"),
        devices=Selector(_strs(dev.get("ids"), "devices.ids"), _strs(dev.get("globs"), "devices.globs"),
                         _strs(dev.get("groups"), "devices.groups"), share),
        tables_hot=_strs(tables.get("hot"), "tables.hot") if "hot" in tables else DEFAULT_HOT_TABLES,
        tables_lake=_strs(tables.get("lake"), "tables.lake"),
        expected_interval_s=_num(doc.get("expected_interval_s"), "expected_interval_s", positive=True),
        window_s=window_s, baseline_windows=base, metrics=tuple(metrics), slo=slo,
    )


def products_from_yaml(text: str) -> list[Product]:
    """Products from a YAML file's text: a list, or ``{"products": [...]}`` (beside which ``canaries`` may be
    declared, :func:`fieldmesh.stream.canary.canaries_from_yaml`); names must be distinct."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ProductError(f"not YAML: {exc}") from exc
    if isinstance(data, dict) and set(data) <= {"products", "canaries"}:  # canaries: stream/canary.py
        data = data.get("products")
    if data is None:
        return []
    if not isinstance(data, list):
        raise ProductError("a products file is a list of products (or {products: [...]})")
    out = []
    for i, doc in enumerate(data):
        try:
            out.append(parse_product(doc))
        except ProductError as exc:
            raise ProductError(f"product {i + 1}: {exc}", field=exc.field) from exc
    names = [p.name for p in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ProductError(f"product {dup!r} is declared twice", field="name")
    return out


# -- counters --------------------------------------------------------------------------------------
WindowCounts = dict[str, Any]
"""One window's counters (JSON): ``received``, ``new``, ``duplicates``, ``last_received_ms``, ``last_ts_ms``, and per
declared metric ``nulls``, ``out_of_range``, ``values`` and ``hist`` (bins + 2 counts)."""


def _empty(product: Product) -> WindowCounts:
    return {"received": 0, "new": 0, "duplicates": 0, "last_received_ms": 0, "last_ts_ms": 0,
            "nulls": {m.name: 0 for m in product.metrics}, "out_of_range": {m.name: 0 for m in product.metrics},
            "values": {m.name: 0 for m in product.metrics},
            "hist": {m.name: [0] * (m.bins + 2) for m in product.metrics if m.has_histogram}}


def merge_counts(a: Mapping[str, Any], b: Mapping[str, Any]) -> WindowCounts:
    """``a + b`` (``last_received_ms``: the later one); metrics of either side kept."""
    out: WindowCounts = {k: int(a.get(k, 0)) + int(b.get(k, 0)) for k in ("received", "new", "duplicates")}
    for k in ("last_received_ms", "last_ts_ms"):
        out[k] = max(int(a.get(k, 0)), int(b.get(k, 0)))
    for k in ("nulls", "out_of_range", "values"):
        x, y = a.get(k, {}), b.get(k, {})
        out[k] = {m: int(x.get(m, 0)) + int(y.get(m, 0)) for m in {*x, *y}}
    hx, hy = a.get("hist", {}), b.get("hist", {})
    hist = {}
    for m in {*hx, *hy}:
        p, q = hx.get(m), hy.get(m)
        if p is None or q is None or len(p) != len(q):  # a re-declared range: the newer bins win
            hist[m] = list(q if q is not None else p)
        else:
            hist[m] = [int(i) + int(j) for i, j in zip(p, q, strict=True)]
    out["hist"] = hist
    return out


def batch_deltas(
    product: Product, received: ReadingColumns, new: ReadingColumns,
    member_received: NDArray[np.bool_], member_new: NDArray[np.bool_],
) -> dict[int, WindowCounts]:
    """The counters a batch adds to ``product``, by window start (event time, ms).

    ``received``: every decoded reading of the batch (duplicates included); ``new``: those stored for the
    first time; ``member_*``: per entry of that side's ``devices`` dictionary, whether the device belongs
    to the product. Duplicates of a window are its received readings less its new ones. Metric checks
    (null, range, histogram) count new readings only: the data the product serves.
    """
    wms = product.window_ms
    r_rows = np.flatnonzero(member_received[received.device]) if len(received) and len(member_received) \
        else np.empty(0, np.intp)
    n_rows = np.flatnonzero(member_new[new.device]) if len(new) and len(member_new) else np.empty(0, np.intp)
    if not len(r_rows) and not len(n_rows):
        return {}
    r_win = (received.ts_ms[r_rows] // wms) * wms
    n_win = (new.ts_ms // wms) * wms
    n_win_p = n_win[n_rows]
    out: dict[int, WindowCounts] = {}
    for s in np.union1d(r_win, n_win_p).tolist():
        c = _empty(product)
        at_r = r_rows[r_win == s]
        at_n = n_rows[n_win_p == s]
        c["received"] = max(len(at_r), len(at_n))
        c["new"] = len(at_n)
        c["duplicates"] = c["received"] - c["new"]
        rx = np.concatenate([received.received_ms[at_r], new.received_ms[at_n]])
        ts = np.concatenate([received.ts_ms[at_r], new.ts_ms[at_n]])
        c["last_received_ms"] = int(rx.max())
        c["last_ts_ms"] = int(ts.max())
        out[int(s)] = c
    if not len(n_rows) or not product.metrics:
        return out
    in_p = np.zeros(len(new), dtype=bool)
    in_p[n_rows] = True
    metric_code = {m: i for i, m in enumerate(new.metrics)}
    finite = np.isfinite(new.m_value)
    for spec in product.metrics:
        code = metric_code.get(spec.name, -2)
        sel = (new.m_metric == code) & finite & in_p[new.m_row]
        vals = new.m_value[sel]
        vwin = n_win[new.m_row[sel]]
        oor = np.zeros(len(vals), dtype=bool)
        if spec.min is not None:
            oor |= vals < spec.min
        if spec.max is not None:
            oor |= vals > spec.max
        b = np.empty(0, np.int64)
        if spec.has_histogram:
            assert spec.min is not None and spec.max is not None
            width = (spec.max - spec.min) / spec.bins
            # bin 0: below min; 1..bins: the range (max itself in the last); bins + 1: above max
            b = np.clip(np.floor((vals - spec.min) / width), 0, spec.bins - 1).astype(np.int64) + 1
            b[vals < spec.min] = 0
            b[vals > spec.max] = spec.bins + 1
        for s, c in out.items():
            at_v = vwin == s
            n_vals = int(at_v.sum())
            c["values"][spec.name] = n_vals
            c["nulls"][spec.name] = c["new"] - n_vals
            c["out_of_range"][spec.name] = int(oor[at_v].sum())
            if spec.has_histogram:
                c["hist"][spec.name] = np.bincount(b[at_v], minlength=spec.bins + 2).tolist()
    return out


# -- readout ---------------------------------------------------------------------------------------
def psi(baseline: Sequence[int], current: Sequence[int]) -> float | None:
    """Population stability index of ``current`` against ``baseline`` (bin counts); None when either is empty."""
    p = np.asarray(baseline, dtype=np.float64)
    q = np.asarray(current, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0 or len(p) != len(q):
        return None
    p = np.maximum(p / p.sum(), _EPS)
    q = np.maximum(q / q.sum(), _EPS)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_binned(baseline: Sequence[int], current: Sequence[int]) -> float | None:
    """Largest distance between the two cumulative histograms (the KS statistic at bin resolution)."""
    p = np.asarray(baseline, dtype=np.float64)
    q = np.asarray(current, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0 or len(p) != len(q):
        return None
    return float(np.max(np.abs(np.cumsum(p) / p.sum() - np.cumsum(q) / q.sum())))


def _ratio(num: float, den: float) -> float | None:
    return None if den <= 0 else num / den


def readout(
    product: Product, windows: Sequence[tuple[int, Mapping[str, Any]]], device_first_ms: Mapping[str, int],
    seq_ranges: Iterable[tuple[int, int, int]], *, now_ms: int,
) -> dict[str, Any]:
    """Quality of ``product`` from its stored counters: per window and for the latest one, with SLO verdicts.

    ``windows``: (start_ms, counters) in start order; ``device_first_ms``: each member device's first
    event time; ``seq_ranges``: per (device, boot) ``(min_seq, max_seq, distinct seqs)``.
    A window is *closed* once the product's event time or the wall clock (``now_ms``: devices gone silent
    leave their windows incomplete, not open) has passed its end; the *latest* window is the newest closed
    one (the newest window while none is). Completeness of a window: new readings over those expected,
    each device being expected every ``expected_interval_s`` from its first reading (a window still open
    is judged on the part of it elapsed).
    """
    wms = product.window_ms
    watermark = max((int(c.get("last_ts_ms", 0)) for _, c in windows), default=0)  # the product's event time
    interval_ms = product.expected_interval_s * 1000 if product.expected_interval_s else None
    firsts = np.array(sorted(device_first_ms.values()), dtype=np.int64)
    baseline: dict[str, list[int]] = {}
    based = 0
    for _, c in windows:
        if based >= product.baseline_windows:
            break
        if not c.get("new"):
            continue
        based += 1
        for m, h in c.get("hist", {}).items():
            baseline[m] = [a + b for a, b in zip(baseline[m], h, strict=True)] if m in baseline else list(h)
    rows: list[dict[str, Any]] = []
    for start, c in windows:
        is_closed = start + wms <= max(watermark, now_ms)
        end = start + wms if is_closed else max(watermark, start + 1)
        new = int(c.get("new", 0))
        received = int(c.get("received", 0))
        expected = None
        if interval_ms:
            live = firsts[firsts < end]
            expected = float(np.sum((end - np.maximum(live, start)) / interval_ms)) if len(live) else 0.0
        metrics: dict[str, Any] = {}
        for spec in product.metrics:
            n_null = int(c.get("nulls", {}).get(spec.name, 0))
            n_val = int(c.get("values", {}).get(spec.name, 0))
            n_oor = int(c.get("out_of_range", {}).get(spec.name, 0))
            h = c.get("hist", {}).get(spec.name)
            b = baseline.get(spec.name)
            metrics[spec.name] = {
                "nulls": n_null, "values": n_val,
                "null_rate": _ratio(n_null, new), "out_of_range_rate": _ratio(n_oor, n_val),
                "drift_psi": psi(b, h) if b is not None and h is not None else None,
                "drift_ks": ks_binned(b, h) if b is not None and h is not None else None,
            }
        completeness = None if expected is None else (min(1.0, new / expected) if expected > 0 else None)
        rows.append({
            "start_ms": start, "end_ms": start + wms, "closed": is_closed,
            "received": received, "new": new, "duplicates": int(c.get("duplicates", 0)),
            "expected": expected, "completeness": completeness,
            "duplicate_rate": _ratio(int(c.get("duplicates", 0)), received),
            "null_rate": _worst(m["null_rate"] for m in metrics.values()),
            "out_of_range_rate": _worst(m["out_of_range_rate"] for m in metrics.values()),
            "drift_psi": _worst(m["drift_psi"] for m in metrics.values()),
            "metrics": metrics,
        })
    closed = [r for r in rows if r["closed"]]
    latest = closed[-1] if closed else (rows[-1] if rows else None)
    last_rx = max((int(c.get("last_received_ms", 0)) for _, c in windows), default=0)
    freshness_s = (now_ms - last_rx) / 1000 if last_rx else None
    span = n = 0
    for lo, hi, k in seq_ranges:
        span += hi - lo + 1
        n += min(k, hi - lo + 1)
    current: dict[str, float | None] = {
        "completeness": latest["completeness"] if latest else None,
        "null_rate": latest["null_rate"] if latest else None,
        "out_of_range_rate": latest["out_of_range_rate"] if latest else None,
        "duplicate_rate": latest["duplicate_rate"] if latest else None,
        "drift_psi": latest["drift_psi"] if latest else None,
        "freshness_s": freshness_s,
    }
    slo = {}
    for obj, threshold in product.slo.items():
        value = current.get(obj)
        ok = None if value is None else (value >= threshold if OBJECTIVES[obj] == "min" else value <= threshold)
        slo[obj] = {"objective": OBJECTIVES[obj], "threshold": threshold, "value": value, "ok": ok}
    return {
        "product": product.name, "window_s": product.window_s, "latest": latest, "current": current,
        "slo": slo, "slo_ok": all(s["ok"] is not False for s in slo.values()),
        "sequence": {"expected": span, "received": n, "gaps": span - n,
                     "completeness": _ratio(n, span)},
        "baseline_windows": based, "devices": len(device_first_ms), "windows": rows,
    }


def _worst(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def compare(canary: Product, canary_windows: Mapping[int, Mapping[str, Any]], canary_q: Mapping[str, Any],
            control_windows: Mapping[int, Mapping[str, Any]], control_q: Mapping[str, Any]) -> dict[str, Any]:
    """A canary product's quality against its control's, window by window (windows both have), for promotion.

    Per window: each side's rates and the canary's minus the control's; per metric, the PSI of the canary's
    histogram against the control's (the same bins: both declare the metric alike). ``verdict``: ``promote``
    when the latest window both have closed meets every canary SLO and its drift against the control is
    within ``slo.drift_psi`` (0.1 when not declared); ``hold`` otherwise; ``no_data`` without such a window.
    """
    rates = ("completeness", "null_rate", "out_of_range_rate", "duplicate_rate")
    c_rows = {w["start_ms"]: w for w in canary_q["windows"]}
    k_rows = {w["start_ms"]: w for w in control_q["windows"]}
    out = []
    for start in sorted(set(c_rows) & set(k_rows)):
        c, k = c_rows[start], k_rows[start]
        diff = {r: None if c[r] is None or k[r] is None else c[r] - k[r] for r in rates}
        drift = {}
        for spec in canary.metrics:
            ch = canary_windows.get(start, {}).get("hist", {}).get(spec.name)
            kh = control_windows.get(start, {}).get("hist", {}).get(spec.name)
            drift[spec.name] = psi(kh, ch) if ch is not None and kh is not None else None
        out.append({"start_ms": start, "closed": c["closed"] and k["closed"],
                    "canary": {r: c[r] for r in (*rates, "new")}, "control": {r: k[r] for r in (*rates, "new")},
                    "difference": diff, "drift_psi_vs_control": drift})
    closed = [w for w in out if w["closed"]]
    verdict, reasons = "no_data", ["no closed window both have"]
    if closed:
        last = closed[-1]
        limit = canary.slo.get("drift_psi", 0.1)
        reasons = []
        for obj, threshold in canary.slo.items():
            if obj in rates and (v := last["canary"][obj]) is not None:
                ok = v >= threshold if OBJECTIVES[obj] == "min" else v <= threshold
                if not ok:
                    reasons.append(f"canary {obj} {v:.4g} breaks its objective ({OBJECTIVES[obj]} {threshold:g})")
        for m, v in last["drift_psi_vs_control"].items():
            if v is not None and v > limit:
                reasons.append(f"{m} drifts from the control: PSI {v:.3f} > {limit:g}")
        verdict = "hold" if reasons else "promote"
    return {"canary": canary.name, "control": control_q["product"], "verdict": verdict, "reasons": reasons,
            "windows": out}
