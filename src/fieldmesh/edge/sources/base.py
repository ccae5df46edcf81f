"""The source plugin protocol: something that yields batches of readings and is told when they are safe."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["Source", "SourceBatch"]


@dataclass(slots=True)
class SourceBatch:
    """Readings from a source: one row per reading, one float column per metric (NaN = absent).

    ``seq`` and ``boot_id`` are the source's own identity when it has one (the simulator's tick
    numbers, a device's MQTT ``seq``); else the agent numbers readings per device. A ``seq`` of -1
    marks a row without one; ``boot_ids`` gives per-row boot ids (None: the reading has none).
    """

    device_ids: list[str]
    ts_ms: npt.NDArray[np.int64]
    cols: dict[str, npt.NDArray[np.float64]]
    seq: npt.NDArray[np.int64] | None = None
    boot_id: str | None = None
    boot_ids: list[str | None] | None = None
    token: Any = None
    labels: npt.NDArray[np.int8] | None = field(default=None)

    def __len__(self) -> int:
        return len(self.device_ids)


@runtime_checkable
class Source(Protocol):
    """A source of readings.

    ``batches()`` yields batches; the agent calls ``ack(batch)`` only once the batch is durable in
    the buffer (the source may then advance its own position, acknowledge its broker, etc.).

    A replayable source may also offer ``position_after(batch)`` and ``restore(position)``: the
    agent then keeps that position in its window checkpoint, atomically with the open windows, and
    restores it at start (so a window never counts a replayed reading twice).
    """

    name: str

    def batches(self) -> AsyncIterator[SourceBatch]:
        """Yield batches until the source ends or is closed."""
        ...

    async def ack(self, batch: SourceBatch) -> None:
        """The batch is durable in the buffer."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
