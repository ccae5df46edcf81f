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

4. **One simulated day through the sink, files per partition, and compaction**: ``--day-rows`` readings
   (default 10,000,000, as the issue asks) of ``--day-devices`` devices spread over one UTC day, and their
   exact 1m and 1h window deltas, go through the sink's own commit path in ``--day-commits`` flushes in time
   order (default 1,440: the default policy's one a minute; each flush commits ``readings``, merges the
   rollups into ``rollup_1m`` and ``rollup_1h`` and commits ``dead_letters``, empty), and once a simulated hour
   the sink's maintenance runs (:meth:`LakeSink.maintain`: expire snapshots older than
   ``snapshot_max_age_s`` of simulated time, mapped to the wall clock of the commits; compact partitions
   closed before the simulated day, i.e. none), as inside ``up``. The first maintenance after the simulated
   midnight compacts the day. Reported: the day's wall time, flush time in the first and the last hour,
   snapshots and manifests at the end, data files per partition without and with compaction, that
   maintenance's time beside the baseline of one append of the same rows, and peak RSS (``--day-hourly``: a
   line per simulated hour). Scaled down with ``--day-rows``/``--day-commits`` (the output says what ran).

5. **The child under a backlog** (``--parts 5``): the committed results of part 1's run, written again and
   again (their positions moved on each round) into a :class:`~fieldmesh.store.lakeproc.LakeProcess` as fast
   as it takes them, as a processor draining a backlog does, until ``--backlog-readings`` (5,000,000) readings;
   then the sink closes (its last commit). Reported: readings per second until the last commit, commits, and
   the child's peak memory (its private pages, from ``/proc/<pid>/smaps_rollup`` every 50 ms), with the lake's
   settings from ``FIELDMESH__LAKE__*`` (so that a bound such as ``FIELDMESH__LAKE__COMMIT_BYTES`` can be
   compared). The child is forked before the stream is built, as a processor forks it before its first batch.

6. **A flush as the tables' history grows** (``--parts 6``): one sink, flushed after every two of part 1's
   results (their positions moved on each time) ``--history-flushes`` times (120); the CPU of each flush (all
   four tables: readings appended, both rollups merged and replaced, dead letters) averaged per block of 20
   flushes, beside the snapshots the rollup tables then hold (two a flush: pyiceberg's overwrite is a delete and
   an append). Baseline: the first block. Each snapshot is kept ``snapshot_max_age_s`` (an hour): in a backlog
   (a flush every few seconds) a table holds hundreds, and a flush must not cost more for it.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/lake.py [--devices 2000] [--per-device 500]
[--latency-s 130] [--interval 60] [--quick] [--append-rounds 3] [--parts 1,2,3,4] [--sink-cost]
[--day-rows N] [--day-commits N] [--day-max-age-s S] [--day-hourly] [--backlog-readings N]
[--history-flushes N]``.
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
    _append,
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
    # one flush of everything, timed here: no bound may make the commit thread start one of its own
    sink = LakeSink(settings=LakeSettings(commit_interval_s=3600, commit_rows=10**9, commit_bytes=2**40), data_dir=tmp)
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


def backlog_memory(sink: Any, settings: LakeSettings, results: list[BatchResult], *, readings: int,
                   ) -> dict[str, Any]:
    """Part 5: ``results`` written into the lake child ``sink`` (a :class:`LakeProcess` started before the
    stream was built, as a processor starts its child before its first batch) as fast as it takes them, round
    after round with their positions moved on, until ``readings`` readings; the child's peak memory, sampled
    every 50 ms."""
    import dataclasses

    rollup = Path(f"/proc/{sink._proc.pid}/smaps_rollup")

    def private() -> int:
        """The child's own pages (a forked child's RSS also counts the pages it still shares with its parent)."""
        fields = dict(line.split(":", 1) for line in rollup.read_text().splitlines()[1:])
        return sum(int(fields[k].split()[0]) * 1024 for k in ("Private_Clean", "Private_Dirty"))

    start = private()
    peak = [start]  # the highest sample so far
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            try:
                peak[0] = max(peak[0], private())
            except OSError:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    views = sink.views()
    per_round = sum(len(r.new) for r in results)
    step = 1 + max(o for r in results for o in r.positions.values())
    written = 0
    t0 = time.perf_counter()
    k = 0
    while written < readings:
        for r in results:
            moved = dataclasses.replace(r, positions={p: o + k * step for p, o in r.positions.items()})
            for v in views:
                v.write(moved)
        written += per_round
        k += 1
    applied = time.perf_counter() - t0
    stats = sink.stats()
    sink.close()
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    return {"readings": written, "rounds": k, "applied_s": applied, "wall_s": wall, "peak_mb": peak[0] / 1e6,
            "start_mb": start / 1e6, "commits": stats.get("commits"), "commit_rows": settings.commit_rows,
            "commit_bytes": settings.commit_bytes}


def start_backlog_child(tmp: Path) -> tuple[Any, LakeSettings]:
    """Part 5's lake child, forked while this process is still small (before the stream is built), with the
    lake settings of ``FIELDMESH__LAKE__*``; and those settings."""
    from fieldmesh.core.settings import load_settings
    from fieldmesh.store.lakeproc import LakeProcess

    settings = load_settings().lake
    return LakeProcess(settings=settings, data_dir=tmp), settings


def report_backlog(backlog: tuple[Any, LakeSettings], results: list[BatchResult], a: Any) -> None:
    b = backlog_memory(*backlog, results, readings=a.backlog_readings)
    print(f"5. lake child under a backlog (commit_rows {b['commit_rows']:,}, commit_bytes {b['commit_bytes']:,}): "
          f"{b['readings']:,} readings in {len(results)} results x {b['rounds']} rounds, handed over in "
          f"{b['applied_s']:.1f}s, last commit in at {b['wall_s']:.1f}s ({b['readings'] / b['wall_s']:,.0f} "
          f"readings/s; {b['commits']} commits before the close); the child's own memory (private pages) "
          f"{b['start_mb']:.0f} MB at the start, peak {b['peak_mb']:.0f} MB")


def history_cost(results: list[BatchResult], tmp: Path, *, flushes: int, block: int = 20) -> list[dict[str, Any]]:
    """Part 6: ``flushes`` flushes of one sink, two results each (positions moved on); per block of ``block``
    flushes, the mean CPU of a flush and the snapshots of ``rollup_1m`` and ``readings`` after it."""
    import dataclasses

    sink = LakeSink(settings=LakeSettings(commit_interval_s=3600, commit_rows=10**9, commit_bytes=2**40),
                    data_dir=tmp)
    step = 1 + max(o for r in results for o in r.positions.values())
    blocks: list[dict[str, Any]] = []
    cpu: list[float] = []
    k = 0
    for f in range(flushes):
        for r in (results[(2 * f) % len(results)], results[(2 * f + 1) % len(results)]):
            k += 1
            sink.write(dataclasses.replace(r, positions={p: o + k * step for p, o in r.positions.items()}))
        c0 = time.process_time()
        sink.flush()
        cpu.append(time.process_time() - c0)
        if len(cpu) == block:
            held = {t: len(sink._tables[t].metadata.snapshots) for t in ("rollup_1m", "readings")}
            blocks.append({"first": f + 1 - block, "last": f, "cpu_s": sum(cpu) / block, "snapshots": held})
            cpu.clear()
    sink.close()
    return blocks


def report_history(results: list[BatchResult], tmp: Path, a: Any) -> None:
    blocks = history_cost(results, tmp, flushes=a.history_flushes)
    base = blocks[0]["cpu_s"]
    for b in blocks:
        print(f"6. flushes {b['first']}-{b['last']}: {b['cpu_s']:.3f} CPU-s a flush ({b['cpu_s'] / base:.2f}x the "
              f"first block), then {b['snapshots']['rollup_1m']} snapshots in each rollup table, "
              f"{b['snapshots']['readings']} in readings")


def _load() -> str:
    import os

    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def day_of_readings(rows: int, devices: int, day_start_ms: int, schema: Any) -> Any:
    """``rows`` readings of ``devices`` devices spread evenly over one day, in time order, as rows of ``readings``
    (three metrics each, values multiples of 1/4 so that their rollups' exact sums are integers x 2^-2), built
    as columns."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(5)
    ts = np.sort(rng.integers(day_start_ms, day_start_ms + 86_400_000, rows))
    dev = rng.integers(0, devices, rows)
    names = np.array([f"dev-{i:05d}" for i in range(devices)], dtype=object)
    vals = np.round(rng.normal(20, 5, (rows, 3)) * 4) / 4
    offsets = pa.array(np.arange(0, 3 * rows + 1, 3, dtype=np.int32))
    keys = pa.array(np.tile(np.array(list(_METRICS), dtype=object), rows), pa.large_string())
    measurements = pa.MapArray.from_arrays(offsets, keys, pa.array(vals.ravel(), pa.float64()))
    as_text = [pc.cast(pa.array(vals[:, i]), pa.string()) for i in range(3)]
    mjson = pc.binary_join_element_wise('{"t":', as_text[0], ',"h":', as_text[1], ',"v":', as_text[2], "}", "")
    stamp = pa.array(ts * 1000, pa.timestamp("us", tz="UTC"))
    nulls = pa.nulls(rows, pa.large_string())
    cols = [pa.array(names[dev], pa.large_string()), stamp, stamp, pa.array(rng.integers(0, 2**62, rows)),
            pa.array(np.arange(rows)), nulls, nulls, measurements, mjson, nulls, nulls,
            pa.array(np.zeros(rows, dtype=bool))]
    return pa.Table.from_arrays([c.cast(f.type) for c, f in zip(cols, schema, strict=True)], schema=schema)


_METRICS = ("t", "h", "v")


def window_deltas(part: Any, interval: str, width_ms: int) -> Any:
    """The exact window deltas of readings rows ``part`` (of :func:`day_of_readings`) for one interval, as the
    processor hands them to a sink: one entry per (device, metric, window), sorted so."""
    import pyarrow as pa

    from fieldmesh.core.batch import WindowDeltas

    dev = np.asarray(part.column("device_id").to_numpy(zero_copy_only=False), dtype=object)
    ws = np.asarray(part.column("ts").cast("int64").to_numpy()) // 1000
    ws -= ws % width_ms
    m = part.column("measurements").combine_chunks()
    vals = np.asarray(pa.ListArray.from_arrays(m.offsets, m.items).flatten()).reshape(-1, 3)
    names, dev_i = np.unique(dev, return_inverse=True)
    wins, win_i = np.unique(ws, return_inverse=True)
    out = []
    for k in range(len(_METRICS)):
        key = (dev_i.astype(np.int64) * len(wins) + win_i) * 3 + k
        groups, g = np.unique(key, return_inverse=True)
        v = vals[:, k]
        quarters = np.rint(v * 4).astype(np.int64)
        lo = np.full(len(groups), np.inf)
        np.minimum.at(lo, g, v)
        hi = np.full(len(groups), -np.inf)
        np.maximum.at(hi, g, v)
        out.append((groups, np.bincount(g), np.bincount(g, weights=quarters).astype(np.int64), lo, hi))
    groups = np.concatenate([o[0] for o in out])
    order = np.argsort(groups, kind="stable")  # by device, window, metric
    gk = groups[order]
    w_i, m_i = (gk // 3) % len(wins), gk % 3
    d_i = gk // 3 // len(wins)
    order2 = np.lexsort((wins[w_i], m_i, d_i))  # by device, metric, window
    pick = order[order2]

    def cat(j: int) -> Any:
        return np.concatenate([o[j] for o in out])[pick]

    sums = np.empty(len(pick), dtype=object)
    sums[:] = cat(2).tolist()
    return WindowDeltas(interval=interval, width_ms=width_ms, device=names[d_i[order2]].astype(object),
                        metric=np.array(_METRICS, dtype=object)[m_i[order2]], window_start_ms=wins[w_i[order2]],
                        count=cat(1).astype(np.int64), sum_m=sums, sum_e=np.full(len(pick), -2, np.int64),
                        min=cat(3), max=cat(4))


def _files_per_partition(table: Any) -> list[int]:
    counts: dict[Any, int] = {}
    for task in table.scan().plan_files():
        key = tuple(task.file.partition)
        counts[key] = counts.get(key, 0) + 1
    return sorted(counts.values())


def _stats(xs: list[float]) -> str:
    v = sorted(xs)
    return f"mean {sum(v) / len(v):.2f}s, p50 {v[len(v) // 2]:.2f}s, max {v[-1]:.2f}s"


def report_day(tmp: Path, a: Any) -> None:
    """Part 4: one simulated day through the sink's commits, with its maintenance on the simulated clock; files
    per partition without and with compaction."""
    import resource

    s = LakeSettings(maintenance_interval_s=0)  # the bench runs the maintenance itself, on the simulated clock
    if a.day_max_age_s is not None:
        s = s.model_copy(update={"snapshot_max_age_s": a.day_max_age_s})
    sink = LakeSink(settings=s, data_dir=tmp)
    catalog = sink.catalog
    day_start = (int(time.time() * 1000) // 86_400_000 - 2) * 86_400_000
    t0 = time.perf_counter()
    data = day_of_readings(a.day_rows, a.day_devices, day_start, sink._arrow["readings"])
    gen_s = time.perf_counter() - t0
    sim_ms = 86_400_000 // a.day_commits  # simulated time between commits
    minute = np.asarray(data.column("ts").cast("int64").to_numpy()) // 1000
    bounds = np.searchsorted(minute, day_start + np.arange(a.day_commits + 1) * sim_ms)
    bounds[-1] = data.num_rows
    hourly = max(1, 3_600_000 // sim_ms)  # commits per simulated maintenance interval (an hour)
    back = int(s.snapshot_max_age_s * 1000 // sim_ms)  # commits within the snapshots' max age
    walls: list[float] = []  # wall clock of each commit, to map the simulated snapshot age to wall time
    commit_s: list[float] = []
    maint_s: list[float] = []
    expired = 0
    t0 = time.perf_counter()
    for i in range(a.day_commits):
        part = data.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i]))
        with sink._cond:  # what the commit thread does when the interval is up: take the buffer and commit it
            buf = sink._take()
        buf.arrow["readings"] = part
        for interval, width in (("1m", 60_000), ("1h", 3_600_000)):
            buf.rollups[f"rollup_{interval}"].append(window_deltas(part, interval, width))
        for t in POSITIONED:
            buf.positions[t][("day.readings", 0)] = i
        t1 = time.perf_counter()
        sink._commit(buf)
        commit_s.append(time.perf_counter() - t1)
        walls.append(time.time())
        if (i + 1) % hourly == 0 and i + 1 < a.day_commits:  # the sink's maintenance, once a simulated hour
            older_than = time.time() - walls[i - back] if i >= back else 1e12
            t1 = time.perf_counter()
            ex, _ = sink.maintain(older_than_s=older_than, closed_before_ms=day_start)
            maint_s.append(time.perf_counter() - t1)
            expired += sum(ex.values())
            if a.day_hourly:
                n = len(sink._tables["readings"].metadata.snapshots)
                print(f"   hour {(i + 1) // hourly:2d}: flushes {_stats(commit_s[-hourly:])}; maintenance "
                      f"{maint_s[-1]:.1f}s; readings snapshots after it {n}; load {_load()}", flush=True)
    day_s = time.perf_counter() - t0
    readings = catalog.load_table(f"{s.namespace}.readings")
    snaps = {t: len(catalog.load_table(f"{s.namespace}.{t}").metadata.snapshots) for t in POSITIONED}
    manifests = len(readings.current_snapshot().manifests(readings.io))
    before = _files_per_partition(readings)
    rollup_before = _files_per_partition(catalog.load_table(f"{s.namespace}.rollup_1m"))
    t0 = time.perf_counter()
    _, out = sink.maintain(older_than_s=time.time() - walls[-1 - min(len(walls) - 1, back)],
                           closed_before_ms=day_start + 86_400_000)  # the first maintenance after midnight
    compact_s = time.perf_counter() - t0
    after = _files_per_partition(catalog.load_table(f"{s.namespace}.readings"))
    sink.close()
    table = catalog.load_table(f"{s.namespace}.readings")
    base = catalog.create_table(f"{s.namespace}.baseline", schema=table.schema(), partition_spec=table.spec())
    t0 = time.perf_counter()
    _append(base, data, _props(1, {}))
    one_s = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scaled = "" if (a.day_rows, a.day_commits) == (10_000_000, 1440) else (
        f" [scaled down: the issue's figure is 10,000,000 rows in 1,440 commits; this run {a.day_rows:,} rows in "
        f"{a.day_commits:,} commits]")
    print(f"4. one simulated day through the sink (load {_load()}): {a.day_rows:,} readings of {a.day_devices} "
          f"devices and their 1m/1h rollup deltas in {a.day_commits} flushes (each commits readings, rollup_1m, "
          f"rollup_1h, dead_letters){scaled}; the sink's maintenance once a simulated hour (expire snapshots "
          f"older than {s.snapshot_max_age_s:g} simulated s, compact partitions closed before the day: none)")
    print(f"   day {day_s:.1f}s wall (data built in {gen_s:.1f}s before); flush first hour "
          f"{_stats(commit_s[:hourly])}, last hour {_stats(commit_s[-hourly:])}; maintenance {len(maint_s)} rounds, "
          f"{_stats(maint_s or [0.0])}, {expired} snapshots expired; at the end snapshots {snaps}, readings "
          f"manifests {manifests}")
    print(f"   files per partition, readings (day x device bucket, {len(before)} partitions): without compaction "
          f"mean {sum(before) / len(before):.0f}, max {before[-1]}; after the first maintenance past midnight "
          f"mean {sum(after) / len(after):.1f}, max {after[-1]} ({sum(before) / max(1, sum(after)):.0f}x fewer "
          f"files); rollup_1m {rollup_before} file(s) per partition before")
    rewritten = {k.split(".")[-1]: v["partitions"] for k, v in out.items() if v["partitions"]}
    print(f"   that maintenance (expire + compaction of {a.day_rows:,} readings and the day's rollups): "
          f"{compact_s:.1f}s ({rewritten} partitions rewritten); baseline, one append of the same readings to an "
          f"empty table: {one_s:.1f}s (ratio {compact_s / one_s:.1f}x); "
          f"peak RSS {peak_mb:,.0f} MB")


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
    ap.add_argument("--day-hourly", action="store_true", help="part 4: a line per simulated hour")
    ap.add_argument("--day-max-age-s", type=float, default=None, help="part 4: snapshot_max_age_s of the sink's "
                    "maintenance, in simulated seconds (default: the setting's default)")
    ap.add_argument("--backlog-readings", type=int, default=5_000_000, help="part 5: readings written")
    ap.add_argument("--history-flushes", type=int, default=120, help="part 6: flushes (20 a block)")
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
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        backlog = start_backlog_child(tmp / "backlog") if "5" in parts else None
        msgs, _, now_ms = make_stream(devices=a.devices, per_device=a.per_device)
        records = make_records(msgs, now_ms, 2)
        n = a.devices * a.per_device
        print(f"stream: {a.devices} devices x {a.per_device} readings, {len(records)} bus records")
        if parts & {"1", "5", "6"}:
            cap = _Capture()
            hot = SqliteStore(f"sqlite:///{tmp / 'cap.db'}")
            _apply(records, hot, [cap])
            hot.close()
        if "1" in parts:
            report_append([append_rate(cap.results, tmp / f"append{i}") for i in range(a.append_rounds)])
        if "2" in parts:
            report_latency(records, tmp, a)
        if "3" in parts:
            report_cost(records, tmp, a, n)
        if "4" in parts:
            report_day(tmp / "day", a)
        if backlog is not None:
            report_backlog(backlog, cap.results, a)
        if "6" in parts:
            report_history(cap.results, tmp / "history", a)


if __name__ == "__main__":
    main()
