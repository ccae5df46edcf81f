"""The twin service as a worker of ``fieldmesh up`` (``python -m fieldmesh.runtime.worker twins JSON``).

``up`` starts it beside the gateway when its door can take it: the Mosquitto door (as the internal
user, on the loopback listener) or the nats door without TLS (confined, like any MQTT client there,
to device topics). docs/twins.md.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from fieldmesh.control.twins import TwinService
from fieldmesh.store.twins import TwinStore

__all__ = ["run_twins"]


async def run_twins(*, store_url: str, mqtt_url: str, mqtt_auth_file: str | None = None,
                    client_id: str | None = None, poll_s: float = 0.2, stats_path: str | None = None,
                    stop: asyncio.Event | None = None) -> None:
    """Serve twins over the MQTT door ``mqtt_url`` from the hot store ``store_url`` until stopped
    (``stats_path``: where the service's counters are written, JSON)."""
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    store = await asyncio.to_thread(TwinStore, store_url)
    try:
        service = TwinService(store=store, mqtt_url=mqtt_url, auth_file=mqtt_auth_file, client_id=client_id,
                              poll_s=poll_s, stats_path=Path(stats_path) if stats_path else None)
        await service.run(stop)
    finally:
        store.close()
