"""CDC benchmark: PostgreSQL change events per second into the bus, and the cost of as-of enrichment.

Capture (PostgreSQL 127.0.0.1:5432 with wal_level=logical, embedded NATS JetStream):

* one transaction of 200,000 inserted rows;
* 20,000 single-row transactions.

The changes are committed while the capture is stopped (its slot holds them), then the capture is
started and timed until the bus acknowledged every change event: the figure is the capture's own
rate, not the writer's. Baseline, same run: the same number of pre-encoded change events of the
same size published straight to JetStream through the same producer (the bus's ceiling).

Enrichment: ``AsOfEnricher.enrich`` on 100,000 readings against 2,000 asset keys with 3 versions
each, against a no-op enricher (returns its input).

Run: ``.venv/bin/python bench/cdc.py`` (``--quick`` for a smaller run).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import psycopg2

from fieldmesh.bus import load_bus
from fieldmesh.bus.base import OutRecord
from fieldmesh.cdc.base import ChangeEvent, SourceInfo, encode_change_event, encode_key, key_partition
from fieldmesh.cdc.postgres import PostgresCdc
from fieldmesh.cdc.sink import CdcSink
from fieldmesh.core.model import Reading
from fieldmesh.runtime.natsserver import EmbeddedNats
from fieldmesh.stream.enrich import AsOfEnricher, AsOfJoin

PG = "postgresql://postgres@127.0.0.1:5432"
TABLE = """CREATE TABLE public.assets (id int PRIMARY KEY, device_id text NOT NULL, model text,
           vib_max float8, site text, serviced timestamptz)"""


def pg(db: str, *sql: str) -> None:
    conn = psycopg2.connect(f"{PG}/{db}")
    conn.autocommit = True
    with conn.cursor() as cur:
        for s in sql:
            cur.execute(s)
    conn.close()


async def capture(
    db: str, bus_url: str, state: Path, expect: int, *, partitions: int, batch_size: int = 2000
) -> tuple[float, int]:
    """Start the capture on a slot that holds ``expect`` changes; seconds until all are acknowledged."""
    cdc = PostgresCdc(
        dsn=f"{PG}/{db}",
        tables="public.assets",
        state_dir=state,
        slot="fmbench",
        publication="fmbench",
        snapshot="never",
        batch_size=batch_size,
    )
    await asyncio.to_thread(cdc.prepare)
    stop = asyncio.Event()
    async with load_bus(bus_url) as bus:
        sink = CdcSink(bus, partitions=partitions)
        t0 = time.perf_counter()
        task = asyncio.create_task(cdc.run(sink, stop))
        while cdc.events < expect:
            await asyncio.sleep(0.005)
            if task.done():
                task.result()
        dt = time.perf_counter() - t0
        stop.set()
        await task
    return dt, cdc.events


async def bus_baseline(bus_url: str, n: int, topic: str, partitions: int) -> float:
    """Seconds to publish ``n`` pre-encoded change events of the same shape through the same producer."""
    src = SourceInfo(
        connector="postgresql", db="bench", schema="public", table="assets", ts_ms=1, lsn=1, txId=1
    )
    recs = []
    for i in range(n):
        after = {
            "id": i,
            "device_id": f"dev-{i}",
            "model": "P100",
            "vib_max": 4.5,
            "site": "north",
            "serviced": "2024-03-01T10:00:00.000000Z",
        }
        key = encode_key(after, ("id",))
        ev = ChangeEvent(op="c", source=src, ts_ms=1, after=after)
        recs.append(
            OutRecord(
                topic=topic,
                partition=key_partition(key, partitions),
                value=encode_change_event(ev),
                key=key,
                msg_id=f"base:{uuid.uuid4().hex[:6]}:{i}",
            )
        )
    async with load_bus(bus_url) as bus:
        sink = CdcSink(bus, partitions=partitions)
        await sink.ensure_topic(topic)
        prod = bus.producer()
        t0 = time.perf_counter()
        for i in range(0, n, 5000):
            await prod.send(recs[i : i + 5000])
        return time.perf_counter() - t0


def bench_capture(big: int, small: int, partitions: int, batch_size: int) -> None:
    db = f"fm_cdc_bench_{uuid.uuid4().hex[:8]}"
    pg("postgres", f'CREATE DATABASE "{db}"')
    tmp = Path(tempfile.mkdtemp(prefix="fm-cdc-bench-"))
    srv = EmbeddedNats(store_dir=tmp / "nats")
    srv.start()
    try:
        pg(db, TABLE)
        state = tmp / "state"
        # create the slot (no snapshot), then stop: the changes below wait in the slot
        asyncio.run(capture(db, srv.url, state, 0, partitions=partitions))
        pg(
            db,
            f"INSERT INTO assets SELECT g, 'dev-' || g, 'P100', 4.5, 'north', now() "
            f"FROM generate_series(1, {big}) g",
        )
        dt, n = asyncio.run(capture(db, srv.url, state, big, partitions=partitions, batch_size=batch_size))
        base = asyncio.run(bus_baseline(srv.url, big, "fm.cdc.bench.base_big", partitions))
        print(
            f"one transaction of {big:,} rows : {n / dt:>9,.0f} change events/s ({dt:.2f} s)   "
            f"bus baseline (pre-encoded publish) {big / base:>9,.0f}/s   ratio {base / dt:.2f}   "
            f"target >= 50,000/s: {'met' if n / dt >= 50_000 else 'NOT met'}"
        )
        conn = psycopg2.connect(f"{PG}/{db}")
        with conn.cursor() as cur:
            for i in range(small):
                cur.execute("UPDATE assets SET vib_max = %s WHERE id = %s", (float(i), 1 + i % big))
                conn.commit()
        conn.close()
        dt, n = asyncio.run(capture(db, srv.url, state, small, partitions=partitions, batch_size=batch_size))
        base = asyncio.run(bus_baseline(srv.url, small, "fm.cdc.bench.base_small", partitions))
        print(
            f"{small:,} single-row transactions : {n / dt:>9,.0f} change events/s ({dt:.2f} s)   "
            f"bus baseline {small / base:>9,.0f}/s   ratio {base / dt:.2f}"
        )
    finally:
        srv.stop()
        pg("postgres", "SELECT pg_drop_replication_slot('fmbench')")
        pg("postgres", f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


class NoOp:
    def enrich(self, readings: list[Reading]) -> list[Reading]:
        return readings


def bench_enrich(n_readings: int, n_keys: int, versions: int, rounds: int) -> None:
    rnd = random.Random(3)
    t0 = 1_763_800_000_000
    enr = AsOfEnricher(
        [
            AsOfJoin(
                table="public.assets",
                fields=("model", "vib_max", "site"),
                prefix="asset.",
                pk_columns=("id",),
            )
        ]
    )
    for k in range(n_keys):
        for v in range(versions):
            src = SourceInfo(
                connector="postgresql",
                db="b",
                schema="public",
                table="assets",
                ts_ms=t0 + v * 3_600_000 + k,
                lsn=v * n_keys + k,
            )
            enr.apply(
                ChangeEvent(
                    op="u" if v else "r",
                    source=src,
                    ts_ms=0,
                    after={
                        "id": k,
                        "device_id": f"dev-{k}",
                        "model": "P100",
                        "vib_max": 4.0 + v,
                        "site": "north",
                    },
                )
            )
    span = versions * 3_600_000
    readings = [
        Reading(
            device_id=f"dev-{rnd.randrange(n_keys)}",
            ts_ms=t0 + rnd.randrange(span),
            measurements={"vib": 1.0},
            key=i,
            chk=0,
        )
        for i in range(n_readings)
    ]

    def timed(e: object) -> float:
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            out = e.enrich(readings)  # type: ignore[attr-defined]
            best = min(best, time.perf_counter() - t)
            assert len(out) == n_readings
        return best

    base = timed(NoOp())
    cost = timed(enr)
    hit = sum(1 for r in enr.enrich(readings) if r.enrichment)
    print(
        f"enrichment of {n_readings:,} readings, {n_keys:,} keys x {versions} versions: "
        f"{n_readings / cost:>10,.0f} readings/s ({cost / n_readings * 1e6:.2f} us/reading; "
        f"{hit:,} enriched)   "
        f"no-op enricher {base * 1e3:.3f} ms per {n_readings:,}"
    )
    for proc_rate in (50_000, 100_000, 200_000):
        share = (cost / n_readings) / (1 / proc_rate + cost / n_readings)
        print(
            f"   a processor doing {proc_rate:>7,} readings/s without enrichment would lose {share:5.1%} "
            f"of its throughput to it (target <= 20%)"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="20k-row transaction, 2k single-row transactions")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8000, help="changes per bus send")
    a = ap.parse_args()
    big, small = (20_000, 2_000) if a.quick else (200_000, 20_000)
    bench_capture(big, small, a.partitions, a.batch_size)
    bench_enrich(100_000, 2_000, 3, 3 if a.quick else 7)


if __name__ == "__main__":
    main()
