"""Data products and their quality counters, in the hot store (SQLite or PostgreSQL alike).

Tables of their own, created on demand:

- ``products``: one row per product (its JSON, where it came from: ``api`` or ``file:<path>``), and
  ``products_version``: a counter bumped by every change, so processors poll one row.
- ``product_windows``: per (product, event-time window) the quality counters of
  :func:`fieldmesh.stream.quality.batch_deltas` as JSON, added to in each batch's transaction.
- ``product_devices``: per (product, device) its first and last event time (completeness expects a
  device from its first reading on).
- ``product_seq``: per (product, device, boot) ``[min_seq, max_seq, n]`` of the product's new readings
  (sequence gaps: ``max - min + 1 - n``).

The processor writes the counters **in the batch's transaction** (:func:`apply_batch` through
:class:`~fieldmesh.store.base.SqlTxn`), so they are exactly as durable as the batch's bus positions: a
redelivered batch whose positions are stored is skipped before it is counted, a batch rolled back
counts nothing. The API and the CLI read and change products through :class:`ProductTables`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.batch import ReadingColumns
from fieldmesh.core.errors import BackendError, ConflictError, NotFoundError
from fieldmesh.store.access import HotTables
from fieldmesh.store.alerts import _Con
from fieldmesh.store.base import SqlTxn
from fieldmesh.store.registry import _PG_DDL as _REGISTRY_PG_DDL
from fieldmesh.store.registry import _SQLITE_DDL as _REGISTRY_SQLITE_DDL
from fieldmesh.store.seqgaps import seq_batch
from fieldmesh.stream.quality import Product, batch_deltas, compare, merge_counts, parse_product, readout

__all__ = ["ProductTables", "apply_batch", "ensure_tables", "load_products", "products_version"]

#: Windows kept per product beyond its baseline (a day of 1-minute windows by default).
RETAIN_WINDOWS: Final = 1440

_COMMON_DDL: Final = (
    "CREATE TABLE IF NOT EXISTS products (name TEXT PRIMARY KEY, body TEXT NOT NULL, source TEXT NOT NULL,"
    " updated_ms {int} NOT NULL, updated_by TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS products_version (id INTEGER PRIMARY KEY CHECK (id = 1), version {int} NOT NULL)",
    "INSERT INTO products_version (id, version) VALUES (1, 0) ON CONFLICT DO NOTHING",
    "CREATE TABLE IF NOT EXISTS product_windows (product TEXT NOT NULL, window_start_ms {int} NOT NULL,"
    " body TEXT NOT NULL, PRIMARY KEY (product, window_start_ms))",
    "CREATE TABLE IF NOT EXISTS product_devices (product TEXT NOT NULL, device_id TEXT NOT NULL,"
    " first_ts_ms {int} NOT NULL, last_ts_ms {int} NOT NULL, PRIMARY KEY (product, device_id))",
    "CREATE TABLE IF NOT EXISTS product_seq (product TEXT NOT NULL, device_id TEXT NOT NULL, boot_id TEXT NOT NULL,"
    " min_seq {int} NOT NULL, max_seq {int} NOT NULL, n {int} NOT NULL, PRIMARY KEY (product, device_id, boot_id))",
)
SQLITE_DDL: Final = tuple(s.format(int="INTEGER") for s in _COMMON_DDL)
PG_DDL: Final = tuple(s.format(int="BIGINT") for s in _COMMON_DDL)


def _now() -> int:
    return int(time.time() * 1000)


def ensure_tables(tx: SqlTxn) -> None:
    """Create the product tables (and the registry's, read for group selectors) where missing."""
    ddl = SQLITE_DDL + _REGISTRY_SQLITE_DDL if tx.dialect == "sqlite" else PG_DDL + _REGISTRY_PG_DDL
    if tx.dialect != "sqlite":
        tx.execute("SELECT pg_advisory_xact_lock(hashtext('fieldmesh-products'))")
    for stmt in ddl:
        tx.execute(stmt)


def products_version(tx: SqlTxn) -> int:
    """The products' version counter (bumped by every change)."""
    rows = tx.execute("SELECT version FROM products_version WHERE id = 1")
    return int(rows[0][0]) if rows else 0


def load_products(tx: SqlTxn) -> tuple[int, list[Product]]:
    """(version, products) read in one transaction; a stored product that no longer parses is skipped."""
    version = products_version(tx)
    out = []
    for (body,) in tx.execute("SELECT body FROM products ORDER BY name"):
        try:
            out.append(parse_product(json.loads(body)))
        except Exception:
            continue
    return version, out


def _in(tx: SqlTxn, column: str, values: Sequence[str]) -> tuple[str, tuple[Any, ...]]:
    if tx.dialect == "sqlite":
        return f"{column} IN (SELECT value FROM json_each(?))", (json.dumps(list(values)),)
    return f"{column} = ANY(?)", (list(values),)


def device_groups(tx: SqlTxn, devices: Sequence[str]) -> dict[str, list[str]]:
    """The registry groups of ``devices`` (devices in none are left out)."""
    if not devices:
        return {}
    cond, params = _in(tx, "device_id", devices)
    out: dict[str, list[str]] = {}
    for group, dev in tx.execute(f"SELECT group_name, device_id FROM device_registry_groups WHERE {cond}", params):
        out.setdefault(dev, []).append(group)
    return out


def apply_batch(tx: SqlTxn, products: Sequence[Product], received: ReadingColumns, new: ReadingColumns) -> int:
    """Add a batch's quality counters to every product's rows in the open transaction; windows touched.

    ``received``: the batch's decoded readings (duplicates included); ``new``: those stored now."""
    if not products or not len(received):
        return 0
    devs = sorted({*received.devices, *new.devices})
    groups = device_groups(tx, devs) if any(p.devices.groups for p in products) else {}
    touched = 0
    for product in products:
        def member(names: Sequence[str], product: Product = product) -> NDArray[np.bool_]:
            return np.fromiter((product.devices.matches(d, groups.get(d, ())) for d in names), bool, len(names))

        m_new = member(new.devices)
        deltas = batch_deltas(product, received, new, member(received.devices), m_new)
        if not deltas:
            continue
        touched += len(deltas)
        _add_windows(tx, product, deltas)
        rows = np.flatnonzero(m_new[new.device]) if len(new) and len(m_new) else np.empty(0, np.intp)
        if len(rows):
            mine = new.take(rows)
            _add_devices(tx, product.name, mine)
            _add_seq(tx, product.name, mine)
    return touched


def _add_windows(tx: SqlTxn, product: Product, deltas: Mapping[int, Mapping[str, Any]]) -> None:
    starts = sorted(deltas)
    have = {int(s): json.loads(b) for s, b in tx.execute(
        "SELECT window_start_ms, body FROM product_windows WHERE product = ? AND window_start_ms >= ?"
        " AND window_start_ms <= ?", (product.name, starts[0], starts[-1])) if int(s) in deltas}
    tx.executemany(
        "INSERT INTO product_windows (product, window_start_ms, body) VALUES (?, ?, ?)"
        " ON CONFLICT (product, window_start_ms) DO UPDATE SET body = excluded.body",
        [(product.name, s, json.dumps(merge_counts(have[s], deltas[s]) if s in have else deltas[s],
                                      sort_keys=True)) for s in starts])
    # bounded: the baseline windows and the newest RETAIN_WINDOWS stay
    newest = tx.execute("SELECT max(window_start_ms) FROM product_windows WHERE product = ?", (product.name,))
    cutoff = int(newest[0][0]) - RETAIN_WINDOWS * product.window_ms
    tx.execute(
        "DELETE FROM product_windows WHERE product = ? AND window_start_ms < ? AND window_start_ms NOT IN"
        " (SELECT window_start_ms FROM product_windows WHERE product = ? ORDER BY window_start_ms LIMIT ?)",
        (product.name, cutoff, product.name, product.baseline_windows))


def _add_devices(tx: SqlTxn, name: str, new: ReadingColumns) -> None:
    first = np.full(len(new.devices), np.iinfo(np.int64).max, dtype=np.int64)
    last = np.full(len(new.devices), np.iinfo(np.int64).min, dtype=np.int64)
    np.minimum.at(first, new.device, new.ts_ms)
    np.maximum.at(last, new.device, new.ts_ms)
    lo, hi = ("min", "max") if tx.dialect == "sqlite" else ("LEAST", "GREATEST")
    tx.executemany(
        "INSERT INTO product_devices (product, device_id, first_ts_ms, last_ts_ms) VALUES (?, ?, ?, ?)"
        f" ON CONFLICT (product, device_id) DO UPDATE SET first_ts_ms = {lo}(product_devices.first_ts_ms,"
        f" excluded.first_ts_ms), last_ts_ms = {hi}(product_devices.last_ts_ms, excluded.last_ts_ms)",
        [(name, d, int(f), int(la)) for d, f, la in zip(new.devices, first.tolist(), last.tolist(), strict=True)
         if f <= la])


def _add_seq(tx: SqlTxn, name: str, new: ReadingColumns) -> None:
    spans = seq_batch(new).spans
    if not spans:
        return
    lo, hi = ("min", "max") if tx.dialect == "sqlite" else ("LEAST", "GREATEST")
    tx.executemany(
        "INSERT INTO product_seq (product, device_id, boot_id, min_seq, max_seq, n) VALUES (?, ?, ?, ?, ?, ?)"
        f" ON CONFLICT (product, device_id, boot_id) DO UPDATE SET min_seq = {lo}(product_seq.min_seq,"
        f" excluded.min_seq), max_seq = {hi}(product_seq.max_seq, excluded.max_seq), n = product_seq.n + excluded.n",
        [(name, d, b, s[0], s[1], s[2]) for (d, b), s in spans.items()])


def quality_of(tx: SqlTxn, product: Product, *, now_ms: int | None = None, windows: int = 60) -> dict[str, Any]:
    """The quality readout (:func:`fieldmesh.stream.quality.readout`) of ``product``: its baseline windows
    and its newest ``windows`` windows."""
    name = product.name
    rows = tx.execute(
        "SELECT window_start_ms, body FROM (SELECT window_start_ms, body FROM product_windows WHERE product = ?"
        " ORDER BY window_start_ms DESC LIMIT ?) AS w ORDER BY window_start_ms", (name, windows))
    base = tx.execute("SELECT window_start_ms, body FROM product_windows WHERE product = ?"
                      " ORDER BY window_start_ms LIMIT ?", (name, product.baseline_windows))
    got = {int(s): json.loads(b) for s, b in [*base, *rows]}
    firsts = {d: int(f) for d, f in tx.execute(
        "SELECT device_id, first_ts_ms FROM product_devices WHERE product = ?", (name,))}
    seq = [(int(a), int(b), int(n)) for a, b, n in tx.execute(
        "SELECT min_seq, max_seq, n FROM product_seq WHERE product = ?", (name,))]
    out = readout(product, sorted(got.items()), firsts, seq, now_ms=_now() if now_ms is None else now_ms)
    shown = {int(s) for s, _ in rows}
    out["windows"] = [w for w in out["windows"] if w["start_ms"] in shown]
    return out


class SnapshotReads(HotTables):
    """Tables read in one consistent view while the processor writes (products, canaries)."""

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[SqlTxn]:
        """A read-only transaction: one consistent view, without taking SQLite's write lock (the processor's)."""
        with self._lock:
            self._reconnect_if_lost()
            try:
                if self._pg:
                    with self._con.transaction():
                        yield _Con(self._con, True)
                    return
                self._con.execute("BEGIN")  # deferred: a reader in WAL mode never waits for the writer
                try:
                    yield _Con(self._con, False)
                finally:
                    self._con.execute("ROLLBACK")
            except self._db_errors as exc:
                raise BackendError(f"{self.WHAT} unavailable: {exc}") from exc


class ProductTables(SnapshotReads):
    """The product catalog and its quality, for the API, the CLI and ``up --products`` (changes audited)."""

    SQLITE_DDL = SQLITE_DDL + _REGISTRY_SQLITE_DDL
    PG_DDL = PG_DDL + _REGISTRY_PG_DDL
    APP_NAME = "fieldmesh-products"
    WHAT = "data products"

    def products(self) -> list[dict[str, Any]]:
        """Every product, by name, with where it came from and when it changed."""
        rows = self._fetch("SELECT name, body, source, updated_ms, updated_by FROM products ORDER BY name")
        return [_row(r) for r in rows]

    def product(self, name: str) -> dict[str, Any]:
        """One product; NotFoundError when there is none."""
        rows = self._fetch("SELECT name, body, source, updated_ms, updated_by FROM products WHERE name = ?", (name,))
        if not rows:
            raise NotFoundError(f"no data product {name!r}", kind="product", key=name)
        return _row(rows[0])

    def put(self, product: Product, *, actor: str, create: bool | None = None, source: str = "api"
            ) -> dict[str, Any]:
        """Store ``product``: ``create`` True refuses an existing name (ConflictError), False a missing one
        (NotFoundError), None takes either. Processors apply it from their next batch."""
        body = json.dumps(product.as_dict(), sort_keys=True)
        with self._tx() as con:
            tx = _Con(con, self._pg)
            exists = bool(tx.execute("SELECT 1 FROM products WHERE name = ?", (product.name,)))
            if create is True and exists:
                raise ConflictError(f"data product {product.name!r} exists: PUT /products/{product.name} changes it",
                                    kind="product", key=product.name)
            if create is False and not exists:
                raise NotFoundError(f"no data product {product.name!r}", kind="product", key=product.name)
            self._put(tx, product, body, source, actor)
            self._audit(con, actor, "product.update" if exists else "product.create", product.name,
                        {"source": source})
        return self.product(product.name)

    def _put(self, tx: SqlTxn, product: Product, body: str, source: str, actor: str) -> None:
        tx.execute("INSERT INTO products (name, body, source, updated_ms, updated_by) VALUES (?, ?, ?, ?, ?)"
                   " ON CONFLICT (name) DO UPDATE SET body = excluded.body, source = excluded.source,"
                   " updated_ms = excluded.updated_ms, updated_by = excluded.updated_by",
                   (product.name, body, source, _now(), actor))
        tx.execute("UPDATE products_version SET version = version + 1 WHERE id = 1")

    def delete(self, name: str, *, actor: str) -> dict[str, Any]:
        """Remove a product and its quality counters; answers what it was."""
        gone = self.product(name)
        with self._tx() as con:
            tx = _Con(con, self._pg)
            for table in ("products", "product_windows", "product_devices", "product_seq"):
                col = "name" if table == "products" else "product"
                tx.execute(f"DELETE FROM {table} WHERE {col} = ?", (name,))
            tx.execute("UPDATE products_version SET version = version + 1 WHERE id = 1")
            self._audit(con, actor, "product.delete", name, {})
        return gone

    def apply(self, products: Sequence[Product], *, actor: str, source: str) -> dict[str, int]:
        """Store every product of a file (created or changed; those unchanged are left as they are)."""
        counts = {"created": 0, "updated": 0, "unchanged": 0}
        with self._tx() as con:
            tx = _Con(con, self._pg)
            for p in products:
                body = json.dumps(p.as_dict(), sort_keys=True)
                rows = tx.execute("SELECT body FROM products WHERE name = ?", (p.name,))
                if rows and rows[0][0] == body:
                    counts["unchanged"] += 1
                    continue
                self._put(tx, p, body, source, actor)
                counts["updated" if rows else "created"] += 1
                self._audit(con, actor, "product.update" if rows else "product.create", p.name, {"source": source})
        return counts

    def quality(self, name: str, *, windows: int = 60, now_ms: int | None = None) -> dict[str, Any]:
        """The quality of one product (NotFoundError when there is none)."""
        product = parse_product({k: v for k, v in self.product(name).items()
                                 if k not in ("source", "updated_ms", "updated_by")})
        with self._snapshot() as tx:
            return quality_of(tx, product, now_ms=now_ms, windows=windows)

    def compare(self, canary: str, control: str, *, windows: int = 60, now_ms: int | None = None) -> dict[str, Any]:
        """A canary product's quality against its control's (:func:`fieldmesh.stream.quality.compare`)."""
        prods = {n: parse_product({k: v for k, v in self.product(n).items()
                                   if k not in ("source", "updated_ms", "updated_by")}) for n in (canary, control)}
        now = _now() if now_ms is None else now_ms
        with self._snapshot() as tx:
            qs = {n: quality_of(tx, p, now_ms=now, windows=windows) for n, p in prods.items()}
            raw = {n: {int(s): json.loads(b) for s, b in tx.execute(
                "SELECT window_start_ms, body FROM product_windows WHERE product = ? AND window_start_ms >= ?",
                (n, min((w["start_ms"] for w in qs[n]["windows"]), default=0)))} for n in prods}
        return compare(prods[canary], raw[canary], qs[canary], raw[control], qs[control])

    def all_quality(self, *, windows: int = 2) -> list[dict[str, Any]]:
        """The quality of every product (for metrics: the newest windows only)."""
        with self._snapshot() as tx:
            _, products = load_products(tx)
            return [quality_of(tx, p, windows=windows) for p in products]


def _row(r: Sequence[Any]) -> dict[str, Any]:
    return {**json.loads(r[1]), "source": r[2], "updated_ms": int(r[3]), "updated_by": r[4]}
