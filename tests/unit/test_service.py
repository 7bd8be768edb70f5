"""The daemon's facade in-process over a file:// origin: single-flight, leases, eviction, jobs.

Time-dependent behaviour (reaping, TTLs, jobs at a time, the rate limit) runs on
a :class:`~tests.support.clocks.ManualClock` the test advances; a pull that must
stay in progress is held at a :class:`~tests.support.gates.GatedOrigin`, never
by sleeping. The LeaseTable's decisions are tested directly at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.clocks import ManualClock, eventually
from tests.support.gates import GatedOrigin, wrap_origins
from tests.support.published import files_intact, publish_model
from weightcache.budget import Protection
from weightcache.config import Config, load_config
from weightcache.errors import ModelLeased, NotFound, Overloaded, TooManyLeases
from weightcache.leases import Lease, LeaseTable
from weightcache.origin.base import Origin
from weightcache.publish import publish
from weightcache.refs import Ref, parse_ref
from weightcache.scheduler import Priority
from weightcache.service import REAP_INTERVAL_S, RESOLVE_TTL_S, Service
from weightcache.store import Store

MB = 1_000_000


def make_model(root: Path, name: str, size: int, seed: int) -> str:
    src = root / "src" / name
    src.mkdir(parents=True)
    (src / "weights.bin").write_bytes(random.Random(seed).randbytes(size))
    ref = f"file://{root}/origin/{name}"
    publish(src, parse_ref(ref), load_config(env={"WEIGHTCACHE_PUBLISH_CHUNK_BYTES": "256KiB"}))
    return ref


def config(root: Path, **env: str) -> Config:
    return load_config(
        env={
            "WEIGHTCACHE_CACHE_DIR": str(root / "cache"),
            "WEIGHTCACHE_CACHE_RESERVE_BYTES": "0",
            **env,
        }
    )


async def running(cfg: Config, clock: ManualClock | None = None) -> Service:
    """A started service; with ``clock``, its time (monotonic and wall) is the test's."""
    service = Service(cfg, clock=clock, wall=clock.wall) if clock else Service(cfg)
    await service.start()
    return service


def gate_models(monkeypatch: pytest.MonkeyPatch, *names: str) -> dict[str, GatedOrigin]:
    """Stall every ranged read of the named models (their origins, once opened, by name)."""
    gates: dict[str, GatedOrigin] = {}

    def wrap(ref: Ref, origin: Origin) -> Origin:
        name = ref.location.rstrip("/").rpartition("/")[2]
        if name not in names:
            return origin
        gates[name] = GatedOrigin(origin)
        return gates[name]

    wrap_origins(monkeypatch, wrap)
    return gates


async def pull_rows(service: Service) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = (await service.status())["pulls"]
    return rows


async def until_waiters(service: Service, n: int) -> None:
    """Wait until the one running pull has ``n`` requests waiting on it."""
    deadline = time.monotonic() + 10
    while [p["waiters"] for p in await pull_rows(service)] != [n]:
        assert time.monotonic() < deadline, f"no pull with {n} waiters"
        await asyncio.sleep(0.01)


async def until_waiters_of(service: Service, revision: str, n: int) -> None:
    """Wait until the pull of ``revision`` has ``n`` requests waiting on it."""
    deadline = time.monotonic() + 10
    while [p["waiters"] for p in await pull_rows(service) if p["revision"] == revision] != [n]:
        assert time.monotonic() < deadline, f"no pull of {revision[:16]} with {n} waiters"
        await asyncio.sleep(0.01)


async def lease_records(service: Service) -> list[tuple[str, dict[str, Any]]]:
    return await service.hop(lambda: list(service.node.index.items("lease")))


async def settled_lease_records(
    service: Service, timeout_s: float = 10.0
) -> list[tuple[str, dict[str, Any]]]:
    """The persisted leases once the writes in flight are done (or what is left then)."""
    deadline = time.monotonic() + timeout_s
    while (records := await lease_records(service)) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return records


async def test_concurrent_ensures_share_one_pull(tmp_path: Path) -> None:
    ref = make_model(tmp_path, "m", 3 * MB, 1)
    service = await running(config(tmp_path))
    try:
        results = await asyncio.gather(*[service.ensure(ref, pid=None) for _ in range(20)])
        assert sum(r.ensured.origin_bytes for r in results) == 3 * MB
        assert len({r.ensured.revision for r in results}) == 1
        status = await service.status()
        c = status["counters"]
        assert c["misses"] == 1 and c["coalesced"] + c["hits"] == 19
        assert c["origin_bytes"] == 3 * MB
        again = await service.ensure(ref)
        assert again.ensured.cache_hit and again.source == "cache"
    finally:
        await service.close()


async def test_budget_evicts_lru_unleased_never_leased(tmp_path: Path) -> None:
    refs = [make_model(tmp_path, f"m{i}", 2 * MB, i) for i in range(4)]
    cfg = config(tmp_path, WEIGHTCACHE_CACHE_MAX_BYTES=str(5 * MB))  # room for two models
    service = await running(cfg)
    try:
        a = await service.ensure(refs[0], pid=os.getpid())  # leased by this live process
        b = await service.ensure(refs[1], lease=False)
        await service.ensure(refs[2], lease=False)  # needs room: b (unleased) goes, a stays
        store = service.node.store
        assert store.has_snapshot(a.ensured.revision)
        assert not store.has_snapshot(b.ensured.revision)
        assert store.blob_bytes() <= 5 * MB
        await service.ensure(refs[3], lease=False)  # the third model goes, the leased stays
        assert store.has_snapshot(a.ensured.revision)
        assert store.blob_bytes() <= 5 * MB
        status = await service.status()
        assert status["counters"]["evictions"] == 2
        assert [m["leases"] for m in status["models"] if m["revision"] == a.ensured.revision] == [1]
    finally:
        await service.close()


async def test_evict_refuses_leased_unless_forced(tmp_path: Path) -> None:
    ref = make_model(tmp_path, "m", MB, 2)
    service = await running(config(tmp_path))
    try:
        held = await service.ensure(ref, pid=os.getpid())
        with pytest.raises(ModelLeased) as info:
            await service.evict(ref)
        assert info.value.http_status == 409
        assert service.node.store.has_snapshot(held.ensured.revision)
        out = await service.evict(ref, force=True)
        assert out["freed_bytes"] == MB and out["forced"]
        assert not service.node.store.has_snapshot(held.ensured.revision)
        assert os.listdir(service.node.store.blobs) == []
        with pytest.raises(NotFound):
            await service.release_lease(held.lease.id if held.lease else "")
    finally:
        await service.close()


async def test_evict_refuses_a_pinned_model_unless_forced_and_force_releases_the_pin(
    tmp_path: Path,
) -> None:
    ref = make_model(tmp_path, "m", MB, 2)
    clock = ManualClock()
    service = await running(config(tmp_path, WEIGHTCACHE_DAEMON_PREFETCH_SPREAD_S="0"), clock)
    try:
        # Hourly, started 10 minutes ahead: the next hour's job starts within the hour.
        schedule, _ = await service.add_schedule(ref, "0 * * * *", lead_s=3600, hold_s=3600)
        job = service.job(schedule.job or "")
        await clock.advance(max(0.0, job.start_after - clock.wall()) + 0.01)
        await eventually(lambda: service.job(job.id).state == "done", what="the job")
        rev = service.job(job.id).revision or ""
        assert service.node.store.has_snapshot(rev)
        with pytest.raises(ModelLeased) as info:
            await service.evict(ref)
        assert info.value.facts["schedules"] == [schedule.id] and "pinned" in info.value.message
        # The budget refuses it on its own as well (what an embedded process meets).
        with pytest.raises(ModelLeased, match="pinned"):
            await service.hop(service.budget.evict_revision, rev, Protection())
        out = await service.evict(ref, force=True)
        assert out["forced"] and not service.node.store.has_snapshot(rev)
        assert service.prefetching.schedules_book.pins == {}
        assert not await service.hop(lambda: list(service.node.index.items("pin")))
    finally:
        await service.close()


async def test_cold_ensures_inside_a_schedules_window_are_counted(tmp_path: Path) -> None:
    ref = make_model(tmp_path, "m", MB, 3)
    clock = ManualClock()  # wall 1_800_000_000: 2027-01-15 08:00 UTC
    service = await running(config(tmp_path), clock)
    try:
        # Peaks at 07:00 (passed, held until 09:00) and 08:00 (now, held until 10:00).
        schedule, _ = await service.add_schedule(ref, "0 * * * *", lead_s=600, hold_s=2 * 3600)
        await service.ensure(ref, lease=False)  # cold: inside the window
        await service.ensure(ref, lease=False)  # warm: not a miss
        assert service.prefetching.window_misses == {schedule.id: 1}
        other, _ = await service.add_schedule(ref, "30 20 * * *", lead_s=600, hold_s=60)
        await service.evict(ref)
        await service.ensure(ref, lease=False)  # cold again: only the hourly window
        assert service.prefetching.window_misses == {schedule.id: 2}
        status = await service.status()
        rows = {r["id"]: r for r in status["prefetch"]["schedules"]}
        assert rows[schedule.id]["window_misses"] == 2 and rows[other.id]["window_misses"] == 0
    finally:
        await service.close()


async def test_leases_are_renewed_bounded_and_released(tmp_path: Path) -> None:
    refs = [make_model(tmp_path, f"m{i}", 1000, i) for i in range(3)]
    service = await running(config(tmp_path, WEIGHTCACHE_DAEMON_MAX_LEASES_PER_CLIENT="2"))
    try:
        first = await service.ensure(refs[0], pid=os.getpid())
        again = await service.ensure(refs[0], pid=os.getpid())
        assert first.lease and again.lease and first.lease.id == again.lease.id
        await service.ensure(refs[1], pid=os.getpid())
        with pytest.raises(TooManyLeases):
            await service.ensure(refs[2], pid=os.getpid())
        await service.release_lease(first.lease.id)  # one of its two holders
        with pytest.raises(TooManyLeases):
            await service.ensure(refs[2], pid=os.getpid())
        await service.release_lease(first.lease.id)  # the last holder: the lease ends
        await service.ensure(refs[2], pid=os.getpid())
    finally:
        await service.close()


async def test_leases_of_dead_processes_end(tmp_path: Path) -> None:
    ref = make_model(tmp_path, "m", 1000, 3)
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()  # a pid that no longer runs
    clock = ManualClock()
    service = await running(config(tmp_path), clock)
    try:
        held = await service.ensure(ref, pid=proc.pid)
        assert held.lease is not None
        assert service.leased_revisions() == {held.ensured.revision}  # until the reaper looks
        await clock.advance(REAP_INTERVAL_S)
        await eventually(lambda: not service.leased_revisions(), what="the reaper")
        assert service.leased_revisions() == set()
        assert await settled_lease_records(service) == []
    finally:
        await service.close()


async def test_leases_expire_after_their_ttl(tmp_path: Path) -> None:
    ref = make_model(tmp_path, "m", 1000, 13)
    clock = ManualClock()
    service = await running(config(tmp_path, WEIGHTCACHE_DAEMON_LEASE_TTL_S="60"), clock)
    try:
        held = await service.ensure(ref, pid=os.getpid())  # a live process: only the TTL ends it
        assert held.lease is not None and held.lease.expires == clock.wall() + 60
        rev = held.ensured.revision
        await clock.advance(30.0)
        renewed = await service.ensure(ref, pid=os.getpid())  # the same owner: renewed
        assert renewed.lease is not None and renewed.lease.id == held.lease.id
        assert renewed.lease.expires == clock.wall() + 60
        await clock.advance(40.0)  # past the first expiry, before the renewed one
        assert service.leased_revisions() == {rev}
        await clock.advance(20.0 + REAP_INTERVAL_S)
        await eventually(lambda: not service.leased_revisions(), what="the lease to expire")
        assert [m["leases"] for m in (await service.status())["models"]] == [0]
    finally:
        await service.close()


async def test_overloaded_when_the_queue_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = make_model(tmp_path, "m", 2 * MB, 4)
    other = make_model(tmp_path, "other", 1000, 9)
    gates = gate_models(monkeypatch, "m")
    service = await running(
        config(
            tmp_path,
            WEIGHTCACHE_DAEMON_MAX_PENDING="1",
            # more slots than m has chunks: other's manifest read is not held up
            WEIGHTCACHE_FETCH_CONCURRENCY="16",
        )
    )
    try:
        first = asyncio.create_task(service.ensure(ref))
        await eventually(lambda: "m" in gates and gates["m"].blocked > 0, what="m's pull")
        joined = asyncio.create_task(service.ensure(ref))  # joining a running pull: admitted
        await until_waiters(service, 2)
        with pytest.raises(Overloaded) as info:
            await service.ensure(other)  # a second distinct pull: over max_pending=1
        assert info.value.retry_after_s >= 1 and info.value.http_status == 503
        gates["m"].open()
        assert (await joined).coalesced
        await first
        await service.ensure(other)  # the queue drained: admitted again
    finally:
        for gate in gates.values():
            gate.open()
        await service.close()


async def test_scheduled_prefetch_runs_and_survives_restart(tmp_path: Path) -> None:
    ref = make_model(tmp_path, "m", MB, 5)
    cfg = config(tmp_path, WEIGHTCACHE_DAEMON_PREFETCH_SPREAD_S="0.5")
    clock = ManualClock()
    service = await running(cfg, clock)
    at = clock.wall() + 0.3
    try:
        job, created = await service.prefetch(ref, at=at, deadline=at + 30)
        again, created_again = await service.prefetch(ref, at=at, deadline=at + 30)
        assert created and not created_again and again.id == job.id  # idempotent
        assert at <= job.start_after <= at + 0.5
        later, _ = await service.prefetch(ref, at=clock.wall() + 3600)
        await clock.advance(job.start_after - clock.wall() - 0.01)
        await asyncio.sleep(0.05)  # the scheduler had its chance: not yet
        assert service.job(job.id).state == "scheduled"
        assert not service.node.store.snapshot_revisions()
        await clock.advance(0.02)
        await eventually(lambda: service.job(job.id).state == "done", what="the job")
        done = service.job(job.id)
        assert done.state == "done" and not done.late and done.revision
        assert done.finished is not None and done.finished <= at + 30
        assert service.node.store.has_snapshot(done.revision)
    finally:
        await service.close()

    restarted = await running(cfg, clock)
    try:
        assert restarted.job(job.id).state == "done"
        assert restarted.job(later.id).state == "scheduled"
        with pytest.raises(NotFound):
            restarted.job("nope")
    finally:
        await restarted.close()


async def test_status_is_json_ready(tmp_path: Path) -> None:
    import json

    ref = make_model(tmp_path, "m", 1000, 6)
    service = await running(config(tmp_path))
    try:
        await service.ensure(ref)
        doc: dict[str, Any] = await service.status()
        json.dumps(doc)
        assert doc["disk"]["used_bytes"] == 1000
        assert doc["models"][0]["state"] == "cached"
        assert service.health()["ready"]
    finally:
        await service.close()
    assert not service.health()["ready"]


async def test_a_pull_stopped_by_shutdown_resumes_after_restart(tmp_path: Path) -> None:
    ref = make_model(tmp_path, "m", 3 * MB, 7)
    cfg = config(
        tmp_path,
        WEIGHTCACHE_FETCH_MAX_BYTES_PER_S="1MiB",
        WEIGHTCACHE_FETCH_CONCURRENCY="2",
        WEIGHTCACHE_DAEMON_SHUTDOWN_TIMEOUT_S="0.2",
    )
    clock = ManualClock()  # the rate limit's time: the pull moves only when the test says
    service = await running(cfg, clock)
    pull = asyncio.create_task(service.ensure(ref))
    for _ in range(1000):
        if service._pulls and next(iter(service._pulls.values())).done_bytes >= MB:
            break
        await clock.advance(0.05)
        await asyncio.sleep(0.01)
    await service.close()  # the grace period is shorter than the pull: time stands still
    assert pull.done() and not service.node.store.snapshot_revisions()

    restarted = Service(
        load_config(
            env={
                "WEIGHTCACHE_CACHE_DIR": str(tmp_path / "cache"),
                "WEIGHTCACHE_CACHE_RESERVE_BYTES": "0",
            }
        )
    )
    await restarted.start()
    try:
        deadline = time.monotonic() + 20
        while not restarted.node.store.snapshot_revisions() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(restarted.node.store.snapshot_revisions()) == 1
        status = await restarted.status()
        # Only what the first run had not verified came from the origin again.
        assert 0 < status["counters"]["origin_bytes"] <= 2 * MB + 2 * 256 * 1024
    finally:
        await restarted.close()


async def test_prefetch_now_is_idempotent_only_while_pending(tmp_path: Path) -> None:
    ref = make_model(tmp_path, "m", 1000, 8)
    clock = ManualClock()
    service = await running(config(tmp_path, WEIGHTCACHE_FETCH_MAX_BYTES_PER_S="1KiB"), clock)
    try:
        first, created = await service.prefetch(ref)
        second, created_again = await service.prefetch(ref)
        assert created and not created_again and second.id == first.id
        await eventually(lambda: service.job(first.id).state == "done", what="the job")
        assert service.job(first.id).state == "done"
        await clock.advance(1.0)
        third, created_third = await service.prefetch(ref)
        assert created_third and third.id != first.id
    finally:
        await service.close()


async def test_now_prefetches_at_the_same_wall_time_are_distinct_jobs(tmp_path: Path) -> None:
    # The wall clock does not move: a second "now" prefetch after the first finished
    # must be a new job, never overwrite the finished one's record.
    ref = make_model(tmp_path, "m", 1000, 9)
    service = await running(config(tmp_path), ManualClock())
    try:
        first, _ = await service.prefetch(ref)
        await eventually(lambda: service.job(first.id).state == "done", what="the job")
        second, created = await service.prefetch(ref)
        assert created and second.id != first.id
        assert service.job(first.id).state == "done"
    finally:
        await service.close()


async def test_evict_matches_short_revisions_only_within_the_location(tmp_path: Path) -> None:
    a = make_model(tmp_path, "a", 1000, 10)
    b = make_model(tmp_path, "b", 1000, 11)
    service = await running(config(tmp_path))
    try:
        rev_a = (await service.ensure(a, lease=False)).ensured.revision
        await service.ensure(b, lease=False)
        from weightcache.errors import ModelNotFound

        with pytest.raises(ModelNotFound):
            await service.evict(f"{b}@{rev_a[:8]}")
        assert service.node.store.has_snapshot(rev_a)
        out = await service.evict(f"{a}@{rev_a[:8]}")
        assert out["revision"] == rev_a and not service.node.store.has_snapshot(rev_a)
    finally:
        await service.close()


async def test_a_corrupt_cached_manifest_does_not_break_status(tmp_path: Path) -> None:
    ref = make_model(tmp_path, "m", 1000, 12)
    service = await running(config(tmp_path))
    try:
        rev = (await service.ensure(ref, lease=False)).ensured.revision
        path = service.node.store.manifest_path(rev)
        os.chmod(path, 0o644)
        path.write_bytes(path.read_bytes().replace(b'"format"', b'"formaT"'))
        doc = await service.status()
        assert [m["state"] for m in doc["models"]] == ["corrupt"]
    finally:
        await service.close()


# -- a snapshot is a hit only with every blob ------------------------------------------


async def test_a_snapshot_missing_a_blob_is_pulled_again_not_served(tmp_path: Path) -> None:
    m = publish_model(tmp_path, "m", MB, 14, extra={"config.json": b'{"layers": 2}'})
    service = await running(config(tmp_path))
    store = service.node.store
    try:
        first = await service.ensure(m.ref, lease=False)
        # a power loss after the snapshot came back, before its blob did: a dangling link
        weights = next(f for f in m.manifest.files if f.path == "weights.bin")
        await service.hop(os.unlink, store.blob_path(weights.blake3))
        assert store.has_snapshot(m.revision)
        again = await service.ensure(m.ref, pid=os.getpid())
        assert not again.ensured.cache_hit and again.source == "origin"
        assert again.ensured.origin_bytes == weights.size  # only the missing blob
        assert again.ensured.snapshot == first.ensured.snapshot
        assert store.has_blob(weights.blake3, weights.size)
        files = [(f.local_path, f.blake3) for f in again.ensured.files]
        assert await service.hop(files_intact, files) == []
        assert (await service.ensure(m.ref, lease=False)).ensured.cache_hit
    finally:
        await service.close()


# -- the event loop and the thread pools ------------------------------------------------


async def test_the_event_loop_is_never_blocked_by_a_pull(tmp_path: Path) -> None:
    a = publish_model(tmp_path, "a", 4 * MB, 15, extra={f"f{i}.json": b"{}" * i for i in range(20)})
    b = publish_model(tmp_path, "b", 4 * MB, 16)
    beats: list[float] = []
    stop = asyncio.Event()

    async def heartbeat() -> None:
        while not stop.is_set():
            beats.append(time.perf_counter())
            await asyncio.sleep(0.01)

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0)  # beating
    started = time.perf_counter()
    service = await running(config(tmp_path))
    try:
        await service.ensure(a.ref)  # unpinned: the origin's manifest, then a pull
        hit = await service.ensure(a.at(a.revision[:12]))  # a short @REV, matched locally
        assert hit.ensured.cache_hit and hit.ensured.revision == a.revision
        cold = await service.ensure(b.at(b.revision[:12]))  # a short @REV from the origin
        assert not cold.ensured.cache_hit and cold.ensured.origin_bytes == 4 * MB
        await service.status()
        ended = time.perf_counter()
    finally:
        stop.set()
        await beat
        await service.close()
    # The pulls' time is in threads; the loop only schedules: from start to end, it
    # never went 100 ms without running the heartbeat.
    marks = [started, *(t for t in beats if started < t < ended), ended]
    gaps = [later - earlier for earlier, later in itertools.pairwise(marks)]
    assert max(gaps) < 0.1, sorted(gaps)[-5:]


async def test_a_warm_ensure_answers_while_another_pull_stalls_every_transfer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = publish_model(tmp_path, "a", MB, 17)
    b = publish_model(tmp_path, "b", 2 * MB, 18)
    gates = gate_models(monkeypatch, "b")
    service = await running(config(tmp_path, WEIGHTCACHE_FETCH_CONCURRENCY="2"))
    pull_b = None
    try:
        await service.ensure(a.ref, lease=False)
        pull_b = asyncio.create_task(service.ensure(b.ref, lease=False))
        await eventually(lambda: "b" in gates and gates["b"].blocked == 2, what="b to stall")
        assert service.node.slots.in_use == service.node.slots.capacity == 2
        warm = await asyncio.wait_for(service.ensure(a.at()), 2.0)
        assert warm.ensured.cache_hit and warm.lease is not None
        files = [(f.local_path, f.blake3) for f in warm.ensured.files]
        assert await asyncio.wait_for(service.hop(files_intact, files), 2.0) == []
        assert not pull_b.done() and gates["b"].blocked == 2
        gates["b"].open()
        done = await pull_b
        assert done.ensured.origin_bytes == 2 * MB
    finally:
        for gate in gates.values():
            gate.open()
        if pull_b is not None:
            await asyncio.gather(pull_b, return_exceptions=True)
        await service.close()


async def test_a_warm_unpinned_ensure_does_not_queue_behind_stalled_transfers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = publish_model(tmp_path, "a", MB, 19)
    b = publish_model(tmp_path, "b", 2 * MB, 20)
    gates = gate_models(monkeypatch, "b")
    clock = ManualClock()
    service = await running(config(tmp_path, WEIGHTCACHE_FETCH_CONCURRENCY="2"), clock)
    pull_b = None
    try:
        await service.ensure(a.ref, lease=False)
        pull_b = asyncio.create_task(service.ensure(b.ref, lease=False))
        await eventually(lambda: "b" in gates and gates["b"].blocked == 2, what="b to stall")
        await clock.advance(RESOLVE_TTL_S + 1)  # a's latest revision must be read again
        warm = await asyncio.wait_for(service.ensure(a.ref), 2.0)
        assert warm.ensured.cache_hit
    finally:
        for gate in gates.values():
            gate.open()
        if pull_b is not None:
            await asyncio.gather(pull_b, return_exceptions=True)
        await service.close()


# -- leases: cancellation and coalesced waiters -------------------------------------------


async def test_an_ensure_cancelled_while_its_lease_is_saved_leaves_no_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = publish_model(tmp_path, "m", 1000, 21)
    service = await running(config(tmp_path))
    try:
        await service.ensure(m.ref, lease=False)
        index = service.node.index
        real_put = index.put
        saving, proceed = threading.Event(), threading.Event()

        def put(key: tuple[str, str], value: dict[str, Any]) -> None:
            if key[0] == "lease":
                saving.set()
                proceed.wait(10)
            real_put(key, value)

        monkeypatch.setattr(index, "put", put)
        task = asyncio.create_task(service.ensure(m.ref, pid=os.getpid()))
        await eventually(saving.is_set, what="the lease to be persisted")
        assert len(service.leases) == 1  # granted, its record on its way to the index
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(service.leases) == 0 and service.leased_revisions() == set()
        proceed.set()
        assert await settled_lease_records(service) == []
        await eventually(lambda: not service.uses.held(), what="the use to be released")
        assert [x["leases"] for x in (await service.status())["models"]] == [0]
    finally:
        await service.close()


async def test_coalesced_waiters_stay_protected_until_each_holds_its_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = publish_model(tmp_path, "m", MB, 22)
    gates = gate_models(monkeypatch, "m")
    service = await running(config(tmp_path))
    store = service.node.store
    index = service.node.index
    real_put = index.put
    saving, proceed = threading.Event(), threading.Event()

    def put(key: tuple[str, str], value: dict[str, Any]) -> None:
        if key[0] == "lease" and value.get("client") == "worker":
            saving.set()
            proceed.wait(10)
        real_put(key, value)

    monkeypatch.setattr(index, "put", put)
    try:
        prefetch = asyncio.create_task(service.ensure(m.ref, lease=False))
        await eventually(lambda: "m" in gates and gates["m"].blocked > 0, what="the pull")
        worker = asyncio.create_task(service.ensure(m.ref, client="worker"))
        await until_waiters(service, 2)
        gates["m"].open()
        first = await prefetch  # the first waiter is done and holds nothing
        assert first.lease is None
        await eventually(saving.is_set, what="the worker's lease to be persisted")
        # Neither the pull nor a lease record protects the revision now; the worker's
        # use does. An eviction of another process (which sees no daemon memory) spares it.
        assert m.revision in await service.hop(service.uses.busy)
        plan = await service.hop(
            service.budget.evict, 100 * MB, Protection(), "another process", partial=True
        )
        assert m.revision not in plan.revisions and plan.blobs == ()
        assert store.has_snapshot(m.revision)
        proceed.set()
        second = await worker
        assert second.coalesced and second.lease is not None
        files = [(f.local_path, f.blake3) for f in second.ensured.files]
        assert await service.hop(files_intact, files) == []
    finally:
        proceed.set()
        for gate in gates.values():
            gate.open()
        await service.close()


# -- priorities ------------------------------------------------------------------------


async def test_a_worker_joining_a_background_pull_raises_its_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = publish_model(tmp_path, "m", MB, 23)
    gates = gate_models(monkeypatch, "m")
    service = await running(config(tmp_path))
    try:
        background = asyncio.create_task(
            service.ensure(m.ref, priority=Priority.BACKGROUND, lease=False)
        )
        await eventually(lambda: "m" in gates and gates["m"].blocked > 0, what="the pull")
        assert [p["priority"] for p in await pull_rows(service)] == ["background"]
        admin = asyncio.create_task(service.ensure(m.ref, priority=Priority.ADMIN, lease=False))
        await until_waiters(service, 2)
        assert [p["priority"] for p in await pull_rows(service)] == ["admin"]
        worker = asyncio.create_task(service.ensure(m.ref, priority=Priority.WORKER))
        await until_waiters(service, 3)
        assert [p["priority"] for p in await pull_rows(service)] == ["worker"]
        late = asyncio.create_task(service.ensure(m.ref, priority=Priority.BACKGROUND))
        await until_waiters(service, 4)
        assert [p["priority"] for p in await pull_rows(service)] == ["worker"]  # never lowered
        gates["m"].open()
        results = await asyncio.gather(background, admin, worker, late)
        assert [r.coalesced for r in results] == [False, True, True, True]
    finally:
        for gate in gates.values():
            gate.open()
        await service.close()


async def test_a_raised_pull_goes_ahead_of_less_urgent_pulls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = publish_model(tmp_path, "x", MB, 24)  # 4 chunks
    y = publish_model(tmp_path, "y", 600_000, 25)  # 3 chunks
    order: list[str] = []
    gates: dict[str, GatedOrigin] = {}

    def wrap(ref: Ref, origin: Origin) -> Origin:
        name = ref.location.rpartition("/")[2]
        gates[name] = GatedOrigin(origin)
        if name != "x":
            gates[name].open()
        inner_open = gates[name].open_range

        def open_range(key: str, offset: int, length: int) -> Any:
            order.append(name)
            return inner_open(key, offset, length)

        gates[name].open_range = open_range  # type: ignore[method-assign]
        return gates[name]

    wrap_origins(monkeypatch, wrap)
    service = await running(config(tmp_path, WEIGHTCACHE_FETCH_CONCURRENCY="1"))
    try:
        for model in (x, y):  # manifests cached: the pinned refs below need no origin slot
            await service.node.resolve(service.node.parse(model.ref))
        slots = service.node.slots
        background = asyncio.create_task(
            service.ensure(x.at(), priority=Priority.BACKGROUND, lease=False)
        )
        await eventually(lambda: gates["x"].blocked == 1 and slots.waiting == 3, what="x")
        admin = asyncio.create_task(service.ensure(y.at(), priority=Priority.ADMIN, lease=False))
        await eventually(lambda: slots.waiting == 6, what="y to queue")
        worker = asyncio.create_task(service.ensure(x.at(), priority=Priority.WORKER))
        await until_waiters_of(service, x.revision, 2)
        gates["x"].open()
        await asyncio.gather(background, admin, worker)
        # x's first chunk was under way; its other chunks now go at worker priority
        assert order == ["x"] * 4 + ["y"] * 3, order
    finally:
        for gate in gates.values():
            gate.open()
        await service.close()


# -- counters and status ------------------------------------------------------------------


async def test_origin_bytes_count_while_the_pull_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = publish_model(tmp_path, "m", 2 * MB, 26)  # 8 chunks of 256 KiB
    chunk = 256 * 1024
    gated: list[GatedOrigin] = []

    def wrap(ref: Ref, origin: Origin) -> Origin:
        gated.append(GatedOrigin(origin, pass_first=2))  # two chunks arrive, then it stalls
        return gated[-1]

    wrap_origins(monkeypatch, wrap)
    service = await running(config(tmp_path, WEIGHTCACHE_FETCH_CONCURRENCY="2"))
    try:
        pull = asyncio.create_task(service.ensure(m.ref, lease=False))
        await eventually(lambda: gated and gated[0].blocked == 2, what="the stall")
        deadline = time.monotonic() + 10
        while (status := await service.status())["counters"]["origin_bytes"] < 2 * chunk:
            assert time.monotonic() < deadline, status["counters"]
            await asyncio.sleep(0.01)
        assert status["counters"]["origin_bytes"] == 2 * chunk
        assert [p["revision"] for p in status["pulls"]] == [m.revision]  # still running
        gated[0].open()
        await pull
        status = await service.status()
        assert status["counters"]["origin_bytes"] == 2 * MB and status["pulls"] == []
    finally:
        for gate in gated:
            gate.open()
        await service.close()


async def test_status_does_not_reload_manifests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = [publish_model(tmp_path, f"m{i}", 1000, 30 + i) for i in range(3)]
    loads: list[str] = []
    real = Store.load_manifest

    def counting(self: Store, rev: str) -> Any:
        loads.append(rev)
        return real(self, rev)

    monkeypatch.setattr(Store, "load_manifest", counting)
    service = await running(config(tmp_path))
    try:
        for model in models:
            await service.ensure(model.ref, lease=False)
        first = await service.status()
        assert sorted(row["revision"] for row in first["models"]) == sorted(
            model.revision for model in models
        )
        before = len(loads)
        for _ in range(3):
            again = await service.status()
            assert again["models"] == first["models"]
        assert len(loads) == before  # the cache did not change: no manifest read again
    finally:
        await service.close()


# -- the lease table -------------------------------------------------------------------------

A = "a" * 64
B = "b" * 64
C = "c" * 64
D = "d" * 64


def test_a_lease_is_renewed_for_its_owner() -> None:
    table = LeaseTable(ttl_s=60, max_per_client=4)
    first = table.grant(A, 100.0, pid=1, client=None)
    again = table.grant(A, 130.0, pid=1, client=None)
    assert again is first and first.holders == 2
    assert first.created == 100.0 and first.expires == 190.0
    other_pid = table.grant(A, 130.0, pid=2, client=None)
    tcp_peer = table.grant(A, 130.0, pid=None, client="10.0.0.7:4100")
    assert len({first.id, other_pid.id, tcp_peer.id}) == 3
    assert table.count(A) == 3 and table.revisions() == {A}
    assert sorted(x.owner or "" for x in table.of(A)) == ["10.0.0.7:4100", "pid:1", "pid:2"]


def test_leases_per_owner_are_bounded_but_renewals_are_not() -> None:
    table = LeaseTable(ttl_s=60, max_per_client=2)
    table.grant(A, 0.0, pid=1, client=None)
    table.grant(B, 0.0, pid=1, client=None)
    with pytest.raises(TooManyLeases):
        table.grant(C, 0.0, pid=1, client=None)
    assert table.grant(A, 1.0, pid=1, client=None).holders == 2  # a renewal: allowed
    table.grant(C, 0.0, pid=2, client=None)  # another owner has its own bound
    assert len(table) == 3


def test_release_counts_holders() -> None:
    table = LeaseTable(ttl_s=60, max_per_client=4)
    lease = table.grant(A, 0.0, pid=1, client=None)
    table.grant(A, 0.0, pid=1, client=None)
    assert table.release(lease.id) is None  # one holder left
    assert table.revisions() == {A}
    assert table.release(lease.id) is lease  # the last: it ends
    assert table.revisions() == frozenset() and len(table) == 0
    with pytest.raises(NotFound):
        table.release(lease.id)


def test_reap_ends_expired_dead_and_disconnected_leases() -> None:
    alive = {1: True, 2: False}
    table = LeaseTable(ttl_s=60, max_per_client=8, alive=lambda pid: alive[pid])
    expiring = table.grant(A, 0.0, pid=1, client=None)  # expires at 60
    dead = table.grant(B, 10.0, pid=2, client=None)
    connected = [True]
    bound = table.grant(C, 10.0, pid=None, client="peer", connection=lambda: connected[0])
    kept = table.grant(D, 10.0, pid=1, client=None)
    assert bound.bound and not kept.bound
    assert table.reap(59.0) == [dead]  # a dead pid ends at once
    assert table.reap(60.0) == [expiring]  # the TTL
    assert table.reap(61.0) == []
    connected[0] = False
    assert table.reap(61.0) == [bound]  # its connection closed
    assert list(table.leases.values()) == [kept]


def test_a_lease_ends_with_its_connections_only_if_every_holder_bound_it() -> None:
    table = LeaseTable(ttl_s=60, max_per_client=8)
    one, two = [True], [True]
    lease = table.grant(A, 0.0, pid=None, client="peer", connection=lambda: one[0])
    table.grant(A, 0.0, pid=None, client="peer", connection=lambda: two[0])
    assert lease.bound and lease.holders == 2
    one[0] = False
    assert table.reap(1.0) == []  # the other connection is still open
    two[0] = False
    assert table.reap(1.0) == [lease]

    kept = table.grant(B, 0.0, pid=None, client="peer", connection=lambda: False)
    table.grant(B, 0.0, pid=None, client="peer")  # one holder asked to keep it beyond
    assert not kept.bound
    assert table.reap(1.0) == []


def test_loading_leases_drops_the_ended_and_unbinds_the_rest() -> None:
    alive = {1: True, 2: False}
    before = LeaseTable(ttl_s=60, max_per_client=8)
    live = before.grant(A, 0.0, pid=1, client=None)
    bound = before.grant(B, 0.0, pid=None, client="peer", connection=lambda: True)
    dead = before.grant(C, 0.0, pid=2, client=None)
    old = before.grant(D, -100.0, pid=1, client=None)
    records = [(x.id, x.to_json()) for x in (live, bound, dead, old)]
    after = LeaseTable(ttl_s=60, max_per_client=8, alive=lambda pid: alive[pid])
    stale = after.load(records, now=30.0)
    assert sorted(stale) == sorted([dead.id, old.id])
    assert sorted(after.leases) == sorted([live.id, bound.id])
    assert not after.leases[bound.id].bound  # its connection did not survive the restart
    assert after.reap(30.0) == []
    assert Lease.from_json(live.to_json()) == live
