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
from collections import Counter, deque
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
    Candidate,
    Decision,
    History,
    HistoryBook,
    auto_decisions,
    bin_of,
    model_forecast,
    suggest,
)
from weightcache.hashing import is_digest
from weightcache.jobs import Job, JobBook
from weightcache.leases import Connection, Lease, LeaseTable
from weightcache.locks import RevisionUses
from weightcache.node import Node, Progress, Resolved, disk_errors
from weightcache.refs import Ref
from weightcache.results import Ensured
from weightcache.scheduler import Priority, SingleFlight, Urgency
from weightcache.schedules import Pin, Schedule, ScheduleBook, parse_cron

log = logging.getLogger(__name__)

#: after the shutdown grace: how long cancelled pulls get to stop (their transfers
#: are aborted first, so this is only their bookkeeping)
CANCEL_GRACE_S = 3.0
#: how often leases of dead processes and expired leases are dropped
REAP_INTERVAL_S = 2.0
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
        return "cache" if self.ensured.cache_hit else "origin"

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


class _JobRecords:
    """Jobs persisted in the index, through the service's metadata threads."""

    def __init__(self, service: Service) -> None:
        self._service = service

    async def put(self, job_id: str, doc: dict[str, Any]) -> None:
        await self._service.hop(self._service.node.index.put, ("job", job_id), doc)

    async def delete(self, job_id: str) -> None:
        await self._service.hop(self._service.node.index.delete, ("job", job_id))


class _BookRecords:
    """Schedules and pins persisted in the index, through the metadata threads."""

    def __init__(self, service: Service) -> None:
        self._service = service

    async def put(self, kind: str, key: str, doc: dict[str, Any]) -> None:
        await self._service.hop(self._service.node.index.put, (kind, key), doc)

    async def delete(self, kind: str, key: str) -> None:
        await self._service.hop(self._service.node.index.delete, (kind, key))


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
        self.jobs_book = JobBook(
            self.node_name,
            cfg.daemon.prefetch_spread_s,
            self.clock,
            wall,
            _JobRecords(self),
            self._run_job,
        )
        self.schedules_book = ScheduleBook(
            self.clock, wall, _BookRecords(self), self._plan_occurrence
        )
        pf = cfg.prefetch
        self.history = HistoryBook(pf.tz, pf.history_weeks, pf.history_max_models)
        #: cold ensures inside a schedule's window (its peak until peak + hold), by schedule
        self.window_misses: Counter[str] = Counter()
        #: prefetch.auto's latest decisions, newest last
        self.auto_log: deque[dict[str, Any]] = deque(maxlen=AUTO_LOG)
        self._auto_logged: set[tuple[str, str, str, str]] = set()
        #: history writes one at a time, so an older snapshot never lands after a newer one
        self._history_io = asyncio.Lock()
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
        self.jobs_book.load(loaded["job"])
        for stale in self.schedules_book.load(loaded["schedule"], loaded["pin"]):
            await self.hop(node.index.delete, ("pin", stale))
        self.history.load(loaded["history"])
        self._tasks = [
            asyncio.create_task(self._reaper(), name="weightcache-lease-reaper"),
            asyncio.create_task(self.jobs_book.loop(), name="weightcache-job-scheduler"),
            asyncio.create_task(self.schedules_book.loop(), name="weightcache-schedules"),
            asyncio.create_task(self._history_loop(), name="weightcache-history"),
            asyncio.create_task(self._resume_pulls(), name="weightcache-resume"),
        ]
        log.info(
            "service.started node=%s cache=%s jobs=%d leases=%d",
            self.node_name,
            self.cfg.cache.dir,
            len(self.jobs_book.jobs),
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
        await self.jobs_book.close()
        try:
            await self._write_history()
        except WeightcacheError as exc:
            log.warning("history.not_written code=%s", exc.code)
        await asyncio.gather(*self._chores, return_exceptions=True)
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
                res = await self._resolve(parsed)
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
                    self._note_demand(parsed, ensured, coalesced)
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

    def _protection(self) -> Protection:
        """What this daemon protects now, as a snapshot for a worker thread."""
        return Protection(
            revisions=self.leases.revisions() | frozenset(self._pulls),
            pinned=self.schedules_book.pinned_revisions(),
        )

    def _note_demand(self, ref: Ref, ensured: Ensured, coalesced: bool) -> None:
        """One request for the forecast's history; a cold one inside a schedule's
        window is a miss that schedule should have prevented."""
        now = self.wall()
        cold = not ensured.cache_hit
        self.history.note(ref.location, now, cold=cold, nbytes=ensured.total_bytes)
        if cold:
            for schedule in self.schedules_book.windows(ref.location, now):
                self.window_misses[schedule.id] += 1
                log.info(
                    "schedule.window_miss id=%s location=%s coalesced=%s",
                    schedule.id,
                    ref.location,
                    coalesced,
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
                    raise self._naming_pins(exc) from exc
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
                ensured, origin_bytes=0, reused_bytes=0, coalesced_bytes=ensured.total_bytes
            )
        return ensured, joined

    def _naming_pins(self, exc: CacheFull) -> CacheFull:
        """A cache full while recurring prefetches pin models says which: the budget
        cannot hold every pinned model, and no pinned model is evicted for another."""
        pins = self.schedules_book.live_pins()
        if not pins:
            return exc
        named = ", ".join(
            f"{p.ref} (revision {p.revision[:16]}, {p.bytes} bytes, schedule {p.schedule}, "
            f"until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(p.expires))})"
            for p in pins
        )
        return CacheFull(
            f"{exc.message}; pinned by recurring prefetches: {named}",
            hint="the budget cannot hold every pinned model: raise cache.max_bytes, shorten "
            "hold_s, or remove a schedule (`weightcache jobs --remove ID`)",
            **exc.facts,
            pins=[f"{p.schedule}:{p.revision}" for p in pins],
            pinned_bytes=self.schedules_book.pinned_bytes(),
        )

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
            if self.leases.release(lease.id) is not None or lease.id in self.leases.leases:
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

    async def _reaper(self) -> None:
        while True:
            await self.clock.sleep(REAP_INTERVAL_S)
            await self.schedules_book.expire()
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
        pins = [p for p in self.schedules_book.live_pins() if p.revision == rev]
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
                await self.schedules_book.unpin(pin.schedule, reason="forced_evict")
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
        return await self.jobs_book.add(ref, at=at, deadline=deadline, priority=priority)

    def jobs(self) -> list[Job]:
        return self.jobs_book.listed()

    def job(self, job_id: str) -> Job:
        return self.jobs_book.get(job_id)

    async def _run_job(self, job: Job, progress: Callable[[int, int], None]) -> str:
        schedule = self.schedules_book.schedules.get(job.schedule) if job.schedule else None
        if schedule is not None:
            await self._drop_outdated_pin(schedule)
        # A schedule's job holds a lease until its pin is written, so no eviction
        # (this daemon's or another process's) takes the revision in between.
        result = await self.ensure(
            job.ref,
            priority=Priority.parse(job.priority),
            lease=schedule is not None,
            client=f"schedule:{schedule.id}" if schedule is not None else None,
            on_progress=lambda e: progress(e.done_bytes, e.total_bytes),
            demand=False,
        )
        job.total_bytes = result.ensured.total_bytes
        if result.lease is not None:
            try:
                schedule = self.schedules_book.schedules.get(job.schedule or "")
                if schedule is not None and job.deadline is not None:
                    await self._pin(schedule, result.ensured, job.deadline)
            finally:
                with contextlib.suppress(NotFound):  # reaped meanwhile: nothing to release
                    await self.release_lease(result.lease.id)
        return result.ensured.revision

    async def _drop_outdated_pin(self, schedule: Schedule) -> None:
        """An occurrence that resolves to a new revision releases the old one's pin before
        pulling, so a budget that holds one of them can take the new one."""
        pin = self.schedules_book.pins.get(schedule.id)
        if pin is None:
            return
        try:
            res = await self._resolve(self.node.parse(schedule.ref))
        except WeightcacheError:
            return  # the job's own ensure reports it
        if res.revision != pin.revision:
            await self.schedules_book.unpin(schedule.id, reason="new_revision")

    async def _pin(self, schedule: Schedule, ensured: Ensured, peak: float) -> Pin | None:
        if schedule.source == "auto":
            budget = self.cfg.prefetch.auto_pin_bytes
            others = {
                p.revision: p.bytes
                for p in self.schedules_book.live_pins()
                if p.source == "auto" and p.schedule != schedule.id
            }
            extra = 0 if ensured.revision in others else ensured.total_bytes
            if sum(others.values()) + extra > budget:
                await self.schedules_book.unpin(schedule.id, reason="auto_pin_budget")
                self._auto_note(
                    Decision(
                        schedule.location,
                        schedule.every,
                        schedule.tz,
                        "unpinned",
                        f"revision {ensured.revision[:16]} needs {extra} bytes; auto pins "
                        f"hold {sum(others.values())} of prefetch.auto_pin_bytes = {budget}",
                        ensured.total_bytes,
                        0,
                    )
                )
                return None
        return await self.schedules_book.pin(schedule, ensured.revision, ensured.total_bytes, peak)

    # -- recurring schedules ----------------------------------------------------------

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
        """The recurring prefetch of ``ref`` at every occurrence of ``every`` (cron) in
        ``tz`` (default UTC, the same instant on every node): (schedule, created)."""
        if self._closing:
            raise ShuttingDown("the daemon is shutting down")
        parsed = self.node.parse(ref)  # a bad ref fails now, not at its first occurrence
        cron = parse_cron(every, "UTC" if tz is None else tz)
        pf = self.cfg.prefetch
        return await self.schedules_book.add(
            str(parsed),
            parsed.location,
            cron,
            lead_s=pf.lead_s if lead_s is None else float(lead_s),
            hold_s=pf.hold_s if hold_s is None else float(hold_s),
            priority=priority.label,
            source=source,
        )

    async def remove_schedule(self, schedule_id: str) -> dict[str, Any]:
        """Forget a schedule, its pending occurrence and its pin."""
        schedule, pin = await self.schedules_book.remove(schedule_id)
        cancelled = await self.jobs_book.cancel(schedule.job) if schedule.job else None
        return {
            "removed": schedule.id,
            "schedule": schedule.to_json(),
            "job_cancelled": cancelled.id if cancelled is not None else None,
            "pin_released": pin.revision if pin is not None else None,
        }

    def schedules(self) -> list[Schedule]:
        return self.schedules_book.listed()

    def schedule(self, schedule_id: str) -> Schedule:
        return self.schedules_book.get(schedule_id)

    def schedule_doc(self, schedule: Schedule) -> dict[str, Any]:
        """A schedule as the API shows it: with its live pin and its window misses."""
        doc = schedule.to_json()
        pin = self.schedules_book.pins.get(schedule.id)
        doc["pin"] = pin.to_json() if pin is not None and pin.expires > self.wall() else None
        doc["window_misses"] = self.window_misses.get(schedule.id, 0)
        return doc

    async def _plan_occurrence(self, schedule: Schedule, peak: float) -> str:
        job, _ = await self.jobs_book.add(
            schedule.ref,
            at=peak - schedule.lead_s,
            deadline=peak,
            priority=Priority.parse(schedule.priority),
            schedule=schedule.id,
        )
        return job.id

    # -- the forecast ---------------------------------------------------------------

    async def _history_loop(self) -> None:
        """Write the request history at most every ``prefetch.history_write_s``; with
        ``prefetch.auto``, look for schedules to create every :data:`AUTO_INTERVAL_S`."""
        pf = self.cfg.prefetch
        next_auto = self.clock.monotonic() + AUTO_INTERVAL_S
        while True:
            await self.clock.sleep(pf.history_write_s)
            try:
                await self._write_history()
                if pf.auto and self.clock.monotonic() >= next_auto:
                    next_auto = self.clock.monotonic() + AUTO_INTERVAL_S
                    await self.auto_pass()
            except asyncio.CancelledError:
                raise
            except WeightcacheError as exc:
                log.warning("history.write_failed code=%s message=%s", exc.code, exc.message)
            except Exception:
                # The history and auto schedules are advisory: a bug here must not
                # end the task (and with it the daemon's readiness).
                log.exception("history.task_failed")

    async def _write_history(self) -> None:
        async with self._history_io:
            put, dropped = self.history.changes()
            if not put and not dropped:
                return
            index = self.node.index

            def write() -> None:
                for location, doc in put:
                    index.put(("history", location), doc)
                for location in dropped:
                    index.delete(("history", location))

            await self.hop(write)

    def _histories(self) -> list[History]:
        """Every location's history from the index (blocking: a worker thread)."""
        out = []
        for _, rec in self.node.index.items("history"):
            try:
                out.append(History.from_json(rec))
            except (KeyError, TypeError, ValueError):
                continue
        return out

    def _forecast_rows(self, now: float) -> list[dict[str, Any]]:
        pf = self.cfg.prefetch
        week = bin_of(now, self.history.zone)[0]
        rows = [
            model_forecast(
                h,
                current_week=week,
                window=pf.history_weeks,
                min_weeks=pf.min_weeks,
                lead_s=pf.lead_s,
                tz=pf.tz,
            )
            for h in self._histories()
        ]
        return sorted(rows, key=lambda r: (-r["misses_saved"], -r["misses"], r["location"]))

    async def forecast(self) -> dict[str, Any]:
        """Per model location: requests and cold misses of the last weeks, when the misses
        cluster, and the schedules that would have turned them into hits. Computed in a
        worker thread from the index (the loop's latest counts written first)."""
        await self._write_history()
        now = self.wall()
        rows = await self.hop(self._forecast_rows, now)
        for row in rows:
            row["schedules"] = [
                s.id for s in self.schedules_book.listed() if s.location == row["location"]
            ]
        pf = self.cfg.prefetch
        return {
            "generated": now,
            "tz": pf.tz,
            "weeks": pf.history_weeks,
            "min_weeks": pf.min_weeks,
            "models": rows,
            "auto": self._auto_status(),
        }

    def _candidates(self, now: float) -> tuple[list[Candidate], dict[str, int]]:
        """(suggestions as candidates, model bytes by location) from the index (blocking)."""
        pf = self.cfg.prefetch
        week = bin_of(now, self.history.zone)[0]
        candidates = []
        sizes = {}
        for h in self._histories():
            sizes[h.location] = h.bytes
            for suggestion in suggest(
                h.weeks,
                current_week=week,
                window=pf.history_weeks,
                min_weeks=pf.min_weeks,
                lead_s=pf.lead_s,
                tz=pf.tz,
            ):
                candidates.append(Candidate(h.location, h.bytes, suggestion))
        return candidates, sizes

    async def auto_pass(self) -> list[Decision]:
        """``prefetch.auto``: create the schedules the forecast suggests, within
        ``prefetch.auto_pin_bytes``. Every decision is logged and kept for status."""
        pf = self.cfg.prefetch
        if not pf.auto or self._closing:
            return []
        await self._write_history()
        candidates, sizes = await self.hop(self._candidates, self.wall())
        autos = [s for s in self.schedules_book.listed() if s.source == "auto"]
        held: dict[str, int] = {}
        for s in autos:
            pin = self.schedules_book.pins.get(s.id)
            held[s.location] = max(
                held.get(s.location, 0), pin.bytes if pin else sizes.get(s.location, 0)
            )
        decisions = auto_decisions(
            candidates,
            scheduled=frozenset((s.location, s.every, s.tz) for s in self.schedules_book.listed()),
            held=held,
            budget_bytes=pf.auto_pin_bytes,
        )
        for decision in decisions:
            if decision.action == "create":
                try:
                    await self.add_schedule(
                        decision.location,
                        decision.every,
                        tz=decision.tz,
                        lead_s=pf.lead_s,
                        hold_s=next(
                            c.suggestion.hold_s
                            for c in candidates
                            if c.location == decision.location
                            and c.suggestion.every == decision.every
                        ),
                        priority=Priority.BACKGROUND,
                        source="auto",
                    )
                except WeightcacheError as exc:
                    decision = replace(decision, action="skip", reason=f"{exc.code}: {exc.message}")
            self._auto_note(decision)
        return decisions

    def _auto_note(self, decision: Decision) -> None:
        key = (decision.location, decision.every, decision.action, decision.reason)
        if key in self._auto_logged:
            return  # the same decision as last time: logged once
        self._auto_logged.add(key)
        doc = {"at": self.wall(), **decision.to_json()}
        self.auto_log.append(doc)
        log.info(
            "auto.%s location=%s every=%r tz=%s bytes=%d misses_saved=%d reason=%s",
            decision.action,
            decision.location,
            decision.every,
            decision.tz,
            decision.bytes,
            decision.misses_saved,
            decision.reason,
        )

    def _auto_status(self) -> dict[str, Any]:
        pf = self.cfg.prefetch
        return {
            "enabled": pf.auto,
            "pin_budget_bytes": pf.auto_pin_bytes,
            "pinned_bytes": self.schedules_book.pinned_bytes(source="auto"),
            "schedules": sum(1 for s in self.schedules_book.listed() if s.source == "auto"),
            "decisions": list(self.auto_log),
        }

    def _prefetch_status(self) -> dict[str, Any]:
        """Outcomes of prefetch jobs, and per schedule its last margin and window misses."""
        latest: dict[str, Job] = {}
        for job in self.jobs_book.jobs.values():
            if job.schedule and job.state == "done" and job.finished is not None:
                seen = latest.get(job.schedule)
                if seen is None or (seen.finished or 0.0) < job.finished:
                    latest[job.schedule] = job
        schedules = []
        for s in self.schedules_book.listed():
            done = latest.get(s.id)
            margin = (
                done.deadline - done.finished
                if done is not None and done.deadline is not None and done.finished is not None
                else None
            )
            schedules.append(
                {
                    "id": s.id,
                    "ref": s.ref,
                    "every": s.every,
                    "tz": s.tz,
                    "source": s.source,
                    "peak": s.peak,
                    "margin_s": margin,
                    "window_misses": self.window_misses.get(s.id, 0),
                }
            )
        outcomes = {k: 0 for k in ("on_time", "late", "failed", "missed")}
        outcomes.update(self.jobs_book.outcomes)
        return {"outcomes": outcomes, "schedules": schedules}

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
                "peer_bytes_served",
            )
        }
        # Bytes of pulls still running count as they arrive, not when the pull ends.
        counters["origin_bytes"] += sum(p.stats.origin_bytes for p in self._pulls.values())
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
            "jobs": self.jobs_book.states(),
            "prefetch": self._prefetch_status(),
            "pins": [p.to_json() for p in self.schedules_book.live_pins()],
            "pinned_bytes": self.schedules_book.pinned_bytes(),
            "auto": self._auto_status(),
            "pending": self._pending,
            "max_pending": self.cfg.daemon.max_pending,
            "origin_slots": {
                "capacity": self.node.slots.capacity,
                "in_use": self.node.slots.in_use,
                "waiting": self.node.slots.waiting,
            },
        }

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
