"""Provisioning routes of the REST API (docs/provisioning.md, docs/contract.md).

``POST /api/v1/provision`` is **device-authenticated**: the caller proves itself with what the body
carries (a one-time enrollment token, a claim certificate and its key's signature, or its current
certificate and its key's signature), not with an API key. Its guard, :func:`device_guard`'s dependency,
checks that proof before the route runs (a refusal is a 400/401/403 ``{"detail", "reason"}``, counted and
audited); ``create_app`` accepts it as a guard because it is one. The admin routes (tokens, revocation) use
the ordinary role guard.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Request
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from fieldmesh.api.auth import Principal
from fieldmesh.api.params import BAD_PARAMETER, ErrorBody
from fieldmesh.control.ca import CertificateAuthority, CertificateRefused
from fieldmesh.control.provision import REFUSAL_REASONS, Grant, Provisioner
from fieldmesh.core.errors import FieldmeshError, NotFoundError
from fieldmesh.core.topics import DEVICE_ID_RE

__all__ = ["DEVICE_ROUTES", "ProvisionService", "add_provision_routes"]

log = logging.getLogger(__name__)

#: Routes whose caller is a device proving itself with the request body (no API key, no role).
DEVICE_ROUTES: Final = frozenset({"/api/v1/provision"})
_PEM_MAX: Final = 16_384


class ProvisionRequest(BaseModel):
    """``POST /provision``: a CSR and one proof."""

    model_config = ConfigDict(extra="forbid")
    csr: str = Field(max_length=_PEM_MAX, description="PEM CSR; subject CN = the device id")
    token: str | None = Field(None, max_length=256, description="a one-time enrollment token (fme_...)")
    claim_certificate: str | None = Field(None, max_length=_PEM_MAX, description="PEM claim certificate")
    certificate: str | None = Field(None, max_length=_PEM_MAX,
                                    description="PEM: the device's current certificate (rotation)")
    signature: str | None = Field(None, max_length=4096, description=(
        "base64 signature over the CSR's DER by the claim or current certificate's key (ECDSA/SHA-256, "
        "RSA PKCS#1 v1.5/SHA-256 or Ed25519)"))


class ProvisionAnswer(BaseModel):
    """The certificate issued."""

    model_config = ConfigDict(extra="allow")
    certificate: str = Field(description="PEM device certificate")
    chain: str = Field(description="PEM issuing CA and root above it")
    serial: str = Field(description="lower-case hex, 32 digits")
    device_id: str
    not_before: int = Field(description="epoch ms")
    not_after: int = Field(description="epoch ms: rotate before it (at 2/3 of the validity)")
    method: str = Field(description="token | claim | rotation")


class Refusal(BaseModel):
    """A refused provisioning request."""

    detail: str
    reason: str = Field(description=f"one of {', '.join(REFUSAL_REASONS)}")


class BadRequest(BaseModel):
    """A malformed request (``errors`` name the fields) or CSR (``reason`` bad_csr)."""

    model_config = ConfigDict(extra="allow")
    detail: str
    reason: str | None = Field(None, description="bad_csr for a CSR that is not acceptable")


class NewToken(BaseModel):
    """``POST /provision/tokens``."""

    model_config = ConfigDict(extra="forbid")
    device_id: str = Field(pattern=f"^{DEVICE_ID_RE.pattern}$")
    ttl_s: int = Field(86_400, ge=60, le=30 * 86_400, description="seconds the token stays valid")


class TokenRow(BaseModel):
    """A token made (the token itself is shown this once)."""

    model_config = ConfigDict(extra="allow")
    token: str
    id: str
    device_id: str
    expires_ms: int


class RevokeSerial(BaseModel):
    """``POST /ca/revoke``: one certificate, by serial."""

    model_config = ConfigDict(extra="forbid")
    serial: str = Field(pattern="^[0-9a-fA-F:]{1,95}$", description="hex, colons allowed")
    reason: str = Field("", max_length=200)


class RevokeDevice(BaseModel):
    """``POST /ca/revoke``: every unrevoked certificate of a device."""

    model_config = ConfigDict(extra="forbid")
    device_id: str = Field(pattern=f"^{DEVICE_ID_RE.pattern}$")
    reason: str = Field("", max_length=200)


class RevokedRow(BaseModel):
    """A certificate revoked."""

    model_config = ConfigDict(extra="allow")
    serial: str
    device_id: str
    revoked_ms: int | None


class ProvisionService:
    """The provisioner of the CA in ``ca_dir`` over the hot store, opened on first use (503 until
    ``fieldmesh ca init`` made the CA)."""

    def __init__(self, store_url: str, ca_dir: Path | None, provisioner: Provisioner | None = None) -> None:
        self.store_url = store_url
        self.ca_dir = ca_dir
        self._prov = provisioner
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def available(self) -> bool:
        """Whether a CA exists (or a provisioner was given)."""
        return self._prov is not None or (self.ca_dir is not None and CertificateAuthority.exists(self.ca_dir))

    def get(self) -> Provisioner:
        """The provisioner (503 when there is no CA or the store cannot be opened)."""
        with self._lock:
            if self._prov is None:
                if self.ca_dir is None or not CertificateAuthority.exists(self.ca_dir):
                    raise HTTPException(503, "no certificate authority: run 'fieldmesh ca init' (same --data-dir)")
                try:
                    self._prov = Provisioner.open(self.ca_dir, self.store_url)
                except FieldmeshError as exc:
                    raise HTTPException(503, f"provisioning unavailable: {exc}") from None
            return self._prov

    def start_crl_refresher(self, interval_s: float = 5.0) -> None:
        """Look every ``interval_s`` whether ``crl.pem`` is out of date (revocations made elsewhere: a device
        deleted, the CLI, another replica) or past half its validity, and rewrite it then, so doors reading it
        never see it stale or expired while the API runs (a thread, stopped by :meth:`close`)."""

        def loop() -> None:
            while not self._stop.wait(interval_s):
                if self.available():
                    try:
                        self.get().refresh_crl()
                    except Exception as exc:  # the store or disk is down: say so, try again later
                        log.warning("cannot rewrite the CRL: %s", exc)

        if self._refresher is None:
            self._refresher = threading.Thread(target=loop, name="crl-refresher", daemon=True)
            self._refresher.start()

    def close(self) -> None:
        """Stop the CRL refresher; close the provisioner this service opened."""
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(10)
        if self._prov is not None:
            self._prov.close()


class _ProvisionCollector(Collector):
    def __init__(self, service: ProvisionService) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        if not self.service.available():
            return
        try:
            counts = self.service.get().counts()
        except (HTTPException, FieldmeshError):
            return
        issued = CounterMetricFamily("fieldmesh_certificates_issued", "Device certificates issued by provisioning")
        issued.add_metric([], counts.get("issued", 0))
        yield issued
        refused = CounterMetricFamily("fieldmesh_provision_refused", "Provisioning requests refused, by reason",
                                      labels=["reason"])
        reasons = {k.split(":", 1)[1] for k in counts if k.startswith("refused:")} | set(REFUSAL_REASONS)
        for reason in sorted(reasons):
            refused.add_metric([reason], counts.get(f"refused:{reason}", 0))
        yield refused


def device_guard(service: ProvisionService, guards: set[Any]) -> Callable[..., Grant]:
    """The guard of :data:`DEVICE_ROUTES`: the body's proof, checked (a token spent), as a :class:`Grant`."""

    def guard(request: Request, body: Annotated[ProvisionRequest, Body()]) -> Grant:
        prov = service.get()
        return prov.authorize(csr=body.csr, token=body.token, claim_certificate=body.claim_certificate,
                              certificate=body.certificate, signature=body.signature,
                              peer=request.client.host if request.client else "")

    guards.add(guard)
    return guard


def add_provision_routes(app: FastAPI, r: APIRouter, *, admin: Any, guards: set[Any],
                         service: ProvisionService, metrics: Any) -> None:
    """Add ``/provision``, ``/provision/tokens`` and ``/ca/revoke`` to ``r``; the refusal answer to ``app``;
    the provisioning counters to the Prometheus registry ``metrics``."""
    metrics.register(_ProvisionCollector(service))

    @app.exception_handler(CertificateRefused)
    async def _refused(request: Request, exc: CertificateRefused) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": exc.detail, "reason": exc.reason})

    # a default, not an Annotated alias: FastAPI cannot resolve a local name under postponed annotations
    granted = Depends(device_guard(service, guards))
    refusals: dict[int | str, dict[str, Any]] = {
        400: {"model": BadRequest, "description": "a malformed request, or CSR (reason bad_csr)"},
        401: {"model": Refusal, "description": "no proof, or an unknown, used, expired, revoked or invalid one"},
        403: {"model": Refusal, "description": "a valid proof that does not allow this device (another device, "
                                               "a suspended or retired one, outside the claim's devices)"},
        503: {"model": ErrorBody, "description": "no certificate authority, or the store is unavailable"}}

    @r.post("/provision", response_model=None, openapi_extra={"x-fieldmesh-auth": "device"},
            responses={200: {"model": ProvisionAnswer}, **refusals}, description=(
                "Device-authenticated (no API key): a CSR whose subject CN is the device id, and one proof: "
                "`token`, or `claim_certificate` + `signature`, or (rotation) `certificate` + `signature`."))
    def post_provision(grant: Grant = granted) -> dict[str, Any]:
        return service.get().issue(grant).as_dict()

    @r.post("/provision/tokens", status_code=201, response_model=None,
            responses={201: {"model": TokenRow, "description": "the token, shown this once"}, **BAD_PARAMETER})
    def post_token(body: Annotated[NewToken, Body()], p: Principal = admin) -> dict[str, Any]:
        tok, secret = service.get().create_token(body.device_id, ttl_ms=body.ttl_s * 1000, actor=p.subject)
        return {**tok.as_dict(), "token": secret}

    @r.post("/ca/revoke", response_model=None, responses={
        200: {"model": list[RevokedRow]}, **BAD_PARAMETER,
        404: {"model": ErrorBody, "description": "no such certificate or device"}})
    def post_revoke(body: Annotated[RevokeSerial | RevokeDevice, Body()],
                    p: Principal = admin) -> list[dict[str, Any]]:
        try:
            if isinstance(body, RevokeSerial):
                done = service.get().revoke(serial=body.serial, actor=p.subject, reason=body.reason)
            else:
                done = service.get().revoke(device_id=body.device_id, actor=p.subject, reason=body.reason)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        return [{"serial": c.serial, "device_id": c.device_id, "revoked_ms": c.revoked_ms} for c in done]
