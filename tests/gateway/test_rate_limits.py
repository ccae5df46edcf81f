"""Per-device rate limits at the gateway: token buckets for messages and bytes, the excess dead-lettered.

The buckets are checked over whole batches (numpy); an oracle that takes one message at a time, as a
token bucket is defined, must refuse exactly the same messages.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldmesh.core.codec import decode_bus_readings, decode_dead_letter
from fieldmesh.core.settings import GatewaySettings, load_settings
from fieldmesh.core.topics import DLQ_TOPIC, READINGS_TOPIC
from fieldmesh.gateway.admission import Admission, RateLimiter, build_admission
from fieldmesh.gateway.base import IngestMessage
from fieldmesh.gateway.gateway import route
from fieldmesh.runtime.worker import run_gateway, run_processor
from fieldmesh.store.sqlite import SqliteStore

NOW = 1_763_812_345_000


class OracleBuckets:
    """Token buckets as defined: refill by the time passed, then one message at a time."""

    def __init__(self, msg_rate: float, byte_rate: float, burst_m: float, burst_b: float) -> None:
        self.rate = (msg_rate, byte_rate)
        self.burst = (burst_m, burst_b)
        self.state: dict[str, list[float]] = {}

    def batch(self, devices: list[str], sizes: list[int], now_ms: int) -> list[int]:
        for d in dict.fromkeys(devices):
            tokens = self.state.get(d)
            if tokens is None:
                self.state[d] = [self.burst[0], self.burst[1], now_ms]
            else:
                el = max(0, now_ms - tokens[2]) / 1000
                self.state[d] = [min(self.burst[0], tokens[0] + self.rate[0] * el),
                                 min(self.burst[1], tokens[1] + self.rate[1] * el), now_ms]
        refused = []
        for i, (d, size) in enumerate(zip(devices, sizes, strict=True)):
            t = self.state[d]
            if t[0] >= 1 and t[1] >= size:
                t[0] -= 1
                t[1] -= size
            else:
                refused.append(i)
        return refused


# rates, sizes and times (multiples of 250 ms) keep every token count a dyadic fraction: exact in floats
batches = st.lists(
    st.tuples(st.integers(0, 8),  # quarter seconds since the last batch
              st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 64)), max_size=40)),
    min_size=1, max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches, st.sampled_from([1.0, 2.0, 4.0]), st.sampled_from([16.0, 64.0]), st.sampled_from([1.0, 2.0, 4.0]))
def test_batched_buckets_refuse_exactly_what_one_message_at_a_time_refuses(
    seq: list[tuple[int, list[tuple[str, int]]]], msg_rate: float, byte_rate: float, burst_s: float,
):
    lim = RateLimiter(messages_per_s=msg_rate, bytes_per_s=byte_rate, burst_s=burst_s, min_burst_bytes=32)
    oracle = OracleBuckets(msg_rate, byte_rate, lim.burst_messages, lim.burst_bytes)
    now = NOW
    for quarters, items in seq:
        now += quarters * 250
        devices = [d for d, _ in items]
        payloads = [b"x" * n for _, n in items]
        got = lim.refuse(devices, payloads, now)
        assert got == oracle.batch(devices, [len(p) for p in payloads], now)


def test_limits_off_refuse_nothing_and_messages_only_ignores_bytes():
    assert not RateLimiter().enabled and RateLimiter().refuse(["a"] * 5, [b"x"] * 5, NOW) == []
    lim = RateLimiter(messages_per_s=1, burst_s=3)
    assert lim.refuse(["a"] * 5 + ["b"], [b"x" * 10**6] * 6, NOW) == [3, 4]  # 3 of a; b has its own bucket
    assert lim.refuse(["a"] * 2, [b"x"] * 2, NOW + 1000) == [1]  # one second: one more message
    assert lim.refuse([None, "", "a"], [b"x"] * 3, NOW + 1000) == [2]  # no device: not limited here


def test_a_payload_larger_than_the_bytes_burst_is_refused_and_says_so():
    lim = RateLimiter(bytes_per_s=100, burst_s=1, min_burst_bytes=200)
    assert lim.burst_bytes == 200
    assert lim.refuse(["a", "a", "a"], [b"x" * 150, b"x" * 100, b"x" * 40], NOW) == [1]  # 150 + 40 fit in 200
    assert "larger than the rate limit's burst of 200 bytes" in lim.detail("a", 300)
    assert "over its rate limit (100 bytes/s" in lim.detail("a", 50)


def test_idle_buckets_are_dropped_and_memory_stays_bounded():
    lim = RateLimiter(messages_per_s=10, burst_s=1, max_devices=100, sweep_s=5)
    devices = [f"d{i}" for i in range(60)]
    assert lim.refuse(devices, [b"x"] * 60, NOW) == []
    assert lim.devices == 60
    # 5 s later every bucket has refilled: the sweep drops them all (a full bucket is a new one)
    assert lim.refuse(["z"], [b"x"], NOW + 5_000) == []
    assert lim.devices == 1 and lim.dropped_idle == 60
    # many devices at once, none idle: beyond max_devices the longest idle half goes
    for k in range(10):
        lim.refuse([f"e{k}-{i}" for i in range(50)], [b"x"] * 50, NOW + 5_001 + k)
        assert lim.devices <= 150
    assert lim.evicted > 0
    slots = len(lim._names)
    for k in range(20):  # and the arrays stop growing: freed slots are reused
        lim.refuse([f"f{k}-{i}" for i in range(50)], [b"x"] * 50, NOW + 5_100 + k)
    assert len(lim._names) == slots


def _msgs(items: list[tuple[str, dict[str, object]]], start: int = 0) -> list[IngestMessage]:
    return [IngestMessage(topic=f"devices/{d}/telemetry", payload=json.dumps(o).encode(), received_ms=NOW,
                          source_id=f"s{start + i}") for i, (d, o) in enumerate(items)]


def test_route_dead_letters_the_excess_in_arrival_order():
    s = GatewaySettings(rate_limit_messages_per_s=1, rate_limit_burst_s=3)
    admission = build_admission(s)
    assert admission is not None and admission.limiter is not None and admission.registered is None
    items = [("pump-1", {"ts": NOW, "seq": i, "measurements": {"t": float(i)}}) for i in range(8)]
    items.insert(4, ("pump-2", {"ts": NOW, "seq": 0, "measurements": {"t": 1.0}}))
    records, n, dead = route(_msgs(items), settings=s, partitions=4, now_ms=NOW, admission=admission)
    assert n == 4
    readings = [r for rec in records if rec.topic == READINGS_TOPIC for r in decode_bus_readings(rec.value)]
    assert sorted((r.device_id, r.seq) for r in readings) == [("pump-1", 0), ("pump-1", 1), ("pump-1", 2),
                                                              ("pump-2", 0)]
    assert [d.reason for d in dead] == ["rate_limited"] * 5
    assert {d.device_id for d in dead} == {"pump-1"}
    assert "'pump-1' is over its rate limit (1 messages/s, burst of 3 messages)" in dead[0].detail
    # each refused message is its own dead letter (with its payload, for a replay), under a stable id
    dl = [rec for rec in records if rec.topic == DLQ_TOPIC]
    assert [json.loads(decode_dead_letter(r.value).payload)["seq"] for r in dl] == [3, 4, 5, 6, 7]
    assert [r.msg_id for r in dl] == ["ds3-0", "ds5-0", "ds6-0", "ds7-0", "ds8-0"]
    # one second later: one more message of pump-1
    more = _msgs([("pump-1", {"ts": NOW, "seq": 8 + i, "measurements": {"t": 1.0}}) for i in range(2)], start=9)
    _, n, dead = route(more, settings=s, partitions=4, now_ms=NOW + 1000, admission=admission)
    assert n == 1 and [d.reason for d in dead] == ["rate_limited"]


def test_route_with_limits_nobody_reaches_gives_what_route_without_gives():
    s = GatewaySettings(rate_limit_messages_per_s=1e6, rate_limit_bytes_per_s=1e9)
    items = [(f"d{i % 7}", {"ts": NOW - i, "seq": i, "measurements": {"t": i / 3}}) for i in range(200)]
    items[50] = ("d1", {"ts": "2025-11-22T11:52:26Z", "measurements": {"t": 1.0}})  # the one-by-one path
    for msgs in (_msgs(items[:50]), _msgs(items)):
        plain = route(msgs, settings=s, partitions=4, now_ms=NOW)
        checked = route(msgs, settings=s, partitions=4, now_ms=NOW, admission=build_admission(s))
        assert [(r.partition, r.value, r.msg_id) for r in checked[0]] == [
            (r.partition, r.value, r.msg_id) for r in plain[0]]
        assert checked[1:] == plain[1:]
    assert build_admission(GatewaySettings()) is None  # nothing to check by default
    assert not Admission(limiter=RateLimiter()).checks


# ---- through a real bus: NATS subjects -> gateway -> JetStream -> processor -> store -----------------


@pytest.mark.integration
def test_the_excess_of_each_device_lands_in_the_dlq_and_is_counted(tmp_path: Path):
    from fieldmesh.runtime.natsserver import EmbeddedNats

    srv = EmbeddedNats(store_dir=tmp_path / "nats")
    srv.start()
    prefix = f"rl{uuid.uuid4().hex[:6]}"
    store_url = f"sqlite:///{tmp_path / 'store.db'}"
    store = SqliteStore(store_url)
    # 3 messages per device, and a refill so slow that no test run earns a 4th
    cfg = load_settings(bus={"partitions": 2}, gateway={"rate_limit_messages_per_s": 0.001,
                                                        "rate_limit_burst_s": 3000})
    sent = {f"{prefix}-{i}": n for i, n in enumerate((10, 3, 1))}
    try:
        async def publish() -> None:
            import nats

            nc = await nats.connect(srv.url)
            js = nc.jetstream()
            await js.add_stream(name="RL", subjects=[f"{prefix}.>"])
            for dev, n in sent.items():
                for seq in range(n):
                    await js.publish(f"{prefix}.{dev}.tm", json.dumps(
                        {"ts": NOW + seq, "seq": seq, "measurements": {"t": 1.0}}).encode())
            await nc.close()

        async def run() -> None:
            stop = asyncio.Event()
            ingest = f"{srv.url}/{prefix}.*.tm?stream=RL&durable=gw&device_template={prefix}.{{device}}.tm"
            tasks = [asyncio.create_task(run_gateway(bus_url=srv.url, mqtt_url=None, ingest_urls=[ingest],
                                                     settings=cfg, stop=stop)),
                     asyncio.create_task(run_processor(bus_url=srv.url, store_url=store_url, settings=cfg, stop=stop))]
            try:
                for _ in range(900):
                    if store.stats().received >= 14:
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
        assert st.stored == 3 + 3 + 1 and st.dead_lettered == {"rate_limited": 7}, st
        rows = store.dlq(reason="rate_limited", limit=100)
        assert {r["device_id"] for r in rows} == {f"{prefix}-0"}
        assert sorted(json.loads(r["payload"])["seq"] for r in rows) == list(range(3, 10))
        raw = store.raw(device_id=f"{prefix}-0", metric=None, start_ms=None, end_ms=None, limit=100)
        assert sorted(r["seq"] for r in raw) == [0, 1, 2]  # the first three, in the order they arrived
    finally:
        store.close()
        srv.stop()
