"""Fixtures of the CDC tests (defined in cdc_helpers)."""

from __future__ import annotations

from cdc_helpers import my_db, nats_server, pg_db

__all__ = ["my_db", "nats_server", "pg_db"]
