"""Small asyncio helpers shared by the stages."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def unless_stopped(coro: Coroutine[Any, Any, T], stop: asyncio.Event) -> tuple[bool, T | None]:
    """Await ``coro`` unless ``stop`` is set first: (True, its result), or (False, None) after cancelling it.

    For a stage's wait on its source (a fetch that waits up to a second for a first record): a stop ends the wait
    at once instead of after it. Only for what is safe to cancel: a fetch whose records are not acknowledged yet
    (the bus or broker gives them again). A result that is ready when ``stop`` is set too is returned, not dropped.
    """
    if stop.is_set():
        coro.close()
        return False, None
    task = asyncio.ensure_future(coro)
    stopping = asyncio.ensure_future(stop.wait())
    cancelled = False
    try:
        await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
            cancelled = True
            # however the cancelled wait ends (a client may turn the cancellation into an error of its own), the
            # stage is stopping and what it took is unacknowledged: dropped, not raised
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if cancelled or task.cancelled():
        return False, None
    return True, task.result()
