"""The device registry: which devices may exist, their status, groups, tags, attributes and certificates.

Kept in the hot store beside the API keys and the audit log (SQLite embedded, PostgreSQL beyond), in
tables of its own, created on demand by whoever opens them first (docs/registry.md):

- ``device_registry``: one row per registered device: status (``active``, ``suspended``, ``retired``),
  groups and tags (JSON lists), attributes (a JSON object), when and by whom created and changed.
  Not the store's ``devices`` table, which holds the devices *seen* (first/last reading, counts).
- ``device_registry_groups``: one row per (group, device), so a group's devices are one indexed read.
- ``device_certificates``: the X.509 certificates issued to devices: serial, subject, SHA-256
  fingerprint of the DER, validity, revocation, the PEM. Kept after a revocation or a device's deletion.
- ``device_registry_version``: a single counter, bumped in the transaction of every change, so
  :meth:`DeviceRegistry.version` is one primary-key read and readers (the API's group cache, the
  gateway) know when to reload. On PostgreSQL the ``UPDATE`` takes the row's lock until the
  change commits, so concurrent writers queue there and versions commit in order, each one higher.

Every change writes an ``audit_log`` row (``device.add``, ``device.update``, ``device.delete``,
``device.import``, ``cert.add``, ``cert.revoke``) in the same transaction, naming the caller's actor.
"""

from __future__ import annotations

import builtins
import csv
import io
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from fieldmesh.core.errors import ConfigError, ConflictError, NotFoundError, PermissionDenied, RowsRejected
from fieldmesh.core.topics import DEVICE_ID_RE
from fieldmesh.store.access import GROUP_RE, HotTables

__all__ = [
    "ATTRIBUTE_KEY_RE",
    "CSV_COLUMNS",
    "STATUSES",
    "TAG_RE",
    "Authorize",
    "Certificate",
    "Device",
    "DeviceRegistry",
    "parse_csv",
]

#: A device's statuses: ``active`` may connect and send; ``suspended`` is refused for now; ``retired``
#: is out of service for good (kept for its history; the door and gateway refuse both).
STATUSES: Final = ("active", "suspended", "retired")
TAG_RE: Final = re.compile(r"[A-Za-z0-9_.:=/-]{1,64}")
ATTRIBUTE_KEY_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: The most groups or tags a device has, and the size of its attributes as JSON.
MAX_GROUPS: Final = 100
MAX_TAGS: Final = 100
MAX_ATTRIBUTES_BYTES: Final = 16_384
#: The fixed columns of an import file; ``attr.<name>`` columns add attributes.
CSV_COLUMNS: Final = ("device_id", "groups", "tags", "status")

#: A check run in a change's transaction with the device before and after it (None: not registered
#: before / removed); it raises (:class:`PermissionDenied`, :class:`NotFoundError`) to refuse the change.
Authorize = Callable[["Device | None", "Device | None"], None]

_DEVICE_COLS: Final = "id, status, groups, tags, attributes, created_ms, updated_ms"
_CERT_COLS: Final = "serial, device_id, subject, fingerprint, not_before_ms, not_after_ms, revoked_ms, pem"

_SQLITE_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS device_registry (id TEXT PRIMARY KEY, status TEXT NOT NULL, groups TEXT NOT NULL,"
    " tags TEXT NOT NULL, attributes TEXT NOT NULL, created_ms INTEGER NOT NULL, created_by TEXT NOT NULL,"
    " updated_ms INTEGER NOT NULL, updated_by TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS device_registry_groups (group_name TEXT NOT NULL, device_id TEXT NOT NULL,"
    " PRIMARY KEY (group_name, device_id))",
    "CREATE INDEX IF NOT EXISTS device_registry_groups_device ON device_registry_groups (device_id)",
    "CREATE TABLE IF NOT EXISTS device_certificates (serial TEXT PRIMARY KEY, device_id TEXT NOT NULL,"
    " subject TEXT NOT NULL, fingerprint TEXT NOT NULL UNIQUE, not_before_ms INTEGER NOT NULL,"
    " not_after_ms INTEGER NOT NULL, revoked_ms INTEGER, revoked_by TEXT, revoke_reason TEXT, pem TEXT NOT NULL,"
    " added_ms INTEGER NOT NULL, added_by TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS device_certificates_device ON device_certificates (device_id)",
    "CREATE TABLE IF NOT EXISTS device_registry_version (id INTEGER PRIMARY KEY CHECK (id = 1),"
    " version INTEGER NOT NULL)",
    "INSERT INTO device_registry_version (id, version) VALUES (1, 0) ON CONFLICT DO NOTHING",
)
_PG_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS device_registry (id TEXT PRIMARY KEY, status TEXT NOT NULL, groups TEXT NOT NULL,"
    " tags TEXT NOT NULL, attributes TEXT NOT NULL, created_ms BIGINT NOT NULL, created_by TEXT NOT NULL,"
    " updated_ms BIGINT NOT NULL, updated_by TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS device_registry_groups (group_name TEXT NOT NULL, device_id TEXT NOT NULL,"
    " PRIMARY KEY (group_name, device_id))",
    "CREATE INDEX IF NOT EXISTS device_registry_groups_device ON device_registry_groups (device_id)",
    "CREATE TABLE IF NOT EXISTS device_certificates (serial TEXT PRIMARY KEY, device_id TEXT NOT NULL,"
    " subject TEXT NOT NULL, fingerprint TEXT NOT NULL UNIQUE, not_before_ms BIGINT NOT NULL,"
    " not_after_ms BIGINT NOT NULL, revoked_ms BIGINT, revoked_by TEXT, revoke_reason TEXT, pem TEXT NOT NULL,"
    " added_ms BIGINT NOT NULL, added_by TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS device_certificates_device ON device_certificates (device_id)",
    "CREATE TABLE IF NOT EXISTS device_registry_version (id INTEGER PRIMARY KEY CHECK (id = 1),"
    " version BIGINT NOT NULL)",
    "INSERT INTO device_registry_version (id, version) VALUES (1, 0) ON CONFLICT DO NOTHING",
)


@dataclass(frozen=True)
class Device:
    """A registered device."""

    id: str
    status: str  # "active" | "suspended" | "retired"
    groups: tuple[str, ...]
    tags: tuple[str, ...]
    attributes: dict[str, Any] = field(hash=False)
    created_ms: int
    updated_ms: int

    def as_dict(self) -> dict[str, Any]:
        """The device's JSON shape (API, ``fieldmesh devices ... --json``)."""
        return {"device_id": self.id, "status": self.status, "groups": list(self.groups), "tags": list(self.tags),
                "attributes": dict(self.attributes), "created_ms": self.created_ms, "updated_ms": self.updated_ms}


@dataclass(frozen=True)
class Certificate:
    """An X.509 certificate issued to a device."""

    serial: str  # hex, lower case
    device_id: str
    subject: str  # RFC 4514 string of the certificate subject
    fingerprint: str  # sha256 of the DER, hex
    not_before_ms: int
    not_after_ms: int
    revoked_ms: int | None
    pem: str

    def valid_at(self, at_ms: int) -> bool:
        """Whether the certificate is within its validity and not revoked at ``at_ms``."""
        return (self.not_before_ms <= at_ms <= self.not_after_ms
                and (self.revoked_ms is None or self.revoked_ms > at_ms))

    def as_dict(self) -> dict[str, Any]:
        """The certificate's JSON shape."""
        return {"serial": self.serial, "device_id": self.device_id, "subject": self.subject,
                "fingerprint": self.fingerprint, "not_before_ms": self.not_before_ms,
                "not_after_ms": self.not_after_ms, "revoked_ms": self.revoked_ms, "pem": self.pem}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _check_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
        raise ConfigError(f"bad device id {device_id!r}: use 1-128 of [A-Za-z0-9_-]", key="device_id")
    return device_id


def _check_status(status: str) -> str:
    if status not in STATUSES:
        raise ConfigError(f"unknown status {status!r}: use one of {', '.join(STATUSES)}", key="status")
    return status


def _names(values: Iterable[str], pattern: re.Pattern[str], what: str, most: int) -> tuple[str, ...]:
    if isinstance(values, str):
        raise ConfigError(f"{what} must be a list of names, not one string", key=what)
    out = tuple(sorted(set(values)))
    bad = [v for v in out if not isinstance(v, str) or not pattern.fullmatch(v)]
    if bad:
        raise ConfigError(f"bad {what[:-1]} name {bad[0]!r}: use 1-64 of {pattern.pattern.split('{')[0]}", key=what)
    if len(out) > most:
        raise ConfigError(f"too many {what}: {len(out)} (at most {most})", key=what)
    return out


def _check_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(attributes, Mapping):
        raise ConfigError("attributes must be an object of name -> value", key="attributes")
    bad = [k for k in attributes if not isinstance(k, str) or not ATTRIBUTE_KEY_RE.fullmatch(k)]
    if bad:
        raise ConfigError(f"bad attribute name {bad[0]!r}: use 1-64 of [A-Za-z0-9_.-]", key="attributes")
    try:
        text = json.dumps(dict(attributes), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"attributes must be JSON values: {exc}", key="attributes") from None
    if len(text.encode()) > MAX_ATTRIBUTES_BYTES:
        raise ConfigError(f"attributes too large: {len(text.encode())} bytes as JSON (at most "
                          f"{MAX_ATTRIBUTES_BYTES})", key="attributes")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def _row_device(r: Sequence[Any]) -> Device:
    return Device(id=r[0], status=r[1], groups=tuple(json.loads(r[2])), tags=tuple(json.loads(r[3])),
                  attributes=json.loads(r[4]), created_ms=int(r[5]), updated_ms=int(r[6]))


def _row_cert(r: Sequence[Any]) -> Certificate:
    return Certificate(serial=r[0], device_id=r[1], subject=r[2], fingerprint=r[3], not_before_ms=int(r[4]),
                       not_after_ms=int(r[5]), revoked_ms=None if r[6] is None else int(r[6]), pem=r[7])


@dataclass(frozen=True)
class CsvRow:
    """One parsed row of an import file: ``None`` fields were not given (their column is absent or empty)."""

    line: int
    device_id: str
    groups: tuple[str, ...] | None
    tags: tuple[str, ...] | None
    status: str | None
    attributes: dict[str, str | None] = field(hash=False)  # None: an empty cell, removes the attribute


def _split(cell: str) -> list[str]:
    return [v.strip() for v in cell.split(";") if v.strip()]


def parse_csv(text: str) -> list[CsvRow]:
    """Parse and check an import file (docs/registry.md); every bad row is reported, with its line.

    Raises:
        RowsRejected: a bad header or any bad row (``errors``: line number, message).
    """
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise RowsRejected([(1, "empty file: the first line must be a header with device_id")]) from None
    except csv.Error as exc:
        raise RowsRejected([(1, f"not CSV: {exc}")]) from None
    problems: list[tuple[int, str]] = []
    unknown = [h for h in header if h not in CSV_COLUMNS and not h.startswith("attr.")]
    bad_attr = [h for h in header if h.startswith("attr.") and not ATTRIBUTE_KEY_RE.fullmatch(h[5:])]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if "device_id" not in header:
        problems.append((1, "the header has no device_id column"))
    if unknown:
        problems.append((1, f"unknown column(s) {', '.join(map(repr, unknown))}: use "
                            f"{', '.join(CSV_COLUMNS)} and attr.<name>"))
    if bad_attr:
        problems.append((1, f"bad attribute column(s) {', '.join(map(repr, bad_attr))}: attr.<1-64 of "
                            "[A-Za-z0-9_.-]>"))
    if dupes:
        problems.append((1, f"repeated column(s) {', '.join(map(repr, dupes))}"))
    if problems:
        raise RowsRejected(problems)
    rows: list[CsvRow] = []
    first_line: dict[str, int] = {}
    try:
        for record in reader:
            line = reader.line_num
            if not any(c.strip() for c in record):
                continue  # blank lines are layout, not rows
            if len(record) != len(header):
                problems.append((line, f"{len(record)} field(s), the header has {len(header)}"))
                continue
            cells = {h: c.strip() for h, c in zip(header, record, strict=True)}
            try:
                device_id = _check_id(cells["device_id"])
                if device_id in first_line:
                    raise ConfigError(f"device {device_id!r} again (first on line {first_line[device_id]})")
                groups = _names(_split(cells["groups"]), GROUP_RE, "groups", MAX_GROUPS) if "groups" in cells else None
                tags = _names(_split(cells["tags"]), TAG_RE, "tags", MAX_TAGS) if "tags" in cells else None
                status = _check_status(cells["status"]) if cells.get("status") else None
                attrs: dict[str, str | None] = {h[5:]: (c or None) for h, c in cells.items() if h.startswith("attr.")}
                _check_attributes({k: v for k, v in attrs.items() if v is not None})
            except ConfigError as exc:
                problems.append((line, str(exc)))
                continue
            first_line[device_id] = line
            rows.append(CsvRow(line=line, device_id=device_id, groups=groups, tags=tags, status=status,
                               attributes=attrs))
    except csv.Error as exc:
        problems.append((reader.line_num, f"not CSV: {exc}"))
    if problems:
        raise RowsRejected(problems)
    return rows


class DeviceRegistry(HotTables):
    """The device registry in the hot store at ``url`` (``sqlite:///path`` or ``postgresql://...``).

    Raises (from its methods): :class:`ConflictError` for an id already registered,
    :class:`NotFoundError` for an unknown device or certificate, :class:`ConfigError` for a bad
    value (names the field in ``.key``), :class:`RowsRejected` for a bad import,
    :class:`~fieldmesh.core.errors.BackendError` when the store fails.
    """

    SQLITE_DDL = _SQLITE_DDL
    PG_DDL = _PG_DDL
    APP_NAME = "fieldmesh-registry"
    WHAT = "device registry"

    # -- helpers -----------------------------------------------------------------------------
    def _serialize(self, con: Any) -> None:
        """Queue behind any other registry change (PostgreSQL; SQLite's BEGIN IMMEDIATE already does).

        Writers then never deadlock nor race between a check and a write, and versions commit in order.
        """
        if self._pg:
            con.execute("SELECT version FROM device_registry_version WHERE id = 1 FOR UPDATE")

    def _bump(self, con: Any) -> int:
        row = con.execute("UPDATE device_registry_version SET version = version + 1 WHERE id = 1"
                          " RETURNING version").fetchone()
        return int(row[0])

    def _get(self, con: Any, device_id: str) -> Device | None:
        row = con.execute(self._sql(f"SELECT {_DEVICE_COLS} FROM device_registry WHERE id = ?"),
                          (device_id,)).fetchone()
        return None if row is None else _row_device(row)

    def _write(self, con: Any, dev: Device, actor: str, *, new: bool) -> None:
        self._write_many(con, [dev] if new else [], [] if new else [dev], actor)

    def _write_many(self, con: Any, new: Sequence[Device], changed: Sequence[Device], actor: str) -> None:
        """Insert ``new`` devices and rewrite ``changed`` ones, a statement per kind (batched)."""
        def values(d: Device) -> tuple[Any, ...]:
            return (d.status, json.dumps(list(d.groups)), json.dumps(list(d.tags)),
                    json.dumps(d.attributes, sort_keys=True), d.updated_ms, actor)

        cur = con.cursor()
        if new:
            cur.executemany(self._sql("INSERT INTO device_registry (id, status, groups, tags, attributes, updated_ms,"
                                      " updated_by, created_ms, created_by) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                            [(d.id, *values(d), d.created_ms, actor) for d in new])
        if changed:
            cur.executemany(self._sql("UPDATE device_registry SET status = ?, groups = ?, tags = ?, attributes = ?,"
                                      " updated_ms = ?, updated_by = ? WHERE id = ?"),
                            [(*values(d), d.id) for d in changed])
            cur.executemany(self._sql("DELETE FROM device_registry_groups WHERE device_id = ?"),
                            [(d.id,) for d in changed])
        members = [(g, d.id) for d in (*new, *changed) for g in d.groups]
        if members:
            cur.executemany(self._sql("INSERT INTO device_registry_groups (group_name, device_id) VALUES (?, ?)"),
                            members)

    def _get_many(self, con: Any, ids: Sequence[str]) -> dict[str, Device]:
        out: dict[str, Device] = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            marks = ", ".join("?" * len(chunk))
            rows = con.execute(self._sql(f"SELECT {_DEVICE_COLS} FROM device_registry WHERE id IN ({marks})"),
                               chunk).fetchall()
            out.update((r[0], _row_device(r)) for r in rows)
        return out

    @staticmethod
    def _changes(old: Device, new: Device) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("status", "groups", "tags", "attributes"):
            a, b = getattr(old, name), getattr(new, name)
            if a != b:
                out[name] = {"from": list(a) if isinstance(a, tuple) else a,
                             "to": list(b) if isinstance(b, tuple) else b}
        return out

    # -- devices -----------------------------------------------------------------------------
    def add(self, device_id: str, *, groups: Iterable[str] = (), tags: Iterable[str] = (),
            attributes: Mapping[str, Any] | None = None, status: str = "active", actor: str,
            authorize: Authorize | None = None) -> Device:
        """Register a device (``authorize``: a check of the caller's right to, in the transaction).

        Raises:
            ConflictError: the id is registered already.
            ConfigError: a bad id, status, group, tag or attribute.
        """
        now = _now_ms()
        dev = Device(id=_check_id(device_id), status=_check_status(status),
                     groups=_names(groups, GROUP_RE, "groups", MAX_GROUPS),
                     tags=_names(tags, TAG_RE, "tags", MAX_TAGS),
                     attributes=_check_attributes(attributes or {}), created_ms=now, updated_ms=now)
        with self._tx() as con:
            self._serialize(con)
            if self._get(con, device_id) is not None:
                raise ConflictError(f"device {device_id!r} is registered already", kind="device", key=device_id)
            if authorize is not None:
                authorize(None, dev)
            self._write(con, dev, actor, new=True)
            self._bump(con)
            self._audit(con, actor, "device.add", device_id, {k: v for k, v in dev.as_dict().items()
                                                              if k in ("status", "groups", "tags", "attributes")})
        return dev

    def get(self, device_id: str) -> Device | None:
        """The registered device ``device_id``, or None."""
        rows = self._fetch(f"SELECT {_DEVICE_COLS} FROM device_registry WHERE id = ?", (device_id,))
        return _row_device(rows[0]) if rows else None

    def update(self, device_id: str, *, groups: Iterable[str] | None = None, tags: Iterable[str] | None = None,
               attributes: Mapping[str, Any] | None = None, status: str | None = None,
               attributes_patch: Mapping[str, Any] | None = None, actor: str,
               authorize: Authorize | None = None) -> Device:
        """Change a device: ``groups``, ``tags`` and ``attributes`` replace what it had; ``None`` keeps it.

        ``attributes_patch`` merges into the attributes (after ``attributes``, if both): a ``None``
        value removes that attribute (JSON merge patch, RFC 7396, one level). A change that changes
        nothing writes nothing (no audit row, no new version).

        Raises:
            NotFoundError: no device ``device_id``.
            ConfigError: a bad status, group, tag or attribute.
        """
        new_groups = None if groups is None else _names(groups, GROUP_RE, "groups", MAX_GROUPS)
        new_tags = None if tags is None else _names(tags, TAG_RE, "tags", MAX_TAGS)
        new_attrs = None if attributes is None else _check_attributes(attributes)
        if status is not None:
            _check_status(status)
        if attributes_patch is not None and not isinstance(attributes_patch, Mapping):
            raise ConfigError("attributes must be an object of name -> value", key="attributes")
        with self._tx() as con:
            self._serialize(con)
            old = self._get(con, device_id)
            if old is None:
                raise NotFoundError(f"no registered device {device_id!r}", kind="device", key=device_id)
            attrs = dict(old.attributes if new_attrs is None else new_attrs)
            for k, v in (attributes_patch or {}).items():
                if v is None:
                    attrs.pop(k, None)
                else:
                    attrs[k] = v
            dev = Device(id=old.id, status=status or old.status,
                         groups=old.groups if new_groups is None else new_groups,
                         tags=old.tags if new_tags is None else new_tags,
                         attributes=_check_attributes(attrs), created_ms=old.created_ms, updated_ms=_now_ms())
            if authorize is not None:
                authorize(old, dev)
            changes = self._changes(old, dev)
            if not changes:
                return old
            self._write(con, dev, actor, new=False)
            self._bump(con)
            self._audit(con, actor, "device.update", device_id, changes)
        return dev

    def delete(self, device_id: str, *, actor: str, authorize: Authorize | None = None) -> Device:
        """Remove a device from the registry and revoke its certificates (kept, revoked, for the record);
        return the device as it was.

        The audit log keeps what it was. To keep the device listed but out of service, set its
        status to ``retired`` instead.

        Raises:
            NotFoundError: no device ``device_id``.
        """
        with self._tx() as con:
            self._serialize(con)
            old = self._get(con, device_id)
            if old is None:
                raise NotFoundError(f"no registered device {device_id!r}", kind="device", key=device_id)
            if authorize is not None:
                authorize(old, None)
            now = _now_ms()
            revoked = [r[0] for r in con.execute(self._sql(
                "SELECT serial FROM device_certificates WHERE device_id = ? AND revoked_ms IS NULL ORDER BY serial"),
                (device_id,)).fetchall()]
            con.execute(self._sql("UPDATE device_certificates SET revoked_ms = ?, revoked_by = ?, revoke_reason = ?"
                                  " WHERE device_id = ? AND revoked_ms IS NULL"),
                        (now, actor, "device deleted", device_id))
            con.execute(self._sql("DELETE FROM device_registry_groups WHERE device_id = ?"), (device_id,))
            con.execute(self._sql("DELETE FROM device_registry WHERE id = ?"), (device_id,))
            self._bump(con)
            self._audit(con, actor, "device.delete", device_id,
                        {"was": {k: v for k, v in old.as_dict().items() if k != "device_id"},
                         "certificates_revoked": revoked})
        return old

    def list(self, *, status: str | None = None, group: str | None = None, after: str | None = None,
             limit: int = 1000) -> builtins.list[Device]:
        """Registered devices by id, ``after`` that id when given (pages), at most ``limit``."""
        where, params = ["d.id > ?"], [after or ""]
        if status is not None:
            where.append("d.status = ?")
            params.append(_check_status(status))
        join = ""
        if group is not None:
            join = " JOIN device_registry_groups g ON g.device_id = d.id AND g.group_name = ?"
            params.insert(0, group)
        cols = ", ".join(f"d.{c.strip()}" for c in _DEVICE_COLS.split(","))
        rows = self._fetch(f"SELECT {cols} FROM device_registry d{join} WHERE {' AND '.join(where)}"
                           " ORDER BY d.id LIMIT ?", (*params, max(0, int(limit))))
        return [_row_device(r) for r in rows]

    def group_map(self) -> dict[str, tuple[str, ...]]:
        """Every registered device's groups (for authorization caches keyed by :meth:`version`)."""
        return {r[0]: tuple(json.loads(r[1])) for r in self._fetch("SELECT id, groups FROM device_registry")}

    def snapshot(self) -> tuple[int, dict[str, tuple[str, ...]]]:
        """:meth:`version` and :meth:`group_map`, read by one statement (a consistent pair)."""
        rows = self._fetch("SELECT v.version, d.id, d.groups FROM device_registry_version v"
                           " LEFT JOIN device_registry d ON 1 = 1 WHERE v.id = 1")
        return int(rows[0][0]), {r[1]: tuple(json.loads(r[2])) for r in rows if r[1] is not None}

    def import_csv(self, text: str, *, actor: str, authorize: Authorize | None = None) -> dict[str, int]:
        """Register or update the devices of an import file, all or nothing (docs/registry.md).

        A new device gets the row's groups, tags, status (default ``active``) and attributes; a
        registered one gets the columns the file has: groups and tags replaced, status set when the
        cell is not empty, each ``attr.<name>`` set, or removed when its cell is empty.

        Returns:
            ``{"added": n, "updated": n, "unchanged": n}``.

        Raises:
            RowsRejected: a bad header or any bad row: nothing is imported, every problem is named.
            PermissionDenied: ``authorize`` refused rows (each named by its line): nothing is imported.
        """
        rows = parse_csv(text)
        counts = {"added": 0, "updated": 0, "unchanged": 0}
        now = _now_ms()
        with self._tx() as con:
            self._serialize(con)
            changed: builtins.list[str] = []
            problems: builtins.list[tuple[int, str]] = []
            denied: builtins.list[tuple[int, str]] = []
            existing = self._get_many(con, [r.device_id for r in rows])
            to_add: builtins.list[Device] = []
            to_change: builtins.list[Device] = []
            for row in rows:
                old = existing.get(row.device_id)
                if old is None:
                    attrs = {k: v for k, v in row.attributes.items() if v is not None}
                    dev = Device(id=row.device_id, status=row.status or "active", groups=row.groups or (),
                                 tags=row.tags or (), attributes=attrs, created_ms=now, updated_ms=now)
                else:
                    merged = dict(old.attributes)
                    for k, v in row.attributes.items():
                        if v is None:
                            merged.pop(k, None)
                        else:
                            merged[k] = v
                    try:
                        merged = _check_attributes(merged)
                    except ConfigError as exc:
                        problems.append((row.line, str(exc)))
                        continue
                    dev = Device(id=old.id, status=row.status or old.status,
                                 groups=old.groups if row.groups is None else row.groups,
                                 tags=old.tags if row.tags is None else row.tags,
                                 attributes=merged, created_ms=old.created_ms, updated_ms=now)
                if authorize is not None:
                    try:
                        authorize(old, dev)
                    except (PermissionDenied, NotFoundError) as exc:
                        denied.append((row.line, str(exc)))
                        continue
                if old is None:
                    to_add.append(dev)
                    counts["added"] += 1
                elif self._changes(old, dev):
                    to_change.append(dev)
                    counts["updated"] += 1
                else:
                    counts["unchanged"] += 1
                    continue
                changed.append(row.device_id)
            if problems:
                raise RowsRejected(problems)  # rolls the transaction back: nothing imported
            if denied:
                raise PermissionDenied("not imported, rows beyond your rights: " + "; ".join(
                    f"line {n}: {m}" for n, m in denied[:20]) + (f" (and {len(denied) - 20} more)"
                                                                if len(denied) > 20 else ""))
            if changed:
                self._write_many(con, to_add, to_change, actor)
                self._bump(con)
                self._audit(con, actor, "device.import", f"{len(changed)} devices",
                            {**counts, "devices": changed[:1000], "more": max(0, len(changed) - 1000)})
        return counts

    # -- certificates ------------------------------------------------------------------------
    def add_certificate(self, cert: Certificate, *, actor: str, exclusive: bool = False) -> None:
        """Record a certificate issued to a registered device.

        ``exclusive``: only if the device holds no other certificate valid now, checked in the same
        transaction (two claims of one new device racing: one gets in).

        Raises:
            NotFoundError: its device is not registered.
            ConflictError: a certificate with that serial or fingerprint is recorded already; with
                ``exclusive``, the device holds a valid certificate (``kind`` "valid_certificate").
            ConfigError: a malformed serial or fingerprint.
        """
        if not re.fullmatch(r"[0-9a-f]{1,64}", cert.serial):
            raise ConfigError(f"bad serial {cert.serial!r}: lower-case hex", key="serial")
        if not re.fullmatch(r"[0-9a-f]{64}", cert.fingerprint):
            raise ConfigError(f"bad fingerprint {cert.fingerprint!r}: SHA-256, 64 lower-case hex", key="fingerprint")
        with self._tx() as con:
            self._serialize(con)
            if self._get(con, cert.device_id) is None:
                raise NotFoundError(f"no registered device {cert.device_id!r}", kind="device", key=cert.device_id)
            clash = con.execute(self._sql("SELECT serial FROM device_certificates WHERE serial = ? OR fingerprint = ?"),
                                (cert.serial, cert.fingerprint)).fetchone()
            if clash is not None:
                raise ConflictError(f"certificate {clash[0]} is recorded already", kind="certificate", key=clash[0])
            if exclusive:
                now = _now_ms()
                valid = con.execute(self._sql(
                    "SELECT serial FROM device_certificates WHERE device_id = ? AND not_before_ms <= ?"
                    " AND not_after_ms >= ? AND (revoked_ms IS NULL OR revoked_ms > ?)"),  # as certificates()
                    (cert.device_id, now, now, now)).fetchone()
                if valid is not None:
                    raise ConflictError(f"device {cert.device_id!r} holds the valid certificate {valid[0]}",
                                        kind="valid_certificate", key=valid[0])
            con.execute(self._sql(f"INSERT INTO device_certificates ({_CERT_COLS}, added_ms, added_by)"
                                  " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                        (cert.serial, cert.device_id, cert.subject, cert.fingerprint, cert.not_before_ms,
                         cert.not_after_ms, cert.revoked_ms, cert.pem, _now_ms(), actor))
            self._bump(con)
            self._audit(con, actor, "cert.add", cert.serial,
                        {"device_id": cert.device_id, "subject": cert.subject, "fingerprint": cert.fingerprint,
                         "not_before_ms": cert.not_before_ms, "not_after_ms": cert.not_after_ms})

    def revoke_certificate(self, serial: str, *, actor: str, reason: str = "") -> Certificate:
        """Revoke a certificate from now on; revoking it again changes nothing.

        Raises:
            NotFoundError: no certificate ``serial``.
        """
        with self._tx() as con:
            self._serialize(con)
            row = con.execute(self._sql(f"SELECT {_CERT_COLS} FROM device_certificates WHERE serial = ?"),
                              (serial,)).fetchone()
            if row is None:
                raise NotFoundError(f"no certificate {serial!r}", kind="certificate", key=serial)
            cert = _row_cert(row)
            if cert.revoked_ms is not None:
                return cert
            now = _now_ms()
            con.execute(self._sql("UPDATE device_certificates SET revoked_ms = ?, revoked_by = ?, revoke_reason = ?"
                                  " WHERE serial = ?"), (now, actor, reason, serial))
            self._bump(con)
            self._audit(con, actor, "cert.revoke", serial, {"device_id": cert.device_id, "reason": reason})
        return Certificate(**{**cert.__dict__, "revoked_ms": now})

    def certificates(self, device_id: str | None = None, *,
                     valid_at_ms: int | None = None) -> builtins.list[Certificate]:
        """Recorded certificates (of ``device_id`` when given), by serial; with ``valid_at_ms`` only
        those within their validity and not revoked at that time."""
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if device_id is not None:
            where.append("device_id = ?")
            params.append(device_id)
        if valid_at_ms is not None:
            where.append("not_before_ms <= ? AND not_after_ms >= ? AND (revoked_ms IS NULL OR revoked_ms > ?)")
            params += [valid_at_ms, valid_at_ms, valid_at_ms]
        sql = f"SELECT {_CERT_COLS} FROM device_certificates"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [_row_cert(r) for r in self._fetch(sql + " ORDER BY serial", params)]

    def revoked(self, *, at_ms: int | None = None) -> builtins.list[tuple[str, int]]:
        """``(serial, revoked_ms)`` of the revoked certificates not yet expired at ``at_ms`` (now by default),
        by serial: what a certificate revocation list names."""
        at = at_ms if at_ms is not None else _now_ms()
        rows = self._fetch("SELECT serial, revoked_ms FROM device_certificates WHERE revoked_ms IS NOT NULL"
                           " AND not_after_ms > ? ORDER BY serial", (at,))
        return [(str(r[0]), int(r[1])) for r in rows]

    def version(self) -> int:
        """A number that strictly increases with every change of the devices or certificates."""
        return int(self._fetch("SELECT version FROM device_registry_version WHERE id = 1")[0][0])
