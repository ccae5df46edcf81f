"""The README's test command prepares the local services itself, and that preparation is idempotent."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def test_scripts_test_prepares_the_services_before_pytest_runs():
    r = subprocess.run([str(ROOT / "scripts/test"), "--collect-only", "-q", "tests/test_scripts.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "ci-services: PostgreSQL wal_level=logical" in out, out
    assert "binlog_format=ROW" in out, out
    assert out.index("ci-services:") < out.index("test_scripts.py::"), out  # before the tests


def test_service_preparation_is_quick_and_changes_nothing_once_done():
    runs = []
    for _ in range(2):  # the first brings a fresh machine to the right state, the second must be a no-op
        t = time.monotonic()
        r = subprocess.run([str(ROOT / "scripts/ci-services")], capture_output=True, text=True, timeout=300)
        runs.append(time.monotonic() - t)
        assert r.returncode == 0, r.stdout + r.stderr
    assert "wal_level=logical" in r.stdout and "log_bin=1 binlog_format=ROW" in r.stdout, r.stdout
    for change in ("restart", "starting", "installing"):
        assert change not in r.stdout + r.stderr, r.stdout + r.stderr
    assert runs[1] < 10, runs  # about 0.3 s here; generous for a loaded machine
