"""WAL checkpoints of a SQLite store off the writer's thread.

SQLite checkpoints a WAL database from inside the commit that pushes the WAL past ``wal_autocheckpoint``
pages: that commit copies every page of the WAL into the database and syncs both files, and the batch it
belongs to waits (30-40 ms at 10,000 pages, the slowest commits of a stream of small batches). Here a thread
with a connection of its own runs ``PRAGMA wal_checkpoint(PASSIVE)`` while the writer goes on (a passive
checkpoint takes no lock a writer needs), about every ``pages`` frames: the writer counts its transactions,
and the thread checkpoints once they add up to about ``pages`` frames at what a transaction added before
(SQLite reports the WAL's length). So each checkpoint copies about as much as the writer's own did, a page
rewritten meanwhile is copied once, and a burst after a quiet spell is met within ``_POLL_S``. Only a writer
starts the WAL over, so each time this thread has copied every frame, the writer copies what came since (a
batch or two) before its next transaction, and the WAL starts over (:meth:`Checkpointer.due`).
The writer's automatic checkpoint stays, at a higher mark, in case this thread falls behind or stops.

(Not read from the wal-index ``-shm`` file instead: opening and closing any file of the database in this
process would drop SQLite's POSIX locks on it, and another process could then truncate the ``-shm`` this
process maps: SIGBUS.)
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path

__all__ = ["Checkpointer"]

log = logging.getLogger(__name__)

_POLL_S = 0.05  # how often the thread looks at the writer's count of commits
_MAX_S = 2.0  # the longest time between checkpoints
_CATCH_UP = 3  # checkpoints at most, one after another, of what the writer committed during the one before


class Checkpointer:
    """A daemon thread that checkpoints ``db`` (PASSIVE) about every ``pages`` new WAL frames."""

    def __init__(self, db: Path, pages: int) -> None:
        self.db = db
        self.pages = pages
        self.checkpoints = 0  # passive checkpoints that copied frames
        self.copied = 0  # frames they copied
        self.failures = 0  # checkpoints that raised (a full disk, a lock): the next one tries again
        self.restarts = 0  # times the writer copied the rest before a transaction, so the WAL started over
        self._due = False  # this thread copied every frame: the writer's turn to copy the rest
        self.commits = 0  # transactions the writer began (it counts them): the thread paces itself by them
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fm-sqlite-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        con: sqlite3.Connection | None = None
        last_log = seen = 0
        per_commit = 0.0  # frames a commit adds to the WAL, learnt from the checkpoints (0: not yet)
        commits_at, last_t = self.commits, time.monotonic()
        small = max(1, self.pages // 50)  # frames: what the writer copies in about a millisecond
        try:
            while not self._stop.wait(_POLL_S):
                commits, now = self.commits, time.monotonic()
                n = commits - commits_at
                # about `pages` new frames since the last checkpoint (the first commits: at once, to learn
                # their size), or _MAX_S went by (another connection may have written)
                if now - last_t < _MAX_S and (n == 0 or (per_commit and n * per_commit < self.pages)):
                    continue
                commits_at, last_t = commits, now
                try:
                    if con is None:
                        con = sqlite3.connect(self.db, isolation_level=None, check_same_thread=False, timeout=1)
                    _busy, frames, done = con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    # again while the writer committed much during the one before: what is left for it when
                    # it starts the WAL over (:meth:`due`) stays small
                    for _ in range(_CATCH_UP):
                        before, copied = frames, done
                        if done < frames:  # a reader holds the rest: nothing more to copy now
                            break
                        _busy, frames, done = con.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                        if frames - before <= small or frames < before or done <= copied:
                            break
                except sqlite3.Error as exc:
                    self.failures += 1
                    log.debug("WAL checkpoint of %s failed: %s; trying again", self.db, exc)
                    continue
                if frames < 0:  # not in WAL mode (yet)
                    continue
                # the WAL started over meanwhile (the writer says so; a shorter WAL shows it too)
                restarted, seen = self.restarts != seen, self.restarts
                grown = frames if restarted or frames < last_log else frames - last_log
                last_log = frames
                if n > 0 and grown > 0:
                    per_commit = grown / n if not per_commit else 0.7 * per_commit + 0.3 * grown / n
                if done == frames and frames > 0:  # set last: the writer reads it without a lock
                    self._due = True
                if done > 0 and grown > 0:
                    self.checkpoints += 1
                    self.copied += grown
        finally:
            if con is not None:
                con.close()

    def due(self) -> bool:
        """Whether the writer should checkpoint (PASSIVE) before its next transaction, so the WAL starts over.

        Only a writer starts the WAL over, when it begins a transaction with every frame copied; this
        thread's checkpoints end while the writer is inside a transaction. So each time this thread has
        copied every frame, the writer copies what was committed since (a batch or two: under a
        millisecond) before its next one. Without it the WAL grew to the writer's automatic checkpoint,
        which runs inside a commit (20-75 ms of CPU every ~40,000 frames of a stream of small batches);
        waiting until the WAL was long left the writer up to a checkpoint interval of frames (up to 43 ms),
        both measured with ``bench/batch_cost.py``."""
        return self._due

    def tried(self, started_over: bool) -> None:
        """The writer checkpointed (:meth:`due`); ``started_over``: every frame was copied, the WAL starts over."""
        self._due = False
        if started_over:
            self.restarts += 1

    def close(self) -> None:
        """Stop the thread (after the checkpoint in hand, if any)."""
        self._stop.set()
        self._thread.join(timeout=30)
