"""The processor's data-product stage: quality counters added inside each batch's transaction.

:class:`ProductEngine` joins :mod:`fieldmesh.stream.quality` (what a batch adds to a product's quality) with
:mod:`fieldmesh.store.products` (where products and counters are kept). Per batch, inside the hot store's
transaction (:meth:`in_txn`), the products' version is read (a change reloads them in that transaction),
and the batch's decoded and new readings are counted into each product's windows. The counters commit
with the batch and its bus positions, or not at all; nothing is kept in memory between batches but the
product declarations.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from fieldmesh.core.batch import ReadingColumns
from fieldmesh.store.base import HotStore, SqlTxn
from fieldmesh.store.products import apply_batch, ensure_tables, load_products, products_version
from fieldmesh.stream.quality import Product

__all__ = ["ProductEngine", "ProductStats"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ProductStats:
    """In-process counters of one processor's product stage."""

    products: int = 0
    version: int = -1
    windows_touched: int = 0


class ProductEngine:
    """Counts data-product quality for a :class:`~fieldmesh.stream.processor.Processor`."""

    def __init__(self, store: HotStore) -> None:
        self.store = store
        store.transact(ensure_tables)
        self._version = -1
        self._products: list[Product] = []
        self._lock = threading.Lock()
        self.stats = ProductStats()

    @property
    def products(self) -> list[Product]:
        """The products in force (as of the last transaction that read them)."""
        with self._lock:
            return list(self._products)

    def _refresh(self, tx: SqlTxn) -> None:
        if products_version(tx) != self._version:
            version, products = load_products(tx)
            with self._lock:
                self._version, self._products = version, products
            self.stats.products, self.stats.version = len(products), version
            log.info("data products: %d (version %d)", len(products), version)

    def in_txn(self, tx: SqlTxn, received: ReadingColumns, new: ReadingColumns) -> int:
        """Count a batch (``received``: decoded readings, ``new``: stored now) in its open transaction ``tx``;
        the windows touched (pass it to :meth:`committed` once the transaction commits)."""
        self._refresh(tx)
        return apply_batch(tx, self._products, received, new)

    def committed(self, touched: int) -> None:
        """The transaction that touched ``touched`` windows committed."""
        self.stats.windows_touched += touched
