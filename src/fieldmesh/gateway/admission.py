"""Who may publish, and how much: the gateway's device checks before it decodes a message.

Two checks, in this order, each on the device the topic names (``devices/{id}/telemetry``: the MQTT
door's credentials and ACLs make the topic the sender's identity):

1. **Registration** (``gateway.require_registration``): the device must be registered as ``active`` in
   the device registry. Not registered at all: dead letter ``unknown_device``; registered but
   ``suspended`` or ``retired``: ``unauthorized`` (the device is known, and may not publish).
   :class:`RegisteredDevices` keeps the registry's devices in memory and reads them again whenever the
   registry's ``version()`` changes (polled off the hot path, every ``gateway.registry_poll_s``).
2. **Rate limits** (``gateway.rate_limit_messages_per_s``, ``rate_limit_bytes_per_s``,
   ``rate_limit_burst_s``): a token bucket per device for messages and one for payload bytes, taken in
   the order the messages arrived; a message the buckets cannot pay for is dead-lettered
   ``rate_limited`` and costs no tokens. :class:`RateLimiter`.

A message refused here is not decoded. The checks run over a whole fetched batch at once (set
operations and numpy over the batch's devices); a Python step per message runs only for the messages
of a device that is over its limit.

If the registry cannot be read, the gateway neither accepts unknown devices nor drops known ones: before
its first successful read it takes no message from its source (they wait there, unacknowledged); after
it, it keeps the last set it read, logs the failure and counts it (:attr:`RegisteredDevices.errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from typing import Any, Final, Protocol

import numpy as np

from fieldmesh.core.errors import ConfigError
from fieldmesh.core.settings import GatewaySettings

__all__ = ["Admission", "DeviceLister", "RateLimiter", "RegisteredDevices", "build_admission", "describe_checks"]

log = logging.getLogger(__name__)

#: The slot of a device without a bucket yet.
_NEW: Final = -2
#: Devices read from the registry per page.
_PAGE: Final = 5_000


class DeviceLister(Protocol):
    """What the gateway needs of the device registry (``fieldmesh.store.registry.DeviceRegistry``)."""

    def version(self) -> int: ...

    def list(self, *, status: str | None = None, group: str | None = None, after: str | None = None,
             limit: int = 1000) -> list[Any]: ...

    def close(self) -> None: ...


class RegisteredDevices:
    """The registry's devices in memory: the active ids, and the status of the others.

    ``open_registry`` is called (and the registry used) in one worker thread of its own, off the event
    loop: a registry read is a blocking SQL query.
    """

    def __init__(self, open_registry: Callable[[], DeviceLister], *, poll_s: float = 1.0) -> None:
        self._open = open_registry
        self.poll_s = poll_s
        self._registry: DeviceLister | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fm-registry")
        #: Devices that may publish.
        self.active: frozenset[str] = frozenset()
        #: The status of registered devices that may not (``suspended``, ``retired``).
        self.inactive: dict[str, str] = {}
        #: The registry version last read; None until the first successful read.
        self.version: int | None = None
        #: Failed reads of the registry (each poll that failed counts once).
        self.errors = 0
        self.last_error: str | None = None
        self._ready = asyncio.Event()
        self._failing_since: float | None = None

    @property
    def ready(self) -> bool:
        """Whether the registry was read at least once."""
        return self.version is not None

    def refresh(self) -> bool:
        """Read the registry again if its version changed (blocking); True when it did.

        The version is read before the devices: a change in between makes the next poll read them again.
        """
        if self._registry is None:
            self._registry = self._open()
        v = self._registry.version()
        if v == self.version:
            return False
        active: set[str] = set()
        inactive: dict[str, str] = {}
        after: str | None = None
        while True:
            page = self._registry.list(after=after, limit=_PAGE)
            for d in page:
                if d.status == "active":
                    active.add(d.id)
                else:
                    inactive[d.id] = d.status
            if len(page) < _PAGE:
                break
            after = page[-1].id
        self.active, self.inactive, self.version = frozenset(active), inactive, v
        return True

    async def poll_once(self) -> bool:
        """:meth:`refresh` in the registry's thread; a failure is logged and counted, never raised."""
        try:
            changed = await asyncio.get_running_loop().run_in_executor(self._pool, self.refresh)
        except Exception as exc:
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:300]
            now = time.monotonic()
            if self._failing_since is None or now - self._failing_since >= 60:
                kept = (f"keeping the last known devices ({len(self.active)} active, version {self.version})"
                        if self.ready else "taking no message until it can be read")
                log.warning("the device registry cannot be read (%s); %s", self.last_error, kept)
                self._failing_since = now
            await asyncio.get_running_loop().run_in_executor(self._pool, self._drop_connection)
            return False
        if self._failing_since is not None:
            log.info("the device registry can be read again (version %s)", self.version)
            self._failing_since = None
        if changed:
            log.info("device registry version %s: %d active devices, %d suspended or retired",
                     self.version, len(self.active), len(self.inactive))
        self._ready.set()
        return changed

    def _drop_connection(self) -> None:
        """Close the registry after a failure: the next poll opens it again (a restarted database)."""
        reg, self._registry = self._registry, None
        if reg is not None:
            try:
                reg.close()
            except Exception:
                log.debug("closing the device registry failed", exc_info=True)

    async def wait_ready(self, stop: asyncio.Event) -> bool:
        """Wait for the first successful read (or ``stop``); True when read."""
        if self.ready:
            return True
        ready = asyncio.ensure_future(self._ready.wait())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            stopped.cancel()
        return self.ready

    async def run(self, stop: asyncio.Event) -> None:
        """Poll the registry every ``poll_s`` until ``stop``."""
        try:
            while not stop.is_set():
                await self.poll_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.poll_s)
        finally:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._drop_connection)
            self._pool.shutdown(wait=False)

    def refusal(self, device: str) -> tuple[str, str]:
        """The reason and detail of refusing ``device`` (one that is not active)."""
        status = self.inactive.get(device)
        if status is None:
            return "unknown_device", (f"device {device!r} is not registered, and registration is enforced: "
                                      f"register it (fieldmesh devices add {device}; docs/registry.md)")
        return "unauthorized", f"device {device!r} is {status} in the device registry: it may not publish"


class RateLimiter:
    """Token buckets per device for messages and payload bytes, kept in numpy arrays.

    A bucket holds ``burst_s`` seconds of its rate (the bytes bucket at least ``min_burst_bytes``, so that
    any payload the gateway accepts can pass) and starts full. Memory is bounded: a bucket that has
    refilled completely is the same as a new one and is dropped by the periodic sweep; beyond
    ``max_devices`` buckets in use, the longest idle half is dropped too (those devices start again with
    a full bucket).
    """

    def __init__(
        self, *, messages_per_s: float = 0.0, bytes_per_s: float = 0.0, burst_s: float = 10.0,
        min_burst_bytes: int = 0, max_devices: int = 1_000_000, sweep_s: float = 10.0,
    ) -> None:
        if messages_per_s < 0 or bytes_per_s < 0 or burst_s <= 0 or max_devices < 2:
            raise ValueError("rates must be >= 0, burst_s > 0 and max_devices >= 2")
        inf = float("inf")
        self.messages_per_s = float(messages_per_s)  # 0: no limit (a bucket of inf that is never touched)
        self.bytes_per_s = float(bytes_per_s)
        self._on_m, self._on_b = messages_per_s > 0, bytes_per_s > 0
        self.burst_messages = max(1.0, messages_per_s * burst_s) if self._on_m else inf
        self.burst_bytes = max(float(min_burst_bytes), bytes_per_s * burst_s) if self._on_b else inf
        self.max_devices = max_devices
        self.sweep_s = sweep_s
        self._slot: dict[str | None, int] = {None: -1, "": -1}  # no device: not limited
        self._names: list[str | None] = []
        self._free: list[int] = []
        size = 1024
        self._msgs = np.zeros(size)
        self._bytes = np.zeros(size)
        self._last = np.zeros(size, dtype=np.int64)
        self._swept_ms = 0
        #: Buckets dropped: refilled (``idle``), or to stay within ``max_devices`` (``evicted``).
        self.dropped_idle = 0
        self.evicted = 0

    @property
    def enabled(self) -> bool:
        """Whether any limit is set."""
        return self._on_m or self._on_b

    @property
    def devices(self) -> int:
        """Buckets in use."""
        return len(self._slot) - 2

    def _new_slot(self, device: str, now_ms: int) -> int:
        if self._free:
            s = self._free.pop()
            self._names[s] = device
        else:
            s = len(self._names)
            if s == len(self._msgs):
                grow = len(self._msgs)
                self._msgs = np.concatenate([self._msgs, np.zeros(grow)])
                self._bytes = np.concatenate([self._bytes, np.zeros(grow)])
                self._last = np.concatenate([self._last, np.zeros(grow, dtype=np.int64)])
            self._names.append(device)
        self._msgs[s] = self.burst_messages
        self._bytes[s] = self.burst_bytes
        self._last[s] = now_ms
        self._slot[device] = s
        return s

    def _sweep(self, now_ms: int, *, force: bool = False) -> None:
        """Drop the buckets that have refilled; over ``max_devices``, the longest idle half too."""
        self._swept_ms = now_ms
        top = len(self._names)
        if not top:
            return
        names = np.array([n is not None for n in self._names])
        el = np.maximum(0, now_ms - self._last[:top]) / 1000
        full = names
        if self._on_m:
            full = full & (self._msgs[:top] + self.messages_per_s * el >= self.burst_messages)
        if self._on_b:
            full = full & (self._bytes[:top] + self.bytes_per_s * el >= self.burst_bytes)
        drop = np.flatnonzero(full)
        self.dropped_idle += len(drop)
        if force and self.devices - len(drop) >= self.max_devices:
            live = np.flatnonzero(names & ~full)
            oldest = live[np.argsort(self._last[live], kind="stable")[: len(live) // 2]]
            self.evicted += len(oldest)
            drop = np.concatenate([drop, oldest])
        for s in drop.tolist():
            del self._slot[self._names[s]]
            self._names[s] = None
            self._free.append(s)

    def refuse(self, devices: Sequence[str | None], payloads: Sequence[bytes], now_ms: int) -> list[int]:
        """Take one message and its payload's bytes from each device's buckets, in order; the indices refused.

        ``devices[i]`` None or empty: message ``i`` is not limited here (no device, or already refused).
        """
        n = len(devices)
        if not n or not self.enabled:
            return []
        if now_ms - self._swept_ms >= self.sweep_s * 1000 or self.devices >= self.max_devices:
            self._sweep(now_ms, force=self.devices >= self.max_devices)
        s_a = np.fromiter(map(self._slot.get, devices, repeat(_NEW)), np.int64, n)
        if s_a.min() == _NEW:  # devices without a bucket yet
            for i in np.flatnonzero(s_a == _NEW).tolist():
                d = devices[i]
                got = self._slot.get(d)  # a device new in this batch, seen earlier in it
                s_a[i] = self._new_slot(d, now_ms) if got is None else got  # type: ignore[arg-type]
        limited: np.ndarray[Any, Any] | None = None  # positions limited here; None: all of them
        if s_a.min() < 0:
            limited = np.flatnonzero(s_a >= 0)
            if not len(limited):
                return []
            s_a = s_a[limited]
        top = len(self._names)
        counts = np.bincount(s_a, minlength=top)  # slots are small integers: no sort needed
        uniq = np.flatnonzero(counts)
        counts = counts[uniq]
        el = np.maximum(0, now_ms - self._last[uniq]) / 1000
        ok = np.ones(len(uniq), dtype=bool)
        if self._on_m:
            msgs = np.minimum(self.burst_messages, self._msgs[uniq] + self.messages_per_s * el)
            ok &= counts <= msgs
        size_a: np.ndarray[Any, Any] | None = None
        if self._on_b:
            size_a = np.fromiter(map(len, payloads), np.float64, n)
            if limited is not None:
                size_a = size_a[limited]
            nbytes = np.bincount(s_a, weights=size_a, minlength=top)[uniq]
            byts = np.minimum(self.burst_bytes, self._bytes[uniq] + self.bytes_per_s * el)
            ok &= nbytes <= byts
            self._bytes[uniq] = np.where(ok, byts - nbytes, byts)
        if self._on_m:
            self._msgs[uniq] = np.where(ok, msgs - counts, msgs)
        self._last[uniq] = now_ms
        if ok.all():
            return []
        refused: list[int] = []
        # the devices over their limit: message by message, in arrival order (a refused message costs nothing)
        for s in uniq[~ok].tolist():
            m, b = float(self._msgs[s]), float(self._bytes[s])
            for pos in np.flatnonzero(s_a == s).tolist():
                size = 0.0 if size_a is None else float(size_a[pos])
                if m >= 1 and b >= size:  # an unlimited bucket holds inf
                    m -= 1
                    b -= size
                else:
                    refused.append(pos if limited is None else int(limited[pos]))
            self._msgs[s], self._bytes[s] = m, b
        refused.sort()
        return refused

    def detail(self, device: str, size: int) -> str:
        """Why a message of ``device`` was refused."""
        if size > self.burst_bytes:
            return (f"device {device!r}: a payload of {size} bytes is larger than the rate limit's burst of "
                    f"{self.burst_bytes:.0f} bytes (gateway.rate_limit_bytes_per_s x rate_limit_burst_s)")
        limits = []
        if self._on_m:
            limits.append(f"{self.messages_per_s:g} messages/s")
        if self._on_b:
            limits.append(f"{self.bytes_per_s:g} bytes/s")
        return f"device {device!r} is over its rate limit ({' and '.join(limits)}, burst of {self.burst_text})"

    @property
    def burst_text(self) -> str:
        """The burst in the words of the settings."""
        parts = []
        if self._on_m:
            parts.append(f"{self.burst_messages:.0f} messages")
        if self._on_b:
            parts.append(f"{self.burst_bytes:.0f} bytes")
        return " and ".join(parts)


class Admission:
    """The checks a gateway makes before decoding: registration, then rate limits (either may be off).

    ``authenticated_topics``: the topic names the sender (the door authenticates devices and its ACLs
    confine each to its own topics), so a payload naming another device is ``unauthorized`` rather than
    ``device_mismatch``. Enforced registration implies it.
    """

    def __init__(
        self, *, registered: RegisteredDevices | None = None, limiter: RateLimiter | None = None,
        authenticated_topics: bool = False,
    ) -> None:
        self.registered = registered
        self.limiter = limiter if limiter is not None and limiter.enabled else None
        self.authenticated_topics = authenticated_topics or registered is not None

    @property
    def checks(self) -> bool:
        """Whether anything is checked before decoding."""
        return self.registered is not None or self.limiter is not None

    def refuse(self, devices: list[str | None], payloads: Sequence[bytes], now_ms: int) -> dict[int, tuple[str, str]]:
        """The messages refused, by index: ``(reason, detail)``. ``devices[i]`` None or empty: not checked.

        ``devices`` is changed in place: a device refused by its registration is not rate limited.
        """
        refused: dict[int, tuple[str, str]] = {}
        reg = self.registered
        if reg is not None:
            present = set(devices)
            present.discard(None)
            present.discard("")
            bad = present - reg.active
            if bad:
                why = {d: reg.refusal(d) for d in bad}  # type: ignore[arg-type]
                for i, d in enumerate(devices):
                    if d in bad:
                        refused[i] = why[d]
                        devices[i] = None
        lim = self.limiter
        if lim is not None:
            details: dict[tuple[str, bool], tuple[str, str]] = {}
            for i in lim.refuse(devices, payloads, now_ms):
                d = devices[i]
                assert d is not None
                size = len(payloads[i])
                key = (d, size > lim.burst_bytes)  # one detail per device and kind: a flood has many
                got = details.get(key)
                if got is None:
                    got = details[key] = ("rate_limited", lim.detail(d, size))
                refused[i] = got
        return refused


def build_admission(
    settings: GatewaySettings, open_registry: Callable[[], DeviceLister] | None = None
) -> Admission | None:
    """The admission ``settings`` ask for (None: nothing to check before decoding).

    Raises:
        ConfigError: registration is enforced and no registry was given.
    """
    registered = None
    if settings.require_registration:
        if open_registry is None:
            raise ConfigError(
                "FIELDMESH__GATEWAY__REQUIRE_REGISTRATION needs the device registry: give the gateway the hot "
                "store's URL (--store-url), where the registry lives", key="gateway.require_registration")
        registered = RegisteredDevices(open_registry, poll_s=settings.registry_poll_s)
    limiter = RateLimiter(
        messages_per_s=settings.rate_limit_messages_per_s, bytes_per_s=settings.rate_limit_bytes_per_s,
        burst_s=settings.rate_limit_burst_s, min_burst_bytes=settings.max_payload_bytes)
    admission = Admission(registered=registered, limiter=limiter, authenticated_topics=settings.authenticated_topics)
    return admission if admission.checks or admission.authenticated_topics else None


def describe_checks(settings: GatewaySettings) -> str | None:
    """What the start line says of the device checks (None: none is on)."""
    parts = []
    if settings.require_registration:
        parts.append("registration enforced")
    elif settings.authenticated_topics:
        parts.append("topics are identities")
    limits = [f"{v:g} {unit}/s" for v, unit in ((settings.rate_limit_messages_per_s, "messages"),
                                               (settings.rate_limit_bytes_per_s, "bytes")) if v]
    if limits:
        parts.append(f"rate limit {' and '.join(limits)} per device (burst {settings.rate_limit_burst_s:g} s)")
    return "devices: " + ", ".join(parts) if parts else None
