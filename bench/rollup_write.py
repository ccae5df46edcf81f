"""Rollup row writes in SQLite, side by side: ``INSERT OR REPLACE`` (what the store writes) against an upsert
(``INSERT ... ON CONFLICT DO UPDATE``, measured no cheaper, so not taken), over rows that exist and new rows.

The hot store's own ``rollup_1m`` table (a store made in a temporary directory, its pragmas), filled with
``--devices`` devices x 3 metrics x 60 minutes; then, ``--rounds`` times, a transaction per statement kind
writing the same ``--rows`` rows of random (device, metric) pairs: their latest window (the rows exist: what
small batches at part load write) or the next one (new rows: what a backlog writes). CPU per row, the
transaction's commit included; both kinds alternate in each round, the median of rounds is printed.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/rollup_write.py [--devices 1000] [--rows 1800] [--rounds 30]``.
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


def _store(path: Path, devices: int) -> sqlite3.Connection:
    SqliteStore(f"sqlite:///{path}").close()  # the store's schema and pragmas
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA synchronous=NORMAL")
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
    a = ap.parse_args()
    rnd = random.Random(1)
    with tempfile.TemporaryDirectory() as d:
        cons = {k: _store(Path(d) / f"{k}.db", a.devices) for k in KINDS}
        per_pair = max(1, a.rows // len(METRICS))
        print(f"rollup_1m of {a.devices} devices x {len(METRICS)} metrics x 60 windows; {a.rows} rows per "
              f"transaction, {a.rounds} rounds; CPU per row (commit included), median of rounds")
        for case in ("existing", "new"):
            got: dict[str, list[float]] = {k: [] for k in KINDS}
            for r in range(a.rounds):
                devs = rnd.sample(range(a.devices), min(per_pair, a.devices))
                w = 59 if case == "existing" else 60 + r
                rows = [(f"dev-{x:05d}", m, w * 60_000, 7 + r, 1.7, 0.1, 0.9, 0.3, "11:-2")
                        for x in devs for m in METRICS]
                for k in (KINDS if r % 2 == 0 else reversed(list(KINDS))):
                    con = cons[k]
                    t = time.process_time()
                    con.execute("BEGIN")
                    con.executemany(KINDS[k], rows)
                    con.execute("COMMIT")
                    got[k].append((time.process_time() - t) / len(rows) * 1e6)
            rep, ups = statistics.median(got["replace"]), statistics.median(got["upsert"])
            print(f"  {case} rows: INSERT OR REPLACE {rep:.2f} CPU-us per row, upsert {ups:.2f}: x{rep / ups:.2f}")
        for c in cons.values():
            c.close()


if __name__ == "__main__":
    main()
