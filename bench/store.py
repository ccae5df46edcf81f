"""Hot-store write benchmark: the store's share of ``HotStore.commit``, SQLite vs PostgreSQL.

Both stores get the same input in the same run: batches of 5,000 readings (3 metrics each) from
2,000 devices, 5% of them duplicates (re-sends of readings already in the batch or an earlier
one), with positions and watermarks, one transaction per batch as the processor writes them.
PostgreSQL is the server on 127.0.0.1:5432 (a fresh database, dropped at the end).

Each batch is decided before the clock starts (``stream.reference.settle`` against an in-memory
claim store that logs its calls); timed is ``commit`` with a ``build`` that replays those claim calls
against the store's transaction (checking the answers) and returns the decided result. So the figures
are the store alone: claims, raw rows, rollup merges, devices, seq gaps, counters, positions, commit.
Reported per reading in CPU microseconds of this process (``time.process_time``; PostgreSQL's server
CPU is not in it) and wall; ``--profile`` splits the SQLite time by stage (cProfile).

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/store.py [--batches 10] [--no-pg] [--profile]``
(``--pg postgresql://user@host:port/postgres`` for another server).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the in-memory claim store
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/processor.py's input

from fieldmesh.core.batch import BatchResult, ReadingColumns
from fieldmesh.core.identity import identity_digest, identity_string
from fieldmesh.core.model import Reading
from fieldmesh.core.settings import ProcessorSettings
from fieldmesh.store import INTERVALS, HotStore, load_store
from fieldmesh.store.base import HotTxn
from fieldmesh.stream import reference
from fieldmesh.stream.base import StreamState
from fmtest.claims import ClaimStore

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


class LoggedClaims(ClaimStore):
    """An in-memory claim store that keeps every call and its answers (to replay against a store)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64], NDArray[np.int8]]] = []

    def __call__(
        self, keys: NDArray[np.int64], chks: NDArray[np.int64], origins: NDArray[np.int64]
    ) -> NDArray[np.int8]:
        got = super().__call__(keys, chks, origins)
        self.log.append((keys, chks, origins, got))
        return got


def decide(batches: list[list[Reading]]) -> list[tuple[BatchResult, list[Any]]]:
    """Each batch decided (no origins), with the claim calls that decided it."""
    claims = LoggedClaims()
    out = []
    for i, b in enumerate(batches):
        claims.log = []
        cols = ReadingColumns.from_readings(b)
        res = reference.settle(
            cols, np.zeros(len(b), np.bool_), np.full(len(b), -1, np.int64), claims, intervals=INTERVALS,
            positions={("fm.readings", i % 8): i}, watermarks={("fm.readings", i % 8): int(cols.ts_ms.max())},
        )  # fmt: skip
        out.append((res, claims.log))
    return out


def decide_records(devices: int) -> tuple[int, list[tuple[BatchResult, list[Any]]]]:
    """bench/processor.py's input (its device stream through the gateway, bus encoding v2), decided by the
    reference engine in the processor's fetch-sized chunks, the stream state carried from chunk to chunk."""
    import processor as bp  # bench/processor.py

    msgs, sent, now = bp.make_stream(devices=devices, per_device=500)
    records = bp.make_records(msgs, now, 2)
    ps = ProcessorSettings()
    claims = LoggedClaims()
    state = StreamState({}, {}, {})
    out = []
    for i in range(0, len(records), ps.fetch_max):
        claims.log = []
        batch = reference.decode(records[i : i + ps.fetch_max], state)
        res = reference.decide(batch, state, claims, grace_ms=ps.grace_ms, intervals=INTERVALS)
        out.append((res, claims.log))
        state = StreamState({**state.positions, **res.positions}, {**state.watermarks, **res.watermarks},
                            {**state.device_watermarks, **res.device_watermarks})
    return len(sent), out


def run(
    store: HotStore, decided: list[tuple[BatchResult, list[Any]]], prof: cProfile.Profile | None
) -> tuple[float, float]:
    """Commit every decided batch; return (CPU seconds, wall seconds)."""

    def build(res: BatchResult, log: list[Any]) -> Callable[[HotTxn], BatchResult]:
        def replay(txn: HotTxn) -> BatchResult:
            for keys, chks, origins, expected in log:
                got = txn.claim_keys(keys, chks, origins)
                assert (got == expected).all(), "the store answers claims unlike the in-memory claim store"
            return res

        return replay

    c0, t0 = time.process_time(), time.perf_counter()
    if prof is not None:
        prof.enable()
    for res, log in decided:
        store.commit(build(res, log), ts_ms=res.new.ts_ms)
    if prof is not None:
        prof.disable()
    return time.process_time() - c0, time.perf_counter() - t0


def stages(prof: cProfile.Profile) -> dict[str, float]:
    """CPU seconds per store stage, from the profile (cumulative time of each stage's function)."""
    st = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    cum = {f"{Path(k[0]).name}:{k[2]}": v[3] for k, v in st.items()}
    names = {
        "claims (claim_keys: Bloom filter, lookups, idents insert)": "sqlite.py:claim_keys",
        "rollup merges (1m + 1h)": "sqlite.py:_merge_rollups",
        "devices + device_metrics": "sqlite.py:_update_devices",
        "seq gaps": "sqlite.py:_update_gaps",
        "raw segments": "segments.py:append",
    }
    out = {label: cum.get(fn, 0.0) for label, fn in names.items()}
    out["devices + device_metrics"] += cum.get("batchrows.py:device_aggs", 0.0)
    out["seq gaps"] += cum.get("seqgaps.py:seq_batch", 0.0)
    write = cum.get("sqlite.py:_write_result", 0.0)
    out["counters, positions, watermarks, DLQ"] = write - sum(
        v for k, v in out.items() if not k.startswith("claims"))
    claims = out["claims (claim_keys: Bloom filter, lookups, idents insert)"]
    out["commit + begin + caches"] = cum.get("sqlite.py:commit", 0.0) - write - claims
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--dup-rate", type=float, default=0.05)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--no-pg", action="store_true", help="SQLite only")
    ap.add_argument("--input", choices=("batches", "processor"), default="batches",
                    help="batches: 5,000 readings of 2,000 devices each; processor: bench/processor.py's stream")
    ap.add_argument("--profile", action="store_true", help="split the SQLite time by stage")
    args = ap.parse_args()

    if args.input == "processor":
        n, decided = decide_records(args.devices)
        print(f"input: bench/processor.py's stream, {args.devices} devices x 500 readings = {n:,} readings,"
              f" {len(decided)} commits")
    else:
        batches = make_batches(
            batches=args.batches, batch_size=args.batch_size, devices=args.devices, dup_rate=args.dup_rate, seed=7
        )
        n = sum(len(b) for b in batches)
        print(
            f"input: {args.batches} batches x {args.batch_size} readings (3 metrics), {args.devices} devices,"
            f" {args.dup_rate:.0%} duplicates = {n:,} readings"
        )
        decided = decide(batches)
    rows = {i: sum(len(r.windows[i]) for r, _ in decided) for i in INTERVALS}
    print("rollup rows merged per reading: " + ", ".join(f"{i} {v / n:.2f}" for i, v in rows.items()))
    stored = sum(r.counts["stored"] for r, _ in decided)
    print(f"decided before timing: stored {stored:,}, duplicates {n - stored:,}")
    results: dict[str, tuple[float, float]] = {}
    prof = cProfile.Profile() if args.profile else None
    with tempfile.TemporaryDirectory() as tmp:
        s = load_store(f"sqlite:///{Path(tmp) / 'store.db'}")
        results["sqlite"] = run(s, decided, prof)
        assert s.stats().stored == stored
        s.close()
    if not args.no_pg:
        import psycopg

        db = f"fm_bench_{secrets.token_hex(4)}"
        with psycopg.connect(args.pg, autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{db}"')
        try:
            s = load_store(args.pg.rsplit("/", 1)[0] + f"/{db}")
            results["postgres"] = run(s, decided, None)
            assert s.stats().stored == stored
            s.close()
        finally:
            with psycopg.connect(args.pg, autocommit=True) as con:
                con.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    for name, (cpu, wall) in results.items():
        print(f"{name:9s} {cpu / n * 1e6:6.2f} CPU-us/reading ({n / cpu:>9,.0f} readings/CPU-s)"
              f"  {wall / n * 1e6:6.2f} wall-us/reading ({n / wall:>9,.0f}/s)")
    if prof is not None:
        print("SQLite, CPU-us per reading by stage (cProfile, so inflated; shares are what matter):")
        for label, sec in stages(prof).items():
            print(f"  {label:58s} {sec / n * 1e6:6.2f}")


if __name__ == "__main__":
    main()
