"""The node cache's puller: resolve a ref, pull what is missing, commit, link.

A :class:`Node` pulls and commits; it decides nothing about room. Whether a
pull may start (the budget, the reserve) and what to evict for it are its
callers' decisions: the daemon's :mod:`weightcache.service` and
:mod:`weightcache.embedded` (no daemon answered), both through
:mod:`weightcache.budget`. Several processes may pull into one cache directory
at once: each blob is pulled by whichever process holds its ``flock``, the
others wait for it (or take over, resuming, if the holder dies).

Two thread pools: ``executor`` for short metadata hops (manifests, snapshots,
the index) and ``transfers`` for everything a cold pull does (chunk GETs,
hashing, commits), so a warm hit never queues behind another model's pull.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import random
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from weightcache.aio import Clock, RealClock, run_all
from weightcache.config import Config
from weightcache.errors import (
    CacheFull,
    CacheIOError,
    HashMismatch,
    ModelNotFound,
    ObjectNotFound,
    OriginUnavailable,
    RevisionAmbiguous,
)
from weightcache.fetch import ChunkFlights, Fetcher, FetchStats, Transfers
from weightcache.hashing import is_digest
from weightcache.index import Index
from weightcache.limits import NodeSlots, NodeTokenBucket
from weightcache.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    REVISIONS_DIR,
    FileEntry,
    Manifest,
    parse,
)
from weightcache.origin import Origin, join_key, open_origin
from weightcache.refs import Ref, parse_ref
from weightcache.results import Ensured, LocalFile
from weightcache.retry import Backoff, retry_async
from weightcache.scheduler import Priority, PrioritySlots, SingleFlight, Urgency
from weightcache.store import BlobLock, Store

if TYPE_CHECKING:
    from weightcache.peers.members import Members
    from weightcache.peers.transport import PeerClient

log = logging.getLogger(__name__)
T = TypeVar("T")

#: how often a process waiting for another's pull of a blob looks again
LOCK_POLL_S = 0.05
#: threads for metadata hops (manifests, snapshots, the index, locks): short calls only
METADATA_THREADS = 4
#: manifest and listing reads at once per process (the daemon reads a location's
#: manifest once per 2 s however many workers ask); apart from the transfer slots
MANIFEST_READS = 2


class _NoIndex:
    """Stands in for the advisory index when a full disk keeps it from opening."""

    def snapshots(self) -> list[Any]:
        return []

    def close(self) -> None:
        return None  # nothing was opened

    def __getattr__(self, name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> None:
            raise CacheFull("the cache index could not be opened: the disk is full")

        return fail


class _NodeWideSlots(PrioritySlots):
    """This process's priority order in front of the node's slot files: a chunk
    waits for its turn here, then for one of the node's slots (usually free at
    once: it is busy only while other processes pull)."""

    def __init__(self, capacity: int, node_slots: NodeSlots) -> None:
        super().__init__(capacity)
        self.node_slots = node_slots

    @asynccontextmanager
    async def slot(self, priority: int | Urgency = Priority.WORKER) -> AsyncIterator[None]:
        async with super().slot(priority), self.node_slots.slot():
            yield


@dataclass
class BlobWriter:
    """This process's hold on one blob's part file: the blob's ``flock`` (taken once
    for everyone in the process) and its chunks in flight. The blob's own pull and
    peers asking for its chunks share it; the flock goes when the last one is done."""

    lock: BlobLock
    flights: ChunkFlights = field(default_factory=ChunkFlights)
    users: int = 0
    #: set once the last user let go and the flock is being released: a newcomer
    #: waits for :attr:`released`, then takes the flock afresh
    closing: bool = False
    released: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class PeerSetup:
    """The daemon's peers, for its pulls (see :mod:`weightcache.peers`)."""

    members: Members
    client: PeerClient
    slots: PrioritySlots
    #: threads of their own for peer transfers: one may wait at its owner up to
    #: ``peers.wait_s``, and must not hold a thread an origin transfer needs
    executor: ThreadPoolExecutor


@dataclass(frozen=True, slots=True)
class Progress:
    done_bytes: int
    total_bytes: int


ProgressFn = Callable[[Progress], None]


@dataclass
class Resolved:
    ref: Ref
    revision: str
    manifest: Manifest
    origin: Origin | None
    prefix: str


@dataclass
class Node:
    cfg: Config
    clock: Clock = field(default_factory=RealClock)
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self.store = Store(self.cfg.cache.dir)
        self.store.ensure_layout()
        try:
            self.index: Any = Index(self.store.index_dir)
        except CacheFull as exc:
            log.warning("index.unavailable reason=%s", exc.message)
            self.index = _NoIndex()
        self.executor = ThreadPoolExecutor(
            max_workers=METADATA_THREADS, thread_name_prefix="weightcache-meta"
        )
        self.transfers = ThreadPoolExecutor(
            max_workers=self.cfg.fetch.concurrency + 2, thread_name_prefix="weightcache-io"
        )
        self._limiter: NodeTokenBucket | None = None
        self._slots: _NodeWideSlots | None = None
        self._blob_flight: SingleFlight[str, bool] = SingleFlight()
        self._origins: dict[str, tuple[Origin, str]] = {}
        self._origin_flight: SingleFlight[str, tuple[Origin, str]] = SingleFlight()
        self._manifest_slots = PrioritySlots(MANIFEST_READS)
        #: every origin transfer in flight, so that a stop can unblock their threads
        self.in_flight = Transfers()
        #: blobs whose part file this process writes, by digest
        self.writers: dict[str, BlobWriter] = {}
        self._writer_gates: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        #: the daemon's peers; None: every chunk from the origin (embedded mode, the CLI)
        self.peers: PeerSetup | None = None
        #: origin bytes pulled for peers that asked for chunks this node did not have
        self.peer_pull_stats = FetchStats()
        #: those pulls, which outlive a request that stopped waiting for them
        self.peer_tasks: set[asyncio.Task[None]] = set()

    async def origin(self, ref: Ref) -> tuple[Origin, str]:
        """The origin a ref lives in (one per bucket or directory, connections reused)
        and the model's key prefix inside it. Built in a worker thread: opening a
        client reads credentials and certificates."""
        key = f"s3://{ref.bucket}" if ref.scheme == "s3" else ref.location
        entry = self._origins.get(key)
        if entry is None:
            entry, _ = await self._origin_flight.run(
                key, lambda: self.hop(open_origin, ref, self.cfg)
            )
            self._origins[key] = entry
        origin, prefix = entry
        return origin, prefix if ref.scheme == "file" else ref.prefix

    async def aclose(self, grace_s: float = 0.0) -> None:
        """Finish or cancel pulls still running (their threads write verified chunks
        to the chunk log as they go), then release threads and the index."""
        await self._blob_flight.cancel_all(grace_s)
        for task in list(self.peer_tasks):
            task.cancel()
        await asyncio.gather(*self.peer_tasks, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self._close_blocking)

    def _close_blocking(self) -> None:
        self.transfers.shutdown(wait=True)
        if self.peers is not None:
            self.peers.executor.shutdown(wait=True)
        self.executor.shutdown(wait=True)
        if self._slots is not None:
            self._slots.node_slots.close()
        if self._limiter is not None:
            self._limiter.close()
        for origin, _ in self._origins.values():
            origin.close()
        self._origins.clear()
        self.index.close()

    async def hop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    @property
    def slots(self) -> PrioritySlots:
        """The node-wide cap on concurrent origin requests (one per chunk GET): served
        by priority inside this process, and shared with every other process on the
        node (the daemon, embedded workers, the CLI) through ``locks/``."""
        if self._slots is None:
            # Created lazily inside the running loop (asyncio primitives bind to it).
            fetch = self.cfg.fetch
            node_slots = NodeSlots(
                self.store.locks,
                fetch.concurrency,
                clock=self.clock,
                executor=self.executor,
                rng=self.rng,
            )
            self._slots = _NodeWideSlots(fetch.concurrency, node_slots)
            if fetch.max_bytes_per_s:
                self._limiter = NodeTokenBucket(
                    self.store.locks,
                    fetch.max_bytes_per_s,
                    clock=self.clock,
                    executor=self.executor,
                )
        return self._slots

    def _fetcher(self, priority: Priority | Urgency, route_ref: str | None = None) -> Fetcher:
        """A fetcher for one pull; ``route_ref`` (``location@revision``) lets it take
        chunks from peers when the node has them."""
        slots = self.slots
        route = None
        if self.peers is not None and route_ref is not None:
            from weightcache.peers.route import PeerRoute

            route = PeerRoute(
                self.peers.members,
                self.peers.client,
                route_ref,
                self.peers.slots,
                self.peers.executor,
            )
        return Fetcher(
            store=self.store,
            policy=self.cfg.fetch,
            executor=self.transfers,
            clock=self.clock,
            rng=self.rng,
            limiter=self._limiter,
            slots=slots,
            transfers=self.in_flight,
            priority=priority,
            peers=route,
        )

    def fetcher_for_peers(self, priority: Priority | Urgency) -> Fetcher:
        """A fetcher for chunks a peer asked for: origin only, never other peers (a
        chunk pulled for the cluster must not go round it)."""
        return self._fetcher(priority)

    # -- resolve -------------------------------------------------------------

    def parse(self, text: str) -> Ref:
        return parse_ref(text, default_bucket=self.cfg.s3.default_bucket)

    async def resolve(self, ref: Ref) -> Resolved:
        """Find the revision a ref names, preferring what the cache already knows."""
        if ref.rev:
            local = await self.hop(self._local_manifest, ref)
            if local is not None:
                return Resolved(ref, local[0], local[1], None, "")
        origin, prefix = await self.origin(ref)
        if ref.rev:
            revision, raw = await self._retrying(self._read_revision, origin, prefix, ref)
        else:
            try:
                raw = await self._retrying(
                    origin.read, join_key(prefix, MANIFEST_NAME), max_bytes=MAX_MANIFEST_BYTES
                )
            except ObjectNotFound as exc:
                raise ModelNotFound(
                    f"no model at {ref.location}: {MANIFEST_NAME} not found",
                    ref=str(ref),
                    hint="publish it with `weightcache publish DIR REF`, or write a "
                    "manifest for uploaded files with `weightcache index REF`",
                ) from exc
            except OriginUnavailable:
                offline = await self.hop(self._last_resolved, ref)
                if offline is None:
                    raise
                log.warning(
                    "resolve.offline ref=%s revision=%s reason=origin unavailable",
                    ref.location,
                    offline.revision,
                )
                return offline
            revision = ""
        manifest, actual = await self.hop(parse, raw)
        if revision and actual != revision:
            raise HashMismatch(
                f"manifest of revision {revision} at {ref.location} hashes to {actual}",
                ref=str(ref),
                expected=revision,
                actual=actual,
            )
        revision = actual
        await self.hop(self.store.save_manifest, revision, raw)
        if not ref.rev:
            await self.hop(self.store.set_ref, ref.location_key, revision)
        return Resolved(ref, revision, manifest, origin, prefix)

    async def _retrying(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A small origin call (a manifest, a listing) with the fetch retry policy."""
        policy = self.cfg.fetch

        async def attempt() -> T:
            # Manifest reads have their own small cap, not the transfer slots: a warm
            # load must not queue behind another model's stalled chunk GETs.
            async with self._manifest_slots.slot(Priority.WORKER):
                return await self.hop(fn, *args, **kwargs)

        return await retry_async(
            attempt,
            Backoff(policy.retries, policy.backoff_base_s, policy.backoff_max_s, self.rng),
            on=OriginUnavailable,
            log=log,
            what="resolve",
            clock=self.clock,
        )

    def _local_manifest(self, ref: Ref) -> tuple[str, Manifest] | None:
        """A pinned ref's revision and manifest from the cache alone (blocking)."""
        rev = self._local_revision(ref)
        if rev is None:
            return None
        manifest = self.store.load_manifest(rev)
        return None if manifest is None else (rev, manifest)

    def _local_revision(self, ref: Ref) -> str | None:
        assert ref.rev
        if is_digest(ref.rev):
            return ref.rev if self.store.manifest_path(ref.rev).exists() else None
        # A short prefix is only matched against revisions this location produced,
        # so that another model's revision can never answer for it.
        matches = [
            rev
            for rev in self.index.ids("snapshot")
            if rev.startswith(ref.rev)
            and (rec := self.index.snapshot(rev)) is not None
            and rec["location"] == ref.location
        ]
        last = self.store.get_ref(ref.location_key)
        if last and last.startswith(ref.rev) and last not in matches:
            matches.append(last)
        if len(matches) > 1:
            raise RevisionAmbiguous(
                f"revision prefix {ref.rev} matches {len(matches)} revisions of {ref.location}",
                ref=str(ref),
                matches=sorted(matches),
            )
        return matches[0] if matches else None

    def _last_resolved(self, ref: Ref) -> Resolved | None:
        rev = self.store.get_ref(ref.location_key)
        if rev is None or not self.store.has_snapshot(rev):
            return None
        manifest = self.store.load_manifest(rev)
        if manifest is None:
            return None
        return Resolved(ref, rev, manifest, None, "")

    def _read_revision(self, origin: Origin, prefix: str, ref: Ref) -> tuple[str, bytes]:
        assert ref.rev
        base = join_key(prefix, REVISIONS_DIR)
        try:
            matches = sorted(
                name
                for name in (
                    info.key[len(base) + 1 :].removesuffix(".json") for info in origin.list(base)
                )
                if is_digest(name) and name.startswith(ref.rev)
            )
        except ObjectNotFound as exc:  # no such bucket
            raise ModelNotFound(f"no model at {ref.location}: {exc.message}", ref=str(ref)) from exc
        if not matches:
            raise ModelNotFound(f"no revision {ref.rev} at {ref.location}", ref=str(ref))
        if len(matches) > 1:
            raise RevisionAmbiguous(
                f"revision prefix {ref.rev} matches {len(matches)} revisions at {ref.location}",
                ref=str(ref),
                matches=matches,
                hint="give more hex digits",
            )
        raw = origin.read(join_key(base, f"{matches[0]}.json"), max_bytes=MAX_MANIFEST_BYTES)
        return matches[0], raw

    # -- lookup and pull -------------------------------------------------------------

    def result(self, res: Resolved) -> Ensured:
        rev, manifest = res.revision, res.manifest
        snap = self.store.snapshot_path(rev)
        return Ensured(
            ref=str(res.ref.with_rev(rev)),
            revision=rev,
            snapshot=snap,
            files=[LocalFile(f.path, snap / f.path, f.size, f.blake3) for f in manifest.files],
            cache_hit=False,
            total_bytes=manifest.total_bytes,
        )

    async def lookup(self, res: Resolved) -> Ensured | None:
        """The revision as a cache hit if its snapshot and every blob it links to are on
        disk (the LRU clock touched), else None: pull it."""
        hit = await self.hop(self._lookup, res)
        if hit is None:
            return None
        log.info("ensure.hit ref=%s revision=%s", res.ref.location, res.revision[:16])
        return hit

    def _lookup(self, res: Resolved) -> Ensured | None:
        rev, manifest = res.revision, res.manifest
        if not self.store.has_snapshot(rev):
            return None
        missing = self.store.missing_blobs(manifest)
        if missing:
            # A removal cut short by a power loss, or a blob deleted by hand: the
            # snapshot is not served; the pull brings the blobs back and keeps it.
            log.warning(
                "ensure.snapshot_incomplete revision=%s missing_blobs=%d",
                rev[:16],
                len(missing),
            )
            return None
        self._touch_hit(rev, res.ref.location, manifest)
        result = self.result(res)
        result.cache_hit = True
        return result

    async def pull(
        self,
        res: Resolved,
        on_progress: ProgressFn | None = None,
        *,
        priority: Priority | Urgency = Priority.WORKER,
        stats: FetchStats | None = None,
    ) -> Ensured:
        """Pull every blob of a resolved revision that is not on disk, commit, link.

        Room is the caller's business (see :mod:`weightcache.budget`); ``stats``,
        when given, shows the bytes as they arrive, and ``priority`` may be an
        :class:`Urgency` the caller raises while the pull runs.
        """
        started = self.clock.monotonic()
        rev, manifest = res.revision, res.manifest
        result = self.result(res)
        unique: dict[str, FileEntry] = {}
        for f in manifest.files:
            unique.setdefault(f.blake3, f)
        origin, prefix = await self.origin(res.ref)
        stats = stats if stats is not None else FetchStats()
        done = 0
        total = manifest.total_bytes

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if on_progress:
                on_progress(Progress(min(done, total), total))

        fetcher = self._fetcher(priority, f"{res.ref.location}@{rev}")
        log.info(
            "ensure.pull ref=%s revision=%s files=%d bytes=%d",
            res.ref.location,
            rev[:16],
            len(unique),
            total,
        )
        with disk_errors(res.ref):
            await self.hop(self.index.incr, "misses")
            await run_all(
                [
                    self._obtain(origin, prefix, entry, fetcher, stats, result, advance)
                    for entry in unique.values()
                ]
            )
            await self.hop(self.store.link_snapshot, rev, manifest)
            await self.hop(self._touch, rev, res.ref.location, manifest)
        result.origin_bytes = stats.origin_bytes
        result.peer_bytes = stats.peer_bytes
        result.resumed_bytes = stats.resumed_bytes
        result.retries = stats.retries
        result.seconds = self.clock.monotonic() - started
        log.info(
            "ensure.done ref=%s revision=%s origin_bytes=%d peer_bytes=%d peer_chunks=%d "
            "peer_failures=%d reused_bytes=%d coalesced_bytes=%d resumed_bytes=%d retries=%d "
            "seconds=%.3f",
            res.ref.location,
            rev[:16],
            result.origin_bytes,
            result.peer_bytes,
            stats.peer_chunks,
            stats.peer_failures,
            result.reused_bytes,
            result.coalesced_bytes,
            result.resumed_bytes,
            result.retries,
            result.seconds,
        )
        return result

    async def _obtain(
        self,
        origin: Origin,
        prefix: str,
        entry: FileEntry,
        fetcher: Fetcher,
        stats: FetchStats,
        result: Ensured,
        advance: Callable[[int], None],
    ) -> None:
        digest, size = entry.blake3, entry.size
        if await self.hop(self.store.has_blob, digest, size):
            result.reused_bytes += size
            advance(size)
            return
        # One pull per blob in this process (two revisions may share it) ...
        waited, joined = await self._blob_flight.run(
            digest, lambda: self._pull_locked(origin, prefix, entry, fetcher, stats, advance)
        )
        if joined or waited:
            result.coalesced_bytes += size
            advance(size)

    async def _pull_locked(
        self,
        origin: Origin,
        prefix: str,
        entry: FileEntry,
        fetcher: Fetcher,
        stats: FetchStats,
        advance: Callable[[int], None],
    ) -> bool:
        """... and one per node: the blob's flock. Returns True if another process pulled it."""
        digest, size = entry.blake3, entry.size
        writer = await self.hold_writer(digest, size, wait=True)
        if writer is None:
            return True  # another process committed it while this one waited
        try:
            if await self.hop(self.store.has_blob, digest, size):
                return True
            await fetcher.fetch(
                origin, join_key(prefix, entry.path), entry, stats, advance, writer.flights
            )
            await self.hop(self.index.add_blob, digest, size)
            return False
        finally:
            await self.let_go_writer(digest, size)

    async def hold_writer(self, digest: str, size: int, *, wait: bool) -> BlobWriter | None:
        """Join this process's writer of a blob, or become it by taking the blob's
        flock. Another process holds it: with ``wait``, wait for it (and take over,
        resuming, if it dies), returning None if it commits the blob meanwhile;
        without, return None at once."""
        lock = self.store.blob_lock(digest)
        while True:
            writer = self.writers.get(digest)
            if writer is not None and writer.closing:
                await writer.released.wait()
                continue
            if writer is not None:
                writer.users += 1
                return writer
            # One flock attempt per blob at a time in this process: a second one
            # would fail on the first's flock and take it for another process's.
            gate = self._writer_gates.setdefault(digest, asyncio.Lock())
            async with gate:
                if digest in self.writers:
                    continue  # registered while this one waited at the gate: join it
                if await self.hop(lock.try_acquire):
                    writer = BlobWriter(lock, users=1)
                    self.writers[digest] = writer
                    return writer
            if not wait:
                return None
            # Another process on this node is pulling this blob: wait for it, and
            # take over (resuming its verified chunks) if it dies.
            await self.clock.sleep(LOCK_POLL_S * (0.5 + self.rng.random()))
            if digest not in self.writers and await self.hop(self.store.has_blob, digest, size):
                return None

    async def let_go_writer(self, digest: str, size: int) -> None:
        writer = self.writers[digest]
        writer.users -= 1
        if writer.users == 0:
            # Registered until the flock is gone, so that nobody in this process
            # mistakes this process's own flock for another process's pull.
            writer.closing = True
            try:
                await asyncio.shield(self.hop(self._release, writer.lock, digest, size))
            finally:
                del self.writers[digest]
                writer.released.set()

    async def sweep_partials(self, max_age_s: float, now: float) -> int:
        """Remove partial downloads untouched for ``max_age_s`` that nobody writes
        (none in this process, and the blob's flock free); returns the bytes freed."""
        freed = 0
        for digest, age in await self.hop(lambda: list(self.store.partial_ages(now))):
            if age < max_age_s or digest in self.writers:
                continue
            lock = self.store.blob_lock(digest)
            if not await self.hop(lock.try_acquire):
                continue  # another process is pulling it
            try:
                freed += await self.hop(self.store.remove_partial, digest)
                log.info("partial.removed blob=%s idle_s=%.0f", digest[:16], age)
            finally:
                await self.hop(lock.release, unlink=True)
        return freed

    def _release(self, lock: BlobLock, digest: str, size: int) -> None:
        # The lock file goes once the blob is committed: nobody needs it again.
        lock.release(unlink=self.store.has_blob(digest, size))

    def _touch_hit(self, rev: str, location: str, manifest: Manifest) -> None:
        # Bookkeeping only (the index is advisory): a full disk must not fail a hit.
        try:
            self._touch(rev, location, manifest)
            self.index.incr("hits")
        except CacheFull as exc:
            log.warning("index.write_skipped revision=%s reason=%s", rev[:16], exc.message)

    def _touch(self, rev: str, location: str, manifest: Manifest) -> None:
        self.index.add_snapshot(rev, location, len(manifest.files), manifest.total_bytes)
        self.index.touch_blobs([f.blake3 for f in manifest.files])


@contextmanager
def disk_errors(ref: Ref) -> Iterator[None]:
    """File-system failures anywhere in a pull (commit, links, manifests) as the cache's
    errors: a full disk is CacheFull, anything else (EIO, a read-only remount,
    permissions) CacheIOError; never a bare OSError."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheFull(
                f"disk full while pulling {ref}: {exc.strerror}",
                hint="free disk space or raise cache.reserve_bytes so pulls stop earlier",
                path=exc.filename,
            ) from exc
        raise CacheIOError(
            f"the cache's file system failed while pulling {ref}: "
            f"{errno.errorcode.get(exc.errno or 0, 'OSError')} {exc.strerror or exc}",
            hint="check the cache's disk and mount (dmesg, mount options, permissions)",
            path=exc.filename,
            errno=exc.errno,
        ) from exc
