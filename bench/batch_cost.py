"""The processor's cost per batch at the small batches of a stream at part load, both sides in one run.

The shape of bench/alerts.py's latency part: 1,000 devices, 10 readings a bus record, one alert rule, each
record from a random device; ``Processor.apply_records`` on a SQLite store in this process, batch after batch
of ``--records`` records, event time one millisecond a record. Printed per side: CPU per batch (mean, p99,
max: the slowest batches are what an alert waits behind) and per reading. ``--base SRC`` runs the same on
another checkout's ``src`` (a subprocess each, alternated), so the two sides share the sitting.
``--without PARTS`` (a comma list of ``rollups``, ``devices``, ``gaps``, ``segments``) adds a side whose store
skips those writes of each batch (the rollup merges, the device rows, the seq ranges, the raw segments): what
they cost a small batch, the most that writing them less often could save. Not a working store (without the
segments no rollup row is flushed either: the rows are written up to the last segment).

``--transact-every K`` runs the alert rules' tick (a transaction of its own) after every K batches, as
``fieldmesh up`` runs its alert ticks and the notifier's claims between batches.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/batch_cost.py [--records 60] [--batches 1500] [--base DIR/src]
[--without rollups,devices,gaps] [--transact-every K]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def part_load(step_ms: int = 1) -> Iterator[tuple[Any, Any, Callable[[int], list[Any]]]]:
    """The alerts benchmark's latency shape in this process: ``(processor, store, batch)``, a processor with one
    alert rule on a SQLite store in a temporary directory, and ``batch(n)`` making the next ``n`` bus records
    (each 10 readings of a random one of 1,000 devices, event time ``step_ms`` later than the record before).
    Imports here: a side in a subprocess imports the checkout its ``PYTHONPATH`` names (``--base``)."""
    from fieldmesh.bus.base import BusRecord
    from fieldmesh.core.codec import decode_telemetry, encode_bus_batch, encode_reading_json
    from fieldmesh.core.model import BusBatch
    from fieldmesh.core.settings import ProcessorSettings
    from fieldmesh.core.topics import READINGS_TOPIC, partition_for
    from fieldmesh.store.alerts import AlertTables
    from fieldmesh.store.sqlite import SqliteStore
    from fieldmesh.stream.alerting import AlertEngine
    from fieldmesh.stream.alerts import parse_rule
    from fieldmesh.stream.processor import Processor

    rnd = random.Random(1)
    with tempfile.TemporaryDirectory() as d:
        url = f"sqlite:///{d}/hot.db"
        t = AlertTables(url)
        t.put_rule(parse_rule({"name": "hot", "kind": "threshold", "metric": "temperature", "op": ">",
                               "value": 30, "clear_value": 28}), actor="bench")
        t.close()
        store = SqliteStore(url)
        proc = Processor(bus=None, store=store, settings=ProcessorSettings(),  # type: ignore[arg-type]
                         alerts=AlertEngine(store))
        offsets: dict[int, int] = {}
        hot = [False] * 1000
        seq = 0
        now = int(time.time() * 1000) - 3_600_000 * step_ms  # room for 3.6 million records before the clock

        def record() -> BusRecord:
            nonlocal now, seq
            i = rnd.randrange(1000)
            dev = f"dev-{i:05d}"
            if rnd.random() < 0.05:
                hot[i] = not hot[i]
            now += step_ms
            rs = []
            for k in range(10):
                seq += 1
                v = rnd.uniform(31, 35) if hot[i] else rnd.uniform(20, 27)
                p = encode_reading_json(dev, now - 10 + k + 1, {"temperature": v}, seq)
                rs.extend(decode_telemetry(p, device_id=dev, topic=f"devices/{dev}/telemetry",
                                           received_ms=now).readings)
            part = partition_for(dev, 8)
            offsets[part] = offsets.get(part, 0) + 1
            return BusRecord(topic=READINGS_TOPIC, partition=part, offset=offsets[part],
                             value=encode_bus_batch(BusBatch(rs)))

        try:
            yield proc, store, lambda n: [record() for _ in range(n)]
        finally:
            store.close()


#: The store's writes ``--without`` can skip, each by the method of the store that makes it.
PARTS = ("rollups", "devices", "gaps", "segments")


def skip_writes(parts: set[str]) -> None:
    """Make this process's SQLite store skip ``parts`` (see ``--without``): a what-if, not a working store."""
    from fieldmesh.store import sqlite

    if "rollups" in parts:
        sqlite.SqliteStore._merge_rollups = lambda self, w, interval, wd: None  # type: ignore[method-assign]
    if "devices" in parts:
        sqlite.SqliteStore._update_devices = lambda self, w, agg, pairs: None  # type: ignore[method-assign]
    if "gaps" in parts:
        sqlite.SqliteStore._update_gaps = lambda self, w, new: 0  # type: ignore[method-assign]
    if "segments" in parts:
        # (no segment: the rollup rows, written up to the last segment, are then never flushed either)
        sqlite.segments.append = lambda con, cols, store_key, stored_ms: 0  # type: ignore[assignment]


def measure(records: int, batches: int, transact_every: int = 0) -> dict[str, Any]:
    with part_load() as (proc, _, batch):
        work = [batch(records) for _ in range(batches)]
        cpu: list[float] = []
        for k, b in enumerate(work):
            c0 = time.thread_time()
            proc.apply_records(b)
            cpu.append((time.thread_time() - c0) * 1000)
            if transact_every and k % transact_every == transact_every - 1:
                proc.alerts.tick()  # (not timed) the alert rules' tick: a transaction of its own, as in `up`
        # what the store still holds is written, counted with the last batch (a checkout without it: nothing)
        flush = getattr(proc.store, "flush", None)
        if flush is not None:
            c0 = time.thread_time()
            flush()
            cpu[-1] += (time.thread_time() - c0) * 1000
    s = sorted(cpu)
    return {"mean": statistics.mean(cpu), "p99": s[int(len(s) * 0.99)], "max": s[-1],
            "per_reading_us": statistics.mean(cpu) * 1000 / (records * 10)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=60, help="bus records (of 10 readings) per batch")
    ap.add_argument("--batches", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--base", help="another checkout's src directory: the baseline side")
    ap.add_argument("--without",
                    help=f"a side that skips these writes of each batch (comma list of {', '.join(PARTS)})")
    ap.add_argument("--transact-every", type=int, default=0, metavar="K",
                    help="after every K batches, the alert rules' tick (a transaction of its own, between batches,"
                         " as the alert ticks and the notifier's claims run in `fieldmesh up`)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a side, in a subprocess
    a = ap.parse_args()
    without = set(filter(None, (a.without or "").split(",")))
    if without - set(PARTS):
        ap.error(f"--without: {', '.join(sorted(without - set(PARTS)))} not among {', '.join(PARTS)}")
    if a.one:
        skip_writes(without)
        print(json.dumps(measure(a.records, a.batches, a.transact_every)))
        return
    sides: dict[str, tuple[str, str]] = {"this": (str(ROOT / "src"), "")}
    if a.base:
        sides["base"] = (a.base, "")
    if without:
        sides["without"] = (str(ROOT / "src"), ",".join(sorted(without)))
    print(f"batches of {a.records} records ({a.records * 10} readings) from 1,000 devices, {a.batches} batches, "
          "one alert rule, SQLite; CPU of the apply thread per batch")
    got: dict[str, list[dict[str, Any]]] = {k: [] for k in sides}
    for r in range(a.rounds):
        for name, (src, skip) in (list(sides.items()) if r % 2 == 0 else list(reversed(sides.items()))):
            out = subprocess.run([sys.executable, __file__, "--one", "--records", str(a.records),
                                  "--batches", str(a.batches), "--transact-every", str(a.transact_every),
                                  *(["--without", skip] if skip else [])],
                                 capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": src})
            m = json.loads(out.stdout.strip().splitlines()[-1])
            got[name].append(m)
            print(f"  {name:7s} round {r + 1}: mean {m['mean']:.2f} ms, p99 {m['p99']:.2f} ms, "
                  f"max {m['max']:.1f} ms; {m['per_reading_us']:.1f} CPU-us per reading", flush=True)
    for other in ("base", "without"):
        if other not in got:
            continue
        for k in ("mean", "max"):
            this = statistics.median(m[k] for m in got["this"])
            them = statistics.median(m[k] for m in got[other])
            print(f"{k} CPU per batch (median of rounds): this {this:.2f} ms, {other} {them:.2f} ms: "
                  f"x{them / this:.2f}")


if __name__ == "__main__":
    main()
