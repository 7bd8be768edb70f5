"""The forecast: hour-of-week histograms, suggested schedules and automatic ones.

The suggestion and decision logic is pure and tested on synthetic histories;
the service tests feed its history directly and run on a manual clock (writes at
most every ``prefetch.history_write_s``, auto schedules within their pin budget).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tests.support.clocks import ManualClock
from tests.support.published import cache_config, publish_model
from weightcache.config import Config
from weightcache.errors import ConfigInvalid
from weightcache.forecast import (
    Candidate,
    History,
    HistoryBook,
    Suggestion,
    Week,
    auto_decisions,
    bin_of,
    model_forecast,
    record,
    suggest,
)
from weightcache.service import Service

UTC_ZONE = ZoneInfo("UTC")
#: Monday 2027-01-18 00:00 UTC
MONDAY = datetime(2027, 1, 18, tzinfo=UTC).timestamp()
DAY = 86400.0
HOUR = 3600.0
THIS_WEEK = bin_of(MONDAY, UTC_ZONE)[0]


def weeks_with(misses: dict[int, list[int]], requests: int = 5) -> dict[int, Week]:
    """Weeks (relative to this one: 0, -1, ...) → the hours of the week with one miss
    each; every hour with a miss also had ``requests`` requests."""
    out = {}
    for rel, hours in misses.items():
        out[THIS_WEEK + rel] = Week(
            requests={h: requests for h in hours}, misses={h: 1 for h in hours}
        )
    return out


def weekday(hour: int, days: range = range(5)) -> list[int]:
    return [d * 24 + hour for d in days]


def suggestions(weeks: dict[int, Week], *, window: int = 4, min_weeks: int = 2) -> list[Suggestion]:
    return suggest(
        weeks, current_week=THIS_WEEK, window=window, min_weeks=min_weeks, lead_s=900, tz="UTC"
    )


# -- binning ------------------------------------------------------------------------------


def test_bins_are_hours_of_the_week_on_the_zones_wall_clock() -> None:
    assert bin_of(MONDAY, UTC_ZONE) == (THIS_WEEK, 0)
    assert bin_of(MONDAY + 9 * HOUR + 59 * 60, UTC_ZONE) == (THIS_WEEK, 9)
    assert bin_of(MONDAY + 6 * DAY + 23 * HOUR, UTC_ZONE) == (THIS_WEEK, 167)
    assert bin_of(MONDAY + 7 * DAY, UTC_ZONE) == (THIS_WEEK + 1, 0)
    # 09:00 in Berlin is the same bin in winter (08:00 UTC) and summer (07:00 UTC).
    berlin = ZoneInfo("Europe/Berlin")
    winter = datetime(2027, 1, 18, 8, tzinfo=UTC).timestamp()
    summer = datetime(2027, 6, 14, 7, tzinfo=UTC).timestamp()
    assert bin_of(winter, berlin)[1] == bin_of(summer, berlin)[1] == 9


def test_a_history_keeps_only_its_last_weeks() -> None:
    h = History("s3://b/m")
    for rel in range(6):
        record(h, THIS_WEEK + rel, 9, cold=rel % 2 == 0, keep_weeks=4)
    assert sorted(h.weeks) == [THIS_WEEK + rel for rel in range(2, 6)]
    assert h.weeks[THIS_WEEK + 2] == Week({9: 1}, {9: 1})
    assert h.weeks[THIS_WEEK + 3] == Week({9: 1}, {})
    assert History.from_json(h.to_json()) == h


def test_the_book_is_bounded_and_hands_out_each_change_once() -> None:
    book = HistoryBook("UTC", keep_weeks=4, max_models=2)
    book.note("a", MONDAY, cold=True, nbytes=10)
    book.note("b", MONDAY + 1, cold=False, nbytes=20)
    book.note("a", MONDAY + 2, cold=False, nbytes=0)  # a seen last now; its size kept
    book.note("c", MONDAY + 3, cold=True, nbytes=30)  # b, seen longest ago, goes
    assert list(book.models) == ["a", "c"]
    put, dropped = book.changes()
    assert [loc for loc, _ in put] == ["a", "c"] and dropped == ["b"]
    assert dict(put)["a"]["bytes"] == 10
    assert book.changes() == ([], [])
    book.note("a", MONDAY + 4, cold=True, nbytes=10)
    assert [loc for loc, _ in book.changes()[0]] == ["a"]


# -- suggestions ---------------------------------------------------------------------------


def test_weekday_morning_misses_suggest_a_weekday_schedule() -> None:
    # Misses at 09:xx on every weekday in three of the last four weeks, and one
    # stray Saturday miss: one schedule, "0 9 * * 1-5", held an hour.
    history = weeks_with({0: weekday(9), -1: weekday(9), -3: [*weekday(9), 5 * 24 + 14]})
    [s] = suggestions(history)
    assert (s.every, s.hold_s, s.lead_s, s.tz) == ("0 9 * * 1-5", 3600.0, 900, "UTC")
    assert s.days == (0, 1, 2, 3, 4) and s.hour == 9 and s.hours == 1
    assert s.misses_saved == 15 and s.weeks == 3


def test_consecutive_hours_on_the_same_days_are_one_schedule_held_longer() -> None:
    history = weeks_with({0: weekday(8) + weekday(9), -1: weekday(8) + weekday(9)})
    [s] = suggestions(history)
    assert s.every == "0 8 * * 1-5" and s.hold_s == 2 * 3600 and s.misses_saved == 20


def test_different_days_make_different_schedules_ordered_by_what_they_save() -> None:
    weekend = [5 * 24 + 10, 6 * 24 + 10]  # Saturday and Sunday 10:00
    daily = [d * 24 + 18 for d in range(7)]
    history = weeks_with({0: weekend + daily + [2 * 24 + 3], -1: weekend + daily + [2 * 24 + 3]})
    got = [(s.every, s.misses_saved) for s in suggestions(history)]
    assert got == [("0 18 * * *", 14), ("0 10 * * 0,6", 4), ("0 3 * * 3", 2)]


def test_one_off_misses_and_old_weeks_suggest_nothing() -> None:
    assert suggestions(weeks_with({0: weekday(9)})) == []  # one week is no pattern
    # Two weeks, but one of them before the window.
    assert suggestions(weeks_with({0: weekday(9), -4: weekday(9)})) == []
    assert suggestions(weeks_with({0: weekday(9), -3: weekday(9)}))  # inside it
    assert suggestions(weeks_with({0: weekday(9), -1: weekday(9)}), min_weeks=3) == []
    # Requests without misses are no reason to prefetch.
    warm = {THIS_WEEK: Week({9: 40}, {}), THIS_WEEK - 1: Week({9: 40}, {})}
    assert suggestions(warm) == []


def test_a_models_forecast_row() -> None:
    h = History("s3://b/m", weeks_with({0: weekday(9), -1: weekday(9)}, requests=4), bytes=123)
    row = model_forecast(
        h, current_week=THIS_WEEK, window=4, min_weeks=2, lead_s=600, tz="Europe/Berlin"
    )
    assert row["requests"] == 40 and row["misses"] == 10 and row["weeks"] == 2
    assert row["miss_hours"][0] == {"day": "mon", "hour": 9, "misses": 2}
    [s] = row["suggestions"]
    assert s["every"] == "0 9 * * 1-5" and s["tz"] == "Europe/Berlin" and s["lead_s"] == 600
    assert s["days"] == ["mon", "tue", "wed", "thu", "fri"]
    assert row["misses_saved"] == 10


# -- automatic schedules -------------------------------------------------------------------


def sug(every: str, saved: int) -> Suggestion:
    return Suggestion(every, "UTC", 900.0, 3600.0, (0,), 9, 1, saved, 2)


def test_auto_decisions_keep_within_the_pin_budget_most_saved_first() -> None:
    candidates = [
        Candidate("s3://b/small", 10, sug("0 9 * * 1", 5)),
        Candidate("s3://b/big", 100, sug("0 9 * * 2", 50)),
        Candidate("s3://b/big", 100, sug("0 18 * * 2", 7)),  # same model: counted once
        Candidate("s3://b/huge", 1000, sug("0 7 * * *", 20)),
        Candidate("s3://b/unknown", 0, sug("0 7 * * *", 3)),
        Candidate("s3://b/done", 10, sug("0 6 * * *", 99)),
    ]
    decisions = auto_decisions(
        candidates,
        scheduled=frozenset({("s3://b/done", "0 6 * * *", "UTC")}),
        held={"s3://b/held": 30},
        budget_bytes=150,
    )
    got = [(d.location.removeprefix("s3://b/"), d.every, d.action) for d in decisions]
    assert got == [
        ("big", "0 9 * * 2", "create"),
        ("huge", "0 7 * * *", "skip"),
        ("big", "0 18 * * 2", "create"),
        ("small", "0 9 * * 1", "create"),
        ("unknown", "0 7 * * *", "skip"),
    ]
    assert "auto pins hold 130 of prefetch.auto_pin_bytes = 150" in decisions[1].reason
    assert "not known" in decisions[4].reason


# -- the service ---------------------------------------------------------------------------


async def started(cfg: Config, clock: ManualClock) -> Service:
    service = Service(cfg, clock=clock, wall=clock.wall)
    await service.start()
    return service


def feed(service: Service, location: str, nbytes: int) -> None:
    """Three weeks of cold weekday-morning starts (09:10), warm afternoons."""
    for week in (-3, -2, -1):
        for day in range(5):
            t = MONDAY + week * 7 * DAY + day * DAY
            service.prefetching.history.note(location, t + 9 * HOUR + 600, cold=True, nbytes=nbytes)
            service.prefetching.history.note(location, t + 14 * HOUR, cold=False, nbytes=nbytes)


async def test_demand_is_recorded_written_at_most_every_interval_and_reloaded(
    tmp_path: Path,
) -> None:
    m = publish_model(tmp_path, "m", 100_000, 1)
    cfg = cache_config(tmp_path, WEIGHTCACHE_PREFETCH_HISTORY_WRITE_S="30")
    clock = ManualClock(epoch=MONDAY + 9 * HOUR)
    service = await started(cfg, clock)

    async def records() -> dict[str, dict[str, object]]:
        return await service.hop(lambda: dict(service.node.index.items("history")))

    try:
        await service.ensure(m.ref, lease=False)  # cold
        await service.ensure(m.ref, lease=False)  # warm
        await service.prefetch(m.ref)  # a job is not demand
        location = service.node.parse(m.ref).location
        week = service.prefetching.history.models[location].weeks[THIS_WEEK]
        assert week.requests == {9: 2} and week.misses == {9: 1}
        assert await records() == {}  # not yet written
        await clock.advance(30)
        for _ in range(500):
            written = await records()
            if written:
                break
            await asyncio.sleep(0.01)
        assert list(written) == [location] and written[location]["bytes"] == 100_000
    finally:
        await service.close()
    again = await started(cfg, clock)
    try:
        assert again.prefetching.history.models[location].weeks[THIS_WEEK].misses == {9: 1}
        row = (await again.forecast())["models"][0]
        assert row["location"] == location and row["requests"] == 2 and row["misses"] == 1
        assert row["suggestions"] == []
    finally:
        await again.close()


async def test_the_forecast_suggests_what_would_have_saved_the_misses(tmp_path: Path) -> None:
    clock = ManualClock(epoch=MONDAY + 8 * HOUR)
    service = await started(cache_config(tmp_path), clock)
    try:
        feed(service, "s3://models/llama", 5_000)
        doc = await service.forecast()
        assert doc["tz"] == "UTC" and doc["weeks"] == 4 and doc["min_weeks"] == 2
        [row] = doc["models"]
        assert row["misses"] == 15 and row["requests"] == 30
        [s] = row["suggestions"]
        assert s["every"] == "0 9 * * 1-5" and s["misses_saved"] == 15 and s["weeks"] == 3
        assert doc["auto"]["enabled"] is False and await service.auto_pass() == []
        assert service.schedules() == []
    finally:
        await service.close()


async def test_auto_creates_schedules_within_its_pin_budget_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="weightcache.prefetch")
    cfg = cache_config(
        tmp_path, WEIGHTCACHE_PREFETCH_AUTO="true", WEIGHTCACHE_PREFETCH_AUTO_PIN_BYTES="10000"
    )
    clock = ManualClock(epoch=MONDAY + 8 * HOUR)
    service = await started(cfg, clock)
    try:
        feed(service, "s3://models/small", 4_000)
        feed(service, "s3://models/large", 9_000)  # small + large exceed the budget
        decisions = await service.auto_pass()
        assert [(d.location, d.action) for d in decisions] == [
            ("s3://models/large", "create"),
            ("s3://models/small", "skip"),
        ]
        [auto] = service.schedules()
        assert (auto.source, auto.every, auto.tz, auto.priority) == (
            "auto",
            "0 9 * * 1-5",
            "UTC",
            "background",
        )
        assert auto.ref == "s3://models/large" and auto.hold_s == 3600
        assert service.job(auto.job or "").deadline == MONDAY + 9 * HOUR
        status = await service.status()
        assert status["auto"]["enabled"] and status["auto"]["schedules"] == 1
        assert [d["action"] for d in status["auto"]["decisions"]] == ["create", "skip"]
        assert any("auto.create" in r.message for r in caplog.records)
        assert any("auto.skip" in r.message for r in caplog.records)
        # Asked again: nothing new is created, and a repeated decision is logged once.
        assert [d.action for d in await service.auto_pass()] == ["skip"]
        assert len(service.schedules()) == 1 and len(service.prefetching.auto_log) == 2
    finally:
        await service.close()


def test_auto_needs_a_pin_budget() -> None:
    with pytest.raises(ConfigInvalid, match=r"prefetch\.auto_pin_bytes"):
        cache_config(Path("/tmp"), WEIGHTCACHE_PREFETCH_AUTO="1")
    with pytest.raises(ConfigInvalid, match=r"prefetch\.tz"):
        cache_config(Path("/tmp"), WEIGHTCACHE_PREFETCH_TZ="Nowhere/Land")
    with pytest.raises(ConfigInvalid, match=r"prefetch\.min_weeks"):
        cache_config(Path("/tmp"), WEIGHTCACHE_PREFETCH_MIN_WEEKS="9")
