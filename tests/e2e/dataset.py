"""A test stream: duplicates, out-of-order and very late readings, and malformed payloads."""

from __future__ import annotations

import json
import random
import time
from typing import Any

MALFORMED_REASONS = {
    "malformed_json": 2,
    "schema_violation": 5,  # wrong type, missing field, NaN in a batch, Infinity, unknown field
    "device_mismatch": 1,
    "clock_skew": 1,
    "too_large": 1,
    "unsupported_encoding": 1,
}


def make_stream(
    prefix: str, *, devices: int = 12, per_device: int = 120, seed: int = 7, first_seq: int = 0
) -> dict[str, Any]:
    """Return the valid readings sent (with duplicates) and the MQTT messages to publish.

    Each device's seqs run from ``first_seq`` (a test may send a reading before them).
    """
    rnd = random.Random(seed)
    now = int(time.time() * 1000)
    start = now - 2 * 3_600_000  # spans hour boundaries
    readings: list[tuple[str, dict[str, Any]]] = []
    for d in range(devices):
        dev = f"{prefix}-{d:03d}"
        for i in range(per_device):
            r: dict[str, Any] = {"ts": start + i * 30_000 + rnd.randint(0, 999), "seq": first_seq + i, "boot_id": "b1",
                                 "measurements": {"temperature": round(rnd.gauss(20, 5), 3),
                                                  "vibration": rnd.random() / 10}}
            if i % 17 == 0:
                r["measurements"]["door_open"] = rnd.random() < 0.5
            readings.append((dev, r))
    # sent last: their windows are long closed
    very_late = [(dev, r) for dev, r in readings if r["seq"] < first_seq + 5]
    rest = [x for x in readings if x not in very_late]
    rnd.shuffle(rest)  # out of order
    dups = rnd.sample(rest, len(rest) // 10)
    order = rest + dups
    rnd.shuffle(order)
    order += very_late + very_late[:3]
    msgs: list[tuple[str, bytes]] = []
    i = 0
    while i < len(order):
        n = rnd.choice([1, 1, 5, 20])
        group = order[i : i + n]
        i += n
        by_dev: dict[str, list[dict[str, Any]]] = {}
        for dev, r in group:
            by_dev.setdefault(dev, []).append(r)
        for dev, rs in by_dev.items():
            topic = f"devices/{dev}/telemetry"
            if len(rs) == 1:
                msgs.append((topic, json.dumps({"device_id": dev, **rs[0]}).encode()))
            elif rnd.random() < 0.5:
                msgs.append((topic, json.dumps(rs).encode()))
            else:
                msgs.append((topic, json.dumps({"device_id": dev, "readings": rs}).encode()))
    return {"sent": order, "messages": msgs, "now": now}


def malformed(prefix: str) -> list[tuple[str, bytes]]:
    """Bad payloads, one or more per reason code of MALFORMED_REASONS; one batch also has a good reading."""
    dev = f"{prefix}-bad"
    t = f"devices/{dev}/telemetry"
    now = int(time.time() * 1000)
    good_in_bad_batch = {"ts": now - 1000, "seq": 1, "measurements": {"temperature": 1.5}}
    return [
        (t, b"{this is not json"),
        (t, b"\xff\xfe\x00"),
        (t, json.dumps({"ts": now, "measurements": {"temperature": "hot"}}).encode()),
        (t, json.dumps({"measurements": {"temperature": 1}}).encode()),
        (t, b'[{"ts": %d, "seq": 1, "measurements": {"temperature": 1.5}}, {"ts": %d, "measurements": {"t": NaN}}]'
         % (good_in_bad_batch["ts"], now)),
        (t, b'{"ts": %d, "measurements": {"t": Infinity}}' % now),
        (t, json.dumps({"ts": now, "measurements": {"t": 1}, "colour": "red"}).encode()),
        (t, json.dumps({"device_id": "someone-else", "ts": now, "measurements": {"t": 1}}).encode()),
        (t, json.dumps({"ts": now + 3_600_000, "measurements": {"t": 1}}).encode()),
        (t, json.dumps({"ts": now, "measurements": {"t": 1}, "meta": {"pad": "x" * 300_000}}).encode()),
        (t + "/csv", b"ts,t\n1,2\n"),
    ], [(dev, good_in_bad_batch)]
