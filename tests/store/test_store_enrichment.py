"""Both hot stores keep ``Reading.enrichment`` with the reading and return it from ``raw()``."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from fieldmesh.core.identity import identity_digest, identity_string
from fieldmesh.core.model import Reading
from fieldmesh.store import load_store
from fmtest.drive import commit_readings


def _reading(dev: str, ts_ms: int, enrichment: dict[str, object] | None) -> Reading:
    m = {"vib": 1.5}
    key, chk = identity_digest(identity_string(dev, ts_ms, m, seq=None))
    return Reading(dev, ts_ms, m, key, chk, received_ms=ts_ms + 1, enrichment=enrichment)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    base: str = request.getfixturevalue("pg_url")
    return f"{base}?schema=e_{secrets.token_hex(5)}"


def test_enrichment_is_stored_and_returned(store_url: str) -> None:
    store = load_store(store_url)
    try:
        rs = [
            _reading("pump-1", 1_000, {"assets.threshold": 4.0, "assets.site": "north", "assets.id": 7}),
            _reading("pump-1", 2_000, None),
        ]
        res = commit_readings(store, rs)
        assert res.stored == 2
        rows = {r["ts_ms"]: r for r in store.raw(device_id="pump-1", metric=None, start_ms=None, end_ms=None,
                                                  limit=10)}
        assert rows[1_000]["enrichment"] == {"assets.threshold": 4.0, "assets.site": "north", "assets.id": 7}
        assert "enrichment" not in rows[2_000]
    finally:
        store.close()


@pytest.mark.integration
def test_postgres_store_made_before_enrichment_gets_the_column(pg_url: str) -> None:
    import psycopg

    url = f"{pg_url}?schema=old_{secrets.token_hex(4)}"
    load_store(url).close()
    schema = url.rsplit("=", 1)[1]
    with psycopg.connect(pg_url, autocommit=True) as con:  # as a store of the previous layout
        con.execute(f'ALTER TABLE "{schema}".readings DROP COLUMN enrichment')
    store = load_store(url)
    try:
        commit_readings(store, [_reading("d", 5, {"x.a": 1})])
        [row] = store.raw(device_id="d", metric=None, start_ms=None, end_ms=None, limit=1)
        assert row["enrichment"] == {"x.a": 1}
    finally:
        store.close()
