"""Topic grammar: device MQTT topics, their NATS subjects, and fieldmesh's bus topics."""

from __future__ import annotations

import re
import zlib
from typing import Final

__all__ = [
    "DEVICE_ID_RE",
    "METRIC_RE",
    "device_of_topic",
    "partition_for",
    "telemetry_topic",
]

DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
METRIC_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")

#: MQTT topic filter of device telemetry, and the same as a NATS subject filter.
TELEMETRY_FILTER: Final = "devices/+/telemetry"
TELEMETRY_SUBJECTS: Final = "devices.*.telemetry"

#: Bus topics (NATS subjects are ``{topic}.{partition}``; Kafka topics carry partitions natively).
READINGS_TOPIC: Final = "fm.readings"
DLQ_TOPIC: Final = "fm.dlq"


def telemetry_topic(device_id: str) -> str:
    """The MQTT topic a device publishes telemetry on."""
    return f"devices/{device_id}/telemetry"


def device_of_topic(topic: str) -> str | None:
    """The device id of a telemetry topic (MQTT ``/`` or NATS ``.`` form), or None if it is not one.

    A topic may carry an encoding suffix (``devices/x/telemetry/zstd``); it is ignored here.
    """
    sep = "/" if "/" in topic else "."
    parts = topic.split(sep)
    if len(parts) < 3 or parts[0] != "devices" or parts[2] != "telemetry":
        return None
    dev = parts[1]
    return dev if DEVICE_ID_RE.fullmatch(dev) else None


def partition_for(device_id: str, partitions: int) -> int:
    """The bus partition of a device: stable across processes and versions (CRC-32)."""
    return zlib.crc32(device_id.encode()) % partitions
