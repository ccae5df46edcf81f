"""1-minute rollups in SQLite as a row per window (what the store writes) against packs of an hour's windows per
(device, metric), both sides in one run: is packing the windows the way to fewer, cheaper writes?

Both sides take the same windows, already merged (count, sum, min, max, avg and the exact sum's text, as the
store's ``_merge_rollups`` hands them to SQLite), in the same transactions, alternated:

* **rows**: the store's own ``rollup_1m`` table (a store made in a temporary directory, its pragmas), one
  ``INSERT OR REPLACE`` row per window;
* **packs**: a table ``rollup_1m_packs (device_id, metric, hour_ms, windows)``, ``windows`` the hour's windows
  as one JSON array (msgspec), each pack kept in memory and written whole (``INSERT OR REPLACE``) whenever a
  transaction touches one of its windows. Readers would see it through a view with ``json_each``, as
  ``readings`` sees the segments.

Two shapes, both from the benchmarks that set the targets:

* **bulk** (``bench/processor.py``): 2,000 devices x 3 metrics, a transaction of 256 device messages, each 17
  one-minute windows per metric (100 readings 10 s apart), the next message of a device starting in the last
  window of its previous one;
* **part load** (``bench/batch_cost.py``, the alerts' latency shape): 1,000 devices x 1 metric, a transaction
  of 60 devices, each its current minute (a new minute every 20 transactions).

Printed per shape: CPU per transaction, commit included (the packs' side split into building the JSON and the
SQL), and the ratio rows / packs (above 1: packs cheaper); then the CPU of reading one device's day of
1-minute windows by time range (the API's query) from each side.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/rollup_packs.py [--bulk-tx 60] [--part-tx 3000]``.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import time
from itertools import groupby
from pathlib import Path
from typing import Any

import msgspec

from fieldmesh.store.sqlite import SqliteStore

HOUR_MS = 3_600_000
T0 = 1_764_000_000_000 // HOUR_MS * HOUR_MS
PACKS = (
    "CREATE TABLE rollup_1m_packs (device_id TEXT NOT NULL, metric TEXT NOT NULL, hour_ms INTEGER NOT NULL,"
    " windows TEXT NOT NULL, PRIMARY KEY (device_id, metric, hour_ms)) WITHOUT ROWID"
)
PACK_VIEW = (
    "CREATE VIEW packed_1m AS SELECT p.device_id, p.metric, p.hour_ms, j.value->>0 AS window_start_ms,"
    " j.value->>1 AS count, j.value->>2 AS sum, j.value->>3 AS min, j.value->>4 AS max, j.value->>5 AS avg,"
    " j.value->>6 AS sum_exact"
    " FROM rollup_1m_packs p, json_each(p.windows) j"
)
_enc = msgspec.json.Encoder()
Row = tuple[Any, ...]


def _connect(path: Path, packs: bool) -> sqlite3.Connection:
    SqliteStore(f"sqlite:///{path}").close()  # the store's schema and pragmas
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA synchronous=NORMAL")
    if packs:
        con.execute(PACKS)
        con.execute(PACK_VIEW)
    return con


class Rows:
    """The store's layout: a row per window."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con

    def write(self, rows: list[Row]) -> None:
        self.con.execute("BEGIN")
        self.con.executemany("INSERT OR REPLACE INTO rollup_1m VALUES (?,?,?,?,?,?,?,?,?)", rows)
        self.con.execute("COMMIT")

    def read(self, device: str, metric: str, start: int, end: int) -> list[Row]:
        return self.con.execute(
            "SELECT window_start_ms, count, sum, min, max, avg FROM rollup_1m WHERE device_id = ? AND metric = ?"
            " AND window_start_ms >= ? AND window_start_ms < ? ORDER BY window_start_ms",
            (device, metric, start, end)).fetchall()


class Packs:
    """An hour's windows per (device, metric) in one JSON row; packs kept in memory, written whole."""

    def __init__(self, con: sqlite3.Connection) -> None:
        self.con = con
        # every pack written, never read back: the shapes here make under 20,000 (a store would bound it
        # and read an evicted pack again, which would cost the packs more, not less)
        self.cache: dict[tuple[str, str, int], list[Row]] = {}
        self.build_s = 0.0

    def write(self, rows: list[Row]) -> None:
        t = time.process_time()
        cache = self.cache
        out = []
        for key, group in groupby(rows, key=lambda r: (r[0], r[1], r[2] // HOUR_MS * HOUR_MS)):
            tails = [r[2:] for r in group]  # (window_start_ms, count, sum, min, max, avg, sum_exact), in order
            pack = cache.get(key)
            if pack is None:
                pack = cache[key] = tails
            elif tails[0][0] > pack[-1][0]:  # all later than the pack's windows (most of a stream)
                pack += tails
            else:  # some windows again: merged by window start
                merged = {t[0]: t for t in pack}
                merged.update((t[0], t) for t in tails)
                pack[:] = sorted(merged.values())
            out.append((*key, _enc.encode(pack).decode()))
        self.build_s += time.process_time() - t
        self.con.execute("BEGIN")
        self.con.executemany("INSERT OR REPLACE INTO rollup_1m_packs VALUES (?,?,?,?)", out)
        self.con.execute("COMMIT")

    def read(self, device: str, metric: str, start: int, end: int) -> list[Row]:
        return self.con.execute(
            "SELECT window_start_ms, count, sum, min, max, avg FROM packed_1m WHERE device_id = ? AND metric = ?"
            " AND hour_ms >= ? AND hour_ms < ? AND window_start_ms >= ? AND window_start_ms < ?"
            " ORDER BY window_start_ms",
            (device, metric, start // HOUR_MS * HOUR_MS, end, start, end)).fetchall()


def bulk(n_tx: int, devices: int = 2000, per_tx: int = 256, span: int = 17) -> list[list[Row]]:
    """Transactions of ``per_tx`` device messages, each ``span`` windows x 3 metrics (the processor's stream)."""
    nxt = [0] * devices
    out = []
    i = 0
    for t in range(n_tx):
        rows = []
        for _ in range(per_tx):
            d = i % devices
            i += 1
            w0 = nxt[d]
            nxt[d] = w0 + span - 1  # the next message starts in this one's last window
            for m in ("humidity", "temperature", "vibration"):
                rows += [(f"dev-{d:05d}", m, T0 + w * 60_000, 6, 123.25 + t, 1.5, 40.25, 20.54, "1ed:-2")
                         for w in range(w0, w0 + span)]
        rows.sort()
        out.append(rows)
    return out


def part_load(n_tx: int, devices: int = 1000, per_tx: int = 60) -> list[list[Row]]:
    """Transactions of ``per_tx`` random devices, one window each: the current minute (the alerts' shape)."""
    rnd = random.Random(1)
    return [[(f"lat-{d:05d}", "temperature", T0 + t // 20 * 60_000, 6 + t, 123.25, 1.5, 40.25, 20.54, "1ed:-2")
             for d in sorted(rnd.sample(range(devices), per_tx))] for t in range(n_tx)]


def run(name: str, txs: list[list[Row]], tmp: Path) -> None:
    sides = {"rows": Rows(_connect(tmp / f"{name}-rows.db", False)),
             "packs": Packs(_connect(tmp / f"{name}-packs.db", True))}
    cpu = dict.fromkeys(sides, 0.0)
    for i, rows in enumerate(txs):
        for k in (("rows", "packs") if i % 2 == 0 else ("packs", "rows")):
            t = time.process_time()
            sides[k].write(rows)
            cpu[k] += time.process_time() - t
    n = len(txs)
    windows = sum(map(len, txs)) / n
    p = sides["packs"]
    print(f"{name}: {n} transactions of {windows:,.0f} windows; CPU per transaction, commit included:"
          f" rows {cpu['rows'] / n * 1e3:.2f} ms, packs {cpu['packs'] / n * 1e3:.2f} ms (building the JSON"
          f" {p.build_s / n * 1e3:.2f}, the SQL {(cpu['packs'] - p.build_s) / n * 1e3:.2f});"
          f" rows / packs x{cpu['rows'] / cpu['packs']:.2f}")
    dev, metric = txs[-1][0][0], txs[-1][0][1]
    start, end = T0, T0 + 24 * HOUR_MS
    got = {k: s.read(dev, metric, start, end) for k, s in sides.items()}
    if [tuple(r) for r in got["rows"]] != [tuple(r) for r in got["packs"]]:
        raise SystemExit(f"{name}: the two layouts read back differently")
    reads: dict[str, float] = {}
    for k, s in sides.items():
        t = time.process_time()
        for _ in range(200):
            s.read(dev, metric, start, end)
        reads[k] = (time.process_time() - t) / 200
    print(f"  a day of {dev}'s {metric} ({len(got['rows'])} windows, the same both sides): rows"
          f" {reads['rows'] * 1e3:.3f} ms, packs {reads['packs'] * 1e3:.3f} ms a read")
    for s in sides.values():
        s.con.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bulk-tx", type=int, default=60, help="transactions of the bulk shape")
    ap.add_argument("--part-tx", type=int, default=3000, help="transactions of the part-load shape")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        run("bulk", bulk(a.bulk_tx), Path(d))
        run("part load", part_load(a.part_tx), Path(d))


if __name__ == "__main__":
    main()
