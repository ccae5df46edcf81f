"""Canary routing end to end: ``fieldmesh up --products FILE`` (a product and a canary), MQTT in through the
gateway and the processor, the canary's readings held apart and promoted over REST; lineage shows the canary.

The oracle is plain Python: the canary takes the readings of firmware 2.x from the devices whose CRC-32 falls
in its share; every published reading (5 % sent twice) must be stored once, on the oracle's side."""

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

from fmtest.procs import Up, publish_all, publisher

pytestmark = pytest.mark.integration

SHARE = 40


def _post(up: Up, path: str) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{up.http_port}/api/v1{path}", method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_up_routes_a_canary_apart_and_promotes_it(tmp_path: Path) -> None:
    prefix = f"cn{uuid.uuid4().hex[:6]}"
    products = tmp_path / "products.yaml"
    products.write_text(yaml.safe_dump({
        "products": [{"name": "pumps", "devices": {"globs": [f"{prefix}-*"]}, "window_s": 60,
                      "metrics": {"temp": {"min": 0, "max": 50, "bins": 5}}}],
        "canaries": [{"name": "fw2", "product": "pumps", "share_percent": SHARE, "meta": {"firmware": "2.*"}}]}))
    rnd = random.Random(4)
    now = int(time.time() * 1000) - 600_000
    devices = [f"{prefix}-{i}" for i in range(12)]
    sent: list[tuple[str, int, str]] = []
    msgs = []
    for i in range(40):
        for d in devices:
            fw = "2.0" if i >= 20 and int(d.rsplit("-", 1)[1]) % 3 else "1.0"
            body = json.dumps({"ts": now + i * 1000, "seq": i, "measurements": {"temp": rnd.gauss(20, 2)},
                               "meta": {"firmware": fw}}).encode()
            msgs.append((f"devices/{d}/telemetry", body))
            sent.append((d, i, fw))
    for j in rnd.sample(range(len(msgs)), len(msgs) // 20):  # sent twice
        msgs.append(msgs[j])
    side = {(d, i) for d, i, fw in sent if fw.startswith("2.") and zlib.crc32(d.encode()) * 100 / 2**32 < SHARE}
    assert 0 < len(side) < len(sent)

    up = Up(tmp_path / "data", "--products", str(products), "--no-lake").start()
    try:
        c = publisher(up.mqtt_port)
        publish_all(c, msgs)
        c.disconnect()
        st = up.wait_for(lambda s: s["stored"] + s["duplicates"] >= len(msgs) and sum(s["lag"].values()) == 0)
        assert (st["stored"], st["duplicates"]) == (len(sent), len(msgs) - len(sent))  # every reading counted
        info = up.get("/canaries/fw2")
        assert (info["state"], info["readings"]) == ("active", len(side))
        held = up.get("/canaries/fw2/readings?limit=10000")
        assert {(r["device_id"], r["seq"]) for r in held} == side
        main = up.get("/telemetry/raw?limit=100000")
        main_keys = [(r["device_id"], r["seq"]) for r in main if r["device_id"].startswith(prefix)]
        assert sorted(main_keys) == sorted({(d, i) for d, i, _ in sent} - side)  # apart, and each once
        cmp = up.get("/canaries/fw2/compare")
        assert cmp["counts"]["canary"]["stored"] == len(side)
        assert cmp["counts"]["baseline"]["stored"] == len(sent) - len(side)
        # lineage: the processor's run names the canary's dataset, downstream of the devices
        g = up.get("/lineage?dataset=canary.fw2")
        ids = {n["id"] for n in g["nodes"]}
        assert "job:fieldmesh/fieldmesh.processor" in ids and f"device:{devices[0]}" in ids
        # promotion: merged into the main tables, once
        done = _post(up, "/canaries/fw2/promote")
        assert (done["state"], done["merged"], done["readings"]) == ("promoted", len(side), 0)
        main = up.get("/telemetry/raw?limit=100000")
        assert len([r for r in main if r["device_id"].startswith(prefix)]) == len(sent)
        assert up.get("/stats")["stored"] == len(sent)
    finally:
        assert up.stop() == 0, up.tail()
