"""Eviction racing pulls, hits and leases, in one daemon and across processes.

The stress test runs many ensures of a few small models into a budget that
holds about half of them, while eviction passes run alongside: the daemon's
(protecting its leases) and another process's (a :class:`Budget` of its own,
seeing the daemon only through the cache directory: revision uses and lease
records). Whatever
the interleaving: a leased result's files are there and hash right for as long
as the lease is held, the blobs never outgrow the budget, every visible
snapshot is complete, and nothing stays in use or leased afterwards.

The tests after it pin down single interleavings deterministically.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest

from tests.support.clocks import eventually
from tests.support.holders import uses_held_elsewhere
from tests.support.published import Model, cache_config, files_intact, publish_model
from weightcache.budget import Budget, Protection
from weightcache.errors import CacheFull, ModelLeased
from weightcache.locks import RevisionUses
from weightcache.service import EnsureResult, Service

KB = 1000
MODELS = 8
#: workers each making ENSURES // WORKERS ensures one after the other
WORKERS = 4
ENSURES = 60
#: one blob (a config file) shared by every model: evicting one model must keep it
SHARED = b'{"model_type": "race", "layers": 2}' * 40


def catalog(root: Path) -> list[Model]:
    return [
        publish_model(root, f"m{i}", 180 * KB + i * 7 * KB, seed=i, extra={"config.json": SHARED})
        for i in range(MODELS)
    ]


async def test_eviction_races_pulls_hits_and_leases(tmp_path: Path) -> None:
    rng = random.Random(20261207)
    models = catalog(tmp_path)
    # about four models: room for what the workers use at once, not for all eight
    budget_bytes = 1000 * KB
    cfg = cache_config(tmp_path, WEIGHTCACHE_CACHE_MAX_BYTES=str(budget_bytes))
    service = Service(cfg)
    await service.start()
    store = service.node.store
    # Another process on the node (an embedded worker making room for its own pull):
    # it sees the daemon only through the cache directory.
    foreign = Budget(cfg, store, service.node.index, RevisionUses(store.locks))
    problems: list[str] = []
    outcomes: dict[str, int] = {"leased": 0, "unleased": 0, "cache_full": 0}
    over_budget: list[int] = []
    evicted = {"daemon": 0, "foreign": 0}
    stop = asyncio.Event()

    async def check(result: EnsureResult, when: str) -> None:
        files = [(f.local_path, f.blake3) for f in result.ensured.files]
        for problem in await asyncio.to_thread(files_intact, files):
            problems.append(f"{result.ensured.ref} {when}: {problem}")

    async def worker() -> None:
        for _ in range(ENSURES // WORKERS):
            await one()
            await asyncio.sleep(rng.random() * 0.01)

    async def one() -> None:
        model = rng.choice(models)
        leased = rng.random() < 0.6
        try:
            if leased:
                result = await service.ensure(model.ref, pid=os.getpid())
            else:
                result = await service.ensure(model.ref, lease=False)
        except CacheFull:
            outcomes["cache_full"] += 1  # what is in use may pin the budget: allowed
            return
        if result.lease is None:
            outcomes["unleased"] += 1
            return
        outcomes["leased"] += 1
        await check(result, "right after the lease")
        await asyncio.sleep(rng.random() * 0.05)  # the worker reads its files meanwhile
        await check(result, "before the release")
        await service.release_lease(result.lease.id)

    async def daemon_evictions() -> None:
        # The daemon's own view: its leases, on top of what every process uses.
        while not stop.is_set():
            need = rng.randint(1, budget_bytes)
            protection = Protection(revisions=service.leases.revisions())
            plan = await service.hop(service.budget.evict, need, protection, "test", partial=True)
            evicted["daemon"] += len(plan.revisions)
            await asyncio.sleep(rng.random() * 0.03)

    async def foreign_evictions() -> None:
        while not stop.is_set():
            need = rng.randint(1, budget_bytes)
            plan = await asyncio.to_thread(
                foreign.evict, need, Protection(), "foreign", partial=True
            )
            evicted["foreign"] += len(plan.revisions)
            await asyncio.sleep(rng.random() * 0.03)

    async def sample_budget() -> None:
        while not stop.is_set():
            used = await asyncio.to_thread(store.blob_bytes)
            if used > budget_bytes:
                over_budget.append(used)
            await asyncio.sleep(0.01)

    background = [
        asyncio.create_task(daemon_evictions()),
        asyncio.create_task(foreign_evictions()),
        asyncio.create_task(sample_budget()),
    ]
    try:
        results = await asyncio.gather(*[worker() for _ in range(WORKERS)], return_exceptions=True)
        stop.set()
        errors = await asyncio.gather(*background, return_exceptions=True)
        unexpected = [repr(r) for r in [*results, *errors] if isinstance(r, BaseException)]
        assert unexpected == []
        assert problems == []
        # The run did what it is for: most ensures were served, and evictions happened.
        assert outcomes["leased"] + outcomes["unleased"] >= ENSURES // 2, outcomes
        assert outcomes["leased"] > 0 and evicted["daemon"] and evicted["foreign"], evicted
        assert service.counters["misses"] > MODELS  # models came back after evictions

        assert over_budget == []
        assert await asyncio.to_thread(store.blob_bytes) <= budget_bytes
        for rev in await asyncio.to_thread(store.snapshot_revisions):
            manifest = await asyncio.to_thread(store.load_manifest, rev)
            assert manifest is not None
            assert await asyncio.to_thread(store.missing_blobs, manifest) == [], rev
        assert [p.name for p in store.snapshots.iterdir() if p.name.startswith(".")] == []
        assert len(service.leases) == 0
        await eventually(lambda: not service.uses.held(), what="every use to be released")
        assert await asyncio.to_thread(foreign.uses.busy) == frozenset()
        deadline = time.monotonic() + 10
        while await service.hop(lambda: list(service.node.index.items("lease"))):
            assert time.monotonic() < deadline, "lease records left in the index"
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*background, return_exceptions=True)
        foreign.uses.close()
        await service.close()


async def test_an_admin_evict_spares_a_revision_another_process_uses(tmp_path: Path) -> None:
    m = publish_model(tmp_path, "m", 300 * KB, seed=40)
    service = Service(cache_config(tmp_path))
    await service.start()
    store = service.node.store
    try:
        await service.ensure(m.ref, lease=False)
        # An embedded worker found it cached and reads it (it takes no lease: no daemon).
        with uses_held_elsewhere(store.locks, [m.revision]):
            with pytest.raises(ModelLeased):
                await service.evict(m.ref)
            with pytest.raises(ModelLeased):  # force overrides leases, never a use
                await service.evict(m.ref, force=True)
            assert store.has_snapshot(m.revision)
            assert store.missing_blobs(m.manifest) == []
    finally:
        await service.close()
