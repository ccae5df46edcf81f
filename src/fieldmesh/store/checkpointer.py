"""WAL checkpoints of a SQLite store off the writer's thread.

SQLite checkpoints a WAL database from inside the commit that pushes the WAL past ``wal_autocheckpoint``
pages: that commit copies every page of the WAL into the database and syncs both files, and the batch it
belongs to waits (30-40 ms at 10,000 pages, the slowest commits of a stream of small batches). Here a thread
with a connection of its own runs ``PRAGMA wal_checkpoint(PASSIVE)`` while the writer goes on (a passive
checkpoint takes no lock a writer needs), about every ``pages`` frames: it times the next checkpoint from
the frames the WAL gained since the last (SQLite reports them), so each copies about as much as the
writer's own did, and a page rewritten meanwhile is copied once. Only a writer starts the WAL over, so once
this thread finds it long the writer copies the rest before its next transaction (:meth:`Checkpointer.long`).
The writer's automatic checkpoint stays, at a higher mark, in case this thread falls behind or stops.

(Not read from the wal-index ``-shm`` file instead: opening and closing any file of the database in this
process would drop SQLite's POSIX locks on it, and another process could then truncate the ``-shm`` this
process maps: SIGBUS.)
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)

_MIN_S, _MAX_S = 0.05, 2.0  # bounds of the wait between checkpoints


class Checkpointer:
    """A daemon thread that checkpoints ``db`` (PASSIVE) about every ``pages`` new WAL frames."""

    def __init__(self, db: Path, pages: int) -> None:
        self.db = db
        self.pages = pages
        self.checkpoints = 0  # passive checkpoints that copied frames
        self.copied = 0  # frames they copied
        self.failures = 0  # checkpoints that raised (a full disk, a lock): the next one tries again
        self.frames = 0  # the WAL's length at the last checkpoint (frames)
        self.restarts = 0  # times the writer checkpointed a long WAL whole before a transaction (it started over)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fm-sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        con: sqlite3.Connection | None = None
        wait = 0.5
        last_log = 0
        try:
            while not self._stop.wait(wait):
                try:
                    if con is None:
                        con = sqlite3.connect(self.db, isolation_level=None, check_same_thread=False, timeout=1)
                    _busy, frames, done = con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:
                    self.failures += 1
                    log.debug("WAL checkpoint of %s failed: %s; trying again", self.db, exc)
                    wait = _MAX_S
                    continue
                if frames < 0:  # not in WAL mode (yet)
                    wait = _MAX_S
                    continue
                grown = frames - last_log if frames >= last_log else frames  # the WAL started over meanwhile
                last_log = self.frames = frames
                if done > 0 and grown > 0:
                    self.checkpoints += 1
                    self.copied += grown
                # next time about `pages` new frames, moving the wait by at most 2x a step
                wait = min(_MAX_S, max(_MIN_S, wait * min(2.0, max(0.5, self.pages / max(grown, 1)))))
        finally:
            if con is not None:
                con.close()

    def long(self) -> bool:
        """Whether the WAL is long: the writer should checkpoint (PASSIVE) before its next transaction.

        Only a writer starts the WAL over, when it begins a transaction and every frame has been copied;
        this thread's checkpoints end while the writer is inside a transaction, so without that the WAL
        grows to the writer's automatic checkpoint, which runs inside a commit (20-75 ms of CPU every
        ~40,000 frames of a stream of small batches, measured with ``bench/batch_cost.py``)."""
        return self.frames >= self.pages

    def started_over(self) -> None:
        """The writer checkpointed the WAL whole: it starts over."""
        self.frames = 0
        self.restarts += 1

    def close(self) -> None:
        """Stop the thread (after the checkpoint in hand, if any)."""
        self._stop.set()
        self._thread.join(timeout=30)
