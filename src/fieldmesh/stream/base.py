"""The stream contract: what the processing core decides for a batch of bus records, with no I/O.

Two engines implement it alike: :mod:`fieldmesh.stream.reference` (plain per-reading Python, the
oracle the other is tested against) and :mod:`fieldmesh.stream.columnar` (numpy over columns, the hot
path). A store is reached only through ``claim``: the hot store's transaction answers, per identity
key, whether it is new (:data:`~fieldmesh.core.batch.CLAIMED`), stored already
(:data:`~fieldmesh.core.batch.DUPLICATE`) or held by another reading
(:data:`~fieldmesh.core.batch.COLLISION`).

Per batch:

1. :func:`decode` turns bus records into columns, an origin per reading (the record it came in), the
   positions covered, and dead letters (DLQ records, and records that do not decode).
2. :func:`decide` assigns lateness from per-device event-time watermarks (a reading is late when its
   device's watermark minus ``grace_ms`` had passed the end of its 1-minute window; duplicates advance
   watermarks too), then calls :func:`settle`.
3. :func:`settle` de-duplicates (first occurrence in the batch, then ``claim``; a collision probes the
   next keys, the same algorithm for every store), and computes exact window deltas per interval and
   per-device deltas of the new readings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.batch import BatchResult, Position, ReadingColumns
from fieldmesh.core.model import DeadLetter

__all__ = ["Claim", "DecodedBatch", "EnrichFn", "StreamEngine", "StreamState"]

Claim = Callable[[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]], NDArray[np.int8]]
"""``claim(keys, chks, origins)``: per key CLAIMED | DUPLICATE | COLLISION (keys distinct within a call)."""

EnrichFn = Callable[[ReadingColumns], NDArray[np.object_]]
"""Per row: the enrichment dict, or None."""


@dataclass(frozen=True, slots=True)
class StreamState:
    """What the processor knows before a batch: applied positions, partition and device watermarks."""

    positions: Mapping[Position, int]
    watermarks: Mapping[Position, int]
    device_watermarks: Mapping[str, int]


@dataclass(frozen=True, slots=True, eq=False)
class DecodedBatch:
    """Bus records as columns, records already applied (offset <= state's position) left out."""

    cols: ReadingColumns
    origin: NDArray[np.int64]  # per row: origin_of(offset, partition) of its record
    row_position: NDArray[np.int32]  # per row: index into ``reading_positions`` of its (topic, partition)
    reading_positions: tuple[Position, ...]  # positions of reading records in this batch
    positions: Mapping[Position, int]  # last offset covered per (topic, partition): readings, DLQ, corrupt
    dead_letters: tuple[DeadLetter, ...]
    corrupt: int
    skipped: int  # records at or below the state's positions


class StreamEngine(Protocol):
    """A module implementing the stream contract (``reference`` or ``columnar``)."""

    def decode(self, records: Sequence[BusRecord], state: StreamState) -> DecodedBatch: ...

    def decide(
        self,
        batch: DecodedBatch,
        state: StreamState,
        claim: Claim,
        *,
        grace_ms: int,
        intervals: Mapping[str, int],
        enrich: EnrichFn | None = None,
    ) -> BatchResult: ...

    def settle(
        self,
        cols: ReadingColumns,
        late: NDArray[np.bool_],
        origin: NDArray[np.int64],
        claim: Claim,
        *,
        intervals: Mapping[str, int],
        dead_letters: Sequence[DeadLetter] = (),
        positions: Mapping[Position, int] | None = None,
        watermarks: Mapping[Position, int] | None = None,
        device_watermarks: Mapping[str, int] | None = None,
        corrupt: int = 0,
    ) -> BatchResult: ...
