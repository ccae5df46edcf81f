"""Exceptions raised by fieldmesh.

Hierarchy::

    FieldmeshError
    ├── ConfigError            an invalid setting, flag or config file (names what to fix)
    ├── RejectedInput          a payload or reading that fails validation (carries ``reason``)
    ├── MissingDependency      an optional extra is not installed (carries the install hint)
    ├── ConflictError          a change collides with what exists (an id taken; carries ``kind``, ``key``)
    ├── NotFoundError          a change names something that does not exist (carries ``kind``, ``key``)
    ├── PermissionDenied       the caller may not make this change (beyond its device groups)
    ├── RowsRejected           an import whose rows fail validation (carries ``errors``: line, message)
    ├── BackendError           a bus, broker or store failed (wraps the third-party error)
    │   └── BackendUnavailable the backend could not be reached (transient, retried)
    └── StoreSchemaError       the store was written by an incompatible fieldmesh version
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "ConflictError",
    "FieldmeshError",
    "MissingDependency",
    "NotFoundError",
    "PermissionDenied",
    "RejectedInput",
    "RowsRejected",
    "StoreSchemaError",
]


class FieldmeshError(Exception):
    """Root of every error fieldmesh raises on purpose."""


class ConfigError(FieldmeshError):
    """A setting, CLI flag or config file is invalid; the message names the key to fix."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class RejectedInput(FieldmeshError):
    """Input that fails validation; ``reason`` is a docs/contract.md reason code."""

    def __init__(self, reason: str, detail: str, *, device_id: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.device_id = device_id


class MissingDependency(FieldmeshError):
    """An optional backend was requested but its extra is not installed."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"{package} is not installed: pip install 'fieldmesh[{extra}]'")
        self.package = package
        self.extra = extra


class ConflictError(FieldmeshError):
    """A change collides with what exists, e.g. registering a device id that is registered."""

    def __init__(self, message: str, *, kind: str, key: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.key = key


class NotFoundError(FieldmeshError):
    """A change or lookup names something that does not exist (``kind`` ``device``, ``certificate``...)."""

    def __init__(self, message: str, *, kind: str, key: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.key = key


class PermissionDenied(FieldmeshError):
    """The caller may not make this change, e.g. a device beyond the device groups it is limited to."""


class RowsRejected(FieldmeshError):
    """An import refused as a whole: ``errors`` holds ``(line, message)`` for every bad row."""

    def __init__(self, errors: list[tuple[int, str]]) -> None:
        first = "; ".join(f"line {n}: {m}" for n, m in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(f"{len(errors)} bad row(s), nothing imported: {first}{more}")
        self.errors = errors


class BackendError(FieldmeshError):
    """A bus, broker or store operation failed."""


class BackendUnavailable(BackendError):
    """A backend could not be reached; callers retry with backoff."""


class StoreSchemaError(FieldmeshError):
    """The store's schema version is not one this fieldmesh can use."""
