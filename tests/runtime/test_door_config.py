"""Door flags that cannot work are refused before anything starts: exit 2, a message naming what to set."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fieldmesh.cli.main import app
from fmtest.pki import CA

runner = CliRunner()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    ca = CA(tmp_path_factory.mktemp("pki"), "root")
    s = ca.server()
    return {"cert": str(s.cert_path), "key": str(s.key_path), "ca": str(ca.cert_path)}


@pytest.mark.parametrize(("args", "says"), [
    (["--mqtt-host", "0.0.0.0"], ["--mqtt-host 0.0.0.0", "--require-client-cert"]),
    (["--mqtt-host", "192.0.2.7", "--door", "mosquitto"], ["beyond loopback", "--require-client-cert"]),
    (["--mqtt-host", "0.0.0.0", "--mqtt-tls-cert", "{cert}", "--mqtt-tls-key", "{key}"], ["--require-client-cert"]),
    (["--mqtt-tls-cert", "{cert}"], ["--mqtt-tls-key is missing"]),
    (["--mqtt-tls-cert", "{cert}", "--mqtt-tls-key", "{key}", "--require-client-cert"], ["--mqtt-ca"]),
    (["--mqtt-tls-cert", "/nonexistent.pem", "--mqtt-tls-key", "{key}"], ["--mqtt-tls-cert /nonexistent.pem"]),
    (["--mqtt-tls-cert", "{cert}", "--mqtt-tls-key", "{key}", "--simulate", "3"], ["--simulate"]),
    (["--mqtt-url", "mqtt://127.0.0.1:1883", "--mqtt-tls-cert", "{cert}", "--mqtt-tls-key", "{key}"],
     ["external broker"]),
])
def test_refused_with_a_message(tmp_path: Path, pki: dict[str, str], args: list[str], says: list[str]) -> None:
    argv = ["up", "--data-dir", str(tmp_path / "d"), "--mqtt-port", "0", "--http-port", "0", "--for", "1",
            *(a.format(**pki) for a in args)]
    r = runner.invoke(app, argv)
    out = " ".join(r.output.split())
    assert r.exit_code == 2, out
    for s in says:
        assert s in out, out
    assert "Traceback" not in out
    assert not (tmp_path / "d" / "nats").exists()  # nothing was started
