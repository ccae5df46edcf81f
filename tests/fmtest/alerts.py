"""Alert streams and the oracle of their transitions, shared by the alert tests.

The oracle replays each device's readings in bus order, drops duplicates (by identity: the first
occurrence counts) and readings older than one its device sent before (late: history, not news), and
runs a plain per-reading state machine of a threshold rule (``for_s``, hysteresis). It is written
independently of :mod:`fieldmesh.stream.alerts` (no numpy, no shared helper).
"""

from __future__ import annotations

import operator
import random
from collections.abc import Sequence

from fieldmesh.bus.base import BusRecord
from fieldmesh.core.codec import decode_bus_batch, decode_telemetry, encode_bus_batch, encode_reading_json
from fieldmesh.core.model import BusBatch, Reading
from fieldmesh.core.topics import READINGS_TOPIC
from fieldmesh.stream.alerts import Rule

Item = tuple[str, int, float, int]
"""device, ts_ms, value, identity (the reading's seq: equal for a duplicate, distinct otherwise)"""

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


def oracle(items: Sequence[Item], rule: Rule) -> list[tuple[str, str, int]]:
    """Transitions (kind, device, ts_ms) of a threshold ``rule`` over ``items`` in bus order."""
    seen: set[int] = set()
    wm: dict[str, int] = {}
    state: dict[str, tuple[bool, int | None]] = {}
    out = []
    assert rule.value is not None and rule.kind == "threshold"
    clear = rule.value if rule.clear_value is None else rule.clear_value
    op = _OPS[rule.op]
    for dev, ts, v, ident in items:
        if ident in seen:
            continue
        seen.add(ident)
        if dev in wm and ts < wm[dev]:
            continue
        wm[dev] = ts
        if not rule.matches_device(dev):
            continue
        firing, since = state.get(dev, (False, None))
        if firing:
            if not op(v, clear):
                out.append(("clear", dev, ts))
                firing = False
        elif op(v, rule.value):
            since = ts if since is None else since
            if ts - since >= rule.for_s * 1000:
                out.append(("open", dev, ts))
                firing, since = True, None
        else:
            since = None
        state[dev] = (firing, since)
    return out


def stream(seed: int, start_ms: int, n: int = 400, devices: int = 4, step_ms: int = 1000) -> list[Item]:
    """Readings around a threshold of 30 (24..34), 5% duplicates (after their original), order shuffled
    within windows of 5, and 5% hour-late replays (new identities, hot values: they must not alert)."""
    rnd = random.Random(seed)
    items: list[Item] = []
    for i in range(n):
        dev = f"pump-{rnd.randrange(devices)}"
        items.append((dev, start_ms + i * step_ms, round(rnd.uniform(24, 34), 1), i))
    for s in range(0, len(items), 5):
        part = items[s:s + 5]
        rnd.shuffle(part)
        items[s:s + 5] = part
    late = [(d, ts - 3_600_000, v + 10, n + 10_000 + j) for j, (d, ts, v, _) in enumerate(rnd.sample(items, n // 20))]
    for it in late:
        items.insert(rnd.randrange(len(items)), it)
    for it in rnd.sample(items, n // 20):
        items.insert(rnd.randrange(items.index(it), len(items) + 1), it)
    return items


def reading(it: Item, received_ms: int) -> Reading:
    dev, ts, v, ident = it
    payload = encode_reading_json(dev, ts, {"temperature": v}, ident)
    return decode_telemetry(payload, device_id=dev, topic=f"devices/{dev}/telemetry", received_ms=received_ms,
                            max_skew_ms=10**10).readings[0]


def partition_of(device: str, partitions: int) -> int:
    return int(device.rsplit("-", 1)[1]) % partitions


def records(items: Sequence[Item], per_record: int, received_ms: int, partitions: int = 3) -> list[BusRecord]:
    """Bus records, each device on one partition, offsets counting per partition, partitions interleaved."""
    by_part: dict[int, list[list[Reading]]] = {}
    pending: dict[int, list[Reading]] = {}
    for it in items:
        p = partition_of(it[0], partitions)
        pending.setdefault(p, []).append(reading(it, received_ms))
        if len(pending[p]) == per_record:
            by_part.setdefault(p, []).append(pending.pop(p))
    for p, rest in pending.items():
        by_part.setdefault(p, []).append(rest)
    out: list[BusRecord] = []
    offsets: dict[int, int] = {}
    while any(by_part.values()):
        for p in sorted(by_part):
            if by_part[p]:
                offsets[p] = offsets.get(p, 0) + 1
                out.append(BusRecord(topic=READINGS_TOPIC, partition=p, offset=offsets[p],
                                     value=encode_bus_batch(BusBatch(by_part[p].pop(0)))))
    return out


def bus_order(recs: Sequence[BusRecord], items: Sequence[Item]) -> list[Item]:
    """``items`` in the order the processor meets them (record by record)."""
    by_ident = {it[3]: it for it in items}
    out = []
    for rec in recs:
        for r in decode_bus_batch(rec.value).readings:
            assert r.seq is not None
            out.append(by_ident[r.seq])
    return out


def rate_oracle(items: Sequence[Item], rule: Rule) -> list[tuple[str, str, int]]:
    """Transitions of a rate ``rule`` over ``items`` in bus order: the change from the device's previous
    in-order reading, per second or minute, with the rule's hysteresis."""
    seen: set[int] = set()
    wm: dict[str, int] = {}
    prev: dict[str, tuple[int, float]] = {}
    firing: dict[str, bool] = {}
    out = []
    assert rule.value is not None and rule.kind == "rate"
    clear = rule.value if rule.clear_value is None else rule.clear_value
    op = _OPS[rule.op]
    for dev, ts, v, ident in items:
        if ident in seen:
            continue
        seen.add(ident)
        if dev in wm and ts < wm[dev]:
            continue
        wm[dev] = ts
        if not rule.matches_device(dev):
            continue
        if dev in prev and ts > prev[dev][0]:
            rate = (v - prev[dev][1]) / ((ts - prev[dev][0]) / 1000) * (60 if rule.per == "min" else 1)
            if firing.get(dev) and not op(rate, clear):
                out.append(("clear", dev, ts))
                firing[dev] = False
            elif not firing.get(dev) and op(rate, rule.value):
                out.append(("open", dev, ts))
                firing[dev] = True
        prev[dev] = (ts, v)
    return out
