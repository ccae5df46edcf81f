"""Handing freed heap back to the system, for long-running stages with large transient arrays (glibc only).

glibc's malloc keeps memory a process has freed. Two habits of it make a busy processor's RSS grow far
beyond what it holds:

* the mmap threshold moves: a large block (a numpy array of a batch's column, a merge of identity keys) is
  mapped on its own and unmapped when freed, but each such free raises the threshold to that block's size
  (up to 32 MiB), so from then on blocks of that size come from the heap, and the heap keeps them;
* freed chunks in the middle of a heap (or of a thread's arena) are not returned until ``malloc_trim``.

:func:`configure` fixes the mmap threshold (blocks of 1 MiB and more are always mapped on their own, so
freeing one unmaps it at once) and :class:`Trimmer` calls ``malloc_trim(0)`` at most once per interval,
after a batch, which hands the free pages of every arena back. Measured on 20 million identity keys
(docs/benchmarks.md): RSS 481 MB before, 244 MB after one trim. Elsewhere than glibc both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time
from typing import Any, Final

__all__ = ["MMAP_THRESHOLD", "Trimmer", "configure", "trim"]

log = logging.getLogger(__name__)

#: Blocks of this size and more are mapped on their own (glibc's ``M_MMAP_THRESHOLD``, fixed).
MMAP_THRESHOLD: Final = 1 << 20
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3


def _libc() -> Any | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim  # noqa: B018  (glibc's; musl and others have none)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


_LIBC: Final = _libc()
_configured = False


def configure() -> bool:
    """Fix glibc's mmap threshold at :data:`MMAP_THRESHOLD` (and the heap's trim threshold at twice it), once
    per process. True when it applies (glibc)."""
    global _configured
    if _LIBC is None:
        return False
    if not _configured:
        _configured = bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD))
        if not _configured:
            log.warning("mallopt refused the mmap threshold; freed heap may stay resident")
    return _configured


def trim() -> bool:
    """Hand free heap pages of every arena back to the system now. True when it applies (glibc)."""
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True


class Trimmer:
    """``malloc_trim(0)`` at most once per ``interval_s`` (a trim walks every arena's free chunks: about 2 ms on
    a processor holding 20 million keys)."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.trims = 0
        self._next = time.monotonic() + interval_s

    def maybe_trim(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval_s
        if trim():
            self.trims += 1
