"""Canaries and their readings in the hot store (SQLite or PostgreSQL alike): docs/canary.md.

Tables of their own, created on demand:

- ``canaries``: one row per canary (its JSON, ``state``: active, promoted or aborted, who changed it and
  when, the readings merged at promotion), and ``canaries_version``: bumped by every change, so processors
  poll one row per batch;
- ``canary_readings``: the readings routed to a canary, one row each (``id`` is the identity key it was
  claimed under, so a reading is in ``canary_readings`` or in the main tables, never both), with the
  reading as it travelled (``body``) for promotion;
- ``canary_stats``: per (canary, side) the readings received, stored, duplicated, dead-lettered and the
  sum of their receipt-to-commit latencies, added to in each batch's transaction.

The processor reads the canaries and writes their rows in each batch's transaction (:func:`load_canaries`,
:func:`write_parts`); on PostgreSQL it reads the version row ``FOR SHARE``, and a promotion updates it
first, so a batch routed under the old state commits before the promotion reads what it merges.
The API and the CLI go through :class:`CanaryTables`; promotion through :func:`promote` (a hot-store
transaction: the canary's readings join the readings, rollups and device tables as if just stored).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from fieldmesh.core.batch import BatchResult, ReadingColumns
from fieldmesh.core.errors import ConflictError, NotFoundError
from fieldmesh.store.alerts import _Con
from fieldmesh.store.base import INTERVALS, HotStore, HotTxn, SqlTxn
from fieldmesh.store.products import PG_DDL as _PRODUCTS_PG_DDL
from fieldmesh.store.products import SQLITE_DDL as _PRODUCTS_SQLITE_DDL
from fieldmesh.store.products import SnapshotReads, _now, load_products, quality_of
from fieldmesh.store.registry import _PG_DDL as _REGISTRY_PG_DDL
from fieldmesh.store.registry import _SQLITE_DDL as _REGISTRY_SQLITE_DDL
from fieldmesh.stream.canary import (
    Canary,
    CanaryRouter,
    Routed,
    canary_products,
    now_ms,
    parse_canary,
    reading_rows,
    readings_of,
)
from fieldmesh.stream.quality import Product, compare

__all__ = ["CanaryTables", "ensure_tables", "load_canaries", "promote", "write_parts"]

_COMMON_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS canaries (name TEXT PRIMARY KEY, body TEXT NOT NULL, state TEXT NOT NULL,"
    " created_ms {int} NOT NULL, updated_ms {int} NOT NULL, updated_by TEXT NOT NULL, merged {int} NOT NULL)",
    "CREATE TABLE IF NOT EXISTS canaries_version (id INTEGER PRIMARY KEY CHECK (id = 1), version {int} NOT NULL)",
    "INSERT INTO canaries_version (id, version) VALUES (1, 0) ON CONFLICT DO NOTHING",
    "CREATE TABLE IF NOT EXISTS canary_readings (id {int} PRIMARY KEY, canary TEXT NOT NULL, device_id TEXT NOT NULL,"
    " ts_ms {int} NOT NULL, received_ms {int} NOT NULL, stored_ms {int} NOT NULL, body TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS canary_readings_canary ON canary_readings (canary, ts_ms)",
    "CREATE TABLE IF NOT EXISTS canary_stats (canary TEXT NOT NULL, side TEXT NOT NULL, received {int} NOT NULL,"
    " stored {int} NOT NULL, duplicates {int} NOT NULL, dead_letters {int} NOT NULL, latency_ms {int} NOT NULL,"
    " PRIMARY KEY (canary, side))",
)
SQLITE_DDL: Final = tuple(s.format(int="INTEGER") for s in _COMMON_DDL)
PG_DDL: Final = tuple(s.format(int="BIGINT") for s in _COMMON_DDL)
_SIDES: Final = ("canary", "baseline")


def ensure_tables(tx: SqlTxn) -> None:
    """Create the canary tables where missing."""
    if tx.dialect != "sqlite":
        tx.execute("SELECT pg_advisory_xact_lock(hashtext('fieldmesh-canaries'))")
    for stmt in SQLITE_DDL if tx.dialect == "sqlite" else PG_DDL:
        tx.execute(stmt)


def canaries_version(tx: SqlTxn, *, lock: bool = True) -> int:
    """The canaries' version; with ``lock``, read ``FOR SHARE`` on PostgreSQL: a promotion or abort (which
    updates the row) then waits for this transaction."""
    lock_sql = " FOR SHARE" if lock and tx.dialect != "sqlite" else ""
    rows = tx.execute(f"SELECT version FROM canaries_version WHERE id = 1{lock_sql}")
    return int(rows[0][0]) if rows else 0


def load_canaries(tx: SqlTxn, products: Sequence[Product] | None = None) -> list[tuple[Canary, Product]]:
    """The active canaries with their products (a canary whose product is gone routes nothing)."""
    by_name = {p.name: p for p in (products if products is not None else load_products(tx)[1])}
    out = []
    for (body,) in tx.execute("SELECT body FROM canaries WHERE state = 'active' ORDER BY name"):
        try:
            c = parse_canary(json.loads(body))
        except Exception:
            continue
        if c.product in by_name:
            out.append((c, by_name[c.product]))
    return out


def _add_stats(tx: SqlTxn, rows: Sequence[tuple[str, str, int, int, int, int, int]]) -> None:
    tx.executemany(
        "INSERT INTO canary_stats (canary, side, received, stored, duplicates, dead_letters, latency_ms)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (canary, side) DO UPDATE SET"
        " received = canary_stats.received + excluded.received, stored = canary_stats.stored + excluded.stored,"
        " duplicates = canary_stats.duplicates + excluded.duplicates,"
        " dead_letters = canary_stats.dead_letters + excluded.dead_letters,"
        " latency_ms = canary_stats.latency_ms + excluded.latency_ms", [r for r in rows if any(r[2:])])


def _latency(new: ReadingColumns, now: int) -> int:
    return int(np.maximum(now - new.received_ms, 0).sum()) if len(new) else 0


def write_parts(tx: SqlTxn, routed: Routed, router: CanaryRouter, groups: Mapping[str, Sequence[str]]
                ) -> dict[str, int]:
    """In the batch's transaction: each canary part's new readings into ``canary_readings``, and both sides'
    counts into ``canary_stats``; the readings stored per canary."""
    now = now_ms()
    stats = []
    stored: dict[str, int] = {}
    for part in routed.parts:
        rows = reading_rows(part.canary.name, part.result, now)
        if rows:
            tx.executemany("INSERT INTO canary_readings (canary, id, device_id, ts_ms, received_ms, stored_ms, body)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        stored[part.canary.name] = len(rows)
        stats.append((part.canary.name, "canary", len(part.received), len(rows),
                      int(part.result.counts.get("duplicates", 0)), part.dead_letters, _latency(part.result.new, now)))
    main_rx, main_new = routed.received, routed.result.new
    for i, (c, _) in enumerate(router.canaries):  # the baseline: the canary's devices' readings on the main path
        rx, new = router.selected(i, main_rx, groups), router.selected(i, main_new, groups)
        n_new = int(new.sum())
        lat = int(np.maximum(now - main_new.received_ms[new], 0).sum()) if n_new else 0
        # duplicates of the main path are not told apart per device by the result: received - stored (the
        # main path's in-batch and stored duplicates alike; a collision's probe stores the reading, not counted)
        stats.append((c.name, "baseline", int(rx.sum()), n_new, int(rx.sum()) - n_new,
                      routed.baseline_dead.get(c.name, 0), lat))
    _add_stats(tx, stats)
    return stored


def _stats(tx: SqlTxn, name: str) -> dict[str, dict[str, Any]]:
    got = {side: (int(r), int(s), int(d), int(dl), int(lat)) for side, r, s, d, dl, lat in tx.execute(
        "SELECT side, received, stored, duplicates, dead_letters, latency_ms FROM canary_stats WHERE canary = ?",
        (name,))}
    out = {}
    for side in _SIDES:
        r, s, d, dl, lat = got.get(side, (0, 0, 0, 0, 0))
        out[side] = {"received": r, "stored": s, "duplicates": d, "dead_letters": dl,
                     "dlq_rate": dl / (r + dl) if r + dl else None, "latency_s": lat / s / 1000 if s else None}
    return out


def promote(store: HotStore, name: str, *, actor: str, merge: bool = True) -> dict[str, Any]:
    """Promote canary ``name``: from the next batch on its traffic takes the main path; with ``merge``, its
    readings join the main tables (readings, rollups, devices: as if just stored, not late) and leave
    ``canary_readings``, in one hot-store transaction with the state change and the audit entry.

    ConflictError unless the canary is active; NotFoundError when there is none. The canary tables exist
    (:class:`CanaryTables` creates them): no DDL here, whose locks would order this transaction with the
    batches by accident rather than by the version row."""
    from fieldmesh.stream.columnar import settle

    out: dict[str, Any] = {}

    def build(txn: HotTxn) -> BatchResult:
        txn.execute("UPDATE canaries_version SET version = version + 1 WHERE id = 1")  # first: waits for batches
        row = txn.execute("SELECT state FROM canaries WHERE name = ?", (name,))
        if not row:
            raise NotFoundError(f"no canary {name!r}", kind="canary", key=name)
        if row[0][0] != "active":
            raise ConflictError(f"canary {name!r} is {row[0][0]}, not active", kind="canary", key=name)
        rows = txn.execute("SELECT id, body FROM canary_readings WHERE canary = ? ORDER BY id", (name,)) \
            if merge else []
        cols = ReadingColumns.from_readings(readings_of(rows))
        n = len(cols)
        # the keys are claimed already (when routed): every one is new to the main tables
        result = settle(cols, np.zeros(n, np.bool_), np.full(n, -1, np.int64),
                        lambda k, c, o: np.zeros(len(k), np.int8), intervals=INTERVALS, positions={})
        # counted as stored when routed: moved, not stored again
        result = dataclasses.replace(result, counts={"canary.stored": -n, "canary.merged": n})
        if merge:
            txn.execute("DELETE FROM canary_readings WHERE canary = ?", (name,))
        now = _now()
        txn.execute("UPDATE canaries SET state = 'promoted', updated_ms = ?, updated_by = ?, merged = ?"
                    " WHERE name = ?", (now, actor, n, name))
        txn.execute("INSERT INTO audit_log (at_ms, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
                    (now, actor, "canary.promote", name, json.dumps({"merged": n, "merge": merge})))
        out["merged"] = n
        return result

    store.commit(build)
    return out


class CanaryTables(SnapshotReads):
    """The canaries, their readings and comparison, for the API and the CLI (changes audited)."""

    SQLITE_DDL = SQLITE_DDL + _PRODUCTS_SQLITE_DDL + _REGISTRY_SQLITE_DDL
    PG_DDL = PG_DDL + _PRODUCTS_PG_DDL + _REGISTRY_PG_DDL
    APP_NAME = "fieldmesh-canaries"
    WHAT = "canaries"

    def canaries(self) -> list[dict[str, Any]]:
        """Every canary, by name, with its state and readings held."""
        rows = self._fetch("SELECT c.name, c.body, c.state, c.created_ms, c.updated_ms, c.updated_by, c.merged,"
                           " (SELECT count(*) FROM canary_readings r WHERE r.canary = c.name)"
                           " FROM canaries c ORDER BY c.name")
        return [_row(r) for r in rows]

    def canary(self, name: str) -> dict[str, Any]:
        """One canary (NotFoundError when there is none), with its devices seen on the canary side."""
        rows = self._fetch("SELECT c.name, c.body, c.state, c.created_ms, c.updated_ms, c.updated_by, c.merged,"
                           " (SELECT count(*) FROM canary_readings r WHERE r.canary = c.name)"
                           " FROM canaries c WHERE c.name = ?", (name,))
        if not rows:
            raise NotFoundError(f"no canary {name!r}", kind="canary", key=name)
        out = _row(rows[0])
        out["devices_seen"] = [d for (d,) in self._fetch(
            "SELECT DISTINCT device_id FROM canary_readings WHERE canary = ? ORDER BY device_id LIMIT 1000", (name,))]
        return out

    def create(self, canary: Canary, *, actor: str) -> dict[str, Any]:
        """Declare an active canary (ConflictError when the name is taken, NotFoundError without its product);
        processors route from their next batch."""
        body = json.dumps(canary.as_dict(), sort_keys=True)
        now = _now()
        with self._tx() as con:
            tx = _Con(con, self._pg)
            if not tx.execute("SELECT 1 FROM products WHERE name = ?", (canary.product,)):
                raise NotFoundError(f"no data product {canary.product!r} for canary {canary.name!r}",
                                    kind="product", key=canary.product)
            if tx.execute("SELECT 1 FROM canaries WHERE name = ?", (canary.name,)):
                raise ConflictError(f"canary {canary.name!r} exists (DELETE it first once promoted or aborted)",
                                    kind="canary", key=canary.name)
            tx.execute("INSERT INTO canaries (name, body, state, created_ms, updated_ms, updated_by, merged)"
                       " VALUES (?, ?, 'active', ?, ?, ?, 0)", (canary.name, body, now, now, actor))
            tx.execute("UPDATE canaries_version SET version = version + 1 WHERE id = 1")
            self._audit(con, actor, "canary.create", canary.name, canary.as_dict())
        return self.canary(canary.name)

    def apply(self, canaries: Sequence[Canary], *, actor: str) -> dict[str, int]:
        """Declare the canaries of a file: new names created, existing ones left as they are (a canary is not
        changed in flight: abort it and declare another)."""
        counts = {"created": 0, "unchanged": 0}
        have = {c["name"] for c in self.canaries()}
        for c in canaries:
            if c.name in have:
                counts["unchanged"] += 1
            else:
                self.create(c, actor=actor)
                counts["created"] += 1
        return counts

    def abort(self, name: str, *, actor: str) -> dict[str, Any]:
        """Stop routing to an active canary; its readings stay in ``canary_readings`` for inspection."""
        with self._tx() as con:
            tx = _Con(con, self._pg)
            tx.execute("UPDATE canaries_version SET version = version + 1 WHERE id = 1")
            row = tx.execute("SELECT state FROM canaries WHERE name = ?", (name,))
            if not row:
                raise NotFoundError(f"no canary {name!r}", kind="canary", key=name)
            if row[0][0] != "active":
                raise ConflictError(f"canary {name!r} is {row[0][0]}, not active", kind="canary", key=name)
            tx.execute("UPDATE canaries SET state = 'aborted', updated_ms = ?, updated_by = ? WHERE name = ?",
                       (_now(), actor, name))
            self._audit(con, actor, "canary.abort", name, {})
        return self.canary(name)

    def delete(self, name: str, *, actor: str) -> dict[str, Any]:
        """Remove a promoted or aborted canary with its readings and counters (ConflictError while active);
        answers what it was, with the readings dropped."""
        gone = self.canary(name)
        if gone["state"] == "active":
            raise ConflictError(f"canary {name!r} is active: promote or abort it first", kind="canary", key=name)
        with self._tx() as con:
            tx = _Con(con, self._pg)
            tx.execute("DELETE FROM canaries WHERE name = ?", (name,))
            tx.execute("DELETE FROM canary_readings WHERE canary = ?", (name,))
            tx.execute("DELETE FROM canary_stats WHERE canary = ?", (name,))
            for table in ("product_windows", "product_devices", "product_seq"):
                tx.execute(f"DELETE FROM {table} WHERE product IN (?, ?)", (f"{name}@canary", f"{name}@baseline"))
            tx.execute("UPDATE canaries_version SET version = version + 1 WHERE id = 1")
            self._audit(con, actor, "canary.delete", name, {"readings_dropped": gone["readings"]})
        return gone

    def readings(self, name: str, *, limit: int = 100) -> list[dict[str, Any]]:
        """The canary's readings held (newest event time first), as the readings API shows them."""
        self.canary(name)
        rows = self._fetch("SELECT id, body, stored_ms FROM canary_readings WHERE canary = ?"
                           " ORDER BY ts_ms DESC, id LIMIT ?", (name, limit))
        out = []
        for (k, _, stored), r in zip(rows, readings_of([(k, b) for k, b, _ in rows]), strict=True):
            out.append({"id": int(k), "device_id": r.device_id, "ts_ms": r.ts_ms, "seq": r.seq, "boot_id": r.boot_id,
                        "measurements": r.measurements, "meta": r.meta, "received_ms": r.received_ms,
                        "stored_ms": int(stored)})
        return out

    def compare(self, name: str, *, windows: int = 60, now_ms: int | None = None) -> dict[str, Any]:
        """The canary against its baseline: quality window by window (:func:`fieldmesh.stream.quality.compare`),
        both sides' counts, dead-letter rates and latency, and the verdict (:func:`fieldmesh.stream.canary.verdict`)."""
        from fieldmesh.stream.canary import verdict

        info = self.canary(name)
        canary = parse_canary(_declared(info))
        now = _now() if now_ms is None else now_ms
        with self._snapshot() as tx:
            _, products = load_products(tx)
            product = next((p for p in products if p.name == canary.product), None)
            if product is None:
                raise NotFoundError(f"no data product {canary.product!r} for canary {name!r}",
                                    kind="product", key=canary.product)
            side, base = canary_products(canary, product)
            qs = {p.name: quality_of(tx, p, now_ms=now, windows=windows) for p in (side, base)}
            raw = {p.name: {int(s): json.loads(b) for s, b in tx.execute(
                "SELECT window_start_ms, body FROM product_windows WHERE product = ? AND window_start_ms >= ?",
                (p.name, min((w["start_ms"] for w in qs[p.name]["windows"]), default=0)))} for p in (side, base)}
            stats = _stats(tx, name)
        q = compare(side, raw[side.name], qs[side.name], raw[base.name], qs[base.name])
        v, reasons = verdict(canary, q, stats)
        return {"canary": name, "product": canary.product, "state": info["state"], "verdict": v, "reasons": reasons,
                "counts": stats, "quality": {"canary": _brief(qs[side.name]), "baseline": _brief(qs[base.name])},
                "windows": q["windows"]}


def _brief(q: Mapping[str, Any]) -> dict[str, Any]:
    return {"current": q["current"], "slo_ok": q["slo_ok"], "sequence": q["sequence"]}


def _declared(info: Mapping[str, Any]) -> dict[str, Any]:
    return {k: info[k] for k in ("name", "product", "description", "devices", "share_percent", "meta", "thresholds")}


def _row(r: Sequence[Any]) -> dict[str, Any]:
    return {**json.loads(r[1]), "state": r[2], "created_ms": int(r[3]), "updated_ms": int(r[4]), "updated_by": r[5],
            "merged": int(r[6]), "readings": int(r[7])}

