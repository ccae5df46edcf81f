"""``run_cdc``: capture a source database into the bus until stopped, reconnecting on outages.

The source is chosen by URL: ``postgresql://user@host:port/db`` (logical replication, pgoutput) or
``mysql://user:pass@host:port/db`` / ``mariadb://...`` (row-based binlog). Errors that a retry
cannot fix (privileges, server set-up, missing keys, a lost position) stop the runner with the
message to act on; a source or bus that is unreachable is retried with capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from fieldmesh.bus import load_bus
from fieldmesh.cdc.base import CdcError
from fieldmesh.cdc.sink import CdcSink
from fieldmesh.core.errors import BackendError, BackendUnavailable, ConfigError

__all__ = ["CdcSource", "make_source", "run_cdc"]

log = logging.getLogger(__name__)


class CdcSource(Protocol):
    """A capturable source: set-up checks, then snapshot and stream into a sink until stopped."""

    def prepare(self) -> Any: ...

    async def run(self, sink: CdcSink, stop: asyncio.Event) -> None: ...


def make_source(
    source_url: str,
    tables: str | Sequence[str],
    *,
    state_dir: Path,
    name: str = "fieldmesh",
    snapshot: str = "initial",
    resnapshot: bool = False,
    decimal_mode: str = "string",
    batch_size: int = 8000,
) -> CdcSource:
    """The CDC source of a database URL (``postgresql://``, ``mysql://`` or ``mariadb://``)."""
    scheme = source_url.split("://", 1)[0].lower()
    if scheme in ("postgresql", "postgres"):
        from fieldmesh.cdc.postgres import PostgresCdc

        return PostgresCdc(
            dsn=source_url,
            tables=tables,
            state_dir=state_dir,
            slot=name,
            publication=name,
            server_name=name,
            snapshot=snapshot,
            resnapshot=resnapshot,
            decimal_mode=decimal_mode,
            batch_size=batch_size,
        )
    if scheme in ("mysql", "mariadb"):
        from fieldmesh.cdc.mysql import MySqlCdc

        return MySqlCdc(
            url=source_url,
            tables=tables,
            state_dir=state_dir,
            server_name=name,
            snapshot=snapshot,
            resnapshot=resnapshot,
            decimal_mode=decimal_mode,
            batch_size=batch_size,
        )
    raise ConfigError(
        f"unsupported CDC source {source_url!r}: use postgresql://... or mysql://... / mariadb://...",
        key="source",
    )


async def run_cdc(
    source_url: str,
    tables: str | Sequence[str],
    bus_url: str,
    *,
    state_dir: Path,
    name: str = "fieldmesh",
    partitions: int = 4,
    retention_s: int = 0,
    snapshot: str = "initial",
    resnapshot: bool = False,
    decimal_mode: str = "string",
    batch_size: int = 8000,
    stop: asyncio.Event | None = None,
    max_backoff_s: float = 30.0,
) -> None:
    """Capture ``tables`` of ``source_url`` into the bus at ``bus_url`` until ``stop`` is set.

    Raises:
        CdcError: a problem a retry cannot fix (the message says what to do).
    """
    stop = stop or asyncio.Event()
    attempt = 0
    first = True
    while not stop.is_set():
        source = make_source(
            source_url,
            tables,
            state_dir=state_dir,
            name=name,
            snapshot=snapshot,
            resnapshot=resnapshot and first,
            decimal_mode=decimal_mode,
            batch_size=batch_size,
        )
        try:
            await asyncio.to_thread(source.prepare)
            async with load_bus(bus_url) as bus:
                sink = CdcSink(bus, partitions=partitions, retention_s=retention_s)
                attempt = 0
                await source.run(sink, stop)
            return
        except CdcError:
            raise
        except (BackendUnavailable, BackendError) as exc:
            attempt += 1
            delay = min(max_backoff_s, 0.5 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
            log.warning("CDC interrupted (%s); retry %d in %.1fs", exc, attempt, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        first = False


def install_signal_handlers(stop: asyncio.Event) -> None:
    """Set ``stop`` on SIGINT/SIGTERM so the runner confirms its position and exits cleanly."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
