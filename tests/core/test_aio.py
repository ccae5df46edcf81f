"""``core.aio.unless_stopped``: a stage's wait on its source ends when the stage is told to stop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from fieldmesh.core.aio import unless_stopped


async def _slow() -> int:
    await asyncio.sleep(30)
    return 1


async def _fast() -> int:
    return 2


async def _fails() -> int:
    raise ValueError("the source failed")


async def _turns_cancel_into_error() -> int:
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        raise RuntimeError("a client's own error on cancellation") from None
    return 3


def _run(main: Coroutine[Any, Any, None]) -> None:
    asyncio.run(main)


def test_a_result_and_an_error_come_through_while_not_stopped() -> None:
    async def main() -> None:
        stop = asyncio.Event()
        assert await unless_stopped(_fast(), stop) == (True, 2)
        with pytest.raises(ValueError, match="the source failed"):
            await unless_stopped(_fails(), stop)

    _run(main())


@pytest.mark.parametrize("wait", [_slow, _turns_cancel_into_error])
def test_a_stop_ends_the_wait_at_once(wait: Callable[[], Coroutine[Any, Any, int]]) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.05, stop.set)
        t0 = time.monotonic()
        assert await unless_stopped(wait(), stop) == (False, None)
        assert time.monotonic() - t0 < 5  # not the 30 s wait
        assert await unless_stopped(_fast(), stop) == (False, None)  # stopped already: not started

    _run(main())


def test_the_callers_own_cancellation_still_propagates() -> None:
    async def main() -> None:
        stop = asyncio.Event()
        waiting = asyncio.ensure_future(unless_stopped(_slow(), stop))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    _run(main())
