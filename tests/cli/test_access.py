"""``fieldmesh keys`` and how ``fieldmesh up`` guards its API: local-only mode, the refusal to listen
beyond loopback without authentication, HTTPS (docs/security.md). Real processes, real stores."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import secrets
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fieldmesh.store.access import AccessStore
from fmtest.procs import free_port

pytestmark = pytest.mark.integration


def fm(*args: str, env: dict[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fieldmesh", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[list[str], str]:
    """The CLI flags naming a store, and its URL."""
    if request.param == "sqlite":
        return ["--data-dir", str(tmp_path / "data")], f"sqlite:///{(tmp_path / 'data' / 'store.db').resolve()}"
    url = f"{request.getfixturevalue('pg_url')}?schema=t_{secrets.token_hex(5)}"
    return ["--store-url", url], url


def test_keys_create_list_revoke(where: tuple[list[str], str]) -> None:
    flags, url = where
    r = fm("keys", "create", "--role", "operator", "--groups", "plant1,lab", "--name", "ci", *flags)
    assert r.returncode == 0, r.stderr
    secret = r.stdout.strip()
    assert re.fullmatch(r"fmk_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", secret), r.stdout
    key_id = secret.split("_")[1]
    assert "shown this once" in flat(r.stderr)
    listed = json.loads(fm("keys", "list", "--json", *flags).stdout)
    assert [(k["id"], k["name"], k["role"], k["groups"], k["revoked_ms"]) for k in listed] == [
        (key_id, "ci", "operator", ["lab", "plant1"], None)]
    assert secret not in json.dumps(listed) and secret.split("_", 2)[2] not in json.dumps(listed)
    store = AccessStore(url)
    try:
        assert store.verify(secret) is not None
        assert fm("keys", "revoke", key_id, *flags).returncode == 0
        assert store.verify(secret) is None  # the next check refuses it: nothing cached
        assert [e.action for e in store.audit_log()] == ["key.revoke", "key.create"]
        assert all(e.actor.startswith("cli:") for e in store.audit_log())
    finally:
        store.close()
    assert json.loads(fm("keys", "list", "--json", *flags).stdout)[0]["revoked_ms"] is not None
    bad = fm("keys", "create", "--role", "root", *flags)
    assert bad.returncode == 2 and "unknown role 'root'" in flat(bad.stderr)
    missing = fm("keys", "revoke", "0123456789ab", *flags)
    assert missing.returncode == 2 and "no API key" in flat(missing.stderr)


def test_up_says_local_only_mode_on_loopback(tmp_path: Path) -> None:
    r = fm("up", "--data-dir", str(tmp_path / "d"), "--mqtt-port", "0", "--http-port", "0", "--for", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert "(local-only mode: no authentication, every listener is on loopback" in flat(r.stderr)


def test_up_refuses_beyond_loopback_without_authentication(tmp_path: Path) -> None:
    data = tmp_path / "d"
    for env in ({}, {"FIELDMESH_HTTP_HOST": "0.0.0.0"}):
        args = ["up", "--data-dir", str(data), "--mqtt-port", "0", "--http-port", "0", "--for", "2"]
        r = fm(*args, *([] if env else ["--http-host", "0.0.0.0"]), env=env)
        assert r.returncode == 2, r.stderr
        err = flat(r.stderr)
        assert "--http-host 0.0.0.0 serves the API beyond loopback, and no authentication is configured" in err
        assert "fieldmesh keys create --role admin" in err and "FIELDMESH__ACCESS__OIDC_ISSUER" in err
        assert not (data / "nats").exists()  # refused before anything started
    # a viewer key is not enough: someone must be able to manage keys
    assert fm("keys", "create", "--role", "viewer", "--data-dir", str(data)).returncode == 0
    assert fm(*args, "--http-host", "0.0.0.0").returncode == 2
    api = fm("api", "--data-dir", str(data), "--host", "0.0.0.0", "--http-port", str(free_port()))
    assert api.returncode == 2 and "serves the API beyond loopback" in flat(api.stderr)
    half = fm(*args, "--tls-cert", str(tmp_path / "none.pem"))
    assert half.returncode == 2 and "both --tls-cert and --tls-key" in flat(half.stderr)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "api.crt", tmp_path / "api.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_up_beyond_loopback_over_https_with_a_key(tmp_path: Path) -> None:
    data = tmp_path / "d"
    admin = fm("keys", "create", "--role", "admin", "--data-dir", str(data)).stdout.strip()
    cert, key = _self_signed(tmp_path)
    port = free_port()
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fieldmesh", "up", "--data-dir", str(data), "--mqtt-port", "0",
             "--http-port", str(port), "--http-host", "0.0.0.0", "--tls-cert", str(cert), "--tls-key", str(key)],
            stdout=out, stderr=subprocess.STDOUT)
    ctx = ssl.create_default_context(cafile=str(cert))

    def get(path: str, token: str | None = None, scheme: str = "https") -> tuple[int, Any]:
        req = urllib.request.Request(f"{scheme}://127.0.0.1:{port}/api/v1{path}",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(req, timeout=10, context=ctx if scheme == "https" else None) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if get("/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        line = flat(log.read_text())
        assert f"API https://0.0.0.0:{port}/api/v1 (authentication: API keys)" in line, line
        assert get("/health")[1].keys() == {"status", "version"}  # open to probes, without details
        status, body = get("/stats")
        assert status == 401 and "authentication required" in body["detail"]
        status, body = get("/stats", admin)
        assert status == 200 and body["stored"] == 0
        assert get("/whoami", admin)[1]["role"] == "admin"
        with pytest.raises(OSError):  # plain HTTP on the HTTPS port gets no answer
            get("/health", scheme="http")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
