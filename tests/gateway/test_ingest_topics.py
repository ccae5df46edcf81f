"""Topics as published: nats-server's MQTT<->subject mapping, undone by the ingest source.

The unit tests check our two mappings against each other; the integration test publishes odd topics
over MQTT to a real embedded nats-server and reads them back through ``NatsIngestSource``.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fieldmesh.bus.nats import NatsBus
from fieldmesh.core.topics import mqtt_topic_of_subject, nats_subject_of_topic, route_of_topic
from fieldmesh.gateway.sources import NatsIngestSource
from fieldmesh.runtime.natsserver import EmbeddedNats, free_port

ODD = [
    "devices/../telemetry",  # recorded as devices//////telemetry before
    "devices//telemetry",
    "devices/x/telemetry.zst",
    "devices/a.b/telemetry",
    "devices/x/telemetry/",
    "devices/x//",
    "devices/x/a..b/c",
    "devices/x/other",
    "devices/x/telemetry",
    "devices/x/telemetry/zstd",
    "devices/ü-é/telemetry",
]


def test_known_subjects():
    assert nats_subject_of_topic("devices/../telemetry") == "devices.////.telemetry"
    assert mqtt_topic_of_subject("devices.////.telemetry") == "devices/../telemetry"
    assert nats_subject_of_topic("devices//telemetry") == "devices./.telemetry"
    assert nats_subject_of_topic("devices/x/telemetry") == "devices.x.telemetry"
    assert mqtt_topic_of_subject("devices.x.telemetry.zstd") == "devices/x/telemetry/zstd"


@given(st.text(alphabet="ab/.", min_size=1, max_size=16))
def test_reverse_mapping_undoes_the_mapping(topic: str):
    assert mqtt_topic_of_subject(nats_subject_of_topic(topic)) == topic


def test_route_of_topic():
    assert route_of_topic("devices/x/telemetry") == ("telemetry", "x", None)
    assert route_of_topic("devices/x/telemetry/zstd") == ("telemetry", "x", "zstd")
    assert route_of_topic("devices/x/state").kind == "side"
    for t in ("devices/x/other", "devices/x/telemetry.zst", "devices/../telemetry", "devices/x/telemetry/",
              "devices/x/telemetry/a/b", "devices", "other/x/telemetry"):
        assert route_of_topic(t).kind == "unknown", t


@pytest.mark.integration
def test_topics_come_back_as_published(tmp_path: Path):
    mqtt_port = free_port()
    srv = EmbeddedNats(store_dir=tmp_path / "nats", mqtt_port=mqtt_port)
    srv.start()
    try:
        async def run() -> list[tuple[str, bytes]]:
            async with NatsBus(srv.url) as bus:
                src = NatsIngestSource(bus, durable=f"t{uuid.uuid4().hex[:6]}", sole=True)
                await src.start()
                c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                                client_id=f"fmtopics{uuid.uuid4().hex[:6]}", clean_session=True)
                c.connect("127.0.0.1", mqtt_port)
                c.loop_start()
                try:
                    for i, t in enumerate(ODD):
                        info = c.publish(t, str(i).encode(), qos=1)
                        info.wait_for_publish(10)
                        assert info.is_published(), t
                finally:
                    c.disconnect()
                    c.loop_stop()
                got: list[tuple[str, bytes]] = []
                for _ in range(20):
                    msgs = await src.fetch(100, 0.5)
                    got += [(m.topic, m.payload) for m in msgs]
                    await src.ack(msgs)
                    if len(got) >= len(ODD):
                        break
                await src.close()
                return got

        got = asyncio.run(run())
    finally:
        srv.stop()
    assert sorted(got, key=lambda x: int(x[1])) == [(t, str(i).encode()) for i, t in enumerate(ODD)]


@pytest.mark.integration
def test_a_consumer_on_the_old_filters_resumes_after_its_floor(tmp_path: Path):
    """A data dir from before ``devices.>``: the stream widens, nothing acknowledged is redelivered."""
    from fieldmesh.bus.nats import stream_name
    from fieldmesh.core.topics import INGEST_TOPIC, OLD_INGEST_SUBJECTS

    INGEST_STREAM = stream_name(INGEST_TOPIC)
    _OLD_INGEST_SUBJECTS = list(OLD_INGEST_SUBJECTS)

    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()
    try:
        async def run() -> list[bytes]:
            async with NatsBus(srv.url) as bus:
                await bus.ensure_stream(INGEST_STREAM, _OLD_INGEST_SUBJECTS, retention_s=3600)
                old = await bus.raw_consumer(INGEST_STREAM, "fm-gateway", _OLD_INGEST_SUBJECTS, ack_all=True)
                for i in range(5):
                    await bus.js.publish("devices.x.telemetry", str(i).encode())
                first = await old.fetch(3, 2)
                assert [r.value for r in first] == [b"0", b"1", b"2"]
                await old.ack(first)
                await old.close()
                src = NatsIngestSource(bus, sole=True)
                await src.start()
                await bus.js.publish("devices.x.other", b"5")
                got: list[bytes] = []
                for _ in range(10):
                    msgs = await src.fetch(100, 0.5)
                    got += [m.payload for m in msgs]
                    await src.ack(msgs)
                    if len(got) >= 3:
                        break
                await src.close()
                return got

        assert asyncio.run(run()) == [b"3", b"4", b"5"]
    finally:
        srv.stop()
