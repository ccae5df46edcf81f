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
