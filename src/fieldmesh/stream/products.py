"""The processor's data-product stage: quality counters added inside each batch's transaction.

:class:`ProductEngine` joins :mod:`fieldmesh.stream.quality` (what a batch adds to a product's quality) with
:mod:`fieldmesh.store.products` (where products and counters are kept). Per batch, inside the hot store's
transaction (:meth:`in_txn`), the products' version is read (a change reloads them in that transaction),
and the batch's decoded and new readings are counted into each product's windows. The counters commit
with the batch and its bus positions, or not at all; nothing is kept in memory between batches but the
product declarations.

It also routes the active canaries (:mod:`fieldmesh.stream.canary`): :meth:`route` splits a batch between
the main path and the canaries in the same transaction, and :meth:`in_txn` then counts the main products
over the main path's readings only, each canary's two sides, and writes the canary readings.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from fieldmesh.core.batch import ReadingColumns
from fieldmesh.obs.metrics import CANARY_READINGS
from fieldmesh.store.base import HotStore, SqlTxn
from fieldmesh.store.canary import canaries_version, load_canaries, write_parts
from fieldmesh.store.canary import ensure_tables as ensure_canary_tables
from fieldmesh.store.products import apply_batch, device_groups, ensure_tables, load_products, products_version
from fieldmesh.stream.base import DecodedBatch, StreamState
from fieldmesh.stream.canary import CanaryRouter, Decide, Routed, canary_products
from fieldmesh.stream.quality import Product

__all__ = ["ProductEngine", "ProductStats"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ProductStats:
    """In-process counters of one processor's product stage."""

    products: int = 0
    version: int = -1
    windows_touched: int = 0
    canaries: int = 0
    canary_stored: int = 0  # readings routed to a canary and stored there (committed)


class ProductEngine:
    """Counts data-product quality for a :class:`~fieldmesh.stream.processor.Processor`."""

    def __init__(self, store: HotStore) -> None:
        self.store = store
        store.transact(ensure_tables)
        store.transact(ensure_canary_tables)
        self._version = -1
        self._canary_version = -1
        self._products: list[Product] = []
        self._router = CanaryRouter()
        self._pending: dict[str, int] = {}  # canary readings stored by the open transaction
        self._lock = threading.Lock()
        self.stats = ProductStats()

    @property
    def products(self) -> list[Product]:
        """The products in force (as of the last transaction that read them)."""
        with self._lock:
            return list(self._products)

    def _refresh(self, tx: SqlTxn) -> None:
        changed = False
        if products_version(tx) != self._version:
            version, products = load_products(tx)
            with self._lock:
                self._version, self._products = version, products
            self.stats.products, self.stats.version = len(products), version
            log.info("data products: %d (version %d)", len(products), version)
            changed = True
        cv = canaries_version(tx, lock=False)
        if cv != self._canary_version or changed:
            self._load_canaries(tx, cv)
        if self._router.canaries:  # routing: this batch is ordered with promotions and aborts (PostgreSQL)
            locked = canaries_version(tx)
            if locked != cv:
                self._load_canaries(tx, locked)

    def _load_canaries(self, tx: SqlTxn, version: int) -> None:
        self._router = CanaryRouter(load_canaries(tx, self._products))
        self._canary_version = version
        self.stats.canaries = len(self._router.canaries)
        log.info("canaries routing: %s (version %d)", [c.name for c, _ in self._router.canaries] or "none", version)

    def _groups(self, tx: SqlTxn, *cols: ReadingColumns) -> dict[str, list[str]]:
        return device_groups(tx, sorted({d for c in cols for d in c.devices})) if self._router.needs_groups() else {}

    def route(self, batch: DecodedBatch, state: StreamState, txn: Any, decide: Decide) -> Routed:
        """Decide ``batch`` in its open transaction ``txn``, the active canaries' readings apart
        (:meth:`~fieldmesh.stream.canary.CanaryRouter.route`); their readings are written to their tables here."""
        self._refresh(txn)
        self._pending = {}
        if not self._router.canaries:
            return Routed(decide(batch, state, txn), batch.cols)
        groups = self._groups(txn, batch.cols)
        routed = self._router.route(batch, state, txn, decide, groups)
        self._pending = write_parts(txn, routed, self._router, groups)
        return routed

    def in_txn(self, tx: SqlTxn, received: ReadingColumns | Routed, new: ReadingColumns | None = None) -> int:
        """Count a batch in its open transaction ``tx``: ``received`` (decoded readings) and ``new`` (stored
        now), or what :meth:`route` answered (main products over the main path, each canary's two sides);
        the windows touched (pass it to :meth:`committed` once the transaction commits)."""
        self._refresh(tx)
        if not isinstance(received, Routed):
            assert new is not None
            return apply_batch(tx, self._products, received, new)
        routed = received
        touched = apply_batch(tx, self._products, routed.received, routed.result.new)
        for c, p in self._router.canaries:
            side, base = canary_products(c, p)
            touched += apply_batch(tx, [base], routed.received, routed.result.new)
            for part in routed.parts:
                if part.canary.name == c.name:
                    touched += apply_batch(tx, [side], part.received, part.result.new)
        return touched

    def committed(self, touched: int) -> None:
        """The transaction that touched ``touched`` windows committed."""
        self.stats.windows_touched += touched
        for name, n in self._pending.items():
            self.stats.canary_stored += n
            if n:
                CANARY_READINGS.labels(name).inc(n)
        self._pending = {}
