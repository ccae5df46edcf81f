"""Columnar batches of readings, the unit every edge stage works on, and the wire shapes they become."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = ["DeviceIndex", "Frame", "WireBatch", "WireReading", "occurrence_groups"]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]
I32 = npt.NDArray[np.int32]


class WireReading(msgspec.Struct, omit_defaults=True, gc=False):
    """One reading inside a batch, in the docs/contract.md JSON shape (device id is the batch's)."""

    ts: int
    measurements: dict[str, float]
    seq: int | None = None
    boot_id: str | None = None
    event_id: str | None = None
    meta: dict[str, Any] | None = None


class WireBatch(msgspec.Struct, gc=False):
    """The contract's batch shape: ``{"device_id": ..., "readings": [...]}``."""

    device_id: str
    readings: list[WireReading]


class DeviceIndex:
    """Device id <-> dense integer index, so per-device state lives in numpy arrays."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self._idx: dict[str, int] = {}
        self._listeners: list[Any] = []

    def __len__(self) -> int:
        return len(self.ids)

    def on_new(self, fn: Any) -> None:
        """Call ``fn(index, device_id)`` for each device registered from now on."""
        self._listeners.append(fn)

    def index(self, device_id: str) -> int:
        """The index of a device, registering it on first sight."""
        i = self._idx.get(device_id)
        if i is None:
            i = len(self.ids)
            self.ids.append(device_id)
            self._idx[device_id] = i
            for fn in self._listeners:
                fn(i, device_id)
        return i

    def indices(self, device_ids: list[str]) -> I32:
        """Indices of many devices."""
        get = self._idx.get
        out = [get(d) for d in device_ids]
        if None in out:
            out = [self.index(d) for d in device_ids]
        return np.asarray(out, dtype=np.int32)


@dataclass(slots=True)
class Frame:
    """Rows of readings: device index, event time, sequence, and one float column per metric.

    A NaN in a metric column means the reading does not carry that metric (absent, out of range, or
    suppressed by the deadband).
    """

    dev: I32
    ts_ms: I64
    seq: I64
    cols: dict[str, F64]
    boot_id: str
    #: per-row boot ids (None entries: no boot id) when rows differ; else ``boot_id`` for all
    boot_ids: npt.NDArray[np.object_] | None = None
    score: F64 | None = None
    anomaly: npt.NDArray[np.bool_] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.dev.shape[0])

    def take(self, rows: npt.NDArray[Any]) -> Frame:
        """A frame of the selected rows (index array or boolean mask)."""
        return Frame(
            dev=self.dev[rows],
            ts_ms=self.ts_ms[rows],
            seq=self.seq[rows],
            cols={k: v[rows] for k, v in self.cols.items()},
            boot_id=self.boot_id,
            boot_ids=None if self.boot_ids is None else self.boot_ids[rows],
            score=None if self.score is None else self.score[rows],
            anomaly=None if self.anomaly is None else self.anomaly[rows],
            meta=self.meta,
        )


def occurrence_groups(dev: I32) -> list[npt.NDArray[np.intp]]:
    """Split rows into groups where each device appears at most once, keeping per-device order.

    Group ``k`` holds every device's ``k``-th row, so stateful stages can update per-device state
    with one vectorised step per group (a simulator tick is a single group).
    """
    n = dev.shape[0]
    if n == 0:
        return []
    if np.unique(dev).shape[0] == n:
        return [np.arange(n)]
    order = np.argsort(dev, kind="stable")
    sd = dev[order]
    starts = np.r_[0, np.flatnonzero(sd[1:] != sd[:-1]) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, n]))
    rank = np.empty(n, dtype=np.intp)
    rank[order] = np.arange(n) - first
    # rows of each rank, in row order (so per-device order is row order)
    by_rank = np.argsort(rank, kind="stable")
    counts = np.bincount(rank)
    return list(np.split(by_rank, np.cumsum(counts)[:-1]))
