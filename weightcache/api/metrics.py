"""Prometheus exposition of a ``Service.status()`` snapshot.

The only module that imports ``prometheus_client``. Each scrape takes one
snapshot and renders it through a fresh registry of its own: the daemon keeps
its numbers in the service (and the index, across restarts), not in
process-global metric objects, and two concurrent scrapes never share state.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, TypeGuard

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "COUNTERS", "render"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: status()["counters"] key → help text; exposed as ``weightcache_<key>_total``
COUNTERS: dict[str, str] = {
    "ensure_requests": "Ensure requests taken (before any was refused or failed).",
    "hits": "Ensure requests answered from the node cache.",
    "misses": "Ensure requests that pulled their revision.",
    "coalesced": "Ensure requests that joined a pull already in flight.",
    "origin_bytes": "Bytes read from origins.",
    "served_bytes": "Bytes handed to workers (ensured revisions) and to peers (blobs).",
    "peer_bytes": "Bytes received from peer daemons (each chunk verified before it is kept).",
    "peer_bytes_served": "Bytes of verified blobs sent to peer daemons.",
    "partial_bytes_removed": (
        "Disk bytes of partial downloads removed after cache.partial_ttl_s idle."
    ),
    "evictions": "Revisions evicted from the node cache.",
    "evicted_bytes": "Blob bytes evicted from the node cache.",
    "overloaded": "Ensure requests refused because too many were pending.",
}

#: status()["disk"] key → help text; exposed as ``weightcache_disk_<key>``
DISK: dict[str, str] = {
    "used_bytes": "Bytes of blobs in the node cache.",
    "budget_bytes": "The cache's byte budget (0: no budget, only the reserve applies).",
    "reserve_bytes": "Free space the cache leaves on its filesystem.",
    "free_bytes": "Free space on the cache's filesystem.",
}

_NAME = re.compile(r"[^a-zA-Z0-9_]")


def render(status: Mapping[str, Any]) -> bytes:
    """The text exposition format for one status snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatusCollector(status))
    return generate_latest(registry)


class _StatusCollector(Collector):
    def __init__(self, status: Mapping[str, Any]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        status = self._status
        counters = _mapping(status.get("counters"))
        for key, help_text in COUNTERS.items():
            yield CounterMetricFamily(
                f"weightcache_{key}", help_text, value=_number(counters.get(key))
            )
        # Counters the service adds later still reach Prometheus, under a generic help text.
        for key, value in sorted(counters.items()):
            if key not in COUNTERS and _is_number(value):
                name = _NAME.sub("_", str(key)).removesuffix("_total")
                yield CounterMetricFamily(
                    f"weightcache_{name}", f"weightcache counter {key}.", value=float(value)
                )

        errors = CounterMetricFamily(
            "weightcache_errors", "Ensure requests that failed, by error code.", labels=["code"]
        )
        for code, n in sorted(_mapping(status.get("errors")).items()):
            if _is_number(n):
                errors.add_metric([str(code)], float(n))
        yield errors

        disk = _mapping(status.get("disk"))
        for key, help_text in DISK.items():
            yield GaugeMetricFamily(
                f"weightcache_disk_{key}", help_text, value=_number(disk.get(key))
            )

        yield GaugeMetricFamily(
            "weightcache_pulls_in_flight",
            "Pulls (revisions being made local) in progress.",
            value=_count(status.get("pulls")),
        )
        yield GaugeMetricFamily(
            "weightcache_pending",
            "Ensure requests in progress.",
            value=_count(status.get("pending")),
        )
        yield GaugeMetricFamily(
            "weightcache_max_pending",
            "Distinct pulls beyond which a request needing a new one is refused as overloaded.",
            value=_count(status.get("max_pending")),
        )
        yield GaugeMetricFamily(
            "weightcache_leases", "Live leases held by clients.", value=_count(status.get("leases"))
        )
        yield GaugeMetricFamily(
            "weightcache_models",
            "Revisions held in the node cache.",
            value=_count(status.get("models")),
        )
        slots = _mapping(status.get("origin_slots"))
        for key, help_text in (
            ("capacity", "Concurrent origin requests allowed on this node."),
            ("in_use", "Origin requests in flight."),
            ("waiting", "Origin requests waiting for a slot."),
        ):
            yield GaugeMetricFamily(
                f"weightcache_origin_slots_{key}", help_text, value=_number(slots.get(key))
            )
        jobs = GaugeMetricFamily("weightcache_jobs", "Prefetch jobs by state.", labels=["state"])
        for state, n in sorted(_jobs_by_state(status.get("jobs")).items()):
            jobs.add_metric([state], n)
        yield jobs
        yield from _prefetch(status)
        yield from _peers(_mapping(status.get("peers")))


#: a peer's state → the value of ``weightcache_peer_up``
_PEER_STATES = {"up": 1.0, "down": 0.0, "avoided": -1.0}


def _peers(peers: Mapping[str, Any]) -> Iterator[Metric]:
    """Per peer: state, bytes each way, failures by reason (no samples without peers)."""
    up = GaugeMetricFamily(
        "weightcache_peer_up",
        "A peer's state as this node sees it: 1 up, 0 down (unreachable or slow), "
        "-1 avoided (sent bytes that failed their hash).",
        labels=["peer"],
    )
    received = CounterMetricFamily(
        "weightcache_peer_received_bytes", "Bytes received from each peer.", labels=["peer"]
    )
    sent = CounterMetricFamily(
        "weightcache_peer_sent_bytes",
        'Bytes sent to each peer ("unknown": a peer that did not name itself).',
        labels=["peer"],
    )
    failures = CounterMetricFamily(
        "weightcache_peer_failures",
        "Chunks a peer did not give, by reason (unavailable, busy, corrupt, not_found, ...).",
        labels=["peer", "reason"],
    )
    for row in peers.get("members") or []:
        if not isinstance(row, Mapping) or row.get("self"):
            continue
        url = str(row.get("url", ""))
        if url != "unknown":
            up.add_metric([url], _PEER_STATES.get(str(row.get("state")), 0.0))
            received.add_metric([url], _number(row.get("bytes_in")))
        sent.add_metric([url], _number(row.get("bytes_out")))
        for reason, n in sorted(_mapping(row.get("failures")).items()):
            failures.add_metric([url, str(reason)], _number(n))
    yield up
    yield received
    yield sent
    yield failures
    yield GaugeMetricFamily(
        "weightcache_peers",
        "Peers this node knows, itself not counted.",
        value=float(sum(1 for r in peers.get("members") or [] if not r.get("self"))),
    )
    yield CounterMetricFamily(
        "weightcache_pulled_for_peers_bytes",
        "Origin bytes this node pulled because a peer asked for a chunk it did not have.",
        value=_number(peers.get("pulled_for_peers_bytes")),
    )


def _prefetch(status: Mapping[str, Any]) -> Iterator[Metric]:
    """Recurring prefetch: job outcomes, margins before the peak, pins, window misses."""
    prefetch = _mapping(status.get("prefetch"))
    outcomes = CounterMetricFamily(
        "weightcache_prefetch_jobs",
        "Prefetch jobs finished since the daemon started, by outcome (on_time: done by its "
        "deadline; late; failed; missed: an occurrence not started before its peak).",
        labels=["outcome"],
    )
    for outcome, n in sorted(_mapping(prefetch.get("outcomes")).items()):
        if _is_number(n):
            outcomes.add_metric([str(outcome)], float(n))
    yield outcomes
    margins = GaugeMetricFamily(
        "weightcache_schedule_margin_seconds",
        "Seconds from the completion of a schedule's last finished occurrence to its peak "
        "(negative: done after the peak).",
        labels=["schedule"],
    )
    window = CounterMetricFamily(
        "weightcache_schedule_window_misses",
        "Cold ensures of a schedule's model between its peak and peak + hold, since the "
        "daemon started (a good schedule keeps this at zero).",
        labels=["schedule"],
    )
    rows = prefetch.get("schedules")
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, Mapping):
            continue
        sid = str(row.get("id", ""))
        if _is_number(row.get("margin_s")):
            margins.add_metric([sid], float(row["margin_s"]))
        window.add_metric([sid], _number(row.get("window_misses")))
    yield margins
    yield window
    yield GaugeMetricFamily(
        "weightcache_schedules",
        "Recurring prefetch schedules.",
        value=_count(prefetch.get("schedules")),
    )
    yield GaugeMetricFamily(
        "weightcache_pins",
        "Revisions held warm by a schedule until its peak + hold.",
        value=_count(status.get("pins")),
    )
    yield GaugeMetricFamily(
        "weightcache_pinned_bytes",
        "Bytes of the revisions pins hold (each revision once).",
        value=_number(status.get("pinned_bytes")),
    )


def _jobs_by_state(jobs: object) -> dict[str, float]:
    """``{"state": n}`` whether the snapshot holds counts per state or the jobs themselves."""
    out: dict[str, float] = {}
    if isinstance(jobs, Mapping):
        for state, value in jobs.items():
            if _is_number(value):
                out[str(state)] = float(value)
            elif isinstance(value, list):
                out[str(state)] = float(len(value))
    elif isinstance(jobs, list):
        for job in jobs:
            if isinstance(job, Mapping):
                state = str(job.get("state", "unknown"))
                out[state] = out.get(state, 0.0) + 1
    return out


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: object) -> float:
    return float(value) if _is_number(value) else 0.0


def _count(value: object) -> float:
    """A gauge from a number, or from the length of a list or mapping."""
    if _is_number(value):
        return float(value)
    if isinstance(value, list | Mapping):
        return float(len(value))
    return 0.0
