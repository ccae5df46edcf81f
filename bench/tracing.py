"""Cost of tracing on bench/e2e.py case (a): 100 readings per message, 500 devices, one publisher.

The same messages go through ``fieldmesh up`` three ways, in one run, interleaved round by round:

* ``off``: no ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the baseline: tracing code skipped at one check per batch);
* ``1%``: an OTLP endpoint and ``OTEL_TRACES_SAMPLER=parentbased_traceidratio``, ``OTEL_TRACES_SAMPLER_ARG=0.01``;
* ``100%``: the same with ``parentbased_always_on``.

Each message's first reading carries a ``meta.traceparent``, as the edge agent sends over MQTT 3.1.1 (the
door of ``up`` by default), whose sampled flag is set for that share of the messages: the trace starts at
the device, the pipeline follows its decision. The endpoint is an OTLP/HTTP receiver in this process that
counts the spans it is sent (so the export is paid for, not skipped). Figures: readings/s from the first
publish until the last reading is stored, and CPU seconds of the processes of ``up`` per 10,000 readings;
each as a ratio to ``off``, for the best round (the least disturbed by other load on a shared machine)
and the median.

Then, less noisy, the same messages in one process per config and round (``--micro`` alone): the
gateway's routing (with its spans and headers) and the processor into SQLite, CPU seconds per reading.

Run: ``.venv/bin/python bench/tracing.py`` (``--readings 300000 --rounds 2`` by default; ``--quick`` for
100,000 readings and one round).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from _common import payloads

import e2e


class SpanSink:
    """An OTLP/HTTP endpoint that counts the spans of each ``ExportTraceServiceRequest``."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.spans = 0
        lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                req = ExportTraceServiceRequest.FromString(body)
                n = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
                with lock:
                    sink.spans += n
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()


def with_device_context(msgs: list[tuple[str, bytes]], ratio: float, seed: int) -> list[tuple[str, bytes]]:
    """Each message's first reading gets a ``meta.traceparent``, sampled for ``ratio`` of them."""
    import random

    rnd = random.Random(seed)
    out = []
    for topic, body in msgs:
        flag = 1 if rnd.random() < ratio else 0
        tp = b'"meta":{"traceparent":"00-%s-%s-%02x"},' % (secrets.token_hex(16).encode(),
                                                            secrets.token_hex(8).encode(), flag)
        out.append((topic, body.replace(b'"readings":[{', b'"readings":[{' + tp, 1)))
    return out


CONFIGS: dict[str, dict[str, str] | None] = {
    "off": None,
    "1%": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "100%": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
}
RATIOS = {"off": 0.0, "1%": 0.01, "100%": 1.0}


def run(readings: int, rounds: int) -> dict[str, Any]:
    sink = SpanSink()
    prefix = f"t{uuid.uuid4().hex[:6]}"
    base = payloads(devices=500, readings=readings, per_message=100, prefix=prefix, ts_ms=int(time.time() * 1000))
    total = sum(b.count(b'"seq"') for _, b in base)
    print(f"case (a): {total:,} readings in {len(base):,} messages of 100, 500 devices, 1 publisher; "
          f"{rounds} round(s) of off / 1% / 100%")
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in CONFIGS}
    saved = {k: os.environ.get(k) for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_SAMPLER",
                                            "OTEL_TRACES_SAMPLER_ARG")}
    try:
        names = list(CONFIGS)
        for r in range(rounds):
            # each round starts with another config: the machine's drift does not favour one side
            for name in names[r % 3:] + names[: r % 3]:
                env = CONFIGS[name]
                # the same share of sampled device contexts whatever the config: identical input bytes
                msgs = with_device_context(base, RATIOS["1%"] if name == "off" else RATIOS[name], seed=r)
                for k in saved:
                    os.environ.pop(k, None)
                if env is not None:
                    os.environ.update(env, OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint)
                before = sink.spans
                res = e2e.run_pipeline([msgs], total, door="auto")
                time.sleep(0.5)  # the last batch of spans (exported at exit) lands
                res["spans"] = sink.spans - before
                res["cpu_s_per_10k_total"] = round(sum(res["cpu_s_per_10k"].values()), 3)
                # the processes that run tracing code (nats-server and the supervisor run none)
                res["cpu_s_per_10k_traced"] = round(sum(v for k, v in res["cpu_s_per_10k"].items()
                                                        if k in ("gateway", "processor")), 3)
                results[name].append(res)
                print(f"  round {r + 1} {name:>4}: {res['readings_per_s']:>9,.0f} readings/s, "
                      f"CPU {res['cpu_s_per_10k_total']:.3f} s per 10k readings {res['cpu_s_per_10k']}, "
                      f"{res['spans']:,} spans exported")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        sink.close()
    out: dict[str, Any] = {"readings": total, "rounds": rounds}
    for stat, hi, lo in (("best", max, min), ("median", statistics.median, statistics.median)):
        off_rate = hi(x["readings_per_s"] for x in results["off"])
        off_cpu = lo(x["cpu_s_per_10k_total"] for x in results["off"])
        off_traced = lo(x["cpu_s_per_10k_traced"] for x in results["off"])
        print(f"\nvs tracing off ({stat} of the rounds: highest rate, least CPU)" if stat == "best"
              else "\nvs tracing off (median of the rounds):")
        for name, rs in results.items():
            rate = hi(x["readings_per_s"] for x in rs)
            cpu = lo(x["cpu_s_per_10k_total"] for x in rs)
            traced = lo(x["cpu_s_per_10k_traced"] for x in rs)
            out.setdefault(name, {"spans": [x["spans"] for x in rs]})[stat] = {
                "readings_per_s": round(rate), "cpu_s_per_10k": cpu, "cpu_s_per_10k_gateway_processor": traced,
                "throughput_ratio": round(rate / off_rate, 3), "cpu_ratio": round(cpu / off_cpu, 3),
                "cpu_ratio_gateway_processor": round(traced / off_traced, 3)}
            print(f"  {name:>4}: {rate:>9,.0f} readings/s = {rate / off_rate:.3f}x of off; CPU per reading, all of "
                  f"up: {cpu / off_cpu:.3f}x, gateway + processor: {traced / off_traced:.3f}x of off; "
                  f"spans {out[name]['spans']}")
    return out


MICRO_MESSAGES = 3_000  # 300,000 readings of case (a)
MICRO_BATCH = 512  # messages per gateway fetch (gateway.batch_max_messages)


def micro_worker() -> None:
    """One process, one config (from its environment): case (a) messages through the gateway's routing and
    the processor into SQLite, in process; prints the CPU seconds per 10,000 readings as JSON."""
    import asyncio
    import tempfile

    from fieldmesh.bus.base import BusRecord, OutRecord
    from fieldmesh.core.settings import GatewaySettings, ProcessorSettings
    from fieldmesh.gateway.base import IngestMessage
    from fieldmesh.gateway.gateway import Gateway
    from fieldmesh.obs import tracing
    from fieldmesh.store.sqlite import SqliteStore
    from fieldmesh.stream.processor import Processor

    tracing.setup("fieldmesh-bench")
    ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1")) if tracing.enabled() else 0.01
    now = int(time.time() * 1000)
    raw = with_device_context(payloads(devices=500, readings=MICRO_MESSAGES * 100, per_message=100, prefix="m",
                                       ts_ms=now), ratio, seed=1)
    msgs = [IngestMessage(topic=t, payload=b, received_ms=now, source_id=f"i{i}") for i, (t, b) in enumerate(raw)]
    total = sum(b.count(b'"seq"') for _, b in raw)

    class Source:
        name = "memory"

        def __init__(self) -> None:
            self.left = list(msgs)

        async def fetch(self, max_messages: int, timeout_s: float) -> list[IngestMessage]:
            out, self.left = self.left[:max_messages], self.left[max_messages:]
            return out

        async def ack(self, messages: Any) -> None: ...

    class Producer:
        def __init__(self) -> None:
            self.sent: list[OutRecord] = []

        async def send(self, records: Any) -> None:
            self.sent.extend(records)

    async def gateway(gw: Gateway) -> None:
        while (got := await gw._fetch_routed()) is not None:
            await gw._deliver(*got, None)

    with tempfile.TemporaryDirectory() as d:
        store = SqliteStore(f"sqlite:///{d}/hot.db")
        src, prod = Source(), Producer()
        gw = Gateway(source=src, producer=prod, settings=GatewaySettings(batch_max_messages=MICRO_BATCH),  # type: ignore[arg-type]
                     partitions=8)
        proc = Processor(bus=None, store=store, settings=ProcessorSettings())  # type: ignore[arg-type]
        c0 = time.process_time()
        asyncio.run(gateway(gw))
        c1 = time.process_time()
        offsets: dict[int, int] = {}
        recs = []
        for r in prod.sent:
            o = offsets[r.partition] = offsets.get(r.partition, -1) + 1
            recs.append(BusRecord(topic=r.topic, partition=r.partition, offset=o, value=r.value,
                                  headers=dict(r.headers or {})))
        for i in range(0, len(recs), 16):  # about what the processor applies per batch here
            proc.apply_records(recs[i : i + 16])
        store.close()
    tracing.shutdown()  # what is still queued is exported (and paid for) before the clock stops
    c3 = time.process_time()
    assert proc.stats.stored == total, (proc.stats.stored, total)
    print(json.dumps({"gateway": round((c1 - c0) * 10_000 / total, 4),
                      # the processor, and the export of what was still queued at the end
                      "processor": round((c3 - c1) * 10_000 / total, 4),
                      "total": round((c3 - c0) * 10_000 / total, 4)}))


def micro(rounds: int) -> dict[str, Any]:
    """:func:`micro_worker` per config and round, interleaved; CPU ratios against ``off``."""
    import subprocess
    import sys

    sink = SpanSink()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    names = list(CONFIGS)
    got: dict[str, list[dict[str, float]]] = {k: [] for k in names}
    print(f"in process: {MICRO_MESSAGES * 100:,} readings of case (a) through the gateway's routing and the "
          f"processor into SQLite; {rounds} round(s)")
    try:
        for r in range(rounds):
            for name in names[r % 3:] + names[: r % 3]:
                env = {**clean, **({**CONFIGS[name], "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint}
                                   if CONFIGS[name] is not None else {})}
                before = sink.spans
                out = subprocess.run([sys.executable, __file__, "--micro-worker"], env=env, capture_output=True,
                                     text=True, check=True, timeout=600)
                fig = json.loads(out.stdout.strip().splitlines()[-1])
                fig["spans"] = sink.spans - before
                got[name].append(fig)
                print(f"  round {r + 1} {name:>4}: CPU s per 10k readings {fig}")
    finally:
        sink.close()
    res: dict[str, Any] = {}
    keys = ("gateway", "processor", "total")
    for stat, fn in (("best", min), ("median", statistics.median)):
        off = {k: fn(x[k] for x in got["off"]) for k in keys}
        print(f"\nvs tracing off, CPU per reading ({stat} of the rounds"
              f"{': the least disturbed by other load' if stat == 'best' else ''}):")
        for name in names:
            v = {k: fn(x[k] for x in got[name]) for k in keys}
            ratio = v["total"] / off["total"]
            res.setdefault(name, {"spans": [x["spans"] for x in got[name]]})[stat] = {**v, "ratio": round(ratio, 3)}
            print(f"  {name:>4}: {ratio:.3f}x of off ({(ratio - 1) * 100:+.1f}%)  gateway "
                  f"{v['gateway'] / off['gateway']:.3f}x, processor {v['processor'] / off['processor']:.3f}x;"
                  f" spans {res[name]['spans']}")
    return res


def main() -> None:
    if "--micro-worker" in sys.argv:
        micro_worker()
        return
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--readings", type=int, default=300_000, help="readings per run (case (a) uses 1,000,000)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of off / 1%% / 100%%")
    ap.add_argument("--quick", action="store_true", help="100,000 readings, one round")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--micro", action="store_true",
                    help="only the in-process measure (gateway routing + processor, CPU per reading)")
    ap.add_argument("--no-micro", action="store_true", help="only the end-to-end runs through fieldmesh up")
    a = ap.parse_args()
    readings, rounds = (100_000, 1) if a.quick else (a.readings, a.rounds)
    res: dict[str, Any] = {}
    if not a.micro:
        res["e2e"] = run(readings, rounds)
    if not a.no_micro:
        res["in_process"] = micro(max(rounds, 3))
    print("\nsummary:\n" + json.dumps(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    import multiprocessing as mp

    mp.set_start_method("fork")
    main()
