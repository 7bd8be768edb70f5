"""The ``weightcache`` command (also ``python -m weightcache``).

Errors print one line, ``weightcache: <code>: <message>``, plus a hint line
where an operator can act, and exit with status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from weightcache import __version__
from weightcache.config import Config, load_config
from weightcache.errors import (
    ConfigInvalid,
    DaemonUnavailable,
    RequestInvalid,
    ShuttingDown,
    WeightcacheError,
)

log = logging.getLogger("weightcache.cli")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _config(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {}
    if getattr(args, "cache_dir", None):
        overrides["cache.dir"] = str(args.cache_dir)
    return load_config(args.config, overrides=overrides)


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        disable=None,  # only on a terminal
        leave=True,
    )


# -- commands --------------------------------------------------------------


def cmd_publish(args: argparse.Namespace) -> int:
    from weightcache.publish import publish
    from weightcache.refs import parse_ref

    cfg = _config(args)
    ref = parse_ref(args.ref, default_bucket=cfg.s3.default_bucket)
    directory = Path(args.dir)
    started = time.monotonic()
    result = publish(directory, ref, cfg, on_file=lambda rel, n: log.info("uploaded %s", rel))
    seconds = time.monotonic() - started
    if args.json:
        print(json.dumps(_published_json(result, seconds), indent=2))
        return 0
    print(f"published {result.ref}")
    print(
        f"  {len(result.manifest.files)} files, {_human(result.manifest.total_bytes)} "
        f"in {seconds:.1f} s"
    )
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from weightcache.publish import index
    from weightcache.refs import parse_ref

    cfg = _config(args)
    ref = parse_ref(args.ref, default_bucket=cfg.s3.default_bucket)
    started = time.monotonic()
    result = index(ref, cfg)
    if args.json:
        print(json.dumps(_published_json(result, time.monotonic() - started), indent=2))
        return 0
    print(f"indexed {result.ref}")
    print(f"  {len(result.manifest.files)} files, {_human(result.manifest.total_bytes)}")
    return 0


def _published_json(result: Any, seconds: float) -> dict[str, Any]:
    """``publish --json`` and ``index --json``: the pinned ref and what its manifest lists."""
    return {
        "ref": result.ref,
        "revision": result.revision,
        "files": len(result.manifest.files),
        "total_bytes": result.manifest.total_bytes,
        "uploaded_bytes": result.uploaded_bytes,
        "seconds": round(seconds, 3),
    }


def cmd_fetch(args: argparse.Namespace) -> int:
    cfg = _daemon_config(args)
    doc = _fetch_via_daemon(args, cfg)
    if doc is None:
        doc = _fetch_embedded(args, cfg)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    state = "already cached" if doc["cache_hit"] else "fetched"
    print(f"{state} {doc['ref']}")
    print(f"  snapshot {doc['snapshot']}")
    print(
        f"  {len(doc['files'])} files, {_human(doc['total_bytes'])}; from origin "
        f"{_human(doc['origin_bytes'])}, reused {_human(doc['reused_bytes'])}, "
        f"resumed {_human(doc['resumed_bytes'])}, retries {doc['retries']}, "
        f"{doc['seconds']:.2f} s"
    )
    if doc["mode"] == "daemon":
        print("  by the daemon" + (", joined a pull in flight" if doc.get("coalesced") else ""))
    return 0


def _fetch_embedded(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    import asyncio

    from weightcache.embedded import Embedded
    from weightcache.node import Progress

    bar: Any = None

    def on_progress(p: Progress) -> None:
        nonlocal bar
        if bar is None:
            bar = _progress_bar(p.total_bytes, "fetch")
        bar.update(p.done_bytes - bar.n)

    async def main() -> Any:
        embedded = Embedded(cfg)
        try:
            return await embedded.ensure(args.ref, on_progress)
        finally:
            await embedded.aclose()

    try:
        result = asyncio.run(main())
    finally:
        if bar is not None:
            bar.close()
    doc: dict[str, Any] = result.to_json()
    doc["mode"] = "embedded"
    return doc


def cmd_ls(args: argparse.Namespace) -> int:
    from weightcache.inventory import listing

    cfg = _config(args)
    doc = listing(cfg)
    rows, blob_bytes = doc["models"], doc["blob_bytes"]
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"cache {cfg.cache.dir}: {len(rows)} revisions, {_human(blob_bytes)} in blobs")
    for r in rows:
        when = (
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"]))
            if r["last_used"]
            else "-"
        )
        mark = "*" if r["latest"] else " "
        print(
            f"{mark} {r['revision'][:16]}  {_human(r['bytes']):>10}  {r['files']:>4} files  "
            f"used {when}  {r['location']}"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from weightcache.verify import verify_cache

    outcome = verify_cache(_config(args), repair=args.repair)
    report, refetched, failed = outcome.report, outcome.refetched, outcome.refetch_failed
    if args.json:
        doc = dict(vars(report))
        doc.update(
            clean=report.clean, problems=report.problems, refetched=refetched, refetch_failed=failed
        )
        print(json.dumps(doc, indent=2))
    else:
        print(
            f"checked {report.blobs_checked} blobs ({_human(report.bytes_checked)}), "
            f"{outcome.snapshots} snapshots"
        )
        for digest in report.corrupt_blobs:
            print(f"  corrupt blob {digest}")
        for digest in report.writable_blobs:
            print(f"  writable blob {digest}")
        for rev in report.bad_manifests:
            print(f"  corrupt manifest {rev}")
        for rev, why in report.broken_snapshots.items():
            print(f"  broken snapshot {rev}: {why}")
        if report.index_without_file or report.file_without_index:
            print(
                f"  index: {len(report.index_without_file)} entries without a file, "
                f"{len(report.file_without_index)} files without an entry"
            )
        if report.partial_downloads:
            print(f"  {len(report.partial_downloads)} partial downloads (resumable)")
        for line in report.repaired:
            print(f"  repaired: {line}")
        for ref in refetched:
            print(f"  pulled again: {ref}")
        for line in failed:
            print(f"  could not pull again: {line}")
        print("no problems found" if report.clean else f"{report.problems} problem(s) found")
    if report.clean:
        return 0
    return 0 if args.repair and not failed else 1


# -- commands that talk to the daemon -------------------------------------------


_RELATIVE = re.compile(r"^\+\s*(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_when(text: str, now: float) -> float:
    """A ``--at``/``--deadline`` value as epoch seconds (what the API takes).

    RFC 3339 with ``Z`` or an offset, or relative to ``now``: ``+30s``, ``+5m``,
    ``+2h``, ``+1d`` (fractions allowed).
    """
    from datetime import datetime

    value = text.strip()
    m = _RELATIVE.match(value.lower())
    if m:
        return now + float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise RequestInvalid(
            f"not a time: {text!r}",
            hint="use RFC 3339 such as 2026-11-23T12:00:00Z, or +30s, +5m, +2h, +1d from now",
        ) from None
    if when.tzinfo is None:
        # Every node must read the same instant, whatever its time zone.
        raise RequestInvalid(
            f"time {text!r} has no time zone",
            hint="end it with Z (UTC) or an offset such as +02:00",
        )
    return when.timestamp()


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")


def parse_duration(text: str, *, name: str = "duration") -> float:
    """``--lead``/``--hold`` as seconds: ``90``, ``90s``, ``15m``, ``2h``, ``1d``, ``1h30m``."""
    value = text.strip().lower()
    pos, total = 0, 0.0
    for m in _DURATION.finditer(value):
        if m.start() != pos or (not m.group(2) and m.end() != len(value)):
            break
        total += float(m.group(1)) * _UNIT_S.get(m.group(2) or "s", 1.0)
        pos = m.end()
    if not value or pos != len(value):
        raise RequestInvalid(
            f"{name} is not a duration: {text!r}",
            field=name,
            hint="use seconds or a number with s, m, h or d, e.g. 90, 15m, 2h, 1h30m",
        )
    return total


def _daemon_config(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {}
    if getattr(args, "cache_dir", None):
        overrides["cache.dir"] = str(args.cache_dir)
    if getattr(args, "socket", None):
        overrides["daemon.socket_path"] = str(args.socket)
    if getattr(args, "url", None):
        overrides["daemon.url"] = str(args.url)
    return load_config(args.config, overrides=overrides)


def _daemon_client(cfg: Config) -> Any:
    """The configured daemon; with none configured, the default socket (which then says so)."""
    from weightcache.client.daemon import DaemonClient

    return DaemonClient.from_config(cfg) or DaemonClient(socket_path=cfg.socket_path)


def _no_daemon(client: Any) -> int:
    print(
        f"weightcache: daemon_unavailable: no daemon at {client.address}: "
        "start one with `weightcache daemon`",
        file=sys.stderr,
    )
    return 1


def _when(epoch: Any) -> str:
    if not isinstance(epoch, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _percent(done: Any, total: Any) -> str:
    if not isinstance(total, int | float) or total <= 0:
        return "  -"
    return f"{100 * min(float(done or 0), float(total)) / total:3.0f}%"


def cmd_prefetch(args: argparse.Namespace) -> int:
    cfg = _daemon_config(args)
    client = _daemon_client(cfg)
    if args.every is not None:
        return _prefetch_recurring(args, client)
    for flag, value in (("--lead", args.lead), ("--hold", args.hold), ("--tz", args.tz)):
        if value is not None:
            raise RequestInvalid(f"{flag} applies to a recurring prefetch only: add --every")
    now = time.time()
    at = parse_when(args.at, now) if args.at else None
    deadline = parse_when(args.deadline, now) if args.deadline else None
    try:
        doc = client.prefetch(args.ref, at=at, deadline=deadline, priority=args.priority)
    except DaemonUnavailable:
        return _no_daemon(client)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    job = doc.get("job", {})
    verb = "scheduled" if doc.get("created", True) else "already scheduled:"
    print(f"{verb} job {job.get('id')} for {job.get('ref', args.ref)} ({job.get('state')})")
    print(f"  starts after {_when(job.get('start_after'))}, priority {job.get('priority')}")
    if job.get("deadline") is not None:
        print(f"  deadline {_when(job.get('deadline'))}")
    return 0


def _prefetch_recurring(args: argparse.Namespace, client: Any) -> int:
    if args.at or args.deadline:
        raise RequestInvalid(
            "--at and --deadline do not apply with --every: each occurrence is a peak, its "
            "job starts --lead before it and must be done by it"
        )
    doc: dict[str, Any] = {"ref": args.ref, "schedule": args.every, "priority": args.priority}
    if args.lead is not None:
        doc["lead_s"] = parse_duration(args.lead, name="--lead")
    if args.hold is not None:
        doc["hold_s"] = parse_duration(args.hold, name="--hold")
    if args.tz is not None:
        doc["tz"] = args.tz
    try:
        # The client library has no call for schedules yet: the generic one.
        answer = client._call("POST", "/v1/prefetch", doc)
    except DaemonUnavailable:
        return _no_daemon(client)
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    sched = answer.get("schedule", {})
    verb = "scheduled" if answer.get("created") else "already scheduled:"
    print(
        f"{verb} {sched.get('id')}: {sched.get('ref')} every {sched.get('every')!r} "
        f"({sched.get('tz')})"
    )
    print(
        f"  lead {_duration(sched.get('lead_s') or 0)}, hold {_duration(sched.get('hold_s') or 0)}"
        f", priority {sched.get('priority')}"
    )
    print(f"  next peak {_when(sched.get('peak'))}, job starts after {_when(sched.get('starts'))}")
    print(f"  remove with: weightcache jobs --remove {sched.get('id')}")
    return 0


def _print_status(doc: dict[str, Any]) -> None:
    c = doc.get("counters", {})
    disk = doc.get("disk", {})
    up = doc.get("uptime_s")
    print(
        f"node {doc.get('node', '?')}  (weightcache {doc.get('version', '?')}"
        + (f", up {_duration(up)})" if isinstance(up, int | float) else ")")
    )
    budget = disk.get("budget_bytes") or 0
    print(
        f"disk      used {_human(disk.get('used_bytes', 0))}"
        + (f" of {_human(budget)} budget" if budget else " (no budget)")
        + f", reserve {_human(disk.get('reserve_bytes', 0))}, "
        f"free {_human(disk.get('free_bytes', 0))}  ({disk.get('cache_dir', '?')})"
    )
    print(
        f"requests  ensure {c.get('ensure_requests', 0)}: hits {c.get('hits', 0)}, "
        f"misses {c.get('misses', 0)}, coalesced {c.get('coalesced', 0)}, "
        f"overloaded {c.get('overloaded', 0)}"
    )
    print(
        f"bytes     from origin {_human(c.get('origin_bytes', 0))}, "
        f"from peers {_human(c.get('peer_bytes', 0))}, "
        f"served {_human(c.get('served_bytes', 0))} "
        f"(to peers {_human(c.get('peer_bytes_served', 0))}); evicted "
        f"{_human(c.get('evicted_bytes', 0))} in {c.get('evictions', 0)} evictions"
    )
    slots = doc.get("origin_slots") or {}
    print(
        f"queue     pending {doc.get('pending', 0)} of {doc.get('max_pending', '?')}"
        + (
            f"; origin slots {slots.get('in_use', 0)}/{slots.get('capacity', '?')} in use, "
            f"{slots.get('waiting', 0)} waiting"
            if slots
            else ""
        )
    )
    jobs = doc.get("jobs")
    if isinstance(jobs, dict):
        jobs_text = ", ".join(f"{n} {state}" for state, n in sorted(jobs.items())) or "none"
    else:
        jobs_text = str(jobs if jobs is not None else 0)
    print(f"leases    {doc.get('leases', 0)}")
    print(f"jobs      {jobs_text}")
    prefetch = doc.get("prefetch") or {}
    outcomes = prefetch.get("outcomes") or {}
    if outcomes or prefetch.get("schedules"):
        print(
            f"schedules {len(prefetch.get('schedules') or [])}; jobs finished "
            + ", ".join(f"{k} {v}" for k, v in outcomes.items())
        )
    pins = doc.get("pins") or []
    print(f"pins      {len(pins)}, {_human(doc.get('pinned_bytes', 0))}")
    for p in pins:
        print(
            f"  {str(p.get('revision', ''))[:16]}  {_human(p.get('bytes', 0)):>10}  until "
            f"{_when(p.get('expires'))}  schedule {p.get('schedule')} ({p.get('source')})  "
            f"{p.get('ref', '')}"
        )
    auto = doc.get("auto") or {}
    if auto.get("enabled") or auto.get("decisions"):
        print(
            f"auto      {'on' if auto.get('enabled') else 'off'}: {auto.get('schedules', 0)} "
            f"schedules, pins {_human(auto.get('pinned_bytes', 0))} of "
            f"{_human(auto.get('pin_budget_bytes', 0))}"
        )
        for d in (auto.get("decisions") or [])[-10:]:
            print(
                f"  {_when(d.get('at'))}  {d.get('action')}  {d.get('location')} "
                f"every {d.get('every')!r}: {d.get('reason')}"
            )
    errors = doc.get("errors") or {}
    if errors:
        print("errors    " + ", ".join(f"{code} {n}" for code, n in sorted(errors.items())))
    models = doc.get("models") or []
    print(f"models    {len(models)}")
    for m in models:
        leases = m.get("leases", 0)
        print(
            f"  {m.get('state', '?'):<8} {str(m.get('revision', ''))[:16]}  "
            f"{_human(m.get('bytes', 0)):>10}  {m.get('files', 0):>4} files  "
            f"{leases} lease{'' if leases == 1 else 's'}  used {_when(m.get('last_used'))}  "
            f"{m.get('location', '')}"
        )
    _print_peers(doc.get("peers"))
    pulls = doc.get("pulls") or []
    print(f"pulls     {len(pulls)}")
    for p in pulls:
        print(
            f"  {_percent(p.get('done_bytes'), p.get('total_bytes'))} "
            f"{_human(p.get('done_bytes', 0))} of {_human(p.get('total_bytes', 0))}  "
            f"{_human(p.get('rate_bytes_per_s', 0))}/s  {p.get('waiters', 1)} waiting  "
            f"{p.get('priority', '')}  {p.get('ref', '')}"
        )


def _print_peers(peers: Any) -> None:
    if not isinstance(peers, dict):
        return
    rows = [r for r in peers.get("members") or [] if not r.get("self")]
    source = f"dns {peers['dns']}" if peers.get("dns") else "list"
    print(
        f"peers     {len(rows)} ({source}); this node {', '.join(peers.get('self') or []) or '-'}"
        f"; pulled for peers {_human(peers.get('pulled_for_peers_bytes', 0))}"
        + (f"; dns failing: {peers['refresh_error']}" if peers.get("refresh_error") else "")
    )
    for r in rows:
        failures = ", ".join(f"{k} {v}" for k, v in sorted((r.get("failures") or {}).items()))
        retry = r.get("retry_in_s") or 0
        print(
            f"  {r.get('state', '?'):<8} {r.get('url', '?')}  in {_human(r.get('bytes_in', 0))}"
            f", out {_human(r.get('bytes_out', 0))}"
            + (f", failures: {failures}" if failures else "")
            + (f"; retried in {retry:.0f} s" if retry else "")
            + (f"; last: {r['last_error']}" if r.get("last_error") and failures else "")
        )


def cmd_status(args: argparse.Namespace) -> int:
    client = _daemon_client(_daemon_config(args))
    try:
        doc = client.status()
    except DaemonUnavailable:
        return _no_daemon(client)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_status(doc)
    return 0


def _print_job(job: dict[str, Any]) -> None:
    print(f"job {job.get('id')}  {job.get('state')}  {job.get('ref')}")
    print(f"  priority     {job.get('priority')}")
    print(f"  at           {_when(job.get('at'))}")
    print(f"  starts after {_when(job.get('start_after'))}")
    print(
        f"  deadline     {_when(job.get('deadline'))}" + ("  (missed)" if job.get("late") else "")
    )
    print(f"  started      {_when(job.get('started'))}")
    print(f"  finished     {_when(job.get('finished'))}")
    print(
        f"  progress     {_percent(job.get('done_bytes'), job.get('total_bytes')).strip()} "
        f"({_human(job.get('done_bytes') or 0)} of {_human(job.get('total_bytes') or 0)})"
    )
    if job.get("revision"):
        print(f"  revision     {job['revision']}")
    err = job.get("error")
    if err:
        print(f"  error        {err.get('code')}: {err.get('message')}")


def cmd_jobs(args: argparse.Namespace) -> int:
    client = _daemon_client(_daemon_config(args))
    try:
        if args.remove:
            removed = client._call("DELETE", f"/v1/schedules/{args.remove}", {})
            if args.json:
                print(json.dumps(removed, indent=2))
            else:
                print(f"removed schedule {removed.get('removed')}")
                if removed.get("job_cancelled"):
                    print(f"  cancelled its pending job {removed['job_cancelled']}")
                if removed.get("pin_released"):
                    print(f"  released its pin on {str(removed['pin_released'])[:16]}")
            return 0
        if args.id:
            job = client.job(args.id)
            if args.json:
                print(json.dumps(job, indent=2))
            else:
                _print_job(job)
            return 0
        jobs = client.jobs()
        schedules = client._call("GET", "/v1/schedules").get("schedules", [])
    except DaemonUnavailable:
        return _no_daemon(client)
    if args.json:
        print(json.dumps({"jobs": jobs, "schedules": schedules}, indent=2))
        return 0
    if schedules:
        _print_schedules(schedules)
    if not jobs:
        print("no prefetch jobs")
        return 0
    print(f"{'ID':<16}  {'STATE':<9}  {'DONE':>4}  {'STARTS AFTER':<19}  {'DEADLINE':<19}  REF")
    for j in jobs:
        state = str(j.get("state", "?")) + ("!" if j.get("late") else "")
        print(
            f"{j.get('id', '')!s:<16}  {state:<9}  "
            f"{_percent(j.get('done_bytes'), j.get('total_bytes')):>4}  "
            f"{_when(j.get('start_after')):<19}  {_when(j.get('deadline')):<19}  {j.get('ref', '')}"
        )
        if j.get("error"):
            print(f"{'':<16}  {j['error'].get('code')}: {j['error'].get('message')}")
    return 0


def _print_schedules(schedules: list[dict[str, Any]]) -> None:
    print(
        f"{'SCHEDULE':<16}  {'EVERY':<16}  {'TZ':<14}  {'LEAD':>6}  {'HOLD':>6}  "
        f"{'NEXT PEAK':<19}  {'PINNED UNTIL':<19}  REF"
    )
    for s in schedules:
        pin = s.get("pin") or {}
        print(
            f"{s.get('id', '')!s:<16}  {s.get('every', '')!s:<16}  {s.get('tz', '')!s:<14}  "
            f"{_duration(s.get('lead_s') or 0):>6}  {_duration(s.get('hold_s') or 0):>6}  "
            f"{_when(s.get('peak')):<19}  {_when(pin.get('expires')):<19}  {s.get('ref', '')}"
            + ("  (auto)" if s.get("source") == "auto" else "")
        )
    print()


def cmd_forecast(args: argparse.Namespace) -> int:
    client = _daemon_client(_daemon_config(args))
    try:
        doc = client._call("GET", "/v1/forecast")
    except DaemonUnavailable:
        return _no_daemon(client)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    models = doc.get("models") or []
    print(
        f"forecast over the last {doc.get('weeks')} weeks ({doc.get('tz')}); an hour is a "
        f"pattern with misses in at least {doc.get('min_weeks')} of them"
    )
    if not models:
        print("no requests recorded yet")
    for m in models:
        print(
            f"{m.get('location')}  {_human(m.get('bytes') or 0)}: {m.get('requests', 0)} "
            f"requests, {m.get('misses', 0)} cold misses"
            + (f"; scheduled: {', '.join(m['schedules'])}" if m.get("schedules") else "")
        )
        hours = m.get("miss_hours") or []
        if hours:
            print(
                "  misses at "
                + ", ".join(f"{h['day']} {h['hour']:02d}:00 ({h['misses']})" for h in hours[:6])
            )
        for sug in m.get("suggestions") or []:
            print(
                f"  suggest: weightcache prefetch {m.get('location')} --every '{sug['every']}' "
                f"--lead {_duration(sug['lead_s'])} --hold {_duration(sug['hold_s'])} "
                f"--tz {sug['tz']}   (would have saved {sug['misses_saved']} misses, "
                f"seen in {sug['weeks']} weeks)"
            )
    auto = doc.get("auto") or {}
    if auto.get("enabled"):
        print(
            f"prefetch.auto is on: {auto.get('schedules', 0)} automatic schedules, pins "
            f"{_human(auto.get('pinned_bytes', 0))} of {_human(auto.get('pin_budget_bytes', 0))}"
        )
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    client = _daemon_client(_daemon_config(args))
    try:
        doc = client.evict(args.ref, force=args.force)
    except DaemonUnavailable:
        return _no_daemon(client)
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(
        f"evicted {doc.get('ref', args.ref)} (revision {str(doc.get('revision', ''))[:16]}): "
        f"freed {_human(doc.get('freed_bytes', 0))} in {doc.get('blobs_removed', 0)} blobs"
        + (", leases overridden" if doc.get("forced") else "")
    )
    return 0


def _fetch_via_daemon(args: argparse.Namespace, cfg: Config) -> dict[str, Any] | None:
    """``fetch`` through the daemon, with a live progress bar; ``None`` when none answers."""
    from weightcache.client.daemon import DaemonClient, Progress

    client = DaemonClient.from_config(cfg)
    if client is None:
        return None
    bar: Any = None

    def on_progress(p: Progress) -> None:
        nonlocal bar
        if bar is None:
            bar = _progress_bar(p.total_bytes, "fetch")
        if p.total_bytes and bar.total != p.total_bytes:
            bar.total = p.total_bytes
        bar.update(p.done_bytes - bar.n)

    try:
        result: dict[str, Any] = client.ensure(args.ref, lease=False, on_progress=on_progress)
    except (DaemonUnavailable, ShuttingDown) as exc:
        reason = exc.facts.get("reason") or exc.code
        log.warning("fetch.fallback reason=%s daemon=%s mode=embedded", reason, client.address)
        return None
    finally:
        if bar is not None:
            bar.close()
    result["mode"] = "daemon"
    return result


def cmd_daemon(args: argparse.Namespace) -> int:
    from weightcache.daemon import run_daemon

    overrides: dict[str, Any] = {}
    if args.cache_dir:
        overrides["cache.dir"] = str(args.cache_dir)
    if args.socket:
        overrides["daemon.socket_path"] = str(args.socket)
    if args.listen:
        overrides["daemon.listen"] = str(args.listen)
    cfg = load_config(args.config, overrides=overrides)
    if args.verbose == 0:
        # A daemon's start, stop and failures belong in its log without -v.
        logging.getLogger("weightcache").setLevel(logging.INFO)
    # uvloop is the daemon's loop only: nothing else in the package imports it.
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        log.info("daemon.loop uvloop=unavailable using=asyncio")
    return run_daemon(cfg, loop_factory=loop_factory)


def cmd_demo(args: argparse.Namespace) -> int:
    from weightcache.demo.run import run_demo

    status: int = run_demo(size_mb=args.size_mb, workers=args.workers, embedded=args.embedded)
    return status


# -- entry point -------------------------------------------------------------

#: what every REF positional says about its grammar
REF_HELP = (
    "the model: s3://BUCKET/PREFIX[@REV] | file:///ABS/PATH[@REV] | NAME[@REV] "
    "(NAME: a prefix in s3.default_bucket; REV: the manifest's BLAKE3 or a unique "
    "prefix of at least 6 hex digits)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightcache", description="Node-local, verified model-weight cache."
    )
    parser.add_argument("--version", action="version", version=f"weightcache {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    # -v also after the command (`weightcache ls -v`); main() adds the two counts.
    verbosity = argparse.ArgumentParser(add_help=False)
    verbosity.add_argument(
        "-v",
        "--verbose",
        dest="verbose_after",
        action="count",
        default=0,
        help="log more (-vv: debug)",
    )
    common = argparse.ArgumentParser(add_help=False, parents=[verbosity])
    common.add_argument("--config", help="TOML config file (default: $WEIGHTCACHE_CONFIG)")
    common.add_argument("--cache-dir", help="cache directory (default: $WEIGHTCACHE_CACHE_DIR)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "publish", parents=[common], help="upload a local model directory and its manifest"
    )
    p.add_argument("dir", help="the local model directory (every file under it is published)")
    p.add_argument("ref", help=f"where to publish it, without @REV: {REF_HELP}")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser(
        "index", parents=[common], help="write a manifest for objects already uploaded"
    )
    p.add_argument("ref", help=f"the prefix holding the objects, without @REV: {REF_HELP}")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_index)

    # Where the daemon-facing commands find the daemon (default: $WEIGHTCACHE_SOCKET,
    # $WEIGHTCACHE_URL, then CACHE_DIR/weightcache.sock).
    to_daemon = argparse.ArgumentParser(add_help=False)
    to_daemon.add_argument(
        "--socket", help="the daemon's Unix socket (overrides daemon.socket_path)"
    )
    to_daemon.add_argument("--url", help="the daemon over HTTP(S) (overrides daemon.url)")

    p = sub.add_parser(
        "fetch",
        parents=[common, to_daemon],
        help="pull a model into the node cache (through the daemon when one answers)",
    )
    p.add_argument("ref", help=REF_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("ls", parents=[common], help="what the cache holds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("verify", parents=[common], help="re-hash the cache and reconcile the index")
    p.add_argument(
        "--repair", action="store_true", help="quarantine corrupt blobs and pull them again"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "prefetch", parents=[common, to_daemon], help="schedule a pull on the node's daemon"
    )
    p.add_argument("ref", help=REF_HELP)
    p.add_argument(
        "--at",
        metavar="TIME",
        help="start then: RFC 3339 (e.g. 2026-11-23T02:00:00Z) or +30s/+5m/+2h",
    )
    p.add_argument("--deadline", metavar="TIME", help="finish by then (same forms as --at)")
    p.add_argument(
        "--every",
        metavar="CRON",
        help="recurring: a peak at every occurrence of this cron expression, e.g. '0 9 * * 1-5'",
    )
    p.add_argument(
        "--lead",
        metavar="DURATION",
        help="with --every: start this long before each peak (e.g. 15m; default prefetch.lead_s)",
    )
    p.add_argument(
        "--hold",
        metavar="DURATION",
        help="with --every: keep the model pinned this long after each peak (e.g. 2h; "
        "default prefetch.hold_s)",
    )
    p.add_argument("--tz", metavar="ZONE", help="with --every: the cron's time zone (default UTC)")
    p.add_argument(
        "--priority", default="admin", help="worker, admin or background (default admin)"
    )
    p.add_argument("--json", action="store_true", help="print the job or schedule as JSON")
    p.set_defaults(func=cmd_prefetch)

    p = sub.add_parser(
        "status", parents=[common, to_daemon], help="the daemon's counters, disk, models, pulls"
    )
    p.add_argument("--json", action="store_true", help="print the daemon's status document")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "jobs", parents=[common, to_daemon], help="prefetch jobs and recurring schedules"
    )
    p.add_argument("id", nargs="?", metavar="ID", help="one job in detail")
    p.add_argument(
        "--remove", metavar="SCHEDULE", help="remove a recurring schedule (and release its pin)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser(
        "forecast",
        parents=[common, to_daemon],
        help="when cold misses cluster per model, and the schedules that would catch them",
    )
    p.add_argument("--json", action="store_true", help="print the daemon's forecast document")
    p.set_defaults(func=cmd_forecast)

    p = sub.add_parser(
        "evict", parents=[common, to_daemon], help="remove a model from the node cache"
    )
    p.add_argument("ref", help=REF_HELP)
    p.add_argument("--force", action="store_true", help="evict even while workers hold leases")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evict)

    p = sub.add_parser(
        "daemon", parents=[common], help="serve this node: Unix socket, optional TCP"
    )
    p.add_argument("--socket", help="Unix socket path (default: CACHE_DIR/weightcache.sock)")
    p.add_argument("--listen", metavar="HOST:PORT", help="also listen on TCP (admins, peers)")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser(
        "demo",
        parents=[verbosity],
        help="what `make demo` runs: local S3, publish, the daemon, two loading processes",
    )
    p.add_argument("--size-mb", type=int, default=384, help="synthetic model size (default 384)")
    p.add_argument(
        "--workers", type=int, default=2, help="concurrent loading processes (default 2)"
    )
    p.add_argument("--embedded", action="store_true", help="no daemon: workers pull in-process")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.verbose += getattr(args, "verbose_after", 0)
    level = (
        logging.WARNING
        if args.verbose == 0
        else logging.INFO
        if args.verbose == 1
        else logging.DEBUG
    )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return int(args.func(args))
    except ConfigInvalid as exc:
        print(f"weightcache: {exc.code}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except WeightcacheError as exc:
        print(f"weightcache: {exc.code}: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 1
    except OSError as exc:
        # The cache or socket directory unwritable, a disk gone: one line, no traceback.
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"weightcache: os_error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("weightcache: interrupted", file=sys.stderr)
        return 130
