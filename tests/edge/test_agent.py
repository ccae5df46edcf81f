"""The agent in-process: a failing source is restarted without taking the agent down."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from conftest import free_port
from fieldmesh.edge.agent import EdgeAgent
from fieldmesh.edge.config import parse_config
from fieldmesh.edge.sources.base import SourceBatch


class FlakySource:
    """Yields a reading per step; raises once after the third."""

    name = "flaky"

    def __init__(self) -> None:
        self.n = 0
        self.failed = False
        self.acked = 0

    async def batches(self) -> AsyncIterator[SourceBatch]:
        while self.n < 10:
            if self.n == 3 and not self.failed:
                self.failed = True
                raise RuntimeError("device driver hiccup")
            self.n += 1
            yield SourceBatch(
                device_ids=["f-1"],
                ts_ms=np.array([1_763_800_000_000 + self.n], dtype=np.int64),
                cols={"x": np.array([float(self.n)])},
            )
            await asyncio.sleep(0)

    async def ack(self, batch: SourceBatch) -> None:
        self.acked += 1

    async def close(self) -> None:
        pass


def test_failing_source_is_restarted(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "sources": [{"simulator": {}}],
            "buffer": {"path": str(tmp_path)},
            "uplink": {"port": free_port()},
            "infer": {"scorer": "none"},
            "twin": {"enabled": False},
        }
    )
    src = FlakySource()
    agent = EdgeAgent(cfg, sources=[src])
    stats = asyncio.run(agent.run(duration_s=1.5, drain_s=0))
    assert stats["source_errors"] == 1
    assert src.acked == 10
    assert stats["buffer"]["appended_readings"] == 10
    assert stats["buffer"]["pending_readings"] == 10  # no broker: all still buffered
