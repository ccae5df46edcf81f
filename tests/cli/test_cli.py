"""Bad flags get a clear message naming the problem, never a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

from typer.testing import CliRunner

from fieldmesh.cli.main import app

runner = CliRunner()


def test_taken_port_names_the_flag(tmp_path: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = runner.invoke(app, ["up", "--data-dir", str(tmp_path), "--mqtt-port", str(port), "--for", "1"])
    assert r.exit_code == 2
    assert f"MQTT port {port} is already in use" in r.output and "--mqtt-port" in r.output
    assert "Traceback" not in r.output


def test_out_of_range_and_unknown_values():
    r = runner.invoke(app, ["up", "--http-port", "99999"])
    assert r.exit_code == 2 and "--http-port" in r.output
    r = runner.invoke(app, ["process", "--bus-url", "nats://x", "--store-url", "sqlite:///x",
                            "--partitions", "9", "--total-partitions", "8"])
    assert r.exit_code == 2 and "outside 0..7" in r.output


def test_query_without_a_store_and_a_write_are_refused(tmp_path: Path):
    r = runner.invoke(app, ["query", "SELECT 1", "--data-dir", str(tmp_path / "none")])
    assert r.exit_code == 2 and "fieldmesh up" in r.output
    from fieldmesh.store.sqlite import SqliteStore

    SqliteStore(f"sqlite:///{tmp_path}/store.db").close()
    r = runner.invoke(app, ["query", "DELETE FROM readings", "--data-dir", str(tmp_path)])
    assert r.exit_code == 2 and "read-only" in r.output
    r = runner.invoke(app, ["query", "SELECT count(*) AS n FROM readings", "--data-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0 and '[{"n": 0}]' in r.output


def test_bad_setting_names_the_variable(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("FIELDMESH__GATEWAY__MAX_SKEW_MS", "-5")
    r = runner.invoke(app, ["up", "--data-dir", str(tmp_path), "--for", "1"])
    assert r.exit_code == 2 and "FIELDMESH__GATEWAY__MAX_SKEW_MS" in r.output
