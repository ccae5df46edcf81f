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


MICRO_MESSAGES = 4_000  # 400,000 readings of case (a)
MICRO_BATCH = 512  # messages per gateway fetch (gateway.batch_max_messages)
MICRO_APPLY = 16  # bus records per processor batch


def micro_worker() -> None:
    """One process with tracing on (the sampler from its environment): case (a) messages through the
    gateway's routing and the processor into SQLite, each unit of work done with tracing on and off in
    turn (the order alternating), so both sides share the machine's state; prints CPU seconds as JSON."""
    import asyncio
    import tempfile

    from fieldmesh.bus.base import BusRecord, OutRecord
    from fieldmesh.core.settings import GatewaySettings, ProcessorSettings
    from fieldmesh.gateway.base import IngestMessage
    from fieldmesh.gateway.gateway import Gateway
    from fieldmesh.obs import tracing
    from fieldmesh.store.sqlite import SqliteStore
    from fieldmesh.stream.processor import Processor

    assert tracing.setup("fieldmesh-bench"), "an OTLP endpoint is needed"
    ratio = float(os.environ.get("OTEL_TRACES_SAMPLER_ARG", "1"))
    now = int(time.time() * 1000)
    raw = with_device_context(payloads(devices=500, readings=MICRO_MESSAGES * 100, per_message=100, prefix="m",
                                       ts_ms=now), ratio, seed=1)
    msgs = [IngestMessage(topic=t, payload=b, received_ms=now, source_id=f"i{i}") for i, (t, b) in enumerate(raw)]

    class Producer:
        def __init__(self) -> None:
            self.sent: list[OutRecord] = []

        async def send(self, records: Any) -> None:
            self.sent.extend(records)

    class Source:
        name = "memory"

        async def ack(self, messages: Any) -> None: ...

    cpu = {"gateway_on": 0.0, "gateway_off": 0.0, "processor_on": 0.0, "processor_off": 0.0}
    readings = {"on": 0, "off": 0}
    traced_out = Producer()
    untraced_out = Producer()

    async def gateway() -> None:
        for i in range(0, len(msgs), MICRO_BATCH):
            batch = msgs[i : i + MICRO_BATCH]
            for on in ((True, False) if (i // MICRO_BATCH) % 2 == 0 else (False, True)):
                tracing.set_enabled(on)
                out = traced_out if on else untraced_out
                gw = Gateway(source=Source(), producer=out, settings=GatewaySettings(),  # type: ignore[arg-type]
                             partitions=8)
                c = time.process_time()
                got = gw._route_traced(batch) if on else (batch, *_route(gw, batch))
                await gw._deliver(*got, None)
                cpu["gateway_on" if on else "gateway_off"] += time.process_time() - c

    def _route(gw: Gateway, batch: list[IngestMessage]) -> tuple[Any, int, Any]:
        from fieldmesh.gateway.gateway import route

        return route(batch, settings=gw.settings, partitions=gw.partitions, now_ms=now)

    asyncio.run(gateway())
    with tempfile.TemporaryDirectory() as d:
        stores = {on: SqliteStore(f"sqlite:///{d}/hot-{on}.db") for on in (True, False)}
        procs = {on: Processor(bus=None, store=stores[on], settings=ProcessorSettings())  # type: ignore[arg-type]
                 for on in (True, False)}
        recs: dict[bool, list[BusRecord]] = {}
        for on, prod in ((True, traced_out), (False, untraced_out)):
            offsets: dict[int, int] = {}
            recs[on] = []
            for r in prod.sent:
                o = offsets[r.partition] = offsets.get(r.partition, -1) + 1
                recs[on].append(BusRecord(topic=r.topic, partition=r.partition, offset=o, value=r.value,
                                          headers=dict(r.headers or {})))
        assert len(recs[True]) == len(recs[False])
        for k, i in enumerate(range(0, len(recs[True]), MICRO_APPLY)):
            for on in ((True, False) if k % 2 == 0 else (False, True)):
                tracing.set_enabled(on)
                c = time.process_time()
                res = procs[on].apply_records(recs[on][i : i + MICRO_APPLY])
                cpu["processor_on" if on else "processor_off"] += time.process_time() - c
                readings["on" if on else "off"] += res.stored
        for st in stores.values():
            st.close()
    assert readings["on"] == readings["off"] == MICRO_MESSAGES * 100, readings
    c = time.process_time()
    tracing.set_enabled(True)
    tracing.shutdown()  # what is still queued is exported: the traced side pays for it
    cpu["processor_on"] += time.process_time() - c
    per10k = {k: round(v * 10_000 / readings["on"], 4) for k, v in cpu.items()}
    per10k["on"] = round(per10k["gateway_on"] + per10k["processor_on"], 4)
    per10k["off"] = round(per10k["gateway_off"] + per10k["processor_off"], 4)
    print(json.dumps(per10k))


def micro(rounds: int) -> dict[str, Any]:
    """:func:`micro_worker` at 1% and at 100%, ``rounds`` times each: CPU with tracing on against off."""
    import subprocess

    sink = SpanSink()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    got: dict[str, list[dict[str, float]]] = {"1%": [], "100%": []}
    print(f"\nin process: {MICRO_MESSAGES * 100:,} readings of case (a) through the gateway's routing and the "
          f"processor into SQLite, each batch with tracing on and off in turn; {rounds} round(s)")
    try:
        for r in range(rounds):
            for name in got:
                env = {**clean, **(CONFIGS[name] or {}), "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint}
                before = sink.spans
                out = subprocess.run([sys.executable, __file__, "--micro-worker"], env=env, capture_output=True,
                                     text=True, check=True, timeout=900)
                fig = json.loads(out.stdout.strip().splitlines()[-1])
                fig["spans"] = sink.spans - before
                got[name].append(fig)
                print(f"  round {r + 1} {name:>4}: CPU s per 10k readings, on {fig['on']:.4f} (gateway "
                      f"{fig['gateway_on']:.4f}, processor {fig['processor_on']:.4f}), off {fig['off']:.4f} (gateway "
                      f"{fig['gateway_off']:.4f}, processor {fig['processor_off']:.4f}): "
                      f"{fig['on'] / fig['off']:.3f}x; {fig['spans']} spans")
    finally:
        sink.close()
    res: dict[str, Any] = {}
    print("\ntracing on vs off, CPU per reading (gateway routing + processor), median of the rounds:")
    for name, rows in got.items():
        ratio = statistics.median(x["on"] / x["off"] for x in rows)
        g = statistics.median(x["gateway_on"] / x["gateway_off"] for x in rows)
        p = statistics.median(x["processor_on"] / x["processor_off"] for x in rows)
        res[name] = {"ratio": round(ratio, 3), "gateway_ratio": round(g, 3), "processor_ratio": round(p, 3),
                     "rounds": rows}
        print(f"  {name:>4}: {ratio:.3f}x of off ({(ratio - 1) * 100:+.1f}%): gateway {g:.3f}x, processor {p:.3f}x")
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
