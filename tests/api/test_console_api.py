"""The console's page and assets (served without a credential, from the package) and its paging helpers."""

from __future__ import annotations

import re
import secrets
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fieldmesh.api.app import create_app
from fieldmesh.api.auth import Access
from fieldmesh.api.console import UI_DIR, page_ids, sort_devices
from fieldmesh.core.codec import decode_telemetry
from fieldmesh.store import load_store
from fmtest.drive import commit_readings


def test_page_and_assets_are_served_from_the_package_and_name_no_other_host(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    c = TestClient(create_app(url, access=Access(url, local_only=False)))
    page = c.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for src in re.findall(r'(?:src|href)="(/ui/[^"]+)"', page.text):
        assert c.get(src).status_code == 200, src
    assert c.get("/ui/app.js").headers["content-type"].startswith(("text/javascript", "application/javascript"))
    # the page is open, its data is not: outside local-only mode the stream needs a key
    assert c.get("/api/v1/events/stream?topics=stats&ticks=1").status_code == 401
    for f in ("index.html", "app.js", "style.css"):
        text = (UI_DIR / f).read_text()
        assert not re.search(r"https?://|//cdn|@import", text), f


def test_page_ids_filters_sorts_and_pages_without_building_rows() -> None:
    groups = {"a-1": ("g1",), "a-2": ("g2",), "b-1": ("g1",)}
    seen = {"a-2": 300, "b-1": 100, "c-9": 200}  # c-9 seen, not registered
    keep_all = lambda i, reg, gs: True  # noqa: E731
    assert page_ids(groups, seen, q=None, sort="device_id", offset=0, limit=10, keep=keep_all) == (
        4, ["a-1", "a-2", "b-1", "c-9"])
    assert page_ids(groups, seen, q=None, sort="-last_seen", offset=0, limit=3, keep=keep_all) == (
        4, ["a-2", "c-9", "b-1"])
    assert page_ids(groups, seen, q=None, sort="last_seen", offset=2, limit=5, keep=keep_all) == (
        4, ["a-2", "a-1"])  # never seen last
    assert page_ids(groups, seen, q="a-", sort="-device_id", offset=0, limit=1, keep=keep_all) == (2, ["a-2"])
    assert page_ids(groups, seen, q=None, sort="device_id", offset=0, limit=10,
                    keep=lambda i, reg, gs: reg and "g1" in gs) == (2, ["a-1", "b-1"])


def test_sort_devices_puts_missing_values_last() -> None:
    rows = [{"device_id": "x", "readings": 5}, {"device_id": "y", "readings": None},
            {"device_id": "z", "readings": 9}]
    assert [r["device_id"] for r in sort_devices(rows, "-readings")] == ["z", "x", "y"]
    assert [r["device_id"] for r in sort_devices(rows, "readings")] == ["x", "z", "y"]


T0 = 1_763_812_800_000  # an hour boundary


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def series_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/s.db"
    else:
        url = f"{request.getfixturevalue('pg_url')}?schema=t_{secrets.token_hex(5)}"
    w = load_store(url)
    body = b"[" + b",".join(b'{"ts":%d,"seq":%d,"measurements":{"t":%d.5}}' % (T0 + i * 10_000, i, (i * 7) % 37)
                            for i in range(1080)) + b"]"  # 3 hours, one reading each 10 s
    commit_readings(w, decode_telemetry(body, device_id="s-1", topic="devices/s-1/telemetry",
                                        received_ms=T0 + 4 * 3_600_000).readings)
    w.close()
    return url


def _oracle(start: int, end: int, bucket: int, window: int) -> dict[int, tuple[int, float, float, float]]:
    """Buckets of the readings (each first in its window of ``window`` ms): count, sum, min, max."""
    out: dict[int, list[float]] = {}
    for i in range(1080):
        ts, v = T0 + i * 10_000, (i * 7) % 37 + 0.5
        ws = ts // window * window
        if not start <= ws < end:
            continue
        b = out.setdefault(start + (ws - start) // bucket * bucket, [0, 0.0, v, v])
        b[0] += 1
        b[1] += v
        b[2], b[3] = min(b[2], v), max(b[3], v)
    return {k: (int(c), s, lo, hi) for k, (c, s, lo, hi) in out.items()}


@pytest.mark.parametrize(("hours", "max_points", "source", "window"), [
    (30, 10, "1h", 3_600_000), (3, 20, "1m", 60_000), (3, 500, "raw", 1), (3, 5000, "raw", 1)])
def test_series_buckets_equal_an_oracle_from_each_source(series_store: str, hours: int, max_points: int,
                                                          source: str, window: int) -> None:
    c = TestClient(create_app(series_store))
    start, end = T0 + 7 * 60_000, T0 + hours * 3_600_000
    s = c.get("/api/v1/telemetry/series", params={"device_id": "s-1", "metric": "t", "start": str(start),
                                                   "end": str(end), "max_points": max_points}).json()
    assert s["source"] == source and s["points"] <= max_points, s
    if max_points == 5000:  # every reading at its own time
        assert s["bucket_ms"] == 0 and s["points"] == (end - start) // 10_000 and s["t"][0] == start
        assert s["avg"] == s["min"] == s["max"] and set(s["count"]) == {1}
        return
    bucket = -(-(end - start) // max_points)
    assert s["bucket_ms"] == bucket
    want = _oracle(start, end, bucket, window)
    got = {t: (n, a * n, lo, hi) for t, n, a, lo, hi in zip(s["t"], s["count"], s["avg"], s["min"], s["max"],
                                                             strict=True)}
    assert set(got) == set(want)
    for k, (n, total, lo, hi) in want.items():
        assert got[k][0] == n and got[k][2:] == (lo, hi) and got[k][1] == pytest.approx(total), k
