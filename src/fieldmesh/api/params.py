"""Query parameters of the REST API: parsing, their 400 answers, and how OpenAPI describes them.

Every parameter the API accepts is described in the OpenAPI document exactly as it is checked
here, so a client (or schemathesis) generating values from the document never gets a 400 for
a value the document allows, and every value it forbids gets a 400 that names the parameter.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from fastapi import HTTPException, Query
from pydantic import BaseModel, Field

from fieldmesh.core.topics import DEVICE_ID_RE, METRIC_RE

__all__ = [
    "BAD_PARAMETER",
    "INT64_MAX",
    "INT64_MIN",
    "REASON_RE",
    "STORE_UNAVAILABLE",
    "ErrorBody",
    "check_device",
    "check_metric",
    "check_reason",
    "device_query",
    "metric_query",
    "parse_time",
    "reason_query",
    "time_query",
]

#: Epoch milliseconds are compared with BIGINT columns: anything outside int64 is refused up front.
INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1
#: Dead-letter reason codes are lower-case words (``malformed_json``, ``clock_skew``, ...).
REASON_RE: Final = re.compile(r"[a-z0-9_]{1,64}")
_EPOCH_MS_RE: Final = re.compile(r"-?[0-9]+")
# RFC 3339 section 5.6 date-time (what OpenAPI's ``format: date-time`` means), with the offset optional
# here only to answer "needs a UTC offset" rather than "not RFC 3339".
_RFC3339_RE: Final = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})[Tt]([0-9]{2}:[0-9]{2}):([0-9]{2})(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})?"
)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


class ErrorBody(BaseModel):
    """Every 4xx and 503 answer: ``detail`` says what is wrong and names the parameter."""

    detail: str = Field(description="what is wrong, naming the parameter")
    errors: list[str] = Field(
        default_factory=list, description="one line per bad parameter (when several were checked at once)"
    )


#: OpenAPI ``responses`` of an operation that checks parameters.
BAD_PARAMETER: Final[dict[int | str, dict[str, Any]]] = {
    400: {"model": ErrorBody, "description": "a parameter is malformed or out of range; `detail` names it"},
}
#: OpenAPI ``responses`` of an operation that reads the store.
STORE_UNAVAILABLE: Final[dict[int | str, dict[str, Any]]] = {
    503: {"model": ErrorBody, "description": "the hot store cannot be opened yet"},
}


def _bad(message: str) -> HTTPException:
    return HTTPException(400, message)


def parse_time(value: str | None, name: str) -> int | None:
    """Parse RFC 3339 (with an offset) or integer epoch milliseconds; a 400 naming ``name`` otherwise."""
    if value is None or value == "":
        return None
    v = value
    if _EPOCH_MS_RE.fullmatch(v):
        # the length test first: int() of thousands of digits is slow and then refused by Python itself
        ms = int(v) if len(v) <= 20 else INT64_MAX + 1
        if not INT64_MIN <= ms <= INT64_MAX:
            raise _bad(f"'{name}' is out of range: epoch ms must be between {INT64_MIN} and {INT64_MAX}, got {v[:40]}")
        return ms
    m = _RFC3339_RE.fullmatch(v)
    if m is None:
        raise _bad(f"'{name}' must be RFC 3339 (2025-01-31T12:00:00Z) or epoch ms, got {value[:80]!r}")
    date, hm, sec, frac, off = m.groups()
    if off is None:
        raise _bad(f"'{name}' needs a UTC offset (e.g. a trailing Z), got {value[:80]!r}")
    leap = sec == "60"  # RFC 3339 allows a leap second: it is the same instant as the next second's start
    frac = (frac or "")[:7]  # Python keeps microseconds; finer digits cannot change a millisecond bound
    off = "+00:00" if off in ("Z", "z") else off
    try:
        dt = datetime.fromisoformat(f"{date}T{hm}:{'59' if leap else sec}{frac}{off}")
    except ValueError as exc:
        raise _bad(f"'{name}' is not a valid date and time: {exc}") from None
    return (dt - _EPOCH) // _MS + (1000 if leap else 0)


def check_device(device_id: str | None, name: str = "device_id") -> str | None:
    """A device id the contract allows, or a 400."""
    if device_id is not None and not DEVICE_ID_RE.fullmatch(device_id):
        raise _bad(f"{name} {device_id[:140]!r} is not 1-128 chars of [A-Za-z0-9_-]")
    return device_id


def check_metric(metric: str | None) -> str | None:
    """A metric name the contract allows (the only ones that can be stored), or a 400."""
    if metric is not None and not METRIC_RE.fullmatch(metric):
        raise _bad(f"metric {metric[:80]!r} is not 1-64 chars of [A-Za-z0-9_.-]")
    return metric


def check_reason(reason: str | None) -> str | None:
    """A dead-letter reason code shape, or a 400."""
    if reason is not None and not REASON_RE.fullmatch(reason):
        raise _bad(f"reason {reason[:80]!r} is not 1-64 chars of [a-z0-9_] (e.g. malformed_json)")
    return reason


# OpenAPI descriptions. ``json_schema_extra`` replaces the ``anyOf: [string, null]`` FastAPI derives
# from ``str | None``: an absent parameter is the null, a present one is never the text "null".
def time_query(description: str) -> Any:
    """A time parameter: RFC 3339 with an offset, integer epoch ms within int64, or empty (no bound)."""
    return Query(
        description=f"{description}: RFC 3339 with an offset (2025-01-31T12:00:00Z) or epoch milliseconds",
        json_schema_extra={
            "anyOf": [
                {"type": "integer", "minimum": INT64_MIN, "maximum": INT64_MAX},
                {"type": "string", "format": "date-time"},
                {"type": "string", "maxLength": 0},  # empty: no bound, as if absent
            ]
        },
    )


def _pattern_query(description: str, pattern: str) -> Any:
    return Query(
        description=description, json_schema_extra={"anyOf": [{"type": "string", "pattern": f"^{pattern}$"}]}
    )


def device_query() -> Any:
    """The ``device_id`` filter."""
    return _pattern_query("only this device", DEVICE_ID_RE.pattern)


def metric_query() -> Any:
    """The ``metric`` filter."""
    return _pattern_query("only this metric", METRIC_RE.pattern)


def reason_query() -> Any:
    """The dead-letter ``reason`` filter."""
    return _pattern_query("only dead letters with this reason code", REASON_RE.pattern)
