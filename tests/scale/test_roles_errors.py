"""Stand-alone roles against bad external systems: a clear error naming what to fix, exit code 2."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fieldmesh.bus.base import TopicSpec
from fieldmesh.bus.kafka import KafkaBus
from fieldmesh.store import load_store

pytestmark = pytest.mark.integration


def fieldmesh(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fieldmesh", *args], capture_output=True, text=True,
                          timeout=timeout_s)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_line(text: str) -> str:
    return " ".join(text.split())  # rich wraps long messages


def test_unreachable_kafka_names_the_brokers(tmp_path: Path):
    port = closed_port()
    r = fieldmesh("process", "--bus-url", f"kafka://127.0.0.1:{port}", "--store-url", f"sqlite:///{tmp_path}/s.db",
                  "--retry-for", "4")
    out = one_line(r.stderr)
    assert r.returncode == 2, out
    assert f"cannot reach Kafka brokers 127.0.0.1:{port}" in out
    assert "retrying in" in out  # transient: the connection is retried with backoff ...
    assert "restarting in" in out  # ... and the role restarts until the outage outlasts --retry-for


def test_wrong_postgres_credentials_name_the_url_to_fix(tansu_url, pg_url):
    bad = pg_url.replace("postgres@", "no_such_role@", 1)
    r = fieldmesh("process", "--bus-url", tansu_url, "--store-url", bad)
    out = one_line(r.stderr)
    assert r.returncode == 2, out
    assert 'role "no_such_role" does not exist' in out and "--store-url" in out
    r = fieldmesh("api", "--store-url", bad, "--http-port", str(closed_port()))
    assert r.returncode == 2 and "no_such_role" in one_line(r.stderr)


def test_wrong_partition_count_names_the_count(tansu_factory, tmp_path: Path):
    url, _ = tansu_factory()

    async def make() -> None:
        async with KafkaBus(url) as bus:
            await bus.ensure_topic(TopicSpec("fm.readings", 6))

    asyncio.run(make())
    r = fieldmesh("process", "--bus-url", url, "--store-url", f"sqlite:///{tmp_path}/s.db", "--total-partitions", "4")
    out = one_line(r.stderr)
    assert r.returncode == 2, out
    assert "'fm.readings' has 6 partitions" in out and "4" in out
    r = fieldmesh("gateway", "--bus-url", url, "--partitions", "4", "--ingest-url", f"{url.split('?')[0]}/nope")
    out = one_line(r.stderr)
    assert r.returncode == 2 and "has 6 partitions" in out, out


def test_missing_ingest_topic_is_named(tansu_url):
    topic = f"missing-{uuid.uuid4().hex[:6]}"
    base, query = tansu_url.split("?", 1)
    r = fieldmesh("gateway", "--bus-url", tansu_url, "--ingest-url", f"{base}/{topic}?{query}")
    out = one_line(r.stderr)
    assert r.returncode == 2, out
    assert f"Kafka ingest topic '{topic}' does not exist" in out


def test_store_schema_of_another_version_is_refused(tansu_url, pg_url):
    import psycopg

    schema = f"v{uuid.uuid4().hex[:6]}"
    url = f"{pg_url}?schema={schema}"
    load_store(url).close()  # a current store
    with psycopg.connect(pg_url, autocommit=True) as con:
        con.execute(f"UPDATE {schema}.meta SET value = '99' WHERE key = 'schema_version'")
    r = fieldmesh("process", "--bus-url", tansu_url, "--store-url", url)
    out = one_line(r.stderr)
    assert r.returncode == 2, out
    assert "store schema version 99" in out
