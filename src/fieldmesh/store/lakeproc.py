"""The lake sink in a process of its own: the processor pays a pickle per committed batch, not the commit.

:class:`LakeProcess` is the :class:`~fieldmesh.store.base.Sink` the processor holds. It starts a child
process (``multiprocessing``, forked) that runs a :class:`~fieldmesh.store.lake.LakeSink` and hands it
each result through a pipe; the child buffers, converts to Arrow, merges rollups, writes Parquet and
commits on the commit policy, on its own interpreter (its own GIL) and so on the other core. In the
processor's thread of a ``LakeSink`` those steps took the GIL from the processor (16-46% of its
throughput on two cores, docs/benchmarks.md).

Exactly once is the ``LakeSink``'s, unchanged: :meth:`LakeProcess.applied` asks the child for what its
tables committed, never what is buffered or in the pipe, so a crash of either process costs a replay from
the bus. The child (forked) dies with the processor (``PR_SET_PDEATHSIG``; it also exits when the pipe closes), so
a restarted processor never shares the tables with the child of its predecessor. Back-pressure: the child
stops reading the pipe while its buffer is full, and the processor's next ``write`` waits.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fieldmesh.core.batch import BatchResult, Position
from fieldmesh.core.settings import LakeSettings
from fieldmesh.obs import tracing
from fieldmesh.store.lake import POSITIONED, LakeError, LakeView

__all__ = ["LakeProcess"]

log = logging.getLogger(__name__)

_QUEUED = 64  # results on their way to the child at most
#: ... and about this many bytes of them (:func:`_size`), but always one. A backlog's batch of 25,000 readings
#: holds about 11 MB as a result (tracemalloc), so 64 of them waiting while the child commits could hold 700 MB.
#: The child buffers up to twice ``lake.commit_bytes`` itself; this queue only has to keep the pipe busy.
_QUEUED_BYTES = 8 << 20


def _size(result: BatchResult) -> int:
    """About the memory ``result`` holds while it waits for the pipe: its readings as columns (a string of
    measurements and a few numbers each, about 400 bytes), its windows and its dead letters."""
    return (400 * len(result.new) + 120 * sum(len(wd) for wd in result.windows.values())
            + sum(len(d.payload) + 200 for d in result.dead_letters))


_NO_TEXT = np.empty(0, dtype=object)


def _packed(result: BatchResult) -> tuple[BatchResult, bytes, NDArray[np.int64]]:
    """``result`` for the pipe: its readings' ``measurements_json`` as one UTF-8 buffer and its offsets, which
    pickle as two buffers and which the child reads as an arrow column without a copy (:func:`_unpacked`); in
    the result itself the column is left empty. Pickled as a str per reading, the column was most of the
    processor's cost of a result (0.15 of 0.25 CPU-µs a reading), and the child then made a str of each and
    converted them to arrow again."""
    texts = result.new.measurements_json.tolist()
    joined = "".join(texts)
    data = joined.encode()
    sizes = map(len, texts) if len(data) == len(joined) else map(len, map(str.encode, texts))  # ASCII: chars
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(sizes, np.int64, len(texts)), out=offsets[1:])
    return dataclasses.replace(result, new=dataclasses.replace(result.new, measurements_json=_NO_TEXT)), data, offsets


def _unpacked(data: bytes, offsets: NDArray[np.int64]) -> Any:
    """The ``measurements_json`` column of :func:`_packed` as arrow (``large_string``: int64 offsets)."""
    import pyarrow as pa

    return pa.LargeStringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(data))


class LakeProcess:
    """A :class:`~fieldmesh.store.lake.LakeSink` in a child process (module docstring)."""

    name = "lake"

    def __init__(self, *, settings: LakeSettings, data_dir: Path, writer: str | None = None) -> None:
        # forked, not spawned: the child starts at once with the modules the processor imported (a spawned
        # one imports them again, seconds on a loaded machine, while a restarted processor waits)
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, name="fm-lake",
                                 args=(settings.model_dump(), str(data_dir), writer, child, os.getpid(), self._conn))
        self._proc.start()
        child.close()
        # at exit without close() (an error before the processor's finally): the pipe closes first, so the
        # child exits (without committing) before multiprocessing waits for it
        atexit.register(self._abandon)
        self._lock = threading.Lock()  # the pipe
        self._state = threading.Lock()  # what was handed over (write)
        self._error: str | None = None
        self._closed = False
        self._last: BatchResult | None = None  # the result the child holds last (the next view's write reuses it)
        self.handed = 0  # results handed to the child ("write" and "again" messages; one a batch as a rule)
        self._sent: dict[str, dict[Position, int]] | None = None  # per table; None: the child is not ready
        with self._lock:  # the tables open (as a LakeSink in the processor opened them: a processor reported
            self._ready()  # running is ready to apply)
        # results go to the pipe from a thread of their own: a send blocks while the child reads it (a pipe
        # holds 64 KiB), and the child reads between its commit's steps; the processor only waits when
        # _QUEUED results, or _QUEUED_BYTES of them, are on their way (back-pressure)
        self._queue: queue.Queue[tuple[tuple[Any, ...], int] | None] = queue.Queue(maxsize=_QUEUED)
        self._room = threading.Condition()  # for _queued_bytes
        self._queued_bytes = 0  # _size() of the results in the queue and in the pipe
        self._sender = threading.Thread(target=self._send_loop, name="fm-lake-send", daemon=True)
        self._sender.start()

    def _ready(self) -> dict[str, dict[Position, int]]:
        """Wait for the child to have opened the tables (the processor starts meanwhile); the lock is held."""
        if self._sent is None:
            committed: dict[str, dict[Position, int]] = self._roundtrip("ready")
            self._sent = {t: dict(p) for t, p in committed.items()}
        return self._sent

    def views(self) -> list[LakeView]:
        """The processor's sinks: one per table (each resumes at its own positions, see
        :meth:`fieldmesh.store.lake.LakeSink.views`), known before the child has opened the tables."""
        return [LakeView(self, (t,)) for t in POSITIONED]

    # -- the Sink contract -------------------------------------------------------------------------

    def applied(self) -> dict[Position, int]:
        """Positions every table committed (asked from the child; never what is buffered)."""
        return self.applied_of(POSITIONED)

    def applied_of(self, tables: Iterable[str]) -> dict[Position, int]:
        return dict(self._call("applied", tuple(tables)))

    def write(self, result: BatchResult, *, tables: Iterable[str] = POSITIONED) -> bool:
        """Hand ``result`` to the child for ``tables``; False when every position was handed over already."""
        with self._state:
            if self._error is not None:
                raise LakeError(f"lake sink stopped: {self._error}")
            sent_all = self._sent
            assert sent_all is not None
            todo = tuple(t for t in tables
                         if any(o > sent_all[t].get(p, -1) for p, o in result.positions.items()))
            if not todo:
                return False
            # The other tables that stand where this view's first does at the result's partitions take the
            # result in the same message: their own views then find it handed over. One pipe message a batch
            # instead of one per table (the views, one per table, are made before the child opens them).
            ref = sent_all[todo[0]]
            todo += tuple(t for t in POSITIONED if t not in todo
                          and all(sent_all[t].get(p, -1) == ref.get(p, -1) for p in result.positions))
            trace = tracing.current_traceparent() if tracing.enabled() else None
            self.handed += 1
            if result is self._last:
                self._queue.put((("again", todo, trace), 0))
            else:
                size = _size(result)
                with self._room:  # back-pressure by bytes too (the sender frees them as it sends)
                    self._room.wait_for(lambda: self._queued_bytes == 0 or self._error is not None
                                        or self._queued_bytes + size <= _QUEUED_BYTES)
                    self._queued_bytes += size
                self._queue.put((("write", result, todo, trace), size))
                self._last = result
            for t in todo:
                sent = sent_all[t]
                for p, o in result.positions.items():
                    if o > sent.get(p, -1):
                        sent[p] = o
        return True

    def flush(self) -> None:
        """Commit what the child buffered now (and wait for it)."""
        self._call("flush")

    def read_features(self, store_url: str) -> None:
        """Copy the hot store's feature rows to the ``features`` table (the child opens ``store_url``)."""
        self._call("features", store_url)

    def stats(self) -> dict[str, Any]:
        """``lag_ms``, ``commits``, ``rows_committed``, ``last_commit_ms`` of the child's sink."""
        return dict(self._call("stats"))

    def lag_ms(self) -> int:
        return int(self.stats()["lag_ms"])

    def close(self) -> None:
        """Commit what is buffered, stop the child and wait for it."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._abandon)
        try:
            self._queue.put(None)
            self._sender.join()
            if self._proc.is_alive() and self._error is None:
                self._call("close")
        finally:
            self._conn.close()
            self._proc.join(timeout=60)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()

    def _abandon(self) -> None:
        if not self._closed:
            self._closed = True
            self._conn.close()

    # -- the pipe ----------------------------------------------------------------------------------

    def _check(self) -> None:
        """Raise the child's error, if it sent one (the lock is held)."""
        while self._error is None and self._conn.poll(0):
            try:
                kind, value = self._conn.recv()
            except EOFError:
                self._error = "the lake writer process exited"
                break
            if kind == "error":
                self._error = str(value)
        if self._error is not None:
            raise LakeError(f"lake sink stopped: {self._error}")

    def _send_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            msg, size = item
            try:
                if self._error is None:
                    if msg[0] == "write":
                        msg = ("write", _packed(msg[1]), *msg[2:])
                    # pickled here, at protocol 5 (numpy arrays as buffers), not by Connection.send: its pickler
                    # (protocol 4, multiprocessing's reducers) took twice as long over a result
                    blob = pickle.dumps(msg, protocol=5)
                    with self._lock:
                        self._conn.send_bytes(blob)
                        self._check()
            except LakeError:
                pass  # the next write raises it
            except (BrokenPipeError, EOFError, OSError) as exc:
                self._error = self._error or (f"the lake writer process is gone ({exc}); what it had not committed "
                                              "comes again from the bus at the next start")
            finally:
                if size:
                    with self._room:
                        self._queued_bytes -= size
                        self._room.notify_all()
                self._queue.task_done()
        self._queue.task_done()

    def _call(self, op: str, *args: Any) -> Any:
        if getattr(self, "_sender", None) is not None and self._sender.is_alive():
            self._queue.join()  # the writes before it are in the pipe
        with self._lock:
            self._ready()
            self._check()
            return self._roundtrip(op, *args)

    def _roundtrip(self, op: str, *args: Any) -> Any:
        """Send ``op`` (``ready``: nothing, the child says it first) and wait for its answer; the lock is held."""
        try:
            if op != "ready":
                self._conn.send((op, *args))
            while True:
                kind, value = self._conn.recv()
                if kind == "ok":
                    return value
                self._error = str(value)
                raise LakeError(f"lake sink stopped: {value}")
        except (BrokenPipeError, EOFError, OSError) as exc:
            self._error = self._error or f"the lake writer process is gone ({exc})"
            raise LakeError(f"lake sink stopped: {self._error}") from exc


class _Frames:
    """Reads what the processor sends on the pipe (``Connection.send_bytes``'s frames: a 4-byte big-endian length,
    or -1 and an 8-byte length, then the bytes) into a buffer kept from frame to frame, and unpickles it.

    ``Connection.recv`` reads a frame with ``os.read`` of all that is left of it (a new bytes object of that size
    for each pipe's worth, 64 KiB), appends each to a ``BytesIO`` and copies the whole again: twice the child's CPU
    for a result's frame (0.12-0.16 against 0.07 CPU-µs per 150 bytes, a reading's share; docs/benchmarks.md).
    Here ``os.readv`` reads straight into the buffer. What is unpickled is copied out of it (pickle makes its own
    objects of in-band data), so the next frame can use it again."""

    _KEEP = 64 << 20  # a buffer up to this size is kept for the next frame

    def __init__(self, conn: Any) -> None:
        self.fd = conn.fileno()
        self.buf = bytearray(1 << 20)

    def _fill(self, view: memoryview) -> None:
        got, size = 0, len(view)
        while got < size:
            n = os.readv(self.fd, [view[got:]])
            if n == 0:
                raise EOFError("the pipe closed")
            got += n

    def recv(self) -> Any:
        head = bytearray(8)
        self._fill(memoryview(head)[:4])
        size = int.from_bytes(head[:4], "big", signed=True)
        if size == -1:
            self._fill(memoryview(head))
            size = int.from_bytes(head, "big")
        buf = self.buf if size <= len(self.buf) else bytearray(size)
        if len(buf) <= self._KEEP:
            self.buf = buf
        view = memoryview(buf)[:size]
        try:
            self._fill(view)
            return pickle.loads(view)
        finally:
            view.release()


def _die_with_parent(parent: int) -> None:
    """Be killed when the processor dies (Linux ``PR_SET_PDEATHSIG``); exit now if it is gone already."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _child(settings: dict[str, Any], data_dir: str, writer: str | None, conn: Any, parent: int,
           parents_end: Any) -> None:
    """The child's loop: one message at a time from the processor."""
    from fieldmesh.obs import logs

    _die_with_parent(parent)
    parents_end.close()  # so that the processor's end closing (its exit) reads as the end of the pipe here
    for sig in (signal.SIGINT, signal.SIGTERM):  # the processor stops it, after its last batch
        signal.signal(sig, signal.SIG_IGN)
    logs.setup_logging("lake", fmt="%(asctime)s lake %(levelname)s %(message)s")
    tracing.setup("fieldmesh-processor")
    # arrow's C++ default pool is chosen at its first use from this variable (pyarrow's set_memory_pool below
    # covers only what pyarrow allocates itself, and the case where the processor used arrow before the fork)
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    import pyarrow as pa

    from fieldmesh.core import heap
    from fieldmesh.store.lake import LakeSink

    # arrow's memory from malloc, whose mmap threshold the processor fixed (fieldmesh.core.heap) and which the
    # sink trims after each commit: arrow's default pool (mimalloc) kept what each commit freed, and the
    # child grew commit after commit (docs/lake.md, "Memory")
    pa.set_memory_pool(pa.system_memory_pool())
    heap.configure()

    try:
        sink = LakeSink(settings=LakeSettings.model_validate(settings), data_dir=Path(data_dir), writer=writer)
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", {t: sink.applied_of((t,)) for t in POSITIONED}))
    store: Any = None
    last: BatchResult | None = None
    text: Any = None  # last's measurements_json, as arrow
    frames = _Frames(conn)
    while True:
        try:
            msg = frames.recv()
        except (EOFError, OSError):  # the processor is gone: what is buffered comes again from the bus
            os._exit(0)
        op = msg[0]
        try:
            if op in ("write", "again"):
                if op == "write":
                    last, data, offsets = msg[1]
                    text = _unpacked(data, offsets)
                assert last is not None
                sink.write(last, tables=msg[-2], trace=tracing.context_of(msg[-1]) if msg[-1] else None,
                           measurements_json=text)
                continue
            if op == "applied":
                reply: Any = sink.applied_of(msg[1])
            elif op == "flush":
                sink.flush()
                reply = None
            elif op == "stats":
                reply = {"lag_ms": sink.lag_ms(), "commits": sink.commits, "rows_committed": sink.rows_committed,
                         "last_commit_ms": sink.last_commit_ms}
            elif op == "features":
                from fieldmesh.store import load_store
                from fieldmesh.store.features import FeatureTables

                store = load_store(msg[1])
                sink.features_source = functools.partial(FeatureTables.after, store)
                reply = None
            elif op == "close":
                sink.close()
                conn.send(("ok", None))
                break
            else:
                raise ValueError(f"unknown lake message {op!r}")
            conn.send(("ok", reply))
        except BaseException as exc:
            log.error("lake writer: %s failed: %s", op, exc)
            with contextlib.suppress(Exception):
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
            if op == "close":
                break
    if store is not None:
        store.close()
    tracing.shutdown()
