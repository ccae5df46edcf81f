"""Hot stores behind one contract (:mod:`fieldmesh.store.base`), chosen by URL."""

from __future__ import annotations

from pathlib import Path

from fieldmesh.core.errors import ConfigError, MissingDependency
from fieldmesh.store.base import INTERVALS, ApplyResult, HotStore, QueryResult, StoreStats

__all__ = ["INTERVALS", "ApplyResult", "HotStore", "QueryResult", "StoreStats", "default_store_url", "load_store"]


def default_store_url(data_dir: Path) -> str:
    """The embedded store of a data dir."""
    return f"sqlite:///{(data_dir / 'store.db').resolve()}"


def load_store(url: str, *, readonly: bool = False, rollup_flush_ms: int | None = None) -> HotStore:
    """Open the hot store at ``url``: ``sqlite:///path`` or ``postgresql://...``.

    ``readonly`` opens a reader that never takes the write lock (API, ``fieldmesh query``). ``rollup_flush_ms``:
    how long SQLite's writer may hold rollup deltas before it writes them (its default when None; PostgreSQL
    writes each batch's).
    """
    scheme = url.split("://", 1)[0].lower()
    if scheme == "sqlite":
        from fieldmesh.store.sqlite import SqliteStore

        if rollup_flush_ms is None:
            return SqliteStore(url, readonly=readonly)
        return SqliteStore(url, readonly=readonly, rollup_flush_ms=rollup_flush_ms)
    if scheme in ("postgresql", "postgres"):
        try:
            from fieldmesh.store.postgres import PostgresStore  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise MissingDependency("psycopg", "postgres") from exc
        return PostgresStore(url, readonly=readonly)  # type: ignore[no-any-return,unused-ignore]
    raise ConfigError(
        f"unsupported store URL {url!r}: use sqlite:///path/to/store.db or postgresql://...", key="store_url"
    )
