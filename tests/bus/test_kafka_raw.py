"""The Kafka consumer's ``fetch_raw``: the records of ``fetch``, field by field, held records included."""

from __future__ import annotations

import secrets
import time

import pytest

from fieldmesh.bus import OutRecord, TopicSpec, load_bus
from fieldmesh.bus.kafka import KafkaConsumer

pytestmark = [pytest.mark.integration, pytest.mark.anyio, pytest.mark.timeout(120)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_fetch_raw_gives_the_records_in_order_held_ones_first_and_none_twice(tansu_url: str) -> None:
    topic = f"raw.{secrets.token_hex(4)}"
    async with load_bus(tansu_url) as bus:
        await bus.ensure_topic(TopicSpec(name=topic, partitions=2, retention_s=3600))
        sent = [OutRecord(topic, i % 2, f"v{i:03d}".encode() * 10, key=f"k{i}".encode(),
                          headers={"h": str(i)} if i % 3 == 0 else None) for i in range(60)]
        await bus.producer().send(sent)
        c = await bus.consumer(topic, group=f"g.{secrets.token_hex(4)}")
        assert isinstance(c, KafkaConsumer)
        first: list = []
        deadline = time.monotonic() + 30
        while not first and time.monotonic() < deadline:
            first = await c.fetch(60, 0.5, max_bytes=100)  # about 3 records; the rest of the fetch is held
        assert 0 < len(first) < 60
        got = [(r.partition, r.offset, r.value, r.key, dict(r.headers)) for r in first]
        while len(got) < 60 and time.monotonic() < deadline:
            raw = await c.fetch_raw(7, 0.5)
            assert len(raw) <= 7
            assert raw.topic == topic
            got += list(zip(raw.partitions, raw.offsets, raw.values, raw.keys, map(dict, raw.headers), strict=True))
        assert len(got) == 60
        assert len(set((p, o) for p, o, *_ in got)) == 60  # none twice
        for p in (0, 1):  # offset order per partition
            offsets = [o for q, o, *_ in got if q == p]
            assert offsets == sorted(offsets)
        want = {s.value: (s.partition, s.key, s.headers or {}) for s in sent}
        for p, _o, value, key, headers in got:
            assert want[value] == (p, key, headers)
        assert len(await c.fetch_raw(10, 0.5)) == 0  # nothing more
        await c.close()
