"""Test PKI made with ``cryptography``: a root CA, a wrong CA, a server certificate for 127.0.0.1, device
certificates (valid, expired, revoked) and a CRL, written as PEM files into a directory.

Device certificates carry the device id as their common name (``CN=<id>``) and as a URI SAN
``urn:fieldmesh:device:<id>``, like the ones ``fieldmesh ca`` issues.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_NOW = dt.datetime.now(dt.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Issued:
    """A certificate and its key on disk."""

    cert: x509.Certificate
    cert_path: Path
    key_path: Path

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def serial(self) -> str:
        return format(self.cert.serial_number, "x")

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    @property
    def not_before_ms(self) -> int:
        return int(self.cert.not_valid_before_utc.timestamp() * 1000)

    @property
    def not_after_ms(self) -> int:
        return int(self.cert.not_valid_after_utc.timestamp() * 1000)


@dataclass
class CA:
    """A self-signed CA that issues server and device certificates into ``dir``."""

    dir: Path
    name: str
    key: ec.EllipticCurvePrivateKey = field(default_factory=_key)
    revoked: list[x509.Certificate] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - dt.timedelta(days=1)).not_valid_after(_NOW + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.cert_path = self.dir / f"{self.name}.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _issue(self, name: str, subject: x509.Name, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier,
               not_before: dt.datetime, not_after: dt.datetime) -> Issued:
        key = _key()
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        key_path.chmod(0o600)
        return Issued(cert, cert_path, key_path)

    def server(self, host: str = "127.0.0.1") -> Issued:
        """A server certificate for ``host`` (an IP address SAN, and localhost)."""
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
        sans: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(host))]
        return self._issue(f"server-{host}", subject, sans, ExtendedKeyUsageOID.SERVER_AUTH,
                           _NOW - dt.timedelta(days=1), _NOW + dt.timedelta(days=365))

    def device(self, device_id: str, *, expired: bool = False, name: str | None = None) -> Issued:
        """A client certificate for ``device_id`` (``expired``: its validity ended yesterday)."""
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fieldmesh"),
                             x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"urn:fieldmesh:device:{device_id}")]
        if expired:
            start, end = _NOW - dt.timedelta(days=30), _NOW - dt.timedelta(days=1)
        else:
            start, end = _NOW - dt.timedelta(days=1), _NOW + dt.timedelta(days=365)
        return self._issue(name or f"device-{device_id}", subject, sans, ExtendedKeyUsageOID.CLIENT_AUTH, start, end)

    def revoke(self, issued: Issued) -> None:
        """Add a certificate to this CA's CRL (call :meth:`write_crl` after)."""
        self.revoked.append(issued.cert)

    def write_crl(self, path: Path | None = None) -> Path:
        """Write the CRL (PEM) of what was revoked; default ``<dir>/crl.pem``."""
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
             .last_update(_NOW - dt.timedelta(minutes=5)).next_update(_NOW + dt.timedelta(days=30)))
        for c in self.revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(c.serial_number)
                .revocation_date(_NOW - dt.timedelta(minutes=1)).build())
        crl = b.sign(self.key, hashes.SHA256())
        path = path or self.dir / "crl.pem"
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path
