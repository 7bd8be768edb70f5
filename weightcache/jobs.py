"""Prefetch jobs: make a ref local now or at a time, before a deadline, at a priority.

A job is idempotent (the same ref and ``at`` is one job; a "now" job is one
while it waits or runs), starts at ``at`` plus this node's offset in the spread
window (so a fleet given one ``at`` does not hit the origin in one second), is
persisted on every change of state and resumes after a restart. The
:class:`JobBook` owns the jobs and their scheduler loop; what running one means
(an ensure without a lease) is the owner's, handed in as ``run``.

A job planned by a recurring schedule (:mod:`weightcache.schedules`) names it
in ``schedule``; its deadline is the occurrence's peak, and one that has not
started by then is ``missed`` rather than run after the peak it was for.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from weightcache.aio import Clock
from weightcache.errors import NotFound, RequestInvalid, WeightcacheError
from weightcache.hashing import digest_bytes
from weightcache.scheduler import Priority, start_time

log = logging.getLogger(__name__)

__all__ = ["Job", "JobBook"]

#: the job scheduler wakes at least this often (it is also woken by new jobs)
SCHEDULER_TICK_S = 1.0
#: finished prefetch jobs are forgotten after this long
JOB_RETENTION_S = 7 * 86400.0


@dataclass
class Job:
    id: str
    ref: str
    at: float | None
    deadline: float | None
    priority: str
    state: str  # scheduled | running | done | failed | missed
    created: float
    start_after: float
    started: float | None = None
    finished: float | None = None
    done_bytes: int = 0
    total_bytes: int = 0
    revision: str | None = None
    late: bool = False
    error: dict[str, Any] | None = None
    #: the recurring schedule this job is an occurrence of (its deadline is the peak)
    schedule: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Job:
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})

    @property
    def outcome(self) -> str | None:
        """How a finished job went: on_time, late, failed or missed (None while pending)."""
        if self.state == "done":
            return "late" if self.late else "on_time"
        if self.state in ("failed", "missed"):
            return self.state
        return None


class Records(Protocol):
    """Where jobs are persisted (the index, through a worker thread)."""

    async def put(self, job_id: str, doc: dict[str, Any]) -> None:
        """Save one job's record."""

    async def delete(self, job_id: str) -> None:
        """Forget one job's record."""


#: runs one job: make its ref local at its priority, reporting (done, total) bytes;
#: returns the revision
Runner = Callable[[Job, Callable[[int, int], None]], Awaitable[str]]


@dataclass
class JobBook:
    node_name: str
    spread_s: float
    clock: Clock
    wall: Callable[[], float]
    records: Records
    run: Runner
    jobs: dict[str, Job] = field(default_factory=dict)
    #: jobs finished since this process started, by :attr:`Job.outcome`
    outcomes: Counter[str] = field(default_factory=Counter)
    _tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def load(self, records: list[tuple[str, dict[str, Any]]]) -> None:
        for key, rec in records:
            job = Job.from_json(rec)
            if job.state == "running":
                job.state = "scheduled"  # interrupted by a stop: resume it
            self.jobs[key] = job

    async def add(
        self,
        ref: str,
        *,
        at: float | None,
        deadline: float | None,
        priority: Priority,
        schedule: str | None = None,
    ) -> tuple[Job, bool]:
        """The job for ``ref`` at ``at`` (of ``schedule``, if any): (job, created)."""
        if at is not None and deadline is not None and deadline <= at:
            raise RequestInvalid("deadline must be after at", field="deadline")
        now = self.wall()
        if at is None:
            # "now" jobs are idempotent while one for the ref is still waiting or running;
            # once it finished, asking again pulls again (a new revision, an eviction).
            for job in self.jobs.values():
                if job.ref == ref and job.at is None and job.state in ("scheduled", "running"):
                    return job, False
            # Unique even for two requests at the same wall time (a finished "now"
            # job must never be overwritten by the next one).
            job_id = digest_bytes(f"{ref}\0now\0{now}\0{secrets.token_hex(8)}".encode())[:16]
        else:
            key = f"{ref}\0{at}" + (f"\0{schedule}" if schedule else "")
            job_id = digest_bytes(key.encode())[:16]
            existing = self.jobs.get(job_id)
            if existing is not None:
                return existing, False
        begin = (
            now if at is None else start_time(at, deadline, self.node_name, job_id, self.spread_s)
        )
        job = Job(
            job_id, ref, at, deadline, priority.label, "scheduled", now, begin, schedule=schedule
        )
        self.jobs[job_id] = job
        await self.records.put(job_id, job.to_json())
        self._wake.set()
        log.info("job.scheduled id=%s ref=%s start_after=%.0f", job_id, ref, begin)
        return job, True

    def listed(self) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: (j.start_after, j.id))

    def get(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r}", job=job_id)
        return job

    def states(self) -> dict[str, int]:
        return dict(Counter(j.state for j in self.jobs.values()))

    async def cancel(self, job_id: str) -> Job | None:
        """Forget a job that has not started (its schedule was removed); a running
        job finishes."""
        job = self.jobs.get(job_id)
        if job is None or job.state != "scheduled" or job_id in self._tasks:
            return None
        del self.jobs[job_id]
        await self.records.delete(job_id)
        log.info("job.cancelled id=%s ref=%s", job_id, job.ref)
        return job

    async def _miss(self, job: Job, now: float) -> None:
        job.state = "missed"
        job.finished = now
        job.late = True
        self.outcomes["missed"] += 1
        await self.records.put(job.id, job.to_json())
        log.warning(
            "job.missed id=%s ref=%s schedule=%s peak=%.0f",
            job.id,
            job.ref,
            job.schedule,
            job.deadline or 0.0,
        )

    async def loop(self) -> None:
        """Start due jobs; forget finished ones after :data:`JOB_RETENTION_S`."""
        while True:
            now = self.wall()
            expired = [
                j.id
                for j in self.jobs.values()
                if j.finished is not None and j.finished < now - JOB_RETENTION_S
            ]
            for job_id in expired:
                del self.jobs[job_id]
                await self.records.delete(job_id)
            for job in self.listed():
                # An occurrence whose peak passed before it started (the daemon was
                # down) is not replayed: its schedule plans the next one.
                if (
                    job.schedule is not None
                    and job.state == "scheduled"
                    and job.deadline is not None
                    and job.deadline <= now
                    and job.id not in self._tasks
                ):
                    await self._miss(job, now)
            for job in self.listed():
                if (
                    job.state == "scheduled"
                    and job.start_after <= now
                    and job.id not in self._tasks
                ):
                    self._tasks[job.id] = asyncio.create_task(
                        self._run(job), name=f"weightcache-job-{job.id}"
                    )
            upcoming = [j.start_after - now for j in self.jobs.values() if j.state == "scheduled"]
            delay = min([SCHEDULER_TICK_S, *[d for d in upcoming if d > 0]])
            self._wake.clear()
            sleeper = asyncio.ensure_future(self.clock.sleep(delay))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait([sleeper, waker], return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()

    async def _run(self, job: Job) -> None:
        job.state = "running"
        job.started = self.wall()
        await self.records.put(job.id, job.to_json())

        def progress(done: int, total: int) -> None:
            job.done_bytes, job.total_bytes = done, total

        try:
            job.revision = await self.run(job, progress)
            job.state = "done"
            job.done_bytes = job.total_bytes
        except asyncio.CancelledError:
            job.state = "scheduled"  # resumed by the next start
            raise
        except WeightcacheError as exc:
            job.state = "failed"
            job.error = {"code": exc.code, "message": exc.message}
            log.warning("job.failed id=%s ref=%s code=%s", job.id, job.ref, exc.code)
        finally:
            self._tasks.pop(job.id, None)
            job.finished = self.wall() if job.state in ("done", "failed") else None
            job.late = bool(
                job.deadline is not None and job.finished and job.finished > job.deadline
            )
            if job.outcome is not None:
                self.outcomes[job.outcome] += 1
            await asyncio.shield(self.records.put(job.id, job.to_json()))
        log.info("job.%s id=%s ref=%s late=%s", job.state, job.id, job.ref, job.late)

    async def close(self) -> None:
        """Cancel running jobs (they go back to scheduled) and save every job."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for job in list(self.jobs.values()):
            await self.records.put(job.id, job.to_json())
