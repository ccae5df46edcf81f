"""Provisioning end to end: the device client over real HTTP (uvicorn) to the real API app, over real
SQLite and PostgreSQL stores, with certificates checked by an independent verifier (cryptography's X.509
path validation) against the ``ca.pem`` servers use.
"""

from __future__ import annotations

import base64
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from fieldmesh.api.app import create_app
from fieldmesh.api.auth import Access
from fieldmesh.api.provision import ProvisionService
from fieldmesh.control.ca import CertificateAuthority
from fieldmesh.control.provision import Provisioner
from fieldmesh.edge.provision import ProvisionError, build_csr, new_key, provision, sign
from fieldmesh.store import load_store
from fieldmesh.store.access import AccessStore
from fmtest.procs import free_port


@dataclass
class Api:
    """One API server (uvicorn, a thread) and what the test needs beside it."""

    url: str
    admin: dict[str, str]
    prov: Provisioner  # a second handle on the same CA and store: what the CLI does
    ca_dir: Path

    def post(self, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.url}/api/v1/provision", json=body, timeout=60)


def _serve(url: str, ca_dir: Path, closers: list[Any]) -> str:
    access = Access(url)
    store = load_store(url, readonly=True)
    app = create_app(url, access=access, store=store, ca_dir=ca_dir)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=server.run, name="api", daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert t.is_alive() and time.monotonic() < deadline, "the API server did not start"
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        t.join(15)
        app.state.provision.close()
        store.close()
        access.close()

    closers.append(stop)
    return f"http://127.0.0.1:{port}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/store.db"
    else:
        url = f"{request.getfixturevalue('pg_url')}?schema=t_{secrets.token_hex(5)}"
    load_store(url).close()
    return url


@pytest.fixture
def servers(store_url: str, tmp_path: Path) -> Iterator[list[Api]]:
    """Two API servers over one store and one CA (as two replicas behind a balancer)."""
    ca_dir = tmp_path / "ca"
    CertificateAuthority.init(ca_dir)
    keys = AccessStore(store_url)
    _, admin = keys.create_key(role="admin", actor="test")  # beyond local-only mode: the API needs keys
    keys.close()
    closers: list[Any] = []
    prov = Provisioner.open(ca_dir, store_url)
    closers.append(prov.close)
    try:
        yield [Api(url=_serve(store_url, ca_dir, closers), admin={"X-API-Key": admin}, prov=prov, ca_dir=ca_dir)
               for _ in range(2)]
    finally:
        for close in reversed(closers):
            close()


@pytest.fixture
def api(servers: list[Api]) -> Api:
    return servers[0]


def _verify(ca_dir: Path, cert_pem: bytes, chain_pem: bytes) -> x509.Certificate:
    """Path-validate a device certificate as a TLS server verifying clients with ca.pem would."""
    bundle = x509.load_pem_x509_certificates((ca_dir / "ca.pem").read_bytes())
    leaf = x509.load_pem_x509_certificate(cert_pem)
    verifier = PolicyBuilder().store(Store([bundle[-1]])).build_client_verifier()
    verifier.verify(leaf, x509.load_pem_x509_certificates(chain_pem))
    return leaf


def _refused(exc: pytest.ExceptionInfo[ProvisionError], status: int, reason: str) -> None:
    assert (exc.value.status, exc.value.reason) == (status, reason), str(exc.value)


def _metric(api: Api, reason: str | None) -> float:
    text = httpx.get(f"{api.url}/metrics", headers=api.admin, timeout=30).text
    name = "fieldmesh_certificates_issued_total" if reason is None else \
        f'fieldmesh_provision_refused_total{{reason="{reason}"}}'
    lines = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    assert len(lines) == 1, (name, text[-2000:])
    return float(lines[0].split()[-1])


def _token(api: Api, device_id: str, ttl_s: int = 3600) -> str:
    r = httpx.post(f"{api.url}/api/v1/provision/tokens", json={"device_id": device_id, "ttl_s": ttl_s},
                   headers=api.admin, timeout=30)
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def test_token_flow_end_to_end(api: Api, tmp_path: Path) -> None:
    token = _token(api, "pump-7")
    out = tmp_path / "dev"
    done = provision(api.url, device_id="pump-7", out_dir=out, token=token)
    for p in (done.key, done.certificate, done.chain):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    leaf = _verify(api.ca_dir, done.certificate.read_bytes(), done.chain.read_bytes())
    assert leaf.subject.rfc4514_string() == "CN=pump-7"
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    key = serialization.load_pem_private_key(done.key.read_bytes(), None)
    assert key.public_key() == leaf.public_key()
    assert done.serial == f"{leaf.serial_number:032x}"
    assert abs(done.not_after_ms - (time.time() + 90 * 86400) * 1000) < 600_000  # 90 days by default
    # the registry has the device (active) and the certificate, valid now
    dev = api.prov.registry.get("pump-7")
    assert dev is not None and dev.status == "active"
    valid = api.prov.registry.certificates("pump-7", valid_at_ms=int(time.time() * 1000))
    assert [c.serial for c in valid] == [done.serial]
    # the token is spent: a second use is refused, counted and audited
    with pytest.raises(ProvisionError) as e:
        provision(api.url, device_id="pump-7", out_dir=tmp_path / "again", token=token)
    _refused(e, 401, "token_used")
    with pytest.raises(ProvisionError) as e:
        provision(api.url, device_id="pump-7", out_dir=tmp_path / "again", token="fme_" + "x" * 43)
    _refused(e, 401, "token_unknown")
    assert _metric(api, None) == 1 and _metric(api, "token_used") == 1 and _metric(api, "token_unknown") == 1
    assert _metric(api, "token_expired") == 0
    log = httpx.get(f"{api.url}/api/v1/audit", headers=api.admin, timeout=30).json()
    actions = [(e["action"], e["target"]) for e in log]
    for expected in (("provision.refused", "pump-7"), ("provision.issued", "pump-7"), ("cert.add", done.serial),
                     ("device.add", "pump-7"), ("token.use", "pump-7"), ("token.create", "pump-7")):
        assert expected in actions, (expected, actions)
    refused = next(e for e in log if e["action"] == "provision.refused")
    assert refused["detail"]["reason"] in ("token_used", "token_unknown") and refused["detail"]["peer"] == "127.0.0.1"


def test_expired_token_and_another_devices_csr_are_refused(api: Api, tmp_path: Path) -> None:
    _, expired = api.prov.create_token("pump-1", ttl_ms=1, actor="test")
    time.sleep(0.01)
    with pytest.raises(ProvisionError) as e:
        provision(api.url, device_id="pump-1", out_dir=tmp_path / "a", token=expired)
    _refused(e, 401, "token_expired")
    token = _token(api, "pump-1")
    with pytest.raises(ProvisionError) as e:  # a CSR naming another device than the token's
        provision(api.url, device_id="pump-2", out_dir=tmp_path / "b", token=token)
    _refused(e, 403, "device_mismatch")
    assert api.prov.registry.get("pump-2") is None and not api.prov.registry.certificates("pump-2")
    provision(api.url, device_id="pump-1", out_dir=tmp_path / "c", token=token)  # not spent by the refusal
    # malformed requests
    r = api.post({"csr": "not a csr", "token": token})
    assert r.status_code == 400 and r.json()["reason"] == "bad_csr"
    r = api.post({"csr": build_csr(new_key(), "pump-1")})
    assert r.status_code == 401 and r.json()["reason"] == "no_credential"
    r = api.post({"csr": build_csr(new_key(), "pump-1"), "token": token, "claim_certificate": "x", "signature": "x"})
    assert r.status_code == 401 and r.json()["reason"] == "no_credential"
    assert api.post({"token": token}).status_code == 400  # no CSR


def test_concurrent_requests_with_one_token_get_one_certificate(servers: list[Api]) -> None:
    api = servers[0]
    token = _token(api, "valve-3")
    bodies = [{"csr": build_csr(new_key(), "valve-3"), "token": token} for _ in range(12)]
    barrier = threading.Barrier(len(bodies))

    def go(i: int) -> httpx.Response:
        barrier.wait(30)
        return servers[i % 2].post(bodies[i])  # two API replicas, one database

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(go, range(len(bodies))))
    codes = sorted(r.status_code for r in answers)
    assert codes == [200] + [401] * (len(bodies) - 1), [r.text for r in answers]
    assert {r.json()["reason"] for r in answers if r.status_code == 401} == {"token_used"}
    assert len(api.prov.registry.certificates("valve-3")) == 1
    assert _metric(api, "token_used") == len(bodies) - 1


def test_concurrent_claims_of_one_new_device_get_one_certificate(servers: list[Api]) -> None:
    """The claim check (no valid certificate yet) is repeated where the certificate is recorded: of claims
    racing for one new device, one wins; the others' certificates, signed already, are recorded revoked."""
    api = servers[0]
    cert_pem, key_pem, _ = api.prov.create_claim("batch-race", days=30, devices="race-*", actor="test")
    claim_key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    bodies = []
    for _ in range(8):
        csr = build_csr(new_key(), "race-1")
        der = x509.load_pem_x509_csr(csr.encode()).public_bytes(serialization.Encoding.DER)
        bodies.append({"csr": csr, "claim_certificate": cert_pem,
                       "signature": base64.b64encode(sign(claim_key, der)).decode()})  # type: ignore[arg-type]
    barrier = threading.Barrier(len(bodies))

    def go(i: int) -> httpx.Response:
        barrier.wait(30)
        return servers[i % 2].post(bodies[i])  # two API replicas, one database

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(go, range(len(bodies))))
    assert sorted(r.status_code for r in answers) == [200] + [403] * (len(bodies) - 1), [r.text for r in answers]
    assert {r.json()["reason"] for r in answers if r.status_code == 403} == {"already_provisioned"}
    now = int(time.time() * 1000)
    valid = api.prov.registry.certificates("race-1", valid_at_ms=now)
    assert len(valid) == 1
    winner = next(r for r in answers if r.status_code == 200)
    won = x509.load_pem_x509_certificate(winner.json()["certificate"].encode())
    assert won.serial_number == int(valid[0].serial, 16)
    # a loser's certificate reached the registry as revoked (if it was signed before its refusal)
    others = [c for c in api.prov.registry.certificates("race-1") if c.serial != valid[0].serial]
    assert all(c.revoked_ms is not None for c in others)


def test_claim_flow(api: Api, tmp_path: Path) -> None:
    cert_pem, key_pem, rec = api.prov.create_claim("batch-7", days=30, groups=("plant1",), devices="pump-*",
                                                   actor="test")
    (tmp_path / "claim.pem").write_text(cert_pem)
    (tmp_path / "claim.key").write_text(key_pem)
    claim = {"claim_cert": tmp_path / "claim.pem", "claim_key": tmp_path / "claim.key"}
    done = provision(api.url, device_id="pump-9", out_dir=tmp_path / "d9", **claim)
    _verify(api.ca_dir, done.certificate.read_bytes(), done.chain.read_bytes())
    dev = api.prov.registry.get("pump-9")
    assert dev is not None and dev.status == "active" and dev.groups == ("plant1",)
    # a provisioned device cannot be claimed again (a claim key must not take it over)
    with pytest.raises(ProvisionError) as e:
        provision(api.url, device_id="pump-9", out_dir=tmp_path / "x", **claim)
    _refused(e, 403, "already_provisioned")
    with pytest.raises(ProvisionError) as e:  # outside the claim's devices
        provision(api.url, device_id="valve-1", out_dir=tmp_path / "x", **claim)
    _refused(e, 403, "claim_not_allowed")
    # a signature by another key than the claim's
    csr = build_csr(new_key(), "pump-10")
    der = x509.load_pem_x509_csr(csr.encode()).public_bytes(serialization.Encoding.DER)
    forged = base64.b64encode(sign(new_key(), der)).decode()
    r = api.post({"csr": csr, "claim_certificate": cert_pem, "signature": forged})
    assert r.status_code == 401 and r.json()["reason"] == "bad_signature", r.text
    r = api.post({"csr": csr, "claim_certificate": cert_pem})
    assert r.status_code == 401 and r.json()["reason"] == "bad_signature", r.text
    # a claim of another CA, and one revoked
    other = CertificateAuthority.init(tmp_path / "other-ca")
    o_cert, o_key, _, _ = other.issue_claim("batch-7")
    (tmp_path / "o.pem").write_text(o_cert)
    (tmp_path / "o.key").write_text(o_key)
    with pytest.raises(ProvisionError) as e:
        provision(api.url, device_id="pump-10", out_dir=tmp_path / "x", claim_cert=tmp_path / "o.pem",
                  claim_key=tmp_path / "o.key")
    _refused(e, 401, "claim_invalid")
    provision(api.url, device_id="pump-11", out_dir=tmp_path / "d11", **claim)
    assert [r.serial for r in api.prov.enrollment.revoke_claim("batch-7", actor="test")] == [rec.serial]
    with pytest.raises(ProvisionError) as e:
        provision(api.url, device_id="pump-12", out_dir=tmp_path / "x", **claim)
    _refused(e, 401, "claim_invalid")
    assert "revoked" in str(e.value)


def test_rotation_and_revocation(api: Api, tmp_path: Path) -> None:
    out = tmp_path / "dev"
    first = provision(api.url, device_id="pump-7", out_dir=out, token=_token(api, "pump-7"))
    old_pem, old_key = first.certificate.read_bytes(), first.key.read_bytes()
    second = provision(api.url, device_id="pump-7", out_dir=out, rotate=True)
    assert second.serial != first.serial and out.joinpath("device.key").read_bytes() != old_key
    _verify(api.ca_dir, second.certificate.read_bytes(), second.chain.read_bytes())
    now = int(time.time() * 1000)
    assert {c.serial for c in api.prov.registry.certificates("pump-7", valid_at_ms=now)} == {first.serial,
                                                                                          second.serial}
    # revoke the old one through the admin API: gone from the valid set, listed in the CRL
    as_openssl = ":".join(f"{int(first.serial, 16):X}"[i:i + 2] for i in range(0, 32, 2))  # AB:CD:...
    r = httpx.post(f"{api.url}/api/v1/ca/revoke", json={"serial": as_openssl, "reason": "rotated"},
                   headers=api.admin, timeout=30)
    assert r.status_code == 200 and [c["serial"] for c in r.json()] == [first.serial], r.text
    now = int(time.time() * 1000)
    assert [c.serial for c in api.prov.registry.certificates("pump-7", valid_at_ms=now)] == [second.serial]
    crl = x509.load_pem_x509_crl((api.ca_dir / "crl.pem").read_bytes())
    assert crl.is_signature_valid(CertificateAuthority.open(api.ca_dir).issuing_cert.public_key())  # type: ignore[arg-type]
    assert {f"{c.serial_number:032x}" for c in crl} == {first.serial}
    # the revoked certificate can no longer rotate
    key = serialization.load_pem_private_key(old_key, None)
    csr = build_csr(new_key(), "pump-7")
    der = x509.load_pem_x509_csr(csr.encode()).public_bytes(serialization.Encoding.DER)
    body = {"csr": csr, "certificate": old_pem.decode(), "signature": base64.b64encode(sign(key, der)).decode()}  # type: ignore[arg-type]
    r = api.post(body)
    assert r.status_code == 401 and r.json()["reason"] == "certificate_invalid", r.text
    # a valid certificate rotating another device's CSR
    key2 = serialization.load_pem_private_key(second.key.read_bytes(), None)
    csr = build_csr(new_key(), "pump-8")
    der = x509.load_pem_x509_csr(csr.encode()).public_bytes(serialization.Encoding.DER)
    r = api.post({"csr": csr, "certificate": second.certificate.read_text(),
                  "signature": base64.b64encode(sign(key2, der)).decode()})  # type: ignore[arg-type]
    assert r.status_code == 403 and r.json()["reason"] == "device_mismatch", r.text
    # revoke the device: every certificate, and the CRL lists both
    r = httpx.post(f"{api.url}/api/v1/ca/revoke", json={"device_id": "pump-7"}, headers=api.admin, timeout=30)
    assert [c["serial"] for c in r.json()] == [second.serial]
    crl = x509.load_pem_x509_crl((api.ca_dir / "crl.pem").read_bytes())
    assert {f"{c.serial_number:032x}" for c in crl} == {first.serial, second.serial}
    assert api.prov.registry.certificates("pump-7", valid_at_ms=int(time.time() * 1000)) == []
    with pytest.raises(ProvisionError) as e:
        provision(api.url, device_id="pump-7", out_dir=out, rotate=True)
    _refused(e, 401, "certificate_invalid")
    r = httpx.post(f"{api.url}/api/v1/ca/revoke", json={"serial": "ab" * 16}, headers=api.admin, timeout=30)
    assert r.status_code == 404


def test_suspended_device_is_refused_whatever_the_proof(api: Api, tmp_path: Path) -> None:
    out = tmp_path / "dev"
    provision(api.url, device_id="pump-5", out_dir=out, token=_token(api, "pump-5"))
    cert_pem, key_pem, _ = api.prov.create_claim("batch-8", actor="test")
    (tmp_path / "claim.pem").write_text(cert_pem)
    (tmp_path / "claim.key").write_text(key_pem)
    token = _token(api, "pump-5")
    api.prov.registry.update("pump-5", status="suspended", actor="test")
    for kw in ({"token": token}, {"rotate": True},
               {"claim_cert": tmp_path / "claim.pem", "claim_key": tmp_path / "claim.key"}):
        with pytest.raises(ProvisionError) as e:
            provision(api.url, device_id="pump-5", out_dir=out, **kw)  # type: ignore[arg-type]
        _refused(e, 403, "device_not_active")
    assert _metric(api, "device_not_active") == 3
    api.prov.registry.update("pump-5", status="active", actor="test")
    provision(api.url, device_id="pump-5", out_dir=out, token=token)  # the token was not spent while suspended
    # a retired device (registered, never provisioned) too
    api.prov.registry.add("pump-6", status="retired", actor="test")
    with pytest.raises(ProvisionError) as e:
        provision(api.url, device_id="pump-6", out_dir=tmp_path / "d6", token=_token(api, "pump-6"))
    _refused(e, 403, "device_not_active")


def test_no_ca_is_a_503_naming_the_command(store_url: str, tmp_path: Path) -> None:
    closers: list[Any] = []
    try:
        url = _serve(store_url, tmp_path / "no-ca", closers)
        r = httpx.post(f"{url}/api/v1/provision", json={"csr": "x", "token": "y"}, timeout=30)
        assert r.status_code == 503 and "fieldmesh ca init" in r.json()["detail"]
    finally:
        for close in closers:
            close()


def test_the_api_rewrites_a_crl_past_half_its_life_or_out_of_date(store_url: str, tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")  # crl_days 7
    week_ago = int(time.time() * 1000) - 5 * 86_400_000
    ca.write_crl([], now_ms=week_ago)  # 5 of its 7 days gone: due
    assert ca.crl_due()
    service = ProvisionService(store_url, tmp_path / "ca")
    service.start_crl_refresher(interval_s=0.1)
    try:
        deadline = time.monotonic() + 60
        while ca.crl_due():
            assert time.monotonic() < deadline, "the CRL was not rewritten"
            time.sleep(0.1)
        crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
        assert abs(crl.last_update_utc.timestamp() - time.time()) < 120 and list(crl) == []
        # a revocation made elsewhere (a device deleted from the registry revokes its certificates)
        prov = Provisioner.open(tmp_path / "ca", store_url)
        try:
            token = prov.create_token("pump-3", ttl_ms=60_000, actor="test")[1]
            serial = prov.provision(csr=build_csr(new_key(), "pump-3"), token=token).certificate.serial
            prov.registry.delete("pump-3", actor="test")
        finally:
            prov.close()
        while [f"{c.serial_number:032x}" for c in x509.load_pem_x509_crl(ca.crl_path.read_bytes())] != [serial]:
            assert time.monotonic() < deadline, "the CRL does not list the deleted device's certificate"
            time.sleep(0.1)
    finally:
        service.close()
