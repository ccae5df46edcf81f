"""The twin service: devices' twins over MQTT, next to the store that keeps them (docs/twins.md).

It connects to the MQTT door as one client (a persistent session, so that reports sent while it is
down wait for it at the broker) and:

- takes ``devices/{id}/twin/reported``: ``{"state": {...}, "client_token"?: str, "version"?: int}``,
  a merge patch of the reported document (``version``: refused unless the twin is at it); answers on
  ``devices/{id}/twin/delta`` with ``status`` ``accepted`` (and the delta now) or ``rejected``
  (``code`` 400, 409 or 413, ``error``), echoing ``client_token``;
- takes ``devices/{id}/twin/get`` (any payload, ``{"client_token"}`` echoed) and answers on
  ``devices/{id}/twin/delta`` with ``status`` ``get``, the delta and the whole desired document;
- follows desired changes made through the API (the store's change sequence, polled) and publishes
  each on ``devices/{id}/twin/desired`` (the whole document) and ``devices/{id}/twin/delta`` (status
  ``desired``). At start it publishes the delta of every twin that has one, for changes made while
  it was down.

A device that was offline sends ``get`` when it connects and converges from the answer; one whose
report got no answer sends it again (the edge agent does both: :mod:`fieldmesh.edge.twin`).
Every message is counted (:class:`TwinServiceStats`): bad ones (not JSON, no ``state``, past the
limits) are answered ``rejected`` and counted by reason, never dropped silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from fieldmesh.core.errors import BackendError, ConfigError, ConflictError, MissingDependency
from fieldmesh.core.twins import Twin, TwinTooLarge, device_of_twin_topic, twin_topic
from fieldmesh.store.twins import TwinStore

__all__ = ["TwinService", "TwinServiceStats", "mqtt_params"]

log = logging.getLogger("fieldmesh.twins")

#: What the service subscribes to.
FILTERS = ("devices/+/twin/reported", "devices/+/twin/get")


@dataclass
class TwinServiceStats:
    """Counters of the twin service since it started."""

    reported: int = 0
    gets: int = 0
    desired_published: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    store_errors: int = 0
    connects: int = 0
    state: str = "idle"


def mqtt_params(url: str, auth_file: str | None = None) -> dict[str, Any]:
    """``host``, ``port``, ``username``, ``password``, ``tls`` (an SSLContext or None) of ``mqtt[s]://``.

    The password comes from the URL or, better, from ``auth_file`` (JSON ``{"user", "password"}``);
    ``?ca=PATH`` names the CA of an ``mqtts://`` broker.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"bad MQTT URL {url!r}: use mqtt://host:port or mqtts://host:port", key="mqtt_url")
    q = dict(parse_qsl(parts.query))
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    if auth_file:
        try:
            doc = json.loads(Path(auth_file).read_text())
            user, password = str(doc["user"]), str(doc["password"])
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"mqtt auth file {auth_file}: cannot read a user and password ({exc})",
                              key="mqtt_auth_file") from None
    tls = None
    if parts.scheme == "mqtts":
        tls = ssl.create_default_context(cafile=q.get("ca"))
    return {"host": parts.hostname or "127.0.0.1", "port": parts.port or (8883 if tls else 1883),
            "username": user, "password": password, "tls": tls}


class TwinService:
    """Serves twins over MQTT from ``store``.

    Args:
        store: the twin store.
        mqtt_url: the door (``mqtt://host:port``; ``mqtts://`` with ``?ca=``).
        auth_file: JSON ``{"user", "password"}`` for the broker (kept off command lines).
        client_id: a stable id, so the broker keeps the session (and reports queued for it).
        poll_s: how often the store's change sequence is read for desired changes.
        max_batch: the most reports applied in one transaction (those that arrived while the last ones were
            applied).
        stats_path: where its counters are written (JSON, atomically, when they change), for the API's
            ``/stats`` and ``/metrics``.
    """

    def __init__(self, *, store: TwinStore, mqtt_url: str, auth_file: str | None = None,
                 client_id: str | None = None, poll_s: float = 0.2, stats_path: Path | None = None,
                 max_batch: int = 500) -> None:
        try:
            import paho.mqtt.client  # noqa: F401
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise MissingDependency("paho-mqtt", "edge") from exc
        self.store = store
        self.params = mqtt_params(mqtt_url, auth_file)
        self.client_id = client_id or f"fm-twins-{secrets.token_hex(4)}"
        self.poll_s = poll_s
        self.max_batch = max_batch
        self.stats_path = stats_path
        self.stats = TwinServiceStats()
        self._written_stats = ""
        self._client: Any = None
        self._queue: asyncio.Queue[tuple[str, bytes]] | None = None
        self._connected = asyncio.Event()
        self._last_seq = 0
        #: Called after each message is handled (tests, bench).
        self.on_handled: Callable[[str, str], None] | None = None

    # -- MQTT ---------------------------------------------------------------------------------
    def _connect(self, loop: asyncio.AbstractEventLoop) -> Any:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False,
                        protocol=mqtt.MQTTv311)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        p = self.params
        if p["username"]:
            c.username_pw_set(p["username"], p["password"])
        if p["tls"] is not None:
            c.tls_set_context(p["tls"])
        c.reconnect_delay_set(1, 10)
        queue = self._queue
        assert queue is not None

        def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
            if rc == 0:
                client.subscribe([(f, 1) for f in FILTERS])
                self.stats.connects += 1
                self.stats.state = "connected"
                loop.call_soon_threadsafe(self._connected.set)
                log.info("twins: connected to %s:%s", p["host"], p["port"])
            else:
                self.stats.state = f"refused: {rc}"
                log.error("twins: the broker refused the connection: %s", rc)

        def on_disconnect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
            self.stats.state = "disconnected"
            loop.call_soon_threadsafe(self._connected.clear)

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (msg.topic, bytes(msg.payload)))

        c.on_connect = on_connect
        c.on_disconnect = on_disconnect
        c.on_message = on_message
        c.connect_async(p["host"], p["port"], keepalive=30)
        c.loop_start()
        return c

    def _publish(self, topic: str, doc: dict[str, Any]) -> None:
        if self._client is not None:
            self._client.publish(topic, json.dumps(doc, separators=(",", ":")).encode(), qos=1)

    async def run(self, stop: asyncio.Event, *, ready: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set."""
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        self._last_seq = await asyncio.to_thread(self.store.seq)
        self._client = self._connect(loop)
        try:
            while not self._connected.is_set() and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._connected.wait(), 0.5)
            await self._republish_pending()
            if ready is not None:
                ready.set()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._poll(stop), name="twins-poll")
                tg.create_task(self._serve(stop), name="twins-serve")
        finally:
            self._client.disconnect()
            self._client.loop_stop()
            self.stats.state = "stopped"
            self.write_stats()
            log.info("twins: stopped: %s", json.dumps(asdict(self.stats)))

    async def _serve(self, stop: asyncio.Event) -> None:
        assert self._queue is not None
        while not stop.is_set():
            try:
                batch = [await asyncio.wait_for(self._queue.get(), 0.5)]
            except TimeoutError:
                continue
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())  # what arrived meanwhile: applied in one transaction
            try:
                await asyncio.to_thread(self.handle_batch, batch)
            except Exception:  # a message must not take the service down: counted, logged, the next ones
                self.stats.rejected["internal_error"] = self.stats.rejected.get("internal_error", 0) + len(batch)
                log.exception("twins: failed on a batch of %d message(s)", len(batch))

    async def _poll(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.poll_s)
            try:
                await asyncio.to_thread(self.publish_desired_changes)
            except BackendError as exc:
                self.stats.store_errors += 1
                log.warning("twins: cannot read the store (%s); retrying", exc)
            self.write_stats()

    def write_stats(self) -> None:
        """Write the counters to ``stats_path`` when they changed (atomic)."""
        if self.stats_path is None:
            return
        text = json.dumps(asdict(self.stats), sort_keys=True)
        if text == self._written_stats:
            return
        tmp = self.stats_path.with_suffix(".tmp")
        try:
            tmp.write_text(text)
            tmp.replace(self.stats_path)
            self._written_stats = text
        except OSError as exc:
            log.warning("twins: cannot write %s: %s", self.stats_path, exc)

    async def _republish_pending(self) -> None:
        """The delta of every twin that has one (changes made while the service was down)."""
        after = None
        while True:
            page = await asyncio.to_thread(self.store.list, after=after, limit=1000)
            for t in page:
                if t.delta:
                    self._publish(twin_topic(t.device_id, "delta"), {**t.delta_doc(), "status": "desired"})
            if len(page) < 1000:
                return
            after = page[-1].device_id

    # -- handling -------------------------------------------------------------------------------
    def publish_desired_changes(self) -> int:
        """Publish every desired change after the last seen; returns how many."""
        n = 0
        while changes := self.store.desired_changes(self._last_seq):
            for seq, t in changes:
                self._publish(twin_topic(t.device_id, "desired"),
                              {"device_id": t.device_id, "version": t.version, "desired": t.desired,
                               "metadata": t.desired_meta})
                self._publish(twin_topic(t.device_id, "delta"), {**t.delta_doc(), "status": "desired"})
                self._last_seq = seq
                n += 1
        self.stats.desired_published += n
        return n

    def _reject(self, device_id: str, reason: str, code: int, error: str, token: Any, twin: Twin | None) -> None:
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1
        log.warning("twins: %s of %s rejected (%s): %s", "report", device_id, reason, error)
        doc: dict[str, Any] = {"device_id": device_id, "status": "rejected", "code": code, "reason": reason,
                               "error": error}
        if twin is not None:
            doc["version"] = twin.version
        if token is not None:
            doc["client_token"] = token
        self._publish(twin_topic(device_id, "delta"), doc)

    def handle(self, topic: str, payload: bytes) -> None:
        """One message from a device (``reported`` or ``get``)."""
        self.handle_batch([(topic, payload)])

    def handle_batch(self, messages: list[tuple[str, bytes]]) -> None:
        """Messages from devices, in order: consecutive reports are applied in one transaction (a ``get``
        is answered after the reports before it)."""
        reports: list[tuple[str, dict[str, Any], int | None, Any]] = []
        for topic, payload in messages:
            where = device_of_twin_topic(topic)
            if where is None or where[1] not in ("reported", "get"):
                continue
            device_id, leaf = where
            try:
                msg = json.loads(payload) if payload.strip() else {}
            except (ValueError, RecursionError) as exc:  # the decoder recurses: a deep payload is not JSON to us
                self._reject(device_id, "bad_json", 400, f"not JSON: {exc}", None, None)
                self._handled(device_id, leaf)
                continue
            if not isinstance(msg, dict):
                self._reject(device_id, "bad_message", 400, "the message must be a JSON object", None, None)
                self._handled(device_id, leaf)
                continue
            token = msg.get("client_token")
            if leaf == "reported":
                state, version = msg.get("state"), msg.get("version")
                if not isinstance(state, dict):
                    self._reject(device_id, "bad_message", 400, 'a report is {"state": {...}}', token, None)
                elif version is not None and type(version) is not int:
                    self._reject(device_id, "bad_message", 400, "version must be an integer", token, None)
                else:
                    reports.append((device_id, state, version, token))
                    continue
                self._handled(device_id, leaf)
                continue
            self._apply_reports(reports)
            reports = []
            try:
                twin = self.store.get(device_id)
            except BackendError as exc:
                self.stats.store_errors += 1
                log.warning("twins: store error on %s: %s", topic, exc)
                continue  # not answered: the device asks again
            self.stats.gets += 1
            self._answer(twin, "get", token, desired=True)
            self._handled(device_id, leaf)
        self._apply_reports(reports)

    def _handled(self, device_id: str, leaf: str) -> None:
        if self.on_handled is not None:
            self.on_handled(device_id, leaf)

    def _apply_reports(self, reports: list[tuple[str, dict[str, Any], int | None, Any]]) -> None:
        if not reports:
            return
        try:
            results = self.store.update_reported_many([(d, state, v) for d, state, v, _ in reports])
        except BackendError as exc:
            # not answered: each device sends its report again (no answer to its token)
            self.stats.store_errors += len(reports)
            log.warning("twins: store error on %d report(s): %s", len(reports), exc)
            return
        for (device_id, _, _, token), res in zip(reports, results, strict=True):
            if isinstance(res, Twin):
                self.stats.reported += 1
                self._answer(res, "accepted", token)
            elif isinstance(res, ConflictError):
                self._reject(device_id, "version_conflict", 409, str(res), token, self.store.get(device_id))
            elif isinstance(res, TwinTooLarge):
                self._reject(device_id, "too_large", 413, str(res), token, None)
            else:
                self._reject(device_id, "invalid", 400, str(res), token, None)
            self._handled(device_id, "reported")

    def _answer(self, twin: Twin, status: str, token: Any, *, desired: bool = False) -> None:
        doc = {**twin.delta_doc(), "status": status, "ts": int(time.time() * 1000)}
        if desired:
            doc["desired"] = twin.desired
        if token is not None:
            doc["client_token"] = token
        self._publish(twin_topic(twin.device_id, "delta"), doc)
