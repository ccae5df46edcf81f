"""A role waiting out a bus or store outage stops on SIGTERM, even when the signal lands while it starts.

The signal reaches the role's event loop (its stop event) while it opens its store or probes the bus; the
attempt then fails as an outage. Before, the restart loop started the role again and the signal was lost: a
`fieldmesh process` whose bus was down kept retrying for `--retry-for` seconds after SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator

import pytest

from fieldmesh.cli.main import _with_retries
from fieldmesh.core.errors import BackendUnavailable
from fieldmesh.runtime import worker


@pytest.fixture(autouse=True)
def _clear() -> Iterator[None]:
    worker.STOP_SIGNALLED.clear()
    yield
    worker.STOP_SIGNALLED.clear()


def test_a_signal_during_an_attempt_is_not_lost_to_the_restart_loop() -> None:
    attempts = []

    async def role() -> None:  # the start of a role: its stop event, then an outage
        stop = worker._stop_event()
        attempts.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)  # lands in the running loop, as during a slow start
        await asyncio.sleep(0.05)
        assert stop.is_set()
        raise BackendUnavailable("cannot connect to NATS at nats://127.0.0.1:1: refused")

    t = time.monotonic()
    _with_retries(lambda: asyncio.run(role()), retry_for=300)
    assert len(attempts) == 1 and time.monotonic() - t < 5


def test_without_a_signal_an_outage_is_retried() -> None:
    attempts = []

    def role() -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise BackendUnavailable("store unreachable")

    _with_retries(role, retry_for=300)
    assert len(attempts) == 3
