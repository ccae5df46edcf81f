"""Alert rules: validation, evaluation against an independent oracle, and the processor writing alerts,
state and notifications in the batch's transaction (real SQLite store, bus records replayed after a crash).

The oracle replays each device's readings in bus order, drops duplicates (by identity, the first
occurrence counts) and readings older than one its device sent before (late: history, not news), and runs
a plain per-reading state machine. Streams carry 5% duplicates, shuffled order inside a batch window,
and hour-late replays.
"""

from __future__ import annotations

import itertools
import json
import random
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.batch import ReadingColumns
from fieldmesh.core.codec import encode_bus_batch
from fieldmesh.core.model import BusBatch, Reading
from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.store.alerts import AlertTables, apply_evaluation, load_states
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.alerting import AlertEngine
from fieldmesh.stream.alerts import (
    AbsenceCandidate,
    Evaluation,
    Rule,
    RuleError,
    RuleState,
    evaluate,
    evaluate_absence,
    parse_rule,
    parse_rules,
)
from fieldmesh.stream.processor import Processor
from fmtest.alerts import Item, bus_order, oracle, rate_oracle, reading, stream
from fmtest.alerts import records as bus_records

NOW = 1_763_812_345_123
HOT = {"name": "hot", "kind": "threshold", "metric": "temperature", "op": ">", "value": 30, "clear_value": 28,
       "for_s": 0, "severity": "major", "devices": "pump-*", "notify": [{"webhook": "http://127.0.0.1:9000/hook"}]}


# -- validation ----------------------------------------------------------------------------------
def test_the_issue_rule_parses_and_round_trips() -> None:
    rule = parse_rule(HOT)
    assert (rule.name, rule.kind, rule.metric, rule.op, rule.value, rule.clear_value, rule.severity) == (
        "hot", "threshold", "temperature", ">", 30.0, 28.0, "major")
    assert rule.devices == ("pump-*",) and rule.matches_device("pump-7") and not rule.matches_device("fan-1")
    assert parse_rule(rule.as_dict()) == rule


@pytest.mark.parametrize(("body", "field"), [
    ({**HOT, "kind": "magic"}, "kind"),
    ({**HOT, "op": "=>"}, "op"),
    ({**HOT, "value": "thirty"}, "value"),
    ({**HOT, "clear_value": 31}, "clear_value"),  # on the firing side: no hysteresis
    ({**HOT, "severity": "loud"}, "severity"),
    ({**HOT, "for_s": -1}, "for_s"),
    ({**HOT, "name": "no spaces"}, "name"),
    ({**HOT, "colour": "red"}, "colour"),
    ({**HOT, "notify": [{"webhook": "ftp://x"}]}, "notify"),
    ({**HOT, "notify": [{"email": "a@b"}]}, "notify"),
    ({"name": "gone", "kind": "absence"}, "after_s"),
    ({"name": "gone", "kind": "absence", "after_s": 5, "metric": "t"}, "metric"),
    ({"name": "z", "kind": "anomaly", "metric": "t", "value": -1}, "value"),
    ({"name": "r", "kind": "rate", "metric": "t", "value": 1, "per": "hour"}, "per"),
])
def test_bad_rules_name_their_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(RuleError) as err:
        parse_rule(body)
    assert err.value.field == field, str(err.value)


def test_a_rules_file_refuses_repeated_names() -> None:
    with pytest.raises(RuleError, match="repeat"):
        parse_rules([HOT, HOT])
    assert [r.name for r in parse_rules([HOT, {**HOT, "name": "hot2"}])] == ["hot", "hot2"]


def _run_pure(items: Sequence[Item], rule: Rule, cuts: Sequence[int]) -> list[tuple[str, str, int]]:
    """evaluate() over the stream cut in batches, with de-duplication and watermarks done as the processor does."""
    seen: set[int] = set()
    wm: dict[str, int] = {}
    states: dict[tuple[str, str], RuleState] = {}
    out = []
    bounds = [0, *sorted(set(cuts)), len(items)]
    for a, b in itertools.pairwise(bounds):
        new = []
        for dev, ts, v, ident in items[a:b]:
            if ident not in seen:
                seen.add(ident)
                new.append(Reading(dev, ts, {"temperature": v}, key=ident + 1, chk=ident + 1))
        if not new:
            continue
        ev = evaluate([rule], ReadingColumns.from_readings(new), wm, states)
        for t in ev.transitions:
            out.append((t.kind, t.device_id, t.ts_ms))
        for k, s in ev.states.items():
            states[k] = s
        for r in new:
            wm[r.device_id] = max(wm.get(r.device_id, r.ts_ms), r.ts_ms)
    return out


# -- the oracle (fmtest.alerts) against evaluate() over any batches ----------------------------
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(0, 440), max_size=30),
       for_s=st.sampled_from([0, 2, 5]), clear=st.sampled_from([None, 28.0, 25.0]))
def test_threshold_matches_the_oracle_whatever_the_batches(seed: int, cuts: list[int], for_s: int,
                                                           clear: float | None) -> None:
    rule = parse_rule({**HOT, "for_s": for_s, "clear_value": clear})
    items = stream(seed, NOW)
    expected = oracle(items, rule)
    assert _run_pure(items, rule, cuts) == expected
    opens = [t for t in expected if t[0] == "open"]
    assert opens, "the stream should cross the threshold"
    for dev in {d for _, d, _ in expected}:  # alternating: never two opens without a clear between
        kinds = [k for k, d, _ in expected if d == dev]
        assert all(a != b for a, b in itertools.pairwise(kinds)) and kinds[0] == "open"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(0, 440), max_size=30),
       per=st.sampled_from(["s", "min"]))
def test_rate_matches_its_oracle_whatever_the_batches(seed: int, cuts: list[int], per: str) -> None:
    value = 2.0 if per == "s" else 120.0
    rule = parse_rule({"name": "jump", "kind": "rate", "metric": "temperature", "op": ">", "value": value,
                       "clear_value": value / 2, "per": per, "devices": "pump-*"})
    items = stream(seed, NOW)
    expected = rate_oracle(items, rule)
    assert expected, "the stream should jump"
    assert _run_pure(items, rule, cuts) == expected


def test_hysteresis_and_for() -> None:
    rule = parse_rule({**HOT, "for_s": 3})
    rs = [Reading("pump-1", NOW + i * 1000, {"temperature": v}, key=i + 1, chk=1)
          for i, v in enumerate([31, 32, 29, 33, 34, 35, 36, 29, 28.5, 28, 31])]
    ev = evaluate([rule], ReadingColumns.from_readings(rs), {}, {})
    # 31, 32, then 29 (not > 30) resets the wait; 33 at +3 s waits, 36 at +6 s has held 3 s: open;
    # 29 and 28.5 are in the band; 28 clears; 31 starts a new wait
    assert [(t.kind, t.ts_ms - NOW, t.value) for t in ev.transitions] == [("open", 6000, 36.0), ("clear", 9000, 28.0)]
    assert ev.states[("hot", "pump-1")] == RuleState(firing=False, since_ms=NOW + 10_000)


def test_threshold_from_enrichment_applies_as_of_each_reading() -> None:
    rule = parse_rule({"name": "over", "kind": "threshold", "metric": "p", "op": ">", "value": "enrichment.limit"})
    rs = [Reading("d", NOW + i, {"p": 5.0}, key=i + 1, chk=1, enrichment=e)
          for i, e in enumerate([{"limit": 10}, {"limit": 4}, None, {"limit": 6}])]
    ev = evaluate([rule], ReadingColumns.from_readings(rs), {}, {})
    # the limit falls below the value at the second reading (opens); no limit joined says nothing; 6 clears
    assert [(t.kind, t.ts_ms - NOW) for t in ev.transitions] == [("open", 1), ("clear", 3)]


def test_rate_anomaly_and_where() -> None:
    rate = parse_rule({"name": "fast", "kind": "rate", "metric": "t", "op": ">", "value": 6, "per": "min",
                       "where": {"site": "north"}})
    z = parse_rule({"name": "odd", "kind": "anomaly", "metric": "t", "value": 4, "min_samples": 5, "alpha": 0.2})
    vals = [20.0, 20.1, 19.9, 20.0, 20.05, 19.95, 20.0, 20.08, 30.0, 20.0]
    rs = [Reading("d", NOW + i * 5000, {"t": v}, key=i + 1, chk=1, enrichment={"site": "north"})
          for i, v in enumerate(vals)]
    ev = evaluate([rate, z], ReadingColumns.from_readings(rs), {}, {})
    got = [(t.rule, t.kind, (t.ts_ms - NOW) // 5000) for t in ev.transitions]
    # rate: +0.08 in 5 s is ~1/min; +9.9 in 5 s opens; -10 clears. z: 30 is far out
    assert ("fast", "open", 8) in got and ("fast", "clear", 9) in got and ("fast", "open", 7) not in got
    assert ("odd", "open", 8) in got
    south = [Reading("d", r.ts_ms, r.measurements, key=r.key, chk=1, enrichment={"site": "south"}) for r in rs]
    assert not [t for t in evaluate([rate], ReadingColumns.from_readings(south), {}, {}).transitions]


def test_absence_opens_for_silent_and_never_seen_devices_and_a_reading_clears() -> None:
    rule = parse_rule({"name": "gone", "kind": "absence", "after_s": 60, "devices": ["pump-*"]})
    cands = [AbsenceCandidate("pump-1", NOW - 61_000), AbsenceCandidate("pump-2", NOW - 10_000),
             AbsenceCandidate("pump-new", NOW - 120_000, registered_only=True), AbsenceCandidate("fan-1", 0)]
    ev = evaluate_absence([rule], cands, {}, NOW)
    assert sorted(t.device_id for t in ev.transitions) == ["pump-1", "pump-new"]
    again = evaluate_absence([rule], cands, ev.states, NOW + 1000)
    assert not again.transitions  # firing: not opened twice
    back = evaluate([rule], ReadingColumns.from_readings([Reading("pump-new", NOW - 999_999, {"x": 1.0}, 1, 1)]),
                    {}, {**ev.states, ("gone", "pump-new"): RuleState(firing=True, alert_id=7)})
    assert [(t.kind, t.device_id, t.alert_id) for t in back.transitions] == [("clear", "pump-new", 7)]


# -- the processor: state and notifications in the batch's transaction ------------------------
def _processor(store: SqliteStore) -> Processor:
    # bus is unused by apply_records
    return Processor(bus=None, store=store, settings=ProcessorSettings(), alerts=AlertEngine(store))  # type: ignore[arg-type]


def _alert_rows(path: Path) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT id, rule, device_id, state, opened_ts_ms, cleared_ts_ms FROM alerts ORDER BY id"
                           ).fetchall()
    finally:
        con.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_processor_commits_alerts_with_the_batch_and_a_replay_repeats_nothing(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "hot.db"
    url = f"sqlite:///{path}"
    tables = AlertTables(url)
    tables.put_rule(parse_rule(HOT), actor="test")
    items = stream(seed, NOW)
    records = bus_records(items, 7, NOW)
    rule = parse_rule(HOT)
    expected = oracle(bus_order(records, items), rule)
    rnd = random.Random(seed)
    i = 0
    while i < len(records):
        # a "crash" at a random point: the batch in hand is lost before or after its commit, a new
        # processor resumes from the stored positions and the bus redelivers everything past them
        store = SqliteStore(url)
        proc = _processor(store)
        n = rnd.randint(1, 12)
        for s in range(i, min(i + n, len(records)), 3):
            proc.apply_records(records[s:s + 3])
        redeliver_from = max(0, min(i + n, len(records)) - rnd.randint(0, 6))
        store.close()
        i = redeliver_from if redeliver_from > i else min(i + n, len(records))
    store = SqliteStore(url)
    proc = _processor(store)
    proc.apply_records(records)  # the whole bus again: every record is at or below the positions
    store.close()
    rows = _alert_rows(path)
    got = []
    for _id, _rule, dev, state, opened, cleared in rows:
        got.append(("open", dev, opened))
        if state == "cleared":
            got.append(("clear", dev, cleared))
    assert sorted(got, key=lambda t: (t[1], t[2], t[0] == "open")) == sorted(
        expected, key=lambda t: (t[1], t[2], t[0] == "open"))
    active = [r for r in rows if r[3] != "cleared"]
    assert len({(r[1], r[2]) for r in active}) == len(active)
    notes = tables.notifications(limit=10_000)
    # one notification per transition and target, each of them once
    assert sorted((n["alert_id"], n["event"]) for n in notes) == sorted(
        [(r[0], "open") for r in rows] + [(r[0], "cleared") for r in rows if r[3] == "cleared"])
    tables.close()


def test_ack_clear_by_hand_and_the_one_active_index(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hot.db'}"
    tables = AlertTables(url)
    tables.put_rule(parse_rule(HOT), actor="test")
    store = SqliteStore(url)
    proc = _processor(store)
    offsets = iter(range(1, 1000))

    def send(*vals: float) -> None:
        off = next(offsets)
        items = [("pump-1", NOW + off * 1000 + k, v, off * 100 + k) for k, v in enumerate(vals)]
        proc.apply_records([BusRecord(topic=READINGS_TOPIC, partition=0, offset=off,
                                      value=encode_bus_batch(BusBatch([reading(it, NOW) for it in items])))])

    send(31)
    [a] = tables.alerts()
    assert a["state"] == "open" and a["severity"] == "major"
    acked = tables.ack(a["id"], actor="key:op", note="on it")
    assert (acked["state"], acked["acked_by"], acked["note"]) == ("acknowledged", "key:op", "on it")
    with pytest.raises(Exception, match="acknowledged already"):
        tables.ack(a["id"], actor="key:op")
    tables.clear(a["id"], actor="key:op", note="fixed the fan")
    send(32)  # still over: a hand-cleared alert does not open again while the condition holds
    assert len(tables.alerts()) == 1
    send(27, 33)  # the condition clears (nothing to announce: cleared by hand), then returns: a new alert
    alerts = tables.alerts()
    assert [x["state"] for x in alerts] == ["open", "cleared"]
    events = [n["event"] for n in tables.notifications(limit=100)][::-1]
    assert events == ["open", "acknowledged", "cleared", "open"]
    detail = tables.alert(alerts[1]["id"])
    assert [h["event"] for h in detail["history"]] == ["open", "acknowledged", "cleared"]
    con = sqlite3.connect(tmp_path / "hot.db")
    with pytest.raises(sqlite3.IntegrityError):
        con.execute("INSERT INTO alerts (rule, device_id, severity, labels, state, opened_ts_ms, opened_ms)"
                    " VALUES ('hot', 'pump-1', 'major', '{}', 'open', 1, 1)")
    audit = con.execute("SELECT action FROM audit_log ORDER BY id").fetchall()
    con.close()
    assert [a for (a,) in audit] == ["rule.add", "alert.ack", "alert.clear"]
    store.close()
    tables.close()


def test_a_rule_change_applies_from_the_next_batch(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hot.db'}"
    tables = AlertTables(url)
    store = SqliteStore(url)
    proc = _processor(store)
    items = [("pump-1", NOW + i * 1000, 35.0, i) for i in range(4)]
    recs = bus_records(items, 1, NOW, partitions=1)
    proc.apply_records(recs[:2])
    assert tables.alerts() == []  # no rule yet
    tables.put_rule(parse_rule(HOT), actor="test")
    proc.apply_records(recs[2:])
    [a] = tables.alerts()
    assert a["opened_ts_ms"] == NOW + 2000
    assert json.loads(json.dumps(tables.stats()))["active_by_severity"] == {"major": 1}
    store.close()
    tables.close()


def test_rule_states_read_back_as_written_nan_and_infinities_and_rows_of_earlier_versions(tmp_path: Path) -> None:
    """A rule state's ``aux`` round-trips through the store: finite values (msgspec's compact JSON), NaN and
    infinities (json.dumps's extension, which msgspec would write as null), and rows an earlier version wrote."""
    url = f"sqlite:///{tmp_path / 'hot.db'}"
    tables = AlertTables(url)
    written = {
        ("r", "d-fin"): RuleState(aux=(1_700_000_000_000.0, 25.3)),
        ("r", "d-big"): RuleState(firing=True, alert_id=None, aux=(1e300, -0.0, 3.0)),
        ("r", "d-nan"): RuleState(since_ms=5, aux=(float("nan"), 1.0)),
        ("r", "d-inf"): RuleState(aux=(float("inf"), float("-inf"), 2.0)),
    }
    tables.transact(lambda tx: apply_evaluation(tx, Evaluation([], dict(written)), {}))
    with sqlite3.connect(tmp_path / "hot.db") as con:  # rows as an earlier version wrote them (json.dumps)
        con.executemany("INSERT INTO alert_state (rule, device_id, firing, since_ms, alert_id, aux)"
                        " VALUES ('r', ?, 0, NULL, NULL, ?)",
                        [("d-old", json.dumps([1_700_000_000_000.0, 25.3])), ("d-int", "[3, 2]")])
    got = tables.transact(lambda tx: load_states(tx, ["d-fin", "d-big", "d-nan", "d-inf", "d-old", "d-int"]))
    tables.close()

    def same(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return len(a) == len(b) and all(x == y or (x != x and y != y) for x, y in zip(a, b, strict=True))

    for key, state in written.items():
        assert (got[key].firing, got[key].since_ms) == (state.firing, state.since_ms)
        assert same(got[key].aux, state.aux), (key, got[key].aux, state.aux)
    assert got[("r", "d-old")].aux == (1_700_000_000_000.0, 25.3)
    assert got[("r", "d-int")].aux == (3.0, 2.0)
