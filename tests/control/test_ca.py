"""The certificate authority: what it writes, what it signs, what it refuses.

Certificates are checked by verifiers independent of the code under test: cryptography's X.509 path
validation (``PolicyBuilder``, RFC 5280 + CA/B rules: key usages, EKU, path length) and the ``openssl verify``
command (with ``-purpose sslclient`` and the CRL).
"""

from __future__ import annotations

import datetime as dt
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fieldmesh.control.ca import (
    CLAIM_EKU,
    CaPolicy,
    CertificateAuthority,
    CertificateRefused,
    generate_key,
    verify_signature,
)
from fieldmesh.core.errors import ConfigError
from fieldmesh.edge.provision import build_csr, sign


def _csr(device_id: str, key: object | None = None) -> tuple[str, object]:
    key = key or generate_key("ec-p256")
    return build_csr(key, device_id), key  # type: ignore[arg-type]


def _verify_client(ca: CertificateAuthority, leaf_pem: str) -> list[x509.Certificate]:
    """Path-validate a client certificate against ca.pem's root (the intermediate as an untrusted one)."""
    bundle = x509.load_pem_x509_certificates(ca.bundle_path.read_bytes())
    leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
    verifier = PolicyBuilder().store(Store([bundle[-1]])).build_client_verifier()
    return verifier.verify(leaf, bundle[:-1]).chain


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("openssl")
    assert exe, "the openssl command is needed by these tests"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


def test_init_writes_a_two_level_ca_with_private_keys_0600(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ca").iterdir()}
    assert files == {"root.pem": 0o644, "root.key": 0o600, "issuing.pem": 0o644, "issuing.key": 0o600,
                     "claim-ca.pem": 0o644, "claim-ca.key": 0o600, "ca.pem": 0o644, "crl.pem": 0o644,
                     "ca.json": 0o644}
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    root = x509.load_pem_x509_certificate((tmp_path / "ca/root.pem").read_bytes())
    issuing = ca.issuing_cert
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey) and root.public_key().curve.name == "secp256r1"
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 1
    bc = issuing.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    for c in (root, issuing):
        ku = c.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert root.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == root_ski
    assert issuing.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == root_ski
    issuing.verify_directly_issued_by(root)
    years = lambda c: (c.not_valid_after_utc - c.not_valid_before_utc).days / 365  # noqa: E731
    assert 9.9 < years(root) < 10.1 and 2.9 < years(issuing) < 3.1
    bundle = x509.load_pem_x509_certificates(ca.bundle_path.read_bytes())
    assert bundle == [issuing, root]
    with pytest.raises(ConfigError, match="exists"):
        CertificateAuthority.init(tmp_path / "ca")
    reopened = CertificateAuthority.open(tmp_path / "ca")
    assert reopened.issuing_cert == issuing and reopened.policy == CaPolicy()


def test_a_device_certificate_has_the_right_subject_san_eku_and_verifies(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", policy=CaPolicy(device_days=30))
    csr_pem, key = _csr("pump-7")
    csr, device_id = ca.load_csr(csr_pem)
    assert device_id == "pump-7"
    issued = ca.issue_device(csr, device_id)
    cert = x509.load_pem_x509_certificate(issued.pem.encode())
    assert cert.subject.rfc4514_string() == "CN=pump-7" == issued.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:fieldmesh:device:pump-7"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.serial_number.bit_length() == 128 and issued.serial == f"{cert.serial_number:x}"
    assert len(issued.serial) == 32
    assert 29.9 < (cert.not_valid_after_utc - cert.not_valid_before_utc) / dt.timedelta(days=1) < 30.1
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[attr-defined]
    chain = _verify_client(ca, issued.pem)
    assert [c.subject for c in chain] == [cert.subject, ca.issuing_cert.subject, ca.chain[-1].subject]
    leaf = tmp_path / "leaf.pem"
    leaf.write_text(issued.pem)
    r = _openssl("verify", "-purpose", "sslclient", "-CAfile", str(ca.bundle_path), str(leaf))
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    r = _openssl("verify", "-purpose", "sslserver", "-CAfile", str(ca.bundle_path), str(leaf))
    assert r.returncode != 0  # a device certificate is not a server's
    # serials are random
    assert len({ca.issue_device(csr, "pump-7").serial for _ in range(20)}) == 20
    assert ca.verify_device_certificate(issued.pem)[:2] == ("pump-7", issued.serial)


def test_csrs_that_are_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    csr_pem, _ = _csr("pump-7")
    csr, _dev = ca.load_csr(csr_pem)
    with pytest.raises(CertificateRefused) as e:
        ca.issue_device(csr, "pump-8")  # the CSR names another device
    assert e.value.reason == "device_mismatch" and e.value.status == 403
    # a CSR whose signature does not verify: the body of one, the signature of another
    other, _ = _csr("pump-8")
    a, b = x509.load_pem_x509_csr(csr_pem.encode()), x509.load_pem_x509_csr(other.encode())
    assert a.signature != b.signature
    for bad, match in (("not a csr", "not a PEM"),
                       (build_csr(generate_key(), "bad id/with slash"), "CN must be the device id"),
                       (_weak_rsa_csr(), "too weak")):
        with pytest.raises(CertificateRefused, match=match) as e:
            ca.load_csr(bad)
        assert e.value.reason == "bad_csr" and e.value.status == 400
    key = ec.generate_private_key(ec.SECP256R1())
    no_cn = (x509.CertificateSigningRequestBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "acme")]))
             .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CertificateRefused, match="CN must be"):
        ca.load_csr(no_cn)


def _weak_rsa_csr() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    return build_csr(key, "pump-7")


def test_claim_certificates_are_not_device_certificates(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    cert_pem, key_pem, serial, _ = ca.issue_claim("batch-7", days=10)
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [CLAIM_EKU]
    claim = ca.verify_claim(cert_pem)
    assert claim.name == "batch-7" and claim.serial == serial
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert verify_signature(claim.public_key, sign(key, b"data"), b"data")  # type: ignore[arg-type]
    assert not verify_signature(claim.public_key, sign(key, b"data"), b"other")  # type: ignore[arg-type]
    # the claim CA is not in ca.pem: a door trusting ca.pem refuses a claim certificate
    with pytest.raises(VerificationError):
        _verify_client(ca, cert_pem)
    # nor does a claim pass as a device certificate, or a device certificate as a claim
    with pytest.raises(CertificateRefused) as e:
        ca.verify_device_certificate(cert_pem)
    assert e.value.reason == "certificate_invalid"
    csr, dev = ca.load_csr(_csr("pump-7")[0])
    with pytest.raises(CertificateRefused) as e:
        ca.verify_claim(ca.issue_device(csr, dev).pem)
    assert e.value.reason == "claim_invalid"
    # a claim of another CA
    other = CertificateAuthority.init(tmp_path / "other")
    with pytest.raises(CertificateRefused, match="not a claim certificate of this CA"):
        ca.verify_claim(other.issue_claim("batch-7")[0])
    with pytest.raises(CertificateRefused, match="not valid now"):
        ca.verify_claim(cert_pem, at_ms=claim.not_after_ms + 1)


def test_server_certificate_names_its_hosts(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    chain_pem, key_pem = ca.issue_server(["127.0.0.1", "myhost"])
    certs = x509.load_pem_x509_certificates(chain_pem.encode())
    san = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["myhost"]
    assert certs[1:] == [ca.issuing_cert, *ca.chain]
    verifier = PolicyBuilder().store(Store([ca.chain[-1]])).build_server_verifier(x509.DNSName("myhost"))
    verifier.verify(certs[0], certs[1:])
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert key.public_key() == certs[0].public_key()


def test_crl_lists_revoked_serials_and_openssl_refuses_them(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", policy=CaPolicy(crl_days=2))
    csr, dev = ca.load_csr(_csr("pump-7")[0])
    good, bad = ca.issue_device(csr, dev), ca.issue_device(csr, dev)
    ca.write_crl([(bad.serial, 1_763_812_345_000)])
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(ca.issuing_cert.public_key())  # type: ignore[arg-type]
    assert [r.serial_number for r in crl] == [int(bad.serial, 16)]
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=2)
    assert not ca.crl_due()
    assert ca.crl_due(now_ms=int(crl.last_update_utc.timestamp() * 1000) + 86_400_000 + 1)
    for issued, ok in ((good, True), (bad, False)):
        leaf = tmp_path / f"{issued.serial}.pem"
        leaf.write_text(issued.pem)
        r = _openssl("verify", "-crl_check", "-CAfile", str(ca.bundle_path), "-CRLfile", str(ca.crl_path), str(leaf))
        assert (r.returncode == 0) is ok, (r.stdout, r.stderr)
        if not ok:
            assert "revoked" in (r.stdout + r.stderr)


def test_the_operators_root_signs_our_issuing_ca(tmp_path: Path) -> None:
    mine = CertificateAuthority.init(tmp_path / "corp")  # stands for the operator's own PKI
    ca = CertificateAuthority.init(tmp_path / "ca", root_cert=tmp_path / "corp/root.pem",
                                   root_key=tmp_path / "corp/root.key")
    assert not (tmp_path / "ca/root.key").exists()  # the operator's root key is used once, not kept
    assert ca.chain[-1] == mine.chain[-1]
    csr, dev = ca.load_csr(_csr("pump-7")[0])
    _verify_client(ca, ca.issue_device(csr, dev).pem)
    with pytest.raises(ConfigError, match="not the key of"):
        CertificateAuthority.init(tmp_path / "x", root_cert=tmp_path / "corp/root.pem",
                                  root_key=tmp_path / "ca/issuing.key")
    with pytest.raises(ConfigError, match="not a CA certificate"):
        leaf = tmp_path / "leaf.pem"
        leaf.write_text(ca.issue_server(["h"])[0])
        CertificateAuthority.init(tmp_path / "y", root_cert=leaf, root_key=tmp_path / "ca/issuing.key")
    with pytest.raises(ConfigError, match="both"):
        CertificateAuthority.init(tmp_path / "z", root_cert=tmp_path / "corp/root.pem")


def test_the_operators_issuing_ca_issues_devices(tmp_path: Path) -> None:
    corp = CertificateAuthority.init(tmp_path / "corp")
    chain = tmp_path / "issuing-chain.pem"
    chain.write_text(corp.chain_pem())  # the intermediate and its root, as an operator exports them
    ca = CertificateAuthority.init(tmp_path / "ca", issuing_cert=chain, issuing_key=tmp_path / "corp/issuing.key")
    assert ca.issuing_cert == corp.issuing_cert and ca.chain == corp.chain
    assert stat.S_IMODE((tmp_path / "ca/issuing.key").stat().st_mode) == 0o600
    csr, dev = ca.load_csr(_csr("pump-7")[0])
    issued = ca.issue_device(csr, dev)
    _verify_client(corp, issued.pem)  # verifies against the operator's own bundle
    opened = CertificateAuthority.open(tmp_path / "ca", device_days=5)
    assert opened.policy.device_days == 5
    with pytest.raises(ConfigError, match="no certificate authority"):
        CertificateAuthority.open(tmp_path / "nothing")


def test_the_policy_changes_what_is_issued_from_now_on(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    assert ca.set_policy(device_days=7, crl_days=2) == CaPolicy(device_days=7, crl_days=2)
    reopened = CertificateAuthority.open(tmp_path / "ca")
    assert reopened.policy.device_days == 7 and reopened.policy.crl_days == 2
    csr, dev = reopened.load_csr(_csr("pump-7")[0])
    issued = reopened.issue_device(csr, dev)
    assert 6.9 < (issued.not_after_ms - issued.not_before_ms) / 86_400_000 < 7.1
    with pytest.raises(ConfigError, match="key_type"):
        ca.set_policy(key_type=1)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="device_days"):
        ca.set_policy(device_days=0)
