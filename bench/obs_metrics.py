"""Cost of the stage metrics on the processor's hot path, both sides in one run, as ratios.

1. **Processor throughput, metrics on vs off**: the processor benchmark's realistic stream
   (bench/processor.py: duplicates, late and out-of-order readings, 3 metrics a reading, 100 readings a
   message) applied with ``Processor.apply_records`` on a SQLite store, in prometheus-client's multiprocess
   mode as the workers of ``fieldmesh up`` run (every increment a write to a memory-mapped file). Baseline:
   the same with the metric calls replaced by no-ops. Runs alternate (off, on, off, on, ...) and the
   median of each side is compared. Target: the metrics cost <= 2% of the processor's CPU.
2. **Per-reading latency histograms**: ``observe_many`` (one ``searchsorted``, one increment per bucket)
   against the baseline of ``Histogram.observe`` per reading, for a batch of 2,000 readings.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/obs_metrics.py [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# multiprocess mode must be chosen before prometheus_client is imported, as in the workers of `up`
_MP = tempfile.mkdtemp(prefix="fm-bench-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _MP

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from processor import make_records, make_stream  # noqa: E402

import fieldmesh.stream.processor as processor_mod  # noqa: E402
from fieldmesh.core.settings import ProcessorSettings  # noqa: E402
from fieldmesh.obs.metrics import EVENT_TO_STORED, observe_many  # noqa: E402
from fieldmesh.store.sqlite import SqliteStore  # noqa: E402


class _Off:
    def observe(self, *_: Any) -> None:
        pass


_SPENT = [0.0]  # CPU seconds inside the metric calls of the runs with metrics


def _timed(fn: Any) -> Any:
    def run(*args: Any, **kw: Any) -> Any:
        c0 = time.process_time()
        try:
            return fn(*args, **kw)
        finally:
            _SPENT[0] += time.process_time() - c0

    return run


class _TimedObserve:
    def __init__(self, hist: Any) -> None:
        self.observe = _timed(hist.observe)


def _run(records: list[Any], n: int, fetch_max: int, metrics: bool) -> float:
    saved = processor_mod._count_commit, processor_mod.PROCESSOR_APPLY_SECONDS
    if metrics:
        processor_mod._count_commit = _timed(saved[0])  # type: ignore[assignment]
        processor_mod.PROCESSOR_APPLY_SECONDS = _TimedObserve(saved[1])  # type: ignore[assignment]
    else:
        processor_mod._count_commit = lambda *a, **k: None  # type: ignore[assignment]
        processor_mod.PROCESSOR_APPLY_SECONDS = _Off()  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory() as d:
            store = SqliteStore(f"sqlite:///{d}/hot.db")
            proc = processor_mod.Processor(bus=None, store=store,  # type: ignore[arg-type]
                                           settings=ProcessorSettings(fetch_max=fetch_max))
            c0 = time.process_time()
            for s in range(0, len(records), fetch_max):
                proc.apply_records(records[s:s + fetch_max])
            cpu = time.process_time() - c0
            store.close()
    finally:
        processor_mod._count_commit, processor_mod.PROCESSOR_APPLY_SECONDS = saved
    return n / cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a smaller stream and fewer rounds")
    ap.add_argument("--fetch-max", type=int, default=20)
    a = ap.parse_args()
    devices, per_device, rounds = (500, 200, 3) if a.quick else (2000, 200, 5)
    msgs, sent, now = make_stream(devices=devices, per_device=per_device)
    records = make_records(msgs, now, 1)
    n = len(sent)
    print(f"processor: {n:,} readings in {len(records):,} bus records, batches of {a.fetch_max} records, "
          f"multiprocess mode ({_MP})")
    off, on = [], []
    cpu_on = 0.0
    for _ in range(rounds):
        off.append(_run(records, n, a.fetch_max, metrics=False))
        on.append(_run(records, n, a.fetch_max, metrics=True))
        cpu_on += n / on[-1]
    m_off, m_on = statistics.median(off), statistics.median(on)
    print(f"  metrics off (baseline): {m_off:,.0f} readings/CPU-s (runs {', '.join(f'{x:,.0f}' for x in off)})")
    print(f"  metrics on:             {m_on:,.0f} readings/CPU-s (runs {', '.join(f'{x:,.0f}' for x in on)})")
    cost = 1 - m_on / m_off
    inside = _SPENT[0] / cpu_on
    print(f"  on / off = {m_on / m_off:.3f} (the difference of medians, noisy on a shared machine: {cost:.1%}); "
          f"CPU inside the metric calls, timed: {inside:.2%} of the processor's CPU "
          f"(target <= 2%: {'met' if inside <= 0.02 else 'NOT met'})")

    values = np.random.default_rng(1).exponential(0.5, 2000)
    reps = 50 if a.quick else 200
    t0 = time.perf_counter()
    for _ in range(reps):
        for v in values.tolist():
            EVENT_TO_STORED.observe(v)
    loop_s = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        observe_many(EVENT_TO_STORED, values)
    many_s = (time.perf_counter() - t0) / reps
    print(f"histogram of a 2,000-reading batch: Histogram.observe per reading (baseline) {loop_s * 1e3:.2f} ms, "
          f"observe_many {many_s * 1e3:.3f} ms: {loop_s / many_s:.0f}x faster")


if __name__ == "__main__":
    main()
