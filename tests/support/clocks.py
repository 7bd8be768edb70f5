"""Time for tests: a clock that moves only when the test moves it, and a bounded wait.

:class:`ManualClock` implements :class:`weightcache.aio.Clock` (``monotonic``,
``sleep``) and gives a matching ``wall`` for ``Service(wall=...)``: a sleeper
wakes when the test :meth:`~ManualClock.advance`\\ s time past its deadline,
never by itself. Unlike :class:`tests.support.origins.FakeClock` (whose
``sleep`` moves time at once) a service's background loops (the lease reaper,
the job scheduler) stay parked until the test says that time passed, so a test
can look at the state just before and just after a deadline.

:func:`eventually` waits, in real time and bounded, for work that runs in
threads (a hop into the metadata pool) to show.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable

__all__ = ["ManualClock", "eventually"]


class ManualClock:
    """Monotonic and wall time that move only in :meth:`advance`."""

    def __init__(self, start: float = 1000.0, epoch: float = 1_800_000_000.0) -> None:
        self.now = start
        self._wall_offset = epoch - start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        """Seconds since the epoch, moving with :attr:`now` (for ``Service(wall=...)``)."""
        return self.now + self._wall_offset

    @property
    def sleeping(self) -> int:
        """Sleepers still waiting for their deadline."""
        return sum(1 for _, _, fut in self._sleepers if not fut.done())

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + seconds, next(self._seq), fut))
        await fut  # a cancelled sleeper leaves a cancelled future behind: skipped below

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper at its deadline in order and letting
        what it does next on the loop run before time moves on."""
        target = self.now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, fut = heapq.heappop(self._sleepers)
            if fut.done():
                continue
            self.now = max(self.now, deadline)
            fut.set_result(None)
            for _ in range(5):
                await asyncio.sleep(0)
        self.now = target
        await asyncio.sleep(0)


async def eventually(
    predicate: Callable[[], object], *, timeout_s: float = 10.0, what: str = "condition"
) -> None:
    """Wait (polling every 10 ms, real time) until ``predicate()`` is true; fail after
    ``timeout_s`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.01)
