"""Bus adapters behind one contract (:mod:`fieldmesh.bus.base`), chosen by URL."""

from __future__ import annotations

from fieldmesh.bus.base import Bus, BusRecord, Consumer, IngestSpec, OutRecord, Producer, TopicSpec
from fieldmesh.core.errors import ConfigError, MissingDependency

__all__ = ["Bus", "BusRecord", "Consumer", "IngestSpec", "OutRecord", "Producer", "TopicSpec", "load_bus"]


def load_bus(url: str) -> Bus:
    """Return an (unconnected) bus for ``url``: ``nats://host:port`` or ``kafka://host:port[,host:port]``.

    Use it as an async context manager to connect.
    """
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("nats", "tls"):
        try:
            from fieldmesh.bus.nats import NatsBus
        except ImportError as exc:
            raise MissingDependency("nats-py", "server") from exc
        return NatsBus(url)
    if scheme == "kafka":
        try:
            from fieldmesh.bus.kafka import KafkaBus  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise MissingDependency("confluent-kafka", "kafka") from exc
        return KafkaBus(url)  # type: ignore[no-any-return,unused-ignore]
    raise ConfigError(f"unsupported bus URL {url!r}: use nats://host:port or kafka://host:port", key="bus_url")
