"""``--rules FILE`` on ``up`` and ``process``: a bad file stops the start (exit 2, naming the rule and
field); a good one is loaded into the store by the processor's start, and loading it again after an edit
changes exactly the file's rules (rules from the API are left alone)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fieldmesh.cli.main import app
from fieldmesh.core.settings import load_settings
from fieldmesh.runtime.worker import _alerting
from fieldmesh.store.alerts import AlertTables
from fieldmesh.store.sqlite import SqliteStore
from fieldmesh.stream.alerts import parse_rule

runner = CliRunner()

GOOD = """
- name: hot
  kind: threshold
  metric: temperature
  op: ">"
  value: 30
  clear_value: 28
  devices: pump-*
- name: silent
  kind: absence
  after_s: 300
"""


@pytest.mark.parametrize("command", [["up", "--for", "1"], ["process", "--bus-url", "nats://127.0.0.1:1",
                                                          "--store-url", "sqlite:///x.db"]])
def test_a_bad_rules_file_stops_the_start(tmp_path: Path, command: list[str]) -> None:
    bad = tmp_path / "rules.yaml"
    bad.write_text(GOOD + "- {name: worse, kind: threshold, metric: t, value: 3, clear_value: 9}\n")
    r = runner.invoke(app, [*command, "--rules", str(bad)])
    assert r.exit_code == 2, r.output
    said = " ".join(r.output.split())  # the console wraps long lines
    assert "rule #3" in said and "clear_value" in said
    missing = runner.invoke(app, [*command, "--rules", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 2 and "none.yaml" in "".join(missing.output.split())


def test_the_file_is_loaded_and_reloaded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hot.db'}"
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD)
    tables = AlertTables(url)
    tables.put_rule(parse_rule({"name": "api-rule", "kind": "absence", "after_s": 60}), actor="key:x")
    store = SqliteStore(url)
    settings = load_settings(alerts={"rules_file": path, "notify": False})
    _alerting(store, url, settings)
    rows = {r["name"]: r for r in tables.rules()}
    assert set(rows) == {"api-rule", "hot", "silent"}
    assert rows["hot"]["source"] == f"file:{path.resolve()}" and rows["api-rule"]["source"] == "api"
    v = tables.version()
    _alerting(store, url, settings)  # the same file again: nothing changes
    assert tables.version() == v
    path.write_text(GOOD.replace("value: 30", "value: 32").split("- name: silent")[0])
    _alerting(store, url, settings)
    rows = {r["name"]: r for r in tables.rules()}
    assert set(rows) == {"api-rule", "hot"} and rows["hot"]["value"] == 32
    assert tables.version() == v + 1
    store.close()
    tables.close()


def test_a_running_processor_reloads_the_changed_file_and_refuses_a_bad_one(tmp_path: Path) -> None:
    """The file is watched by its modification time: an edit is loaded while the processor runs; a bad edit
    is refused (logged, counted in stats and the audit log) and the rules in force stay until a good one."""
    import os
    import time

    from fieldmesh.runtime.rulesfile import RulesFile

    url = f"sqlite:///{tmp_path / 'hot.db'}"
    path = tmp_path / "rules.yaml"
    path.write_text(GOOD)
    tables = AlertTables(url)
    watcher = RulesFile(path, url, interval_s=0.05)
    watcher.load()
    assert {r["name"] for r in tables.rules()} == {"hot", "silent"}
    v = tables.version()
    assert watcher.check() == "unchanged"
    path.write_text(GOOD.replace("value: 30", "value: 31"))  # a change is read once it stays for a look
    assert watcher.check() == "settling" and tables.version() == v
    assert watcher.check() == "loaded" and tables.version() == v + 1
    v += 1

    def edit(text: str, step: int) -> None:  # a distinct mtime even on a coarse-grained file system
        path.write_text(text)
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + step * 1_000_000_000))

    watcher.start()
    try:
        edit(GOOD.replace("value: 30", "value: 35"), 1)
        _wait_for(lambda: {r["name"]: r.get("value") for r in tables.rules()}.get("hot") == 35)
        assert tables.version() == v + 1
        edit(GOOD + "- {name: worse, kind: threshold, metric: t, value: 3, clear_value: 9}\n", 2)
        _wait_for(lambda: tables.stats()["rules_file_refused"] == 1)
        assert watcher.refused == 1 and "rule #3" in (watcher.last_error or "")
        assert {r["name"]: r for r in tables.rules()}["hot"]["value"] == 35 and tables.version() == v + 1
        [entry] = [e for e in tables.audit_log() if e.action == "rule.file_refused"]
        assert entry.target == f"file:{path.resolve()}" and "clear_value" in entry.detail["error"]
        time.sleep(0.3)  # the refused version is not refused again at each look
        assert watcher.refused == 1
        edit("- {name: cold, kind: threshold, metric: temperature, op: '<', value: 0}\n", 3)
        _wait_for(lambda: {r["name"] for r in tables.rules()} == {"cold"})
        assert tables.version() == v + 2 and watcher.last_error is None and watcher.loads == 4
    finally:
        watcher.stop()
        tables.close()


def _wait_for(pred: object, timeout_s: float = 20) -> None:
    import time

    end = time.monotonic() + timeout_s
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)
