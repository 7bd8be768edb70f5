"""One blob download: parallel ranged GETs, per-chunk BLAKE3, written in place, resumable.

The async shell here schedules chunks; each attempt at a chunk is one hop into
a worker thread that streams the range from the origin, hashes it as it
arrives, and writes it with ``pwrite`` into ``partial/<blake3>.part``. A
verified chunk is recorded in ``partial/<blake3>.chunks``.

Resume, inside a chunk too. Every ``checkpoint_bytes`` of a chunk in flight the
thread ``fdatasync``s the part file and appends (chunk, bytes written) to
``partial/<blake3>.progress``; it does so once more when it is aborted or its
body is cut. A later attempt (a retry in this process, or the next pull after a
``kill -9``) asks the origin only for the rest of the chunk: it re-reads the
prefix from the part file into the chunk's hasher and streams the remainder
behind it, so the whole chunk is still checked against its manifest digest.
Nothing in ``partial/`` is trusted: a recorded chunk is re-hashed, and a
progress record that lies (torn, stale, bytes lost in a power cut) fails the
whole-chunk hash, after which the chunk is fetched again from its start. A
``kill -9`` loses at most ``checkpoint_bytes`` per transfer in flight.

Retries: transient origin faults (:class:`OriginUnavailable`: 429/5xx/SlowDown,
resets, short bodies, timeouts) are retried up to ``retries`` times per chunk
with exponential backoff and full jitter, each from where the last attempt
stopped; a chunk whose bytes fail their hash is re-fetched from its start up to
``hash_retries`` times, then :class:`HashMismatch` names the file and the
chunk (a mismatch behind a resumed prefix is first retried once from the start
without counting: the prefix, not the origin, may be what is wrong). Time and
randomness come from an injectable clock and RNG so tests observe the schedule
without sleeping.

Aborting. Every attempt registers an :class:`~weightcache.origin.base.Abort` in
the Fetcher's :class:`Transfers`. Cancelling a fetch aborts the transfers of
its chunks, which closes their sockets, so a thread blocked on a stalled origin
returns at once (cancellation never waits for the read timeout), having synced
what it wrote. :meth:`Transfers.abort_all` does the same for every transfer of
every Fetcher sharing it and refuses new ones: the node's stop switch. An
aborted transfer is never retried or committed; a fetch whose transfer was
aborted without being cancelled raises :class:`ShuttingDown`. Verified chunks
and progress records stay in ``partial/`` for the next pull.

Observing: :class:`FetchStats` counts a pull's origin bytes as they arrive
(thread-safe; read it any time) and, if given ``on_origin_bytes``, calls it on
the event loop with each increment.

Disk errors from the part file and the logs are :class:`CacheFull` (a full
disk) or :class:`CacheIOError` naming the path, never a bare ``OSError``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from weightcache.aio import Clock, RealClock, run_all
from weightcache.config import FetchConfig
from weightcache.errors import (
    CacheFull,
    CacheIOError,
    HashMismatch,
    ObjectNotFound,
    OriginDenied,
    OriginRangeInvalid,
    OriginRejected,
    OriginUnavailable,
    PeerBusy,
    PeerIsSelf,
    ShuttingDown,
    WeightcacheError,
)
from weightcache.hashing import Hasher, digest_range
from weightcache.manifest import FileEntry
from weightcache.origin.base import Abort, Origin, abort_scope
from weightcache.retry import backoff_delay
from weightcache.scheduler import Priority, PrioritySlots, Urgency
from weightcache.store import Store, disk_errors

if TYPE_CHECKING:
    from weightcache.peers.route import BlobPlan, PeerRoute

log = logging.getLogger(__name__)

T = TypeVar("T")

#: default :attr:`Fetcher.checkpoint_bytes`: at most this much of each chunk in
#: flight is lost to a ``kill -9`` (8 transfers: 8 MiB, where 16 MiB chunks lost 128)
CHECKPOINT_BYTES = 1 << 20
_PREFIX_BLOCK = 4 << 20
#: origin bytes a transfer thread gathers before it posts them to ``on_origin_bytes``
_NOTIFY_BYTES = 256 << 10


class RateLimiter(Protocol):
    """A byte rate shared by the reads it is given to (this module's TokenBucket,
    or the node-wide one of :mod:`weightcache.limits`)."""

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` more bytes may be read."""


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
    """Counters of one pull, shared by every blob fetch of it.

    Transfer threads add to the counters as bytes arrive, under a lock; reading
    one (``stats.origin_bytes``) from any thread gives the bytes so far.
    ``on_origin_bytes``, when set, is called on the event loop that runs the
    fetch with each increment of ``origin_bytes`` (a transfer posts what it has
    received every 256 KiB and when it ends), in arrival order and before the
    fetch returns: a live counter (a metric, a pull's status) without polling.
    """

    origin_bytes: int = 0
    requests: int = 0
    retries: int = 0
    hash_failures: int = 0
    #: bytes of the blob found on disk and verified: recorded chunks, and the
    #: synced prefixes of chunks a previous puller was in the middle of
    resumed_bytes: int = 0
    #: bytes received from peers (verified or not: a corrupt chunk counts, then is refetched)
    peer_bytes: int = 0
    #: chunks that came whole from a peer, and chunks a peer failed to give
    peer_chunks: int = 0
    peer_failures: int = 0
    on_origin_bytes: Callable[[int], None] | None = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, value in deltas.items():
                setattr(self, name, getattr(self, name) + value)


class Transfers:
    """The transfers in flight (from the origin or from peers), so that the event
    loop can unblock them.

    One per node, shared by every :class:`Fetcher` of it (``Fetcher(...,
    transfers=node_transfers)``); a Fetcher made without one has its own.
    Thread-safe; :meth:`abort_all` never blocks, so it can be called from the
    event loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: set[Abort] = set()
        self._closed = False

    @property
    def active(self) -> int:
        """Transfers registered and not yet finished."""
        with self._lock:
            return len(self._live)

    @property
    def closed(self) -> bool:
        """True once :meth:`abort_all` ran: no new transfer starts."""
        return self._closed

    def start(self) -> Abort:
        """Register a transfer about to start; :class:`ShuttingDown` after :meth:`abort_all`."""
        with self._lock:
            if self._closed:
                raise ShuttingDown(
                    "the node is stopping: no new origin transfers",
                    hint="the pull resumes from its verified chunks when asked again",
                )
            abort = Abort()
            self._live.add(abort)
            return abort

    def finish(self, abort: Abort) -> None:
        with self._lock:
            self._live.discard(abort)

    def abort_all(self) -> int:
        """Abort every transfer in flight and refuse new ones; returns how many were aborted.

        Each transfer's socket is shut down, so its thread returns within
        moments even from a stalled origin, after syncing what it wrote; its
        fetch raises :class:`ShuttingDown` (or its cancellation, if it was
        cancelled). Await the fetches (or the executor) to know the threads
        are done.
        """
        with self._lock:
            self._closed = True
            live = list(self._live)
        for abort in live:
            abort.abort()
        if live:
            log.info("fetch.abort_all transfers=%d", len(live))
        return len(live)


ProgressFn = Callable[[int], None]


@dataclass
class Flight:
    """A chunk on its way into the part file: who it comes from, and when it is done."""

    #: "origin", a peer's URL, or "" while not yet decided
    source: str
    done: asyncio.Future[bool]


#: a chunk as flights know it: (offset, length, BLAKE3) — not its index, since two
#: manifests may cut the same blob into chunks differently
ChunkId = tuple[int, int, str]


def chunk_id(entry: FileEntry, index: int) -> ChunkId:
    offset, length = entry.chunk_range(index)
    return offset, length, entry.chunks[index]


class ChunkFlights:
    """The chunks of one blob in flight in this process, one fetch each.

    Shared by the blob's own pull and by peers asking for its chunks: whoever
    comes second waits for the first (:meth:`run`), a chunk already brought is
    not fetched again, and a peer's request can wait for a chunk the origin is
    sending (:meth:`get`). Once the blob's pull is committing (:attr:`closed`),
    nothing more is fetched into its part file. Lives on the event loop.
    """

    def __init__(self) -> None:
        self._live: dict[ChunkId, Flight] = {}
        self._done: set[ChunkId] = set()
        self.closed = False

    def get(self, chunk: ChunkId) -> Flight | None:
        return self._live.get(chunk)

    def forget(self, chunks: list[ChunkId]) -> None:
        """These chunks must be fetched again (they failed a later check)."""
        self._done.difference_update(chunks)
        self.closed = False

    async def run(self, chunk: ChunkId, fetch: Callable[[Flight], Awaitable[None]]) -> bool:
        """Fetch ``chunk`` with ``fetch`` unless it was brought already or another fetch
        of it is running, then wait for that one instead (and fetch it after all if
        that one failed). True if this call fetched it."""
        while True:
            if self.closed or chunk in self._done:
                return False
            other = self._live.get(chunk)
            if other is None:
                break
            if await asyncio.shield(other.done):
                return False
        flight = Flight("", asyncio.get_running_loop().create_future())
        self._live[chunk] = flight
        ok = False
        try:
            await fetch(flight)
            ok = True
            self._done.add(chunk)
        finally:
            del self._live[chunk]
            flight.done.set_result(ok)
        return True


class _ChunkHashMismatch(Exception):
    def __init__(self, actual: str, *, resumed: bool) -> None:
        self.actual = actual
        self.resumed = resumed


class _Interrupted(Exception):
    """A transient origin fault after ``written`` bytes of the chunk were in the part file."""

    def __init__(self, error: OriginUnavailable, written: int) -> None:
        self.error = error
        self.written = written


#: a peer's answers that cost one attempt and move the chunk on (not-found does not
#: mark the peer down: it may simply not know the revision)
_PEER_REFUSALS = (ObjectNotFound, OriginDenied, OriginRejected, OriginRangeInvalid)


class _Aborted(Exception):
    """The transfer's Abort was set: a cancellation, never an origin fault."""


@dataclass
class Fetcher:
    """Everything a blob fetch needs that is shared across blobs of a pull (or a process)."""

    store: Store
    policy: FetchConfig
    executor: Executor
    clock: Clock = field(default_factory=RealClock)
    rng: random.Random = field(default_factory=random.Random)
    limiter: RateLimiter | None = None
    slots: PrioritySlots | None = None
    priority: Priority | Urgency = Priority.WORKER
    transfers: Transfers = field(default_factory=Transfers)
    #: a transfer syncs the part file and records its progress every this many bytes
    checkpoint_bytes: int = CHECKPOINT_BYTES
    #: where chunks owned by other nodes come from (None: every chunk from the origin)
    peers: PeerRoute | None = None

    def __post_init__(self) -> None:
        if self.slots is None:
            self.slots = PrioritySlots(self.policy.concurrency)
        if self.checkpoint_bytes < 1:
            raise ValueError("checkpoint_bytes must be positive")

    async def _hop(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def fetch(
        self,
        origin: Origin,
        key: str,
        entry: FileEntry,
        stats: FetchStats,
        on_bytes: ProgressFn | None = None,
        flights: ChunkFlights | None = None,
    ) -> None:
        """Download ``entry`` into ``blobs/``. The caller holds the blob's lock;
        ``flights`` are the blob's chunks in flight in this process (peers wait on them)."""
        flights = flights if flights is not None else ChunkFlights()
        digest = entry.blake3
        await self._hop(self.store.open_part, digest, entry.size)
        done, started = await self._hop(self._resume_state, entry)
        if done:
            resumed = sum(entry.chunk_range(i)[1] for i in done)
            stats.add(resumed_bytes=resumed)
            if on_bytes:
                on_bytes(resumed)
        if done or started:
            log.info(
                "fetch.resumed blob=%s chunks=%d/%d partial_chunks=%d partial_bytes=%d",
                digest[:16],
                len(done),
                len(entry.chunks),
                len(started),
                sum(started.values()),
            )
        todo = [i for i in range(len(entry.chunks)) if i not in done]
        for _round in range(2):
            await self._fetch_chunks(origin, key, entry, todo, stats, on_bytes, started, flights)
            flights.closed = True  # no peer's request writes into the part file now
            try:
                await self._hop(self.store.commit_blob, digest, entry.size)
                return
            except HashMismatch:
                # Every chunk verified, yet the whole does not: a chunk was
                # overwritten after its check (a stray writer) or the manifest
                # is inconsistent. Re-check each chunk and fetch the bad ones once.
                good = await self._hop(self._verified_chunks, entry, True)
                todo = [i for i in range(len(entry.chunks)) if i not in good]
                flights.forget([chunk_id(entry, i) for i in todo])
                started = {}
                if not todo:
                    break
        raise HashMismatch(
            f"{origin.name}/{key}: every chunk matches the manifest but the whole file does not "
            f"hash to {digest}; the manifest is inconsistent",
            hint="republish the model (weightcache publish) or re-index it (weightcache index)",
            path=entry.path,
            expected=digest,
        )

    def _resume_state(self, entry: FileEntry) -> tuple[set[int], dict[int, int]]:
        """Verified chunks, and bytes recorded as written into the others (worker thread)."""
        done = self._verified_chunks(entry)
        started = {
            index: written
            for index, written in self.store.read_progress(entry.blake3).items()
            if index < len(entry.chunks)
            and index not in done
            and 0 < written <= entry.chunk_range(index)[1]
        }
        return done, started

    def _verified_chunks(self, entry: FileEntry, check_all: bool = False) -> set[int]:
        """Chunks already in the part file with the right hash (runs in a worker thread)."""
        claimed = (
            set(range(len(entry.chunks))) if check_all else self.store.read_chunk_log(entry.blake3)
        )
        claimed &= set(range(len(entry.chunks)))
        if not claimed:
            return set()
        part = self.store.partial_paths(entry.blake3).part
        with disk_errors(part, "re-hashing chunks of"):
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
        started: dict[int, int],
        flights: ChunkFlights,
    ) -> None:
        if not todo:
            return

        async def one(index: int) -> None:
            fetched = False

            async def fetch(flight: Flight) -> None:
                nonlocal fetched
                fetched = True
                await self._chunk(
                    origin, key, entry, index, stats, on_bytes, started.get(index, 0), flight, plan
                )

            await flights.run(chunk_id(entry, index), fetch)
            if not fetched and on_bytes:
                on_bytes(entry.chunk_range(index)[1])  # a peer's request brought it

        plan = None
        if self.peers is not None:
            # Every node asking for the same chunks in the same (manifest) order would
            # queue the whole cluster at the owners of the first chunks while the other
            # uplinks idle: ask by when each owner will have its chunk, ties at random
            # (loadtest/fleet_sim.py: p99 ready at 2,000 nodes 1,558 s in manifest
            # order, 68 s so).
            plan = await self._hop(
                self.peers.plan, entry.blake3, len(entry.chunks), self.policy.concurrency, self.rng
            )
            place = {index: n for n, index in enumerate(plan.order)}
            todo = sorted(todo, key=place.__getitem__)
        await run_all([one(index) for index in todo])

    async def fetch_chunk(
        self,
        origin: Origin,
        key: str,
        entry: FileEntry,
        index: int,
        stats: FetchStats,
        flights: ChunkFlights,
    ) -> None:
        """Bring one chunk into the part file (for a peer that asked for it); the
        caller holds the blob's lock and has checked it is not there yet. The part
        file stays sparse: only the chunks pulled take disk. Nothing is fetched once
        the blob's own pull is committing, or if another fetch brought the chunk."""

        async def fetch(flight: Flight) -> None:
            flight.source = "origin"
            await self._hop(
                functools.partial(self.store.open_part, entry.blake3, entry.size, preallocate=False)
            )
            recorded = (await self._hop(self.store.read_progress, entry.blake3)).get(index, 0)
            recorded = recorded if 0 < recorded <= entry.chunk_range(index)[1] else 0
            await self._chunk(origin, key, entry, index, stats, None, recorded, flight)

        await flights.run(chunk_id(entry, index), fetch)

    async def _chunk(
        self,
        origin: Origin,
        key: str,
        entry: FileEntry,
        index: int,
        stats: FetchStats,
        on_bytes: ProgressFn | None,
        recorded: int,
        flight: Flight | None = None,
        plan: BlobPlan | None = None,
    ) -> None:
        offset, length = entry.chunk_range(index)
        expected = entry.chunks[index]
        inherited = recorded
        if self.peers is not None and plan is not None:
            got, recorded = await self._from_peers(entry, index, stats, recorded, flight, plan)
            if got:
                if on_bytes:
                    on_bytes(length)
                return
        if flight is not None:
            flight.source = "origin"
        transient = 0
        corrupt = 0
        #: bytes of this chunk already in the part file: the next attempt starts there
        kept = recorded
        #: of which a previous puller left (counted as resumed once verified)
        inherited = min(inherited, recorded)
        forgave = False
        assert self.slots is not None
        loop = asyncio.get_running_loop()
        notify = _notifier(loop, stats.on_origin_bytes)
        while True:
            async with self.slots.slot(self.priority):
                if self.limiter is not None:
                    await self.limiter.acquire(length - kept)
                error: OriginUnavailable | _ChunkHashMismatch
                try:
                    await self._attempt(origin, key, entry, index, kept, stats, notify, "origin")
                    if inherited:
                        stats.add(resumed_bytes=inherited)
                    if on_bytes:
                        on_bytes(length)
                    return
                except _Interrupted as exc:
                    error, kept = exc.error, exc.written
                except _ChunkHashMismatch as exc:
                    error = exc
                except WeightcacheError as exc:
                    # Not retryable (not found, denied, disk full): name what failed.
                    exc.facts.setdefault("path", entry.path)
                    exc.facts.setdefault("chunk", index)
                    raise
            if isinstance(error, _ChunkHashMismatch):
                stats.add(hash_failures=1)
                kept = inherited = 0
                if error.resumed and not forgave:
                    # The prefix came from the part file (a progress record, or the
                    # last attempt): it may be what is wrong, not the origin. Once
                    # per chunk, start over without counting it against the origin,
                    # and say so on disk so a kill now does not resume it again.
                    forgave = True
                    log.warning(
                        "fetch.resume_mismatch key=%s chunk=%d actual=%s", key, index, error.actual
                    )
                    await self._hop(self.store.record_progress, entry.blake3, index, 0)
                    continue
                corrupt += 1
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
                "fetch.retry key=%s chunk=%d attempt=%d delay_s=%.3f from_byte=%d reason=%s",
                key,
                index,
                transient,
                delay,
                kept,
                error.message,
            )
            await self.clock.sleep(delay)

    async def _attempt(
        self,
        origin: Origin,
        key: str,
        entry: FileEntry,
        index: int,
        kept: int,
        stats: FetchStats,
        notify: ProgressFn | None,
        source: str,
    ) -> None:
        """One transfer of the chunk from ``kept`` on, from the origin or a peer
        (``source``: whose counter the bytes go to), in a worker thread; raises what
        :meth:`_transfer` raises, and :class:`ShuttingDown` if the node aborted it."""
        abort = self.transfers.start()
        executor = self.peers.executor if source == "peer" and self.peers else self.executor
        job = asyncio.get_running_loop().run_in_executor(
            executor,
            self._transfer,
            origin,
            key,
            entry,
            index,
            kept,
            stats,
            abort,
            notify,
            f"{source}_bytes",
        )
        try:
            await asyncio.shield(job)
        except _Aborted:
            raise ShuttingDown(
                f"the fetch of {entry.path} was aborted: the node is stopping",
                hint="verified chunks and synced progress are kept; "
                "the pull resumes from them when asked again",
                path=entry.path,
                chunk=index,
            ) from None
        except asyncio.CancelledError:
            # Close the transfer's socket so that its thread returns now even from a
            # stalled origin or peer, and wait for it: no thread writes into the part
            # file after we return.
            abort.abort()
            await asyncio.wait([job])
            raise
        finally:
            self.transfers.finish(abort)

    async def _from_peers(
        self,
        entry: FileEntry,
        index: int,
        stats: FetchStats,
        kept: int,
        flight: Flight | None,
        plan: BlobPlan,
    ) -> tuple[bool, int]:
        """Ask the chunk's owners in rendezvous order, up to this node's own place.

        Returns (True, 0) once one gave the chunk whole and verified, else
        (False, bytes of the chunk now in the part file) for the origin to resume:
        a peer that is down, slow, busy or refuses costs one attempt, one that
        sends a wrong byte is avoided, and nothing a peer sent is kept unverified.
        """
        assert self.peers is not None
        route = self.peers
        digest = entry.blake3
        length = entry.chunk_range(index)[1]
        for url in route.candidates(plan, index):
            if flight is not None:
                flight.source = url
            again = True  # one more try from the chunk's start, after a bad resumed prefix
            while again:
                again = False
                start = kept
                async with route.slots.slot(self.priority):
                    if self.limiter is not None:
                        await self.limiter.acquire(length - kept)
                    try:
                        await self._attempt(
                            route.origin(url), digest, entry, index, kept, stats, None, "peer"
                        )
                        route.members.report_ok(url, length - start)
                        stats.add(peer_chunks=1)
                        return True, 0
                    except _Interrupted as exc:
                        kept = exc.written
                        busy = isinstance(exc.error, PeerBusy)
                        reason = "busy" if busy else "unavailable"
                        route.members.report_failure(url, reason, exc.error.message, skip=not busy)
                    except _ChunkHashMismatch as exc:
                        kept = 0
                        await self._hop(self.store.record_progress, digest, index, 0)
                        if exc.resumed and start:
                            again = True  # the prefix from before may be what is wrong
                            continue
                        route.members.report_corrupt(
                            url, f"chunk {index} of blob {digest[:16]} hashed to {exc.actual}"
                        )
                        log.error(
                            "fetch.peer_corrupt peer=%s blob=%s chunk=%d actual=%s",
                            url,
                            digest[:16],
                            index,
                            exc.actual,
                        )
                    except PeerIsSelf:
                        route.members.learn_self(url)
                        return False, kept  # this node is the owner at this rank
                    except _PEER_REFUSALS as exc:
                        route.members.report_failure(
                            url, exc.code, exc.message, skip=not isinstance(exc, ObjectNotFound)
                        )
                    except (CacheFull, CacheIOError, ShuttingDown):
                        raise  # this node's trouble: no other peer would fare better
                    except WeightcacheError as exc:
                        # Anything else a peer does costs it this chunk, never the load.
                        route.members.report_failure(url, exc.code, exc.message, skip=True)
            stats.add(peer_failures=1)
            log.info("fetch.peer_failed peer=%s blob=%s chunk=%d", url, digest[:16], index)
        return False, kept

    def _transfer(
        self,
        origin: Origin,
        key: str,
        entry: FileEntry,
        index: int,
        start: int,
        stats: FetchStats,
        abort: Abort,
        notify: ProgressFn | None,
        counter: str,
    ) -> None:
        """Worker thread: hash the chunk's first ``start`` bytes from the part file,
        stream the rest from the origin (or a peer) behind them, write in place,
        checkpoint. ``counter`` is the :class:`FetchStats` field the bytes count in."""
        offset, length = entry.chunk_range(index)
        part = self.store.partial_paths(entry.blake3).part
        hasher = Hasher()
        written = start  # bytes of the chunk in the part file, from its start
        synced = start  # of which a progress record covers
        unreported = 0  # origin bytes not yet posted to ``notify``
        with disk_errors(part, "opening part file"):
            fd = os.open(part, os.O_RDWR)
        try:
            if start:
                with disk_errors(part, "re-reading part file"):
                    _hash_prefix(fd, offset, start, hasher)
            if written < length:
                if counter == "origin_bytes":
                    stats.add(requests=1)
                try:
                    with (
                        abort_scope(abort),
                        origin.open_range(key, offset + start, length - start) as pieces,
                    ):
                        for piece in pieces:
                            if abort.aborted:
                                raise _Aborted
                            take = piece[: length - written]
                            hasher.update(take)
                            with disk_errors(part, "writing part file", needed_bytes=length):
                                os.pwrite(fd, take, offset + written)
                            written += len(take)
                            stats.add(**{counter: len(piece)})
                            unreported += len(piece)
                            if notify is not None and unreported >= _NOTIFY_BYTES:
                                notify(unreported)
                                unreported = 0
                            if written >= length:
                                break
                            if written - synced >= self.checkpoint_bytes:
                                self._checkpoint(fd, part, entry.blake3, index, written)
                                synced = written
                except Exception as exc:
                    stopped = abort.aborted or isinstance(exc, _Aborted)
                    if not (stopped or isinstance(exc, OriginUnavailable)):
                        raise  # not retryable (denied, not found, a bad range, the disk)
                    if written > synced:
                        # Keep what arrived for the next attempt, here or after a restart.
                        self._checkpoint(fd, part, entry.blake3, index, written)
                    if stopped:
                        raise _Aborted from exc
                    assert isinstance(exc, OriginUnavailable)
                    raise _Interrupted(exc, written) from exc
                if written < length:
                    raise _Interrupted(
                        OriginUnavailable(
                            f"{origin.name}/{key}: body ended after {written - start} "
                            f"of {length - start} bytes"
                        ),
                        written,
                    )
        finally:
            os.close(fd)
            if notify is not None and unreported:
                notify(unreported)
        actual = hasher.hexdigest()
        if actual != entry.chunks[index]:
            raise _ChunkHashMismatch(actual, resumed=start > 0)
        self.store.record_chunk(entry.blake3, index)

    def _checkpoint(self, fd: int, part: Path, digest: str, index: int, written: int) -> None:
        # Data first, then the record: a record on disk never claims bytes that are
        # not. The record itself is not synced: losing it only loses progress.
        with disk_errors(part, "syncing part file"):
            os.fdatasync(fd)
        self.store.record_progress(digest, index, written)


def _hash_prefix(fd: int, offset: int, length: int, hasher: Hasher) -> None:
    done = 0
    while done < length:
        piece = os.pread(fd, min(_PREFIX_BLOCK, length - done), offset + done)
        if not piece:
            return  # a short part file: the chunk's hash will not match
        hasher.update(piece)
        done += len(piece)


def _notifier(
    loop: asyncio.AbstractEventLoop, callback: Callable[[int], None] | None
) -> ProgressFn | None:
    """``callback`` posted to ``loop`` from a transfer thread (None if there is none)."""
    if callback is None:
        return None

    def post(n: int) -> None:
        try:
            loop.call_soon_threadsafe(callback, n)
        except RuntimeError:
            return  # the loop is closed: nobody is left to observe

    return post
