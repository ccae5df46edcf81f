"""Topic grammar: device MQTT topics, their NATS subjects, and fieldmesh's bus topics."""

from __future__ import annotations

import re
import zlib
from typing import Final, Literal, NamedTuple

__all__ = [
    "DEVICE_ID_RE",
    "DEVICE_PUBLISH_LEAVES",
    "DEVICE_SIDE_LEAVES",
    "DEVICE_SUBJECTS",
    "DEVICE_SUBSCRIBE_LEAVES",
    "DEVICE_TOPICS_FILTER",
    "DLQ_TOPIC",
    "GATEWAY_GROUP",
    "INGEST_SUBJECTS",
    "INGEST_TOPIC",
    "METRIC_RE",
    "OLD_INGEST_SUBJECTS",
    "READINGS_TOPIC",
    "TopicRoute",
    "device_of_topic",
    "mqtt_topic_of_subject",
    "nats_subject_of_topic",
    "partition_for",
    "route_of_topic",
    "telemetry_topic",
]

DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,128}")
METRIC_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")

#: MQTT topic filter of device telemetry, and the same as a NATS subject filter.
TELEMETRY_FILTER: Final = "devices/+/telemetry"
TELEMETRY_SUBJECTS: Final = "devices.*.telemetry"
#: Everything devices publish: the gateway takes it all, so that nothing under ``devices/`` vanishes
#: unseen (unserved topics are dead-lettered as ``unknown_topic``).
DEVICE_TOPICS_FILTER: Final = "devices/#"
DEVICE_SUBJECTS: Final = "devices.>"
#: Device topics that other parts use, not telemetry: the edge agent's ``state`` (twin-lite, reported)
#: and ``anomalies`` (scored readings sent ahead of their batch, which also carries them), and the
#: desired ``config`` it receives. The gateway acknowledges and ignores them.
DEVICE_SIDE_LEAVES: Final = frozenset({"state", "config", "anomalies"})
#: What an authenticated device may publish (``devices/{id}/<leaf>``; telemetry also with its encoding
#: suffix) and subscribe to (its desired config) at a door with per-device access control.
DEVICE_PUBLISH_LEAVES: Final = ("telemetry", "state", "anomalies", "jobs/+/update")
DEVICE_SUBSCRIBE_LEAVES: Final = ("config", "jobs/notify")

#: Bus topics (NATS subjects are ``{topic}.{partition}``; Kafka topics carry partitions natively).
READINGS_TOPIC: Final = "fm.readings"
DLQ_TOPIC: Final = "fm.dlq"
#: What devices publish to the embedded MQTT door, captured before the gateway forwards it (on NATS
#: the stream ``FM_INGEST``): all of ``devices.>``, so that a message on an unserved topic is
#: dead-lettered (``unknown_topic``) instead of vanishing unseen.
INGEST_TOPIC: Final = "fm.ingest"
INGEST_SUBJECTS: Final = (DEVICE_SUBJECTS,)
#: What the ingest stream captured before it took all of ``devices.>``.
OLD_INGEST_SUBJECTS: Final = (TELEMETRY_SUBJECTS, TELEMETRY_SUBJECTS + ".*")
#: The consumer group of the gateways that forward the ingest stream.
GATEWAY_GROUP: Final = "fm-gateway"


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


class TopicRoute(NamedTuple):
    """What a device topic is: ``telemetry`` (with its device and encoding suffix), ``side`` (a known
    non-telemetry device topic, see :data:`DEVICE_SIDE_LEAVES`) or ``unknown`` (not served)."""

    kind: Literal["telemetry", "side", "unknown"]
    device_id: str | None = None
    suffix: str | None = None


def route_of_topic(topic: str) -> TopicRoute:
    """Classify an MQTT topic: ``devices/{id}/telemetry[/<suffix>]`` is telemetry, with a valid device id.

    Anything else under ``devices/`` that is not a known side topic is ``unknown`` (so is a device id
    outside ``[A-Za-z0-9_-]{1,128}``, e.g. ``devices/../telemetry``).
    """
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != "devices" or not DEVICE_ID_RE.fullmatch(parts[1]):
        return TopicRoute("unknown")
    leaf = parts[2]
    if leaf == "telemetry":
        if len(parts) == 3:
            return TopicRoute("telemetry", parts[1])
        if len(parts) == 4 and parts[3]:
            return TopicRoute("telemetry", parts[1], parts[3])
    elif len(parts) == 3 and leaf in DEVICE_SIDE_LEAVES:
        return TopicRoute("side", parts[1])
    elif leaf == "jobs" and (parts[3:] == ["notify"] or (len(parts) == 5 and parts[3] and parts[4] == "update")):
        return TopicRoute("side", parts[1])  # jobs (docs/rollouts.md): the job controller reads them
    return TopicRoute("unknown", parts[1])


# nats-server's MQTT listener maps a topic to a subject (server/mqtt.go, mqttToNATSSubjectConversion):
# a ``/`` is ``.``, except that an empty level is kept as ``/`` beside the ``.`` (a leading ``/`` gives
# ``/.``, a ``/`` before another ``/`` or at the end gives ``./``, and a subject ending in ``.`` gets a
# ``/``), and a ``.`` inside a level is ``//``. natsSubjectToMQTTTopic reverses it; so do we.


def nats_subject_of_topic(topic: str) -> str:
    """The NATS subject nats-server's MQTT listener publishes an MQTT topic name on.

    Raises:
        ValueError: for what the listener refuses (wildcards, whitespace, DEL).
    """
    out: list[str] = []
    last = len(topic) - 1
    for i, ch in enumerate(topic):
        if ch == "/":
            if i == 0 or (out and out[-1][-1] == "."):
                out.append("/.")
            elif i == last or topic[i + 1] == "/":
                out.append("./")
            else:
                out.append(".")
        elif ch == ".":
            out.append("//")
        elif ch in "+#":
            raise ValueError(f"wildcards are not allowed in a topic name: {topic!r}")
        elif ch in " \t\n\r\f\x7f":
            raise ValueError(f"nats-server refuses whitespace and DEL in topics: {topic!r}")
        else:
            out.append(ch)
    subject = "".join(out)
    return subject + "/" if subject.endswith(".") else subject


def mqtt_topic_of_subject(subject: str) -> str:
    """The MQTT topic as published, from the subject nats-server's MQTT listener put it on.

    ``devices.////.telemetry`` is ``devices/../telemetry``; ``devices.x.telemetry`` is
    ``devices/x/telemetry``.
    """
    if "/" not in subject:
        return subject.replace(".", "/")  # the common case, and nothing to undo
    out: list[str] = []
    i, n = 0, len(subject)
    while i < n:
        ch = subject[i]
        if ch == "/":
            nxt = subject[i + 1] if i + 1 < n else ""
            if nxt == ".":
                out.append("/")
                i += 1
            elif nxt == "/":
                out.append(".")
                i += 1
            # a lone "/" only marks an empty level beside a "." that already gave its "/"
        elif ch == ".":
            out.append("/")
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def partition_for(device_id: str, partitions: int) -> int:
    """The bus partition of a device: stable across processes and versions (CRC-32)."""
    return zlib.crc32(device_id.encode()) % partitions
