"""The largest burst the gateway absorbs from a Mosquitto with stock settings.

A private ``mosquitto`` on a free port with Debian's stock limits (``max_queued_messages 1000``,
``max_inflight_messages 20``), a private nats-server, one ``fieldmesh gateway`` (MQTT 5 shared
subscription) and one ``fieldmesh process`` into SQLite. One publisher sends N QoS 1 messages
(one reading each) as fast as it can; the burst is absorbed when all N are stored. N grows until a
loss (or ``--max``). Prints, per N: sent, stored, the broker's "dropped" log lines, seconds.
With ``--stall`` the gateway is paused (SIGSTOP) while the burst is published and resumed after:
the capacity then depends on the broker's limits and the gateway's Receive Maximum alone, not on
how fast this machine consumes (stock Mosquitto: Receive Maximum + 1,000).

    PYTHONPATH=src .venv/bin/python bench/burst.py            # 1260, 2500, 5000, ... until loss
    PYTHONPATH=src .venv/bin/python bench/burst.py --n 1260 --n 20000
    PYTHONPATH=src .venv/bin/python bench/burst.py --stall --n 66535 --n 66600
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import free_port, payloads

#: Debian's mosquitto 2.0 defaults, spelled out (they are also the built-in defaults).
STOCK = "max_queued_messages 1000\nmax_inflight_messages 20\n"


def start_mosquitto(d: Path, extra: str = STOCK) -> tuple[subprocess.Popen[bytes], int, Path]:
    """A private broker on a free port; returns (process, port, log path)."""
    import socket

    port = free_port()
    log = d / "mosquitto.log"
    conf = d / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {d}/\nlog_dest file {log}\nuser root\n{extra}")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    p = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return p, port, log
        except OSError:
            time.sleep(0.05)
    p.kill()
    raise RuntimeError(f"mosquitto did not start: {log.read_text() if log.exists() else ''}")


def publish_burst(port: int, msgs: list[tuple[str, bytes]]) -> tuple[int, float]:
    """Publish QoS 1 as fast as paho can; returns (messages the broker acknowledged, seconds)."""
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=f"burst-{uuid.uuid4().hex[:8]}")
    c.max_inflight_messages_set(1000)
    c.connect("127.0.0.1", port)
    c.loop_start()
    t0 = time.monotonic()
    infos = [c.publish(t, p, qos=1) for t, p in msgs]
    acked = 0
    for i in infos:
        i.wait_for_publish(120)
        acked += i.is_published()
    dt = time.monotonic() - t0
    c.disconnect()
    c.loop_stop()
    return acked, dt


def one_burst(
    n: int, *, receive_maximum: int | None = None, a_keep: Path | None = None, stall: bool = False
) -> dict[str, Any]:
    """Run the pipeline and one burst of ``n`` messages; return its figures."""
    from fieldmesh.runtime.natsserver import EmbeddedNats
    from fieldmesh.store import load_store

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        broker, port, blog = start_mosquitto(d)
        nats = EmbeddedNats(store_dir=d / "nats")
        nats.start()
        store_url = f"sqlite:///{d}/store.db"
        fm = [sys.executable, "-m", "fieldmesh"]
        env = None
        if receive_maximum is not None:
            import os

            env = {**os.environ, "FIELDMESH__GATEWAY__RECEIVE_MAXIMUM": str(receive_maximum)}
        gw_log = d / "gw.log"
        procs = [
            subprocess.Popen([*fm, "gateway", "--bus-url", nats.url, "--mqtt-url", f"mqtt://127.0.0.1:{port}",
                              "--client-id", "burst-gw"], stdout=gw_log.open("wb"), stderr=subprocess.STDOUT,
                             env=env),
            subprocess.Popen([*fm, "process", "--bus-url", nats.url, "--store-url", store_url],
                             stdout=(d / "proc.log").open("wb"), stderr=subprocess.STDOUT, env=env),
        ]
        try:
            deadline = time.monotonic() + 60
            while "gateway running" not in gw_log.read_text():
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    raise RuntimeError(gw_log.read_text())
                time.sleep(0.1)
            time.sleep(0.5)
            msgs = payloads(devices=20, readings=n, per_message=1, prefix=f"u{uuid.uuid4().hex[:6]}",
                            ts_ms=int(time.time() * 1000))
            t0 = time.monotonic()
            if stall:
                procs[0].send_signal(signal.SIGSTOP)
            acked, pub_s = publish_burst(port, msgs)
            if stall:
                procs[0].send_signal(signal.SIGCONT)
            stored, last, last_change = -1, -1, time.monotonic()
            while time.monotonic() - last_change < 5 and stored < len(msgs):
                time.sleep(0.3)
                try:
                    stored = load_store(store_url, readonly=True).stats().stored
                except Exception:
                    continue
                if stored != last:
                    last, last_change = stored, time.monotonic()
            elapsed = time.monotonic() - t0 - (5 if stored < len(msgs) else 0)
            drops = sum("dropped" in ln for ln in blog.read_text(errors="replace").splitlines())
            lost_conn = gw_log.read_text().count("connection lost")
            if a_keep is not None:
                shutil.copytree(d, a_keep / f"n{n}", ignore=shutil.ignore_patterns("nats", "*.db*"))
            warn = [ln for ln in gw_log.read_text().splitlines() if "WARNING" in ln or "warn" in ln.lower()]
            return {"n": n, "sent": len(msgs), "broker_acked": acked, "stored": stored, "lost": len(msgs) - stored,
                    "drop_log_lines": drops, "publish_s": round(pub_s, 2), "all_stored_s": round(elapsed, 2),
                    "gateway_disconnects": lost_conn, "gateway_warnings": warn[:3]}
        finally:
            for p in procs:
                p.send_signal(signal.SIGCONT)
                p.terminate()
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
            nats.stop()
            broker.terminate()
            broker.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="burst size (repeatable); default: grow until loss")
    ap.add_argument("--max", type=int, default=80_000, help="largest N tried when growing")
    ap.add_argument("--receive-maximum", type=int, help="the gateway's MQTT 5 Receive Maximum (setting)")
    ap.add_argument("--stall", action="store_true", help="pause the gateway while the burst is published")
    ap.add_argument("--keep", type=Path, help="copy the logs of each run under this directory")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args()
    sizes = a.n or [1260, 2500, 5000, 10_000, 20_000, 40_000, 80_000]
    results = []
    for n in sizes:
        if n > a.max:
            break
        r = one_burst(n, receive_maximum=a.receive_maximum, a_keep=a.keep, stall=a.stall)
        results.append(r)
        print(f"{'stalled ' if a.stall else ''}burst N={r['n']:>6}: broker acked {r['broker_acked']:>6}, "
              f"stored {r['stored']:>6}, lost {r['lost']:>6}, mosquitto 'dropped' lines {r['drop_log_lines']}, "
              f"gateway reconnects {r['gateway_disconnects']}, published in {r['publish_s']} s, "
              f"all stored in {r['all_stored_s']} s", flush=True)
        if r["lost"] and not a.n:
            break
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
