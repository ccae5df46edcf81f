"""Edge sources: simulator, Modbus TCP, OPC UA, local MQTT; all behind :class:`Source`."""

from __future__ import annotations

from fieldmesh.edge.sources.base import Source, SourceBatch

__all__ = ["Source", "SourceBatch"]
