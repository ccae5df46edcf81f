"""What ``fieldmesh up`` decides about its processes: when to restart, when to give up, when to worry.

Pure bookkeeping (no processes, no I/O but ``statvfs``), so each rule is testable on its own:

- :class:`Restarts`: capped exponential backoff between restarts; a process that exits soon after
  its start ``start_failures`` times in a row has a problem a restart cannot fix (a configuration
  error): it is left stopped and reported, never restarted forever.
- :class:`StallWatch`: a stage with work waiting (lag > 0) whose progress marker (what it has
  committed or acknowledged) has not moved for ``stall_after_s`` is stalled.
- :func:`free_bytes`: the free space the disk watchdog compares with the reserve.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from fieldmesh.core.settings import RuntimeSettings

__all__ = ["Restarts", "StallWatch", "free_bytes"]


@dataclass
class Restarts:
    """Restart bookkeeping of one supervised process."""

    policy: RuntimeSettings
    started_at: float = field(default_factory=time.monotonic)
    quick_exits: int = 0  # exits in a row within start_grace_s of a start
    restarts: int = 0
    next_start_at: float | None = None  # set while a restart is pending

    def started(self) -> None:
        """The process was (re)started now."""
        self.started_at = time.monotonic()
        self.next_start_at = None

    def exited(self, *, count: bool = True) -> bool:
        """Record an exit and schedule the restart.

        Args:
            count: False when the exit is not the process's own fault (its bus was down), so it
                cannot add up to a give-up.

        Returns:
            True when the process should be left stopped (it failed the same way at start too often).
        """
        now = time.monotonic()
        if now - self.started_at < self.policy.start_grace_s:
            self.quick_exits += 1 if count else 0
        else:
            self.quick_exits = 0  # it ran: a crash, not a start failure; restart at once
        self.restarts += 1
        if self.quick_exits >= self.policy.start_failures:
            self.next_start_at = None
            return True
        # jitter: processes that died together do not come back in lock step
        delay = min(self.policy.restart_max_s, 0.25 * 2**self.quick_exits) * random.uniform(0.8, 1.0)
        self.next_start_at = now + delay
        return False

    def wait_s(self) -> float:
        """Seconds until the pending restart (0 when none is pending)."""
        return max(0.0, self.next_start_at - time.monotonic()) if self.next_start_at is not None else 0.0

    def due(self) -> bool:
        """A restart is pending and its backoff has passed."""
        return self.next_start_at is not None and time.monotonic() >= self.next_start_at


@dataclass
class _Seen:
    marker: object
    lag: int
    progress_at: float


class StallWatch:
    """Per stage: work waiting and no progress for ``stall_after_s`` means stalled."""

    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = stall_after_s
        self._seen: dict[str, _Seen] = {}

    def observe(self, stage: str, *, lag: int, marker: object, now: float | None = None) -> None:
        """Record a sample: the stage's lag and a marker that changes whenever it makes progress."""
        now = time.monotonic() if now is None else now
        prev = self._seen.get(stage)
        if prev is None or lag <= 0 or marker != prev.marker:
            self._seen[stage] = _Seen(marker, lag, now)
        else:
            prev.lag = lag

    def forget(self, stage: str) -> None:
        """Start afresh (the stage was restarted, or its lag cannot be read)."""
        self._seen.pop(stage, None)

    def stalled(self, stage: str, now: float | None = None) -> tuple[int, float] | None:
        """``(lag, seconds without progress)`` when the stage is stalled, else None."""
        seen = self._seen.get(stage)
        if seen is None or seen.lag <= 0:
            return None
        idle = (time.monotonic() if now is None else now) - seen.progress_at
        return (seen.lag, idle) if idle >= self.stall_after_s else None


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still use on the file system holding ``path``."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
