"""Edge agent configuration: one pydantic model loaded from YAML.

Errors name the key to fix in the file's own terms, e.g. ``sources[0].modbus.port: ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from fieldmesh.core.errors import ConfigError, MissingDependency

__all__ = [
    "AgentConfig",
    "BufferConfig",
    "DeviceRule",
    "EdgeConfig",
    "InferConfig",
    "JobsConfig",
    "MetricRule",
    "ModbusRegister",
    "ModbusSourceConfig",
    "MqttSourceConfig",
    "OpcuaSourceConfig",
    "PreprocessConfig",
    "SimulatorSourceConfig",
    "SourceConfig",
    "TlsConfig",
    "TwinConfig",
    "UplinkConfig",
    "format_validation_error",
    "load_config",
    "parse_config",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricRule(_Model):
    """Preprocessing of one metric: calibration, unit normalisation, range check, deadband."""

    gain: float = 1.0
    offset: float = 0.0
    #: Unit conversion ``"F->C"``, ``"psi->kPa"`` ... (see ``fieldmesh.edge.preprocess.UNIT_CONVERSIONS``).
    unit: str | None = None
    min: float | None = None
    max: float | None = None
    #: Absolute change needed before a new value is sent (deadband mode).
    deadband: float | None = None


class DeviceRule(_Model):
    """Per-device overrides of the preprocessing defaults (also what the twin sets live)."""

    mode: Literal["raw", "deadband", "window"] | None = None
    heartbeat_ms: int | None = Field(default=None, gt=0)
    window_ms: int | None = Field(default=None, gt=0)
    threshold: float | None = None
    metrics: dict[str, MetricRule] = Field(default_factory=dict)


class PreprocessConfig(_Model):
    """The preprocessing chain (defaults, then per-metric rules, then per-device overrides)."""

    mode: Literal["raw", "deadband", "window"] = "raw"
    dedupe: bool = True
    heartbeat_ms: int = Field(default=60_000, gt=0)
    window_ms: int = Field(default=60_000, gt=0)
    metrics: dict[str, MetricRule] = Field(default_factory=dict)
    devices: dict[str, DeviceRule] = Field(default_factory=dict)


class InferConfig(_Model):
    """On-device anomaly scoring."""

    scorer: Literal["none", "ewma", "onnx"] = "ewma"
    #: Decision threshold (z-score for ``ewma``, probability for ``onnx``).
    threshold: float | None = None
    alpha: float = Field(default=0.05, gt=0, le=1)
    warmup: int = Field(default=20, ge=1)
    #: ONNX model file (default: the model shipped in ``fieldmesh/edge/models``).
    model_path: Path | None = None


class BufferConfig(_Model):
    """The on-disk store-and-forward buffer."""

    path: Path = Path("./edge-buffer")
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=4096)
    segment_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    full_policy: Literal["drop_oldest", "block"] = "drop_oldest"
    #: ``always``: fsync every append before the source is acknowledged; ``interval``: at most every
    #: ``fsync_interval_ms``; ``never``: leave it to the OS.
    fsync: Literal["always", "interval", "never"] = "always"
    fsync_interval_ms: int = Field(default=200, ge=1)


class TlsConfig(_Model):
    """TLS to the broker; ``cert`` + ``key`` make it mutual TLS."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = False


class UplinkConfig(_Model):
    """The MQTT uplink to fieldmesh's gateway (or any broker it reads)."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, gt=0, lt=65536)
    #: ``auto`` tries MQTT 5 and falls back to 3.1.1 when the broker refuses it.
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    client_id: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    tls: TlsConfig | None = None
    keepalive_s: int = Field(default=30, ge=5)
    linger_ms: int = Field(default=1000, ge=0)
    max_batch_readings: int = Field(default=5000, ge=1)
    max_inflight_groups: int = Field(default=8, ge=1)
    compression: Literal["zstd", "none"] = "zstd"
    zstd_level: int = Field(default=3, ge=1, le=22)
    backoff_initial_ms: int = Field(default=200, ge=1)
    backoff_max_ms: int = Field(default=10_000, ge=1)
    traceparent: bool = True
    anomalies: bool = True
    #: Cap on readings sent per second (a bandwidth budget for metered links); None: no cap.
    max_readings_per_s: float | None = Field(default=None, gt=0)


class TwinConfig(_Model):
    """Twin-lite: desired config on ``devices/{id}/config``, reported on ``devices/{id}/state``."""

    enabled: bool = True


class SchemaConfig(_Model):
    """The device's reading contract (docs/schemas.md "At the edge")."""

    #: JSON Schema of one reading in the telemetry shape; readings it refuses are kept, never sent.
    file: Path
    #: Register the schema under this registry subject at start (e.g. ``pumps-value``).
    subject: str | None = None
    #: The registry's base URL (``http://HOST:PORT/api/v1/registry``); needed with ``subject``.
    registry_url: str | None = None
    #: ``<key id>:<secret>`` of an API key allowed to register (HTTP Basic, as Confluent's clients).
    auth: SecretStr | None = None

    @model_validator(mode="after")
    def _registry_with_subject(self) -> SchemaConfig:
        if self.subject and not self.registry_url:
            raise ValueError("schema.subject needs schema.registry_url")
        return self


class SimulatorSourceConfig(_Model):
    """The fleet simulator as a source (deterministic; resumes where it was acknowledged)."""

    devices: int = Field(default=10, ge=1)
    seed: int = 0
    prefix: str = "sim"
    interval_ms: int = Field(default=1000, ge=1)
    #: Ticks per emitted batch (more rows per batch, fewer Python round trips).
    ticks_per_batch: int = Field(default=1, ge=1)
    #: Pace ticks on the wall clock; ``false`` runs as fast as the pipeline allows.
    realtime: bool = True
    #: Stop after this many ticks (None: forever).
    max_ticks: int | None = Field(default=None, ge=0)
    start_ts_ms: int | None = None
    spike_prob: float = Field(default=0.002, ge=0, le=1)
    stuck_prob: float = Field(default=0.0002, ge=0, le=1)
    boot_id: str | None = None


class ModbusRegister(_Model):
    """One metric read from Modbus registers, scaled ``value * scale + offset``."""

    address: int = Field(ge=0, lt=65536)
    kind: Literal["holding", "input"] = "holding"
    type: Literal["int16", "uint16", "int32", "uint32", "float32"] = "int16"
    scale: float = 1.0
    offset: float = 0.0


class ModbusSourceConfig(_Model):
    """Modbus TCP polling (pymodbus)."""

    host: str = "127.0.0.1"
    port: int = Field(default=502, gt=0, lt=65536)
    unit: int = Field(default=1, ge=0, le=255)
    device_id: str
    interval_ms: int = Field(default=1000, ge=1)
    timeout_s: float = Field(default=1.0, gt=0)
    registers: dict[str, ModbusRegister]


class OpcuaSourceConfig(_Model):
    """OPC UA node subscriptions (asyncua)."""

    endpoint: str
    device_id: str
    #: metric name -> node id (``ns=2;i=2`` or ``ns=2;s=Pump.Temp``)
    nodes: dict[str, str]
    publishing_interval_ms: int = Field(default=100, ge=1)
    reconnect_max_ms: int = Field(default=5000, ge=1)


class MqttSourceConfig(_Model):
    """A local MQTT subscription for devices that already speak MQTT (docs/contract.md JSON)."""

    host: str = "127.0.0.1"
    port: int = Field(default=1883, gt=0, lt=65536)
    topic: str = "local/+/telemetry"
    qos: int = Field(default=1, ge=0, le=1)
    client_id: str | None = None


class SourceConfig(_Model):
    """One source: exactly one of its keys is set."""

    simulator: SimulatorSourceConfig | None = None
    modbus: ModbusSourceConfig | None = None
    opcua: OpcuaSourceConfig | None = None
    mqtt: MqttSourceConfig | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> SourceConfig:
        set_ = [k for k in ("simulator", "modbus", "opcua", "mqtt") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(
                f"each source needs exactly one of simulator, modbus, opcua, mqtt (got {set_ or 'none'})"
            )
        return self

    @property
    def kind(self) -> str:
        """The source's kind (its one key)."""
        for k in ("simulator", "modbus", "opcua", "mqtt"):
            if getattr(self, k) is not None:
                return k
        raise AssertionError("validated")


class JobsConfig(_Model):
    """Jobs and over-the-air updates of the edge model and firmware (docs/rollouts.md)."""

    enabled: bool = False
    #: The device id jobs are addressed to (``devices/{id}/jobs/notify``); default: ``uplink.client_id``.
    device_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,128}$")
    #: Ed25519 public keys (PEM) whose signatures the agent accepts; none: every install is rejected.
    trusted_keys: list[Path] = Field(default_factory=list)
    #: The A/B slots (default: ``<buffer.path>/ota``).
    slots_path: Path | None = None
    #: Starts of a new version without a passed health check before the agent goes back by itself.
    max_boot_attempts: int = Field(default=3, ge=1, le=100)
    #: How long the agent runs with a new version before it is confirmed: until then each start counts a
    #: trial start (a crash loop after a passed check still goes back).
    confirm_after_s: float = Field(default=60.0, ge=0)
    max_artifact_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    #: A command that applies and checks a firmware image (its path is appended); exit 0: healthy.
    #: None: the image is kept in its slot for the device's own updater, and confirmed.
    firmware_check: list[str] | None = None
    firmware_check_timeout_s: float = Field(default=300.0, gt=0)


class AgentConfig(_Model):
    """Agent-wide settings."""

    #: Boot id stamped on readings (identity with ``seq``); default: a fresh one per start.
    boot_id: str | None = None
    #: How often ``state/stats.json`` is rewritten beside the buffer.
    stats_interval_s: float = Field(default=2.0, gt=0)


class EdgeConfig(_Model):
    """The whole edge agent configuration (``edge.yaml``)."""

    agent: AgentConfig = Field(default_factory=AgentConfig)
    sources: list[SourceConfig] = Field(min_length=1)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    infer: InferConfig = Field(default_factory=InferConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    uplink: UplinkConfig = Field(default_factory=UplinkConfig)
    twin: TwinConfig = Field(default_factory=TwinConfig)
    schema_: SchemaConfig | None = Field(default=None, alias="schema")
    jobs: JobsConfig = Field(default_factory=JobsConfig)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(root)"


def format_validation_error(exc: ValidationError, *, source: str = "config") -> str:
    """One line per problem, each starting with the key to fix (``sources[0].modbus.port: ...``)."""
    lines = []
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        lines.append(f"{_loc(loc)}: {err['msg']}")
    return f"invalid {source}:\n  " + "\n  ".join(lines)


def parse_config(data: Any, *, source: str = "config") -> EdgeConfig:
    """Validate a config mapping; raises :class:`ConfigError` naming the first bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {source}: the top level must be a mapping", key="(root)")
    try:
        return EdgeConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(format_validation_error(exc, source=source), key=_loc(tuple(first["loc"]))) from exc


def load_config(path: str | Path) -> EdgeConfig:
    """Load and validate ``edge.yaml``."""
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml is in the edge extra
        raise MissingDependency("pyyaml", "edge") from exc
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}", key="--config") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p} is not valid YAML: {exc}", key="(root)") from exc
    return parse_config(data, source=str(p))
