"""The gateway's rounds: caught up with its source, a round begins ``linger_ms`` after the one before; behind, at once.
Idle, the stages ask the bus about once a second.

A source hands over what it has as soon as it has anything. Messages coming steadily below the maximum rate
made a round of a message or two each, whose fixed costs (bus publishes, acknowledgements) took the CPU the
lower rate saved. Real parts: an embedded nats-server, a JetStream stream of the user's subjects as the
gateway's source, the NATS bus, the processor and a SQLite store, all checked exact at the end.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest

from e2e.dataset import make_stream
from fieldmesh.core.settings import Settings, load_settings
from fieldmesh.obs.metrics import GATEWAY_BATCH
from fieldmesh.runtime.worker import run_gateway, run_processor
from fieldmesh.store.sqlite import SqliteStore
from fmtest.scale import check_store_exact, expected_received

pytestmark = pytest.mark.integration


def _rounds() -> float:
    """Rounds the gateways of this process delivered so far (the batch histogram's count)."""
    return next(s.value for s in GATEWAY_BATCH.collect()[0].samples if s.name.endswith("_count"))


async def _publish(url: str, messages: list[tuple[str, bytes]], every_s: float) -> None:
    """Each message on ``plant.north.<device>.tm`` (the subject names the device), ``every_s`` apart."""
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        t0 = time.monotonic()
        for i, (topic, payload) in enumerate(messages):
            if every_s:
                await asyncio.sleep(max(0.0, t0 + i * every_s - time.monotonic()))
            body = json.loads(payload)
            if isinstance(body, dict):
                body.pop("device_id", None)
            await js.publish(f"plant.north.{topic.split('/')[1]}.tm", json.dumps(body).encode())
    finally:
        await nc.close()


def _run(tmp_path: Path, *, gateway: dict[str, int], every_s: float, backlog: bool) -> tuple[float, float, int]:
    """The stream through gateway and processor, checked exact; the rounds delivered, the seconds from the gateway's
    start until all was stored, and the messages."""
    from fieldmesh.runtime.natsserver import EmbeddedNats

    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()
    prefix = f"pr{uuid.uuid4().hex[:6]}"
    stream = make_stream(prefix, devices=8, per_device=75)
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    store = SqliteStore(store_url)
    try:
        async def setup() -> None:
            import nats

            nc = await nats.connect(srv.url)
            await nc.jetstream().add_stream(name="PLANT", subjects=["plant.>"])
            await nc.close()

        asyncio.run(setup())
        if backlog:  # all of it waiting before the gateway starts
            asyncio.run(_publish(srv.url, stream["messages"], 0))
        settings = load_settings(bus={"partitions": 4}, gateway=gateway)

        async def main() -> tuple[float, float, int]:
            stop = asyncio.Event()
            rounds0, t0 = _rounds(), time.monotonic()
            tasks = _stages(srv.url, store_url, settings, stop)
            if not backlog:
                tasks.append(asyncio.create_task(_publish(srv.url, stream["messages"], every_s)))
            try:
                for _ in range(600):
                    if store.stats().received >= expected_received(stream["sent"], {}):
                        return _rounds() - rounds0, time.monotonic() - t0, len(stream["messages"])
                    for t in tasks:
                        if t.done():
                            t.result()
                    await asyncio.sleep(0.05)
                raise AssertionError(f"not all stored in 30 s: {store.stats()}")
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 30)

        out = asyncio.run(main())
        check_store_exact(store, stream["sent"], {})
        return out
    finally:
        store.close()
        srv.stop()


def test_caught_up_a_round_begins_linger_after_the_one_before(tmp_path: Path):
    """Several hundred messages, one every 6 ms: a round about every 100 ms (linger_ms), not one of a message or two
    each."""
    rounds, took, n = _run(tmp_path, gateway={"linger_ms": 100}, every_s=0.006, backlog=False)
    assert rounds <= took / 0.1 + 3, (rounds, took, n)  # without the pacing: about one a message
    assert rounds >= 0.5 * n * 0.006 / 0.1, (rounds, took, n)  # and none held back for longer


def test_behind_full_rounds_follow_at_once(tmp_path: Path):
    """A backlog of several hundred messages, in rounds of 25: full rounds, none waiting for a linger of 2 s."""
    rounds, took, n = _run(tmp_path, gateway={"linger_ms": 2000, "batch_max_messages": 25}, every_s=0, backlog=True)
    assert rounds >= n / 25, (rounds, n)
    assert took < 10, (rounds, took, n)  # paced, each of the 16 or more rounds would wait 2 s


def _stages(url: str, store_url: str, settings: Settings, stop: asyncio.Event) -> list[asyncio.Task[None]]:
    """A gateway taking the PLANT ingest stream of nats-server ``url`` and a processor into ``store_url``."""
    ingest = f"{url}/plant.*.*.tm?stream=PLANT&durable=gw&device_template=plant.*.{{device}}.tm"
    return [
        asyncio.create_task(run_gateway(bus_url=url, mqtt_url=None, ingest_urls=[ingest], settings=settings,
                                        stop=stop)),
        asyncio.create_task(run_processor(bus_url=url, store_url=store_url, settings=settings, stop=stop)),
    ]


def test_idle_stages_ask_the_bus_seldom_and_a_message_is_stored_at_once(tmp_path: Path):
    """Idle, the gateway and the processor ask the bus about once a second: a fetch waits up to the gateway's
    ``fetch_wait_ms`` and the processor's ``fetch_timeout_s`` (both a second) for a first record. At 20 and 50 ms
    they asked 20-50 times a second each, and an idle pipeline took about a tenth of a core (nats-server, gateway
    and processor). A message that comes is stored at once all the same: the bus hands over its first record as it
    comes. Every pull request of every stage is counted by a subscriber of the JetStream API's pull subject."""
    import nats

    from fieldmesh.runtime.natsserver import EmbeddedNats

    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()
    stream = make_stream(f"idle{uuid.uuid4().hex[:6]}", devices=1, per_device=1)
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    store = SqliteStore(store_url)
    settings = load_settings(bus={"partitions": 4})
    try:
        async def main() -> tuple[dict[str, int], float]:
            nc = await nats.connect(srv.url)
            await nc.jetstream().add_stream(name="PLANT", subjects=["plant.>"])
            pulls: dict[str, int] = {}

            async def count(msg: nats.aio.msg.Msg) -> None:  # $JS.API.CONSUMER.MSG.NEXT.<stream>.<durable>
                durable = msg.subject.rsplit(".", 1)[1]
                pulls[durable] = pulls.get(durable, 0) + 1

            await nc.subscribe("$JS.API.CONSUMER.MSG.NEXT.>", cb=count)
            stop = asyncio.Event()
            tasks = _stages(srv.url, store_url, settings, stop)
            try:
                for _ in range(100):  # every stage's consumer asking
                    await asyncio.sleep(0.1)
                    if len(pulls) >= 3 and not any(t.done() for t in tasks):
                        break
                await asyncio.sleep(1.5)
                before = dict(pulls)
                await asyncio.sleep(4.0)
                idle = {d: n - before.get(d, 0) for d, n in pulls.items()}
                t0 = time.monotonic()
                await _publish(srv.url, stream["messages"], 0)
                while store.stats().received < 1:
                    for t in tasks:
                        if t.done():
                            t.result()
                    assert time.monotonic() - t0 < 10, "the message was not stored in 10 s"
                    await asyncio.sleep(0.01)
                return idle, time.monotonic() - t0
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 30)
                await nc.close()

        idle, took = asyncio.run(main())
        print(f"pull requests in 4 s idle, per durable: {idle}; one message stored in {took * 1000:.0f} ms")
        assert len(idle) >= 3, idle  # the gateway's source, the processor's readings and its dead letters
        # a fetch on an empty consumer is two pull requests (what it has now, then a wait for a first record)
        assert all(n <= 12 for n in idle.values()), idle
        assert took < 0.9, took  # not a stage's wait for a first record (a second each)
        check_store_exact(store, stream["sent"], {})
    finally:
        store.close()
        srv.stop()


def test_a_stop_ends_the_stages_wait_for_a_first_record_at_once(tmp_path: Path):
    """A stage told to stop does not first finish its wait for a first record: with the gateway's ``fetch_wait_ms``
    and the processor's ``fetch_timeout_s`` at 30 s, idle stages end within a few seconds of the stop (a stage used
    to finish the fetch it waited in, so ``fieldmesh up`` stopped a second slower once those waits became a
    second). What was stored before the stop is all there."""
    from fieldmesh.runtime.natsserver import EmbeddedNats

    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()
    stream = make_stream(f"stop{uuid.uuid4().hex[:6]}", devices=2, per_device=3)
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    store = SqliteStore(store_url)
    settings = load_settings(bus={"partitions": 2}, gateway={"fetch_wait_ms": 30_000},
                             processor={"fetch_timeout_s": 30.0})
    try:
        async def main() -> float:
            import nats

            nc = await nats.connect(srv.url)
            await nc.jetstream().add_stream(name="PLANT", subjects=["plant.>"])
            await nc.close()
            stop = asyncio.Event()
            tasks = _stages(srv.url, store_url, settings, stop)
            try:
                await _publish(srv.url, stream["messages"], 0)
                t0 = time.monotonic()
                while store.stats().received < expected_received(stream["sent"], {}):
                    for t in tasks:
                        if t.done():
                            t.result()
                    assert time.monotonic() - t0 < 20, "the messages were not stored in 20 s"
                    await asyncio.sleep(0.02)
                await asyncio.sleep(1.0)  # both stages in their long wait
            finally:
                t_stop = time.monotonic()
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 60)
            return time.monotonic() - t_stop

        took = asyncio.run(main())
        print(f"stopped in {took:.2f} s")
        assert took < 5.0, took
        check_store_exact(store, stream["sent"], {})
    finally:
        store.close()
        srv.stop()
