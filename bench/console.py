"""Console benchmark, measured in Debian's Chromium (Playwright) over a real ``fieldmesh up``.

1. Fleet page, first useful paint with ``--devices`` (10,000) registered (one CSV import) and each seen (one
   reading each, through MQTT): from navigation start to the frame with the device table and the counts
   painted (``window.__fmReadyMs``, performance.now() of the page). Target <= 1 s.
   Baseline: the raw API call the page would need without server-side paging, ``GET /devices`` (every
   device) over HTTP from Python, same run.
2. Device page, a ``--days`` (7) range of one device at 1-second resolution (days * 86,400 readings published
   through MQTT in time order): from the series request to uPlot's draw of the downsampled data
   (``window.__fmSeries.drawnMs``). Target <= 100 ms. Baseline: ``GET /telemetry/raw`` of the same range
   (its 100,000-row cap: a sixth of a week) over HTTP from Python, same run.
3. Browser CPU with the live stream at 1 Hz: the renderer's task time (Chrome DevTools Protocol
   Performance.getMetrics ``TaskDuration``) over ``--live-s`` seconds on the device page while one reading per
   second is published, as a share of one core.

Run: ``PYTHONPATH=$PWD/src .venv/bin/python bench/console.py [--devices 10000] [--days 7] [--live-s 10]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import UpProc

CHROMIUM = "/usr/bin/chromium"


def _timed_get(up: UpProc, path: str) -> tuple[float, Any]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{up.http_port}/api/v1{path}", timeout=120) as r:
        body = json.loads(r.read())
    return (time.perf_counter() - t0) * 1000, body


def _publish(up: UpProc, msgs: list[tuple[str, bytes]]) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-console-{up.mqtt_port}")
    c.max_inflight_messages_set(500)
    c.connect("127.0.0.1", up.mqtt_port)
    c.loop_start()
    infos = [c.publish(t, p, qos=1) for t, p in msgs]
    for i in infos:
        i.wait_for_publish(120)
    c.loop_stop()
    c.disconnect()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--days", type=float, default=7)
    ap.add_argument("--live-s", type=int, default=10)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        up = UpProc(Path(tmp) / "data")
        try:
            run(up, args, sync_playwright)
        finally:
            up.stop()


def run(up: UpProc, args: argparse.Namespace, sync_playwright: Any) -> None:
    base = f"http://127.0.0.1:{up.http_port}"
    now = int(time.time() * 1000)
    # -- seed: 10k devices registered and seen, one device with days of 1 s readings
    csv = "device_id,groups,status,attr.site\n" + "".join(
        f"bench-{i:05d},plant-{i % 20},active,site-{i % 7}\n" for i in range(args.devices))
    req = urllib.request.Request(f"{base}/api/v1/devices/import", data=csv.encode(),
                                 headers={"Content-Type": "text/csv"}, method="POST")
    urllib.request.urlopen(req, timeout=120).read()
    fleet_msgs = [(f"devices/bench-{i:05d}/telemetry", json.dumps(
        {"device_id": f"bench-{i:05d}", "ts": now - (i % 600) * 1000, "seq": 0,
         "measurements": {"temperature": 20 + i % 10}}).encode()) for i in range(args.devices)]
    n_series = int(args.days * 86_400)
    dev = "bench-series"
    start = now - n_series * 1000
    series_msgs = []
    for b in range(0, n_series, 1000):
        rs = [{"ts": start + i * 1000, "seq": i, "measurements": {"temperature": 20 + (i % 3600) / 360}}
              for i in range(b, min(n_series, b + 1000))]
        series_msgs.append((f"devices/{dev}/telemetry", json.dumps({"device_id": dev, "readings": rs}).encode()))
    t0 = time.monotonic()
    _publish(up, fleet_msgs + series_msgs)
    up.wait_stored(args.devices + n_series, timeout_s=900)
    deadline = time.monotonic() + 300
    while sum(up.get("/stats")["lag"].values()) and time.monotonic() < deadline:  # a quiet pipeline
        time.sleep(0.5)
    print(f"seeded {args.devices:,} devices and {n_series:,} readings of {dev} in {time.monotonic() - t0:.1f} s")

    api_all_ms, rows = _timed_get(up, "/devices")
    api_page_ms, _ = _timed_get(up, "/devices?limit=50&sort=device_id")
    assert len(rows) >= args.devices, len(rows)
    raw_ms, raw = _timed_get(up, f"/telemetry/raw?device_id={dev}&metric=temperature&start={start}&limit=100000")
    series_api_ms, s = _timed_get(up, f"/telemetry/series?device_id={dev}&metric=temperature&start=-7d"
                                      "&max_points=2520")  # what the page asks at its width

    blocked: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        ctx = browser.new_context(viewport={"width": 1300, "height": 900})

        def guard(route: Any) -> None:
            if urlsplit(route.request.url).hostname in ("127.0.0.1", "localhost") or route.request.url.startswith(
                    "data:"):
                route.continue_()
            else:
                blocked.append(route.request.url)
                route.abort()

        ctx.route("**/*", guard)
        paints = []
        for _ in range(5):  # a fresh page each time: cold page, warm server
            page = ctx.new_page()
            page.goto(base + "/#/fleet")
            page.wait_for_selector("body[data-ready=fleet]", timeout=30_000)
            paints.append(page.evaluate("window.__fmReadyMs"))
            page.close()
        page = ctx.new_page()
        draws = []
        for _ in range(5):
            page.goto("about:blank")
            page.goto(base + f"/#/device/{dev}?metric=temperature&range=7d")
            page.wait_for_selector("body[data-ready=device]", timeout=30_000)
            draws.append(page.evaluate("window.__fmSeries"))
        # live updates at 1 Hz on the device page (15m range: raw points)
        page.goto("about:blank")
        page.goto(base + f"/#/device/{dev}?metric=temperature&range=15m")
        page.wait_for_selector("body[data-ready=device]", timeout=30_000)
        page.wait_for_selector("#live.on", timeout=10_000)
        cdp = ctx.new_cdp_session(page)
        cdp.send("Performance.enable")
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-live-{up.mqtt_port}")
        c.connect("127.0.0.1", up.mqtt_port)
        c.loop_start()

        def task_s() -> float:
            return float(next(m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]
                              if m["name"] == "TaskDuration"))

        t_cpu, t_wall = task_s(), time.monotonic()
        for i in range(args.live_s):
            ts = int(time.time() * 1000)
            c.publish(f"devices/{dev}/telemetry", json.dumps(
                {"device_id": dev, "ts": ts, "seq": n_series + i, "measurements": {"temperature": 25}}), qos=1)
            time.sleep(1)
        cpu = (task_s() - t_cpu) / (time.monotonic() - t_wall)
        grown = page.evaluate("window.__fmLive || 0")
        c.loop_stop()
        c.disconnect()
        browser.close()

    paint = sorted(paints)[2]
    draw = sorted(draws, key=lambda d: d["drawnMs"])[2]
    print(f"\nfleet page, {args.devices:,} devices (median of 5 cold page loads)")
    print(f"  first useful paint (navigation -> table and counts painted): {paint:8.1f} ms   target <= 1000 ms"
          f"   {'MET' if paint <= 1000 else 'NOT MET'}")
    print(f"  baseline GET /devices, every device ({len(rows):,} rows, from Python): {api_all_ms:8.1f} ms"
          f"   paint / baseline = {paint / api_all_ms:.2f}x")
    print(f"  GET /devices?limit=50 (the page's call, from Python):       {api_page_ms:8.1f} ms")
    print(f"\ndevice page, {args.days:g} days at 1 s ({n_series:,} readings), median of 5")
    print(f"  request -> uPlot drawn ({draw['points']} points from {draw['source']}): {draw['drawnMs']:8.1f} ms"
          f"   target <= 100 ms   {'MET' if draw['drawnMs'] <= 100 else 'NOT MET'}   (fetch {draw['fetchMs']:.1f} ms)")
    print(f"  GET /telemetry/series from Python ({s['points']} points, {s['source']}): {series_api_ms:8.1f} ms")
    print(f"  baseline GET /telemetry/raw of the range (capped at {len(raw):,} rows, from Python): {raw_ms:8.1f} ms"
          f"   drawn / baseline = {draw['drawnMs'] / raw_ms:.3f}x")
    print(f"\nlive updates at 1 Hz for {args.live_s} s: renderer task time {cpu:.1%} of one core"
          f" ({grown} points appended, {args.live_s} published)")
    print(f"requests to other hosts: {len(blocked)}")


if __name__ == "__main__":
    main()
