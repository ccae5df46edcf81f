"""OPC UA source (asyncua): data-change subscriptions on nodes, reconnecting when the server restarts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import numpy as np

from fieldmesh.core.errors import MissingDependency
from fieldmesh.edge.config import OpcuaSourceConfig
from fieldmesh.edge.sources.base import SourceBatch

__all__ = ["OpcuaSource"]

log = logging.getLogger("fieldmesh.edge.opcua")


class _Handler:
    def __init__(self, queue: asyncio.Queue[tuple[str, float, int]], names: dict[Any, str]) -> None:
        self.queue = queue
        self.names = names

    def datachange_notification(self, node: Any, val: Any, data: Any) -> None:
        name = self.names.get(node.nodeid)
        if name is None or isinstance(val, str | bytes) or val is None:
            return
        ts = None
        with contextlib.suppress(AttributeError):
            st = data.monitored_item.Value.SourceTimestamp or data.monitored_item.Value.ServerTimestamp
            if isinstance(st, datetime):
                ts = int(st.timestamp() * 1000)
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait((name, float(val), ts or int(time.time() * 1000)))


class OpcuaSource:
    """Subscribes to OPC UA nodes of one device; notifications with the same source timestamp make
    one reading. When the server goes away (restart, network) the source reconnects with capped
    backoff and subscribes again; the values it re-announces keep their source timestamps, so the
    agent's de-duplication drops the repeats. ``ack`` is a no-op (subscriptions have no position).
    """

    def __init__(self, cfg: OpcuaSourceConfig, *, name: str = "opcua") -> None:
        try:
            import asyncua  # noqa: F401
        except ImportError as exc:
            raise MissingDependency("asyncua", "edge-opcua") from exc
        self.name = name
        self.cfg = cfg
        self.errors = 0
        self.connects = 0
        self.connected = False
        self._closed = False
        self._names = list(cfg.nodes)

    def _batch(self, items: list[tuple[str, float, int]]) -> SourceBatch:
        rows: dict[int, dict[str, float]] = {}
        for name, v, ts in items:
            rows.setdefault(ts, {})[name] = v
        tss = sorted(rows)
        cols = {n: np.array([rows[t].get(n, np.nan) for t in tss]) for n in self._names}
        return SourceBatch(
            device_ids=[self.cfg.device_id] * len(tss), ts_ms=np.array(tss, dtype=np.int64), cols=cols
        )

    async def batches(self) -> AsyncIterator[SourceBatch]:
        """Yield readings as notifications arrive; reconnect on failure."""
        from asyncua import Client  # type: ignore[attr-defined]
        from asyncua.ua.uaerrors import UaError

        backoff = 0.2
        cap = self.cfg.reconnect_max_ms / 1000
        while not self._closed:
            queue: asyncio.Queue[tuple[str, float, int]] = asyncio.Queue(maxsize=100_000)
            client = Client(url=self.cfg.endpoint, timeout=4)
            try:
                await client.connect()
                try:
                    nodes = [client.get_node(nid) for nid in self.cfg.nodes.values()]
                    names = {n.nodeid: m for n, m in zip(nodes, self.cfg.nodes, strict=True)}
                    sub = await client.create_subscription(
                        self.cfg.publishing_interval_ms, _Handler(queue, names)
                    )
                    await sub.subscribe_data_change(nodes)
                    self.connects += 1
                    self.connected = True
                    backoff = 0.2
                    log.info(
                        "opcua %s: subscribed to %d node(s) on %s",
                        self.cfg.device_id,
                        len(nodes),
                        self.cfg.endpoint,
                    )
                    last_check = time.monotonic()
                    while not self._closed:
                        try:
                            first = await asyncio.wait_for(queue.get(), timeout=0.5)
                        except TimeoutError:
                            first = None
                        if first is not None:
                            items = [first]
                            while not queue.empty():
                                items.append(queue.get_nowait())
                            yield self._batch(items)
                        if time.monotonic() - last_check >= 1.0:
                            last_check = time.monotonic()
                            await client.check_connection()
                finally:
                    self.connected = False
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(client.disconnect(), 2)
            except (OSError, TimeoutError, ConnectionError, UaError, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and self._closed:
                    return
                if isinstance(exc, asyncio.CancelledError):
                    raise
                self.errors += 1
                log.warning(
                    "opcua %s: %s (%s); reconnecting in %.1fs",
                    self.cfg.device_id,
                    self.cfg.endpoint,
                    exc or type(exc).__name__,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, cap)

    async def ack(self, batch: SourceBatch) -> None:
        """Nothing to acknowledge to a subscription."""

    async def close(self) -> None:
        """Stop after the current wait."""
        self._closed = True
