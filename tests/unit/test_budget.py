"""The byte budget: admitting a pull (shortfall), evicting to make room, durable removal.

Caches are filled by real embedded pulls from ``file://`` origins; the
:class:`Budget` under test then works on that directory the way the daemon or
another embedded process would.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import weightcache.store
from tests.support.published import Model, cache_config, publish_model
from weightcache.budget import Budget, Protection
from weightcache.embedded import ensure_blocking
from weightcache.errors import CacheFull
from weightcache.index import Index
from weightcache.locks import RevisionUses
from weightcache.store import Store

KB = 1000


@dataclass
class Cache:
    root: Path
    store: Store
    index: Index
    uses: RevisionUses

    def budget(self, max_bytes: int) -> Budget:
        cfg = cache_config(self.root, WEIGHTCACHE_CACHE_MAX_BYTES=str(max_bytes))
        return Budget(cfg, self.store, self.index, self.uses)

    def pull(self, *models: Model) -> None:
        """Embedded pulls, in order (so the last is the most recently used)."""
        for model in models:
            ensure_blocking(model.ref, cache_config(self.root))


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    store = Store(tmp_path / "cache")
    store.ensure_layout()
    index = Index(store.index_dir)
    uses = RevisionUses(store.locks)
    try:
        yield Cache(tmp_path, store, index, uses)
    finally:
        uses.close()
        index.close()


def models(root: Path, count: int, size: int) -> list[Model]:
    return [publish_model(root, f"m{i}", size, seed=i) for i in range(count)]


# -- admission -------------------------------------------------------------------


def test_shortfall_counts_only_the_missing_bytes_against_the_budget(cache: Cache) -> None:
    a, b = models(cache.root, 2, 400 * KB)
    # c shares a's weights (same bytes: same blob) and adds a small file
    c = publish_model(cache.root, "c", 400 * KB, seed=0, extra={"config.json": b'{"c": 1}' * 10})
    cache.pull(a)
    assert cache.budget(800 * KB).shortfall(b.ref, b.revision, b.manifest) is None
    short = cache.budget(700 * KB).shortfall(b.ref, b.revision, b.manifest)
    assert isinstance(short, CacheFull)
    assert short.facts["needed_bytes"] == 400 * KB
    assert short.facts["used_bytes"] == 400 * KB
    assert short.facts["budget_bytes"] == 700 * KB
    assert short.facts["shortfall_bytes"] == 100 * KB
    # Only c's own small file is incoming: the shared blob is on disk already.
    assert cache.budget(400 * KB + 80).shortfall(c.ref, c.revision, c.manifest) is None
    # A revision whose blobs are all present fits whatever the budget says.
    assert cache.budget(1).shortfall(a.ref, a.revision, a.manifest) is None


def test_shortfall_counts_what_other_processes_still_pull(cache: Cache) -> None:
    a, b, c = models(cache.root, 3, 300 * KB)
    cache.pull(a, b)
    # b's manifest stays cached; its blobs go: as if another process were about to pull it
    cache.budget(0).evict_revision(b.revision, Protection())
    assert not cache.store.has_snapshot(b.revision) and cache.store.blob_bytes() == 300 * KB
    budget = cache.budget(700 * KB)
    assert budget.shortfall(c.ref, c.revision, c.manifest) is None
    other = RevisionUses(cache.store.locks)  # another process's use: it is pulling b
    other.acquire(b.revision)
    try:
        short = budget.shortfall(c.ref, c.revision, c.manifest)
        assert isinstance(short, CacheFull)
        assert short.facts["used_bytes"] == 600 * KB  # a on disk + b still to come
        assert short.facts["shortfall_bytes"] == 200 * KB
    finally:
        other.close()
    assert budget.shortfall(c.ref, c.revision, c.manifest) is None


def test_over_budget_is_what_must_go(cache: Cache) -> None:
    a, b = models(cache.root, 2, 300 * KB)
    cache.pull(a, b)
    assert cache.budget(600 * KB).over_budget() == 0
    assert cache.budget(500 * KB).over_budget() == 100 * KB
    assert cache.budget(0).over_budget() == 0  # no budget, no reserve


# -- eviction --------------------------------------------------------------------


def test_evict_takes_the_least_recently_used_first(cache: Cache) -> None:
    a, b, c = models(cache.root, 3, 300 * KB)
    cache.pull(a, b, c)
    cache.pull(a)  # a hit: a is now the most recently used
    budget = cache.budget(600 * KB)
    chosen = budget.evict(300 * KB, Protection(), "test", partial=False)
    assert chosen.revisions == (b.revision,) and chosen.freed_bytes == 300 * KB
    assert not cache.store.has_snapshot(b.revision)
    assert cache.store.has_snapshot(a.revision) and cache.store.has_snapshot(c.revision)
    assert cache.index.snapshot(b.revision) is None
    # the caller's protection is honoured: c is older than a, but protected
    chosen = budget.evict(
        300 * KB, Protection(revisions=frozenset({c.revision})), "t", partial=False
    )
    assert chosen.revisions == (a.revision,)
    assert cache.store.snapshot_revisions() == [c.revision]
    assert cache.store.blob_bytes() == 300 * KB


def test_evict_spares_revisions_in_use_and_leased_anywhere(cache: Cache) -> None:
    a, b, c = models(cache.root, 3, 300 * KB)
    cache.pull(a, b, c)
    budget = cache.budget(300 * KB)
    other = RevisionUses(cache.store.locks)  # another process reads a
    other.acquire(a.revision)
    # a daemon's unexpired lease on b, as recorded in the index; an expired one on c
    cache.index.put(("lease", "live"), {"revision": b.revision, "expires": time.time() + 60})
    cache.index.put(("lease", "old"), {"revision": c.revision, "expires": time.time() - 1})
    try:
        nothing = budget.evict(600 * KB, Protection(), "test", partial=False)
        # all or nothing: only c may go, which is not enough
        assert nothing.revisions == () and nothing.blobs == () and nothing.shortfall == 300 * KB
        assert sorted(cache.store.snapshot_revisions()) == sorted(
            [a.revision, b.revision, c.revision]
        )
        some = budget.evict(600 * KB, Protection(), "test", partial=True)
        assert some.revisions == (c.revision,) and some.shortfall == 300 * KB
        assert sorted(cache.store.snapshot_revisions()) == sorted([a.revision, b.revision])
    finally:
        other.close()
    cache.index.delete(("lease", "live"))
    rest = budget.evict(600 * KB, Protection(), "test", partial=True)
    assert sorted(rest.revisions) == sorted([a.revision, b.revision])
    assert cache.store.blob_bytes() == 0


def test_orphan_blobs_go_first_unless_a_pull_in_use_needs_them(cache: Cache) -> None:
    a, b = models(cache.root, 2, 300 * KB)
    cache.pull(a, b)
    # a's snapshot went (a pull of a interrupted after its blobs, or a removal cut short)
    cache.store.remove_snapshot(a.revision)
    budget = cache.budget(300 * KB)
    puller = RevisionUses(cache.store.locks)
    puller.acquire(a.revision)  # someone is pulling a again: its blob is needed
    try:
        chosen = budget.evict(300 * KB, Protection(), "test", partial=False)
        assert chosen.revisions == (b.revision,) and chosen.blobs == tuple(
            sorted({f.blake3 for f in b.manifest.files})
        )
        assert cache.store.missing_blobs(a.manifest) == []
    finally:
        puller.close()
    cache.pull(b)
    chosen = budget.evict(300 * KB, Protection(), "test", partial=False)
    assert chosen.revisions == ()  # the orphan alone frees enough
    assert cache.store.has_snapshot(b.revision)
    assert cache.store.missing_blobs(a.manifest) != []


def test_evict_revision_keeps_blobs_another_revision_shares(cache: Cache) -> None:
    a = publish_model(cache.root, "a", 300 * KB, seed=7)
    c = publish_model(cache.root, "c", 300 * KB, seed=7, extra={"extra.bin": b"x" * 5000})
    cache.pull(a, c)
    assert cache.store.blob_bytes() == 305 * KB
    chosen = cache.budget(0).evict_revision(c.revision, Protection())
    assert chosen.revisions == (c.revision,) and chosen.freed_bytes == 5000
    assert not cache.store.has_snapshot(c.revision)
    assert cache.store.has_snapshot(a.revision)
    assert cache.store.missing_blobs(a.manifest) == []


# -- durable removal ---------------------------------------------------------------


def test_a_snapshot_is_unpublished_durably_before_any_blob_goes(
    cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = models(cache.root, 2, 200 * KB)
    cache.pull(a, b)
    events: list[tuple[str, str]] = []
    real_rename, real_rmtree, real_unlink = os.rename, shutil.rmtree, os.unlink
    real_fsync_dir = weightcache.store.fsync_dir
    snapshots, blobs = cache.store.snapshots, cache.store.blobs

    def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        events.append(("rename", Path(str(src)).name))
        real_rename(src, dst, *args, **kwargs)

    def fsync_dir(path: Path) -> None:
        events.append(("fsync_dir", str(path)))
        real_fsync_dir(path)

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        events.append(("rmtree", Path(str(path)).parent.name))
        real_rmtree(path, *args, **kwargs)

    def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(str(path)).parent == blobs:
            events.append(("unlink_blob", Path(str(path)).name))
        real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(weightcache.store, "fsync_dir", fsync_dir)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    monkeypatch.setattr(os, "unlink", unlink)

    cache.store.remove_snapshot(a.revision)
    assert events == [
        ("rename", a.revision),
        ("fsync_dir", str(snapshots)),
        ("rmtree", "snapshots"),
    ]
    assert not cache.store.has_snapshot(a.revision)
    assert [p.name for p in snapshots.iterdir()] == [b.revision]  # no .del- leftovers

    events.clear()
    cache.budget(0).evict_revision(b.revision, Protection())
    kinds = [kind for kind, _ in events]
    assert kinds[:3] == ["rename", "fsync_dir", "rmtree"]
    assert kinds.count("unlink_blob") == 1 and kinds[-1] == "unlink_blob"
    assert cache.store.snapshot_revisions() == []
