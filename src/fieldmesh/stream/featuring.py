"""The processor's feature stage: a :class:`~fieldmesh.store.base.Sink` that turns committed batches into
feature rows (:class:`~fieldmesh.stream.features.FeatureEngine`) and makes them durable.

Per batch result: the engine computes the rows the batch made final and one hot-store transaction appends
them to ``feature_rows`` (with the last window end per (view, entity) in ``feature_last``). Every
``checkpoint_s`` (and at a clean stop) that transaction also replaces the engine's snapshot and records
the bus positions it covers (:class:`~fieldmesh.store.features.FeatureTables`): a snapshot is the whole
window state (megabytes for a thousand devices with hour windows), too much to write per batch.

After a kill -9 the stage restores the last snapshot and reports its positions as :meth:`applied`, so the
processor hands it the records since then again (its catch-up of a sink that is behind). The engine
recomputes the same rows (they do not depend on batching); those already committed are exactly those at or
before the last committed window end of their (view, entity) (a row's window end only grows), and are
not written again. A commit that fails is tried again, with the rows it computed, when the batch comes
again. So no row is lost or written twice.

Then the rows go to the online store. That write is idempotent (only a newer (window_end, version)
replaces a value); a failure is counted and logged and the rows are tried again with the next batch; at a
start the rows still within their TTL are put again (a crash between the commit and the online write).
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
                 partitions: Sequence[int] | None = None, checkpoint_s: float = 10.0) -> None:
        self.store = store
        # replicas owning partitions of their own keep their own window state (a device is on one partition)
        self.shard = "all" if partitions is None else ",".join(map(str, sorted(partitions)))
        self.views = list(views)
        self.online = online
        self.checkpoint_s = checkpoint_s
        self.engine = FeatureEngine(self.views)
        self.stats = FeatureStats()
        self._pending: dict[tuple[str, str], FeatureRow] = {}

        def load(tx: SqlTxn) -> tuple[bytes | None, dict[str, int], dict[Position, int], dict[tuple[str, str], int]]:
            FeatureTables.ensure(tx)
            snap, counts = FeatureTables.state(tx, self.shard)
            return snap, counts, FeatureTables.positions(tx), FeatureTables.last_ends(tx)

        snap, counts, self._applied, self._last_end = store.transact(load)
        self._processed = dict(self._applied)  # what the engine took in: ahead of _applied between checkpoints
        self._mine: set[Position] = set()  # the partitions this stage took batches of (its checkpoint's)
        self._unsaved: list[FeatureRow] | None = None  # rows computed whose commit failed (tried again first)
        self._checkpointed: float | None = None
        self._failures_before = counts["online_failures"]
        if snap is not None:
            self.engine.restore(snap)
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
        """The positions of the last checkpoint: a restart resumes the window state there."""
        return dict(self._applied)

    def write(self, result: BatchResult) -> bool:
        """Compute and commit the rows of ``result``; False when its positions were taken in already."""
        if self._unsaved is not None:  # the batch whose commit failed, come again: commit what it computed
            self._commit(self._unsaved)
        if all(o <= self._processed.get(p, -1) for p, o in result.positions.items()):
            return False
        rows = self.engine.process(result.new)
        for p, o in result.positions.items():
            self._processed[p] = max(o, self._processed.get(p, -1))
            self._mine.add(p)
        # after a restart the engine recomputes the rows since its checkpoint: those committed already are
        # the ones at or before the last window end committed per (view, entity) (ends only grow)
        fresh = [r for r in rows if r.window_end_ms > self._last_end.get((r.view, r.entity), -1)]
        self._unsaved = fresh
        self._commit(fresh)
        return True

    def _commit(self, rows: list[FeatureRow]) -> None:
        eng = self.engine
        now = time.monotonic()
        checkpoint = self._checkpointed is None or now - self._checkpointed >= self.checkpoint_s
        snap = eng.snapshot() if checkpoint else None
        counts = {"rows": eng.rows, "late": eng.late, "unkeyed": eng.unkeyed,
                  "online_failures": self._failures_before + self.stats.online_failures}
        positions = {p: self._processed[p] for p in self._mine} if checkpoint else None
        self.store.transact(lambda tx: FeatureTables.commit(tx, rows, snap, counts, positions, self.shard))
        self._unsaved = None
        if positions is not None:
            self._applied.update(positions)
            self._checkpointed = now
        for r in rows:
            key = (r.view, r.entity)
            self._last_end[key] = max(r.window_end_ms, self._last_end.get(key, -1))
        self.stats.rows_written += len(rows)
        self._to_online(rows)

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
        """A last checkpoint (a clean stop replays nothing), then the online store is closed."""
        try:
            if self._unsaved is None and self._processed != self._applied:
                self._checkpointed = None
                self._commit([])
        finally:
            if self.online is not None:
                self.online.close()
