"""Who is calling the API, and what they may do (docs/security.md).

A request carries an API key (``Authorization: Bearer fmk_...`` or ``X-API-Key: fmk_...``, checked
against the hot store on every request, so a revocation counts from the next one) or a JWT bearer
token of the configured OpenID Connect issuer (signature by the issuer's JWKS, ``iss``, ``aud``,
``exp``). Either gives a :class:`Principal`: a subject, a role, and the device groups it is limited
to (None: every device).

**Local-only mode**: while every listener is on loopback and no credential is configured (no active
key, no issuer), requests need none; the caller is ``local`` with the admin role. The first key
created ends that mode at the next request; a listener beyond loopback never has it.
"""

from __future__ import annotations

import fnmatch
import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from fieldmesh.core.errors import BackendError, ConfigError, NotFoundError, PermissionDenied
from fieldmesh.core.settings import AccessSettings
from fieldmesh.store.access import KEY_PREFIX, ROLES, AccessStore, role_rank
from fieldmesh.store.alerts import AlertTables
from fieldmesh.store.registry import Device, DeviceRegistry

__all__ = ["AUTH_FAILURES", "LOCAL", "Access", "AuthError", "DeviceGroups", "OidcVerifier", "Principal", "basic_token"]

#: Why a request was refused (401: the first three; 403: the last two), as counted in ``/stats`` and
#: ``fieldmesh_auth_failures_total{reason=...}``.
AUTH_FAILURES: Final = ("missing_credentials", "bad_key", "bad_token", "wrong_role", "wrong_group")

#: Asymmetric algorithms only: a JWKS holds public keys; HS* and "none" are never accepted.
JWT_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


@dataclass(frozen=True)
class Principal:
    """The caller: ``subject`` names it in the audit log (``key:<id>``, ``jwt:<sub>``, ``local``)."""

    subject: str
    role: str | None  # None: authenticated, but no fieldmesh role
    groups: tuple[str, ...] | None  # None: every device

    def may(self, role: str) -> bool:
        """Whether the caller's role includes ``role``."""
        return role_rank(self.role) >= role_rank(role)


#: The caller in local-only mode.
LOCAL: Final = Principal(subject="local", role="admin", groups=None)


class AuthError(Exception):
    """No valid credential: a 401 (``status`` 401) or 503 when the credentials cannot be checked.

    ``reason`` (of a 401): ``missing_credentials``, ``bad_key`` (an API key unknown or revoked) or
    ``bad_token`` (anything else: a JWT refused, or a token when no issuer is configured).
    """

    def __init__(self, detail: str, *, status: int = 401, invalid_token: bool = False,
                 reason: str = "bad_token") -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.invalid_token = invalid_token
        self.reason = reason


class DeviceGroups:
    """Which groups a device is in: a registered device's come from the device registry; the glob
    patterns of ``AccessSettings.groups`` (group name -> device-id patterns) still place the devices
    the registry does not hold (docs/registry.md).

    The registry's groups are cached and reloaded when its :meth:`~DeviceRegistry.version` moves:
    one primary-key read per question, and a change counts from the next request on.
    """

    def __init__(self, patterns: Mapping[str, Sequence[str]],
                 registry: Callable[[], DeviceRegistry] | None = None) -> None:
        self.patterns = {g: tuple(p) for g, p in patterns.items()}
        self._registry = registry
        self._lock = threading.Lock()
        self._cached: tuple[int, dict[str, tuple[str, ...]]] = (-1, {})
        #: How many times the registry's groups were read whole (each time its version had moved).
        self.reloads = 0

    def pattern_groups(self, device_id: str) -> tuple[str, ...]:
        """The groups whose patterns match ``device_id`` (for devices the registry does not hold)."""
        return tuple(sorted(g for g, pats in self.patterns.items()
                            if any(fnmatch.fnmatchcase(device_id, pat) for pat in pats)))

    def registered(self) -> dict[str, tuple[str, ...]]:
        """Every registered device's groups, as of the registry's current version (cached).

        Raises:
            BackendError: the registry cannot be read.
        """
        if self._registry is None:
            return {}
        reg = self._registry()
        with self._lock:
            if reg.version() != self._cached[0]:
                self._cached = reg.snapshot()
                self.reloads += 1
            return self._cached[1]

    def groups_of(self, device_id: str, registered: Mapping[str, tuple[str, ...]] | None = None) -> tuple[str, ...]:
        """The groups of ``device_id``: the registry's if it holds it, else the patterns'."""
        reg = self.registered() if registered is None else registered
        found = reg.get(device_id)
        return found if found is not None else self.pattern_groups(device_id)

    def sees(self, principal: Principal, device_id: str,
             registered: Mapping[str, tuple[str, ...]] | None = None) -> bool:
        """Whether ``principal`` may see ``device_id`` (``registered``: a :meth:`registered` already read)."""
        if principal.groups is None:
            return True
        return not set(principal.groups).isdisjoint(self.groups_of(device_id, registered))

    def check_change(self, principal: Principal, old: Device | None, new: Device | None) -> None:
        """Whether ``principal`` may change a registered device from ``old`` to ``new`` (None: not
        registered before / removed); called in the registry's transaction.

        A caller limited to groups may touch only devices wholly within its groups, and leave them so;
        it may register an id only if the patterns give it to no other group.

        Raises:
            NotFoundError: ``old`` is not visible to the caller (as if it did not exist).
            PermissionDenied: the change would reach beyond the caller's groups.
        """
        if principal.groups is None:
            return
        mine = set(principal.groups)
        limited = f"{principal.subject} is limited to device groups {', '.join(principal.groups)}"
        if old is not None:
            if mine.isdisjoint(old.groups):
                raise NotFoundError(f"no device {old.id!r}", kind="device", key=old.id)
            if not mine.issuperset(old.groups):
                raise PermissionDenied(f"device {old.id!r} is also in groups outside yours "
                                       f"({', '.join(sorted(set(old.groups) - mine))}): {limited}")
        elif new is not None and not mine.issuperset(self.pattern_groups(new.id)):
            raise PermissionDenied(f"device id {new.id!r} falls under another group's patterns: {limited}")
        if new is not None and (not new.groups or not mine.issuperset(new.groups)):
            raise PermissionDenied(f"device {new.id!r} must be in one or more of your groups, and only those: "
                                   f"{limited}")


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [v for v in value.replace(",", " ").split() if v]
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, str)]
    return []


class OidcVerifier:
    """Verifies JWT bearer tokens of one issuer against its JWKS (fetched, cached, refreshed on an unknown kid)."""

    def __init__(self, settings: AccessSettings) -> None:
        import jwt  # the server extra (pyjwt[crypto])

        assert settings.oidc_issuer is not None
        self._jwt = jwt
        self.s = settings
        self.issuer = settings.oidc_issuer
        self._lock = threading.Lock()
        self._keys: dict[str, Any] = {}
        self._fetched_at = -1e18
        self._jwks_url = settings.oidc_jwks_url

    @property
    def discovery_url(self) -> str:
        """The issuer's OpenID Connect discovery document."""
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"

    @staticmethod
    def _get_json(url: str) -> dict[str, Any]:
        with urllib.request.urlopen(url, timeout=5) as r:
            doc = json.loads(r.read())
        if not isinstance(doc, dict):
            raise ValueError(f"{url} did not answer a JSON object")
        return doc

    def _refresh(self) -> None:
        if self._jwks_url is None:
            self._jwks_url = str(self._get_json(self.discovery_url)["jwks_uri"])
        jwks = self._jwt.PyJWKSet.from_dict(self._get_json(self._jwks_url))
        self._keys = {k.key_id: k for k in jwks.keys if k.key_id}
        self._fetched_at = time.monotonic()

    def _key(self, kid: str) -> Any:
        with self._lock:
            now = time.monotonic()
            stale = now - self._fetched_at > self.s.jwks_cache_s
            unknown = kid not in self._keys and now - self._fetched_at >= self.s.jwks_refresh_min_s
            if stale or unknown:
                try:
                    self._refresh()
                except Exception as exc:
                    if not self._keys:
                        raise AuthError(f"cannot fetch the issuer's keys: {exc}", status=503) from exc
            return self._keys.get(kid)

    def verify(self, token: str) -> Principal:
        """The principal of a valid token.

        Raises:
            AuthError: bad signature, unknown key, expired, not yet valid, wrong issuer or audience.
        """
        jwt = self._jwt
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"not a JWT: {exc}", invalid_token=True) from None
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise AuthError("the token names no key (kid)", invalid_token=True)
        key = self._key(kid)
        if key is None:
            raise AuthError(f"the token's key {kid!r} is not among the issuer's keys", invalid_token=True)
        try:
            claims = jwt.decode(token, key.key, algorithms=list(JWT_ALGORITHMS), audience=self.s.audience,
                                issuer=self.issuer, leeway=30, options={"require": ["exp", "iss", "aud", "sub"]})
        except jwt.PyJWTError as exc:
            raise AuthError(f"token refused: {exc}", invalid_token=True) from None
        roles = [r for r in _strings(_claim(claims, self.s.oidc_role_claim)) if r in ROLES]
        role = max(roles, key=role_rank) if roles else None
        groups_claim = _claim(claims, self.s.oidc_groups_claim)
        groups = None if groups_claim is None else tuple(sorted(_strings(groups_claim)))
        return Principal(subject=f"jwt:{claims['sub']}", role=role, groups=groups)


class Access:
    """The API's authentication: keys in the hot store, optionally an OIDC issuer, maybe local-only mode.

    ``local_only``: every listener is on loopback, so no credential configured means no authentication.
    The key table is opened on first use (the API may start before the store exists).
    """

    def __init__(self, store_url: str, settings: AccessSettings | None = None, *, local_only: bool = True) -> None:
        self.store_url = store_url
        self.settings = settings or AccessSettings()
        self.local_only = local_only
        self.groups = DeviceGroups(self.settings.groups, lambda: self.registry)
        self.oidc = OidcVerifier(self.settings) if self.settings.oidc_issuer else None
        self._keys: AccessStore | None = None
        self._registry: DeviceRegistry | None = None
        self._alerts: AlertTables | None = None
        self._lock = threading.Lock()
        #: Requests refused by reason (:data:`AUTH_FAILURES`), since this process started.
        self.failures: dict[str, int] = dict.fromkeys(AUTH_FAILURES, 0)
        self._failures_lock = threading.Lock()

    def count_failure(self, reason: str) -> None:
        """Count a refused request (a 401 or 403) by its reason."""
        with self._failures_lock:
            self.failures[reason] = self.failures.get(reason, 0) + 1

    @property
    def store(self) -> AccessStore:
        """The key table (opened on first use)."""
        with self._lock:
            if self._keys is None:
                self._keys = AccessStore(self.store_url)
            return self._keys

    @property
    def registry(self) -> DeviceRegistry:
        """The device registry (opened on first use)."""
        with self._lock:
            if self._registry is None:
                self._registry = DeviceRegistry(self.store_url)
            return self._registry

    @property
    def alerts(self) -> AlertTables:
        """Alert rules, alerts and notifications (opened on first use)."""
        with self._lock:
            if self._alerts is None:
                self._alerts = AlertTables(self.store_url)
            return self._alerts

    def close(self) -> None:
        """Close the key table, the device registry and the alert tables."""
        if self._keys is not None:
            self._keys.close()
        if self._registry is not None:
            self._registry.close()
        if self._alerts is not None:
            self._alerts.close()

    def open_mode(self) -> bool:
        """Whether requests need no credential now (local-only mode)."""
        return self.local_only and self.oidc is None and not self.store.has_keys()

    def checks_locally(self, token: str | None) -> bool:
        """Whether :meth:`authenticate` of ``token`` would only read the opened key table in a local SQLite
        file (no credential, or an API key; not a JWT, whose issuer's keys may be fetched): quick enough for
        the API to call on its event loop. It is still a read per request: a revocation counts from the next."""
        return (self._keys is not None and (token is None or token.startswith(KEY_PREFIX))
                and self._keys.reads_quickly())

    def authenticate(self, token: str | None) -> Principal:
        """The caller of a request carrying ``token`` (None: no credential).

        Raises:
            AuthError: no credential where one is needed, or an invalid one.
        """
        try:
            if token is None:
                if self.open_mode():
                    return LOCAL
                raise AuthError("authentication required: send an API key (Authorization: Bearer fmk_... or "
                                "X-API-Key) or an OpenID Connect bearer token", reason="missing_credentials")
            if token.startswith(KEY_PREFIX):
                key = self.store.verify(token)
                if key is None:
                    raise AuthError("unknown or revoked API key", invalid_token=True, reason="bad_key")
                return Principal(subject=f"key:{key.id}", role=key.role, groups=key.groups or None)
        except (BackendError, ConfigError) as exc:
            raise AuthError(f"cannot check credentials: {exc}", status=503) from None
        if self.oidc is None:
            raise AuthError("not an API key, and no OpenID Connect issuer is configured", invalid_token=True)
        return self.oidc.verify(token)

    def describe(self) -> str:
        """What the start line says about authentication."""
        if self.open_mode():
            return ("local-only mode: no authentication, every listener is on loopback "
                    "(create a key with 'fieldmesh keys create' or see docs/security.md)")
        ways = ["API keys"] + ([f"OpenID Connect tokens of {self.settings.oidc_issuer}"] if self.oidc else [])
        return "authentication: " + " and ".join(ways)

    def configured(self) -> bool:
        """Whether authentication can be required: an active admin key exists or an issuer is set."""
        return self.oidc is not None or self.store.has_keys(role="admin")


def basic_token(username: str, password: str) -> str:
    """The credential in HTTP Basic ``username:password`` (how Confluent's clients send
    ``basic.auth.user.info``): the password when it is a whole API key ``fmk_...`` (any user), or the
    key ``fmk_<username>_<password>`` when the user is a key id; else the password (a JWT)."""
    if password.startswith(KEY_PREFIX):
        return password
    if re.fullmatch(r"[0-9a-f]{12}", username):
        return f"{KEY_PREFIX}{username}_{password}"
    return password
