"""Pages a commit writes, per table and index, at the alerts benchmark's part-load shape; both sides in one run.

What a small batch costs grows with the pages its transaction dirties: ``COMMIT`` writes each to the WAL (two
``pwrite`` calls a page) and the checkpoint copies it again. Unlike CPU time on a shared machine, the count is
exact and the same from run to run, so it tells whether a layout change helps before any timing does.

The processor of ``bench/batch_cost.py`` (one alert rule, 1,000 devices, 10 readings a bus record) applies
``--warm`` batches of ``--records`` records, its checkpoints then stop, the WAL is emptied, and ``--commits``
more batches are applied. Each WAL frame names a page; ``dbstat`` names the table or index that page belongs
to. ``--step-ms`` is the event time between records: 1 (the default) keeps every reading in a minute or two,
as in the alerts benchmark; 1000 spreads the warm-up over hours, as a store that has been running a while,
where each device's latest rollup rows and segment index entries sit on pages of their own. ``--base SRC``
counts the same with another checkout's ``src``.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/commit_pages.py [--records 50] [--warm 600] [--commits 30]
[--step-ms 1] [--base DIR/src]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch_cost import part_load  # noqa: E402


def count(records: int, warm: int, commits: int, step_ms: int) -> dict[str, float]:
    """Pages written per commit by name (``(free)``: pages no table or index holds at the end), and ``total``."""
    with part_load(step_ms) as (proc, store, batch):
        for _ in range(warm):
            proc.apply_records(batch(records))
        checkpointer, store._checkpointer = store._checkpointer, None  # the writer's own would run in a commit
        if checkpointer is not None:
            checkpointer.close()
        w = store._w
        w.execute("PRAGMA wal_autocheckpoint=0")
        busy, _, _ = w.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert not busy, "the WAL could not be emptied"
        for b in [batch(records) for _ in range(commits)]:
            proc.apply_records(b)
        path = Path(store.path)
        wal = Path(f"{path}-wal").read_bytes()
        page_size = struct.unpack(">I", wal[8:12])[0]
        pages: list[int] = []
        done = 0
        for off in range(32, len(wal) - 24 - page_size + 1, 24 + page_size):
            page, size_after = struct.unpack(">II", wal[off:off + 8])
            pages.append(page)
            done += size_after != 0  # a commit's last frame carries the database size
        assert done == commits, f"{done} commits in the WAL, {commits} applied"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            owner = dict(con.execute("SELECT pageno, name FROM dbstat"))
    by = Counter(owner.get(p, "(free)") for p in pages)
    return {"total": len(pages) / commits} | {k: v / commits for k, v in by.most_common()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=50, help="bus records (of 10 readings) per batch")
    ap.add_argument("--warm", type=int, default=600, help="batches before the count")
    ap.add_argument("--commits", type=int, default=30, help="batches counted")
    ap.add_argument("--step-ms", type=int, default=1, help="event time between two records")
    ap.add_argument("--base", help="another checkout's src directory: the baseline side")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a side, in a subprocess
    a = ap.parse_args()
    if a.one:
        print(json.dumps(count(a.records, a.warm, a.commits, a.step_ms)))
        return
    sides = {"this": str(ROOT / "src")} | ({"base": a.base} if a.base else {})
    print(f"pages written per commit: batches of {a.records} records ({a.records * 10} readings) from 1,000 "
          f"devices, {a.warm} batches before, {a.commits} counted, {a.step_ms} ms of event time a record")
    got = {}
    for name, src in sides.items():
        out = subprocess.run([sys.executable, __file__, "--one", "--records", str(a.records), "--warm", str(a.warm),
                              "--commits", str(a.commits), "--step-ms", str(a.step_ms)],
                             capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": src})
        got[name] = json.loads(out.stdout.strip().splitlines()[-1])
    names = sorted({k for g in got.values() for k in g if k != "total"},
                   key=lambda k: -max(g.get(k, 0.0) for g in got.values()))
    print(f"  {'':32s}" + "".join(f"{n:>10s}" for n in sides))
    for k in ("total", *names):
        print(f"  {k:32s}" + "".join(f"{got[n].get(k, 0.0):10.1f}" for n in sides))
    if a.base:
        print(f"pages per commit, base / this: x{got['base']['total'] / got['this']['total']:.2f}")


if __name__ == "__main__":
    main()
