"""Publishing change events to the bus, and the small durable offset files of CDC sources.

One bus topic per table (``fm.cdc.<db>.<schema>.<table>``), created on first use; a record's key is
the primary key as JSON and its partition a stable hash of that key, so every change of one row
lands in one partition, in commit order. Message ids are deterministic (LSN or binlog position):
a change re-sent after a crash is dropped by JetStream's de-duplication within the topic's
duplicate window, and seen twice by consumers only beyond it (at-least-once).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fieldmesh.bus.base import Bus, OutRecord, Producer, TopicSpec
from fieldmesh.cdc.base import CdcError, Change, encode_change_event, key_partition

__all__ = ["CdcSink", "OffsetFile"]


class CdcSink:
    """Sends :class:`~fieldmesh.cdc.base.Change` s to their table topics and waits for the acks.

    ``retention_s=0`` (the default) keeps change events forever: as-of state is rebuilt from these
    topics, so a row that has not changed for longer than a retention would otherwise vanish.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        partitions: int = 4,
        retention_s: int = 0,
        dedupe_window_s: int = 600,
    ) -> None:
        if partitions < 1:
            raise CdcError(f"partitions must be >= 1, got {partitions}")
        self.bus = bus
        self.partitions = partitions
        self.retention_s = retention_s
        self.dedupe_window_s = dedupe_window_s
        self._topics: set[str] = set()
        self._producer: Producer | None = None
        self.sent = 0

    async def ensure_topic(self, topic: str) -> None:
        """Create the topic of a table once (idempotent on the bus too)."""
        if topic in self._topics:
            return
        await self.bus.ensure_topic(
            TopicSpec(
                name=topic,
                partitions=self.partitions,
                retention_s=self.retention_s,
                dedupe_window_s=self.dedupe_window_s,
            )
        )
        self._topics.add(topic)

    async def send(self, changes: Sequence[Change]) -> None:
        """Publish changes; return once the bus acknowledged every one."""
        if not changes:
            return
        for t in {c.topic for c in changes} - self._topics:
            await self.ensure_topic(t)
        if self._producer is None:
            self._producer = self.bus.producer()  # on NATS it pipelines the publishes (one event per message)
        parts = self.partitions
        encode = encode_change_event
        records = [
            OutRecord(
                topic=c.topic,
                partition=key_partition(c.key, parts) if c.key is not None else 0,
                value=encode(c.event),
                key=c.key,
                msg_id=c.msg_id,
            )
            for c in changes
        ]
        await self._producer.send(records)
        self.sent += len(records)


class OffsetFile:
    """A small JSON document written atomically (temp file, fsync, rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        """The saved document, or ``{}`` when there is none."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise CdcError(f"cannot read CDC offsets {self.path}: {exc}") from exc
        return data if isinstance(data, dict) else {}

    def save(self, data: dict[str, Any]) -> None:
        """Replace the document durably."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def delete(self) -> None:
        """Remove the document."""
        self.path.unlink(missing_ok=True)
