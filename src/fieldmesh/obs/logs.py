"""Log lines as text or as JSON, one object per line, with the trace and span ids of the current span.

``FIELDMESH_LOG_JSON=1`` (or ``--log-json``) switches every fieldmesh process to JSON lines; a process
started by ``fieldmesh up`` inherits the variable. A JSON line holds ``ts`` (RFC 3339, UTC, ms),
``level``, ``logger``, ``msg``, ``role`` (when the process has one), ``trace_id`` and ``span_id`` (hex,
as OpenTelemetry shows them) when the line was logged inside a recording or propagated span, and ``exc``
(the traceback) for an exception.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Final

from fieldmesh.obs import tracing

__all__ = ["ENV_JSON", "JsonFormatter", "json_logs_wanted", "setup_logging"]

#: The environment variable that asks for JSON log lines (``1``, ``true``, ``yes``, ``on``).
ENV_JSON: Final = "FIELDMESH_LOG_JSON"
_TRUE: Final = frozenset({"1", "true", "yes", "on"})


def json_logs_wanted() -> bool:
    """Whether :data:`ENV_JSON` asks for JSON lines."""
    return os.environ.get(ENV_JSON, "").strip().lower() in _TRUE


def _trace_ids() -> tuple[str, str] | None:
    if not tracing.enabled():
        return None
    from opentelemetry import trace

    sc = trace.get_current_span().get_span_context()
    if not sc.is_valid:
        return None
    return f"{sc.trace_id:032x}", f"{sc.span_id:016x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def __init__(self, role: str | None = None) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        t = time.gmtime(record.created)
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.role:
            doc["role"] = self.role
        ids = _trace_ids()
        if ids is not None:
            doc["trace_id"], doc["span_id"] = ids
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.stack_info:
            doc["exc"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def setup_logging(
    role: str | None = None, *, level: int = logging.INFO, fmt: str | None = None, json_lines: bool | None = None
) -> None:
    """Configure the root logger on stderr, like ``logging.basicConfig``: JSON lines when ``json_lines``
    (None: as :data:`ENV_JSON` says), else text in ``fmt``. Does nothing when the root logger already
    has a handler (as ``basicConfig``)."""
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler()
    if json_lines if json_lines is not None else json_logs_wanted():
        handler.setFormatter(JsonFormatter(role))
    else:
        handler.setFormatter(logging.Formatter(fmt or f"%(asctime)s {role or ''} %(name)s %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
