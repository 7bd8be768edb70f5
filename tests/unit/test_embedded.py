"""Embedded mode (no daemon): it evicts to the budget, and shares the node with a daemon.

A worker with no daemon pulls in its own process against the node's cache
directory. It must respect the budget the daemon would (evicting, not failing
with cache_full forever), and what it uses must be safe from the daemon's
eviction, and the other way round, across processes and crashes.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import weightcache
from tests.support.holders import uses_held_elsewhere
from tests.support.models import assert_bitwise_equal, reference, write_model
from tests.support.published import cache_config, files_intact, publish_model
from weightcache.budget import Protection
from weightcache.embedded import ensure_blocking
from weightcache.publish import publish
from weightcache.refs import parse_ref
from weightcache.service import Service
from weightcache.store import Store

KB = 1000


def test_embedded_pulls_evict_to_the_budget(tmp_path: Path) -> None:
    a = publish_model(tmp_path, "a", 600 * KB, seed=1)
    b = publish_model(tmp_path, "b", 600 * KB, seed=2)
    cfg = cache_config(tmp_path, WEIGHTCACHE_CACHE_MAX_BYTES=str(1000 * KB))
    first = ensure_blocking(a.ref, cfg)
    second = ensure_blocking(b.ref, cfg)  # 1200 KB would not fit: a must go
    store = Store(cfg.cache.dir)
    assert not second.cache_hit and second.origin_bytes == 600 * KB
    assert store.has_snapshot(b.revision) and not store.has_snapshot(a.revision)
    assert store.blob_bytes() == 600 * KB <= cfg.cache.max_bytes
    assert files_intact([(f.local_path, f.blake3) for f in second.files]) == []
    assert first.revision == a.revision and store.missing_blobs(a.manifest) != []
    again = ensure_blocking(a.ref, cfg)  # and back: b goes in turn
    assert not again.cache_hit and store.has_snapshot(a.revision)
    assert not store.has_snapshot(b.revision) and store.blob_bytes() <= cfg.cache.max_bytes


def test_load_pulls_again_a_snapshot_whose_blob_went_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write_model(tmp_path / "src", shards=2, seed=3)
    ref = f"file://{tmp_path}/origin/model"
    cfg = cache_config(tmp_path)
    published = publish(tmp_path / "src", parse_ref(ref), cfg)
    monkeypatch.setenv("WEIGHTCACHE_CACHE_DIR", str(cfg.cache.dir))
    monkeypatch.setenv("WEIGHTCACHE_CACHE_RESERVE_BYTES", "0")
    want = reference(files)
    tensors, report = weightcache.load_with_report(ref)
    assert report.mode == "embedded" and not report.cache_hit
    assert_bitwise_equal(tensors, want)
    del tensors

    # A power loss after the snapshot came back, before its blob did (or a blob
    # deleted by hand): the snapshot is there, one of its links dangles.
    shard = next(f for f in published.manifest.files if f.path.endswith(".safetensors"))
    store = Store(cfg.cache.dir)
    os.unlink(store.blob_path(shard.blake3))
    assert store.has_snapshot(published.revision)

    tensors, report = weightcache.load_with_report(ref)  # not a FileNotFoundError
    assert not report.cache_hit and report.origin_bytes == shard.size
    assert_bitwise_equal(tensors, want)
    assert store.has_blob(shard.blake3, shard.size)
    ensured = ensure_blocking(ref, cfg)
    assert ensured.cache_hit
    assert files_intact([(f.local_path, f.blake3) for f in ensured.files]) == []


async def test_another_process_pulling_is_safe_from_the_daemons_eviction(
    tmp_path: Path,
) -> None:
    x = publish_model(tmp_path, "x", 300 * KB, seed=4)
    y = publish_model(tmp_path, "y", 300 * KB, seed=5)
    service = Service(cache_config(tmp_path, WEIGHTCACHE_CACHE_MAX_BYTES=str(600 * KB)))
    await service.start()
    store = service.node.store
    try:
        await service.ensure(x.ref, lease=False)
        await service.ensure(y.ref, lease=False)
        # y as an embedded worker's pull in progress: blobs committed, no snapshot yet
        await service.hop(store.remove_snapshot, y.revision)
        everything = 10 * 600 * KB
        with uses_held_elsewhere(store.locks, [x.revision, y.revision]) as worker:
            assert await service.hop(service.uses.busy) == {x.revision, y.revision}
            plan = await service.hop(
                service.budget.evict, everything, Protection(), "test", partial=True
            )
            assert plan.revisions == () and plan.blobs == ()
            assert store.has_snapshot(x.revision)
            assert store.missing_blobs(x.manifest) == []
            assert store.missing_blobs(y.manifest) == []  # the pull's committed blobs stay
            assert worker.pid is not None
            os.kill(worker.pid, signal.SIGKILL)  # the worker crashes: its uses end with it
            worker.join(10)
        assert await service.hop(service.uses.busy) == frozenset()
        plan = await service.hop(
            service.budget.evict, everything, Protection(), "test", partial=True
        )
        assert plan.revisions == (x.revision,)
        assert store.snapshot_revisions() == [] and store.blob_bytes() == 0
    finally:
        await service.close()
