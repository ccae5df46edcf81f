"""The schema registry's REST API under ``/api/v1/registry``: the requests Confluent's clients make.

Paths, parameters, bodies and answers are Confluent Schema Registry's (``confluent_kafka.schema_registry
.SchemaRegistryClient`` works with ``url: http://HOST:PORT/api/v1/registry``); answers carry the content
type ``application/vnd.schemaregistry.v1+json``; errors are ``{"error_code": 40401, "message": ...}``
(:mod:`fieldmesh.schema.base` lists the codes). Roles (docs/schemas.md): reads, lookups and
compatibility tests need a viewer; registering, deleting and a subject's level or mode an operator;
the global level and mode an admin.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Final

from fastapi import APIRouter, Body, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from fieldmesh.api.auth import Principal
from fieldmesh.schema.base import SCHEMA_TYPES, InvalidSchema, OperationNotPermitted
from fieldmesh.schema.registry import SchemaRegistry

__all__ = ["CONTENT_TYPE", "PREFIX", "RegistryResponse", "error_body", "registry_router"]

PREFIX: Final = "/api/v1/registry"
CONTENT_TYPE: Final = "application/vnd.schemaregistry.v1+json"
_VERSION_PATTERN: Final = r"^(latest|-1|[1-9][0-9]{0,9})$"


class RegistryResponse(JSONResponse):
    """JSON with Confluent's content type."""

    media_type = CONTENT_TYPE


def error_body(status: int, error_code: int, message: str) -> dict[str, Any]:
    """Confluent's error shape (with ``detail``, the rest of the API's, too)."""
    return {"error_code": error_code, "message": message, "detail": message}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class RegistryErrorBody(_Open):
    """Every registry error: Confluent's ``error_code`` (40401, 42201, ...) and ``message``."""

    error_code: int
    message: str


class SchemaReference(BaseModel):
    """A schema this schema refers to."""

    name: str = Field(description="the name the schema uses for it (Avro full name, $ref URL, import path)")
    subject: str
    version: int = Field(description="a version, or -1 for the latest")


class SchemaRequest(_Open):
    """A schema to register, look up or test (Confluent's body; ``metadata`` and ``ruleSet`` are kept
    with the schema; other fields are accepted and ignored)."""

    schema_: str = Field(alias="schema", description="the schema text (Avro or JSON Schema JSON, .proto text)")
    schemaType: str = Field("AVRO", description="AVRO (default), JSON or PROTOBUF")
    references: list[SchemaReference] | None = None
    metadata: dict[str, Any] | None = None
    ruleSet: dict[str, Any] | None = None


class SchemaVersionBody(_Open):
    """A version of a subject."""

    subject: str
    version: int
    id: int
    schema_: str = Field(alias="schema")
    schemaType: str | None = Field(None, description="absent for AVRO")
    references: list[SchemaReference] | None = None


class SchemaById(_Open):
    """A schema by id."""

    schema_: str = Field(alias="schema")
    schemaType: str | None = Field(None, description="absent for AVRO")
    references: list[SchemaReference] | None = None


class RegisterAnswer(_Open):
    """The registered version (``id`` is what serializers frame data with)."""

    id: int


class SubjectVersion(BaseModel):
    """A subject and version holding a schema id."""

    subject: str
    version: int


class CompatibilityAnswer(_Open):
    """A compatibility test; ``messages`` (with ``verbose=true``) say why not."""

    is_compatible: bool
    messages: list[str] | None = None


class ConfigBody(_Open):
    """``PUT /config``: the level (``compatibilityLevel`` accepted too; other fields ignored)."""

    compatibility: str | None = Field(None, description="BACKWARD, BACKWARD_TRANSITIVE, FORWARD, "
                                                        "FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE or NONE")
    compatibilityLevel: str | None = None


class ConfigAnswer(_Open):
    """A level."""

    compatibilityLevel: str | None = None
    compatibility: str | None = None


class ModeBody(_Open):
    """``PUT /mode``."""

    mode: str = Field(description="READWRITE, READONLY, READONLY_OVERRIDE or IMPORT")


def _err(status: int, what: str) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": RegistryErrorBody, "description": what}}


_NOT_FOUND: Final = _err(404, "40401 subject, 40402 version or 40403 schema not found")
_INVALID: Final = _err(422, "42201 invalid schema, 42202 invalid version, 42203 invalid level, 42204 invalid mode")
_UNAVAILABLE: Final = _err(503, "the hot store cannot be reached")
_BAD_PARAMETER: Final = _err(400, "a malformed query parameter (message names it)")

Subject = Annotated[str, Path(min_length=1, max_length=255, description="the subject (e.g. <topic>-value)")]
Version = Annotated[str, Path(pattern=_VERSION_PATTERN, description="a version number, latest or -1")]
SchemaId = Annotated[int, Path(ge=1, le=2**31 - 1, description="the schema id")]
Flag = Annotated[bool, Query()]
SchemaBody = Annotated[SchemaRequest, Body()]
Offset = Annotated[int, Query(ge=0, le=2**31 - 1)]
Limit = Annotated[int, Query(ge=-1, le=2**31 - 1, description="at most this many (-1: all)")]


def _page(items: list[Any], offset: int, limit: int) -> list[Any]:
    return items[offset:] if limit < 0 else items[offset:offset + limit]


def _schema_doc(schema_type: str, schema: str, refs: Any, metadata: Any, rule_set: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"schema": schema}
    if schema_type != "AVRO":
        out["schemaType"] = schema_type
    if refs:
        out["references"] = [r.as_dict() for r in refs]
    if metadata is not None:
        out["metadata"] = metadata
    if rule_set is not None:
        out["ruleSet"] = rule_set
    return out


def _refs(body: SchemaRequest) -> Any:
    return None if body.references is None else [r.model_dump() for r in body.references]


def registry_router(get: Callable[[], SchemaRegistry], *, viewer: Any, operator: Any, admin: Any) -> APIRouter:
    """The registry's routes; ``get`` opens (once) the registry, ``viewer``/``operator``/``admin`` are the
    API's role guards (``create_app``'s ``need``)."""
    ok: dict[int | str, dict[str, Any]] = {200: {"content": {CONTENT_TYPE: {}}}}
    r = APIRouter(prefix=PREFIX, tags=["schema registry"], default_response_class=RegistryResponse,
                  responses={**_BAD_PARAMETER, **_INVALID, **_UNAVAILABLE})

    @r.get("/schemas/types", response_model=list[str], responses={**ok})
    def get_types(_: Principal = viewer) -> list[str]:
        return list(SCHEMA_TYPES)

    @r.get("/schemas/ids/{schema_id}", response_model=SchemaById, response_model_exclude_none=True,
           responses={**ok, **_NOT_FOUND})
    def get_schema(schema_id: SchemaId, subject: str | None = None, format: str | None = None,
                   _: Principal = viewer) -> Any:
        reg = get()
        s = reg.schema(schema_id, subject=subject)
        text = reg.formatted(s.schema_type, s.schema, s.references, format)
        return RegistryResponse(_schema_doc(s.schema_type, text, s.references, s.metadata, s.rule_set))

    @r.get("/schemas/ids/{schema_id}/schema", response_model=str, responses={**ok, **_NOT_FOUND})
    def get_schema_text(schema_id: SchemaId, subject: str | None = None, _: Principal = viewer) -> Any:
        return RegistryResponse(get().schema(schema_id, subject=subject).schema)

    @r.get("/schemas/ids/{schema_id}/subjects", response_model=list[str], responses={**ok, **_NOT_FOUND})
    def get_schema_subjects(schema_id: SchemaId, subject: str | None = None, deleted: Flag = False,
                            offset: Offset = 0, limit: Limit = -1, _: Principal = viewer) -> Any:
        subjects = sorted({s for s, _v in get().usages(schema_id, deleted=deleted, subject=subject)})
        return _page(subjects, offset, limit)

    @r.get("/schemas/ids/{schema_id}/versions", response_model=list[SubjectVersion], responses={**ok, **_NOT_FOUND})
    def get_schema_versions(schema_id: SchemaId, subject: str | None = None, deleted: Flag = False,
                            offset: Offset = 0, limit: Limit = -1, _: Principal = viewer) -> Any:
        pairs = get().usages(schema_id, deleted=deleted, subject=subject)
        return _page([{"subject": s, "version": v} for s, v in pairs], offset, limit)

    @r.get("/subjects", response_model=list[str], responses={**ok})
    def get_subjects(subjectPrefix: str = "", deleted: Flag = False, deleted_only: Flag = False,
                     offset: Offset = 0, limit: Limit = -1, _: Principal = viewer) -> Any:
        return _page(get().subjects(deleted=deleted, deleted_only=deleted_only, prefix=subjectPrefix), offset, limit)

    @r.post("/subjects/{subject}", response_model=SchemaVersionBody, responses={**ok, **_NOT_FOUND, **_INVALID})
    def lookup(subject: Subject, body: SchemaBody, normalize: Flag = False, deleted: Flag = False,
               format: str | None = None, _: Principal = viewer) -> Any:
        found = get().lookup(subject, body.schema_, schema_type=body.schemaType, references=_refs(body),
                             metadata=body.metadata, rule_set=body.ruleSet, normalize=normalize, deleted=deleted)
        return RegistryResponse(found.as_dict())

    @r.delete("/subjects/{subject}", response_model=list[int], responses={**ok, **_NOT_FOUND, **_INVALID})
    def delete_subject(subject: Subject, permanent: Flag = False, p: Principal = operator) -> Any:
        return get().delete_subject(subject, permanent=permanent, actor=p.subject)

    @r.get("/subjects/{subject}/versions", response_model=list[int], responses={**ok, **_NOT_FOUND})
    def get_versions(subject: Subject, deleted: Flag = False, deleted_only: Flag = False, offset: Offset = 0,
                     limit: Limit = -1, _: Principal = viewer) -> Any:
        return _page(get().versions(subject, deleted=deleted, deleted_only=deleted_only), offset, limit)

    @r.post("/subjects/{subject}/versions", response_model=RegisterAnswer, responses={
        **ok, **_INVALID, **_err(409, "incompatible with the subject's compatibility level (error_code 409)")})
    def register(subject: Subject, body: SchemaBody, normalize: Flag = False, p: Principal = operator) -> Any:
        if body.model_extra and "id" in body.model_extra:
            raise OperationNotPermitted("registering a schema with a given id (IMPORT mode) is not supported")
        v = get().register(subject, body.schema_, schema_type=body.schemaType, references=_refs(body),
                           metadata=body.metadata, rule_set=body.ruleSet, normalize=normalize, actor=p.subject)
        return RegistryResponse(v.as_dict())

    @r.get("/subjects/{subject}/versions/{version}", response_model=SchemaVersionBody,
           responses={**ok, **_NOT_FOUND, **_INVALID})
    def get_version(subject: Subject, version: Version, deleted: Flag = False,
                    format: str | None = None, _: Principal = viewer) -> Any:
        reg = get()
        v = reg.version(subject, version, deleted=deleted)
        return RegistryResponse({**v.as_dict(), "schema": reg.formatted(v.schema_type, v.schema, v.references,
                                                                        format)})

    @r.get("/subjects/{subject}/versions/{version}/schema", response_model=str,
           responses={**ok, **_NOT_FOUND, **_INVALID})
    def get_version_schema(subject: Subject, version: Version, deleted: Flag = False, _: Principal = viewer) -> Any:
        return RegistryResponse(get().version(subject, version, deleted=deleted).schema)

    @r.get("/subjects/{subject}/versions/{version}/referencedby", response_model=list[int],
           responses={**ok, **_NOT_FOUND, **_INVALID})
    def get_referenced_by(subject: Subject, version: Version, offset: Offset = 0, limit: Limit = -1,
                          _: Principal = viewer) -> Any:
        return _page(get().referenced_by(subject, version), offset, limit)

    @r.delete("/subjects/{subject}/versions/{version}", response_model=int,
              responses={**ok, **_NOT_FOUND, **_INVALID})
    def delete_version(subject: Subject, version: Version, permanent: Flag = False, p: Principal = operator) -> Any:
        return get().delete_version(subject, version, permanent=permanent, actor=p.subject)

    @r.get("/subjects/{subject}/metadata", response_model=SchemaVersionBody, responses={**ok, **_NOT_FOUND})
    def get_latest_with_metadata(subject: Subject, key: Annotated[list[str] | None, Query()] = None,
                                 value: Annotated[list[str] | None, Query()] = None, deleted: Flag = False,
                                 format: str | None = None, _: Principal = viewer) -> Any:
        keys, values = key or [], value or []
        if len(keys) != len(values):
            raise InvalidSchema("key and value must come in pairs")
        reg = get()
        found = reg.latest_with_metadata(subject, dict(zip(keys, values, strict=True)), deleted=deleted)
        return RegistryResponse({**found.as_dict(), "schema": reg.formatted(found.schema_type, found.schema,
                                                                            found.references, format)})

    @r.post("/compatibility/subjects/{subject}/versions/{version}", response_model=CompatibilityAnswer,
            response_model_exclude_none=True, responses={**ok, **_NOT_FOUND, **_INVALID})
    def test_compatibility(subject: Subject, version: Version, body: SchemaBody, normalize: Flag = False,
                           verbose: Flag = False, _: Principal = viewer) -> Any:
        reasons = get().check(subject, body.schema_, version=version, schema_type=body.schemaType,
                              references=_refs(body), normalize=normalize)
        return _compat(reasons, verbose)

    @r.post("/compatibility/subjects/{subject}/versions", response_model=CompatibilityAnswer,
            response_model_exclude_none=True, responses={**ok, **_INVALID})
    def test_compatibility_all(subject: Subject, body: SchemaBody, normalize: Flag = False, verbose: Flag = False,
                               _: Principal = viewer) -> Any:
        reasons = get().check(subject, body.schema_, version=None, schema_type=body.schemaType,
                              references=_refs(body), normalize=normalize)
        return _compat(reasons, verbose)

    @r.get("/config", response_model=ConfigAnswer, response_model_exclude_none=True, responses={**ok})
    def get_global_config(_: Principal = viewer) -> Any:
        return {"compatibilityLevel": get().config(None)}

    @r.put("/config", response_model=ConfigAnswer, response_model_exclude_none=True, responses={**ok, **_INVALID})
    def put_global_config(body: Annotated[ConfigBody, Body()], p: Principal = admin) -> Any:
        return {"compatibility": get().set_config(None, body.compatibility or body.compatibilityLevel,
                                                  actor=p.subject)}

    @r.delete("/config", response_model=ConfigAnswer, response_model_exclude_none=True, responses={**ok})
    def delete_global_config(p: Principal = admin) -> Any:
        return {"compatibilityLevel": get().delete_config(None, actor=p.subject)}

    @r.get("/config/{subject}", response_model=ConfigAnswer, response_model_exclude_none=True,
           responses={**ok, **_err(404, "40408: the subject has no level of its own (defaultToGlobal=true: the "
                                        "global one)")})
    def get_config(subject: Subject, defaultToGlobal: Flag = False, _: Principal = viewer) -> Any:
        return {"compatibilityLevel": get().config(subject, default_to_global=defaultToGlobal)}

    @r.put("/config/{subject}", response_model=ConfigAnswer, response_model_exclude_none=True,
           responses={**ok, **_INVALID})
    def put_config(subject: Subject, body: Annotated[ConfigBody, Body()], p: Principal = operator) -> Any:
        return {"compatibility": get().set_config(subject, body.compatibility or body.compatibilityLevel,
                                                  actor=p.subject)}

    @r.delete("/config/{subject}", response_model=ConfigAnswer, response_model_exclude_none=True,
              responses={**ok, **_NOT_FOUND})
    def delete_config(subject: Subject, p: Principal = operator) -> Any:
        return {"compatibilityLevel": get().delete_config(subject, actor=p.subject)}

    @r.get("/mode", response_model=ModeBody, responses={**ok})
    def get_global_mode(_: Principal = viewer) -> Any:
        return {"mode": get().get_mode(None)}

    @r.put("/mode", response_model=ModeBody, responses={**ok, **_INVALID})
    def put_global_mode(body: Annotated[ModeBody, Body()], force: Flag = False, p: Principal = admin) -> Any:
        return {"mode": get().set_mode(None, body.mode, actor=p.subject)}

    @r.delete("/mode", response_model=ModeBody, responses={**ok})
    def delete_global_mode(p: Principal = admin) -> Any:
        return {"mode": get().delete_mode(None, actor=p.subject)}

    @r.get("/mode/{subject}", response_model=ModeBody, responses={
        **ok, **_err(404, "40409: the subject has no mode of its own (defaultToGlobal=true: the global one)")})
    def get_mode(subject: Subject, defaultToGlobal: Flag = False, _: Principal = viewer) -> Any:
        return {"mode": get().get_mode(subject, default_to_global=defaultToGlobal)}

    @r.put("/mode/{subject}", response_model=ModeBody, responses={**ok, **_INVALID})
    def put_mode(subject: Subject, body: Annotated[ModeBody, Body()], force: Flag = False,
                 p: Principal = operator) -> Any:
        return {"mode": get().set_mode(subject, body.mode, actor=p.subject)}

    @r.delete("/mode/{subject}", response_model=ModeBody, responses={**ok, **_NOT_FOUND})
    def delete_mode(subject: Subject, p: Principal = operator) -> Any:
        return {"mode": get().delete_mode(subject, actor=p.subject)}

    @r.get("/contexts", response_model=list[str], responses={**ok})
    def get_contexts(offset: Offset = 0, limit: Limit = -1, _: Principal = viewer) -> Any:
        return _page(["."], offset, limit)

    return r


def _compat(reasons: list[str], verbose: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"is_compatible": not reasons}
    if verbose:
        out["messages"] = reasons
    return out

