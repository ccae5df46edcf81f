"""Enrollment tokens, claim certificates and provisioning counts, on the hot store beside the audit log.

Three tables of their own (created on demand, like ``api_keys``, :mod:`fieldmesh.store.access`):

- ``enrollment_tokens``: one-time tokens that let one device get its first certificate. Only the SHA-256
  of a token is kept (the token is shown once); it expires (``expires_ms``) and is spent by one atomic
  ``UPDATE ... WHERE used_ms IS NULL``, so two requests racing with the same token get one certificate.
- ``claim_certificates``: the claim (bootstrap) certificates issued, by serial: their batch name, the
  device groups a device registered through them joins, the device ids they may claim (a glob), and
  whether they are revoked. A claim certificate not in this table is refused.
- ``provision_counts``: how many certificates were issued and how many requests were refused, by reason
  (``/metrics``: ``fieldmesh_provision_*``). Each count is written with its audit row, in one transaction.

A token reads ``fme_<secret>`` (32 random bytes): as for API keys a plain SHA-256 suffices, the secret is
random, not a password.
"""

from __future__ import annotations

import fnmatch
import hashlib
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from fieldmesh.core.errors import ConfigError, NotFoundError
from fieldmesh.core.topics import DEVICE_ID_RE
from fieldmesh.store.access import GROUP_RE, HotTables

__all__ = ["TOKEN_PREFIX", "ClaimRecord", "EnrollmentStore", "EnrollmentToken"]

TOKEN_PREFIX: Final = "fme_"
#: Outcomes of spending a token.
TOKEN_OK: Final = "ok"

_SQLITE_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS enrollment_tokens (sha256 TEXT PRIMARY KEY, id TEXT NOT NULL UNIQUE,"
    " device_id TEXT NOT NULL, created_ms INTEGER NOT NULL, created_by TEXT NOT NULL, expires_ms INTEGER NOT NULL,"
    " used_ms INTEGER)",
    "CREATE TABLE IF NOT EXISTS claim_certificates (serial TEXT PRIMARY KEY, name TEXT NOT NULL,"
    " groups TEXT NOT NULL, devices TEXT NOT NULL, not_after_ms INTEGER NOT NULL, created_ms INTEGER NOT NULL,"
    " created_by TEXT NOT NULL, revoked_ms INTEGER, revoked_by TEXT)",
    "CREATE TABLE IF NOT EXISTS provision_counts (outcome TEXT PRIMARY KEY, n INTEGER NOT NULL)",
)
_PG_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS enrollment_tokens (sha256 TEXT PRIMARY KEY, id TEXT NOT NULL UNIQUE,"
    " device_id TEXT NOT NULL, created_ms BIGINT NOT NULL, created_by TEXT NOT NULL, expires_ms BIGINT NOT NULL,"
    " used_ms BIGINT)",
    "CREATE TABLE IF NOT EXISTS claim_certificates (serial TEXT PRIMARY KEY, name TEXT NOT NULL,"
    " groups TEXT NOT NULL, devices TEXT NOT NULL, not_after_ms BIGINT NOT NULL, created_ms BIGINT NOT NULL,"
    " created_by TEXT NOT NULL, revoked_ms BIGINT, revoked_by TEXT)",
    "CREATE TABLE IF NOT EXISTS provision_counts (outcome TEXT PRIMARY KEY, n BIGINT NOT NULL)",
)
_TOKEN_COLS: Final = "id, device_id, created_ms, created_by, expires_ms, used_ms"
_CLAIM_COLS: Final = "serial, name, groups, devices, not_after_ms, created_ms, created_by, revoked_ms, revoked_by"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class EnrollmentToken:
    """A token as stored (never the token itself)."""

    id: str
    device_id: str
    created_ms: int
    created_by: str
    expires_ms: int
    used_ms: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """The token's JSON shape."""
        return {"id": self.id, "device_id": self.device_id, "created_ms": self.created_ms,
                "created_by": self.created_by, "expires_ms": self.expires_ms, "used_ms": self.used_ms}


@dataclass(frozen=True)
class ClaimRecord:
    """A claim certificate issued: which batch, which groups its devices join, which ids it may claim."""

    serial: str
    name: str
    groups: tuple[str, ...]
    devices: str  # a glob over device ids ("*": any)
    not_after_ms: int
    created_ms: int
    created_by: str
    revoked_ms: int | None = None
    revoked_by: str | None = None

    def allows(self, device_id: str) -> bool:
        """Whether this claim may register ``device_id``."""
        return fnmatch.fnmatchcase(device_id, self.devices)

    def as_dict(self) -> dict[str, Any]:
        """The claim's JSON shape."""
        return {"serial": self.serial, "name": self.name, "groups": list(self.groups), "devices": self.devices,
                "not_after_ms": self.not_after_ms, "created_ms": self.created_ms, "created_by": self.created_by,
                "revoked_ms": self.revoked_ms, "revoked_by": self.revoked_by}


def _row_token(r: Sequence[Any]) -> EnrollmentToken:
    return EnrollmentToken(id=r[0], device_id=r[1], created_ms=int(r[2]), created_by=r[3], expires_ms=int(r[4]),
                           used_ms=None if r[5] is None else int(r[5]))


def _row_claim(r: Sequence[Any]) -> ClaimRecord:
    return ClaimRecord(serial=r[0], name=r[1], groups=tuple(g for g in str(r[2]).split(",") if g), devices=r[3],
                       not_after_ms=int(r[4]), created_ms=int(r[5]), created_by=r[6],
                       revoked_ms=None if r[7] is None else int(r[7]), revoked_by=r[8])


class EnrollmentStore(HotTables):
    """The ``enrollment_tokens``, ``claim_certificates`` and ``provision_counts`` tables of the hot store at
    ``url`` (created when missing)."""

    SQLITE_DDL = _SQLITE_DDL
    PG_DDL = _PG_DDL
    APP_NAME = "fieldmesh-enrollment"
    WHAT = "enrollment tokens"

    # -- tokens ------------------------------------------------------------------------------
    def create_token(self, device_id: str, *, ttl_ms: int, actor: str) -> tuple[EnrollmentToken, str]:
        """A one-time token for ``device_id``, valid ``ttl_ms``; returns it and its secret form (shown once).

        Raises:
            ConfigError: a malformed device id or a TTL that is not positive.
        """
        if not DEVICE_ID_RE.fullmatch(device_id):
            raise ConfigError(f"bad device id {device_id!r}: use 1-128 of [A-Za-z0-9_-]", key="device_id")
        if ttl_ms <= 0:
            raise ConfigError(f"the token's lifetime must be positive, not {ttl_ms} ms", key="ttl")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = _now_ms()
        tok = EnrollmentToken(id=secrets.token_hex(6), device_id=device_id, created_ms=now, created_by=actor,
                              expires_ms=now + ttl_ms)
        with self._tx() as con:
            con.execute(self._sql(f"INSERT INTO enrollment_tokens (sha256, {_TOKEN_COLS})"
                                  " VALUES (?, ?, ?, ?, ?, ?, ?)"),
                        (_sha256(secret), tok.id, device_id, now, actor, tok.expires_ms, None))
            self._audit(con, actor, "token.create", device_id, {"token": tok.id, "expires_ms": tok.expires_ms})
        return tok, secret

    def spend_token(self, secret: str, *, device_id: str,
                    now_ms: int | None = None) -> tuple[str, EnrollmentToken | None]:
        """Spend ``secret`` for ``device_id``: ``("ok", token)`` once, then ``("used", token)``; else
        ``("unknown", None)``, ``("expired", token)`` or ``("device_mismatch", token)`` (not spent).

        One atomic ``UPDATE ... WHERE used_ms IS NULL``: concurrent requests (several API processes, one
        database) spend a token once.
        """
        now = now_ms if now_ms is not None else _now_ms()
        digest = _sha256(secret)
        with self._tx() as con:
            cur = con.execute(self._sql("UPDATE enrollment_tokens SET used_ms = ? WHERE sha256 = ? AND device_id = ?"
                                        " AND used_ms IS NULL AND expires_ms > ?"), (now, digest, device_id, now))
            spent = cur.rowcount == 1
            row = con.execute(self._sql(f"SELECT {_TOKEN_COLS} FROM enrollment_tokens WHERE sha256 = ?"),
                              (digest,)).fetchone()
            if row is None:
                return "unknown", None
            tok = _row_token(row)
            if spent:
                self._audit(con, f"device:{device_id}", "token.use", device_id, {"token": tok.id})
                return TOKEN_OK, tok
        if tok.device_id != device_id:
            return "device_mismatch", tok
        if tok.used_ms is not None:
            return "used", tok
        return "expired", tok

    def tokens(self, device_id: str | None = None) -> list[EnrollmentToken]:
        """The tokens (of ``device_id``), oldest first."""
        where, params = (" WHERE device_id = ?", (device_id,)) if device_id else ("", ())
        return [_row_token(r) for r in self._fetch(
            f"SELECT {_TOKEN_COLS} FROM enrollment_tokens{where} ORDER BY created_ms, id", params)]

    # -- claim certificates ------------------------------------------------------------------
    def add_claim(self, *, serial: str, name: str, groups: Sequence[str] = (), devices: str = "*",
                  not_after_ms: int, actor: str) -> ClaimRecord:
        """Record a claim certificate issued (its devices join ``groups``; it may claim ids matching ``devices``).

        Raises:
            ConfigError: a malformed group name or an empty pattern.
        """
        bad = [g for g in groups if not GROUP_RE.fullmatch(g)]
        if bad:
            raise ConfigError(f"bad group name {bad[0]!r}: use 1-64 of [A-Za-z0-9_.-]", key="groups")
        if not devices or len(devices) > 256:
            raise ConfigError("the claim's device pattern must be 1-256 characters", key="devices")
        rec = ClaimRecord(serial=serial, name=name, groups=tuple(sorted(set(groups))), devices=devices,
                          not_after_ms=not_after_ms, created_ms=_now_ms(), created_by=actor)
        with self._tx() as con:
            con.execute(self._sql(f"INSERT INTO claim_certificates ({_CLAIM_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                        (serial, name, ",".join(rec.groups), devices, not_after_ms, rec.created_ms, actor, None, None))
            self._audit(con, actor, "claim.create", name, {"serial": serial, "groups": list(rec.groups),
                                                           "devices": devices, "not_after_ms": not_after_ms})
        return rec

    def claim(self, serial: str) -> ClaimRecord | None:
        """The claim certificate of ``serial``, or None."""
        rows = self._fetch(f"SELECT {_CLAIM_COLS} FROM claim_certificates WHERE serial = ?", (serial,))
        return _row_claim(rows[0]) if rows else None

    def claims(self) -> list[ClaimRecord]:
        """Every claim certificate, oldest first."""
        return [_row_claim(r) for r in self._fetch(
            f"SELECT {_CLAIM_COLS} FROM claim_certificates ORDER BY created_ms, serial")]

    def revoke_claim(self, name_or_serial: str, *, actor: str) -> list[ClaimRecord]:
        """Revoke the claim certificates of a batch name (or one serial): refused from the next request on.

        Raises:
            NotFoundError: no claim certificate has that name or serial.
        """
        now = _now_ms()
        with self._tx() as con:
            rows = con.execute(self._sql(f"SELECT {_CLAIM_COLS} FROM claim_certificates WHERE name = ? OR serial = ?"),
                               (name_or_serial, name_or_serial)).fetchall()
            if not rows:
                raise NotFoundError(f"no claim certificate {name_or_serial!r}", kind="claim", key=name_or_serial)
            out = []
            for r in rows:
                rec = _row_claim(r)
                if rec.revoked_ms is None:
                    con.execute(self._sql("UPDATE claim_certificates SET revoked_ms = ?, revoked_by = ?"
                                          " WHERE serial = ?"), (now, actor, rec.serial))
                    self._audit(con, actor, "claim.revoke", rec.name, {"serial": rec.serial})
                    rec = ClaimRecord(**{**rec.__dict__, "revoked_ms": now, "revoked_by": actor})
                out.append(rec)
        return out

    # -- counts ------------------------------------------------------------------------------
    def count(self, outcome: str, *, actor: str, target: str, detail: dict[str, Any]) -> None:
        """Count a provisioning outcome (``issued`` or ``refused:<reason>``) and audit it, in one transaction."""
        with self._tx() as con:
            con.execute(self._sql("INSERT INTO provision_counts (outcome, n) VALUES (?, 1)"
                                  " ON CONFLICT (outcome) DO UPDATE SET n = provision_counts.n + 1"), (outcome,))
            self._audit(con, actor, f"provision.{outcome.split(':', 1)[0]}", target, detail)

    def counts(self) -> dict[str, int]:
        """``{outcome: n}``: ``issued``, ``refused:<reason>``."""
        return {r[0]: int(r[1]) for r in self._fetch("SELECT outcome, n FROM provision_counts ORDER BY outcome")}
