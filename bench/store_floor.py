"""What the hot store's SQL alone costs per reading in the processor benchmark: the floor under the 300,000 target.

``bench/processor.py``'s run (its realistic stream, ``Processor.apply_records`` in fetch-sized chunks on a SQLite
store, the garbage collector as a processor process sets it) is timed, then applied again with every statement
of the store's writer connection recorded: the SQL and its parameters, as bound (``executemany``'s rows as
lists). Then the same statements run again, in the same
order, on a new store of the same schema, with no processing around them: no decoding, no de-duplication
decisions, no window arithmetic, no building of rows. What that replay costs is what SQLite and the Python
binding do for the store; the rest of a run is the processing. Both are printed per reading, per CPU-second of
this process, against the target (``bench/processor.py``'s 300,000 readings per CPU-second: 3.33 CPU-µs a
reading), the replay by the table each statement writes (``COMMIT`` apart: the pages of the transaction
written to the WAL). Checkpoints run inside the commits that reach SQLite's mark (the store's own at the same
mark runs on a thread of its own: here in the commit, so it is counted the same). The processing is the
timed run minus the replay.

The replay is exact: the replayed store is compared with the recorded one (every rollup row, the segments).

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/store_floor.py [--quick] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from processor import TARGET_PER_CPU_S, make_records, make_stream, run

from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.store import load_store
from fieldmesh.store.sqlite import _WAL_AUTOCHECKPOINT_PAGES, SqliteStore
from fieldmesh.stream.processor import Processor

#: One recorded statement: (many?, SQL, parameters: a tuple, or a list of tuples for executemany).
Stmt = tuple[bool, str, Any]
_TABLE = re.compile(r"\b(?:INTO|FROM|UPDATE|JOIN)\s+([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE)


class _Recorder:
    """Stands for the writer's connection: records each statement, then runs it on the real one."""

    def __init__(self, con: sqlite3.Connection, log: list[Stmt]) -> None:
        self._con = con
        self._log = log

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        self._log.append((False, sql, tuple(params)))
        return self._con.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        rows = [tuple(r) for r in rows]
        self._log.append((True, sql, rows))
        return self._con.executemany(sql, rows)


def kind(sql: str) -> str:
    """What a statement is counted as: ``COMMIT``, ``BEGIN``, the table it writes or reads, else its first word."""
    head = sql.lstrip().split(None, 1)[0].upper()
    if head in ("COMMIT", "BEGIN", "PRAGMA"):
        return head
    tables = [t for t in _TABLE.findall(sql) if t != "json_each"]  # json_each: the keys looked up, not a table
    return tables[0] if tables else head


def plain(path: Path, records: list[Any]) -> float:
    """CPU seconds of bench/processor.py's run of ``records`` on a store at ``path`` (nothing recorded)."""
    store = load_store(f"sqlite:///{path}")
    try:
        return float(run(store, records, profile=False)["cpu_s"])
    finally:
        store.close()


def record(path: Path, records: list[Any]) -> list[Stmt]:
    """Apply ``records`` as bench/processor.py does, on a store at ``path``; the statements of its writer."""
    store = load_store(f"sqlite:///{path}")
    assert isinstance(store, SqliteStore)
    log: list[Stmt] = []
    try:
        store._w = _Recorder(store._w, log)  # type: ignore[assignment]  # the writer's connection, recorded
        ps = ProcessorSettings()
        p = Processor(bus=None, store=store, settings=ps)  # type: ignore[arg-type]
        for i in range(0, len(records), ps.fetch_max):
            p.apply_records(records[i : i + ps.fetch_max])
    finally:
        if isinstance(store._w, _Recorder):
            store._w = store._w._con  # type: ignore[assignment]
        store.close()
    start = next(i for i, (_, sql, _) in enumerate(log) if sql.startswith("BEGIN"))  # after opening the store
    return log[start:]


def replay(path: Path, log: list[Stmt]) -> tuple[float, dict[str, float]]:
    """Run the statements on a new store at ``path`` (the schema made by opening it); (CPU s, CPU s by kind)."""
    load_store(f"sqlite:///{path}").close()
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA cache_size=-32768")
        con.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT_PAGES}")
        by: dict[str, float] = defaultdict(float)
        clock = time.process_time
        c0 = clock()
        for many, sql, params in log:
            if sql.startswith("PRAGMA wal_checkpoint"):  # the store's checkpoints: SQLite's own, in the commits
                continue
            t = clock()
            if many:
                con.executemany(sql, params)
            else:
                con.execute(sql, params).fetchall()
            by[kind(sql)] += clock() - t
        return clock() - c0, dict(by)
    finally:
        con.close()


def same(a: Path, b: Path) -> list[str]:
    """Differences between the recorded store and the replayed one (empty: the replay did the same writes)."""
    out = []
    ca, cb = sqlite3.connect(a), sqlite3.connect(b)
    try:
        for table, order in (("rollup_1m", "device_id, metric, window_start_ms"),
                             ("rollup_1h", "device_id, metric, window_start_ms"),
                             ("segments", "sid"), ("devices", "device_id"), ("positions", "topic, partition")):
            q = f"SELECT * FROM {table} ORDER BY {order}"
            if ca.execute(q).fetchall() != cb.execute(q).fetchall():
                out.append(f"{table} differs")
    finally:
        ca.close()
        cb.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 devices x 500 readings instead of 2,000 x 500")
    ap.add_argument("--rounds", type=int, default=3, help="replays (the lowest counts; the machine is shared)")
    args = ap.parse_args()
    devices = 200 if args.quick else 2000
    msgs, sent, now = make_stream(devices=devices, per_device=500)
    records = make_records(msgs, now, 2)
    n = len(sent)
    print(f"input: bench/processor.py's stream, {devices:,} devices x 500 readings = {n:,} readings in"
          f" {len(records):,} bus records; target {TARGET_PER_CPU_S:,} readings/CPU-s ="
          f" {1e6 / TARGET_PER_CPU_S:.2f} CPU-us a reading")
    with tempfile.TemporaryDirectory() as tmp:
        cpu = plain(Path(tmp) / "plain.db", records)
        log = record(Path(tmp) / "recorded.db", records)
        rows = sum(len(p) if many else 1 for many, _, p in log)
        best: tuple[float, dict[str, float]] | None = None
        for r in range(args.rounds):
            db = Path(tmp) / f"replay{r}.db"
            got = replay(db, log)
            if r == 0:
                diffs = same(Path(tmp) / "recorded.db", db)
                if diffs:
                    raise SystemExit(f"the replay wrote something else: {diffs}")
            if best is None or got[0] < best[0]:
                best = got
    assert best is not None
    total, by = best
    us = 1e6 / n
    print(f"the run (processing + the store's SQL): {cpu * us:.2f} CPU-us a reading ({n / cpu:,.0f} readings/CPU-s)")
    print(f"its SQL replayed alone ({len(log):,} statements, {rows:,} rows; the best of {args.rounds}):"
          f" {total * us:.2f} CPU-us a reading ({total / (1e6 / TARGET_PER_CPU_S) * 1e6 / n:.0%} of the target's"
          f" budget)")
    for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {k:16s} {v * us:5.2f}")
    rest = cpu - total
    room = 1e6 / TARGET_PER_CPU_S - total * us  # CPU-us a reading left for the processing at the target
    shrink = f"{rest * us / room:.1f}x less than it takes" if room > 0 else "less than nothing: the SQL alone is over"
    print(f"the processing (the run minus its SQL): {rest * us:.2f} CPU-us a reading; at the target it would have"
          f" {room:.2f}, {shrink}")


if __name__ == "__main__":
    main()
