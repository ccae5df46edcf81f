"""``fieldmesh ca`` and ``fieldmesh edge provision`` as an operator and a device use them: real processes,
the API served over HTTPS with the CA's own server certificate, the device verifying it with ``ca.pem``."""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from fmtest.procs import free_port

pytestmark = pytest.mark.integration


def fm(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fieldmesh", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def flat(text: str) -> str:
    return " ".join(text.split())


def test_operator_and_device_commands_over_https(tmp_path: Path) -> None:
    data = tmp_path / "data"
    dd = ["--data-dir", str(data)]
    r = fm("ca", "init", *dd, "--device-days", "30")
    assert r.returncode == 0 and "keep it offline" in flat(r.stderr), r.stderr
    r = fm("ca", "policy", *dd)
    assert r.returncode == 0 and json.loads(r.stdout)["device_days"] == 30, r.stderr
    r = fm("ca", "policy", *dd, "--crl-days", "3")
    assert json.loads(r.stdout)["crl_days"] == 3 and json.loads(r.stdout)["device_days"] == 30, r.stderr
    again = fm("ca", "init", *dd)
    assert again.returncode == 2 and "exists" in again.stderr
    r = fm("ca", "server-cert", *dd, "--host", "127.0.0.1", "--host", "localhost")
    assert r.returncode == 0, r.stderr
    ca = data / "ca"
    assert stat.S_IMODE((ca / "server.key").stat().st_mode) == 0o600
    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "fieldmesh", "api", *dd, "--http-port", str(port),
                            "--tls-cert", str(ca / "server.pem"), "--tls-key", str(ca / "server.key")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"https://127.0.0.1:{port}"
    try:
        ctx = ssl.create_default_context(cafile=str(ca / "ca.pem"))  # the server is verified with ca.pem
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/v1/health", context=ctx, timeout=5):
                    break
            except urllib.error.HTTPError:
                break  # it answers (503: no hot store yet; provisioning needs none)
            except OSError:
                assert api.poll() is None, api.communicate()[1]
                assert time.monotonic() < deadline, "the API did not start"
                time.sleep(0.2)
        r = fm("ca", "token", "pump-7", *dd, "--ttl", "10m")
        assert r.returncode == 0 and r.stdout.startswith("fme_"), r.stderr
        token = r.stdout.strip()
        out = tmp_path / "device"
        r = fm("edge", "provision", "--url", url, "--ca-file", str(ca / "ca.pem"), "--device-id", "pump-7",
               "--token", token, "--out", str(out))
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        cert = x509.load_pem_x509_certificate((out / "device.pem").read_bytes())
        assert f"{cert.serial_number:032x}" == got["serial"]
        assert 29 < (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 30  # ca init --device-days 30
        r = fm("edge", "provision", "--url", url, "--ca-file", str(ca / "ca.pem"), "--device-id", "pump-7",
               "--token", token, "--out", str(tmp_path / "again"))
        assert r.returncode == 2 and "token_used" in r.stderr, r.stderr
        r = fm("edge", "provision", "--url", url, "--ca-file", str(ca / "ca.pem"), "--device-id", "pump-7",
               "--out", str(out), "--rotate", "--if-due")
        assert r.returncode == 0 and "not due" in r.stdout, r.stderr
        # a claim certificate for a batch, used by a device that was never registered
        r = fm("ca", "claim-cert", *dd, "--name", "batch-7", "--groups", "plant1", "--devices", "valve-*",
               "--out", str(tmp_path / "claim"))
        assert r.returncode == 0, r.stderr
        assert stat.S_IMODE((tmp_path / "claim" / "claim.key").stat().st_mode) == 0o600
        r = fm("edge", "provision", "--url", url, "--ca-file", str(ca / "ca.pem"), "--device-id", "valve-1",
               "--claim-cert", str(tmp_path / "claim/claim.pem"), "--claim-key", str(tmp_path / "claim/claim.key"),
               "--out", str(tmp_path / "valve"))
        assert r.returncode == 0, r.stderr
        # revoke the device: the CRL lists it
        r = fm("ca", "revoke", *dd, "--device", "pump-7", "--reason", "lost")
        assert r.returncode == 0 and got["serial"] in r.stderr, r.stderr
        crl = x509.load_pem_x509_crl((ca / "crl.pem").read_bytes())
        assert [f"{c.serial_number:032x}" for c in crl] == [got["serial"]]
        r = fm("edge", "provision", "--url", url, "--ca-file", str(ca / "ca.pem"), "--device-id", "pump-7",
               "--out", str(out), "--rotate")
        assert r.returncode == 2 and "certificate_invalid" in r.stderr, r.stderr
        status = urllib.request.urlopen(f"{url}/api/v1/audit?limit=1000", context=ctx, timeout=10)
        actions = {e["action"] for e in json.loads(status.read())}
        assert {"ca.init", "cert.server", "token.create", "claim.create", "provision.issued", "provision.refused",
                "cert.revoke"} <= actions, actions
        r = fm("ca", "revoke-claim", *dd, "batch-7")
        assert r.returncode == 0 and "1 claim certificate(s) revoked" in r.stderr, r.stderr
        assert fm("ca", "crl", *dd).returncode == 0
    finally:
        api.terminate()
        try:
            api.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            api.kill()
            api.communicate()
            raise
    # errors name what to fix, exit 2
    r = fm("ca", "token", "pump-8", "--data-dir", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "fieldmesh ca init" in flat(r.stderr), r.stderr
    r = fm("ca", "token", "pump-8", *dd, "--ttl", "soon")
    assert r.returncode == 2 and "bad duration" in r.stderr
    r = fm("edge", "provision", "--url", "http://127.0.0.1:1", "--device-id", "x", "--token", "t", "--out",
           str(tmp_path / "x"))
    assert r.returncode == 2 and "cannot reach" in r.stderr
