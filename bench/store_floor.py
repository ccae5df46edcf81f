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

``--pairs``: the same statements are also replayed with the rollup tables in a layout the store does not use
(measured, not taken: docs/pipeline.md), the two layouts alternated in each round. Each (device, metric) gets
an integer ``pair`` once (``rollup_pairs``, unique by device and metric), and the rollup rows are keyed
``(pair, window_start_ms)`` instead of ``(device_id, metric, window_start_ms)``: the same columns but the two
strings, which a view would join back. The replay maps each row's pair in Python (a dict, as a store would
keep), inserts the new pairs, and looks rows up through the pairs; the rows it wrote are compared with the
recorded store's.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/store_floor.py [--quick] [--rounds 3] [--pairs]``.
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

from fieldmesh.store import load_store
from fieldmesh.store.sqlite import _WAL_AUTOCHECKPOINT_PAGES, SqliteStore

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
        run(store, records, profile=False)
    finally:
        if isinstance(store._w, _Recorder):
            store._w = store._w._con  # type: ignore[assignment]
        store.close()
    start = next(i for i, (_, sql, _) in enumerate(log) if sql.startswith("BEGIN"))  # after opening the store
    return log[start:]


_PAIRS_SCHEMA = [
    "CREATE TABLE rollup_pairs (pair INTEGER PRIMARY KEY, device_id TEXT NOT NULL, metric TEXT NOT NULL,"
    " UNIQUE (device_id, metric))",
    *(f"CREATE TABLE rollup_{i}_p (pair INTEGER NOT NULL, window_start_ms INTEGER NOT NULL, count INTEGER NOT NULL,"
      " sum REAL NOT NULL, min REAL NOT NULL, max REAL NOT NULL, avg REAL NOT NULL, sum_exact TEXT NOT NULL,"
      " PRIMARY KEY (pair, window_start_ms)) WITHOUT ROWID" for i in ("1m", "1h")),
]
_ROLLUP_WRITE = re.compile(r"INSERT OR REPLACE INTO (rollup_1[mh]) VALUES")
_ROLLUP_READ = re.compile(r"\bJOIN (rollup_1[mh]) r ON r.device_id = j.value->>0 AND r.metric = j.value->>1 AND")
_ROLLUP_TOP = re.compile(r"FROM (rollup_1[mh]) r WHERE r.device_id = j.value->>0 AND r.metric = j.value->>1\)")


class _Pairs:
    """The rollup statements of a recorded log, run on the pair-keyed tables (``--pairs``)."""

    def __init__(self) -> None:
        self.ids: dict[tuple[str, str], int] = {}

    def run(self, con: sqlite3.Connection, many: bool, sql: str, params: Any) -> str | None:
        """Run ``sql`` in this layout if it touches a rollup table; the kind it counts as (None: not one)."""
        if m := _ROLLUP_WRITE.match(sql):
            ids, new = self.ids, []
            rows = []
            for d, mt, ws, c, sm, lo, hi, avg, sx in params:
                pair = ids.get((d, mt))
                if pair is None:
                    pair = ids[(d, mt)] = len(ids) + 1
                    new.append((pair, d, mt))
                rows.append((pair, ws, c, sm, lo, hi, avg, sx))
            if new:
                con.executemany("INSERT INTO rollup_pairs VALUES (?,?,?)", new)
            con.executemany(f"INSERT OR REPLACE INTO {m[1]}_p VALUES (?,?,?,?,?,?,?,?)", rows)
            return f"{m[1]}_p"
        if m := _ROLLUP_READ.search(sql):
            sql = sql.replace("SELECT r.device_id, r.metric,", "SELECT p.device_id, p.metric,").replace(
                m[0], f"JOIN rollup_pairs p ON p.device_id = j.value->>0 AND p.metric = j.value->>1"
                      f" JOIN {m[1]}_p r ON r.pair = p.pair AND")
        elif m := _ROLLUP_TOP.search(sql):
            sql = sql.replace(m[0], f"FROM rollup_pairs p JOIN {m[1]}_p r ON r.pair = p.pair"
                                    f" WHERE p.device_id = j.value->>0 AND p.metric = j.value->>1)")
        else:
            return None
        con.execute(sql, params).fetchall()
        return f"{m[1]}_p"


def replay(path: Path, log: list[Stmt], pairs: bool = False) -> tuple[float, dict[str, float]]:
    """Run the statements on a new store at ``path`` (the schema made by opening it); (CPU s, CPU s by kind).

    ``pairs``: the rollup statements on the pair-keyed tables (:class:`_Pairs`)."""
    load_store(f"sqlite:///{path}").close()
    con = sqlite3.connect(path, isolation_level=None)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA cache_size=-32768")
        con.execute(f"PRAGMA wal_autocheckpoint={_WAL_AUTOCHECKPOINT_PAGES}")
        other = _Pairs() if pairs else None
        if pairs:
            for ddl in _PAIRS_SCHEMA:
                con.execute(ddl)
        by: dict[str, float] = defaultdict(float)
        clock = time.process_time
        c0 = clock()
        for many, sql, params in log:
            if sql.startswith("PRAGMA wal_checkpoint"):  # the store's checkpoints: SQLite's own, in the commits
                continue
            t = clock()
            k = other.run(con, many, sql, params) if other is not None else None
            if k is None:
                if many:
                    con.executemany(sql, params)
                else:
                    con.execute(sql, params).fetchall()
                k = kind(sql)
            by[k] += clock() - t
        return clock() - c0, dict(by)
    finally:
        con.close()


def same(a: Path, b: Path, pairs: bool = False) -> list[str]:
    """Differences between the recorded store and the replayed one (empty: the replay did the same writes);
    ``pairs``: the replay's rollup rows are in the pair-keyed tables."""
    out = []
    ca, cb = sqlite3.connect(a), sqlite3.connect(b)
    try:
        for table, order in (("rollup_1m", "device_id, metric, window_start_ms"),
                             ("rollup_1h", "device_id, metric, window_start_ms"),
                             ("segments", "sid"), ("devices", "device_id"), ("positions", "topic, partition")):
            q = f"SELECT * FROM {table} ORDER BY {order}"
            qb = q
            if pairs and table.startswith("rollup"):
                qb = (f"SELECT p.device_id, p.metric, r.window_start_ms, r.count, r.sum, r.min, r.max, r.avg,"
                      f" r.sum_exact FROM {table}_p r JOIN rollup_pairs p USING (pair) ORDER BY {order}")
                if cb.execute(f"SELECT count(*) FROM {table}").fetchone()[0]:
                    out.append(f"{table}: rows in the store's table, not the pair-keyed one")
            if ca.execute(q).fetchall() != cb.execute(qb).fetchall():
                out.append(f"{table} differs")
    finally:
        ca.close()
        cb.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 devices x 500 readings instead of 2,000 x 500")
    ap.add_argument("--rounds", type=int, default=3, help="replays (the lowest counts; the machine is shared)")
    ap.add_argument("--pairs", action="store_true",
                    help="also replay with the rollup rows keyed by an integer pair id (a layout not taken)")
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
        best_pairs: tuple[float, dict[str, float]] | None = None
        for r in range(args.rounds):
            for pairs in (False, True) if args.pairs else (False,):
                db = Path(tmp) / f"replay{r}{'p' if pairs else ''}.db"
                got = replay(db, log, pairs)
                if r == 0:
                    diffs = same(Path(tmp) / "recorded.db", db, pairs)
                    if diffs:
                        raise SystemExit(f"the replay{' (pairs)' if pairs else ''} wrote something else: {diffs}")
                if pairs:
                    best_pairs = got if best_pairs is None or got[0] < best_pairs[0] else best_pairs
                elif best is None or got[0] < best[0]:
                    best = got
                for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                    f.unlink(missing_ok=True)  # a full store each: not kept for the rounds after
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
    if best_pairs is not None:
        ptotal, pby = best_pairs
        mine = sum(v for k, v in by.items() if k.startswith("rollup") or k == "COMMIT")
        theirs = sum(v for k, v in pby.items() if k.startswith("rollup") or k == "COMMIT")
        print(f"rollup rows keyed by pair id (not taken; the best of {args.rounds}, alternated with the above): the"
              f" SQL {ptotal * us:.2f} CPU-us a reading (x{total / ptotal:.2f} the store's layout); rollups + COMMIT"
              f" {theirs * us:.2f} against {mine * us:.2f}: " + ", ".join(
                  f"{k} {v * us:.2f}" for k, v in sorted(pby.items(), key=lambda kv: -kv[1])
                  if k.startswith("rollup") or k == "COMMIT"))
        saved = total - ptotal
        print(f"  with the processing as it is, the run would take {(cpu - saved) * us:.2f} CPU-us a reading"
              f" ({n / (cpu - saved):,.0f} readings/CPU-s; the target {TARGET_PER_CPU_S:,})")


if __name__ == "__main__":
    main()
