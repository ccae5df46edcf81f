"""A stand-alone role serves its own stage metrics with ``--metrics-port`` (here a processor that waits for
an unreachable bus: its endpoint is up meanwhile, and a taken port is refused with the flag named)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fmtest.procs import free_port


def test_process_serves_its_metrics_and_a_taken_port_is_named(tmp_path: Path) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "fieldmesh", "process", "--bus-url", f"nats://127.0.0.1:{free_port()}",
           "--store-url", f"sqlite:///{tmp_path / 'store.db'}", "--retry-for", "30", "--metrics-port", str(port)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        text = ""
        while time.monotonic() < deadline and not text:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    text = r.read().decode()
            except OSError:
                assert p.poll() is None
                time.sleep(0.2)
        for line in ("fieldmesh_processor_batches_total counter", "fieldmesh_event_to_stored_seconds histogram",
                     "fieldmesh_sink_commit_seconds histogram", "fieldmesh_processor_readings_total counter"):
            assert f"# TYPE {line}\n" in text, line
        assert "fieldmesh_processor_batches_total 0.0" in text
    finally:
        p.terminate()
        p.wait(20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        s.listen()
        r = subprocess.run([*cmd[:-1], str(taken)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and f"--metrics-port {taken}" in r.stderr, r.stderr
