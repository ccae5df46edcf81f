"""Provisioning benchmark: certificates issued per second in-process, and provisioning requests per second
through the real HTTP API.

    .venv/bin/python bench/provision.py [--requests 600] [--clients 8] [--issue 3000] [--store-url URL]

Device keys and CSRs are made before the clock starts (that work is the devices'). Figures printed:

1. in-process issuance: CSR checked (signature, key, CN) and a device certificate signed by the issuing CA
   (ECDSA P-256), certificates/s on one core;
2. in-process provisioning: the same plus the proof (a token spent in the store), the device registered and
   the certificate recorded (each its own transaction, audited), provisionings/s;
3. over HTTP: ``fieldmesh api`` (one uvicorn process) over the hot store, ``--clients`` concurrent clients
   each POSTing ``/api/v1/provision`` with its own token; requests/s and latency p50/p95/p99. Every answer
   must be a certificate (200), else the run fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from fieldmesh.control.ca import CertificateAuthority
from fieldmesh.control.provision import Provisioner
from fieldmesh.edge.provision import build_csr, new_key
from fieldmesh.store import default_store_url, load_store

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q / 100 * len(s)))] if s else float("nan")


def csrs(n: int, prefix: str) -> list[tuple[str, str]]:
    return [(f"{prefix}-{i}", build_csr(new_key(), f"{prefix}-{i}")) for i in range(n)]


def bench_issue(ca: CertificateAuthority, n: int) -> float:
    work = csrs(n, "issue")
    t0 = time.perf_counter()
    for _dev, pem in work:
        csr, cn = ca.load_csr(pem)
        ca.issue_device(csr, cn)
    return n / (time.perf_counter() - t0)


def bench_provision_inproc(data: Path, store_url: str, n: int) -> float:
    prov = Provisioner.open(data / "ca", store_url)
    try:
        work = [(dev, pem, prov.create_token(dev, ttl_ms=3_600_000, actor="bench")[1])
                for dev, pem in csrs(n, "inproc")]
        t0 = time.perf_counter()
        for _dev, pem, token in work:
            prov.provision(csr=pem, token=token)
        return n / (time.perf_counter() - t0)
    finally:
        prov.close()


def bench_http(data: Path, store_url: str, n: int, clients: int) -> tuple[float, list[float]]:
    prov = Provisioner.open(data / "ca", store_url)
    try:
        work = [(pem, prov.create_token(dev, ttl_ms=3_600_000, actor="bench")[1]) for dev, pem in csrs(n, "http")]
    finally:
        prov.close()
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
        # one warm-up request opens the provisioner's connections (not timed)
        warm_dev, warm_pem = csrs(1, "warm")[0]
        p = Provisioner.open(data / "ca", store_url)
        warm_token = p.create_token(warm_dev, ttl_ms=60_000, actor="bench")[1]
        p.close()
        r = httpx.post(f"{base}/api/v1/provision", json={"csr": warm_pem, "token": warm_token}, timeout=60)
        assert r.status_code == 200, r.text
        latencies: list[float] = []
        failures: list[str] = []
        lock = threading.Lock()
        chunks = [work[i::clients] for i in range(clients)]

        def client(chunk: list[tuple[str, str]]) -> None:
            with httpx.Client(base_url=base, timeout=60) as c:
                for pem, token in chunk:
                    t = time.perf_counter()
                    resp = c.post("/api/v1/provision", json={"csr": pem, "token": token})
                    dt = time.perf_counter() - t
                    with lock:
                        latencies.append(dt)
                        if resp.status_code != 200:
                            failures.append(resp.text)

        threads = [threading.Thread(target=client, args=(ch,)) for ch in chunks]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        elapsed = time.perf_counter() - t0
        if failures:
            raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
        return n / elapsed, latencies
    finally:
        api.terminate()
        try:
            api.wait(30)
        except subprocess.TimeoutExpired:
            api.kill()
            api.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=600, help="provisioning requests over HTTP")
    ap.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    ap.add_argument("--issue", type=int, default=3000, help="certificates issued in-process")
    ap.add_argument("--inproc", type=int, default=600, help="provisionings in-process (token, registry)")
    ap.add_argument("--store-url", default=None, help="hot store (default: SQLite in a temp dir)")
    ap.add_argument("--quick", action="store_true", help="a tenth of everything")
    a = ap.parse_args()
    if a.quick:
        a.requests, a.issue, a.inproc = a.requests // 10, a.issue // 10, a.inproc // 10
    with tempfile.TemporaryDirectory(prefix="fm-bench-prov-") as tmp:
        data = Path(tmp) / "data"
        ca = CertificateAuthority.init(data / "ca")
        store_url = a.store_url or default_store_url(data)
        load_store(store_url).close()  # the hot store the API serves (provisioning needs only its own tables)
        print(f"store: {store_url.split('?')[0].split('@')[-1]}; CA: ECDSA P-256; cores: {os.cpu_count()}")
        rate = bench_issue(ca, a.issue)
        print(f"1. in-process issuance (CSR check + sign):           {rate:8,.0f} certificates/s ({a.issue} CSRs)")
        rate = bench_provision_inproc(data, store_url, a.inproc)
        print(f"2. in-process provisioning (token, registry, audit): {rate:8,.0f} provisionings/s ({a.inproc})")
        rate, lat = bench_http(data, store_url, a.requests, a.clients)
        ms = [x * 1000 for x in lat]
        print(f"3. over HTTP (POST /api/v1/provision, {a.clients} clients):   {rate:8,.0f} requests/s ({a.requests}); "
              f"latency p50 {percentile(ms, 50):.1f} ms, p95 {percentile(ms, 95):.1f} ms, "
              f"p99 {percentile(ms, 99):.1f} ms")


if __name__ == "__main__":
    main()
