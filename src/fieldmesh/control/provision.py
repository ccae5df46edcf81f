"""Zero-touch provisioning: who gets a device certificate, with what proof (docs/provisioning.md).

A device sends a CSR whose subject CN is its id, and one proof:

- ``token``: a one-time enrollment token made for that device id (``fieldmesh ca token``); spent atomically,
- ``claim_certificate`` + ``signature``: a claim (bootstrap) certificate of a batch (``fieldmesh ca claim-cert``)
  and the claim key's signature over the CSR's DER, proving possession; a device not registered is
  registered (active, in the claim's groups); one that holds a valid certificate is refused (revoke it
  first), so a claim key cannot take over a provisioned device,
- ``certificate`` + ``signature``: the device's current operational certificate (issued here, valid, not
  revoked) and its key's signature over the new CSR's DER: rotation, before the old one expires.

A suspended or retired device is refused whatever the proof. Every outcome is counted and audited
(:class:`fieldmesh.store.enrollment.EnrollmentStore`); refusals raise :class:`CertificateRefused` with a reason
code and the HTTP status (400 bad CSR, 401 bad or missing proof, 403 a proof that does not allow this).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fieldmesh.control.ca import (
    CertificateAuthority,
    CertificateRefused,
    IssuedCertificate,
    serial_hex,
    verify_signature,
)
from fieldmesh.core.errors import ConflictError, NotFoundError
from fieldmesh.store.enrollment import TOKEN_OK, ClaimRecord, EnrollmentStore, EnrollmentToken
from fieldmesh.store.registry import Certificate, Device, DeviceRegistry

__all__ = ["REFUSAL_REASONS", "Grant", "ProvisionResult", "Provisioner"]

#: Why a provisioning request is refused (``refused:<reason>`` counts, the ``reason`` of a 4xx answer).
REFUSAL_REASONS: Final = (
    "already_provisioned", "bad_csr", "bad_signature", "certificate_invalid", "claim_invalid", "claim_not_allowed",
    "device_mismatch", "device_not_active", "no_credential", "token_expired", "token_unknown", "token_used",
)
_TOKEN_STATUS: Final = {"unknown": ("token_unknown", 401), "used": ("token_used", 401),
                        "expired": ("token_expired", 401), "device_mismatch": ("device_mismatch", 403)}


@dataclass(frozen=True)
class Grant:
    """A checked request: the CSR, its device, how it proved itself (``via``: the audit actor)."""

    csr: x509.CertificateSigningRequest
    device_id: str
    method: str  # "token" | "claim" | "rotation"
    via: str  # token:<id> | claim:<name> | device:<id>
    groups: tuple[str, ...] = ()  # a device registered by a claim joins these
    peer: str = ""


@dataclass(frozen=True)
class ProvisionResult:
    """A certificate issued: the certificate, the chain to send with it, how the device proved itself."""

    certificate: IssuedCertificate
    chain: str
    method: str  # "token" | "claim" | "rotation"

    def as_dict(self) -> dict[str, Any]:
        """The answer of ``POST /api/v1/provision``."""
        c = self.certificate
        return {"certificate": c.pem, "chain": self.chain, "serial": c.serial, "device_id": c.device_id,
                "not_before": c.not_before_ms, "not_after": c.not_after_ms, "method": self.method}


def _signature(sig: str | None) -> bytes:
    if not sig:
        raise CertificateRefused("bad_signature", "a claim or current certificate needs 'signature': base64 of the "
                                                  "signature over the CSR's DER by that certificate's key", status=401)
    try:
        return base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        try:
            return base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
        except (binascii.Error, ValueError):
            raise CertificateRefused("bad_signature", "'signature' is not base64", status=401) from None


class Provisioner:
    """Issues device certificates against a proof; records them in the device registry.

    ``ca`` signs, ``registry`` holds devices and their certificates, ``enrollment`` the tokens, claims and
    counts. :meth:`open` makes all three from the CA directory and the hot store URL.
    """

    def __init__(self, *, ca: CertificateAuthority, registry: DeviceRegistry, enrollment: EnrollmentStore,
                 owns_stores: bool = False) -> None:
        self.ca = ca
        self.registry = registry
        self.enrollment = enrollment
        self._owns = owns_stores
        self._crl_lock = threading.Lock()
        self._crl_checked = -1e18  # monotonic time of the last look at crl.pem's next update
        self._crl_version: int | None = None  # the registry's version when crl.pem was last written (or checked)
        self._crl_revoked: list[tuple[str, int]] | None = None  # what it lists

    @classmethod
    def open(cls, ca_dir: Path, store_url: str, *, device_days: int | None = None) -> Provisioner:
        """The provisioner of the CA in ``ca_dir`` over the hot store at ``store_url``.

        Raises:
            ConfigError: no CA in ``ca_dir`` (``fieldmesh ca init``), a bad store URL.
            BackendError: the store cannot be opened.
        """
        ca = CertificateAuthority.open(ca_dir, device_days=device_days)
        registry = DeviceRegistry(store_url)
        try:
            enrollment = EnrollmentStore(store_url)
        except BaseException:
            registry.close()
            raise
        return cls(ca=ca, registry=registry, enrollment=enrollment, owns_stores=True)

    def close(self) -> None:
        """Close the stores this provisioner opened."""
        if self._owns:
            self.registry.close()
            self.enrollment.close()

    # -- provisioning ----------------------------------------------------------------------------
    def provision(self, *, csr: str, token: str | None = None, claim_certificate: str | None = None,
                  certificate: str | None = None, signature: str | None = None, peer: str = "") -> ProvisionResult:
        """Issue a certificate for ``csr`` against one proof (module docstring): :meth:`authorize`, then :meth:`issue`.

        Raises:
            CertificateRefused: the request is refused (``reason``, ``status``); counted as ``refused:<reason>``.
        """
        grant = self.authorize(csr=csr, token=token, claim_certificate=claim_certificate, certificate=certificate,
                               signature=signature, peer=peer)
        return self.issue(grant)

    def authorize(self, *, csr: str, token: str | None = None, claim_certificate: str | None = None,
                  certificate: str | None = None, signature: str | None = None, peer: str = "") -> Grant:
        """Check the CSR and its proof (a token is spent here); a refusal is counted and audited.

        Raises:
            CertificateRefused: the request is refused (``reason``, ``status``); counted as ``refused:<reason>``.
        """
        device_id: str | None = None
        try:
            proofs = [p for p in (token, claim_certificate, certificate) if p]
            if len(proofs) != 1:
                raise CertificateRefused("no_credential", "send exactly one of 'token', 'claim_certificate' or "
                                                          "'certificate' (with 'signature') beside 'csr'", status=401)
            parsed, device_id = self.ca.load_csr(csr)
            der = parsed.public_bytes(serialization.Encoding.DER)
            groups: tuple[str, ...] = ()
            if token:
                method, via = "token", self._check_token(token, device_id)
            elif claim_certificate:
                rec = self._check_claim(claim_certificate, _signature(signature), der, device_id)
                method, via, groups = "claim", f"claim:{rec.name}", rec.groups
            else:
                assert certificate is not None
                method, via = "rotation", self._check_current(certificate, _signature(signature), der, device_id)
        except CertificateRefused as exc:
            self.enrollment.count(f"refused:{exc.reason}", actor=f"device:{device_id or '?'}",
                                  target=device_id or "?", detail={"reason": exc.reason, "detail": exc.detail,
                                                                   "peer": peer})
            raise
        return Grant(csr=parsed, device_id=device_id, method=method, via=via, groups=groups, peer=peer)

    def issue(self, grant: Grant) -> ProvisionResult:
        """Issue the certificate :meth:`authorize` granted; register the device if it is not; count and audit."""
        device_id, via = grant.device_id, grant.via
        if self.registry.get(device_id) is None:
            with contextlib.suppress(ConflictError):  # registered meanwhile by a concurrent request
                self.registry.add(device_id, groups=grant.groups, actor=via)
        issued = self.ca.issue_device(grant.csr, device_id)
        cert = Certificate(
            serial=issued.serial, device_id=device_id, subject=issued.subject, fingerprint=issued.fingerprint,
            not_before_ms=issued.not_before_ms, not_after_ms=issued.not_after_ms, revoked_ms=None, pem=issued.pem)
        try:
            # a claim gets a certificate only for a device without a valid one: checked again where it is recorded,
            # so of two claims of one new device racing, one gets it
            self.registry.add_certificate(cert, actor=via, exclusive=grant.method == "claim")
        except ConflictError as exc:
            if exc.kind != "valid_certificate":
                raise
            # the loser's certificate is signed already: recorded as revoked, so it is on the next CRL too
            self.registry.add_certificate(dataclasses.replace(cert, revoked_ms=int(time.time() * 1000)), actor=via)
            refused = CertificateRefused("already_provisioned", f"device {device_id!r} holds a valid certificate: "
                                                                "rotate with it, or revoke it first", status=403,
                                         device_id=device_id)
            self.enrollment.count(f"refused:{refused.reason}", actor=via, target=device_id,
                                  detail={"reason": refused.reason, "detail": refused.detail, "peer": grant.peer})
            raise refused from exc
        self.enrollment.count("issued", actor=via, target=device_id, detail={
            "method": grant.method, "serial": issued.serial, "not_after_ms": issued.not_after_ms, "peer": grant.peer})
        return ProvisionResult(certificate=issued, chain=self.ca.chain_pem(), method=grant.method)

    def _active(self, device_id: str) -> Device | None:
        dev = self.registry.get(device_id)
        if dev is not None and dev.status != "active":
            raise CertificateRefused("device_not_active", f"device {device_id!r} is {dev.status}", status=403,
                                     device_id=device_id)
        return dev

    def _check_token(self, token: str, device_id: str) -> str:
        self._active(device_id)  # before spending it: a suspended device keeps its token for when it is back
        outcome, tok = self.enrollment.spend_token(token, device_id=device_id)
        if outcome != TOKEN_OK:
            reason, status = _TOKEN_STATUS[outcome]
            detail = {"unknown": "no such enrollment token", "used": "the token was used already",
                      "expired": "the token has expired",
                      "device_mismatch": "the token is for another device than the CSR names"}[outcome]
            raise CertificateRefused(reason, detail, status=status, device_id=device_id)
        assert isinstance(tok, EnrollmentToken)
        return f"token:{tok.id}"

    def _check_claim(self, cert_pem: str, sig: bytes, der: bytes, device_id: str) -> ClaimRecord:
        claim = self.ca.verify_claim(cert_pem)
        if not verify_signature(claim.public_key, sig, der):
            raise CertificateRefused("bad_signature", "the signature over the CSR is not the claim key's", status=401)
        rec = self.enrollment.claim(claim.serial)
        if rec is None or rec.revoked_ms is not None:
            raise CertificateRefused("claim_invalid", f"claim certificate {claim.serial} is "
                                                      f"{'unknown' if rec is None else 'revoked'}", status=401)
        if not rec.allows(device_id):
            raise CertificateRefused("claim_not_allowed", f"claim {rec.name!r} may claim devices {rec.devices!r}, "
                                                          f"not {device_id!r}", status=403, device_id=device_id)
        if self._active(device_id) is not None and self.registry.certificates(
                device_id, valid_at_ms=int(time.time() * 1000)):
            raise CertificateRefused("already_provisioned", f"device {device_id!r} holds a valid certificate: rotate "
                                                            "with it, or revoke it first", status=403,
                                     device_id=device_id)
        return rec

    def _check_current(self, cert_pem: str, sig: bytes, der: bytes, device_id: str) -> str:
        current, serial, key = self.ca.verify_device_certificate(cert_pem)
        if not verify_signature(key, sig, der):
            raise CertificateRefused("bad_signature", "the signature over the CSR is not the certificate key's",
                                     status=401)
        if current != device_id:
            raise CertificateRefused("device_mismatch", f"the certificate is {current!r}'s, the CSR names "
                                                        f"{device_id!r}", status=403, device_id=device_id)
        valid = {c.serial for c in self.registry.certificates(device_id, valid_at_ms=int(time.time() * 1000))}
        if serial not in valid:
            raise CertificateRefused("certificate_invalid", f"certificate {serial} is revoked or not recorded",
                                     status=401, device_id=device_id)
        if self._active(device_id) is None:
            raise CertificateRefused("certificate_invalid", f"device {device_id!r} is not registered", status=401)
        return f"device:{device_id}"

    # -- administration --------------------------------------------------------------------------
    def create_token(self, device_id: str, *, ttl_ms: int, actor: str) -> tuple[EnrollmentToken, str]:
        """A one-time enrollment token for ``device_id`` (see :meth:`EnrollmentStore.create_token`)."""
        return self.enrollment.create_token(device_id, ttl_ms=ttl_ms, actor=actor)

    def create_claim(self, name: str, *, days: int | None = None, groups: tuple[str, ...] = (), devices: str = "*",
                     actor: str) -> tuple[str, str, ClaimRecord]:
        """``(certificate PEM, key PEM, record)`` of a new claim certificate for batch ``name``."""
        cert, key, serial, not_after_ms = self.ca.issue_claim(name, days=days)
        rec = self.enrollment.add_claim(serial=serial, name=name, groups=groups, devices=devices,
                                        not_after_ms=not_after_ms, actor=actor)
        return cert, key, rec

    def revoke(self, *, serial: str | None = None, device_id: str | None = None, actor: str,
               reason: str = "") -> list[Certificate]:
        """Revoke one certificate (``serial``) or every unrevoked one of ``device_id``; rewrite the CRL.

        Raises:
            NotFoundError: no such certificate, or a device with no certificate.
        """
        if (serial is None) == (device_id is None):
            raise ValueError("give serial or device_id")
        if serial is not None:
            try:  # as openssl prints it (upper case, colons, no leading zeros) or as the registry keeps it
                serials = [serial_hex(int(serial.replace(":", ""), 16))]
            except ValueError:
                raise NotFoundError(f"no certificate {serial!r} (a serial is hex)", kind="certificate",
                                    key=serial) from None
        else:
            serials = [c.serial for c in self.registry.certificates(device_id) if c.revoked_ms is None]
            if not serials and not self.registry.certificates(device_id):
                raise NotFoundError(f"device {device_id!r} has no certificate", kind="device", key=str(device_id))
        out = [self.registry.revoke_certificate(s, actor=actor, reason=reason) for s in serials]
        self.refresh_crl(force=True)
        return out

    def refresh_crl(self, *, force: bool = False) -> bool:
        """Rewrite ``crl.pem`` when ``force``, when it is past half its validity, or when the registry's revoked
        certificates changed since it was written (a revocation or a device deleted elsewhere: the CLI, another
        API replica); whether it did. Cheap when nothing changed: one read of ``registry.version()``, and a
        look at the file at most once a minute."""
        with self._crl_lock:
            version = self.registry.version()
            changed = version != self._crl_version
            if not force and not changed:
                if time.monotonic() - self._crl_checked < 60:  # CRLs live for days: a look a minute
                    return False
                self._crl_checked = time.monotonic()
                if not self.ca.crl_due():
                    return False
            revoked = self.registry.revoked()
            if not force and revoked == self._crl_revoked and not self.ca.crl_due():
                self._crl_version = version  # a change that revoked nothing (a device added, a certificate issued)
                return False
            self.ca.write_crl(revoked)
            self._crl_version, self._crl_revoked = version, revoked
            return True

    def counts(self) -> dict[str, int]:
        """``{"issued": n, "refused:<reason>": n}`` since the store was made."""
        return self.enrollment.counts()

