"""kill -9 of nats-server and of each worker under ``fieldmesh up``, mid-stream: still exact.

A QoS 1 device keeps publishing through the fault and sends again what was not acknowledged;
everything acknowledged must be stored exactly once (duplicates counted, not stored).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

from e2e.dataset import make_stream
from fmtest import oracle
from fmtest.faults import FaultReport
from fmtest.procs import Up
from fmtest.retry import RetryingPublisher

pytestmark = pytest.mark.integration


def child_of(up: Up, role: str) -> psutil.Process | None:
    """The live child of ``up`` playing ``role`` (nats-server, gateway, processor), if any."""
    assert up.proc is not None
    for p in psutil.Process(up.proc.pid).children():
        try:
            with_args = p.cmdline()
        except psutil.Error:  # a zombie until the supervisor reaps it
            continue
        if (role == "nats-server" and with_args and with_args[0].endswith("nats-server")) or (
            "fieldmesh.runtime.worker" in with_args and role in with_args
        ):
            return p
    return None


def health(up: Up) -> dict[str, Any]:
    """``/health``, also when it answers 503 (degraded)."""
    try:
        return dict(up.get("/health"))
    except urllib.error.HTTPError as exc:
        assert exc.code == 503
        return dict(json.loads(exc.read()))
    except OSError:
        return {"status": "unreachable"}


def check_exact(up: Up, sent: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Every unique reading stored once; the 1-minute rollups equal the oracle's."""
    uniq = oracle.unique_readings(sent)
    stats = up.wait_for(lambda s: s["stored"] >= len(uniq) and sum(s["lag"].values()) == 0, timeout_s=60)
    assert stats["stored"] == len(uniq), stats
    assert stats["received"] == stats["stored"] + stats["duplicates"], stats
    assert stats["dead_lettered"]["total"] == 0, stats
    expected = oracle.rollups(sent, "1m")
    got = {}
    for dev in sorted({d for d, _ in sent}):
        for row in up.get(f"/telemetry/rollups?device_id={dev}&interval=1m&limit=100000"):
            got[(row["device_id"], row["metric"], row["window_start_ms"])] = (row["count"], row["sum"])
    assert got == {k: (e["count"], e["sum"]) for k, e in expected.items()}
    return stats


@pytest.mark.parametrize("victim", ["nats-server", "gateway", "processor"])
def test_kill9_mid_stream_is_exact(tmp_path: Path, victim: str) -> None:
    prefix = f"k{victim[:2]}{uuid.uuid4().hex[:6]}"
    stream = make_stream(prefix, devices=20, per_device=150, seed=3)
    msgs = stream["messages"]
    up = Up(tmp_path / "data").start()
    try:
        before = child_of(up, victim)
        assert before is not None
        dev = RetryingPublisher(up.mqtt_port).connect()
        chunks = [msgs[i : i + 100] for i in range(0, len(msgs), 100)]
        acked = [0]

        def device() -> None:
            for chunk in chunks:
                acked[0] += dev.send(chunk)
                time.sleep(0.05)

        t = threading.Thread(target=device, daemon=True)
        t.start()
        while acked[0] < len(msgs) // 3:
            assert t.is_alive(), "the device finished before the fault"
            time.sleep(0.01)
        os.kill(before.pid, signal.SIGKILL)
        seen: set[str] = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # /health says what is going on, then ok again
            h = health(up)
            seen.add(h.get("bus" if victim == "nats-server" else victim, "?"))
            now = child_of(up, victim)
            if h["status"] == "ok" and now is not None and now.pid != before.pid:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(f"not healthy again after kill -9 of {victim}: {h}\n{up.tail()}")
        t.join(120)
        assert not t.is_alive()
        assert acked[0] == len(msgs)
        stats = check_exact(up, stream["sent"])
        FaultReport(f"kill -9 {victim} mid-stream", sent=len(stream["sent"]),
                    acknowledged=len(stream["sent"]),
                    stored=stats["stored"], duplicates=stats["duplicates"],
                    counted_losses={k: v for k, v in stats["dead_lettered"].items() if k != "total"}).show()
        print(f"[fault] health states seen for {victim}: {sorted(seen)}; publishes {dev.publishes}")
        dev.close()
    finally:
        assert up.stop() == 0, up.tail()
    restarted = "nats-server exited" if victim == "nats-server" else f"{victim} exited"
    log = (up.data_dir.parent / f"{up.data_dir.name}-up.log").read_text(errors="replace")
    assert restarted in log
