"""Settings: one frozen pydantic-settings model.

Precedence: keyword arguments > environment (``FIELDMESH__SECTION__KEY``) > defaults.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from fieldmesh.core.errors import ConfigError

__all__ = ["BusSettings", "GatewaySettings", "ProcessorSettings", "Settings", "load_settings"]


class GatewaySettings(BaseModel, frozen=True):
    """Validation and batching at the gateway."""

    max_skew_ms: int = Field(300_000, ge=0, description="reject event times further ahead than this")
    max_payload_bytes: int = Field(256 * 1024, gt=0, description="reject payloads larger than this")
    batch_max_messages: int = Field(512, gt=0, description="ingest messages per bus publish round")
    linger_ms: int = Field(20, ge=0, description="wait this long to fill a batch")
    share_group: str = Field("fieldmesh", description="MQTT 5 shared-subscription group")


class BusSettings(BaseModel, frozen=True):
    """The durable bus between gateway and processors."""

    partitions: int = Field(8, ge=1, le=4096)
    retention_s: int = Field(7 * 86400, gt=0)
    dedupe_window_s: int = Field(600, gt=0, description="JetStream Nats-Msg-Id duplicate window")
    fsync: str = Field("2m", description="nats-server sync_interval: 'always' or a duration such as 2m")


class ProcessorSettings(BaseModel, frozen=True):
    """Stream processing in the processor."""

    fetch_max: int = Field(256, gt=0, description="bus messages per transaction")
    fetch_timeout_s: float = Field(0.05, gt=0)
    grace_ms: int = Field(5_000, ge=0, description="lateness allowed before a window counts as emitted")


class Settings(BaseSettings):
    """All of fieldmesh's settings."""

    model_config = SettingsConfigDict(
        env_prefix="FIELDMESH__", env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    data_dir: Path = Path(".fieldmesh")
    gateway: GatewaySettings = GatewaySettings()
    bus: BusSettings = BusSettings()
    processor: ProcessorSettings = ProcessorSettings()


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning validation errors into a ConfigError that names the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = "__".join(str(p) for p in err["loc"]).upper()
        raise ConfigError(f"invalid setting FIELDMESH__{loc}: {err['msg']}", key=loc) from None
