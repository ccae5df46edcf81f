"""Alerts benchmark, both sides in one run, printed as ratios against the issue's targets.

1. **Processor cost of the rules**: the processor benchmark's realistic stream (bench/processor.py: 5%
   duplicates, 3% an hour late, disorder; 3 metrics a reading, 100 readings a message) from 10,000 devices,
   applied with ``Processor.apply_records`` on a SQLite store, without alerts and with 5 rules (3 thresholds,
   one with ``for_s``; a rate; an absence) evaluated in each batch's transaction, in ``--rounds`` pairs (3)
   one after the other, after a run not counted. Timed in CPU seconds of this process (and wall); the figure
   is the median of the pairs' ratios (a single pair gave anything from -21% to +23% on the shared machine).
   Target: throughput with rules >= 80% of without (cost <= 20%).
2. **Event -> notification latency**: a real nats-server, the processor as its own process
   (``fieldmesh.runtime.worker processor``, its notifier thread inside) and a webhook receiver (an HTTP
   server in a process of its own). The pipeline's maximum rate is measured first (a backlog published at
   once, timed until stored: 200,000 readings, ``--burst`` changes it; its messages cross the threshold as the
   stream's do, so the maximum is that of the same work, alerts and notifications included; they are delivered
   before the stream starts and not measured; ``--quiet-backlog``: none crosses, as before 2026-12-06, when the
   maximum left out the alerts' transitions), then device messages are published
   at half of it, each of 10 readings 1 ms apart, the last one's event time the moment the message is built
   (it is sent with the others due then, a few milliseconds later at most), a version-1 bus record per
   message. The publisher builds each reading as the gateway would (``device_reading``: identity included;
   checked against the gateway's decoding at the start), because it shares the machine with the pipeline it
   measures. ``--gateway-rounds``: the messages
   sent at once go out as a gateway writes a round instead, one record per partition in the gateway's default
   (columnar) encoding; the maximum rate is then about twice as high, because the gateway's own work is not
   in this pipeline. In 5% of the messages the last reading crosses the threshold (the readings before it
   stay on the other side), so the reading that opens or clears an alert is the one taken when its message
   is published. Latency = the receiver's clock at the POST minus the event time of that reading (both on
   this host). Target: p99 <= 100 ms. The processor runs with its default settings (``--fetch-max``,
   ``--fetch-max-bytes`` and ``--min-batch-interval-ms`` change them). Printed with it: the rate, p50/p99/max
   against the target, and where the time went: event -> evaluated in its batch's
   transaction (the body's ``at_ms``), commit -> the receiver's 2xx (the notifier's own count, logged when
   the processor stops), the store's view (outbox row written -> acknowledged) and the CPU of the publisher,
   of the processor and of the whole machine while sending; then the CPU a reading of the processor's applying
   thread by part (``fieldmesh_processor_cpu_seconds``, read from its multiprocess metric files) for the backlog
   and for the stream, and their ratio: a reading of the stream's small batches costs more than one of the
   backlog's large batches, so half the maximum is not half the load.
   ``--repeat N`` runs part 2 N times, each with a pipeline of its own and its maximum measured anew, and
   reports the medians with their spread: on this shared 2-core machine one run's p99 at half the maximum
   varied from 146 to 832 ms within two hours (20 runs of the same code), and the maximum from 113,780 to
   166,867 readings/s.
   ``--sustained`` sets the stream's rate at half the maximum *sustained* rate instead: after the backlog, the
   stream runs in five 8-second steps, bisecting between a quarter of the backlog's rate and all of it; a rate
   is sustained when, as its step ends, what was sent and not stored yet is at most half a second of it. The
   backlog's rate is that of large batches; a stream at a given rate comes in smaller ones, which cost more a
   reading, so the sustained maximum is the lower, and half of it is half the load.
   ``--curve 0.2,0.3,0.4,0.5`` measures the latency against the rate instead of at one rate: a step of the
   stream's length at each of those fractions of the maximum (of the sustained maximum with ``--sustained``), in
   order, in the same pipeline, each with its own p50/p99, batch size, CPU a reading and processor CPU, drawn as
   a bar a step; then the highest rate that met p99 <= 100 ms. The figures at the top are the step's at half.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/alerts.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import percentile  # noqa: E402
from processor import make_records, make_stream  # noqa: E402

from fieldmesh.bus import OutRecord, load_bus  # noqa: E402
from fieldmesh.bus.base import BusRecord  # noqa: E402
from fieldmesh.core.batch import ReadingColumns  # noqa: E402
from fieldmesh.core.codec import decode_telemetry, encode_bus_batch, encode_bus_columns, encode_reading_json  # noqa: E402
from fieldmesh.core.identity import identity_digest, identity_string  # noqa: E402
from fieldmesh.core.model import BusBatch, Reading  # noqa: E402
from fieldmesh.core.settings import ProcessorSettings, Settings  # noqa: E402
from fieldmesh.core.topics import READINGS_TOPIC, partition_for  # noqa: E402
from fieldmesh.runtime.natsserver import EmbeddedNats  # noqa: E402
from fieldmesh.runtime.worker import ensure_topics  # noqa: E402
from fieldmesh.store.alerts import AlertTables  # noqa: E402
from fieldmesh.store.sqlite import SqliteStore  # noqa: E402
from fieldmesh.stream.alerting import AlertEngine  # noqa: E402
from fieldmesh.stream.alerts import parse_rule  # noqa: E402
from fieldmesh.stream.processor import Processor  # noqa: E402

RULES = [
    {"name": "hot", "kind": "threshold", "metric": "temperature", "op": ">", "value": 399, "clear_value": 300,
     "severity": "major"},
    {"name": "humid", "kind": "threshold", "metric": "humidity", "op": ">", "value": 79.5, "clear_value": 70,
     "for_s": 60},
    {"name": "shaky", "kind": "threshold", "metric": "vibration", "op": ">", "value": 0.0999, "clear_value": 0.09,
     "severity": "minor"},
    {"name": "humidity-jump", "kind": "rate", "metric": "humidity", "op": ">", "value": 290, "per": "min"},
    {"name": "silent", "kind": "absence", "after_s": 600},
]
PARTITIONS = 8


def throughput(records: list[BusRecord], n_readings: int, rules: bool, fetch_max: int,
               targets: bool = False) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        url = f"sqlite:///{d}/hot.db"
        if rules:
            t = AlertTables(url)
            hook = {"notify": [{"webhook": "http://127.0.0.1:9/hook"}]} if targets else {}
            for body in RULES:  # with targets: each transition writes an outbox row (nothing delivers them here)
                t.put_rule(parse_rule({**body, **hook}), actor="bench")
            t.close()
        store = SqliteStore(url)
        engine = AlertEngine(store) if rules else None
        proc = Processor(bus=None, store=store, settings=ProcessorSettings(fetch_max=fetch_max),  # type: ignore[arg-type]
                         alerts=engine)
        c0, w0 = time.process_time(), time.perf_counter()
        for s in range(0, len(records), fetch_max):
            proc.apply_records(records[s:s + fetch_max])
        flush = getattr(store, "flush", None)  # what the store still holds is written, timed (older code: none)
        if flush is not None:
            flush()
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        opened = engine.stats.opened if engine else 0
        cleared = engine.stats.cleared if engine else 0
        store.close()
    return {"cpu_s": cpu, "wall_s": wall, "per_cpu_s": n_readings / cpu, "per_wall_s": n_readings / wall,
            "opened": opened, "cleared": cleared}


def receiver_main(out: str) -> None:
    """The webhook receiver, a process of its own (the publisher's work would delay it in this one): prints
    its port, appends ``latency_ms notification_id`` per first delivery of an id to ``out``."""
    seen: set[str] = set()
    f = open(out, "a", buffering=1)  # noqa: SIM115 - for the process's life

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: no connection per notification

        def do_POST(self) -> None:
            at = time.time() * 1000
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            a = body["alert"]
            ts = a["opened_ts_ms"] if body["event"] == "open" else a["cleared_ts_ms"]
            if body["notification_id"] not in seen:
                seen.add(body["notification_id"])
                f.write(f"{at - ts:.3f} {body['notification_id']} {body['at_ms'] - ts}\n")
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # the default 5 drops connections under a burst: 1 s SYN retries

    server = Server(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


class Receiver:
    """:func:`receiver_main` in a subprocess."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen([sys.executable, __file__, "--receiver", str(out)], stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}/hook"

    def latencies(self, field: int = 0) -> list[float]:
        """Per notification received: event -> received (``field`` 0) or event -> evaluated (2), ms."""
        if not self.out.exists():
            return []
        return [float(line.split()[field]) for line in self.out.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def device_reading(dev: str, ts_ms: int, temperature: float, seq: int, received_ms: int) -> Reading:
    """The reading the gateway makes of ``{"device_id": dev, "ts": ts_ms, "seq": seq, "measurements":
    {"temperature": temperature}}`` received at ``received_ms``, built directly: the publisher shares the
    machine with the pipeline it measures, and the gateway's decoding (JSON, validation) cost it 4.4 CPU-µs a
    reading against 2.4 (at half the maximum rate, about a fifth of a core). :func:`check_device_reading`
    checks it against the gateway's own decoding."""
    m = {"temperature": temperature}
    key, chk = identity_digest(identity_string(dev, ts_ms, m, seq))
    return Reading(dev, ts_ms, m, key, chk, seq, received_ms=received_ms)


def check_device_reading() -> None:
    """:func:`device_reading` gives what the gateway decodes from the same payload (or the run stops)."""
    for i in range(100):
        dev, ts, v = f"lat-{i:05d}", 1_764_950_000_000 + i, 20 + i / 7
        p = encode_reading_json(dev, ts, {"temperature": v}, i)
        got = decode_telemetry(p, device_id=dev, topic=f"devices/{dev}/telemetry", received_ms=ts + 3).readings
        if got != [device_reading(dev, ts, v, i, ts + 3)]:
            raise SystemExit(f"the publisher's readings differ from the gateway's: {got} != "
                             f"{device_reading(dev, ts, v, i, ts + 3)}")


def latency(seconds: float, devices: int, burst: int, fixed_rate: float | None = None,
            processor: dict[str, Any] | None = None, gateway_rounds: bool = False,
            quiet_backlog: bool = False, sustained: bool = False,
            curve: list[float] | None = None) -> dict[str, Any]:
    """The pipeline's maximum rate first (a backlog of ``burst`` readings, published at once and timed until
    stored), then half that rate for ``seconds``; latencies of the notifications received. The backlog's
    messages cross the threshold as the stream's do (its alerts open and clear, and are notified, before the
    stream starts; not measured); ``quiet_backlog``: none crosses (before 2026-12-06). ``sustained``: the stream
    runs at half the maximum sustained rate instead, found by bisection (:data:`SUSTAINED_STEPS` steps of
    :data:`SUSTAINED_STEP_S` seconds between a quarter of the backlog's rate and all of it: a rate is sustained
    when, as its step ends, what was sent and not stored yet is at most :data:`SUSTAINED_BEHIND_S` seconds of it).
    ``curve``: instead of one stream, one step of ``seconds`` at each of these fractions of the maximum (of the
    sustained maximum with ``sustained``), in order, each with its own latencies, CPU and batches (``"curve"`` in
    the result); the figures at the top are those of the step at half, else of the last.

    A version-1 bus record per device message; with ``gateway_rounds`` the messages of one send go out as a
    gateway writes a round: a record per partition in the gateway's default encoding (columnar), 512 messages
    at most a record."""
    check_device_reading()
    with tempfile.TemporaryDirectory() as d:
        receiver = Receiver(Path(d) / "latencies.txt")
        url = f"sqlite:///{d}/hot.db"
        t = AlertTables(url)
        t.put_rule(parse_rule({"name": "hot", "kind": "threshold", "metric": "temperature", "op": ">", "value": 30,
                               "clear_value": 28, "notify": [{"webhook": receiver.url}]}), actor="bench")
        nats = EmbeddedNats(store_dir=Path(d) / "nats")
        nats.start()
        cfg = {"bus_url": nats.url, "store_url": url,
               "settings": {"bus": {"partitions": PARTITIONS}, "processor": processor or {}}}
        metrics_dir = Path(d) / "metrics"  # the processor's counters (prometheus-client's multiprocess files)
        metrics_dir.mkdir()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        log = open(Path(d) / "processor.log", "ab")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([sys.executable, "-m", "fieldmesh.runtime.worker", "processor", json.dumps(cfg)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        per_record = 10
        rnd = random.Random(1)
        sent = 0
        transitions = 0

        reader: list[SqliteStore] = []
        measured: dict[str, float] = {}
        hot = [False] * devices  # each device's side of the threshold
        skip = [0]  # the notifications received before the stream (the backlog's, the bisection's): not measured
        steps: list[tuple[float, float]] = []  # the bisection of the sustained rate: (rate, seconds behind)
        phases: dict[str, dict[str, float]] = {}
        steps_out: list[dict[str, Any]] = []  # ``curve``: a step's rate, latencies, CPU and batches

        def stored() -> int:
            if not reader:
                reader.append(SqliteStore(url, readonly=True))
            return reader[0].stats().stored

        def message(dev_i: int, now: int, hot_now: bool, crossing: bool = False) -> tuple[str, list[Reading]]:
            """A device's message of ``per_record`` readings 1 ms apart, the last at ``now``; on a ``crossing``
            only the last is on the new side, so the reading that opens or clears an alert is the one taken
            at publication (the earlier ones would count the device's own batching as latency)."""
            nonlocal seq
            dev = f"lat-{dev_i:05d}"
            rs = []
            for k in range(per_record):
                side = hot_now if k == per_record - 1 or not crossing else not hot_now
                v = rnd.uniform(31, 35) if side else rnd.uniform(20, 27)
                seq += 1
                rs.append(device_reading(dev, now - per_record + k + 1, v, seq, now))
            return dev, rs

        def records(msgs: list[tuple[str, list[Reading]]]) -> list[OutRecord]:
            """Bus records of messages sent at once: one per message, or a gateway round's (``gateway_rounds``)."""
            if not gateway_rounds:
                return [OutRecord(READINGS_TOPIC, partition_for(dev, PARTITIONS), encode_bus_batch(BusBatch(rs)),
                                  msg_id=f"l-{rs[-1].seq}") for dev, rs in msgs]
            out = []
            for s in range(0, len(msgs), 512):
                by_part: dict[int, list[Reading]] = {}
                for dev, rs in msgs[s:s + 512]:
                    by_part.setdefault(partition_for(dev, PARTITIONS), []).extend(rs)
                out += [OutRecord(READINGS_TOPIC, p, encode_bus_columns(ReadingColumns.from_readings(rs),
                                                                        produced_ms=int(time.time() * 1000)),
                                  msg_id=f"l-{rs[-1].seq}-{p}") for p, rs in by_part.items()]
            return out

        seq = 0
        bursts: list[int] = []  # messages per send: a publisher that fell behind catches up at once
        loop_gaps: list[float] = []

        async def publish() -> None:
            nonlocal sent, transitions
            async with load_bus(nats.url) as bus:
                await ensure_topics(bus, Settings(bus={"partitions": PARTITIONS}))  # type: ignore[arg-type]
                prod = bus.producer()
                await asyncio.sleep(3)  # the processor starts
                backlog_msgs = []
                for _ in range(burst // per_record):
                    dev_i = rnd.randrange(devices)
                    crossing = not quiet_backlog and rnd.random() < 0.05  # as in the stream below
                    if crossing:
                        hot[dev_i] = not hot[dev_i]
                        measured["backlog_transitions"] = measured.get("backlog_transitions", 0) + 1
                    backlog_msgs.append(message(dev_i, int(time.time() * 1000), hot[dev_i], crossing))
                backlog = records(backlog_msgs)
                del backlog_msgs
                base = stored()
                parts0 = cpu_parts(metrics_dir)
                t0 = time.perf_counter()
                for s in range(0, len(backlog), 500):
                    await prod.send(backlog[s:s + 500])
                while stored() - base < burst:
                    await asyncio.sleep(0.05)
                measured["max_rate"] = burst / (time.perf_counter() - t0)
                phases["backlog"] = phase(parts0, cpu_parts(metrics_dir), stored() - base)
                # the backlog's notifications delivered before the stream starts; only the stream's are measured
                end = time.monotonic() + 60
                while len(receiver.latencies()) < measured.get("backlog_transitions", 0) and time.monotonic() < end:
                    await asyncio.sleep(0.05)
                skip[0] = len(receiver.latencies())
                if skip[0] < measured.get("backlog_transitions", 0):
                    print(f"  (only {skip[0]} of the backlog's {measured['backlog_transitions']:.0f} notifications "
                          "came within 60 s; the rest will count as the stream's)", flush=True)
                del backlog
                gc.collect()
                gc.freeze()  # what this process holds stays out of the collector's full passes (publisher stalls)
                rate_per_s = measured["max_rate"] / 2 if fixed_rate is None else fixed_rate
                if sustained:  # the highest rate the stream keeps up with, by bisection; half of it measured
                    lo, hi = 0.25 * measured["max_rate"], measured["max_rate"]
                    for _ in range(SUSTAINED_STEPS):
                        r = (lo + hi) / 2
                        s0 = stored()
                        n, crossings = await stream_at(prod, r, SUSTAINED_STEP_S, measure=False)
                        behind_s = (n - (stored() - s0)) / r  # what was sent and not stored yet, in seconds of it
                        steps.append((r, behind_s))
                        lo, hi = (r, hi) if behind_s <= SUSTAINED_BEHIND_S else (lo, r)
                        await settle(s0 + n, skip[0] + crossings)
                    measured["sustained"] = lo
                    rate_per_s = lo / 2 if fixed_rate is None else fixed_rate
                    print("  sustained: " + ", ".join(f"{r:,.0f}/s {b * 1000:,.0f} ms behind" for r, b in steps)
                          + f"; the maximum sustained {lo:,.0f} readings/s", flush=True)
                print(f"  maximum rate through the bus: {measured['max_rate']:,.0f} readings/s; now "
                      + (f"{seconds:.0f} s at each of {', '.join(f'{f:.2f}' for f in curve)} of the "
                         + ("sustained maximum" if sustained else "maximum") if curve
                         else f"at {rate_per_s:,.0f}/s for {seconds:.0f} s"), flush=True)
                if curve:
                    top = measured.get("sustained") or measured["max_rate"]
                    for f in curve:
                        r = f * top
                        await settle(stored(), skip[0])  # the step before stored and notified: not this one's
                        first, cpu0, parts0, base = skip[0], cpu_now(), cpu_parts(metrics_dir), stored()
                        t0 = time.perf_counter()
                        n, crossings = await stream_at(prod, r, seconds, measure=True)
                        cpu = {k[4:]: (v - cpu0[k]) / (time.perf_counter() - t0) for k, v in cpu_now().items()}
                        ph = phase(parts0, cpu_parts(metrics_dir), stored() - base)
                        await settle(base + n, first + crossings)
                        lat = receiver.latencies()[first:skip[0]]
                        steps_out.append({"fraction": f, "rate": r, "sent": n, "transitions": crossings,
                                          "span": (first, skip[0]), "p50": percentile(lat, 50),
                                          "p99": percentile(lat, 99), "cpu": cpu, "phase": ph})
                        print(f"    {f:.2f} of it, {r:,.0f}/s: p50 {percentile(lat, 50):.1f} ms, p99 "
                              f"{percentile(lat, 99):.1f} ms, {ph['readings'] / max(ph['batches'], 1):,.0f} "
                              f"readings a batch, {ph['total']:.2f} CPU-us a reading", flush=True)
                    return
                cpu0 = cpu_now()
                parts0, base = cpu_parts(metrics_dir), stored()
                t0 = time.perf_counter()
                sent, transitions = await stream_at(prod, rate_per_s, seconds, measure=True)
                measured.update({k: (v - cpu0[k]) / (time.perf_counter() - t0) for k, v in cpu_now().items()})
                phases["live"] = phase(parts0, cpu_parts(metrics_dir), stored() - base)

        async def stream_at(prod: Any, rate: float, secs: float, measure: bool) -> tuple[int, int]:
            """Device messages at ``rate`` readings/s for ``secs``; returns the readings sent and the threshold
            crossings. ``measure``: the publisher's own figures are kept (its loop's intervals, messages a send)."""
            n = crossings = 0
            t0, last = time.perf_counter(), 0.0
            while (el := time.perf_counter() - t0) < secs:
                if measure:
                    loop_gaps.append(el - last)
                last = el
                due = int(el * rate / per_record) - n // per_record
                msgs = []
                for _ in range(max(0, due)):
                    dev_i = rnd.randrange(devices)
                    crossing = rnd.random() < 0.05  # its last reading on the other side, the next ones too
                    if crossing:
                        hot[dev_i] = not hot[dev_i]
                        crossings += 1
                    msgs.append(message(dev_i, int(time.time() * 1000), hot[dev_i], crossing))
                    n += per_record
                if msgs:
                    if measure:
                        bursts.append(len(msgs))
                    await prod.send(records(msgs))
                await asyncio.sleep(0.002)
            return n, crossings

        async def settle(stored_at_least: int, notified: int) -> None:
            """Wait (at most 120 s) until the store holds ``stored_at_least`` and the receiver got ``notified``
            notifications; these are not measured."""
            end = time.monotonic() + 120
            while (stored() < stored_at_least or len(receiver.latencies()) < notified) and time.monotonic() < end:
                await asyncio.sleep(0.05)
            skip[0] = len(receiver.latencies())

        def cpu_now() -> dict[str, float]:
            """CPU seconds so far: this process (the publisher), the processor's, and the machine's busy ones."""
            machine = psutil.cpu_times()
            t = psutil.Process(proc.pid).cpu_times()
            return {"cpu_publisher": time.process_time(), "cpu_processor": t.user + t.system,
                    "cpu_machine": machine.user + machine.system + machine.nice + machine.irq + machine.softirq}

        try:
            asyncio.run(publish())
            end = time.monotonic() + 60
            while len(receiver.latencies()) < skip[0] + transitions * 0.99 and time.monotonic() < end:
                time.sleep(0.2)
            time.sleep(1)
            st = t.stats()
        finally:
            for r in reader:
                r.close()
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
            nats.stop()
            t.close()
            # the stream's notifications (those before it are not measured); with ``curve``, the main step's
            head = next((st for st in steps_out if st["fraction"] == 0.5), steps_out[-1]) if steps_out else None
            a, b = head["span"] if head else (skip[0], None)
            lat = receiver.latencies()[a:b]
            evaluated = receiver.latencies(2)[a:b]
            sent_line = [line for line in (Path(d) / "processor.log").read_text().splitlines()
                         if "notifier stopped:" in line]
            receiver.close()
    if head is not None:  # the figures at the top: the step at half the maximum, else the last
        phases["live"] = head["phase"]
        measured.update({f"cpu_{k}": v for k, v in head["cpu"].items()})
        sent, transitions = head["sent"], head["transitions"]
    return {"max_rate": measured.get("max_rate", 0.0), "sustained": measured.get("sustained"), "sent": sent,
            "transitions": transitions,
            "received": len(lat), "p50": percentile(lat, 50),
            "p99": percentile(lat, 99), "max": max(lat) if lat else float("nan"), "stats": st,
            "evaluated": (percentile(evaluated, 50), percentile(evaluated, 99)),
            "publisher": (percentile([g * 1000 for g in loop_gaps], 99), max(loop_gaps, default=0) * 1000,
                          max(bursts, default=0), percentile(bursts, 50) if bursts else 0),
            "cpu": {k[4:]: measured.get(k, float("nan")) for k in ("cpu_publisher", "cpu_processor", "cpu_machine")},
            "phases": phases, "curve": steps_out,
            "notifier": sent_line[-1].split("notifier stopped: ", 1)[1] if sent_line else "(no summary logged)"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer readings (a smoke run)")
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--rate", type=float, help="part 2 at this many readings/s instead of half the maximum")
    ap.add_argument("--latency-only", action="store_true", help="part 2 only")
    ap.add_argument("--throughput-only", action="store_true", help="part 1 only")
    ap.add_argument("--rounds", type=int, default=3, help="part 1: pairs without and with rules, alternated")
    ap.add_argument("--targets", action="store_true",
                    help="part 1: each rule with a webhook target (an outbox row per transition, none delivered)")
    ap.add_argument("--fetch-max", type=int, help="part 2: the processor's fetch_max (records per fetch)")
    ap.add_argument("--fetch-max-bytes", type=int, help="part 2: the processor's fetch_max_bytes")
    ap.add_argument("--min-batch-interval-ms", type=float, help="part 2: the processor's min_batch_interval_ms")
    ap.add_argument("--sustained", action="store_true",
                    help="part 2: the stream at half the maximum sustained rate (the highest rate it keeps up with, "
                         "by bisection) instead of half the backlog's rate")
    ap.add_argument("--quiet-backlog", action="store_true",
                    help="part 2: no message of the backlog that measures the maximum crosses the threshold (as "
                         "before 2026-12-06); by default they cross as the stream's do")
    ap.add_argument("--gateway-rounds", action="store_true",
                    help="part 2: the messages sent at once as a gateway writes them (a columnar record per "
                         "partition), not a version-1 record per message")
    ap.add_argument("--burst", type=int, help="part 2: readings of the backlog that measures the maximum rate "
                                              "(200,000; 50,000 with --quick)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="part 2: this many runs, each with its pipeline and maximum measured anew; the medians and "
                         "the spread are reported (one run's p99 varies widely on this shared machine)")
    ap.add_argument("--curve", metavar="FRACTIONS",
                    help="part 2: the latency against the rate instead of one stream: a step at each of these "
                         "fractions of the maximum (of the sustained maximum with --sustained), comma-separated, "
                         "e.g. 0.2,0.3,0.4,0.5; printed with the highest rate that met p99 <= 100 ms")
    ap.add_argument("--receiver", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receiver:
        receiver_main(args.receiver)
        return
    seconds = 5.0 if args.quick else 15.0
    proc = {k: v for k, v in (("fetch_max", args.fetch_max), ("fetch_max_bytes", args.fetch_max_bytes),
                              ("min_batch_interval_ms", args.min_batch_interval_ms)) if v is not None}
    try:  # here, not in the processor's process (which would exit while this one waits for it)
        ProcessorSettings(**proc)
    except ValueError as exc:
        ap.error(str(exc))
    burst = args.burst if args.burst is not None else 50_000 if args.quick else 200_000
    if burst <= 0:
        ap.error("--burst: readings of the backlog, more than 0")
    if args.repeat < 1:
        ap.error("--repeat: runs of part 2, 1 or more")
    try:
        curve = [float(f) for f in args.curve.split(",")] if args.curve else None
    except ValueError:
        ap.error("--curve: fractions of the maximum, comma-separated, e.g. 0.2,0.3,0.4,0.5")
    if curve is not None and not all(0 < f <= 1 for f in curve):
        ap.error("--curve: each fraction above 0 and at most 1")
    if curve is not None and args.rate is not None:
        ap.error("--curve sets the rates (fractions of the maximum); leave out --rate")

    def part2() -> None:
        runs = []
        for i in range(args.repeat):
            if args.repeat > 1:
                print(f"  run {i + 1} of {args.repeat}:", flush=True)
            runs.append(latency(seconds, 1000, burst, args.rate, proc, args.gateway_rounds, args.quiet_backlog,
                                args.sustained, curve))
            report_latency(runs[-1])
            report_curve(runs[-1])
        if len(runs) > 1:
            report_runs(runs)

    if args.latency_only:
        part2()
        return
    per_device = 20 if args.quick else 60
    msgs, sent, now = make_stream(devices=args.devices, per_device=per_device)
    records = make_records(msgs, now, 2)
    n = len(sent)
    print(f"part 1: {args.devices} devices, {n} readings ({len(records)} bus records), 5 rules"
          f"{' with a webhook target each' if args.targets else ' without notification targets'}, SQLite")
    fetch_max = 256
    # a run not counted: the first in a process was up to a sixth slower than the next ones (with a run of a
    # thousand records before it too: its memory is new), which counted against the side that ran first
    throughput(records, n, rules=False, fetch_max=fetch_max)
    ratios = []
    for r in range(args.rounds):  # alternated, the ratio per pair: the machine's speed drifts between runs
        base = throughput(records, n, rules=False, fetch_max=fetch_max)
        with_rules = throughput(records, n, rules=True, fetch_max=fetch_max, targets=args.targets)
        ratios.append(with_rules["per_cpu_s"] / base["per_cpu_s"])
        print(f"  round {r + 1}: without rules {base['per_cpu_s']:,.0f} readings/CPU-s"
              f" ({base['per_wall_s']:,.0f}/wall-s);"
              f" with 5 rules {with_rules['per_cpu_s']:,.0f} ({with_rules['per_wall_s']:,.0f}/wall-s),"
              f" {with_rules['opened']} opened, {with_rules['cleared']} cleared"
              f" ({(with_rules['opened'] + with_rules['cleared']) / n * 1000:.1f} transitions per 1,000 readings);"
              f" with/without {ratios[-1]:.2f}", flush=True)
    ratio = statistics.median(ratios)
    print(f"  throughput with/without, median of {len(ratios)} pairs: {ratio:.2f} (cost {1 - ratio:.0%}; "
          f"target cost <= 20%: {'met' if 1 - ratio <= 0.20 else 'NOT met'})")
    if args.throughput_only:
        return
    del msgs, sent, records  # part 1's millions of objects: the publisher's collector would walk them in part 2
    print("part 2: event -> webhook at half the maximum rate, 1,000 devices, processor process + nats-server + "
          "receiver", flush=True)
    part2()


def cpu_parts(metrics_dir: Path) -> dict[str, float]:
    """The processor's counters so far, from its multiprocess files: CPU seconds of its apply thread by part
    (``fieldmesh_processor_cpu_seconds``; its store part split as ``sqlite.<part>``,
    ``fieldmesh_processor_sqlite_cpu_seconds``), and its batches (``fieldmesh_processor_batches``)."""
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(metrics_dir))
    out: dict[str, float] = {}
    for m in reg.collect():
        for smp in m.samples:
            if smp.name == "fieldmesh_processor_cpu_seconds_total":
                out[smp.labels["part"]] = out.get(smp.labels["part"], 0.0) + smp.value
            elif smp.name == "fieldmesh_processor_sqlite_cpu_seconds_total":  # the store part, split
                key = "sqlite." + smp.labels["part"]
                out[key] = out.get(key, 0.0) + smp.value
            elif smp.name == "fieldmesh_processor_batches_total":
                out["batches"] = out.get("batches", 0.0) + smp.value
    return out


def phase(before: dict[str, float], after: dict[str, float], readings: int) -> dict[str, float]:
    """A phase's CPU-µs a reading by part (and ``total``), its ``readings`` and ``batches``."""
    out = {k: (v - before.get(k, 0.0)) * 1e6 / max(readings, 1) for k, v in after.items() if k != "batches"}
    out["total"] = sum(v for k, v in out.items() if not k.startswith("sqlite."))
    out["batches"] = after.get("batches", 0.0) - before.get("batches", 0.0)
    out["readings"] = readings
    return out


#: ``--sustained``: bisection steps, each this long, and how far behind (in seconds of the rate) a step may end.
SUSTAINED_STEPS = 5
SUSTAINED_STEP_S = 8.0
SUSTAINED_BEHIND_S = 0.5

#: The parts printed, in the order of a batch; then the SQLite store's part, split.
PARTS = ("decode", "decide", "alerts", "store", "other")
STORE_PARTS = ("begin", "segments", "gaps", "rollups", "devices", "rows", "keys", "commit", "finish")


def report_phases(phases: dict[str, dict[str, float]]) -> None:
    """The processor's apply thread, CPU-µs a reading by part: the backlog that measured the maximum against the
    stream at the rate measured. What a live batch costs more than a backlog's is why half the maximum is not
    half the load."""
    if "backlog" not in phases or "live" not in phases:
        return
    b, lv = phases["backlog"], phases["live"]
    print("    the processor's apply thread, CPU-us a reading (fieldmesh_processor_cpu_seconds):")
    for name, ph in (("backlog", b), ("live", lv)):
        per = ph["readings"] / ph["batches"] if ph["batches"] else float("nan")
        print(f"      {name:8s} {per:7,.0f} readings a batch: "
              + ", ".join(f"{k} {ph.get(k, 0.0):.2f}" for k in PARTS) + f"; total {ph['total']:.2f}")
        print("        its store part: " + ", ".join(f"{k} {ph.get('sqlite.' + k, 0.0):.2f}" for k in STORE_PARTS))
    print("      live / backlog: " + ", ".join(f"{k} x{lv.get(k, 0.0) / b[k]:.2f}" for k in PARTS if b.get(k))
          + f"; total x{lv['total'] / b['total']:.2f}")
    print("        its store part: " + ", ".join(f"{k} x{lv.get('sqlite.' + k, 0.0) / b['sqlite.' + k]:.2f}"
                                           for k in STORE_PARTS if b.get("sqlite." + k, 0.0) >= 0.01))


def report_latency(lat: dict[str, Any]) -> None:
    print(f"  sent {lat['sent']} readings, {lat['transitions']} threshold crossings, {lat['received']} notifications")
    print(f"  latency p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms "
          f"(p99 / target 100 ms: {lat['p99'] / 100:.2f}; {'met' if lat['p99'] <= 100 else 'NOT met'})")
    ev50, ev99 = lat["evaluated"]
    print(f"  breakdown: event -> evaluated in its batch's transaction p50 {ev50:.1f} ms, p99 {ev99:.1f} ms; "
          "the batch then writes and commits;")
    print(f"    commit -> receiver's 2xx (the processor's notifier: {lat['notifier']})")
    g99, gmax, bmax, b50 = lat["publisher"]
    print(f"    the publisher (this process): {b50:.0f} messages a send (p50), the largest {bmax} after it fell "
          f"behind; its loop's interval p99 {g99:.1f} ms, max {gmax:.1f} ms")
    cpu = lat["cpu"]
    print(f"    CPU while sending (cores of the machine's {psutil.cpu_count()}): the publisher {cpu['publisher']:.2f},"
          f" the processor {cpu['processor']:.2f}, the machine in all {cpu['machine']:.2f}")
    lm = lat["stats"]["latency_ms"]
    print(f"    store's view (outbox row written in the transaction -> acknowledged): p50 {lm['p50']} ms, "
          f"p99 {lm['p99']} ms, of the last {lm['of_last']}")
    report_phases(lat["phases"])


def report_curve(lat: dict[str, Any]) -> None:
    """``--curve``: the latency against the rate, a line a step (the bar: p99, 5 ms a mark, the target at |),
    and the highest rate that met the target."""
    steps = lat["curve"]
    if not steps:
        return
    print("  event -> webhook against the rate (p99: 5 ms a mark, | the target of 100 ms):")
    for st in steps:
        ph = st["phase"]
        bar = "#" * min(80, round(st["p99"] / 5)) if st["p99"] == st["p99"] else "?"
        bar = bar[:20] + "|" + bar[20:] if len(bar) > 20 else bar.ljust(20) + "|"
        print(f"    {st['fraction']:4.2f} {st['rate']:9,.0f}/s  p50 {st['p50']:6.1f}  p99 {st['p99']:6.1f} ms "
              f"{ph['readings'] / max(ph['batches'], 1):6,.0f} a batch {ph['total']:6.2f} CPU-us a reading, "
              f"processor {st['cpu']['processor']:.2f} core  {bar}")
    met = [st for st in steps if st["p99"] <= 100]
    best = max(met, key=lambda st: st["rate"]) if met else None
    of = "the sustained maximum" if lat["sustained"] else "the maximum"
    print("  p99 <= 100 ms up to " + (f"{best['rate']:,.0f} readings/s ({best['fraction']:.2f} of {of})"
                                      if best else "none of these rates"))


def report_runs(runs: list[dict[str, Any]]) -> None:
    """The medians of several runs of part 2, and the spread of each figure."""

    def fig(k: str, fmt: str) -> str:
        v = sorted(r[k] for r in runs)
        return f"median {format(statistics.median(v), fmt)} ({format(v[0], fmt)}-{format(v[-1], fmt)})"

    p99 = statistics.median(r["p99"] for r in runs)
    met = sum(r["p99"] <= 100 for r in runs)
    sus = f"; sustained {fig('sustained', ',.0f')}" if all(r["sustained"] for r in runs) else ""
    print(f"  {len(runs)} runs: maximum {fig('max_rate', ',.0f')}{sus} readings/s; p50 {fig('p50', '.1f')} ms; "
          f"p99 {fig('p99', '.1f')} ms (median p99 / target 100 ms: {p99 / 100:.2f}; "
          f"{'met' if p99 <= 100 else 'NOT met'}; met in {met} of {len(runs)} runs)")


if __name__ == "__main__":
    main()
