"""Processor benchmark: bus records in, hot store committed; readings per CPU-second against the target.

The input is the realistic device stream of the issue: 2,000 devices sending 100 readings per message
(3 metrics each), 5% duplicates (a reading re-sent in a later message of its device), 3% arriving an
hour late (event time an hour behind the device's other readings), and disorder (10% of neighbours
swapped). Each device message goes through the real gateway code (``gateway.route``: validation,
identity, the bus encoding chosen by ``--encoding``), giving one bus record of 100 readings on the
device's partition (8 partitions). The records are built before the clock starts.

Timed: ``Processor.apply_records`` over chunks of ``fetch_max`` records (as the processor's fetch
loop hands them over): decoding, de-duplication, lateness, 1m + 1h rollups, positions, one store
transaction per chunk, and at the end the store's ``flush`` (the rollup rows SQLite still holds in memory,
written). Reported: readings per CPU-second of this process (``time.process_time``,
so other load on a shared machine counts less) and per wall second, against the issue's target of
300,000 readings per CPU-second (SQLite). Checked exact against the test suite's oracle
(``tests/fmtest/oracle.py``: stored readings, every 1m and 1h rollup row) and an independent count
of duplicates and late readings.

The garbage collector is set as a processor process sets it (``--gc worker``: ``fieldmesh.runtime.worker``
freezes what it holds at start and collects the youngest generation less often); ``--gc default`` runs with
CPython's defaults, ``--gc both`` alternates the two.

``--base SRC`` compares this checkout with another one's ``src`` on the same input (built once, by this
checkout's gateway): each side's applies run in a subprocess of their own, the sides alternated ``--sides`` times
each, and the medians are compared. On a shared machine whose speed drifts by a fifth within the hour, a pair of
single runs cannot show a change of a few percent.

``--stream e2e`` applies instead the stream of ``bench/e2e.py`` case (a) (:func:`make_e2e_stream`): the same
processing, but a (device, metric) gets a 1-minute window per 85 messages of its device rather than per 6 readings,
so the rollup rows, most of the realistic stream's cost, are few.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/processor.py [--quick] [--stream realistic|e2e] [--encoding 1|2]
[--engines columnar,reference] [--pg postgresql://postgres@127.0.0.1:5432/postgres] [--profile]
[--gc worker|default|both] [--base DIR/src [--sides 3]]``.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pickle
import pstats
import random
import resource
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the oracle of the test suite

from _common import payloads  # noqa: E402  (bench/, the script's directory)

from fieldmesh.bus.base import BusRecord  # noqa: E402
from fieldmesh.core.codec import decode_bus_columns_many, decode_bus_readings  # noqa: E402
from fieldmesh.core.settings import GatewaySettings, ProcessorSettings  # noqa: E402
from fieldmesh.gateway.base import IngestMessage  # noqa: E402
from fieldmesh.gateway.gateway import route  # noqa: E402
from fieldmesh.runtime.worker import freeze_startup_objects  # noqa: E402
from fieldmesh.store import HotStore, load_store  # noqa: E402
from fieldmesh.stream.processor import Processor  # noqa: E402
from fmtest import oracle  # noqa: E402

#: The issue's target for the processor alone, with de-duplication, lateness and 1m + 1h rollups (SQLite).
TARGET_PER_CPU_S = 300_000
PARTITIONS = 8
PER_MESSAGE = 100
CADENCE_MS = 10_000
HOUR_MS = 3_600_000
_enc = msgspec.json.Encoder()


def make_stream(
    *, devices: int, per_device: int, seed: int = 42
) -> tuple[list[tuple[str, bytes]], list[tuple[str, dict[str, Any]]], int]:
    """Device messages ``(topic, payload)`` in arrival order, the readings sent (for the oracle), and ``now_ms``.

    Arrival order interleaves devices message by message; within a device, readings are in event time
    except the swapped neighbours, the late ones (an hour behind) and the re-sent copies.
    """
    rnd = random.Random(seed)
    now = int(time.time() * 1000)
    base = (now - 4 * HOUR_MS - per_device * CADENCE_MS) // 60_000 * 60_000
    per_dev: list[list[dict[str, Any]]] = []
    for _ in range(devices):
        slots: list[tuple[float, dict[str, Any]]] = []
        for i in range(per_device):
            ts = base + HOUR_MS + i * CADENCE_MS + rnd.randrange(CADENCE_MS // 2)
            if rnd.random() < 0.03:
                ts -= HOUR_MS + rnd.randrange(60_000)  # an hour late: its windows were emitted long ago
            r = {"ts": ts, "seq": i, "boot_id": "b1",
                 "measurements": {"temperature": rnd.randint(-400, 1600) / 4,
                                  "humidity": round(30 + rnd.random() * 50, 2), "vibration": rnd.random() / 10}}
            slot = float(i) + (1.5 if rnd.random() < 0.10 else 0.0)  # arrives after its successor
            slots.append((slot, r))
            if rnd.random() < 0.05:
                slots.append((slot + 1 + rnd.random() * 150, r))  # re-sent in a later message
        slots.sort(key=lambda x: x[0])
        per_dev.append([r for _, r in slots])
    msgs: list[tuple[str, bytes]] = []
    sent: list[tuple[str, dict[str, Any]]] = []
    most = max(len(rs) for rs in per_dev)
    for k in range(0, most, PER_MESSAGE):
        for d, rs in enumerate(per_dev):
            chunk = rs[k : k + PER_MESSAGE]
            if not chunk:
                continue
            dev = f"dev-{d:05d}"
            msgs.append((f"devices/{dev}/telemetry", _enc.encode({"device_id": dev, "readings": chunk})))
            sent.extend((dev, r) for r in chunk)
    return msgs, sent, now


def make_e2e_stream(*, readings: int) -> tuple[list[tuple[str, bytes]], list[tuple[str, dict[str, Any]]], int]:
    """The stream of ``bench/e2e.py`` case (a), as its publishers send it: 500 devices, 100 readings a message (3
    metrics), every reading of a message stamped with the message's send time, 1,429 messages (142,900 readings) a
    second; no duplicates, none late. A (device, metric) gets a
    1-minute window per 85 messages of its device, where ``make_stream``'s gets one per 6 readings."""
    now = int(time.time() * 1000)
    start = now - 3 * HOUR_MS
    msgs = []
    for i, (topic, body) in enumerate(payloads(devices=500, readings=readings, per_message=PER_MESSAGE, prefix="e2e")):
        msgs.append((topic, body.replace(b'"ts":0', b'"ts":%d' % (start + i * 7 // 10))))
    sent = [(b["device_id"], r) for _, raw in msgs for b in (msgspec.json.decode(raw),) for r in b["readings"]]
    return msgs, sent, now


def expected_late(sent: list[tuple[str, dict[str, Any]]], grace_ms: int) -> int:
    """Late first occurrences, computed from the contract (the device's watermark passed the 1m window's end)."""
    wm: dict[str, int] = {}
    seen: set[tuple[Any, ...]] = set()
    late = 0
    for dev, r in sent:
        ts = r["ts"]
        w = wm.get(dev, 0)
        ident = oracle.identity(dev, r)
        if ident not in seen:
            seen.add(ident)
            late += ts // 60_000 * 60_000 + 60_000 <= w - grace_ms
        wm[dev] = max(w, ts)
    return late


def make_records(msgs: list[tuple[str, bytes]], now_ms: int, encoding: int) -> list[BusRecord]:
    """One bus record per device message, through the gateway's own routing and bus encoding."""
    gs = GatewaySettings(bus_encoding=encoding)
    offsets = [0] * PARTITIONS
    out: list[BusRecord] = []
    for topic, payload in msgs:
        recs, _, dead = route([IngestMessage(topic, payload, now_ms)], settings=gs, partitions=PARTITIONS,
                              now_ms=now_ms)
        assert not dead, dead[:1]
        for r in recs:
            offsets[r.partition] += 1
            out.append(BusRecord(topic=r.topic, partition=r.partition, offset=offsets[r.partition], value=r.value,
                                 timestamp_ms=now_ms))
    return out


def stage_rates(msgs: list[tuple[str, bytes]], records: list[BusRecord], now_ms: int, encoding: int,
                n: int) -> str:
    """Readings per CPU-second of the two stages the encoding touches: the gateway's ``route`` (validation
    + bus encoding) and the processor's decoding (into readings, as it decodes today; into columns)."""
    c0 = time.process_time()
    make_records(msgs, now_ms, encoding)
    gw = time.process_time() - c0
    c0 = time.process_time()
    for r in records:
        decode_bus_readings(r.value)
    dec = time.process_time() - c0
    fetch = ProcessorSettings().fetch_max
    c0 = time.process_time()
    for i in range(0, len(records), fetch):
        decode_bus_columns_many([r.value for r in records[i : i + fetch]])
    dec_cols = time.process_time() - c0
    return (f"stages (v{encoding}, readings/CPU-s): gateway route {n / gw:,.0f}; processor decode to readings"
            f" {n / dec:,.0f}, to one batch of columns per {fetch} records {n / dec_cols:,.0f}")


def run(store: HotStore, records: list[BusRecord], *, profile: bool, engine: str = "columnar",
        worker_gc: bool = True) -> dict[str, Any]:
    """Apply the records in fetch-sized chunks; CPU and wall seconds of the applies only.

    ``worker_gc``: the garbage collector as a processor process has it (the worker's own
    :func:`~fieldmesh.runtime.worker.freeze_startup_objects`: what the process holds before its first batch
    frozen, the youngest generation collected less often). Here what is frozen includes this benchmark's input
    (the records, the readings kept for the oracle), which a processor does not hold. Without it, CPython's
    defaults.
    """
    ps = ProcessorSettings(engine=engine)  # type: ignore[arg-type]
    p = Processor(bus=None, store=store, settings=ps)  # type: ignore[arg-type]
    chunks = [records[i : i + ps.fetch_max] for i in range(0, len(records), ps.fetch_max)]
    prof = cProfile.Profile() if profile else None
    parts0 = cpu_parts()
    thresholds = gc.get_threshold()
    if worker_gc:
        freeze_startup_objects()
    try:
        c0, w0 = time.process_time(), time.perf_counter()
        if prof is not None:
            prof.enable()
        for c in chunks:
            p.apply_records(c)
        flush = getattr(store, "flush", None)  # what the store holds is written, timed (a checkout without it: none)
        if flush is not None:
            flush()
        if prof is not None:
            prof.disable()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    finally:
        if worker_gc:  # as it was, for the next run
            gc.unfreeze()
            gc.set_threshold(*thresholds)
    out: dict[str, Any] = {"cpu_s": cpu, "wall_s": wall, "stats": p.stats, "profile": None,
                           "parts": {k: v - parts0.get(k, 0.0) for k, v in cpu_parts().items()}}
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
        out["profile"] = buf.getvalue()
    return out


def cpu_parts() -> dict[str, float]:
    """The processor's CPU seconds so far by part, from its metrics (``store`` split into the SQLite store's steps)."""
    from prometheus_client import REGISTRY

    out = {}
    for family in REGISTRY.collect():
        if family.name in ("fieldmesh_processor_cpu_seconds", "fieldmesh_processor_sqlite_cpu_seconds"):
            prefix = "" if family.name == "fieldmesh_processor_cpu_seconds" else "store/"
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[prefix + sample.labels["part"]] = sample.value
    return out


def check(store: HotStore, sent: list[tuple[str, dict[str, Any]]], late: int) -> list[str]:
    """Differences from the oracle (empty: exact)."""
    errors = []
    uniq = oracle.unique_readings(sent)
    st = store.stats()
    if (st.stored, st.duplicates, st.late) != (len(uniq), len(sent) - len(uniq), late):
        errors.append(f"stored/duplicates/late {st.stored}/{st.duplicates}/{st.late}, "
                      f"expected {len(uniq)}/{len(sent) - len(uniq)}/{late}")
    for interval in ("1m", "1h"):
        expected = oracle.rollups(sent, interval)
        got = {(r["device_id"], r["metric"], r["window_start_ms"]): r
               for r in store.rollups(interval=interval, device_id=None, metric=None, start_ms=None, end_ms=None,
                                      limit=10**7)}
        if set(got) != set(expected):
            errors.append(f"{interval}: {len(got)} windows, expected {len(expected)}")
            continue
        bad = [k for k, e in expected.items()
               if (got[k]["count"], got[k]["sum"], got[k]["min"], got[k]["max"], got[k]["avg"])
               != (e["count"], e["sum"], e["min"], e["max"], e["avg"])]
        if bad:
            errors.append(f"{interval}: {len(bad)} of {len(expected)} windows differ, e.g. {bad[0]}")
    return errors


def report(name: str, n: int, res: dict[str, Any], errors: list[str]) -> None:
    per_cpu = n / res["cpu_s"]
    print(f"{name:9s} {per_cpu:>10,.0f} readings/CPU-s ({per_cpu / TARGET_PER_CPU_S:.2f}x the 300,000 target)"
          f"  {n / res['wall_s']:>10,.0f} readings/s wall  ({res['cpu_s']:.2f} CPU-s, {res['wall_s']:.2f} s)"
          f"  {'exact' if not errors else 'NOT EXACT'}")
    for e in errors:
        print(f"          {e}")
    parts = {k: v for k, v in res["parts"].items() if v >= 0.005}
    if parts:
        print("          CPU-s by part: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))
    if res["profile"]:
        print(res["profile"])


def compare(records: list[BusRecord], sent: list[tuple[str, dict[str, Any]]], late: int, base: str,
            sides: int) -> None:
    """This checkout's applies and ``base``'s on the same records, each in a subprocess, alternated ``sides`` times
    each; every run checked exact; the medians of readings per CPU-second and their ratio."""
    checkouts = {"this": str(ROOT / "src"), "base": base}
    got: dict[str, list[float]] = {k: [] for k in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.pickle"  # plain tuples and dicts: either checkout reads them
        with path.open("wb") as f:
            pickle.dump({"records": [(r.topic, r.partition, r.offset, r.value, r.timestamp_ms) for r in records],
                         "sent": sent, "late": late}, f)
        for k in range(sides):
            for name, src in (list(checkouts.items()) if k % 2 == 0 else list(reversed(checkouts.items()))):
                out = subprocess.run([sys.executable, __file__, "--side-input", str(path)], capture_output=True,
                                     text=True, check=False, env={**os.environ, "PYTHONPATH": src})
                if out.returncode:
                    raise SystemExit(f"the {name} side ({src}) failed:\n{out.stderr[-3000:]}")
                res = json.loads(out.stdout.strip().splitlines()[-1])
                if not Path(res["fieldmesh"]).resolve().is_relative_to(Path(src).resolve()):  # (an installed one)
                    raise SystemExit(f"the {name} side imported {res['fieldmesh']}, not the fieldmesh of {src}")
                got[name].append(res["per_cpu"])
                print(f"  {name} run {k + 1}: {res['per_cpu']:,.0f} readings/CPU-s ({res['cpu_s']:.2f} CPU-s)"
                      f"  {'exact' if not res['errors'] else 'NOT EXACT: ' + '; '.join(res['errors'])}", flush=True)
    this, other = statistics.median(got["this"]), statistics.median(got["base"])
    print(f"sqlite, medians of {sides}: this {this:,.0f}, base {other:,.0f} readings/CPU-s: x{this / other:.2f}"
          f" ({this / TARGET_PER_CPU_S:.2f}x the 300,000 target)")


def side(path: Path) -> None:
    """One side of :func:`compare`: the applies on a new SQLite store, checked; one JSON line."""
    with path.open("rb") as f:
        data = pickle.load(f)
    records = [BusRecord(topic=t, partition=p, offset=o, value=v, timestamp_ms=ts)
               for t, p, o, v, ts in data["records"]]
    with tempfile.TemporaryDirectory() as tmp:
        s = load_store(f"sqlite:///{Path(tmp) / 'store.db'}")
        try:
            res = run(s, records, profile=False)
            errors = check(s, data["sent"], data["late"])
        finally:
            s.close()
    n = len(data["sent"])
    import fieldmesh

    print(json.dumps({"per_cpu": n / res["cpu_s"], "cpu_s": res["cpu_s"], "errors": errors,
                      "fieldmesh": str(Path(fieldmesh.__file__).parent)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 devices x 500 readings instead of 2,000 x 500")
    ap.add_argument("--devices", type=int, default=None)
    ap.add_argument("--per-device", type=int, default=500)
    ap.add_argument("--stream", choices=("realistic", "e2e"), default="realistic",
                    help="the issue's realistic stream (the target's), or bench/e2e.py case (a)'s (1,000,000 readings)")
    ap.add_argument("--encoding", type=int, choices=(1, 2), default=2,
                    help="bus encoding the gateway writes (2, its default)")
    ap.add_argument("--pg", default=None, help="also run PostgreSQL (an admin URL; a fresh database is made)")
    ap.add_argument("--profile", action="store_true", help="cProfile the applies: top 15 by own time")
    ap.add_argument("--gc", choices=("worker", "default", "both"), default="worker",
                    help="the garbage collector as a processor process sets it (worker), CPython's defaults, or both"
                         " alternated in this run")
    ap.add_argument("--engines", default="columnar",
                    help="stream engines to run on SQLite, comma-separated (columnar,reference: both, one sitting)")
    ap.add_argument("--base", help="another checkout's src directory: a baseline side, alternated with this one")
    ap.add_argument("--sides", type=int, default=3, help="with --base: runs of each side")
    ap.add_argument("--side-input", help=argparse.SUPPRESS)  # a side, in a subprocess: its input, pickled
    args = ap.parse_args()
    if args.side_input:
        side(Path(args.side_input))
        return
    if args.base and not (Path(args.base) / "fieldmesh" / "__init__.py").is_file():
        ap.error(f"--base {args.base}: no fieldmesh package there (give a checkout's src directory)")
    if args.base and (args.pg or args.profile or args.engines != "columnar" or args.gc != "worker"):
        ap.error("--base compares the columnar engine on SQLite with the worker's collector: no --pg, --profile,"
                 " --engines or --gc beside it")
    devices = args.devices or (200 if args.quick else 2000)

    t0 = time.perf_counter()
    if args.stream == "e2e":
        devices, args.per_device = 500, (100_000 if args.quick else 1_000_000) // 500
        msgs, sent, now = make_e2e_stream(readings=devices * args.per_device)
    else:
        msgs, sent, now = make_stream(devices=devices, per_device=args.per_device)
    records = make_records(msgs, now, args.encoding)
    late = expected_late(sent, ProcessorSettings().grace_ms)
    uniq = len(oracle.unique_readings(sent))
    n = len(sent)
    shape = "bench/e2e.py case (a)'s stream: a message's readings at one time" if args.stream == "e2e" else "disorder"
    print(f"input: {devices:,} devices x {args.per_device} readings (3 metrics), {PER_MESSAGE} per message,"
          f" {n - uniq:,} duplicates ({(n - uniq) / n:.1%}), {late:,} late ({late / n:.1%}), {shape} ="
          f" {n:,} readings in {len(records):,} bus records (encoding v{args.encoding},"
          f" {sum(len(r.value) for r in records) / n:.0f} bytes/reading); built in {time.perf_counter() - t0:.1f} s")

    if args.base:
        compare(records, sent, late, args.base, args.sides)
        return
    print(stage_rates(msgs, records, now, args.encoding, n))
    rates: dict[str, float] = {}
    gcs = {"worker": [True], "default": [False], "both": [True, False, True, False]}[args.gc]
    for engine in args.engines.split(","):
        for worker_gc in gcs:
            with tempfile.TemporaryDirectory() as tmp:
                s = load_store(f"sqlite:///{Path(tmp) / 'store.db'}")
                try:
                    res = run(s, records, profile=args.profile, engine=engine, worker_gc=worker_gc)
                    name = "sqlite" if engine == "columnar" else f"sqlite/{engine}"
                    if args.gc == "both":
                        name += "/gc-worker" if worker_gc else "/gc-default"
                    report(name, n, res, check(s, sent, late))
                    if worker_gc or args.gc == "default":  # engines compared with the collector alike
                        rates[engine] = n / res["cpu_s"]
                finally:
                    s.close()
    if len(rates) > 1 and "reference" in rates:
        print("per CPU-second vs the reference engine: "
              + ", ".join(f"{e} {r / rates['reference']:.2f}x" for e, r in rates.items() if e != "reference"))
    if args.pg:
        import psycopg

        db = f"fm_bench_{secrets.token_hex(4)}"
        with psycopg.connect(args.pg, autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{db}"')
        try:
            s = load_store(args.pg.rsplit("/", 1)[0] + f"/{db}")
            try:
                res = run(s, records, profile=args.profile)
                report("postgres", n, res, check(s, sent, late))
            finally:
                s.close()
        finally:
            with psycopg.connect(args.pg, autocommit=True) as con:
                con.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
