"""One ``/metrics`` for many processes: real worker processes count into a shared directory (prometheus-client's
multiprocess mode), one is killed with -9 and replaced, and the API's merge keeps every count."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from fieldmesh.obs.metrics import merged_histogram, prepare_multiproc_dir

_WORKER = """
import sys, time
import numpy as np
from fieldmesh.obs.metrics import EVENT_TO_STORED, GATEWAY_MESSAGES, PROCESSOR_BATCHES, observe_many
n, hang = int(sys.argv[1]), sys.argv[2] == "hang"
GATEWAY_MESSAGES.labels("mqtt").inc(n)
PROCESSOR_BATCHES.inc()
observe_many(EVENT_TO_STORED, np.full(n, 0.2))
print("counted", flush=True)
if hang:
    time.sleep(600)
"""


def _worker(metrics_dir: Path, n: int, hang: bool = False) -> subprocess.Popen[str]:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    p = subprocess.Popen([sys.executable, "-c", _WORKER, str(n), "hang" if hang else "done"], env=env,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "counted"
    return p


def test_counts_of_every_process_are_merged_and_a_killed_one_keeps_its_counts(tmp_path: Path) -> None:
    from fieldmesh.api.app import create_app
    from fieldmesh.api.auth import Access
    from fieldmesh.store import load_store

    metrics_dir = prepare_multiproc_dir(tmp_path / "metrics")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    load_store(url).close()
    a = _worker(metrics_dir, 3)
    a.wait(10)
    b = _worker(metrics_dir, 5, hang=True)
    os.kill(b.pid, signal.SIGKILL)  # kill -9: what it counted is in its file already
    b.wait(10)
    c = _worker(metrics_dir, 7)  # its successor
    c.wait(10)

    app = create_app(url, access=Access(url, local_only=True), metrics_dir=metrics_dir)
    with TestClient(app) as client:
        text = client.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("fieldmesh_gateway_messages_total", (("source", "mqtt"),))] == 15
    assert samples[("fieldmesh_processor_batches_total", ())] == 3
    assert samples[("fieldmesh_event_to_stored_seconds_count", ())] == 15
    assert samples[("fieldmesh_event_to_stored_seconds_bucket", (("le", "0.25"),))] == 15
    assert samples[("fieldmesh_event_to_stored_seconds_bucket", (("le", "0.1"),))] == 0
    assert ("fieldmesh_readings_received_total", ()) in samples  # the store's counters beside them
    merged = merged_histogram(metrics_dir, "fieldmesh_event_to_stored_seconds")
    assert merged is not None and merged[1][-1] == 15
    # a new run starts from nothing
    prepare_multiproc_dir(metrics_dir)
    assert merged_histogram(metrics_dir, "fieldmesh_event_to_stored_seconds") is None
