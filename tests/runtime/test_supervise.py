"""The supervisor's rules on their own: backoff, giving up on start failures, stall detection, readiness."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from fieldmesh.core.settings import RuntimeSettings
from fieldmesh.runtime.supervise import Restarts, StallWatch
from fieldmesh.runtime.up import _Child


def test_repeated_start_failures_give_up_and_backoff_is_capped() -> None:
    r = Restarts(RuntimeSettings(start_failures=4, start_grace_s=10, restart_max_s=1.0))
    waits = []
    for _ in range(3):
        r.started()
        assert r.exited() is False
        waits.append(r.wait_s())
    assert waits[0] < waits[1] <= 1.0 and waits[2] <= 1.0
    r.started()
    assert r.exited() is True  # the fourth exit in a row soon after a start: left stopped
    assert r.next_start_at is None and not r.due()


def test_exits_while_the_bus_is_down_and_long_runs_do_not_add_up() -> None:
    r = Restarts(RuntimeSettings(start_failures=2, start_grace_s=10))
    for _ in range(5):
        r.started()
        assert r.exited(count=False) is False
    r.started()
    r.started_at -= 60  # it ran for a minute: a crash, not a start failure
    assert r.exited() is False and r.quick_exits == 0 and r.wait_s() <= 0.25


def test_stall_needs_lag_and_no_progress_for_the_threshold() -> None:
    w = StallWatch(10)
    t0 = time.monotonic()
    w.observe("processor", lag=5, marker=1, now=t0)
    w.observe("processor", lag=50, marker=1, now=t0 + 9)
    assert w.stalled("processor", now=t0 + 9) is None
    w.observe("processor", lag=80, marker=1, now=t0 + 11)
    assert w.stalled("processor", now=t0 + 11) == (80, 11)
    w.observe("processor", lag=70, marker=2, now=t0 + 12)  # it committed: progress
    assert w.stalled("processor", now=t0 + 12) is None
    w.observe("gateway", lag=0, marker=7, now=t0)
    assert w.stalled("gateway", now=t0 + 100) is None  # nothing waiting is never a stall


def test_a_stage_is_starting_until_this_start_logs_its_ready_line(tmp_path: Path) -> None:
    """`up`'s /health says a stage is "starting" until it logs that it works: its line from an earlier start,
    still in the same log, does not count."""
    script = "import time; time.sleep(0.6); print('processor INFO processor running: x', flush=True); time.sleep(60)"
    log = tmp_path / "processor.log"
    child = _Child("processor", [sys.executable, "-c", script], log, ready_line="processor running")
    plain = _Child("twins", [sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "twins.log")
    try:
        for _ in range(2):  # a first start, then a restart: the first start's line is in the log already
            child.start()
            assert child.alive() and not child.ready()
            deadline = time.monotonic() + 20
            while not child.ready() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert child.ready()
            child.stop()
        assert log.read_text().count("processor running") == 2
        plain.start()
        assert plain.ready()  # a stage without a ready line is ready once it runs
    finally:
        child.stop()
        plain.stop()
