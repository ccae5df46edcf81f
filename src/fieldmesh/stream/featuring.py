"""The processor's feature stage: a :class:`~fieldmesh.store.base.Sink` that turns committed batches into
feature rows (:class:`~fieldmesh.stream.features.FeatureEngine`) and makes them durable.

Per batch result: the engine computes the rows the batch made final; one hot-store transaction appends
them to ``feature_rows``, replaces the engine's snapshot and records the batch's bus positions
(:class:`~fieldmesh.store.features.FeatureTables`). So after a kill -9 the stage restores the
snapshot of exactly the positions its rows cover, and the processor re-decides and hands it the records
after them (its catch-up of a sink that is behind): no row is lost or written twice. Only then are the
rows put to the online store; that write is idempotent (only a newer (window_end, version) replaces a
value), a failure is counted and logged and the rows are tried again with the next batch, and at a start
the rows still within their TTL are put again (a crash between the commit and the online write).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from fieldmesh.core.batch import BatchResult, Position
from fieldmesh.store.base import HotStore, SqlTxn
from fieldmesh.store.features import FeatureTables, OnlineStore
from fieldmesh.stream.features import FeatureEngine
from fieldmesh.stream.featureviews import FeatureRow, FeatureView

__all__ = ["FeatureStage", "FeatureStats"]

log = logging.getLogger(__name__)

_PENDING_MAX = 100_000  # rows held for an online store that is down (the newest per key are kept)


@dataclass(slots=True)
class FeatureStats:
    """In-process counters of the feature stage (durable ones are in ``feature_state``)."""

    rows_written: int = 0  # feature rows committed to feature_rows by this process
    online_written: int = 0  # rows the online store took (newer than what it had)
    online_failures: int = 0  # online writes that failed (rows kept and tried again)
    online_pending: int = 0  # rows waiting for the online store


class FeatureStage:
    """Feature rows for ``views`` from every committed batch (module docstring)."""

    name = "features"

    def __init__(self, *, store: HotStore, views: Sequence[FeatureView], online: OnlineStore | None,
                 partitions: Sequence[int] | None = None) -> None:
        self.store = store
        # replicas owning partitions of their own keep their own window state (a device is on one partition)
        self.shard = "all" if partitions is None else ",".join(map(str, sorted(partitions)))
        self.views = list(views)
        self.online = online
        self.engine = FeatureEngine(self.views)
        self.stats = FeatureStats()
        self._pending: dict[tuple[str, str], FeatureRow] = {}

        def load(tx: SqlTxn) -> tuple[bytes | None, dict[str, int], dict[Position, int]]:
            FeatureTables.ensure(tx)
            snap, counts = FeatureTables.state(tx, self.shard)
            return snap, counts, FeatureTables.positions(tx)

        snap, counts, self._applied = store.transact(load)
        self._failures_before = counts["online_failures"]
        if snap is not None:
            self.engine.restore(snap)
        self._committed = self.engine.snapshot()
        if online is not None:
            self._resync()

    def _resync(self) -> None:
        ttl = max(v.ttl_ms for v in self.views)
        since = int(time.time() * 1000) - ttl
        rows = self.store.transact(lambda tx: FeatureTables.recent(tx, since))
        self._to_online(rows)
        if rows:
            log.info("features: %d rows within their TTL put again to the online store %s", len(rows),
                     self.online.url if self.online else "-")

    def applied(self) -> dict[Position, int]:
        return dict(self._applied)

    def write(self, result: BatchResult) -> bool:
        """Compute and commit the rows of ``result``; False when its positions were applied already."""
        if all(o <= self._applied.get(p, -1) for p, o in result.positions.items()):
            return False
        eng = self.engine
        try:
            rows = eng.process(result.new)
            snap = eng.snapshot()
            counts = {"rows": eng.rows, "late": eng.late, "unkeyed": eng.unkeyed,
                      "online_failures": self._failures_before + self.stats.online_failures}
            positions = {p: o for p, o in result.positions.items() if o > self._applied.get(p, -1)}
            self.store.transact(lambda tx: FeatureTables.commit(tx, rows, snap, counts, positions, self.shard))
        except BaseException:
            # not committed: back to the state the stored positions cover (the batch comes again)
            self.engine = FeatureEngine(self.views)
            self.engine.restore(self._committed)
            raise
        self._committed = snap
        self._applied.update(positions)
        self.stats.rows_written += len(rows)
        self._to_online(rows)
        return True

    def _to_online(self, rows: Sequence[FeatureRow]) -> None:
        if self.online is None:
            return
        for r in rows:
            cur = self._pending.get((r.view, r.entity))
            if cur is None or (r.window_end_ms, r.version) > (cur.window_end_ms, cur.version):
                self._pending[(r.view, r.entity)] = r
        if not self._pending:
            return
        todo = list(self._pending.values())
        try:
            self.stats.online_written += self.online.put(todo)
            self._pending.clear()
        except Exception as exc:
            self.stats.online_failures += 1
            if len(self._pending) > _PENDING_MAX:  # the feature_rows table still has them (resynced at a start)
                for k in list(self._pending)[: len(self._pending) - _PENDING_MAX]:
                    del self._pending[k]
            log.warning("features: online store write failed (%s: %s); %d rows kept for the next try",
                        type(exc).__name__, exc, len(self._pending))
        self.stats.online_pending = len(self._pending)

    def close(self) -> None:
        if self.online is not None:
            self.online.close()
