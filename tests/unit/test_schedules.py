"""Recurring prefetch: cron occurrences across DST (pure), and schedules planning jobs on a
manual clock (lead and spread, a restart inside a lead window, missed occurrences).

The service tests run on a :class:`~tests.support.clocks.ManualClock`; a daemon
that was down is a new service on a new clock whose wall time starts later.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.support.clocks import ManualClock, eventually
from tests.support.published import cache_config, publish_model
from weightcache.api import bodies
from weightcache.config import Config
from weightcache.errors import NotFound, RequestInvalid
from weightcache.schedules import (
    MIN_PERIOD_S,
    Cron,
    next_peak,
    parse_cron,
    peaks,
    previous_peak,
    schedule_id,
)
from weightcache.service import Service

BERLIN = ZoneInfo("Europe/Berlin")
HOUR = 3600.0
#: Monday 2027-01-18 08:00 UTC
MONDAY_8 = datetime(2027, 1, 18, 8, tzinfo=UTC).timestamp()


def local(*args: int, fold: int = 0) -> float:
    return datetime(*args, tzinfo=BERLIN, fold=fold).timestamp()  # type: ignore[misc]


def walls(cron: Cron, after: float, n: int) -> list[str]:
    """The next ``n`` occurrences as local wall times with their UTC offset."""
    it = peaks(cron, after)
    return [datetime.fromtimestamp(next(it), cron.zone).strftime("%m-%d %H:%M%z") for _ in range(n)]


# -- cron occurrences (pure) -----------------------------------------------------------


def test_a_daily_time_in_berlin_across_spring_forward() -> None:
    cron = parse_cron("30 2 * * *", "Europe/Berlin")
    # 2026-03-29 02:30 does not exist (02:00 → 03:00): the first minute after the gap.
    assert walls(cron, local(2026, 3, 27, 12), 3) == [
        "03-28 02:30+0100",
        "03-29 03:00+0200",
        "03-30 02:30+0200",
    ]


def test_a_daily_time_in_berlin_across_fall_back_runs_once() -> None:
    cron = parse_cron("30 2 * * *", "Europe/Berlin")
    # 2026-10-25 02:30 happens twice (03:00 CEST → 02:00 CET): one occurrence, the first.
    assert walls(cron, local(2026, 10, 24, 12), 3) == [
        "10-25 02:30+0200",
        "10-26 02:30+0100",
        "10-27 02:30+0100",
    ]
    # Asked from inside the repeated hour, after the first 02:30: the next day's.
    inside = local(2026, 10, 25, 2, 20, fold=1)
    assert walls(cron, inside, 1) == ["10-26 02:30+0100"]


def test_every_half_hour_runs_by_elapsed_time_through_the_repeated_hour() -> None:
    cron = parse_cron("*/30 * * * *", "Europe/Berlin")
    assert walls(cron, local(2026, 10, 25, 1, 50), 6) == [
        "10-25 02:00+0200",
        "10-25 02:30+0200",
        "10-25 02:00+0100",
        "10-25 02:30+0100",
        "10-25 03:00+0100",
        "10-25 03:30+0100",
    ]
    it = peaks(cron, local(2026, 10, 25, 1, 50))
    first = [next(it) for _ in range(6)]
    assert {b - a for a, b in itertools.pairwise(first)} == {1800.0}


def test_a_weekday_morning_stays_at_nine_local_across_dst() -> None:
    cron = parse_cron("0 9 * * 1-5", "Europe/Berlin")
    # Friday 2026-03-27, then Monday 2026-03-30 after the change: 08:00 UTC, then 07:00 UTC.
    fri = next_peak(cron, local(2026, 3, 27, 0))
    mon = next_peak(cron, fri)
    assert datetime.fromtimestamp(fri, UTC).strftime("%a %H:%M") == "Fri 08:00"
    assert datetime.fromtimestamp(mon, UTC).strftime("%a %H:%M") == "Mon 07:00"
    assert previous_peak(cron, mon) == mon and previous_peak(cron, mon - 1) == fri


def test_the_same_cron_in_utc_and_berlin_are_different_instants() -> None:
    after = datetime(2027, 1, 18, tzinfo=UTC).timestamp()
    utc = next_peak(parse_cron("0 9 * * *"), after)
    berlin = next_peak(parse_cron("0 9 * * *", "Europe/Berlin"), after)
    assert utc - berlin == HOUR  # CET is UTC+1 in January


def test_cron_validation_names_the_field() -> None:
    for expr in ("", "* * *", "61 * * * *", "0 9 * * * *", "H 9 * * *", "every day", 9, None):
        with pytest.raises(RequestInvalid) as info:
            parse_cron(expr, "UTC")
        assert info.value.facts["field"] == "schedule", expr
    with pytest.raises(RequestInvalid, match="never occurs") as info:
        parse_cron("0 0 30 2 *")
    assert info.value.facts["field"] == "schedule"
    with pytest.raises(RequestInvalid, match="at least") as info:
        parse_cron("* * * * *")
    assert info.value.facts["field"] == "schedule"
    assert MIN_PERIOD_S == 300 and parse_cron("*/5 * * * *").expr == "*/5 * * * *"
    for tz in ("Mars/Olympus", "", "../../etc/passwd", 3):
        with pytest.raises(RequestInvalid) as info:
            parse_cron("0 9 * * *", tz)
        assert info.value.facts["field"] == "tz", tz


def test_cron_is_normalised_so_equal_schedules_are_one() -> None:
    assert parse_cron("@daily").expr == "0 0 * * *"
    assert parse_cron("  0   9 * * MON-FRI ").expr == "0 9 * * mon-fri"
    one = schedule_id("s3://b/m", parse_cron("0 9 * * 1-5", "Europe/Berlin"))
    assert one == schedule_id("s3://b/m", parse_cron("0  9 * * 1-5", "Europe/Berlin"))
    assert one != schedule_id("s3://b/m", parse_cron("0 9 * * 1-5", "UTC"))
    assert one != schedule_id("s3://b/other", parse_cron("0 9 * * 1-5", "Europe/Berlin"))


def test_prefetch_bodies_with_a_schedule() -> None:
    body = bodies.parse_prefetch(
        {"ref": "m", "schedule": "0 9 * * 1-5", "tz": "Europe/Berlin", "lead_s": 900}
    )
    assert body.schedule == Cron("0 9 * * 1-5", "Europe/Berlin")
    assert body.lead_s == 900 and body.hold_s is None and body.at is None
    for doc, field in (
        ({"ref": "m", "schedule": "nope"}, "schedule"),
        ({"ref": "m", "schedule": "0 9 * * *", "tz": "Nowhere/Land"}, "tz"),
        ({"ref": "m", "schedule": "0 9 * * *", "lead_s": -1}, "lead_s"),
        ({"ref": "m", "schedule": "0 9 * * *", "lead_s": 0}, "lead_s"),
        ({"ref": "m", "schedule": "0 9 * * *", "hold_s": "2h"}, "hold_s"),
        ({"ref": "m", "schedule": "0 9 * * *", "at": 4102444800}, "at"),
        ({"ref": "m", "schedule": "0 9 * * *", "deadline": 4102444800}, "deadline"),
        ({"ref": "m", "tz": "UTC"}, "tz"),
        ({"ref": "m", "lead_s": 60}, "lead_s"),
    ):
        with pytest.raises(RequestInvalid) as info:
            bodies.parse_prefetch(doc)
        assert info.value.facts["field"] == field, doc


# -- schedules in the service, on a manual clock -------------------------------------------


def config(root: Path, **env: str) -> Config:
    return cache_config(root, **env)


async def started(cfg: Config, clock: ManualClock) -> Service:
    service = Service(cfg, clock=clock, wall=clock.wall)
    await service.start()
    return service


async def test_an_occurrence_starts_lead_before_its_peak_spread_per_node(tmp_path: Path) -> None:
    m = publish_model(tmp_path, "m", 100_000, 1)
    clock = ManualClock(epoch=MONDAY_8)
    starts = []
    for node in ("node-a", "node-b", "node-c"):
        cfg = config(
            tmp_path / node,
            WEIGHTCACHE_DAEMON_NODE_NAME=node,
            WEIGHTCACHE_DAEMON_PREFETCH_SPREAD_S="120",
        )
        service = await started(cfg, clock)
        try:
            schedule, created = await service.add_schedule(
                m.ref, "0 9 * * *", lead_s=600, hold_s=HOUR
            )
            peak = MONDAY_8 + HOUR
            assert created and schedule.peak == peak and schedule.occurrences == 1
            job = service.job(schedule.job or "")
            assert job.schedule == schedule.id and job.deadline == peak
            assert job.at == peak - 600
            assert peak - 600 <= job.start_after < peak - 600 + 120
            starts.append(job.start_after)
            # A spread window longer than half the lead shrinks to half the lead.
            wide, _ = await service.add_schedule(m.ref, "0 10 * * *", lead_s=60, hold_s=0)
            early = service.job(wide.job or "")
            assert wide.peak == peak + HOUR
            assert peak + HOUR - 60 <= early.start_after < peak + HOUR - 30
        finally:
            await service.close()
    assert len(set(starts)) == 3  # each node its own offset


@pytest.mark.parametrize(
    ("start", "first", "second"),
    [
        # Spring forward: 02:30 does not exist on 03-29; the run after is 03-30.
        ((2026, 3, 29, 1, 0), "03-29 03:00+0200", "03-30 02:30+0200"),
        # Fall back: 02:30 CEST runs; the repeated 02:30 CET an hour later does not.
        ((2026, 10, 25, 2, 0), "10-25 02:30+0200", "10-26 02:30+0100"),
    ],
    ids=["spring-forward", "fall-back"],
)
async def test_a_berlin_schedule_plans_its_occurrences_across_dst(
    tmp_path: Path, start: tuple[int, ...], first: str, second: str
) -> None:
    m = publish_model(tmp_path, "m", 100_000, 1)
    cfg = config(tmp_path, WEIGHTCACHE_DAEMON_PREFETCH_SPREAD_S="0")
    clock = ManualClock(epoch=local(*start))
    service = await started(cfg, clock)

    def wall(t: float | None) -> str:
        assert t is not None
        return datetime.fromtimestamp(t, BERLIN).strftime("%m-%d %H:%M%z")

    try:
        schedule, _ = await service.add_schedule(
            m.ref, "30 2 * * *", tz="Europe/Berlin", lead_s=600, hold_s=600
        )
        assert wall(schedule.peak) == first
        job = service.job(schedule.job or "")
        assert job.start_after == (schedule.peak or 0) - 600
        await clock.advance(job.start_after - clock.wall() + 0.01)
        await eventually(lambda: service.job(job.id).state == "done", what="the job")
        assert not service.job(job.id).late
        # Just past the peak, the next occurrence is planned: the next day's.
        await clock.advance((schedule.peak or 0) - clock.wall() + 60)
        await eventually(lambda: service.schedule(schedule.id).job != job.id, what="the plan")
        assert wall(service.schedule(schedule.id).peak) == second
        assert service.schedule(schedule.id).occurrences == 2
    finally:
        await service.close()


async def test_a_schedule_is_idempotent_and_removable(tmp_path: Path) -> None:
    m = publish_model(tmp_path, "m", 100_000, 1)
    clock = ManualClock(epoch=MONDAY_8)
    service = await started(config(tmp_path), clock)
    try:
        one, created = await service.add_schedule(m.ref, "0 9 * * *", tz="Europe/Berlin")
        assert created and one.lead_s == 900 and one.hold_s == 7200  # prefetch.* defaults
        two, again = await service.add_schedule(
            m.ref, "0 9 * * *", tz="Europe/Berlin", lead_s=1200, hold_s=60
        )
        assert not again and two is one and (one.lead_s, one.hold_s) == (1200, 60)
        assert [s.id for s in service.schedules()] == [one.id]
        assert len([j for j in service.jobs() if j.schedule == one.id]) == 1
        with pytest.raises(RequestInvalid) as info:
            await service.add_schedule(m.ref, "0 9 * * *", lead_s=-5)
        assert info.value.facts["field"] == "lead_s"

        removed = await service.remove_schedule(one.id)
        assert removed["removed"] == one.id and removed["job_cancelled"] == one.job
        assert service.schedules() == [] and not service.jobs()
        with pytest.raises(NotFound):
            service.schedule(one.id)
        with pytest.raises(NotFound):
            await service.remove_schedule(one.id)
        assert not await service.hop(lambda: list(service.node.index.items("schedule")))
    finally:
        await service.close()


async def test_a_restart_inside_the_lead_window_resumes_the_one_job(tmp_path: Path) -> None:
    m = publish_model(tmp_path, "m", 300_000, 1)
    cfg = config(tmp_path, WEIGHTCACHE_DAEMON_PREFETCH_SPREAD_S="0")
    clock = ManualClock(epoch=MONDAY_8)
    service = await started(cfg, clock)
    try:
        schedule, _ = await service.add_schedule(m.ref, "0 9 * * *", lead_s=1800, hold_s=HOUR)
        planned = schedule.job
        await clock.advance(1200)  # 08:20, before the lead window opens at 08:30
        assert service.job(planned or "").state == "scheduled"
    finally:
        await service.close()

    # Back at 08:45, inside the lead window, the peak still ahead: the same job runs
    # at once, and only that one.
    later = ManualClock(epoch=MONDAY_8 + 45 * 60)
    restarted = await started(cfg, later)
    try:
        await later.advance(0.01)
        await eventually(lambda: restarted.job(planned or "").state == "done", what="the job")
        job = restarted.job(planned or "")
        assert not job.late and job.finished is not None and job.finished < MONDAY_8 + HOUR
        assert [j.id for j in restarted.jobs() if j.schedule == schedule.id] == [planned]
        assert restarted.schedule(schedule.id).occurrences == 1
        assert restarted.node.store.has_snapshot(m.revision)
        assert restarted.prefetching.schedules_book.pins[schedule.id].revision == m.revision
    finally:
        await restarted.close()


async def test_a_missed_occurrence_is_not_replayed_after_its_peak(tmp_path: Path) -> None:
    m = publish_model(tmp_path, "m", 100_000, 1)
    cfg = config(tmp_path, WEIGHTCACHE_DAEMON_PREFETCH_SPREAD_S="0")
    clock = ManualClock(epoch=MONDAY_8)
    service = await started(cfg, clock)
    try:
        schedule, _ = await service.add_schedule(m.ref, "0 * * * *", lead_s=600, hold_s=60)
        missed = schedule.job
    finally:
        await service.close()

    # The daemon was down from 08:00 until 13:20: four peaks passed (9 to 13 o'clock).
    # The planned one is missed, none is replayed, and the next peak still ahead
    # (14:00) is planned: its job waits for its lead window.
    later = ManualClock(epoch=MONDAY_8 + 5 * HOUR + 20 * 60)
    restarted = await started(cfg, later)
    try:
        await later.advance(0.01)
        await eventually(
            lambda: (
                restarted.job(missed or "").state == "missed"
                and restarted.schedule(schedule.id).job != missed
            ),
            what="the missed occurrence and the next one planned",
        )
        jobs = [j for j in restarted.jobs() if j.schedule == schedule.id]
        assert len(jobs) == 2
        upcoming = restarted.job(restarted.schedule(schedule.id).job or "")
        assert upcoming.id != missed and upcoming.deadline == MONDAY_8 + 6 * HOUR
        assert upcoming.state == "scheduled" and upcoming.start_after == MONDAY_8 + 6 * HOUR - 600
        assert not restarted.node.store.snapshot_revisions()  # nothing was pulled
        status = await restarted.status()
        assert status["prefetch"]["outcomes"]["missed"] == 1
        assert status["jobs"] == {"missed": 1, "scheduled": 1}

        # Inside the next lead window it runs, once.
        await later.advance(upcoming.start_after - later.wall() + 0.01)
        await eventually(lambda: restarted.job(upcoming.id).state == "done", what="the job")
        assert restarted.node.store.has_snapshot(m.revision)
    finally:
        await restarted.close()


async def test_a_schedule_on_a_bad_ref_or_cron_is_refused_and_nothing_is_kept(
    tmp_path: Path,
) -> None:
    clock = ManualClock(epoch=MONDAY_8)
    service = await started(config(tmp_path), clock)
    try:
        with pytest.raises(RequestInvalid) as info:
            await service.add_schedule("file:///nowhere/m", "0 25 * * *")
        assert info.value.facts["field"] == "schedule"
        with pytest.raises(RequestInvalid) as info:
            await service.add_schedule("file:///nowhere/m", "0 9 * * *", tz="Atlantis/Capital")
        assert info.value.facts["field"] == "tz"
        with pytest.raises(Exception, match="ref"):
            await service.add_schedule("not a ref", "0 9 * * *")
        assert service.schedules() == [] and service.jobs() == []
    finally:
        await service.close()
