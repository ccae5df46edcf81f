"""The gateway's identity checks: the sender is the topic's device, and (when enforced) a registered one.

- A payload naming a device other than its topic's is ``device_mismatch``; where the topic is the
  sender's authenticated identity (``gateway.authenticated_topics``, implied by enforced registration)
  it is ``unauthorized``. A payload without a device id is the topic's device's, as the contract says.
- With ``gateway.require_registration``: not registered -> ``unknown_device``; suspended or retired ->
  ``unauthorized``; the gateway follows the registry's changes; a registry it cannot read keeps the last
  devices it read, and before the first read it takes no message.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from fieldmesh.core.codec import decode_bus_readings
from fieldmesh.core.errors import ConfigError
from fieldmesh.core.settings import GatewaySettings, load_settings
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.gateway.admission import Admission, RegisteredDevices, build_admission
from fieldmesh.gateway.base import IngestMessage
from fieldmesh.gateway.gateway import _route_bulk, route
from fieldmesh.runtime.worker import run_gateway, run_processor
from fieldmesh.store.registry import DeviceRegistry
from fieldmesh.store.sqlite import SqliteStore

NOW = 1_763_812_345_000
S = GatewaySettings()
PG = "postgresql://postgres@127.0.0.1:5432"


def _msg(device: str, body: object, i: int = 0) -> IngestMessage:
    return IngestMessage(topic=f"devices/{device}/telemetry", payload=json.dumps(body).encode(), received_ms=NOW,
                         source_id=f"m{i}")


def _readings(records: list) -> list[tuple[str, int | None]]:
    return sorted((r.device_id, r.seq) for rec in records if rec.topic == READINGS_TOPIC
                  for r in decode_bus_readings(rec.value))


def _reading(seq: int, **kw: object) -> dict[str, object]:
    return {"ts": NOW, "seq": seq, "measurements": {"t": 1.0}, **kw}


# ---- the payload's device and the topic's ---------------------------------------------------------


def test_a_payload_naming_another_device_is_unauthorized_where_the_topic_is_the_sender():
    msgs = [
        _msg("pump-1", _reading(0)),  # no device id: the topic's device (the contract)
        _msg("pump-1", _reading(1, device_id="pump-1")),  # its own id
        _msg("pump-1", _reading(2, device_id="pump-2"), 1),  # another device's
        _msg("pump-1", {"device_id": "pump-2", "readings": [_reading(3)]}, 2),  # a batch for another device
        _msg("pump-1", [_reading(4), _reading(5, device_id="pump-9")], 3),  # one reading of an array
    ]
    authenticated = Admission(authenticated_topics=True)
    assert not authenticated.checks  # nothing to check before decoding; only what a mismatch is called
    for admission, reason in ((None, "device_mismatch"), (authenticated, "unauthorized")):
        records, _n, dead = route(msgs, settings=S, partitions=2, now_ms=NOW, admission=admission)
        assert _readings(records) == [("pump-1", 0), ("pump-1", 1), ("pump-1", 4)]
        assert [d.reason for d in dead] == [reason] * 3
        assert all(d.device_id == "pump-1" for d in dead)
    assert "device_id 'pump-2' does not match topic 'pump-1'" in dead[0].detail
    assert "the topic names the authenticated sender, which may publish only its own readings" in dead[0].detail
    assert "reading[1]" in dead[2].detail  # the array's bad reading, by its index
    # a batch of legitimate single readings still takes the bulk path and gives the same records
    good = [_msg(f"d{i % 3}", _reading(i, **({"device_id": f"d{i % 3}"} if i % 2 else {})), i) for i in range(30)]
    assert route(good, settings=S, partitions=2, now_ms=NOW, admission=authenticated)[0] == route(
        good, settings=S, partitions=2, now_ms=NOW)[0]


def test_a_payload_for_another_device_costs_only_itself_in_the_bulk_path():
    good = [_msg(f"d{i % 3}", _reading(i), i) for i in range(40)]
    bad = _msg("d1", _reading(99, device_id="d2"), 99)
    msgs = [*good[:17], bad, *good[17:]]
    bulk = _route_bulk(msgs, S, 2, NOW)
    assert bulk is not None and bulk[2] == [17]  # the batch stays on the bulk path; that one is set aside
    clean = route(good, settings=S, partitions=2, now_ms=NOW)
    for admission, reason in ((None, "device_mismatch"), (Admission(authenticated_topics=True), "unauthorized")):
        records, n, dead = route(msgs, settings=S, partitions=2, now_ms=NOW, admission=admission)
        assert n == 40 and [d.reason for d in dead] == [reason] and dead[0].device_id == "d1"
        readings = [rec for rec in records if rec.topic == READINGS_TOPIC]
        assert [decode_bus_readings(r.value) for r in readings] == [
            decode_bus_readings(r.value) for r in clean[0] if r.topic == READINGS_TOPIC]
    # every payload for another device: the message-by-message path, as before
    assert _route_bulk([bad], S, 2, NOW) is None


# ---- registration ----------------------------------------------------------------------------------


@pytest.fixture
def registry_url(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    reg = DeviceRegistry(url)
    reg.add("ok-1", actor="test")
    reg.add("off-1", status="suspended", actor="test")
    reg.add("gone-1", status="retired", actor="test")
    reg.close()
    yield url


def test_registration_refuses_unknown_and_inactive_devices_and_follows_changes(registry_url: str):
    s = GatewaySettings(require_registration=True)
    admission = build_admission(s, lambda: DeviceRegistry(registry_url))
    assert admission is not None and admission.registered is not None and admission.authenticated_topics
    reg_view = admission.registered
    assert asyncio.run(reg_view.poll_once()) and reg_view.ready
    assert reg_view.active == {"ok-1"} and reg_view.inactive == {"off-1": "suspended", "gone-1": "retired"}
    msgs = [_msg(d, _reading(i), i) for i, d in enumerate(["ok-1", "off-1", "new-1", "gone-1", "ok-1"])]
    msgs.append(IngestMessage(topic="devices/x/other", payload=b"{}", received_ms=NOW, source_id="m9"))
    records, _n, dead = route(msgs, settings=s, partitions=2, now_ms=NOW, admission=admission)
    assert _readings(records) == [("ok-1", 0), ("ok-1", 4)]
    got = {(d.device_id, d.reason) for d in dead}
    assert got == {("off-1", "unauthorized"), ("new-1", "unknown_device"), ("gone-1", "unauthorized"),
                   ("x", "unknown_topic")}  # a topic nothing serves is still that, registered or not
    by_device = {d.device_id: d.detail for d in dead}
    assert "'new-1' is not registered, and registration is enforced" in by_device["new-1"]
    assert "'off-1' is suspended in the device registry" in by_device["off-1"]
    assert "'gone-1' is retired" in by_device["gone-1"]

    reg = DeviceRegistry(registry_url)
    try:
        reg.add("new-1", actor="test")
        reg.update("ok-1", status="suspended", actor="test")
    finally:
        reg.close()
    assert asyncio.run(reg_view.poll_once())  # the version changed: read again
    assert not asyncio.run(reg_view.poll_once())  # and not again while it stays
    records, _n, dead = route(msgs[:3], settings=s, partitions=2, now_ms=NOW, admission=admission)
    assert _readings(records) == [("new-1", 2)]
    assert sorted((d.device_id, d.reason) for d in dead) == [("off-1", "unauthorized"), ("ok-1", "unauthorized")]
    _close(reg_view)


def test_registration_without_a_registry_is_a_config_error():
    with pytest.raises(ConfigError, match="FIELDMESH__GATEWAY__REQUIRE_REGISTRATION needs the device registry"):
        build_admission(GatewaySettings(require_registration=True))


def test_before_the_first_read_the_gateway_waits_and_counts_the_failures():
    view = RegisteredDevices(lambda: DeviceRegistry(f"{PG}/fm_no_such_db_{uuid.uuid4().hex[:8]}"), poll_s=0.05)

    async def go() -> bool:
        stop = asyncio.Event()
        poller = asyncio.create_task(view.run(stop))
        waiter = asyncio.create_task(view.wait_ready(stop))
        for _ in range(200):
            if view.errors >= 3:
                break
            await asyncio.sleep(0.05)
        assert not waiter.done()  # still waiting: no message is taken
        stop.set()
        await poller
        return await waiter

    assert asyncio.run(go()) is False
    assert not view.ready and view.errors >= 3 and view.last_error


@pytest.fixture
def pg_registry() -> Iterator[tuple[str, str]]:
    name = f"fm_gwreg_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{PG}/{name}", name
    finally:
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as con:
            con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.integration
def test_a_registry_lost_after_a_read_keeps_the_last_devices(pg_registry: tuple[str, str]):
    url, name = pg_registry
    reg = DeviceRegistry(url)
    reg.add("ok-1", actor="test")
    reg.close()
    s = GatewaySettings(require_registration=True)
    admission = build_admission(s, lambda: DeviceRegistry(url))
    assert admission is not None and admission.registered is not None
    view = admission.registered

    async def go() -> None:
        assert await view.poll_once()
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as con:
            con.execute(f"DROP DATABASE {name} WITH (FORCE)")
        assert not await view.poll_once()
        assert not await view.poll_once()  # the next tries open it again, and fail again

    asyncio.run(go())
    assert view.errors == 2 and view.ready and view.active == {"ok-1"}
    records, _n, dead = route([_msg("ok-1", _reading(0)), _msg("new-1", _reading(1), 1)], settings=s, partitions=2,
                             now_ms=NOW, admission=admission)
    assert _readings(records) == [("ok-1", 0)] and [d.reason for d in dead] == ["unknown_device"]
    _close(view)


def _close(view: RegisteredDevices) -> None:
    """Close the registry connection and thread the view holds (what its poller does when it stops)."""

    async def stopped() -> None:
        stop = asyncio.Event()
        stop.set()
        await view.run(stop)

    asyncio.run(stopped())


# ---- through a real bus: NATS subjects -> gateway (with the registry) -> JetStream -> processor -> store


@pytest.mark.integration
def test_refused_devices_land_in_the_dlq_and_are_counted(tmp_path: Path, registry_url: str):
    from fieldmesh.runtime.natsserver import EmbeddedNats

    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()
    prefix = f"ic{uuid.uuid4().hex[:6]}"
    store_url = f"sqlite:///{tmp_path / 'data.db'}"
    store = SqliteStore(store_url)
    cfg = load_settings(bus={"partitions": 2}, gateway={"require_registration": True})
    sent = [("ok-1", _reading(0)), ("ok-1", _reading(1, device_id="off-1")), ("off-1", _reading(2)),
            ("gone-1", _reading(3)), ("new-1", _reading(4)), ("ok-1", _reading(5))]
    try:
        async def publish() -> None:
            import nats

            nc = await nats.connect(srv.url)
            js = nc.jetstream()
            await js.add_stream(name="IC", subjects=[f"{prefix}.>"])
            for dev, body in sent:
                await js.publish(f"{prefix}.{dev}.tm", json.dumps(body).encode())
            await nc.close()

        async def run() -> None:
            stop = asyncio.Event()
            ingest = f"{srv.url}/{prefix}.*.tm?stream=IC&durable=gw&device_template={prefix}.{{device}}.tm"
            tasks = [asyncio.create_task(run_gateway(bus_url=srv.url, mqtt_url=None, ingest_urls=[ingest],
                                                     settings=cfg, stop=stop, registry_url=registry_url)),
                     asyncio.create_task(run_processor(bus_url=srv.url, store_url=store_url, settings=cfg, stop=stop))]
            try:
                for _ in range(900):
                    if store.stats().received >= len(sent):
                        break
                    for t in tasks:
                        if t.done():
                            t.result()
                    await asyncio.sleep(0.1)
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 60)

        asyncio.run(publish())
        asyncio.run(run())
        st = store.stats()
        assert st.stored == 2, st
        # the payload naming off-1 on ok-1's subject: unauthorized (registration makes the topic the identity)
        assert st.dead_lettered == {"unauthorized": 3, "unknown_device": 1}, st
        assert [r["device_id"] for r in store.dlq(reason="unknown_device", limit=10)] == ["new-1"]
    finally:
        store.close()
        srv.stop()
