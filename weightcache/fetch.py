"""One blob download: parallel ranged GETs, per-chunk BLAKE3, written in place, resumable.

The async shell here schedules chunks; each chunk is one hop into a worker
thread that streams the range from the origin, hashes it as it arrives, and
writes it with ``pwrite`` into ``partial/<blake3>.part``. A verified chunk is
recorded in ``partial/<blake3>.chunks``; after a crash the recorded chunks are
re-hashed (cheap, local) and only the rest is fetched again, so a ``kill -9``
loses at most the chunks in flight.

Retries: transient origin faults (:class:`OriginUnavailable`: 429/5xx/SlowDown,
resets, short bodies, timeouts) are retried up to ``retries`` times per chunk
with exponential backoff and full jitter; a chunk whose bytes fail their hash
is re-fetched up to ``hash_retries`` times, then :class:`HashMismatch` names
the file and the chunk. Time and randomness come from an injectable clock and
RNG so tests observe the schedule without sleeping.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

from weightcache.aio import Clock, RealClock, run_all
from weightcache.config import FetchConfig
from weightcache.errors import CacheFull, HashMismatch, OriginUnavailable, WeightcacheError
from weightcache.hashing import Hasher, digest_range
from weightcache.manifest import FileEntry
from weightcache.origin.base import Origin
from weightcache.retry import backoff_delay
from weightcache.scheduler import Priority, PrioritySlots
from weightcache.store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")


class TokenBucket:
    """Bytes-per-second limit over every origin read it is shared by.

    A request for more than one second's worth is granted once the bucket is
    full, going into debt, so a chunk larger than the rate still passes.
    """

    def __init__(self, rate_bytes_per_s: int, clock: Clock) -> None:
        self.rate = float(rate_bytes_per_s)
        self.capacity = float(rate_bytes_per_s)
        self._tokens = self.capacity
        self._clock = clock
        self._stamp = clock.monotonic()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def acquire(self, n: int) -> None:
        async with self._lock:  # first come, first served
            self._refill()
            need = min(float(n), self.capacity)
            while self._tokens < need:
                await self._clock.sleep((need - self._tokens) / self.rate)
                self._refill()
            self._tokens -= n


@dataclass
class FetchStats:
    """Counters of one pull, shared by every blob fetch of it."""

    origin_bytes: int = 0
    requests: int = 0
    retries: int = 0
    hash_failures: int = 0
    resumed_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)


ProgressFn = Callable[[int], None]


class _ChunkHashMismatch(Exception):
    def __init__(self, actual: str) -> None:
        self.actual = actual


@dataclass
class Fetcher:
    """Everything a blob fetch needs that is shared across blobs of a pull (or a process)."""

    store: Store
    policy: FetchConfig
    executor: Executor
    clock: Clock = field(default_factory=RealClock)
    rng: random.Random = field(default_factory=random.Random)
    limiter: TokenBucket | None = None
    slots: PrioritySlots | None = None
    priority: Priority = Priority.WORKER

    def __post_init__(self) -> None:
        if self.slots is None:
            self.slots = PrioritySlots(self.policy.concurrency)

    async def _hop(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def fetch(
        self,
        origin: Origin,
        key: str,
        entry: FileEntry,
        stats: FetchStats,
        on_bytes: ProgressFn | None = None,
    ) -> None:
        """Download ``entry`` into ``blobs/``. The caller holds the blob's lock."""
        digest = entry.blake3
        await self._hop(self.store.open_part, digest, entry.size)
        done = await self._hop(self._verified_chunks, entry)
        if done:
            resumed = sum(entry.chunk_range(i)[1] for i in done)
            stats.add(resumed_bytes=resumed)
            if on_bytes:
                on_bytes(resumed)
            log.info(
                "fetch.resumed blob=%s chunks=%d/%d", digest[:16], len(done), len(entry.chunks)
            )
        todo = [i for i in range(len(entry.chunks)) if i not in done]
        for _round in range(2):
            await self._fetch_chunks(origin, key, entry, todo, stats, on_bytes)
            try:
                await self._hop(self.store.commit_blob, digest, entry.size)
                return
            except HashMismatch:
                # Every chunk verified, yet the whole does not: a chunk was
                # overwritten after its check (a stray writer) or the manifest
                # is inconsistent. Re-check each chunk and fetch the bad ones once.
                good = await self._hop(self._verified_chunks, entry, True)
                todo = [i for i in range(len(entry.chunks)) if i not in good]
                if not todo:
                    break
        raise HashMismatch(
            f"{origin.name}/{key}: every chunk matches the manifest but the whole file does not "
            f"hash to {digest}; the manifest is inconsistent",
            hint="republish the model (weightcache publish) or re-index it (weightcache index)",
            path=entry.path,
            expected=digest,
        )

    def _verified_chunks(self, entry: FileEntry, check_all: bool = False) -> set[int]:
        """Chunks already in the part file with the right hash (runs in a worker thread)."""
        claimed = (
            set(range(len(entry.chunks))) if check_all else self.store.read_chunk_log(entry.blake3)
        )
        claimed &= set(range(len(entry.chunks)))
        if not claimed:
            return set()
        part = self.store.partial_paths(entry.blake3).part
        fd = os.open(part, os.O_RDONLY)
        try:
            good = {
                i for i in claimed if digest_range(fd, *entry.chunk_range(i)) == entry.chunks[i]
            }
        finally:
            os.close(fd)
        if good != claimed:
            self.store.reset_chunk_log(entry.blake3, good)
        return good

    async def _fetch_chunks(
        self,
        origin: Origin,
        key: str,
        entry: FileEntry,
        todo: list[int],
        stats: FetchStats,
        on_bytes: ProgressFn | None,
    ) -> None:
        if not todo:
            return
        stop = threading.Event()
        await run_all(
            [self._chunk(origin, key, entry, index, stats, on_bytes, stop) for index in todo]
        )

    async def _chunk(
        self,
        origin: Origin,
        key: str,
        entry: FileEntry,
        index: int,
        stats: FetchStats,
        on_bytes: ProgressFn | None,
        stop: threading.Event,
    ) -> None:
        offset, length = entry.chunk_range(index)
        expected = entry.chunks[index]
        transient = 0
        corrupt = 0
        assert self.slots is not None
        while True:
            async with self.slots.slot(self.priority):
                if self.limiter is not None:
                    await self.limiter.acquire(length)
                loop = asyncio.get_running_loop()
                job = loop.run_in_executor(
                    self.executor,
                    self._transfer,
                    origin,
                    key,
                    entry,
                    index,
                    offset,
                    length,
                    stats,
                    stop,
                )
                try:
                    error: Exception | None = None
                    try:
                        await asyncio.shield(job)
                        if on_bytes:
                            on_bytes(length)
                        return
                    except (OriginUnavailable, _ChunkHashMismatch) as exc:
                        error = exc
                    except WeightcacheError as exc:
                        # Not retryable (not found, denied, disk full): name what failed.
                        exc.facts.setdefault("path", entry.path)
                        exc.facts.setdefault("chunk", index)
                        raise
                except asyncio.CancelledError:
                    # The worker thread cannot be interrupted: tell it to stop and
                    # wait, so no thread writes into the part file after we return.
                    stop.set()
                    await asyncio.wait([job])
                    raise
            if isinstance(error, _ChunkHashMismatch):
                corrupt += 1
                stats.add(hash_failures=1)
                log.warning("fetch.chunk_mismatch key=%s chunk=%d attempt=%d", key, index, corrupt)
                if corrupt > self.policy.hash_retries:
                    raise HashMismatch(
                        f"{origin.name}/{key}: chunk {index} "
                        f"(bytes {offset}-{offset + length - 1}) of {entry.path} hashes to "
                        f"{error.actual}, expected {expected}, after {corrupt} attempts",
                        hint="the object changed at the origin after it was published; "
                        "republish it or fix the object",
                        path=entry.path,
                        chunk=index,
                        expected=expected,
                        actual=error.actual,
                    )
                continue  # a corrupt body is not a busy origin: re-fetch at once
            assert isinstance(error, OriginUnavailable)
            if transient >= self.policy.retries:
                raise OriginUnavailable(
                    f"{error.message}; gave up on chunk {index} of {entry.path} "
                    f"after {transient + 1} attempts",
                    hint="the origin keeps failing; check its health and rate limits",
                    path=entry.path,
                    chunk=index,
                    attempts=transient + 1,
                ) from error
            delay = backoff_delay(
                transient, self.policy.backoff_base_s, self.policy.backoff_max_s, self.rng
            )
            transient += 1
            stats.add(retries=1)
            log.info(
                "fetch.retry key=%s chunk=%d attempt=%d delay_s=%.3f reason=%s",
                key,
                index,
                transient,
                delay,
                error.message,
            )
            await self.clock.sleep(delay)

    def _transfer(
        self,
        origin: Origin,
        key: str,
        entry: FileEntry,
        index: int,
        offset: int,
        length: int,
        stats: FetchStats,
        stop: threading.Event,
    ) -> None:
        """Worker thread: stream one range, hash as it arrives, write in place."""
        part = self.store.partial_paths(entry.blake3).part
        hasher = Hasher()
        received = 0
        stats.add(requests=1)
        fd = os.open(part, os.O_WRONLY)
        try:
            with origin.open_range(key, offset, length) as pieces:
                for piece in pieces:
                    if stop.is_set():
                        raise OriginUnavailable("fetch cancelled")
                    take = piece[: length - received]
                    hasher.update(take)
                    try:
                        os.pwrite(fd, take, offset + received)
                    except OSError as exc:
                        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                            raise CacheFull(
                                f"disk full writing {entry.path}", needed_bytes=length
                            ) from exc
                        raise
                    received += len(take)
                    stats.add(origin_bytes=len(piece))
                    if received >= length:
                        break
        finally:
            os.close(fd)
        if received < length:
            raise OriginUnavailable(
                f"{origin.name}/{key}: body ended after {received} of {length} bytes"
            )
        actual = hasher.hexdigest()
        if actual != entry.chunks[index]:
            raise _ChunkHashMismatch(actual)
        self.store.record_chunk(entry.blake3, index)
