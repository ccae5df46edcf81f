"""End to end: ``fieldmesh up --cdc-source ...`` with the lake on mirrors the captured table in Iceberg."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from tests.e2e.test_cdc_enrich import _exec, _pg, assets_db

from fieldmesh.core.settings import LakeSettings
from fieldmesh.store.lake import open_catalog
from fieldmesh.store.lakecdc import mirror_names
from fmtest.procs import Up

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

__all__ = ["assets_db"]


def test_up_mirrors_a_captured_table_in_the_lake(tmp_path: Path, assets_db: tuple[str, str]) -> None:
    url, db = assets_db
    _exec(url, "CREATE TABLE assets (id int PRIMARY KEY, site text NOT NULL, threshold float8 NOT NULL)",
          "INSERT INTO assets VALUES (1, 'north', 4.0), (2, 'south', 6.0), (3, 'east', 1.0)")
    data = tmp_path / "data"
    up = Up(data, "--cdc-source", url, "--cdc-tables", "public.assets", "--cdc-name", db).start(timeout_s=90)
    try:
        _exec(url, "UPDATE assets SET threshold = 5.5 WHERE id = 1", "DELETE FROM assets WHERE id = 2",
              "INSERT INTO assets VALUES (4, 'west', 2.5)", "UPDATE assets SET site = 'east-2' WHERE id = 3")
        con = _pg(url)
        with con.cursor() as cur:
            cur.execute("SELECT id, site, threshold FROM assets")
            want = sorted(cur.fetchall())
        con.close()
        catalog = open_catalog(LakeSettings(), data)
        mirror, changes = mirror_names("fieldmesh", "public.assets")
        got: list[tuple[int, str, float]] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if catalog.table_exists(mirror):
                got = sorted((r["id"], r["site"], r["threshold"])
                             for r in catalog.load_table(mirror).scan().to_arrow().to_pylist())
                if got == want:
                    break
            time.sleep(0.5)
        assert got == want, up.tail()
        log = catalog.load_table(changes).scan().to_arrow().to_pylist()
        assert sorted(r["op"] for r in log) == ["c", "d", "r", "r", "r", "u", "u"]
        assert all(r["lsn"] is not None and r["commit_ts"] is not None for r in log if r["op"] != "r")
    finally:
        assert up.stop() == 0, up.tail()
