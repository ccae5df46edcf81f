"""The embedded nats-server's environment: one Go processor on a machine of two cores or fewer, unless the
operator's environment says otherwise (docs/operations.md, "nats-server's share of a small machine")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fieldmesh.runtime.natsserver import EmbeddedNats, nats_env, usable_cpus


@pytest.mark.parametrize("cpus", [1, 2])
def test_one_go_processor_on_a_small_machine(cpus: int) -> None:
    env = nats_env({"PATH": "/usr/bin"}, cpus)
    assert env == {"PATH": "/usr/bin", "GOMAXPROCS": "1"}


def test_larger_machines_and_the_operators_setting_are_left_alone() -> None:
    assert "GOMAXPROCS" not in nats_env({"PATH": "/usr/bin"}, 3)
    assert nats_env({"GOMAXPROCS": "2"}, 2)["GOMAXPROCS"] == "2"
    base = {"A": "1"}
    nats_env(base, 1)
    assert base == {"A": "1"}  # the caller's mapping is not changed


@pytest.mark.integration
def test_the_started_server_has_that_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()
    try:
        assert srv.proc is not None
        environ = Path(f"/proc/{srv.proc.pid}/environ").read_bytes().split(b"\0")
        got = [v for v in environ if v.startswith(b"GOMAXPROCS=")]
        want = nats_env(os.environ, usable_cpus()).get("GOMAXPROCS")
        assert got == ([f"GOMAXPROCS={want}".encode()] if want else [])
    finally:
        srv.stop()
