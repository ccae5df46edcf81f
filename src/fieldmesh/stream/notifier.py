"""Delivers the alert outbox: webhooks (plain JSON or Alertmanager's shape) and MQTT, with retries.

The outbox rows are written in the transaction of the alert step they announce
(:mod:`fieldmesh.store.alerts`), so a step and its notifications exist together or not at all. The
notifier takes due rows oldest first, sends each, and marks it ``delivered`` in the store right after
the receiver acknowledged it (HTTP 2xx; MQTT PUBACK at QoS 1). What that guarantees:

* **at least once**: a row is sent until a receiver acknowledges it; a crash after the
  acknowledgement and before the mark sends it once more: in the processor the acknowledged rows are
  marked in its next transaction (a batch's, or the alert tick's), so a crash resends at most what was
  acknowledged since the last commit (alone, each is marked right after its receiver acknowledged it);
* **a stable id**: every try of a notification carries the same ``notification_id`` (``fm-<n>``, also
  the ``X-Fieldmesh-Notification-Id`` header), so a receiver that remembers ids it has seen gets each
  transition exactly once;
* **never again once acknowledged**: a row marked delivered is never sent again;
* **nothing dropped silently**: a failed try is retried with capped, jittered exponential backoff; after
  :data:`~fieldmesh.store.alerts.MAX_ATTEMPTS` tries the row is kept as ``failed`` with its last error,
  listed by ``GET /api/v1/alerts/notifications?status=failed`` and counted in ``/api/v1/stats``.

Sending is not done here: each try goes to a delivery process (:mod:`fieldmesh.stream.sender`), which
answers its outcome; so the processor's interpreter lock, held by its batches, never stands between a
notification and its receiver, and the HTTP client's work is not taken from the batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import select
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from datetime import UTC, datetime
from functools import partial
from typing import Any

from fieldmesh.store.alerts import Notification, mark_delivered, mark_failed, next_notifications
from fieldmesh.store.base import HotStore, SqlTxn
from fieldmesh.stream.sender import FrameReader, encode_frame

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
        #: handed to the delivery process (for a batch's notifications: right after its commit) -> acknowledged
        self.send_ms: list[float] = []

    def summary(self) -> str:
        """One line for the log: counts and the send latency's p50/p99."""
        lat = sorted(self.send_ms)

        def q(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

        return (f"{self.delivered} delivered, {self.failed_tries} failed tries, {self.failed} failed; handed over -> "
                f"acknowledged p50 {q(0.5):.1f} ms, p99 {q(0.99):.1f} ms (of the last {len(lat)})")


class Notifier:
    """Sends due outbox rows from ``store`` (see the module docstring); one thread, ``start``/``stop``.

    The tries themselves run in a delivery process of its own (:mod:`fieldmesh.stream.sender`), started
    with the notifier and again if it dies; this process decides what to send and records the outcomes.
    """

    def __init__(self, store: HotStore, *, wake: threading.Event | None = None, mqtt_url: str | None = None,
                 timeout_s: float = 5.0, retry_base_s: float = 0.5, retry_max_s: float = 300.0,
                 poll_s: float = 0.5) -> None:
        self.store = store
        self.wake = wake or threading.Event()
        self.mqtt_url = mqtt_url
        self.timeout_s = timeout_s
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
        #: Rows the thread claims at once, and keeps in flight at most (a batch hands over what it claimed).
        self.claim_limit = 32
        self._inflight: dict[int, Notification] = {}  # outbox id -> the row, while its try is out
        self._handed_ms: dict[int, float] = {}  # outbox id -> when its try was handed over
        self._inflight_lock = threading.Lock()
        self._want_room = False  # the thread waits for in-flight rows to finish before its next claim
        self._child: _SenderProcess | None = None
        self._child_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- delivery --------------------------------------------------------------------------------
    @staticmethod
    def request(n: Notification) -> tuple[str, str, bytes]:
        """What the delivery process is asked to do for ``n``: (kind, URL or topic, body)."""
        target = n.target
        if "webhook" in target:
            body = alertmanager_payload(n) if target.get("format") == "alertmanager" else json_payload(n)
            return "webhook", str(target["webhook"]), json.dumps(body).encode()
        if target.get("mqtt"):
            topic = ALERT_TOPIC.format(device_id=n.payload["alert"]["device_id"])
            return "mqtt", topic, json.dumps(json_payload(n)).encode()
        return "unknown", json.dumps(target), b""

    def _sender(self) -> _SenderProcess:
        with self._child_lock:
            if self._child is None or not self._child.alive:
                self._child = _SenderProcess({"timeout_s": self.timeout_s, "mqtt_url": self.mqtt_url},
                                             on_result=self._result, on_exit=self._sender_exited)
            return self._child

    def _dispatch(self, notifications: Sequence[Notification]) -> None:
        """Send each of ``notifications`` now, without waiting for the others.

        Rows claimed and not yet marked are of distinct (alert, target) pairs (the store holds back a later
        step of an alert while an earlier one is pending), so sending them at once keeps each receiver's
        order. A row already in flight here (claimed again once its lease ran out while it waited for a
        slow receiver) is not sent a second time: the try in flight marks it.
        """
        now = time.time() * 1000
        with self._inflight_lock:
            fresh = [n for n in notifications if n.id not in self._inflight]
            self._inflight.update((n.id, n) for n in fresh)
            self._handed_ms.update((n.id, now) for n in fresh)
        if not fresh:
            return
        if self._stop.is_set():  # stopped: these stay claimed, and are sent again after their lease
            with self._inflight_lock:
                for n in fresh:
                    self._inflight.pop(n.id, None)
                    self._handed_ms.pop(n.id, None)
            return
        try:
            requests = [[n.id, *self.request(n), n.notification_id] for n in fresh]
            sent = self._sender().send(requests) or self._sender().send(requests)  # it died just now: another
        except Exception as exc:  # the process cannot start: called after a commit, this must not raise
            log.error("notifier: cannot start the delivery process: %s", exc)
            sent = False
        if not sent:  # these stay claimed, and are sent again after their lease
            self._done([n.id for n in fresh])

    def _result(self, seq: int, err: str | None) -> None:
        """The delivery process's outcome of a try (on its reader thread): acknowledged ids go to
        ``defer_acked`` (the processor's next transaction marks them) or are marked at once; a failure is
        marked due again after its backoff, or failed for good."""
        done_ms = time.time() * 1000
        done = int(done_ms)
        with self._inflight_lock:
            n = self._inflight.get(seq)
            handed = self._handed_ms.get(seq)
        if n is None:
            return
        try:
            if err is None:
                st = self.stats
                st.delivered += 1
                st.latency_ms.append(done - n.created_ms)
                if len(st.latency_ms) > 10_000:
                    del st.latency_ms[:5_000]
                if handed is not None:
                    st.send_ms.append(done_ms - handed)
                    if len(st.send_ms) > 10_000:
                        del st.send_ms[:5_000]
                defer = self.defer_acked
                if defer is not None:
                    defer([n.id], done)
                else:
                    self.run_store(lambda tx: mark_delivered(tx, [n.id], now_ms=done))
                return
            delay = int(min(self.retry_max_s, self.retry_base_s * 2**n.attempts) * random.uniform(0.8, 1.2) * 1000)
            failures = [(n, err, delay)]

            def mark(tx: SqlTxn) -> list[bool]:
                return mark_failed(tx, failures, now_ms=done)

            if self.submit_store is None:
                self._marked(failures, self.run_store(mark))
            else:  # queued behind the batch in hand
                fut = self.submit_store(mark)
                fut.add_done_callback(lambda f: self._marked(failures, f.result()) if f.exception() is None
                                      else log.warning("notifier: marking failed: %s (sent again later, same id)",
                                                       f.exception()))
        except Exception as exc:  # the store refused the mark: the lease runs out, the row is sent again
            log.warning("notifier: %s marking %s; sent again after its lease, same id", exc, n.notification_id)
        finally:
            self._done([seq])

    def _done(self, ids: Sequence[int]) -> None:
        with self._inflight_lock:
            for i in ids:
                self._inflight.pop(i, None)
                self._handed_ms.pop(i, None)
            room = self._want_room and len(self._inflight) < self.claim_limit
            if room:
                self._want_room = False
        if room:
            self.wake.set()  # the claim that waited for room goes on

    def _sender_exited(self, child: _SenderProcess, unanswered: list[int]) -> None:
        if unanswered and not self._stop.is_set():
            log.warning("notifier: the delivery process exited (code %s) with %d tries unanswered; they are sent "
                        "again after their lease, same ids", child.returncode, len(unanswered))
        self._done(unanswered)

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

    def hand(self, notifications: Sequence[Notification]) -> None:
        """Notifications claimed elsewhere (in a batch's transaction, just committed): sent at once."""
        self._dispatch(notifications)

    def run_once(self, *, limit: int = 32, timeout_s: float = 30.0) -> int:
        """Claim the due rows (up to ``limit``), send them and wait for their outcomes; the number claimed."""
        now = int(time.time() * 1000)
        due = self.run_store(lambda tx: next_notifications(tx, now_ms=now, limit=limit))
        self._dispatch(due)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self._inflight_lock:
                if not any(n.id in self._inflight for n in due):
                    break
            time.sleep(0.005)
        return len(due)

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        """Claims what no batch handed over: retries come due, steps of the API (ack, clear by hand), rows
        whose lease ran out. Every ``poll_s``, or at once when woken (a commit queued rows it did not claim);
        a full claim is followed by the next once there is room."""
        while not self._stop.is_set():
            self.wake.clear()  # before looking: a commit after this wakes the next wait
            with self._inflight_lock:
                room = self.claim_limit - len(self._inflight)
            full = room <= 0
            if not full:
                try:
                    due = self.run_store(partial(_claim, limit=room))
                    full = len(due) == room  # more may be due
                    self._dispatch(due)
                except Exception as exc:
                    log.warning("notifier: %s; trying again", exc)
            if full:
                with self._inflight_lock:
                    self._want_room = len(self._inflight) >= self.claim_limit
                    if not self._want_room:
                        continue
            self.wake.wait(self.poll_s)

    def start(self) -> None:
        """Start the delivery process and the claiming thread."""
        self._sender()
        self._thread = threading.Thread(target=self._run, name="fm-notifier", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop claiming; the delivery process finishes the tries in hand (their outcomes recorded), then exits."""
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        with self._child_lock:
            child, self._child = self._child, None
        if child is not None:
            child.close(timeout_s)
        log.info("notifier stopped: %s", self.stats.summary())


def _claim(tx: SqlTxn, *, limit: int) -> list[Notification]:
    return next_notifications(tx, now_ms=int(time.time() * 1000), limit=limit)


class _SenderProcess:
    """The delivery process (:mod:`fieldmesh.stream.sender`) and the threads that talk to it.

    Requests are written to its pipe by the caller itself (a batch's apply thread, right after its commit):
    a handful of bytes, written without blocking, so they do not wait for a writer thread to get this
    interpreter's lock from the next batch. What the pipe cannot take at once (the process is behind) is
    left to a writer thread, and what follows goes after it, in order. A reader thread takes the outcomes.
    """

    def __init__(self, cfg: dict[str, Any], *, on_result: Callable[[int, str | None], None],
                 on_exit: Callable[[_SenderProcess, list[int]], None]) -> None:
        self._on_result = on_result
        self._on_exit = on_exit
        self._asked: set[int] = set()  # seqs written, not answered
        self._lock = threading.Lock()
        self.alive = True
        self.proc = subprocess.Popen([sys.executable, "-m", "fieldmesh.stream.sender", json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdin is not None
        self._fd = self.proc.stdin.fileno()
        os.set_blocking(self._fd, False)
        self._pending: deque[memoryview] = deque()  # bytes the pipe did not take yet, in order
        self._wcond = threading.Condition()  # guards the pipe, _pending and _closing
        self._closing = False
        self._writer = threading.Thread(target=self._write, name="fm-notify-write", daemon=True)
        self._reader = threading.Thread(target=self._read, name="fm-notify-read", daemon=True)
        self._writer.start()
        self._reader.start()

    @property
    def returncode(self) -> int | None:
        """The process's exit code once it exited."""
        return self.proc.poll()

    def send(self, requests: list[list[Any]]) -> bool:
        """Write requests ``[seq, kind, dest, body, notification_id]`` to the process (what its pipe cannot
        take now goes after, from the writer thread); False when it exited (nothing sent)."""
        with self._lock:
            if not self.alive:
                return False
            self._asked.update(r[0] for r in requests)
        data = memoryview(b"".join(encode_frame(r) for r in requests))
        with self._wcond:
            if self._closing:
                return True  # it is being closed: the reader lists these as unanswered
            if not self._pending:
                data = data[self._put(data):]
            if data:
                self._pending.append(data)
                self._wcond.notify()
        return True

    def _put(self, data: memoryview) -> int:
        """Bytes of ``data`` the pipe took now (under ``_wcond``); a closed pipe takes all (they are lost, and
        the reader lists their requests as unanswered)."""
        if self._fd < 0:
            return len(data)
        try:
            return os.write(self._fd, data)
        except BlockingIOError:
            return 0
        except OSError:  # it died
            return len(data)

    def _write(self) -> None:
        room = select.poll()
        room.register(self._fd, select.POLLOUT)
        try:
            while True:
                with self._wcond:
                    while not self._pending and not self._closing:
                        self._wcond.wait()
                    if not self._pending:
                        return
                    head = self._pending[0]
                    n = self._put(head)
                    if n == len(head):
                        self._pending.popleft()
                    else:
                        self._pending[0] = head[n:]
                if n < len(head):
                    room.poll(1000)  # until the pipe has room (poll: select() fails on a descriptor >= 1024)
        finally:
            with self._wcond, contextlib.suppress(OSError):
                self._pending.clear()
                self._fd = -1  # closed: its number may name another file from now on
                assert self.proc.stdin is not None
                self.proc.stdin.close()

    def _read(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        frames = FrameReader(stdout.fileno())
        try:
            while (reps := frames.read()) is not None:
                with self._lock:
                    self._asked.difference_update(seq for seq, _ in reps)
                for seq, err in reps:
                    try:
                        self._on_result(seq, err)
                    except Exception:
                        log.exception("notifier: recording the outcome of fm-%s failed", seq)
        finally:
            with self._lock:  # from here on nothing is queued for it: every try asked of it is answered or listed
                self.alive = False
                unanswered, self._asked = list(self._asked), set()
            self.proc.wait()
            self._on_exit(self, unanswered)

    def close(self, timeout_s: float) -> None:
        """Close the process's input and wait for the outcomes of the tries in hand."""
        with self._wcond:
            self._closing = True
            self._wcond.notify()
        self._reader.join(timeout=timeout_s)
        if self._reader.is_alive():
            self.proc.kill()
            self._reader.join(timeout=5)
