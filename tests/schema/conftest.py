"""A registry store per test: a SQLite file, or a PostgreSQL schema of its own in the session's database."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def registry_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A hot store URL of its own (the tables are created on first open)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return f"{request.getfixturevalue('pg_url')}?schema=sr_{secrets.token_hex(5)}"
