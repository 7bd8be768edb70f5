"""The daemon's facade: one owner of every pull on the node.

Composes the node cache (:mod:`weightcache.node`) with what only a long-lived
process can do: single-flight across every client of the node, a bounded queue
of pending pulls, leases that keep a revision from eviction while a worker
uses it, eviction to the byte budget and the free-space reserve, scheduled
prefetch jobs that survive restarts, and the counters behind ``/v1/status``
and ``/metrics``. Every background task is owned here and stopped by
:meth:`Service.close`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from weightcache import __version__
from weightcache.aio import Clock, RealClock
from weightcache.config import Config
from weightcache.errors import (
    CacheFull,
    ModelLeased,
    ModelNotFound,
    NotFound,
    Overloaded,
    RequestInvalid,
    RevisionAmbiguous,
    ShuttingDown,
    TooManyLeases,
    WeightcacheError,
)
from weightcache.evict import Plan, Revision, bytes_to_free, plan
from weightcache.hashing import digest_bytes, is_digest
from weightcache.manifest import Manifest
from weightcache.node import Node, Progress, Resolved, disk_full_as_cache_full
from weightcache.refs import Ref
from weightcache.results import Ensured
from weightcache.scheduler import Priority, SingleFlight, start_time

log = logging.getLogger(__name__)

#: how often leases of dead processes and expired leases are dropped
REAP_INTERVAL_S = 2.0
#: the job scheduler wakes at least this often (it is also woken by new jobs)
SCHEDULER_TICK_S = 1.0
#: a location's latest manifest is read at most once per this many seconds per node: a
#: revision published now is seen by loads that start up to this long later
RESOLVE_TTL_S = 2.0
#: finished prefetch jobs are forgotten after this long
JOB_RETENTION_S = 7 * 86400.0


@dataclass
class Lease:
    id: str
    revision: str
    pid: int | None
    created: float
    expires: float
    #: who holds it when there is no pid (a TCP peer's address)
    client: str | None = None
    #: ensures of the same owner that share the lease; it ends when the last releases
    holders: int = 1

    @property
    def owner(self) -> str | None:
        return f"pid:{self.pid}" if self.pid is not None else self.client

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProgressEvent:
    ref: str
    done_bytes: int
    total_bytes: int
    rate_bytes_per_s: float
    source: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EnsureResult:
    ensured: Ensured
    lease: Lease | None
    coalesced: bool

    @property
    def source(self) -> str:
        return "cache" if self.ensured.cache_hit else "origin"

    def to_json(self) -> dict[str, Any]:
        doc = self.ensured.to_json()
        doc["coalesced"] = self.coalesced
        doc["source"] = self.source
        doc["lease"] = self.lease.to_json() if self.lease else None
        return doc


@dataclass
class Job:
    id: str
    ref: str
    at: float | None
    deadline: float | None
    priority: str
    state: str  # scheduled | running | done | failed
    created: float
    start_after: float
    started: float | None = None
    finished: float | None = None
    done_bytes: int = 0
    total_bytes: int = 0
    revision: str | None = None
    late: bool = False
    error: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Pull:
    """A revision being pulled, as seen by ``/v1/status`` and progress streams."""

    ref: str
    revision: str
    priority: Priority
    total_bytes: int
    started: float
    done_bytes: int = 0
    waiters: int = 1
    listeners: list[Callable[[ProgressEvent], None]] = field(default_factory=list)

    def event(self, now: float) -> ProgressEvent:
        elapsed = max(now - self.started, 1e-6)
        return ProgressEvent(
            self.ref, self.done_bytes, self.total_bytes, self.done_bytes / elapsed, "origin"
        )


class Service:
    def __init__(
        self,
        cfg: Config,
        *,
        clock: Clock | None = None,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock or RealClock()
        self.wall = wall
        self.node = Node(cfg, clock=self.clock, rng=rng or random.Random())
        self.node.make_room = self._make_room
        self.node.reserved_bytes = self._reserved_bytes
        self.node_name = cfg.daemon.node_name or socket.gethostname()
        self.started_at = wall()
        self.counters: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self._pulls: dict[str, _Pull] = {}
        self._flight: SingleFlight[str, Ensured] = SingleFlight()
        self._resolve_flight: SingleFlight[str, Resolved] = SingleFlight()
        self._status_flight: SingleFlight[str, dict[str, Any]] = SingleFlight()
        #: the latest revision of each location, and when it was read
        self._latest: dict[str, tuple[float, Resolved]] = {}
        self._pending = 0
        #: revisions just pulled whose requesters have not taken their leases yet
        self._fresh: set[str] = set()
        #: revisions an ensure found cached and has not leased yet: never evicted
        self._pinned: Counter[str] = Counter()
        self._closing = False
        self._leases: dict[str, Lease] = {}
        self._jobs: dict[str, Job] = {}
        self._job_tasks: dict[str, asyncio.Task[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._evict_lock = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        await self._hop(self._load_state)
        self._tasks = [
            asyncio.create_task(self._reaper(), name="weightcache-lease-reaper"),
            asyncio.create_task(self._scheduler(), name="weightcache-job-scheduler"),
            asyncio.create_task(self._resume_pulls(), name="weightcache-resume"),
        ]
        log.info(
            "service.started node=%s cache=%s jobs=%d leases=%d",
            self.node_name,
            self.cfg.cache.dir,
            len(self._jobs),
            len(self._leases),
        )

    async def close(self) -> None:
        """Stop taking work, let pulls checkpoint, cancel what is left, close the index."""
        if self._closing:
            return
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Pulls write verified chunks as they go: whatever finishes in the grace
        # period is kept, and a cancelled pull resumes from its chunk log on restart.
        await self._flight.cancel_all(self.cfg.daemon.shutdown_timeout_s)
        jobs = list(self._job_tasks.values())
        for task in jobs:
            task.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        await self._hop(self._save_jobs)
        await self.node.aclose()
        log.info("service.stopped node=%s", self.node_name)

    async def _hop(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.node.executor, fn, *args)

    def _load_state(self) -> None:
        now = self.wall()
        for key, rec in self.node.index.items("lease"):
            lease = Lease(**rec)
            if lease.expires > now and (lease.pid is None or _alive(lease.pid)):
                self._leases[key] = lease
            else:
                self.node.index.delete(("lease", key))
        for key, rec in self.node.index.items("job"):
            job = Job(**rec)
            if job.state == "running":
                job.state = "scheduled"  # interrupted by a stop: resume it
            self._jobs[key] = job

    def _save_jobs(self) -> None:
        for job in self._jobs.values():
            self.node.index.put(("job", job.id), job.to_json())

    # -- ensure -----------------------------------------------------------------

    async def ensure(
        self,
        ref: str,
        *,
        priority: Priority = Priority.WORKER,
        pid: int | None = None,
        lease: bool = True,
        on_progress: Callable[[ProgressEvent], None] | None = None,
        client: str | None = None,
    ) -> EnsureResult:
        """Make ``ref`` local for a client: ``pid`` (a local process, from the Unix
        socket) or ``client`` (a TCP peer) owns the lease and its count."""
        if self._closing:
            raise ShuttingDown(
                "the daemon is shutting down", hint="retry against the restarted daemon"
            )
        self._pending += 1
        self.counters["ensure_requests"] += 1
        started = self.clock.monotonic()
        try:
            parsed = self.node.parse(ref)
            with disk_full_as_cache_full(parsed):
                res = await self._resolve(parsed)
            ensured, coalesced, pinned = await self._pull(res, started, priority, on_progress)
        except WeightcacheError as exc:
            self.errors[exc.code] += 1
            raise
        finally:
            self._pending -= 1
        if ensured.cache_hit:
            self.counters["hits"] += 1
        elif coalesced:
            self.counters["coalesced"] += 1
        else:
            self.counters["misses"] += 1
        self.counters["served_bytes"] += ensured.total_bytes
        try:
            held = await self._grant_lease(ensured.revision, pid, client) if lease else None
        finally:
            self._fresh.discard(ensured.revision)  # leased now, or not wanted
            if pinned:
                self._unpin(ensured.revision)
        return EnsureResult(ensured, held, coalesced)

    async def _resolve(self, ref: Ref) -> Resolved:
        """Resolve a ref, reading a location's latest manifest once for every request
        that asks within :data:`RESOLVE_TTL_S` (not once per worker of a storm)."""
        if ref.rev:
            return await self.node.resolve(ref)
        key = ref.location
        cached = self._latest.get(key)
        if cached is not None and self.clock.monotonic() - cached[0] < RESOLVE_TTL_S:
            return cached[1]
        res, _ = await self._resolve_flight.run(key, lambda: self.node.resolve(ref))
        self._latest[key] = (self.clock.monotonic(), res)
        return res

    async def _pull(
        self,
        res: Resolved,
        started: float,
        priority: Priority,
        on_progress: Callable[[ProgressEvent], None] | None,
    ) -> tuple[Ensured, bool, bool]:
        """(result, joined another request's pull, pinned: the caller must unpin)."""
        rev = res.revision
        cached = False
        if rev not in self._pulls:
            # Checked under the eviction lock and pinned before it is released: no
            # eviction is half-way (plan chosen, not yet applied) and none can pick it.
            async with self._evict_lock:
                cached = await self._hop(self.node.store.has_snapshot, rev)
                if cached:
                    self._pinned[rev] += 1
        if cached:
            try:
                ensured = await self.node.ensure_resolved(res, started, priority=priority)
            except BaseException:
                self._unpin(rev)
                raise
            if on_progress:
                on_progress(
                    ProgressEvent(
                        ensured.ref, ensured.total_bytes, ensured.total_bytes, 0.0, "cache"
                    )
                )
            return ensured, False, True

        pull = self._pulls.get(rev)
        if pull is None and len(self._pulls) >= self.cfg.daemon.max_pending:
            # Joining a running pull or reading the cache is always admitted; what is
            # bounded is the number of distinct pulls queued for origin slots.
            self.counters["overloaded"] += 1
            raise Overloaded(
                f"{len(self._pulls)} pulls are already in progress or queued (daemon.max_pending)",
                retry_after_s=1.0 + len(self._pulls) / max(1, self.node.slots.capacity),
            )
        if pull is None:
            pull = _Pull(
                str(res.ref.with_rev(rev)),
                rev,
                priority,
                res.manifest.total_bytes,
                self.clock.monotonic(),
            )
            self._pulls[rev] = pull
        else:
            pull.waiters += 1
        if on_progress:
            pull.listeners.append(on_progress)

        def advance(p: Progress) -> None:
            pull.done_bytes = p.done_bytes
            event = pull.event(self.clock.monotonic())
            for listener in list(pull.listeners):
                listener(event)

        async def run() -> Ensured:
            # Remembered until it ends, so that a daemon stopped mid-pull resumes it.
            await self._hop(self.node.index.put, ("pull", rev), {"ref": pull.ref})
            try:
                ensured = await self.node.ensure_resolved(res, started, advance, priority=priority)
                await self._hop(self.node.index.delete, ("pull", rev))
                self.counters["origin_bytes"] += ensured.origin_bytes
                self._fresh.add(rev)
                # Still listed as pulling, so the budget check cannot pick this revision.
                await self._enforce_budget()
                return ensured
            except asyncio.CancelledError:
                raise
            except BaseException:
                await self._hop(self.node.index.delete, ("pull", rev))
                raise
            finally:
                self._pulls.pop(rev, None)

        try:
            ensured, joined = await self._flight.run(rev, run)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closing and task is not None and not task.cancelling():
                # The shared pull was cancelled by close(), not this request.
                raise ShuttingDown(
                    "the daemon stopped while pulling; the pull resumes after restart",
                    hint="retry against the restarted daemon",
                    revision=rev,
                ) from None
            raise
        finally:
            if on_progress and on_progress in pull.listeners:
                pull.listeners.remove(on_progress)
        if joined:
            # The shared result describes the first caller's pull; this caller
            # moved no bytes itself.
            ensured = replace(
                ensured, origin_bytes=0, reused_bytes=0, coalesced_bytes=ensured.total_bytes
            )
        return ensured, joined, False

    # -- leases -------------------------------------------------------------------

    async def _grant_lease(self, revision: str, pid: int | None, client: str | None) -> Lease:
        now = self.wall()
        ttl = self.cfg.daemon.lease_ttl_s
        owner = f"pid:{pid}" if pid is not None else client
        lease: Lease | None = None
        if owner is not None:
            for existing in self._leases.values():
                if existing.owner == owner and existing.revision == revision:
                    existing.expires = now + ttl  # renewal, not a new lease
                    existing.holders += 1
                    lease = existing
                    break
            held = sum(1 for x in self._leases.values() if x.owner == owner)
            if lease is None and held >= self.cfg.daemon.max_leases_per_client:
                raise TooManyLeases(
                    f"{owner} holds {held} leases (daemon.max_leases_per_client)",
                    hint="release leases with POST /v1/leases/{id}/release",
                )
        if lease is None:
            lease = Lease(secrets.token_hex(12), revision, pid, now, now + ttl, client)
            self._leases[lease.id] = lease
        try:
            await self._hop(self.node.index.put, ("lease", lease.id), lease.to_json())
        except CacheFull as exc:
            # Held in memory all the same; only a restart would forget it.
            log.warning("lease.not_persisted id=%s reason=%s", lease.id, exc.message)
        return lease

    async def release_lease(self, lease_id: str) -> None:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise NotFound(f"no lease {lease_id!r}", lease=lease_id)
        lease.holders -= 1
        if lease.holders > 0:
            await self._hop(self.node.index.put, ("lease", lease_id), lease.to_json())
            return
        self._leases.pop(lease_id, None)
        await self._hop(self.node.index.delete, ("lease", lease_id))

    def _unpin(self, rev: str) -> None:
        self._pinned[rev] -= 1
        if self._pinned[rev] <= 0:
            del self._pinned[rev]

    def leased_revisions(self) -> set[str]:
        return {lease.revision for lease in self._leases.values()}

    async def _resume_pulls(self) -> None:
        """Pulls a previous run was stopped in the middle of: finish them in the background."""
        interrupted = await self._hop(lambda: list(self.node.index.items("pull")))
        for rev, rec in interrupted:
            try:
                await self.ensure(
                    f"{rec['ref'].rpartition('@')[0]}@{rev}",
                    priority=Priority.BACKGROUND,
                    lease=False,
                )
                log.info("pull.resumed revision=%s", rev[:16])
            except WeightcacheError as exc:
                log.warning("pull.resume_failed revision=%s code=%s", rev[:16], exc.code)
            # Finished, failed, or found complete (a kill after the snapshot was
            # linked, before the record was dropped): nothing is left to resume.
            await self._hop(self.node.index.delete, ("pull", rev))

    async def _reaper(self) -> None:
        while True:
            await self.clock.sleep(REAP_INTERVAL_S)
            now = self.wall()
            gone = [
                k
                for k, v in self._leases.items()
                if v.expires <= now or (v.pid is not None and not _alive(v.pid))
            ]
            for key in gone:
                lease = self._leases.pop(key)
                await self._hop(self.node.index.delete, ("lease", key))
                log.info(
                    "lease.ended id=%s revision=%s pid=%s", key, lease.revision[:16], lease.pid
                )

    # -- eviction -------------------------------------------------------------------

    def _revisions(self) -> list[Revision]:
        store, index = self.node.store, self.node.index
        out = []
        for rev in store.snapshot_revisions():
            manifest = self._manifest(rev)
            if manifest is None:
                continue  # not evictable by plan: `verify --repair` deals with it
            rec = index.snapshot(rev)
            accessed = rec["accessed"] if rec else 0.0
            out.append(Revision(rev, accessed, frozenset(f.blake3 for f in manifest.files)))
        return out

    def _manifest(self, rev: str) -> Manifest | None:
        """A cached manifest, or None if missing or corrupt (one bad file must not take
        status, metrics and eviction down with it)."""
        try:
            return self.node.store.load_manifest(rev)
        except WeightcacheError as exc:
            log.error("cache.corrupt_manifest revision=%s error=%s", rev[:16], exc)
            return None

    def _reserved_bytes(self, rev: str) -> int:
        """Bytes the other pulls in flight will still commit (blocking; in a hop)."""
        store = self.node.store
        pending: dict[str, int] = {}
        for other in tuple(self._pulls):
            manifest = store.load_manifest(other) if other != rev else None
            for f in manifest.files if manifest else ():
                if f.blake3 not in pending and not store.has_blob(f.blake3, f.size):
                    pending[f.blake3] = f.size
        return sum(pending.values())

    def _pulling_blobs(self) -> set[str]:
        blobs: set[str] = set()
        for rev in self._pulls:
            manifest = self._manifest(rev)
            if manifest is not None:
                blobs |= {f.blake3 for f in manifest.files}
        return blobs

    def _evict_plan(self, need: int, protect: set[str]) -> Plan:
        sizes = dict(self.node.store.iter_blobs())
        return plan(
            self._revisions(),
            sizes,
            need=need,
            protected_revisions=self.leased_revisions()
            | set(self._pulls)
            | self._fresh
            | set(self._pinned),
            protected_blobs=protect | self._pulling_blobs(),
        )

    def _apply(self, chosen: Plan, reason: str) -> int:
        store, index = self.node.store, self.node.index
        for rev in chosen.revisions:
            store.remove_snapshot(rev)  # first the snapshot, so no reader sees a partial one
            index.drop_snapshot(rev)
            log.info("evict.revision revision=%s reason=%s", rev[:16], reason)
        freed = 0
        for digest in chosen.blobs:
            try:
                size = store.blob_path(digest).stat().st_size
                os.unlink(store.blob_path(digest))
            except FileNotFoundError:
                continue
            index.drop_blob(digest)
            freed += size
        self.counters["evictions"] += len(chosen.revisions)
        self.counters["evicted_bytes"] += freed
        if chosen.revisions or chosen.blobs:
            log.info(
                "evict.done revisions=%d blobs=%d bytes=%d reason=%s",
                len(chosen.revisions),
                len(chosen.blobs),
                freed,
                reason,
            )
        return freed

    async def _make_room(self, need: int, protect: set[str]) -> None:
        async with self._evict_lock:
            chosen = await self._hop(self._evict_plan, need, protect)
            if chosen.shortfall:
                # Even every allowed eviction would not make the pull fit: it fails
                # with cache_full anyway, so evict nothing.
                return
            await self._hop(self._apply, chosen, "make_room")

    async def _enforce_budget(self) -> None:
        """After a pull: bring the cache back under its budget and above its reserve."""
        async with self._evict_lock:
            need = await self._hop(self._over_budget)
            if need:
                chosen = await self._hop(self._evict_plan, need, set())
                await self._hop(self._apply, chosen, "budget")

    def _over_budget(self) -> int:
        store = self.node.store
        budget = self.cfg.cache.max_bytes
        return bytes_to_free(
            used=store.blob_bytes() if budget else 0,
            incoming=0,
            budget=budget,
            free=store.free_bytes(),
            reserve=self.cfg.cache.reserve_bytes,
        )

    async def evict(self, ref: str, *, force: bool = False) -> dict[str, Any]:
        parsed = self.node.parse(ref)
        rev = await self._hop(self._cached_revision, parsed)
        if rev in self._pulls:
            raise ModelLeased(f"{ref} is being pulled right now", revision=rev)
        holders = [x for x in self._leases.values() if x.revision == rev]
        if holders and not force:
            raise ModelLeased(
                f"{ref} (revision {rev[:16]}) is leased by {len(holders)} client(s)",
                hint="wait for the workers to finish, or pass force to evict anyway",
                revision=rev,
                leases=len(holders),
            )
        async with self._evict_lock:
            for lease in holders:
                self._leases.pop(lease.id, None)
                await self._hop(self.node.index.delete, ("lease", lease.id))

            def choose() -> Plan:
                sizes = dict(self.node.store.iter_blobs())
                others = [r for r in self._revisions() if r.rev != rev]
                needed: set[str] = set()
                for r in others:
                    needed |= r.blobs
                mine = next((r for r in self._revisions() if r.rev == rev), None)
                blobs = sorted(
                    (mine.blobs if mine else frozenset()) - needed - self._pulling_blobs()
                )
                return Plan((rev,), tuple(b for b in blobs if b in sizes), 0, 0)

            chosen = await self._hop(choose)
            freed = await self._hop(self._apply, chosen, "admin")
        return {
            "ref": ref,
            "revision": rev,
            "freed_bytes": freed,
            "blobs_removed": len(chosen.blobs),
            "forced": bool(holders),
        }

    def _cached_revision(self, ref: Ref) -> str:
        """The cached revision a ref names; a short @REV only among this location's."""
        store, index = self.node.store, self.node.index
        if ref.rev and is_digest(ref.rev):
            matches = [ref.rev] if store.has_snapshot(ref.rev) else []
        elif ref.rev:
            assert ref.rev is not None
            prefix = ref.rev
            matches = [
                rev
                for rev in store.snapshot_revisions()
                if rev.startswith(prefix)
                and (rec := index.snapshot(rev)) is not None
                and rec["location"] == ref.location
            ]
        else:
            last = store.get_ref(ref.location_key)
            matches = [last] if last and store.has_snapshot(last) else []
        if len(matches) > 1:
            raise RevisionAmbiguous(
                f"{ref} matches {len(matches)} cached revisions", ref=str(ref), matches=matches
            )
        if not matches:
            raise ModelNotFound(f"{ref} is not in this node's cache", ref=str(ref))
        return matches[0]

    # -- prefetch jobs -------------------------------------------------------------

    async def prefetch(
        self,
        ref: str,
        *,
        at: float | None = None,
        deadline: float | None = None,
        priority: Priority = Priority.ADMIN,
    ) -> tuple[Job, bool]:
        if self._closing:
            raise ShuttingDown("the daemon is shutting down")
        self.node.parse(ref)  # a bad ref fails now, not when the job runs
        if at is not None and deadline is not None and deadline <= at:
            raise RequestInvalid("deadline must be after at", field="deadline")
        now = self.wall()
        if at is None:
            # "now" jobs are idempotent while one for the ref is still waiting or running;
            # once it finished, asking again pulls again (a new revision, an eviction).
            for job in self._jobs.values():
                if job.ref == ref and job.at is None and job.state in ("scheduled", "running"):
                    return job, False
            job_id = digest_bytes(f"{ref}\0now\0{now}".encode())[:16]
        else:
            job_id = digest_bytes(f"{ref}\0{at}".encode())[:16]
            existing = self._jobs.get(job_id)
            if existing is not None:
                return existing, False
        begin = (
            now
            if at is None
            else start_time(at, deadline, self.node_name, job_id, self.cfg.daemon.prefetch_spread_s)
        )
        job = Job(job_id, ref, at, deadline, priority.label, "scheduled", now, begin)
        self._jobs[job_id] = job
        await self._hop(self.node.index.put, ("job", job_id), job.to_json())
        self._wake.set()
        log.info("job.scheduled id=%s ref=%s start_after=%.0f", job_id, ref, begin)
        return job, True

    def jobs(self) -> list[Job]:
        return sorted(self._jobs.values(), key=lambda j: (j.start_after, j.id))

    def job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", job=job_id)
        return job

    async def _scheduler(self) -> None:
        while True:
            now = self.wall()
            expired = [
                j.id
                for j in self._jobs.values()
                if j.finished is not None and j.finished < now - JOB_RETENTION_S
            ]
            for job_id in expired:
                del self._jobs[job_id]
                await self._hop(self.node.index.delete, ("job", job_id))
            for job in self.jobs():
                if (
                    job.state == "scheduled"
                    and job.start_after <= now
                    and job.id not in self._job_tasks
                ):
                    self._job_tasks[job.id] = asyncio.create_task(self._run_job(job))
            upcoming = [j.start_after - now for j in self._jobs.values() if j.state == "scheduled"]
            delay = min([SCHEDULER_TICK_S, *[d for d in upcoming if d > 0]])
            self._wake.clear()
            sleeper = asyncio.ensure_future(self.clock.sleep(delay))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait([sleeper, waker], return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()

    async def _run_job(self, job: Job) -> None:
        job.state = "running"
        job.started = self.wall()
        await self._hop(self.node.index.put, ("job", job.id), job.to_json())

        def progress(event: ProgressEvent) -> None:
            job.done_bytes, job.total_bytes = event.done_bytes, event.total_bytes

        try:
            result = await self.ensure(
                job.ref, priority=Priority.parse(job.priority), lease=False, on_progress=progress
            )
            job.state = "done"
            job.revision = result.ensured.revision
            job.done_bytes = job.total_bytes = result.ensured.total_bytes
        except asyncio.CancelledError:
            job.state = "scheduled"  # resumed by the next start
            raise
        except WeightcacheError as exc:
            job.state = "failed"
            job.error = {"code": exc.code, "message": exc.message}
            log.warning("job.failed id=%s ref=%s code=%s", job.id, job.ref, exc.code)
        finally:
            self._job_tasks.pop(job.id, None)
            job.finished = self.wall() if job.state in ("done", "failed") else None
            job.late = bool(
                job.deadline is not None and job.finished and job.finished > job.deadline
            )
            await asyncio.shield(self._hop(self.node.index.put, ("job", job.id), job.to_json()))
        log.info("job.%s id=%s ref=%s late=%s", job.state, job.id, job.ref, job.late)

    # -- status, blobs, health -----------------------------------------------------------

    def _disk(self) -> dict[str, Any]:
        store = self.node.store
        return {
            "cache_dir": str(self.cfg.cache.dir),
            "used_bytes": store.blob_bytes(),
            "budget_bytes": self.cfg.cache.max_bytes,
            "reserve_bytes": self.cfg.cache.reserve_bytes,
            "free_bytes": store.free_bytes(),
        }

    def _models(self) -> list[dict[str, Any]]:
        leases = Counter(x.revision for x in self._leases.values())
        rows = []
        for rev in self.node.store.snapshot_revisions():
            manifest = self._manifest(rev)
            rec = self.node.index.snapshot(rev)
            rows.append(
                {
                    "revision": rev,
                    "location": rec["location"] if rec else "",
                    "state": "cached" if manifest is not None else "corrupt",
                    "files": len(manifest.files) if manifest else 0,
                    "bytes": manifest.total_bytes if manifest else 0,
                    "leases": leases.get(rev, 0),
                    "last_used": rec["accessed"] if rec else None,
                }
            )
        return rows

    async def status(self) -> dict[str, Any]:
        """The node's state. Concurrent callers share one snapshot (a scrape storm
        costs one scan of the cache, not one per request); treat it as read-only."""
        doc, _ = await self._status_flight.run("status", self._status)
        return doc

    async def _status(self) -> dict[str, Any]:
        disk = await self._hop(self._disk)
        models = await self._hop(self._models)
        now = self.clock.monotonic()
        pulls = []
        for pull in self._pulls.values():
            event = pull.event(now)
            pulls.append(
                {
                    "ref": pull.ref,
                    "revision": pull.revision,
                    "priority": pull.priority.label,
                    "done_bytes": pull.done_bytes,
                    "total_bytes": pull.total_bytes,
                    "rate_bytes_per_s": event.rate_bytes_per_s,
                    "waiters": pull.waiters,
                }
            )
            models.append(
                {
                    "revision": pull.revision,
                    "location": pull.ref.split("@")[0],
                    "state": "pulling",
                    "files": 0,
                    "bytes": pull.total_bytes,
                    "leases": 0,
                    "last_used": None,
                }
            )
        counters = {
            name: self.counters.get(name, 0)
            for name in (
                "ensure_requests",
                "hits",
                "misses",
                "coalesced",
                "origin_bytes",
                "served_bytes",
                "evictions",
                "evicted_bytes",
                "overloaded",
                "peer_bytes_served",
            )
        }
        return {
            "node": self.node_name,
            "version": __version__,
            "uptime_s": self.wall() - self.started_at,
            "counters": counters,
            "errors": dict(self.errors),
            "disk": disk,
            "models": models,
            "pulls": pulls,
            "leases": len(self._leases),
            "jobs": dict(Counter(j.state for j in self._jobs.values())),
            "pending": self._pending,
            "max_pending": self.cfg.daemon.max_pending,
            "origin_slots": {
                "capacity": self.node.slots.capacity,
                "in_use": self.node.slots.in_use,
                "waiting": self.node.slots.waiting,
            },
        }

    def blob_path(self, digest: str) -> tuple[Path, int]:
        if not is_digest(digest):
            raise RequestInvalid(
                "blobs are addressed by their full lower-case hex BLAKE3 digest", digest=digest[:80]
            )
        path = self.node.store.blob_path(digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotFound(f"no blob {digest} on this node", digest=digest) from None
        return path, size

    def note_peer_bytes(self, n: int) -> None:
        self.counters["peer_bytes_served"] += n
        self.counters["served_bytes"] += n

    def health(self) -> dict[str, Any]:
        ready = (
            not self._closing
            and bool(self._tasks)
            and all(not t.done() for t in self._tasks if t.get_name() != "weightcache-resume")
        )
        return {
            "live": True,
            "ready": ready,
            "node": self.node_name,
            "version": __version__,
            "closing": self._closing,
        }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user
    return True
