"""One behaviour suite for every bus adapter (NATS JetStream, Kafka via tansu).

Each test makes its own topic and group names, so the servers are shared per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fieldmesh.bus import Bus, BusRecord, Consumer, IngestSpec, OutRecord, TopicSpec, load_bus
from fieldmesh.bus.nats import NatsBus
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


async def test_positions_behind_what_the_group_acknowledged_are_delivered_again(bus: Bus) -> None:
    """A caller that acknowledged records one of its sinks had only buffered (then lost) gets them again
    from its positions; a partition idle since its position does not pull the start back."""
    topic = await _topic(bus, partitions=2)
    group = _name("g")
    await bus.producer().send([OutRecord(topic, 1, b"idle")])
    await bus.producer().send([OutRecord(topic, 0, f"r{i}".encode()) for i in range(10)])
    c = await bus.consumer(topic, group=group, partitions=[0, 1])
    got = await _fetch_n(c, 11)
    await c.ack(got)
    await asyncio.sleep(0.5)  # Kafka commits asynchronously: let it land before leaving
    await c.close()
    by_value = {r.value: r for r in got}
    needed = {0: by_value[b"r5"].offset, 1: by_value[b"idle"].offset}  # r6.. must come again
    c2 = await bus.consumer(topic, group=group, partitions=[0, 1], positions=lambda parts: needed)
    again = await _fetch_n(c2, 4)
    assert [r.value for r in again] == [f"r{i}".encode() for i in range(6, 10)]
    assert await c2.fetch(10, 0.5) == []
    await c2.ack(again)
    await asyncio.sleep(0.5)
    await c2.close()
    # a caller that never applied partition 0 (a new sink: position -1) gets all of it again
    c3 = await bus.consumer(topic, group=group, partitions=[0, 1], positions=lambda parts: {0: -1, 1: needed[1]})
    got3: list[BusRecord] = []
    deadline = time.monotonic() + 30
    while sum(r.partition == 0 for r in got3) < 10 and time.monotonic() < deadline:
        got3 += await c3.fetch(20, 0.5)
    # records at or below a position are the caller's to skip (NATS may deliver them: one start sequence)
    assert [r.value for r in got3 if r.partition == 0] == [f"r{i}".encode() for i in range(10)]
    await c3.close()


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


# ---- the rest of the contract: ingest, lag per partition, committed, fencing, sizing, topics --------


def _ingest(backend: Backend, **kw: object) -> tuple[IngestSpec, str, str]:
    """``(spec, topic to send on, subject the records carry)`` of a fresh ingest stream or topic."""
    tag = secrets.token_hex(4)
    if backend.kind == "nats":  # a stream of the user's, named as it is, over raw subjects
        return IngestSpec(f"ING_{tag}", (f"ing{tag}.>",), **kw), f"ing{tag}.dev", f"ing{tag}.dev.0"  # type: ignore[arg-type]
    return IngestSpec(f"ing{tag}", **kw), f"ing{tag}", f"ing{tag}"  # type: ignore[arg-type]


async def test_ingest_is_idempotent_resumes_the_group_and_records_carry_subject(bus: Bus, backend: Backend) -> None:
    spec, topic, subject = _ingest(backend)
    group = _name("gw")
    c = await bus.ingest(spec, group=group)
    await bus.producer().send([OutRecord(topic, 0, f"m{i}".encode()) for i in range(3)])
    got = await _fetch_n(c, 3)
    assert [r.value for r in got] == [b"m0", b"m1", b"m2"]
    assert {r.subject for r in got} == {subject}
    assert {r.partition for r in got} == {0}
    await c.ack(got[:2])

    async def acked() -> bool:
        return (await bus.committed(spec.name, group=group)).get(0, -1) >= got[1].offset

    assert await _eventually(acked)
    await c.close()
    again = await bus.ingest(spec, group=group)  # the same set-up again: no error, same position
    rest = await _fetch_n(again, 1)
    assert [r.value for r in rest] == [b"m2"]
    assert await again.fetch(10, 0.5) == []
    assert await bus.topic_exists(spec.name)
    await again.close()


async def test_ingest_of_a_missing_existing_stream_is_a_config_error(bus: Bus, backend: Backend) -> None:
    spec, _, _ = _ingest(backend, mode="existing")
    with pytest.raises(ConfigError, match="does not exist") as ei:
        await bus.ingest(spec, group=_name("gw"))
    assert ei.value.key == "ingest_url"
    assert not await bus.topic_exists(spec.name)


async def test_ingest_adopt_uses_a_stream_that_exists(bus: Bus, backend: Backend) -> None:
    spec, topic, _ = _ingest(backend)
    first = await bus.ingest(spec, group=_name("a"))  # creates it
    await bus.producer().send([OutRecord(topic, 0, b"kept")])
    await first.close()
    adopted = await bus.ingest(IngestSpec(spec.name, spec.subjects, mode="adopt"), group=_name("b"))
    assert [r.value for r in await _fetch_n(adopted, 1)] == [b"kept"]
    await adopted.close()


async def test_nats_sole_consumer_acknowledges_a_batch_with_its_last_record(embedded_nats_url: str) -> None:
    """NATS only: a sole owner's consumer acknowledges all up to a record (AckPolicy.ALL), so a batch costs one
    acknowledgement message, not one per record. A durable an earlier version made with per-record
    acknowledgements is made again at its acknowledged floor: what it acknowledged does not come again."""
    from nats.js.api import AckPolicy

    from fieldmesh.bus.nats import NatsBus, stream_name

    async with load_bus(embedded_nats_url) as bus:
        assert isinstance(bus, NatsBus)
        topic = await _topic(bus, partitions=2)
        durable = f"g-{secrets.token_hex(4)}"
        await bus.producer().send([OutRecord(topic, i % 2, f"r{i}".encode()) for i in range(10)])
        old = await bus.raw_consumer(stream_name(topic), durable, [f"{topic}.*"], topic=topic)  # per record
        first = await _fetch_n(old, 10)
        await old.ack(first[:4])

        async def floor_moved() -> bool:  # the server applies acknowledgements after they arrive
            info = await bus.js.consumer_info(stream_name(topic), durable)
            return bool(info.ack_floor.stream_seq >= first[3].offset)

        assert await _eventually(floor_moved, timeout_s=5.0)  # what it acknowledged, as the server has it
        await old.close()
        c = await bus.consumer(topic, group=durable)
        info = await bus.js.consumer_info(stream_name(topic), durable)
        assert info.config.ack_policy == AckPolicy.ALL
        got = await _fetch_n(c, 6)
        assert [r.value for r in got] == [f"r{i}".encode() for i in range(4, 10)]
        sent = bus.nc.stats["out_msgs"]
        await c.ack(got)
        assert bus.nc.stats["out_msgs"] - sent == 1  # the last record's acknowledgement covers the batch

        async def acked() -> bool:  # an acknowledgement is a message the server handles after it arrives
            return await bus.pending(topic, group=durable) == 0

        assert await _eventually(acked, timeout_s=5.0)
        info = await bus.js.consumer_info(stream_name(topic), durable)
        assert info.num_ack_pending == 0 and info.ack_floor.stream_seq == got[-1].offset
        await c.close()
        again = await bus.consumer(topic, group=durable)
        assert await again.fetch(10, 0.5) == []
        await again.close()


async def test_nats_sole_ingest_consumer_trims_what_it_acknowledged(embedded_nats_url: str) -> None:
    """NATS only: a sole gateway's stream keeps only what is not acknowledged yet (Kafka: retention)."""
    async with load_bus(embedded_nats_url) as bus:
        spec, topic, _ = _ingest(Backend("nats", embedded_nats_url))
        group = _name("gw")
        c = await bus.ingest(spec, group=group, sole=True)
        await bus.producer().send([OutRecord(topic, 0, f"m{i}".encode()) for i in range(5)])
        got = await _fetch_n(c, 5)
        await c.ack(got[:3])
        await c.close()
        # another reader from the start of the stream sees only what was not acknowledged
        other = await bus.ingest(spec, group=_name("other"))
        assert [r.value for r in await _fetch_n(other, 2)] == [b"m3", b"m4"]
        assert await other.fetch(10, 0.5) == []
        await other.close()
        assert await bus.pending(spec.name, group=group) == 2


async def test_lag_per_partition_counts_after_positions_else_acks(bus: Bus) -> None:
    topic = await _topic(bus, partitions=2)
    group = _name("g")
    # one send per record: tansu reports a high watermark per record batch (docs: INFRA quirk)
    for r in [OutRecord(topic, 0, f"0:{i}".encode()) for i in range(5)] + [
            OutRecord(topic, 1, f"1:{i}".encode()) for i in range(3)]:
        await bus.producer().send([r])
    assert await bus.lag(topic, group=group) == {0: 5, 1: 3}  # a group never seen: every record
    c = await bus.consumer(topic, group=group)
    got = await _fetch_n(c, 8)
    p0 = [r for r in got if r.partition == 0]
    # the caller applied p0 up to its 2nd record: 3 left there; p1 has no position: the group's acks (none)
    assert await bus.lag(topic, group=group, positions={0: p0[1].offset}) == {0: 3, 1: 3}
    assert await bus.lag(topic, group=group, positions={0: p0[-1].offset, 1: got[-1].offset}) == {0: 0, 1: 0}
    await c.ack(got)

    async def drained() -> bool:
        return await bus.lag(topic, group=group) == {0: 0, 1: 0}

    assert await _eventually(drained)
    assert sum((await bus.lag(topic, group=group)).values()) == await bus.pending(topic, group=group)
    assert await bus.lag(_name("missing"), group=group) == {}
    await c.close()


async def test_committed_is_what_the_group_acknowledged_per_partition(bus: Bus) -> None:
    topic = await _topic(bus, partitions=2)
    group = _name("g")
    await bus.producer().send([OutRecord(topic, i % 2, f"{i}".encode()) for i in range(6)])
    c = await bus.consumer(topic, group=group)
    got = await _fetch_n(c, 6)
    assert await bus.committed(topic, group=group) == {}
    await c.ack(got)
    last = {p: max(r.offset for r in got if r.partition == p) for p in (0, 1)}

    async def acked() -> bool:
        done = await bus.committed(topic, group=group)
        return set(done) == {0, 1} and all(done[p] >= last[p] for p in (0, 1))

    assert await _eventually(acked)
    # every record at or below the committed offset was acknowledged: nothing past the last one is claimed
    done = await bus.committed(topic, group=group)
    assert all(done[p] < last[p] + 10 for p in (0, 1))
    await c.close()


async def test_apply_fenced_applies_owned_records_and_returns_the_result(bus: Bus) -> None:
    topic = await _topic(bus, partitions=2)
    await bus.producer().send([OutRecord(topic, i % 2, f"{i}".encode()) for i in range(4)])
    c = await bus.consumer(topic, group=_name("g"))
    got = await _fetch_n(c, 4)
    seen: list[int] = []

    def fn(recs: Sequence[BusRecord]) -> int:
        seen.extend(int(r.value) for r in recs)
        return len(recs)

    kept, n = await asyncio.to_thread(c.apply_fenced, got, fn)
    assert sorted(seen) == [0, 1, 2, 3] and n == 4 and kept == got
    assert await asyncio.to_thread(c.apply_fenced, [], fn) == ([], None)
    await c.close()


async def test_kafka_apply_fenced_drops_the_records_of_a_revoked_partition(tansu_url: str) -> None:
    """Kafka only: records fetched before a rebalance took their partition are not applied nor acked."""
    async with load_bus(tansu_url) as bus:
        topic = await _topic(bus, partitions=2)
        group = _name("g")
        a = await bus.consumer(topic, group=group)
        await bus.producer().send([OutRecord(topic, i % 2, f"{i}".encode()) for i in range(10)])
        old = await _fetch_n(a, 10)
        assert {r.partition for r in old} == {0, 1}
        b = await bus.consumer(topic, group=group)

        async def split() -> bool:
            await a.fetch(10, 0.2)
            await b.fetch(10, 0.2)
            return len(a.assignment) == 1 and len(b.assignment) == 1  # type: ignore[attr-defined]

        assert await _eventually(split, timeout_s=40)
        owned = set(a.assignment)  # type: ignore[attr-defined]
        applied: list[BusRecord] = []
        kept, _ = await asyncio.to_thread(a.apply_fenced, old, applied.extend)
        assert kept == applied == [r for r in old if r.partition in owned]
        assert len(kept) == 5
        await a.close()
        await b.close()


async def test_fetch_max_bytes_bounds_a_batch_and_keeps_the_rest(bus: Bus) -> None:
    topic = await _topic(bus, partitions=1)
    sent = [f"{i:03d}".encode() * 25 for i in range(20)]  # 75 bytes each
    big = b"B" * 1000
    await bus.producer().send([OutRecord(topic, 0, v) for v in [*sent, big]])
    c = await bus.consumer(topic, group=_name("g"))
    got: list[BusRecord] = []
    deadline = time.monotonic() + 30
    while len(got) < 21 and time.monotonic() < deadline:
        batch = await c.fetch(100, 0.5, max_bytes=200)
        if batch:
            assert len(batch) == 1 or sum(len(r.value) for r in batch) <= 200, [len(r.value) for r in batch]
        got += batch
    assert [r.value for r in got] == [*sent, big]  # in order, nothing lost or repeated
    assert await c.fetch(10, 0.5, max_bytes=200) == []
    await c.close()


async def test_topic_exists_partition_count_and_balancing(bus: Bus, backend: Backend) -> None:
    topic = await _topic(bus, partitions=3)
    assert await bus.topic_exists(topic)
    assert await bus.partition_count(topic) == 3
    missing = _name("missing")
    assert not await bus.topic_exists(missing)
    assert await bus.partition_count(missing) is None
    assert bus.balances_groups is (backend.kind == "kafka")


async def test_drop_consumer_forgets_the_group(bus: Bus) -> None:
    topic = await _topic(bus, partitions=1)
    group = _name("g")
    await bus.drop_consumer(topic, group=group)  # none yet: nothing to do
    await bus.producer().send([OutRecord(topic, 0, f"r{i}".encode()) for i in range(3)])
    c = await bus.consumer(topic, group=group)
    got = await _fetch_n(c, 3)
    await c.ack(got)

    async def acked() -> bool:
        return bool(await bus.committed(topic, group=group))

    assert await _eventually(acked)
    await c.close()
    await bus.drop_consumer(topic, group=group)
    assert await bus.committed(topic, group=group) == {}
    again = await bus.consumer(topic, group=group)  # a fresh group: from the start
    assert [r.value for r in await _fetch_n(again, 3)] == [b"r0", b"r1", b"r2"]
    await again.close()


async def test_behind_says_whether_records_were_waiting_at_the_last_fetch(bus: Bus, backend: Backend) -> None:
    """NATS tells (the ack subject's pending count, records held back by ``max_bytes``); Kafka cannot (None)."""
    topic = await _topic(bus, partitions=1)
    await bus.producer().send([OutRecord(topic, 0, b"x" * 100) for _ in range(10)])
    c = await bus.consumer(topic, group=_name("g"))
    got = await c.fetch(3, 5.0)
    if backend.kind == "kafka":
        assert c.behind() is None
        await c.close()
        return
    assert len(got) == 3 and c.behind() is True  # 7 more were waiting
    got = await c.fetch(100, 5.0, max_bytes=250)  # two records' bytes: the rest is held back
    assert len(got) == 2 and c.behind() is True
    rest = await c.fetch(100, 5.0)
    assert len(rest) == 5 and c.behind() is False  # caught up
    assert await c.fetch(100, 0.2) == [] and c.behind() is False
    await c.close()


async def test_a_long_fetch_returns_at_its_first_record(bus: Bus, backend: Backend) -> None:
    """A fetch waits its timeout only while nothing comes: stages wait a second for a first record (an idle stage
    asks its bus seldom), so a fetch that held on for ``max_records`` (Kafka's ``consume`` does) would hold the
    records of a stream at part load for that second."""
    topic = await _topic(bus, partitions=1)
    c = await bus.consumer(topic, group=_name("g"))
    producer = bus.producer()
    await producer.send([OutRecord(topic, 0, b"first")])
    assert [r.value for r in await _fetch_n(c, 1)] == [b"first"]  # (Kafka: the group joined, the partition is ours)
    for values in ([b"a"], [b"b", b"c", b"d"]):
        async def later(values: list[bytes] = values) -> None:
            await asyncio.sleep(0.3)
            await producer.send([OutRecord(topic, 0, v) for v in values])

        task = asyncio.create_task(later())
        t0 = time.monotonic()
        got = await c.fetch(100, 10.0)
        took = time.monotonic() - t0
        await task
        assert got and took < 3.0, (got, took)  # not the 10 s of the timeout, nor waiting for 100 records
        got += await _fetch_n(c, len(values) - len(got), 5.0) if len(got) < len(values) else []
        assert [r.value for r in got] == values
    await c.close()


async def test_nats_fetch_returns_when_a_record_comes_and_a_late_message_is_kept(embedded_nats_url: str) -> None:
    """The NATS consumer's own pull requests: on an empty consumer a fetch waits its timeout for a first record
    and returns as soon as one comes, and a record the server delivers after a fetch gave up is served by the
    next fetch (never dropped)."""
    async with load_bus(embedded_nats_url) as bus:
        topic = await _topic(bus, partitions=1)
        c = await bus.consumer(topic, group=_name("g"))
        t0 = time.monotonic()
        assert await c.fetch(10, 3.0) == [] and time.monotonic() - t0 >= 2.9  # waited: nothing came

        async def later() -> None:
            await asyncio.sleep(0.3)
            await bus.producer().send([OutRecord(topic, 0, b"one")])

        t0 = time.monotonic()
        task = asyncio.create_task(later())
        got = await c.fetch(10, 5.0)
        await task
        assert [r.value for r in got] == [b"one"] and time.monotonic() - t0 < 2.0
        await c.ack(got)
        puller = c._sub  # type: ignore[attr-defined]
        # a long poll the server holds while this side stops waiting (its timeout shorter than the poll)
        await puller.fetch(1, 0.05, expires_s=2.0)
        await bus.producer().send([OutRecord(topic, 0, b"two")])
        await asyncio.sleep(0.3)  # delivered to the poll nobody waits for any more
        got = await c.fetch(10, 0.5)
        assert [r.value for r in got] == [b"two"]
        await c.ack(got)
        await c.close()


class _CuttableProxy:
    """A TCP proxy to a nats-server that can swallow what the server sends (it reads and drops it, so the server
    counts it delivered) and then cut every connection (the client reconnects through it, forwarded again)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit("//", 1)[1].rsplit(":", 1)
        self.up = (host, int(port))
        self.swallow = False
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(*self.up)
        self.writers += [cw, sw]

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, downstream: bool) -> None:
            try:
                while data := await r.read(65536):
                    if not (downstream and self.swallow):
                        w.write(data)
                        await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(cr, sw, False), pipe(sr, cw, True))

    def cut(self) -> None:
        self.swallow = False
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()


async def _cut_and_reconnect(proxy: _CuttableProxy, bus: NatsBus) -> None:
    """Cut the connection through ``proxy`` and wait until ``bus``'s client has reconnected."""
    before = bus.nc.stats["reconnects"]
    proxy.cut()
    deadline = time.monotonic() + 20
    while bus.nc.stats["reconnects"] == before and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert bus.nc.stats["reconnects"] > before


async def test_nats_records_lost_with_a_connection_come_again_before_later_ones(embedded_nats_url: str) -> None:
    """A fetch's answer lost with its connection (JetStream counts those records delivered, waiting for an
    acknowledgement until ack_wait): after the reconnect the consumer resumes at what it acknowledged, so they
    come again before the records after them. Else a caller that skips what its positions passed (the
    processor) would apply the later records first and then skip these: lost."""
    proxy = _CuttableProxy(embedded_nats_url)
    url = await proxy.start()
    try:
        async with load_bus(embedded_nats_url) as direct, load_bus(url) as bus:
            topic = await _topic(direct, partitions=1)
            await direct.producer().send([OutRecord(topic, 0, f"r{i}".encode()) for i in range(6)])
            c = await bus.consumer(topic, group=_name("g"))
            first = await c.fetch(1, 5.0)
            assert [r.value for r in first] == [b"r0"]
            await c.ack(first)
            proxy.swallow = True  # the next answer goes nowhere
            assert await c.fetch(2, 0.5) == []
            proxy.cut()
            got: list[bytes] = []
            deadline = time.monotonic() + 20
            while len(got) < 5 and time.monotonic() < deadline:
                with contextlib.suppress(BackendUnavailable):
                    recs = await c.fetch(10, 1.0)
                    got += [r.value for r in recs]
                    await c.ack(recs)
            assert got == [b"r1", b"r2", b"r3", b"r4", b"r5"]  # without the resume: r4, r5 (r1..r3 after ack_wait)
            await c.close()
    finally:
        await proxy.close()


async def test_nats_fetch_of_a_deleted_consumer_is_an_error_not_silence(embedded_nats_url: str) -> None:
    import nats.js.errors

    async with load_bus(embedded_nats_url) as bus:
        topic = await _topic(bus, partitions=1)
        group = _name("g")
        c = await bus.consumer(topic, group=group)
        await bus.drop_consumer(topic, group=group)
        with pytest.raises(nats.js.errors.APIError):  # 503: no consumer answers the pull request
            for _ in range(3):
                await c.fetch(10, 1.0)
        await c.close()


@pytest.mark.parametrize("sole", [True, False], ids=["sole", "shared"])
async def test_nats_fetch_outlives_a_server_restart(tmp_path: Path, sole: bool) -> None:
    """A pull request the server ends because it shuts down (status 409 "Server Shutdown") is not an error: the
    stage keeps running while the client reconnects, and what was sent before and after comes, none lost. (``up``
    restarts its nats-server to close and open the MQTT door on a full disk; the gateway and the processor used to
    crash on that answer and come back through the supervisor's restart.)"""
    from fieldmesh.runtime.natsserver import EmbeddedNats

    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()
    try:
        async with load_bus(srv.url) as bus:
            topic = await _topic(bus, partitions=1)
            await bus.producer().send([OutRecord(topic, 0, b"before")])
            c = await bus.consumer(topic, group=_name("g"), reset_pending=sole)
            got = await _fetch_n(c, 1)
            assert [r.value for r in got] == [b"before"]
            await c.ack(got)
            waiting = asyncio.create_task(c.fetch(10, 8.0))  # a pull request the server holds
            await asyncio.sleep(0.5)
            await asyncio.to_thread(srv.stop)
            assert await asyncio.wait_for(waiting, 15) == []  # ended by the shutdown: nothing, and no error

            async def fetch_through() -> list[BusRecord]:
                """Fetch all along, while the client reconnects and JetStream loads its streams again (a pull
                request it cannot answer yet is a 503): no error, until the record sent after comes."""
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if recs := await c.fetch(10, 0.2):
                        return recs
                return []

            fetching = asyncio.create_task(fetch_through())
            await asyncio.to_thread(srv.start)
            await asyncio.wait_for(bus.producer().send([OutRecord(topic, 0, b"after")]), 20)
            got = await asyncio.wait_for(fetching, 40)
            assert [r.value for r in got] == [b"after"]
            await c.ack(got)
            await c.close()
    finally:
        srv.stop()


async def test_nats_acks_of_records_fetched_before_a_resume_leave_the_new_durable_alone(embedded_nats_url: str) -> None:
    """After a reconnect the durable is made again under the same name: an acknowledgement of a record fetched
    before (a batch the processor was still committing) would reach it, counted in the old delivery sequence, and
    leave an acknowledged floor past what it delivered, with lag that never goes (seen after a full disk). Those
    records come again instead, and their acknowledgement is the new durable's."""
    proxy = _CuttableProxy(embedded_nats_url)
    url = await proxy.start()
    try:
        async with load_bus(embedded_nats_url) as direct, load_bus(url) as bus:
            topic = await _topic(direct, partitions=1)
            group = _name("g")
            await direct.producer().send([OutRecord(topic, 0, f"r{i}".encode()) for i in range(8)])
            c = await bus.consumer(topic, group=group)
            first = await _fetch_n(c, 4)
            await c.ack(first)
            before = await _fetch_n(c, 2)  # delivered as 5 and 6 of the durable's count
            assert [r.value for r in first + before] == [f"r{i}".encode() for i in range(6)]
            proxy.cut()
            again: list[BusRecord] = []
            deadline = time.monotonic() + 20
            while len(again) < 2 and time.monotonic() < deadline:
                with contextlib.suppress(BackendUnavailable):
                    again += await c.fetch(2 - len(again), 1.0)
            assert [r.value for r in again] == [b"r4", b"r5"]  # resumed after what was acknowledged: as 1 and 2
            await c.ack(before)  # committed meanwhile: their acknowledgement comes after the resume
            await c.ack(again)
            rest = await _fetch_n(c, 2)
            assert [r.value for r in rest] == [b"r6", b"r7"]
            await c.ack(rest)
            assert await _eventually(lambda: _pending_is(direct, topic, group, 0)), \
                f"lag {await direct.pending(topic, group=group)} after every record was acknowledged"
            await c.close()
    finally:
        await proxy.close()


async def test_nats_a_pull_request_from_before_a_resume_takes_no_record_away(embedded_nats_url: str) -> None:
    """A pull request sent on the old connection's inbox can outlive a reconnect: buffered through it, or sent by a
    fetch whose first step spanned it, the server holds it while it waits. A record that came for it after the
    resume would go to an inbox nothing reads, and come again only after ``ack_wait`` (a minute), behind later
    records. The resume makes the durable again, which ends such requests: the record comes at once. (CI saw this
    as the record sent after a server restart not coming within 30 s.)"""
    proxy = _CuttableProxy(embedded_nats_url)
    url = await proxy.start()
    try:
        async with load_bus(embedded_nats_url) as direct, load_bus(url) as bus:
            assert isinstance(bus, NatsBus)
            topic = await _topic(direct, partitions=1)
            await direct.producer().send([OutRecord(topic, 0, b"r0")])
            c = await bus.consumer(topic, group=_name("g"))
            first = await _fetch_n(c, 1)
            await c.ack(first)
            await _cut_and_reconnect(proxy, bus)
            old = c._sub  # the puller of the durable as it was before the reconnect
            assert await old.fetch(10, 0.05, expires_s=30.0) == []  # it gave up waiting; the server holds it on
            # The resume unsubscribes the old inbox, and the server drops a request nobody listens for; but a record
            # can come in the moment between the resume's look at the durable and that unsubscribe (as in CI). A
            # listener of the old inbox stands for that moment, and sees whether the held request still takes one.
            stray: list[bytes] = []

            async def _on_stray(m: Any) -> None:
                stray.append(m.data)

            listener = await bus.nc.subscribe(old._inbox, cb=_on_stray)
            assert await c.fetch(10, 0.2) == []  # the resume
            assert c._sub is not old
            await direct.producer().send([OutRecord(topic, 0, b"r1")])
            got = await c.fetch(10, 10.0)
            assert [r.value for r in got] == [b"r1"]
            assert b"r1" not in stray
            await c.ack(got)
            await listener.unsubscribe()
            await c.close()
    finally:
        await proxy.close()


async def _pending_is(bus: Bus, topic: str, group: str, n: int) -> bool:
    return await bus.pending(topic, group=group) == n


async def test_nats_a_resume_the_server_does_not_answer_yet_is_tried_again(embedded_nats_url: str) -> None:
    """After a reconnect the consumer's resume asks the server for its durable; a server that does not answer yet
    (a restarted one loading its streams) makes that fetch come back empty, not fail the stage: the next fetch
    tries again, and every record comes, in order."""
    proxy = _CuttableProxy(embedded_nats_url)
    url = await proxy.start()
    try:
        async with load_bus(embedded_nats_url) as direct, load_bus(url) as bus:
            assert isinstance(bus, NatsBus)
            topic = await _topic(direct, partitions=1)
            await direct.producer().send([OutRecord(topic, 0, f"r{i}".encode()) for i in range(3)])
            c = await bus.consumer(topic, group=_name("g"))
            first = await _fetch_n(c, 1)
            await c.ack(first)
            await _cut_and_reconnect(proxy, bus)
            proxy.swallow = True  # the server's answers go nowhere: the resume's request times out
            assert await c.fetch(10, 1.0) == []
            proxy.swallow = False
            proxy.cut()  # what was swallowed may have cut a message in two: a clean connection
            got: list[bytes] = []
            deadline = time.monotonic() + 30
            while len(got) < 2 and time.monotonic() < deadline:
                recs = await c.fetch(10, 1.0)
                got += [r.value for r in recs]
                await c.ack(recs)
            assert [r.value for r in first] + got == [b"r0", b"r1", b"r2"]
            await c.close()
    finally:
        await proxy.close()


async def test_fetch_fields_sized_in_bytes_gives_every_record_once_in_order(bus: Bus, backend: Backend) -> None:
    """``fetch_fields(max_bytes=...)`` (the gateway's rounds): the values of each answer add up to ``max_bytes``
    at most, unless it is one record; what a fetch held back comes next, none twice, none lost, offset order."""
    topic = await _topic(bus, partitions=2)
    sent = [OutRecord(topic, i % 2, f"w{i:03d}".encode() * 10, key=f"k{i}".encode()) for i in range(60)]  # 40 B
    big = OutRecord(topic, 0, b"x" * 300, key=b"big")  # larger than max_bytes alone: comes as an answer of its own
    await bus.producer().send([*sent[:30], big, *sent[30:]])
    c = await bus.consumer(topic, group=_name("g"))
    got: list[tuple[int, int, bytes]] = []
    sizes: list[int] = []
    deadline = time.monotonic() + 30
    while len(got) < 61 and time.monotonic() < deadline:
        f = await c.fetch_fields(60, 0.5, max_bytes=100)
        if len(f):
            sizes.append(sum(map(len, f.values)))
            assert len(f) == 1 or sizes[-1] <= 100, (len(f), sizes[-1])
        got += list(zip(f.partitions, f.offsets, f.values, strict=True))
    assert len(got) == 61
    assert len({(p, o) for p, o, _ in got}) == 61  # none twice
    assert sorted(v for *_, v in got) == sorted([s.value for s in sent] + [big.value])
    assert 300 in sizes  # the big record alone
    assert max(s for s in sizes if s != 300) <= 100 and len(sizes) >= 30  # 40-byte records, two an answer at most
    for p in (0, 1):  # offset order per partition
        offsets = [o for q, o, _ in got if q == p]
        assert offsets == sorted(offsets)
    assert len(await c.fetch_fields(10, 0.5, max_bytes=100)) == 0  # nothing more
    await c.close()


async def test_fetch_fields_gives_the_records_in_order_held_ones_first_and_none_twice(
        bus: Bus, backend: Backend) -> None:
    """``fetch_fields``: what ``fetch`` gives, field by field; records a ``fetch(max_bytes=...)`` held back come
    first and none is dropped; NATS records carry their ack handles, Kafka's none (it acknowledges by position)."""
    topic = await _topic(bus, partitions=2)
    sent = [OutRecord(topic, i % 2, f"v{i:03d}".encode() * 10, key=f"k{i}".encode(),
                      headers={"h": str(i)} if i % 3 == 0 else None) for i in range(60)]
    await bus.producer().send(sent)
    c = await bus.consumer(topic, group=_name("g"))
    first: list[BusRecord] = []
    deadline = time.monotonic() + 30
    while not first and time.monotonic() < deadline:
        first = await c.fetch(60, 0.5, max_bytes=100)  # a few records; the rest of what came is held
    assert 0 < len(first) < 60
    got = [(r.partition, r.offset, r.value, r.key, dict(r.headers), r.handle) for r in first]
    while len(got) < 60 and time.monotonic() < deadline:
        f = await c.fetch_fields(7, 0.5)
        assert len(f) <= 7 and f.topic == topic
        handles = f.handles if f.handles is not None else [None] * len(f)
        got += list(zip(f.partitions, f.offsets, f.values, f.keys, map(dict, f.headers), handles, strict=True))
    assert len(got) == 60
    assert len({(p, o) for p, o, *_ in got}) == 60  # none twice
    for p in (0, 1):  # offset order per partition
        offsets = [o for q, o, *_ in got if q == p]
        assert offsets == sorted(offsets)
    want = {s.value: (s.partition, s.key, {k: v for k, v in (s.headers or {}).items()}) for s in sent}
    for p, _o, value, key, headers, _h in got:
        assert want[value] == (p, key, {k: v for k, v in headers.items() if k in ("h",)})
    assert all(h is not None for *_, h in got) == (backend.kind == "nats")
    assert len(await c.fetch_fields(10, 0.5)) == 0  # nothing more
    await c.ack([BusRecord(topic, p, o, b"", handle=h) for p, o, _v, _k, _hd, h in got])
    await c.close()
