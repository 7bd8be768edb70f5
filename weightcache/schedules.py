"""Recurring prefetch: schedules, their occurrences, and the pins that hold models warm.

A schedule is a cron expression in a time zone on a ref. Each occurrence (a
*peak*) becomes an ordinary prefetch job (:mod:`weightcache.jobs`) that starts
at ``peak - lead`` (spread per node) with the peak as its deadline. When that
job completes, the schedule *pins* the revision it made local until
``peak + hold``: no eviction takes a pinned revision, in the daemon or in an
embedded process (pins are index records, read by :mod:`weightcache.budget`).
A schedule on a ref without ``@REV`` resolves at each occurrence, so a revision
published since the last one is what gets warmed, and its pin replaces the
old revision's (one pin per schedule).

Pure: cron parsing and occurrences across DST (croniter over zoneinfo; the only
croniter importer), and which peak a schedule plans next. :class:`ScheduleBook`
owns the schedules and pins on the event loop and their planning loop; what
planning an occurrence means (adding a job) is the owner's, handed in as
``plan_job``, like :class:`~weightcache.jobs.JobBook`'s ``run``.

Occurrences a stopped daemon missed are never replayed: at start the next peak
still ahead is planned (its job runs at once when its lead window is already
open); a job whose peak passed before it started is ``missed``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from weightcache.aio import Clock
from weightcache.errors import NotFound, RequestInvalid
from weightcache.hashing import digest_bytes

log = logging.getLogger(__name__)

__all__ = [
    "Cron",
    "Pin",
    "Schedule",
    "ScheduleBook",
    "next_peak",
    "parse_cron",
    "parse_zone",
    "peaks",
    "previous_peak",
    "schedule_id",
]

#: occurrences closer together than this are refused: each one is a job record
MIN_PERIOD_S = 300.0
#: the planning loop wakes at least this often (and when a schedule is added or removed)
PLAN_TICK_S = 60.0
#: the cron shorthands croniter knows, as the five fields they stand for
ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
#: validation looks at this many occurrences from a fixed instant (pure: not "now")
_CHECK_FROM = 1_704_067_200.0  # 2024-01-01T00:00:00Z
_CHECK_COUNT = 16


# -- cron and time zones (pure) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cron:
    """A validated five-field cron expression in an IANA time zone."""

    expr: str
    tz: str

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    @property
    def fixed_hour(self) -> bool:
        """The hour field names hours (``9``, ``8-18``), not every hour (``*``, ``*/2``).

        As in Vixie cron, such an expression runs once on a DST fall-back day
        (the repeated wall time is skipped); an every-hour expression keeps
        running by elapsed time through the repeated hour.
        """
        return not self.expr.split()[1].startswith("*")


def parse_zone(tz: object, *, name: str = "tz") -> ZoneInfo:
    """An IANA zone (``Europe/Berlin``, ``UTC``); :class:`RequestInvalid` naming ``name``."""
    if not isinstance(tz, str) or not tz.strip():
        raise RequestInvalid(
            f"{name} must be an IANA time zone name such as Europe/Berlin or UTC, got {tz!r}",
            field=name,
        )
    try:
        return ZoneInfo(tz.strip())
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise RequestInvalid(
            f"unknown time zone {tz!r}",
            field=name,
            hint="use an IANA name such as Europe/Berlin, America/New_York or UTC",
        ) from None


def parse_cron(expr: object, tz: object = "UTC", *, name: str = "schedule") -> Cron:
    """Validate a cron expression (five fields, or ``@daily``-style shorthand) in ``tz``.

    Refused with :class:`RequestInvalid` naming ``name`` (or ``tz``): not five
    fields (a seconds field is not taken), fields croniter rejects, an
    expression that never occurs (``0 0 30 2 *``), or occurrences less than
    :data:`MIN_PERIOD_S` apart.
    """
    zone = parse_zone(tz)
    hint = "five fields: minute hour day-of-month month day-of-week, e.g. '0 9 * * 1-5'"
    if not isinstance(expr, str) or not expr.strip():
        raise RequestInvalid(
            f"{name} must be a cron expression, got {expr!r}", field=name, hint=hint
        )
    text = " ".join(expr.split()).lower()
    text = ALIASES.get(text, text)
    if len(text.split()) != 5 or not croniter.is_valid(text):
        raise RequestInvalid(
            f"{name} is not a valid cron expression: {expr!r}", field=name, hint=hint
        )
    cron = Cron(text, zone.key)
    try:
        upcoming = list(_take(peaks(cron, _CHECK_FROM), _CHECK_COUNT))
    except CroniterError:
        raise RequestInvalid(
            f"{name} {expr!r} never occurs", field=name, hint="check the day-of-month and month"
        ) from None
    gaps = [b - a for a, b in itertools.pairwise(upcoming)]
    if gaps and min(gaps) < MIN_PERIOD_S:
        raise RequestInvalid(
            f"{name} {expr!r} occurs every {min(gaps):.0f} s; occurrences must be at least "
            f"{MIN_PERIOD_S:.0f} s apart",
            field=name,
            hint="a recurring prefetch is for peaks hours or days apart; use a coarser schedule",
        )
    return cron


def _take(it: Iterator[float], n: int) -> Iterator[float]:
    for _ in range(n):
        yield next(it)


def _repeated(dt: datetime) -> bool:
    """``dt`` is the second instance of a wall time a DST fall-back repeats."""
    return dt.fold == 1 and dt.utcoffset() != dt.replace(fold=0).utcoffset()


def peaks(cron: Cron, after: float) -> Iterator[float]:
    """Occurrences strictly after ``after`` (epoch seconds), in order, forever.

    On a spring-forward day a wall time that does not exist runs at the first
    minute after the gap (``30 2 * * *`` at 03:00 in Europe/Berlin); on a
    fall-back day a fixed-hour expression runs once (see :attr:`Cron.fixed_hour`).
    """
    it = croniter(cron.expr, datetime.fromtimestamp(after, cron.zone))
    while True:
        dt = it.get_next(datetime)
        t = float(dt.timestamp())
        if t <= after or (cron.fixed_hour and _repeated(dt)):
            continue
        yield t


def next_peak(cron: Cron, after: float) -> float:
    """The first occurrence strictly after ``after``."""
    return next(peaks(cron, after))


def previous_peak(cron: Cron, at: float) -> float | None:
    """The last occurrence at or before ``at`` (None if croniter finds none)."""
    it = croniter(cron.expr, datetime.fromtimestamp(at + 1, cron.zone))
    try:
        for _ in range(4):
            dt = it.get_prev(datetime)
            if cron.fixed_hour and _repeated(dt):
                continue
            t = float(dt.timestamp())
            if t <= at:
                return t
    except CroniterError:
        return None
    return None


def schedule_id(ref: str, cron: Cron) -> str:
    """The same ref, expression and zone are one schedule."""
    return digest_bytes(f"schedule\0{ref}\0{cron.expr}\0{cron.tz}".encode())[:16]


# -- schedules and pins ---------------------------------------------------------------


@dataclass
class Schedule:
    id: str
    ref: str
    #: the ref's origin prefix without revision (what ensure requests are counted by)
    location: str
    every: str
    tz: str
    lead_s: float
    hold_s: float
    priority: str
    #: "admin" (asked for) or "auto" (created from the forecast, prefetch.auto)
    source: str
    created: float
    #: the occurrence planned now: its job's deadline
    peak: float | None = None
    #: that occurrence's job
    job: str | None = None
    occurrences: int = 0

    @property
    def cron(self) -> Cron:
        return Cron(self.every, self.tz)

    def planned_peak(self, now: float) -> float:
        """The occurrence to plan at ``now``: the planned one while it is still ahead,
        else the next one still ahead (missed ones are never replayed)."""
        if self.peak is not None and self.peak > now:
            return self.peak
        return next_peak(self.cron, now)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["starts"] = self.peak - self.lead_s if self.peak is not None else None
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Schedule:
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


@dataclass
class Pin:
    """A revision held warm for a schedule until ``expires`` (its peak + hold)."""

    schedule: str
    ref: str
    revision: str
    bytes: int
    since: float
    expires: float
    source: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Pin:
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


class Records(Protocol):
    """Where schedules and pins are persisted (the index, through a worker thread)."""

    async def put(self, kind: str, key: str, doc: dict[str, Any]) -> None:
        """Save one record of ``kind`` ("schedule" or "pin")."""

    async def delete(self, kind: str, key: str) -> None:
        """Forget one record."""


#: plans one occurrence: the job for (schedule, peak), created or found; returns its id
Planner = Callable[[Schedule, float], Awaitable[str]]


@dataclass
class ScheduleBook:
    clock: Clock
    wall: Callable[[], float]
    records: Records
    plan_job: Planner
    schedules: dict[str, Schedule] = field(default_factory=dict)
    pins: dict[str, Pin] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: one plan at a time (the loop and a new schedule's first plan)
    _planning: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: records are written one at a time, each with the latest state, so an older
    #: state never lands after a newer one
    _io: asyncio.Lock = field(default_factory=asyncio.Lock)

    def load(
        self,
        schedules: list[tuple[str, dict[str, Any]]],
        pins: list[tuple[str, dict[str, Any]]],
    ) -> list[str]:
        """Take persisted records; return the ids of pins already expired (to delete)."""
        for key, rec in schedules:
            self.schedules[key] = Schedule.from_json(rec)
        now = self.wall()
        stale = []
        for key, rec in pins:
            pin = Pin.from_json(rec)
            if pin.expires > now and pin.schedule in self.schedules:
                self.pins[key] = pin
            else:
                stale.append(key)
        return stale

    # -- schedules ------------------------------------------------------------------

    async def add(
        self,
        ref: str,
        location: str,
        cron: Cron,
        *,
        lead_s: float,
        hold_s: float,
        priority: str,
        source: str,
    ) -> tuple[Schedule, bool]:
        """The schedule for (ref, cron, zone): (schedule, created). Asking again with
        another lead, hold or priority updates it; a changed lead applies from the
        next occurrence (the planned job keeps its start)."""
        if lead_s <= 0:
            raise RequestInvalid(
                f"lead_s must be > 0 (the job starts that long before its peak), got {lead_s}",
                field="lead_s",
            )
        if hold_s < 0:
            raise RequestInvalid(f"hold_s must be >= 0, got {hold_s}", field="hold_s")
        sid = schedule_id(ref, cron)
        existing = self.schedules.get(sid)
        if existing is not None:
            changed = (existing.lead_s, existing.hold_s, existing.priority) != (
                lead_s,
                hold_s,
                priority,
            )
            if changed:
                existing.lead_s, existing.hold_s, existing.priority = lead_s, hold_s, priority
                await self._save("schedule", sid)
                log.info("schedule.updated id=%s lead_s=%g hold_s=%g", sid, lead_s, hold_s)
            return existing, False
        schedule = Schedule(
            sid, ref, location, cron.expr, cron.tz, lead_s, hold_s, priority, source, self.wall()
        )
        self.schedules[sid] = schedule
        await self._save("schedule", sid)
        log.info(
            "schedule.added id=%s ref=%s every=%r tz=%s lead_s=%g hold_s=%g source=%s",
            sid,
            ref,
            cron.expr,
            cron.tz,
            lead_s,
            hold_s,
            source,
        )
        await self.plan(schedule)
        self._wake.set()
        return schedule, True

    def get(self, schedule_id: str) -> Schedule:
        schedule = self.schedules.get(schedule_id)
        if schedule is None:
            raise NotFound(f"no schedule {schedule_id!r}", schedule=schedule_id)
        return schedule

    def listed(self) -> list[Schedule]:
        return sorted(self.schedules.values(), key=lambda s: (s.peak or 0.0, s.id))

    async def remove(self, schedule_id: str) -> tuple[Schedule, Pin | None]:
        """Forget a schedule and release its pin; the caller cancels its pending job."""
        schedule = self.get(schedule_id)
        del self.schedules[schedule_id]
        await self._save("schedule", schedule_id)
        pin = await self.unpin(schedule_id, reason="schedule_removed")
        log.info("schedule.removed id=%s ref=%s", schedule_id, schedule.ref)
        self._wake.set()
        return schedule, pin

    # -- planning -------------------------------------------------------------------

    async def _save(self, kind: str, key: str) -> None:
        """Write one record's current state (or its absence)."""
        async with self._io:
            item = (self.schedules if kind == "schedule" else self.pins).get(key)
            if item is None:
                await self.records.delete(kind, key)
            else:
                await self.records.put(kind, key, item.to_json())

    async def plan(self, schedule: Schedule) -> None:
        """Make sure the occurrence ``schedule`` should have planned now has its job."""
        async with self._planning:
            peak = schedule.planned_peak(self.wall())
            if peak == schedule.peak and schedule.job is not None:
                return
            job_id = await self.plan_job(schedule, peak)
            if schedule.id not in self.schedules:
                return  # removed while its job was being added
            if peak != schedule.peak:
                schedule.occurrences += 1
            schedule.peak, schedule.job = peak, job_id
            await self._save("schedule", schedule.id)
        log.info(
            "schedule.planned id=%s peak=%.0f starts=%.0f job=%s",
            schedule.id,
            peak,
            peak - schedule.lead_s,
            job_id,
        )

    async def loop(self) -> None:
        """Plan each schedule's next occurrence once the previous peak has passed."""
        while True:
            for schedule in list(self.schedules.values()):
                try:
                    await self.plan(schedule)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("schedule.plan_failed id=%s", schedule.id)
            now = self.wall()
            ahead = [s.peak - now for s in self.schedules.values() if s.peak is not None]
            delay = min([PLAN_TICK_S, *[d for d in ahead if d > 0]])
            self._wake.clear()
            sleeper = asyncio.ensure_future(self.clock.sleep(max(delay, 0.001)))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait([sleeper, waker], return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waker.cancel()

    # -- pins -----------------------------------------------------------------------

    async def pin(self, schedule: Schedule, revision: str, nbytes: int, peak: float) -> Pin | None:
        """Hold ``revision`` for ``schedule`` until ``peak + hold``; the schedule's previous
        revision loses its pin. None when that time has already passed (a job so late
        that its hold is over)."""
        now = self.wall()
        expires = peak + schedule.hold_s
        if expires <= now:
            await self.unpin(schedule.id, reason="hold_over")
            return None
        old = self.pins.get(schedule.id)
        pin = Pin(schedule.id, schedule.ref, revision, nbytes, now, expires, schedule.source)
        self.pins[schedule.id] = pin
        await self._save("pin", schedule.id)
        if old is not None and old.revision != revision:
            log.info(
                "pin.moved schedule=%s from=%s to=%s",
                schedule.id,
                old.revision[:16],
                revision[:16],
            )
        log.info(
            "pin.held schedule=%s revision=%s bytes=%d until=%.0f",
            schedule.id,
            revision[:16],
            nbytes,
            expires,
        )
        return pin

    async def unpin(self, schedule_id: str, *, reason: str) -> Pin | None:
        pin = self.pins.pop(schedule_id, None)
        if pin is not None:
            await self._save("pin", schedule_id)
            log.info(
                "pin.released schedule=%s revision=%s reason=%s",
                schedule_id,
                pin.revision[:16],
                reason,
            )
        return pin

    async def expire(self) -> list[Pin]:
        """Release every pin whose hold is over."""
        now = self.wall()
        over = [sid for sid, pin in self.pins.items() if pin.expires <= now]
        released = []
        for sid in over:
            pin = await self.unpin(sid, reason="hold_over")
            if pin is not None:
                released.append(pin)
        return released

    def live_pins(self) -> list[Pin]:
        now = self.wall()
        return sorted(
            (p for p in self.pins.values() if p.expires > now),
            key=lambda p: (p.expires, p.schedule),
        )

    def pinned_revisions(self) -> frozenset[str]:
        return frozenset(p.revision for p in self.live_pins())

    def pinned_bytes(self, *, source: str | None = None) -> int:
        """Bytes the live pins hold, each revision once."""
        by_rev = {
            p.revision: p.bytes for p in self.live_pins() if source is None or p.source == source
        }
        return sum(by_rev.values())

    def windows(self, location: str, at: float) -> list[Schedule]:
        """Schedules on ``location`` whose promise covers ``at``: from their latest peak
        at or before ``at`` until that peak + hold."""
        out = []
        for s in self.schedules.values():
            if s.location != location:
                continue
            peak = previous_peak(s.cron, at)
            if peak is not None and peak <= at < peak + s.hold_s:
                out.append(s)
        return out
