"""The MQTT uplink: buffered batches -> compressed per-device batches -> broker, acknowledged by PUBACK.

Flow: read records from the :class:`~fieldmesh.edge.buffer.DiskBuffer` (linger until
``linger_ms`` passed or ``max_batch_readings`` gathered; a backlog fills batches at once), group
their readings per device, publish one ``{"device_id", "readings": [...]}`` per device with QoS 1
(zstd-compressed, announced by MQTT 5 content type ``application/json+zstd``, or by the topic
suffix ``devices/{id}/telemetry/zstd`` on MQTT 3.1.1), and advance the buffer only once every
message of a group (and of every earlier group) has its PUBACK. On a lost connection the in-flight
groups are forgotten and the buffer rewinds to its first unacknowledged record: delivery is
at-least-once, and downstream de-duplication by ``(device_id, boot_id, seq)`` makes it exactly
once in the store.

Connections: MQTT 5 first (``protocol: auto``), MQTT 3.1.1 when the broker refuses 5; TLS and
mutual TLS; capped exponential backoff with full jitter between tries; a broker refusing the
credentials is logged as such (state ``auth_failed``) and retried at the capped interval while the
agent keeps buffering. Each message carries a W3C ``traceparent`` user property (MQTT 5).

Traces (:mod:`fieldmesh.obs.tracing`, when an OTLP endpoint is configured): a buffer record keeps the
``traceparent`` of the batch it holds (written by the agent's ``edge.buffer`` span), so a record sent
after an outage, or by the next process after a restart, continues its original trace. Each message
gets an ``edge.uplink`` span, a child of its first record's context and linked to its other records';
its ``traceparent`` goes in the MQTT 5 user properties, or in ``meta.traceparent`` of the message's
first reading on MQTT 3.1.1. Without tracing, the user property is a fresh ``traceparent`` per group.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import secrets
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from fieldmesh.core.errors import MissingDependency
from fieldmesh.edge.buffer import DiskBuffer, Record
from fieldmesh.edge.config import UplinkConfig
from fieldmesh.edge.frame import WireBatch, WireReading
from fieldmesh.obs import tracing

__all__ = [
    "CONTENT_TYPE_ZSTD",
    "Uplink",
    "UplinkStats",
    "backoff_delays",
    "decode_record",
    "decode_record_traced",
    "encode_record",
    "encode_uplink_message",
    "publish_wire_bytes",
]

log = logging.getLogger("fieldmesh.edge.uplink")

CONTENT_TYPE_ZSTD: Final = "application/json+zstd"
CONTENT_TYPE_JSON: Final = "application/json"

_rec_encoder = msgspec.msgpack.Encoder()


class _TracedRecord(msgspec.Struct, gc=False):
    """A buffer record with its trace context (a msgpack map; a record without is the bare groups array)."""

    groups: list[tuple[str, list[WireReading]]]
    traceparent: str | None = None
    tracestate: str | None = None


_rec_decoder = msgspec.msgpack.Decoder(list[tuple[str, list[WireReading]]] | _TracedRecord)
_json = msgspec.json.Encoder()

# CONNACK reason codes (MQTT 5 and the 3.1.1 return codes as paho maps them)
_UNSUPPORTED_PROTOCOL: Final = {0x84, 1}
_BAD_CREDENTIALS: Final = {0x86, 0x87, 0x8C, 4, 5}


def encode_record(
    groups: list[tuple[str, list[WireReading]]], traceparent: str | None = None, tracestate: str | None = None
) -> bytes:
    """A buffer record: readings grouped by device (msgpack), with the trace context of their batch if any."""
    if traceparent is None:
        return _rec_encoder.encode(groups)
    return _rec_encoder.encode(_TracedRecord(groups, traceparent, tracestate))


def decode_record(payload: bytes) -> list[tuple[str, list[WireReading]]]:
    """Inverse of :func:`encode_record` (the groups; records written before trace context was kept too)."""
    return decode_record_traced(payload)[0]


def decode_record_traced(
    payload: bytes,
) -> tuple[list[tuple[str, list[WireReading]]], str | None, str | None]:
    """``(groups, traceparent, tracestate)`` of a buffer record (None, None: it has no trace context)."""
    rec = _rec_decoder.decode(payload)
    if isinstance(rec, _TracedRecord):
        return rec.groups, rec.traceparent, rec.tracestate
    return rec, None, None


def encode_uplink_message(
    device_id: str, readings: list[WireReading], compressor: Any, *, v5: bool = True
) -> tuple[str, bytes, str]:
    """``(topic, payload, content type)`` of one device's batch as the uplink publishes it."""
    body = _json.encode(WireBatch(device_id=device_id, readings=readings))
    if compressor is None:
        return f"devices/{device_id}/telemetry", body, CONTENT_TYPE_JSON
    topic = f"devices/{device_id}/telemetry" if v5 else f"devices/{device_id}/telemetry/zstd"
    return topic, compressor.compress(body), CONTENT_TYPE_ZSTD


def publish_wire_bytes(topic: str, payload: bytes, content_type: str | None, traceparent: bool) -> int:
    """Bytes of a QoS 1 PUBLISH on the wire (MQTT 5 properties when ``content_type`` is given)."""
    props = 0
    if content_type is not None:
        props = 1 + (3 + len(content_type)) + ((1 + 2 + 11 + 2 + 55) if traceparent else 0)
    rem = 2 + len(topic) + 2 + props + len(payload)
    header = 1 + (1 if rem < 128 else 2 if rem < 16384 else 3 if rem < 2097152 else 4)
    return header + rem


def backoff_delays(initial_s: float, cap_s: float, rng: random.Random | None = None) -> Any:
    """Capped exponential backoff with full jitter: ``uniform(0, min(cap, initial * 2**n))``."""
    r = rng or random.Random()
    n = 0
    while True:
        yield r.uniform(initial_s / 2, min(cap_s, initial_s * 2**n))
        n = min(n + 1, 30)


@dataclass(slots=True)
class UplinkStats:
    """Counters of the uplink."""

    state: str = "idle"
    protocol: str = ""
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    auth_failures: int = 0
    last_error: str = ""
    messages: int = 0
    readings_sent: int = 0
    readings_acked: int = 0
    bytes_payload: int = 0
    bytes_wire: int = 0
    anomalies: int = 0
    resent_groups: int = 0


@dataclass(slots=True)
class _Group:
    last_seq: int
    readings: int
    pending: set[int] = field(default_factory=set)
    sealed: bool = False


class _Refused(Exception):
    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code


class Uplink:
    """Drains the buffer to an MQTT broker.

    Args:
        cfg: the uplink config.
        buffer: the buffer to drain.
        subscriptions: topic filters to subscribe on every connection (the twin's).
        on_message: called in the event loop with ``(topic, payload)`` of subscribed messages.
    """

    def __init__(
        self,
        cfg: UplinkConfig,
        buffer: DiskBuffer,
        *,
        subscriptions: list[str] | None = None,
        on_message: Callable[[str, bytes], None] | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        try:
            import paho.mqtt.client  # noqa: F401
        except ImportError as exc:
            raise MissingDependency("paho-mqtt", "edge") from exc
        if cfg.compression == "zstd":
            try:
                import zstandard
            except ImportError as exc:
                raise MissingDependency("zstandard", "edge") from exc
            self._zc: Any = zstandard.ZstdCompressor(level=cfg.zstd_level)
        else:
            self._zc = None
        self.cfg = cfg
        self.buffer = buffer
        self.subscriptions = subscriptions or []
        self.on_message = on_message
        self.on_connect = on_connect
        self.stats = UplinkStats()
        self._client: Any = None
        self._v5: bool = cfg.protocol != "3.1.1"
        self._connected = asyncio.Event()
        self._data = asyncio.Event()
        self._acked = asyncio.Event()
        self._groups: deque[_Group] = deque()
        self._mids: dict[int, _Group] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session_lost: asyncio.Event = asyncio.Event()
        self._budget_until = 0.0
        self.client_id = cfg.client_id or f"fm-edge-{secrets.token_hex(4)}"

    # -- public ----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether a session is up."""
        return self._connected.is_set()

    def wake(self) -> None:
        """New data is in the buffer."""
        self._data.set()

    def publish_now(
        self, topic: str, payload: bytes, *, retain: bool = False, content_type: str | None = None
    ) -> bool:
        """Publish one message at once (QoS 1) when connected, ahead of batched data.

        Returns False when there is no session (the caller's data must be durable elsewhere).
        """
        client = self._client
        if client is None or not self._connected.is_set():
            return False
        props = self._props(content_type or CONTENT_TYPE_JSON)
        info = client.publish(topic, payload, qos=1, retain=retain, properties=props)
        return bool(info.rc == 0)

    def subscribe(self, topics: list[str]) -> bool:
        """Subscribe (QoS 1) to topic filters now; False when there is no session."""
        client = self._client
        if client is None or not self._connected.is_set() or not topics:
            return False
        for i in range(0, len(topics), 100):
            client.subscribe([(t, 1) for t in topics[i : i + 100]])
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, drain, reconnect, until ``stop`` is set."""
        self._loop = asyncio.get_running_loop()
        delays = backoff_delays(self.cfg.backoff_initial_ms / 1000, self.cfg.backoff_max_ms / 1000)
        while not stop.is_set():
            try:
                client = await self._connect()
            except _Refused as exc:
                self.stats.connect_failures += 1
                self.stats.last_error = str(exc)
                if exc.code in _BAD_CREDENTIALS:
                    self.stats.state = "auth_failed"
                    self.stats.auth_failures += 1
                    log.error(
                        "uplink: the broker %s:%s refused the credentials (%s); still buffering, retrying",
                        self.cfg.host,
                        self.cfg.port,
                        exc,
                    )
                    delay = self.cfg.backoff_max_ms / 1000
                else:
                    self.stats.state = "refused"
                    log.warning("uplink: connection refused: %s", exc)
                    delay = next(delays)
                await _sleep_or(stop, delay)
                continue
            except (OSError, TimeoutError, ssl.SSLError) as exc:
                self.stats.connect_failures += 1
                self.stats.state = "disconnected"
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                delay = next(delays)
                log.info(
                    "uplink: cannot reach %s:%s (%s); retry in %.2fs",
                    self.cfg.host,
                    self.cfg.port,
                    self.stats.last_error,
                    delay,
                )
                await _sleep_or(stop, delay)
                continue
            except Exception as exc:  # a bug or an odd library error: log it, keep buffering, retry
                self.stats.connect_failures += 1
                self.stats.state = "disconnected"
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("uplink: connection attempt failed unexpectedly")
                await _sleep_or(stop, self.cfg.backoff_max_ms / 1000)
                continue
            delays = backoff_delays(self.cfg.backoff_initial_ms / 1000, self.cfg.backoff_max_ms / 1000)
            try:
                await self._session(client, stop)
            finally:
                await self._teardown(client)

    # -- connection ------------------------------------------------------------------------
    def _props(self, content_type: str, trace: dict[str, str] | None = None) -> Any:
        if not self._v5:
            return None
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        p = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        p.ContentType = content_type
        if trace:
            p.UserProperty = list(trace.items())
        elif self.cfg.traceparent:
            p.UserProperty = [("traceparent", f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01")]
        return p

    def _make_client(self, v5: bool) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        kw: dict[str, Any] = {}
        if not v5:
            kw["clean_session"] = True
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            reconnect_on_failure=False,
            **kw,
        )
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        if self.cfg.username is not None:
            c.username_pw_set(
                self.cfg.username, self.cfg.password.get_secret_value() if self.cfg.password else None
            )
        tls = self.cfg.tls
        if tls is not None:
            c.tls_set(
                ca_certs=str(tls.ca) if tls.ca else None,
                certfile=str(tls.cert) if tls.cert else None,
                keyfile=str(tls.key) if tls.key else None,
                cert_reqs=ssl.CERT_NONE if tls.insecure else ssl.CERT_REQUIRED,
            )
            if tls.insecure:
                c.tls_insecure_set(True)
        loop = self._loop
        assert loop is not None
        connack: asyncio.Future[tuple[int, str]] = loop.create_future()

        def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
            code = int(getattr(rc, "value", rc))
            loop.call_soon_threadsafe(_set_result, connack, (code, str(rc)))

        def on_disconnect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
            loop.call_soon_threadsafe(self._lost, client, str(rc))
            loop.call_soon_threadsafe(
                _set_exception, connack, ConnectionError(f"closed before CONNACK: {rc}")
            )

        def on_publish(client: Any, userdata: Any, mid: int, rc: Any, props: Any = None) -> None:
            code = int(getattr(rc, "value", rc) or 0)
            loop.call_soon_threadsafe(self._puback, client, mid, code)

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            if self.on_message is not None:
                loop.call_soon_threadsafe(self.on_message, msg.topic, bytes(msg.payload))

        c.on_connect = on_connect
        c.on_disconnect = on_disconnect
        c.on_publish = on_publish
        c.on_message = on_message
        c._fm_connack = connack  # type: ignore[attr-defined]
        return c

    async def _connect(self) -> Any:
        try:
            return await self._connect_attempts()
        except BaseException:
            if self.cfg.protocol == "auto":
                self._v5 = True  # a failed fallback must not pin 3.1.1: try 5 first next time
            raise

    async def _connect_attempts(self) -> Any:
        loop = self._loop
        assert loop is not None
        attempts = [self._v5] if self.cfg.protocol != "auto" else ([True, False] if self._v5 else [False])
        last: Exception | None = None
        for v5 in attempts:
            self._v5 = v5
            self.stats.state = "connecting"
            client = self._make_client(v5)
            kw: dict[str, Any] = {"keepalive": self.cfg.keepalive_s}
            if v5:
                kw["clean_start"] = True
            connect = functools.partial(client.connect, self.cfg.host, self.cfg.port, **kw)
            await loop.run_in_executor(None, connect)
            client.loop_start()
            try:
                code, text = await asyncio.wait_for(client._fm_connack, timeout=10)
            except (ConnectionError, TimeoutError) as exc:
                await self._stop_client(client)
                last = exc
                if v5 and self.cfg.protocol == "auto":
                    log.info("uplink: broker closed an MQTT 5 connection (%s); trying MQTT 3.1.1", exc)
                    continue
                raise OSError(str(exc)) from exc
            if code == 0:
                self.stats.protocol = "5" if v5 else "3.1.1"
                return client
            await self._stop_client(client)
            if code in _UNSUPPORTED_PROTOCOL and v5 and self.cfg.protocol == "auto":
                log.info("uplink: broker refused MQTT 5 (%s); falling back to MQTT 3.1.1", text)
                last = _Refused(code, text)
                continue
            raise _Refused(code, f"CONNACK {code:#x}: {text}")
        if isinstance(last, _Refused):
            raise last
        raise OSError(str(last))

    async def _stop_client(self, client: Any) -> None:
        loop = self._loop
        assert loop is not None
        with contextlib.suppress(Exception):
            client.disconnect()
        await loop.run_in_executor(None, client.loop_stop)

    async def _teardown(self, client: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self._client = None
        if self._groups:
            self.stats.resent_groups += len(self._groups)
        self._groups.clear()
        self._mids.clear()
        self.buffer.rewind()
        await self._stop_client(client)
        if was:
            self.stats.disconnects += 1
            self.stats.state = "disconnected"

    def _lost(self, client: Any, reason: str) -> None:
        if client is self._client:
            self.stats.last_error = f"disconnected: {reason}"
            self._session_lost.set()

    # -- session ---------------------------------------------------------------------------
    async def _session(self, client: Any, stop: asyncio.Event) -> None:
        self._client = client
        self._session_lost = asyncio.Event()
        self._connected.set()
        self.stats.connects += 1
        self.stats.state = "connected"
        log.info("uplink: connected to %s:%s (MQTT %s)", self.cfg.host, self.cfg.port, self.stats.protocol)
        self.subscribe(self.subscriptions)
        if self.on_connect is not None:
            self.on_connect()
        self.buffer.rewind()
        linger = self.cfg.linger_ms / 1000
        max_batch = self.cfg.max_batch_readings
        acc: list[Record] = []
        acc_n = 0
        t_first = 0.0
        while not stop.is_set() and not self._session_lost.is_set():
            if len(self._groups) >= self.cfg.max_inflight_groups:
                self._acked.clear()
                await _wait_any([self._acked, self._session_lost, stop], 1.0)
                continue
            recs = (
                self.buffer.read(max_records=100_000, max_readings=max_batch - acc_n)
                if acc_n < max_batch
                else []
            )
            if recs:
                if not acc:
                    t_first = time.monotonic()
                acc.extend(recs)
                acc_n += sum(r.count for r in recs)
            now = time.monotonic()
            # no lingering while the buffer is half full: space matters more than batch size then
            pressed = self.buffer.size_bytes * 2 >= self.buffer.max_bytes
            if acc and (acc_n >= max_batch or now - t_first >= linger or stop.is_set() or pressed):
                if self.cfg.max_readings_per_s is not None:
                    # token bucket: a group may go once the budget of the previous ones is spent
                    wait = self._budget_until - now
                    if wait > 0:
                        await _wait_any([self._session_lost, stop], wait)
                        continue
                    self._budget_until = max(self._budget_until, now) + acc_n / self.cfg.max_readings_per_s
                if not self._publish_group(client, acc, acc_n):
                    break
                acc, acc_n = [], 0
                await asyncio.sleep(0)
                continue
            if recs and acc_n < max_batch:
                continue
            self._data.clear()
            if self.buffer.has_unread():
                continue
            timeout = max(0.0, linger - (now - t_first)) if acc else 1.0
            await _wait_any([self._data, self._session_lost, stop], timeout)

    def _publish_group(self, client: Any, recs: list[Record], n: int) -> bool:
        per_dev: dict[str, list[WireReading]] = {}
        traced = tracing.enabled() and self.cfg.traceparent
        ctxs: dict[str, list[tuple[str, str | None]]] = {}  # device -> trace contexts of the records it is in
        for r in recs:
            groups, tp, ts = decode_record_traced(r.payload)
            for dev, readings in groups:
                lst = per_dev.get(dev)
                if lst is None:
                    per_dev[dev] = readings
                else:
                    lst.extend(readings)
                if tp is not None and traced:
                    ctxs.setdefault(dev, []).append((tp, ts))
        g = _Group(last_seq=recs[-1].seq, readings=n)
        self._groups.append(g)
        # untraced: one set of properties (and one traceparent) per group of messages
        props_by_ct: dict[str, Any] = {}
        for dev, readings in per_dev.items():
            if traced:
                info, topic, body, ct = self._publish_traced(client, dev, readings, ctxs.get(dev, []))
            else:
                topic, body, ct = encode_uplink_message(dev, readings, self._zc, v5=self._v5)
                props = props_by_ct.get(ct)
                if props is None:
                    props = props_by_ct[ct] = self._props(ct)
                info = client.publish(topic, body, qos=1, properties=props)
            if info.rc != 0:
                self.stats.last_error = f"publish failed rc={info.rc}"
                self._session_lost.set()
                return False
            g.pending.add(info.mid)
            self._mids[info.mid] = g
            self.stats.messages += 1
            self.stats.bytes_payload += len(body)
            # fixed header (<=5) + topic length prefix + packet id + properties (approx.)
            self.stats.bytes_wire += (
                len(body) + len(topic) + 2 + 2 + 5 + (len(ct) + 3 + 70 if self._v5 else 0)
            )
        self.stats.readings_sent += n
        g.sealed = True
        self._advance()
        return True

    def _publish_traced(
        self, client: Any, dev: str, readings: list[WireReading], ctxs: list[tuple[str, str | None]]
    ) -> tuple[Any, str, bytes, str]:
        """Publish one device's message inside its ``edge.uplink`` span, carrying that span's context."""
        with tracing.batch_span("fieldmesh.edge", "edge.uplink", (tracing.context_of(*c) for c in ctxs),
                                {"fieldmesh.device_id": dev, "fieldmesh.readings": len(readings),
                                 "messaging.system": "mqtt"}):
            trace = tracing.headers_of_current()
            if not self._v5 and readings:  # MQTT 3.1.1 has no properties: the first reading's meta carries it
                first = readings[0]
                first.meta = {**(first.meta or {}), **trace}
            topic, body, ct = encode_uplink_message(dev, readings, self._zc, v5=self._v5)
            info = client.publish(topic, body, qos=1, properties=self._props(ct, trace))
            return info, topic, body, ct

    def _puback(self, client: Any, mid: int, code: int) -> None:
        if client is not self._client:
            return
        if code >= 0x80:
            # the broker refused the message: do not advance; resend after a reconnect
            self.stats.last_error = f"PUBACK reason {code:#x}"
            log.warning("uplink: broker refused a message (PUBACK %#x); reconnecting", code)
            self._session_lost.set()
            return
        g = self._mids.pop(mid, None)
        if g is None:
            return
        g.pending.discard(mid)
        self._advance()

    def _advance(self) -> None:
        last = None
        while self._groups and self._groups[0].sealed and not self._groups[0].pending:
            g = self._groups.popleft()
            self.stats.readings_acked += g.readings
            last = g.last_seq
        if last is not None:
            self.buffer.ack(last)
            self._acked.set()


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


async def _sleep_or(ev: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ev.wait(), timeout=delay)


async def _wait_any(events: list[asyncio.Event], timeout: float) -> None:
    if any(e.is_set() for e in events):
        return
    tasks = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
