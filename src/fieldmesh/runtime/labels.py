"""Label events for training sets, read from a CDC table's topic on the bus (docs/features.md).

The capture (``fieldmesh cdc`` or ``fieldmesh up --cdc-source``) keeps every committed change of the table
on ``fm.cdc.<db>.<schema>.<table>``; this reads the topic from its beginning with a throw-away consumer
(:class:`~fieldmesh.cdc.follow.CdcFollower`), keeps each insert/update as a label event dated at its commit
time, and deletes the consumer again.
"""

from __future__ import annotations

from fieldmesh.bus import load_bus
from fieldmesh.cdc.base import cdc_topic
from fieldmesh.cdc.follow import CdcFollower
from fieldmesh.core.errors import ConfigError
from fieldmesh.stream.pointintime import LabelEvents

__all__ = ["label_topic", "read_label_events"]


def label_topic(table: str, *, database: str | None, topic: str | None = None) -> str:
    """The CDC topic of ``table`` (``schema.table`` with ``database``, or MySQL's ``db.table``).

    Raises:
        ConfigError: a table name without a schema (or db) part.
    """
    if topic:
        return topic
    if "." not in table:
        raise ConfigError(f"label table {table!r}: write schema.table (PostgreSQL, with --label-db) or db.table "
                          "(MySQL)", key="label_table")
    first, name = table.split(".", 1)
    return cdc_topic(database, first, name) if database else cdc_topic(first, None, name)


async def read_label_events(bus_url: str, topic: str, events: LabelEvents, *, timeout_s: float = 300.0) -> int:
    """Apply every change event on ``topic`` to ``events``; return how many were read.

    Raises:
        ConfigError: the topic does not exist (a misspelt table or database, or no capture of it).
        TimeoutError: the topic could not be read within ``timeout_s``.
    """
    async with load_bus(bus_url) as bus:
        if not await bus.topic_exists(topic):
            raise ConfigError(f"no CDC topic {topic} on {bus_url}: check --label-table/--label-db, and that the "
                              "table is captured (fieldmesh cdc --tables, or fieldmesh up --cdc-tables)",
                              key="label_table")
        follower = CdcFollower(bus, events, [topic])
        try:
            return await follower.catch_up(timeout_s=timeout_s)
        finally:
            await follower.close()
