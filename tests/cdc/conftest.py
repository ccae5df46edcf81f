"""Fixtures of the CDC tests (defined in cdc_helpers)."""

from __future__ import annotations

from cdc_helpers import nats_server, pg_db

__all__ = ["nats_server", "pg_db"]
