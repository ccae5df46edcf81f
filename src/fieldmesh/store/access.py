"""API keys and the audit log, kept in the hot store beside the data (SQLite embedded, PostgreSQL beyond).

Two tables of their own, created on demand by whoever opens them first (``fieldmesh keys``, the API,
``fieldmesh up``), so they need no migration of the store's schema:

- ``api_keys``: one row per key: its id, name, role, device groups, the SHA-256 of its secret (the
  key itself is shown once, at creation, and never stored), who created and who revoked it, when.
- ``audit_log``: every administrative action (a key created or revoked; later the device registry's
  changes, store/registry.py): who (``key:<id>``, ``jwt:<subject>``, ``cli:<user>``, ``local``), what, on what, when.

A key reads ``fmk_<id>_<secret>``: the id finds the row, the secret (32 random bytes) is checked by
a constant-time comparison of its hash. A plain SHA-256 suffices: the secret is random, not a
password, so there is nothing to guess from its hash. Nothing is cached: a revoked key is refused
from the next request on.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fieldmesh.core.errors import BackendError, ConfigError, MissingDependency

__all__ = ["GROUP_RE", "KEY_PREFIX", "ROLES", "AccessStore", "ApiKey", "AuditEntry", "HotTables", "role_rank"]

#: Roles, weakest first: each may do what the ones before it may.
ROLES: Final = ("viewer", "operator", "admin")
KEY_PREFIX: Final = "fmk_"
#: Device group names (the future device registry's groups and sites use the same names).
GROUP_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_KEY_RE: Final = re.compile(r"fmk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,200})")
_SAFE_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

_SQLITE_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL,"
    " groups TEXT NOT NULL, secret_sha256 TEXT NOT NULL, created_ms INTEGER NOT NULL, created_by TEXT NOT NULL,"
    " revoked_ms INTEGER, revoked_by TEXT)",
    "CREATE TABLE IF NOT EXISTS audit_log (id INTEGER PRIMARY KEY AUTOINCREMENT, at_ms INTEGER NOT NULL,"
    " actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL)",
)
_PG_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL,"
    " groups TEXT NOT NULL, secret_sha256 TEXT NOT NULL, created_ms BIGINT NOT NULL, created_by TEXT NOT NULL,"
    " revoked_ms BIGINT, revoked_by TEXT)",
    "CREATE TABLE IF NOT EXISTS audit_log (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " at_ms BIGINT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL,"
    " detail TEXT NOT NULL)",
)
_KEY_COLS: Final = "id, name, role, groups, created_ms, created_by, revoked_ms, revoked_by"


def role_rank(role: str | None) -> int:
    """0 for no role, then 1 (viewer) .. 3 (admin)."""
    return ROLES.index(role) + 1 if role in ROLES else 0


@dataclass(frozen=True)
class ApiKey:
    """An API key as stored (never its secret)."""

    id: str
    name: str
    role: str
    groups: tuple[str, ...]  # empty: every device
    created_ms: int
    created_by: str
    revoked_ms: int | None = None
    revoked_by: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The key's JSON shape (API and ``fieldmesh keys list --json``)."""
        return {"id": self.id, "name": self.name, "role": self.role, "groups": list(self.groups),
                "created_ms": self.created_ms, "created_by": self.created_by,
                "revoked_ms": self.revoked_ms, "revoked_by": self.revoked_by}


@dataclass(frozen=True)
class AuditEntry:
    """One administrative action."""

    id: int
    at_ms: int
    actor: str
    action: str
    target: str
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """The entry's JSON shape."""
        return {"id": self.id, "at_ms": self.at_ms, "actor": self.actor, "action": self.action,
                "target": self.target, "detail": self.detail}


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _row_key(r: Sequence[Any]) -> ApiKey:
    return ApiKey(id=r[0], name=r[1], role=r[2], groups=tuple(g for g in str(r[3]).split(",") if g),
                  created_ms=int(r[4]), created_by=r[5], revoked_ms=None if r[6] is None else int(r[6]),
                  revoked_by=r[7])


class HotTables:
    """Tables of their own on the hot store at ``url`` (created when missing), beside ``audit_log``.

    One connection, used under a lock; a PostgreSQL connection the server closed is reopened.
    Subclasses name their DDL (``SQLITE_DDL``, ``PG_DDL``, run after the audit log's) and write every
    change with :meth:`_audit` in the same transaction (:meth:`_tx`).
    """

    SQLITE_DDL: tuple[str, ...] = ()
    PG_DDL: tuple[str, ...] = ()
    #: ``application_name`` of the PostgreSQL connection, and what errors say is unavailable.
    APP_NAME = "fieldmesh-access"
    WHAT = "API keys"

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        scheme = url.split("://", 1)[0].lower()
        self._db_errors: tuple[type[Exception], ...] = (sqlite3.Error,)
        if scheme == "sqlite":
            self._pg = False
            self._con: Any = self._sqlite(url)
        elif scheme in ("postgresql", "postgres"):
            self._pg = True
            self._con = self._postgres(url)
            self.backend_pid = int(self._con.info.backend_pid)
        else:
            raise ConfigError(f"unsupported store URL {url!r}: use sqlite:///path or postgresql://...",
                              key="store_url")

    # -- connections -------------------------------------------------------------------------
    def _sqlite(self, url: str) -> sqlite3.Connection:
        if not url.startswith("sqlite:///"):
            raise ConfigError(f"bad SQLite URL {url!r}: use sqlite:///path/to/store.db", key="store_url")
        path = Path(url[len("sqlite:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        con.execute("PRAGMA busy_timeout=30000")
        con.execute("PRAGMA journal_mode=WAL")  # the store's own mode: readers never wait for a writer
        con.execute("BEGIN IMMEDIATE")  # one set-up at a time: two openers of a new file both succeed
        try:
            for ddl in (*_SQLITE_DDL, *self.SQLITE_DDL):
                con.execute(ddl)
        except BaseException:
            con.execute("ROLLBACK")
            con.close()
            raise
        con.execute("COMMIT")
        return con

    def _postgres(self, url: str) -> Any:
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise MissingDependency("psycopg", "postgres") from exc
        parts = urlsplit(url)
        params = parse_qsl(parts.query, keep_blank_values=True)
        schema = next((v for k, v in params if k == "schema"), "public")
        if not _SAFE_IDENT.fullmatch(schema):
            raise ConfigError(f"bad schema name {schema!r} in the store URL", key="store_url")
        conninfo = urlunsplit(("postgresql", parts.netloc, parts.path,
                               urlencode([(k, v) for k, v in params if k != "schema"]), ""))
        self._db_errors = (sqlite3.Error, psycopg.Error)
        con = None
        try:
            con = psycopg.connect(conninfo, autocommit=True, connect_timeout=10,
                                  options=f"-c search_path={schema}", application_name=self.APP_NAME)
            with con.transaction():
                con.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"fieldmesh-access-{schema}",))
                con.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
                for ddl in (*_PG_DDL, *self.PG_DDL):
                    con.execute(ddl)
        except psycopg.Error as exc:
            if con is not None:
                con.close()
            raise BackendError(f"cannot open the {self.WHAT} in schema {schema!r}: {exc}".strip()) from exc
        return con

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._con.close()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._pg else sql

    def reads_quickly(self) -> bool:
        """Whether a read now would take microseconds: the tables are in a local SQLite file (WAL: a reader
        never waits for a writer) and no call of this connection is under way (a write waiting for the
        file's lock would hold it). For callers on an event loop; elsewhere, just read."""
        return not self._pg and not self._lock.locked()

    def _reconnect_if_lost(self) -> None:
        """Reopen a PostgreSQL connection the server closed (a restart, a failover, an idle timeout)."""
        if self._pg and (self._con.closed or self._con.broken):
            self._con = self._postgres(self.url)
            self.backend_pid = int(self._con.info.backend_pid)

    def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            for attempt in (1, 2):
                self._reconnect_if_lost()
                try:
                    return list(self._con.execute(self._sql(sql), params).fetchall())
                except Exception as exc:
                    if attempt == 1 and self._pg and (self._con.closed or self._con.broken):
                        continue  # the connection was lost under us: once more on a new one
                    raise BackendError(f"{self.WHAT} unavailable: {exc}") from exc
            raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Any]:
        """A write transaction (under the lock)."""
        with self._lock:
            self._reconnect_if_lost()
            try:
                if self._pg:
                    with self._con.transaction():
                        yield self._con
                    return
                self._con.execute("BEGIN IMMEDIATE")
                try:
                    yield self._con
                except BaseException:
                    self._con.execute("ROLLBACK")
                    raise
                self._con.execute("COMMIT")
            except self._db_errors as exc:
                raise BackendError(f"{self.WHAT} unavailable: {exc}") from exc

    def _audit(self, con: Any, actor: str, action: str, target: str, detail: dict[str, Any]) -> None:
        con.execute(self._sql("INSERT INTO audit_log (at_ms, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)"),
                    (int(time.time() * 1000), actor, action, target, json.dumps(detail, sort_keys=True)))

    # -- audit -------------------------------------------------------------------------------
    def record(self, *, actor: str, action: str, target: str, detail: dict[str, Any] | None = None) -> None:
        """Record an administrative action done elsewhere."""
        with self._tx() as con:
            self._audit(con, actor, action, target, detail or {})

    def audit_log(self, *, since_ms: int | None = None, limit: int = 100) -> list[AuditEntry]:
        """The newest entries first, at or after ``since_ms`` when given."""
        rows = self._fetch("SELECT id, at_ms, actor, action, target, detail FROM audit_log WHERE at_ms >= ?"
                           " ORDER BY id DESC LIMIT ?", (since_ms if since_ms is not None else -(2**63), limit))
        return [AuditEntry(id=int(r[0]), at_ms=int(r[1]), actor=r[2], action=r[3], target=r[4],
                           detail=json.loads(r[5])) for r in rows]


class AccessStore(HotTables):
    """The ``api_keys`` and ``audit_log`` tables of the hot store at ``url`` (created when missing).

    Key checks are one indexed read, key changes are rare.
    """

    # -- keys --------------------------------------------------------------------------------
    def create_key(self, *, role: str, groups: Sequence[str] = (), name: str = "", actor: str) -> tuple[ApiKey, str]:
        """Create a key; return it and its secret form ``fmk_<id>_<secret>`` (shown once, never stored).

        Raises:
            ConfigError: an unknown role or a malformed group name.
        """
        if role not in ROLES:
            raise ConfigError(f"unknown role {role!r}: use one of {', '.join(ROLES)}", key="role")
        bad = [g for g in groups if not GROUP_RE.fullmatch(g)]
        if bad:
            raise ConfigError(f"bad group name {bad[0]!r}: use 1-64 of [A-Za-z0-9_.-]", key="groups")
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        key = ApiKey(id=key_id, name=name or key_id, role=role, groups=tuple(sorted(set(groups))),
                     created_ms=int(time.time() * 1000), created_by=actor)
        with self._tx() as con:
            con.execute(self._sql(f"INSERT INTO api_keys ({_KEY_COLS}, secret_sha256)"
                                  " VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, ?)"),
                        (key.id, key.name, key.role, ",".join(key.groups), key.created_ms, actor, _sha256(secret)))
            self._audit(con, actor, "key.create", key.id, {"name": key.name, "role": role, "groups": list(key.groups)})
        return key, f"{KEY_PREFIX}{key_id}_{secret}"

    def revoke_key(self, key_id: str, *, actor: str) -> ApiKey:
        """Revoke a key (from the next request on); revoking it again changes nothing.

        Raises:
            ConfigError: no key has that id.
        """
        with self._tx() as con:
            row = con.execute(self._sql(f"SELECT {_KEY_COLS} FROM api_keys WHERE id = ?"), (key_id,)).fetchone()
            if row is None:
                raise ConfigError(f"no API key {key_id!r} (fieldmesh keys list shows them)", key="id")
            key = _row_key(row)
            if key.revoked_ms is None:
                now = int(time.time() * 1000)
                con.execute(self._sql("UPDATE api_keys SET revoked_ms = ?, revoked_by = ? WHERE id = ?"),
                            (now, actor, key_id))
                self._audit(con, actor, "key.revoke", key_id, {"name": key.name, "role": key.role})
                key = ApiKey(**{**key.__dict__, "revoked_ms": now, "revoked_by": actor})
        return key

    def list_keys(self, *, include_revoked: bool = True) -> list[ApiKey]:
        """Every key, oldest first."""
        where = "" if include_revoked else " WHERE revoked_ms IS NULL"
        return [_row_key(r) for r in self._fetch(f"SELECT {_KEY_COLS} FROM api_keys{where} ORDER BY created_ms, id")]

    def verify(self, token: str) -> ApiKey | None:
        """The active key ``token`` is, or None (malformed, unknown, wrong secret or revoked)."""
        m = _KEY_RE.fullmatch(token)
        if m is None:
            return None
        rows = self._fetch(f"SELECT {_KEY_COLS}, secret_sha256 FROM api_keys WHERE id = ?", (m[1],))
        if not rows:
            return None
        key = _row_key(rows[0])
        if not hmac.compare_digest(str(rows[0][8]), _sha256(m[2])) or key.revoked_ms is not None:
            return None
        return key

    def has_keys(self, *, role: str | None = None) -> bool:
        """Whether an active key exists (of ``role``, when given)."""
        if role is None:
            rows = self._fetch("SELECT 1 FROM api_keys WHERE revoked_ms IS NULL LIMIT 1")
        else:
            rows = self._fetch("SELECT 1 FROM api_keys WHERE revoked_ms IS NULL AND role = ? LIMIT 1", (role,))
        return bool(rows)
