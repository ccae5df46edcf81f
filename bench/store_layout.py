"""Raw-reading layouts in SQLite, side by side: a row per reading vs segments (:mod:`fieldmesh.store.segments`).

Both sides write the same readings (the realistic stream of ``bench/processor.py``: 2,000 devices, 100
readings per message, batches of ``--batch`` readings as the processor commits them) in WAL mode with
``synchronous=NORMAL``, one transaction per batch, and time only the raw append (not identity or rollups).
Reported: readings per CPU-second of each layout and the ratio; then the cost of reading one device's hour
back through the API's query of each layout.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/store_layout.py [--devices 2000] [--per-device 500]``.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from processor import make_records, make_stream  # noqa: E402

from fieldmesh.core.codec import decode_bus_columns_many  # noqa: E402
from fieldmesh.store import segments  # noqa: E402

_ROWS_DDL = """
CREATE TABLE readings (
    rid INTEGER PRIMARY KEY, id INTEGER NOT NULL, device_id TEXT NOT NULL, ts_ms INTEGER NOT NULL, seq INTEGER,
    boot_id TEXT, event_id TEXT, measurements TEXT NOT NULL, meta TEXT, received_ms INTEGER NOT NULL,
    stored_ms INTEGER NOT NULL, enrichment TEXT);
CREATE INDEX readings_device_ts ON readings (device_id, ts_ms);
"""


def _connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    return con


def append_rows(con: sqlite3.Connection, cols, key, now: int) -> None:  # type: ignore[no-untyped-def]
    """Today's row-per-reading append, at its best: columns zipped in C, measurements pre-encoded."""
    n = len(cols)
    seqs = [None if s < 0 else s for s in cols.seq.tolist()]
    boot_of = np.array((*cols.boots, None), dtype=object)
    none = [None] * n
    con.executemany(
        "INSERT INTO readings (id, device_id, ts_ms, seq, boot_id, event_id, measurements, meta, received_ms,"
        " stored_ms, enrichment) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        zip(key.tolist(), np.array(cols.devices, dtype=object)[cols.device].tolist(), cols.ts_ms.tolist(), seqs,
            boot_of[cols.boot].tolist(), none, cols.measurements_json.tolist(), none, cols.received_ms.tolist(),
            [now] * n, none, strict=True),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--per-device", type=int, default=500)
    ap.add_argument("--batch", type=int, default=25_600, help="readings per transaction")
    a = ap.parse_args()
    msgs, _, now = make_stream(devices=a.devices, per_device=a.per_device)
    records = make_records(msgs, now, 2)
    cols, _, bad = decode_bus_columns_many([r.value for r in records])
    assert not bad
    n = len(cols)
    batches = [np.arange(s, min(s + a.batch, n)) for s in range(0, n, a.batch)]
    parts = [cols.take(b) for b in batches]
    keys = [p.key for p in parts]
    print(f"{n:,} readings, {len(parts)} transactions of up to {a.batch:,}")
    results = {}
    with tempfile.TemporaryDirectory() as d:
        for name in ("rows", "segments", "rows ", "segments "):  # twice each, alternating: a noisy machine
            con = _connect(Path(d) / f"{name.strip()}-{len(results)}.db")
            con.executescript(_ROWS_DDL if name.strip() == "rows" else segments.SCHEMA)
            t = time.process_time()
            for p, k in zip(parts, keys, strict=True):
                con.execute("BEGIN")
                (append_rows if name.strip() == "rows" else segments.append)(con, p, k, now)
                con.execute("COMMIT")
            dt = time.process_time() - t
            results.setdefault(name.strip(), []).append(dt)
            if name.endswith(" "):
                if name.strip() == "segments":
                    con.execute(segments.view_sql(legacy=False))
                dev = cols.devices[0]
                hi = int(cols.ts_ms.max())
                t = time.perf_counter()
                for _ in range(20):
                    if name.strip() == "rows":
                        got = con.execute(
                            "SELECT * FROM readings WHERE device_id = ? AND ts_ms >= ? AND ts_ms < ?"
                            " ORDER BY ts_ms DESC, rid LIMIT 1000", (dev, hi - 3_600_000, hi + 1)).fetchall()
                    else:
                        got = segments.raw_query(con, device_id=dev, metric=None, start_ms=hi - 3_600_000,
                                                 end_ms=hi + 1, limit=1000)
                ms = (time.perf_counter() - t) / 20 * 1000
                print(f"  {name.strip():9s} one device's last hour: {len(got)} rows in {ms:.2f} ms")
            con.close()
    best = {k: min(v) for k, v in results.items()}
    for k, v in best.items():
        print(f"{k:9s} {n / v:12,.0f} readings/CPU-s  ({v / n * 1e6:.2f} µs per reading)")
    print(f"segments / rows: {best['rows'] / best['segments']:.2f}x")


if __name__ == "__main__":
    main()
