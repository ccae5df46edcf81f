"""Hot tiers with retention and reads across tiers (:mod:`fieldmesh.store.tiers`), SQLite and PostgreSQL.

Twelve days of readings go through the processor into a hot store and the lake sink. The lake commits only
part of them (it lags, then stops); retention must delete nothing the lake does not hold, delete what it
holds and is old, and reads across the retention boundary must equal :mod:`fmtest.oracle` at every step.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tests.store.test_sink_behaviour import readings_of, records
from typer.testing import CliRunner

from fieldmesh.api.app import create_app
from fieldmesh.cli.main import app as cli
from fieldmesh.core.codec import decode_telemetry, encode_reading_json
from fieldmesh.core.errors import ConfigError
from fieldmesh.core.settings import LakeSettings, ProcessorSettings, RetentionSettings
from fieldmesh.store import HotStore, load_store
from fieldmesh.store.lake import LakeSink, open_catalog
from fieldmesh.store.tiers import LakeCopy, RetentionLoop, TieredReads, boundaries, prune
from fieldmesh.stream.processor import Processor
from fmtest import oracle

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DAY = 86_400_000
NOW = 1_763_812_345_123  # "now" of the retention runs
RET = RetentionSettings(raw_days=3, rollup_1m_days=5, rollup_1h_days=0)


def lake_settings() -> LakeSettings:
    return LakeSettings(commit_interval_s=3600.0)  # commits on flush() only


def items_over(seed: int, n: int, days: float, now: int = NOW) -> list[tuple[str, dict[str, Any]]]:
    """Distinct readings (distinct event times, so "newest first" has one answer) over the last ``days``."""
    rnd = random.Random(seed)
    ts = rnd.sample(range(now - int(days * DAY), now), n)
    out = []
    for i, t in enumerate(ts):
        r: dict[str, Any] = {"ts": t, "seq": seed * 100_000 + i,
                             "measurements": {m: round(rnd.uniform(-100, 100), 3)
                                              for m in rnd.sample(["t", "h", "v"], rnd.randint(1, 3))}}
        if rnd.random() < 0.2:
            r["event_id"] = f"e{seed}-{i}"
        out.append((rnd.choice(["d1", "d2", "d-3"]), r))
    return sorted(out, key=lambda x: x[1]["ts"])  # in time order, as devices send


def readings_now(items: list[tuple[str, dict[str, Any]]], received_ms: int) -> list[Any]:
    """As ``readings_of``, received at ``received_ms`` (the gateway refuses event times far ahead of it)."""
    out = []
    for dev, r in items:
        extra = {k: r[k] for k in ("event_id", "boot_id") if k in r}
        p = encode_reading_json(dev, r["ts"], r["measurements"], r.get("seq"), **extra)
        res = decode_telemetry(p, device_id=dev, topic=f"devices/{dev}/telemetry", received_ms=received_ms)
        assert not res.rejects, res.rejects
        out.extend(res.readings)
    return out


def apply(proc: Processor, recs: list[Any], per_batch: int = 3) -> None:
    """In batches of a few bus records, as the processor fetches them (the SQLite store writes a segment per
    device and batch)."""
    for s in range(0, len(recs), per_batch):
        proc.apply_records(recs[s : s + per_batch])


def hot_raw_keys(store: HotStore) -> set[tuple[str, int]]:
    return {(r["device_id"], r["ts_ms"]) for r in store.raw(device_id=None, metric=None, start_ms=None, end_ms=None,
                                                            limit=10**7)}


def expected_raw(items: list[tuple[str, dict[str, Any]]], start: int | None, end: int | None,
                 device: str | None = None) -> list[tuple[str, int, int | None]]:
    rows = [(d, r["ts"], r.get("seq")) for d, r in oracle.unique_readings(items).values()
            if (start is None or r["ts"] >= start) and (end is None or r["ts"] < end) and device in (None, d)]
    return sorted(rows, key=lambda x: -x[1])


def got_raw(reads: TieredReads, start: int | None, end: int | None, limit: int,
            device: str | None = None) -> list[tuple[str, int, int | None]]:
    rows = reads.raw(device_id=device, metric=None, start_ms=start, end_ms=end, limit=limit)
    return [(r["device_id"], r["ts_ms"], r.get("seq")) for r in rows]


def assert_reads_equal_oracle(reads: TieredReads, items: list[tuple[str, dict[str, Any]]]) -> None:
    cut = boundaries(reads.store).get("raw", NOW - 3 * DAY)
    assert got_raw(reads, None, None, 10**7) == expected_raw(items, None, None)
    for start, end, limit in ((cut - DAY, cut + DAY, 10**6), (cut - DAY, cut + DAY, 17), (None, cut + 3_600_000, 40),
                              (cut - 2 * DAY, None, 10**6), (cut - 2 * DAY, cut, 10**6), (cut, None, 10**6)):
        assert got_raw(reads, start, end, limit) == expected_raw(items, start, end)[:limit], (start, end, limit)
    assert got_raw(reads, cut - DAY, cut + DAY, 10**6, "d2") == expected_raw(items, cut - DAY, cut + DAY, "d2")
    for interval in ("1m", "1h"):
        exp = oracle.rollups(items, interval)
        rows = reads.rollups(interval=interval, device_id=None, metric=None, start_ms=None, end_ms=None, limit=10**7)
        got = {(r["device_id"], r["metric"], r["window_start_ms"]): r for r in rows}
        assert len(got) == len(rows), "a window twice"
        assert set(got) == set(exp), interval
        for k, e in exp.items():
            g = got[k]
            assert (g["count"], g["sum"], g["min"], g["max"], g["avg"]) == (
                e["count"], e["sum"], e["min"], e["max"], e["avg"]), (interval, k)
        # a range across the 1m cut, with a limit
        cut_1m = boundaries(reads.store).get("rollup_1m", NOW - 5 * DAY)
        lo, hi = cut_1m - DAY // 2, cut_1m + DAY // 2
        part = reads.rollups(interval=interval, device_id="d1", metric="t", start_ms=lo, end_ms=hi, limit=25)
        want = sorted(k for k in exp if k[0] == "d1" and k[1] == "t" and lo <= k[2] < hi)[:25]
        assert [(r["device_id"], r["metric"], r["window_start_ms"]) for r in part] == want


def test_retention_keeps_what_the_lake_lacks_and_reads_equal_the_oracle(
        store: HotStore, tmp_path: Path) -> None:
    first = items_over(1, 500, 12)
    later = items_over(2, 150, 12)  # arrives after the lake's last commit: late readings into old days
    cat = open_catalog(lake_settings(), tmp_path)
    sink = LakeSink(settings=lake_settings(), data_dir=tmp_path, catalog=cat)
    proc = Processor(bus=None, store=store, settings=ProcessorSettings(), sinks=[sink])  # type: ignore[arg-type]
    head = records(readings_of(first), [7, 3, 11])
    recs = head + records(readings_of(later), [7, 3, 11], start=len(head) + 1)
    apply(proc, head)
    sink.flush()  # the lake has the first part
    apply(proc, recs[len(head):])  # ... and not the rest: buffered, then the sink dies
    sink._closing = True
    in_lake = {(d, r["ts"]) for d, r in oracle.unique_readings(first).values()}
    everything = first + later
    reads = TieredReads(store, open_catalog=lambda: cat, boundary_ttl_s=0)

    # nothing pruned yet: the hot store answers alone
    assert boundaries(store) == {}
    assert_reads_equal_oracle(reads, everything)
    before = hot_raw_keys(store)
    assert len(before) == len(oracle.unique_readings(everything))

    # dry run: counts, deletes nothing, records no boundary
    lake = LakeCopy(cat, "fieldmesh")
    dry = {r.tier: r for r in prune(store, settings=RET, lake=lake, now_ms=NOW, dry_run=True)}
    assert set(dry) == {"raw", "rollup_1m"}  # 1h: forever
    assert dry["raw"].deleted > 0 and dry["raw"].held > 0
    assert hot_raw_keys(store) == before and boundaries(store) == {}

    # the lake lags: what it lacks stays
    reports = {r.tier: r for r in prune(store, settings=RET, lake=lake, now_ms=NOW)}
    assert boundaries(store) == {"raw": reports["raw"].cut_ms, "rollup_1m": reports["rollup_1m"].cut_ms}
    assert reports["raw"].deleted == dry["raw"].deleted and reports["raw"].held == dry["raw"].held
    after = hot_raw_keys(store)
    gone = before - after
    lake_rows = {(r["device_id"], int(r["ts"].timestamp() * 1000))
                 for r in cat.load_table("fieldmesh.readings").scan().to_arrow().to_pylist()}
    assert gone, "old committed readings were deleted"
    assert gone <= lake_rows, "a reading the lake lacks left the hot store"
    assert all(ts < reports["raw"].cut_ms for _, ts in gone)
    lacking = {(d, r["ts"]) for d, r in oracle.unique_readings(everything).values()} - lake_rows
    assert lacking and lacking <= after
    assert in_lake <= lake_rows
    # the 1m windows a late reading changed after the lake's commit stay (they differ from the lake's)
    late_windows = {(d, m, r["ts"] // 60_000 * 60_000) for d, r in later for m in r["measurements"]
                    if r["ts"] < reports["rollup_1m"].cut_ms}
    hot_1m = {(r["device_id"], r["metric"], r["window_start_ms"])
              for r in store.rollups(interval="1m", device_id=None, metric=None, start_ms=None, end_ms=None,
                                     limit=10**7)}
    assert late_windows and late_windows <= hot_1m
    assert reports["rollup_1m"].deleted > 0
    assert_reads_equal_oracle(reads, everything)

    # the lake catches up (a new sink: the bus redelivers what it lacks); the next prune deletes the rest
    sink = LakeSink(settings=lake_settings(), data_dir=tmp_path, catalog=cat)
    proc = Processor(bus=None, store=store, settings=ProcessorSettings(), sinks=[sink])  # type: ignore[arg-type]
    proc._positions = store.positions()
    mine = sink.applied()
    apply(proc, [r for r in recs if r.offset > mine.get((r.topic, r.partition), -1)])
    sink.close()
    again = {r.tier: r for r in prune(store, settings=RET, lake=LakeCopy(cat, "fieldmesh"), now_ms=NOW)}
    assert again["raw"].held == 0 and again["raw"].deleted > 0
    assert again["rollup_1m"].held == 0
    cut = again["raw"].cut_ms
    left = hot_raw_keys(store)
    if store.url.startswith("sqlite"):  # whole segments go: only those reaching across the cut stay
        assert store.query("SELECT count(*) FROM segments WHERE max_ts_ms < ?", [cut]).rows == [(0,)]
    else:
        assert not [k for k in left if k[1] < cut], "old readings left after the lake caught up"
    assert not store.query("SELECT count(*) FROM rollup_1m WHERE window_start_ms < " + str(again["rollup_1m"].cut_ms)
                           ).rows[0][0]
    assert_reads_equal_oracle(reads, everything)


def test_retention_refuses_without_the_lake_unless_told(store: HotStore) -> None:
    with pytest.raises(ConfigError, match="without-lake"):
        prune(store, settings=RET, lake=None, now_ms=NOW)
    assert prune(store, settings=RetentionSettings(raw_days=0, rollup_1m_days=0), lake=None, now_ms=NOW) == []
    items = items_over(3, 120, 6)
    proc = Processor(bus=None, store=store, settings=ProcessorSettings())  # type: ignore[arg-type]
    apply(proc, records(readings_of(items), [5]))
    out = {r.tier: r for r in prune(store, settings=RET.model_copy(update={"without_lake": True}), lake=None,
                                    now_ms=NOW)}
    assert out["raw"].held == 0 and out["raw"].deleted > 0
    # without a lake, reads are the hot store's: what retention dropped is gone
    reads = TieredReads(store, open_catalog=None)
    assert got_raw(reads, None, None, 10**6) == [x for x in expected_raw(items, None, None)
                                                 if (x[0], x[1]) in hot_raw_keys(store)]


def test_prune_command_and_the_api_read_across_the_tiers(tmp_path: Path) -> None:
    """``fieldmesh store prune`` on a data dir (dry run first), then the API's raw and rollup reads across the cut."""
    now = int(time.time() * 1000)
    items = items_over(4, 400, 10, now)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = load_store(url)
    sink = LakeSink(settings=lake_settings(), data_dir=tmp_path)
    apply(Processor(bus=None, store=store, settings=ProcessorSettings(), sinks=[sink]), records(  # type: ignore[arg-type]
        readings_now(items, now), [6]))
    sink.close()
    before = hot_raw_keys(store)
    store.close()
    run = CliRunner().invoke
    args = ["store", "prune", "--data-dir", str(tmp_path), "--raw-days", "4", "--rollup-1m-days", "6", "--json"]
    dry = {r["tier"]: r for r in json.loads(run(cli, [*args, "--dry-run"]).stdout)}
    assert dry["raw"]["deleted"] > 0 and dry["raw"]["held"] == 0 and dry["raw"]["dry_run"]
    store = load_store(url, readonly=True)
    assert hot_raw_keys(store) == before and boundaries(store) == {}
    out = run(cli, args)
    assert out.exit_code == 0, out.output
    done = {r["tier"]: r for r in json.loads(out.stdout)}
    assert done["raw"]["deleted"] == dry["raw"]["deleted"] and done["rollup_1m"]["deleted"] > 0
    assert len(hot_raw_keys(store)) < len(before)
    cut = done["raw"]["cut_ms"]
    client = TestClient(create_app(url, lake=(lake_settings(), tmp_path)))
    raw = client.get("/api/v1/telemetry/raw", params={"start": str(cut - 2 * DAY), "end": str(cut + DAY),
                                                      "limit": 100_000}).json()
    assert [(r["device_id"], r["ts_ms"], r.get("seq")) for r in raw] == expected_raw(items, cut - 2 * DAY, cut + DAY)
    top = client.get("/api/v1/telemetry/raw", params={"device_id": "d1", "metric": "t", "limit": 30}).json()
    by_ts = {r["ts"]: r for d, r in items if d == "d1"}
    want = [x for x in expected_raw(items, None, None, "d1") if "t" in by_ts[x[1]]["measurements"]][:30]
    assert [(r["device_id"], r["ts_ms"], r.get("seq")) for r in top] == want
    assert all(set(r["measurements"]) == {"t"} for r in top)
    exp = oracle.rollups(items, "1m")
    rows = client.get("/api/v1/telemetry/rollups", params={"interval": "1m", "limit": 100_000}).json()
    assert {(r["device_id"], r["metric"], r["window_start_ms"]): (r["count"], r["sum"], r["avg"]) for r in rows} == {
        k: (e["count"], e["sum"], e["avg"]) for k, e in exp.items()}
    stats = client.get("/api/v1/stats").json()["retention"]
    assert stats["raw"]["deleted"] == done["raw"]["deleted"] and stats["raw"]["held"] == 0
    assert stats["rollup_1m"]["cut"] == done["rollup_1m"]["cut"]
    assert f'fieldmesh_retention_deleted_rows_total{{tier="raw"}} {float(done["raw"]["deleted"])}' in client.get(
        "/metrics").text
    # fieldmesh query --tiers: SQL over both tiers (DuckDB), equal to the oracle across the cut
    q = run(cli, ["query", "--data-dir", str(tmp_path), "--tiers", "--json", "--start", str(cut - 2 * DAY),
                  "--end", str(cut + DAY), "SELECT device_id, count(*) AS n, max(ts_ms) AS last FROM readings"
                  " GROUP BY device_id ORDER BY device_id"])
    assert q.exit_code == 0, q.output
    want_n: dict[str, list[int]] = {}
    for d, ts, _ in expected_raw(items, cut - 2 * DAY, cut + DAY):
        want_n.setdefault(d, []).append(ts)
    assert json.loads(q.stdout) == [{"device_id": d, "n": len(v), "last": max(v)} for d, v in sorted(want_n.items())]
    q = run(cli, ["query", "--data-dir", str(tmp_path), "--tiers", "--json",
                  "SELECT metric, sum(count) AS n FROM rollup_1h GROUP BY metric ORDER BY metric"])
    hours = oracle.rollups(items, "1h")
    assert json.loads(q.stdout) == [{"metric": m, "n": sum(e["count"] for k, e in hours.items() if k[1] == m)}
                                    for m in sorted({k[1] for k in hours})]
    q = run(cli, ["query", "--data-dir", str(tmp_path), "--tiers", "COPY (SELECT 1) TO '/tmp/fm-x.csv'"])
    assert q.exit_code == 2 and "query failed" in q.output
    # the hot store alone no longer has the old part
    hot_only = TestClient(create_app(url)).get("/api/v1/telemetry/raw", params={"limit": 100_000}).json()
    assert len(hot_only) < len(oracle.unique_readings(items)) == len(raw) + len(expected_raw(items, None, cut - 2 * DAY)
                                                                           ) + len(expected_raw(items, cut + DAY, None))
    store.close()


def test_the_retention_loop_opens_the_lake_only_for_old_rows(store: HotStore, tmp_path: Path) -> None:
    """A prune with nothing older than its cuts reads nothing from the lake and does not open it (the processor
    then never loads pyiceberg and pyarrow for it); once old rows are there, it opens the lake and keeps what
    the lake lacks."""
    cat = open_catalog(lake_settings(), tmp_path)
    opened: list[int] = []

    def open_lake() -> LakeCopy:
        opened.append(1)
        return LakeCopy(cat, "fieldmesh")

    loop = RetentionLoop(store, settings=RET, open_lake=open_lake)
    proc = Processor(bus=None, store=store, settings=ProcessorSettings())  # type: ignore[arg-type]
    now = int(time.time() * 1000)
    apply(proc, records(readings_now(items_over(4, 80, 1, now=now), now), [5]))
    reports = {r.tier: r for r in loop.run_once()}
    assert set(reports) == {"raw", "rollup_1m"}
    assert all(r.candidates == 0 and r.deleted == 0 for r in reports.values())
    assert opened == []
    old = items_over(5, 80, 12, now=now - 10 * DAY)  # older than every cut; the lake has none of them
    apply(proc, records(readings_now(old, now - 10 * DAY), [6], start=100))
    reports = {r.tier: r for r in loop.run_once()}
    assert opened == [1]
    assert reports["raw"].candidates > 0 and reports["raw"].deleted == 0 and reports["raw"].held > 0
