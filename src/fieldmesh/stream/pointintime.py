"""Point-in-time joins: feature rows and labels as they were known at a time (docs/features.md).

Pure numpy, no I/O: the offline store (:mod:`fieldmesh.store.featurelake`) reads the rows, this module
decides which one each training example sees.

**Features.** A feature row of a view is ``(entity, window_end, known_at, version, values)``. The value
known at ``ts`` for an entity is the row with the largest ``(window_end, version)`` among the entity's rows
with ``known_at <= ts``; it is expired (null) when ``ts - known_at > ttl``. ``known_at`` is the arrival time
of the reading that made the row final, so a row is never seen before the stream itself could have
computed it: late data and re-emitted windows never leak into an earlier time.

How, exactly and without a per-row loop: the rows are sorted by (entity, known_at); a running maximum of
each row's rank in (window_end, version) order, restarted per entity, gives for every prefix the row
that wins it; one ``searchsorted`` per query finds the prefix ``known_at <= ts``. Times are replaced by
their rank among the distinct known_at values first, so (entity, time) fits one int64 whatever the span.

**Labels.** Change events of a CDC table (e.g. maintenance records) are kept as
``(entity, commit time, value)``; the label of an example ``(entity, ts)`` comes from the events committed
in ``(ts, ts + horizon]``: the first one's value, the last one's, whether any, or how many.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

from fieldmesh.bus.base import BusRecord
from fieldmesh.cdc.base import decode_change_event

__all__ = ["LABEL_AGGS", "AsOfIndex", "FeatureRows", "LabelEvents", "LabelJoin", "as_of_features", "codes_of",
           "label_join"]

LabelAgg = Literal["first", "last", "any", "count"]
LABEL_AGGS: Final = ("first", "last", "any", "count")


@dataclass(frozen=True, slots=True, eq=False)
class FeatureRows:
    """The feature rows of one view, as columns.

    ``values[i, j]`` is feature ``names[j]`` of row ``i``; ``present[i, j]`` is False where the row has no
    such feature (a NaN in ``values`` with ``present`` True is a NaN the stream computed, e.g. a rate
    over one reading).
    """

    view: str
    entity: NDArray[np.object_]  # str
    window_end_ms: NDArray[np.int64]
    known_at_ms: NDArray[np.int64]
    version: NDArray[np.int64]
    names: tuple[str, ...]
    values: NDArray[np.float64]
    present: NDArray[np.bool_]

    def __post_init__(self) -> None:
        n = len(self.entity)
        if not (len(self.window_end_ms) == len(self.known_at_ms) == len(self.version) == n):
            raise ValueError("feature row columns differ in length")
        if self.values.shape != (n, len(self.names)) or self.present.shape != self.values.shape:
            raise ValueError(f"values must be {n} x {len(self.names)}")

    def __len__(self) -> int:
        return len(self.entity)

    def take(self, idx: NDArray[np.intp]) -> FeatureRows:
        """The rows at ``idx``."""
        return FeatureRows(self.view, self.entity[idx], self.window_end_ms[idx], self.known_at_ms[idx],
                           self.version[idx], self.names, self.values[idx], self.present[idx])

    @staticmethod
    def concat(view: str, parts: Sequence[FeatureRows]) -> FeatureRows:
        """One set of rows from several (their feature names united, in first-seen order)."""
        names: list[str] = []
        for p in parts:
            names += [x for x in p.names if x not in names]
        n = sum(len(p) for p in parts)
        values = np.full((n, len(names)), np.nan)
        present = np.zeros((n, len(names)), dtype=bool)
        at = 0
        for p in parts:
            cols = [names.index(x) for x in p.names]
            values[at:at + len(p), cols] = p.values
            present[at:at + len(p), cols] = p.present
            at += len(p)

        def cat(name: str, dtype: Any) -> Any:
            arrs = [getattr(p, name) for p in parts]
            return np.concatenate(arrs) if arrs else np.empty(0, dtype=dtype)

        return FeatureRows(view, cat("entity", object), cat("window_end_ms", np.int64), cat("known_at_ms", np.int64),
                           cat("version", np.int64), tuple(names), values, present)


def codes_of(values: Sequence[Any] | NDArray[Any], index: Mapping[Any, int]) -> NDArray[np.int64]:
    """``index[v]`` for each value, -1 where absent."""
    get = index.get
    return np.fromiter((get(v, -1) for v in values), dtype=np.int64, count=len(values))


class AsOfIndex:
    """The rows of one view arranged for point-in-time lookups (see the module docstring).

    Building it sorts the rows once (O(n log n)); each lookup is a binary search.
    """

    def __init__(self, rows: FeatureRows) -> None:
        self.rows = rows
        n = len(rows)
        codes: dict[str, int] = {}
        add = codes.setdefault
        g_row = np.fromiter((add(e, len(codes)) for e in rows.entity.tolist()), dtype=np.int64, count=n)
        self.entity_code = codes
        known = rows.known_at_ms
        # (entity, time) as one int64: the time itself when the span allows, else its rank among the times
        lo = int(known.min()) if n else 0
        span = (int(known.max()) - lo + 2) if n else 2
        if (len(codes) + 1) * span < 2**62:
            self._times: NDArray[np.int64] | None = None
            self._lo = lo
            t_row = known - lo + 1
        else:
            self._times = np.unique(known)
            span = len(self._times) + 1
            t_row = np.searchsorted(self._times, known).astype(np.int64) + 1
        self._span = span
        key = g_row * span + t_row
        order = np.argsort(key, kind="stable")
        self._key = key[order]
        g = g_row[order]
        # each row's rank in (window_end, version) order: unique, so the running max names one row
        vmax = int(rows.version.max()) + 1 if n else 1
        end = rows.window_end_ms
        if n and (int(end.max()) - int(end.min()) + 1) * vmax < 2**62:
            by_key = np.argsort((end - int(end.min())) * vmax + rows.version, kind="stable")
        else:
            by_key = np.lexsort((rows.version, end))
        rank = np.empty(n, dtype=np.int64)
        rank[by_key] = np.arange(n, dtype=np.int64)
        # groups ascend in ``order``: g * n + rank stays above every earlier group's values
        acc = np.maximum.accumulate(g * max(n, 1) + rank[order]) if n else np.empty(0, np.int64)
        self._best = by_key[acc - g * max(n, 1)]
        self._group = g

    def _time_key(self, ts_ms: NDArray[np.int64]) -> NDArray[np.int64]:
        """The time part of a query key: rows with known_at <= ts have a key part <= it."""
        if self._times is None:
            return np.clip(ts_ms - self._lo + 1, 0, self._span - 1)
        return np.searchsorted(self._times, ts_ms, side="right").astype(np.int64)

    def steps(self) -> NDArray[np.int64]:
        """The rows that became the entity's answer at their own ``known_at``, in (entity, known_at) order.

        Between two steps of an entity the answer does not change, so "the latest step with known_at <= ts"
        (what Feast's point-in-time join and a plain as-of join do) gives exactly :meth:`lookup`'s row.
        """
        key = self._key
        if not len(key):
            return np.empty(0, dtype=np.int64)
        last = np.ones(len(key), dtype=bool)  # the last position of each (entity, known_at) tie
        last[:-1] = key[1:] != key[:-1]
        pos = np.flatnonzero(last)
        best = self._best[pos]
        new = np.ones(len(pos), dtype=bool)
        same_group = self._group[pos[1:]] == self._group[pos[:-1]]
        new[1:] = ~same_group | (best[1:] != best[:-1])
        return best[new].astype(np.int64)

    def lookup(self, entity: Sequence[str] | NDArray[Any], ts_ms: NDArray[np.int64]) -> NDArray[np.int64]:
        """Per query, the row known at ``ts_ms`` for ``entity`` (ignoring the TTL), -1 if none."""
        code = codes_of(entity, self.entity_code)
        return self.lookup_codes(code, ts_ms)

    def lookup_codes(self, code: NDArray[np.int64], ts_ms: NDArray[np.int64]) -> NDArray[np.int64]:
        """:meth:`lookup` with entities given as codes of :attr:`entity_code` (-1: unknown)."""
        ts_ms = np.asarray(ts_ms, dtype=np.int64)
        code = np.asarray(code, dtype=np.int64)
        if not len(self._key):
            return np.full(len(code), -1, dtype=np.int64)
        q = code * self._span + self._time_key(ts_ms)
        order = np.argsort(q)  # sorted keys: each binary search starts where the previous one ended
        pos = np.empty(len(q), dtype=np.int64)
        pos[order] = np.searchsorted(self._key, q[order], side="right") - 1
        ok = (code >= 0) & (pos >= 0)
        pos = np.where(ok, pos, 0)
        ok &= self._group[pos] == code
        return np.where(ok, self._best[pos], -1).astype(np.int64)


@dataclass(frozen=True, slots=True, eq=False)
class AsOfFeatures:
    """What :func:`as_of_features` found per query: the row (or -1), its values and times."""

    row: NDArray[np.int64]  # -1: nothing known, or expired
    expired: NDArray[np.bool_]
    values: NDArray[np.float64]  # queries x features
    present: NDArray[np.bool_]  # False: null in the output
    window_end_ms: NDArray[np.int64]  # meaningful where row >= 0
    known_at_ms: NDArray[np.int64]


def as_of_features(index: AsOfIndex, entity: Sequence[str] | NDArray[Any] | None, ts_ms: NDArray[np.int64], *,
                   ttl_ms: int | None, codes: NDArray[np.int64] | None = None) -> AsOfFeatures:
    """The feature values of ``index``'s view known at each ``(entity, ts_ms)``, nulls where none or expired.

    ``codes``: the entities as codes of ``index.entity_code`` instead of ``entity`` (-1: unknown).
    """
    rows = index.rows
    ts_ms = np.asarray(ts_ms, dtype=np.int64)
    if codes is None:
        codes = codes_of(entity if entity is not None else [], index.entity_code)
    hit = index.lookup_codes(codes, ts_ms)
    found = hit >= 0
    safe = np.where(found, hit, 0)
    if not len(rows):
        z = np.zeros(len(ts_ms), dtype=np.int64)
        shape = (len(ts_ms), len(rows.names))
        return AsOfFeatures(np.full(len(ts_ms), -1, np.int64), np.zeros(len(ts_ms), bool), np.full(shape, np.nan),
                            np.zeros(shape, bool), z, z)
    known = rows.known_at_ms[safe]
    expired = found & (ts_ms - known > ttl_ms) if ttl_ms is not None else np.zeros(len(ts_ms), bool)
    live = found & ~expired
    values = rows.values[safe]
    present = rows.present[safe] & live[:, None]
    return AsOfFeatures(np.where(live, hit, -1), expired, values, present, rows.window_end_ms[safe], known)


# ---- labels ------------------------------------------------------------------------------------------


class LabelEvents:
    """Label events from a CDC table: per insert or update (and snapshot row), the row's entity, its commit
    time (``source.ts_ms``) and the label column's value. Feed it change events (a
    :class:`~fieldmesh.cdc.follow.ChangeApplier`); deletes and truncates add no label event.

    Snapshot rows (``op="r"``) are dated at the snapshot: their real commit time is unknown.
    """

    def __init__(self, *, entity_column: str, label_column: str, table: str | None = None) -> None:
        self.entity_column = entity_column
        self.label_column = label_column
        self.table = table
        self.entity: list[str] = []
        self.commit_ms: list[int] = []
        self.value: list[Any] = []
        self.skipped = 0  # events of other tables, deletes, rows without the entity column

    def __len__(self) -> int:
        return len(self.commit_ms)

    def add(self, entity: str, commit_ms: int, value: Any) -> None:
        """One label event."""
        self.entity.append(entity)
        self.commit_ms.append(commit_ms)
        self.value.append(value)

    def apply_change_events(self, records: Iterable[BusRecord]) -> int:
        """Keep the label events of bus records of a CDC topic; return how many records were change events.

        Raises:
            msgspec.DecodeError: a record is not a change event.
        """
        n = 0
        for r in records:
            ev = decode_change_event(r.value)
            if ev is None:
                continue
            n += 1
            after = ev.after
            if ev.op not in ("c", "u", "r") or after is None or (self.table and ev.table_id != self.table):
                self.skipped += 1
                continue
            ent = after.get(self.entity_column)
            if ent is None:
                self.skipped += 1
                continue
            self.add(str(ent), ev.source.ts_ms, after.get(self.label_column))
        return n


@dataclass(frozen=True, slots=True, eq=False)
class LabelJoin:
    """Per query: the label and the commit time of the event it came from (``-1``: none)."""

    value: list[Any]
    commit_ms: NDArray[np.int64]
    count: NDArray[np.int64]


def label_join(events: LabelEvents, entity: Sequence[str] | NDArray[Any], ts_ms: NDArray[np.int64], *,
               horizon_ms: int, agg: LabelAgg = "first") -> LabelJoin:
    """The label of each ``(entity, ts)`` from the events committed in ``(ts, ts + horizon_ms]``.

    ``agg``: ``first`` (the earliest event's value, None if no event), ``last``, ``any`` (True if an event),
    ``count``. Events of one commit millisecond keep the order they were added in (commit order).
    """
    if agg not in LABEL_AGGS:
        raise ValueError(f"label aggregation {agg!r}: use one of {', '.join(LABEL_AGGS)}")
    ts_ms = np.asarray(ts_ms, dtype=np.int64)
    q = len(ts_ms)
    ev_ent = np.array(events.entity, dtype=object)
    commit = np.array(events.commit_ms, dtype=np.int64)
    uniq = sorted(set(events.entity))
    index = {e: i for i, e in enumerate(uniq)}
    g = codes_of(ev_ent, index)
    order = np.lexsort((np.arange(len(commit)), commit, g))  # stable: commit order within a millisecond
    times = np.unique(commit)
    span = len(times) + 1
    key = g[order] * span + np.searchsorted(times, commit[order]) + 1
    code = codes_of(entity, index)
    lo_t = np.searchsorted(times, ts_ms, side="right")  # first distinct commit time > ts
    hi_t = np.searchsorted(times, ts_ms + horizon_ms, side="right")
    lo = np.searchsorted(key, code * span + lo_t + 1, side="left")
    hi = np.searchsorted(key, code * span + hi_t + 1, side="left")
    count = np.where(code >= 0, hi - lo, 0).astype(np.int64)
    has = count > 0
    at = hi - 1 if agg == "last" else lo
    pick = np.full(q, -1, dtype=np.int64)
    pick[has] = order[at[has]]
    commit_at = np.full(q, -1, dtype=np.int64)
    commit_at[has] = commit[pick[has]]
    if agg == "count":
        value: list[Any] = count.tolist()
    elif agg == "any":
        value = has.tolist()
    else:
        vals = events.value
        value = [vals[i] if i >= 0 else None for i in pick.tolist()]
    return LabelJoin(value, commit_at, count)
