"""The web console in a real browser: Debian's Chromium driven by Playwright over a running ``fieldmesh up``.

Each page renders data the pipeline stored, the device chart grows with readings published while it is
open (the page's event stream), acknowledging an alert in the page acknowledges it in the API, and no
request leaves the machine (any request to another host is blocked and recorded). Screenshots are saved
in the test's tmp dir (and under $FIELDMESH_TEST_RESULTS when set, for CI to keep).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from fmtest.procs import Up, publish_all, publisher

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"


def _post(up: Up, path: str, body: Any) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{up.http_port}/api/v1{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def _readings(dev: str, start_ms: int, n: int, *, hot_from: int | None = None,
              seq0: int = 0) -> list[tuple[str, bytes]]:
    """n readings 5 s apart; temperature 50 from reading ``hot_from`` on (the rule's threshold is 30)."""
    hot = n if hot_from is None else hot_from
    rs = [{"ts": start_ms + i * 5_000, "seq": seq0 + i, "boot_id": "b1",
           "measurements": {"temperature": 50.0 if i >= hot else 20.0 + (i % 10) / 10, "vibration": i / 100}}
          for i in range(n)]
    return [(f"devices/{dev}/telemetry", json.dumps({"device_id": dev, "readings": rs}).encode())]


def _shot(page: Any, tmp: Path, name: str) -> None:
    page.screenshot(path=str(tmp / f"console-{name}.png"), full_page=True)
    keep = os.environ.get("FIELDMESH_TEST_RESULTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp / f"console-{name}.png", Path(keep) / f"console-{name}.png")


def test_console_pages_live_chart_and_ack(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    assert os.access(CHROMIUM, os.X_OK), "Chromium missing: scripts/ci-services installs the chromium package"
    prefix = f"con{uuid.uuid4().hex[:6]}"
    devs = [f"{prefix}-{i:02d}" for i in range(3)]
    up = Up(tmp_path / "data").start()
    try:
        _post(up, "/rules", {"name": f"{prefix}-hot", "kind": "threshold", "metric": "temperature", "op": ">",
                             "value": 30, "clear_value": 28, "severity": "major", "devices": f"{prefix}-*"})
        _post(up, "/devices", {"device_id": f"{prefix}-reg", "groups": ["plant-1"], "attributes": {"site": "north"}})
        now = int(time.time() * 1000)
        c = publisher(up.mqtt_port)
        msgs = [m for i, d in enumerate(devs)
                for m in _readings(d, now - 600_000, 100, hot_from=50 if i == 0 else None)]
        msgs.append((f"devices/{devs[1]}/telemetry", b"{this is not json"))
        publish_all(c, msgs)
        up.wait_for(lambda s: s["stored"] >= 300 and s["dead_lettered"]["total"] >= 1 and sum(s["lag"].values()) == 0)
        deadline = time.monotonic() + 30
        while not (alert := up.get(f"/alerts?device_id={devs[0]}&state=open")) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert len(alert) == 1 and alert[0]["severity"] == "major", alert

        # the API the pages use: paging, sorting, filtering, downsampling
        page1 = up.get(f"/devices?q={prefix}&sort=-readings&limit=2&offset=0")
        assert [d["readings"] for d in page1] == [100, 100]
        everything = up.get(f"/devices?q={prefix}")
        assert {d["device_id"] for d in everything} == {*devs, f"{prefix}-reg"}
        s = up.get(f"/telemetry/series?device_id={devs[0]}&metric=temperature&start=-1h&max_points=20")
        assert s["source"] == "1m" and s["points"] <= 20 and sum(s["count"]) == 100 and max(s["max"]) == 50.0, s
        assert s["avg"] and min(s["min"]) == 20.0, s
        s = up.get(f"/telemetry/series?device_id={devs[0]}&metric=temperature&start=-1h&max_points=2000")
        assert s["source"] == "raw" and s["points"] == 100 and s["bucket_ms"] == 0, s  # every reading fits

        blocked: list[str] = []
        errors: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            ctx = browser.new_context(viewport={"width": 1300, "height": 900})

            def guard(route: Any) -> None:
                host = urlsplit(route.request.url).hostname
                if route.request.url.startswith("data:") or host in ("127.0.0.1", "localhost", "::1"):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            ctx.route("**/*", guard)
            page = ctx.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            base = f"http://127.0.0.1:{up.http_port}/"

            page.goto(base + f"#/fleet?q={prefix}")
            page.wait_for_selector("body[data-ready=fleet]", timeout=20_000)
            rows = page.locator("#devices tbody tr")
            assert rows.count() == 4
            assert devs[0] in page.locator("#devices").inner_text()
            assert "4 of 4" in page.locator("#count").inner_text()
            page.wait_for_function("document.querySelector('#fleet-alerts').innerText.includes('active alerts')")
            assert page.locator("#fleet-cards").inner_text().count("\n") >= 3
            page.wait_for_selector("#live.on", timeout=10_000)  # the page's event stream is open
            _shot(page, tmp_path, "fleet")

            page.goto(base + f"#/device/{devs[0]}?metric=temperature&range=1h")
            page.wait_for_selector("body[data-ready=device]", timeout=20_000)
            before = page.evaluate("window.__fmChart.data[0].length")
            assert before == 100
            assert page.evaluate("Math.max(...window.__fmChart.data[1])") == 50.0
            page.wait_for_selector("#live.on", timeout=10_000)
            publish_all(c, _readings(devs[0], int(time.time() * 1000), 3, hot_from=0, seq0=1000))
            page.wait_for_function(f"window.__fmChart.data[0].length >= {before + 3}", timeout=15_000)
            assert f"{prefix}-hot" in page.locator("#dev-alerts").inner_text()
            assert "malformed_json" not in page.locator("#dev-dlq").inner_text()  # the bad one was devs[1]'s
            assert page.locator("#twin-version").inner_text().startswith("version ")  # GET .../twin answered
            assert {"desired", "reported", "delta"} <= set(page.locator("#twin dt").all_inner_texts())
            _shot(page, tmp_path, "device")

            page.goto(base + f"#/alerts?device_id={devs[0]}")
            page.wait_for_selector("body[data-ready=alerts]", timeout=20_000)
            row = page.locator(f"#alerts tr[data-id='{alert[0]['id']}']")
            assert row.locator(".state").inner_text() == "open"
            row.locator("button[data-act=ack]").click()
            page.wait_for_function("document.querySelector('#msg').innerText.includes('acknowledged')")
            _shot(page, tmp_path, "alerts")
            got = up.get(f"/alerts/{alert[0]['id']}")
            assert got["state"] == "acknowledged" and got["acked_by"] == "local", got

            page.goto(base + "#/dlq?reason=malformed_json")
            page.wait_for_selector("body[data-ready=dlq]", timeout=20_000)
            page.locator("#dlq tbody tr").first.click()
            assert "this is not json" in page.locator("#payload").inner_text()
            _shot(page, tmp_path, "dlq")

            page.goto(base + "#/pipeline")
            page.wait_for_selector("body[data-ready=pipeline]", timeout=20_000)
            page.wait_for_function("window.__fmChart.data[0].length >= 2", timeout=15_000)  # rates from the stream
            received = up.wait_for(lambda st: st["stored"] >= 303)["received"]
            page.wait_for_function(f"document.querySelector('#counters').innerText.includes('{received}')")
            assert "store" in page.locator("#health").inner_text()
            _shot(page, tmp_path, "pipeline")
            browser.close()
        c.disconnect()
        assert blocked == [], f"requests to other hosts: {blocked}"
        assert errors == [], errors
    finally:
        assert up.stop() == 0, up.tail()


def test_console_asks_for_a_key_once_and_sends_it_as_a_bearer_header(tmp_path: Path) -> None:
    """Once an API key exists the API needs one: the console asks, keeps it for the tab, and sends it in the
    Authorization header (the event stream too), never in a URL."""
    from playwright.sync_api import sync_playwright

    up = Up(tmp_path / "data").start()
    try:
        key = _post(up, "/keys", {"role": "operator", "name": "console-test"})["key"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            up.get("/stats")
        assert refused.value.code == 401
        seen: list[tuple[str, str | None]] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            page.on("request", lambda r: seen.append((r.url, r.headers.get("authorization"))))
            page.goto(f"http://127.0.0.1:{up.http_port}/#/pipeline")
            page.wait_for_selector("#login[open]", timeout=20_000)
            page.fill("#login-key", "fmk_0123456789ab_" + "x" * 43)  # a wrong one first: asked again
            page.click("#login button")
            page.wait_for_function("document.querySelector('#login-error').innerText.includes('refused')")
            page.fill("#login-key", key)
            page.click("#login button")
            page.wait_for_selector("body[data-ready=pipeline]", timeout=20_000)
            page.wait_for_selector("#live.on", timeout=10_000)
            assert page.evaluate("sessionStorage.getItem('fieldmesh.key')") == key
            page.reload()  # kept for the tab: not asked again
            page.wait_for_selector("body[data-ready=pipeline]", timeout=20_000)
            assert not page.locator("#login[open]").count()
            assert "operator" in page.locator("#who").inner_text()
            browser.close()
        stream = [h for u, h in seen if "/events/stream" in u]
        assert stream and all(h == f"Bearer {key}" for h in stream), stream
        assert not [u for u, _ in seen if key in u or "fmk_" in u]
    finally:
        assert up.stop() == 0, up.tail()
