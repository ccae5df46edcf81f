"""Service level objectives: freshness, end-to-end latency and dead-letter rate, from a YAML file.

Every objective is a share of *good* events that must be reached (``objective``, e.g. 0.99); what is
good depends on the kind (docs/observability.md, "SLOs"):

* ``freshness``: a device (seen, and selected by ``devices``) is good when its last reading was
  received at most ``max_silence_s`` ago. Judged now, over every device.
* ``latency``: a reading is good when it was stored at most ``max_s`` after its event time, over the
  last ``window_s`` (from the processor's ``fieldmesh_event_to_stored_seconds`` histogram). The value
  shown is the ``objective`` quantile of that latency (``objective: 0.99`` is the p99).
* ``dlq_rate``: a reading or payload that reached the pipeline is good unless it was dead-lettered
  (only ``reasons``, when given), over the last ``window_s`` (the hot store's counters, as ``/stats``).

For each, ``bad`` is the share of bad events and ``allowed`` is ``1 - objective``; the **error budget
remaining** is ``1 - bad / allowed`` (1: untouched, 0: spent, below 0: overspent) and the SLO is
**breached** while it is below 0. Without events in the window (no devices, no readings) an SLO is met.

:class:`SloEvaluator` computes the status from its sources; :class:`SloCollector` exports it as
``fieldmesh_slo_*`` metrics; :class:`SloAlerts` raises a breach as an alert of rule ``slo:<name>`` on
device ``*`` through the alert tables (the processor's notifier then delivers it like any alert) and
clears it once the objective is met again. A hand-cleared SLO alert opens again only after the SLO was
met and breached anew, like any rule's.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Final

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fieldmesh.core.errors import ConfigError
from fieldmesh.stream.alerts import Evaluation, Rule, RuleError, RuleState, Transition, parse_rule

__all__ = ["KINDS", "Slo", "SloAlerts", "SloCollector", "SloEvaluator", "SloRunner", "SloStatus", "bucket_quantile",
           "load_slos", "parse_slos", "share_above"]

log = logging.getLogger(__name__)

KINDS: Final = ("freshness", "latency", "dlq_rate")
#: The device id SLO alerts carry: an SLO is about the whole fleet, not one device.
FLEET: Final = "*"
_COMMON: Final = frozenset({"name", "kind", "objective", "severity", "labels", "notify", "description"})
_FIELDS: Final = {
    "freshness": _COMMON | {"max_silence_s", "devices"},
    "latency": _COMMON | {"max_s", "window_s"},
    "dlq_rate": _COMMON | {"window_s", "reasons"},
}


@dataclass(frozen=True, slots=True)
class Slo:
    """One objective (see the module docstring for each kind)."""

    name: str
    kind: str
    objective: float
    max_silence_s: float = 0.0
    devices: tuple[str, ...] = ()
    max_s: float = 0.0
    window_s: float = 300.0
    reasons: tuple[str, ...] = ()
    rule: Rule = field(default_factory=lambda: Rule(name="slo:x", kind="absence"))  # severity, labels, notify

    @property
    def rule_name(self) -> str:
        """The alert rule name of this SLO's breaches."""
        return f"slo:{self.name}"

    @property
    def threshold(self) -> float:
        """The kind's bound: seconds of silence, seconds of latency (NaN for dlq_rate)."""
        return self.max_silence_s if self.kind == "freshness" else self.max_s if self.kind == "latency" else math.nan


def _num(body: Mapping[str, Any], key: str, where: str, *, default: float | None = None, lo: float = 0.0,
         lo_open: bool = True, hi: float | None = None) -> float:
    v = body.get(key, default)
    if v is None:
        raise ConfigError(f"{where}: {key} is required", key=key)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ConfigError(f"{where}: {key} must be a number, not {v!r}", key=key)
    if (v <= lo if lo_open else v < lo) or (hi is not None and v >= hi):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise ConfigError(f"{where}: {key} must be {bound}" + (f" and < {hi}" if hi is not None else "")
                          + f", not {v!r}", key=key)
    return float(v)


def _strings(v: Any, key: str, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{where}: {key} must be a string or a list of strings", key=key)
    return tuple(v)


def parse_slos(data: Any) -> list[Slo]:
    """Validated SLOs from the YAML document's data (``{"slos": [...]}`` or a list); ConfigError names
    the SLO and field that are wrong."""
    if isinstance(data, dict) and set(data) == {"slos"}:
        data = data["slos"]
    if data is None:
        return []
    if not isinstance(data, list):
        raise ConfigError("an SLO file holds a list of SLOs (or {slos: [...]})", key="slo")
    out: list[Slo] = []
    for i, body in enumerate(data):
        where = f"slos[{i}]"
        if not isinstance(body, dict):
            raise ConfigError(f"{where} must be a mapping", key="slo")
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: name is required", key="name")
        where = f"slo {name!r}"
        kind = body.get("kind")
        if kind not in KINDS:
            raise ConfigError(f"{where}: kind must be one of {list(KINDS)}, not {kind!r}", key="kind")
        unknown = set(body) - _FIELDS[kind]
        if unknown:
            raise ConfigError(f"{where}: unknown fields {sorted(unknown)} for kind {kind} "
                              f"(known: {sorted(_FIELDS[kind])})", key=sorted(unknown)[0])
        objective = _num(body, "objective", where, default=0.99, hi=1.0)
        try:  # severity, labels and notify targets are checked as a rule's (docs/alerts.md)
            rule = parse_rule({"name": f"slo:{name}", "kind": "absence", "after_s": 1,
                               "severity": body.get("severity", "major"), "labels": body.get("labels", {}),
                               "notify": body.get("notify"), "description": body.get("description", "")})
        except RuleError as exc:
            raise ConfigError(f"{where}: {exc}", key=exc.field or "slo") from exc
        kw: dict[str, Any] = {"name": name, "kind": kind, "objective": objective, "rule": rule}
        if kind == "freshness":
            kw["max_silence_s"] = _num(body, "max_silence_s", where)
            kw["devices"] = _strings(body.get("devices"), "devices", where)
        else:
            kw["window_s"] = _num(body, "window_s", where, default=300.0)
        if kind == "latency":
            kw["max_s"] = _num(body, "max_s", where)
        if kind == "dlq_rate":
            kw["reasons"] = _strings(body.get("reasons"), "reasons", where)
        out.append(Slo(**kw))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"SLO names must be unique: {sorted({n for n in names if names.count(n) > 1})}",
                          key="name")
    return out


def load_slos(path: Path) -> list[Slo]:
    """The SLOs of the YAML file at ``path`` (ConfigError naming the file and what is wrong)."""
    import yaml

    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the SLO file {path}: {exc}", key="slo") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML: {exc}", key="slo") from exc
    try:
        return parse_slos(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}", key=exc.key) from exc


# -- histogram arithmetic (as Prometheus's histogram_quantile) ------------------------------------------
def bucket_quantile(q: float, bounds: Sequence[float], cumulative: Sequence[float]) -> float:
    """The ``q`` quantile of a histogram given its upper bounds (the last +Inf) and cumulative counts,
    interpolating linearly inside a bucket; NaN without observations. A quantile in the +Inf bucket is
    the largest finite bound."""
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return math.nan
    rank = q * total
    prev_b, prev_c = 0.0, 0.0
    for b, c in zip(bounds, cumulative, strict=True):
        if c >= rank and c > prev_c:
            if math.isinf(b):
                return prev_b
            return prev_b + (b - prev_b) * (rank - prev_c) / (c - prev_c)
        prev_b, prev_c = b, c
    return prev_b


def share_above(x: float, bounds: Sequence[float], cumulative: Sequence[float]) -> float:
    """The share of observations above ``x`` (interpolated inside its bucket); NaN without observations."""
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return math.nan
    prev_b, prev_c = 0.0, 0.0
    for b, c in zip(bounds, cumulative, strict=True):
        if x <= b:
            below = prev_c if math.isinf(b) else prev_c + (c - prev_c) * (x - prev_b) / (b - prev_b)
            return max(0.0, (total - below) / total)
        prev_b, prev_c = b, c
    return 0.0


# -- evaluation -----------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SloStatus:
    """One SLO as of one evaluation."""

    slo: Slo
    good_ratio: float  # NaN: no events to judge
    value: float  # freshness: share of fresh devices; latency: the objective quantile (s); dlq_rate: the ratio
    events: float  # devices, or readings in the window

    @property
    def budget_remaining(self) -> float:
        """``1 - bad / allowed``; 1 without events."""
        if math.isnan(self.good_ratio):
            return 1.0
        return 1.0 - (1.0 - self.good_ratio) / (1.0 - self.slo.objective)

    @property
    def ok(self) -> bool:
        """The objective is met (the error budget is not overspent)."""
        return self.budget_remaining >= -1e-9


#: (upper bounds with +Inf last, cumulative counts) of a histogram.
Buckets = tuple[Sequence[float], Sequence[float]]


class SloEvaluator:
    """Computes every SLO's status from its sources, keeping the snapshots its windows need.

    ``last_seen``: device -> wall-clock ms of its last reading (the store's ``last_seen``);
    ``latency``: the cumulative buckets of ``fieldmesh_event_to_stored_seconds`` across processes;
    ``counters``: the store's stats (``received`` and ``dead_lettered`` by reason).
    """

    def __init__(self, slos: Sequence[Slo], *, last_seen: Callable[[], Mapping[str, int]],
                 latency: Callable[[], Buckets | None], counters: Callable[[], Any],
                 clock: Callable[[], float] = time.time) -> None:
        self.slos = list(slos)
        self.last_seen = last_seen
        self.latency = latency
        self.counters = counters
        self.clock = clock
        self._history: deque[tuple[float, Buckets | None, Any]] = deque()
        self._longest = max((s.window_s for s in self.slos if s.kind != "freshness"), default=0.0)
        self.last: list[SloStatus] = []

    def _at(self, now: float, window_s: float) -> tuple[Buckets | None, Any]:
        """The snapshot from ``window_s`` ago (the oldest kept, while the run is younger than the window)."""
        chosen = self._history[0]
        for snap in self._history:
            if snap[0] <= now - window_s:
                chosen = snap
            else:
                break
        return chosen[1], chosen[2]

    def evaluate(self) -> list[SloStatus]:
        """Every SLO's status now."""
        now = self.clock()
        need_lat = any(s.kind == "latency" for s in self.slos)
        need_cnt = any(s.kind == "dlq_rate" for s in self.slos)
        lat = self.latency() if need_lat else None
        cnt = self.counters() if need_cnt else None
        self._history.append((now, lat, cnt))
        while len(self._history) > 2 and self._history[1][0] <= now - self._longest:
            self._history.popleft()
        seen: Mapping[str, int] | None = None
        out = []
        for slo in self.slos:
            if slo.kind == "freshness":
                if seen is None:
                    seen = self.last_seen()
                out.append(self._freshness(slo, seen, now))
            elif slo.kind == "latency":
                then, _ = self._at(now, slo.window_s)
                if self._history[0][0] > now - slo.window_s:
                    # younger than the window: every event of the run is in it (the histogram starts with the run;
                    # the first round may come after readings were stored, which its snapshot would hide)
                    then = None
                out.append(self._latency(slo, lat, then))
            else:
                _, then_cnt = self._at(now, slo.window_s)
                out.append(self._dlq(slo, cnt, then_cnt))
        self.last = out
        return out

    @staticmethod
    def _freshness(slo: Slo, seen: Mapping[str, int], now: float) -> SloStatus:
        last = [ms for d, ms in seen.items() if not slo.devices or any(fnmatchcase(d, p) for p in slo.devices)]
        if not last:
            return SloStatus(slo, math.nan, math.nan, 0)
        silence = now - np.asarray(last, dtype=np.float64) / 1000
        good = float(np.count_nonzero(silence <= slo.max_silence_s)) / len(last)
        return SloStatus(slo, good, good, len(last))

    @staticmethod
    def _latency(slo: Slo, now: Buckets | None, then: Buckets | None) -> SloStatus:
        if now is None:
            return SloStatus(slo, math.nan, math.nan, 0)
        bounds, cum = now
        if then is not None and list(then[0]) == list(bounds):
            cum = [max(0.0, a - b) for a, b in zip(cum, then[1], strict=True)]
        events = cum[-1] if cum else 0.0
        if events <= 0:
            return SloStatus(slo, math.nan, math.nan, 0)
        bad = share_above(slo.max_s, bounds, cum)
        return SloStatus(slo, 1.0 - bad, bucket_quantile(slo.objective, bounds, cum), events)

    @staticmethod
    def _dlq(slo: Slo, now: Any, then: Any) -> SloStatus:
        def counts(st: Any) -> tuple[float, float]:
            if st is None:
                return 0.0, 0.0
            dead = st.dead_lettered
            bad = sum(n for r, n in dead.items() if not slo.reasons or r in slo.reasons)
            return float(st.received), float(bad)

        rec, bad = counts(now)
        rec0, bad0 = counts(then)
        events, bad_n = rec - rec0, bad - bad0
        if events <= 0:
            return SloStatus(slo, math.nan, math.nan, 0)
        ratio = max(0.0, bad_n) / events
        return SloStatus(slo, 1.0 - ratio, ratio, events)


class SloCollector(Collector):
    """The last evaluation as ``fieldmesh_slo_*`` metrics (label ``slo``, and ``kind``)."""

    def __init__(self, evaluator: SloEvaluator) -> None:
        self.evaluator = evaluator

    def collect(self) -> Iterator[Any]:
        fams = {
            "ok": GaugeMetricFamily("fieldmesh_slo_ok", "1 while the SLO is met, 0 while breached",
                                    labels=["slo", "kind"]),
            "objective": GaugeMetricFamily("fieldmesh_slo_objective", "The share of good events the SLO asks for",
                                           labels=["slo", "kind"]),
            "good": GaugeMetricFamily("fieldmesh_slo_good_ratio", "The share of good events now (NaN: none)",
                                      labels=["slo", "kind"]),
            "value": GaugeMetricFamily("fieldmesh_slo_value", "freshness: share of fresh devices; latency: the "
                                       "objective quantile in seconds; dlq_rate: dead-letter ratio",
                                       labels=["slo", "kind"]),
            "threshold": GaugeMetricFamily("fieldmesh_slo_threshold_seconds", "max_silence_s or max_s",
                                           labels=["slo", "kind"]),
            "budget": GaugeMetricFamily("fieldmesh_slo_error_budget_remaining", "1 - bad share / allowed bad share "
                                        "(below 0: overspent)", labels=["slo", "kind"]),
            "events": GaugeMetricFamily("fieldmesh_slo_events", "Devices (freshness) or readings in the window",
                                        labels=["slo", "kind"]),
        }
        for st in self.evaluator.last:
            lab = [st.slo.name, st.slo.kind]
            fams["ok"].add_metric(lab, 1.0 if st.ok else 0.0)
            fams["objective"].add_metric(lab, st.slo.objective)
            fams["good"].add_metric(lab, st.good_ratio)
            fams["value"].add_metric(lab, st.value)
            if st.slo.kind != "dlq_rate":
                fams["threshold"].add_metric(lab, st.slo.threshold)
            fams["budget"].add_metric(lab, st.budget_remaining)
            fams["events"].add_metric(lab, st.events)
        yield from fams.values()


class SloAlerts:
    """Opens an alert ``slo:<name>`` (device ``*``) when an SLO is breached and clears it when it is met,
    in one transaction of the alert tables per change (``tables``: :class:`~fieldmesh.store.alerts.AlertTables`).
    The state lives in the store (``alert_state``), so a restart neither opens a second alert nor
    forgets to clear one."""

    def __init__(self, tables: Any) -> None:
        self.tables = tables
        self.opened = 0
        self.cleared = 0

    def apply(self, statuses: Sequence[SloStatus], *, now_ms: int | None = None) -> tuple[int, int]:
        """Write the transitions ``statuses`` call for; (opened, cleared)."""
        from fieldmesh.store.alerts import apply_evaluation, load_states

        now = int(time.time() * 1000) if now_ms is None else now_ms
        rules = {st.slo.rule_name: st.slo.rule for st in statuses}

        def run(tx: Any) -> tuple[int, int]:
            states = load_states(tx, [FLEET])
            transitions: list[Transition] = []
            changed: dict[tuple[str, str], RuleState] = {}
            for st in statuses:
                key = (st.slo.rule_name, FLEET)
                cur = states.get(key)
                firing = cur is not None and cur.firing
                value = None if math.isnan(st.value) else st.value
                if not st.ok and not firing:
                    transitions.append(Transition(key[0], FLEET, "open", now, value))
                    changed[key] = RuleState(firing=True, since_ms=now)
                elif st.ok and firing:
                    assert cur is not None
                    transitions.append(Transition(key[0], FLEET, "clear", now, value, cur.alert_id))
                    changed[key] = RuleState()
            if not transitions:
                return 0, 0
            applied = apply_evaluation(tx, Evaluation(transitions, changed), rules, now_ms=now, actor="slo")
            return applied.opened, applied.cleared

        opened, cleared = self.tables.transact(run)
        self.opened += opened
        self.cleared += cleared
        for st in statuses:
            if opened or cleared:
                log.info("slo %s: %s (good %.4f, objective %.4f, budget %.3f)", st.slo.name,
                         "met" if st.ok else "BREACHED", st.good_ratio, st.slo.objective, st.budget_remaining)
        return opened, cleared


class SloRunner:
    """Evaluates the SLOs every ``interval_s`` (in a thread: the sources read the store) and raises or
    clears their alerts; an error is logged and the next round tries again."""

    def __init__(self, evaluator: SloEvaluator, alerts: SloAlerts | None, *, interval_s: float = 2.0) -> None:
        self.evaluator = evaluator
        self.alerts = alerts
        self.interval_s = interval_s
        self.errors = 0

    def run_once(self) -> list[SloStatus]:
        """One round: evaluate, then write the alert transitions it calls for."""
        statuses = self.evaluator.evaluate()
        if self.alerts is not None:
            self.alerts.apply(statuses)
        return statuses

    async def run(self) -> None:
        """Rounds until cancelled."""
        import asyncio

        while True:
            try:
                await asyncio.to_thread(self.run_once)
            except Exception as exc:  # a store that is busy or away: the next round tries again
                self.errors += 1
                if self.errors == 1 or self.errors % 60 == 0:
                    log.warning("slo evaluation failed (%d times so far): %r", self.errors, exc)
            await asyncio.sleep(self.interval_s)
