"""Retention inside ``fieldmesh up``: old raw readings leave the hot store once the lake holds them, and the
API still answers them (from the lake); ``fieldmesh query`` over the hot store alone no longer sees them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fieldmesh.core.settings import LakeSettings
from fieldmesh.store.lake import open_catalog
from fmtest.procs import Up, publish_all, publisher

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

HOUR = 3_600_000


def messages(now: int) -> tuple[list[tuple[str, bytes]], list[tuple[str, int]]]:
    """Readings of two devices, three hours old and recent, sent in time order, ten to a message."""
    sent: list[tuple[str, int]] = []
    msgs = []
    for base in (now - 3 * HOUR, now - 10 * 60_000):
        for dev in ("ret-a", "ret-b"):
            batch = [{"ts": base + i * 1000, "seq": (base // 1000) + i, "measurements": {"t": i * 0.5}}
                     for i in range(100)]
            for s in range(0, len(batch), 10):
                msgs.append((f"devices/{dev}/telemetry", json.dumps(batch[s : s + 10]).encode()))
            sent += [(dev, r["ts"]) for r in batch]
    return msgs, sent


def test_up_prunes_what_the_lake_holds_and_the_api_still_reads_it(tmp_path: Path) -> None:
    data = tmp_path / "data"
    up = Up(data, "--lake-commit-interval", "0.5", "--retention-raw-days", str(1 / 24),
            env={"FIELDMESH__RETENTION__INTERVAL_S": "2"}).start()
    now = int(time.time() * 1000)
    msgs, sent = messages(now)
    try:
        c = publisher(up.mqtt_port)
        # the old half first, stored before the recent half is sent: the SQLite store keeps readings in
        # segments per device and batch, and a segment goes only once its newest reading is past the cut
        publish_all(c, msgs[: len(msgs) // 2])
        up.wait_for(lambda s: s["stored"] >= len(sent) // 2)
        publish_all(c, msgs[len(msgs) // 2 :])
        c.disconnect()
        up.wait_for(lambda s: s["stored"] >= len(sent))
        catalog = open_catalog(LakeSettings(), data)
        deadline = time.monotonic() + 60  # retention runs every 2 s; the lake commits within 0.5 s
        hot = len(sent)
        while time.monotonic() < deadline and hot == len(sent):
            time.sleep(1.0)
            hot = _query(data, "SELECT count(*) FROM readings")
        assert "retention: raw before" in _retention_lines(data / "logs" / "processor.log"), up.tail()
        assert hot == len(sent) // 2, "the old half (in the lake) was not pruned, or more was"
        assert catalog.load_table("fieldmesh.readings").scan().count() == len(sent)
        rows: list[dict[str, Any]] = up.get(f"/telemetry/raw?limit=100000&start={now - 4 * HOUR}")
        assert sorted((r["device_id"], r["ts_ms"]) for r in rows) == sorted(sent)
    finally:
        assert up.stop() == 0, up.tail()


def _retention_lines(log: Path) -> str:
    return "\n".join(x for x in log.read_text(errors="replace").splitlines() if "retention" in x) if log.exists() \
        else ""


def _query(data: Path, sql: str) -> int:
    out = subprocess.run([sys.executable, "-m", "fieldmesh", "query", "--data-dir", str(data), "--json", sql],
                         capture_output=True, text=True, check=True, env=_env())
    return int(next(iter(json.loads(out.stdout)[0].values())))


def _env() -> dict[str, str]:
    import os

    src = str(Path(__file__).resolve().parents[2] / "src")
    return {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
