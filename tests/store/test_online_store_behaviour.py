"""One behaviour suite for every online feature store: Redis (its own key prefix, removed after) and SQLite."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fieldmesh.core.errors import BackendUnavailable, ConfigError
from fieldmesh.store.features import OnlineStore, RedisOnlineStore, SqliteOnlineStore, load_online_store
from fieldmesh.stream.featureviews import FeatureRow

TTL = {"pump": 3_600_000, "short": 1_000}


@pytest.fixture(params=["redis", "sqlite"])
def online(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OnlineStore]:
    if request.param == "redis":
        store: OnlineStore = load_online_store(f"redis://127.0.0.1:6379/0?prefix=t{uuid.uuid4().hex[:10]}", ttl_ms=TTL)
        assert isinstance(store, RedisOnlineStore)
        try:
            yield store
        finally:
            store.clear()
            store.close()
    else:
        store = load_online_store(f"sqlite:///{tmp_path / 'online.db'}", ttl_ms=TTL)
        assert isinstance(store, SqliteOnlineStore)
        yield store
        store.close()


def _row(view: str = "pump", entity: str = "d1", end: int = 120_000, version: int = 0, known: int | None = None,
         **values: float) -> FeatureRow:
    return FeatureRow(view=view, entity=entity, window_start_ms=end - 60_000, window_end_ms=end,
                      known_at_ms=int(time.time() * 1000) if known is None else known, version=version,
                      values=values or {"t__mean__1m": 1.5})


def test_put_then_get_round_trips_exact_values(online: OnlineStore) -> None:
    vals = {"t__mean__1m": 0.1 + 0.2, "t__max__1m": -1e308, "t__count__1m": 3.0, "t__rate__1m": math.nan}
    row = _row(**vals)
    assert online.put([row]) == 1
    got = online.get("pump", "d1")
    assert got is not None
    assert (got.window_start_ms, got.window_end_ms, got.known_at_ms, got.version) == (60_000, 120_000,
                                                                                     row.known_at_ms, 0)
    assert got.values["t__mean__1m"] == 0.1 + 0.2 and got.values["t__max__1m"] == -1e308
    assert math.isnan(got.values["t__rate__1m"])
    assert online.get("pump", "other") is None and online.get("nope", "d1") is None


def test_only_a_newer_window_or_version_replaces(online: OnlineStore) -> None:
    online.put([_row(end=180_000, t__mean__1m=2.0)])
    assert online.put([_row(end=120_000, t__mean__1m=9.0)]) == 0  # older window: a replay
    assert online.put([_row(end=180_000, t__mean__1m=9.0)]) == 0  # same window and version
    got = online.get("pump", "d1")
    assert got is not None and got.values == {"t__mean__1m": 2.0}
    assert online.put([_row(end=180_000, version=1, t__mean__1m=3.0)]) == 1
    assert online.put([_row(end=240_000, t__max__1m=4.0)]) == 1  # a new window replaces every field
    got = online.get("pump", "d1")
    assert got is not None and got.window_end_ms == 240_000 and got.values == {"t__max__1m": 4.0}


def test_get_many_reads_several_views_of_one_entity(online: OnlineStore) -> None:
    online.put([_row("pump", "d1"), _row("short", "d1", t__mean__1m=7.0), _row("pump", "d2")])
    got = online.get_many("d1", ["pump", "short", "absent"])
    assert set(got) == {"pump", "short", "absent"}
    assert got["pump"] is not None and got["short"] is not None and got["absent"] is None
    assert got["short"].values == {"t__mean__1m": 7.0}


def test_a_row_older_than_its_ttl_reads_as_absent(online: OnlineStore) -> None:
    now = int(time.time() * 1000)
    online.put([_row("short", known=now - 5_000), _row("pump", known=now - 5_000)])
    assert online.get("short", "d1") is None  # ttl 1 s, known 5 s ago
    assert online.get("pump", "d1") is not None


def test_the_async_read_answers_what_get_many_does(online: OnlineStore) -> None:
    """``aget_many`` (the API's read, on its event loop) equals ``get_many``: rows, absent views, expired ones;
    from one loop and then another (a Redis pool belongs to the loop that made it), and closes after."""
    now = int(time.time() * 1000)
    online.put([_row("pump", "d1", t__mean__1m=0.1 + 0.2, t__rate__1m=math.nan), _row("pump", "d2"),
                _row("short", "d1", known=now - 5_000)])
    views = ["pump", "short", "absent"]
    want = online.get_many("d1", views)
    assert want["pump"] is not None and want["short"] is None and want["absent"] is None

    async def read() -> dict[str, FeatureRow | None]:
        return await online.aget_many("d1", views)

    for _ in range(2):  # two loops, one after the other
        got = asyncio.run(read())
        assert list(got) == views and got["short"] is None and got["absent"] is None
        assert got["pump"] is not None and want["pump"] is not None
        assert got["pump"].values["t__mean__1m"] == 0.1 + 0.2 and math.isnan(got["pump"].values["t__rate__1m"])
        assert (got["pump"].window_end_ms, got["pump"].known_at_ms, got["pump"].version) == (
            want["pump"].window_end_ms, want["pump"].known_at_ms, want["pump"].version)

    async def read_and_close() -> None:  # closed from inside the loop that opened the async pool
        await online.aget_many("d1", views)
        online.close()

    asyncio.run(read_and_close())


def test_an_unreachable_redis_is_backend_unavailable_for_the_async_read() -> None:
    store = RedisOnlineStore("redis://127.0.0.1:1/0?prefix=t")  # nothing listens on port 1
    with pytest.raises(BackendUnavailable, match="online store"):
        asyncio.run(store.aget_many("d1", ["pump"]))
    store.close()


def test_bad_urls_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="online store URL"):
        load_online_store("memcached://x")
    with pytest.raises(ConfigError, match="prefix"):
        load_online_store("redis://127.0.0.1:6379/0?prefix=a:b")
