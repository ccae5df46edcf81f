"""``fieldmesh twins get|delta|set-desired`` on a real store."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from fieldmesh.cli.main import app
from fieldmesh.store.access import AccessStore
from fieldmesh.store.twins import TwinStore


def test_twins_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    run = CliRunner()
    r = run.invoke(app, ["twins", "set-desired", "pump-1", '{"mode": "window", "window_ms": 5000}', "--store-url", url])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["version"] == 1
    s = TwinStore(url)
    s.update_reported("pump-1", {"mode": "window"})
    s.close()
    r = run.invoke(app, ["twins", "delta", "pump-1", "--store-url", url])
    assert r.exit_code == 0 and json.loads(r.stdout)["delta"] == {"window_ms": 5000}
    r = run.invoke(app, ["twins", "get", "pump-1", "--store-url", url])
    doc = json.loads(r.stdout)
    assert doc["reported"] == {"mode": "window"} and doc["version"] == 2
    stale = run.invoke(app, ["twins", "set-desired", "pump-1", '{"mode": null}', "--version", "1", "--store-url", url])
    assert stale.exit_code == 3 and "version 2" in stale.output
    bad = run.invoke(app, ["twins", "set-desired", "pump-1", "{nope", "--store-url", url])
    assert bad.exit_code == 2 and "not JSON" in bad.output
    big = run.invoke(app, ["twins", "set-desired", "pump-1", json.dumps({"x": "y" * 9000}), "--store-url", url])
    assert big.exit_code == 2 and "8192" in big.output
    ok = run.invoke(app, ["twins", "set-desired", "pump-1", '{"mode": null}', "--version", "2", "--store-url", url])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["desired"] == {"window_ms": 5000}
    audit = AccessStore(url)
    try:
        actors = {e.actor for e in audit.audit_log() if e.action == "twin.desired"}
    finally:
        audit.close()
    assert len(actors) == 1 and next(iter(actors)).startswith("cli:")
