"""Compatibility levels over a format's reader/writer check (Confluent's semantics).

BACKWARD: the new schema reads data written with the latest version; FORWARD: the latest version
reads data written with the new schema; FULL: both. The ``_TRANSITIVE`` levels check against every
live version instead of the latest; NONE checks nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from fieldmesh.schema.base import LEVELS, InvalidCompatibilityLevel, ParsedSchema, SchemaFormat

__all__ = ["incompatibilities"]


def incompatibilities(level: str, fmt: SchemaFormat, new: ParsedSchema,
                      previous: Sequence[tuple[int, ParsedSchema]]) -> list[str]:
    """Why ``new`` breaks ``level`` against ``previous`` ((version, schema) pairs, oldest first); empty if not.

    Raises:
        InvalidCompatibilityLevel: ``level`` is not one of :data:`~fieldmesh.schema.base.LEVELS`.
    """
    if level not in LEVELS:
        raise InvalidCompatibilityLevel(level)
    if level == "NONE" or not previous:
        return []
    targets = list(previous) if level.endswith("_TRANSITIVE") else [previous[-1]]
    base = level.removesuffix("_TRANSITIVE")
    reasons: list[str] = []
    for version, old in reversed(targets):
        found: list[str] = []
        if base in ("BACKWARD", "FULL"):
            found += [f"{r} (the new schema cannot read data written with version {version})"
                      for r in fmt.incompatibilities(new, old)]
        if base in ("FORWARD", "FULL"):
            found += [f"{r} (version {version} cannot read data written with the new schema)"
                      for r in fmt.incompatibilities(old, new)]
        if found:
            reasons += found
            reasons.append(f"{{oldSchemaVersion: {version}}}")
    if reasons:
        reasons.append(f"{{compatibility: '{level}'}}")
    return reasons
