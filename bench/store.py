"""Hot-store write benchmark: readings/s through ``HotStore.apply`` for SQLite vs PostgreSQL.

Both stores get the same input in the same run: batches of 5,000 readings (3 metrics each) from
2,000 devices, 5% of them duplicates (re-sends of readings already in the batch or an earlier
one), with positions and watermarks, one transaction per batch as the processor writes them.
PostgreSQL is the server on 127.0.0.1:5432 (a fresh database, dropped at the end).

Run: ``.venv/bin/python bench/store.py`` (``--batches 10`` for a quick run,
``--pg postgresql://user@host:port/postgres`` for another server).
"""

from __future__ import annotations

import argparse
import random
import secrets
import tempfile
import time
from pathlib import Path

from fieldmesh.core.identity import identity_digest, identity_string
from fieldmesh.core.model import Reading
from fieldmesh.store import HotStore, load_store

BASE_MS = 1_763_812_800_000


def make_batches(
    *, batches: int, batch_size: int, devices: int, dup_rate: float, seed: int
) -> list[list[Reading]]:
    """Batches of new readings with ``dup_rate`` of re-sent ones mixed in."""
    rnd = random.Random(seed)
    seq = [0] * devices
    sent: list[Reading] = []
    out = []
    for b in range(batches):
        batch: list[Reading] = []
        n_dup = int(batch_size * dup_rate)
        for i in range(batch_size - n_dup):
            d = (b * batch_size + i) % devices
            s = seq[d]
            seq[d] += 1
            dev = f"dev-{d:05d}"
            ts = BASE_MS + s * 1000 + rnd.randrange(0, 1000)
            m: dict[str, float | bool] = {
                "temperature": round(20 + rnd.random() * 10, 3),
                "humidity": round(40 + rnd.random() * 20, 2),
                "vibration": rnd.random() / 10,
            }
            k, c = identity_digest(identity_string(dev, ts, m, seq=s, boot_id="b"))
            batch.append(Reading(dev, ts, m, k, c, seq=s, boot_id="b", received_ms=ts + 40))
        pool = sent[-50_000:] + batch
        batch += [rnd.choice(pool) for _ in range(n_dup)]
        rnd.shuffle(batch)
        sent += batch[: batch_size - n_dup]
        out.append(batch)
    return out


def run(store: HotStore, batches: list[list[Reading]]) -> tuple[float, int, int]:
    """Apply every batch; return (seconds, stored, duplicates)."""
    stored = dups = 0
    t0 = time.perf_counter()
    for i, b in enumerate(batches):
        res = store.apply(
            readings=b,
            late=[False] * len(b),
            dead_letters=[],
            positions={("fm.readings", i % 8): i},
            watermarks={("fm.readings", i % 8): max(r.ts_ms for r in b)},
        )
        stored += res.stored
        dups += res.duplicates
    return time.perf_counter() - t0, stored, dups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--dup-rate", type=float, default=0.05)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = ap.parse_args()

    import psycopg

    batches = make_batches(
        batches=args.batches, batch_size=args.batch_size, devices=args.devices, dup_rate=args.dup_rate, seed=7
    )
    n = sum(len(b) for b in batches)
    print(
        f"input: {args.batches} batches x {args.batch_size} readings (3 metrics), {args.devices} devices,"
        f" {args.dup_rate:.0%} duplicates = {n:,} readings"
    )
    results: dict[str, tuple[float, int, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        s = load_store(f"sqlite:///{Path(tmp) / 'store.db'}")
        results["sqlite"] = run(s, batches)
        s.close()
    db = f"fm_bench_{secrets.token_hex(4)}"
    with psycopg.connect(args.pg, autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{db}"')
    try:
        s = load_store(args.pg.rsplit("/", 1)[0] + f"/{db}")
        results["postgres"] = run(s, batches)
        s.close()
    finally:
        with psycopg.connect(args.pg, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    for name, (sec, stored, dups) in results.items():
        print(
            f"{name:9s} {n / sec:>10,.0f} readings/s  ({sec:.2f} s, stored {stored:,}, duplicates {dups:,})"
        )
    (a, sa, da), (b, sb, db_) = results["sqlite"], results["postgres"]
    assert (sa, da) == (sb, db_), "the two stores disagree on what is new"
    print(f"ratio postgres/sqlite: {a / b:.2f}x")


if __name__ == "__main__":
    main()
