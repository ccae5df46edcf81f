"""Data-product quality through the real processor and hot store (SQLite and PostgreSQL), against an oracle.

The stream has sequence gaps (readings never sent), nulls (readings without the metric), out-of-range
values, duplicates (the same reading sent again), a late replay and drift (the last windows' values
shifted). The oracle counts each window with plain Python loops, written apart from
:mod:`fieldmesh.stream.quality` (no numpy, no shared helper); the processor runs with crashes and
redeliveries, so the counters must be exactly as durable as the bus positions.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import pytest

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.codec import decode_telemetry, encode_bus_batch, encode_reading_json
from fieldmesh.core.model import BusBatch, Reading
from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.store import load_store
from fieldmesh.store.products import ProductTables
from fieldmesh.stream.processor import Processor
from fieldmesh.stream.products import ProductEngine
from fieldmesh.stream.quality import ProductError, parse_product, products_from_yaml, psi

T0 = 1_767_225_600_000  # a whole minute
LO, HI, BINS = 0.0, 40.0, 8
PRODUCT = {
    "name": "pump-temps", "owner": "plant-ops", "description": "pump temperatures",
    "schema_subject": "pump-telemetry-value", "devices": {"ids": ["fan-1"], "globs": ["pump-*"]},
    "tables": {"hot": ["readings", "rollup_1m"], "lake": ["fieldmesh.readings"]},
    "expected_interval_s": 1, "window_s": 60, "baseline_windows": 2,
    "metrics": {"temp": {"min": LO, "max": HI, "bins": BINS}},
    "slo": {"completeness": 0.95, "null_rate": 0.02, "out_of_range_rate": 0.01, "duplicate_rate": 0.05,
            "drift_psi": 0.25, "freshness_s": 3600},
}
Item = tuple[str, int, int, float | None]  # device, ts_ms, seq, temp (None: the reading lacks it)


def make_stream(seed: int) -> list[Item]:
    """5 windows of one reading a second from pump-1, pump-2, fan-1 (in the product) and valve-9 (not)."""
    rnd = random.Random(seed)
    items: list[Item] = []
    for dev in ("pump-1", "pump-2", "fan-1", "valve-9"):
        start = 7 if dev == "pump-2" else 0  # pump-2 starts late: expected from its first reading
        for i in range(start, 300):
            if dev == "pump-1" and 100 <= i < 112:
                continue  # a gap: 12 readings lost upstream
            if rnd.random() < 0.02:
                continue  # scattered losses
            mu = 26.0 if i >= 240 else 20.0  # the last window drifts
            temp: float | None = round(rnd.gauss(mu, 2.0), 2)
            if rnd.random() < 0.03:
                temp = None
            elif rnd.random() < 0.01:
                temp = rnd.choice([-5.0, 55.0])
            items.append((dev, T0 + i * 1000, i, temp))
    items.sort(key=lambda it: (it[1], it[0]))
    for it in rnd.sample(items, len(items) // 25):  # duplicates, after their original
        items.insert(rnd.randrange(items.index(it) + 1, len(items) + 1), it)
    # a late replay: window 0's last readings of fan-1 held back, sent at the end
    held = [it for it in items if it[0] == "fan-1" and 50_000 <= it[1] - T0 < 60_000]
    items = [it for it in items if it not in held] + held
    return items


def _reading(it: Item) -> Reading:
    dev, ts, seq, temp = it
    m: dict[str, float | bool] = {"pressure": 1.0} if temp is None else {"temp": temp, "pressure": 1.0}
    return decode_telemetry(encode_reading_json(dev, ts, m, seq), device_id=dev, topic=f"devices/{dev}/telemetry",
                            received_ms=ts + 50, max_skew_ms=10**12).readings[0]


def records(items: Sequence[Item], per_record: int = 9) -> list[BusRecord]:
    out = []
    for off, s in enumerate(range(0, len(items), per_record), start=1):
        out.append(BusRecord(topic=READINGS_TOPIC, partition=0, offset=off,
                             value=encode_bus_batch(BusBatch([_reading(it) for it in items[s:s + per_record]]))))
    return out


def oracle(items: Sequence[Item]) -> dict[str, Any]:
    """Per window of the product's devices: received, new, duplicates, nulls, out of range, histogram,
    expected; and the sequence counts."""
    member = {"pump-1", "pump-2", "fan-1"}
    seen: set[tuple[str, int]] = set()
    first: dict[str, int] = {}
    win: dict[int, dict[str, Any]] = {}
    seqs: dict[str, set[int]] = {}
    for dev, ts, seq, temp in items:
        if dev not in member:
            continue
        w = win.setdefault(ts - ts % 60_000, {"received": 0, "new": 0, "nulls": 0, "oor": 0, "values": 0,
                                               "hist": [0] * (BINS + 2)})
        w["received"] += 1
        if (dev, seq) in seen:
            continue
        seen.add((dev, seq))
        seqs.setdefault(dev, set()).add(seq)
        first[dev] = min(first.get(dev, ts), ts)
        w["new"] += 1
        if temp is None:
            w["nulls"] += 1
            continue
        w["values"] += 1
        if temp < LO or temp > HI:
            w["oor"] += 1
        if temp < LO:
            b = 0
        elif temp > HI:
            b = BINS + 1
        else:
            b = min(int((temp - LO) // ((HI - LO) / BINS)), BINS - 1) + 1
        w["hist"][b] += 1
    for start, w in win.items():
        w["expected"] = sum((start + 60_000 - max(f, start)) / 1000 for f in first.values() if f < start + 60_000)
    span = sum(max(s) - min(s) + 1 for s in seqs.values())
    got = sum(len(s) for s in seqs.values())
    return {"windows": win, "span": span, "n": got}


def plain_psi(base: Sequence[int], cur: Sequence[int]) -> float:
    sb, sc = sum(base), sum(cur)
    total = 0.0
    for b, c in zip(base, cur, strict=True):
        p, q = max(b / sb, 1e-4), max(c / sc, 1e-4)
        total += (q - p) * math.log(q / p)
    return total


def _processor(store: Any) -> Processor:
    proc = Processor(bus=None, store=store, settings=ProcessorSettings(),  # type: ignore[arg-type]
                     products=ProductEngine(store))
    proc._positions = store.positions()  # as run() does at its start (the bus is not used here)
    return proc


def _run(url: str, recs: Sequence[BusRecord], seed: int) -> None:
    rnd = random.Random(seed)
    i = 0
    while i < len(recs):  # crash at random points; a new processor resumes from the stored positions
        store = load_store(url)
        proc = _processor(store)
        n = rnd.randint(1, 15)
        for s in range(i, min(i + n, len(recs)), 4):
            proc.apply_records(recs[s:s + 4])
        back = max(0, min(i + n, len(recs)) - rnd.randint(0, 6))
        store.close()
        i = back if back > i else min(i + n, len(recs))
    store = load_store(url)
    _processor(store).apply_records(recs)  # all again: nothing counts twice
    store.close()


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_quality_matches_the_oracle_through_the_processor(backend: str, tmp_path: Any, request: Any) -> None:
    url = f"sqlite:///{tmp_path / 'hot.db'}" if backend == "sqlite" else request.getfixturevalue("pg_fresh_url")
    tables = ProductTables(url)
    tables.put(parse_product(PRODUCT), actor="test", create=True)
    items = make_stream(7)
    _run(url, records(items), 7)
    want = oracle(items)
    q = tables.quality("pump-temps", now_ms=T0 + 300_000 + 10_000)
    tables.close()
    ws = want["windows"]
    assert [w["start_ms"] for w in q["windows"]] == sorted(ws)
    base = [sum(ws[s]["hist"][b] for s in sorted(ws)[:2]) for b in range(BINS + 2)]
    for w in q["windows"]:
        o = ws[w["start_ms"]]
        assert (w["received"], w["new"], w["duplicates"]) == (o["received"], o["new"], o["received"] - o["new"])
        assert w["expected"] == pytest.approx(o["expected"])
        assert w["completeness"] == pytest.approx(min(1.0, o["new"] / o["expected"]))
        m = w["metrics"]["temp"]
        assert m["null_rate"] == pytest.approx(o["nulls"] / o["new"])
        assert m["out_of_range_rate"] == pytest.approx(o["oor"] / o["values"])
        assert m["drift_psi"] == pytest.approx(plain_psi(base, o["hist"]))
    assert q["sequence"] == {"expected": want["span"], "received": want["n"], "gaps": want["span"] - want["n"],
                             "completeness": pytest.approx(want["n"] / want["span"])}
    assert q["sequence"]["gaps"] >= 12  # pump-1's hole at least
    # the latest closed window is the drifted one: its drift breaks the SLO, the rest depends on the draw
    latest = q["latest"]
    assert latest["start_ms"] == T0 + 240_000
    assert q["slo"]["drift_psi"]["ok"] is False and q["slo"]["drift_psi"]["value"] > 0.25
    last_rx = max(ts for dev, ts, _, _ in items if dev != "valve-9") + 50  # received_ms of the newest reading
    assert q["slo"]["freshness_s"]["ok"] is True
    assert q["slo"]["freshness_s"]["value"] == pytest.approx((T0 + 310_000 - last_rx) / 1000)
    assert q["slo_ok"] is False
    early = q["windows"][1]["metrics"]["temp"]["drift_psi"]
    assert early is not None and early < 0.1  # same distribution as the baseline


@pytest.fixture
def pg_fresh_url(pg_url: str) -> Any:
    """A schema of its own in the session's test database."""
    import secrets

    import psycopg

    schema = f"q_{secrets.token_hex(4)}"
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute(f'CREATE SCHEMA "{schema}"')
    yield f"{pg_url}?schema={schema}"
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute(f'DROP SCHEMA "{schema}" CASCADE')


def test_psi_is_zero_for_equal_and_grows_with_shift() -> None:
    assert psi([10, 20, 30], [1, 2, 3]) == pytest.approx(0.0)
    assert psi([10, 20, 30, 0], [0, 20, 30, 10]) > psi([10, 20, 30, 0], [5, 20, 30, 5]) > 0
    assert psi([0, 0], [1, 2]) is None


@pytest.mark.parametrize(("doc", "field"), [
    ({"name": "bad name"}, "name"),
    ({"name": "p", "colour": 1}, "colour"),
    ({"name": "p", "metrics": {"t": {"min": 5, "max": 1}}}, "metrics.t"),
    ({"name": "p", "slo": {"speed": 1}}, "slo.speed"),
    ({"name": "p", "slo": {"completeness": 0.9}}, "slo.completeness"),
    ({"name": "p", "window_s": 0}, "window_s"),
])
def test_bad_products_name_their_field(doc: dict[str, Any], field: str) -> None:
    with pytest.raises(ProductError) as exc:
        parse_product(doc)
    assert exc.value.field == field


def test_products_file_round_trips_and_refuses_repeats() -> None:
    import yaml

    p = parse_product(PRODUCT)
    assert parse_product(p.as_dict()) == p
    assert products_from_yaml(yaml.safe_dump({"products": [PRODUCT]})) == [p]
    with pytest.raises(ProductError, match="twice"):
        products_from_yaml(yaml.safe_dump([PRODUCT, PRODUCT]))
