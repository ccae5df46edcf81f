"""Wire and value types of the hot path (msgspec structs, frozen)."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["BusBatch", "DeadLetter", "Reading"]


class Reading(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One validated reading, as it travels on the bus.

    ``key`` and ``chk`` are the two halves of the 128-bit identity digest
    (see :mod:`fieldmesh.core.identity`): ``key`` is the store's primary key and
    ``chk`` tells a true duplicate from a (astronomically rare) key collision.
    """

    device_id: str
    ts_ms: int
    measurements: dict[str, float | bool]
    key: int
    chk: int
    seq: int | None = None
    boot_id: str | None = None
    event_id: str | None = None
    meta: dict[str, Any] | None = None
    received_ms: int = 0
    #: Fields joined from enterprise state (CDC) as of the reading's event time.
    enrichment: dict[str, Any] | None = None


class BusBatch(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """Many readings of one partition in one bus message (the bus carries batches, not readings)."""

    readings: list[Reading]
    produced_ms: int = 0


class DeadLetter(msgspec.Struct, frozen=True, gc=False):
    """A rejected payload or reading: what went wrong, and what arrived."""

    reason: str
    detail: str
    topic: str
    received_ms: int
    payload: bytes
    device_id: str | None = None
    truncated: bool = False
