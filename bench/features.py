"""Feature store benchmark, each figure beside a named baseline measured in the same run.

Sections (run all by default, or pick with flags):

``--online``: **online get latency**, one entity, five views (each 2 metrics x 3 windows x 7 aggregations
= 42 features) in a local Redis. Baseline: redis-py itself, a pipeline of the same five ``HGETALL`` s
without decoding (the floor any Redis client pays). Measured: ``RedisOnlineStore.get_many`` (decoded
rows), the embedded SQLite store, ``GET /api/v1/features/{entity}?views=...`` through
:class:`fieldmesh.client.FeatureClient` on the API served by uvicorn in this process (the client's time:
request, server, JSON decoding), and the client reading Redis directly (``online_url=``). Target: p99 <=
2 ms, for the store call and for the API path with the client.

``--freshness``: **event -> online freshness**. ``fieldmesh up --features ... --online-url redis://...``
as its own processes; one device publishes readings (QoS 1, event time = publication time) at ``--rate``
per second for ``--seconds``; a view of 250 ms and 1 s hopping windows (hop 250 ms). A poller reads the view's
Redis hash every millisecond. Freshness of a window = when its row was first seen in Redis minus when the
reading that made it final (the first one with event time >= the window's end) was published. Baseline:
the same readings' visibility in the hot store (polled the same way: the newest event time stored for the
device), i.e. what the pipeline's stored path takes for them. Target: p99 <= 1 s.

``--cost``: **what the feature stage costs the processor**: bench/processor.py's realistic stream (5% re-sent,
3% an hour late, disorder; 100 readings a message, 3 metrics) applied with ``Processor.apply_records`` on a
SQLite hot store, without and with a feature view (2 metrics x 1 m, 5 m, 1 h windows over 1 m hops x 7
aggregations, checkpoints every 10 s). Baseline: the same processor without features.

``--training``, ``--similar``: training sets of 1 M entity rows and similar windows over 1 M windows, see
``bench/features_offline.py``.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/features.py [--online] [--freshness] [--cost] [--training]
[--similar] [--quick]``
(needs Redis on 127.0.0.1:6379, or ``--redis URL``).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import UpProc, free_port, percentile

from fieldmesh.store.features import RedisOnlineStore, SqliteOnlineStore
from fieldmesh.stream.featureviews import FeatureRow, feature_name

AGGS = ("mean", "min", "max", "stddev", "count", "last", "rate")


def _ms(xs: list[float]) -> str:
    return f"p50 {percentile(xs, 50) * 1000:7.3f} ms  p99 {percentile(xs, 99) * 1000:7.3f} ms"


def _rows(entity: str) -> list[FeatureRow]:
    now = int(time.time() * 1000)
    out = []
    for v in range(5):
        vals = {feature_name(m, a, s): 20.0 + v + i * 0.37 for i, (m, a, s) in enumerate(
            (m, a, s) for s in (60_000, 300_000, 3_600_000) for m in ("temperature", "pressure") for a in AGGS)}
        out.append(FeatureRow(view=f"view{v}", entity=entity, window_start_ms=now - 3_600_000, window_end_ms=now,
                              known_at_ms=now, version=0, values=vals))
    return out


def _timed(fn: Any, n: int) -> list[float]:
    for _ in range(min(200, n)):  # warm
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def bench_online(redis_url: str, n: int) -> None:
    import redis
    import uvicorn

    from fieldmesh.api.app import create_app
    from fieldmesh.client import FeatureClient

    prefix = f"bench{uuid.uuid4().hex[:8]}"
    url = f"{redis_url}?prefix={prefix}"
    store = RedisOnlineStore(url, ttl_ms={f"view{v}": 3_600_000 for v in range(5)})
    entity = "pump-0001"
    rows = _rows(entity)
    views = [r.view for r in rows]
    store.put(rows)
    raw = redis.Redis.from_url(redis_url)
    keys = [store.key(v, entity) for v in views]

    def floor() -> None:
        p = raw.pipeline(transaction=False)
        for k in keys:
            p.hgetall(k)
        p.execute()

    def ours() -> None:
        got = store.get_many(entity, views)
        assert all(got.values())

    tmp = Path(tempfile.mkdtemp(prefix="fm-bench-features-"))
    lite = SqliteOnlineStore(tmp / "features.db")
    lite.put(rows)

    def embedded() -> None:
        got = lite.get_many(entity, views)
        assert all(got.values())

    # the API (uvicorn in a thread of this process) over the same Redis store
    port = free_port()
    app = create_app(f"sqlite:///{tmp / 'store.db'}", online_url=url)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    client = FeatureClient(f"http://127.0.0.1:{port}")
    direct = FeatureClient(online_url=url)
    # the same API in a process of its own (as `fieldmesh api` serves it): the client shares no GIL with it
    own_port = free_port()
    own = subprocess.Popen(
        [sys.executable, "-c", "import sys, uvicorn; from fieldmesh.api.app import create_app; "
         "uvicorn.run(create_app(sys.argv[1], online_url=sys.argv[2]), host='127.0.0.1', port=int(sys.argv[3]), "
         "log_level='warning', lifespan='off')", f"sqlite:///{tmp / 'store.db'}", url, str(own_port)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")})
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", own_port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline or own.poll() is not None:
                raise RuntimeError("the API process did not start") from None
            time.sleep(0.1)
    other = FeatureClient(f"http://127.0.0.1:{own_port}")

    def api_own() -> None:
        got = other.get(entity, views)
        assert all(got.views.values())

    def api() -> None:
        got = client.get(entity, views)
        assert all(got.views.values())

    def direct_get() -> None:
        got = direct.get(entity, views)
        assert all(got.views.values())

    assert client.get(entity, views) == direct.get(entity, views) == other.get(entity, views)  # one answer
    try:
        # interleaved in rounds, so every path sees the same machine load
        res: dict[str, list[float]] = {"floor": [], "ours": [], "embedded": [], "api": [], "own": [], "direct": []}
        rounds = 5
        for _ in range(rounds):
            res["floor"] += _timed(floor, n // rounds)
            res["ours"] += _timed(ours, n // rounds)
            res["embedded"] += _timed(embedded, n // rounds)
            res["api"] += _timed(api, max(200, n // rounds // 2))
            res["own"] += _timed(api_own, max(200, n // rounds // 2))
            res["direct"] += _timed(direct_get, max(200, n // rounds // 2))
        base = percentile(res["floor"], 99)
        print(f"\n## online get: one entity, five views x 42 features ({n} gets each; api {len(res['api'])})")
        print(f"  baseline redis-py pipeline, 5 HGETALL, no decode   {_ms(res['floor'])}")
        for key, label in (("ours", "RedisOnlineStore.get_many (decoded rows)        "),
                           ("embedded", "SqliteOnlineStore.get_many (embedded)           "),
                           ("api", "GET /api/v1/features/{entity} (FeatureClient)   "),
                           ("own", "  the same, the API in a process of its own     "),
                           ("direct", "FeatureClient(online_url=redis://...) (direct)  ")):
            print(f"  {label}   {_ms(res[key])}  p99 x{percentile(res[key], 99) / base:.2f} of baseline")
        print("  (the API: uvicorn with its defaults, in a thread of this process, then in a process of its own; the "
              "client: fieldmesh.client.FeatureClient over one kept-alive connection, decoding the JSON)")
        for key, what in (("ours", "store get"), ("api", "API get with the client")):
            p99 = percentile(res[key], 99) * 1000
            print(f"  target: {what} p99 <= 2 ms -> {p99:.3f} ms: {'met' if p99 <= 2 else 'NOT met'}")
    finally:
        client.close()
        direct.close()
        other.close()
        own.terminate()
        own.wait(10)
        server.should_exit = True
        th.join(5)
        store.clear()
        store.close()
        lite.close()


def bench_freshness(redis_url: str, seconds: float, rate: float) -> None:
    import paho.mqtt.client as mqtt
    import redis

    from fieldmesh.core.codec import encode_reading_json
    from fieldmesh.store.sqlite import SqliteStore

    prefix = f"fresh{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix="fm-bench-fresh-"))
    views = tmp / "views.yaml"
    views.write_text("feature_views:\n  - name: fresh\n    entity: device\n    metrics: [temperature]\n"
                     "    windows: [250ms, 1s]\n    hop: 250ms\n    aggregations: [mean, count, last]\n    ttl: 1h\n")
    data = tmp / "data"
    data.mkdir()
    up = UpProc(data, "--features", str(views), "--online-url", f"{redis_url}?prefix={prefix}", "--no-lake")
    dev = f"{prefix}-dev"
    r = redis.Redis.from_url(redis_url)
    key = f"{prefix}:feat:fresh:{dev}"
    seen_end: dict[int, float] = {}  # window_end -> first time seen in Redis
    stored_at: list[tuple[float, int]] = []  # (time, newest ts stored) whenever it moved
    stop = threading.Event()
    hot = SqliteStore(f"sqlite:///{(data / 'store.db').resolve()}", readonly=True)

    def poll() -> None:
        last_ts = -1
        while not stop.is_set():
            t = time.time()
            end = r.hget(key, "_window_end")
            if end is not None and int(end) not in seen_end:
                seen_end[int(end)] = t
            try:
                q = hot.query("SELECT MAX(ts_ms) FROM readings WHERE device_id = ?", (dev,))
                ts = q.rows[0][0]
            except Exception:
                ts = None
            if ts is not None and int(ts) > last_ts:
                last_ts = int(ts)
                stored_at.append((time.time(), last_ts))
            time.sleep(0.001)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fm-bench-{os.getpid()}")
    c.connect("127.0.0.1", up.mqtt_port)
    c.loop_start()
    published: list[tuple[int, float]] = []  # (event ts, publish time)
    try:
        t_end = time.time() + seconds
        i = 0
        while time.time() < t_end:
            now = time.time()
            ts = int(now * 1000)
            c.publish(f"devices/{dev}/telemetry", encode_reading_json(dev, ts, {"temperature": 20 + i % 7}, i), qos=1)
            published.append((ts, now))
            i += 1
            time.sleep(max(0.0, 1 / rate - (time.time() - now)))
        time.sleep(2.0)
    finally:
        stop.set()
        th.join(5)
        c.loop_stop()
        c.disconnect()
        up.stop()
        hot.close()
        for k in r.scan_iter(match=f"{prefix}:*"):
            r.delete(k)
    fresh, base = [], []
    for end, seen in sorted(seen_end.items()):
        trig = next(((ts, t) for ts, t in published if ts >= end), None)
        if trig is None:
            continue
        fresh.append(seen - trig[1])
        stored = next((t for t, newest in stored_at if newest >= trig[0]), None)
        if stored is not None:
            base.append(stored - trig[1])
    fresh = fresh[1:]  # the first window: the pipeline warming up
    base = base[1:]
    print(f"\n## event -> online freshness: {len(published)} readings at {rate:g}/s for {seconds:g}s, "
          f"{len(fresh)} windows (250 ms hop) seen in Redis")
    print(f"  baseline: reading visible in the hot store      {_ms(base)}")
    print(f"  feature row visible in Redis (online)          {_ms(fresh)}  "
          f"p99 x{percentile(fresh, 99) / percentile(base, 99):.2f} of baseline")
    p99 = percentile(fresh, 99)
    print(f"  target: freshness p99 <= 1 s -> {p99 * 1000:.0f} ms: {'met' if p99 <= 1 else 'NOT met'}")
    print("  (freshness counts only what the pipeline adds: it starts at the publication of the reading that "
          "made the window final)")


def bench_cost(devices: int, per_device: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from processor import make_records, make_stream

    from fieldmesh.core.settings import ProcessorSettings
    from fieldmesh.store.sqlite import SqliteStore
    from fieldmesh.stream.featureviews import FeatureView
    from fieldmesh.stream.featuring import FeatureStage
    from fieldmesh.stream.processor import Processor

    msgs, sent, now = make_stream(devices=devices, per_device=per_device)
    records = make_records(msgs, now, 2)
    view = FeatureView(name="pump", entity="device", metrics=("temperature", "humidity"),
                       windows_ms=(60_000, 300_000, 3_600_000), hop_ms=60_000, aggregations=AGGS, ttl_ms=7_200_000)
    tmp = Path(tempfile.mkdtemp(prefix="fm-bench-cost-"))
    out: dict[str, tuple[float, float, int]] = {}
    for name in ("without", "with"):
        hot = SqliteStore(f"sqlite:///{tmp / (name + '.db')}")
        stage = FeatureStage(store=hot, views=[view], online=None) if name == "with" else None
        p = Processor(bus=None, store=hot, settings=ProcessorSettings(),  # type: ignore[arg-type]
                      sinks=[stage] if stage else [])
        w, c = time.perf_counter(), time.process_time()
        for i in range(0, len(records), 20):  # 2,000 readings an apply, as a fetch of 20 records
            p.apply_records(records[i:i + 20])
        out[name] = (time.perf_counter() - w, time.process_time() - c, stage.engine.rows if stage else 0)
        hot.close()
    (w0, c0, _), (w1, c1, rows) = out["without"], out["with"]
    n = len(sent)
    print(f"\n## processor cost: {n:,} readings sent ({devices} devices), {rows:,} feature rows")
    print(f"  baseline without features: {n / w0:9,.0f} readings/s wall ({w0:.1f}s, CPU {c0:.1f}s)")
    print(f"  with the feature view:     {n / w1:9,.0f} readings/s wall ({w1:.1f}s, CPU {c1:.1f}s)  "
          f"throughput x{w0 / w1:.2f} of baseline")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--online", action="store_true", help="online get latency")
    ap.add_argument("--freshness", action="store_true", help="event -> online freshness")
    ap.add_argument("--training", action="store_true", help="training set of 1M entity rows (features_offline.py)")
    ap.add_argument("--similar", action="store_true", help="similar windows over 1M windows (features_offline.py)")
    ap.add_argument("--cost", action="store_true", help="what the feature stage costs the processor")
    ap.add_argument("--quick", action="store_true", help="fewer iterations, a shorter stream")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--rate", type=float, default=50.0, help="freshness: readings per second")
    ap.add_argument("--seconds", type=float, default=None, help="freshness: how long to publish")
    a = ap.parse_args()
    every = not (a.online or a.freshness or a.cost or a.training or a.similar)
    if a.online or every:
        bench_online(a.redis, 2000 if a.quick else 10_000)
    if a.freshness or every:
        bench_freshness(a.redis, a.seconds or (8.0 if a.quick else 20.0), a.rate)
    if a.cost or every:
        bench_cost(200 if a.quick else 1000, 200 if a.quick else 400)
    if a.training or a.similar or every:
        import features_offline

        a.training, a.similar = a.training or every, a.similar or every
        features_offline.main(a)


if __name__ == "__main__":
    main()
