"""Data-product quality benchmark: the processor's cost of counting products, both sides in one run.

The processor benchmark's realistic stream (bench/processor.py: 5% duplicates, 3% an hour late, disorder;
3 metrics a reading, 100 readings a message) from 10,000 devices, applied with ``Processor.apply_records``
on a SQLite store, once without products (the baseline) and once with 5 products counted in each batch's
transaction (globs over the fleet, one taking every device, each with 3 metrics with ranges and drift
histograms, 1-minute windows). Timed in CPU seconds of this process (and wall). Printed as the ratio of
throughput with products to without; target: >= 0.8 (cost <= 20%, as for alert rules).

``--canary`` adds a third run: the 5 products and a canary (docs/canary.md) routing a 10 % hash share of
the fleet to ``canary_readings``, both sides counted; printed as its ratio to the run with products only.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/products.py [--quick] [--canary]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from processor import make_records, make_stream  # noqa: E402

from fieldmesh.bus.base import BusRecord  # noqa: E402
from fieldmesh.core.settings import ProcessorSettings  # noqa: E402
from fieldmesh.store.products import ProductTables  # noqa: E402
from fieldmesh.store.sqlite import SqliteStore  # noqa: E402
from fieldmesh.stream.processor import Processor  # noqa: E402
from fieldmesh.stream.products import ProductEngine  # noqa: E402
from fieldmesh.stream.quality import parse_product  # noqa: E402

METRICS = {"temperature": {"min": -20, "max": 80, "bins": 10}, "humidity": {"min": 0, "max": 100, "bins": 10},
           "pressure": {"min": 900, "max": 1100, "bins": 10}}
PRODUCTS = [
    {"name": "all", "expected_interval_s": 1, "metrics": METRICS,
     "slo": {"completeness": 0.99, "null_rate": 0.01, "drift_psi": 0.25}},
    *({"name": f"fleet-{i}", "devices": {"globs": [f"*{i}"]}, "expected_interval_s": 1, "metrics": METRICS,
       "slo": {"null_rate": 0.01}} for i in range(4)),
]


def throughput(records: list[BusRecord], n: int, products: bool, fetch_max: int, canary: bool = False
               ) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        url = f"sqlite:///{d}/hot.db"
        store = SqliteStore(url)
        engine = None
        if products:
            t = ProductTables(url)
            t.apply([parse_product(p) for p in PRODUCTS], actor="bench", source="bench")
            t.close()
            if canary:
                from fieldmesh.store.canary import CanaryTables
                from fieldmesh.stream.canary import parse_canary

                ct = CanaryTables(url)
                ct.create(parse_canary({"name": "bench", "product": "all", "share_percent": 10}), actor="bench")
                ct.close()
            engine = ProductEngine(store)
        proc = Processor(bus=None, store=store, settings=ProcessorSettings(fetch_max=fetch_max),  # type: ignore[arg-type]
                         products=engine)
        c0, w0 = time.process_time(), time.perf_counter()
        for s in range(0, len(records), fetch_max):
            proc.apply_records(records[s:s + fetch_max])
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        store.close()
    return {"per_cpu_s": n / cpu, "per_wall_s": n / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer readings (a smoke run)")
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--canary", action="store_true", help="also run with a 10 %% canary routed apart")
    args = ap.parse_args()
    msgs, sent, now = make_stream(devices=args.devices, per_device=10 if args.quick else 30)
    records = make_records(msgs, now, 2)
    n = len(sent)
    print(f"{args.devices} devices, {n} readings ({len(records)} bus records), 5 products, SQLite")
    base = throughput(records, n, products=False, fetch_max=256)
    with_p = throughput(records, n, products=True, fetch_max=256)
    ratio = with_p["per_cpu_s"] / base["per_cpu_s"]
    print(f"  baseline, no products: {base['per_cpu_s']:,.0f} readings/CPU-s ({base['per_wall_s']:,.0f}/wall-s)")
    print(f"  with 5 products:       {with_p['per_cpu_s']:,.0f} readings/CPU-s ({with_p['per_wall_s']:,.0f}/wall-s)")
    print(f"  throughput with/without: {ratio:.2f} (cost {1 - ratio:.0%}; target cost <= 20%: "
          f"{'met' if 1 - ratio <= 0.20 else 'NOT met'})")
    if args.canary:
        with_c = throughput(records, n, products=True, fetch_max=256, canary=True)
        print(f"  with 5 products and a 10% canary: {with_c['per_cpu_s']:,.0f} readings/CPU-s "
              f"({with_c['per_wall_s']:,.0f}/wall-s); to products only: "
              f"{with_c['per_cpu_s'] / with_p['per_cpu_s']:.2f}, to the baseline: "
              f"{with_c['per_cpu_s'] / base['per_cpu_s']:.2f}")


if __name__ == "__main__":
    main()
