"""WAL checkpoints of the SQLite hot store on a thread of their own, off the processor's batches.

Why: with SQLite's automatic checkpoint, the commit that takes the WAL past ``wal_autocheckpoint`` pages
also copies the WAL into the database file and syncs both (``synchronous=NORMAL`` syncs at checkpoints).
On a shared disk that commit takes 15-50 ms instead of 1-10 ms, once every few batches: the whole batch
waits, and so does every alert it carries (the tail of event -> notification latency). Here the writer
turns the automatic checkpoint off and wakes this thread after its commits; the thread runs ``PASSIVE``
checkpoints on a connection of its own, which never wait for the writer or a reader and never make them
wait (the writer keeps appending meanwhile). What a checkpoint guarantees is unchanged: a commit is
durable once in the WAL; the checkpoint only moves pages into the database file.

At most one checkpoint per ``interval_s`` (a busy writer wakes the thread after every commit). SQLite
starts the WAL over only when a checkpoint covered every commit before the writer's next transaction: with
idle time between batches, one of the thread's does; a writer that never idles (a backlog) would grow the
WAL without end, so once the thread sees more than ``max_pages`` in it, the writer checkpoints the rest
itself after a commit (:meth:`writer_should_checkpoint`: the thread copied most pages already). Should the
thread fail, it says so (``failed``) and the writer takes the automatic checkpoint back.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

__all__ = ["WalCheckpointer"]

log = logging.getLogger(__name__)


class WalCheckpointer:
    """Checkpoints the WAL of the database at ``path`` after commits (:meth:`committed`); ``stop`` ends it."""

    def __init__(self, path: Path, *, interval_s: float = 0.1, max_pages: int = 1000) -> None:
        self.path = path
        self.interval_s = interval_s
        self.max_pages = max_pages
        self.wal_pages = 0  # the WAL's pages at the thread's last checkpoint
        self.checkpoints = 0  # PASSIVE checkpoints run (for tests and stats)
        self.failed: BaseException | None = None  # set when the thread stopped on an error
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fm-wal-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """The writer committed: a checkpoint is due (within ``interval_s``)."""
        self._wake.set()

    def writer_should_checkpoint(self) -> bool:
        """Whether the WAL outgrew ``max_pages`` (the writer then checkpoints after its commit, and calls
        :meth:`writer_checkpointed`)."""
        return self.wal_pages > self.max_pages

    def writer_checkpointed(self) -> None:
        """The writer checkpointed every commit: its next transaction starts the WAL over."""
        self.wal_pages = 0

    def stop(self) -> None:
        """End the thread (the writer's close checkpoints what is left)."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5)
        except sqlite3.Error as exc:
            self._fail(exc)
            return
        try:
            while not self._stop.is_set():
                self._wake.wait()
                if self._stop.is_set():
                    break
                self._wake.clear()
                _, self.wal_pages, _ = con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                self.checkpoints += 1
                self._stop.wait(self.interval_s)  # commits meanwhile set _wake: one checkpoint covers them
        except sqlite3.Error as exc:
            self._fail(exc)
        finally:
            con.close()

    def _fail(self, exc: BaseException) -> None:
        log.error("WAL checkpoints of %s failed (%s): the writer's commits checkpoint again", self.path, exc)
        self.failed = exc
