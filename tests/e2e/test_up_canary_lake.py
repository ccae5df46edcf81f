"""A canary promoted under ``fieldmesh up`` with the lake on: its readings reach the lake once.

The canary holds the firmware 2.x readings of a share of the devices apart (none in the lake); after the
promotion the lake's ``readings`` equal the hot store's (0 missing, 0 duplicates), its rollups equal the
oracle over every reading (the windows both sides touched are corrected, not doubled), retention's read of
the lake finds the promoted keys, and the promotion's outbox in the hot store is empty. A restart with the
outbox put back as a crash between the lake's commit and its marking leaves it does not write them twice.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
import uuid
import zlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from fieldmesh.core.settings import LakeSettings
from fieldmesh.store import default_store_url, load_store
from fieldmesh.store.base import SqlTxn
from fieldmesh.store.lake import PROP_PROMOTIONS, lake_lag, open_catalog
from fieldmesh.store.tiers import LakeCopy
from fmtest import oracle
from fmtest.procs import Up, publish_all, publisher

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SHARE = 50


def _post(up: Up, path: str) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{up.http_port}/api/v1{path}", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _rows(data: Path, table: str) -> list[dict[str, Any]]:
    return open_catalog(LakeSettings(), data).load_table(f"fieldmesh.{table}").scan().to_arrow().to_pylist()  # type: ignore[no-any-return]


def _hot(data: Path, sql: str) -> list[tuple[Any, ...]]:
    hot = load_store(default_store_url(data), readonly=True)
    try:
        return [tuple(r) for r in hot.query(sql).rows]
    finally:
        hot.close()


def _wait(pred: Any, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def _lake_caught_up(data: Path) -> bool:
    hot = load_store(default_store_url(data), readonly=True)
    try:
        return lake_lag(open_catalog(LakeSettings(), data), "fieldmesh", hot.positions())[0] == 0
    finally:
        hot.close()


def _assert_lake(data: Path, sent: list[tuple[str, dict[str, Any]]]) -> None:
    rows = _rows(data, "readings")
    got = [(r["device_id"], int(r["ts"].timestamp() * 1000), r["seq"]) for r in rows]
    assert len(got) == len(set(got)), "duplicate rows in the lake"
    assert sorted(got) == sorted((d, r["ts"], r["seq"]) for d, r in sent), "missing rows"
    for interval in ("1m", "1h"):
        expected = oracle.rollups(sent, interval)
        lake = _rows(data, f"rollup_{interval}")
        have = {(r["device_id"], r["metric"], int(r["window_start"].timestamp() * 1000)): r for r in lake}
        assert len(have) == len(lake), f"rollup_{interval}: two rows for one window"
        assert set(have) == set(expected), f"rollup_{interval}"
        for k, e in expected.items():
            g = have[k]
            assert (g["count"], g["sum"], g["min"], g["max"], g["avg"]) == (
                e["count"], e["sum"], e["min"], e["max"], e["avg"]), k


def test_up_promotion_sends_the_canary_readings_to_the_lake_once(tmp_path: Path) -> None:
    prefix = f"cl{uuid.uuid4().hex[:6]}"
    products = tmp_path / "products.yaml"
    products.write_text(yaml.safe_dump({
        "products": [{"name": "pumps", "devices": {"globs": [f"{prefix}-*"]}, "window_s": 60,
                      "metrics": {"temp": {"min": 0, "max": 50, "bins": 5}}}],
        "canaries": [{"name": "fw2", "product": "pumps", "share_percent": SHARE, "meta": {"firmware": "2.*"}}]}))
    rnd = random.Random(7)
    now = int(time.time() * 1000) - 600_000
    devices = [f"{prefix}-{i}" for i in range(10)]
    sent: list[tuple[str, dict[str, Any]]] = []
    msgs = []
    for i in range(60):  # 2 s apart: a device's 1-minute windows hold readings of both sides
        for d in devices:
            fw = "2.0" if i >= 25 and int(d.rsplit("-", 1)[1]) % 3 else "1.0"
            r = {"ts": now + i * 2000, "seq": i, "measurements": {"temp": round(rnd.gauss(20, 2), 3)},
                 "meta": {"firmware": fw}}
            msgs.append((f"devices/{d}/telemetry", json.dumps(r).encode()))
            sent.append((d, r))
    for j in rnd.sample(range(len(msgs)), len(msgs) // 20):  # sent twice
        msgs.append(msgs[j])
    side = [(d, r) for d, r in sent if r["meta"]["firmware"].startswith("2.")
            and zlib.crc32(d.encode()) * 100 / 2**32 < SHARE]
    assert 0 < len(side) < len(sent)
    main = [x for x in sent if x not in side]

    data = tmp_path / "data"
    args = ("--products", str(products), "--lake-commit-interval", "0.2")
    up = Up(data, *args).start()
    try:
        c = publisher(up.mqtt_port)
        publish_all(c, msgs)
        c.disconnect()
        up.wait_for(lambda s: s["stored"] + s["duplicates"] >= len(msgs) and sum(s["lag"].values()) == 0)
        assert up.get("/canaries/fw2")["readings"] == len(side)
        _wait(lambda: _lake_caught_up(data), "the lake never caught up with the hot store")
        _assert_lake(data, main)  # the canary's readings are held apart: not in the lake
        held = _hot(data, "SELECT id, body FROM canary_readings")
        assert len(held) == len(side)

        done = _post(up, "/canaries/fw2/promote")
        assert (done["state"], done["merged"]) == ("promoted", len(side))
        _wait(lambda: not _hot(data, "SELECT id FROM canary_promotions"), "the promotion never left the outbox")
        _assert_lake(data, sent)
        # retention's read of the lake finds the promoted readings: their hot rows may go
        copy = LakeCopy(open_catalog(LakeSettings(), data), "fieldmesh")
        keys = set(copy.keys(now - 86_400_000, now + 86_400_000).tolist())
        assert {int(k) for k, _ in held} <= keys
    finally:
        assert up.stop() == 0, up.tail()
    table = open_catalog(LakeSettings(), data).load_table("fieldmesh.readings")
    summary = table.current_snapshot().summary.additional_properties  # type: ignore[union-attr]
    (pid,) = json.loads(summary[PROP_PROMOTIONS])

    # a crash between the lake's commits and the marking: the outbox still holds the promotion
    hot = load_store(default_store_url(data))
    try:
        def put_back(tx: SqlTxn) -> None:
            tx.execute("INSERT INTO canary_promotions (id, canary, at_ms, merged) VALUES (?, 'fw2', 0, ?)",
                       (pid, len(held)))
            tx.executemany("INSERT INTO canary_promoted (promotion, id, body) VALUES (?, ?, ?)",
                           [(pid, k, b) for k, b in held])

        hot.transact(put_back)
    finally:
        hot.close()
    up = Up(data, *args).start()
    try:
        _wait(lambda: not _hot(data, "SELECT id FROM canary_promotions"), "the restart left the outbox as it was")
        time.sleep(1)  # commit intervals: a second write would be in by now
    finally:
        assert up.stop() == 0, up.tail()
    _assert_lake(data, sent)
