"""The daemon's facade: one owner of every pull on the node.

Composes the node cache's puller (:mod:`weightcache.node`) with what only a
long-lived process can do: single-flight across every client of the node, a
bounded queue of pending pulls, admission and eviction (:mod:`weightcache.budget`),
leases (:mod:`weightcache.leases`), prefetch jobs (:mod:`weightcache.jobs`),
recurring schedules and their pins (:mod:`weightcache.schedules`), the request
history behind the forecast (:mod:`weightcache.forecast`), and the counters
behind ``/v1/status`` and ``/metrics``. Every background task is owned here and
stopped by :meth:`Service.close`.

State the event loop owns (pulls, leases, jobs, counters) never crosses into a
worker thread: a hop gets an immutable snapshot (a frozenset, a Counter copy)
and its result is applied back on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from weightcache import __version__, inventory
from weightcache.aio import Clock, RealClock
from weightcache.budget import Budget, Protection, enforce, make_room
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
    WeightcacheError,
)
from weightcache.evict import Plan
from weightcache.fetch import FetchStats
from weightcache.forecast import (
    Decision,
)
from weightcache.hashing import is_digest
from weightcache.jobs import Job
from weightcache.leases import Connection, Lease, LeaseTable
from weightcache.locks import RevisionUses
from weightcache.node import Node, Progress, Resolved, disk_errors
from weightcache.peers.serve import ChunkFile, serve_range
from weightcache.prefetch import Prefetching
from weightcache.refs import Ref
from weightcache.results import Ensured
from weightcache.scheduler import Priority, SingleFlight, Urgency
from weightcache.schedules import Schedule

log = logging.getLogger(__name__)

#: after the shutdown grace: how long cancelled pulls get to stop (their transfers
#: are aborted first, so this is only their bookkeeping)
CANCEL_GRACE_S = 3.0
#: how often leases of dead processes and expired leases are dropped
REAP_INTERVAL_S = 2.0
#: how often the daemon looks for idle partial downloads (cache.partial_ttl_s)
SWEEP_INTERVAL_S = 3600.0
#: a location's latest manifest is read at most once per this many seconds per node: a
#: revision published now is seen by loads that start up to this long later
RESOLVE_TTL_S = 2.0
#: how often prefetch.auto looks at the forecast for schedules to create
AUTO_INTERVAL_S = 3600.0
#: automatic decisions shown in /v1/status (the log has them all)
AUTO_LOG = 50
T = TypeVar("T")


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
        """``cache``, or where the pulled bytes came from: ``origin``, ``peer`` or
        ``origin+peer``."""
        e = self.ensured
        if e.cache_hit:
            return "cache"
        if e.peer_bytes and e.origin_bytes:
            return "origin+peer"
        return "peer" if e.peer_bytes else "origin"

    def to_json(self) -> dict[str, Any]:
        doc = self.ensured.to_json()
        doc["coalesced"] = self.coalesced
        doc["source"] = self.source
        doc["lease"] = self.lease.to_json() if self.lease else None
        return doc


@dataclass
class _Pull:
    """A revision being pulled, as seen by ``/v1/status`` and progress streams."""

    ref: str
    revision: str
    total_bytes: int
    started: float
    urgency: Urgency
    done_bytes: int = 0
    waiters: int = 1
    #: the pull's byte counts as they arrive (origin bytes count before it ends)
    stats: FetchStats = field(default_factory=FetchStats)
    listeners: list[Callable[[ProgressEvent], None]] = field(default_factory=list)

    def event(self, now: float) -> ProgressEvent:
        elapsed = max(now - self.started, 1e-6)
        return ProgressEvent(
            self.ref, self.done_bytes, self.total_bytes, self.done_bytes / elapsed, "origin"
        )

    @property
    def priority(self) -> Priority:
        return self.urgency.priority


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
        self.rng = rng or random.Random()
        self.node_name = cfg.daemon.node_name or socket.gethostname()
        self.started_at = wall()
        self.counters: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        #: opened by start(), in a worker thread (the cache directory, SQLite)
        self._node: Node | None = None
        self._uses: RevisionUses | None = None
        self._budget: Budget | None = None
        self.leases = LeaseTable(cfg.daemon.lease_ttl_s, cfg.daemon.max_leases_per_client)
        #: jobs, recurring schedules, pins, the forecast (:mod:`weightcache.prefetch`)
        self.prefetching = Prefetching(self, self.node_name)
        self._pulls: dict[str, _Pull] = {}
        self._flight: SingleFlight[str, Ensured] = SingleFlight()
        self._resolve_flight: SingleFlight[str, Resolved] = SingleFlight()
        self._status_flight: SingleFlight[str, dict[str, Any]] = SingleFlight()
        #: the latest revision of each location, and when it was read
        self._latest: dict[str, tuple[float, Resolved]] = {}
        self._pending = 0
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        #: short-lived tasks that must finish even if their starter was cancelled
        self._chores: set[asyncio.Task[Any]] = set()
        self._evict_lock = asyncio.Lock()
        #: lease records are written one at a time, each with the latest state
        self._lease_io = asyncio.Lock()

    @property
    def node(self) -> Node:
        if self._node is None:
            raise RuntimeError("Service.start() has not run")
        return self._node

    @property
    def uses(self) -> RevisionUses:
        assert self._uses is not None, "Service.start() has not run"
        return self._uses

    @property
    def budget(self) -> Budget:
        assert self._budget is not None, "Service.start() has not run"
        return self._budget

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        # Opening the cache creates directories and opens SQLite: not on the loop.
        node = await asyncio.to_thread(Node, self.cfg, self.clock, self.rng)
        self._node = node
        self._uses = RevisionUses(node.store.locks)
        self._budget = Budget(self.cfg, node.store, node.index, self._uses, wall=self.wall)

        def records() -> dict[str, list[tuple[str, dict[str, Any]]]]:
            kinds = ("lease", "job", "schedule", "pin", "history")
            return {kind: list(node.index.items(kind)) for kind in kinds}

        loaded = await self.hop(records)
        for stale in self.leases.load(loaded["lease"], self.wall()):
            await self.hop(node.index.delete, ("lease", stale))
        for stale in self.prefetching.load(loaded):
            await self.hop(node.index.delete, ("pin", stale))
        # Peers first: pulls resumed or started below already ask them.
        peer_tasks = []
        if self.cfg.peers.enabled:
            from weightcache.peers import setup

            node.peers = await self.hop(setup.make_setup, self.cfg, self.clock)
            if self.cfg.peers.dns:
                refresh = setup.refresh_forever(node.peers, self.cfg, self.clock)
                peer_tasks.append(asyncio.create_task(refresh, name="weightcache-peers"))
        self._tasks = [
            *peer_tasks,
            asyncio.create_task(self._reaper(), name="weightcache-lease-reaper"),
            *self.prefetching.tasks(),
            asyncio.create_task(self._resume_pulls(), name="weightcache-resume"),
            asyncio.create_task(self._sweeper(), name="weightcache-partial-sweeper"),
        ]
        log.info(
            "service.started node=%s cache=%s jobs=%d leases=%d",
            self.node_name,
            self.cfg.cache.dir,
            len(self.prefetching.jobs_book.jobs),
            len(self.leases),
        )

    async def close(self) -> None:
        """Stop taking work, let pulls checkpoint, cancel what is left, close the index."""
        if self._closing:
            return
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._node is None:
            return
        # Pulls write verified chunks as they go: whatever finishes in the grace
        # period is kept, and a cancelled pull resumes from its chunk log on restart.
        # Then every transfer still blocked on the origin is unblocked from here (its
        # socket shut down), so the stop is bounded whatever the origin does.
        ended = await self._flight.cancel_all(
            self.cfg.daemon.shutdown_timeout_s,
            before_cancel=self.node.in_flight.abort_all,
            cancel_timeout_s=CANCEL_GRACE_S,
        )
        if not ended:
            log.warning("service.pulls_not_stopped after_s=%.1f", CANCEL_GRACE_S)
        await self.prefetching.close()
        await asyncio.gather(*self._chores, return_exceptions=True)
        # Transfers no pull owns (chunks pulled for peers) are unblocked too.
        self.node.in_flight.abort_all()
        if self.node.peers is not None:
            self.node.peers.client.close()
        self.uses.close()
        await self.node.aclose()
        log.info("service.stopped node=%s", self.node_name)

    async def hop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One blocking step in the metadata threads (never the transfer threads)."""
        return await self.node.hop(fn, *args, **kwargs)

    def _chore(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

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
        connection: Connection | None = None,
        demand: bool = True,
    ) -> EnsureResult:
        """Make ``ref`` local for a client: ``pid`` (a local process, from the Unix
        socket) or ``client`` (a TCP peer) owns the lease and its count; with
        ``connection`` the lease also ends when that connection closes. ``demand``
        false (prefetch jobs, resumed pulls): not counted in the request history."""
        if self._closing:
            raise ShuttingDown(
                "the daemon is shutting down", hint="retry against the restarted daemon"
            )
        self._pending += 1
        self.counters["ensure_requests"] += 1
        started = self.clock.monotonic()
        try:
            parsed = self.node.parse(ref)
            with disk_errors(parsed):
                res = await self.resolve(parsed)
            resolved_s = self.clock.monotonic() - started
            rev = res.revision
            # In use from before the hit check until the lease is granted: no
            # eviction (of this daemon or another process) can take it in between.
            with disk_errors(parsed):
                await self._use(rev)
            try:
                ensured, coalesced = await self._obtain(res, started, priority, on_progress)
                ensured.resolve_seconds = resolved_s
                if ensured.cache_hit:
                    self.counters["hits"] += 1
                elif coalesced:
                    self.counters["coalesced"] += 1
                else:
                    self.counters["misses"] += 1
                self.counters["served_bytes"] += ensured.total_bytes
                if demand:
                    self.prefetching.note_demand(parsed, ensured, coalesced)
                held = await self._grant_lease(rev, pid, client, connection) if lease else None
            finally:
                self._chore(self.hop(self.uses.release, rev))
        except WeightcacheError as exc:
            self.errors[exc.code] += 1
            raise
        finally:
            self._pending -= 1
        return EnsureResult(ensured, held, coalesced)

    async def _use(self, rev: str) -> None:
        acquiring = asyncio.ensure_future(self.hop(self.uses.acquire, rev))
        try:
            await asyncio.shield(acquiring)
        except asyncio.CancelledError:
            # The thread takes the use anyway: give it back once it has.
            def give_back(done: asyncio.Future[None]) -> None:
                if not done.cancelled() and done.exception() is None:
                    self._chore(self.hop(self.uses.release, rev))

            acquiring.add_done_callback(give_back)
            raise

    async def resolve(self, ref: Ref) -> Resolved:
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

    def _protection(self) -> Protection:
        """What this daemon protects now, as a snapshot for a worker thread."""
        return Protection(
            revisions=self.leases.revisions() | frozenset(self._pulls),
            pinned=self.prefetching.schedules_book.pinned_revisions(),
        )

    async def _obtain(
        self,
        res: Resolved,
        started: float,
        priority: Priority,
        on_progress: Callable[[ProgressEvent], None] | None,
    ) -> tuple[Ensured, bool]:
        """(result, joined another request's pull). The caller holds a use of the revision."""
        rev = res.revision
        if rev not in self._pulls:
            hit = await self.node.lookup(res)
            if hit is not None:
                hit.seconds = self.clock.monotonic() - started
                if on_progress:
                    on_progress(
                        ProgressEvent(hit.ref, hit.total_bytes, hit.total_bytes, 0.0, "cache")
                    )
                return hit, False

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
                res.manifest.total_bytes,
                self.clock.monotonic(),
                Urgency(priority),
            )
            self._pulls[rev] = pull
        else:
            pull.waiters += 1
            if priority < pull.priority:
                log.info(
                    "pull.priority_raised revision=%s from=%s to=%s",
                    rev[:16],
                    pull.priority.label,
                    priority.label,
                )
                pull.urgency.raise_to(priority)
        if on_progress:
            pull.listeners.append(on_progress)

        def advance(p: Progress) -> None:
            pull.done_bytes = p.done_bytes
            event = pull.event(self.clock.monotonic())
            for listener in list(pull.listeners):
                listener(event)

        async def run() -> Ensured:
            # Remembered until it ends, so that a daemon stopped mid-pull resumes it.
            await self.hop(self.node.index.put, ("pull", rev), {"ref": pull.ref})
            try:
                try:
                    evicted = await make_room(
                        self.budget,
                        self.hop,
                        res.ref,
                        rev,
                        res.manifest,
                        self._protection,
                        self._evict_lock,
                        self.clock,
                    )
                except CacheFull as exc:
                    raise self.prefetching.naming_pins(exc) from exc
                for chosen in evicted:
                    self._count(chosen)
                ensured = await self.node.pull(
                    res, advance, priority=pull.urgency, stats=pull.stats
                )
                await self.hop(self.node.index.delete, ("pull", rev))
                # Still listed as pulling, so the budget check cannot pick this revision.
                self._count(
                    await enforce(self.budget, self.hop, self._protection, self._evict_lock)
                )
                return ensured
            except asyncio.CancelledError:
                raise
            except BaseException:
                await self.hop(self.node.index.delete, ("pull", rev))
                raise
            finally:
                self._pulls.pop(rev, None)
                self.counters["origin_bytes"] += pull.stats.origin_bytes
                self.counters["peer_bytes"] += pull.stats.peer_bytes

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
        ensured = replace(ensured, seconds=self.clock.monotonic() - started)
        if joined:
            # The shared result describes the first caller's pull; this caller
            # moved no bytes itself.
            ensured = replace(
                ensured,
                origin_bytes=0,
                peer_bytes=0,
                reused_bytes=0,
                coalesced_bytes=ensured.total_bytes,
            )
        return ensured, joined

    def _count(self, chosen: Plan | None) -> None:
        if chosen is not None:
            self.counters["evictions"] += len(chosen.revisions)
            self.counters["evicted_bytes"] += chosen.freed_bytes

    # -- leases -------------------------------------------------------------------

    async def _grant_lease(
        self, revision: str, pid: int | None, client: str | None, connection: Connection | None
    ) -> Lease:
        # Granted synchronously (no await can split counting a holder from the
        # grant), then persisted; a request cancelled meanwhile gives its hold back.
        lease = self.leases.grant(
            revision, self.wall(), pid=pid, client=client, connection=connection
        )
        try:
            await asyncio.shield(self._save_lease(lease.id))
        except asyncio.CancelledError:
            with contextlib.suppress(NotFound):  # reaped meanwhile: nothing to give back
                self.leases.release(lease.id)
            # The record is written with whatever state is left (or deleted).
            self._chore(self._save_lease(lease.id))
            raise
        return lease

    async def _save_lease(self, lease_id: str) -> None:
        """Write a lease's current state (or its absence) to the index."""
        async with self._lease_io:
            lease = self.leases.leases.get(lease_id)
            try:
                if lease is None:
                    await self.hop(self.node.index.delete, ("lease", lease_id))
                else:
                    await self.hop(self.node.index.put, ("lease", lease_id), lease.to_json())
            except CacheFull as exc:
                # Held in memory all the same; only a restart would forget it.
                log.warning("lease.not_persisted id=%s reason=%s", lease_id, exc.message)

    async def release_lease(self, lease_id: str) -> None:
        self.leases.release(lease_id)
        await self._save_lease(lease_id)

    def leased_revisions(self) -> set[str]:
        return set(self.leases.revisions())

    async def _resume_pulls(self) -> None:
        """Pulls a previous run was stopped in the middle of: finish them in the background."""
        interrupted = await self.hop(lambda: list(self.node.index.items("pull")))
        for rev, rec in interrupted:
            try:
                await self.ensure(
                    f"{rec['ref'].rpartition('@')[0]}@{rev}",
                    priority=Priority.BACKGROUND,
                    lease=False,
                    demand=False,
                )
                log.info("pull.resumed revision=%s", rev[:16])
            except WeightcacheError as exc:
                log.warning("pull.resume_failed revision=%s code=%s", rev[:16], exc.code)
            # Finished, failed, or found complete (a kill after the snapshot was
            # linked, before the record was dropped): nothing is left to resume.
            await self.hop(self.node.index.delete, ("pull", rev))

    async def _sweeper(self) -> None:
        """Remove partial downloads idle for ``cache.partial_ttl_s``, checked hourly
        (or four times per TTL when that is shorter)."""
        ttl = self.cfg.cache.partial_ttl_s
        while True:
            await self.clock.sleep(min(SWEEP_INTERVAL_S, ttl / 4))
            try:
                # File times are the real wall clock's, whatever clock the service runs on.
                freed = await self.node.sweep_partials(ttl, time.time())
            except WeightcacheError as exc:
                log.warning("partial.sweep_failed code=%s message=%s", exc.code, exc.message)
                continue
            if freed:
                self.counters["partial_bytes_removed"] += freed

    async def _reaper(self) -> None:
        while True:
            await self.clock.sleep(REAP_INTERVAL_S)
            await self.prefetching.schedules_book.expire()
            for lease in self.leases.reap(self.wall()):
                await self._save_lease(lease.id)
                log.info(
                    "lease.ended id=%s revision=%s pid=%s", lease.id, lease.revision[:16], lease.pid
                )

    # -- eviction -------------------------------------------------------------------

    async def evict(self, ref: str, *, force: bool = False) -> dict[str, Any]:
        parsed = self.node.parse(ref)
        rev = await self.hop(self._cached_revision, parsed)
        if rev in self._pulls:
            raise ModelLeased(f"{ref} is being pulled right now", revision=rev)
        holders = self.leases.of(rev)
        if holders and not force:
            raise ModelLeased(
                f"{ref} (revision {rev[:16]}) is leased by {len(holders)} client(s)",
                hint="wait for the workers to finish, or pass force to evict anyway",
                revision=rev,
                leases=len(holders),
            )
        pins = [p for p in self.prefetching.schedules_book.live_pins() if p.revision == rev]
        if pins and not force:
            raise ModelLeased(
                f"{ref} (revision {rev[:16]}) is pinned by recurring prefetch "
                + ", ".join(f"schedule {p.schedule}" for p in pins)
                + " until its hold ends",
                hint="remove the schedule (`weightcache jobs --remove ID`), or pass force "
                "(its next occurrence pins the model again)",
                revision=rev,
                schedules=[p.schedule for p in pins],
            )
        async with self._evict_lock:
            for lease in holders:
                self.leases.drop(lease.id)
                await self._save_lease(lease.id)
            for pin in pins:
                await self.prefetching.schedules_book.unpin(pin.schedule, reason="forced_evict")
            # The budget refuses a revision any process uses right now, and one
            # still leased in the index unless forced.
            chosen = await self.hop(self.budget.evict_revision, rev, Protection(), force=force)
        self._count(chosen)
        return {
            "ref": ref,
            "revision": rev,
            "freed_bytes": chosen.freed_bytes,
            "blobs_removed": len(chosen.blobs),
            "forced": bool(holders or pins),
        }

    def _cached_revision(self, ref: Ref) -> str:
        """The cached revision a ref names; a short @REV only among this location's."""
        store, index = self.node.store, self.node.index
        if ref.rev and is_digest(ref.rev):
            matches = [ref.rev] if store.has_snapshot(ref.rev) else []
        elif ref.rev:
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

    # -- prefetching (jobs, schedules, the forecast: weightcache.prefetch) ------------------

    @property
    def closing(self) -> bool:
        return self._closing

    async def prefetch(
        self,
        ref: str,
        *,
        at: float | None = None,
        deadline: float | None = None,
        priority: Priority = Priority.ADMIN,
    ) -> tuple[Job, bool]:
        return await self.prefetching.prefetch(ref, at=at, deadline=deadline, priority=priority)

    def jobs(self) -> list[Job]:
        return self.prefetching.jobs_book.listed()

    def job(self, job_id: str) -> Job:
        return self.prefetching.jobs_book.get(job_id)

    async def add_schedule(
        self,
        ref: str,
        every: str,
        *,
        tz: str | None = None,
        lead_s: float | None = None,
        hold_s: float | None = None,
        priority: Priority = Priority.ADMIN,
        source: str = "admin",
    ) -> tuple[Schedule, bool]:
        return await self.prefetching.add_schedule(
            ref, every, tz=tz, lead_s=lead_s, hold_s=hold_s, priority=priority, source=source
        )

    async def remove_schedule(self, schedule_id: str) -> dict[str, Any]:
        return await self.prefetching.remove_schedule(schedule_id)

    def schedules(self) -> list[Schedule]:
        return self.prefetching.schedules_book.listed()

    def schedule(self, schedule_id: str) -> Schedule:
        return self.prefetching.schedules_book.get(schedule_id)

    def schedule_doc(self, schedule: Schedule) -> dict[str, Any]:
        return self.prefetching.schedule_doc(schedule)

    async def forecast(self) -> dict[str, Any]:
        return await self.prefetching.forecast()

    async def auto_pass(self) -> list[Decision]:
        return await self.prefetching.auto_pass()

    # -- status, blobs, health -----------------------------------------------------------

    def _scan(self, leases: Counter[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The disk and the cached models (blocking; ``leases`` is a snapshot)."""
        store = self.node.store
        rows = inventory.models(store, self.node.index, self.budget.manifest, leases)
        return inventory.disk(store, self.cfg), rows

    async def status(self) -> dict[str, Any]:
        """The node's state. Concurrent callers share one snapshot (a scrape storm
        costs one scan of the cache, not one per request); treat it as read-only."""
        doc, _ = await self._status_flight.run("status", self._status)
        return doc

    async def _status(self) -> dict[str, Any]:
        leases = Counter(x.revision for x in self.leases.leases.values())
        disk, models = await self.hop(self._scan, leases)
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
                "peer_bytes",
                "peer_bytes_served",
                "partial_bytes_removed",
            )
        }
        # Bytes of pulls still running count as they arrive, not when the pull ends;
        # chunks pulled from the origin because a peer asked for them count too.
        counters["origin_bytes"] += sum(p.stats.origin_bytes for p in self._pulls.values())
        counters["origin_bytes"] += self.node.peer_pull_stats.origin_bytes
        counters["peer_bytes"] += sum(p.stats.peer_bytes for p in self._pulls.values())
        return {
            "node": self.node_name,
            "version": __version__,
            "uptime_s": self.wall() - self.started_at,
            "counters": counters,
            "errors": dict(self.errors),
            "disk": disk,
            "models": models,
            "pulls": pulls,
            "leases": len(self.leases),
            "jobs": self.prefetching.jobs_book.states(),
            "prefetch": self.prefetching.status(),
            "pins": [p.to_json() for p in self.prefetching.schedules_book.live_pins()],
            "pinned_bytes": self.prefetching.schedules_book.pinned_bytes(),
            "auto": self.prefetching.auto_status(),
            "pending": self._pending,
            "max_pending": self.cfg.daemon.max_pending,
            "origin_slots": {
                "capacity": self.node.slots.capacity,
                "in_use": self.node.slots.in_use,
                "waiting": self.node.slots.waiting,
            },
            "peers": self._peers_status(),
        }

    def _peers_status(self) -> dict[str, Any] | None:
        setup = self.node.peers
        if setup is None:
            return None
        doc: dict[str, Any] = setup.members.status()
        doc["slots"] = {"capacity": setup.slots.capacity, "in_use": setup.slots.in_use}
        doc["pulled_for_peers_bytes"] = self.node.peer_pull_stats.origin_bytes
        return doc

    def blob_path(self, digest: str) -> tuple[Path, int]:
        """A verified blob to serve (blocking: call it in a worker thread)."""
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

    def note_peer_bytes(self, n: int, peer: str = "") -> None:
        """``n`` bytes of verified blobs sent to a peer (that named itself ``peer``)."""
        self.counters["peer_bytes_served"] += n
        self.counters["served_bytes"] += n
        if self.node.peers is not None:
            self.node.peers.members.note_sent(peer, n)

    async def serve_chunk(self, digest: str, first: int, last: int | None, ref: str) -> ChunkFile:
        """Verified bytes of a blob not committed here, for a peer (see
        :mod:`weightcache.peers.serve`)."""
        if self._closing:
            raise ShuttingDown("the daemon is stopping: ask another peer")
        wait_s = self.cfg.peers.wait_s
        return await serve_range(self.node, digest, first, last, ref, wait_s)

    @property
    def node_id(self) -> str | None:
        """This daemon's id among its peers (None without peers)."""
        return self.node.peers.members.node_id if self._node and self.node.peers else None

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
