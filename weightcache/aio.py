"""Small asyncio helpers shared by the node, the fetcher and the service.

Time comes from a :class:`Clock` so that tests observe schedules (backoff,
reaping, job starts) without sleeping.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any, Protocol

__all__ = ["Clock", "RealClock", "run_all"]


class Clock(Protocol):
    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def run_all(coros: list[Coroutine[Any, Any, None]]) -> None:
    """Run coroutines concurrently; on the first failure cancel the rest and raise it.

    The first error is the one to report; the others are its echoes (siblings
    cancelled, or failing for the same cause), so it is raised unwrapped
    rather than inside an ExceptionGroup.
    """
    try:
        async with asyncio.TaskGroup() as tg:
            for coro in coros:
                tg.create_task(coro)
    except* Exception as group:
        raise group.exceptions[0] from None
