"""Device twins in the hot store (SQLite embedded, PostgreSQL beyond), beside the device registry.

Tables of their own, created on demand by whoever opens them first (docs/twins.md):

- ``device_twins``: one row per device with a twin: its version, desired and reported documents and
  their metadata (JSON), ``seq`` (the change sequence of its last change) and ``desired_seq`` (of its
  last desired change), when created and changed.
- ``device_twin_seq``: one counter, bumped in the transaction of every change. On PostgreSQL the
  ``UPDATE`` holds the row's lock until the change commits, so changes commit in ``seq`` order and a
  reader that remembers the last ``seq`` it saw (the twin service publishing desired changes) misses
  none.

**Optimistic concurrency**: every change bumps the twin's version; a change naming the version it
was made against (``expect_version``) is refused with :class:`~fieldmesh.core.errors.ConflictError`
when the twin has moved since. The check and the write are one transaction (SQLite ``BEGIN
IMMEDIATE``; PostgreSQL ``SELECT ... FOR UPDATE`` on the twin's row after the counter), so two
writers naming the same version never both succeed. A patch that changes nothing writes nothing.

Desired changes write an ``audit_log`` row (``twin.desired``) in the same transaction; reported
changes (from devices, frequent) do not.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from fieldmesh.core.errors import ConfigError, ConflictError
from fieldmesh.core.topics import DEVICE_ID_RE
from fieldmesh.core.twins import MAX_DEPTH, MAX_DOC_BYTES, Twin, check_document, merge_patch
from fieldmesh.store.access import HotTables

__all__ = ["TwinStore"]

_COLS: Final = "device_id, version, desired, reported, desired_meta, reported_meta, created_ms, updated_ms"

_SQLITE_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS device_twins (device_id TEXT PRIMARY KEY, version INTEGER NOT NULL,"
    " desired TEXT NOT NULL, reported TEXT NOT NULL, desired_meta TEXT NOT NULL, reported_meta TEXT NOT NULL,"
    " seq INTEGER NOT NULL, desired_seq INTEGER NOT NULL, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL)",
    "CREATE INDEX IF NOT EXISTS device_twins_desired_seq ON device_twins (desired_seq)",
    "CREATE TABLE IF NOT EXISTS device_twin_seq (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL)",
    "INSERT INTO device_twin_seq (id, seq) VALUES (1, 0) ON CONFLICT DO NOTHING",
)
_PG_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS device_twins (device_id TEXT PRIMARY KEY, version BIGINT NOT NULL,"
    " desired TEXT NOT NULL, reported TEXT NOT NULL, desired_meta TEXT NOT NULL, reported_meta TEXT NOT NULL,"
    " seq BIGINT NOT NULL, desired_seq BIGINT NOT NULL, created_ms BIGINT NOT NULL, updated_ms BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS device_twins_desired_seq ON device_twins (desired_seq)",
    "CREATE TABLE IF NOT EXISTS device_twin_seq (id INTEGER PRIMARY KEY CHECK (id = 1), seq BIGINT NOT NULL)",
    "INSERT INTO device_twin_seq (id, seq) VALUES (1, 0) ON CONFLICT DO NOTHING",
)


def _row_twin(r: Sequence[Any]) -> Twin:
    return Twin(device_id=r[0], version=int(r[1]), desired=json.loads(r[2]), reported=json.loads(r[3]),
                desired_meta=json.loads(r[4]), reported_meta=json.loads(r[5]), created_ms=int(r[6]),
                updated_ms=int(r[7]))


def _dumps(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class TwinStore(HotTables):
    """Device twins in the hot store at ``url`` (``sqlite:///path`` or ``postgresql://...``).

    ``max_doc_bytes`` and ``max_depth`` bound each document (:func:`fieldmesh.core.twins.check_document`).

    Raises (from its methods): :class:`ConflictError` (``kind`` ``twin_version``) for a stale version,
    :class:`~fieldmesh.core.twins.TwinTooLarge` / :class:`~fieldmesh.core.twins.TwinInvalid` for a
    patch past the limits, :class:`ConfigError` for a bad device id,
    :class:`~fieldmesh.core.errors.BackendError` when the store fails.
    """

    SQLITE_DDL = _SQLITE_DDL
    PG_DDL = _PG_DDL
    APP_NAME = "fieldmesh-twins"
    WHAT = "device twins"

    def __init__(self, url: str, *, max_doc_bytes: int = MAX_DOC_BYTES, max_depth: int = MAX_DEPTH) -> None:
        super().__init__(url)
        self.max_doc_bytes = max_doc_bytes
        self.max_depth = max_depth

    def get(self, device_id: str) -> Twin:
        """The twin of ``device_id`` (version 0 and empty documents when it has none yet)."""
        _check_id(device_id)
        rows = self._fetch(f"SELECT {_COLS} FROM device_twins WHERE device_id = ?", (device_id,))
        return _row_twin(rows[0]) if rows else Twin(device_id)

    def seq(self) -> int:
        """The change sequence now (one primary-key read)."""
        return int(self._fetch("SELECT seq FROM device_twin_seq WHERE id = 1")[0][0])

    def desired_changes(self, after_seq: int, *, limit: int = 1000) -> list[tuple[int, Twin]]:
        """Twins whose desired document changed after ``after_seq``, as ``(desired_seq, twin)``, in order."""
        rows = self._fetch(f"SELECT desired_seq, {_COLS} FROM device_twins WHERE desired_seq > ?"
                           " ORDER BY desired_seq LIMIT ?", (after_seq, limit))
        return [(int(r[0]), _row_twin(r[1:])) for r in rows]

    def list(self, *, after: str | None = None, limit: int = 1000) -> list[Twin]:
        """Twins by device id, after ``after``."""
        rows = self._fetch(f"SELECT {_COLS} FROM device_twins WHERE device_id > ? ORDER BY device_id LIMIT ?",
                           (after or "", limit))
        return [_row_twin(r) for r in rows]

    def update_desired(self, device_id: str, patch: Mapping[str, Any], *, actor: str,
                       expect_version: int | None = None, ts_ms: int | None = None) -> Twin:
        """Merge ``patch`` into the desired document (``null`` removes a member).

        Raises:
            ConflictError: ``expect_version`` is given and the twin is at another version.
        """
        return self._update(device_id, "desired", patch, actor=actor, expect_version=expect_version, ts_ms=ts_ms)

    def update_reported(self, device_id: str, patch: Mapping[str, Any], *, expect_version: int | None = None,
                        ts_ms: int | None = None) -> Twin:
        """Merge ``patch`` into the reported document (what the device says it has)."""
        return self._update(device_id, "reported", patch, actor=None, expect_version=expect_version, ts_ms=ts_ms)

    def delete(self, device_id: str, *, actor: str) -> bool:
        """Remove a twin (both documents); False when it had none."""
        _check_id(device_id)
        with self._tx() as con:
            cur = con.execute(self._sql("DELETE FROM device_twins WHERE device_id = ?"), (device_id,))
            gone = bool(cur.rowcount)
            if gone:
                con.execute("UPDATE device_twin_seq SET seq = seq + 1 WHERE id = 1")
                self._audit(con, actor, "twin.delete", device_id, {})
        return gone

    def update_reported_many(self, reports: Sequence[tuple[str, Mapping[str, Any], int | None]], *,
                             ts_ms: int | None = None) -> builtins.list[Twin | ConfigError | ConflictError]:
        """Apply several reports ``(device_id, patch, expect_version)`` in order, in one transaction.

        Each gets its twin after it, or the error that refused it (a stale version, a patch past the
        limits, a bad id), which leaves the others be. One commit for all: the twin service applies
        what devices sent together at the cost of one.
        """
        now = int(time.time() * 1000) if ts_ms is None else ts_ms
        out: builtins.list[Twin | ConfigError | ConflictError] = []
        with self._tx() as con:
            self._serialize(con)
            for device_id, patch, expect_version in reports:
                try:
                    _check_id(device_id)
                    check_document(patch, key="reported", max_bytes=self.max_doc_bytes, max_depth=self.max_depth)
                    out.append(self._apply(con, device_id, "reported", patch, actor=None,
                                           expect_version=expect_version, now=now))
                except (ConfigError, ConflictError) as exc:  # refused before anything of it was written
                    out.append(exc)
        return out

    def _serialize(self, con: Any) -> None:
        if self._pg:  # queue behind other twin changes: seq values then commit in order
            con.execute("SELECT seq FROM device_twin_seq WHERE id = 1 FOR UPDATE")

    def _update(self, device_id: str, side: str, patch: Mapping[str, Any], *, actor: str | None,
                expect_version: int | None, ts_ms: int | None) -> Twin:
        _check_id(device_id)
        check_document(patch, key=side, max_bytes=self.max_doc_bytes, max_depth=self.max_depth)
        now = int(time.time() * 1000) if ts_ms is None else ts_ms
        with self._tx() as con:
            self._serialize(con)
            return self._apply(con, device_id, side, patch, actor=actor, expect_version=expect_version, now=now)

    def _apply(self, con: Any, device_id: str, side: str, patch: Mapping[str, Any], *, actor: str | None,
               expect_version: int | None, now: int) -> Twin:
        """One change in the transaction ``con``; every check comes before the first write."""
        row = con.execute(self._sql(f"SELECT {_COLS} FROM device_twins WHERE device_id = ?"), (device_id,)).fetchone()
        old = _row_twin(row) if row is not None else Twin(device_id)
        if expect_version is not None and expect_version != old.version:
            raise ConflictError(f"twin of {device_id!r} is at version {old.version}, not {expect_version}: "
                                "read it again and retry", kind="twin_version", key=device_id)
        doc, meta = (old.desired, old.desired_meta) if side == "desired" else (old.reported, old.reported_meta)
        new_doc, new_meta = merge_patch(doc, patch, meta, now)
        if new_doc == doc and new_meta == meta:
            return old  # nothing changed: nothing written
        check_document(new_doc, key=side, max_bytes=self.max_doc_bytes, max_depth=self.max_depth)
        seq = int(con.execute("UPDATE device_twin_seq SET seq = seq + 1 WHERE id = 1 RETURNING seq").fetchone()[0])
        version = old.version + 1
        if row is None:
            con.execute(self._sql(
                "INSERT INTO device_twins (device_id, version, desired, reported, desired_meta, reported_meta,"
                " seq, desired_seq, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                (device_id, version, _dumps(new_doc if side == "desired" else {}),
                 _dumps(new_doc if side == "reported" else {}), _dumps(new_meta if side == "desired" else {}),
                 _dumps(new_meta if side == "reported" else {}), seq, seq if side == "desired" else 0, now, now))
            created = now
        else:
            extra = ", desired_seq = ?" if side == "desired" else ""
            params: list[Any] = [version, _dumps(new_doc), _dumps(new_meta), seq]
            if side == "desired":
                params.append(seq)
            con.execute(self._sql(f"UPDATE device_twins SET version = ?, {side} = ?, {side}_meta = ?, seq = ?"
                                  f"{extra}, updated_ms = ? WHERE device_id = ?"), (*params, now, device_id))
            created = old.created_ms or now
        if actor is not None:
            self._audit(con, actor, f"twin.{side}", device_id, {"patch": dict(patch), "version": version})
        if side == "desired":
            return Twin(device_id, version, new_doc, old.reported, new_meta, old.reported_meta, created, now)
        return Twin(device_id, version, old.desired, new_doc, old.desired_meta, new_meta, created, now)


def _check_id(device_id: str) -> None:
    if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
        raise ConfigError(f"bad device id {device_id!r}: use 1-128 of [A-Za-z0-9_-]", key="device_id")
