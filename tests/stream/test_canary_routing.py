"""Canary routing through the real processor and hot store (SQLite and PostgreSQL), against an oracle.

A fleet of pumps sends one reading every 2 s for 5 minutes; after the first 2 minutes half the pumps run firmware
2.0 (``meta.firmware``). The canary takes the readings of firmware 2.x from the pumps whose CRC-32 share
falls under 30 %. The processor runs with crashes and redeliveries and the stream holds duplicates, so every
reading must be stored exactly once, on the side the oracle (plain Python, ``zlib.crc32``) puts it, and
counted; promotion folds the canary's readings into the main tables, abort leaves them where they are.
"""

from __future__ import annotations

import json
import math
import random
import zlib
from collections.abc import Sequence
from typing import Any

import pytest

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.codec import decode_telemetry, encode_bus_batch
from fieldmesh.core.errors import ConflictError
from fieldmesh.core.model import BusBatch, Reading
from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.store import load_store
from fieldmesh.store.canary import CanaryTables, promote
from fieldmesh.store.products import ProductTables
from fieldmesh.stream.canary import CanaryError, canaries_from_yaml, parse_canary
from fieldmesh.stream.processor import Processor
from fieldmesh.stream.products import ProductEngine
from fieldmesh.stream.quality import parse_product

T0 = 1_767_225_600_000  # a whole minute
LO, HI, BINS = 0.0, 40.0, 8
SHARE = 30
PRODUCT = {"name": "pumps", "devices": {"globs": ["pump-*"]}, "window_s": 60, "baseline_windows": 1,
           "metrics": {"temp": {"min": LO, "max": HI, "bins": BINS}}}
CANARY = {"name": "fw2", "product": "pumps", "share_percent": SHARE, "meta": {"firmware": "2.*"},
          "thresholds": {"drift_psi": 0.1, "min_readings": 50}}
DEVICES = [f"pump-{i}" for i in range(24)] + ["valve-1"]
Item = tuple[str, int, int, float, str]  # device, ts_ms, seq, temp, firmware


def in_share(dev: str) -> bool:
    return zlib.crc32(dev.encode()) * 100 / 2**32 < SHARE


def make_stream(seed: int, shift: float, *, start: int = 0, n: int = 150) -> list[Item]:
    rnd = random.Random(seed)
    items: list[Item] = []
    for dev in DEVICES:
        for i in range(start, start + n):
            upgraded = dev.startswith("pump-") and int(dev[5:]) % 2 == 0  # a rollout took half the pumps
            fw = "2.0" if i >= 60 and upgraded else "1.4"
            temp = round(rnd.gauss(20.0 + (shift if fw == "2.0" else 0.0), 2.0), 2)
            items.append((dev, T0 + i * 2000, i, temp, fw))
    items.sort(key=lambda it: (it[1], it[0]))
    for it in rnd.sample(items, len(items) // 20):  # duplicates, after their original
        items.insert(rnd.randrange(items.index(it) + 1, len(items) + 1), it)
    return items


def canary_side(it: Item) -> bool:
    return it[0].startswith("pump-") and in_share(it[0]) and it[4].startswith("2.")


def _reading(it: Item) -> Reading:
    dev, ts, seq, temp, fw = it
    body = json.dumps({"ts": ts, "seq": seq, "measurements": {"temp": temp}, "meta": {"firmware": fw}}).encode()
    return decode_telemetry(body, device_id=dev, topic=f"devices/{dev}/telemetry", received_ms=ts + 50,
                            max_skew_ms=10**12).readings[0]


def records(items: Sequence[Item], first_offset: int = 1, per_record: int = 25) -> list[BusRecord]:
    return [BusRecord(topic=READINGS_TOPIC, partition=0, offset=off,
                      value=encode_bus_batch(BusBatch([_reading(it) for it in items[s:s + per_record]])))
            for off, s in enumerate(range(0, len(items), per_record), start=first_offset)]


def _processor(store: Any) -> Processor:
    proc = Processor(bus=None, store=store, settings=ProcessorSettings(),  # type: ignore[arg-type]
                     products=ProductEngine(store))
    proc._positions = store.positions()
    return proc


def _run(url: str, recs: Sequence[BusRecord], seed: int) -> None:
    """Apply ``recs`` with crashes at random points (a new processor resumes from the stored positions), then
    all of them again (nothing counts twice)."""
    rnd = random.Random(seed)
    i = 0
    while i < len(recs):
        store = load_store(url)
        proc = _processor(store)
        n = rnd.randint(1, 12)
        for s in range(i, min(i + n, len(recs)), 3):
            proc.apply_records(recs[s:s + 3])
        back = max(0, min(i + n, len(recs)) - rnd.randint(0, 5))
        store.close()
        i = back if back > i else min(i + n, len(recs))
    store = load_store(url)
    _processor(store).apply_records(recs)
    store.close()


def _main_rows(url: str) -> list[tuple[str, int]]:
    store = load_store(url)
    try:
        return [(r["device_id"], r["seq"]) for r in store.raw(device_id=None, metric=None, start_ms=None,
                                                              end_ms=None, limit=10**6)]
    finally:
        store.close()


def _hist(temps: Sequence[float]) -> list[int]:
    h = [0] * (BINS + 2)
    for t in temps:
        h[0 if t < LO else BINS + 1 if t > HI else min(int((t - LO) // ((HI - LO) / BINS)), BINS - 1) + 1] += 1
    return h


def plain_psi(base: Sequence[int], cur: Sequence[int]) -> float:
    sb, sc = sum(base), sum(cur)
    return sum((max(c / sc, 1e-4) - max(b / sb, 1e-4)) * math.log(max(c / sc, 1e-4) / max(b / sb, 1e-4))
               for b, c in zip(base, cur, strict=True))


def _declare(url: str) -> None:
    pt = ProductTables(url)
    pt.put(parse_product(PRODUCT), actor="test", create=True)
    pt.close()
    ct = CanaryTables(url)
    ct.create(parse_canary(CANARY), actor="test")
    ct.close()


@pytest.mark.integration
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_canary_readings_are_routed_stored_once_compared_and_promoted(
        backend: str, tmp_path: Any, request: Any) -> None:
    url = f"sqlite:///{tmp_path / 'hot.db'}" if backend == "sqlite" else request.getfixturevalue("pg_fresh_url")
    _declare(url)
    items = make_stream(11, shift=8.0)  # firmware 2.0 reads 8 degrees higher: the canary drifts
    _run(url, records(items), 11)

    unique = {(d, s): it for it in items for d, s in [(it[0], it[2])]}
    want_canary = {k for k, it in unique.items() if canary_side(it)}
    want_main = set(unique) - want_canary
    assert want_canary and {d for d, _ in want_canary} == {
        d for d in DEVICES if d.startswith("pump-") and int(d[5:]) % 2 == 0 and in_share(d)}

    ct = CanaryTables(url)
    info = ct.canary("fw2")
    assert info["state"] == "active" and info["readings"] == len(want_canary)
    held = ct.readings("fw2", limit=10**6)
    assert sorted((r["device_id"], r["seq"]) for r in held) == sorted(want_canary)  # each once
    assert all(r["meta"] == {"firmware": "2.0"} for r in held)
    assert any(it[4] == "2.0" and not in_share(it[0]) for it in items)  # the rest of the new firmware: main
    main = _main_rows(url)
    assert sorted(main) == sorted(want_main)  # nothing of the canary in the main tables, nothing twice
    store = load_store(url)
    st = store.stats()
    assert (st.stored, st.duplicates) == (len(unique), len(items) - len(unique))  # every reading counted
    store.close()

    # each side's counts and quality, against the oracle
    cmp = ct.compare("fw2", now_ms=T0 + 400_000)
    rx_canary = sum(1 for it in items if canary_side(it))
    baseline_rx = [it for it in items if it[0].startswith("pump-") and not canary_side(it)]
    assert cmp["counts"]["canary"]["received"] == rx_canary
    assert cmp["counts"]["canary"]["stored"] == len(want_canary)
    assert cmp["counts"]["canary"]["duplicates"] == rx_canary - len(want_canary)
    want_base = {k for k in want_main if k[0].startswith("pump-")}
    assert cmp["counts"]["baseline"]["received"] == len(baseline_rx)
    assert cmp["counts"]["baseline"]["stored"] == len(want_base)
    assert cmp["counts"]["canary"]["latency_s"] is not None
    pt = ProductTables(url)
    pumps = pt.quality("pumps", now_ms=T0 + 400_000)
    assert sum(w["new"] for w in pumps["windows"]) == len(want_base)  # the product's quality excludes the canary
    pt.close()
    by_start = {w["start_ms"]: w for w in cmp["windows"]}
    for start, w in by_start.items():
        c = [unique[k][3] for k in want_canary if start <= unique[k][1] < start + 60_000]
        b = [unique[k][3] for k in want_base if start <= unique[k][1] < start + 60_000]
        assert (w["canary"]["new"], w["control"]["new"]) == (len(c), len(b))
        assert w["drift_psi_vs_control"]["temp"] == pytest.approx(plain_psi(_hist(b), _hist(c)))
    assert cmp["verdict"] == "hold" and any("temp drifts" in r for r in cmp["reasons"])

    # promotion: the canary's readings join the main tables (moved, not copied), new traffic takes the main path
    out = promote(load_store(url), "fw2", actor="op")
    assert out["merged"] == len(want_canary)
    assert sorted(_main_rows(url)) == sorted(unique)
    info = ct.canary("fw2")
    assert (info["state"], info["readings"], info["merged"]) == ("promoted", 0, len(want_canary))
    store = load_store(url)
    assert store.stats().stored == len(unique)
    counted = sum(r["count"] for r in store.rollups(interval="1m", device_id=None, metric="temp", start_ms=None,
                                                     end_ms=None, limit=10**6))
    assert counted == len(unique)  # the rollups have every reading once
    assert sum(d["readings"] for d in store.devices()) == len(unique)
    store.close()
    later = make_stream(12, shift=0.0, start=150, n=10)
    _run(url, records(later, first_offset=10_000), 12)
    assert len(_main_rows(url)) == len(unique) + len({(it[0], it[2]) for it in later})
    assert ct.canary("fw2")["readings"] == 0
    with pytest.raises(ConflictError):
        ct.abort("fw2", actor="op")
    ct.close()


@pytest.mark.integration
def test_a_canary_that_matches_promotes_and_an_aborted_one_keeps_its_readings(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'hot.db'}"
    _declare(url)
    items = make_stream(5, shift=0.0)  # the new firmware reads alike
    _run(url, records(items), 5)
    ct = CanaryTables(url)
    cmp = ct.compare("fw2", now_ms=T0 + 400_000)
    assert cmp["verdict"] == "promote", cmp["reasons"]
    held = ct.canary("fw2")["readings"]
    assert held > 0
    aborted = ct.abort("fw2", actor="op")
    assert aborted["state"] == "aborted" and aborted["readings"] == held
    later = make_stream(6, shift=0.0, start=150, n=10)  # firmware 2.0 everywhere: now on the main path
    _run(url, records(later, first_offset=10_000), 6)
    assert ct.canary("fw2")["readings"] == held
    assert len(_main_rows(url)) == len({(it[0], it[2]) for it in items}) - held + len({(it[0], it[2]) for it in later})
    entries = [e.action for e in ct.audit_log(limit=10)]
    assert "canary.abort" in entries and "canary.create" in entries
    with pytest.raises(ConflictError):
        promote(load_store(url), "fw2", actor="op")
    gone = ct.delete("fw2", actor="op")
    assert gone["readings"] == held
    assert ct.canaries() == []
    ct.close()


def test_the_share_is_stable_and_declarations_name_their_field() -> None:
    c = parse_canary(CANARY)
    assert [d for d in DEVICES if c.in_share(d)] == [d for d in DEVICES if in_share(d)]
    assert parse_canary(c.as_dict()) == c
    assert canaries_from_yaml("canaries:\n  - {name: a, product: p, share_percent: 5}\n")[0].share_percent == 5
    for doc, field in [({"name": "a", "product": "p", "share_percent": 0}, "share_percent"),
                       ({"name": "a b", "product": "p"}, "name"),
                       ({"name": "a", "product": "p", "thresholds": {"speed": 1}}, "thresholds.speed"),
                       ({"name": "a", "product": "p", "colour": 1}, "colour")]:
        with pytest.raises(CanaryError) as exc:
            parse_canary(doc)
        assert exc.value.field == field


@pytest.fixture
def pg_fresh_url(pg_url: str) -> Any:
    """A schema of its own in the session's test database."""
    import secrets

    import psycopg

    schema = f"c_{secrets.token_hex(4)}"
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute(f'CREATE SCHEMA "{schema}"')
    yield f"{pg_url}?schema={schema}"
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.mark.integration
def test_alert_rules_see_the_canarys_readings(tmp_path: Any) -> None:
    from fieldmesh.store.alerts import AlertTables
    from fieldmesh.stream.alerting import AlertEngine
    from fieldmesh.stream.alerts import parse_rule

    url = f"sqlite:///{tmp_path / 'hot.db'}"
    _declare(url)
    at = AlertTables(url)
    at.put_rule(parse_rule({"name": "hot", "kind": "threshold", "metric": "temp", "op": ">", "value": 30,
                            "clear_value": 28, "severity": "major"}), actor="test")
    dev = next(d for d in DEVICES if d.startswith("pump-") and int(d[5:]) % 2 == 0 and in_share(d))
    store = load_store(url)
    proc = Processor(bus=None, store=store, settings=ProcessorSettings(),  # type: ignore[arg-type]
                     products=ProductEngine(store), alerts=AlertEngine(store))
    proc._positions = store.positions()
    proc.apply_records(records([(dev, T0 + 70 * 2000, 70, 35.0, "2.0")]))
    store.close()
    ct = CanaryTables(url)
    assert ct.canary("fw2")["readings"] == 1  # held by the canary
    ct.close()
    [a] = at.alerts()
    assert a["device_id"] == dev and a["state"] == "open"
    at.close()


def test_a_products_file_with_a_bad_canary_stops_the_start(tmp_path: Any) -> None:
    import yaml
    from typer.testing import CliRunner

    from fieldmesh.cli.main import app as cli

    f = tmp_path / "products.yaml"
    f.write_text(yaml.safe_dump({"products": [PRODUCT], "canaries": [{**CANARY, "share_percent": 150}]}))
    r = CliRunner().invoke(cli, ["up", "--data-dir", str(tmp_path / "d"), "--products", str(f)])
    assert r.exit_code == 2 and "share_percent" in r.output
    assert canaries_from_yaml(yaml.safe_dump([PRODUCT]), beside_products=True) == []


@pytest.mark.integration
def test_a_promotion_waits_for_a_batch_routed_before_it(pg_fresh_url: str) -> None:
    """PostgreSQL: a batch routed to the canary whose transaction is still open when the promotion starts is
    merged by it, not left behind (the batch holds the canaries' version row FOR SHARE, the promotion updates it)."""
    import threading

    url = pg_fresh_url
    _declare(url)
    items = make_stream(21, shift=0.0, n=80)
    recs = records(items)
    started, release = threading.Event(), threading.Event()

    class Held(ProductEngine):
        hold = False

        def route(self, *a: Any, **kw: Any) -> Any:
            routed = super().route(*a, **kw)
            if self.hold:
                started.set()
                assert release.wait(30)
            return routed

    store = load_store(url)
    engine = Held(store)
    proc = Processor(bus=None, store=store, settings=ProcessorSettings(),  # type: ignore[arg-type]
                     products=engine)
    proc._positions = store.positions()
    proc.apply_records(recs[: len(recs) // 2])
    promoting = load_store(url)  # opened before the batch: its set-up takes no lock the batch holds
    engine.hold = True
    batch = threading.Thread(target=proc.apply_records, args=(recs[len(recs) // 2:],))
    batch.start()
    assert started.wait(30)
    merged: dict[str, Any] = {}
    promoter = threading.Thread(target=lambda: merged.update(promote(promoting, "fw2", actor="op")))
    promoter.start()
    promoter.join(1.0)
    assert promoter.is_alive()  # waits for the open batch
    release.set()
    batch.join(30)
    promoter.join(30)
    store.close()
    promoting.close()
    unique = {(it[0], it[2]): it for it in items}
    want_canary = [k for k, it in unique.items() if canary_side(it)]
    assert merged["merged"] == len(want_canary)
    ct = CanaryTables(url)
    assert ct.canary("fw2")["readings"] == 0
    ct.close()
    assert sorted(_main_rows(url)) == sorted(unique)


def test_a_canary_selects_a_schema_version_by_the_gateway_s_meta_schema_id() -> None:
    """The gateway puts the registered schema's id on a schema-decoded reading (``meta.schema_id``, an
    integer); a canary's ``meta`` glob picks one version by it."""
    c = parse_canary({**CANARY, "meta": {"schema_id": 12}})
    assert c.meta == {"schema_id": "12"}
    assert c.meta_matches({"schema_id": 12, "site": "north"})
    assert not c.meta_matches({"schema_id": 120})
    assert not c.meta_matches({"schema_id": 1})
    assert not c.meta_matches(None)
    assert parse_canary({**CANARY, "meta": {"schema_id": "1*"}}).meta_matches({"schema_id": 120})
