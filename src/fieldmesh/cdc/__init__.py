"""Change data capture: PostgreSQL (pgoutput) and MariaDB/MySQL (binlog) into the bus.

See :mod:`fieldmesh.cdc.base` for the change-event model (Debezium envelope) and the errors.
"""

from __future__ import annotations

from fieldmesh.cdc.base import (
    CDC_TOPIC_PREFIX,
    CdcError,
    Change,
    ChangeEvent,
    SourceConfigError,
    SourceInfo,
    SourcePositionLost,
    SourcePrivilegeError,
    TableNotCapturable,
    cdc_topic,
    decode_change_event,
    encode_change_event,
    encode_key,
)

__all__ = [
    "CDC_TOPIC_PREFIX",
    "CdcError",
    "Change",
    "ChangeEvent",
    "SourceConfigError",
    "SourceInfo",
    "SourcePositionLost",
    "SourcePrivilegeError",
    "TableNotCapturable",
    "cdc_topic",
    "decode_change_event",
    "encode_change_event",
    "encode_key",
]
