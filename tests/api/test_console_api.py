"""The console's page and assets (served without a credential, from the package) and its paging helpers."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.testclient import TestClient

from fieldmesh.api.app import create_app
from fieldmesh.api.auth import Access
from fieldmesh.api.console import UI_DIR, page_ids, sort_devices


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
