"""One behaviour suite for every bus adapter (NATS JetStream, Kafka via tansu).

Each test makes its own topic and group names, so the servers are shared per session.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from fieldmesh.bus import Bus, BusRecord, Consumer, OutRecord, TopicSpec, load_bus
from fieldmesh.core.errors import BackendUnavailable, ConfigError

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Backend:
    kind: str
    url: str


@pytest.fixture(params=["nats", "kafka"])
def backend(request: pytest.FixtureRequest) -> Backend:
    fixture = {"nats": "embedded_nats_url", "kafka": "tansu_url"}[request.param]
    return Backend(request.param, request.getfixturevalue(fixture))


@pytest.fixture
async def bus(backend: Backend) -> AsyncIterator[Bus]:
    async with load_bus(backend.url) as b:
        yield b


def _name(prefix: str) -> str:
    return f"{prefix}.{secrets.token_hex(4)}"


async def _topic(bus: Bus, partitions: int = 3) -> str:
    name = _name("t")
    await bus.ensure_topic(TopicSpec(name=name, partitions=partitions, retention_s=3600))
    return name


async def _fetch_n(c: Consumer, n: int, timeout_s: float = 30.0) -> list[BusRecord]:
    """Fetch until ``n`` records arrived (or the timeout); then check nothing more comes."""
    out: list[BusRecord] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out += await c.fetch(max(1, n - len(out)), 0.5)
    return out


async def _eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.2)
    return await check()


async def test_topic_creation_is_idempotent_and_usable(bus: Bus) -> None:
    topic = await _topic(bus, partitions=4)
    await bus.ensure_topic(TopicSpec(name=topic, partitions=4, retention_s=3600))  # again: no error
    await bus.producer().send([OutRecord(topic, p, f"p{p}".encode()) for p in range(4)])
    c = await bus.consumer(topic, group=_name("g"))
    got = await _fetch_n(c, 4)
    assert sorted((r.partition, r.value) for r in got) == [(p, f"p{p}".encode()) for p in range(4)]
    await c.close()


async def test_round_trip_keeps_key_headers_and_value(bus: Bus) -> None:
    topic = await _topic(bus)
    sent = [
        OutRecord(topic, i % 3, f"value-{i}".encode(), key=f"dev-{i}".encode(), headers={"h": f"x{i}"})
        for i in range(12)
    ]
    t0 = int(time.time() * 1000)
    await bus.producer().send(sent)
    c = await bus.consumer(topic, group=_name("g"))
    got = await _fetch_n(c, 12)
    assert len(got) == 12
    by_value = {r.value: r for r in got}
    for s in sent:
        r = by_value[s.value]
        assert r.key == s.key
        assert r.headers["h"] == s.headers["h"]  # type: ignore[index]
        assert r.partition == s.partition
        assert r.topic == topic
        assert abs(r.timestamp_ms - t0) < 60_000
    await c.close()


async def test_offsets_grow_in_send_order_per_partition(bus: Bus) -> None:
    topic = await _topic(bus)
    sent = [OutRecord(topic, i % 3, f"{i % 3}:{i // 3}".encode()) for i in range(60)]
    await bus.producer().send(sent)
    c = await bus.consumer(topic, group=_name("g"))
    got = await _fetch_n(c, 60)
    assert len(got) == 60
    for p in range(3):
        mine = [r for r in got if r.partition == p]
        assert [r.offset for r in mine] == sorted({r.offset for r in mine})  # strictly increasing
        assert [r.value for r in mine] == [f"{p}:{i}".encode() for i in range(20)]
    await c.close()


async def test_unacked_records_are_redelivered_after_restart(bus: Bus) -> None:
    topic = await _topic(bus, partitions=1)
    group = _name("g")
    await bus.producer().send([OutRecord(topic, 0, f"r{i}".encode()) for i in range(10)])
    c = await bus.consumer(topic, group=group)
    first = await _fetch_n(c, 10)
    assert [r.value for r in first] == [f"r{i}".encode() for i in range(10)]
    await c.ack(first[:6])
    await asyncio.sleep(0.5)  # Kafka commits asynchronously: let it land before leaving
    await c.close()
    c2 = await bus.consumer(topic, group=group)
    again = await _fetch_n(c2, 4, timeout_s=30)
    assert [r.value for r in again] == [f"r{i}".encode() for i in range(6, 10)]
    assert await c2.fetch(10, 0.5) == []
    await c2.close()


async def test_positions_hook_resumes_after_stored_positions(bus: Bus) -> None:
    topic = await _topic(bus, partitions=1)
    await bus.producer().send([OutRecord(topic, 0, f"r{i}".encode()) for i in range(10)])
    c = await bus.consumer(topic, group=_name("g"))
    offsets = [r.offset for r in await _fetch_n(c, 10)]
    await c.close()
    # A new consumer whose caller already applied up to r4 starts at r5.
    c2 = await bus.consumer(topic, group=_name("g"), partitions=[0], positions=lambda parts: {0: offsets[4]})
    got = await _fetch_n(c2, 5)
    assert [r.value for r in got] == [f"r{i}".encode() for i in range(5, 10)]
    await c2.close()


async def test_kafka_positions_hook_seeks_each_assigned_partition(tansu_url: str) -> None:
    """Kafka only: the hook runs again on every rebalance."""
    async with load_bus(tansu_url) as bus:
        await _positions_hook(bus)


async def _positions_hook(bus: Bus) -> None:
    from fieldmesh.bus.kafka import KafkaBus

    assert isinstance(bus, KafkaBus)
    topic = await _topic(bus, partitions=2)
    await bus.producer().send([OutRecord(topic, i % 2, f"{i % 2}:{i // 2}".encode()) for i in range(20)])
    asked: list[list[int]] = []

    def positions(parts: list[int]) -> dict[int, int]:
        asked.append(parts)
        return {0: 6}  # partition 0 applied up to offset 6; partition 1 has no position yet

    c = await bus.consumer(topic, group=_name("g"), positions=positions)
    got = await _fetch_n(c, 3 + 10)
    assert asked and sorted(asked[-1]) == [0, 1]
    assert [r.value for r in got if r.partition == 0] == [f"0:{i}".encode() for i in range(7, 10)]
    assert [r.value for r in got if r.partition == 1] == [f"1:{i}".encode() for i in range(10)]
    await c.close()


async def test_msg_id_deduplication(bus: Bus, backend: Backend) -> None:
    topic = await _topic(bus, partitions=1)
    rec = [OutRecord(topic, 0, b"once", msg_id="m-1"), OutRecord(topic, 0, b"other", msg_id="m-2")]
    await bus.producer().send(rec)
    await bus.producer().send(rec[:1])  # an application-level re-send of the same record
    c = await bus.consumer(topic, group=_name("g"))
    got = await _fetch_n(c, 3, timeout_s=3 if backend.kind == "nats" else 20)
    if backend.kind == "nats":
        assert [r.value for r in got] == [b"once", b"other"]  # JetStream dropped the re-send
    else:
        # Kafka de-duplicates producer *retries* (idempotent producer), not application re-sends:
        # the re-send arrives, carrying its msg_id so the store's identity de-dup can drop it.
        from fieldmesh.bus.kafka import KafkaBus

        assert isinstance(bus, KafkaBus)
        conf = bus.producer_config()
        assert conf["enable.idempotence"] is True and conf["acks"] == "all"
        assert [r.value for r in got] == [b"once", b"other", b"once"]
        assert [r.headers["Fm-Msg-Id"] for r in got] == ["m-1", "m-2", "m-1"]
        assert len({r.offset for r in got}) == 3
    await c.close()


async def test_pending_counts_lag_until_acked(bus: Bus) -> None:
    topic = await _topic(bus, partitions=2)
    group = _name("g")
    c = await bus.consumer(topic, group=group)
    await bus.producer().send([OutRecord(topic, i % 2, b"x") for i in range(20)])
    assert await _eventually(lambda: _gt0(bus.pending(topic, group=group)))
    got = await _fetch_n(c, 20)
    assert len(got) == 20
    await c.ack(got)

    async def drained() -> bool:
        return await bus.pending(topic, group=group) == 0

    assert await _eventually(drained)
    await c.close()


async def _gt0(aw: Awaitable[int]) -> bool:
    return await aw > 0


async def test_two_consumers_split_the_partitions(bus: Bus, backend: Backend) -> None:
    topic = await _topic(bus, partitions=4)
    group = _name("g")
    if backend.kind == "kafka":  # one consumer group: the broker balances the partitions
        a = await bus.consumer(topic, group=group)
        b = await bus.consumer(topic, group=group)
    else:  # NATS: a static assignment, one durable consumer per replica
        a = await bus.consumer(topic, group=f"{group}-0", partitions=[0, 1])
        b = await bus.consumer(topic, group=f"{group}-1", partitions=[2, 3])
    # let both members join before records flow (a rebalance would re-deliver un-acked records)
    got_a: list[BusRecord] = []
    got_b: list[BusRecord] = []
    if backend.kind == "kafka":

        async def balanced() -> bool:
            got_a.extend(await a.fetch(100, 0.2))
            got_b.extend(await b.fetch(100, 0.2))
            return len(a.assignment) == 2 and len(b.assignment) == 2  # type: ignore[attr-defined]

        assert await _eventually(balanced, timeout_s=40)
    await bus.producer().send([OutRecord(topic, i % 4, f"{i}".encode()) for i in range(40)])
    deadline = time.monotonic() + 30
    while len(got_a) + len(got_b) < 40 and time.monotonic() < deadline:
        got_a += await a.fetch(100, 0.3)
        got_b += await b.fetch(100, 0.3)
    parts_a = {r.partition for r in got_a}
    parts_b = {r.partition for r in got_b}
    assert parts_a and parts_b and not parts_a & parts_b
    assert parts_a | parts_b == {0, 1, 2, 3}
    assert sorted(int(r.value) for r in got_a + got_b) == list(range(40))
    await a.close()
    await b.close()


async def test_wrong_partition_count_is_a_clear_error(bus: Bus, backend: Backend) -> None:
    topic = await _topic(bus, partitions=4)
    with pytest.raises(ConfigError, match="has 4 partitions") as ei:
        await bus.ensure_topic(TopicSpec(name=topic, partitions=3, retention_s=3600))
    assert ei.value.key == "partitions"


async def test_unreachable_broker_is_backend_unavailable_quickly(backend: Backend) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"{backend.kind}://127.0.0.1:{port}"

    async def connect() -> None:
        async with load_bus(url):
            pass

    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable, match=f"127.0.0.1:{port}"):
        await asyncio.wait_for(connect(), timeout=15)
    assert time.monotonic() - t0 < 10


async def test_kafka_rebalance_resumes_from_store_positions_not_commits(tansu_url: str) -> None:
    """A member leaves without committing: its partitions move and resume after the *applied* offsets."""
    async with load_bus(tansu_url) as bus:
        topic = await _topic(bus, partitions=4)
        group = _name("g")
        applied: dict[int, int] = {}  # stands in for the store's positions table

        def positions(parts: list[int]) -> dict[int, int]:
            return {p: applied[p] for p in parts if p in applied}

        await bus.producer().send([OutRecord(topic, i % 4, f"a{i}".encode()) for i in range(40)])
        a = await bus.consumer(topic, group=group, positions=positions)  # type: ignore[call-arg]
        first = await _fetch_n(a, 40)
        assert len(first) == 40
        for r in first:  # "apply" them, without ever acking (no Kafka commit)
            applied[r.partition] = max(applied.get(r.partition, -1), r.offset)
        await bus.producer().send([OutRecord(topic, i % 4, f"b{i}".encode()) for i in range(40)])
        b = await bus.consumer(topic, group=group, positions=positions)  # type: ignore[call-arg]
        await a.close()  # leaves the group: every partition moves to b
        second = await _fetch_n(b, 40, timeout_s=40)
        assert sorted(r.value for r in second) == sorted(f"b{i}".encode() for i in range(40))
        assert await b.fetch(100, 1.0) == []
        await b.close()


async def test_kafka_send_to_a_missing_partition_is_a_backend_error(tansu_url: str) -> None:
    from fieldmesh.core.errors import BackendError

    async with load_bus(tansu_url) as bus:
        topic = await _topic(bus, partitions=2)
        with pytest.raises(BackendError, match=topic):
            await bus.producer().send([OutRecord(topic, 7, b"x")])


async def test_kafka_send_when_the_broker_died_is_backend_unavailable(
    tansu_factory: Callable[[], tuple[str, subprocess.Popen[bytes]]],
) -> None:
    base_url, proc = tansu_factory()
    bootstrap = base_url.split("://", 1)[1].split("?", 1)[0]
    async with load_bus(base_url + "&producer.message.timeout.ms=2000") as bus:
        topic = await _topic(bus, partitions=1)
        await bus.producer().send([OutRecord(topic, 0, b"before")])
        proc.kill()
        proc.wait(10)
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable, match=bootstrap):
            await bus.producer().send([OutRecord(topic, 0, b"after")])
        assert time.monotonic() - t0 < 15
