"""A simulated fleet for jobs and rollouts: many devices, each with its own A/B slots, executing jobs
through the real :class:`~fieldmesh.edge.jobs.JobClient` over real MQTT sessions (tests, bench/rollout.py).

Devices share MQTT connections (``per_connection`` devices each) so a thousand of them fit on a small
machine. A device in ``failing`` cannot run the new version: its health check fails after an install
(then the agent code reverts it by itself). ``offline`` devices never connect.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from fieldmesh.core.errors import MissingDependency
from fieldmesh.edge.jobs import JobClient
from fieldmesh.edge.ota import SlotInfo, SlotStore

__all__ = ["SimFleet"]

log = logging.getLogger("fieldmesh.edge.fleetsim")


class _Conn:
    def __init__(self, fleet: SimFleet, name: str, devices: list[str]) -> None:
        import paho.mqtt.client as mqtt

        self.fleet = fleet
        self.connected = threading.Event()
        loop = fleet.loop
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311,
                        clean_session=True)
        c.max_inflight_messages_set(1000)
        self.client = c
        self.jobs = JobClient(devices, slots=fleet.slots, publish=self.publish, subscribe=self.subscribe,
                              health=fleet.health, fetch=fleet.fetch)

        def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
            self.connected.set()
            loop.call_soon_threadsafe(self.jobs.on_connect)

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            loop.call_soon_threadsafe(self.jobs.handle, msg.topic, bytes(msg.payload))

        c.on_connect = on_connect
        c.on_disconnect = lambda *a, **k: self.connected.clear()
        c.on_message = on_message
        c.connect_async(fleet.host, fleet.port, keepalive=30)
        c.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool) -> bool:
        if not self.connected.is_set():
            return False
        return bool(self.client.publish(topic, payload, qos=1, retain=retain).rc == 0)

    def subscribe(self, topics: list[str]) -> bool:
        if not self.connected.is_set():
            return False
        for i in range(0, len(topics), 100):
            self.client.subscribe([(t, 1) for t in topics[i:i + 100]])
        return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class SimFleet:
    """Simulated devices on the broker at ``host:port``.

    Args:
        devices: device ids.
        root: their slot directories (``root/<id>/``).
        trusted_keys: what every device trusts.
        artifacts: bytes by URL (the simulated download; anything else is fetched for real).
        failing: devices whose health check fails on any installed version.
        offline: devices that never connect.
    """

    def __init__(self, *, host: str, port: int, devices: Iterable[str], root: Path,
                 trusted_keys: Mapping[str, Any], artifacts: Mapping[str, bytes] | None = None,
                 failing: Iterable[str] = (), offline: Iterable[str] = (), per_connection: int = 100,
                 name: str = "fmsim") -> None:
        try:
            import paho.mqtt.client  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise MissingDependency("paho-mqtt", "edge") from exc
        self.host, self.port = host, port
        self.devices = list(devices)
        self.root = Path(root)
        self.trusted_keys = dict(trusted_keys)
        self.artifacts = dict(artifacts or {})
        self.failing = set(failing)
        self.offline = set(offline)
        self.per_connection = per_connection
        self.name = name
        self._slots: dict[str, SlotStore] = {}
        self.conns: list[_Conn] = []
        self.loop: asyncio.AbstractEventLoop = asyncio.get_event_loop()

    def slots(self, device_id: str) -> SlotStore:
        """A device's slot store."""
        s = self._slots.get(device_id)
        if s is None:
            s = self._slots[device_id] = SlotStore(self.root / device_id, trusted_keys=self.trusted_keys)
        return s

    def fetch(self, url: str) -> bytes:
        """The simulated download (real for URLs not in ``artifacts``)."""
        if url in self.artifacts:
            return self.artifacts[url]
        from fieldmesh.edge.ota import fetch_artifact

        return fetch_artifact(url)

    async def health(self, device_id: str, slot: SlotInfo) -> None:
        """The new version's start: fails on the failing devices."""
        await asyncio.sleep(0)
        if device_id in self.failing:
            raise RuntimeError(f"{slot.kind} {slot.version} does not start on this hardware")

    def version(self, device_id: str, kind: str = "model") -> str | None:
        """A device's active version (None: the built-in one)."""
        a = self.slots(device_id).active(kind)
        return a.version if a is not None else None

    async def __aenter__(self) -> Self:
        self.loop = asyncio.get_running_loop()
        online = [d for d in self.devices if d not in self.offline]
        for i in range(0, len(online), self.per_connection):
            self.conns.append(_Conn(self, f"{self.name}-{i // self.per_connection}",
                                    online[i:i + self.per_connection]))
        for c in self.conns:
            while not c.connected.is_set():
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        for c in self.conns:
            await c.jobs.drain()
            c.close()

    def counts(self) -> dict[str, int]:
        """Answers sent, by status, over all devices."""
        out: dict[str, int] = {}
        for c in self.conns:
            for k, v in c.jobs.counts.items():
                out[k] = out.get(k, 0) + v
        return out
