"""The schema registry: Confluent Schema Registry's semantics over a :class:`~fieldmesh.schema.base.SchemaStorage`
(``fieldmesh.store.schemas.SchemaStore`` on the hot store, wired by the API and the CLI).

Registration parses and validates the schema in its format (with its references resolved
transitively), gives the same schema (same canonical text, references, metadata and rule set) the
same id in every subject, and checks the subject's compatibility level against its live versions
inside the store's registration transaction. Deletes follow Confluent's two steps: a soft delete
hides versions (their schema ids stay readable for deserializers), a permanent one
(``permanent=True``) removes soft-deleted versions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from fieldmesh.schema.avro import AvroFormat
from fieldmesh.schema.base import (
    DEFAULT_LEVEL,
    LEVELS,
    MODES,
    IncompatibleSchema,
    InvalidCompatibilityLevel,
    InvalidMode,
    InvalidSchema,
    InvalidVersion,
    OperationNotPermitted,
    ParsedSchema,
    Reference,
    ReferenceExists,
    RegisteredSchema,
    SchemaFormat,
    SchemaNotFound,
    SchemaStorage,
    StoredSchema,
    SubjectConfigNotFound,
    SubjectModeNotFound,
    SubjectNotFound,
    SubjectNotSoftDeleted,
    SubjectSoftDeleted,
    VersionNotFound,
    VersionNotSoftDeleted,
    VersionSoftDeleted,
)
from fieldmesh.schema.compat import incompatibilities
from fieldmesh.schema.json_schema import JsonSchemaFormat
from fieldmesh.schema.protobuf import ProtobufFormat, ProtobufSchema

__all__ = ["FORMATS", "SchemaRegistry", "parse_version"]

FORMATS: Final[dict[str, SchemaFormat]] = {"AVRO": AvroFormat(), "JSON": JsonSchemaFormat(),
                                           "PROTOBUF": ProtobufFormat()}
_MAX_VERSION: Final = 2**31 - 1
_MAX_REF_DEPTH: Final = 32


def parse_version(version: str | int, *, latest_ok: bool = True) -> int | None:
    """A version id: a positive int, or None for ``latest`` (and -1, its synonym).

    Raises:
        InvalidVersion: anything else.
    """
    text = str(version).strip()
    if latest_ok and text.lower() in ("latest", "-1"):
        return None
    if not text.isdigit() or not 1 <= int(text) <= _MAX_VERSION:
        raise InvalidVersion(version)
    return int(text)


def _references(raw: Any) -> tuple[Reference, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidSchema("Invalid schema: references must be a list")
    out = []
    for r in raw:
        if not (isinstance(r, dict) and isinstance(r.get("name"), str) and isinstance(r.get("subject"), str)):
            raise InvalidSchema(f"Invalid schema: a reference needs a name, a subject and a version: {r!r}")
        try:
            version = int(r.get("version", -1))
        except (TypeError, ValueError):
            raise InvalidSchema(f"Invalid schema: reference {r['name']!r} has no valid version") from None
        out.append(Reference(name=r["name"], subject=r["subject"], version=version))
    return tuple(out)


class SchemaRegistry:
    """Register, look up, check and delete schemas; ``store`` holds them (closed by :meth:`close`)."""

    def __init__(self, store: SchemaStorage) -> None:
        self.store = store

    def close(self) -> None:
        """Close the store."""
        self.store.close()

    # -- parsing -----------------------------------------------------------------------------
    def _resolve(self, refs: Sequence[Reference], out: dict[str, str], depth: int = 0) -> tuple[Reference, ...]:
        """Fill ``out`` (name -> schema text) with ``refs`` and theirs, dependencies first; return ``refs``
        with ``latest`` (-1) versions pinned."""
        if depth > _MAX_REF_DEPTH:
            raise InvalidSchema("Invalid schema: references nest too deep (a cycle?)")
        pinned = []
        for ref in refs:
            try:
                found = self._version(ref.subject, None if ref.version == -1 else ref.version, deleted=False)
            except (SubjectNotFound, VersionNotFound):
                raise InvalidSchema(f"Invalid schema: reference {ref.name!r} to subject '{ref.subject}' version "
                                    f"{ref.version} not found") from None
            self._resolve(found.references, out, depth + 1)
            out.setdefault(ref.name, found.schema)
            pinned.append(Reference(name=ref.name, subject=ref.subject, version=found.version))
        return tuple(pinned)

    def reference_texts(self, references: Sequence[Reference]) -> dict[str, str]:
        """The texts of ``references`` and of theirs (name -> schema text), dependencies first.

        Raises:
            InvalidSchema: a reference that cannot be resolved.
        """
        texts: dict[str, str] = {}
        self._resolve(references, texts)
        return texts

    def parse(self, schema_type: str, text: str, references: Sequence[Reference] = ()) -> tuple[
            ParsedSchema, tuple[Reference, ...]]:
        """The parsed schema and its references (``latest`` pinned to a version).

        Raises:
            InvalidSchema: an unknown type, an invalid schema or an unresolvable reference.
        """
        fmt = FORMATS.get(schema_type.upper() if isinstance(schema_type, str) else "")
        if fmt is None:
            raise InvalidSchema(f"Invalid schema type {schema_type!r}: use AVRO, JSON or PROTOBUF")
        if not isinstance(text, str) or not text.strip():
            raise InvalidSchema("Invalid schema: empty")
        texts: dict[str, str] = {}
        pinned = self._resolve(references, texts)
        return fmt.parse(text, texts), pinned

    def _parse_stored(self, v: RegisteredSchema | StoredSchema) -> ParsedSchema:
        return self.parse(v.schema_type, v.schema, v.references)[0]

    @staticmethod
    def fingerprint(parsed: ParsedSchema, schema: str, refs: Sequence[Reference], metadata: Any,
                    rule_set: Any) -> str:
        """The identity of a schema: type, canonical text, references, metadata and rule set."""
        doc = [parsed.schema_type, schema, [r.as_dict() for r in refs], metadata, rule_set]
        return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    # -- registration ------------------------------------------------------------------------
    def level(self, subject: str | None) -> str:
        """The compatibility level in force for ``subject`` (its own, else the global, else BACKWARD)."""
        return ((self.store.setting(subject, "compatibility") if subject is not None else None)
                or self.store.setting(None, "compatibility") or DEFAULT_LEVEL)

    def mode(self, subject: str | None) -> str:
        """The mode in force for ``subject`` (its own, else the global, else READWRITE)."""
        return ((self.store.setting(subject, "mode") if subject is not None else None)
                or self.store.setting(None, "mode") or "READWRITE")

    def register(self, subject: str, schema: str, *, schema_type: str = "AVRO", references: Any = None,
                 metadata: dict[str, Any] | None = None, rule_set: dict[str, Any] | None = None,
                 normalize: bool = False, actor: str = "local") -> RegisteredSchema:
        """Register ``schema`` under ``subject``; the subject's existing version if it holds the same schema.

        Raises:
            InvalidSchema: not a valid schema.
            IncompatibleSchema: it breaks the subject's compatibility level (``reasons`` say how).
            OperationNotPermitted: the subject's mode is read-only.
        """
        if self.mode(subject).startswith("READONLY"):
            raise OperationNotPermitted(f"Subject {subject} is in read-only mode")
        parsed, refs = self.parse(schema_type, schema, _references(references))
        text = parsed.canonical(normalize=normalize)
        fp = self.fingerprint(parsed, text, refs, metadata, rule_set)
        fmt = FORMATS[parsed.schema_type]

        def check(live: list[RegisteredSchema]) -> None:
            level = self.level(subject)
            same_type = [v for v in live if v.schema_type == parsed.schema_type]
            if level != "NONE" and len(same_type) != len(live):
                raise IncompatibleSchema(f"Schema being registered is incompatible with an earlier schema for "
                                         f"subject \"{subject}\"", [
                                             f"TYPE_MISMATCH: the subject holds {live[-1].schema_type} schemas, "
                                             f"this is {parsed.schema_type}"])
            reasons = incompatibilities(level, fmt, parsed, [(v.version, self._parse_stored(v)) for v in live])
            if reasons:
                raise IncompatibleSchema(f"Schema being registered is incompatible with an earlier schema for "
                                         f"subject \"{subject}\"", reasons)

        return self.store.register(subject, schema_type=parsed.schema_type, schema=text, fingerprint=fp,
                                   references=refs, metadata=metadata, rule_set=rule_set, check=check, actor=actor)

    def lookup(self, subject: str, schema: str, *, schema_type: str = "AVRO", references: Any = None,
               metadata: dict[str, Any] | None = None, rule_set: dict[str, Any] | None = None,
               normalize: bool = False, deleted: bool = False) -> RegisteredSchema:
        """The version of ``subject`` that holds ``schema``.

        Raises:
            SubjectNotFound: the subject has no version.
            SchemaNotFound: none of its versions holds this schema.
        """
        if not self.store.versions(subject, deleted=deleted):
            raise SubjectNotFound(subject)
        parsed, refs = self.parse(schema_type, schema, _references(references))
        for norm in (True, False) if normalize else (False,):  # normalized, or registered as given
            text = parsed.canonical(normalize=norm)
            found = self.store.lookup(subject, self.fingerprint(parsed, text, refs, metadata, rule_set),
                                      deleted=deleted)
            if found is not None:
                return found
        raise SchemaNotFound("Schema not found")

    def check(self, subject: str, schema: str, *, version: str | int | None = "latest", schema_type: str = "AVRO",
              references: Any = None, normalize: bool = False) -> list[str]:
        """Why ``schema`` would break ``subject``'s level against ``version`` (None: every version the level
        looks at); empty when it is compatible. A subject with no version accepts anything.

        Raises:
            InvalidSchema, InvalidVersion, VersionNotFound.
        """
        del normalize  # the same schema either way: normalizing changes its text, not what it accepts
        parsed, _ = self.parse(schema_type, schema, _references(references))
        live = self.store.versions(subject, deleted=False)
        if version is None:
            targets = live
        else:
            v = parse_version(version)
            if v is None:
                targets = live[-1:]
            else:
                found = [x for x in live if x.version == v]
                if not found:
                    if not live:
                        raise SubjectNotFound(subject)
                    raise VersionNotFound(subject, v)
                targets = found
        level = self.level(subject)
        if version is not None:  # against that one version, with the level's direction
            level = level.removesuffix("_TRANSITIVE")
        fmt = FORMATS[parsed.schema_type]
        if any(t.schema_type != parsed.schema_type for t in targets) and level != "NONE":
            return [f"TYPE_MISMATCH: the subject holds {targets[-1].schema_type} schemas, this is "
                    f"{parsed.schema_type}"]
        return incompatibilities(level, fmt, parsed, [(t.version, self._parse_stored(t)) for t in targets])

    # -- reads -------------------------------------------------------------------------------
    def formatted(self, schema_type: str, schema: str, references: Sequence[Reference], fmt: str | None) -> str:
        """The schema text in ``fmt``: Protobuf's ``serialized`` is a base64 ``FileDescriptorProto``
        (compiled from .proto text when registered as text); other formats answer the text as stored."""
        if fmt == "serialized" and schema_type == "PROTOBUF":
            parsed = self.parse(schema_type, schema, references)[0]
            assert isinstance(parsed, ProtobufSchema)
            return parsed.serialized()
        return schema

    def schema(self, schema_id: int, *, subject: str | None = None) -> StoredSchema:
        """The schema ``schema_id`` (``subject``: only if that subject holds it).

        Raises:
            SchemaNotFound: no such id (or not under ``subject``).
        """
        found = self.store.schema(schema_id)
        if found is None or (subject is not None and subject not in {s for s, _ in self.store.usages(
                schema_id, deleted=True)}):
            raise SchemaNotFound(f"Schema {schema_id} not found")
        return found

    def usages(self, schema_id: int, *, deleted: bool = False, subject: str | None = None) -> list[tuple[str, int]]:
        """(subject, version) pairs holding ``schema_id``.

        Raises:
            SchemaNotFound: no such id.
        """
        if self.store.schema(schema_id) is None:
            raise SchemaNotFound(f"Schema {schema_id} not found")
        return [(s, v) for s, v in self.store.usages(schema_id, deleted=deleted) if subject in (None, s)]

    def subjects(self, *, deleted: bool = False, deleted_only: bool = False, prefix: str = "") -> list[str]:
        """Subject names, sorted."""
        return self.store.subjects(deleted=deleted, deleted_only=deleted_only, prefix=prefix)

    def versions(self, subject: str, *, deleted: bool = False, deleted_only: bool = False) -> list[int]:
        """Version numbers of ``subject``.

        Raises:
            SubjectNotFound: it has none (live, or at all with ``deleted``).
        """
        all_versions = self.store.versions(subject, deleted=True)
        if deleted_only:
            out = [v.version for v in all_versions if v.deleted]
        else:
            out = [v.version for v in all_versions if deleted or not v.deleted]
        if not out and not (deleted_only and any(not v.deleted for v in all_versions)):
            raise SubjectNotFound(subject)
        return out

    def _version(self, subject: str, version: int | None, *, deleted: bool) -> RegisteredSchema:
        rows = self.store.versions(subject, deleted=True)
        if version is None:
            rows = [r for r in rows if not r.deleted] or ([r for r in rows] if deleted else [])
            if rows:
                return rows[-1]
        else:
            for r in rows:
                if r.version == version and (deleted or not r.deleted):
                    return r
        if not any(deleted or not r.deleted for r in self.store.versions(subject, deleted=True)):
            raise SubjectNotFound(subject)
        raise VersionNotFound(subject, "latest" if version is None else version)

    def version(self, subject: str, version: str | int, *, deleted: bool = False) -> RegisteredSchema:
        """One version (``latest`` or -1: the newest live one).

        Raises:
            InvalidVersion, SubjectNotFound, VersionNotFound.
        """
        return self._version(subject, parse_version(version), deleted=deleted)

    def latest_with_metadata(self, subject: str, metadata: Mapping[str, str], *, deleted: bool = False
                             ) -> RegisteredSchema:
        """The newest version whose metadata properties include every ``metadata`` key and value.

        Raises:
            SubjectNotFound, VersionNotFound.
        """
        rows = [r for r in self.store.versions(subject, deleted=True) if deleted or not r.deleted]
        if not rows:
            raise SubjectNotFound(subject)
        for r in reversed(rows):
            props = (r.metadata or {}).get("properties") or {}
            if all(props.get(k) == v for k, v in metadata.items()):
                return r
        raise VersionNotFound(subject, f"with metadata {dict(metadata)}")

    def referenced_by(self, subject: str, version: str | int) -> list[int]:
        """Ids of live schemas referring to ``subject`` at ``version``.

        Raises:
            InvalidVersion, SubjectNotFound, VersionNotFound.
        """
        v = self.version(subject, version)
        return self.store.referenced_by(subject, v.version)

    # -- deletes -----------------------------------------------------------------------------
    def delete_subject(self, subject: str, *, permanent: bool = False, actor: str = "local") -> list[int]:
        """Soft-delete every live version (``permanent``: remove the soft-deleted ones); the versions deleted.

        Raises:
            SubjectNotFound, SubjectSoftDeleted, SubjectNotSoftDeleted, ReferenceExists.
        """
        rows = self.store.versions(subject, deleted=True)
        if not rows:
            raise SubjectNotFound(subject)
        live = [r.version for r in rows if not r.deleted]
        if permanent:
            if live:
                raise SubjectNotSoftDeleted(subject)
            self.store.hard_delete(subject, [r.version for r in rows], actor=actor, drop_config=True)
            return [r.version for r in rows]
        if not live:
            raise SubjectSoftDeleted(subject)
        for v in live:
            self._not_referenced(subject, v)
        self.store.soft_delete(subject, live, actor=actor)
        return live

    def delete_version(self, subject: str, version: str | int, *, permanent: bool = False,
                       actor: str = "local") -> int:
        """Soft-delete a version (``permanent``: remove a soft-deleted one); its number.

        Raises:
            InvalidVersion, SubjectNotFound, VersionNotFound, VersionSoftDeleted, VersionNotSoftDeleted,
            ReferenceExists.
        """
        v = parse_version(version)
        rows = self.store.versions(subject, deleted=True)
        if not rows:
            raise SubjectNotFound(subject)
        if v is None:
            live = [r for r in rows if not r.deleted]
            target = live[-1] if live else (rows[-1] if permanent else None)
        else:
            target = next((r for r in rows if r.version == v), None)
        if target is None:
            raise VersionNotFound(subject, version)
        if permanent:
            if not target.deleted:
                raise VersionNotSoftDeleted(subject, target.version)
            self.store.hard_delete(subject, [target.version], actor=actor)
            return target.version
        if target.deleted:
            raise VersionSoftDeleted(subject, target.version)
        self._not_referenced(subject, target.version)
        self.store.soft_delete(subject, [target.version], actor=actor)
        return target.version

    def _not_referenced(self, subject: str, version: int) -> None:
        ids = self.store.referenced_by(subject, version)
        if ids:
            raise ReferenceExists(f"One or more references exist to the schema {{subject={subject}, "
                                  f"version={version}}}: schema ids {ids}")

    # -- configuration -----------------------------------------------------------------------
    def config(self, subject: str | None, *, default_to_global: bool = False) -> str:
        """The compatibility level of ``subject`` (None: the global one).

        Raises:
            SubjectConfigNotFound: the subject has none of its own (and ``default_to_global`` is false).
        """
        if subject is None:
            return self.level(None)
        own = self.store.setting(subject, "compatibility")
        if own is None:
            if default_to_global:
                return self.level(None)
            raise SubjectConfigNotFound(subject)
        return own

    def set_config(self, subject: str | None, level: Any, *, actor: str = "local") -> str:
        """Set the compatibility level of ``subject`` (None: the global one).

        Raises:
            InvalidCompatibilityLevel: not one of the seven levels.
        """
        if not isinstance(level, str) or level.upper() not in LEVELS:
            raise InvalidCompatibilityLevel(level)
        self.store.set_setting(subject, "compatibility", level.upper(), actor=actor)
        return level.upper()

    def delete_config(self, subject: str | None, *, actor: str = "local") -> str:
        """Clear the level of ``subject`` (None: the global one, back to BACKWARD); the level it had.

        Raises:
            SubjectNotFound: the subject has no level of its own.
        """
        old = self.store.set_setting(subject, "compatibility", None, actor=actor)
        if old is None and subject is not None:
            raise SubjectNotFound(subject)
        return old or DEFAULT_LEVEL

    def get_mode(self, subject: str | None, *, default_to_global: bool = False) -> str:
        """The mode of ``subject`` (None: the global one).

        Raises:
            SubjectModeNotFound: the subject has none of its own (and ``default_to_global`` is false).
        """
        if subject is None:
            return self.mode(None)
        own = self.store.setting(subject, "mode")
        if own is None:
            if default_to_global:
                return self.mode(None)
            raise SubjectModeNotFound(subject)
        return own

    def set_mode(self, subject: str | None, mode: Any, *, actor: str = "local") -> str:
        """Set the mode of ``subject`` (None: the global one).

        Raises:
            InvalidMode: not one of :data:`~fieldmesh.schema.base.MODES`.
        """
        if not isinstance(mode, str) or mode.upper() not in MODES:
            raise InvalidMode(mode)
        self.store.set_setting(subject, "mode", mode.upper(), actor=actor)
        return mode.upper()

    def delete_mode(self, subject: str | None, *, actor: str = "local") -> str:
        """Clear the mode of ``subject`` (None: the global one); the mode it had.

        Raises:
            SubjectNotFound: the subject has no mode of its own.
        """
        old = self.store.set_setting(subject, "mode", None, actor=actor)
        if old is None and subject is not None:
            raise SubjectNotFound(subject)
        return old or "READWRITE"
