"""One retry loop for the small, idempotent calls: manifest reads, publish uploads,
the client's retry of an overloaded daemon.

A :class:`Backoff` says how long to wait before attempt ``n`` (full jitter by
default, or what the error itself asks for, such as ``Retry-After``); the loop
is written once, in a blocking and an async form. The fetcher's per-chunk
loop is not one of these: it holds an origin slot, tells corrupt bodies from
busy origins and names the chunk, so it keeps its own.

Why not tenacity or stamina: both would do, but the client must stay
standard-library only, and every caller here injects its clock and RNG so
that tests see the exact schedule; the loop is a dozen lines.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from weightcache.aio import Clock, RealClock
from weightcache.errors import WeightcacheError

__all__ = ["Backoff", "backoff_delay", "retry_async", "retry_sync"]

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max, base * 2**attempt)] (attempt counts from 0)."""
    return rng.uniform(0.0, min(max_s, base_s * (2.0 ** min(attempt, 62))))


@dataclass
class Backoff:
    """``retries`` more attempts after the first, each after a jittered exponential wait.

    ``delay_of`` may name a wait an error asks for (``Retry-After``): it is used
    instead of the jitter, capped at ``max_s``.
    """

    retries: int
    base_s: float
    max_s: float
    rng: random.Random = field(default_factory=random.Random)
    delay_of: Callable[[BaseException], float | None] | None = None

    def delay(self, attempt: int, error: BaseException) -> float:
        asked = self.delay_of(error) if self.delay_of is not None else None
        if asked is not None:
            return min(self.max_s, max(0.0, asked))
        return backoff_delay(attempt, self.base_s, self.max_s, self.rng)


def _gave_up(exc: BaseException, attempts: int) -> None:
    """The error that ends the retries says how many attempts were made."""
    if isinstance(exc, WeightcacheError) and attempts > 1 and "attempts" not in exc.facts:
        exc.facts["attempts"] = attempts
        exc.message = f"{exc.message} (after {attempts} attempts)"


def retry_sync(
    fn: Callable[[], T],
    backoff: Backoff,
    *,
    on: type[BaseException] | tuple[type[BaseException], ...],
    log: logging.Logger,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it returns, retrying errors of type ``on``; the last one is raised."""
    attempt = 0
    while True:
        try:
            return fn()
        except on as exc:
            if attempt >= backoff.retries:
                _gave_up(exc, attempt + 1)
                raise
            delay = backoff.delay(attempt, exc)
            attempt += 1
            log.info("%s.retry attempt=%d delay_s=%.3f reason=%s", what, attempt, delay, exc)
            sleep(delay)


async def retry_async(
    fn: Callable[[], Awaitable[T]],
    backoff: Backoff,
    *,
    on: type[BaseException] | tuple[type[BaseException], ...],
    log: logging.Logger,
    what: str,
    clock: Clock | None = None,
) -> T:
    """:func:`retry_sync` for coroutines, sleeping on ``clock``."""
    sleeper = clock or RealClock()
    attempt = 0
    while True:
        try:
            return await fn()
        except on as exc:
            if attempt >= backoff.retries:
                _gave_up(exc, attempt + 1)
                raise
            delay = backoff.delay(attempt, exc)
            attempt += 1
            log.info("%s.retry attempt=%d delay_s=%.3f reason=%s", what, attempt, delay, exc)
            await sleeper.sleep(delay)
