"""Recurring prefetch end to end: schedules warm models before their peaks and pins hold them.

In-process :class:`~weightcache.service.Service` over a ``file://`` origin on a
:class:`~tests.support.clocks.ManualClock` (its wall clock starts on a Monday at
08:00 UTC), so hours pass when the test says; pulls run in real time and are
awaited with :func:`~tests.support.clocks.eventually`. One test drives the real
daemon and the ``weightcache`` command over its socket.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.support.clocks import ManualClock, eventually
from tests.support.daemon import ROOT, Daemon, call
from tests.support.published import CHUNK, Model, cache_config, publish_model
from weightcache.budget import Protection
from weightcache.config import Config, load_config
from weightcache.embedded import Embedded
from weightcache.errors import CacheFull
from weightcache.publish import publish
from weightcache.refs import parse_ref
from weightcache.service import REAP_INTERVAL_S, Service

MB = 1_000_000
#: Monday 2027-01-18 08:00 UTC
MONDAY_8 = datetime(2027, 1, 18, 8, tzinfo=UTC).timestamp()
HOUR = 3600.0


async def started(cfg: Config, clock: ManualClock) -> Service:
    service = Service(cfg, clock=clock, wall=clock.wall)
    await service.start()
    return service


async def until(clock: ManualClock, wall: float) -> None:
    """Let the manual clock run to wall time ``wall``."""
    await clock.advance(max(0.0, wall - clock.wall()))


async def run_occurrence(service: Service, clock: ManualClock, schedule_id: str) -> str:
    """Let time reach the planned job's start; wait for it; return its id."""
    job = service.job(service.schedule(schedule_id).job or "")
    await until(clock, job.start_after + 0.01)
    await eventually(lambda: service.job(job.id).state in ("done", "failed"), what=f"job {job.id}")
    return job.id


def republish(tmp_path: Path, model: Model, size: int, seed: int) -> str:
    """A new revision at the same location; returns it."""
    src = tmp_path / "src" / f"next-{seed}"
    src.mkdir(parents=True)
    (src / "weights.bin").write_bytes(random.Random(seed).randbytes(size))
    done = publish(
        src, parse_ref(model.ref), load_config(env={"WEIGHTCACHE_PUBLISH_CHUNK_BYTES": CHUNK})
    )
    return done.revision


async def test_a_schedule_warms_before_its_peak_holds_through_evictions_then_lets_go(
    tmp_path: Path,
) -> None:
    a, b, c = (publish_model(tmp_path, name, MB, seed) for seed, name in enumerate("abc"))
    cfg = cache_config(tmp_path, WEIGHTCACHE_CACHE_MAX_BYTES=str(int(2.5 * MB)))  # two models
    clock = ManualClock(epoch=MONDAY_8)
    service = await started(cfg, clock)
    store = service.node.store
    try:
        schedule, created = await service.add_schedule(a.ref, "0 9 * * *", lead_s=600, hold_s=1800)
        peak = MONDAY_8 + HOUR
        assert created and schedule.peak == peak
        job_id = await run_occurrence(service, clock, schedule.id)
        job = service.job(job_id)
        assert job.state == "done" and not job.late and job.schedule == schedule.id
        assert job.finished is not None and job.finished < peak
        assert store.has_snapshot(a.revision)
        status = await service.status()
        [pin] = status["pins"]
        assert pin["revision"] == a.revision and pin["expires"] == peak + 1800
        assert status["pinned_bytes"] == a.total_bytes
        assert status["prefetch"]["outcomes"]["on_time"] == 1
        [row] = status["prefetch"]["schedules"]
        assert row["margin_s"] == peak - job.finished

        # During the hold two workers load b, then c: the budget holds two models, and
        # a, the least recently used, is pinned, so b goes.
        await until(clock, peak + 60)
        await service.ensure(b.ref, lease=False)
        await service.ensure(c.ref, lease=False)
        assert store.has_snapshot(a.revision) and store.has_snapshot(c.revision)
        assert not store.has_snapshot(b.revision)
        # The pin is in the index: an admin evict without force is refused too.
        records = await service.hop(lambda: dict(service.node.index.items("pin")))
        assert records[schedule.id]["revision"] == a.revision

        # After the hold the pin is released and a is evictable like any model.
        await until(clock, peak + 1800 + REAP_INTERVAL_S + 0.1)
        await eventually(
            lambda: not service.prefetching.schedules_book.pins, what="the pin's release"
        )
        # The record goes too (written right after the release, in a worker thread).
        for _ in range(500):
            if not await service.hop(lambda: list(service.node.index.items("pin"))):
                break
            await asyncio.sleep(0.01)
        assert not await service.hop(lambda: list(service.node.index.items("pin")))
        assert (await service.status())["pins"] == []
        await service.ensure(b.ref, lease=False)
        assert not store.has_snapshot(a.revision)
        assert store.has_snapshot(b.revision) and store.has_snapshot(c.revision)
    finally:
        await service.close()


async def test_a_new_revision_is_warmed_at_the_next_occurrence_and_the_old_pin_released(
    tmp_path: Path,
) -> None:
    a = publish_model(tmp_path, "a", MB, 1)
    cfg = cache_config(tmp_path)
    clock = ManualClock(epoch=MONDAY_8)
    service = await started(cfg, clock)
    try:
        # Hourly, held 2 h: the first pin is still live when the second occurrence runs.
        schedule, _ = await service.add_schedule(a.ref, "0 * * * *", lead_s=600, hold_s=2 * HOUR)
        first = service.job(await run_occurrence(service, clock, schedule.id))
        assert first.state == "done" and first.revision == a.revision
        assert service.prefetching.schedules_book.pins[schedule.id].revision == a.revision

        await until(clock, MONDAY_8 + HOUR + 300)  # after the first peak
        v2 = republish(tmp_path, a, MB, 99)
        assert v2 != a.revision
        second = service.job(await run_occurrence(service, clock, schedule.id))
        assert second.id != first.id and second.deadline == MONDAY_8 + 2 * HOUR
        assert second.state == "done" and not second.late and second.revision == v2
        pins = (await service.status())["pins"]
        assert [p["revision"] for p in pins] == [v2]
        assert pins[0]["expires"] == MONDAY_8 + 4 * HOUR

        # Both revisions are cached; an eviction pass that wants everything takes only
        # the old one: v2 is pinned (read from the index, as any process would).
        store = service.node.store
        assert store.has_snapshot(a.revision) and store.has_snapshot(v2)
        chosen = await service.hop(
            service.budget.evict, 10 * MB, Protection(), "test", partial=True
        )
        assert chosen.revisions == (a.revision,)
        assert store.has_snapshot(v2)
    finally:
        await service.close()


async def test_a_budget_that_cannot_hold_every_pinned_model_fails_the_prefetch_loudly(
    tmp_path: Path,
) -> None:
    a = publish_model(tmp_path, "a", MB, 1)
    b = publish_model(tmp_path, "b", MB, 2)
    cfg = cache_config(tmp_path, WEIGHTCACHE_CACHE_MAX_BYTES=str(int(1.5 * MB)))  # one model
    clock = ManualClock(epoch=MONDAY_8)
    service = await started(cfg, clock)
    try:
        first, _ = await service.add_schedule(a.ref, "0 9 * * *", lead_s=1200, hold_s=2 * HOUR)
        second, _ = await service.add_schedule(b.ref, "30 9 * * *", lead_s=1200, hold_s=HOUR)
        done = service.job(await run_occurrence(service, clock, first.id))
        assert done.state == "done"
        failed = service.job(await run_occurrence(service, clock, second.id))
        assert failed.state == "failed" and failed.error is not None
        assert failed.error["code"] == "cache_full"
        # Named: the pinned model, its schedule and revision.
        assert a.ref in failed.error["message"] and first.id in failed.error["message"]
        assert service.node.store.has_snapshot(a.revision)
        assert not service.node.store.has_snapshot(b.revision)
        outcomes = (await service.status())["prefetch"]["outcomes"]
        assert outcomes["on_time"] == 1 and outcomes["failed"] == 1
    finally:
        await service.close()


async def test_an_embedded_process_respects_the_daemons_pins(tmp_path: Path) -> None:
    a = publish_model(tmp_path, "a", MB, 1)
    b = publish_model(tmp_path, "b", MB, 2)
    cfg = cache_config(tmp_path, WEIGHTCACHE_CACHE_MAX_BYTES=str(int(1.5 * MB)))
    clock = ManualClock(epoch=MONDAY_8)
    service = await started(cfg, clock)
    embedded = Embedded(cfg)
    try:
        schedule, _ = await service.add_schedule(a.ref, "0 9 * * *", lead_s=600, hold_s=HOUR)
        await run_occurrence(service, clock, schedule.id)
        assert service.node.store.has_snapshot(a.revision)
        # Another process on the node, no daemon involved: its eviction reads the pin
        # from the index and refuses to take a, so its own pull does not fit.
        chosen = await embedded.node.hop(
            embedded.budget.evict, 10 * MB, Protection(), "embedded", partial=True
        )
        assert a.revision not in chosen.revisions
        with pytest.raises(CacheFull):
            await embedded.ensure(b.ref)
        assert service.node.store.has_snapshot(a.revision)
    finally:
        await embedded.aclose()
        await service.close()


def test_the_daemon_and_the_command_line_keep_list_and_remove_a_schedule(tmp_path: Path) -> None:
    a = publish_model(tmp_path, "a", 200_000, 1)
    cache, sock = tmp_path / "cache", tmp_path / "d.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTCACHE_")}

    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "weightcache", *args, "--socket", str(sock)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    with Daemon(cache, sock, env):
        raw = cli(
            "prefetch", a.ref, "--every", "0 9 * * 1-5", "--lead", "15m", "--hold", "2h",
            "--tz", "Europe/Berlin", "--json",
        )  # fmt: skip
        doc = json.loads(raw)
        sched = doc["schedule"]
        assert doc["created"] is True and sched["tz"] == "Europe/Berlin"
        assert sched["lead_s"] == 900 and sched["hold_s"] == 7200
        assert doc["job"]["schedule"] == sched["id"] and doc["job"]["deadline"] == sched["peak"]
        again = json.loads(
            cli("prefetch", a.ref, "--every", "0  9 * * 1-5", "--tz", "Europe/Berlin", "--json")
        )
        assert again["created"] is False and again["schedule"]["id"] == sched["id"]
        listing = cli("jobs")
        assert sched["id"] in listing and "0 9 * * 1-5" in listing
        assert "pins" in cli("status")
        assert "forecast over the last" in cli("forecast")
        removed = cli("jobs", "--remove", sched["id"])
        assert f"removed schedule {sched['id']}" in removed
        status, body = call(sock, "GET", "/v1/schedules")
        assert status == 200 and body == {"schedules": []}
        status, body = call(sock, "GET", f"/v1/jobs/{doc['job']['id']}")
        assert status == 404  # its pending occurrence went with it
