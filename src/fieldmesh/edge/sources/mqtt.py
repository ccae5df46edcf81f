"""Local MQTT source: devices that already speak MQTT publish docs/contract.md JSON to a broker beside
the agent; the agent subscribes and acknowledges each message (manual PUBACK) only once its
readings are durable in the buffer."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from fieldmesh.core.codec import decode_telemetry, encoding_for
from fieldmesh.core.errors import MissingDependency
from fieldmesh.edge.config import MqttSourceConfig
from fieldmesh.edge.sources.base import SourceBatch

__all__ = ["MqttSource"]

log = logging.getLogger("fieldmesh.edge.mqtt_source")


class MqttSource:
    """Subscribes to ``topic`` (the device id is its second level, as in ``local/{id}/telemetry``).

    Payloads are decoded and validated with the gateway's codec; rejected ones are counted in
    ``rejected`` (and acknowledged: re-delivering them would not make them valid). A device's own
    ``seq``/``boot_id`` are kept, so a message re-delivered after an agent crash keeps its identity;
    readings without ``seq`` are numbered by the agent.
    """

    def __init__(self, cfg: MqttSourceConfig, *, name: str = "mqtt") -> None:
        try:
            import paho.mqtt.client  # noqa: F401
        except ImportError as exc:
            raise MissingDependency("paho-mqtt", "edge") from exc
        self.name = name
        self.cfg = cfg
        self.rejected = 0
        self.received = 0
        self._closed = False
        self._client: Any = None
        self._queue: asyncio.Queue[tuple[int, int, str, bytes, Any]] = asyncio.Queue()

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.cfg.client_id or f"fm-edge-src-{secrets.token_hex(4)}",
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )

        def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
            client.subscribe(self.cfg.topic, qos=self.cfg.qos)

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            ct = getattr(getattr(msg, "properties", None), "ContentType", None)
            loop.call_soon_threadsafe(
                self._queue.put_nowait, (msg.mid, msg.qos, msg.topic, bytes(msg.payload), ct)
            )

        c.on_connect = on_connect
        c.on_message = on_message
        c.reconnect_delay_set(1, 5)
        c.connect_async(self.cfg.host, self.cfg.port)
        c.loop_start()
        self._client = c

    async def batches(self) -> AsyncIterator[SourceBatch]:
        """Everything that arrived since the last batch, as one batch."""
        if self._client is None:  # the agent may restart this generator after an error
            self._start(asyncio.get_running_loop())
        while not self._closed:
            try:
                first = await asyncio.wait_for(self._queue.get(), timeout=0.5)
            except TimeoutError:
                continue
            msgs = [first]
            while not self._queue.empty() and len(msgs) < 10_000:
                msgs.append(self._queue.get_nowait())
            devs: list[str] = []
            ts: list[int] = []
            rows: list[dict[str, float | bool]] = []
            seqs: list[int] = []
            boots: list[str | None] = []
            now = int(time.time() * 1000)
            for _mid, _qos, topic, payload, ct in msgs:
                self.received += 1
                parts = topic.split("/")
                dev = parts[1] if len(parts) > 1 else ""
                res = decode_telemetry(
                    payload,
                    device_id=dev,
                    topic=topic,
                    received_ms=now,
                    encoding=encoding_for(ct, parts[3] if len(parts) > 3 else None),
                )
                self.rejected += len(res.rejects)
                for r in res.readings:
                    devs.append(dev)
                    ts.append(r.ts_ms)
                    rows.append(r.measurements)
                    seqs.append(-1 if r.seq is None else r.seq)
                    boots.append(r.boot_id)
            names = sorted({k for r in rows for k in r})
            cols = {n: np.array([float(r.get(n, np.nan)) for r in rows]) for n in names}
            yield SourceBatch(
                device_ids=devs,
                ts_ms=np.array(ts, dtype=np.int64),
                cols=cols,
                seq=np.array(seqs, dtype=np.int64),
                boot_ids=boots,
                token=[(m[0], m[1]) for m in msgs],
            )

    async def ack(self, batch: SourceBatch) -> None:
        """PUBACK the batch's messages to the local broker."""
        if self._client is None:
            return
        for mid, qos in batch.token or []:
            if qos > 0:
                self._client.ack(mid, qos)

    async def close(self) -> None:
        """Disconnect."""
        self._closed = True
        if self._client is not None:
            c, self._client = self._client, None
            c.disconnect()
            await asyncio.get_running_loop().run_in_executor(None, c.loop_stop)
