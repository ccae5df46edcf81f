"""Hot stores behind one contract (:mod:`fieldmesh.store.base`), chosen by URL."""

from __future__ import annotations

from pathlib import Path

from fieldmesh.core.errors import ConfigError, MissingDependency
from fieldmesh.store.base import INTERVALS, ApplyResult, HotStore, QueryResult, StoreStats

__all__ = ["INTERVALS", "ApplyResult", "HotStore", "QueryResult", "StoreStats", "default_store_url", "load_store"]


def default_store_url(data_dir: Path) -> str:
    """The embedded store of a data dir."""
    return f"sqlite:///{(data_dir / 'store.db').resolve()}"


def load_store(url: str, *, readonly: bool = False) -> HotStore:
    """Open the hot store at ``url``: ``sqlite:///path`` or ``postgresql://...``.

    ``readonly`` opens a reader that never takes the write lock (API, ``fieldmesh query``).
    """
    scheme = url.split("://", 1)[0].lower()
    if scheme == "sqlite":
        from fieldmesh.store.sqlite import SqliteStore

        return SqliteStore(url, readonly=readonly)
    if scheme in ("postgresql", "postgres"):
        try:
            from fieldmesh.store.postgres import PostgresStore  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise MissingDependency("psycopg", "postgres") from exc
        return PostgresStore(url, readonly=readonly)  # type: ignore[no-any-return,unused-ignore]
    raise ConfigError(
        f"unsupported store URL {url!r}: use sqlite:///path/to/store.db or postgresql://...", key="store_url"
    )
