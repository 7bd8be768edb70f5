"""Admission and ordering of origin work: priority slots, single-flight, stagger.

Pure decisions (which waiter goes next, when a scheduled prefetch starts on
this node) are plain functions or small data structures; the asyncio parts
only park and wake tasks.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar

from weightcache.errors import RequestInvalid
from weightcache.hashing import digest_bytes

K = TypeVar("K")
V = TypeVar("V")


class Priority(enum.IntEnum):
    """Lower goes first: a worker blocked in ``load``, then admin prefetch, then background."""

    WORKER = 0
    ADMIN = 1
    BACKGROUND = 2

    @classmethod
    def parse(cls, value: object) -> Priority:
        if isinstance(value, Priority):
            return value
        if isinstance(value, str) and value.upper() in cls.__members__:
            return cls[value.upper()]
        names = ", ".join(m.lower() for m in cls.__members__)
        raise RequestInvalid(f"priority must be one of {names}, got {value!r}", field="priority")

    @property
    def label(self) -> str:
        return self.name.lower()


class Urgency:
    """A pull's priority, raised while it runs when a more urgent waiter joins it
    (a worker joining a background prefetch must not wait at background priority).
    Read at every slot request, so the chunks still to come go at the new priority."""

    def __init__(self, priority: Priority) -> None:
        self.priority = priority

    def raise_to(self, priority: Priority) -> None:
        self.priority = min(self.priority, priority)

    def __int__(self) -> int:
        return int(self.priority)

    def __repr__(self) -> str:
        return f"Urgency({self.priority.label})"


@dataclass(eq=False)
class _Waiter:
    #: read when a slot is handed out, not when the waiter queued: an Urgency
    #: raised meanwhile moves its waiting chunks ahead
    priority: int | Urgency
    seq: int
    future: asyncio.Future[None]

    def order(self) -> tuple[int, int]:
        return int(self.priority), self.seq


class PrioritySlots:
    """A semaphore whose waiters are served by priority, then first come first served.

    This is the node-wide cap on concurrent origin requests: every chunk GET of
    every pull takes one slot. A waiter's priority is read when a slot frees
    (a linear pass over the waiters: a few hundred chunks at most), so raising
    a pull's :class:`Urgency` reorders the chunks it already queued.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = capacity
        self._waiters: list[_Waiter] = []
        self._seq = itertools.count()

    @property
    def in_use(self) -> int:
        return self.capacity - self._free

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.future.done())

    @asynccontextmanager
    async def slot(self, priority: int | Urgency = Priority.WORKER) -> AsyncIterator[None]:
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: int | Urgency) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        waiter = _Waiter(priority, next(self._seq), asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._release()  # woken and cancelled at once: pass the slot on
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _release(self) -> None:
        self._waiters = [w for w in self._waiters if not w.future.done()]
        if self._waiters:
            waiter = min(self._waiters, key=_Waiter.order)
            self._waiters.remove(waiter)
            waiter.future.set_result(None)
            return
        self._free += 1


class SingleFlight(Generic[K, V]):
    """Concurrent calls for the same key share one execution and its result or error.

    The shared task is owned here, not by the first caller: a caller that goes
    away (a closed connection) does not cancel the work the others wait for.
    """

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._tasks

    def __len__(self) -> int:
        return len(self._tasks)

    def keys(self) -> list[K]:
        return list(self._tasks)

    async def run(self, key: K, fn: Callable[[], Awaitable[V]]) -> tuple[V, bool]:
        """Return (result, joined): joined is True when another call was already running."""
        task = self._tasks.get(key)
        joined = task is not None
        if task is None:

            async def runner() -> V:
                try:
                    return await fn()
                finally:
                    self._tasks.pop(key, None)

            task = asyncio.get_running_loop().create_task(runner())
            self._tasks[key] = task
        return await asyncio.shield(task), joined

    async def cancel_all(
        self,
        timeout_s: float,
        *,
        before_cancel: Callable[[], object] | None = None,
        cancel_timeout_s: float | None = None,
    ) -> bool:
        """Wait up to ``timeout_s`` for running work, then cancel what is left
        (``before_cancel`` first: e.g. unblock threads stuck on a socket) and wait
        up to ``cancel_timeout_s`` more (None: as long as it takes). True when
        everything ended."""
        tasks = list(self._tasks.values())
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        if not pending:
            return True
        if before_cancel is not None:
            before_cancel()
        for task in pending:
            task.cancel()
        _, still = await asyncio.wait(pending, timeout=cancel_timeout_s)
        return not still


def spread_offset(node: str, key: str, window_s: float) -> float:
    """Where in ``[0, window_s)`` this node starts a scheduled job.

    Deterministic per (node, job) so a restart keeps the plan, and uniform
    across nodes so a fleet given the same ``at`` does not hit the origin in the
    same second.
    """
    if window_s <= 0:
        return 0.0
    fraction = int(digest_bytes(f"{node}\0{key}".encode())[:16], 16) / 16**16
    return fraction * window_s


def start_time(at: float, deadline: float | None, node: str, key: str, window_s: float) -> float:
    """When a prefetch scheduled for ``at`` starts here: spread, but leaving half the
    time to the deadline for the pull itself."""
    if deadline is not None:
        window_s = min(window_s, max(0.0, (deadline - at) / 2))
    return at + spread_offset(node, key, window_s)
