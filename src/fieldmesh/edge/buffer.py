"""Store-and-forward buffer on disk: append-only segment files of CRC-framed records.

Why segments and not SQLite: the buffer is a queue (append at one end, advance at the other);
append-only files make that one ``write`` (+ ``fsync``) per batch, deleting acknowledged data is
unlinking a file, and recovery is a linear scan that can tell exactly which bytes are bad. SQLite
WAL would work too, but pays B-tree updates and deletes for a FIFO and hides torn data behind its
own recovery.

Layout of ``path``::

    00000000000000000001.seg   records with seq >= 1 (the name is the first seq)
    ack                        the highest acknowledged seq (every record <= it was PUBACKed)
    quarantine/                bytes set aside by recovery (torn tails, corrupt records)

Record framing (little endian)::

    magic "FM" | length u32 | crc32 u32 | seq u64 | count u32 | payload (length bytes)

``crc32`` covers seq, count and payload. ``count`` is the number of readings in the payload,
which makes the dropped counter exact.

Durability (``fsync``): ``always`` fsyncs the segment after every append, before ``append``
returns, so a batch acknowledged to its source survives kill -9 and power loss; ``interval``
fsyncs at most every ``fsync_interval_ms`` (kill -9 is still safe: the data is in the page cache;
power loss may lose the last interval); ``never`` leaves it to the OS. The ``ack`` file is not
fsynced: losing it re-sends acknowledged records, which downstream de-duplication absorbs.

A full disk (``ENOSPC``) is handled like a full buffer: the partial write is truncated away (the
segment still ends on a record boundary, so nothing is corrupted) and the policy applies.

Full policy: ``drop_oldest`` deletes the oldest segments (counting the unacknowledged readings in
them in ``dropped_readings``); ``block`` raises :class:`BufferFull` and the agent stops reading its
sources until the uplink frees space.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from fieldmesh.core.errors import FieldmeshError

__all__ = ["BufferFull", "BufferStats", "DiskBuffer", "Record"]

MAGIC: Final = b"FM"
_HDR: Final = struct.Struct("<2sIIQI")
HEADER_SIZE: Final = _HDR.size
_SEQCOUNT: Final = struct.Struct("<QI")
_MAX_RECORD: Final = 64 * 1024 * 1024
#: errnos of a full disk (and of a file size limit, which behaves the same for the buffer)
_DISK_FULL: Final = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class BufferFull(FieldmeshError):
    """The buffer is full and its policy is ``block``."""


@dataclass(frozen=True, slots=True)
class Record:
    """One buffered batch."""

    seq: int
    count: int
    payload: bytes


@dataclass(slots=True)
class BufferStats:
    """Counters of a buffer (all since it was opened, except the pending figures)."""

    appended_records: int = 0
    appended_readings: int = 0
    acked_records: int = 0
    dropped_records: int = 0
    dropped_readings: int = 0
    #: bad regions set aside by recovery (a torn tail counts as one)
    corrupt_records: int = 0
    corrupt_bytes: int = 0
    recovered_records: int = 0
    recovered_readings: int = 0
    blocked: int = 0
    #: appends that hit a full disk (the full policy then applies)
    disk_full: int = 0


@dataclass(slots=True)
class _Seg:
    path: Path
    seqs: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    size: int = 0

    @property
    def first(self) -> int:
        return self.seqs[0] if self.seqs else -1

    @property
    def last(self) -> int:
        return self.seqs[-1] if self.seqs else -1


def _frame(seq: int, count: int, payload: bytes) -> bytes:
    crc = zlib.crc32(payload, zlib.crc32(_SEQCOUNT.pack(seq, count)))
    return _HDR.pack(MAGIC, len(payload), crc, seq, count) + payload


def _parse_at(data: bytes, off: int) -> tuple[int, int, int, int] | None:
    """(seq, count, payload offset, payload length) of a valid record at ``off``, else None."""
    if off + HEADER_SIZE > len(data):
        return None
    magic, length, crc, seq, count = _HDR.unpack_from(data, off)
    if magic != MAGIC or length > _MAX_RECORD or off + HEADER_SIZE + length > len(data):
        return None
    start = off + HEADER_SIZE
    payload = memoryview(data)[start : start + length]
    if zlib.crc32(payload, zlib.crc32(_SEQCOUNT.pack(seq, count))) != crc:
        return None
    return seq, count, start, length


class DiskBuffer:
    """The store-and-forward buffer (single writer, single reader; not thread-safe).

    Args:
        path: its directory (created).
        max_bytes: bound on the segment files' total size.
        segment_bytes: a segment is closed once it is this large.
        full_policy: ``drop_oldest`` or ``block``.
        fsync: ``always``, ``interval`` or ``never`` (see the module docstring).
        fsync_interval_ms: for ``interval``.
    """

    def __init__(
        self,
        *,
        path: str | Path,
        max_bytes: int = 256 * 1024 * 1024,
        segment_bytes: int = 4 * 1024 * 1024,
        full_policy: Literal["drop_oldest", "block"] = "drop_oldest",
        fsync: Literal["always", "interval", "never"] = "always",
        fsync_interval_ms: int = 200,
    ) -> None:
        if full_policy not in ("drop_oldest", "block"):
            raise ValueError("full_policy must be drop_oldest or block")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = min(segment_bytes, max_bytes)
        self.full_policy = full_policy
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_ms / 1000
        self.stats = BufferStats()
        self._segs: list[_Seg] = []
        self._fh: object | None = None
        self._fd: int | None = None
        self._dirty = False
        self._last_sync = time.monotonic()
        self._acked = self._read_ack()
        self._recover()
        last = self._segs[-1].last if self._segs and self._segs[-1].seqs else self._acked
        self._next_seq = max(last, self._acked) + 1
        self._read_seq = self._acked + 1
        self._ack_written = self._acked

    # -- recovery --------------------------------------------------------------------------
    def _read_ack(self) -> int:
        try:
            return int((self.path / "ack").read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def _quarantine(self, seg: Path, off: int, bad: bytes) -> None:
        q = self.path / "quarantine"
        q.mkdir(exist_ok=True)
        (q / f"{seg.stem}.{off}.bad").write_bytes(bad)
        self.stats.corrupt_records += 1
        self.stats.corrupt_bytes += len(bad)

    def _recover(self) -> None:
        for p in sorted(self.path.glob("*.seg")):
            data = p.read_bytes()
            seg = _Seg(path=p)
            good: list[bytes] = []
            off = 0
            damaged = False
            while off < len(data):
                rec = _parse_at(data, off)
                if rec is None:
                    # resynchronise on the next valid record; everything in between is set aside
                    nxt = data.find(MAGIC, off + 1)
                    while nxt != -1 and _parse_at(data, nxt) is None:
                        nxt = data.find(MAGIC, nxt + 1)
                    end = len(data) if nxt == -1 else nxt
                    self._quarantine(p, off, data[off:end])
                    damaged = True
                    off = end
                    continue
                seq, count, start, length = rec
                good.append(data[off : start + length])
                seg.seqs.append(seq)
                seg.counts.append(count)
                seg.lengths.append(length)
                off = start + length
            if damaged:
                blob = b"".join(good)
                tmp = p.with_suffix(".tmp")
                with open(tmp, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, p)
            pos = 0
            for frame in good:
                seg.offsets.append(pos)
                pos += len(frame)
            seg.size = pos
            if not seg.seqs or seg.last <= self._acked:
                p.unlink()
                continue
            self._segs.append(seg)
            for s, c in zip(seg.seqs, seg.counts, strict=True):
                if s > self._acked:
                    self.stats.recovered_records += 1
                    self.stats.recovered_readings += c
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- size ------------------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        """Total size of the segment files."""
        return sum(s.size for s in self._segs)

    @property
    def pending_records(self) -> int:
        """Records not yet acknowledged."""
        return sum(sum(1 for q in s.seqs if q > self._acked) for s in self._segs)

    @property
    def pending_readings(self) -> int:
        """Readings not yet acknowledged."""
        return sum(c for s in self._segs for q, c in zip(s.seqs, s.counts, strict=True) if q > self._acked)

    @property
    def acked_seq(self) -> int:
        """Highest acknowledged seq."""
        return self._acked

    @property
    def next_seq(self) -> int:
        """The seq the next append gets."""
        return self._next_seq

    def has_unread(self) -> bool:
        """Whether :meth:`read` would return something."""
        return self._read_seq < self._next_seq and bool(self._segs)

    # -- write -----------------------------------------------------------------------------
    def _close_active(self) -> None:
        if self._fd is not None:
            if self._dirty and self.fsync != "never":
                os.fsync(self._fd)
                self._dirty = False
            os.close(self._fd)
            self._fd = None

    def _open_segment(self, first_seq: int) -> _Seg:
        self._close_active()
        seg = _Seg(path=self.path / f"{first_seq:020d}.seg")
        self._fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._segs.append(seg)
        if self.fsync == "always":
            self._fsync_dir()
        return seg

    def _drop_oldest(self) -> None:
        seg = self._segs[0]
        if len(self._segs) == 1:
            self._close_active()
        for q, c in zip(seg.seqs, seg.counts, strict=True):
            if q > self._acked:
                self.stats.dropped_records += 1
                self.stats.dropped_readings += c
        self._segs.pop(0)
        seg.path.unlink(missing_ok=True)
        if seg.last > self._acked:
            self._acked = seg.last
            self._write_ack()
        self._read_seq = max(self._read_seq, seg.last + 1)

    def append(self, payload: bytes, count: int) -> int:
        """Append one batch of ``count`` readings; durable per the fsync policy when it returns.

        Returns its seq. Raises :class:`BufferFull` when full and the policy is ``block``.
        """
        frame = _frame(self._next_seq, count, payload)
        n = len(frame)
        if n > self.max_bytes:
            raise BufferFull(f"a record of {n} bytes is larger than buffer.max_bytes ({self.max_bytes})")
        while self.size_bytes + n > self.max_bytes and self._segs:
            if self.full_policy == "block":
                self.stats.blocked += 1
                raise BufferFull(f"buffer full ({self.size_bytes} of {self.max_bytes} bytes)")
            self._drop_oldest()
        for attempt in range(len(self._segs) + 2):
            active = self._segs[-1] if self._segs and self._fd is not None else None
            if active is None or (active.size and active.size + n > self.segment_bytes):
                active = self._open_segment(self._next_seq)
            assert self._fd is not None
            try:
                self._write(frame)
                break
            except OSError as exc:
                # roll a partial write back so the segment still ends on a record boundary
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, active.size)
                if exc.errno not in _DISK_FULL:
                    raise
                self.stats.disk_full += 1
                if self.full_policy == "block" or not self._segs or attempt > len(self._segs):
                    raise BufferFull(f"disk full while appending to {active.path.name}: {exc}") from exc
                if not active.seqs:
                    self._segs.pop()
                    self._close_active()
                    active.path.unlink(missing_ok=True)
                if self._segs:
                    self._drop_oldest()
        else:
            raise BufferFull("disk full: nothing left to drop")
        seq = self._next_seq
        active.seqs.append(seq)
        active.offsets.append(active.size)
        active.lengths.append(len(payload))
        active.counts.append(count)
        active.size += n
        self._next_seq += 1
        self.stats.appended_records += 1
        self.stats.appended_readings += count
        return seq

    def _write(self, frame: bytes) -> None:
        assert self._fd is not None
        written = os.write(self._fd, frame)
        while written < len(frame):  # a short write means a full disk: the next write raises ENOSPC
            written += os.write(self._fd, frame[written:])
        self._dirty = True
        if self.fsync == "always":
            os.fsync(self._fd)
            self._dirty = False
        elif self.fsync == "interval":
            self.sync(force=False)

    def sync(self, *, force: bool = True) -> None:
        """fsync pending appends (when ``force`` or the interval has passed)."""
        if self._fd is None or not self._dirty or self.fsync == "never":
            return
        now = time.monotonic()
        if force or now - self._last_sync >= self.fsync_interval_s:
            os.fsync(self._fd)
            self._dirty = False
            self._last_sync = now

    # -- read and acknowledge --------------------------------------------------------------
    def read(self, *, max_records: int = 1000, max_readings: int | None = None) -> list[Record]:
        """The next unread records in seq order (advances the read position, not the ack)."""
        out: list[Record] = []
        total = 0
        firsts = [s.first for s in self._segs]
        si = max(bisect.bisect_right(firsts, self._read_seq) - 1, 0)
        while si < len(self._segs) and len(out) < max_records:
            seg = self._segs[si]
            j = bisect.bisect_left(seg.seqs, self._read_seq)
            if j >= len(seg.seqs):
                si += 1
                continue
            with open(seg.path, "rb") as f:
                while j < len(seg.seqs) and len(out) < max_records:
                    if max_readings is not None and out and total + seg.counts[j] > max_readings:
                        return out
                    f.seek(seg.offsets[j] + HEADER_SIZE)
                    payload = f.read(seg.lengths[j])
                    out.append(Record(seg.seqs[j], seg.counts[j], payload))
                    total += seg.counts[j]
                    self._read_seq = seg.seqs[j] + 1
                    j += 1
            si += 1
        return out

    def rewind(self) -> None:
        """Read again from the first unacknowledged record (after a lost connection)."""
        self._read_seq = self._acked + 1

    def ack(self, seq: int) -> None:
        """Every record with seq <= ``seq`` is delivered: advance, and delete finished segments."""
        if seq <= self._acked:
            return
        for s in self._segs:
            for q in s.seqs:
                if self._acked < q <= seq:
                    self.stats.acked_records += 1
            if s.first > seq:
                break
        self._acked = seq
        while self._segs and self._segs[0].last <= seq:
            seg = self._segs[0]
            if len(self._segs) == 1:
                self._close_active()
            self._segs.pop(0)
            seg.path.unlink(missing_ok=True)
        self._write_ack()

    def _write_ack(self) -> None:
        tmp = self.path / "ack.tmp"
        tmp.write_text(str(self._acked))
        os.replace(tmp, self.path / "ack")

    def close(self) -> None:
        """fsync and close."""
        self._close_active()
