"""Helpers of the beyond-one-machine tests: a Kafka ingest topic, stand-alone role processes, exactness."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fieldmesh.bus.base import TopicSpec
from fieldmesh.store.base import HotStore
from fmtest import oracle

#: Kafka settings of the ingest producer (what a bridge would use).
INGEST_PRODUCER = {"enable.idempotence": True, "acks": "all", "compression.type": "lz4", "linger.ms": 5,
                   "partitioner": "murmur2_random"}


KafkaMsg = tuple[bytes | None, bytes, dict[str, str]]


def as_kafka(msgs: Sequence[tuple[str, bytes]], *, unkeyed_every: int = 3) -> list[KafkaMsg]:
    """MQTT-shaped ``(topic, payload)`` -> Kafka ``(key, value, headers)`` as a bridge would write them.

    The key is the device id, except for every ``unkeyed_every``-th message whose payload carries
    ``device_id`` itself (the ingress then reads it from the payload). A topic suffix becomes a
    ``content-type`` header.
    """
    out: list[KafkaMsg] = []
    for i, (topic, payload) in enumerate(msgs):
        parts = topic.split("/")
        dev = parts[1]
        headers = {"content-type": f"application/{parts[3]}"} if len(parts) > 3 else {}
        key: bytes | None = dev.encode()
        if unkeyed_every and i % unkeyed_every == 0 and _payload_device(payload) == dev:
            key = None
        out.append((key, payload, headers))
    return out


def _payload_device(payload: bytes) -> str | None:
    try:
        body = json.loads(payload)
    except ValueError:
        return None
    return body.get("device_id") if isinstance(body, dict) else None


def produce(bootstrap_url: str, topic: str, records: Sequence[tuple[bytes | None, bytes, dict[str, str]]],
            *, partitions: int = 4) -> None:
    """Create ``topic`` (explicit configs) and produce the records to it, keyed."""
    import confluent_kafka

    from fieldmesh.bus.kafka import KafkaBus

    async def create() -> str:
        async with KafkaBus(bootstrap_url) as bus:
            await bus.ensure_topic(TopicSpec(topic, partitions, retention_s=86400))
            return bus.brokers

    brokers = asyncio.run(create())
    p = confluent_kafka.Producer({"bootstrap.servers": brokers, **INGEST_PRODUCER})
    errors: list[Any] = []
    for i, (k, v, h) in enumerate(records):
        while True:
            try:
                p.produce(topic, value=v, key=k, headers=h or None,
                          on_delivery=lambda e, m: errors.append(e) if e else None)
                break
            except BufferError:
                p.poll(0.05)
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    assert not errors, errors[:3]


def expected_received(sent: Sequence[Any], dead: dict[str, int]) -> int:
    """What ``StoreStats.received`` is once everything went through."""
    return len(sent) + sum(dead.values())


def wait_store(store: HotStore, received: int, timeout_s: float = 60, what: Callable[[], str] = lambda: "") -> None:
    """Wait until the store counted ``received`` readings and payloads."""
    deadline = time.monotonic() + timeout_s
    st = store.stats()
    while time.monotonic() < deadline:
        st = store.stats()
        if st.received >= received:
            return
        time.sleep(0.2)
    raise TimeoutError(f"store received {st.received} of {received}: {st}\n{what()}")


def check_store_exact(store: HotStore, sent: Sequence[tuple[str, dict[str, Any]]], dead: dict[str, int]) -> None:
    """The store's counters, 1-minute and 1-hour rollups equal the oracle's, to the last bit."""
    uniq = oracle.unique_readings(list(sent))
    st = store.stats()
    assert st.received == expected_received(sent, dead), st
    assert st.stored == len(uniq), st
    assert st.duplicates == len(sent) - len(uniq), st
    assert dict(st.dead_lettered) == dead, st
    for interval in ("1m", "1h"):
        expected = oracle.rollups(list(sent), interval)
        got = {(r["device_id"], r["metric"], r["window_start_ms"]): r
               for r in store.rollups(interval=interval, device_id=None, metric=None, start_ms=None, end_ms=None,
                                      limit=10**7)}
        assert set(got) == set(expected), (interval, len(got), len(expected))
        for k, e in expected.items():
            g = got[k]
            assert (g["count"], g["sum"], g["min"], g["max"], g["avg"]) == (
                e["count"], e["sum"], e["min"], e["max"], e["avg"]), (k, g, e)


class Role:
    """A stand-alone ``fieldmesh <role>`` process, its output in a log file."""

    def __init__(self, log_dir: Path, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.args = [sys.executable, "-m", "fieldmesh", *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Role:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def wait_log(self, needle: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{self.tail()}"
            if needle in self.tail(10**6):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: {needle!r} not logged in {timeout_s}s:\n{self.tail()}")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
