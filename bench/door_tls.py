"""What mutual TLS costs at the MQTT door of ``fieldmesh up``: plaintext and mTLS side by side, in one run.

For each door (``--door nats,mosquitto``) it starts ``fieldmesh up`` twice on fresh data dirs, local-only
(plain MQTT, anonymous devices) and with ``--require-client-cert`` (device certificates in the registry),
and measures in each:

* connection set-ups per second: TCP connect, TLS handshake with a client certificate (ECDSA P-256),
  MQTT CONNECT, CONNACK, close; ``--connectors`` processes in a loop for ``--connect-seconds``;
* the CPU the door's broker process (nats-server, Mosquitto) and the publishers spend per 10,000 readings
  in the throughput run below: what TLS adds, less sensitive than throughput to other work on the machine;
* sustained throughput of case (a) of ``bench/e2e.py``: messages of 100 readings, published as fast as
  the door acknowledges them (QoS 1), until every reading is stored. Under mTLS a connection is one
  device (its certificate confines it to its own topics), so the readings come from ``--devices``
  devices, each on its own connection, spread over ``--publishers`` processes; the plaintext run
  publishes the same messages the same way.

It prints each figure and the ratio mTLS / plaintext. Run: ``.venv/bin/python bench/door_tls.py``
(``--quick`` for a smaller run; ``--door mosquitto``; ``--repeat 5`` alternates the modes five times and
reports the median of each, which a machine shared with other work needs; ``--json out.json``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _common import UpProc, free_port, payloads

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fmtest.pki import CA, Issued


def _ctx(pki: dict[str, str] | None, device: str | None) -> ssl.SSLContext | None:
    if pki is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=pki["ca"])
    if device is not None:
        ctx.load_cert_chain(pki[f"{device}.pem"], pki[f"{device}.key"])
    return ctx


def _connect_packet(client_id: bytes) -> bytes:
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    return b"\x10" + bytes([len(body)]) + body


def connector_proc(args: dict[str, Any], out: Any) -> None:
    """Open and close MQTT connections (TLS with a client certificate when ``pki``) for ``seconds``."""
    ctx = _ctx(args["pki"], args["device"])
    port, n, t_end = args["port"], 0, time.monotonic() + args["seconds"]
    failures = 0
    while time.monotonic() < t_end:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            sock: Any = ctx.wrap_socket(raw, server_hostname="127.0.0.1") if ctx else raw
            sock.sendall(_connect_packet(f"c-{uuid.uuid4().hex[:12]}".encode()))
            ack = b""
            while len(ack) < 4:
                chunk = sock.recv(4 - len(ack))
                if not chunk:
                    break
                ack += chunk
            if len(ack) == 4 and ack[3] == 0:
                n += 1
            else:
                failures += 1
            sock.close()
        except OSError:
            failures += 1
            raw.close()
    out.put((n, failures))


def publish_proc(args: dict[str, Any], out: Any) -> None:
    """One paho client per device of ``devices`` (its certificate under mTLS), publishing round-robin;
    puts the CPU seconds it used on ``out``."""
    import resource

    import paho.mqtt.client as mqtt

    clients = {}
    for dev in args["devices"]:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311, client_id=f"bench-{dev}")
        ctx = _ctx(args["pki"], dev)
        if ctx is not None:
            c.tls_set_context(ctx)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.connect("127.0.0.1", args["port"])
        c.loop_start()
        clients[dev] = c
    last = {}
    for topic, body in args["msgs"]:
        c = clients[topic.split("/")[1]]
        while True:
            info = c.publish(topic, body, qos=1)
            if info.rc == 0:
                break
            time.sleep(0.0005)
        last[topic] = info
    for info in last.values():
        info.wait_for_publish(300)
    for c in clients.values():
        c.disconnect()
        c.loop_stop()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out.put(ru.ru_utime + ru.ru_stime)


def door_cpu(up: UpProc) -> float:
    """CPU seconds used so far by the door's broker process (nats-server or Mosquitto) of ``up``."""
    import psutil

    total = 0.0
    for p in psutil.Process(up.proc.pid).children(recursive=True):
        try:
            if p.name() in ("nats-server", "mosquitto"):
                t = p.cpu_times()
                total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def make_pki(d: Path, devices: list[str]) -> tuple[dict[str, str], dict[str, Issued], Issued]:
    ca = CA(d, "bench-root")
    server = ca.server()
    certs = {dev: ca.device(dev) for dev in devices}
    paths = {"ca": str(ca.cert_path)}
    for dev, c in certs.items():
        paths[f"{dev}.pem"], paths[f"{dev}.key"] = str(c.cert_path), str(c.key_path)
    return paths, certs, server


def register(data_dir: Path, certs: dict[str, Issued]) -> None:
    from fieldmesh.store import default_store_url, load_store
    from fieldmesh.store.registry import Certificate, DeviceRegistry

    data_dir.mkdir(parents=True)
    url = default_store_url(data_dir)
    load_store(url).close()
    reg = DeviceRegistry(url)
    for dev, c in certs.items():
        reg.add(dev, actor="bench")
        reg.add_certificate(Certificate(serial=c.serial, device_id=dev, subject=c.subject, fingerprint=c.fingerprint,
                                        not_before_ms=c.not_before_ms, not_after_ms=c.not_after_ms, revoked_ms=None,
                                        pem=c.pem), actor="bench")
    reg.close()


def run_mode(door: str, mtls: bool, a: argparse.Namespace, msgs: list[tuple[str, bytes]], total: int,
             devices: list[str], pki: dict[str, str], certs: dict[str, Issued], server: Issued) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        extra = ["--door", door]
        port = 0
        if mtls:
            register(data, certs)
            port = free_port()
            extra += ["--mqtt-tls-port", str(port), "--mqtt-tls-cert", str(server.cert_path), "--mqtt-tls-key",
                      str(server.key_path), "--mqtt-ca", pki["ca"], "--require-client-cert"]
        up = UpProc(data, *extra)
        port = port or up.mqtt_port
        try:
            q: Any = mp.Queue()
            procs = [mp.Process(target=connector_proc, args=({"port": port, "pki": pki if mtls else None,
                                                               "device": devices[i], "seconds": a.connect_seconds}, q))
                     for i in range(a.connectors)]
            t0 = time.monotonic()
            for p in procs:
                p.start()
            counts = [q.get(timeout=a.connect_seconds + 120) for _ in procs]
            for p in procs:
                p.join()
            conn_s = sum(n for n, _ in counts) / (time.monotonic() - t0)
            failures = sum(f for _, f in counts)
            stored0 = up.get("/stats")
            base = stored0["stored"] + stored0["duplicates"]
            by_pub = [devices[i :: a.publishers] for i in range(a.publishers)]
            parts = [[m for m in msgs if m[0].split("/")[1] in set(devs)] for devs in by_pub]
            cpu_q: Any = mp.Queue()
            pubs = [mp.Process(target=publish_proc, args=({"port": port, "pki": pki if mtls else None,
                                                            "devices": devs, "msgs": part}, cpu_q))
                    for devs, part in zip(by_pub, parts, strict=True)]
            cpu0 = door_cpu(up)
            t0 = time.monotonic()
            for p in pubs:
                p.start()
            t_end = up.wait_stored(base + total)
            pub_cpu = sum(cpu_q.get(timeout=300) for _ in pubs)
            for p in pubs:
                p.join()
            broker_cpu = door_cpu(up) - cpu0  # the door's work for these readings (TLS included)
            rps = total / (t_end - t0)
        finally:
            up.stop()
    mode = "mtls" if mtls else "plain"
    door_10k, pub_10k = broker_cpu * 10_000 / total, pub_cpu * 10_000 / total
    print(f"door {door}, {mode:>5}: {conn_s:8,.0f} connection set-ups/s ({a.connectors} connectors"
          f"{f', {failures} failed' if failures else ''}); case (a): {rps:10,.0f} readings/s; CPU s per 10k "
          f"readings: door {door_10k:.4f}, publishers {pub_10k:.4f}")
    return {"door": door, "mode": mode, "connections_per_s": round(conn_s), "connect_failures": failures,
            "readings_per_s": round(rps), "door_cpu_s_per_10k": round(door_10k, 4),
            "publisher_cpu_s_per_10k": round(pub_10k, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="a smaller run")
    ap.add_argument("--door", default="nats,mosquitto", help="nats, mosquitto, or both comma-separated")
    ap.add_argument("--devices", type=int, default=8, help="devices (connections) publishing case (a)")
    ap.add_argument("--publishers", type=int, default=2, help="publisher processes")
    ap.add_argument("--connectors", type=int, default=2, help="processes opening connections")
    ap.add_argument("--connect-seconds", type=float, default=5.0, help="how long they open connections")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each mode, alternated; the median of each figure is reported")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args()
    k = 4 if a.quick else 1
    prefix = f"t{uuid.uuid4().hex[:5]}"
    readings = 1_000_000 // k
    msgs = payloads(devices=a.devices, readings=readings, per_message=100, prefix=prefix,
                    ts_ms=int(time.time() * 1000))
    total = sum(b.count(b'"seq"') for _, b in msgs)
    devices = sorted({t.split("/")[1] for t, _ in msgs})
    print(f"case (a): {total:,} readings in {len(msgs):,} messages of 100 from {len(devices)} devices, "
          f"{a.publishers} publisher processes")
    rows = []
    with tempfile.TemporaryDirectory() as pki_dir:
        pki, certs, server = make_pki(Path(pki_dir), devices)
        for door in a.door.split(","):
            runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
            for _ in range(a.repeat):  # alternated, so that a burst of load elsewhere hits both modes alike
                for mtls_on in (False, True):
                    runs[mtls_on].append(run_mode(door, mtls_on, a, msgs, total, devices, pki, certs, server))
            plain, mtls = ({"door": door, "mode": "mtls" if m else "plain", "runs": len(runs[m]),
                            **{k: statistics.median(x[k] for x in runs[m])
                               for k in ("connections_per_s", "readings_per_s", "connect_failures",
                                         "door_cpu_s_per_10k", "publisher_cpu_s_per_10k")},
                            "readings_per_s_each": [x["readings_per_s"] for x in runs[m]]}
                           for m in (False, True))  # the median of each figure over the repetitions
            ratio = mtls["readings_per_s"] / plain["readings_per_s"]
            print(f"door {door} (median of {a.repeat}): plaintext {plain['readings_per_s']:,.0f}, mTLS "
                  f"{mtls['readings_per_s']:,.0f} readings/s; connection set-ups/s plaintext "
                  f"{plain['connections_per_s']:,.0f}, mTLS {mtls['connections_per_s']:,.0f}")
            print(f"door {door}: CPU s per 10k readings, door {plain['door_cpu_s_per_10k']:.4f} -> "
                  f"{mtls['door_cpu_s_per_10k']:.4f}, publishers {plain['publisher_cpu_s_per_10k']:.4f} -> "
                  f"{mtls['publisher_cpu_s_per_10k']:.4f} (plaintext -> mTLS)")
            print(f"door {door}: mTLS / plaintext throughput {ratio:.2f} (cost {100 * (1 - ratio):.1f}%); "
                  f"connection set-ups {mtls['connections_per_s'] / max(plain['connections_per_s'], 1):.2f}x")
            rows += [plain, mtls, {"door": door, "throughput_ratio": round(ratio, 3)}]
    print("\nsummary:")
    for r in rows:
        print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    mp.set_start_method("fork")
    main()
