"""The preprocessing chain: calibration, unit normalisation, range checks, de-duplication, then
(after scoring) deadband with heartbeat or window aggregation, with raw pass-through of anomalies.

Every stage is vectorised over a :class:`~fieldmesh.edge.frame.Frame`; stateful stages (dedupe,
deadband, windows) step once per :func:`~fieldmesh.edge.frame.occurrence_groups` group, so a
simulator tick of N devices is one numpy step. Order of the chain::

    clean()   calibrate (gain/offset) -> unit -> range check -> drop empty -> dedupe
    (infer)   anomaly score and decision per reading
    reduce()  raw | deadband (+heartbeat) | window (min/max/avg/count), anomalies always raw

Aggregates are readings at the window start with measurements ``{metric}.min``, ``.max``,
``.avg``, ``.count``, an ``event_id`` ``w{window_ms}:{window_start}`` (stable across restarts: the
open windows are saved with the source position) and
``meta = {"agg": "window", "window_ms": ...}``.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Final

import msgspec
import numpy as np
import numpy.typing as npt

from fieldmesh.core.errors import ConfigError
from fieldmesh.edge.config import DeviceRule, MetricRule, PreprocessConfig
from fieldmesh.edge.frame import DeviceIndex, Frame, WireReading, occurrence_groups

__all__ = ["MODES", "UNIT_CONVERSIONS", "Aggregate", "Preprocessor", "unit_affine"]

#: ``"from->to"`` -> (a, b) with ``to = from * a + b``.
UNIT_CONVERSIONS: Final[dict[str, tuple[float, float]]] = {
    "F->C": (5.0 / 9.0, -32.0 * 5.0 / 9.0),
    "C->F": (9.0 / 5.0, 32.0),
    "K->C": (1.0, -273.15),
    "C->K": (1.0, 273.15),
    "psi->kPa": (6.894757293168361, 0.0),
    "bar->kPa": (100.0, 0.0),
    "Pa->kPa": (0.001, 0.0),
    "inHg->kPa": (3.386389, 0.0),
    "mbar->kPa": (0.1, 0.0),
    "mph->m/s": (0.44704, 0.0),
    "km/h->m/s": (1.0 / 3.6, 0.0),
    "in->mm": (25.4, 0.0),
    "gal->L": (3.785411784, 0.0),
    "lb->kg": (0.45359237, 0.0),
}
MODES: Final = {"raw": 0, "deadband": 1, "window": 2}
_NEVER: Final = np.iinfo(np.int64).min // 2

#: An emitted window aggregate: device index and its reading.
Aggregate = tuple[int, WireReading]


def unit_affine(unit: str | None, *, key: str = "unit") -> tuple[float, float]:
    """The affine map of a unit conversion (identity for None); ConfigError names the key."""
    if unit is None:
        return (1.0, 0.0)
    norm = unit.replace(" ", "")
    if norm in UNIT_CONVERSIONS:
        return UNIT_CONVERSIONS[norm]
    raise ConfigError(
        f"{key}: unknown unit conversion {unit!r} (known: {', '.join(UNIT_CONVERSIONS)})", key=key
    )


def _merge(base: MetricRule | None, over: MetricRule | None) -> MetricRule:
    if base is None and over is None:
        return MetricRule()
    if over is None:
        return base or MetricRule()
    if base is None:
        return over
    return base.model_copy(update={k: getattr(over, k) for k in over.model_fields_set})


class _Metric:
    """Per-device arrays of one metric."""

    def __init__(self, cap: int) -> None:
        self.a = np.ones(cap)
        self.b = np.zeros(cap)
        self.lo = np.full(cap, -np.inf)
        self.hi = np.full(cap, np.inf)
        self.db = np.zeros(cap)
        self.last = np.full(cap, np.nan)
        self.wmin = np.full(cap, np.inf)
        self.wmax = np.full(cap, -np.inf)
        self.wsum = np.zeros(cap)
        self.wcnt = np.zeros(cap, dtype=np.int64)

    def grow(self, cap: int) -> None:
        for name, fill in (
            ("a", 1.0),
            ("b", 0.0),
            ("lo", -np.inf),
            ("hi", np.inf),
            ("db", 0.0),
            ("last", np.nan),
            ("wmin", np.inf),
            ("wmax", -np.inf),
            ("wsum", 0.0),
            ("wcnt", 0),
        ):
            old = getattr(self, name)
            new = np.full(cap, fill, dtype=old.dtype)
            new[: old.shape[0]] = old
            setattr(self, name, new)


class Preprocessor:
    """The stateful preprocessing chain of one agent (all devices, all sources).

    Args:
        cfg: the preprocessing config (defaults, per-metric rules, per-device overrides).
        devices: the agent's device index (state arrays are indexed by it).
    """

    def __init__(self, cfg: PreprocessConfig, devices: DeviceIndex) -> None:
        self.cfg = cfg
        self.devices = devices
        self.counters: Counter[str] = Counter()
        self._rules: dict[str, DeviceRule] = dict(cfg.devices)
        for m, rule in cfg.metrics.items():
            unit_affine(rule.unit, key=f"preprocess.metrics.{m}.unit")
        for d, drule in self._rules.items():
            for m, rule in drule.metrics.items():
                unit_affine(rule.unit, key=f"preprocess.devices.{d}.metrics.{m}.unit")
        self._cap = 0
        self.mode = np.zeros(0, dtype=np.int8)
        self.hb = np.zeros(0, dtype=np.int64)
        self.win = np.zeros(0, dtype=np.int64)
        self.threshold = np.zeros(0)  # NaN: the scorer's default
        self.last_ts = np.zeros(0, dtype=np.int64)
        self.last_full = np.zeros(0, dtype=np.int64)
        self.wstart = np.zeros(0, dtype=np.int64)
        #: start of each device's last closed window (a reading for it or before is late)
        self.wlast = np.zeros(0, dtype=np.int64)
        #: wall clock (ms) of each device's last windowed reading
        self.seen_ms = np.zeros(0, dtype=np.int64)
        self.metrics: dict[str, _Metric] = {}
        self._grow(max(16, len(devices)))
        for i, d in enumerate(devices.ids):
            self._apply_device(i, d)
        devices.on_new(self._on_new_device)

    # -- state management -------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        cap = max(need, self._cap * 2, 16)
        if cap <= self._cap:
            return

        def g(arr: npt.NDArray[Any], fill: Any) -> npt.NDArray[Any]:
            new = np.full(cap, fill, dtype=arr.dtype)
            new[: arr.shape[0]] = arr
            return new

        self.mode = g(self.mode, MODES[self.cfg.mode])
        self.hb = g(self.hb, self.cfg.heartbeat_ms)
        self.win = g(self.win, self.cfg.window_ms)
        self.threshold = g(self.threshold, np.nan)
        self.last_ts = g(self.last_ts, _NEVER)
        self.last_full = g(self.last_full, _NEVER)
        self.wstart = g(self.wstart, _NEVER)
        self.wlast = g(self.wlast, _NEVER)
        self.seen_ms = g(self.seen_ms, 0)
        for m in self.metrics.values():
            m.grow(cap)
        self._cap = cap

    def _on_new_device(self, i: int, device_id: str) -> None:
        if i >= self._cap:
            self._grow(i + 1)
        self._apply_device(i, device_id)

    def _metric(self, name: str) -> _Metric:
        m = self.metrics.get(name)
        if m is None:
            m = self.metrics[name] = _Metric(self._cap)
            for i, d in enumerate(self.devices.ids):
                self._apply_metric(m, name, i, d)
        return m

    def _apply_metric(self, m: _Metric, name: str, i: int, device_id: str) -> None:
        drule = self._rules.get(device_id)
        rule = _merge(self.cfg.metrics.get(name), drule.metrics.get(name) if drule else None)
        ua, ub = unit_affine(rule.unit)
        # calibration first (in the sensor's unit), then the unit conversion: one affine map
        m.a[i] = rule.gain * ua
        m.b[i] = rule.offset * ua + ub
        m.lo[i] = -np.inf if rule.min is None else rule.min
        m.hi[i] = np.inf if rule.max is None else rule.max
        m.db[i] = 0.0 if rule.deadband is None else rule.deadband

    def _apply_device(self, i: int, device_id: str) -> None:
        rule = self._rules.get(device_id)
        cfg = self.cfg
        self.mode[i] = MODES[(rule.mode if rule and rule.mode else None) or cfg.mode]
        self.hb[i] = (rule.heartbeat_ms if rule else None) or cfg.heartbeat_ms
        self.win[i] = (rule.window_ms if rule else None) or cfg.window_ms
        self.threshold[i] = np.nan if rule is None or rule.threshold is None else rule.threshold
        for name, m in self.metrics.items():
            self._apply_metric(m, name, i, device_id)

    def set_device_rule(self, device_id: str, rule: DeviceRule) -> list[Aggregate]:
        """Apply a new per-device rule live (the twin's desired config); returns windows it closed.

        A change of mode or window length closes the device's open window first, so no reading
        already accepted is lost.
        """
        for m, r in rule.metrics.items():
            unit_affine(r.unit, key=f"metrics.{m}.unit")
        out: list[Aggregate] = []
        self._rules[device_id] = rule
        i = self.devices.index(device_id)
        old_mode, old_win = int(self.mode[i]), int(self.win[i])
        self._apply_device(i, device_id)
        if old_mode == MODES["window"] and (self.mode[i] != old_mode or self.win[i] != old_win):
            out = self._close(np.asarray([i], dtype=np.int32), np.asarray([old_win]))
        return out

    # -- stage 1 ---------------------------------------------------------------------------
    def clean(self, frame: Frame) -> Frame:
        """Calibrate, normalise units, range-check, drop empty readings, de-duplicate."""
        n = len(frame)
        self.counters["in"] += n
        if n == 0:
            return frame
        dev = frame.dev
        present = np.zeros(n, dtype=bool)
        for name, col in frame.cols.items():
            m = self._metric(name)
            x = col * m.a[dev] + m.b[dev]
            bad = (x < m.lo[dev]) | (x > m.hi[dev]) | np.isinf(x)
            nbad = int(bad.sum())
            if nbad:
                self.counters[f"out_of_range.{name}"] += nbad
                self.counters["out_of_range"] += nbad
                x[bad] = np.nan
            frame.cols[name] = x
            present |= ~np.isnan(x)
        if not present.all():
            self.counters["empty"] += int(n - present.sum())
            frame = frame.take(present)
        if self.cfg.dedupe and len(frame):
            keep = np.ones(len(frame), dtype=bool)
            ts = frame.ts_ms
            for g in occurrence_groups(frame.dev):
                d = frame.dev[g]
                dup = ts[g] == self.last_ts[d]
                keep[g[dup]] = False
                ok = g[~dup]
                self.last_ts[frame.dev[ok]] = ts[ok]
            if not keep.all():
                self.counters["duplicates"] += int((~keep).sum())
                frame = frame.take(keep)
        return frame

    # -- stage 2 ---------------------------------------------------------------------------
    def reduce(self, frame: Frame, *, now_ms: int | None = None) -> tuple[Frame, list[Aggregate]]:
        """Deadband or window the scored readings; anomalies always pass through raw.

        A reading for a window already closed (or older than the open one) passes through raw.
        """
        n = len(frame)
        aggs: list[Aggregate] = []
        if n == 0:
            return frame, aggs
        mode = self.mode[frame.dev]
        if not mode.any():  # every device raw
            self.counters["out"] += n
            return frame, aggs
        anomaly = frame.anomaly if frame.anomaly is not None else np.zeros(n, dtype=bool)
        keep = np.ones(n, dtype=bool)
        ts = frame.ts_ms
        for g in occurrence_groups(frame.dev):
            d = frame.dev[g]
            md = mode[g]
            an = anomaly[g]
            # deadband rows
            dbm = md == MODES["deadband"]
            if dbm.any():
                hb_due = (ts[g] - self.last_full[d]) >= self.hb[d]
                full = ~dbm | hb_due | an
                any_sent = np.zeros(g.shape[0], dtype=bool)
                for name, col in frame.cols.items():
                    m = self.metrics[name]
                    x = col[g]
                    present = ~np.isnan(x)
                    last = m.last[d]
                    changed = np.isnan(last) | (np.abs(x - last) > m.db[d])
                    send = present & (full | changed)
                    if not send.all():
                        x = np.where(send, x, np.nan)
                        col[g] = x
                    m.last[d[send]] = x[send]
                    any_sent |= send
                self.last_full[d[full & any_sent]] = ts[g][full & any_sent]
                drop = dbm & ~any_sent
                if drop.any():
                    keep[g[drop]] = False
                    self.counters["suppressed"] += int(drop.sum())
            # window rows
            wm = md == MODES["window"]
            if wm.any():
                rows = g[wm]
                dd = d[wm]
                t = ts[rows]
                w = t - t % self.win[dd]
                late = (w < self.wstart[dd]) | (w <= self.wlast[dd])
                on = ~late
                self.seen_ms[dd] = int(time.time() * 1000) if now_ms is None else now_ms
                rows, dd, w = rows[on], dd[on], w[on]
                closing = (self.wstart[dd] != w) & (self.wstart[dd] != _NEVER)
                if closing.any():
                    aggs.extend(self._close(dd[closing], self.win[dd[closing]]))
                self.wstart[dd] = w
                for name, col in frame.cols.items():
                    m = self.metrics[name]
                    x = col[rows]
                    p = ~np.isnan(x)
                    dp, xp = dd[p], x[p]
                    m.wcnt[dp] += 1
                    m.wsum[dp] += xp
                    m.wmin[dp] = np.minimum(m.wmin[dp], xp)
                    m.wmax[dp] = np.maximum(m.wmax[dp], xp)
                # raw rows of windowed devices: only anomalies and late readings pass
                absorbed = ~an[wm] & on
                keep[g[wm][absorbed]] = False
                self.counters["aggregated"] += int(absorbed.sum())
                self.counters["passthrough"] += int((~absorbed).sum())
        self.counters["out"] += int(keep.sum())
        return (frame if keep.all() else frame.take(keep)), aggs

    def _close(self, dd: npt.NDArray[np.int32], win: npt.NDArray[np.int64]) -> list[Aggregate]:
        out: list[Aggregate] = []
        starts = self.wstart[dd].tolist()
        wins = np.asarray(win).tolist()
        per_metric = []
        for name, m in self.metrics.items():
            cnt = m.wcnt[dd]
            if not cnt.any():
                continue
            avg = np.divide(m.wsum[dd], cnt, out=np.full(dd.shape[0], np.nan), where=cnt > 0)
            per_metric.append((name, cnt.tolist(), m.wmin[dd].tolist(), m.wmax[dd].tolist(), avg.tolist()))
            m.wcnt[dd] = 0
            m.wsum[dd] = 0.0
            m.wmin[dd] = np.inf
            m.wmax[dd] = -np.inf
        for j, i in enumerate(dd.tolist()):
            meas: dict[str, float] = {}
            for name, cnt, mn, mx, avg in per_metric:
                if cnt[j]:
                    meas[f"{name}.min"] = mn[j]
                    meas[f"{name}.max"] = mx[j]
                    meas[f"{name}.avg"] = avg[j]
                    meas[f"{name}.count"] = float(cnt[j])
            if meas:
                out.append(
                    (
                        i,
                        WireReading(
                            ts=int(starts[j]),
                            measurements=meas,
                            event_id=f"w{wins[j]}:{starts[j]}",
                            meta={"agg": "window", "window_ms": int(wins[j])},
                        ),
                    )
                )
        self.wlast[dd] = self.wstart[dd]
        self.wstart[dd] = _NEVER
        self.counters["windows"] += len(out)
        return out

    def flush_windows(self, now_ms: int | None = None, *, idle_ms: int = 0) -> list[Aggregate]:
        """Close windows that ended by ``now_ms`` (wall clock) for devices idle for ``idle_ms``.

        With ``now_ms`` None, close every open window (on stop). A device still sending (say,
        catching up after an outage) has its windows closed by event time instead.
        """
        n = len(self.devices)
        open_ = np.flatnonzero(self.wstart[:n] != _NEVER).astype(np.int32)
        if open_.shape[0] == 0:
            return []
        if now_ms is not None:
            due = (self.wstart[open_] + self.win[open_] <= now_ms) & (self.seen_ms[open_] <= now_ms - idle_ms)
            open_ = open_[due]
            if open_.shape[0] == 0:
                return []
        return self._close(open_, self.win[open_])

    # -- persistence -------------------------------------------------------------------------
    def has_windows(self) -> bool:
        """Whether any device has window state worth saving."""
        n = len(self.devices)
        return bool((self.wstart[:n] != _NEVER).any() or (self.wlast[:n] != _NEVER).any())

    def window_state(self) -> bytes:
        """The open windows (and last closed window starts), to survive a restart (msgpack)."""
        n = len(self.devices)
        sel = np.flatnonzero((self.wstart[:n] != _NEVER) | (self.wlast[:n] != _NEVER))
        state: dict[str, Any] = {
            "ids": [self.devices.ids[i] for i in sel.tolist()],
            "wstart": self.wstart[sel].tolist(),
            "wlast": self.wlast[sel].tolist(),
            "metrics": {
                name: {
                    "cnt": m.wcnt[sel].tolist(),
                    "sum": m.wsum[sel].tolist(),
                    "min": m.wmin[sel].tolist(),
                    "max": m.wmax[sel].tolist(),
                }
                for name, m in self.metrics.items()
            },
        }
        return msgspec.msgpack.encode(state)

    def load_window_state(self, data: bytes) -> int:
        """Restore what :meth:`window_state` saved; returns the number of devices restored."""
        state = msgspec.msgpack.decode(data)
        idx = np.asarray([self.devices.index(d) for d in state["ids"]], dtype=np.int64)
        if idx.shape[0] == 0:
            return 0
        self.wstart[idx] = state["wstart"]
        self.wlast[idx] = state["wlast"]
        # restored windows count as just seen: they close by event time, not on a restart's delay
        self.seen_ms[idx] = int(time.time() * 1000)
        for name, arrs in state["metrics"].items():
            m = self._metric(name)
            m.wcnt[idx] = arrs["cnt"]
            m.wsum[idx] = arrs["sum"]
            m.wmin[idx] = arrs["min"]
            m.wmax[idx] = arrs["max"]
        return int(idx.shape[0])
