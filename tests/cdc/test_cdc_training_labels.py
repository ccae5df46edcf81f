"""Training-set labels as of CDC commit time, end to end: maintenance rows committed in PostgreSQL, captured
by the real CDC path (pgoutput -> NATS), joined by ``fieldmesh features training-set`` with features from
the lake."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cdc_helpers import pg_db_url, pg_exec, read_topic
from typer.testing import CliRunner

from fieldmesh.cdc.base import cdc_topic
from fieldmesh.cdc.runner import run_cdc
from fieldmesh.cli.main import app
from fieldmesh.core.settings import LakeSettings
from fieldmesh.runtime.natsserver import EmbeddedNats
from fieldmesh.store.lake import open_catalog
from fmtest.featurerows import View, append_rows, features_table, make_stream, stream_rows

pytestmark = pytest.mark.integration

YAML = """feature_views:
  - name: pump_stats
    entity: device
    metrics: [temperature, pressure]
    windows: [1m, 5m]
    hop: 1m
    aggregations: [mean, max, count]
    ttl: 30m
    allowed_lateness: 30s
"""
VIEW = View("pump_stats", ("temperature", "pressure"), (60_000, 300_000), 60_000, ("mean", "max", "count"),
            ttl_ms=30 * 60_000, lateness_ms=30_000)
H = 10_000  # label horizon


def test_labels_are_joined_as_of_commit_time(pg_db: str, nats_server: EmbeddedNats, tmp_path: Path) -> None:
    pg_exec(pg_db, "CREATE TABLE public.maintenance (id serial PRIMARY KEY, device_id text NOT NULL, "
                   "failed boolean NOT NULL, note text)")
    topic = cdc_topic(pg_db, "public", "maintenance")

    async def capture() -> list:
        stop = asyncio.Event()
        task = asyncio.create_task(run_cdc(pg_db_url(pg_db), "public.maintenance", nats_server.url,
                                           state_dir=tmp_path / "cdc", name="fmlabels", stop=stop))
        try:
            await asyncio.sleep(1.0)  # the capture's (empty) snapshot
            for dev, failed in (("dev-0", True), ("dev-1", False), ("dev-0", False)):
                pg_exec(pg_db, "INSERT INTO maintenance (device_id, failed, note) VALUES (%s, %s, 'x')",
                        params=(dev, failed))
                time.sleep(0.05)
            pg_exec(pg_db, "UPDATE maintenance SET failed = true WHERE device_id = 'dev-1'")
            return await read_topic(nats_server.url, topic, expect=4)
        finally:
            stop.set()
            await asyncio.wait_for(task, 20)

    events = asyncio.run(capture())
    assert [e.op for e in events] == ["c", "c", "c", "u"]
    commits = [e.source.ts_ms for e in events]
    t0, t1, t2, t3 = commits  # dev-0 True, dev-1 False, dev-0 False, dev-1 -> True

    # features in the lake, around the commit times
    arrivals = make_stream(11, devices=3, minutes=40, t0=(t0 - 30 * 60_000) // 60_000 * 60_000)
    rows = stream_rows(VIEW, arrivals)
    data_dir = tmp_path / "data"
    catalog = open_catalog(LakeSettings(), data_dir)
    append_rows(features_table(catalog, "fieldmesh"), rows, 300_000)
    (tmp_path / "views.yaml").write_text(YAML)

    cases = [  # (entity, ts, expected label, expected commit)
        ("dev-0", t0 - 1, True, t0),  # the event is just after ts
        ("dev-0", t0, False if t2 - t0 <= H else None, t2 if t2 - t0 <= H else -1),  # (ts, ...]: t0 itself is out
        ("dev-0", t0 - H, True, t0),  # exactly at ts + horizon: in
        ("dev-0", t0 - H - 1, None, -1),  # one ms beyond the horizon
        ("dev-1", t1 - 1, False, t1),  # the insert's value, not the later update's
        ("dev-1", t1, True if t3 - t1 <= H else None, t3 if t3 - t1 <= H else -1),  # after the insert: the update
        ("dev-2", t0 - 1, None, -1),  # no maintenance for dev-2
        ("dev-9", t0 - 1, None, -1),  # an entity with neither features nor labels
    ]
    ents = pa.table({"entity": [c[0] for c in cases],
                     "ts": pa.array([c[1] for c in cases], pa.int64()).cast(pa.timestamp("ms", tz="UTC"))})
    pq.write_table(ents, tmp_path / "entities.parquet")
    out = tmp_path / "train.parquet"
    res = CliRunner().invoke(app, [
        "features", "training-set", "--entities", str(tmp_path / "entities.parquet"), "--out", str(out),
        "--features", str(tmp_path / "views.yaml"), "--data-dir", str(data_dir), "--source", "lake",
        "--label-table", "public.maintenance", "--label-db", pg_db, "--label-column", "failed",
        "--label-horizon", "10s", "--bus-url", nats_server.url])
    assert res.exit_code == 0, res.output
    got = pq.read_table(out).to_pylist()
    for (ent, ts, label, commit), row in zip(cases, got, strict=True):
        assert row["entity"] == ent
        assert row["label"] == label, (ent, ts - t0, row["label"], label)
        at = row["label__committed_at"]
        assert (-1 if at is None else round(at.timestamp() * 1000)) == commit
    # features came from the lake for the devices that have them
    assert got[0]["pump_stats__temperature__count__5m"] is not None
    assert got[-1]["pump_stats__window_end"] is None
    assert "label 'label'" in res.output and "training set" in res.output

    # --label-agg count over a long horizon; a misspelt table names the topic it looked for
    res = CliRunner().invoke(app, [
        "features", "training-set", "--entities", str(tmp_path / "entities.parquet"), "--out", str(out),
        "--features", str(tmp_path / "views.yaml"), "--data-dir", str(data_dir), "--label-table",
        "public.maintenance", "--label-db", pg_db, "--label-agg", "count", "--label-horizon", "1h",
        "--bus-url", nats_server.url])
    assert res.exit_code == 0, res.output
    counts = pq.read_table(out).column("label").to_pylist()
    assert counts[0] == 2 and counts[4] == 2 and counts[6] == 0, counts
    res = CliRunner().invoke(app, [
        "features", "training-set", "--entities", str(tmp_path / "entities.parquet"), "--out", str(out),
        "--features", str(tmp_path / "views.yaml"), "--data-dir", str(data_dir), "--label-table",
        "public.maintenanse", "--label-db", pg_db, "--label-column", "failed", "--bus-url", nats_server.url])
    assert res.exit_code == 2 and "no CDC topic" in res.output, res.output
    assert np.all(np.diff(commits) >= 0)
