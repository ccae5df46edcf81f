"""fieldmesh.edge: the agent next to the devices (sources, preprocess, infer, buffer, uplink, twin)."""

from __future__ import annotations

from fieldmesh.edge.buffer import BufferFull, DiskBuffer
from fieldmesh.edge.config import EdgeConfig, load_config, parse_config

__all__ = ["BufferFull", "DiskBuffer", "EdgeConfig", "load_config", "parse_config"]
