"""The gateway's sources hand over a backlog in rounds of ``max_bytes`` of payloads (``batch_max_bytes``).

Both doors of ``fieldmesh up``, on real brokers: nats-server's MQTT listener (``NatsIngestSource``) and a
private Mosquitto (``MqttSource``). Each round's payloads add up to ``max_bytes`` at most (a message larger
than that comes alone), and every message comes once, in the order published.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from fieldmesh.bus.nats import NatsBus
from fieldmesh.gateway.base import IngestMessage, IngestSource
from fieldmesh.gateway.sources import MqttSource, NatsIngestSource
from fieldmesh.runtime.natsserver import EmbeddedNats, free_port
from fmtest.mqtt import PrivateMosquitto, end_session

pytestmark = pytest.mark.integration

MAX_BYTES = 1000
#: 30 messages of 300 bytes (three a round at most) and one of 1,500 (a round of its own)
PAYLOADS = [b"%04d" % i + b"x" * (1496 if i == 12 else 296) for i in range(30)]


def _publish(port: int) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                    client_id=f"fmbytes{uuid.uuid4().hex[:6]}", clean_session=True)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        for p in PAYLOADS:
            info = c.publish("devices/d1/telemetry", p, qos=1)
            info.wait_for_publish(10)
            assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


async def _rounds(src: IngestSource) -> list[list[IngestMessage]]:
    rounds: list[list[IngestMessage]] = []
    got = 0
    for _ in range(200):
        msgs = await src.fetch(512, 0.2, max_bytes=MAX_BYTES)
        if msgs:
            rounds.append(msgs)
            got += len(msgs)
            await src.ack(msgs)
        if got >= len(PAYLOADS):
            break
    assert await src.fetch(512, 0.2, max_bytes=MAX_BYTES) == []  # nothing left: an empty round, no error
    return rounds


def _check(rounds: list[list[IngestMessage]]) -> None:
    assert [m.payload for r in rounds for m in r] == PAYLOADS  # once each, in order
    for r in rounds:
        size = sum(len(m.payload) for m in r)
        assert size <= MAX_BYTES or len(r) == 1, [len(m.payload) for m in r]
    assert [len(m.payload) for r in rounds if len(r) == 1 for m in r].count(1500) == 1
    assert max(map(len, rounds)) == 3  # a backlog fills its rounds up to the bound


def test_the_nats_door_in_rounds_of_bytes(tmp_path: Path) -> None:
    port = free_port()
    srv = EmbeddedNats(store_dir=tmp_path / "nats", mqtt_port=port)
    srv.start()
    try:
        async def run() -> list[list[IngestMessage]]:
            async with NatsBus(srv.url) as bus:
                src = NatsIngestSource(bus, durable=f"b{uuid.uuid4().hex[:6]}", sole=True)
                await src.start()
                _publish(port)  # all of it waits in the stream: a backlog
                try:
                    return await _rounds(src)
                finally:
                    await src.close()

        _check(asyncio.run(run()))
    finally:
        srv.stop()


def test_the_mosquitto_door_in_rounds_of_bytes(tmp_path: Path) -> None:
    broker = PrivateMosquitto(tmp_path / "m")
    try:
        async def run() -> tuple[str, list[list[IngestMessage]]]:
            src = MqttSource(broker.url, client_id=f"bytes-{free_port()}", session_expiry_s=0)
            await src.start()
            await asyncio.sleep(0.3)  # the SUBACK
            try:
                await asyncio.to_thread(_publish, broker.port)
                await asyncio.sleep(0.5)  # all of it in the source's inbox: a backlog
                return src.client_id, await _rounds(src)
            finally:
                await src.close()

        client_id, rounds = asyncio.run(run())
        _check(rounds)
        assert not end_session(client_id, port=broker.port)  # session expiry 0: nothing left behind
    finally:
        broker.stop()
