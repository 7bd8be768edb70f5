"""The daemon's facade in-process over a file:// origin: single-flight, leases, eviction, jobs."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from weightcache.config import Config, load_config
from weightcache.errors import ModelLeased, NotFound, Overloaded, TooManyLeases
from weightcache.publish import publish
from weightcache.refs import parse_ref
from weightcache.service import Service

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


async def running(cfg: Config) -> Service:
    service = Service(cfg)
    await service.start()
    return service


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
    service = await running(config(tmp_path))
    try:
        held = await service.ensure(ref, pid=proc.pid)
        assert held.lease is not None
        deadline = time.monotonic() + 10
        while service.leased_revisions() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert service.leased_revisions() == set()
    finally:
        await service.close()


async def test_overloaded_when_the_queue_is_full(tmp_path: Path) -> None:
    ref = make_model(tmp_path, "m", 2 * MB, 4)
    other = make_model(tmp_path, "other", 1000, 9)
    service = await running(
        config(
            tmp_path, WEIGHTCACHE_DAEMON_MAX_PENDING="1", WEIGHTCACHE_FETCH_MAX_BYTES_PER_S="1MiB"
        )
    )
    try:
        first = asyncio.create_task(service.ensure(ref))
        await asyncio.sleep(0.05)
        joined = asyncio.create_task(service.ensure(ref))  # joining a running pull: admitted
        with pytest.raises(Overloaded) as info:
            await service.ensure(other)  # a second distinct pull: over max_pending=1
        assert info.value.retry_after_s >= 1 and info.value.http_status == 503
        assert (await joined).coalesced
        await first
        await service.ensure(other)  # the queue drained: admitted again
    finally:
        await service.close()


async def test_scheduled_prefetch_runs_and_survives_restart(tmp_path: Path) -> None:
    ref = make_model(tmp_path, "m", MB, 5)
    cfg = config(tmp_path, WEIGHTCACHE_DAEMON_PREFETCH_SPREAD_S="0.5")
    service = await running(cfg)
    at = time.time() + 0.3
    try:
        job, created = await service.prefetch(ref, at=at, deadline=at + 30)
        again, created_again = await service.prefetch(ref, at=at, deadline=at + 30)
        assert created and not created_again and again.id == job.id  # idempotent
        assert at <= job.start_after <= at + 0.5
        later, _ = await service.prefetch(ref, at=time.time() + 3600)
        deadline = time.monotonic() + 15
        while service.job(job.id).state != "done" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        done = service.job(job.id)
        assert done.state == "done" and not done.late and done.revision
        assert done.finished is not None and done.finished <= at + 30
        assert service.node.store.has_snapshot(done.revision)
    finally:
        await service.close()

    restarted = await running(cfg)
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
    service = await running(cfg)
    pull = asyncio.create_task(service.ensure(ref))
    while not service._pulls or next(iter(service._pulls.values())).done_bytes < MB:
        await asyncio.sleep(0.02)
    await service.close()  # the grace period is shorter than the pull
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
    service = await running(config(tmp_path, WEIGHTCACHE_FETCH_MAX_BYTES_PER_S="1KiB"))
    try:
        first, created = await service.prefetch(ref)
        second, created_again = await service.prefetch(ref)
        assert created and not created_again and second.id == first.id
        deadline = time.monotonic() + 15
        while service.job(first.id).state != "done" and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert service.job(first.id).state == "done"
        third, created_third = await service.prefetch(ref)
        assert created_third and third.id != first.id
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
