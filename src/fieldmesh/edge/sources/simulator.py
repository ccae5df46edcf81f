"""The fleet simulator as a source: deterministic, and resumes from its last acknowledged tick."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from fieldmesh.edge.config import SimulatorSourceConfig
from fieldmesh.edge.simulator import METRICS, FleetSimulator
from fieldmesh.edge.sources.base import SourceBatch

__all__ = ["SimulatorSource"]


class SimulatorSource:
    """Ticks of a :class:`FleetSimulator`; tick ``k`` has ``seq = k`` and ``ts = start + k * interval``.

    Its acknowledged position is kept in ``state_path``: after a crash it regenerates the same
    readings from the first tick not yet durable in the buffer (so nothing is lost, and a re-sent tick
    has the same identity).
    """

    def __init__(
        self, cfg: SimulatorSourceConfig, *, state_path: Path | None = None, name: str = "simulator"
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.state_path = state_path
        self.boot_id = cfg.boot_id or f"sim{cfg.seed}"
        self._sim = FleetSimulator(
            devices=cfg.devices,
            seed=cfg.seed,
            prefix=cfg.prefix,
            spike_prob=cfg.spike_prob,
            stuck_prob=cfg.stuck_prob,
        )
        self.device_ids = list(self._sim.device_ids)
        state = self._load()
        self.start_ts_ms: int = int(state.get("start_ts_ms") or cfg.start_ts_ms or time.time() * 1000)
        self.next_tick: int = int(state.get("next_tick", 0))
        self._generated = 0
        self._closed = False
        # Regenerate the simulator's state up to the resume point (same seed, same signals).
        for k in range(self.next_tick):
            self._sim.tick(self.start_ts_ms + k * cfg.interval_ms)
        self._generated = self.next_tick

    def _load(self) -> dict[str, int]:
        if self.state_path is None or not self.state_path.exists():
            return {}
        try:
            data = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"start_ts_ms": self.start_ts_ms, "next_tick": self.next_tick}))
        os.replace(tmp, self.state_path)

    async def batches(self) -> AsyncIterator[SourceBatch]:
        """Yield ``ticks_per_batch`` ticks at a time, paced on the wall clock when ``realtime``."""
        cfg = self.cfg
        n = len(self.device_ids)
        names = list(METRICS)
        self._save()
        while not self._closed:
            k0 = self._generated
            if cfg.max_ticks is not None and k0 >= cfg.max_ticks:
                return
            t = cfg.ticks_per_batch if cfg.max_ticks is None else min(cfg.ticks_per_batch, cfg.max_ticks - k0)
            last_ts = self.start_ts_ms + (k0 + t - 1) * cfg.interval_ms
            if cfg.realtime:
                delay = last_ts / 1000 - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            cols = {m: np.empty(n * t) for m in names}
            labels = np.empty(n * t, dtype=np.int8)
            ts = np.empty(n * t, dtype=np.int64)
            seq = np.empty(n * t, dtype=np.int64)
            for j in range(t):
                k = k0 + j
                tick = self._sim.tick(self.start_ts_ms + k * cfg.interval_ms)
                sl = slice(j * n, (j + 1) * n)
                for m in names:
                    cols[m][sl] = tick.values[m]
                labels[sl] = tick.fault
                ts[sl] = tick.ts_ms
                seq[sl] = k
            self._generated = k0 + t
            yield SourceBatch(
                device_ids=self.device_ids * t,
                ts_ms=ts,
                cols=cols,
                seq=seq,
                boot_id=self.boot_id,
                token=k0 + t,
                labels=labels,
            )
            if not cfg.realtime:
                await asyncio.sleep(0)

    def position_after(self, batch: SourceBatch) -> int:
        """The position to resume from once ``batch`` is durable (for the agent's checkpoint)."""
        return int(batch.token)

    def restore(self, position: int) -> None:
        """Resume from ``position`` (a checkpoint of the agent) instead of the saved state."""
        if position == self.next_tick:
            return
        cfg = self.cfg
        if position < self._generated:  # regenerate from the start: same seed, same signals
            self._sim = FleetSimulator(
                devices=cfg.devices,
                seed=cfg.seed,
                prefix=cfg.prefix,
                spike_prob=cfg.spike_prob,
                stuck_prob=cfg.stuck_prob,
            )
            self._generated = 0
        for k in range(self._generated, position):
            self._sim.tick(self.start_ts_ms + k * cfg.interval_ms)
        self._generated = self.next_tick = position

    async def ack(self, batch: SourceBatch) -> None:
        """Remember that ticks before ``batch.token`` are durable."""
        self.next_tick = max(self.next_tick, int(batch.token))
        self._save()

    async def close(self) -> None:
        """Stop producing."""
        self._closed = True
