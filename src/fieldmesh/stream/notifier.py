"""Delivers the alert outbox: webhooks (plain JSON or Alertmanager's shape) and MQTT, with retries.

The outbox rows are written in the transaction of the alert step they announce
(:mod:`fieldmesh.store.alerts`), so a step and its notifications exist together or not at all. The
notifier takes due rows oldest first, sends each, and marks it ``delivered`` in the store right after
the receiver acknowledged it (HTTP 2xx; MQTT PUBACK at QoS 1). What that guarantees:

* **at least once**: a row is sent until a receiver acknowledges it; a crash after the
  acknowledgement and before the mark sends it once more: in the processor the acknowledged rows are
  marked in its next transaction (a batch's, or the alert tick's), so a crash resends at most what was
  acknowledged since the last commit (alone, rounds of at most 32 are marked right after their sends);
* **a stable id**: every try of a notification carries the same ``notification_id`` (``fm-<n>``, also
  the ``X-Fieldmesh-Notification-Id`` header), so a receiver that remembers ids it has seen gets each
  transition exactly once;
* **never again once acknowledged**: a row marked delivered is never sent again;
* **nothing dropped silently**: a failed try is retried with capped, jittered exponential backoff; after
  :data:`~fieldmesh.store.alerts.MAX_ATTEMPTS` tries the row is kept as ``failed`` with its last error,
  listed by ``GET /api/v1/alerts/notifications?status=failed`` and counted in ``/api/v1/stats``.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from fieldmesh.store.alerts import Notification, mark_delivered, mark_failed, next_notifications
from fieldmesh.store.base import HotStore, SqlTxn

__all__ = ["Notifier", "NotifierStats", "alertmanager_payload", "json_payload"]

log = logging.getLogger(__name__)

ALERT_TOPIC = "fieldmesh/alerts/{device_id}"


def json_payload(n: Notification) -> dict[str, Any]:
    """The plain JSON body of a notification: the step, the alert as of the step, and the stable id."""
    return {"notification_id": n.notification_id, **n.payload}


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def alertmanager_payload(n: Notification) -> list[dict[str, Any]]:
    """The body Alertmanager's ``POST /api/v2/alerts`` takes: one alert, ``endsAt`` set once it cleared."""
    a = n.payload["alert"]
    out: dict[str, Any] = {
        "labels": {"alertname": a["rule"], "device_id": a["device_id"], "severity": a["severity"], **a["labels"]},
        "annotations": {"notification_id": n.notification_id, "event": n.payload["event"],
                        "state": a["state"], "value": "" if a["value"] is None else str(a["value"]),
                        "fieldmesh_alert_id": str(a["id"]), "note": a.get("note") or ""},
        "startsAt": _iso(a["opened_ms"]),
        "generatorURL": f"/api/v1/alerts/{a['id']}",
    }
    if a["state"] == "cleared":
        out["endsAt"] = _iso(a["cleared_ms"])
    return [out]


class NotifierStats:
    """In-process counters of a notifier (the durable ones are the outbox rows)."""

    def __init__(self) -> None:
        self.delivered = 0
        self.failed_tries = 0
        self.failed = 0  # kept as failed after the last try
        self.latency_ms: list[int] = []  # created (the step's commit) -> acknowledged, last 10,000


class Notifier:
    """Sends due outbox rows from ``store`` (see the module docstring); one thread, ``start``/``stop``."""

    def __init__(self, store: HotStore, *, wake: threading.Event | None = None, mqtt_url: str | None = None,
                 timeout_s: float = 5.0, retry_base_s: float = 0.5, retry_max_s: float = 300.0,
                 poll_s: float = 0.5) -> None:
        import httpx

        # httpx logs every request at INFO: one line per notification is noise in the processor's log
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
        self.store = store
        self.wake = wake or threading.Event()
        self.mqtt_url = mqtt_url
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.poll_s = poll_s
        self.stats = NotifierStats()
        #: Runs a store transaction. The processor sets it to queue the transaction on its apply thread, so
        #: the notifier takes its turn between batches rather than contend for the writer's lock.
        self.run_store: Callable[[Callable[[SqlTxn], Any]], Any] = store.transact
        #: When set (by the processor), marks are queued there without waiting for them.
        self.submit_store: Callable[[Callable[[SqlTxn], Any]], Future[Any]] | None = None
        #: When set (the processor's alert stage), acknowledged ids go there, marked delivered in the next
        #: batch's (or tick's) transaction, which then claims the steps that waited for them.
        self.defer_acked: Callable[[Sequence[int], int], None] | None = None
        self._handed: list[Notification] = []
        self._handed_lock = threading.Lock()
        self._http = httpx.Client(timeout=timeout_s, follow_redirects=False,
                                  limits=httpx.Limits(max_connections=32, max_keepalive_connections=16))
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fm-notify")
        self._mqtt_lock = threading.Lock()
        self._mqtt: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- delivery --------------------------------------------------------------------------------
    def _send(self, n: Notification) -> None:
        target = n.target
        if "webhook" in target:
            body = alertmanager_payload(n) if target.get("format") == "alertmanager" else json_payload(n)
            resp = self._http.post(target["webhook"], content=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json",
                                            "X-Fieldmesh-Notification-Id": n.notification_id})
            if resp.status_code // 100 != 2:
                raise OSError(f"HTTP {resp.status_code} from {target['webhook']}")
        elif target.get("mqtt"):
            self._publish(n)
        else:
            raise ValueError(f"unknown notification target {target}")

    def _publish(self, n: Notification) -> None:
        with self._mqtt_lock:  # one client, connected once
            self._publish_locked(n)

    def _publish_locked(self, n: Notification) -> None:
        if not self.mqtt_url:
            raise OSError("no MQTT broker for alerts: set FIELDMESH__ALERTS__MQTT_URL")
        if self._mqtt is None:
            import paho.mqtt.client as mqtt
            from paho.mqtt.enums import CallbackAPIVersion

            u = urlsplit(self.mqtt_url)
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fm-alerts-{random.getrandbits(32):08x}")
            if u.username:
                client.username_pw_set(u.username, u.password)
            client.connect(u.hostname or "127.0.0.1", u.port or 1883)
            client.loop_start()
            self._mqtt = client
        topic = ALERT_TOPIC.format(device_id=n.payload["alert"]["device_id"])
        info = self._mqtt.publish(topic, json.dumps(json_payload(n)), qos=1)
        info.wait_for_publish(timeout=10)
        if not info.is_published():
            self._mqtt.loop_stop()
            self._mqtt.disconnect()
            self._mqtt = None
            raise OSError(f"MQTT publish to {topic} not acknowledged")

    def run_once(self, *, limit: int = 32) -> int:
        """Send the due rows (up to ``limit``, concurrently), then mark them in one transaction; the number tried.

        Rows claimed together are of distinct (alert, target) pairs (the store holds back a later step of
        an alert until the earlier one is done), so sending them at once keeps each receiver's order.
        """
        with self._handed_lock:
            due, self._handed = self._handed[:limit], self._handed[limit:]
        if not due:
            now = int(time.time() * 1000)
            due = self.run_store(lambda tx: next_notifications(tx, now_ms=now, limit=limit))
        if not due:
            return 0
        results = list(self._pool.map(self._try, due))
        done = int(time.time() * 1000)
        ok = [n for n, err in zip(due, results, strict=True) if err is None]
        failures = [(n, err, int(min(self.retry_max_s, self.retry_base_s * 2**n.attempts)
                                 * random.uniform(0.8, 1.2) * 1000))
                    for n, err in zip(due, results, strict=True) if err is not None]

        defer = self.defer_acked
        if defer is not None and ok:
            defer([n.id for n in ok], done)

        def mark(tx: SqlTxn) -> list[bool]:
            if ok and defer is None:
                mark_delivered(tx, [n.id for n in ok], now_ms=done)
            return mark_failed(tx, failures, now_ms=done) if failures else []

        st = self.stats
        st.delivered += len(ok)
        st.latency_ms.extend(done - n.created_ms for n in ok)
        if len(st.latency_ms) > 10_000:
            del st.latency_ms[:5_000]
        if defer is not None and not failures:
            pass
        elif self.submit_store is None:
            self._marked(failures, self.run_store(mark))
        else:  # queued behind the batch in hand; the next round is sent meanwhile
            fut = self.submit_store(mark)
            fut.add_done_callback(lambda f: self._marked(failures, f.result()) if f.exception() is None
                                  else log.warning("notifier: marking failed: %s (sent again later, same ids)",
                                                   f.exception()))
        return len(due)

    def _marked(self, failures: list[tuple[Notification, str, int]], finals: list[bool]) -> None:
        st = self.stats
        for (n, err, delay), final in zip(failures, finals, strict=True):
            st.failed_tries += 1
            if final:
                st.failed += 1
                log.error("notification %s to %s failed for good after %d tries: %s (kept as failed)",
                          n.notification_id, n.target, n.attempts + 1, err)
            else:
                log.warning("notification %s to %s failed (try %d): %s; again in %.1fs",
                            n.notification_id, n.target, n.attempts + 1, err, delay / 1000)

    def _try(self, n: Notification) -> str | None:
        """Send ``n`` once: None when the receiver acknowledged it, else what went wrong."""
        try:
            self._send(n)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def hand(self, notifications: Sequence[Notification]) -> None:
        """Notifications claimed elsewhere (in a batch's transaction): sent next, before any claim."""
        with self._handed_lock:
            self._handed.extend(notifications)
        self.wake.set()

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self.wake.clear()  # before looking: a commit after this wakes the next wait
            try:
                busy = self.run_once()
            except Exception as exc:
                log.warning("notifier: %s; trying again", exc)
                busy = 0
            if not busy:
                self.wake.wait(self.poll_s)

    def start(self) -> None:
        """Start the delivery thread."""
        self._thread = threading.Thread(target=self._run, name="fm-notifier", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (after the notification in hand) and close connections."""
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._pool.shutdown(wait=True)
        self._http.close()
        if self._mqtt is not None:
            self._mqtt.loop_stop()
            self._mqtt.disconnect()
