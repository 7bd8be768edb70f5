"""Embedded mode: a worker (or the CLI) pulls in its own process when no daemon answers.

The same machinery as the daemon against the same cache directory: resolve,
admit (evicting to the budget under the cache lock, protecting every revision
any process uses and every lease a daemon recorded), pull, link. What the
daemon adds and this does not: single-flight across processes beyond the
per-blob ``flock``, leases, jobs, the API.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from weightcache.aio import Clock, RealClock
from weightcache.budget import Budget, Protection, enforce, make_room
from weightcache.config import Config, load_config
from weightcache.locks import RevisionUses
from weightcache.node import Node, Progress, ProgressFn, disk_errors
from weightcache.results import Ensured
from weightcache.scheduler import Priority

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["Embedded", "ensure_blocking", "run_blocking"]


class Embedded:
    """One process's pulls into the node cache, without a daemon."""

    def __init__(
        self,
        cfg: Config,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        uses: RevisionUses | None = None,
    ) -> None:
        self.node = Node(cfg, clock=clock or RealClock(), rng=rng or random.Random())
        #: may outlive this object: a use kept past ensure() is the caller's to release
        self.uses = uses if uses is not None else RevisionUses(self.node.store.locks)
        self._own_uses = uses is None
        self.budget = Budget(cfg, self.node.store, self.node.index, self.uses)
        self._evict_lock = asyncio.Lock()

    async def ensure(
        self,
        text: str,
        on_progress: ProgressFn | None = None,
        *,
        priority: Priority = Priority.WORKER,
        keep: bool = False,
    ) -> Ensured:
        """Make ``text`` local and verified; return where its files are. With ``keep``
        the revision stays in use (protected from every eviction on the node) until
        ``self.uses.release(revision)``."""
        node = self.node
        started = node.clock.monotonic()
        ref = node.parse(text)
        with disk_errors(ref):
            res = await node.resolve(ref)
        resolved = node.clock.monotonic() - started
        rev = res.revision
        # In use from before the hit check until the answer: no eviction, in this
        # process or another, can take it in between.
        await node.hop(self.uses.acquire, rev)
        kept = False
        try:
            result = await node.lookup(res)
            if result is None:
                await make_room(
                    self.budget,
                    node.hop,
                    ref,
                    rev,
                    res.manifest,
                    Protection,
                    self._evict_lock,
                    node.clock,
                )
                result = await node.pull(res, on_progress, priority=priority)
                await enforce(self.budget, node.hop, Protection, self._evict_lock)
            elif on_progress:
                on_progress(Progress(result.total_bytes, result.total_bytes))
            kept = keep
        finally:
            if not kept:
                await node.hop(self.uses.release, rev)
        result.resolve_seconds = resolved
        result.seconds = node.clock.monotonic() - started
        return result

    async def aclose(self) -> None:
        await self.node.aclose()
        if self._own_uses:
            self.uses.close()


def run_blocking(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from synchronous code.

    ``load`` may be called from a thread that already runs an event loop (a
    notebook, an async server): then the work runs on a private thread.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro_fn())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro_fn())
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="weightcache-embedded")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


class _Use:
    """This process's use of a revision, ended by :meth:`release` (or by its exit)."""

    def __init__(self, uses: RevisionUses, rev: str) -> None:
        self._uses: RevisionUses | None = uses
        self._rev = rev

    def release(self) -> None:
        uses, self._uses = self._uses, None
        if uses is not None:
            uses.release(self._rev)
            uses.close()


def ensure_blocking(
    text: str,
    cfg: Config | None = None,
    on_progress: ProgressFn | None = None,
    *,
    hold: bool = False,
) -> Ensured:
    """Embedded mode: pull ``text`` in this process against the configured cache.

    With ``hold`` the result keeps the revision in use until ``result.release()``:
    the embedded counterpart of a daemon lease.
    """
    config = cfg or load_config()
    uses = RevisionUses(config.cache.dir / "locks")

    async def main() -> Ensured:
        embedded = Embedded(config, uses=uses)
        try:
            return await embedded.ensure(text, on_progress, keep=hold)
        finally:
            await embedded.aclose()

    started = time.monotonic()
    try:
        result = run_blocking(main)
    except BaseException:
        uses.close()
        raise
    if hold:
        result.hold = _Use(uses, result.revision)
    else:
        uses.close()
    log.debug("embedded.ensure seconds=%.3f pid=%d", time.monotonic() - started, os.getpid())
    return result
