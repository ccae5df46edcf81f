"""Loss upstream of fieldmesh is never silent: a device skipping seqs shows as gaps, a late filler uncounts them.

Through a real ``fieldmesh up``: a device sends seqs with holes (as a broker dropping queued
messages would leave them), another sends a complete stream; /stats, /devices/{id} and /metrics
must show exactly the missing seqs, per device and boot. The held-back readings then arrive late
and the gaps return to 0.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from fmtest.faults import FaultReport
from fmtest.procs import Up, publish_all, publisher

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def message(dev: str, boot: str, seq: int, now_ms: int) -> tuple[str, bytes]:
    body = {"ts": now_ms - 60_000 + seq * 100, "seq": seq, "boot_id": boot, "measurements": {"t": seq / 10}}
    return f"devices/{dev}/telemetry", json.dumps(body).encode()


def metric(up: Up, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{up.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} missing from /metrics")


def settle(up: Up, received: int) -> dict[str, Any]:
    """Stats once every reading sent has been applied (stored or counted a duplicate) and nothing is pending."""
    return up.wait_for(lambda s: s["received"] >= received and sum(s.get("lag", {}).values()) == 0, timeout_s=90)


def test_skipped_seqs_are_counted_and_late_fillers_uncount_them(tmp_path: Path) -> None:
    prefix = f"gap{uuid.uuid4().hex[:6]}"
    lossy, whole = f"{prefix}-lossy", f"{prefix}-whole"
    now = int(time.time() * 1000)
    # boot b1: 0..99 without 10-14, 50 and 97 (7 missing); boot b2 (after a reboot): 0..19 without 3 (1)
    holes = {"b1": {10, 11, 12, 13, 14, 50, 97}, "b2": {3}}
    span = {"b1": 100, "b2": 20}
    first = [message(lossy, b, s, now) for b in span for s in range(span[b]) if s not in holes[b]]
    first += [message(whole, "b1", s, now) for s in range(60)]
    resent = first[:5] + first[-5:]  # QoS 1 re-sends: duplicates, never gaps
    late = [message(lossy, b, s, now) for b in holes for s in sorted(holes[b])]
    missing = sum(len(h) for h in holes.values())

    up = Up(tmp_path / "data").start()
    try:
        c = publisher(up.mqtt_port)
        publish_all(c, first + resent)
        st = settle(up, len(first) + len(resent))
        report = FaultReport("seq gaps: device skips seqs", sent=len(first) + len(resent),
                             acknowledged=len(first) + len(resent), stored=st["stored"],
                             duplicates=st["duplicates"], counted_losses={"gaps": st["gaps"]})  # fmt: skip
        report.show()
        assert (st["stored"], st["duplicates"]) == (len(first), len(resent)), st
        assert st["gaps"] == missing == 8
        assert up.get(f"/devices/{lossy}")["gaps"] == missing
        assert up.get(f"/devices/{whole}")["gaps"] == 0
        assert metric(up, "fieldmesh_seq_gaps") == missing

        publish_all(c, late + resent)
        st = settle(up, len(first) + 2 * len(resent) + len(late))
        FaultReport("seq gaps: late readings fill them", sent=len(late) + len(resent),
                    acknowledged=len(late) + len(resent), stored=st["stored"], duplicates=st["duplicates"],
                    counted_losses={"gaps": st["gaps"]}).show()  # fmt: skip
        assert (st["stored"], st["duplicates"]) == (len(first) + len(late), 2 * len(resent)), st
        assert st["gaps"] == 0
        assert up.get(f"/devices/{lossy}")["gaps"] == 0
        assert metric(up, "fieldmesh_seq_gaps") == 0
        c.disconnect()
    finally:
        assert up.stop() == 0, up.tail()
