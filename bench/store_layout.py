"""What a raw layout costs SQLite per reading: a row per reading (today) against columnar segments.

The store's share of the processor's budget (300,000 readings per CPU-second in all) is about 2 µs per
reading. This measures the raw part alone, on the store's own pragmas, with batches as the processor
commits them (22,000 readings of 2,000 devices, random 63-bit identity keys), CPU µs per reading of
this process (``time.process_time``, commits included), for:

* ``rows``: today's layout, ``readings`` (a row per reading, its ``(device_id, ts_ms)`` index) and ``idents``
  (a row per key: the de-duplication lookup);
* ``rows, no index``: the same without the ``(device_id, ts_ms)`` index;
* ``idents only`` / ``readings only``: each half of ``rows``;
* ``segments``: one row per batch holding each column as a blob (numpy bytes; measurements JSON joined),
  plus the batch's keys sorted as one blob for the de-duplication lookup (a Bloom filter in memory says
  which segments to search);
* ``segments + idents``: segments for the data, ``idents`` rows kept for the lookup.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/store_layout.py [--readings 1000000]``.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

READINGS = """CREATE TABLE readings (rid INTEGER PRIMARY KEY, id INTEGER NOT NULL, device_id TEXT NOT NULL,
    ts_ms INTEGER NOT NULL, seq INTEGER, boot_id TEXT, event_id TEXT, measurements TEXT NOT NULL, meta TEXT,
    received_ms INTEGER NOT NULL, stored_ms INTEGER NOT NULL, enrichment TEXT)"""
INDEX = "CREATE INDEX readings_device_ts ON readings (device_id, ts_ms)"
IDENTS = "CREATE TABLE idents (id INTEGER PRIMARY KEY, chk INTEGER NOT NULL, origin INTEGER)"
SEGMENTS = """CREATE TABLE segments (id INTEGER PRIMARY KEY, n INTEGER NOT NULL, min_ts INTEGER, max_ts INTEGER,
    devices TEXT, device BLOB, ts BLOB, received BLOB, seq BLOB, key BLOB, chk BLOB, measurements BLOB,
    sorted_keys BLOB)"""


def connect(path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None)
    for p in ("journal_mode=WAL", "synchronous=NORMAL", "cache_size=-262144", "mmap_size=1073741824"):
        con.execute(f"PRAGMA {p}")
    return con


def batches(n: int, size: int, seed: int = 7) -> list[dict[str, object]]:
    rnd = np.random.default_rng(seed)
    out = []
    for s in range(0, n, size):
        m = min(size, n - s)
        dev = rnd.integers(0, 2000, m).astype(np.int32)
        vals = rnd.random((m, 3))
        out.append({
            "key": rnd.integers(0, 2**63 - 1, m, dtype=np.int64), "chk": rnd.integers(-2**63, 2**63 - 1, m),
            "device": dev, "devices": [f"dev-{d:05d}" for d in range(2000)],
            "ts": 1_763_812_800_000 + np.arange(s, s + m, dtype=np.int64) * 100,
            "seq": np.arange(s, s + m, dtype=np.int64),
            "mj": [f'{{"temperature":{20 + 10 * a:.3f},"humidity":{40 + 20 * b:.2f},"vibration":{c / 10!r}}}'
                   for a, b, c in vals.tolist()],
        })  # fmt: skip
    return out


def rows(con: sqlite3.Connection, b: dict[str, object], *, readings: bool = True, idents: bool = True) -> None:
    key, chk, dev, ts, seq, mj = (b[k] for k in ("key", "chk", "device", "ts", "seq", "mj"))
    assert isinstance(key, np.ndarray) and isinstance(chk, np.ndarray) and isinstance(dev, np.ndarray)
    assert isinstance(ts, np.ndarray) and isinstance(seq, np.ndarray) and isinstance(mj, list)
    names = np.array(b["devices"], dtype=object)
    n = len(key)
    if idents:
        con.executemany("INSERT INTO idents VALUES (?,?,?)", zip(key.tolist(), chk.tolist(), [1] * n, strict=True))
    if readings:
        con.executemany(
            "INSERT INTO readings (id, device_id, ts_ms, seq, boot_id, event_id, measurements, meta, received_ms,"
            " stored_ms, enrichment) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            zip(key.tolist(), names[dev].tolist(), ts.tolist(), seq.tolist(), [None] * n, [None] * n, mj,
                [None] * n, ts.tolist(), [0] * n, [None] * n, strict=True),
        )  # fmt: skip


def segment(con: sqlite3.Connection, b: dict[str, object]) -> None:
    key, chk, dev, ts, seq, mj = (b[k] for k in ("key", "chk", "device", "ts", "seq", "mj"))
    assert isinstance(key, np.ndarray) and isinstance(chk, np.ndarray) and isinstance(dev, np.ndarray)
    assert isinstance(ts, np.ndarray) and isinstance(seq, np.ndarray) and isinstance(mj, list)
    con.execute(
        "INSERT INTO segments (n, min_ts, max_ts, devices, device, ts, received, seq, key, chk, measurements,"
        " sorted_keys) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        (len(key), int(ts.min()), int(ts.max()), "\n".join(b["devices"]), dev.tobytes(), ts.tobytes(),  # type: ignore[arg-type]
         ts.tobytes(), seq.tobytes(), key.tobytes(), chk.tobytes(), "\n".join(mj).encode(),
         np.sort(key).tobytes()),
    )  # fmt: skip


def measure(name: str, schema: list[str], write: Callable[[sqlite3.Connection, dict[str, object]], None],
            data: list[dict[str, object]], n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        con = connect(Path(tmp) / "s.db")
        for q in schema:
            con.execute(q)
        c0, w0 = time.process_time(), time.perf_counter()
        for b in data:
            con.execute("BEGIN IMMEDIATE")
            write(con, b)
            con.execute("COMMIT")
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        size = (Path(tmp) / "s.db").stat().st_size + (Path(tmp) / "s.db-wal").stat().st_size
        con.close()
    print(f"{name:22s} {cpu / n * 1e6:6.2f} CPU-us/reading  {wall / n * 1e6:6.2f} wall-us/reading"
          f"  {size / n:6.0f} bytes/reading (file + WAL)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readings", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=22_000)
    args = ap.parse_args()
    data = batches(args.readings, args.batch)
    n = args.readings
    print(f"{n:,} readings in batches of {args.batch:,} (random keys, 2,000 devices, 3 metrics)")
    measure("rows", [READINGS, INDEX, IDENTS], rows, data, n)
    measure("rows, no index", [READINGS, IDENTS], rows, data, n)
    measure("idents only", [IDENTS], lambda c, b: rows(c, b, readings=False), data, n)
    measure("readings only", [READINGS, INDEX], lambda c, b: rows(c, b, idents=False), data, n)
    measure("segments", [SEGMENTS], segment, data, n)
    measure("segments + idents", [SEGMENTS, IDENTS], lambda c, b: (segment(c, b), rows(c, b, readings=False))[0],
            data, n)


if __name__ == "__main__":
    main()
