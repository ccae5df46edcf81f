"""Kafka topics and NATS subjects as an ingress: same validation, DLQ and de-duplication as MQTT."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest

from e2e.dataset import MALFORMED_REASONS, make_stream, malformed
from fieldmesh.core.errors import ConfigError
from fieldmesh.core.settings import load_settings
from fieldmesh.gateway.ingress import DeviceResolver, load_ingest
from fieldmesh.runtime.worker import run_gateway, run_processor
from fieldmesh.store.sqlite import SqliteStore
from fmtest.scale import as_kafka, check_store_exact, expected_received, produce

# ---- the device id rule (no server) --------------------------------------------------------------


def test_device_id_from_key_then_payload_then_template():
    r = DeviceResolver("plant.*.{device}.tm")
    assert r.resolve(b"pump-7", b'{"device_id": "other"}', "plant.a.x.tm") == "pump-7"  # key wins
    assert r.resolve(None, b'{"device_id": "d1", "ts": 1}', "t") == "d1"
    assert r.resolve(None, b'[{"device_id": "d2", "ts": 1}, {"ts": 2}]', "t") == "d2"
    assert r.resolve(b"", b'{"ts": 1}', "plant.north.valve_3.tm") == "valve_3"
    assert r.resolve(None, b"{not json", "plant.north.tm") is None
    assert DeviceResolver().resolve(None, b"[]", "devices.pump-9.telemetry") == "pump-9"
    deep = b'{"a":' + b"[" * 10_000 + b"]" * 10_000 + b"}"  # RecursionError in the peek: the topic decides
    assert DeviceResolver().resolve(None, deep, "devices.pump-9.telemetry") == "pump-9"
    with pytest.raises(ConfigError, match="device_template"):
        DeviceResolver("plant.*.tm")
    with pytest.raises(ConfigError, match="must name one topic"):
        load_ingest("kafka://127.0.0.1:9092")
    with pytest.raises(ConfigError, match="unsupported ingest URL"):
        load_ingest("mqtt://127.0.0.1:1883/x")


# ---- through the real gateway and processor --------------------------------------------------------


async def _run_until(bus_url: str, ingest_url: str, store_url: str, store: SqliteStore, received: int) -> None:
    settings = load_settings(bus={"partitions": 4})
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run_gateway(bus_url=bus_url, mqtt_url=None, ingest_urls=[ingest_url], settings=settings,
                                        stop=stop)),
        asyncio.create_task(run_processor(bus_url=bus_url, store_url=store_url, settings=settings, stop=stop)),
    ]
    try:
        for _ in range(600):
            if store.stats().received >= received:
                break
            for t in tasks:
                if t.done():
                    t.result()
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


def _no_device_message() -> tuple[bytes | None, bytes, dict[str, str]]:
    return None, json.dumps({"ts": 1, "measurements": {"t": 1}}).encode(), {}


@pytest.mark.integration
def test_kafka_topic_ingress_is_exact_with_dlq_and_dedupe(tmp_path: Path, tansu_factory):
    """Keyed and unkeyed JSON readings on a Kafka topic -> gateway -> Kafka bus -> processor -> store."""
    url, _ = tansu_factory()
    prefix = f"ki{uuid.uuid4().hex[:6]}"
    stream = make_stream(prefix, devices=10, per_device=60)
    bad, good_in_bad = malformed(prefix)
    records = [*as_kafka(stream["messages"] + bad), _no_device_message()]
    # a redelivery as a bridge may do it after a crash: the same messages twice
    records += records[:50]
    topic = f"raw-{prefix}"
    base, query = url.split("?", 1)
    produce(url, topic, records)
    dead = dict(MALFORMED_REASONS)
    dead["schema_violation"] += 1  # the message without any device id
    sent = stream["sent"] + good_in_bad
    resent = [x for m in records[:50] for x in _readings_of(m, prefix)]
    dead_resent = _dead_in(records[:50])
    for k, v in dead_resent.items():
        dead[k] = dead.get(k, 0) + v
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    store = SqliteStore(store_url)
    try:
        asyncio.run(_run_until(url, f"{base}/{topic}?group=gw-{prefix}&{query}", store_url, store,
                               expected_received(sent + resent, dead)))
        check_store_exact(store, sent + resent, dead)
        rows = store.dlq(reason="schema_violation", limit=100)
        assert any("no valid device id" in r["topic"] for r in rows)
    finally:
        store.close()


@pytest.mark.integration
def test_nats_subject_ingress_with_device_template(tmp_path: Path):
    """Readings on a user's NATS subjects (device id in the subject) through a JetStream stream."""
    from fieldmesh.runtime.natsserver import EmbeddedNats

    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()
    prefix = f"ni{uuid.uuid4().hex[:6]}"
    stream = make_stream(prefix, devices=6, per_device=40)
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    store = SqliteStore(store_url)
    try:
        async def publish() -> None:
            import nats

            nc = await nats.connect(srv.url)
            js = nc.jetstream()
            await js.add_stream(name="PLANT", subjects=["plant.>"])
            for topic, payload in stream["messages"]:
                dev = topic.split("/")[1]
                body = json.loads(payload)
                if isinstance(body, dict):
                    body.pop("device_id", None)  # the subject names the device
                await js.publish(f"plant.north.{dev}.tm", json.dumps(body).encode())
            await nc.close()

        asyncio.run(publish())
        ingest = f"{srv.url}/plant.*.*.tm?stream=PLANT&durable=gw&device_template=plant.*.{{device}}.tm"
        asyncio.run(_run_until(srv.url, ingest, store_url, store, expected_received(stream["sent"], {})))
        check_store_exact(store, stream["sent"], {})
    finally:
        store.close()
        srv.stop()


def _readings_of(rec: tuple[bytes | None, bytes, dict[str, str]], prefix: str) -> list[tuple[str, dict]]:
    """The valid readings a resent good message carries (bad ones count as dead letters again)."""
    key, value, headers = rec
    try:
        body = json.loads(value)
    except ValueError:
        return []
    if headers or (key is not None and key.decode().endswith("-bad")):
        return []
    if isinstance(body, dict) and "readings" in body:
        dev = body["device_id"]
        return [(dev, r) for r in body["readings"]]
    if isinstance(body, dict):
        dev = key.decode() if key else body["device_id"]
        return [(dev, {k: v for k, v in body.items() if k != "device_id"})]
    return [(key.decode(), r) for r in body]  # type: ignore[union-attr]


def _dead_in(recs: list[tuple[bytes | None, bytes, dict[str, str]]]) -> dict[str, int]:
    assert not any(k is not None and k.decode().endswith("-bad") for k, _, _ in recs), "keep the resent part clean"
    return {}


@pytest.mark.integration
def test_kafka_ingest_takes_records_field_by_field_and_acknowledges_each_partitions_last(tansu_url: str):
    """The Kafka ingest reads its records field by field (``fetch_fields``, no BusRecord per message): the same
    messages as the bus consumer's ``fetch``; its ack commits each partition's last offset, so a gateway of
    the same group that starts next takes exactly the messages not acknowledged."""
    from fieldmesh.bus import load_bus

    prefix = f"kr{uuid.uuid4().hex[:6]}"
    topic = f"raw-{prefix}"
    base, query = tansu_url.split("?", 1)
    records = [(f"{prefix}-d{i % 7}".encode() if i % 5 else None,
                json.dumps({"device_id": f"{prefix}-d{i % 7}", "ts": 1_700_000_000_000 + i,
                            "measurements": {"t": i}}).encode(),
                {"content-type": "application/json"} if i % 3 == 0 else {})
               for i in range(400)]
    produce(tansu_url, topic, records)
    url = f"{base}/{topic}?group=gw-{prefix}&{query}"

    async def take(source: object, n: int) -> list:
        got: list = []
        for _ in range(200):
            if len(got) >= n:
                break
            got += await source.fetch(64, 0.2)  # type: ignore[attr-defined]
        return got

    async def main() -> None:
        first = load_ingest(url)
        await first.start()
        got = await take(first, 400)
        # what the bus consumer's fetch gives for the same topic, as BusRecords
        async with load_bus(tansu_url) as bus:
            c = await bus.consumer(topic, group=f"check-{prefix}")
            recs: list = []
            for _ in range(200):
                if len(recs) >= 400:
                    break
                recs += await c.fetch(500, 0.2)
            await c.close()
        assert len(got) == len(recs) == 400
        by_pos = {(r.partition, r.offset): r for r in recs}
        for m in got:
            p, o = m.handle
            r = by_pos[(p, o)]
            assert m.payload == r.value
            assert m.source_id == f"k{topic}-{p}-{o}"
            assert m.content_type == ("application/json" if r.headers.get("content-type") else None)
            assert m.topic == f"devices/{json.loads(r.value)['device_id']}/telemetry"
        # fetch order per partition is offset order
        for p in {m.handle[0] for m in got}:
            offs = [m.handle[1] for m in got if m.handle[0] == p]
            assert offs == sorted(offs)
        await first.ack(got[:250])  # the first 250 as fetched: each partition up to its last among them
        want: dict[int, int] = {}
        for m in got[:250]:
            want[m.handle[0]] = max(want.get(m.handle[0], -1), m.handle[1])
        async with load_bus(tansu_url) as bus:  # the commit is asynchronous: wait for the broker to have it
            committed: dict[int, int] = {}
            for _ in range(100):
                committed = await bus.committed(topic, group=f"gw-{prefix}")
                if committed == want:
                    break
                await asyncio.sleep(0.1)
            assert committed == want
        await first.close()
        second = load_ingest(url)
        await second.start()
        rest = await take(second, 150)
        await asyncio.sleep(0.5)
        rest += await second.fetch(64, 0.5)
        await second.close()
        assert sorted(m.handle for m in rest) == sorted(m.handle for m in got[250:])

    asyncio.run(main())


@pytest.mark.integration
def test_a_running_gateway_collects_its_youngest_objects_less_often(tansu_factory):
    """Once its sources are started, a gateway freezes what it holds and raises the collector's first threshold
    (runtime.worker.GC_THRESHOLD0): at CPython's 700 the collector ran thousands of times a million messages."""
    import gc

    from fieldmesh.runtime.worker import GC_THRESHOLD0

    tansu_url, _ = tansu_factory()  # a broker of its own: its fm.readings has this test's partition count
    prefix = f"gc{uuid.uuid4().hex[:6]}"
    topic = f"raw-{prefix}"
    base, query = tansu_url.split("?", 1)
    produce(tansu_url, topic, [(b"d1", json.dumps({"ts": 1_700_000_000_000, "measurements": {"t": 1}}).encode(), {})])
    before = gc.get_threshold()
    gc.set_threshold(700, *before[1:])

    async def main() -> tuple[int, int, int]:
        stop = asyncio.Event()
        task = asyncio.create_task(run_gateway(
            bus_url=tansu_url, mqtt_url=None, ingest_urls=[f"{base}/{topic}?group=gw-{prefix}&{query}"],
            settings=load_settings(bus={"partitions": 2}), stop=stop))
        try:
            for _ in range(300):
                if gc.get_threshold()[0] != 700 or task.done():
                    break
                await asyncio.sleep(0.1)
            return gc.get_threshold()
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    try:
        assert asyncio.run(main()) == (GC_THRESHOLD0, *before[1:])
        assert gc.get_freeze_count() > 0
    finally:
        gc.set_threshold(*before)
