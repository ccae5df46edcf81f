"""Rollup row writes in SQLite, side by side: ``INSERT OR REPLACE`` (what the store writes) against an upsert
(``INSERT ... ON CONFLICT DO UPDATE``, measured no cheaper, so not taken), over rows that exist and new rows.

The hot store's own ``rollup_1m`` table (a store made in a temporary directory, its pragmas), filled with
``--devices`` devices x 3 metrics x 60 minutes; then, ``--rounds`` times, a transaction per statement kind
writing the same ``--rows`` rows of random (device, metric) pairs: their latest window (the rows exist: what
small batches at part load write) or the next one (new rows); ``--windows N``: N consecutive windows a pair
(a backlog's device messages span many minutes). CPU per row, the
transaction's commit included; both kinds alternate in each round, the median of rounds is printed.

``--key-order``: instead, ``INSERT OR REPLACE`` into the store's table (primary key ``(device_id, metric,
window_start_ms)``) against the same table keyed ``(window_start_ms, device_id, metric)``, a layout the store
does not use (see docs/pipeline.md, "Rollup rows: the key order"). A transaction's rows are then one page
per pair in the first, and the few pages of one window's rows in the second.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/rollup_write.py [--devices 1000] [--rows 1800] [--rounds 30]
[--key-order]``.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from fieldmesh.store.sqlite import SqliteStore

METRICS = ("temperature", "humidity", "vibration")
KINDS = {
    "replace": "INSERT OR REPLACE INTO rollup_1m VALUES (?,?,?,?,?,?,?,?,?)",
    "upsert": "INSERT INTO rollup_1m VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET count = excluded.count,"
              " sum = excluded.sum, min = excluded.min, max = excluded.max, avg = excluded.avg,"
              " sum_exact = excluded.sum_exact",
}


#: The store's rollup columns keyed by window first (``--key-order``).
TIME_FIRST = (
    "CREATE TABLE rollup_1m (device_id TEXT NOT NULL, metric TEXT NOT NULL, window_start_ms INTEGER NOT NULL,"
    " count INTEGER NOT NULL, sum REAL NOT NULL, min REAL NOT NULL, max REAL NOT NULL, avg REAL NOT NULL,"
    " sum_exact TEXT NOT NULL, PRIMARY KEY (window_start_ms, device_id, metric)) WITHOUT ROWID"
)


def _store(path: Path, devices: int, *, time_first: bool = False) -> sqlite3.Connection:
    SqliteStore(f"sqlite:///{path}").close()  # the store's schema and pragmas
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA synchronous=NORMAL")
    if time_first:
        con.execute("DROP TABLE rollup_1m")
        con.execute(TIME_FIRST)
    con.execute("BEGIN")
    con.executemany("INSERT INTO rollup_1m VALUES (?,?,?,?,?,?,?,?,?)", [
        (f"dev-{d:05d}", m, w * 60_000, 5, 1.5, 0.1, 0.9, 0.3, "3:-1")
        for d in range(devices) for m in METRICS for w in range(60)])
    con.execute("COMMIT")
    return con


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=1800, help="rows per transaction")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--key-order", action="store_true", help="the store's key order against window first")
    ap.add_argument("--windows", type=int, default=1,
                    help="consecutive windows per (device, metric) in a transaction (a backlog's messages span many)")
    a = ap.parse_args()
    rnd = random.Random(1)
    sides = {"device first": KINDS["replace"], "window first": KINDS["replace"]} if a.key_order else KINDS
    with tempfile.TemporaryDirectory() as d:
        cons = {k: _store(Path(d) / f"{i}.db", a.devices, time_first=k == "window first")
                for i, k in enumerate(sides)}
        span = max(1, min(a.windows, 60))
        per_pair = max(1, a.rows // (len(METRICS) * span))
        print(f"rollup_1m of {a.devices} devices x {len(METRICS)} metrics x 60 windows; {a.rows} rows per "
              f"transaction ({span} windows a pair), {a.rounds} rounds; CPU per row (commit included), "
              "median of rounds")
        for case in ("existing", "new"):
            got: dict[str, list[float]] = {k: [] for k in sides}
            for r in range(a.rounds):
                devs = rnd.sample(range(a.devices), min(per_pair, a.devices))
                w0 = 60 - span if case == "existing" else 60 + r * span
                rows = [(f"dev-{x:05d}", m, w * 60_000, 7 + r, 1.7, 0.1, 0.9, 0.3, "11:-2")
                        for x in sorted(devs) for m in sorted(METRICS) for w in range(w0, w0 + span)]
                for k in (list(sides) if r % 2 == 0 else list(reversed(list(sides)))):
                    con = cons[k]
                    t = time.process_time()
                    con.execute("BEGIN")
                    con.executemany(sides[k], rows)
                    con.execute("COMMIT")
                    got[k].append((time.process_time() - t) / len(rows) * 1e6)
            one, two = (statistics.median(got[k]) for k in sides)
            first, second = sides
            if not a.key_order:
                first, second = "INSERT OR REPLACE", "upsert"
            print(f"  {case} rows: {first} {one:.2f} CPU-us per row, {second} {two:.2f}: x{one / two:.2f}")
        for c in cons.values():
            c.close()


if __name__ == "__main__":
    main()
