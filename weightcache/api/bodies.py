"""Request bodies: JSON in, validated values out.

Pure functions over the declared media type and the decoded document, so every
rule (the media type, types, unknown fields, time formats) is tested without a
server. A wrong media type raises :class:`UnsupportedMediaType` (415); each
problem with the document raises :class:`RequestInvalid` naming the field,
which the error middleware turns into a 400.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from weightcache.errors import RequestInvalid, UnsupportedMediaType
from weightcache.scheduler import Priority
from weightcache.schedules import Cron, parse_cron


@dataclass(frozen=True, slots=True)
class EnsureBody:
    ref: str
    stream: bool = False
    lease: bool = True
    priority: Priority = Priority.WORKER
    #: the lease also ends when the connection that asked for it closes
    bind: bool = False


@dataclass(frozen=True, slots=True)
class PrefetchBody:
    ref: str
    at: float | None = None
    deadline: float | None = None
    priority: Priority = Priority.ADMIN
    #: a recurring prefetch: every occurrence of this cron expression in ``tz``
    schedule: Cron | None = None
    #: None: the daemon's prefetch.lead_s / prefetch.hold_s
    lead_s: float | None = None
    hold_s: float | None = None


@dataclass(frozen=True, slots=True)
class EvictBody:
    ref: str
    force: bool = False


#: the longest lead or hold a recurring prefetch takes (a year)
MAX_DURATION_S = 366 * 86400.0

#: the one media type a request body may be declared as; parameters (charset) may follow
JSON_MEDIA_TYPE = "application/json"


def require_json(content_types: Sequence[str], *, method: str, path: str) -> None:
    """Refuse a request that does not declare exactly one ``Content-Type: application/json``.

    The declared type decides, not the bytes, and it is required even without a
    body: a browser sends ``text/plain``, form and multipart bodies (and bodiless
    POSTs) cross-site without asking first (a CORS "simple request"), while
    ``application/json`` makes it ask (a preflight), which this daemon never grants.
    So a page open on the node cannot make the daemon pull, prefetch or release.
    """
    given = content_types[0] if len(content_types) == 1 else None
    essence = given.partition(";")[0].strip(" \t").lower() if given is not None else ""
    if essence == JSON_MEDIA_TYPE:
        return
    if not content_types:
        said = "no Content-Type"
    elif given is None:
        said = f"{len(content_types)} Content-Type headers"
    else:
        said = f"Content-Type {given[:100]!r}"
    raise UnsupportedMediaType(
        f"{method} {path[:200]} takes {JSON_MEDIA_TYPE} (with or without a body); got {said}",
        hint=f"send Content-Type: {JSON_MEDIA_TYPE} (curl: -H 'Content-Type: {JSON_MEDIA_TYPE}')",
        content_types=[value[:100] for value in content_types],
    )


def decode(raw: bytes, *, allow_empty: bool = False) -> dict[str, Any]:
    """The body as a JSON object; an empty body is ``{}`` where the route has no required field."""
    if not raw.strip():
        if allow_empty:
            return {}
        raise RequestInvalid(
            "request body is empty; expected a JSON object",
            field="body",
            hint='send e.g. {"ref": "s3://bucket/model"} with Content-Type: application/json',
        )
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError as exc:
        raise RequestInvalid("request body is not UTF-8", field="body") from exc
    except RecursionError:
        # The C decoder recurses per level: 64 KiB of '[' is far past the limit.
        raise RequestInvalid("request body is nested too deeply", field="body") from None
    except json.JSONDecodeError as exc:
        raise RequestInvalid(
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            field="body",
        ) from exc
    if not isinstance(doc, dict):
        raise RequestInvalid(f"request body must be a JSON object, got {_kind(doc)}", field="body")
    return doc


def parse_ensure(doc: Mapping[str, Any]) -> EnsureBody:
    _only(doc, ("ref", "stream", "lease", "priority", "bind"))
    return EnsureBody(
        ref=_ref(doc),
        stream=_bool(doc, "stream", False),
        lease=_bool(doc, "lease", True),
        priority=_priority(doc, Priority.WORKER),
        bind=_bool(doc, "bind", False),
    )


def parse_prefetch(doc: Mapping[str, Any]) -> PrefetchBody:
    _only(doc, ("ref", "at", "deadline", "priority", "schedule", "lead_s", "hold_s", "tz"))
    if doc.get("schedule") is not None:
        return _parse_recurring(doc)
    for name in ("lead_s", "hold_s", "tz"):
        if doc.get(name) is not None:
            raise RequestInvalid(
                f"{name} applies to a recurring prefetch only: give a schedule too",
                field=name,
                hint='e.g. {"ref": "...", "schedule": "0 9 * * 1-5", "tz": "Europe/Berlin"}',
            )
    at = _time(doc, "at")
    deadline = _time(doc, "deadline")
    if at is not None and deadline is not None and deadline < at:
        raise RequestInvalid(
            "deadline is before at",
            field="deadline",
            at=doc.get("at"),
            deadline=doc.get("deadline"),
        )
    return PrefetchBody(
        ref=_ref(doc), at=at, deadline=deadline, priority=_priority(doc, Priority.ADMIN)
    )


def _parse_recurring(doc: Mapping[str, Any]) -> PrefetchBody:
    """A prefetch with ``schedule``: its occurrences set the times, so at and deadline
    are refused; the lead must be positive and the hold not negative."""
    for name in ("at", "deadline"):
        if doc.get(name) is not None:
            raise RequestInvalid(
                f"{name} does not apply to a recurring prefetch: each occurrence of the "
                "schedule is a peak, its job starts lead_s before it and must be done by it",
                field=name,
            )
    ref = _ref(doc)
    tz = doc.get("tz")
    cron = parse_cron(doc.get("schedule"), "UTC" if tz is None else tz)
    lead_s = _seconds(doc, "lead_s")
    hold_s = _seconds(doc, "hold_s")
    if lead_s is not None and lead_s <= 0:
        raise RequestInvalid(
            f"lead_s must be > 0 (the job starts that long before each peak), got {lead_s:g}",
            field="lead_s",
        )
    return PrefetchBody(
        ref=ref,
        priority=_priority(doc, Priority.ADMIN),
        schedule=cron,
        lead_s=lead_s,
        hold_s=hold_s,
    )


def parse_evict(doc: Mapping[str, Any]) -> EvictBody:
    _only(doc, ("ref", "force"))
    return EvictBody(ref=_ref(doc), force=_bool(doc, "force", False))


def parse_empty(doc: Mapping[str, Any]) -> None:
    """Routes that take no body still refuse fields they would silently ignore."""
    _only(doc, ())


def parse_time(value: object, name: str) -> float | None:
    """RFC 3339 text (``2026-11-23T12:00:00Z``), epoch seconds, or null → epoch seconds."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise RequestInvalid(
            f"{name} must be an RFC 3339 time or epoch seconds, got {value!r}", field=name
        )
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an integer beyond any float, e.g. 10**400
            seconds = math.inf
        if not math.isfinite(seconds) or seconds < 0:
            raise RequestInvalid(
                f"{name} must be a finite, non-negative epoch time, got {value!r}", field=name
            )
        return seconds
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError as exc:
            raise RequestInvalid(
                f"{name} is not an RFC 3339 time: {value!r}",
                field=name,
                hint="use e.g. 2026-11-23T12:00:00Z",
            ) from exc
        # A time without an offset means a different instant on every node.
        if when.tzinfo is None:
            raise RequestInvalid(
                f"{name} has no time zone: {value!r}",
                field=name,
                hint="end it with Z (UTC) or an offset such as +02:00",
            )
        return when.timestamp()
    raise RequestInvalid(
        f"{name} must be an RFC 3339 time or epoch seconds, got {_kind(value)}", field=name
    )


# -- fields ---------------------------------------------------------------------


def _only(doc: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(k for k in doc if k not in known)
    if unknown:
        raise RequestInvalid(
            f"unknown field {unknown[0]!r}"
            + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
            field=unknown[0],
            unknown=unknown,
            hint=f"known fields: {', '.join(known)}" if known else "this route takes no body",
        )


def _ref(doc: Mapping[str, Any]) -> str:
    if "ref" not in doc:
        raise RequestInvalid("missing field 'ref'", field="ref")
    value = doc["ref"]
    if not isinstance(value, str) or not value.strip():
        raise RequestInvalid(
            f"ref must be a non-empty string, got {_kind(value)}",
            field="ref",
            hint="e.g. s3://bucket/prefix, file:///abs/path or NAME, optionally @REV",
        )
    return value


def _bool(doc: Mapping[str, Any], name: str, default: bool) -> bool:
    value = doc.get(name, default)
    if not isinstance(value, bool):
        raise RequestInvalid(f"{name} must be true or false, got {_kind(value)}", field=name)
    return value


def _priority(doc: Mapping[str, Any], default: Priority) -> Priority:
    value = doc.get("priority")
    if value is None:
        return default
    if not isinstance(value, str):
        raise RequestInvalid(
            f"priority must be a string, got {_kind(value)}",
            field="priority",
            hint="one of worker, admin, background",
        )
    return Priority.parse(value.lower())


def _seconds(doc: Mapping[str, Any], name: str) -> float | None:
    """A duration in seconds: a finite, non-negative number, or absent/null."""
    value = doc.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestInvalid(f"{name} must be a number of seconds, got {_kind(value)}", field=name)
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0 or seconds > MAX_DURATION_S:
        raise RequestInvalid(
            f"{name} must be between 0 and {MAX_DURATION_S:.0f} seconds, got {value!r}",
            field=name,
        )
    return seconds


def _time(doc: Mapping[str, Any], name: str) -> float | None:
    return parse_time(doc.get(name), name)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
