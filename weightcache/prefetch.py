"""Prefetching ahead of predicted peaks: jobs, recurring schedules, pins, the forecast.

One room of the daemon, composed by :class:`weightcache.service.Service`: it
owns the prefetch jobs (:mod:`weightcache.jobs`), the recurring schedules and
their pins (:mod:`weightcache.schedules`), the request history and the
forecast with its automatic schedules (:mod:`weightcache.forecast`). Making a
ref local is its host's: a job runs as an ensure of the service, through the
narrow :class:`Host` protocol, so this module never reaches into pulls, leases
or eviction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from weightcache.aio import Clock
from weightcache.config import Config
from weightcache.errors import CacheFull, NotFound, ShuttingDown, WeightcacheError
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
from weightcache.jobs import Job, JobBook
from weightcache.node import Node, Resolved
from weightcache.refs import Ref
from weightcache.results import Ensured
from weightcache.scheduler import Priority
from weightcache.schedules import Pin, Schedule, ScheduleBook, parse_cron

if TYPE_CHECKING:
    from weightcache.service import EnsureResult, ProgressEvent

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["Host", "Prefetching"]

#: how often prefetch.auto looks at the forecast for schedules to create
AUTO_INTERVAL_S = 3600.0
#: automatic decisions shown in /v1/status (the log has them all)
AUTO_LOG = 50


class Host(Protocol):
    """What prefetching needs of the daemon that composes it."""

    cfg: Config
    clock: Clock
    wall: Callable[[], float]

    @property
    def node(self) -> Node:
        """The node cache (for parsing refs and the index)."""

    @property
    def closing(self) -> bool:
        """True once the daemon stopped taking work."""

    async def hop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One blocking step in the metadata threads."""

    async def resolve(self, ref: Ref) -> Resolved:
        """The revision a ref names now."""

    async def ensure(
        self,
        ref: str,
        *,
        priority: Priority = ...,
        lease: bool = ...,
        client: str | None = ...,
        on_progress: Callable[[ProgressEvent], None] | None = ...,
        demand: bool = ...,
    ) -> EnsureResult:
        """Make a ref local."""

    async def release_lease(self, lease_id: str) -> None:
        """End a lease."""


class _JobRecords:
    """Jobs persisted in the index, through the host's metadata threads."""

    def __init__(self, host: Host) -> None:
        self._host = host

    async def put(self, job_id: str, doc: dict[str, Any]) -> None:
        await self._host.hop(self._host.node.index.put, ("job", job_id), doc)

    async def delete(self, job_id: str) -> None:
        await self._host.hop(self._host.node.index.delete, ("job", job_id))


class _BookRecords:
    """Schedules and pins persisted in the index, through the host's metadata threads."""

    def __init__(self, host: Host) -> None:
        self._host = host

    async def put(self, kind: str, key: str, doc: dict[str, Any]) -> None:
        await self._host.hop(self._host.node.index.put, (kind, key), doc)

    async def delete(self, kind: str, key: str) -> None:
        await self._host.hop(self._host.node.index.delete, (kind, key))


class Prefetching:
    def __init__(self, host: Host, node_name: str) -> None:
        cfg = host.cfg
        self.host = host
        self.jobs_book = JobBook(
            node_name,
            cfg.daemon.prefetch_spread_s,
            host.clock,
            host.wall,
            _JobRecords(host),
            self.run_job,
        )
        self.schedules_book = ScheduleBook(
            host.clock, host.wall, _BookRecords(host), self.plan_occurrence
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

    def load(self, records: dict[str, list[tuple[str, dict[str, Any]]]]) -> list[str]:
        """Take persisted jobs, schedules, pins and history back; returns stale pin ids."""
        self.jobs_book.load(records["job"])
        stale = self.schedules_book.load(records["schedule"], records["pin"])
        self.history.load(records["history"])
        return stale

    def tasks(self) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(self.jobs_book.loop(), name="weightcache-job-scheduler"),
            asyncio.create_task(self.schedules_book.loop(), name="weightcache-schedules"),
            asyncio.create_task(self.history_loop(), name="weightcache-history"),
        ]

    async def close(self) -> None:
        await self.jobs_book.close()
        try:
            await self.write_history()
        except WeightcacheError as exc:
            log.warning("history.not_written code=%s", exc.code)

    # -- jobs -------------------------------------------------------------------------

    async def prefetch(
        self,
        ref: str,
        *,
        at: float | None = None,
        deadline: float | None = None,
        priority: Priority = Priority.ADMIN,
    ) -> tuple[Job, bool]:
        if self.host.closing:
            raise ShuttingDown("the daemon is shutting down")
        self.host.node.parse(ref)  # a bad ref fails now, not when the job runs
        return await self.jobs_book.add(ref, at=at, deadline=deadline, priority=priority)

    async def run_job(self, job: Job, progress: Callable[[int, int], None]) -> str:
        schedule = self.schedules_book.schedules.get(job.schedule) if job.schedule else None
        if schedule is not None:
            await self._drop_outdated_pin(schedule)
        # A schedule's job holds a lease until its pin is written, so no eviction
        # (this daemon's or another process's) takes the revision in between.
        result = await self.host.ensure(
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
                    await self.host.release_lease(result.lease.id)
        return result.ensured.revision

    async def _drop_outdated_pin(self, schedule: Schedule) -> None:
        """An occurrence that resolves to a new revision releases the old one's pin before
        pulling, so a budget that holds one of them can take the new one."""
        pin = self.schedules_book.pins.get(schedule.id)
        if pin is None:
            return
        try:
            res = await self.host.resolve(self.host.node.parse(schedule.ref))
        except WeightcacheError:
            return  # the job's own ensure reports it
        if res.revision != pin.revision:
            await self.schedules_book.unpin(schedule.id, reason="new_revision")

    async def _pin(self, schedule: Schedule, ensured: Ensured, peak: float) -> Pin | None:
        if schedule.source == "auto":
            budget = self.host.cfg.prefetch.auto_pin_bytes
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

    # -- recurring schedules -----------------------------------------------------------

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
        if self.host.closing:
            raise ShuttingDown("the daemon is shutting down")
        parsed = self.host.node.parse(ref)  # a bad ref fails now, not at its first occurrence
        cron = parse_cron(every, "UTC" if tz is None else tz)
        pf = self.host.cfg.prefetch
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
        doc["pin"] = pin.to_json() if pin is not None and pin.expires > self.host.wall() else None
        doc["window_misses"] = self.window_misses.get(schedule.id, 0)
        return doc

    async def plan_occurrence(self, schedule: Schedule, peak: float) -> str:
        job, _ = await self.jobs_book.add(
            schedule.ref,
            at=peak - schedule.lead_s,
            deadline=peak,
            priority=Priority.parse(schedule.priority),
            schedule=schedule.id,
        )
        return job.id

    # -- the forecast ---------------------------------------------------------------

    async def history_loop(self) -> None:
        """Write the request history at most every ``prefetch.history_write_s``; with
        ``prefetch.auto``, look for schedules to create every :data:`AUTO_INTERVAL_S`."""
        pf = self.host.cfg.prefetch
        next_auto = self.host.clock.monotonic() + AUTO_INTERVAL_S
        while True:
            await self.host.clock.sleep(pf.history_write_s)
            try:
                await self.write_history()
                if pf.auto and self.host.clock.monotonic() >= next_auto:
                    next_auto = self.host.clock.monotonic() + AUTO_INTERVAL_S
                    await self.auto_pass()
            except asyncio.CancelledError:
                raise
            except WeightcacheError as exc:
                log.warning("history.write_failed code=%s message=%s", exc.code, exc.message)
            except Exception:
                # The history and auto schedules are advisory: a bug here must not
                # end the task (and with it the daemon's readiness).
                log.exception("history.task_failed")

    async def write_history(self) -> None:
        async with self._history_io:
            put, dropped = self.history.changes()
            if not put and not dropped:
                return
            index = self.host.node.index

            def write() -> None:
                for location, doc in put:
                    index.put(("history", location), doc)
                for location in dropped:
                    index.delete(("history", location))

            await self.host.hop(write)

    def _histories(self) -> list[History]:
        """Every location's history from the index (blocking: a worker thread)."""
        out = []
        for _, rec in self.host.node.index.items("history"):
            try:
                out.append(History.from_json(rec))
            except (KeyError, TypeError, ValueError):
                continue
        return out

    def _forecast_rows(self, now: float) -> list[dict[str, Any]]:
        pf = self.host.cfg.prefetch
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
        await self.write_history()
        now = self.host.wall()
        rows = await self.host.hop(self._forecast_rows, now)
        for row in rows:
            row["schedules"] = [
                s.id for s in self.schedules_book.listed() if s.location == row["location"]
            ]
        pf = self.host.cfg.prefetch
        return {
            "generated": now,
            "tz": pf.tz,
            "weeks": pf.history_weeks,
            "min_weeks": pf.min_weeks,
            "models": rows,
            "auto": self.auto_status(),
        }

    def _candidates(self, now: float) -> tuple[list[Candidate], dict[str, int]]:
        """(suggestions as candidates, model bytes by location) from the index (blocking)."""
        pf = self.host.cfg.prefetch
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
        pf = self.host.cfg.prefetch
        if not pf.auto or self.host.closing:
            return []
        await self.write_history()
        candidates, sizes = await self.host.hop(self._candidates, self.host.wall())
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
        doc = {"at": self.host.wall(), **decision.to_json()}
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

    def auto_status(self) -> dict[str, Any]:
        pf = self.host.cfg.prefetch
        return {
            "enabled": pf.auto,
            "pin_budget_bytes": pf.auto_pin_bytes,
            "pinned_bytes": self.schedules_book.pinned_bytes(source="auto"),
            "schedules": sum(1 for s in self.schedules_book.listed() if s.source == "auto"),
            "decisions": list(self.auto_log),
        }

    def status(self) -> dict[str, Any]:
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

    def note_demand(self, ref: Ref, ensured: Ensured, coalesced: bool) -> None:
        """One request for the forecast's history; a cold one inside a schedule's
        window is a miss that schedule should have prevented."""
        now = self.host.wall()
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

    def naming_pins(self, exc: CacheFull) -> CacheFull:
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
