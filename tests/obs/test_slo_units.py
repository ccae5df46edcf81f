"""SLOs: the file's validation, histogram arithmetic against an independent oracle, windows, and the alert
state machine on real stores (SQLite and PostgreSQL)."""

from __future__ import annotations

import math
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from fieldmesh.core.errors import ConfigError
from fieldmesh.obs.metrics import LATENCY_BUCKETS, histogram_buckets, observe_many
from fieldmesh.obs.slo import (
    SloAlerts,
    SloCollector,
    SloEvaluator,
    bucket_quantile,
    load_slos,
    parse_slos,
    share_above,
)
from fieldmesh.store.base import StoreStats


def _fresh(**kw: Any) -> dict[str, Any]:
    return {"name": "f", "kind": "freshness", "max_silence_s": 60, **kw}


@pytest.mark.parametrize(("body", "needle"), [
    ({"name": "x", "kind": "latency"}, "max_s is required"),
    ({"name": "x", "kind": "nope"}, "kind must be one of"),
    (_fresh(objective=1.0), "objective must be > 0.0 and < 1.0"),
    (_fresh(objective=0), "objective must be > 0.0"),
    (_fresh(max_silence_s=-1), "max_silence_s must be > 0.0"),
    (_fresh(window_s=10), "unknown fields ['window_s']"),
    (_fresh(severity="loud"), "severity must be one of"),
    (_fresh(notify=[{"webhook": "ftp://x"}]), "webhook must be an http(s) URL"),
    (_fresh(devices=[1]), "devices must be a string or a list of strings"),
    ({"kind": "latency", "max_s": 1}, "name is required"),
])
def test_bad_slos_name_what_is_wrong(body: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_slos([body])
    assert needle in str(e.value)


def test_slo_file_shapes_and_duplicates(tmp_path: Path) -> None:
    p = tmp_path / "slo.yaml"
    p.write_text("slos:\n  - {name: a, kind: dlq_rate, objective: 0.999, reasons: [schema_violation]}\n"
                 "  - {name: b, kind: latency, max_s: 5, window_s: 60, notify: [{mqtt: true}], severity: minor}\n")
    a, b = load_slos(p)
    assert (a.kind, a.objective, a.reasons, a.window_s, a.rule.severity) == ("dlq_rate", 0.999,
                                                                           ("schema_violation",), 300.0, "major")
    assert (b.rule_name, b.max_s, b.window_s, b.rule.severity, b.rule.notify) == ("slo:b", 5.0, 60.0, "minor",
                                                                                  ({"mqtt": True},))
    p.write_text("- {name: a, kind: dlq_rate}\n- {name: a, kind: dlq_rate}\n")
    with pytest.raises(ConfigError, match="unique"):
        load_slos(p)
    p.write_text("slos: [")
    with pytest.raises(ConfigError, match="not YAML"):
        load_slos(p)
    with pytest.raises(ConfigError, match="cannot read"):
        load_slos(tmp_path / "missing.yaml")


def _hist(values: np.ndarray[Any, Any]) -> tuple[list[float], list[float]]:
    reg = CollectorRegistry()
    h = Histogram("lat_seconds", "x", buckets=LATENCY_BUCKETS, registry=reg)
    observe_many(h, values)
    got = histogram_buckets(reg, "lat_seconds")
    assert got is not None
    return got


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 100_000, allow_nan=False), min_size=1, max_size=300))
def test_observe_many_counts_as_observe_does(values: list[float]) -> None:
    reg = CollectorRegistry()
    one = Histogram("one_seconds", "x", buckets=LATENCY_BUCKETS, registry=reg)
    for v in values:
        one.observe(v)
    assert _hist(np.asarray(values)) == histogram_buckets(reg, "one_seconds")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.001, 5000, allow_nan=False), min_size=20, max_size=400),
       st.sampled_from([0.5, 0.9, 0.99]))
def test_quantile_and_share_above_agree_with_the_raw_values(values: list[float], q: float) -> None:
    arr = np.asarray(values)
    bounds, cum = _hist(arr)
    est = bucket_quantile(q, bounds, cum)
    exact = float(np.quantile(arr, q, method="inverted_cdf"))
    # the estimate lies in the bucket that holds the exact quantile (a histogram knows no finer)
    i = int(np.searchsorted(bounds, exact, side="left"))
    lo = 0.0 if i == 0 else bounds[i - 1]
    assert lo - 1e-9 <= est <= bounds[i] + 1e-9, (est, exact, lo, bounds[i])
    # at a bucket bound the share above is exact
    for b in (0.1, 1.0, 60.0, 3600.0):
        assert share_above(b, bounds, cum) == pytest.approx(float(np.mean(arr > b)))
    # consistency: the quantile is within x exactly when at most 1 - q of the values lie above x
    for x in (0.5, 7.0, 100.0):
        assert (est <= x + 1e-9) == (share_above(x, bounds, cum) <= 1 - q + 1e-9)


def test_quantile_edges() -> None:
    assert math.isnan(bucket_quantile(0.99, [1.0, math.inf], [0.0, 0.0]))
    assert bucket_quantile(0.99, [1.0, 2.0, math.inf], [0.0, 0.0, 5.0]) == 2.0  # all in +Inf: the last bound
    assert bucket_quantile(0.5, [1.0, 2.0, math.inf], [0.0, 4.0, 4.0]) == 1.5


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def test_windows_take_the_difference_since_window_s_ago() -> None:
    slos = parse_slos([{"name": "lat", "kind": "latency", "max_s": 1, "objective": 0.9, "window_s": 60},
                       {"name": "dlq", "kind": "dlq_rate", "objective": 0.9, "window_s": 60}])
    clock = Clock()
    lat: list[Any] = [None]
    cnt = [StoreStats()]
    ev = SloEvaluator(slos, last_seen=dict, latency=lambda: lat[0], counters=lambda: cnt[0], clock=clock)
    a, b = ev.evaluate()
    assert a.ok and b.ok and math.isnan(a.good_ratio) and a.budget_remaining == 1.0
    # the first minute: 100 slow readings of 200 (bad 0.5 > allowed 0.1), 30 dead letters of 130
    bounds = [0.5, 1.0, 2.0, math.inf]
    lat[0] = (bounds, [50.0, 100.0, 150.0, 200.0])
    cnt[0] = StoreStats(stored=100, dead_lettered={"schema_violation": 30})
    clock.t += 30
    a, b = ev.evaluate()
    assert a.good_ratio == 0.5 and not a.ok and a.budget_remaining == pytest.approx(-4.0)
    assert b.value == pytest.approx(30 / 130) and not b.ok
    assert a.value == 2.0  # the p90 is in the +Inf bucket: the largest finite bound
    # a minute later only fast readings and no dead letters came: the window forgets the bad ones
    clock.t += 61
    ev.evaluate()
    lat[0] = (bounds, [1050.0, 1100.0, 1150.0, 1200.0])
    cnt[0] = StoreStats(stored=1100, dead_lettered={"schema_violation": 30})
    clock.t += 61
    a, b = ev.evaluate()
    assert a.good_ratio == 1.0 and a.ok and a.events == 1000
    assert b.value == 0.0 and b.ok and b.events == 1000
    fams = {f.name: f for f in SloCollector(ev).collect()}
    assert [s.value for s in fams["fieldmesh_slo_ok"].samples] == [1.0, 1.0]
    assert {s.labels["slo"]: s.value for s in fams["fieldmesh_slo_threshold_seconds"].samples} == {"lat": 1.0}


def test_a_latency_window_younger_than_the_run_counts_what_came_before_the_first_round() -> None:
    """The histogram starts with the run: readings stored before the evaluator's first round are in the window."""
    slos = parse_slos([{"name": "lat", "kind": "latency", "max_s": 1, "objective": 0.9, "window_s": 60}])
    clock = Clock()
    bounds = [0.5, 1.0, 2.0, math.inf]
    lat: list[Any] = [(bounds, [240.0, 241.0, 241.0, 241.0])]
    ev = SloEvaluator(slos, last_seen=dict, latency=lambda: lat[0], counters=StoreStats, clock=clock)
    (a,) = ev.evaluate()
    assert a.events == 241 and a.good_ratio == 1.0 and a.ok
    clock.t += 30
    (a,) = ev.evaluate()
    assert a.events == 241
    clock.t += 61  # older than the window now: only what came since the round a minute ago
    lat[0] = (bounds, [250.0, 251.0, 251.0, 251.0])
    (a,) = ev.evaluate()
    assert a.events == 10


def test_freshness_counts_selected_devices_now() -> None:
    slos = parse_slos([_fresh(objective=0.75, devices=["pump-*"])])
    clock = Clock()
    now_ms = int(clock.t * 1000)
    seen = {"pump-1": now_ms - 10_000, "pump-2": now_ms - 59_000, "pump-3": now_ms - 61_000,
            "pump-4": now_ms - 600_000, "valve-1": now_ms - 999_000}
    ev = SloEvaluator(slos, last_seen=lambda: seen, latency=lambda: None, counters=StoreStats, clock=clock)
    (s,) = ev.evaluate()
    assert (s.events, s.good_ratio, s.ok) == (4, 0.5, False)
    assert s.budget_remaining == pytest.approx(1 - 0.5 / 0.25)


@pytest.fixture(params=["sqlite", "postgres"])
def alert_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        from fieldmesh.store import load_store

        url = f"sqlite:///{tmp_path / 'store.db'}"
        load_store(url).close()
        return url
    base: str = request.getfixturevalue("pg_url")
    url = f"{base}?schema=t_{secrets.token_hex(5)}"
    from fieldmesh.store import load_store

    load_store(url).close()
    return url


@pytest.mark.integration
def test_breach_opens_once_clears_when_met_and_a_hand_clear_waits_for_the_next_breach(alert_url: str) -> None:
    from fieldmesh.store.alerts import AlertTables

    (slo,) = parse_slos([_fresh(objective=0.5, notify=[{"webhook": "http://127.0.0.1:9/x"}], labels={"a": "b"})])
    clock = Clock()
    now_ms = int(clock.t * 1000)
    seen = {"d1": now_ms, "d2": now_ms}
    ev = SloEvaluator([slo], last_seen=lambda: seen, latency=lambda: None, counters=StoreStats, clock=clock)
    tables = AlertTables(alert_url)
    try:
        alerts = SloAlerts(tables)

        def step(silent: int) -> tuple[int, int]:
            clock.t += 1
            for i, d in enumerate(sorted(seen)):
                seen[d] = int(clock.t * 1000) - (120_000 if i < silent else 0)
            return alerts.apply(ev.evaluate(), now_ms=int(clock.t * 1000))

        assert step(0) == (0, 0)
        assert step(1) == (0, 0)  # 1 of 2 fresh: 0.5 meets 0.5
        assert step(2) == (1, 0)
        assert step(2) == (0, 0)  # still breached: nothing new
        (a,) = tables.alerts(rule="slo:f")
        assert (a["device_id"], a["state"], a["severity"], a["labels"], a["value"]) == ("*", "open", "major",
                                                                                        {"a": "b"}, 0.0)
        assert [n["event"] for n in tables.notifications()] == ["open"]  # queued for the notifier
        assert step(0) == (0, 1)
        (a,) = tables.alerts(rule="slo:f")
        assert (a["state"], a["cleared_by"], a["clear_value"]) == ("cleared", "slo", 1.0)
        assert step(2) == (1, 0)
        second = tables.alerts(rule="slo:f", state="open")[0]
        tables.clear(second["id"], actor="op")  # by hand, while the SLO is still breached
        assert step(2) == (0, 0)  # no new alert until it was met and breached again
        assert step(0) == (0, 0)  # met: nothing to clear, the state resets
        assert step(2) == (1, 0)
        assert len(tables.alerts(rule="slo:f")) == 3
        assert tables.stats()["active"] == 1
    finally:
        tables.close()
