"""The device side of provisioning without a server: an interrupted key swap, when rotation is due."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fieldmesh.control.ca import CertificateAuthority
from fieldmesh.edge.provision import build_csr, due_for_rotation, finish_pending, new_key


def _pair(ca: CertificateAuthority) -> tuple[bytes, bytes]:
    key = new_key()
    csr, dev = ca.load_csr(build_csr(key, "pump-7"))
    pem = ca.issue_device(csr, dev).pem.encode()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()), pem


def test_an_interrupted_swap_is_completed_or_dropped(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    out = tmp_path / "dev"
    out.mkdir()
    old_key, old_cert = _pair(ca)
    new_key_pem, new_cert = _pair(ca)

    def state(key: bytes, cert: bytes) -> None:
        for name in ("device.key", "device.pem", "device.key.new", "device.pem.new"):
            (out / name).unlink(missing_ok=True)
        (out / "device.key").write_bytes(old_key)
        (out / "device.pem").write_bytes(old_cert)
        if key:
            (out / "device.key.new").write_bytes(key)
        if cert:
            (out / "device.pem.new").write_bytes(cert)

    state(new_key_pem, new_cert)  # stopped before either rename
    assert finish_pending(out)
    assert (out / "device.key").read_bytes() == new_key_pem and (out / "device.pem").read_bytes() == new_cert
    state(b"", new_cert)  # stopped between the renames: the key moved, its certificate did not
    (out / "device.key").write_bytes(new_key_pem)
    assert finish_pending(out)
    assert (out / "device.pem").read_bytes() == new_cert and not (out / "device.pem.new").exists()
    state(new_key_pem, b"")  # stopped before the certificate was written: the old pair stands
    assert not finish_pending(out)
    assert (out / "device.key").read_bytes() == old_key and not (out / "device.key.new").exists()
    assert not finish_pending(out)  # nothing pending


def test_rotation_is_due_at_two_thirds_of_the_validity(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    _, pem = _pair(ca)
    cert = x509.load_pem_x509_certificate(pem)
    start, end = cert.not_valid_before_utc.timestamp() * 1000, cert.not_valid_after_utc.timestamp() * 1000
    assert not due_for_rotation(pem)
    assert not due_for_rotation(pem, now_ms=int(start + (end - start) * 0.66))
    assert due_for_rotation(pem, now_ms=int(start + (end - start) * 0.67))
