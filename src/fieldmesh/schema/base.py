"""The schema registry's contract: schema formats, compatibility levels, references and errors.

Errors follow Confluent Schema Registry's REST API: each carries the HTTP ``status`` and the
``error_code`` its clients look for (``confluent_kafka.schema_registry.SchemaRegistryError``).

Hierarchy::

    FieldmeshError
    └── RegistryError                  status, error_code, message
        ├── SubjectNotFound            404 40401
        ├── VersionNotFound            404 40402
        ├── SchemaNotFound             404 40403
        ├── SubjectSoftDeleted         404 40404  soft-deleted already (permanent=true deletes it)
        ├── SubjectNotSoftDeleted      404 40405  a permanent delete needs a soft delete first
        ├── VersionSoftDeleted         404 40406
        ├── VersionNotSoftDeleted      404 40407
        ├── SubjectConfigNotFound      404 40408  no subject-level compatibility set
        ├── SubjectModeNotFound        404 40409  no subject-level mode set
        ├── IncompatibleSchema         409 409    carries ``reasons``
        ├── InvalidSchema              422 42201
        ├── InvalidVersion             422 42202
        ├── InvalidCompatibilityLevel  422 42203
        ├── InvalidMode                422 42204
        ├── OperationNotPermitted      422 42205
        └── ReferenceExists            422 42206  a schema still referenced cannot be deleted
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from fieldmesh.core.errors import FieldmeshError

__all__ = [
    "DEFAULT_LEVEL",
    "LEVELS",
    "MODES",
    "SCHEMA_TYPES",
    "IncompatibleSchema",
    "InvalidCompatibilityLevel",
    "InvalidMode",
    "InvalidSchema",
    "InvalidVersion",
    "OperationNotPermitted",
    "ParsedSchema",
    "Reference",
    "ReferenceExists",
    "RegisteredSchema",
    "RegistryError",
    "SchemaFormat",
    "SchemaNotFound",
    "SchemaStorage",
    "StoredSchema",
    "SubjectConfigNotFound",
    "SubjectModeNotFound",
    "SubjectNotFound",
    "SubjectNotSoftDeleted",
    "SubjectSoftDeleted",
    "VersionNotFound",
    "VersionNotSoftDeleted",
    "VersionSoftDeleted",
]

SCHEMA_TYPES: Final = ("AVRO", "JSON", "PROTOBUF")
#: Compatibility levels, as Confluent names them. BACKWARD: the new schema reads data written with the
#: previous one; FORWARD: the previous one reads data written with the new one; FULL: both;
#: ``_TRANSITIVE``: against every live version, not only the latest; NONE: no check.
LEVELS: Final = ("BACKWARD", "BACKWARD_TRANSITIVE", "FORWARD", "FORWARD_TRANSITIVE", "FULL", "FULL_TRANSITIVE",
                 "NONE")
DEFAULT_LEVEL: Final = "BACKWARD"
#: READWRITE: the normal mode; READONLY: registrations refused; IMPORT: accepted as the global mode only.
MODES: Final = ("READWRITE", "READONLY", "READONLY_OVERRIDE", "IMPORT")


@dataclass(frozen=True)
class Reference:
    """A schema a schema refers to: ``name`` as the referring schema names it (an Avro full name, a JSON
    Schema ``$ref`` URL, a .proto import path), found under ``subject`` at ``version``."""

    name: str
    subject: str
    version: int

    def as_dict(self) -> dict[str, Any]:
        """The reference's JSON shape."""
        return {"name": self.name, "subject": self.subject, "version": self.version}


class ParsedSchema(Protocol):
    """A schema a format has parsed (and validated)."""

    @property
    def schema_type(self) -> str:
        """AVRO, JSON or PROTOBUF."""

    def canonical(self, *, normalize: bool = False) -> str:
        """The text stored and compared: the same for schemas that differ only in layout
        (``normalize``: also in what the format calls inessential, such as key order)."""


class SchemaFormat(Protocol):
    """One schema language: parsing and the compatibility of two schemas."""

    schema_type: str

    def parse(self, text: str, references: Mapping[str, str]) -> ParsedSchema:
        """Parse ``text`` whose ``references`` (name -> schema text, already resolved transitively) it may use.

        Raises:
            InvalidSchema: the text is not a valid schema of this format.
        """

    def incompatibilities(self, reader: ParsedSchema, writer: ParsedSchema) -> list[str]:
        """Why ``reader`` cannot read every datum ``writer`` can write; empty when it can."""


class RegistryError(FieldmeshError):
    """A request the registry refuses: ``status`` (HTTP) and ``error_code`` as Confluent's API answers."""

    status: int = 500
    error_code: int = 50001

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class SubjectNotFound(RegistryError):
    """No live version under the subject."""

    status, error_code = 404, 40401

    def __init__(self, subject: str) -> None:
        super().__init__(f"Subject '{subject}' not found.")


class VersionNotFound(RegistryError):
    """No such version under the subject."""

    status, error_code = 404, 40402

    def __init__(self, subject: str, version: int | str) -> None:
        super().__init__(f"Version {version} not found under subject '{subject}'.")


class SchemaNotFound(RegistryError):
    """No schema with that id (or not under that subject)."""

    status, error_code = 404, 40403


class SubjectSoftDeleted(RegistryError):
    """The subject is soft-deleted already."""

    status, error_code = 404, 40404

    def __init__(self, subject: str) -> None:
        super().__init__(f"Subject '{subject}' was soft deleted. Set permanent=true to delete permanently")


class SubjectNotSoftDeleted(RegistryError):
    """A permanent delete of a subject that was not soft-deleted first."""

    status, error_code = 404, 40405

    def __init__(self, subject: str) -> None:
        super().__init__(f"Subject '{subject}' was not deleted first before being permanently deleted")


class VersionSoftDeleted(RegistryError):
    """The version is soft-deleted already."""

    status, error_code = 404, 40406

    def __init__(self, subject: str, version: int) -> None:
        super().__init__(f"Version {version} of subject '{subject}' was soft deleted. "
                         "Set permanent=true to delete permanently")


class VersionNotSoftDeleted(RegistryError):
    """A permanent delete of a version that was not soft-deleted first."""

    status, error_code = 404, 40407

    def __init__(self, subject: str, version: int) -> None:
        super().__init__(f"Version {version} of subject '{subject}' was not deleted first before being "
                         "permanently deleted")


class SubjectConfigNotFound(RegistryError):
    """The subject has no compatibility level of its own."""

    status, error_code = 404, 40408

    def __init__(self, subject: str) -> None:
        super().__init__(f"Subject '{subject}' does not have subject-level compatibility configured")


class SubjectModeNotFound(RegistryError):
    """The subject has no mode of its own."""

    status, error_code = 404, 40409

    def __init__(self, subject: str) -> None:
        super().__init__(f"Subject '{subject}' does not have subject-level mode configured")


class IncompatibleSchema(RegistryError):
    """The schema breaks the subject's compatibility level; ``reasons`` say how."""

    status, error_code = 409, 409

    def __init__(self, message: str, reasons: Sequence[str] = ()) -> None:
        super().__init__(message + ("; " + "; ".join(reasons) if reasons else ""))
        self.reasons = list(reasons)


class InvalidSchema(RegistryError):
    """Not a valid schema (of its declared type), or a reference that cannot be resolved."""

    status, error_code = 422, 42201


class InvalidVersion(RegistryError):
    """A version that is neither a positive integer nor ``latest`` (or -1)."""

    status, error_code = 422, 42202

    def __init__(self, version: object) -> None:
        super().__init__(f"The specified version '{version}' is not a valid version id. Allowed values are "
                         "between [1, 2^31-1] and the string \"latest\"")


class InvalidCompatibilityLevel(RegistryError):
    """A compatibility level not among :data:`LEVELS`."""

    status, error_code = 422, 42203

    def __init__(self, level: object) -> None:
        super().__init__(f"Invalid compatibility level {level!r}: use one of {', '.join(LEVELS)}")


class InvalidMode(RegistryError):
    """A mode not among :data:`MODES`."""

    status, error_code = 422, 42204

    def __init__(self, mode: object) -> None:
        super().__init__(f"Invalid mode {mode!r}: use one of {', '.join(MODES)}")


class OperationNotPermitted(RegistryError):
    """The registry's or subject's mode forbids the operation."""

    status, error_code = 422, 42205


class ReferenceExists(RegistryError):
    """The version is referenced by another schema and cannot be deleted."""

    status, error_code = 422, 42206


@dataclass(frozen=True)
class RegisteredSchema:
    """A version of a subject as stored: its schema (id, type, text, references, metadata, rule set)."""

    subject: str
    version: int
    schema_id: int
    schema_type: str
    schema: str
    references: tuple[Reference, ...] = ()
    metadata: dict[str, Any] | None = None
    rule_set: dict[str, Any] | None = None
    deleted: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The version's JSON shape in Confluent's API (``schemaType`` omitted for Avro, as Confluent does)."""
        out: dict[str, Any] = {"subject": self.subject, "version": self.version, "id": self.schema_id}
        if self.schema_type != "AVRO":
            out["schemaType"] = self.schema_type
        if self.references:
            out["references"] = [r.as_dict() for r in self.references]
        if self.metadata is not None:
            out["metadata"] = self.metadata
        if self.rule_set is not None:
            out["ruleSet"] = self.rule_set
        out["schema"] = self.schema
        return out


@dataclass(frozen=True)
class StoredSchema:
    """A schema by id (as ``GET /schemas/ids/{id}`` answers it)."""

    schema_id: int
    schema_type: str
    schema: str
    references: tuple[Reference, ...] = ()
    metadata: dict[str, Any] | None = None
    rule_set: dict[str, Any] | None = None


class SchemaStorage(Protocol):
    """Where the registry keeps schemas, versions and settings (``fieldmesh.store.schemas.SchemaStore``
    on the hot store). ``register`` runs ``check`` and its writes in one transaction that no other
    registration interleaves with."""

    def close(self) -> None:
        """Release the connection."""

    def register(self, subject: str, *, schema_type: str, schema: str, fingerprint: str,
                 references: Sequence[Reference], metadata: dict[str, Any] | None, rule_set: dict[str, Any] | None,
                 check: Callable[[list[RegisteredSchema]], None], actor: str) -> RegisteredSchema:
        """The subject's live version with ``fingerprint``, else a new version once ``check`` (given the live
        versions, oldest first) has not raised."""

    def lookup(self, subject: str, fingerprint: str, *, deleted: bool = False) -> RegisteredSchema | None:
        """The newest version of ``subject`` holding ``fingerprint``."""

    def schema(self, schema_id: int) -> StoredSchema | None:
        """The schema ``schema_id`` while some version holds it."""

    def usages(self, schema_id: int, *, deleted: bool = False) -> list[tuple[str, int]]:
        """(subject, version) pairs holding ``schema_id``."""

    def subjects(self, *, deleted: bool = False, deleted_only: bool = False, prefix: str = "") -> list[str]:
        """Subject names, sorted."""

    def versions(self, subject: str, *, deleted: bool = True) -> list[RegisteredSchema]:
        """The subject's versions, oldest first."""

    def referenced_by(self, subject: str, version: int) -> list[int]:
        """Ids of live schemas referring to ``subject`` at ``version``."""

    def soft_delete(self, subject: str, versions: Sequence[int], *, actor: str) -> None:
        """Mark versions deleted."""

    def hard_delete(self, subject: str, versions: Sequence[int], *, actor: str, drop_config: bool = False) -> None:
        """Remove versions."""

    def setting(self, subject: str | None, key: str) -> str | None:
        """A subject's (None: the global) ``compatibility`` or ``mode``."""

    def set_setting(self, subject: str | None, key: str, value: str | None, *, actor: str) -> str | None:
        """Set or clear (None) a setting; the old value."""
