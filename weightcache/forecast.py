"""When cold misses cluster, per model location, and the schedule that would have caught them.

The daemon sees every ensure. For each model location it keeps, per week, an
hour-of-week histogram of requests and of *cold misses* (requests the cache
could not answer at once: a pull, or joining one), in ``prefetch.tz``, for the
last ``prefetch.history_weeks`` weeks: at most ``2 * 168 * weeks`` counters
per location, and at most ``prefetch.history_max_models`` locations (the one
seen longest ago goes first). :class:`HistoryBook` holds them on the event loop
and hands out what changed, for the owner to write to the index off the loop.

Everything else here is pure, over plain histograms:

* :func:`suggest`: the hours of the week in which misses came back in at least
  ``min_weeks`` of the weeks looked at, grouped into one cron schedule per run
  of consecutive hours on the same days (``0 9 * * 1-5``, held for the run's
  length), each with the misses it would have turned into hits;
* :func:`auto_decisions`: which suggestions ``prefetch.auto`` turns into
  schedules within its byte budget for auto pins, and why the others not.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

__all__ = [
    "HOURS_PER_WEEK",
    "Candidate",
    "Decision",
    "History",
    "HistoryBook",
    "Suggestion",
    "Week",
    "auto_decisions",
    "bin_of",
    "model_forecast",
    "suggest",
]

HOURS_PER_WEEK = 168
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


# -- histograms ----------------------------------------------------------------------


@dataclass
class Week:
    """One week of one location: hour of week (0 = Monday 00:00) → count, sparse."""

    requests: dict[int, int] = field(default_factory=dict)
    misses: dict[int, int] = field(default_factory=dict)


@dataclass
class History:
    location: str
    #: week number (Mondays since 0001-01-01, in the history's zone) → its histograms
    weeks: dict[int, Week] = field(default_factory=dict)
    #: the size of the revision served last (what a schedule would pin)
    bytes: int = 0
    last_seen: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "location": self.location,
            "bytes": self.bytes,
            "last_seen": self.last_seen,
            "weeks": {
                str(w): {
                    "requests": {str(h): n for h, n in week.requests.items()},
                    "misses": {str(h): n for h, n in week.misses.items()},
                }
                for w, week in self.weeks.items()
            },
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> History:
        weeks = {
            int(w): Week(
                {int(h): int(n) for h, n in (bins.get("requests") or {}).items()},
                {int(h): int(n) for h, n in (bins.get("misses") or {}).items()},
            )
            for w, bins in (doc.get("weeks") or {}).items()
        }
        return cls(
            str(doc["location"]),
            weeks,
            int(doc.get("bytes") or 0),
            float(doc.get("last_seen") or 0.0),
        )


def bin_of(t: float, zone: ZoneInfo) -> tuple[int, int]:
    """(week number, hour of week) of epoch time ``t`` on the wall clock of ``zone``."""
    dt = datetime.fromtimestamp(t, zone)
    monday = dt.date().toordinal() - dt.weekday()
    return (monday - 1) // 7, dt.weekday() * 24 + dt.hour


def record(history: History, week: int, hour: int, *, cold: bool, keep_weeks: int) -> None:
    """Count one request (and a miss if ``cold``); weeks older than ``keep_weeks`` go."""
    bins = history.weeks.setdefault(week, Week())
    bins.requests[hour] = bins.requests.get(hour, 0) + 1
    if cold:
        bins.misses[hour] = bins.misses.get(hour, 0) + 1
    for old in [w for w in history.weeks if w <= week - keep_weeks]:
        del history.weeks[old]


# -- suggestions (pure) --------------------------------------------------------------


@dataclass(frozen=True)
class Suggestion:
    """A schedule that would have been warm for a cluster of misses."""

    every: str
    tz: str
    lead_s: float
    hold_s: float
    #: weekdays, 0 = Monday
    days: tuple[int, ...]
    hour: int
    hours: int
    #: cold misses in the cluster's hours over the weeks looked at: what it would have saved
    misses_saved: int
    #: weeks (of those looked at) in which the cluster had misses
    weeks: int

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["days"] = [_DAYS[d] for d in self.days]
        return doc


def _dow(days: Sequence[int]) -> str:
    """Weekdays (0 = Monday) as a cron day-of-week field (0 = Sunday), runs as ranges."""
    if len(days) == 7:
        return "*"
    cron_days = sorted((d + 1) % 7 for d in days)
    parts: list[str] = []
    start = prev = cron_days[0]
    for d in [*cron_days[1:], None]:
        if d is not None and d == prev + 1:
            prev = d
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if d is not None:
            start = prev = d
    return ",".join(parts)


def suggest(
    weeks: Mapping[int, Week],
    *,
    current_week: int,
    window: int,
    min_weeks: int,
    lead_s: float,
    tz: str,
) -> list[Suggestion]:
    """Schedules that would have turned the recurring misses of the last ``window`` weeks
    (``current_week`` included) into hits, most misses saved first.

    An hour of the week *recurs* when it had misses in at least ``min_weeks`` of
    those weeks; a one-off cold start is not a pattern. Recurring hours with the
    same hour of day are grouped by their set of weekdays, and consecutive hours
    with the same weekdays become one schedule at the first hour, held for the
    run (``0 8 * * 1-5`` held 2 h for misses at 8 and 9 on weekdays).
    """
    looked = [weeks[w] for w in range(current_week - window + 1, current_week + 1) if w in weeks]
    seen: dict[int, int] = {}
    total: dict[int, int] = {}
    for week in looked:
        for hour, n in week.misses.items():
            if n > 0:
                seen[hour] = seen.get(hour, 0) + 1
                total[hour] = total.get(hour, 0) + n
    recurring = {h for h, k in seen.items() if k >= min_weeks}
    by_hour: list[tuple[int, ...]] = [
        tuple(d for d in range(7) if d * 24 + hod in recurring) for hod in range(24)
    ]
    out: list[Suggestion] = []
    hod = 0
    while hod < 24:
        days = by_hour[hod]
        if not days:
            hod += 1
            continue
        end = hod + 1
        while end < 24 and by_hour[end] == days:
            end += 1
        bins = [d * 24 + h for d in days for h in range(hod, end)]
        weeks_with = sum(1 for week in looked if any(week.misses.get(b, 0) > 0 for b in bins))
        out.append(
            Suggestion(
                every=f"0 {hod} * * {_dow(days)}",
                tz=tz,
                lead_s=lead_s,
                hold_s=float((end - hod) * 3600),
                days=days,
                hour=hod,
                hours=end - hod,
                misses_saved=sum(total.get(b, 0) for b in bins),
                weeks=weeks_with,
            )
        )
        hod = end
    return sorted(out, key=lambda s: (-s.misses_saved, s.hour, s.every))


def model_forecast(
    history: History,
    *,
    current_week: int,
    window: int,
    min_weeks: int,
    lead_s: float,
    tz: str,
) -> dict[str, Any]:
    """One location's row of ``GET /v1/forecast``: totals, miss hours, suggestions."""
    looked = [
        history.weeks[w]
        for w in range(current_week - window + 1, current_week + 1)
        if w in history.weeks
    ]
    misses_by_hour: dict[int, int] = {}
    for week in looked:
        for hour, n in week.misses.items():
            misses_by_hour[hour] = misses_by_hour.get(hour, 0) + n
    top = sorted(misses_by_hour.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    suggestions = suggest(
        history.weeks,
        current_week=current_week,
        window=window,
        min_weeks=min_weeks,
        lead_s=lead_s,
        tz=tz,
    )
    return {
        "location": history.location,
        "bytes": history.bytes,
        "last_seen": history.last_seen,
        "weeks": len(looked),
        "requests": sum(sum(w.requests.values()) for w in looked),
        "misses": sum(sum(w.misses.values()) for w in looked),
        "miss_hours": [
            {"day": _DAYS[h // 24], "hour": h % 24, "misses": n} for h, n in top if n > 0
        ],
        "suggestions": [s.to_json() for s in suggestions],
        "misses_saved": sum(s.misses_saved for s in suggestions),
    }


# -- automatic schedules (pure) ------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    location: str
    bytes: int
    suggestion: Suggestion


@dataclass(frozen=True)
class Decision:
    location: str
    every: str
    tz: str
    #: "create" or "skip"
    action: str
    reason: str
    bytes: int
    misses_saved: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def auto_decisions(
    candidates: Iterable[Candidate],
    *,
    scheduled: frozenset[tuple[str, str, str]],
    held: Mapping[str, int],
    budget_bytes: int,
) -> list[Decision]:
    """Which suggestions become schedules: most misses saved first, while the models
    they would pin fit in ``budget_bytes`` with those ``held`` already (location →
    bytes; a location's model counts once however many schedules it has).
    ``scheduled`` holds the (location, every, tz) that already have a schedule."""
    held = dict(held)
    total = sum(held.values())
    out = []
    ordered = sorted(
        candidates,
        key=lambda c: (-c.suggestion.misses_saved, c.location, c.suggestion.every),
    )
    for c in ordered:
        s = c.suggestion
        if (c.location, s.every, s.tz) in scheduled:
            continue
        extra = 0 if c.location in held else c.bytes
        if c.bytes <= 0:
            action, reason = "skip", "the model's size is not known yet"
        elif total + extra > budget_bytes:
            action = "skip"
            reason = (
                f"needs {extra} bytes; auto pins hold {total} of prefetch.auto_pin_bytes "
                f"= {budget_bytes}"
            )
        else:
            action = "create"
            reason = f"would have saved {s.misses_saved} misses in {s.weeks} weeks"
            held[c.location] = c.bytes
            total += extra
        out.append(Decision(c.location, s.every, s.tz, action, reason, c.bytes, s.misses_saved))
    return out


# -- the book ------------------------------------------------------------------------


class HistoryBook:
    """Every location's histograms, on the event loop; bounded; tracks what to write."""

    def __init__(self, tz: str, keep_weeks: int, max_models: int) -> None:
        self.zone = ZoneInfo(tz)
        self.tz = tz
        self.keep_weeks = keep_weeks
        self.max_models = max_models
        #: least recently seen first
        self.models: OrderedDict[str, History] = OrderedDict()
        self._dirty: set[str] = set()
        self._dropped: set[str] = set()

    def load(self, records: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        loaded = []
        for _, rec in records:
            try:
                loaded.append(History.from_json(rec))
            except (KeyError, TypeError, ValueError):
                continue  # a record from an incompatible version: start that history again
        for history in sorted(loaded, key=lambda h: h.last_seen):
            self.models[history.location] = history
        self._bound()

    def note(self, location: str, t: float, *, cold: bool, nbytes: int) -> None:
        history = self.models.pop(location, None) or History(location)
        self.models[location] = history
        week, hour = bin_of(t, self.zone)
        record(history, week, hour, cold=cold, keep_weeks=self.keep_weeks)
        history.last_seen = t
        if nbytes:
            history.bytes = nbytes
        self._dirty.add(location)
        self._dropped.discard(location)
        self._bound()

    def _bound(self) -> None:
        while len(self.models) > self.max_models:
            location, _ = self.models.popitem(last=False)
            self._dirty.discard(location)
            self._dropped.add(location)

    def changes(self) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
        """(records to write, locations to delete) since the last call: plain data,
        safe to hand to a worker thread."""
        put = [(loc, self.models[loc].to_json()) for loc in sorted(self._dirty)]
        dropped = sorted(self._dropped)
        self._dirty.clear()
        self._dropped.clear()
        return put, dropped

    def snapshot(self) -> list[History]:
        """Copies of every history, for a forecast computed in a worker thread."""
        return [copy.deepcopy(h) for h in self.models.values()]

    def current_week(self, now: float) -> int:
        return bin_of(now, self.zone)[0]
