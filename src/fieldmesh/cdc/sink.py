"""Publishing change events to the bus, and the small durable offset files of CDC sources.

One bus topic per table (``fm.cdc.<db>.<schema>.<table>``), created on first use; a record's key is
the primary key as JSON and its partition a stable hash of that key, so every change of one row
lands in one partition, in commit order. Message ids are deterministic (LSN or binlog position):
a change re-sent after a crash is dropped by JetStream's de-duplication within the topic's
duplicate window, and seen twice by consumers only beyond it (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fieldmesh.bus.base import Bus, OutRecord, Producer, TopicSpec
from fieldmesh.cdc.base import CdcError, Change, encode_change_event, key_partition
from fieldmesh.core.errors import BackendError
from fieldmesh.core.topics import partition_for

__all__ = ["CdcSink", "OffsetFile", "PipelinedNatsProducer"]


class _Pending:
    __slots__ = ("acked", "done", "error", "expected")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.acked = 0
        self.error: str | None = None
        self.done = asyncio.Event()


class PipelinedNatsProducer:
    """A JetStream producer that pipelines publishes and collects the PubAcks on one inbox.

    Same contract as the bus's producer (``send`` returns once JetStream acknowledged every
    record; ``msg_id`` -> ``Nats-Msg-Id``; ``key`` -> ``Fm-Key``), about three times faster than one
    ``publish_async`` future per record here (measured ~100k vs ~36k msg/s): change events travel one
    per bus message, so the per-message cost of the producer bounds the capture rate.
    """

    def __init__(self, nc: Any, *, max_in_flight: int = 20_000, timeout_s: float = 30.0) -> None:
        self._nc = nc
        self._max = max_in_flight
        self._timeout = timeout_s
        self._inbox = nc.new_inbox()
        self._sub: Any = None
        self._batches: dict[str, _Pending] = {}
        self._ids = itertools.count()
        self._room = asyncio.Event()

    async def _on_ack(self, msg: Any) -> None:
        _, batch, _ = msg.subject.rsplit(".", 2)
        p = self._batches.get(batch)
        if p is None:
            return
        data = msg.data
        hdrs = msg.headers or {}
        if hdrs.get("Status") == "503" or not data:
            p.error = (
                p.error
                or f"no JetStream stream for subject of this batch ({hdrs.get('Status', 'empty ack')})"
            )
        elif data.startswith(b'{"error"'):
            p.error = p.error or data.decode(errors="replace")
        p.acked += 1
        if p.acked >= p.expected:
            p.done.set()
        self._room.set()

    async def send(self, records: Sequence[OutRecord]) -> None:
        """Publish all records; return once JetStream acknowledged each one."""
        items = []
        for r in records:
            headers: dict[str, str] = dict(r.headers) if r.headers else {}
            if r.msg_id:
                headers["Nats-Msg-Id"] = r.msg_id
            if r.key is not None:
                headers["Fm-Key"] = r.key.decode(errors="replace")
            items.append((f"{r.topic}.{r.partition}", r.value, headers or None))
        await self.publish(items)

    async def publish(self, items: Sequence[tuple[str, bytes, dict[str, str] | None]]) -> None:
        """Publish ``(subject, payload, headers)`` items; return once JetStream acknowledged each one."""
        if not items:
            return
        import nats.errors

        if self._sub is None:
            self._sub = await self._nc.subscribe(self._inbox + ".>", cb=self._on_ack, pending_msgs_limit=-1)
        batch = str(next(self._ids))
        p = self._batches[batch] = _Pending(len(items))
        prefix = f"{self._inbox}.{batch}."
        publish = self._nc.publish
        try:
            for i, (subject, payload, headers) in enumerate(items):
                await publish(subject, payload, reply=f"{prefix}{i}", headers=headers)
                while i + 1 - p.acked > self._max and p.error is None:
                    self._room.clear()
                    await asyncio.wait_for(self._room.wait(), self._timeout)
            await asyncio.wait_for(p.done.wait(), self._timeout)
        except (TimeoutError, nats.errors.Error) as exc:
            raise BackendError(
                f"JetStream publish failed: {p.acked} of {len(items)} acknowledged ({exc!r})"
            ) from exc
        finally:
            self._batches.pop(batch, None)
        if p.error is not None:
            raise BackendError(f"JetStream refused a change event: {p.error}")

    async def close(self) -> None:
        """Stop listening for acks."""
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None


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
            nc = getattr(self.bus, "nc", None)  # NatsBus: pipeline the publishes (see above)
            self._producer = PipelinedNatsProducer(nc) if nc is not None else self.bus.producer()
        parts = self.partitions
        encode = encode_change_event
        if isinstance(self._producer, PipelinedNatsProducer):
            items = []
            for c in changes:
                key = c.key
                if key is None:
                    items.append((f"{c.topic}.0", encode(c.event), {"Nats-Msg-Id": c.msg_id}))
                else:
                    skey = key.decode()
                    sub = f"{c.topic}.{partition_for(skey, parts)}"
                    items.append((sub, encode(c.event), {"Nats-Msg-Id": c.msg_id, "Fm-Key": skey}))
            await self._producer.publish(items)
            self.sent += len(items)
            return
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
