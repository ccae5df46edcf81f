"""Readings per second through stream/windows.py's WindowOperator.

The stream: ``--devices`` devices each reporting ``--metrics`` metrics every 10 s (event time), arriving
up to ``--disorder-ms`` out of order (within the allowed lateness, so nothing is late), cut into batches
of ``--batch`` readings. Cases, in one run: a hopping window (5 min size, 1 min hop) with every aggregate
(the figure), the same without the two stddevs (no sums of squares), a tumbling 1 min window with
every aggregate, and sessions with a 30 s gap (devices never pause, so each key has one growing session,
emitted by the final flush: the cost of folding batches into open sessions). Throughput is readings
(rows, each with ``--metrics`` values) per CPU second of ``process()`` + the final ``flush()``; building
the columns is not timed.

    PYTHONPATH=$PWD/src .venv/bin/python bench/windows.py [--readings 1000000] [--batch 10000] [--quick]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fieldmesh.core.batch import ReadingColumns
from fieldmesh.stream.windows import AGGREGATES, Hopping, Session, WindowOperator, WindowSpec, tumbling

T0 = 1_700_000_040_000


def stream(readings: int, devices: int, metrics: int, disorder_ms: int, batch: int,
           seed: int = 1) -> list[ReadingColumns]:
    rng = np.random.default_rng(seed)
    dev = np.arange(readings, dtype=np.int32) % devices
    tick = np.arange(readings, dtype=np.int64) // devices
    ts = T0 + tick * 10_000 + rng.integers(0, 1_000, readings) + dev.astype(np.int64) % 7
    arrival = np.argsort(ts + rng.integers(0, disorder_ms + 1, readings), kind="stable")
    dev, ts = dev[arrival], ts[arrival]
    names = tuple(f"dev-{i:05d}" for i in range(devices))
    metric_names = tuple(f"m{j}" for j in range(metrics))
    out = []
    for lo in range(0, readings, batch):
        d, t = dev[lo:lo + batch], ts[lo:lo + batch]
        n = len(d)
        i64 = np.zeros(n, dtype=np.int64)
        mj = np.empty(n, dtype=object)
        mj[:] = ""  # windows read the long format only
        m_row = np.repeat(np.arange(n, dtype=np.int32), metrics)
        m_metric = np.tile(np.arange(metrics, dtype=np.int32), n)
        m_value = 20.0 + 5.0 * np.sin(t[m_row] / 600_000.0 + m_metric) + rng.standard_normal(n * metrics)
        out.append(ReadingColumns(
            names, d, t, t, np.arange(lo, lo + n, dtype=np.int64), i64, np.full(n, -1, np.int64), (),
            np.full(n, -1, np.int32), None, None, None, mj, metric_names, m_row, m_metric, m_value,
        ))
    return out


def measure(spec: WindowSpec, aggregates: tuple[str, ...], batches: list[ReadingColumns],
            lateness_ms: int) -> tuple[float, float, int, int]:
    op = WindowOperator(spec, aggregates, allowed_lateness_ms=lateness_ms)
    windows = late = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for b in batches:
        out = op.process(b)
        windows += len(out)
        late += out.late
    windows += len(op.flush())
    return time.process_time() - cpu0, time.perf_counter() - wall0, windows, late


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readings", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--devices", type=int, default=2_000)
    ap.add_argument("--metrics", type=int, default=2)
    ap.add_argument("--disorder-ms", type=int, default=5_000)
    ap.add_argument("--quick", action="store_true", help="100k readings (a smoke run)")
    a = ap.parse_args()
    n = 100_000 if a.quick else a.readings
    batches = stream(n, a.devices, a.metrics, a.disorder_ms, a.batch)
    no_sq = tuple(x for x in AGGREGATES if not x.startswith("stddev"))
    cases: list[tuple[str, WindowSpec, tuple[str, ...]]] = [
        ("hopping 5m/1m, all aggregates", Hopping(300_000, 60_000), AGGREGATES),
        ("hopping 5m/1m, no stddev", Hopping(300_000, 60_000), no_sq),
        ("tumbling 1m, all aggregates", tumbling(60_000), AGGREGATES),
        ("session 30s gap, all aggregates", Session(30_000), AGGREGATES),  # one open session per key
    ]
    print(f"{n:,} readings x {a.metrics} metrics, {a.devices:,} devices, batches of {a.batch:,}, "
          f"disorder <= {a.disorder_ms} ms (allowed lateness {a.disorder_ms} ms)")
    base = None
    for name, spec, aggs in cases:
        cpu, wall, windows, late = measure(spec, aggs, batches, a.disorder_ms)
        rate = n / cpu
        base = base or rate
        print(f"  {name:32s} {rate:>12,.0f} readings/CPU-s  ({wall:.2f} s wall, {windows:,} windows, "
              f"{late} late, x{rate / base:.2f} of the first)")


if __name__ == "__main__":
    main()
