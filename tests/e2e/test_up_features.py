"""Feature views end to end: ``fieldmesh up --features FILE --online-url redis://...``, MQTT in, the feature
API out; the values equal the oracle's, computed from what was published (5% duplicates, late readings)."""

from __future__ import annotations

import random
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from fieldmesh.client import FeatureClient
from fieldmesh.core.codec import encode_reading_json
from fieldmesh.store.features import RedisOnlineStore, row_from_json
from fieldmesh.stream.featureviews import load_feature_views
from fmtest.features import features_oracle, same
from fmtest.procs import Up, publish_all, publisher

pytestmark = pytest.mark.integration

VIEWS = """
feature_views:
  - name: pump_stats
    entity: device
    metrics: [temperature, pressure]
    windows: [1m, 5m]
    hop: 1m
    aggregations: [mean, min, max, stddev, count, last, rate]
    ttl: 2h
    allowed_lateness: 30s
"""


def _stream(prefix: str) -> list[tuple[str, dict[str, Any]]]:
    rnd = random.Random(3)
    start = int(time.time() * 1000) - 3_600_000
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(240):
        for d in range(3):
            out.append((f"{prefix}-{d}", {"ts": start + i * 15_000 + rnd.randrange(0, 5000), "seq": i,
                                          "measurements": {"temperature": round(rnd.gauss(60, 4), 3),
                                                           "pressure": round(rnd.uniform(1, 3), 4)}}))
    late = [x for x in out if x[1]["seq"] in (50, 51, 52)]  # sent at the end: their windows are long closed
    out = [x for x in out if x not in late]
    for _ in range(len(out) // 20):  # 5% duplicates
        j = rnd.randrange(len(out) - 1)
        out.insert(rnd.randrange(j + 1, len(out)), out[j])
    out += late
    return [(d, {**r, "received": n}) for n, (d, r) in enumerate(out)]  # arrival order (known_at not compared)


def test_up_with_features_serves_the_oracles_values(tmp_path: Path) -> None:
    prefix = f"ft{uuid.uuid4().hex[:6]}"
    views_file = tmp_path / "views.yaml"
    views_file.write_text(VIEWS)
    (view,) = load_feature_views(views_file)
    online_url = f"redis://127.0.0.1:6379/0?prefix={prefix}"
    stream = _stream(prefix)
    up = Up(tmp_path / "data", "--features", str(views_file), "--online-url", online_url, "--no-lake").start()
    t0 = int(time.time() * 1000)
    try:
        c = publisher(up.mqtt_port)
        publish_all(c, [(f"devices/{d}/telemetry", encode_reading_json(d, r["ts"], r["measurements"], r["seq"]))
                        for d, r in stream])
        c.disconnect()
        expected = features_oracle(stream, view)
        stats = up.wait_for(lambda s: (s.get("features") or {}).get("rows_written", 0) >= len(expected)
                            and sum(s["lag"].values()) == 0)
        assert stats["features"]["rows_written"] == len(expected), stats
        assert stats["features"]["online_write_failures"] == 0
        assert stats["features"]["late"] > 0  # the late readings were counted, not folded in
        with FeatureClient(f"http://127.0.0.1:{up.http_port}") as fc:
            for d in range(3):
                ent = f"{prefix}-{d}"
                last_end = max(end for e, end in expected if e == ent)
                want = expected[(ent, last_end)]
                got = fc.get(ent, ["pump_stats", "absent_view"])
                assert got.views["absent_view"] is None
                row = got.views["pump_stats"]
                assert row is not None
                assert row["window_end"] == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(last_end / 1000)) + ".000Z"
                vals = got.values("pump_stats") or {}
                assert set(vals) == set(want["values"])
                bad = {k: (vals[k], v) for k, v in want["values"].items()
                       if not same(float("nan") if vals[k] is None else vals[k], v)}
                assert not bad, bad
                known = got.known_at("pump_stats")
                assert known is not None and t0 - 1000 <= known.timestamp() * 1000 <= time.time() * 1000
        # lineage: device -> ingest topic -> gateway -> readings topic -> processor -> readings -> the feature
        # stage -> its view, in the hot store and the online store
        g = up.get(f"/lineage?dataset=device:{prefix}-0")
        names = {n["id"]: n.get("name") for n in g["nodes"]}
        edges = {(names[e["from"]], names[e["to"]]) for e in g["edges"]}
        assert {("fm.readings", "fieldmesh.processor"), ("fieldmesh.processor", "readings"),
                ("readings", "fieldmesh.features"), ("fieldmesh.features", "features.pump_stats")} <= edges, edges
        assert sum(1 for n in names.values() if n == "features.pump_stats") == 2  # offline and online
        assert f"device:{prefix}-0" in names
        metrics = __import__("urllib.request").request.urlopen(
            f"http://127.0.0.1:{up.http_port}/metrics").read().decode()
        assert f"fieldmesh_feature_rows_written_total {float(len(expected))}" in metrics
    finally:
        assert up.stop() == 0, up.tail()
        log = (tmp_path / "data" / "logs" / "processor.log").read_text()
        assert "did not close cleanly" not in log and "features: 1 views" in log, log[-2000:]
        r = RedisOnlineStore(online_url)
        assert r.clear() >= 3
        r.close()


def test_kill9_mid_stream_neither_loses_nor_repeats_a_feature_row(tmp_path: Path) -> None:
    from fieldmesh.store.sqlite import SqliteStore

    prefix = f"fk{uuid.uuid4().hex[:6]}"
    views_file = tmp_path / "views.yaml"
    views_file.write_text(VIEWS)
    (view,) = load_feature_views(views_file)
    stream = _stream(prefix)
    msgs = [(f"devices/{d}/telemetry", encode_reading_json(d, r["ts"], r["measurements"], r["seq"]))
            for d, r in stream]
    half = len(msgs) // 2
    data = tmp_path / "data"
    up = Up(data, "--features", str(views_file), "--no-lake").start()  # the embedded online store
    c = publisher(up.mqtt_port)
    publish_all(c, msgs[:half])
    time.sleep(0.3)
    up.kill9()  # mid-stream
    c.loop_stop()
    up2 = Up(data, "--features", str(views_file), "--no-lake")
    up2.mqtt_port, up2.http_port = up.mqtt_port, up.http_port
    up2.start()
    try:
        c2 = publisher(up2.mqtt_port)
        publish_all(c2, msgs)  # the device re-sends what it is unsure of (all of the first half), then the rest
        c2.disconnect()
        expected = features_oracle(stream, view)
        stats = up2.wait_for(lambda s: (s.get("features") or {}).get("rows_written", 0) >= len(expected)
                             and sum(s["lag"].values()) == 0)
        assert stats["features"]["rows_written"] == len(expected), stats
        ent = f"{prefix}-1"
        last_end = max(end for e, end in expected if e == ent)
        got = up2.get(f"/features/{ent}?views=pump_stats")["views"]["pump_stats"]
        assert got["values"]["temperature__count__5m"] == expected[(ent, last_end)]["values"]["temperature__count__5m"]
    finally:
        assert up2.stop() == 0, up2.tail()
    hot = SqliteStore(f"sqlite:///{(data / 'store.db').resolve()}", readonly=True)
    try:
        rows = [row_from_json(*r) for r in hot.query(
            'SELECT view, entity, window_start, window_end, known_at, version, "values" FROM feature_rows').rows]
    finally:
        hot.close()
    got_rows = {(r.entity, r.window_end_ms): r for r in rows}
    assert len(got_rows) == len(rows), "a feature row written twice"
    assert set(got_rows) == set(expected)
    for k, e in expected.items():
        g = got_rows[k]
        assert g.window_start_ms == e["start"] and set(g.values) == set(e["values"]), k
        bad = {f: (g.values[f], v) for f, v in e["values"].items() if not same(g.values[f], v)}
        assert not bad, (k, bad)
