"""Processor-level cost of as-of enrichment: readings/s through ``Processor.apply_records`` into SQLite.

Both sides run in one process on the same data: bus records of readings (as the gateway writes them)
applied by a processor into a fresh SQLite store, once without an enricher (the baseline) and once with
the enricher ``fieldmesh up --enrich`` builds (``GuardedEnricher`` around ``AsOfEnricher``) over a
state of ``--keys`` assets with ``--versions`` versions each. The enriched side also stores the
enrichment (3 fields) with every reading, which is part of the cost. Sides alternate (ABBA); the
median of ``--rounds`` each is compared. Target: enrichment costs <= 20% of processor throughput.

    .venv/bin/python bench/enrich.py [--readings 100000] [--keys 2000] [--versions 3] [--rounds 4]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from fieldmesh.bus.base import BusRecord
from fieldmesh.cdc.base import ChangeEvent, SourceInfo, encode_change_event
from fieldmesh.core.codec import decode_bus_batch, decode_telemetry, encode_bus_batch, encode_reading_json
from fieldmesh.core.model import BusBatch, Reading
from fieldmesh.core.settings import ProcessorSettings, load_settings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.runtime.enrichment import Enrichment, build_enrichment
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.processor import Enricher, Processor

T0 = 1_763_800_000_000
HOUR = 3_600_000


def make_enrichment(n_keys: int, versions: int) -> Enrichment:
    settings = load_settings(enrich={"joins": "public.assets:fields=threshold,site,model:pk=id",
                                     "database": "bench"})
    enrichment = build_enrichment(settings)
    assert enrichment is not None
    records = []
    for v in range(versions):
        for k in range(n_keys):
            src = SourceInfo(connector="postgresql", db="bench", schema="public", table="assets",
                             ts_ms=T0 + v * HOUR + k, lsn=v * n_keys + k + 1, snapshot="true" if v == 0 else "false")
            after = {"id": k, "device_id": f"dev-{k:05d}", "threshold": 4.0 + v, "site": f"site-{k % 17}",
                     "model": f"P{k % 5}00"}
            ev = ChangeEvent(op="u" if v else "r", source=src, ts_ms=src.ts_ms + 2, before=None, after=after)
            records.append(BusRecord(topic="fm.cdc.bench.public.assets", partition=0, offset=len(records) + 1,
                                     value=encode_change_event(ev), key=f'{{"id":{k}}}'.encode()))
    assert enrichment.enricher.apply_change_events(records) == len(records)
    return enrichment


def make_records(n: int, n_keys: int, versions: int, per_record: int) -> list[BusRecord]:
    rnd = random.Random(7)
    readings: list[Reading] = []
    span = versions * HOUR
    for i in range(n):
        dev = f"dev-{rnd.randrange(n_keys):05d}"
        payload = encode_reading_json(dev, T0 + rnd.randrange(span), {"vib": rnd.random() * 9, "temp": 20.5},
                                      i)
        res = decode_telemetry(payload, device_id=dev, topic=f"devices/{dev}/telemetry", received_ms=T0 + span)
        readings.extend(res.readings)
    return [
        BusRecord(topic=READINGS_TOPIC, partition=j % 8, offset=j + 1,
                  value=encode_bus_batch(BusBatch(readings[i : i + per_record])))
        for j, i in enumerate(range(0, n, per_record))
    ]


def run(records: list[BusRecord], enricher: Enricher | None, fetch: int, workdir: Path, tag: str) -> float:
    store = SqliteStore(f"sqlite:///{workdir / f'{tag}.db'}")
    proc = Processor(bus=None, store=store, settings=ProcessorSettings(),  # type: ignore[arg-type]
                     enricher=enricher)
    t = time.perf_counter()
    for i in range(0, len(records), fetch):
        proc.apply_records(records[i : i + fetch])
    dt = time.perf_counter() - t
    stored = store.stats().stored
    if enricher is not None:
        sample = store.raw(device_id=None, metric=None, start_ms=None, end_ms=None, limit=50)
        assert all(r.get("enrichment", {}).get("assets.threshold") for r in sample), sample[:1]
    store.close()
    return stored / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readings", type=int, default=100_000)
    ap.add_argument("--keys", type=int, default=2_000)
    ap.add_argument("--versions", type=int, default=3)
    ap.add_argument("--per-record", type=int, default=50, help="readings per bus record (gateway batch)")
    ap.add_argument("--fetch", type=int, default=20, help="bus records per store transaction")
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()

    enrichment = make_enrichment(a.keys, a.versions)
    records = make_records(a.readings, a.keys, a.versions, a.per_record)
    # the enricher alone, without the store
    readings = [r for rec in records for r in decode_bus_batch(rec.value).readings]
    t = time.perf_counter()
    out = enrichment.enricher.enrich(readings)
    alone = time.perf_counter() - t
    assert sum(1 for r in out if r.enrichment) == len(readings)

    base: list[float] = []
    enr: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(a.rounds):  # ABBA order: drift of the machine (other load, disk) hits both sides
            sides = [("base", None), ("enr", enrichment.enricher)]
            for tag, enricher in sides if i % 2 == 0 else sides[::-1]:
                rate = run(records, enricher, a.fetch, Path(d), f"{tag}{i}")
                (base if enricher is None else enr).append(rate)
    b, e = statistics.median(base), statistics.median(enr)
    print(f"processor -> SQLite, {a.readings:,} readings ({a.per_record}/bus record, {a.fetch} records/transaction), "
          f"{a.keys:,} asset keys x {a.versions} versions, median of {a.rounds} (ABBA)")
    print(f"  without enrichment (baseline): {b:>9,.0f} readings/s   rounds {[f'{x:,.0f}' for x in base]}")
    print(f"  with as-of enrichment        : {e:>9,.0f} readings/s   rounds {[f'{x:,.0f}' for x in enr]}")
    print(f"  overhead: {1 - e / b:6.1%} of processor throughput (target <= 20%); ratio with/without {e / b:.3f}")
    us = alone / len(readings) * 1e6
    print(f"  enricher alone: {len(readings) / alone:>10,.0f} readings/s ({us:.2f} us/reading) = "
          f"{us / (1e6 / b):.1%} of the baseline's time per reading")


if __name__ == "__main__":
    main()
