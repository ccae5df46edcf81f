"""``fieldmesh up`` as real processes: one ``/metrics`` for every stage, consistent with ``/stats``; the
shipped dashboards and rules name only metrics it serves; an SLO breach opens an alert ``slo:<name>``,
announced by the notifier, that clears when the objective is met again."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.dataset import MALFORMED_REASONS, malformed
from fmtest.procs import Up, publish_all, publisher

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Hook:
    """A webhook receiver: every JSON body posted, in order."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", 0))
                hook.bodies.append(json.loads(self.rfile.read(n)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def close(self) -> None:
        self.server.shutdown()


def scrape(up: Up) -> tuple[str, Samples]:
    with urllib.request.urlopen(f"http://127.0.0.1:{up.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, out


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab))


def readings(prefix: str, devices: int, per_device: int) -> tuple[list[tuple[str, bytes]], int]:
    """Messages of fresh readings (event time now), several per message; the number of readings."""
    now = int(time.time() * 1000)
    msgs = []
    n = 0
    for d in range(devices):
        dev = f"{prefix}-{d:02d}"
        for start in range(0, per_device, 5):
            batch = [{"ts": now - 1000 + i, "seq": i, "boot_id": "b1", "measurements": {"t": float(i)}}
                     for i in range(start, min(per_device, start + 5))]
            msgs.append((f"devices/{dev}/telemetry", json.dumps({"device_id": dev, "readings": batch}).encode()))
            n += len(batch)
    return msgs, n


def wait(pred: Callable[[], Any], timeout_s: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.3)
    raise TimeoutError(f"never: {what}")


def _processor_pid(up: Up) -> int:
    assert up.proc is not None
    for child in psutil.Process(up.proc.pid).children():
        if "fieldmesh.runtime.worker" in child.cmdline() and "processor" in child.cmdline():
            return int(child.pid)
    raise AssertionError("no processor worker")


def test_metrics_of_every_stage_consistent_with_stats_and_slo_alerts(tmp_path: Path) -> None:
    from fieldmesh.obs.dashboards import DASHBOARDS, RULES, read

    prefix = f"ob{uuid.uuid4().hex[:6]}"
    hook = Hook()
    slo = tmp_path / "slo.yaml"
    slo.write_text(f"""
slos:
  - name: fresh
    kind: freshness
    devices: "{prefix}-*"
    max_silence_s: 8
    objective: 0.5
    severity: critical
    labels: {{team: fleet}}
    notify: [{{webhook: "{hook.url}"}}]
  - name: e2e
    kind: latency
    max_s: 60
    objective: 0.99
    window_s: 120
  - name: dlq
    kind: dlq_rate
    objective: 0.5
    window_s: 120
""")
    up = Up(tmp_path / "data", "--slo", str(slo), "--no-lake").start()
    try:
        c = publisher(up.mqtt_port)
        msgs, n = readings(prefix, devices=6, per_device=40)
        bad, _ = malformed(prefix)
        publish_all(c, msgs + msgs[:10] + bad)  # 10 messages again: duplicates
        stats = up.wait_for(lambda s: s["stored"] >= n and sum(s["lag"].values()) == 0
                            and s["dead_lettered"]["total"] >= sum(MALFORMED_REASONS.values()))
        time.sleep(1.5)  # the stage counters after the last commit
        stats = up.get("/stats")

        def settled() -> tuple[str, Samples] | None:  # an SLO round (every 2 s) after the last commit
            got = scrape(up)
            return got if total(got[1], "fieldmesh_slo_events", slo="e2e") == stats["stored"] else None

        text, m = wait(settled, 15, "an SLO round that saw every stored reading")

        # the store's counters: the very numbers of /stats
        assert total(m, "fieldmesh_readings_received_total") == stats["received"]
        assert total(m, "fieldmesh_readings_stored_total") == stats["stored"] == n + 1  # + the good one in bad
        assert total(m, "fieldmesh_readings_duplicates_total") == stats["duplicates"] == 50
        for reason, k in stats["dead_lettered"].items():
            if reason != "total":
                assert total(m, "fieldmesh_dead_letters_total", reason=reason) == k, reason
        # each stage's own counters, from its own process (the API process runs neither: the merge works)
        assert total(m, "fieldmesh_gateway_messages_total") == len(msgs) + 10 + len(bad)
        assert (total(m, "fieldmesh_gateway_readings_total") + total(m, "fieldmesh_gateway_rejected_total")
                == stats["received"])
        for reason, k in stats["dead_lettered"].items():
            if reason != "total":
                assert total(m, "fieldmesh_gateway_rejected_total", reason=reason) == k, reason
        assert total(m, "fieldmesh_processor_readings_total", outcome="stored") == stats["stored"]
        assert total(m, "fieldmesh_processor_readings_total", outcome="duplicate") == stats["duplicates"]
        batches = total(m, "fieldmesh_processor_batches_total")
        assert batches >= 1
        assert total(m, "fieldmesh_sink_commit_seconds_count", sink="hot") == batches
        assert total(m, "fieldmesh_sink_commit_seconds_count", sink="alerts") == batches
        assert total(m, "fieldmesh_processor_batch_readings_count") == batches
        # the processor's CPU by part, from its own process: what its batches ran (a rule is set: alerts too)
        for part in ("decode", "decide", "alerts", "store"):
            assert total(m, "fieldmesh_processor_cpu_seconds_total", part=part) > 0, part
        assert total(m, "fieldmesh_gateway_batch_messages_sum") == len(msgs) + 10 + len(bad)
        # every new reading's latency, once; all under a minute here (event time = publish time)
        assert total(m, "fieldmesh_event_to_stored_seconds_count") == stats["stored"]
        assert total(m, "fieldmesh_received_to_stored_seconds_count") == stats["stored"]
        assert total(m, "fieldmesh_event_to_stored_seconds_bucket", le="60.0") == stats["stored"]
        # freshness as a distribution over devices: every device counted once, none silent for a minute yet
        devices = total(m, "fieldmesh_devices")
        assert devices == 7  # 6 + the "-bad" one
        assert total(m, "fieldmesh_device_silence_seconds_gcount") == devices
        assert total(m, "fieldmesh_device_silence_seconds_bucket", le="60.0") == devices
        assert 0 <= total(m, "fieldmesh_device_silence_quantile_seconds", quantile="1.0") < 60
        # lag per partition, and the SLO status
        assert ("fieldmesh_bus_partition_lag_messages", (("partition", "0"), ("stage", "processor"))) in m
        assert total(m, "fieldmesh_slo_ok", slo="fresh") == 1
        assert total(m, "fieldmesh_slo_ok", slo="e2e") == 1
        assert total(m, "fieldmesh_slo_events", slo="e2e") == stats["stored"]
        assert total(m, "fieldmesh_slo_ok", slo="dlq") == 1
        assert total(m, "fieldmesh_slo_value", slo="dlq") == pytest.approx(
            stats["dead_lettered"]["total"] / stats["received"])
        assert total(m, "fieldmesh_slo_objective", slo="fresh") == 0.5

        # the shipped dashboards and rules name only metrics this pipeline serves (the edge's: its agent)
        # (a sample's name, or a family /metrics declares: the notification latency has samples once one was sent)
        served = {name for name, _ in m} | set(re.findall(r"^# TYPE (\S+)", text, re.MULTILINE))
        for name in (*DASHBOARDS, RULES):
            used = {u for u in re.findall(r"\bfieldmesh_[a-z0-9_]+", read(name)) if not u.startswith("fieldmesh_edge_")}
            assert used or name == "edge.json", name
            assert used <= served, (name, sorted(used - served))

        # the devices go silent: the freshness SLO breaks, an alert opens and the notifier announces it
        opened = wait(lambda: up.get("/alerts?rule=slo:fresh&state=active"), 30, "slo:fresh opens")
        assert len(opened) == 1
        a = opened[0]
        assert (a["device_id"], a["severity"], a["labels"], a["state"]) == ("*", "critical", {"team": "fleet"}, "open")
        assert a["value"] == 0.0  # the share of fresh devices
        wait(lambda: [b for b in hook.bodies if b["event"] == "open"], 20, "the open notification")
        _, m = scrape(up)
        assert total(m, "fieldmesh_slo_ok", slo="fresh") == 0
        assert total(m, "fieldmesh_slo_error_budget_remaining", slo="fresh") == -1.0  # bad 1 / allowed 0.5 = 2
        time.sleep(2.5)  # still breached: no second alert
        assert len(up.get("/alerts?rule=slo:fresh")) == 1

        # a processor killed: the counters of its dead process still count, its successor's add to them
        before = total(m, "fieldmesh_processor_batches_total")
        os.kill(_processor_pid(up), signal.SIGKILL)
        fresh, k = readings(prefix, devices=6, per_device=5)
        fresh = [(t, p.replace(b'"boot_id": "b1"', b'"boot_id": "b2"')) for t, p in fresh]
        publish_all(c, fresh)
        stats = up.wait_for(lambda s: s["stored"] >= n + 1 + k and sum(s["lag"].values()) == 0)
        # back within the objective: the alert clears (by the SLO), announced too
        cleared = wait(lambda: [x for x in up.get("/alerts?rule=slo:fresh") if x["state"] == "cleared"], 30,
                       "slo:fresh clears")
        assert cleared[0]["id"] == a["id"] and cleared[0]["cleared_by"] == "slo"
        wait(lambda: [b for b in hook.bodies if b["event"] == "cleared"], 20, "the clear notification")
        assert [b["alert"]["rule"] for b in hook.bodies] == ["slo:fresh", "slo:fresh"]
        time.sleep(1.0)
        _, m = scrape(up)
        assert total(m, "fieldmesh_processor_batches_total") > before
        assert total(m, "fieldmesh_slo_ok", slo="fresh") == 1
        assert total(m, "fieldmesh_readings_stored_total") == stats["stored"]
        # what the killed process counted is kept: never more than the store holds, at most one batch less
        stored_counted = total(m, "fieldmesh_processor_readings_total", outcome="stored")
        assert stats["stored"] - 200 <= stored_counted <= stats["stored"]
        assert total(m, "fieldmesh_gateway_messages_total") == len(msgs) + 10 + len(bad) + len(fresh)
        c.disconnect()
    finally:
        hook.close()
        assert up.stop() == 0, up.tail()


def test_a_bad_slo_file_stops_up_with_the_field_named(tmp_path: Path) -> None:
    import subprocess
    import sys

    slo = tmp_path / "slo.yaml"
    slo.write_text("- {name: x, kind: latency, objective: 0.99}\n")
    r = subprocess.run([sys.executable, "-m", "fieldmesh", "up", "--data-dir", str(tmp_path / "d"), "--slo", str(slo),
                        "--mqtt-port", "0", "--http-port", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "max_s is required" in r.stderr and "slo 'x'" in r.stderr
