"""Twin updates per second, through the REST API and through MQTT reported, against named baselines.

    .venv/bin/python bench/twins.py [--updates 2000] [--devices 200] [--clients 4] [--rounds 1] [--store-url URL]

Every figure is measured in this one run, on the same store backend and the same broker:

1. **baseline, raw store write**: one ``INSERT ... ON CONFLICT DO UPDATE`` of a JSON document per update,
   each its own transaction, on the same backend (SQLite WAL, or the PostgreSQL of ``--store-url``);
2. the twin store in-process (``TwinStore.update_desired``: row lock, version check, merge, metadata,
   change sequence, audit row; and ``update_reported``, not audited) -- what each twin update costs
   over the raw write;
3. **REST**: ``fieldmesh api`` (one uvicorn process), ``--clients`` concurrent clients each PATCHing
   ``/api/v1/devices/{id}/twin/desired`` over keep-alive connections; every answer must be 200; beside it
   the API's own floor, the same clients doing ``GET /api/v1/whoami`` (authenticated, no store write);
4. **baseline, plain Mosquitto retained publish**: the same number of QoS 1 retained publishes of
   the same size to a private Mosquitto, until the last PUBACK;
5. **MQTT reported**: a device-side publisher process sends ``devices/{id}/twin/reported`` (QoS 1) to
   that Mosquitto; the twin service (control/twins.py, in this process) applies each to the store and
   answers; timed until the service has applied the last one (every report changes the twin).

The raw write runs first and again last (the load of a shared machine moves during a run): the ratios
use the mean of both. Ratios: 2 and 3 against 1, 3 against the API's floor; 5 against 4 and against 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fieldmesh.control.twins import TwinService  # noqa: E402
from fieldmesh.store.twins import TwinStore  # noqa: E402


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q / 100 * len(s)))] if s else float("nan")


def doc(i: int) -> dict[str, Any]:
    return {"mode": "window", "window_ms": 1000 + i, "threshold": 3.5, "metrics": {"t": {"deadband": 0.1}}}


# -- 1. the raw store write ---------------------------------------------------------------------
def bench_raw(store_url: str, n: int, devices: int) -> float:
    if store_url.startswith("sqlite:///"):
        con: Any = sqlite3.connect(store_url[len("sqlite:///"):], isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        mark = "?"
    else:
        import psycopg

        con = psycopg.connect(store_url.split("?")[0], autocommit=True)
        mark = "%s"
    con.execute("CREATE TABLE IF NOT EXISTS bench_raw_docs (id TEXT PRIMARY KEY, doc TEXT NOT NULL)")
    sql = (f"INSERT INTO bench_raw_docs (id, doc) VALUES ({mark}, {mark}) "
           "ON CONFLICT (id) DO UPDATE SET doc = excluded.doc")
    t0 = time.perf_counter()
    for i in range(n):
        con.execute(sql, (f"raw-{i % devices}", json.dumps(doc(i))))
    elapsed = time.perf_counter() - t0
    con.execute("DROP TABLE bench_raw_docs")
    con.close()
    return n / elapsed


# -- 2. the twin store in-process ---------------------------------------------------------------
def bench_store(store_url: str, n: int, devices: int, side: str) -> float:
    s = TwinStore(store_url)
    try:
        t0 = time.perf_counter()
        for i in range(n):
            if side == "desired":
                s.update_desired(f"st-{i % devices}", doc(i), actor="bench")
            else:
                s.update_reported(f"st-{i % devices}", doc(i))
        return n / (time.perf_counter() - t0)
    finally:
        s.close()


# -- 3. REST ----------------------------------------------------------------------------------
def bench_rest(data: Path, store_url: str, n: int, devices: int, clients: int) -> tuple[float, list[float], float]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    api = subprocess.Popen([sys.executable, "-m", "fieldmesh", "api", "--data-dir", str(data), "--store-url",
                            store_url, "--http-port", str(port)], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/api/v1/health", timeout=2)
                break
            except httpx.HTTPError:
                if api.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the API did not start: {api.communicate()[1]}") from None
                time.sleep(0.2)
        r = httpx.patch(f"{base}/api/v1/devices/warm/twin/desired", json={"desired": doc(0)}, timeout=30)
        assert r.status_code == 200, r.text
        latencies: list[float] = []
        failures: list[str] = []
        lock = threading.Lock()
        chunks = [list(range(k, n, clients)) for k in range(clients)]

        def client(chunk: list[int], floor: bool) -> None:
            with httpx.Client(base_url=base, timeout=60) as c:
                for i in chunk:
                    t = time.perf_counter()
                    if floor:
                        resp = c.get("/api/v1/whoami")
                    else:
                        resp = c.patch(f"/api/v1/devices/rest-{i % devices}/twin/desired", json={"desired": doc(i)})
                    dt = time.perf_counter() - t
                    with lock:
                        if not floor:
                            latencies.append(dt)
                        if resp.status_code != 200:
                            failures.append(resp.text)

        def run(floor: bool) -> float:
            threads = [threading.Thread(target=client, args=(ch, floor)) for ch in chunks]
            t0 = time.perf_counter()
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            return time.perf_counter() - t0

        floor_s = run(True)  # the API's own floor: an authenticated GET that touches no twin
        elapsed = run(False)
        if failures:
            raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
        return n / elapsed, latencies, n / floor_s
    finally:
        api.terminate()
        try:
            api.wait(30)
        except subprocess.TimeoutExpired:
            api.kill()
            api.wait()


# -- 4 and 5: MQTT -----------------------------------------------------------------------------
def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false", "max_queued_messages 0",
             "max_inflight_messages 0", "log_dest none"]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import socket

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def publisher(port: int, msgs: list[tuple[str, bytes]], retain: bool, out: Any) -> None:
    """Publish every message QoS 1 (as fast as the broker takes them); send the seconds to the last PUBACK."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}", protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(500)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    t0 = time.perf_counter()
    infos = [c.publish(t, p, qos=1, retain=retain) for t, p in msgs]
    for info in infos:
        info.wait_for_publish(60)
    out.put(time.perf_counter() - t0)
    c.loop_stop()
    c.disconnect()


def bench_retained(port: int, n: int, devices: int) -> float:
    msgs = [(f"devices/ret-{i % devices}/twin/desired", json.dumps({"state": doc(i)}).encode()) for i in range(n)]
    q: Any = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=publisher, args=(port, msgs, True, q))
    p.start()
    elapsed = float(q.get(timeout=120))
    p.join(30)
    return n / elapsed


def bench_mqtt_reported(store_url: str, port: int, n: int, devices: int) -> float:
    store = TwinStore(store_url)
    service = TwinService(store=store, mqtt_url=f"mqtt://127.0.0.1:{port}", client_id=f"bench-twins-{os.getpid()}",
                          poll_s=0.5)
    done = threading.Event()
    first: list[float] = []

    def handled(device_id: str, leaf: str) -> None:
        if not first:
            first.append(time.perf_counter())
        if service.stats.reported >= n:
            done.set()

    service.on_handled = handled
    msgs = [(f"devices/mq-{i % devices}/twin/reported", json.dumps({"state": doc(i)}).encode()) for i in range(n)]
    loop_ready = threading.Event()
    stop_holder: list[Any] = []

    def run() -> None:
        async def main() -> None:
            stop = asyncio.Event()
            stop_holder.append((asyncio.get_running_loop(), stop))
            ready = asyncio.Event()
            task = asyncio.create_task(service.run(stop, ready=ready))
            await ready.wait()
            loop_ready.set()
            await task

        asyncio.run(main())

    th = threading.Thread(target=run, daemon=True)
    th.start()
    if not loop_ready.wait(15):
        raise SystemExit("the twin service did not connect")
    q: Any = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=publisher, args=(port, msgs, False, q))
    t0 = time.perf_counter()
    p.start()
    if not done.wait(300):
        raise SystemExit(f"the service applied {service.stats.reported} of {n} reports")
    elapsed = time.perf_counter() - (first[0] if first else t0)
    q.get(timeout=30)
    p.join(30)
    loop, stop = stop_holder[0]
    loop.call_soon_threadsafe(stop.set)
    th.join(10)
    if service.stats.rejected or service.stats.store_errors:
        raise SystemExit(f"reports refused: {service.stats}")
    store.close()
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=2000)
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--store-url", default=None, help="default: a new SQLite file")
    ap.add_argument("--rounds", type=int, default=1, help="repeat everything; print the medians")
    ap.add_argument("--dir", default=None, help=(
        "where the SQLite store goes (default: the system's temp dir); /dev/shm takes the disk's fsyncs out, "
        "leaving the software's cost"))
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fm-bench-twins-", dir=a.dir))
    store_url = a.store_url or f"sqlite:///{tmp / 'store.db'}"
    from fieldmesh.store import load_store

    load_store(store_url).close()
    broker, port = start_mosquitto(tmp)
    runs: list[dict[str, float]] = []
    lat: list[float] = []
    try:
        n, d = a.updates, a.devices
        for r in range(a.rounds):
            f: dict[str, float] = {}
            f["raw1"] = bench_raw(store_url, n, d)
            f["st"] = bench_store(store_url, n, d, "desired")
            f["st_rep"] = bench_store(store_url, n, d, "reported")
            f["rest"], rl, f["whoami"] = bench_rest(tmp, store_url, n, d, a.clients)
            lat += rl
            f["ret"] = bench_retained(port, n, d)
            f["mq"] = bench_mqtt_reported(store_url, port, n, d)
            f["raw2"] = bench_raw(store_url, n, d)  # again at the end: the machine's load moves during a run
            f["raw"] = (f["raw1"] + f["raw2"]) / 2
            runs.append(f)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.0f}/s" for k, v in f.items()), file=sys.stderr)
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    def med(key: str, over: str | None = None) -> float:
        vals = sorted(f[key] / f[over] if over else f[key] for f in runs)
        return vals[len(vals) // 2]

    backend = store_url.split(":", 1)[0] + (f" in {a.dir}" if a.dir and not a.store_url else "")
    print(f"twin updates/s, {n} updates over {d} devices, store {backend}, 2-core machine; median of {len(runs)} "
          f"round(s) (ratios: the median of each round's ratio)")
    print(f"  baseline raw store write (upsert, a transaction each) {med('raw'):9.0f}/s  (first {med('raw1'):.0f}/s, "
          f"last {med('raw2'):.0f}/s)")
    print(f"  twin store in-process, update_desired (audited)      {med('st'):9.0f}/s  {med('st', 'raw'):5.2f}x the "
          "raw write")
    print(f"  twin store in-process, update_reported               {med('st_rep'):9.0f}/s  "
          f"{med('st_rep', 'raw'):5.2f}x the raw write")
    print(f"  REST PATCH desired ({a.clients} clients)                     {med('rest'):9.0f}/s  "
          f"{med('rest', 'raw'):5.2f}x the raw write  (p50 {percentile(lat, 50) * 1000:.1f} ms, "
          f"p99 {percentile(lat, 99) * 1000:.1f} ms)")
    print(f"  baseline REST floor: GET /whoami, same clients        {med('whoami'):9.0f}/s  (the PATCH: "
          f"{med('rest', 'whoami'):.2f}x it)")
    print(f"  baseline Mosquitto retained publish (QoS 1)           {med('ret'):9.0f}/s")
    print(f"  MQTT reported via the twin service                    {med('mq'):9.0f}/s  {med('mq', 'ret'):5.2f}x the "
          f"retained publish, {med('mq', 'raw'):5.2f}x the raw write")


if __name__ == "__main__":
    main()
