"""Alert rules and their evaluation over a batch's new readings: pure code, event time, no I/O.

A :class:`Rule` is parsed and validated from its JSON shape (:func:`parse_rule`; the YAML rules file
holds a list of the same). :func:`evaluate` runs every rule over the readings a batch stored for the
first time (:attr:`~fieldmesh.core.batch.BatchResult.new`) and returns the transitions (an alert opens
or clears) and the per (rule, device) states that changed; the processor writes both, with the
notifications they cause, in the batch's own transaction (:mod:`fieldmesh.store.alerts`).

Semantics (docs/alerts.md says the same for users):

* **Only new readings count.** Duplicates are never evaluated (the stream core tells them apart), so
  a redelivery, a retry or an edge replay of a stored reading never moves an alert.
* **Per device, in event-time order as it arrives.** A reading takes part in the rules when its event
  time is at or after every event time its device had before it (the device's watermark before the
  batch, then the readings before it in the batch, in bus order). An older reading (out of order, an
  hour-late replay) is stored and corrects its rollups, but it is history, not news: it neither
  opens nor clears an alert, so an alert's state never goes back in time. The order of a device's
  readings is the order of its bus partition, so a replay after a crash decides exactly as before.
* **threshold**: ``metric op value``. ``value`` is a number or ``enrichment.<field>`` (a threshold
  joined from business data, as of the reading). It opens at the first in-order reading at which the
  condition has held since a reading at least ``for_s`` earlier (event time; 0: at once), and clears
  at the first reading for which ``metric op clear_value`` is false (hysteresis; ``clear_value``
  defaults to ``value``). A reading between the two keeps the state.
* **rate**: the change of ``metric`` between a device's consecutive in-order readings, per second
  (``per: "s"``) or minute (``"min"``), compared like a threshold.
* **anomaly**: the distance of ``metric`` from its exponentially weighted mean in standard deviations
  (EWMA z-score, ``alpha``), compared with ``value`` once ``min_samples`` readings were seen. The edge
  agent's own verdict is a threshold on its fields (``anomaly_score > 0.8``, ``decision >= 1``).
* **absence**: no reading received from a device for ``after_s`` seconds of wall-clock time, for
  devices seen before and for active devices registered that never reported (since registration).
  Wall clock, not event time: silence is about now, and when a whole site goes quiet no event time
  moves on to notice it. Any new reading of the device clears it.
* Selectors: ``devices`` (ids and ``fnmatch`` globs), ``where`` (enriched attributes that must
  equal, e.g. ``{"site": "north"}``); ``severity`` and ``labels`` travel with the alert and filter
  listings.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.batch import ReadingColumns
from fieldmesh.core.errors import FieldmeshError

__all__ = [
    "KINDS", "OPS", "SEVERITIES", "AbsenceCandidate", "Evaluation", "Rule", "RuleError", "RuleState", "Transition",
    "evaluate", "evaluate_absence", "parse_rule", "parse_rules", "rules_from_yaml",
]

KINDS: Final = ("threshold", "rate", "anomaly", "absence")
SEVERITIES: Final = ("info", "warning", "minor", "major", "critical")
OPS: Final[dict[str, Callable[[float, float], bool]]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
}
_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_ENRICH_PREFIX: Final = "enrichment."
_KNOWN: Final = frozenset({
    "name", "kind", "metric", "op", "value", "clear_value", "for_s", "severity", "devices", "where", "labels",
    "notify", "per", "alpha", "min_samples", "after_s", "enabled", "description",
})
_NOTIFY_FORMATS: Final = ("json", "alertmanager")
#: Before every event time (a device with no watermark yet). Read once: ``np.iinfo`` builds an object each call,
#: about a microsecond, which a lookup per device of a batch paid.
_TS_MIN: Final = int(np.iinfo(np.int64).min)


class RuleError(FieldmeshError):
    """A rule that does not validate; ``field`` names the offending field."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True, slots=True)
class Rule:
    """One alert rule (see the module docstring for each kind)."""

    name: str
    kind: str
    metric: str | None = None
    op: str = ">"
    value: float | None = None
    value_field: str | None = None  # the enrichment field holding the threshold (``value: enrichment.x``)
    clear_value: float | None = None
    for_s: float = 0.0
    severity: str = "warning"
    devices: tuple[str, ...] = ()  # ids or globs; empty: every device
    where: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    notify: tuple[Mapping[str, Any], ...] = ()
    per: str = "s"
    alpha: float = 0.1
    min_samples: int = 10
    after_s: float = 0.0
    enabled: bool = True
    description: str = ""

    def matches_device(self, device_id: str) -> bool:
        """Whether ``devices`` selects ``device_id`` (no selector: every device)."""
        return not self.devices or any(fnmatchcase(device_id, p) for p in self.devices)

    def as_dict(self) -> dict[str, Any]:
        """The rule's JSON shape (what :func:`parse_rule` reads back)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "severity": self.severity}
        if self.kind != "absence":
            out |= {"metric": self.metric, "op": self.op,
                    "value": f"{_ENRICH_PREFIX}{self.value_field}" if self.value_field else self.value}
            if self.clear_value is not None:
                out["clear_value"] = self.clear_value
        if self.kind == "threshold":
            out["for_s"] = self.for_s
        if self.kind == "rate":
            out["per"] = self.per
        if self.kind == "anomaly":
            out |= {"alpha": self.alpha, "min_samples": self.min_samples}
        if self.kind == "absence":
            out["after_s"] = self.after_s
        out |= {"devices": list(self.devices), "where": dict(self.where), "labels": dict(self.labels),
                "notify": [dict(n) for n in self.notify], "enabled": self.enabled}
        if self.description:
            out["description"] = self.description
        return out


def _number(body: Mapping[str, Any], key: str, *, default: float | None = None,
            minimum: float | None = None) -> float | None:
    v = body.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RuleError(f"{key} must be a finite number, not {v!r}", field=key)
    if minimum is not None and v < minimum:
        raise RuleError(f"{key} must be >= {minimum}, not {v!r}", field=key)
    return float(v)


def _notify(items: Any) -> tuple[Mapping[str, Any], ...]:
    if items is None:
        return ()
    if not isinstance(items, list):
        raise RuleError("notify must be a list of targets", field="notify")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RuleError(f"notify[{i}] must be an object", field="notify")
        fmt = item.get("format", "json")
        if fmt not in _NOTIFY_FORMATS:
            raise RuleError(f"notify[{i}].format must be one of {list(_NOTIFY_FORMATS)}", field="notify")
        if "webhook" in item:
            url = item["webhook"]
            if not isinstance(url, str) or not re.fullmatch(r"https?://\S+", url):
                raise RuleError(f"notify[{i}].webhook must be an http(s) URL", field="notify")
            extra = set(item) - {"webhook", "format"}
        elif "mqtt" in item:
            if item["mqtt"] is not True:
                raise RuleError(f"notify[{i}].mqtt must be true (topic fieldmesh/alerts/{{device_id}})",
                                field="notify")
            extra = set(item) - {"mqtt", "format"}
        else:
            raise RuleError(f"notify[{i}] needs 'webhook' (a URL) or 'mqtt': true", field="notify")
        if extra:
            raise RuleError(f"notify[{i}] has unknown fields {sorted(extra)}", field="notify")
        out.append(dict(item))
    return tuple(out)


def parse_rule(body: Any) -> Rule:
    """A validated :class:`Rule` from its JSON shape; :class:`RuleError` names what is wrong."""
    if not isinstance(body, dict):
        raise RuleError("a rule is a JSON object")
    unknown = set(body) - _KNOWN
    if unknown:
        raise RuleError(f"unknown fields {sorted(unknown)} (known: {sorted(_KNOWN)})", field=sorted(unknown)[0])
    name = body.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise RuleError("name must be 1-64 characters of letters, digits and _ . : -", field="name")
    kind = body.get("kind")
    if kind not in KINDS:
        raise RuleError(f"kind must be one of {list(KINDS)}, not {kind!r}", field="kind")
    severity = body.get("severity", "warning")
    if severity not in SEVERITIES:
        raise RuleError(f"severity must be one of {list(SEVERITIES)}", field="severity")
    devices = body.get("devices", ())
    if isinstance(devices, str):
        devices = (devices,)
    if not isinstance(devices, (list, tuple)) or not all(isinstance(d, str) and d for d in devices):
        raise RuleError("devices must be an id or glob, or a list of them", field="devices")
    where = body.get("where", {})
    if not isinstance(where, dict) or not all(isinstance(k, str) for k in where):
        raise RuleError("where must be an object of enriched attribute -> value", field="where")
    labels = body.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise RuleError("labels must be an object of strings", field="labels")
    enabled = body.get("enabled", True)
    if not isinstance(enabled, bool):
        raise RuleError("enabled must be true or false", field="enabled")
    description = body.get("description", "")
    if not isinstance(description, str):
        raise RuleError("description must be a string", field="description")
    common: dict[str, Any] = dict(name=name, kind=kind, severity=severity, devices=tuple(devices), where=dict(where),
                                  labels=dict(labels), notify=_notify(body.get("notify")), enabled=enabled,
                                  description=description)
    if kind == "absence":
        for k in ("metric", "op", "value", "clear_value", "for_s", "per", "alpha", "min_samples"):
            if k in body:
                raise RuleError(f"an absence rule takes after_s, not {k}", field=k)
        after = _number(body, "after_s")
        if after is None or after <= 0:
            raise RuleError("an absence rule needs after_s > 0 (seconds without a reading)", field="after_s")
        return Rule(**common, after_s=after)
    metric = body.get("metric")
    if not isinstance(metric, str) or not metric:
        raise RuleError(f"a {kind} rule needs a metric", field="metric")
    op = body.get("op", ">")
    if op not in OPS:
        raise RuleError(f"op must be one of {list(OPS)}, not {op!r}", field="op")
    raw = body.get("value")
    value_field: str | None = None
    value: float | None
    if isinstance(raw, str) and raw.startswith(_ENRICH_PREFIX) and len(raw) > len(_ENRICH_PREFIX):
        if kind != "threshold":
            raise RuleError("value from an enrichment field is for threshold rules", field="value")
        value_field, value = raw[len(_ENRICH_PREFIX):], None
    else:
        value = _number(body, "value")
        if value is None:
            raise RuleError(f"a {kind} rule needs a value (a number or enrichment.<field>)", field="value")
    clear = _number(body, "clear_value")
    if clear is not None:
        if op in ("==", "!="):
            raise RuleError(f"clear_value does not apply to op {op!r}", field="clear_value")
        if value is not None and ((op in (">", ">=") and clear > value) or (op in ("<", "<=") and clear < value)):
            raise RuleError(f"clear_value {clear:g} must be on the clear side of value {value:g} for op {op!r} "
                            "(hysteresis)", field="clear_value")
    for_s = _number(body, "for_s", default=0.0, minimum=0.0) or 0.0
    if for_s and kind != "threshold":
        raise RuleError("for_s is for threshold rules", field="for_s")
    per = body.get("per", "s")
    if per not in ("s", "min"):
        raise RuleError("per must be 's' or 'min'", field="per")
    alpha = _number(body, "alpha", default=0.1) or 0.1
    if not 0 < alpha <= 1:
        raise RuleError("alpha must be in (0, 1]", field="alpha")
    min_samples = body.get("min_samples", 10)
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 2:
        raise RuleError("min_samples must be an integer >= 2", field="min_samples")
    if kind == "anomaly" and (value is None or value <= 0):
        raise RuleError("an anomaly rule's value is the z-score (> 0) that opens it", field="value")
    if "after_s" in body:
        raise RuleError("after_s is for absence rules", field="after_s")
    return Rule(**common, metric=metric, op=op, value=value, value_field=value_field, clear_value=clear,
                for_s=for_s, per=per, alpha=alpha, min_samples=min_samples)


def parse_rules(items: Any) -> list[Rule]:
    """Rules from a list of JSON shapes (the YAML rules file); names must be distinct."""
    if not isinstance(items, list):
        raise RuleError("a rules file holds a list of rules")
    out: list[Rule] = []
    for i, item in enumerate(items):
        try:
            out.append(parse_rule(item))
        except RuleError as exc:
            raise RuleError(f"rule #{i + 1}: {exc}", field=exc.field) from exc
    names = [r.name for r in out]
    if len(set(names)) != len(names):
        raise RuleError(f"rule names repeat: {sorted({n for n in names if names.count(n) > 1})}", field="name")
    return out


def rules_from_yaml(text: str) -> list[Rule]:
    """Rules from a YAML rules file's text (a list of rules, or ``{"rules": [...]}``)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError(f"not YAML: {exc}") from exc
    if isinstance(data, dict) and set(data) == {"rules"}:
        data = data["rules"]
    return parse_rules([] if data is None else data)


@dataclass(frozen=True, slots=True)
class RuleState:
    """What a rule remembers of one device between readings (kept in the hot store).

    ``firing``: the condition holds (an alert was opened for it; a hand-cleared alert leaves ``firing``
    set, so it does not open again before the condition has cleared). ``since_ms``: event time from which
    a threshold has held while waiting for ``for_s``. ``alert_id``: the alert opened last. ``aux``:
    the previous (ts_ms, value) of a rate rule, (mean, var, n) of an anomaly rule.
    """

    firing: bool = False
    since_ms: int | None = None
    alert_id: int | None = None
    aux: tuple[float, ...] = ()

    @property
    def idle(self) -> bool:
        """Nothing to remember: no row needs to be kept."""
        return not self.firing and self.since_ms is None and not self.aux


IDLE: Final = RuleState()


@dataclass(frozen=True, slots=True)
class Transition:
    """An alert opens (``open``) or clears (``clear``) for (rule, device) at a reading's event time."""

    rule: str
    device_id: str
    kind: str  # "open" | "clear"
    ts_ms: int
    value: float | None
    alert_id: int | None = None  # the alert a clear ends


@dataclass(frozen=True, slots=True)
class Evaluation:
    """What :func:`evaluate` decided: transitions in order, and the states that changed (by (rule, device))."""

    transitions: list[Transition]
    states: dict[tuple[str, str], RuleState]


def _in_order(cols: ReadingColumns, device_wm: Mapping[str, int]) -> NDArray[np.bool_]:
    """Per row: its event time is at or after every earlier one of its device (watermark, then the batch)."""
    n = len(cols)
    if not n:
        return np.zeros(0, dtype=bool)
    prior = np.array([device_wm.get(d, _TS_MIN) for d in cols.devices], dtype=np.int64)
    order = np.argsort(cols.device, kind="stable")
    dev = cols.device[order].astype(np.int64)
    ts = cols.ts_ms[order]
    # a running maximum per device in one accumulate: devices' segments shifted apart by 2**42 ms
    base = int(ts.min())
    shifted = dev * (1 << 42) + (ts - base)
    running = np.maximum.accumulate(shifted) - dev * (1 << 42) + base
    ok_sorted = (ts >= running) & (ts >= prior[dev])
    out = np.empty(n, dtype=bool)
    out[order] = ok_sorted
    return out


def _enrich_value(enrichment: Any, key: str) -> Any:
    if not isinstance(enrichment, dict):
        return None
    cur: Any = enrichment
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _selected_rows(rule: Rule, cols: ReadingColumns, ok: NDArray[np.bool_],
                   dev_ok: Mapping[tuple[str, ...], NDArray[np.bool_]]) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Rows (in arrival order) the rule evaluates, with the metric's value in each."""
    if rule.metric not in cols.metrics:
        return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.float64)
    code = cols.metrics.index(rule.metric)
    sel = cols.m_metric == code
    rows = cols.m_row[sel].astype(np.intp)
    vals = cols.m_value[sel]
    keep = ok[rows] & dev_ok[rule.devices][cols.device[rows]]
    if rule.where and cols.enrichment is not None:
        enr = cols.enrichment
        keep &= np.fromiter((all(_enrich_value(enr[r], k) == v for k, v in rule.where.items()) for r in rows.tolist()),
                            dtype=bool, count=len(rows))
    elif rule.where:
        keep[:] = False
    return rows[keep], vals[keep]


def evaluate(
    rules: Sequence[Rule],
    cols: ReadingColumns,
    device_wm: Mapping[str, int],
    states: Mapping[tuple[str, str], RuleState],
) -> Evaluation:
    """Run ``rules`` over a batch's new readings ``cols`` (arrival order).

    ``device_wm``: each device's latest event time before the batch; ``states``: the stored state of each
    (rule, device) the batch may touch (missing: idle). Returns transitions and changed states; ``states``
    is not modified (the caller may decide the batch again).
    """
    out: list[Transition] = []
    changed: dict[tuple[str, str], RuleState] = {}
    if not len(cols):
        return Evaluation(out, changed)
    ok = _in_order(cols, device_wm)
    dev_ok: dict[tuple[str, ...], NDArray[np.bool_]] = {}
    for rule in rules:
        if rule.devices not in dev_ok:
            dev_ok[rule.devices] = np.fromiter((rule.matches_device(d) for d in cols.devices), dtype=bool,
                                               count=len(cols.devices))
    names = cols.devices
    for rule in rules:
        if not rule.enabled:
            continue
        if rule.kind == "absence":
            _absence_clears(rule, cols, dev_ok[rule.devices], states, out, changed)
            continue
        rows, vals = _selected_rows(rule, cols, ok, dev_ok)
        if not len(rows):
            continue
        if rule.kind == "threshold":
            _threshold(rule, cols, rows, vals, states, out, changed)
            continue
        if rule.kind == "rate":
            _rate(rule, cols, rows, vals, states, out, changed)
            continue
        devs = cols.device[rows]
        ts = cols.ts_ms[rows]
        for d, t, v in zip(devs.tolist(), ts.tolist(), vals.tolist(), strict=True):
            key = (rule.name, names[d])
            st = changed.get(key) or states.get(key, IDLE)
            changed[key] = _anomaly_step(rule, key, st, t, v, out)
    return Evaluation(out, {k: s for k, s in changed.items() if s != states.get(k, IDLE)})


def _threshold(rule: Rule, cols: ReadingColumns, rows: NDArray[np.intp], vals: NDArray[np.float64],
               states: Mapping[tuple[str, str], RuleState], out: list[Transition],
               changed: dict[tuple[str, str], RuleState]) -> None:
    if rule.value_field is not None:
        enr = cols.enrichment
        thr_obj = [None if enr is None else _enrich_value(enr[r], rule.value_field) for r in rows.tolist()]
        thr = np.array([float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else np.nan
                        for x in thr_obj], dtype=np.float64)
        clr = thr if rule.clear_value is None else np.full(len(rows), rule.clear_value)
    else:
        assert rule.value is not None
        thr = np.full(len(rows), rule.value)
        clr = np.full(len(rows), rule.value if rule.clear_value is None else rule.clear_value)
    _walk(rule, cols, rows, vals, vals, thr, clr, states, out, changed, int(rule.for_s * 1000))


_UFUNCS: Final = {">": np.greater, ">=": np.greater_equal, "<": np.less, "<=": np.less_equal, "==": np.equal,
                  "!=": np.not_equal}


def _walk(rule: Rule, cols: ReadingColumns, rows: NDArray[np.intp], x: NDArray[np.float64],
          vals: NDArray[np.float64], thr: NDArray[np.float64], clr: NDArray[np.float64],
          states: Mapping[tuple[str, str], RuleState], out: list[Transition],
          changed: dict[tuple[str, str], RuleState], for_ms: int) -> None:
    """The hysteresis state machine over ``x`` (the compared quantity; ``vals`` are reported), per device in
    row order. NaN in ``x`` or the thresholds says nothing (neither fires, clears nor resets a wait)."""
    ufunc = _UFUNCS[rule.op]
    known = ~(np.isnan(thr) | np.isnan(x))
    fire = ufunc(x, thr) & known
    holds_clear = ufunc(x, clr) | ~known | np.isnan(clr)  # false: clears
    devs = cols.device[rows]
    names = cols.devices
    # Only devices where something may change are walked: a reading that fires while idle or waiting, or
    # one that clears while firing or waiting.
    current = [states.get((rule.name, d), IDLE) for d in names]  # one lookup a device (per batch and rule)
    firing = np.fromiter((st.firing for st in current), bool, len(current))
    waiting = np.fromiter((st.since_ms is not None for st in current), bool, len(current))
    f_d, w_d = firing[devs], waiting[devs]
    relevant = (~f_d & (fire | w_d)) | (f_d & ~holds_clear)
    if not relevant.any():
        return
    walk = np.flatnonzero(np.isin(devs, np.unique(devs[relevant])))
    # the walked rows' fields as Python lists: indexing numpy arrays one element at a time costs more than the walk
    for d, t, v, fires, holds, kn in zip(devs[walk].tolist(), cols.ts_ms[rows[walk]].tolist(), vals[walk].tolist(),
                                        fire[walk].tolist(), holds_clear[walk].tolist(), known[walk].tolist(),
                                        strict=True):
        key = (rule.name, names[d])
        st = changed.get(key) or states.get(key, IDLE)
        if st.firing:
            if not holds:
                out.append(Transition(rule.name, key[1], "clear", t, v, st.alert_id))
                st = replace(st, firing=False, since_ms=None)
        elif fires:
            since = st.since_ms if st.since_ms is not None else t
            if t - since >= for_ms:
                out.append(Transition(rule.name, key[1], "open", t, v))
                st = replace(st, firing=True, since_ms=None, alert_id=None)  # the store assigns the new id
            else:
                st = replace(st, since_ms=since)
        elif st.since_ms is not None and kn:
            st = replace(st, since_ms=None)
        changed[key] = st


def _rate(rule: Rule, cols: ReadingColumns, rows: NDArray[np.intp], vals: NDArray[np.float64],
          states: Mapping[tuple[str, str], RuleState], out: list[Transition],
          changed: dict[tuple[str, str], RuleState]) -> None:
    """Rates between each device's consecutive rows (the first from its stored previous reading), over columns;
    then the hysteresis walk; the last reading of each device becomes its stored previous one."""
    assert rule.value is not None
    n = len(rows)
    names = cols.devices
    devs = cols.device[rows]
    order = np.argsort(devs, kind="stable")
    d_s, t_s, v_s = devs[order], cols.ts_ms[rows][order].astype(np.float64), vals[order]
    first = np.ones(n, dtype=bool)
    first[1:] = d_s[1:] != d_s[:-1]
    last = np.ones(n, dtype=bool)
    last[:-1] = first[1:]
    pt, pv = np.empty(n), np.empty(n)
    pt[1:], pv[1:] = t_s[:-1], v_s[:-1]
    for i in np.flatnonzero(first).tolist():
        aux = states.get((rule.name, names[int(d_s[i])]), IDLE).aux
        pt[i], pv[i] = (aux[0], aux[1]) if len(aux) == 2 else (np.nan, np.nan)
    dt_s = (t_s - pt) / 1000.0
    ok = dt_s > 0  # no previous reading, or the same event time: no rate
    rate_s = np.full(n, np.nan)
    rate_s[ok] = (v_s[ok] - pv[ok]) / dt_s[ok] * (60.0 if rule.per == "min" else 1.0)
    rate = np.empty(n)
    rate[order] = rate_s
    clear = rule.value if rule.clear_value is None else rule.clear_value
    _walk(rule, cols, rows, rate, vals, np.full(n, rule.value), np.full(n, clear), states, out, changed, 0)
    for i in np.flatnonzero(last).tolist():
        key = (rule.name, names[int(d_s[i])])
        st = changed.get(key) or states.get(key, IDLE)
        changed[key] = replace(st, aux=(float(t_s[i]), float(v_s[i])))


def _compare(rule: Rule, x: float, st: RuleState, key: tuple[str, str], t: int, v: float,
             out: list[Transition]) -> RuleState:
    assert rule.value is not None
    op = OPS[rule.op]
    clear = rule.value if rule.clear_value is None else rule.clear_value
    if st.firing and not op(x, clear):
        out.append(Transition(rule.name, key[1], "clear", t, v, st.alert_id))
        return replace(st, firing=False)
    if not st.firing and op(x, rule.value):
        out.append(Transition(rule.name, key[1], "open", t, v))
        return replace(st, firing=True, alert_id=None)
    return st


def _anomaly_step(rule: Rule, key: tuple[str, str], st: RuleState, t: int, v: float,
                  out: list[Transition]) -> RuleState:
    if len(st.aux) != 3:
        return replace(st, aux=(v, 0.0, 1.0))
    mean, var, n = st.aux
    if n >= rule.min_samples and var > 0:
        z = abs(v - mean) / math.sqrt(var)
        st = _compare(rule, z, st, key, t, v, out)
    diff = v - mean
    incr = rule.alpha * diff
    return replace(st, aux=(mean + incr, (1 - rule.alpha) * (var + diff * incr), n + 1))


def _absence_clears(rule: Rule, cols: ReadingColumns, dev_ok: NDArray[np.bool_],
                    states: Mapping[tuple[str, str], RuleState], out: list[Transition],
                    changed: dict[tuple[str, str], RuleState]) -> None:
    """Any new reading of a device clears its absence alert (its latest event time in the batch)."""
    present = np.unique(cols.device)
    for d in present.tolist():
        key = (rule.name, cols.devices[d])
        st = changed.get(key) or states.get(key, IDLE)
        if dev_ok[d] and st.firing:
            mine = cols.device == d
            last = int(np.argmax(np.where(mine, cols.ts_ms, _TS_MIN)))
            out.append(Transition(rule.name, key[1], "clear", int(cols.ts_ms[last]), None, st.alert_id))
            changed[key] = replace(st, firing=False)


@dataclass(frozen=True, slots=True)
class AbsenceCandidate:
    """A device an absence rule watches: when it was last heard from (wall clock), or registered."""

    device_id: str
    last_ms: int
    registered_only: bool = False


def evaluate_absence(
    rules: Sequence[Rule], devices: Iterable[AbsenceCandidate], states: Mapping[tuple[str, str], RuleState],
    now_ms: int,
) -> Evaluation:
    """Open absence alerts for devices silent longer than each rule's ``after_s`` at wall-clock ``now_ms``."""
    out: list[Transition] = []
    changed: dict[tuple[str, str], RuleState] = {}
    watch = [r for r in rules if r.kind == "absence" and r.enabled]
    for dev in devices:
        for rule in watch:
            if not rule.matches_device(dev.device_id):
                continue
            key = (rule.name, dev.device_id)
            st = states.get(key, IDLE)
            if not st.firing and now_ms - dev.last_ms >= rule.after_s * 1000:
                out.append(Transition(rule.name, dev.device_id, "open", now_ms, None))
                changed[key] = replace(st, firing=True, alert_id=None)
    return Evaluation(out, changed)
