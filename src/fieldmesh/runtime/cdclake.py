"""``fieldmesh up`` with CDC and the lake on: the captured tables' change events into Iceberg (docs/lake.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from fieldmesh.bus.base import Bus, TopicSpec
from fieldmesh.core.settings import Settings

__all__ = ["start_cdc_lake"]

log = logging.getLogger(__name__)


async def start_cdc_lake(bus: Bus, settings: Settings, data_dir: Path,
                         captured: dict[str, str]) -> Callable[[], Awaitable[None]]:
    """Start applying ``captured`` (table id -> CDC topic) to their lake mirrors and change logs; returns the
    coroutine function that stops it (what is committed stays; the rest comes again from the bus)."""
    from fieldmesh.store.lake import open_catalog
    from fieldmesh.store.lakecdc import run_cdc_lake

    for topic in captured.values():  # the capture creates a topic at its table's first event only
        await bus.ensure_topic(TopicSpec(topic, settings.cdc.partitions, retention_s=0, dedupe_window_s=600))
    catalog = await asyncio.to_thread(open_catalog, settings.lake, data_dir)
    stop = asyncio.Event()

    async def run() -> None:
        delay = 1.0
        while not stop.is_set():
            try:
                await run_cdc_lake(bus, captured, catalog=catalog, namespace=settings.lake.namespace, stop=stop,
                                   snapshot_max_age_s=settings.lake.snapshot_max_age_s,
                                   maintenance_interval_s=settings.lake.maintenance_interval_s)
            except Exception as exc:  # a schema clash, the bus restarting: logged, tried again
                log.warning("CDC into the lake stopped (%s: %s); again in %.0fs", type(exc).__name__, exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(60.0, delay * 2)

    task = asyncio.create_task(run(), name="cdc-lake")

    async def close() -> None:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)

    return close
