"""Settings: one frozen pydantic-settings model.

Precedence: keyword arguments > environment (``FIELDMESH__SECTION__KEY``) > defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from fieldmesh.core.errors import ConfigError

__all__ = [
    "AccessSettings",
    "BusSettings",
    "CdcSettings",
    "EnrichJoinSpec",
    "EnrichSettings",
    "GatewaySettings",
    "LakeSettings",
    "ProcessorSettings",
    "RetentionSettings",
    "RuntimeSettings",
    "Settings",
    "load_settings",
    "parse_enrich_spec",
]


class GatewaySettings(BaseModel, frozen=True):
    """Validation and batching at the gateway."""

    max_skew_ms: int = Field(300_000, ge=0, description="reject event times further ahead than this")
    max_payload_bytes: int = Field(256 * 1024, gt=0, description="reject payloads larger than this")
    batch_max_messages: int = Field(512, gt=0, description="ingest messages per bus publish round")
    batch_max_bytes: int = Field(1 << 20, gt=0, description=(
        "payload bytes per bus publish round (the first message always; the rest of a fetch waits for the next "
        "round): with large payloads a round holds fewer than batch_max_messages, so the gateway's memory and "
        "the time before the processor sees a round stay bounded"))
    linger_ms: int = Field(20, ge=0, description=(
        "caught up with its source (the last round under half of either batch bound), a round begins at least this "
        "long after the one before and holds what arrived meanwhile; behind, rounds follow at once"))
    fetch_wait_ms: int = Field(1000, gt=0, le=60_000, description=(
        "how long a fetch waits for a first message when the source has none: a source hands over its first "
        "message as it comes, so this adds no latency; it sets how often an idle gateway asks its source"))
    share_group: str = Field("fieldmesh", description="MQTT 5 shared-subscription group")
    receive_maximum: int = Field(65535, ge=1, le=65535, description=(
        "MQTT 5 Receive Maximum the gateway asks an external broker for: its window of unacknowledged "
        "messages to the gateway (a burst beyond window + broker queue is dropped by the broker)"))
    door: Literal["auto", "nats", "mosquitto"] = Field("auto", description=(
        "the MQTT door of 'fieldmesh up': nats (nats-server's MQTT 3.1.1 listener, PUBACK after JetStream "
        "stored the message; what auto runs) or mosquitto (MQTT 3.1.1 and 5, PUBACK from Mosquitto's memory)"))
    session_expiry_s: int = Field(86400, ge=0, description=(
        "MQTT session expiry at an external broker: how long it keeps queueing for a gateway that is "
        "down (0: a clean session, nothing kept)"))
    bus_encoding: int = Field(
        2, ge=1, le=2, description="bus batch encoding the gateway writes: 2 (columnar) or 1 (rows; for "
        "processors built before 2026-12-03, which read only 1: upgrade processors first, docs/pipeline.md)"
    )
    require_registration: bool = Field(False, description=(
        "refuse devices that are not registered as active in the device registry (DLQ unknown_device; "
        "suspended or retired: unauthorized); implies authenticated_topics (docs/security.md)"))
    authenticated_topics: bool = Field(False, description=(
        "the MQTT door authenticates devices and lets each publish only on its own topics, so the topic names "
        "the sender: a payload naming another device is dead-lettered as unauthorized (else device_mismatch)"))
    registry_poll_s: float = Field(1.0, gt=0, description=(
        "how often the gateway asks the device registry whether it changed (one cheap read)"))
    rate_limit_messages_per_s: float = Field(0.0, ge=0, description=(
        "messages per second each device may publish (token bucket; 0: no limit); the excess is dead-lettered "
        "as rate_limited"))
    rate_limit_bytes_per_s: float = Field(0.0, ge=0, description=(
        "payload bytes per second each device may publish (token bucket; 0: no limit)"))
    schema_subjects: dict[str, str] = Field(default_factory=dict, description=(
        "topic pattern (shell-style, e.g. devices/pump-*/telemetry) -> schema subject: payloads on matching topics "
        "that name no schema themselves are written against the subject's latest schema (JSON validated, Avro or "
        "Protobuf decoded; docs/schemas.md); the first matching pattern wins"))
    schema_subject_refresh_s: float = Field(30.0, gt=0, description=(
        "how long the gateway keeps a subject's latest schema id before asking the registry again"))
    rate_limit_burst_s: float = Field(10.0, gt=0, description=(
        "the buckets hold this many seconds of the rates: a device may burst that much above its rate after a "
        "quiet spell (the bytes bucket holds at least max_payload_bytes)"))


class BusSettings(BaseModel, frozen=True):
    """The durable bus between gateway and processors."""

    partitions: int = Field(8, ge=1, le=4096)
    retention_s: int = Field(7 * 86400, gt=0)
    dedupe_window_s: int = Field(600, gt=0, description="JetStream Nats-Msg-Id duplicate window")
    fsync: str = Field("2m", description="nats-server sync_interval: 'always' or a duration such as 2m")


class ProcessorSettings(BaseModel, frozen=True):
    """Stream processing in the processor."""

    fetch_max: int = Field(256, gt=0, description="bus messages per transaction")
    fetch_timeout_s: float = Field(1.0, gt=0, description=(
        "how long a fetch waits for a first record when the bus has none: the bus hands over its first record as "
        "it comes, so this adds no latency; it sets how often an idle processor asks the bus (after records came, "
        "the first wait is 50 ms at most, and the store then writes what it deferred)"))
    grace_ms: int = Field(5_000, ge=0, description="lateness allowed before a window counts as emitted")
    engine: Literal["columnar", "reference"] = Field(
        "columnar", description="the stream core: numpy over columns, or the plain per-reading reference"
    )
    fetch_max_bytes: int = Field(
        2 * 2**20, gt=0, description="bytes of bus records per fetch (the backlog stays in the bus)"
    )
    min_batch_interval_ms: float = Field(
        20, ge=0, le=1000, description=(
            "caught up with the bus after a small batch (under half of fetch_max and of fetch_max_bytes), the next "
            "starts at least this long after it began, so it holds what arrived meanwhile: fewer, larger "
            "transactions (less CPU at part load) for up to this much latency; no wait after a large batch"))
    rollup_flush_ms: int = Field(
        1000, ge=0, le=60_000, description=(
            "SQLite: how long the writer holds the batches' rollup deltas before it writes them, merged (also when "
            "the bus is empty); SQL over the rollup tables lags by up to this, the API's rollups do not. 0: each "
            "batch writes its own"))


class AlertSettings(BaseModel, frozen=True):
    """Alert rules in the processor, and the notifier that delivers their notifications (docs/alerts.md)."""

    enabled: bool = Field(True, description="evaluate the alert rules stored in the hot store")
    rules_file: Path | None = Field(None, description="a YAML list of rules, loaded into the store at start")
    rules_file_poll_s: float = Field(2.0, gt=0, description=(
        "how often the rules file is looked at: a changed file is loaded again (a bad one refused, the rules "
        "in force kept)"))
    tick_s: float = Field(1.0, gt=0, description="how often absence rules and rule changes are checked")
    notify: bool = Field(True, description="deliver notifications from the processor (one notifier per store)")
    mqtt_url: str | None = Field(None, description="broker for mqtt notification targets (fieldmesh/alerts/...)")
    webhook_timeout_s: float = Field(5.0, gt=0)
    retry_max_s: float = Field(300.0, gt=0, description="cap of the backoff between tries of a notification")


class FeatureSettings(BaseModel, frozen=True):
    """The feature store (docs/features.md): feature views computed by the processor, an online store."""

    views_file: Path | None = Field(None, description="a YAML file of feature views (--features); none: off")
    online_url: str | None = Field(
        None, description="online store: redis://host:port/db?prefix=fm, or sqlite:///path (default: "
                          "features.db under the data dir)")

    def online(self, data_dir: Path) -> str:
        """The online store's URL (the SQLite default under ``data_dir``)."""
        return self.online_url or f"sqlite:///{Path(data_dir).resolve() / 'features.db'}"
class ProductSettings(BaseModel, frozen=True):
    """Data products whose quality the processor counts (docs/products.md)."""

    enabled: bool = Field(True, description="count the quality of the data products stored in the hot store")
    products_file: Path | None = Field(None, description="a YAML list of data products, loaded into the store at start")


class LineageSettings(BaseModel, frozen=True):
    """OpenLineage run events of the gateway, processor, sinks and CDC (docs/lineage.md)."""

    enabled: bool = Field(True, description="emit run events (kept in the hot store; sent when url is set)")
    url: str | None = Field(None, description="an OpenLineage HTTP endpoint (default: the OPENLINEAGE_URL variable)")
    namespace: str = Field("fieldmesh", min_length=1, description="the jobs' OpenLineage namespace")
    interval_s: float = Field(60.0, gt=0, description="seconds between RUNNING events of a running job")


class RuntimeSettings(BaseModel, frozen=True):
    """How ``fieldmesh up`` supervises its processes and judges their health."""

    restart_max_s: float = Field(5.0, gt=0, description="cap of the backoff between restarts of a process")
    start_failures: int = Field(5, ge=1, description="exits in a row within start_grace_s before giving up")
    start_grace_s: float = Field(10.0, gt=0, description="an exit this soon after a start is a start failure")
    stall_after_s: float = Field(15.0, gt=0, description="lag with no progress this long turns /health degraded")
    disk_reserve_mb: int = Field(
        64, ge=0, description="free space kept on the data dir's disk: below it the MQTT door closes"
    )


class EnrichJoinSpec(BaseModel, frozen=True):
    """One as-of join of readings with a table captured by CDC (see :func:`parse_enrich_spec`)."""

    table: str = Field(description="schema.table (PostgreSQL) or db.table (MySQL), as in the change events")
    reading_field: str = Field("device_id", description="a Reading field or meta.<name>")
    column: str = Field("device_id", description="the table column matched against the reading field")
    fields: tuple[str, ...] | None = Field(None, description="columns copied into the enrichment (all if None)")
    prefix: str | None = Field(None, description="prepended to copied names; default '<table>.'")
    pk: tuple[str, ...] | None = Field(None, description="the table's primary key columns")
    db: str | None = Field(None, description="PostgreSQL database of the table (names the CDC topic)")
    topic: str | None = Field(None, description="explicit CDC topic (e.g. one written by Debezium)")

    @property
    def effective_prefix(self) -> str:
        """The prefix in use: the given one, else the table name and a dot."""
        return self.prefix if self.prefix is not None else self.table.rsplit(".", 1)[-1] + "."


_SPEC_KEYS = ("fields", "prefix", "pk", "db", "topic")
_SPEC_HELP = (
    "use TABLE[:READING_FIELD=COLUMN][:fields=a,b][:prefix=P][:pk=id][:db=NAME][:topic=T], "
    "e.g. 'public.assets:device_id=device_id:fields=threshold,site'"
)


def parse_enrich_spec(spec: str) -> EnrichJoinSpec:
    """Parse one enrichment spec such as ``public.assets:device_id=device_id:fields=threshold,site``.

    ``TABLE`` is ``schema.table`` (PostgreSQL; the database comes from ``db=``, the CDC source or
    ``FIELDMESH__ENRICH__DATABASE``), ``db.schema.table``, or ``db.table`` (MySQL). The join defaults to
    ``device_id=device_id``, the prefix to ``<table>.``, the fields to every column.

    Raises:
        ValueError: the spec is malformed (the message quotes it and shows the grammar).
    """
    parts = [p.strip() for p in spec.strip().split(":")]
    table = parts[0] if parts else ""
    names = table.split(".")
    if not 2 <= len(names) <= 3 or not all(names):
        raise ValueError(f"{spec!r}: the table must be schema.table, db.schema.table or db.table; {_SPEC_HELP}")
    out: dict[str, Any] = {}
    if len(names) == 3:
        out["db"] = names[0]
        table = f"{names[1]}.{names[2]}"
    out["table"] = table
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise ValueError(f"{spec!r}: {part!r} is not key=value; {_SPEC_HELP}")
        if key in _SPEC_KEYS:
            if key in out:
                raise ValueError(f"{spec!r}: {key}= given twice")
            if key in ("fields", "pk"):
                items = tuple(v.strip() for v in value.split(",") if v.strip())
                if not items:
                    raise ValueError(f"{spec!r}: {key}= needs at least one column")
                out[key] = items
            elif key == "prefix":
                out[key] = value
            elif not value:
                raise ValueError(f"{spec!r}: {key}= needs a value")
            else:
                out[key] = value
        else:
            if "column" in out:
                raise ValueError(f"{spec!r}: two join conditions ({part!r}); one READING_FIELD=COLUMN per spec")
            if not value:
                raise ValueError(f"{spec!r}: {part!r} needs a column name after '='")
            out["reading_field"], out["column"] = key, value
    attr, _, meta_key = out.get("reading_field", "device_id").partition(".")
    if (attr != "meta" and meta_key) or (attr == "meta" and not meta_key):
        raise ValueError(f"{spec!r}: the reading field must be a Reading field (device_id) or meta.<name>")
    return EnrichJoinSpec(**out)


class EnrichSettings(BaseModel, frozen=True):
    """As-of enrichment of readings in the processor from tables captured by CDC."""

    joins: Annotated[tuple[EnrichJoinSpec, ...], NoDecode] = Field(
        (), description="enrichment specs separated by ';' (or a JSON list), see parse_enrich_spec"
    )
    database: str | None = Field(None, description="default PostgreSQL database of the joined tables")
    catch_up_timeout_s: float = Field(300.0, gt=0, description="time to read the CDC topics before starting")

    @field_validator("joins", mode="before")
    @classmethod
    def _parse_joins(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                value = json.loads(text)
            else:
                value = [p for p in text.replace("\n", ";").split(";") if p.strip()]
        if isinstance(value, list | tuple):
            return tuple(parse_enrich_spec(v) if isinstance(v, str) else v for v in value)
        return value


class CdcSettings(BaseModel, frozen=True):
    """Change data capture run by ``fieldmesh up`` (``fieldmesh cdc`` has its own flags)."""

    source: SecretStr | None = Field(None, description="postgresql://... or mysql://... (None: no CDC)")
    tables: str = Field("", description="comma-separated schema.table (db.table for MySQL)")
    name: str = Field("fieldmesh", pattern=r"^[a-z0-9_]{1,63}$", description="slot/publication/offsets name")
    partitions: int = Field(4, ge=1, le=4096, description="partitions of each table's CDC topic")
    snapshot_timeout_s: float = Field(300.0, gt=0, description="wait this long for the initial snapshot")


class AccessSettings(BaseModel, frozen=True):
    """Who may use the API (docs/security.md): OpenID Connect issuers and device groups by pattern.

    API keys live in the hot store (``fieldmesh keys``); these settings add bearer tokens (JWT) of an
    OpenID Connect issuer, and say which groups hold the devices the device registry does not.
    """

    oidc_issuer: str | None = Field(None, description=(
        "issuer URL of the JWT bearer tokens accepted (the iss claim), e.g. https://sso.example/realms/plant; "
        "None: no JWT accepted"))
    oidc_audience: str | None = Field(None, description="the aud claim required (default: fieldmesh)")
    oidc_jwks_url: str | None = Field(None, description=(
        "the issuer's JWKS URL; default: jwks_uri of <issuer>/.well-known/openid-configuration"))
    oidc_role_claim: str = Field("fieldmesh_role", description=(
        "claim holding the role (a string or a list; the strongest of viewer/operator/admin wins); a dotted "
        "path reaches into objects, e.g. realm_access.roles (Keycloak)"))
    oidc_groups_claim: str = Field("fieldmesh_groups", description=(
        "claim holding the device groups the token is limited to (absent: every device)"))
    jwks_cache_s: float = Field(300.0, gt=0, description="how long the issuer's keys are used before a refetch")
    jwks_refresh_min_s: float = Field(5.0, ge=0, description=(
        "at most one refetch per this many seconds when a token names an unknown key id"))
    groups: dict[str, tuple[str, ...]] = Field(default_factory=dict, description=(
        "device groups of devices the registry does not hold (a registered device's groups are the "
        "registry's): group name -> device-id glob patterns, "
        'e.g. {"plant-1": ["p1-*"], "lab": ["lab-*", "test-7"]} (JSON in FIELDMESH__ACCESS__GROUPS)'))

    @property
    def audience(self) -> str:
        """The audience required of JWTs."""
        return self.oidc_audience or "fieldmesh"


class LakeSettings(BaseModel, frozen=True):
    """The lake: committed readings, rollups and dead letters in Apache Iceberg tables (docs/lake.md)."""

    enabled: bool = Field(True, description="'fieldmesh up' writes the lake (--no-lake turns it off)")
    url: str | None = Field(None, description=(
        "Iceberg catalog: http(s)://... (REST: Nessie, Polaris, Gravitino, Glue), sqlite:///path or "
        "postgresql://... (SQL catalog); None: an SQLite catalog under <data dir>/lake"))
    warehouse: str | None = Field(None, description=(
        "where data files go (file://, s3://, gs://, abfs://); None: <data dir>/lake/warehouse for the "
        "embedded catalog, the REST catalog's default otherwise"))
    properties: dict[str, str] = Field(default_factory=dict, description=(
        'extra catalog properties passed to pyiceberg, e.g. {"s3.endpoint": "http://127.0.0.1:9000"} '
        "(JSON in FIELDMESH__LAKE__PROPERTIES)"))
    namespace: str = Field("fieldmesh", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", description="Iceberg namespace")
    commit_interval_s: float = Field(60.0, gt=0, description=(
        "a table commits at most about once per this many seconds; data is visible in the lake within it"))
    commit_rows: int = Field(1_000_000, gt=0, description="commit sooner once this many rows are buffered")
    commit_bytes: int = Field(128 * 2**20, gt=0, description=(
        "commit sooner once this many bytes of readings (as Arrow), windows and dead letters are buffered (the "
        "buffer holds at most twice this; the lake's process peaks at several times it, docs/lake.md)"))
    readings_buckets: int = Field(8, ge=1, le=1024, description="buckets of device_id in the readings partitioning")
    target_file_mb: int = Field(128, ge=1, description=(
        "compaction rewrites a partition's small files into files of about this size"))
    snapshot_max_age_s: float = Field(3600.0, gt=0, description=(
        "'fieldmesh lake expire' and the maintenance inside 'up' drop snapshots older than this (each commit "
        "costs in proportion to the snapshots kept: a table committing once a minute keeps 60-120 with an hour)"))
    maintenance_interval_s: float = Field(3600.0, ge=0, description=(
        "inside 'up', the lake sink expires old snapshots and compacts closed partitions this often (0: never)"))


class RetentionSettings(BaseModel, frozen=True):
    """How long the hot store keeps each tier (docs/lake.md); what leaves it must be in the lake first."""

    raw_days: float = Field(7.0, ge=0, description="raw readings are kept this many days (0: forever)")
    rollup_1m_days: float = Field(90.0, ge=0, description="1-minute rollups are kept this many days (0: forever)")
    rollup_1h_days: float = Field(0.0, ge=0, description="1-hour rollups are kept this many days (0: forever)")
    interval_s: float = Field(3600.0, ge=0, description="inside 'up', retention runs this often (0: never)")
    without_lake: bool = Field(False, description=(
        "delete old rows even when the lake is off, i.e. the hot store holds their only copy (they are lost)"))


class Settings(BaseSettings):
    """All of fieldmesh's settings."""

    model_config = SettingsConfigDict(
        env_prefix="FIELDMESH__", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    data_dir: Path = Path(".fieldmesh")
    gateway: GatewaySettings = GatewaySettings()
    bus: BusSettings = BusSettings()
    processor: ProcessorSettings = ProcessorSettings()
    enrich: EnrichSettings = EnrichSettings()
    cdc: CdcSettings = CdcSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    access: AccessSettings = AccessSettings()
    lake: LakeSettings = LakeSettings()
    retention: RetentionSettings = RetentionSettings()
    alerts: AlertSettings = AlertSettings()
    features: FeatureSettings = FeatureSettings()
    products: ProductSettings = ProductSettings()
    lineage: LineageSettings = LineageSettings()


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning validation errors into a ConfigError that names the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = "__".join(str(p) for p in err["loc"]).upper()
        raise ConfigError(f"invalid setting FIELDMESH__{loc}: {err['msg']}", key=loc) from None
