"""Schema registry with Confluent Schema Registry's REST semantics: Avro, JSON Schema and Protobuf
schemas, their compatibility levels, and storage in the hot store (docs/schemas.md)."""

from __future__ import annotations

from fieldmesh.schema.base import (
    LEVELS,
    SCHEMA_TYPES,
    IncompatibleSchema,
    InvalidSchema,
    Reference,
    RegisteredSchema,
    RegistryError,
    StoredSchema,
)

__all__ = [
    "LEVELS",
    "SCHEMA_TYPES",
    "IncompatibleSchema",
    "InvalidSchema",
    "Reference",
    "RegisteredSchema",
    "RegistryError",
    "StoredSchema",
]
