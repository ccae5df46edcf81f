"""Lake benchmark: the Iceberg sink's append rate, event -> visible latency, and its cost to the processor.

Input: the processor benchmark's device stream (bench/processor.py: devices sending 100 readings per
message, 3 metrics, duplicates, late and disordered readings) through the gateway's routing into bus
records, built before any clock starts.

1. **Append rate**: the committed results of a processor run (captured once) are written to a fresh
   :class:`~fieldmesh.store.lake.LakeSink` and committed (``write`` for every result, then ``flush``):
   readings rows per wall second from the first ``write`` until the commit is in the catalog. Target:
   500,000 rows/s. Run ``--append-rounds`` times (3), each into a fresh sink and warehouse in the same
   process: the first round pays the process's first-use costs (imports, the writer's thread pool, fresh
   memory pages) that a running sink paid long before; the target is checked on the warm rounds (best, and
   their median beside it).
2. **Event -> visible**: with the default policy (``commit_interval_s`` 60, or ``--interval``), a
   writer hands the sink one small result every 100 ms for ``--latency-s`` seconds, each stamped when
   written; a reader polls the catalog every 200 ms the way any Iceberg client does (reload the table,
   read the new snapshot's ``fieldmesh.positions``) and marks each result visible when a snapshot
   covers it. Reported: p50/p99/max of write -> visible.
3. **Cost to the processor** (``--sink-cost``, or ``--parts 3``): ``Processor.apply_records`` over the same
   records on a fresh SQLite hot store, without the lake, with the lake sink in the processor's thread
   (``LakeSink``) and in a child process (``LakeProcess``, what ``up`` and ``process`` run), alternated
   ``--rounds`` times; the lake commits every ``--cost-interval`` s (2) so that it works while the
   processor does; wall until all is applied and until the last commit is in, and the processor's CPU,
   printed as ratios.

4. **Files per partition after one simulated day, and compaction**: ``--day-rows`` readings (default
   10,000,000, as the issue asks) of ``--day-devices`` devices spread over one UTC day are appended to a
   fresh ``readings`` table in ``--day-commits`` commits in time order (default 1,440: the default policy's
   one commit a minute), the way the sink writes them; then ``fieldmesh lake compact`` (its function, target
   128 MB) rewrites the day's partitions. Reported: data files per partition (day x device bucket) without
   and with compaction, and the compaction's time beside the baseline of one append of the same rows.
   Scaled down for a short run with ``--day-rows``/``--day-commits`` (the output says what ran).

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/lake.py [--devices 2000] [--per-device 500]
[--latency-s 130] [--interval 60] [--quick] [--append-rounds 3] [--parts 1,2,3,4] [--sink-cost]
[--day-rows N] [--day-commits N]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from processor import make_records, make_stream  # noqa: E402

from fieldmesh.core.batch import BatchResult, Position  # noqa: E402
from fieldmesh.core.settings import LakeSettings, ProcessorSettings  # noqa: E402
from fieldmesh.store.lake import (  # noqa: E402
    POSITIONED,
    PROP_POSITIONS,
    TABLES,
    LakeSink,
    _decode_positions,
    _props,
    open_catalog,
)
from fieldmesh.store.sqlite import SqliteStore  # noqa: E402
from fieldmesh.stream.processor import Processor  # noqa: E402

TARGET_ROWS_S = 500_000


class _Capture:
    """A sink that keeps every result (to replay them into the lake sink alone)."""

    name = "capture"

    def __init__(self) -> None:
        self.results: list[BatchResult] = []

    def applied(self) -> dict[Position, int]:
        return {}

    def write(self, result: BatchResult) -> bool:
        self.results.append(result)
        return True

    def close(self) -> None:
        pass


def _apply(records: list[Any], store: SqliteStore, sinks: list[Any], lake: Any = None) -> tuple[float, float, float]:
    """Apply ``records`` in fetch-sized batches; (wall until all applied, wall until ``lake`` committed it all
    too, the processor's CPU). The processor's CPU is its process's: a lake sink in a child process is not in it."""
    ps = ProcessorSettings()
    p = Processor(bus=None, store=store, settings=ps, sinks=sinks)  # type: ignore[arg-type]
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(0, len(records), ps.fetch_max):
        p.apply_records(records[i : i + ps.fetch_max])
    applied = time.perf_counter() - w0
    if lake is not None:
        lake.close()
    return applied, time.perf_counter() - w0, time.process_time() - c0


def append_rate(results: list[BatchResult], tmp: Path) -> dict[str, Any]:
    sink = LakeSink(settings=LakeSettings(commit_interval_s=3600), data_dir=tmp)
    rows = sum(len(r.new) for r in results)
    c0, w0 = time.process_time(), time.perf_counter()
    for r in results:
        sink.write(r)
    w1 = time.perf_counter()
    with sink._cond:  # the flush, table by table (what LakeSink.flush does), timed per table
        buf = sink._take()
    tables: dict[str, float] = {}
    for name in TABLES:
        if name == "features":  # no feature views here: the sink commits nothing to it
            continue
        t = time.perf_counter()
        sink._commit_table(name, buf, sink._flush + 1)
        tables[name] = time.perf_counter() - t
    w2 = time.perf_counter()
    cpu = time.process_time() - c0
    with sink._cond:
        sink._flushing = False
        sink._flush += 1
        sink._committed = {t: dict(buf.positions[t]) for t in POSITIONED}
    sink.close()
    assert sink.applied() == buf.positions["readings"]
    return {"rows": rows, "rows_s": rows / (w2 - w0), "write_s": w1 - w0, "commit_s": w2 - w1, "cpu_s": cpu,
            "tables": tables, "readings_rows_s": rows / (w1 - w0 + tables["readings"])}


def latency(results: list[BatchResult], tmp: Path, *, seconds: float, interval_s: float) -> dict[str, float]:
    s = LakeSettings(commit_interval_s=interval_s)
    sink = LakeSink(settings=s, data_dir=tmp)
    catalog = open_catalog(s, tmp)
    written: list[tuple[dict[Position, int], float]] = []
    visible: list[float] = []
    stop = threading.Event()

    def reader() -> None:
        seen = 0
        while not stop.is_set() or seen < len(written):
            table = catalog.load_table(f"{s.namespace}.readings")
            snap = table.current_snapshot()
            now = time.perf_counter()
            if snap is not None and snap.summary is not None and PROP_POSITIONS in snap.summary.additional_properties:
                pos = _decode_positions(snap.summary.additional_properties[PROP_POSITIONS])
                while seen < len(written) and all(o <= pos.get(p, -1) for p, o in written[seen][0].items()):
                    visible.append(now - written[seen][1])
                    seen += 1
            time.sleep(0.2)

    t = threading.Thread(target=reader)
    t.start()
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end and i < len(results):
        r = results[i]
        sink.write(r)
        written.append((dict(r.positions), time.perf_counter()))
        i += 1
        time.sleep(0.1)
    stop.set()
    sink.close()  # commits the tail (counted: its rows become visible then)
    t.join()
    v = sorted(visible)
    return {"results": len(v), "p50_s": v[len(v) // 2], "p99_s": v[min(len(v) - 1, int(0.99 * len(v)))],
            "max_s": v[-1]}


def report_append(rounds: list[dict[str, Any]]) -> None:
    for i, ar in enumerate(rounds):
        per = ", ".join(f"{k} {v:.2f}s" for k, v in ar["tables"].items())
        print(f"1. append, round {i + 1}{' (cold)' if i == 0 else ''}: {ar['rows']:,} readings in "
              f"{ar['write_s'] + ar['commit_s']:.2f}s wall, CPU {ar['cpu_s']:.2f}s (buffer {ar['write_s']:.2f}s + "
              f"commit {per}): {ar['rows_s']:,.0f} rows/s with the rollup merges; readings alone (buffer + their "
              f"commit) {ar['readings_rows_s']:,.0f} rows/s")
    warm = sorted(ar["readings_rows_s"] for ar in rounds[1:]) or [rounds[0]["readings_rows_s"]]
    best, median = warm[-1], warm[len(warm) // 2]
    ok = "meets" if best >= TARGET_ROWS_S else "BELOW"
    print(f"   readings appended, warm rounds: best {best:,.0f} rows/s, median {median:,.0f} ({ok} the target of "
          f"{TARGET_ROWS_S:,})")


def report_latency(records: list[Any], tmp: Path, a: Any) -> None:
    small_cap = _Capture()  # one result per bus record: a steady trickle of small batches
    hot = SqliteStore(f"sqlite:///{tmp / 'small.db'}")
    p = Processor(bus=None, store=hot, settings=ProcessorSettings(), sinks=[small_cap])  # type: ignore[arg-type]
    for rec in records[: int(a.latency_s * 10) + 10]:
        p.apply_records([rec])
    hot.close()
    la = latency(small_cap.results, tmp / "latency", seconds=a.latency_s, interval_s=a.interval)
    print(f"2. write -> visible (commit interval {a.interval:g}s, {la['results']} results over "
          f"{a.latency_s:g}s): p50 {la['p50_s']:.1f}s, p99 {la['p99_s']:.1f}s, max {la['max_s']:.1f}s")


def report_cost(records: list[Any], tmp: Path, a: Any, n: int) -> None:
    """The processor over the same records without a lake, with the lake sink in its thread (``LakeSink``, as
    before) and with it in a child process (``LakeProcess``, what ``up`` and ``process`` run), alternated
    ``a.rounds`` times; the best of each. Commit interval ``a.cost_interval``: the lake commits during the
    run, as it does in a long one; the timed span ends when the last commit is in."""
    from fieldmesh.store.lakeproc import LakeProcess

    modes = ("none", "thread", "process")
    runs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    lake = LakeSettings(commit_interval_s=a.cost_interval)
    for k in range(a.rounds):
        for m in modes:
            hot = SqliteStore(f"sqlite:///{tmp / f'cost-{k}-{m}.db'}")
            sink: Any = None
            if m == "thread":
                sink = LakeSink(settings=lake, data_dir=tmp / f"cost-{k}-{m}")
            elif m == "process":
                sink = LakeProcess(settings=lake, data_dir=tmp / f"cost-{k}-{m}")
            views = [] if sink is None else (sink.views() if m == "process" else [sink])
            runs[m].append(_apply(records, hot, views, sink))
            hot.close()
    best = {m: min(runs[m], key=lambda r: r[1]) for m in modes}
    _, w_off, c_off = best["none"]
    print(f"3. sink cost (commit interval {a.cost_interval:g}s, best of {a.rounds} alternated rounds, load "
          f"{_load()}): without the lake {n / w_off:,.0f} readings/s ({w_off:.2f}s, CPU {c_off:.2f}s)")
    for m in ("thread", "process"):
        applied, w, c = best[m]
        print(f"   lake sink in the processor's {'thread' if m == 'thread' else 'child process'}: "
              f"{n / w:,.0f} readings/s to the last commit ({w:.2f}s; all applied at {applied:.2f}s), processor "
              f"CPU {c:.2f}s: throughput {w_off / w:.2f} of without (cost {100 * (1 - w_off / w):.0f}%), "
              f"to all applied {w_off / applied:.2f} (cost {100 * (1 - w_off / applied):.0f}%)")


def _load() -> str:
    import os

    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def day_of_readings(rows: int, devices: int, day_start_ms: int, schema: Any) -> Any:
    """``rows`` readings of ``devices`` devices spread evenly over one day, in time order, as rows of ``readings``
    (three metrics each), built as columns."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(5)
    ts = np.sort(rng.integers(day_start_ms, day_start_ms + 86_400_000, rows))
    dev = rng.integers(0, devices, rows)
    names = np.array([f"dev-{i:05d}" for i in range(devices)], dtype=object)
    vals = np.round(rng.normal(20, 5, (rows, 3)), 3)
    offsets = pa.array(np.arange(0, 3 * rows + 1, 3, dtype=np.int32))
    keys = pa.array(np.tile(np.array(["t", "h", "v"], dtype=object), rows), pa.large_string())
    measurements = pa.MapArray.from_arrays(offsets, keys, pa.array(vals.ravel(), pa.float64()))
    as_text = [pc.cast(pa.array(vals[:, i]), pa.string()) for i in range(3)]
    mjson = pc.binary_join_element_wise('{"t":', as_text[0], ',"h":', as_text[1], ',"v":', as_text[2], "}", "")
    stamp = pa.array(ts * 1000, pa.timestamp("us", tz="UTC"))
    nulls = pa.nulls(rows, pa.large_string())
    cols = [pa.array(names[dev], pa.large_string()), stamp, stamp, pa.array(rng.integers(0, 2**62, rows)),
            pa.array(np.arange(rows)), nulls, nulls, measurements, mjson, nulls, nulls,
            pa.array(np.zeros(rows, dtype=bool))]
    return pa.Table.from_arrays([c.cast(f.type) for c, f in zip(cols, schema, strict=True)], schema=schema)


def _files_per_partition(table: Any) -> list[int]:
    counts: dict[Any, int] = {}
    for task in table.scan().plan_files():
        key = tuple(task.file.partition)
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts.values())


def report_day(tmp: Path, a: Any) -> None:
    """Part 4: one simulated day of commits into ``readings``, files per partition without and with compaction."""
    from fieldmesh.store.lake import _append, compact

    s = LakeSettings(commit_interval_s=3600)
    sink = LakeSink(settings=s, data_dir=tmp)  # creates the tables as the sink does
    sink.close()
    catalog = open_catalog(s, tmp)
    table = catalog.load_table(f"{s.namespace}.readings")
    day_start = (int(time.time() * 1000) // 86_400_000 - 2) * 86_400_000
    t0 = time.perf_counter()
    data = day_of_readings(a.day_rows, a.day_devices, day_start, table.schema().as_arrow())
    gen_s = time.perf_counter() - t0
    minute = np.asarray(data.column("ts").cast("int64").to_numpy()) // 1000
    bounds = np.searchsorted(minute, day_start + np.arange(a.day_commits + 1) * (86_400_000 // a.day_commits))
    bounds[-1] = data.num_rows
    t0 = time.perf_counter()
    for i in range(a.day_commits):
        _append(table, data.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i])), _props(i + 1, {}))
        table = catalog.load_table(f"{s.namespace}.readings")
    day_s = time.perf_counter() - t0
    before = _files_per_partition(table)
    t0 = time.perf_counter()
    out = compact(catalog, s.namespace, tables=["readings"], target_file_mb=s.target_file_mb)
    compact_s = time.perf_counter() - t0
    after = _files_per_partition(catalog.load_table(f"{s.namespace}.readings"))
    base = catalog.create_table(f"{s.namespace}.baseline", schema=table.schema(), partition_spec=table.spec())
    t0 = time.perf_counter()
    _append(base, data, _props(1, {}))
    one_s = time.perf_counter() - t0
    scaled = "" if (a.day_rows, a.day_commits) == (10_000_000, 1440) else (
        f" [scaled down: the issue's figure is 10,000,000 rows in 1,440 commits; this run {a.day_rows:,} rows in "
        f"{a.day_commits:,} commits]")
    print(f"4. one simulated day: {a.day_rows:,} readings of {a.day_devices} devices in {a.day_commits} commits "
          f"({day_s:.1f}s; data built in {gen_s:.1f}s){scaled}")
    print(f"   files per partition (day x device bucket, {len(before)} partitions): without compaction mean "
          f"{sum(before) / len(before):.0f}, max {before[-1]}; with compaction mean {sum(after) / len(after):.1f}, "
          f"max {after[-1]} (ratio {sum(before) / max(1, sum(after)):.0f}x fewer files)")
    print(f"   compaction of {a.day_rows:,} rows: {compact_s:.1f}s ({out[f'{s.namespace}.readings']['partitions']} "
          f"partitions rewritten); baseline, one append of the same rows to an empty table: {one_s:.1f}s "
          f"(compaction/baseline {compact_s / one_s:.1f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--per-device", type=int, default=500)
    ap.add_argument("--latency-s", type=float, default=130.0)
    ap.add_argument("--interval", type=float, default=60.0, help="commit interval of parts 2 and 3")
    ap.add_argument("--quick", action="store_true", help="small stream, 5 s interval, 20 s latency run")
    ap.add_argument("--parts", default="1,2,3", help="which measurements to run, e.g. 1,3")
    ap.add_argument("--append-rounds", type=int, default=3, help="part 1: rounds, each into a fresh sink (the "
                    "first is cold)")
    ap.add_argument("--rounds", type=int, default=3, help="alternated runs of part 3 (the best of each)")
    ap.add_argument("--sink-cost", action="store_true", help="part 3 only: the processor without the lake, with the "
                    "lake sink in its thread and in a child process, alternated")
    ap.add_argument("--cost-interval", type=float, default=2.0, help="part 3: commit interval (s); shorter than "
                    "the run so that the lake commits while the processor works")
    ap.add_argument("--day-rows", type=int, default=10_000_000, help="part 4: readings in the simulated day")
    ap.add_argument("--day-commits", type=int, default=1440, help="part 4: commits over the day (default policy: "
                    "one a minute)")
    ap.add_argument("--day-devices", type=int, default=2000, help="part 4: devices")
    a = ap.parse_args()
    if a.quick:
        a.devices, a.per_device, a.latency_s, a.interval = 200, 300, 20.0, 5.0
    if a.sink_cost:
        a.parts = "3"
    parts = set(a.parts.split(","))
    if parts == {"4"}:
        with tempfile.TemporaryDirectory() as d:
            report_day(Path(d), a)
        return
    msgs, _, now_ms = make_stream(devices=a.devices, per_device=a.per_device)
    records = make_records(msgs, now_ms, 2)
    n = a.devices * a.per_device
    print(f"stream: {a.devices} devices x {a.per_device} readings, {len(records)} bus records")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "1" in parts:
            cap = _Capture()
            hot = SqliteStore(f"sqlite:///{tmp / 'cap.db'}")
            _apply(records, hot, [cap])
            hot.close()
            report_append([append_rate(cap.results, tmp / f"append{i}") for i in range(a.append_rounds)])
        if "2" in parts:
            report_latency(records, tmp, a)
        if "3" in parts:
            report_cost(records, tmp, a, n)
        if "4" in parts:
            report_day(tmp / "day", a)


if __name__ == "__main__":
    main()
