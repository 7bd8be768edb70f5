"""The OpenAPI 3.1 description of the daemon's HTTP API, served at ``/v1/openapi.json``.

Written by hand next to the handlers in :mod:`weightcache.api.app`; a unit test
checks that every route of the app is described here and every path described
here is routed, so the two cannot drift apart silently.
"""

from __future__ import annotations

import copy
from typing import Any

from weightcache import __version__
from weightcache.errors import ALL_ERRORS

_INT = {"type": "integer", "minimum": 0}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_DIGEST = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
_EPOCH = {"type": ["number", "null"], "description": "seconds since the Unix epoch"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(props: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    out.update(extra)
    return out


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


_ERROR_CODES = sorted({cls.code for cls in ALL_ERRORS} | {"method_not_allowed"})

_TIME = {
    "oneOf": [
        {"type": "string", "format": "date-time", "description": "RFC 3339, with Z or an offset"},
        {"type": "number", "minimum": 0, "description": "seconds since the Unix epoch"},
        {"type": "null"},
    ]
}
_PRIORITY = {"type": "string", "enum": ["worker", "admin", "background"]}

SCHEMAS: dict[str, Any] = {
    "Error": _obj({"error": _ref("ErrorBody")}, ["error"]),
    "ErrorBody": _obj(
        {
            "code": {"type": "string", "enum": _ERROR_CODES},
            "message": _STR,
            "hint": _STR,
            "details": {"type": "object", "additionalProperties": True},
            "request_id": _STR,
        },
        ["code", "message", "request_id"],
    ),
    "EnsureRequest": _obj(
        {
            "ref": {
                "type": "string",
                "minLength": 1,
                "description": "s3://BUCKET/PREFIX[@REV], file:///ABS/PATH[@REV] or NAME[@REV]",
            },
            "stream": {**_BOOL, "default": False, "description": "answer with NDJSON progress"},
            "lease": {
                **_BOOL,
                "default": True,
                "description": "keep the revision from eviction until released or expired",
            },
            "priority": {**_PRIORITY, "default": "worker"},
            "bind": {
                **_BOOL,
                "default": False,
                "description": "the lease also ends when this request's connection closes",
            },
        },
        ["ref"],
        additionalProperties=False,
    ),
    "LocalFile": _obj(
        {"path": _STR, "local_path": _STR, "size": _INT, "blake3": _DIGEST},
        ["path", "local_path", "size", "blake3"],
    ),
    "Lease": _obj(
        {
            "id": _STR,
            "revision": _DIGEST,
            "pid": {"type": ["integer", "null"]},
            "created": _NUM,
            "expires": {**_NUM, "description": "epoch seconds"},
        },
        ["id", "revision", "expires"],
    ),
    "EnsureResult": _obj(
        {
            "ref": {**_STR, "description": "the ref with its resolved @REV"},
            "revision": _DIGEST,
            "snapshot": {**_STR, "description": "the snapshot directory on this node"},
            "files": {"type": "array", "items": _ref("LocalFile")},
            "cache_hit": _BOOL,
            "total_bytes": _INT,
            "origin_bytes": _INT,
            "reused_bytes": _INT,
            "coalesced_bytes": _INT,
            "resumed_bytes": _INT,
            "retries": _INT,
            "resolve_seconds": _NUM,
            "seconds": _NUM,
            "coalesced": {**_BOOL, "description": "joined a pull another request started"},
            "source": {"type": "string", "enum": ["cache", "origin"]},
            "lease": {"oneOf": [_ref("Lease"), {"type": "null"}]},
        },
        ["ref", "revision", "snapshot", "files", "cache_hit", "total_bytes", "source", "lease"],
    ),
    "Progress": _obj(
        {
            "ref": _STR,
            "done_bytes": _INT,
            "total_bytes": _INT,
            "rate_bytes_per_s": _NUM,
            "source": _STR,
        },
        ["done_bytes", "total_bytes"],
    ),
    "EnsureEvent": {
        "description": "one line of a streamed ensure: progress lines, then one result or error",
        "oneOf": [
            {
                "allOf": [
                    _obj({"event": {"const": "progress"}}, ["event"]),
                    _ref("Progress"),
                ]
            },
            _obj(
                {"event": {"const": "result"}, "result": _ref("EnsureResult")}, ["event", "result"]
            ),
            _obj(
                {"event": {"const": "error"}, "error": _ref("ErrorBody")},
                ["event", "error"],
            ),
        ],
    },
    "PrefetchRequest": _obj(
        {
            "ref": {"type": "string", "minLength": 1},
            "at": {
                **_TIME,
                "description": "start no earlier than this (spread per node); not with schedule",
            },
            "deadline": {
                **_TIME,
                "description": "should be done by then (reported as late); not with schedule",
            },
            "priority": {**_PRIORITY, "default": "admin"},
            "schedule": {
                "type": ["string", "null"],
                "description": "a recurring prefetch: a five-field cron expression (or @daily, "
                "@hourly, ...); each occurrence is a peak whose job starts lead_s before it "
                "and must be done by it",
                "examples": ["0 9 * * 1-5"],
            },
            "lead_s": {
                "type": ["number", "null"],
                "exclusiveMinimum": 0,
                "description": "with schedule: seconds before each peak the job starts "
                "(default prefetch.lead_s)",
            },
            "hold_s": {
                "type": ["number", "null"],
                "minimum": 0,
                "description": "with schedule: seconds after each peak the model stays pinned "
                "(default prefetch.hold_s)",
            },
            "tz": {
                "type": ["string", "null"],
                "description": "with schedule: the IANA time zone of the cron expression "
                "(default UTC)",
                "examples": ["Europe/Berlin"],
            },
        },
        ["ref"],
        additionalProperties=False,
    ),
    "Job": _obj(
        {
            "id": _STR,
            "ref": _STR,
            "at": _EPOCH,
            "deadline": _EPOCH,
            "priority": _PRIORITY,
            "state": {
                "type": "string",
                "enum": ["scheduled", "running", "done", "failed", "missed"],
            },
            "created": _NUM,
            "start_after": _NUM,
            "started": _EPOCH,
            "finished": _EPOCH,
            "done_bytes": _INT,
            "total_bytes": _INT,
            "revision": {"type": ["string", "null"]},
            "late": _BOOL,
            "error": {"oneOf": [{"type": "object"}, {"type": "null"}]},
            "schedule": {
                "type": ["string", "null"],
                "description": "the recurring schedule this job is an occurrence of",
            },
        },
        ["id", "ref", "state", "priority"],
    ),
    "Pin": _obj(
        {
            "schedule": _STR,
            "ref": _STR,
            "revision": _DIGEST,
            "bytes": _INT,
            "since": _NUM,
            "expires": {**_NUM, "description": "epoch seconds: the peak + hold"},
            "source": {"type": "string", "enum": ["admin", "auto"]},
        },
        ["schedule", "revision", "bytes", "expires"],
    ),
    "Schedule": _obj(
        {
            "id": _STR,
            "ref": _STR,
            "location": _STR,
            "every": {**_STR, "description": "the cron expression, five fields"},
            "tz": _STR,
            "lead_s": _NUM,
            "hold_s": _NUM,
            "priority": _PRIORITY,
            "source": {"type": "string", "enum": ["admin", "auto"]},
            "created": _NUM,
            "peak": {**_EPOCH, "description": "the occurrence planned now (its job's deadline)"},
            "starts": {**_EPOCH, "description": "peak - lead_s, before the node's spread"},
            "job": {"type": ["string", "null"], "description": "the planned occurrence's job"},
            "occurrences": _INT,
            "pin": {"oneOf": [_ref("Pin"), {"type": "null"}]},
            "window_misses": _INT,
        },
        ["id", "ref", "every", "tz", "lead_s", "hold_s"],
    ),
    "ScheduleAccepted": _obj(
        {
            "schedule": _ref("Schedule"),
            "created": {**_BOOL, "description": "false when the same schedule already existed"},
            "job": {"oneOf": [_ref("Job"), {"type": "null"}]},
        },
        ["schedule", "created"],
    ),
    "ScheduleList": _obj(
        {"schedules": {"type": "array", "items": _ref("Schedule")}}, ["schedules"]
    ),
    "ScheduleOne": _obj({"schedule": _ref("Schedule")}, ["schedule"]),
    "ScheduleRemoved": _obj(
        {
            "removed": _STR,
            "schedule": _ref("Schedule"),
            "job_cancelled": {"type": ["string", "null"]},
            "pin_released": {"type": ["string", "null"]},
        },
        ["removed"],
    ),
    "AutoDecision": _obj(
        {
            "at": _NUM,
            "location": _STR,
            "every": _STR,
            "tz": _STR,
            "action": {"type": "string", "enum": ["create", "skip", "unpinned"]},
            "reason": _STR,
            "bytes": _INT,
            "misses_saved": _INT,
        },
        ["location", "every", "action", "reason"],
    ),
    "Auto": _obj(
        {
            "enabled": _BOOL,
            "pin_budget_bytes": _INT,
            "pinned_bytes": _INT,
            "schedules": _INT,
            "decisions": {"type": "array", "items": _ref("AutoDecision")},
        },
        ["enabled", "decisions"],
    ),
    "Suggestion": _obj(
        {
            "every": _STR,
            "tz": _STR,
            "lead_s": _NUM,
            "hold_s": _NUM,
            "days": {
                "type": "array",
                "items": {"enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]},
            },
            "hour": _INT,
            "hours": _INT,
            "misses_saved": {**_INT, "description": "misses it would have turned into hits"},
            "weeks": {**_INT, "description": "weeks in which the cluster had misses"},
        },
        ["every", "tz", "lead_s", "hold_s", "misses_saved"],
    ),
    "Forecast": _obj(
        {
            "generated": _NUM,
            "tz": _STR,
            "weeks": _INT,
            "min_weeks": _INT,
            "models": {
                "type": "array",
                "items": _obj(
                    {
                        "location": _STR,
                        "bytes": _INT,
                        "last_seen": _NUM,
                        "weeks": _INT,
                        "requests": _INT,
                        "misses": _INT,
                        "miss_hours": {
                            "type": "array",
                            "items": _obj({"day": _STR, "hour": _INT, "misses": _INT}),
                        },
                        "suggestions": {"type": "array", "items": _ref("Suggestion")},
                        "misses_saved": _INT,
                        "schedules": {"type": "array", "items": _STR},
                    },
                    ["location", "requests", "misses", "suggestions"],
                ),
            },
            "auto": _ref("Auto"),
        },
        ["models"],
    ),
    "PrefetchAccepted": _obj(
        {
            "job": _ref("Job"),
            "created": {**_BOOL, "description": "false when the same job already existed"},
        },
        ["job", "created"],
    ),
    "JobList": _obj({"jobs": {"type": "array", "items": _ref("Job")}}, ["jobs"]),
    "JobOne": _obj({"job": _ref("Job")}, ["job"]),
    "Status": _obj(
        {
            "node": _STR,
            "version": _STR,
            "uptime_s": _NUM,
            "counters": _obj(
                {
                    name: _INT
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
                },
                additionalProperties={"type": "integer"},
            ),
            "errors": {"type": "object", "additionalProperties": {"type": "integer"}},
            "disk": _obj(
                {
                    "cache_dir": _STR,
                    "used_bytes": _INT,
                    "budget_bytes": _INT,
                    "reserve_bytes": _INT,
                    "free_bytes": _INT,
                }
            ),
            "models": {
                "type": "array",
                "items": _obj(
                    {
                        "revision": _DIGEST,
                        "location": _STR,
                        "state": {"type": "string", "enum": ["cached", "pulling"]},
                        "files": _INT,
                        "bytes": _INT,
                        "leases": _INT,
                        "last_used": _EPOCH,
                    }
                ),
            },
            "pulls": {
                "type": "array",
                "items": _obj(
                    {
                        "ref": _STR,
                        "revision": _DIGEST,
                        "priority": _PRIORITY,
                        "done_bytes": _INT,
                        "total_bytes": _INT,
                        "rate_bytes_per_s": _NUM,
                        "waiters": _INT,
                    }
                ),
            },
            "leases": {**_INT, "description": "live leases"},
            "jobs": {
                "type": "object",
                "additionalProperties": {"type": "integer"},
                "description": "prefetch jobs per state",
            },
            "pending": _INT,
            "max_pending": _INT,
            "origin_slots": _obj({"capacity": _INT, "in_use": _INT, "waiting": _INT}),
            "prefetch": _obj(
                {
                    "outcomes": {
                        "type": "object",
                        "additionalProperties": {"type": "integer"},
                        "description": "finished prefetch jobs by outcome: on_time, late, "
                        "failed, missed",
                    },
                    "schedules": {
                        "type": "array",
                        "items": _obj(
                            {
                                "id": _STR,
                                "ref": _STR,
                                "every": _STR,
                                "tz": _STR,
                                "source": _STR,
                                "peak": _EPOCH,
                                "margin_s": {
                                    "type": ["number", "null"],
                                    "description": "peak minus completion of the last "
                                    "finished occurrence (negative: late)",
                                },
                                "window_misses": _INT,
                            }
                        ),
                    },
                }
            ),
            "pins": {"type": "array", "items": _ref("Pin")},
            "pinned_bytes": _INT,
            "auto": _ref("Auto"),
        },
        ["counters", "disk", "models", "pulls"],
    ),
    "EvictRequest": _obj(
        {
            "ref": {"type": "string", "minLength": 1},
            "force": {**_BOOL, "default": False, "description": "evict even while leased"},
        },
        ["ref"],
        additionalProperties=False,
    ),
    "Evicted": _obj(
        {
            "ref": _STR,
            "revision": _DIGEST,
            "freed_bytes": _INT,
            "blobs_removed": _INT,
            "forced": _BOOL,
        },
        ["ref", "revision", "freed_bytes"],
    ),
    "Empty": _obj({}, additionalProperties=False, description="no fields: `{}`"),
    "Released": _obj({"released": _STR}, ["released"]),
    "Health": _obj(
        {"live": _BOOL, "ready": _BOOL, "node": _STR, "version": _STR, "closing": _BOOL},
        ["live", "ready"],
    ),
}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"$ref": f"#/components/responses/E{s}"} for s in statuses}


_ERROR_RESPONSES = {
    "E400": "malformed JSON, a wrong type, an unknown field, a bad ref, cron expression or "
    "time zone (`request_invalid`, `ref_invalid`)",
    "E401": "no or wrong bearer token over TCP (`unauthorized`)",
    "E404": "no such route, job, lease, model or blob",
    "E405": "method not allowed on this route (`method_not_allowed`)",
    "E408": "the request body did not arrive within 10 s of the headers (`request_timeout`); "
    "the connection is closed",
    "E409": "refused while leased or pulled (`model_leased`), or an ambiguous revision",
    "E413": "request body larger than `daemon.max_body_bytes` (`payload_too_large`)",
    "E415": "no `Content-Type: application/json` (`unsupported_media_type`): every POST and "
    "DELETE needs it, with or without a body",
    "E422": "the manifest at the origin is malformed or unsafe (`manifest_invalid`)",
    "E429": "too many leases held by one client (`too_many_leases`)",
    "E500": "internal error; the traceback is in the daemon's log under the request id",
    "E502": "the origin sent bytes that fail their hash, or refused the request",
    "E503": "overloaded (with Retry-After), shutting down, or the origin is unavailable",
    "E507": "not enough room in the cache (`cache_full`)",
}

_V1: dict[str, Any] = {"security": [{"bearer": []}]}


def _paths() -> dict[str, Any]:
    return {
        "/v1/ensure": {
            "post": {
                **_V1,
                "operationId": "ensure",
                "summary": "Make a ref local and verified; returns its files and a lease",
                "description": "Over the Unix socket the caller's pid (SO_PEERCRED) owns the "
                "lease, which ends when that process exits. With `stream: true` the answer "
                "is NDJSON: progress lines (at most ~10 per second, the last always sent), "
                "then one `result` or `error` line.",
                "requestBody": _body("EnsureRequest"),
                "responses": {
                    "200": {
                        "description": "the revision is local",
                        "content": {
                            "application/json": {"schema": _ref("EnsureResult")},
                            "application/x-ndjson": {"schema": _ref("EnsureEvent")},
                        },
                    },
                    **_errors(400, 401, 404, 408, 409, 413, 415, 422, 429, 500, 502, 503, 507),
                },
            }
        },
        "/v1/prefetch": {
            "post": {
                **_V1,
                "operationId": "prefetch",
                "summary": "Schedule a prefetch job (idempotent for the same ref and time), "
                "or a recurring prefetch (idempotent for the same ref, schedule and tz)",
                "requestBody": _body("PrefetchRequest"),
                "responses": {
                    "202": {
                        **_json(_ref("PrefetchAccepted"), "the job, new or existing"),
                        "headers": {"Location": {"schema": _STR}},
                    },
                    "201": {
                        **_json(_ref("ScheduleAccepted"), "a new recurring schedule"),
                        "headers": {"Location": {"schema": _STR}},
                    },
                    "200": {
                        **_json(
                            _ref("ScheduleAccepted"),
                            "the recurring schedule already existed (lead, hold, priority updated)",
                        ),
                        "headers": {"Location": {"schema": _STR}},
                    },
                    **_errors(400, 401, 408, 413, 415, 500, 503),
                },
            }
        },
        "/v1/schedules": {
            "get": {
                **_V1,
                "operationId": "listSchedules",
                "summary": "Recurring prefetch schedules, their next peak and their pins",
                "responses": {
                    "200": _json(_ref("ScheduleList"), "every schedule"),
                    **_errors(401, 500),
                },
            }
        },
        "/v1/schedules/{id}": {
            "get": {
                **_V1,
                "operationId": "getSchedule",
                "summary": "One recurring prefetch schedule",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": _STR}],
                "responses": {
                    "200": _json(_ref("ScheduleOne"), "the schedule"),
                    **_errors(401, 404, 500),
                },
            },
            "delete": {
                **_V1,
                "operationId": "removeSchedule",
                "summary": "Remove a schedule: its pending occurrence is cancelled and its "
                "pin released",
                "description": "The body is empty or `{}`; the Content-Type is "
                "`application/json` either way.",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": _STR}],
                "requestBody": {**_body("Empty"), "required": False},
                "responses": {
                    "200": _json(_ref("ScheduleRemoved"), "the schedule is gone"),
                    **_errors(400, 401, 404, 408, 413, 415, 500),
                },
            },
        },
        "/v1/forecast": {
            "get": {
                **_V1,
                "operationId": "forecast",
                "summary": "Per model: when cold misses cluster, and schedules that would have "
                "turned them into hits",
                "responses": {
                    "200": _json(_ref("Forecast"), "the forecast"),
                    **_errors(401, 500),
                },
            }
        },
        "/v1/jobs": {
            "get": {
                **_V1,
                "operationId": "listJobs",
                "summary": "Prefetch jobs and their progress",
                "responses": {"200": _json(_ref("JobList"), "every job"), **_errors(401, 500)},
            }
        },
        "/v1/jobs/{id}": {
            "get": {
                **_V1,
                "operationId": "getJob",
                "summary": "One prefetch job",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": _STR}],
                "responses": {"200": _json(_ref("JobOne"), "the job"), **_errors(401, 404, 500)},
            }
        },
        "/v1/status": {
            "get": {
                **_V1,
                "operationId": "status",
                "summary": "Counters, disk, models, pulls in flight, leases and jobs",
                "responses": {"200": _json(_ref("Status"), "a snapshot"), **_errors(401, 500)},
            }
        },
        "/v1/models": {
            "delete": {
                **_V1,
                "operationId": "evict",
                "summary": "Evict a ref from the node cache (refused while leased unless forced)",
                "requestBody": _body("EvictRequest"),
                "responses": {
                    "200": _json(_ref("Evicted"), "what was removed"),
                    **_errors(400, 401, 404, 408, 409, 413, 415, 500),
                },
            }
        },
        "/v1/leases/{id}/release": {
            "post": {
                **_V1,
                "operationId": "releaseLease",
                "summary": "End a lease before it expires",
                "description": "The body is empty or `{}`; the Content-Type is "
                "`application/json` either way.",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": _STR}],
                "requestBody": {**_body("Empty"), "required": False},
                "responses": {
                    "200": _json(_ref("Released"), "the lease ended"),
                    **_errors(400, 401, 404, 408, 413, 415, 500),
                },
            }
        },
        "/v1/blobs/{digest}": {
            "get": {
                **_V1,
                "operationId": "getBlob",
                "summary": "Verified content by its BLAKE3 digest, for peers (Range supported); "
                "with ref, a chunk of a blob this node does not hold yet",
                "parameters": [
                    {"name": "digest", "in": "path", "required": True, "schema": _DIGEST},
                    {"name": "Range", "in": "header", "required": False, "schema": _STR},
                    {
                        "name": "ref",
                        "in": "query",
                        "required": False,
                        "description": "LOCATION@REVISION (the revision in full): lets a node "
                        "that does not hold the blob serve one chunk of it, verified",
                        "schema": _STR,
                    },
                    {
                        "name": "X-Weightcache-Node",
                        "in": "header",
                        "required": False,
                        "description": "the asking daemon's id (a request from this very "
                        "daemon gets 409 peer_is_self)",
                        "schema": _STR,
                    },
                    {
                        "name": "X-Weightcache-Peer",
                        "in": "header",
                        "required": False,
                        "description": "the asking daemon's own URL, for per-peer counters",
                        "schema": _STR,
                    },
                ],
                "responses": {
                    "200": {
                        "description": "the whole blob",
                        "content": {"application/octet-stream": {"schema": {}}},
                    },
                    "206": {
                        "description": "the requested range",
                        "content": {"application/octet-stream": {"schema": {}}},
                    },
                    "416": {"description": "the range lies outside the blob"},
                    **_errors(400, 401, 404, 409, 500, 503),
                },
            },
            "head": {
                **_V1,
                "operationId": "headBlob",
                "summary": "Whether this node holds a verified blob, and its size",
                "parameters": [
                    {"name": "digest", "in": "path", "required": True, "schema": _DIGEST}
                ],
                "responses": {
                    "200": {"description": "held; Content-Length is its size"},
                    **_errors(400, 401, 404),
                },
            },
        },
        "/v1/openapi.json": {
            "get": {
                "security": [],
                "operationId": "openapi",
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
        "/metrics": {
            "get": {
                "security": [],
                "operationId": "metrics",
                "summary": "Prometheus exposition (weightcache_* families)",
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": _STR}},
                    },
                    **_errors(500),
                },
            }
        },
        "/healthz": {
            "get": {
                "security": [],
                "operationId": "health",
                "summary": "Liveness and readiness",
                "responses": {
                    "200": _json(_ref("Health"), "live and ready"),
                    "503": _json(_ref("Health"), "live, not ready (starting or stopping)"),
                },
            }
        },
    }


def document() -> dict[str, Any]:
    """A fresh copy of the document (callers may not mutate the shared one)."""
    return copy.deepcopy(_DOCUMENT)


_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "weightcache daemon",
        "version": __version__,
        "description": "Node-local, verified model-weight cache. Local workers use the Unix "
        "socket (no token); over TCP every /v1 route except this document needs "
        "`Authorization: Bearer <token>` when the daemon has a token. Every POST and DELETE "
        "must carry `Content-Type: application/json`, with or without a body. Every response "
        "carries X-Request-Id; every error has the Error shape.",
    },
    "paths": _paths(),
    "components": {
        "schemas": SCHEMAS,
        "responses": {
            name: _json(_ref("Error"), description)
            for name, description in _ERROR_RESPONSES.items()
        },
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
}
