"""The node cache as one facade: resolve a ref, pull what is missing, link the snapshot.

Used in-process by ``weightcache.load`` when no daemon answers (embedded mode)
and by the CLI. Several processes on a node may run it at once against the same
cache directory: each blob is pulled by whichever process holds its ``flock``,
the others wait for it (or take over, resuming, if the holder dies).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from weightcache.aio import Clock, RealClock, run_all
from weightcache.config import Config, load_config
from weightcache.errors import (
    CacheFull,
    HashMismatch,
    ModelNotFound,
    ObjectNotFound,
    OriginUnavailable,
    RevisionAmbiguous,
)
from weightcache.fetch import Fetcher, FetchStats, TokenBucket
from weightcache.hashing import is_digest
from weightcache.index import Index
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
from weightcache.scheduler import Priority, PrioritySlots, SingleFlight
from weightcache.store import BlobLock, Store

log = logging.getLogger(__name__)
T = TypeVar("T")

#: how often a process waiting for another's pull of a blob looks again
LOCK_POLL_S = 0.05


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
            max_workers=self.cfg.fetch.concurrency + 4, thread_name_prefix="weightcache-io"
        )
        self._limiter: TokenBucket | None = None
        self._slots: PrioritySlots | None = None
        self._blob_flight: SingleFlight[str, bool] = SingleFlight()
        self._origins: dict[str, tuple[Origin, str]] = {}
        #: set by the daemon: bytes other pulls in flight (not ``rev``) have yet to commit
        self.reserved_bytes: Callable[[str], int] | None = None
        #: set by the daemon: frees ``need`` bytes (evicting) without touching ``protect``
        self.make_room: Callable[[int, set[str]], Awaitable[None]] | None = None

    def origin(self, ref: Ref) -> tuple[Origin, str]:
        """The origin a ref lives in (one per bucket or directory, connections reused)
        and the model's key prefix inside it."""
        key = f"s3://{ref.bucket}" if ref.scheme == "s3" else ref.location
        entry = self._origins.get(key)
        if entry is None:
            entry = self._origins[key] = open_origin(ref, self.cfg)
        origin, prefix = entry
        return origin, prefix if ref.scheme == "file" else ref.prefix

    async def aclose(self, grace_s: float = 0.0) -> None:
        """Finish or cancel pulls still running (their threads write verified chunks
        to the chunk log as they go), then release threads and the index."""
        await self._blob_flight.cancel_all(grace_s)
        await asyncio.get_running_loop().run_in_executor(None, self._close_blocking)

    def _close_blocking(self) -> None:
        self.executor.shutdown(wait=True)
        for origin, _ in self._origins.values():
            origin.close()
        self._origins.clear()
        self.index.close()

    async def _hop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    @property
    def slots(self) -> PrioritySlots:
        """The node-wide cap on concurrent origin requests (one per chunk GET)."""
        if self._slots is None:
            # Created lazily inside the running loop (asyncio primitives bind to it).
            self._slots = PrioritySlots(self.cfg.fetch.concurrency)
            if self.cfg.fetch.max_bytes_per_s:
                self._limiter = TokenBucket(self.cfg.fetch.max_bytes_per_s, self.clock)
        return self._slots

    def _fetcher(self, priority: Priority) -> Fetcher:
        slots = self.slots
        return Fetcher(
            store=self.store,
            policy=self.cfg.fetch,
            executor=self.executor,
            clock=self.clock,
            rng=self.rng,
            limiter=self._limiter,
            slots=slots,
            priority=priority,
        )

    # -- resolve -------------------------------------------------------------

    def parse(self, text: str) -> Ref:
        return parse_ref(text, default_bucket=self.cfg.s3.default_bucket)

    async def resolve(self, ref: Ref) -> Resolved:
        """Find the revision a ref names, preferring what the cache already knows."""
        if ref.rev:
            local = self._local_revision(ref)
            if local:
                manifest = await self._hop(self.store.load_manifest, local)
                if manifest is not None:
                    return Resolved(ref, local, manifest, None, "")
        origin, prefix = self.origin(ref)
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
                offline = self._last_resolved(ref)
                if offline is None:
                    raise
                log.warning(
                    "resolve.offline ref=%s revision=%s reason=origin unavailable",
                    ref.location,
                    offline.revision,
                )
                return offline
            revision = ""
        manifest, actual = parse(raw)
        if revision and actual != revision:
            raise HashMismatch(
                f"manifest of revision {revision} at {ref.location} hashes to {actual}",
                ref=str(ref),
                expected=revision,
                actual=actual,
            )
        revision = actual
        await self._hop(self.store.save_manifest, revision, raw)
        if not ref.rev:
            await self._hop(self.store.set_ref, ref.location_key, revision)
        return Resolved(ref, revision, manifest, origin, prefix)

    async def _retrying(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A small origin call (a manifest, a listing) with the fetch retry policy."""
        policy = self.cfg.fetch

        async def attempt() -> T:
            # Manifest reads count against the node-wide cap on origin requests too.
            async with self.slots.slot(Priority.WORKER):
                return await self._hop(fn, *args, **kwargs)

        return await retry_async(
            attempt,
            Backoff(policy.retries, policy.backoff_base_s, policy.backoff_max_s, self.rng),
            on=OriginUnavailable,
            log=log,
            what="resolve",
            clock=self.clock,
        )

    def _local_revision(self, ref: Ref) -> str | None:
        assert ref.rev
        if is_digest(ref.rev):
            return ref.rev if self.store.manifest_path(ref.rev).exists() else None
        # A short prefix is only matched against revisions this location produced,
        # so that another model's revision can never answer for it.
        matches = [
            rev
            for rev, rec in self.index.snapshots()
            if rec["location"] == ref.location and rev.startswith(ref.rev)
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

    # -- ensure -------------------------------------------------------------------

    async def ensure(
        self,
        text: str,
        on_progress: ProgressFn | None = None,
        *,
        priority: Priority = Priority.WORKER,
    ) -> Ensured:
        """Make ``text`` local and verified; return where its files are."""
        started = self.clock.monotonic()
        ref = self.parse(text)
        with disk_full_as_cache_full(ref):
            res = await self.resolve(ref)
        return await self.ensure_resolved(res, started, on_progress, priority=priority)

    async def ensure_resolved(
        self,
        res: Resolved,
        started: float,
        on_progress: ProgressFn | None = None,
        *,
        priority: Priority = Priority.WORKER,
    ) -> Ensured:
        """The pull half of :meth:`ensure`, for callers that resolved the ref themselves."""
        resolved = self.clock.monotonic() - started
        with disk_full_as_cache_full(res.ref):
            result = await self._ensure(res, started, on_progress, priority)
        result.resolve_seconds = resolved
        return result

    async def _ensure(
        self, res: Resolved, started: float, on_progress: ProgressFn | None, priority: Priority
    ) -> Ensured:
        rev, manifest = res.revision, res.manifest
        result = Ensured(
            ref=str(res.ref.with_rev(rev)),
            revision=rev,
            snapshot=self.store.snapshot_path(rev),
            files=self._files(rev, manifest),
            cache_hit=False,
            total_bytes=manifest.total_bytes,
        )
        if await self._hop(self.store.has_snapshot, rev):
            result.cache_hit = True
            await self._hop(self._touch_hit, rev, res.ref.location, manifest)
            if on_progress:
                on_progress(Progress(manifest.total_bytes, manifest.total_bytes))
            result.seconds = self.clock.monotonic() - started
            log.info("ensure.hit ref=%s revision=%s", res.ref.location, rev[:16])
            return result

        await self._hop(self.index.incr, "misses")
        unique: dict[str, FileEntry] = {}
        for f in manifest.files:
            unique.setdefault(f.blake3, f)
        missing = list(unique.values())
        shortfall = await self._hop(self._space_shortfall, res.ref, missing, rev)
        for _ in range(8):
            # Other pulls commit blobs meanwhile: ask again until it fits or nothing
            # more can go.
            if shortfall is None or self.make_room is None:
                break
            await self.make_room(shortfall.facts["shortfall_bytes"], set(unique))
            shortfall = await self._hop(self._space_shortfall, res.ref, missing, rev)
        if shortfall is not None:
            raise shortfall
        origin, prefix = self.origin(res.ref)

        stats = FetchStats()
        done = 0
        total = manifest.total_bytes

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if on_progress:
                on_progress(Progress(min(done, total), total))

        fetcher = self._fetcher(priority)
        log.info(
            "ensure.pull ref=%s revision=%s files=%d bytes=%d",
            res.ref.location,
            rev[:16],
            len(unique),
            total,
        )
        await run_all(
            [
                self._obtain(origin, prefix, entry, fetcher, stats, result, advance)
                for entry in unique.values()
            ]
        )
        await self._hop(self.store.link_snapshot, rev, manifest)
        await self._hop(self._touch, rev, res.ref.location, manifest)
        result.origin_bytes = stats.origin_bytes
        result.resumed_bytes = stats.resumed_bytes
        result.retries = stats.retries
        result.seconds = self.clock.monotonic() - started
        log.info(
            "ensure.done ref=%s revision=%s origin_bytes=%d reused_bytes=%d coalesced_bytes=%d "
            "resumed_bytes=%d retries=%d seconds=%.3f",
            res.ref.location,
            rev[:16],
            result.origin_bytes,
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
        if await self._hop(self.store.has_blob, digest, size):
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
        lock = self.store.blob_lock(digest)
        while not await self._hop(lock.try_acquire):
            # Another process on this node is pulling this blob: wait for it, and
            # take over (resuming its verified chunks) if it dies.
            await self.clock.sleep(LOCK_POLL_S * (0.5 + self.rng.random()))
            if await self._hop(self.store.has_blob, digest, size):
                return True
        try:
            if await self._hop(self.store.has_blob, digest, size):
                return True
            await fetcher.fetch(origin, join_key(prefix, entry.path), entry, stats, advance)
            await self._hop(self.index.add_blob, digest, size)
            return False
        finally:
            await self._hop(self._release, lock, digest, size)

    def _release(self, lock: BlobLock, digest: str, size: int) -> None:
        # The lock file goes once the blob is committed: nobody needs it again.
        lock.release(unlink=self.store.has_blob(digest, size))

    def _space_shortfall(
        self, ref: Ref, entries: list[FileEntry], rev: str = ""
    ) -> CacheFull | None:
        """The CacheFull a pull of ``entries`` would hit now, or None if it fits."""
        needed = 0  # new disk space: a preallocated part file already holds its share
        incoming = 0  # what the budget will count once the blobs are committed
        for e in entries:
            if self.store.has_blob(e.blake3, e.size):
                continue
            try:
                allocated = self.store.partial_paths(e.blake3).part.stat().st_blocks * 512
            except FileNotFoundError:
                allocated = 0
            needed += max(0, e.size - allocated)
            incoming += e.size
        if not incoming:
            return None
        free = self.store.free_bytes()
        reserve = self.cfg.cache.reserve_bytes
        budget = self.cfg.cache.max_bytes
        used = 0
        if budget:
            # Other pulls' bytes first, then the committed ones: a blob committed in
            # between is counted twice (safe), never missed.
            if self.reserved_bytes is not None:
                used += self.reserved_bytes(rev)
            used += self.store.blob_bytes()
        over_budget = used + incoming - budget if budget else 0
        under_reserve = reserve + needed - free
        shortfall = max(0, over_budget, under_reserve)
        if not shortfall:
            return None
        if needed + reserve > free:
            return CacheFull(
                f"pulling {ref} needs {needed} bytes and {reserve} must stay free, but only "
                f"{free} are available on the cache's file system ({self.store.root})",
                hint="free disk space, evict models (`weightcache evict REF`), "
                "or lower cache.reserve_bytes",
                needed_bytes=needed,
                available_bytes=free,
                reserve_bytes=reserve,
                shortfall_bytes=shortfall,
            )
        return CacheFull(
            f"pulling {ref} needs {needed} bytes; the cache holds {used} of its "
            f"{budget}-byte budget",
            hint="evict models (`weightcache evict REF`) or raise cache.max_bytes",
            needed_bytes=needed,
            used_bytes=used,
            budget_bytes=budget,
            shortfall_bytes=shortfall,
        )

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

    def _files(self, rev: str, manifest: Manifest) -> list[LocalFile]:
        snap = self.store.snapshot_path(rev)
        return [LocalFile(f.path, snap / f.path, f.size, f.blake3) for f in manifest.files]


@contextmanager
def disk_full_as_cache_full(ref: Ref) -> Iterator[None]:
    """A full disk anywhere in a pull (commit, links, manifests) is CacheFull, not an OSError."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheFull(
                f"disk full while pulling {ref}: {exc.strerror}",
                hint="free disk space or raise cache.reserve_bytes so pulls stop earlier",
                path=exc.filename,
            ) from exc
        raise


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


def ensure_blocking(
    text: str, cfg: Config | None = None, on_progress: ProgressFn | None = None
) -> Ensured:
    """Embedded mode: pull ``text`` in this process against the configured cache."""
    config = cfg or load_config()

    async def main() -> Ensured:
        node = Node(config)
        try:
            return await node.ensure(text, on_progress)
        finally:
            await node.aclose()

    started = time.monotonic()
    result = run_blocking(main)
    log.debug("embedded.ensure seconds=%.3f pid=%d", time.monotonic() - started, os.getpid())
    return result
