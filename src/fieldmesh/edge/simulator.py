"""Simulated sensors: realistic signals with labelled faults (pure, numpy, deterministic by seed).

Each device has temperature (daily cycle, slow drift, noise), humidity (anti-correlated with
temperature) and vibration (noise around a per-device baseline). Faults are injected and labelled
so that anomaly scorers can be trained and measured: *spikes* (one reading far off) and *stuck*
sensors (a metric frozen at its last value for a while).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["FAULT_NONE", "FAULT_SPIKE", "FAULT_STUCK", "METRICS", "FleetSimulator", "SimTick"]

METRICS: Final = ("temperature", "humidity", "vibration")
FAULT_NONE: Final = 0
FAULT_SPIKE: Final = 1
FAULT_STUCK: Final = 2
_DAY_MS: Final = 86_400_000


@dataclass(frozen=True, slots=True)
class SimTick:
    """Values of every device at one instant; ``fault`` labels each device's reading."""

    ts_ms: int
    values: dict[str, npt.NDArray[np.float64]]
    fault: npt.NDArray[np.int8]


class FleetSimulator:
    """A fleet of simulated devices.

    Args:
        devices: number of devices.
        seed: random seed (same seed, same signals).
        prefix: device ids are ``{prefix}-{i:05d}``.
        spike_prob: per reading, the chance of a spike on one metric.
        stuck_prob: per reading, the chance that a sensor gets stuck.
        stuck_len: how many readings a stuck sensor stays stuck.
    """

    def __init__(
        self,
        *,
        devices: int,
        seed: int = 0,
        prefix: str = "sim",
        spike_prob: float = 0.002,
        stuck_prob: float = 0.0002,
        stuck_len: int = 20,
    ) -> None:
        if devices < 1:
            raise ValueError("devices must be >= 1")
        self.device_ids = [f"{prefix}-{i:05d}" for i in range(devices)]
        self._rng = np.random.default_rng(seed)
        n = devices
        rng = self._rng
        self._base_t = rng.uniform(15.0, 30.0, n)
        self._amp_t = rng.uniform(2.0, 6.0, n)
        self._phase = rng.uniform(0, 2 * np.pi, n)
        self._drift = rng.normal(0.0, 0.2, n) / _DAY_MS  # degrees per ms
        self._base_h = rng.uniform(35.0, 65.0, n)
        self._base_v = rng.uniform(0.01, 0.08, n)
        self._spike_prob = spike_prob
        self._stuck_prob = stuck_prob
        self._stuck_len = stuck_len
        self._stuck_left = np.zeros((len(METRICS), n), dtype=np.int32)
        self._last: dict[str, npt.NDArray[np.float64]] | None = None
        self._t0: int | None = None

    def tick(self, ts_ms: int) -> SimTick:
        """Every device's reading at ``ts_ms``."""
        rng = self._rng
        n = len(self.device_ids)
        if self._t0 is None:
            self._t0 = ts_ms
        day = 2 * np.pi * (ts_ms % _DAY_MS) / _DAY_MS
        cyc = np.sin(day + self._phase)
        temp = self._base_t + self._amp_t * cyc + self._drift * (ts_ms - self._t0) + rng.normal(0, 0.15, n)
        hum = np.clip(self._base_h - 2.5 * self._amp_t * cyc + rng.normal(0, 0.8, n), 0, 100)
        vib = np.abs(self._base_v * (1 + 0.3 * cyc) + rng.normal(0, 0.004, n))
        vals = {"temperature": temp, "humidity": hum, "vibration": vib}
        fault = np.zeros(n, dtype=np.int8)
        spikes = rng.random(n) < self._spike_prob
        if spikes.any():
            which = rng.integers(0, len(METRICS), n)
            for mi, name in enumerate(METRICS):
                sel = spikes & (which == mi)
                scale = {"temperature": 25.0, "humidity": 30.0, "vibration": 1.5}[name]
                vals[name] = np.where(sel, vals[name] + rng.choice([-1.0, 1.0], n) * scale, vals[name])
            fault[spikes] = FAULT_SPIKE
        if self._last is not None:
            start = (rng.random((len(METRICS), n)) < self._stuck_prob) & (self._stuck_left == 0)
            self._stuck_left[start] = self._stuck_len
            for mi, name in enumerate(METRICS):
                stuck = self._stuck_left[mi] > 0
                if stuck.any():
                    vals[name] = np.where(stuck, self._last[name], vals[name])
                    fault[stuck & (fault == FAULT_NONE)] = FAULT_STUCK
            self._stuck_left = np.maximum(self._stuck_left - 1, 0)
        vals = {k: np.round(v, 4) for k, v in vals.items()}
        self._last = vals
        return SimTick(ts_ms=ts_ms, values=vals, fault=fault)
