"""Online and offline agree: ``fieldmesh up --features`` takes a stream (5% duplicates, late readings) in three
phases; after each, every entity's online row is read through the API at a time T. Then
``fieldmesh features training-set`` asks the offline store for the same (entity, T), from the hot store's
feature_rows and from the lake's fieldmesh.features: 0 mismatches in either."""

from __future__ import annotations

import itertools
import math
import random
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from fieldmesh.cli.main import app
from fieldmesh.client import FeatureClient
from fieldmesh.core.codec import encode_reading_json
from fieldmesh.store.features import RedisOnlineStore
from fieldmesh.stream.featureviews import load_feature_views
from fmtest.features import features_oracle
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
    rnd = random.Random(9)
    start = int(time.time() * 1000) - 3_600_000
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(240):
        for d in range(4):
            out.append((f"{prefix}-{d}", {"ts": start + i * 15_000 + rnd.randrange(0, 5000), "seq": i,
                                          "measurements": {"temperature": round(rnd.gauss(60, 4), 3),
                                                           "pressure": round(rnd.uniform(1, 3), 4)}}))
    for _ in range(len(out) // 20):  # 5% duplicates, re-sent later
        j = rnd.randrange(len(out) - 1)
        out.insert(rnd.randrange(j + 1, len(out)), out[j])
    for _ in range(len(out) // 20):  # 5% late: held back minutes
        j = rnd.randrange(len(out) // 2)
        out.insert(min(len(out), j + rnd.randrange(100, 300)), out.pop(j))
    return [(d, {**r, "received": n}) for n, (d, r) in enumerate(out)]


def _same(a: float | None, b: float | None) -> bool:
    """Equal, None and NaN being one "no value" (both sides serve null for it)."""
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return (a is None or math.isnan(a)) and (b is None or math.isnan(b))
    return a == b


def test_online_equals_offline(tmp_path: Path) -> None:
    prefix = f"oo{uuid.uuid4().hex[:6]}"
    views_file = tmp_path / "views.yaml"
    views_file.write_text(VIEWS)
    (view,) = load_feature_views(views_file)
    online_url = f"redis://127.0.0.1:6379/0?prefix={prefix}"
    stream = _stream(prefix)
    entities = [f"{prefix}-{d}" for d in range(5)]  # the last never reports
    data_dir = tmp_path / "data"
    up = Up(data_dir, "--features", str(views_file), "--online-url", online_url,
            env={"FIELDMESH__LAKE__COMMIT_INTERVAL_S": "1"}).start()
    snapshots: list[tuple[str, int, dict[str, Any] | None]] = []
    try:
        c = publisher(up.mqtt_port)
        cut = [0, len(stream) // 3, 2 * len(stream) // 3, len(stream)]
        for a, b in itertools.pairwise(cut):
            publish_all(c, [(f"devices/{d}/telemetry", encode_reading_json(d, r["ts"], r["measurements"], r["seq"]))
                            for d, r in stream[a:b]])
            n = len(features_oracle(stream[:b], view))
            up.wait_for(lambda s, n=n: (s.get("features") or {}).get("rows_written", 0) >= n
                        and sum(s["lag"].values()) == 0)
            time.sleep(0.3)
            with FeatureClient(f"http://127.0.0.1:{up.http_port}") as fc:
                for ent in entities:
                    row = fc.get(ent, ["pump_stats"]).views["pump_stats"]
                    snapshots.append((ent, int(time.time() * 1000), row))
        c.disconnect()
    finally:
        assert up.stop() == 0, up.tail()
        r = RedisOnlineStore(online_url)
        r.clear()
        r.close()
    assert sum(1 for s in snapshots if s[2] is not None) >= 12  # 4 entities x 3 phases
    ents = pa.table({"entity": [s[0] for s in snapshots],
                     "ts": pa.array([s[1] for s in snapshots], pa.int64()).cast(pa.timestamp("ms", tz="UTC"))})
    pq.write_table(ents, tmp_path / "entities.parquet")
    for source in ("store", "lake"):  # the hot store's feature_rows, and the lake's fieldmesh.features
        out = tmp_path / f"offline-{source}.parquet"
        res = CliRunner().invoke(app, ["features", "training-set", "--entities", str(tmp_path / "entities.parquet"),
                                       "--out", str(out), "--features", str(views_file), "--data-dir", str(data_dir),
                                       "--source", source])
        assert res.exit_code == 0, res.output
        mismatches, compared = _compare(snapshots, pq.read_table(out).to_pylist(), view.feature_names())
        assert compared >= 12 * len(view.feature_names()), source
        assert mismatches == [], (source, mismatches[:10])


def _iso(t: Any) -> str | None:
    return None if t is None else t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _compare(snapshots: list[tuple[str, int, dict[str, Any] | None]], offline_rows: list[dict[str, Any]],
             names: list[str]) -> tuple[list[Any], int]:
    mismatches: list[Any] = []
    compared = 0
    for (ent, _, online), offline in zip(snapshots, offline_rows, strict=True):
        end, known = _iso(offline["pump_stats__window_end"]), _iso(offline["pump_stats__known_at"])
        if online is None:
            if end is not None:
                mismatches.append((ent, "online has nothing, offline has", end))
            continue
        if (end, known) != (online["window_end"], online["known_at"]):
            mismatches.append((ent, online["window_end"], online["known_at"], end, known))
            continue
        for name in names:
            compared += 1
            a, b = online["values"].get(name), offline[f"pump_stats__{name}"]
            if not _same(a, b):
                mismatches.append((ent, name, a, b))
    return mismatches, compared
