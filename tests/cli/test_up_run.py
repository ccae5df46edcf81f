"""``fieldmesh up`` as a user runs it: default ports that give way, the exit summary, ``--json``."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def up(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``fieldmesh up --data-dir DIR ARGS`` to its end; stdout and stderr apart."""
    r = subprocess.run([sys.executable, "-m", "fieldmesh", "up", "--data-dir", str(data_dir), *args],
                       capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    return r


def flat(text: str) -> str:
    """Console text with its line wrapping undone."""
    return " ".join(text.split())


@contextmanager
def occupied(port: int) -> Iterator[None]:
    """Keep ``port`` taken for the duration: listen on it, unless something else already does."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            pass  # taken already (Mosquitto on 1883 here): just as good
        yield


def test_taken_default_ports_give_way_to_free_ones_and_the_start_line_says_so(tmp_path: Path):
    with ExitStack() as stack:
        stack.enter_context(occupied(1883))
        stack.enter_context(occupied(8000))
        r = up(tmp_path / "data", "--simulate", "2", "--for", "3", "--json")
    err = flat(r.stderr)
    m = re.search(r"MQTT port 1883 is taken, so MQTT is on (\d+) \(choose with --mqtt-port\)", err)
    assert m, err
    assert f"devices publish to mqtt://127.0.0.1:{m[1]} " in err
    h = re.search(r"HTTP port 8000 is taken, so the API is on (\d+) \(choose with --http-port\)", err)
    assert h, err
    assert f"API http://127.0.0.1:{h[1]}/api/v1" in err
    assert json.loads(r.stdout)["this_run"]["stored"] > 0  # the simulator reached the MQTT port it was given


def test_a_second_run_shows_its_own_counts_beside_the_totals_and_json_is_all_on_stdout(tmp_path: Path):
    data = tmp_path / "data"
    first = up(data, "--simulate", "3", "--for", "3", "--mqtt-port", "0", "--http-port", "0")
    assert first.stdout == ""  # the table and the start line go to stderr
    assert "this run" in first.stderr and "total (this data dir)" in first.stderr
    q = subprocess.run([sys.executable, "-m", "fieldmesh", "query", "SELECT count(*) AS n FROM readings",
                        "--data-dir", str(data), "--json"], capture_output=True, text=True, timeout=60)
    stored_before = json.loads(q.stdout)[0]["n"]
    assert stored_before > 0

    second = up(data, "--simulate", "3", "--for", "3", "--mqtt-port", "0", "--http-port", "0", "--json")
    summary = json.loads(second.stdout)  # nothing but the JSON on stdout
    assert "fieldmesh summary" not in second.stderr and "this run" not in second.stderr  # no table
    run = summary["this_run"]
    assert 0 < run["stored"] < summary["stored"]
    assert summary["stored"] - run["stored"] == stored_before
    assert summary["received"] - run["received"] == stored_before  # nothing else in the first run's stats
    assert set(run) == {"received", "stored", "duplicates", "late", "unrouted", "gaps", "dead_lettered"}
    assert run["received"] == run["stored"] + run["duplicates"] + sum(run["dead_lettered"].values())
