"""The hot-store contract.

A hot store keeps raw readings (de-duplicated by identity), 1-minute and 1-hour rollups, the dead
letters, counters, and the bus positions each processor applied. :meth:`HotStore.commit` writes all
of that for one batch in **one transaction**, the stream core's decision (which claims identity keys
through :class:`HotTxn`) included: a crash before its commit leaves nothing of the batch, claims
included, a crash after it leaves all of it, and the stored positions say which bus records are in.
Every hot store is also a :class:`Sink`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.batch import BatchResult, Position

__all__ = [
    "INTERVALS", "ApplyResult", "DeviceSummary", "HotStore", "HotTxn", "Position", "QueryResult", "Sink", "SqlTxn",
    "StoreStats", "T",
]

T = TypeVar("T")

#: Rollup intervals and their lengths in ms.
INTERVALS: Final = {"1m": 60_000, "1h": 3_600_000}



@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What one batch did, in counts (``Processor.apply_records``)."""

    stored: int
    duplicates: int
    late: int
    dead_lettered: int


@dataclass(frozen=True, slots=True)
class QueryResult:
    """Rows of a read-only SQL query."""

    columns: list[str]
    rows: list[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Durable counters: ``received == stored + duplicates + sum(dead_lettered)``.

    ``gaps`` is not part of that sum: it counts seqs missing upstream of fieldmesh, summed over
    devices and boots (:mod:`fieldmesh.store.seqgaps`), and falls again when late readings fill them.
    """

    stored: int = 0
    duplicates: int = 0
    late: int = 0
    dead_lettered: Mapping[str, int] = field(default_factory=dict)
    gaps: int = 0

    @property
    def received(self) -> int:
        """Every reading or payload that reached the pipeline."""
        return self.stored + self.duplicates + sum(self.dead_lettered.values())

    @property
    def unrouted(self) -> int:
        """Messages on topics no stage serves (dead-lettered as ``unknown_topic``)."""
        return self.dead_lettered.get("unknown_topic", 0)


@dataclass(frozen=True, slots=True)
class DeviceSummary:
    """How many devices the store knows and when it last heard from any (``/stats``, ``up``'s summary)."""

    devices: int
    last_seen_ms: int | None


class Sink(Protocol):
    """Makes each committed :class:`~fieldmesh.core.batch.BatchResult` durable somewhere.

    A sink records the result's ``positions`` in the same commit as its data, so a result whose every
    position is at or below :meth:`applied` is skipped: redelivery after a crash between a commit and
    the bus acknowledgement changes nothing.
    """

    name: str

    def applied(self) -> dict[Position, int]: ...

    def write(self, result: BatchResult) -> bool:
        """Make ``result`` durable; False when skipped (every position <= :meth:`applied`)."""
        ...

    def close(self) -> None: ...


class SqlTxn(Protocol):
    """Statements in an open hot-store transaction, for the store's own table modules (``store/alerts.py``).

    Statements use ``?`` placeholders on every backend; ``dialect`` is ``sqlite`` or ``postgresql``.
    """

    dialect: str

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement; its rows (none for a statement without result)."""
        ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...


class HotTxn(SqlTxn, Protocol):
    """The hot store's side of one transaction, as the stream core sees it (plus :class:`SqlTxn` for the
    store's table modules that commit with the batch, e.g. alert state)."""

    def claim_keys(
        self, keys: NDArray[np.int64], chks: NDArray[np.int64], origins: NDArray[np.int64]
    ) -> NDArray[np.int8]:
        """Insert absent keys; per key CLAIMED | DUPLICATE | COLLISION (:mod:`fieldmesh.core.batch`).

        A key stored by the same origin answers CLAIMED again, so a replay decides exactly as before;
        origin -1 never matches. Keys are distinct within a call.
        """
        ...


class HotStore(Sink, Protocol):
    """Raw readings, rollups, dead letters and positions, written one transaction per batch.

    The hot store is the sink that claims identity keys: :meth:`commit` runs the stream core's
    decision (``build``) inside its transaction, so claims and data commit together. Its
    :meth:`~Sink.write` takes a result decided elsewhere only when every key it stores is new here.
    """

    url: str

    def commit(
        self, build: Callable[[HotTxn], BatchResult], *, ts_ms: NDArray[np.int64] | None = None
    ) -> BatchResult:
        """One transaction: ``build(txn)`` claims keys and returns the result; the store appends the raw rows
        of ``result.new`` under ``result.store_key``, merges the window deltas, devices, dead letters, counters
        (plus seq gaps), positions and watermarks, then commits. An exception inside ``build`` or later leaves
        nothing, claims included. ``ts_ms`` (the batch's event times) lets a store prepare partitions first;
        PostgreSQL reruns ``build`` after a deadlock or serialization failure, so ``build`` must not keep
        state between calls.
        """
        ...

    def transact(self, fn: Callable[[SqlTxn], T]) -> T:
        """``fn`` in a write transaction of its own on the writer's connection (serialised with :meth:`commit`),
        committed when it returns, rolled back when it raises."""
        ...

    def flush(self) -> bool:
        """Write what the store defers past a batch's commit (SQLite: rollup rows, kept up to a second in memory
        and read from the segments meanwhile); True if it wrote anything. The processor calls it when idle."""
        ...

    def device_watermarks(self) -> dict[str, int]:
        """Per device, the latest event time stored: where lateness resumes after a restart."""
        ...

    def device_summary(self) -> DeviceSummary: ...

    def last_seen(self) -> dict[str, int]:
        """Per device, when its last reading was received (wall-clock ms): the freshness metrics."""
        ...

    def positions(self) -> dict[Position, int]: ...

    def watermarks(self) -> dict[Position, int]: ...

    def stats(self) -> StoreStats: ...

    def devices(self, device_id: str | None = None) -> list[dict[str, Any]]:
        """Known devices (rows of ``GET /devices``), each with its ``gaps`` summed over its boots."""
        ...

    def raw(
        self, *, device_id: str | None, metric: str | None, start_ms: int | None, end_ms: int | None, limit: int
    ) -> list[dict[str, Any]]: ...

    def rollups(
        self,
        *,
        interval: str,
        device_id: str | None,
        metric: str | None,
        start_ms: int | None,
        end_ms: int | None,
        limit: int,
    ) -> list[dict[str, Any]]: ...

    def dlq(self, *, reason: str | None, limit: int) -> list[dict[str, Any]]: ...

    def query(self, sql: str, params: Sequence[Any] = ()) -> QueryResult: ...

    def close(self) -> None: ...
