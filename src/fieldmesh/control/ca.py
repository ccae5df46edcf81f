"""fieldmesh's certificate authority: a root, an issuing CA, device, server and claim certificates, a CRL.

Files under ``<data-dir>/ca/`` (docs/provisioning.md); private keys are written ``0600``:

- ``root.pem`` (+ ``root.key`` when fieldmesh made the root; move it offline once ``init`` is done),
- ``issuing.pem`` + ``issuing.key``: the intermediate that signs device and server certificates and the CRL,
- ``ca.pem``: the issuing CA and the root, the bundle a door (MQTT, API) verifies client certificates with,
- ``crl.pem``: the issuing CA's revocation list, rewritten on each revocation and before its next update,
- ``claim-ca.pem`` + ``claim-ca.key``: a separate, self-signed CA for claim (bootstrap) certificates. It is
  not in ``ca.pem``, so no door that trusts ``ca.pem`` ever accepts a claim certificate as a device,
- ``ca.json``: the policy (key type, validity of each kind of certificate).

A device certificate has subject CN = the device id, a SAN URI ``urn:fieldmesh:device:<id>``, the
``clientAuth`` extended key usage and a random 128-bit serial (top bit set, so its hex form is always 32
digits: ``Certificate.serial`` in the registry). This module is pure certificate work over files: who may
have a certificate is decided by :mod:`fieldmesh.control.provision`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fieldmesh.core.errors import ConfigError, FieldmeshError
from fieldmesh.core.topics import DEVICE_ID_RE

__all__ = [
    "CLAIM_EKU",
    "DEVICE_URI_PREFIX",
    "KEY_TYPES",
    "CaPolicy",
    "CertificateAuthority",
    "CertificateRefused",
    "Claim",
    "IssuedCertificate",
    "generate_key",
    "serial_hex",
    "verify_signature",
    "write_file",
]

KEY_TYPES: Final = ("ec-p256", "ec-p384", "rsa-3072", "ed25519")
DEVICE_URI_PREFIX: Final = "urn:fieldmesh:device:"
CLAIM_URI_PREFIX: Final = "urn:fieldmesh:claim:"
#: The extended key usage of claim certificates (a UUID OID, 2.25.*): not clientAuth, so a TLS server
#: refuses a claim certificate as a client certificate even if it trusted the claim CA.
CLAIM_EKU: Final = x509.ObjectIdentifier("2.25.176429538196148317330539126618338645011")
CLAIM_NAME_RE: Final = DEVICE_ID_RE
_CLOCK_SKEW: Final = dt.timedelta(minutes=5)  # not_before this far back: devices' clocks drift
_MIN_RSA_BITS: Final = 2048

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class CertificateRefused(FieldmeshError):
    """A CSR, certificate or proof that is refused; ``reason`` is a code, ``status`` the HTTP status to answer."""

    def __init__(self, reason: str, detail: str, *, status: int = 400, device_id: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.status = status
        self.device_id = device_id


@dataclass(frozen=True)
class CaPolicy:
    """Key type and validity (days) of what the CA issues, kept in ``ca.json``."""

    key_type: str = "ec-p256"
    root_days: int = 3650
    issuing_days: int = 1095
    device_days: int = 90
    server_days: int = 365
    claim_days: int = 365
    crl_days: int = 7

    def __post_init__(self) -> None:
        if self.key_type not in KEY_TYPES:
            raise ConfigError(f"unknown key type {self.key_type!r}: use one of {', '.join(KEY_TYPES)}",
                              key="key_type")
        for name in ("root_days", "issuing_days", "device_days", "server_days", "claim_days", "crl_days"):
            if not 1 <= getattr(self, name) <= 36500:
                raise ConfigError(f"{name} must be 1..36500 days, not {getattr(self, name)}", key=name)


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate the CA issued: its PEM and the fields the device registry keeps."""

    pem: str
    serial: str  # lower-case hex, 32 digits
    device_id: str
    subject: str  # RFC 4514
    fingerprint: str  # sha256 of the DER, hex
    not_before_ms: int
    not_after_ms: int


@dataclass(frozen=True)
class Claim:
    """A verified claim certificate: the name of its batch and its serial."""

    name: str
    serial: str
    not_after_ms: int
    public_key: PublicKeyTypes = field(repr=False)


def serial_hex(serial: int) -> str:
    """A certificate serial as the registry writes it: lower-case hex, zero-padded to 32 digits."""
    return f"{serial:032x}"


def _ms(t: dt.datetime) -> int:
    return int(t.timestamp() * 1000)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _serial() -> int:
    return secrets.randbits(128) | (1 << 127)  # 128 bits, top bit set: always 32 hex digits


def generate_key(key_type: str = "ec-p256") -> PrivateKey:
    """A new private key of ``key_type`` (one of :data:`KEY_TYPES`)."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "rsa-3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ConfigError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}", key="key_type")


def _hash_for(key: Any) -> hashes.HashAlgorithm | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def verify_signature(public_key: PublicKeyTypes, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s signature over ``data``: ECDSA with SHA-256, RSA PKCS#1 v1.5
    with SHA-256, or Ed25519 (what :func:`fieldmesh.edge.provision.sign` makes)."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write atomically (a reader never sees half a file); private files are 0600 from their creation."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600 if private else 0o644)  # the umask may have narrowed a public file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _load_certs(path: Path, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path}: not a PEM certificate ({exc})", key=what) from None
    return certs


def _load_key(path: Path, what: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{what} {path}: not an unencrypted PEM private key ({exc})", key=what) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{what} {path}: use an EC, RSA or Ed25519 key", key=what)
    return key


def _same_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())  # type: ignore[arg-type]


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _ca_cert(subject: x509.Name, key: PrivateKey, *, issuer: x509.Certificate | None,
             issuer_key: PrivateKey, days: int, path_length: int | None) -> x509.Certificate:
    now = _now()
    not_after = now + dt.timedelta(days=days)
    if issuer is not None:
        not_after = min(not_after, issuer.not_valid_after_utc)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = (x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(issuer)) if issuer is not None
           else x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()))
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(issuer.subject if issuer is not None else subject)
         .public_key(key.public_key()).serial_number(_serial())
         .not_valid_before(now - _CLOCK_SKEW).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                      crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(ski, critical=False).add_extension(aki, critical=False))
    return b.sign(issuer_key, _hash_for(issuer_key))  # type: ignore[arg-type]


def _leaf_usage(key: PublicKeyTypes) -> x509.KeyUsage:
    rsa_key = isinstance(key, rsa.RSAPublicKey)  # RSA key transport (TLS 1.2 RSA suites) needs keyEncipherment
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=rsa_key,
                         data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)


def _check_public_key(key: PublicKeyTypes, what: str) -> None:
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise CertificateRefused("bad_csr", f"{what}: an RSA key of {key.key_size} bits is too weak "
                                                f"(at least {_MIN_RSA_BITS})")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise CertificateRefused("bad_csr", f"{what}: curve {key.curve.name} is not accepted (use P-256)")
    elif not isinstance(key, ed25519.Ed25519PublicKey):
        raise CertificateRefused("bad_csr", f"{what}: use an EC (P-256), RSA (>= 2048 bits) or Ed25519 key")


def _cn(name: x509.Name) -> str | None:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if len(attrs) == 1 else None


class CertificateAuthority:
    """The CA in ``ca_dir``: made by :meth:`init`, opened by :meth:`open`."""

    def __init__(self, ca_dir: Path, *, policy: CaPolicy, issuing_cert: x509.Certificate,
                 issuing_key: PrivateKey, chain: Sequence[x509.Certificate], claim_cert: x509.Certificate,
                 claim_key: PrivateKey) -> None:
        self.dir = ca_dir
        self.policy = policy
        self.issuing_cert = issuing_cert
        self.issuing_key = issuing_key
        self.chain = tuple(chain)  # above the issuing CA, up to the root
        self.claim_cert = claim_cert
        self.claim_key = claim_key

    # -- files ---------------------------------------------------------------------------------
    @property
    def bundle_path(self) -> Path:
        """``ca.pem``: what servers verify device certificates with."""
        return self.dir / "ca.pem"

    @property
    def crl_path(self) -> Path:
        """``crl.pem``: the issuing CA's revocation list."""
        return self.dir / "crl.pem"

    def chain_pem(self) -> str:
        """The issuing CA and the certificates above it (PEM), sent with each issued certificate."""
        return b"".join(_cert_pem(c) for c in (self.issuing_cert, *self.chain)).decode()

    @classmethod
    def exists(cls, ca_dir: Path) -> bool:
        """Whether ``ca_dir`` holds a CA (``fieldmesh ca init`` ran)."""
        return (ca_dir / "ca.json").is_file()

    @classmethod
    def init(cls, ca_dir: Path, *, policy: CaPolicy | None = None, name: str = "fieldmesh",
             root_cert: Path | None = None, root_key: Path | None = None,
             issuing_cert: Path | None = None, issuing_key: Path | None = None,
             force: bool = False) -> CertificateAuthority:
        """Create the CA in ``ca_dir``.

        With no certificate given, fieldmesh makes a root (``root_days``, path length 1) and an issuing CA
        (``issuing_days``, path length 0). ``root_cert`` + ``root_key``: the operator's root signs a new
        issuing CA (its key is used once and not kept). ``issuing_cert`` + ``issuing_key``: the operator's
        own intermediate issues device certificates (the file may hold its chain up to the root).

        Raises:
            ConfigError: the CA exists (and not ``force``), a half pair of files, a certificate that is not
                a CA, a key that does not match its certificate, an issuing CA its root did not sign.
        """
        policy = policy or CaPolicy()
        if cls.exists(ca_dir) and not force:
            raise ConfigError(f"a CA exists in {ca_dir} already (remove the directory or pass --force to "
                              "replace it: every certificate it issued stops verifying)", key="data_dir")
        for a, b, flag in ((root_cert, root_key, "--root"), (issuing_cert, issuing_key, "--issuing")):
            if (a is None) != (b is None):
                raise ConfigError(f"give both {flag}-cert and {flag}-key", key=f"{flag.strip('-')}_key")
        if root_cert is not None and issuing_cert is not None:
            raise ConfigError("give --root-cert/--root-key or --issuing-cert/--issuing-key, not both",
                              key="issuing_cert")
        ca_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(ca_dir, 0o700)
        org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, name)
        root_key_obj: PrivateKey | None = None
        if issuing_cert is not None and issuing_key is not None:
            certs = _load_certs(issuing_cert, "issuing_cert")
            issuing, chain = certs[0], certs[1:]
            ikey = _load_key(issuing_key, "issuing_key")
            if not _is_ca(issuing):
                raise ConfigError(f"{issuing_cert} is not a CA certificate (basicConstraints CA:TRUE)",
                                  key="issuing_cert")
            if not _same_key(issuing, ikey):
                raise ConfigError(f"{issuing_key} is not the key of {issuing_cert}", key="issuing_key")
            root = chain[-1] if chain else issuing
        else:
            if root_cert is not None and root_key is not None:
                roots = _load_certs(root_cert, "root_cert")
                root, rkey = roots[0], _load_key(root_key, "root_key")
                if not _is_ca(root):
                    raise ConfigError(f"{root_cert} is not a CA certificate (basicConstraints CA:TRUE)",
                                      key="root_cert")
                if not _same_key(root, rkey):
                    raise ConfigError(f"{root_key} is not the key of {root_cert}", key="root_key")
                chain = [root, *roots[1:]]
            else:
                rkey = root_key_obj = generate_key(policy.key_type)
                subject = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, f"{name} root CA")])
                root = _ca_cert(subject, rkey, issuer=None, issuer_key=rkey, days=policy.root_days, path_length=1)
                chain = [root]
            ikey = generate_key(policy.key_type)
            subject = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, f"{name} issuing CA")])
            issuing = _ca_cert(subject, ikey, issuer=root, issuer_key=rkey, days=policy.issuing_days, path_length=0)
        if chain and not _issued_by(issuing, chain[0]):
            raise ConfigError("the issuing CA is not signed by the next certificate of its chain", key="issuing_cert")
        ckey = generate_key(policy.key_type)
        csubject = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, f"{name} claim CA")])
        claim = _ca_cert(csubject, ckey, issuer=None, issuer_key=ckey, days=policy.root_days, path_length=0)

        write_file(ca_dir / "root.pem", _cert_pem(root))
        if root_key_obj is not None:
            write_file(ca_dir / "root.key", _key_pem(root_key_obj), private=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                (ca_dir / "root.key").unlink()  # a --force over a CA fieldmesh made: that root is gone
        write_file(ca_dir / "issuing.key", _key_pem(ikey), private=True)
        write_file(ca_dir / "issuing.pem", _cert_pem(issuing))
        write_file(ca_dir / "claim-ca.key", _key_pem(ckey), private=True)
        write_file(ca_dir / "claim-ca.pem", _cert_pem(claim))
        ca = cls(ca_dir, policy=policy, issuing_cert=issuing, issuing_key=ikey,
                 chain=[c for c in chain if c != issuing], claim_cert=claim, claim_key=ckey)
        write_file(ca.bundle_path, ca.chain_pem().encode())
        ca.write_crl([])
        write_file(ca_dir / "ca.json", json.dumps({"version": 1, "name": name, **asdict(policy)}, indent=2).encode())
        return ca

    @classmethod
    def open(cls, ca_dir: Path, *, device_days: int | None = None) -> CertificateAuthority:
        """Open the CA in ``ca_dir`` (``device_days`` overrides the policy's device validity).

        Raises:
            ConfigError: no CA there, or a file missing or unreadable.
        """
        if not cls.exists(ca_dir):
            raise ConfigError(f"no certificate authority in {ca_dir}: run 'fieldmesh ca init' (same --data-dir)",
                              key="data_dir")
        try:
            meta = json.loads((ca_dir / "ca.json").read_text())
            policy = CaPolicy(**{k: v for k, v in meta.items() if k in CaPolicy.__dataclass_fields__})
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{ca_dir / 'ca.json'}: unreadable ({exc})", key="data_dir") from None
        if device_days is not None:
            policy = CaPolicy(**{**asdict(policy), "device_days": device_days})
        issuing = _load_certs(ca_dir / "issuing.pem", "issuing_cert")
        bundle = _load_certs(ca_dir / "ca.pem", "ca_bundle")
        return cls(ca_dir, policy=policy, issuing_cert=issuing[0], issuing_key=_load_key(ca_dir / "issuing.key",
                   "issuing_key"), chain=bundle[1:], claim_cert=_load_certs(ca_dir / "claim-ca.pem", "claim_ca")[0],
                   claim_key=_load_key(ca_dir / "claim-ca.key", "claim_ca_key"))

    def set_policy(self, **changes: int) -> CaPolicy:
        """Change the validity of what the CA issues from now on (``device_days``, ``server_days``,
        ``claim_days``, ``crl_days``) and keep it in ``ca.json``; returns the new policy.

        Raises:
            ConfigError: another field, or a value out of range.
        """
        allowed = {"device_days", "server_days", "claim_days", "crl_days"}
        bad = sorted(set(changes) - allowed)
        if bad:
            raise ConfigError(f"cannot change {', '.join(bad)} of an existing CA", key=bad[0])
        policy = CaPolicy(**{**asdict(self.policy), **changes})
        meta = json.loads((self.dir / "ca.json").read_text())
        write_file(self.dir / "ca.json", json.dumps({**meta, **asdict(policy)}, indent=2).encode())
        self.policy = policy
        return policy

    # -- device certificates -------------------------------------------------------------------
    @staticmethod
    def load_csr(csr_pem: str | bytes) -> tuple[x509.CertificateSigningRequest, str]:
        """The CSR and the device id it names (its subject CN), after checking its signature and key.

        Raises:
            CertificateRefused: ``bad_csr``: not a PEM CSR, a bad signature, a weak key, no device id as CN.
        """
        data = csr_pem.encode() if isinstance(csr_pem, str) else csr_pem
        try:
            csr = x509.load_pem_x509_csr(data)
            valid = csr.is_signature_valid
            key = csr.public_key()
        except (ValueError, TypeError, x509.UnsupportedGeneralNameType) as exc:
            raise CertificateRefused("bad_csr", f"not a PEM certificate signing request ({exc})") from None
        if not valid:
            raise CertificateRefused("bad_csr", "the CSR's signature does not verify with its own key")
        _check_public_key(key, "the CSR")
        cn = _cn(csr.subject)
        if cn is None or not DEVICE_ID_RE.fullmatch(cn):
            raise CertificateRefused("bad_csr", f"the CSR's subject CN must be the device id "
                                                f"(1-128 of [A-Za-z0-9_-]), not {cn!r}")
        return csr, cn

    def issue_device(self, csr: x509.CertificateSigningRequest, device_id: str, *,
                     days: int | None = None) -> IssuedCertificate:
        """Sign a device certificate for ``csr`` (checked by :meth:`load_csr`), valid ``days`` (default: policy).

        Raises:
            CertificateRefused: ``device_mismatch``: the CSR names another device than ``device_id``.
        """
        if _cn(csr.subject) != device_id:
            raise CertificateRefused("device_mismatch", f"the CSR names {_cn(csr.subject)!r}, not {device_id!r}",
                                     status=403, device_id=device_id)
        now = _now()
        not_after = min(now + dt.timedelta(days=days or self.policy.device_days), self.issuing_cert.not_valid_after_utc)
        key = csr.public_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.issuing_cert.subject)
             .public_key(key).serial_number(_serial())  # type: ignore[arg-type]
             .not_valid_before(now - _CLOCK_SKEW).not_valid_after(not_after)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(_leaf_usage(key), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
             .add_extension(x509.SubjectAlternativeName(
                 [x509.UniformResourceIdentifier(DEVICE_URI_PREFIX + device_id)]), critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)  # type: ignore[arg-type]
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                 _ski(self.issuing_cert)), critical=False))
        cert = b.sign(self.issuing_key, _hash_for(self.issuing_key))  # type: ignore[arg-type]
        return IssuedCertificate(
            pem=_cert_pem(cert).decode(), serial=serial_hex(cert.serial_number), device_id=device_id,
            subject=cert.subject.rfc4514_string(),
            fingerprint=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
            not_before_ms=_ms(cert.not_valid_before_utc), not_after_ms=_ms(cert.not_valid_after_utc))

    def verify_device_certificate(self, cert_pem: str | bytes, *, at_ms: int | None = None) -> tuple[str, str,
                                                                                                     PublicKeyTypes]:
        """``(device_id, serial, public_key)`` of a device certificate this CA issued, valid at ``at_ms``
        (now by default). Whether it is revoked is the registry's to say.

        Raises:
            CertificateRefused: ``certificate_invalid``: not PEM, not issued by this CA, expired, not a device's.
        """
        data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
        try:
            cert = x509.load_pem_x509_certificate(data)
        except ValueError as exc:
            raise CertificateRefused("certificate_invalid", f"not a PEM certificate ({exc})", status=401) from None
        if not _issued_by(cert, self.issuing_cert):
            raise CertificateRefused("certificate_invalid", "not issued by this CA's issuing CA", status=401)
        self._check_time(cert, at_ms, "certificate_invalid")
        try:
            uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
                x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        ids = [u.removeprefix(DEVICE_URI_PREFIX) for u in uris if u.startswith(DEVICE_URI_PREFIX)]
        cn = _cn(cert.subject)
        if len(ids) != 1 or ids[0] != cn:
            raise CertificateRefused("certificate_invalid", "not a device certificate (no device URI)", status=401)
        return ids[0], serial_hex(cert.serial_number), cert.public_key()

    @staticmethod
    def _check_time(cert: x509.Certificate, at_ms: int | None, reason: str) -> None:
        at = at_ms if at_ms is not None else int(time.time() * 1000)
        if not _ms(cert.not_valid_before_utc) <= at < _ms(cert.not_valid_after_utc):
            valid = f"{cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}"
            raise CertificateRefused(reason, f"the certificate is not valid now (valid {valid})", status=401)

    # -- server and claim certificates -----------------------------------------------------------
    def issue_server(self, hosts: Sequence[str], *, days: int | None = None,
                     key_type: str | None = None) -> tuple[str, str]:
        """``(certificate chain PEM, private key PEM)`` of a TLS server (MQTT door, API) for ``hosts``
        (DNS names or IP addresses; the first is the CN).

        Raises:
            ConfigError: no host.
        """
        if not hosts:
            raise ConfigError("a server certificate needs at least one --host", key="host")
        key = generate_key(key_type or self.policy.key_type)
        names: list[x509.GeneralName] = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h.strip("[]"))))
            except ValueError:
                names.append(x509.DNSName(h))
        now = _now()
        not_after = min(now + dt.timedelta(days=days or self.policy.server_days), self.issuing_cert.not_valid_after_utc)
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
             .issuer_name(self.issuing_cert.subject).public_key(key.public_key()).serial_number(_serial())
             .not_valid_before(now - _CLOCK_SKEW).not_valid_after(not_after)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(_leaf_usage(key.public_key()), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
             .add_extension(x509.SubjectAlternativeName(names), critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                 _ski(self.issuing_cert)), critical=False))
        cert = b.sign(self.issuing_key, _hash_for(self.issuing_key))  # type: ignore[arg-type]
        return _cert_pem(cert).decode() + self.chain_pem(), _key_pem(key).decode()

    def issue_claim(self, name: str, *, days: int | None = None) -> tuple[str, str, str, int]:
        """``(certificate PEM, private key PEM, serial, not_after_ms)`` of a claim certificate for batch ``name``,
        signed by the claim CA (not the issuing CA: no door accepts it as a device).

        Raises:
            ConfigError: a malformed name.
        """
        if not CLAIM_NAME_RE.fullmatch(name):
            raise ConfigError(f"bad claim name {name!r}: use 1-128 of [A-Za-z0-9_-]", key="name")
        key = generate_key(self.policy.key_type)
        now = _now()
        not_after = min(now + dt.timedelta(days=days or self.policy.claim_days), self.claim_cert.not_valid_after_utc)
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"claim:{name}")]))
             .issuer_name(self.claim_cert.subject).public_key(key.public_key()).serial_number(_serial())
             .not_valid_before(now - _CLOCK_SKEW).not_valid_after(not_after)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(_leaf_usage(key.public_key()), critical=True)
             .add_extension(x509.ExtendedKeyUsage([CLAIM_EKU]), critical=True)
             .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(CLAIM_URI_PREFIX + name)]),
                            critical=False)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(self.claim_cert)),
                            critical=False))
        cert = b.sign(self.claim_key, _hash_for(self.claim_key))  # type: ignore[arg-type]
        return (_cert_pem(cert).decode(), _key_pem(key).decode(), serial_hex(cert.serial_number),
                _ms(cert.not_valid_after_utc))

    def verify_claim(self, cert_pem: str | bytes, *, at_ms: int | None = None) -> Claim:
        """The claim a claim certificate of this CA's claim CA carries (whether it is revoked is the
        enrollment store's to say).

        Raises:
            CertificateRefused: ``claim_invalid``: not PEM, not signed by the claim CA, expired, not a claim.
        """
        data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
        try:
            cert = x509.load_pem_x509_certificate(data)
        except ValueError as exc:
            raise CertificateRefused("claim_invalid", f"not a PEM certificate ({exc})", status=401) from None
        if not _issued_by(cert, self.claim_cert):
            raise CertificateRefused("claim_invalid", "not a claim certificate of this CA", status=401)
        self._check_time(cert, at_ms, "claim_invalid")
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = x509.ExtendedKeyUsage([])
        cn = _cn(cert.subject) or ""
        if CLAIM_EKU not in eku or not cn.startswith("claim:"):
            raise CertificateRefused("claim_invalid", "not a claim certificate", status=401)
        return Claim(name=cn.removeprefix("claim:"), serial=serial_hex(cert.serial_number),
                     not_after_ms=_ms(cert.not_valid_after_utc), public_key=cert.public_key())

    # -- revocation ------------------------------------------------------------------------------
    def write_crl(self, revoked: Iterable[tuple[str, int]], *, now_ms: int | None = None) -> Path:
        """Write ``crl.pem``: the issuing CA's list of ``(serial hex, revoked_ms)``, next update in ``crl_days``."""
        now = dt.datetime.fromtimestamp((now_ms or int(time.time() * 1000)) / 1000, dt.UTC).replace(microsecond=0)
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.issuing_cert.subject)
             .last_update(now).next_update(now + dt.timedelta(days=self.policy.crl_days))
             # the CRL number must grow: the time in milliseconds does, with no counter to keep
             .add_extension(x509.CRLNumber(_ms(dt.datetime.now(dt.UTC))), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                 _ski(self.issuing_cert)), critical=False))
        for serial, revoked_ms in revoked:
            b = b.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(serial, 16))
                .revocation_date(dt.datetime.fromtimestamp(revoked_ms / 1000, dt.UTC)).build())
        crl = b.sign(self.issuing_key, _hash_for(self.issuing_key))  # type: ignore[arg-type]
        write_file(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_path

    def crl_due(self, *, now_ms: int | None = None) -> bool:
        """Whether ``crl.pem`` is missing, unreadable or past half its validity (time to rewrite it)."""
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError):
            return True
        nxt = crl.next_update_utc
        if nxt is None:
            return True
        now = now_ms if now_ms is not None else int(time.time() * 1000)
        last = _ms(crl.last_update_utc)
        return now >= last + (_ms(nxt) - last) // 2
