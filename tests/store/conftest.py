"""Fixtures every hot-store suite shares: each test gets a store of its own, SQLite and PostgreSQL."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from fieldmesh.store import HotStore, load_store


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new SQLite file, or a new schema in the local PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    base: str = request.getfixturevalue("pg_url")
    return f"{base}?schema=t_{secrets.token_hex(5)}"


@pytest.fixture
def store(store_url: str) -> Iterator[HotStore]:
    """An open store on ``store_url``, closed after the test."""
    s = load_store(store_url)
    yield s
    s.close()
