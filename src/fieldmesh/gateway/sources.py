"""Ingest sources: the embedded NATS MQTT listener's stream, and an external MQTT broker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlparse

import msgspec

from fieldmesh.bus.base import Bus, Consumer, IngestSpec
from fieldmesh.core.errors import BackendUnavailable, ConfigError
from fieldmesh.core.topics import (
    DEVICE_TOPICS_FILTER,
    GATEWAY_GROUP,
    INGEST_SUBJECTS,
    INGEST_TOPIC,
    OLD_INGEST_SUBJECTS,
    mqtt_topic_of_subject,
)
from fieldmesh.gateway.base import IngestMessage, schema_id_of, trace_of
from fieldmesh.obs import tracing

__all__ = ["MqttSource", "NatsIngestSource", "ingest_spec"]

log = logging.getLogger(__name__)


def ingest_spec(retention_s: int = 7 * 86400) -> IngestSpec:
    """The embedded ingest stream: ``devices.>``; a consumer made before it took all of ``devices.>``
    resumes after what it acknowledged."""
    return IngestSpec(INGEST_TOPIC, INGEST_SUBJECTS, retention_s=retention_s, resume_from=OLD_INGEST_SUBJECTS)


class NatsIngestSource:
    """Device messages captured by the ingest stream (``fm.ingest``, on NATS ``FM_INGEST``; embedded mode).

    Devices publish over MQTT to nats-server's MQTT listener; their messages land on the subjects
    ``devices.<id>.telemetry`` (and ``devices.>``) which the stream captures durably. Each message's
    topic is given back as published (nats-server's subject mapping undone, ``.`` and empty levels
    included). Several gateways may fetch from
    the one durable consumer (explicit acks); JetStream hands each message to one of them. A
    ``sole`` gateway (``fieldmesh up``) uses ack-all, one ack per batch, and the bus trims what it
    has acknowledged about once a second; otherwise the stream's age limit removes old messages.
    """

    name = "nats-ingest"

    def __init__(
        self, bus: Bus, *, durable: str = GATEWAY_GROUP, retention_s: int = 7 * 86400, sole: bool = False
    ) -> None:
        self._bus = bus
        self._sole = sole
        self._durable = durable
        self._retention_s = retention_s
        self._consumer: Consumer | None = None

    async def start(self) -> None:
        """Create the stream and the durable consumer (one made before the stream took all of
        ``devices.>`` resumes after what it acknowledged)."""
        self._consumer = await self._bus.ingest(ingest_spec(self._retention_s), group=self._durable, sole=self._sole)

    async def fetch(self, max_messages: int, timeout_s: float, *, max_bytes: int | None = None) -> list[IngestMessage]:
        """Fetch raw device messages, with their topics as published."""
        assert self._consumer is not None, "start() first"
        recs = await self._consumer.fetch(max_messages, timeout_s, max_bytes=max_bytes)
        msgs = self._messages(recs)
        if tracing.enabled():  # trace context in the headers of a NATS publisher (MQTT 3.1.1 has none)
            for i, r in enumerate(recs):
                tp, ts = trace_of(r.headers)
                if tp:
                    msgs[i] = msgspec.structs.replace(msgs[i], traceparent=tp, tracestate=ts)
        return msgs

    @staticmethod
    def _messages(recs: list[Any]) -> list[IngestMessage]:
        return [
            IngestMessage(
                topic=mqtt_topic_of_subject(r.subject),
                payload=r.value,
                received_ms=r.timestamp_ms,
                # a message naming a schema (header schema_id) has a content type: off the bulk JSON path
                content_type=(r.headers.get("Content-Type") or ("application/octet-stream" if sid is not None
                                                                else None)) if r.headers else None,
                source_id=f"i{r.offset}",
                handle=r,
                schema_id=sid,
            )
            for r in recs
            for sid in (schema_id_of(r.headers) if r.headers else None,)
        ]

    async def ack(self, messages: Sequence[IngestMessage]) -> None:
        """Acknowledge the messages (a sole gateway's bus also trims what it acknowledged)."""
        assert self._consumer is not None, "start() first"
        await self._consumer.ack([m.handle for m in messages])

    async def close(self) -> None:
        """Stop fetching."""
        if self._consumer is not None:
            await self._consumer.close()

    async def pending(self) -> int:
        """Messages not yet taken through the gateway."""
        return int(await self._bus.pending(INGEST_TOPIC, group=self._durable))


#: A PUBACK without reason code or properties (MQTT 3.1.1 and 5: success): fixed header, length 2, packet id.
_PUBACK = struct.Struct("!BBH")
#: Packets paho handles per read of the socket before it looks at its timers and writes again.
_READ_BURST = 1000


class _BufferedSocket:
    """The gateway's MQTT socket as paho reads it, 64 KiB per system call instead of three per packet.

    paho reads a packet with ``recv(1)`` for its type, ``recv(1)`` per byte of its length, then
    ``recv(n)`` for the rest, and calls ``select`` between packets: about five system calls per
    one-reading message. This serves those reads from one large ``recv`` and reports what it holds
    through ``pending()``, which paho already asks of a TLS socket, so that it parses on without
    waiting in ``select``. Everything else (``send``, ``fileno``, ``close``...) is the socket's.
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        """Up to ``n`` bytes; raises BlockingIOError (nothing to read) and returns b"" (closed) as the socket does."""
        if self._pos >= len(self._buf):
            data: bytes = self._sock.recv(max(n, 65536))
            if len(data) <= n:
                return data
            self._buf, self._pos = data, 0
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def pending(self) -> int:
        """Bytes read from the socket (or held by TLS) that paho has not taken yet."""
        inner = getattr(self._sock, "pending", None)
        return len(self._buf) - self._pos + (inner() if inner is not None else 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _client_class() -> type[Any]:
    """paho's Client with buffered reads (:class:`_BufferedSocket`), a read loop that parses every
    packet already read before it goes back to ``select``, and a short path for the common PUBLISH.

    The short path: a QoS 1 PUBLISH without MQTT 5 properties (what the broker forwards from a
    device that set none) goes straight to ``on_plain_publish(topic, payload, packet id)``. paho's
    own path builds a ``Properties`` object and an ``MQTTMessage`` per message, over half of its
    time per one-reading message; every other packet (properties, QoS 0 or 2, a topic that is not
    UTF-8) takes paho's path and ``on_message``.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import MQTTErrorCode

    success = MQTTErrorCode.MQTT_ERR_SUCCESS
    v5 = mqtt.MQTTv5

    class Client(mqtt.Client):
        on_plain_publish: Callable[[str, bytes, int], None] | None = None

        def _handle_publish(self) -> MQTTErrorCode:
            handler = self.on_plain_publish
            packet = self._in_packet["packet"]
            if handler is None or self._in_packet["command"] & 0x06 != 0x02:  # not QoS 1
                return super()._handle_publish()
            end = 2 + int.from_bytes(packet[:2], "big")  # after the topic
            if self._protocol == v5:
                if len(packet) < end + 3 or packet[end + 2] != 0:  # properties: paho's path
                    return super()._handle_publish()
                start = end + 3
            else:
                start = end + 2
                if len(packet) < start:
                    return super()._handle_publish()
            try:
                topic = packet[2:end].decode()
            except UnicodeDecodeError:
                return super()._handle_publish()
            handler(topic, bytes(packet[start:]), int.from_bytes(packet[end : end + 2], "big"))
            return success

        def _create_socket(self) -> Any:
            return _BufferedSocket(super()._create_socket())

        def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
            rc = super().loop_read(max_packets)
            for _ in range(_READ_BURST):
                sock: Any = self._sock
                if rc != success or sock is None or not sock.pending():
                    break
                rc = super().loop_read(max_packets)
            return rc

    return Client


def _schema_id(user_properties: Any) -> int | None:
    """The ``schema_id`` MQTT 5 user property (a registered schema's id), if any; -1 when not a number
    (the gateway then finds no such schema: ``unknown_schema``)."""
    for k, v in user_properties or ():
        if k == "schema_id":
            return int(v) if v.isascii() and v.isdigit() and len(v) < 11 else -1
    return None


class MqttSource:
    """An external MQTT broker (Mosquitto, EMQX, HiveMQ...), MQTT 5 with a shared subscription.

    The session is persistent (clean start off, session expiry), subscriptions are QoS 1 and the
    PUBACK is sent only after :meth:`ack`, i.e. after the bus acknowledged the derived records. With
    ``$share/<group>/...`` several gateways split the devices' messages. A broker that refuses
    MQTT 5 gets MQTT 3.1.1 with a plain subscription (then run a single gateway per broker).

    Bursts: a broker sends a subscriber at most its in-flight window of unacknowledged QoS 1
    messages and queues the rest up to a limit, beyond which it drops (Mosquitto:
    ``max_queued_messages``, 1000 as shipped). The CONNECT property Receive Maximum sets that
    window for an MQTT 5 client (Mosquitto uses it instead of its ``max_inflight_messages``, 20
    as shipped), so a large ``receive_maximum`` moves a burst out of the broker's bounded queue
    into this gateway, which holds it in memory until the bus has it, then PUBACKs each message.

    Per message, paho's network thread parses the packet and calls :meth:`_on_message`, which only
    appends to a deque; the event loop is woken once per burst (when :meth:`fetch` waits), not once per
    message. The PUBACKs of a batch go out as one write (:meth:`ack`). Each message carries the
    connection it came on: after a reconnect the broker sends again what was not acknowledged, and
    the acknowledgements meant for the old connection are dropped rather than sent on the new one,
    where the same packet id may name another message.
    """

    name = "mqtt"

    def __init__(
        self,
        url: str,
        *,
        client_id: str | None = None,
        share_group: str | None = "fieldmesh",
        session_expiry_s: int = 86400,
        receive_maximum: int = 65535,
        max_inflight: int = 1000,
    ) -> None:
        u = urlparse(url)
        if u.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(f"bad MQTT URL {url!r}: use mqtt://host:1883 or mqtts://host:8883", key="mqtt_url")
        if not 1 <= receive_maximum <= 65535:
            raise ConfigError(f"MQTT receive maximum {receive_maximum} is outside 1..65535",
                              key="gateway.receive_maximum")
        self.url = url
        self._host = u.hostname or "127.0.0.1"
        self._port = u.port or (8883 if u.scheme in ("mqtts", "ssl") else 1883)
        self._tls = u.scheme in ("mqtts", "ssl")
        self._user = u.username
        self._password = u.password
        self._client_id = client_id or f"fieldmesh-gw-{uuid.uuid4().hex[:8]}"
        self._share = share_group
        self._expiry = session_expiry_s
        self._receive_maximum = receive_maximum
        self._max_inflight = max_inflight
        self._inbox: deque[IngestMessage] = deque()
        self._ready = asyncio.Event()
        self._waiting = False  # fetch() waits on _ready: the next message wakes the event loop
        self._generation = 0  # the connection messages arrive on (bumped at every CONNACK)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._connect_error: str | None = None
        self.protocol = "5"
        #: What the broker told us at connect and subscribe time that limits bursts (see :meth:`warnings`).
        self.broker: dict[str, Any] = {}
        self._warned: set[str] = set()

    @property
    def client_id(self) -> str:
        """The MQTT client id (its session lives at the broker under this id)."""
        return self._client_id

    @staticmethod
    def filters(share_group: str | None, protocol: str = "5") -> list[str]:
        """The topic filters the gateway subscribes to (shared when MQTT 5 and a group is given).

        All of ``devices/#``: an unserved topic is dead-lettered (``unknown_topic``), never dropped unseen.
        """
        base = [DEVICE_TOPICS_FILTER]
        if share_group and protocol == "5":
            return [f"$share/{share_group}/{f}" for f in base]
        return base

    def _filters(self) -> list[str]:
        return self.filters(self._share, self.protocol)

    async def start(self) -> None:
        """Connect (MQTT 5, falling back to 3.1.1) and subscribe; log what limits bursts."""
        import paho.mqtt.client as mqtt

        self._loop = asyncio.get_running_loop()
        for proto in (mqtt.MQTTv5, mqtt.MQTTv311):
            self.protocol = "5" if proto == mqtt.MQTTv5 else "3.1.1"
            self._connected.clear()
            self._subscribed.clear()
            self._connect_error = None
            ok = await asyncio.to_thread(self._connect, mqtt, proto)
            if ok:
                # "running" means subscribed: the SUBACK also says whether a filter was refused
                if not await asyncio.to_thread(self._subscribed.wait, 10):
                    log.warning("MQTT broker %s:%s sent no SUBACK within 10 s", self._host, self._port)
                self._warn_once()
                return
            if self._connect_error and "protocol" not in self._connect_error.lower():
                break
        raise BackendUnavailable(f"cannot connect to MQTT broker {self._host}:{self._port}: {self._connect_error}")

    def warnings(self) -> list[str]:
        """What this broker connection says about lost bursts, one sentence each (empty when fine)."""
        out = []
        where = f"MQTT broker {self._host}:{self._port}"
        if self.protocol != "5":
            out.append(f"{where} refused MQTT 5: the gateway uses MQTT 3.1.1, so no shared subscription (run "
                       "one gateway per broker) and no Receive Maximum: the broker's own in-flight and queue "
                       "limits (Mosquitto max_inflight_messages/max_queued_messages) bound a burst; raise them "
                       "(docs/operations.md)")
        if self.broker.get("shared_subscription_available") == 0 and self._share:
            out.append(f"{where} has no shared subscriptions: run one gateway per broker")
        rm = self.broker.get("broker_receive_maximum")
        if rm is not None and rm <= 20:
            out.append(f"{where} announces Receive Maximum {rm}: it looks like stock settings "
                       f"(Mosquitto max_inflight_messages {rm}); while this gateway is disconnected the broker "
                       "keeps at most its max_queued_messages (Mosquitto: 1000 as shipped) for it and drops "
                       "the rest: raise them (docs/operations.md)")
        exp = self.broker.get("session_expiry_s")
        if self.protocol == "5" and exp is not None and exp < self._expiry:
            out.append(f"{where} shortened the session expiry to {exp} s (asked {self._expiry} s): messages "
                       "sent while the gateway is down longer than that are dropped by the broker")
        refused = self.broker.get("refused_subscriptions")
        if refused:
            out.append(f"{where} refused the subscriptions {refused}: nothing arrives on them")
        return out

    def _warn_once(self) -> None:
        for w in self.warnings():
            if w not in self._warned:
                self._warned.add(w)
                log.warning("%s", w)

    def _connect(self, mqtt: Any, proto: int) -> bool:
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        kw: dict[str, Any] = {"protocol": proto, "client_id": self._client_id}
        if proto != mqtt.MQTTv5:
            kw["clean_session"] = self._expiry == 0
        c = _client_class()(CallbackAPIVersion.VERSION2, **kw)
        c.on_plain_publish = self._on_plain_publish
        c.manual_ack_set(True)
        c.max_inflight_messages_set(self._max_inflight)
        c.max_queued_messages_set(0)
        c.reconnect_delay_set(1, 10)  # a restarted broker (e.g. up's supervised door) is back within seconds
        if self._user:
            c.username_pw_set(self._user, self._password)
        if self._tls:
            c.tls_set()
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        props = None
        if proto == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._expiry
            # The broker's window of unacknowledged messages to us: without it Mosquitto uses its
            # max_inflight_messages (20) and a burst waits in its bounded queue (see the class doc).
            props.ReceiveMaximum = self._receive_maximum
        try:
            if proto == mqtt.MQTTv5:
                c.connect(self._host, self._port, keepalive=30, clean_start=self._expiry == 0, properties=props)
            else:
                c.connect(self._host, self._port, keepalive=30)
        except OSError as exc:
            self._connect_error = repr(exc)
            return False
        c.loop_start()
        if not self._connected.wait(10) or self._connect_error:
            self._connect_error = self._connect_error or "no CONNACK within 10 s"
            c.loop_stop()
            with contextlib.suppress(Exception):
                c.disconnect()
            return False
        self._client = c
        return True

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if rc.is_failure:
            self._connect_error = str(rc)
        else:
            if props is not None:
                for attr, key in (("ReceiveMaximum", "broker_receive_maximum"),
                                  ("SessionExpiryInterval", "session_expiry_s"),
                                  ("SharedSubscriptionAvailable", "shared_subscription_available"),
                                  ("MaximumQoS", "maximum_qos")):
                    if hasattr(props, attr):
                        self.broker[key] = getattr(props, attr)
            self.broker["session_present"] = bool(getattr(flags, "session_present", False))
            self._generation += 1
            client.subscribe([(f, 1) for f in self._filters()])
            log.info("gateway connected to MQTT %s:%s as %s (MQTT %s, receive maximum %s, session present %s)",
                     self._host, self._port, self._client_id, self.protocol,
                     self._receive_maximum if self.protocol == "5" else "n/a", self.broker["session_present"])
        self._connected.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any = None) -> None:
        filters = self._filters()
        refused = [f"{f} ({c})" for f, c in zip(filters, codes, strict=False) if getattr(c, "is_failure", False)]
        self.broker["refused_subscriptions"] = refused
        if refused and self._subscribed.is_set():  # at start, warnings() names them
            log.warning("MQTT broker %s:%s refused the subscriptions %s", self._host, self._port, refused)
        self._subscribed.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        log.warning("MQTT connection lost (%s); paho reconnects", rc)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        props = msg.properties
        ct = getattr(props, "ContentType", None) if props else None
        sid = _schema_id(getattr(props, "UserProperty", None)) if props else None
        tp, ts = trace_of(getattr(props, "UserProperty", None)) if props and tracing.enabled() else (None, None)
        self._inbox.append(IngestMessage(
            topic=msg.topic,
            payload=msg.payload,
            received_ms=int(time.time() * 1000),
            content_type=ct or ("application/octet-stream" if sid is not None else None),
            handle=(msg.mid, msg.qos, self._generation),
            schema_id=sid,
            traceparent=tp,
            tracestate=ts,
        ))
        self._wake()

    def _on_plain_publish(self, topic: str, payload: bytes, mid: int) -> None:
        """A QoS 1 message without properties (paho's network thread, its short path)."""
        self._inbox.append(IngestMessage(topic=topic, payload=payload, received_ms=int(time.time() * 1000),
                                         handle=(mid, 1, self._generation)))
        self._wake()

    def _wake(self) -> None:
        if self._waiting:  # read after the append: fetch() sets it before it looks at the deque
            self._waiting = False
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._ready.set)

    async def fetch(self, max_messages: int, timeout_s: float, *, max_bytes: int | None = None) -> list[IngestMessage]:
        """Wait up to ``timeout_s`` for a first message, then take what is queued (up to ``max_bytes`` of
        payloads, the first message always)."""
        inbox = self._inbox
        if not inbox:
            self._ready.clear()
            self._waiting = True
            if not inbox:  # a message appended before the flag was set found no one waiting
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready.wait(), timeout_s)
            self._waiting = False
        n = min(max_messages, len(inbox))
        if max_bytes is None or not n:
            return [inbox.popleft() for _ in range(n)]
        out = [inbox.popleft()]
        size = len(out[0].payload)
        while len(out) < n and (size := size + len(inbox[0].payload)) <= max_bytes:
            out.append(inbox.popleft())
        return out

    async def ack(self, messages: Sequence[IngestMessage]) -> None:
        """Send the PUBACKs of a batch the bus has acknowledged, in the order received, as one write.

        MQTT has no cumulative ack, so every message gets its own PUBACK; they are queued to paho's
        network thread as one buffer (one wake-up, one ``send``) rather than one each. Messages of an
        earlier connection are not acknowledged: the broker has sent them again on this one.
        """
        client = self._client
        if client is None:
            return
        gen = self._generation
        mids = [m.handle[0] for m in messages if m.handle[1] > 0 and m.handle[2] == gen]
        if not mids:
            return
        queue = getattr(client, "_packet_queue", None)
        if queue is None:  # a paho without it: one ack() per message, as its API offers
            for mid in mids:
                client.ack(mid, 1)
            return
        from paho.mqtt.client import PUBACK

        queue(PUBACK, b"".join([_PUBACK.pack(PUBACK, 2, mid) for mid in mids]), 0, 0)

    async def close(self) -> None:
        """Disconnect (the persistent session keeps un-acked messages at the broker)."""
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None

    async def pending(self) -> int:
        """Messages received but not yet processed."""
        return len(self._inbox)
