"""Wiring of as-of enrichment into a processor: settings -> enricher + CDC follower.

The processor enriches readings in a worker thread while the follower applies change events on
the event loop, so both go through :class:`GuardedEnricher` (one lock, held only while enriching a
batch or applying a fetch of change events). Start-up order matters: the CDC topics are read to
their end (:meth:`Enrichment.catch_up`) *before* the processor consumes its first reading, so no
reading is enriched from a partial state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fieldmesh.bus.base import Bus, BusRecord
from fieldmesh.core.errors import ConfigError
from fieldmesh.core.model import Reading
from fieldmesh.core.settings import EnrichJoinSpec, Settings

__all__ = ["Enrichment", "GuardedEnricher", "build_enrichment", "follower_group", "join_topic", "source_database"]

log = logging.getLogger("fieldmesh.enrich")


def source_database(source_url: str) -> str | None:
    """The database of a PostgreSQL CDC source URL (None for MySQL, whose tables name their db)."""
    parts = urlsplit(source_url)
    if parts.scheme.lower() not in ("postgresql", "postgres"):
        return None
    db = parts.path.lstrip("/")
    return db or parts.username or "postgres"


def join_topic(spec: EnrichJoinSpec, database: str | None) -> str:
    """The CDC topic a join follows: ``topic=``, else ``fm.cdc.<db>.<schema>.<table>`` (PostgreSQL,
    when a database is known), else ``fm.cdc.<db>.<table>`` (MySQL's ``db.table``)."""
    from fieldmesh.cdc.base import cdc_topic

    if spec.topic:
        return spec.topic
    first, table = spec.table.split(".", 1)
    db = spec.db or database
    return cdc_topic(db, first, table) if db else cdc_topic(first, None, table)


class GuardedEnricher:
    """An :class:`~fieldmesh.stream.enrich.AsOfEnricher` shared by the processor thread and the follower."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._lock = threading.Lock()

    def enrich(self, readings: list[Reading]) -> list[Reading]:
        """Enrich a batch (processor side)."""
        with self._lock:
            return self.inner.enrich(readings)  # type: ignore[no-any-return]

    def apply_change_events(self, records: Iterable[BusRecord]) -> int:
        """Apply a fetch of change events (follower side)."""
        batch = list(records)
        with self._lock:
            return self.inner.apply_change_events(batch)  # type: ignore[no-any-return]


@dataclass
class Enrichment:
    """An enricher and the CDC topics that feed it."""

    enricher: GuardedEnricher
    topics: list[str]
    catch_up_timeout_s: float = 300.0

    async def wait_topics(self, bus: Bus, timeout_s: float) -> None:
        """Wait until every CDC topic exists (the capture creates it).

        Raises:
            ConfigError: a topic is still missing after ``timeout_s`` (wrong table/db, or no capture).
        """
        deadline = time.monotonic() + timeout_s
        next_log = 0.0
        for topic in self.topics:
            while not await _exists(bus, topic):
                now = time.monotonic()
                if now >= deadline:
                    raise ConfigError(
                        f"CDC topic {topic} does not exist after {timeout_s:.0f}s: is the table captured "
                        "('fieldmesh cdc --tables ...' or 'fieldmesh up --cdc-tables ...')? For PostgreSQL "
                        "tables the topic names the database: give db= in the --enrich spec or "
                        "FIELDMESH__ENRICH__DATABASE",
                        key="enrich.joins",
                    )
                if now >= next_log:
                    log.info("waiting for CDC topic %s", topic)
                    next_log = now + 10
                await asyncio.sleep(0.5)

    async def run(
        self,
        bus: Bus,
        main: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
        stop: asyncio.Event,
        *,
        follower_group: str | None = None,
    ) -> None:
        """Catch up with the CDC topics, then run ``main(stop)`` (the processor) beside the follower.

        ``follower_group`` names the follower's consumer, one per processor replica: a consumer of that
        name left by a killed predecessor is deleted first (the state is rebuilt from the start anyway),
        so restarts do not accumulate consumers on the bus.
        """
        from fieldmesh.cdc.follow import CdcFollower

        await self.wait_topics(bus, self.catch_up_timeout_s)
        if follower_group is not None:
            await _drop_consumers(bus, self.topics, follower_group)
        follower = CdcFollower(bus, self.enricher, self.topics, group=follower_group)
        try:
            t0 = time.monotonic()
            n = await follower.catch_up(timeout_s=self.catch_up_timeout_s)
            log.info("enrichment state ready: %d change events in %.1fs from %s", n, time.monotonic() - t0,
                     ", ".join(self.topics))
            async with asyncio.TaskGroup() as tg:
                tg.create_task(follower.run(stop), name="cdc-follower")
                tg.create_task(main(stop), name="processor")
        finally:
            with contextlib.suppress(Exception):
                await follower.close()


async def _exists(bus: Bus, topic: str) -> bool:
    try:
        return await bus.topic_exists(topic)
    except Exception:  # not reachable yet: keep waiting
        return False


async def _drop_consumers(bus: Bus, topics: Sequence[str], group: str) -> None:
    for topic in topics:
        try:
            await bus.drop_consumer(topic, group=group)
        except Exception as exc:  # e.g. a Kafka group whose killed member has not timed out yet
            log.info("could not drop the consumer %s of %s: %s", group, topic, exc)


def follower_group(group: str, partitions: Sequence[int] | None) -> str:
    """The follower consumer name of a processor replica (``group`` and its partitions)."""
    import zlib

    tag = "all" if partitions is None else f"{zlib.crc32(','.join(map(str, sorted(partitions))).encode()):08x}"
    return f"{group}-asof-{tag}".replace(".", "_")


def build_enrichment(settings: Settings, joins: Sequence[EnrichJoinSpec] | None = None) -> Enrichment | None:
    """The enrichment configured in ``settings.enrich`` (None when no join is configured).

    Raises:
        ConfigError: a join names an unknown reading field.
    """
    cfg = settings.enrich
    specs = list(joins if joins is not None else cfg.joins)
    if not specs:
        return None
    from fieldmesh.stream.enrich import AsOfEnricher, AsOfJoin

    enricher = AsOfEnricher([
        AsOfJoin(table=s.table, reading_field=s.reading_field, column=s.column, fields=s.fields,
                 prefix=s.effective_prefix, pk_columns=s.pk)
        for s in specs
    ])
    topics = list(dict.fromkeys(join_topic(s, cfg.database) for s in specs))
    return Enrichment(GuardedEnricher(enricher), topics, cfg.catch_up_timeout_s)
