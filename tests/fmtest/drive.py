"""Drive a hot store as the processor does: the reference engine decides, the store commits.

The store suites call these instead of the removed per-reading ``store.apply``. Every decision (first
occurrence, claims, the collision probe, lateness, windows) is :mod:`fieldmesh.stream.reference`'s;
the store only answers claims and writes the result, in one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.batch import BatchResult, Position, ReadingColumns
from fieldmesh.core.model import DeadLetter, Reading
from fieldmesh.store.base import INTERVALS, HotStore
from fieldmesh.stream import reference
from fieldmesh.stream.base import StreamState

__all__ = ["Committed", "commit_readings", "commit_records", "state_of"]


@dataclass(frozen=True, slots=True)
class Committed:
    """What one commit did, in the counters' terms, and the result itself."""

    stored: int
    duplicates: int
    late: int
    dead_lettered: int
    result: BatchResult


def _committed(res: BatchResult) -> Committed:
    c = res.counts
    return Committed(c.get("stored", 0), c.get("duplicates", 0), c.get("late", 0), len(res.dead_letters), res)


def state_of(store: HotStore) -> StreamState:
    """What a processor starting on ``store`` knows: applied positions, partition and device watermarks."""
    return StreamState(store.positions(), store.watermarks(), store.device_watermarks())


def commit_readings(
    store: HotStore,
    readings: Sequence[Reading],
    *,
    late: Sequence[bool] | None = None,
    origins: Sequence[int] | None = None,
    dead_letters: Sequence[DeadLetter] = (),
    positions: Mapping[Position, int] | None = None,
    watermarks: Mapping[Position, int] | None = None,
) -> Committed:
    """Decide ``readings`` against ``store`` (:func:`reference.settle`: lateness as given, default none;
    ``origins`` default -1, no origin) and commit them in one transaction."""
    cols = ReadingColumns.from_readings(readings)
    origin = np.array(origins if origins is not None else [-1] * len(readings), dtype=np.int64)
    late_ = np.array(late if late is not None else [False] * len(readings), dtype=np.bool_)
    res = store.commit(
        lambda txn: reference.settle(
            cols, late_, origin, txn.claim_keys, intervals=INTERVALS, dead_letters=dead_letters, positions=positions,
            watermarks=watermarks,
        ),
        ts_ms=cols.ts_ms,
    )  # fmt: skip
    return _committed(res)


def commit_records(store: HotStore, records: Sequence[BusRecord], *, grace_ms: int = 0) -> BatchResult | None:
    """Bus records through ``reference.decode`` / ``decide`` and one :meth:`~HotStore.commit`, the state
    read from the store (a processor restarting before every batch). None: every record was applied."""
    state = state_of(store)
    batch = reference.decode(records, state)
    if not batch.positions:
        return None
    return store.commit(
        lambda txn: reference.decide(batch, state, txn.claim_keys, grace_ms=grace_ms, intervals=INTERVALS),
        ts_ms=batch.cols.ts_ms,
    )
