"""Write-side shapes shared by the hot stores: a decided batch (:class:`~fieldmesh.core.batch.BatchResult`)
as the columns and accumulators each store writes, and the claim answers both stores give.

The stores keep their own SQL; these functions turn columns into Python values with one ``tolist``
per column (C loops), so no Python code runs per reading on the write path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import msgspec
import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.batch import (
    CLAIMED,
    COLLISION,
    DUPLICATE,
    BatchResult,
    DeviceDeltas,
    Position,
    ReadingColumns,
    WindowDeltas,
)
from fieldmesh.core.errors import FieldmeshError
from fieldmesh.store.base import HotTxn
from fieldmesh.store.rollup import Acc, RollupKey

__all__ = ["StaleResult", "answers", "device_aggs", "raw_columns", "window_accs", "write_via_commit"]

_enc = msgspec.json.Encoder()
_NO_ORIGIN: Final = -1


class StaleResult(FieldmeshError):
    """A result given to a hot store's ``write`` claims keys the store holds already."""


def _json_or_none(col: NDArray[np.object_] | None, n: int) -> list[str | None]:
    if col is None:
        return [None] * n
    return [None if v is None else _enc.encode(v).decode() for v in col.tolist()]


def raw_columns(new: ReadingColumns, store_key: NDArray[np.int64], now_ms: int) -> list[list[Any]]:
    """Columns of the ``readings`` rows: id, device_id, ts_ms, seq, boot_id, event_id, measurements, meta,
    received_ms, stored_ms, enrichment. ``measurements`` is the precomputed JSON; meta and enrichment
    (rare) are encoded here."""
    n = len(new)
    seq: NDArray[Any] = new.seq
    if n and seq.min() < 0:
        seq = seq.astype(object)
        seq[new.seq < 0] = None
    boot_of = np.empty(len(new.boots) + 1, dtype=object)
    boot_of[: len(new.boots)] = new.boots  # code -1 picks the trailing None
    dev_of = np.empty(len(new.devices), dtype=object)
    dev_of[:] = new.devices
    return [
        store_key.tolist(), dev_of[new.device].tolist(), new.ts_ms.tolist(), seq.tolist(), boot_of[new.boot].tolist(),
        [None] * n if new.event_id is None else new.event_id.tolist(), new.measurements_json.tolist(),
        _json_or_none(new.meta, n), new.received_ms.tolist(), [now_ms] * n, _json_or_none(new.enrichment, n),
    ]  # fmt: skip


def window_accs(wd: WindowDeltas) -> dict[RollupKey, Acc]:
    """The deltas of one interval as accumulators ``[count, m, e, min, max]`` (:mod:`fieldmesh.store.rollup`)."""
    return dict(zip(
        zip(wd.device.tolist(), wd.metric.tolist(), wd.window_start_ms.tolist(), strict=True),
        map(list, zip(wd.count.tolist(), wd.sum_m.tolist(), wd.sum_e.tolist(), wd.min.tolist(), wd.max.tolist(),
                      strict=True)),
        strict=True,
    ))  # fmt: skip


def device_aggs(dd: DeviceDeltas) -> dict[str, list[int]]:
    """Per device: ``[first_received_ms, last_received_ms, first_ts_ms, last_ts_ms, readings]``."""
    return dict(zip(
        dd.device.tolist(),
        map(list, zip(dd.first_received_ms.tolist(), dd.last_received_ms.tolist(), dd.first_ts_ms.tolist(),
                      dd.last_ts_ms.tolist(), dd.count.tolist(), strict=True)),
        strict=True,
    ))  # fmt: skip


def answers(
    chks: NDArray[np.int64], origins: NDArray[np.int64], stored_chk: NDArray[np.int64],
    stored_origin: NDArray[np.int64],
) -> NDArray[np.int8]:
    """Claim answers of keys found stored: COLLISION (other chk), CLAIMED again (same chk, same origin,
    not -1; a NULL stored origin is -1), else DUPLICATE."""
    out = np.full(len(chks), DUPLICATE, dtype=np.int8)
    out[(stored_origin == origins) & (origins != _NO_ORIGIN)] = CLAIMED
    out[stored_chk != chks] = COLLISION
    return out


class _Committer(Protocol):
    def commit(
        self, build: Callable[[HotTxn], BatchResult], *, ts_ms: NDArray[np.int64] | None = None
    ) -> BatchResult: ...


class _Skip(Exception):
    """Rolls a ``write`` back whose positions were all applied."""


def write_via_commit(
    store: _Committer, result: BatchResult, read_positions: Callable[[], Mapping[Position, int]]
) -> bool:
    """``Sink.write`` of a hot store: skip a result whose every position is applied, else claim its keys
    (no origin) and write it in one :meth:`commit`; a key held already raises :class:`StaleResult`.

    ``read_positions`` reads the positions inside the commit's transaction, so a concurrent writer
    cannot slip in between the check and the write. A result without positions is always written.
    """

    def build(txn: HotTxn) -> BatchResult:
        applied = read_positions()
        if result.positions and all(o <= applied.get(p, -1) for p, o in result.positions.items()):
            raise _Skip
        n = len(result.new)
        if n:
            got = txn.claim_keys(result.store_key, result.new.chk, np.full(n, _NO_ORIGIN, dtype=np.int64))
            held = int(np.count_nonzero(got != CLAIMED))
            if held:
                raise StaleResult(
                    f"{held} of the {n} readings of batch {result.batch_id} are stored here already: the result"
                    " was decided against another state; decide it again through commit()"
                )
        return result

    try:
        store.commit(build, ts_ms=result.new.ts_ms)
    except _Skip:
        return False
    return True
