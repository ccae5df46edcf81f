"""Feature rows for offline tests: a stream with late and duplicated readings, the rows a stream computes
from it (windows.py, one arrival at a time so each row's known_at is the arrival that emitted it), the
``features`` Iceberg table of the spec, and an independent oracle of what was known at a time.

The oracle re-derives everything from the raw arrivals in plain Python (Fractions for means): which windows
were final at ``ts`` (the device's newest event time minus the lateness had reached their end), from which
readings (those that arrived up to the one that made the window final), and when (that arrival's time).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from fieldmesh.core.batch import ReadingColumns
from fieldmesh.core.model import Reading
from fieldmesh.stream.pointintime import FeatureRows
from fieldmesh.stream.windows import Hopping, WindowOperator

AGG_OF = {"mean": "avg", "min": "min", "max": "max", "stddev": "stddev", "count": "count", "last": "last"}


def size_label(ms: int) -> str:
    for unit, n in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms % n == 0:
            return f"{ms // n}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True)
class View:
    name: str
    metrics: tuple[str, ...]
    sizes_ms: tuple[int, ...]
    hop_ms: int
    aggs: tuple[str, ...]
    ttl_ms: int
    lateness_ms: int = 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f"{m}__{a}__{size_label(s)}" for m in self.metrics for a in self.aggs for s in self.sizes_ms)


def make_stream(seed: int, *, devices: int = 5, minutes: int = 120, every_s: int = 15, late: float = 0.05,
                dup: float = 0.05, t0: int = 1_767_225_600_000) -> list[Reading]:
    """Readings in arrival order: mostly on time (received a few hundred ms after ts), ``late`` of them held
    back minutes, ``dup`` of them sent twice (the copy arrives later)."""
    rnd = random.Random(seed)
    sent: list[tuple[int, int, Reading]] = []
    key = 1
    for d in range(devices):
        for i in range(minutes * 60 // every_s):
            ts = t0 + i * every_s * 1000 + rnd.randrange(0, 5000)
            delay = rnd.randrange(50, 900)
            if rnd.random() < late:
                delay += rnd.randrange(60_000, 600_000)
            m = {"temperature": round(rnd.gauss(60, 5), 3), "pressure": round(rnd.gauss(2, 0.3), 4)}
            r = Reading(f"dev-{d}", ts, m, key=key, chk=key, received_ms=ts + delay)
            key += 1
            sent.append((ts + delay, key, r))
            if rnd.random() < dup:
                again = ts + delay + rnd.randrange(1000, 300_000)
                sent.append((again, key, Reading(r.device_id, ts, m, key=r.key, chk=r.chk, received_ms=again)))
    sent.sort(key=lambda x: (x[0], x[1]))
    return [r for _, _, r in sent]


def stream_rows(view: View, arrivals: list[Reading]) -> FeatureRows:
    """The feature rows a stream computes (duplicates dropped first), each arrival processed alone."""
    ops = [WindowOperator(Hopping(s, view.hop_ms), [AGG_OF[a] for a in view.aggs],
                          allowed_lateness_ms=view.lateness_ms) for s in view.sizes_ms]
    seen: set[int] = set()
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    names = view.names
    for r in arrivals:
        if r.key in seen:
            continue
        seen.add(r.key)
        cols = ReadingColumns.from_readings([Reading(r.device_id, r.ts_ms, {m: r.measurements[m] for m in
                                                                              view.metrics}, r.key, r.chk,
                                                     received_ms=r.received_ms)])
        for size, op in zip(view.sizes_ms, ops, strict=True):
            for w in op.process(cols).rows():
                row = rows.setdefault((w["device"], w["end_ms"]), {"known_at": r.received_ms, "values": {}})
                for a in view.aggs:
                    row["values"][f"{w['metric']}__{a}__{size_label(size)}"] = float(w[AGG_OF[a]])
    keys = sorted(rows, key=lambda k: (k[1], k[0]))
    n = len(keys)
    values = np.full((n, len(names)), np.nan)
    present = np.zeros((n, len(names)), bool)
    for i, k in enumerate(keys):
        for name, v in rows[k]["values"].items():
            j = names.index(name)
            values[i, j] = v
            present[i, j] = True
    return FeatureRows(view.name, np.array([k[0] for k in keys], dtype=object),
                       np.array([k[1] for k in keys], np.int64),
                       np.array([rows[k]["known_at"] for k in keys], np.int64), np.zeros(n, np.int64), names,
                       values, present)


def features_table(catalog: Any, namespace: str) -> Any:
    """The spec's ``<namespace>.features`` table (created if absent)."""
    from pyiceberg.partitioning import PartitionField, PartitionSpec
    from pyiceberg.schema import Schema
    from pyiceberg.transforms import DayTransform
    from pyiceberg.types import DoubleType, LongType, MapType, NestedField, StringType, TimestamptzType

    schema = Schema(
        NestedField(1, "view", StringType(), required=True),
        NestedField(2, "entity", StringType(), required=True),
        NestedField(3, "window_start", TimestamptzType(), required=True),
        NestedField(4, "window_end", TimestamptzType(), required=True),
        NestedField(5, "known_at", TimestamptzType(), required=True),
        NestedField(6, "version", LongType(), required=True),
        NestedField(7, "values", MapType(8, StringType(), 9, DoubleType(), value_required=False), required=True),
    )
    catalog.create_namespace_if_not_exists(namespace)
    return catalog.create_table_if_not_exists(
        f"{namespace}.features", schema, partition_spec=PartitionSpec(PartitionField(4, 1000, DayTransform(), "day")))


def append_rows(table: Any, rows: FeatureRows, window_ms: int) -> None:
    """Append ``rows`` to the features table (arrow columns cast to the table's schema)."""
    from fieldmesh.store.offline import feature_rows_arrow

    data = feature_rows_arrow(rows, window_ms=window_ms)
    table.append(data.cast(table.schema().as_arrow()))


# ---- the oracle ---------------------------------------------------------------------------------------


def _std(xs: list[float]) -> float:
    n = len(xs)
    fr = [Fraction(x) for x in xs]
    mean = sum(fr, Fraction(0)) / n
    return math.sqrt(float(sum(((x - mean) ** 2 for x in fr), Fraction(0)) / n))


def oracle_known(view: View, arrivals: list[Reading], entity: str, ts: int) -> dict[str, Any] | None:
    """What was known at ``ts`` for ``entity``, from the raw arrivals alone: ``{"window_end", "known_at",
    "expired", "values"}`` or None."""
    seen: set[int] = set()
    mine: list[Reading] = []
    for r in arrivals:
        if r.received_ms > ts:
            break
        if r.key in seen:
            continue
        seen.add(r.key)
        if r.device_id == entity:
            mine.append(r)
    if not mine:
        return None
    # the arrival index at which each window end became final: running newest ts - lateness reaches it
    newest = -(2**62)
    final_at: list[int] = []  # per arrival, the watermark after it
    for r in mine:
        newest = max(newest, r.ts_ms)
        final_at.append(newest - view.lateness_ms)
    hop = view.hop_ms
    best: dict[str, Any] | None = None
    # candidate ends: every hop multiple up to the last watermark, newest first; the first with a reading wins
    end = final_at[-1] // hop * hop
    lowest = min(r.ts_ms for r in mine) // hop * hop
    while end > lowest - max(view.sizes_ms):
        idx = next(i for i, w in enumerate(final_at) if w >= end)  # the arrival that made `end` final
        values: dict[str, float] = {}
        for size in view.sizes_ms:
            # readings that arrived before the window was emitted (a late one after it is not in it)
            inside = [(r.ts_ms, r) for r in mine[:idx + 1] if end - size <= r.ts_ms < end]
            # ...and that were not already too late when they arrived: a reading misses windows emitted before
            inside = [(t, r) for t, r in inside if not _missed(mine, final_at, r, end)]
            if not inside:
                continue
            for m in view.metrics:
                xs = [r.measurements[m] for _, r in inside]
                last = max((t, float(r.measurements[m])) for t, r in inside)[1]
                agg = {"mean": float(sum(map(Fraction, xs), Fraction(0)) / len(xs)), "min": min(xs), "max": max(xs),
                       "stddev": _std([float(x) for x in xs]), "count": float(len(xs)), "last": last}
                for a in view.aggs:
                    values[f"{m}__{a}__{size_label(size)}"] = float(agg[a])
        if values:
            known = mine[idx].received_ms
            best = {"window_end": end, "known_at": known, "expired": ts - known > view.ttl_ms, "values": values}
            break
        end -= hop
    return best


def _missed(mine: list[Reading], final_at: list[int], r: Reading, end: int) -> bool:
    """Whether ``r`` arrived after the window ending at ``end`` was final (the watermark before it >= end)."""
    i = next(j for j, x in enumerate(mine) if x is r)
    return i > 0 and final_at[i - 1] >= end
