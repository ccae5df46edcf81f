"""Feature rows from the stream: per feature view, hopping windows keyed by the view's entity (no I/O).

:class:`FeatureEngine` takes the readings a batch stored for the first time (duplicates are already
gone: :attr:`~fieldmesh.core.batch.BatchResult.new`, in arrival order) and returns the
:class:`~fieldmesh.stream.featureviews.FeatureRow` s that became final. Per view, one
:class:`~fieldmesh.stream.windows.WindowOperator` per window size, all over the view's ``hop`` and
``allowed_lateness``, keyed by the entity (the device id, or the enriched field), so the entity's
watermark is the newest event time over all its devices. A row per (view, entity, window end) carries
every ``metric__agg__size`` value of the windows ending there; its ``known_at_ms`` is the gateway
arrival time (``received_ms``) of the reading whose arrival made it final
(:attr:`~fieldmesh.stream.windows.WindowResults.trigger`), so rows and their times do not depend on
how the stream was cut into batches. Late readings are counted (:attr:`FeatureEngine.late`), never
folded into an emitted row. Readings without the entity's enriched field are counted in ``unkeyed``.

The state snapshots to bytes (:meth:`snapshot`/:meth:`restore`); the feature sink stores it with the
bus positions it covers, so a restart resumes exactly where the committed rows end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import msgspec
import numpy as np

from fieldmesh.core.batch import ReadingColumns
from fieldmesh.stream.featureviews import AGGREGATIONS, FeatureRow, FeatureView, feature_name
from fieldmesh.stream.windows import Hopping, WindowOperator

__all__ = ["FeatureEngine", "entity_columns", "view_metrics"]


def entity_columns(cols: ReadingColumns, view: FeatureView) -> tuple[ReadingColumns, int]:
    """``cols`` with the view's entity as the device (readings without it dropped), and how many were."""
    field = view.entity_field
    if field is None or not len(cols):
        return cols, 0
    enr = cols.enrichment
    keys = [None] * len(cols) if enr is None else [
        None if not isinstance(e, dict) or e.get(field) is None else str(e[field]) for e in enr.tolist()]
    names = tuple(dict.fromkeys(k for k in keys if k is not None))
    code = {k: i for i, k in enumerate(names)}
    ent = np.array([-1 if k is None else code[k] for k in keys], dtype=np.int32)
    keep = ent >= 0
    dropped = int(len(ent) - np.count_nonzero(keep))
    if not dropped:
        return replace(cols, devices=names, device=ent), 0
    rows = np.flatnonzero(keep)
    remap = np.full(len(ent), -1, dtype=np.int32)
    remap[rows] = np.arange(len(rows), dtype=np.int32)
    mk = keep[cols.m_row]
    # only the columns windows read (device, ts, received, measurements) need to be right
    return replace(cols, devices=names, device=ent[rows], ts_ms=cols.ts_ms[rows], received_ms=cols.received_ms[rows],
                   key=cols.key[rows], chk=cols.chk[rows], seq=cols.seq[rows], boot=cols.boot[rows], event_id=None,
                   meta=None, enrichment=None, measurements_json=cols.measurements_json[rows],
                   m_row=remap[cols.m_row[mk]], m_metric=cols.m_metric[mk], m_value=cols.m_value[mk]), dropped


def view_metrics(cols: ReadingColumns, view: FeatureView) -> ReadingColumns:
    """``cols`` with only the measurements of the view's metrics: the windows of other metrics would be
    computed and thrown away. Rows (readings) all stay, so watermarks and triggers are unchanged."""
    wanted = np.array([m in view.metrics for m in cols.metrics], dtype=bool)
    if not len(cols.m_metric) or wanted.all():
        return cols
    keep = wanted[cols.m_metric]
    return replace(cols, m_row=cols.m_row[keep], m_metric=cols.m_metric[keep], m_value=cols.m_value[keep])


@dataclass(slots=True)
class _ViewState:
    view: FeatureView
    ops: list[WindowOperator]  # one per size, in view.windows_ms order


class _Snap(msgspec.Struct, frozen=True):
    views: dict[str, list[bytes]]  # view name -> operator snapshots, per size
    rows: int
    late: int
    unkeyed: int


class FeatureEngine:
    """Computes feature rows for ``views`` (see the module docstring)."""

    def __init__(self, views: Sequence[FeatureView]) -> None:
        self.views = list(views)
        self._state = [_ViewState(v, [self._op(v, size) for size in v.windows_ms]) for v in self.views]
        self.rows = 0  # feature rows emitted
        self.late = 0  # readings x the view's metrics x sizes that missed an emitted window
        self.unkeyed = 0  # readings without the enriched field a view is keyed by

    @staticmethod
    def _op(view: FeatureView, size_ms: int) -> WindowOperator:
        return WindowOperator(Hopping(size_ms, view.hop_ms), view.window_aggregates,
                              allowed_lateness_ms=view.allowed_lateness_ms)

    def process(self, cols: ReadingColumns) -> list[FeatureRow]:
        """Feature rows made final by ``cols`` (new readings in arrival order), by (view, window end, entity)."""
        out: list[FeatureRow] = []
        for st in self._state:
            view = st.view
            wanted = set(view.metrics)
            keyed, dropped = entity_columns(cols, view)
            self.unkeyed += dropped
            keyed = view_metrics(keyed, view)
            rows: dict[tuple[int, str], tuple[int, int, dict[str, float]]] = {}
            for size, op in zip(view.windows_ms, st.ops, strict=True):
                res = op.process(keyed)
                self.late += res.late
                if not len(res):
                    continue
                assert res.trigger is not None
                known = np.where(res.trigger >= 0, keyed.received_ms[np.maximum(res.trigger, 0)], -1)
                self._collect(rows, view, size, res.device.tolist(), res.metric.tolist(), res.start_ms.tolist(),
                              res.end_ms.tolist(), known.tolist(),
                              {k: v.astype(np.float64).tolist() for k, v in res.values.items()},
                              wanted)
            out.extend(FeatureRow(view=view.name, entity=ent, window_start_ms=start, window_end_ms=end,
                                  known_at_ms=known, version=0, values=vals)
                       for (end, ent), (start, known, vals) in sorted(rows.items()))
        self.rows += len(out)
        return out

    @staticmethod
    def _collect(rows: dict[tuple[int, str], tuple[int, int, dict[str, float]]], view: FeatureView, size: int,
                 ents: list[str], metrics: list[str], starts: list[int], ends: list[int], known: list[int],
                 values: dict[str, list[float]], wanted: set[str]) -> None:
        names = {m: [feature_name(m, a, size) for a in view.aggregations] for m in wanted}
        cols = [values[AGGREGATIONS[a]] for a in view.aggregations]
        per_window = zip(*cols, strict=True)
        for ent, met, start, end, k, vals in zip(ents, metrics, starts, ends, known, per_window, strict=True):
            fnames = names.get(met)
            if fnames is None:
                continue
            cur = rows.get((end, ent))
            if cur is None:
                cur = rows[(end, ent)] = (start, k, {})
            elif start < cur[0]:  # the row spans the view's largest window
                cur = rows[(end, ent)] = (start, cur[1], cur[2])
            cur[2].update(zip(fnames, vals, strict=True))

    def snapshot(self) -> bytes:
        """The whole state (every operator and the counters) as bytes."""
        return msgspec.msgpack.encode(_Snap(views={st.view.name: [op.snapshot() for op in st.ops]
                                                   for st in self._state},
                                            rows=self.rows, late=self.late, unkeyed=self.unkeyed))

    def restore(self, data: bytes) -> None:
        """Take the state :meth:`snapshot` saved; views new since then start empty, removed ones are dropped.
        A view whose sizes changed starts empty too (its old windows do not fit)."""
        snap = msgspec.msgpack.decode(data, type=_Snap)
        self.rows, self.late, self.unkeyed = snap.rows, snap.late, snap.unkeyed
        for st in self._state:
            saved = snap.views.get(st.view.name)
            if saved is None or len(saved) != len(st.ops):
                continue
            ops = [WindowOperator.restore(b) for b in saved]
            fits = all(isinstance(op.spec, Hopping) and op.spec.size_ms == size and op.spec.hop_ms == st.view.hop_ms
                       and op.aggregates == st.view.window_aggregates
                       and op.allowed_lateness_ms == st.view.allowed_lateness_ms
                       for op, size in zip(ops, st.view.windows_ms, strict=True))
            if fits:
                st.ops = ops
