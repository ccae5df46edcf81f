"""Child-process helpers: children die with their parent, even on kill -9."""

from __future__ import annotations

import ctypes
import signal
import sys

__all__ = ["child_preexec"]

_PR_SET_PDEATHSIG = 1


def child_preexec() -> None:
    """Run in the child before exec: ask Linux to SIGKILL it when its parent dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
