"""Cross-process coordination on one cache directory: revision uses and the cache lock.

``flock`` locks of two open file descriptions conflict even inside one process,
so a second :class:`RevisionUses` (or :class:`CacheLock`) on the same
directory stands for another process; a spawned child is the real thing.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.support.holders import uses_held_elsewhere
from tests.support.published import cache_config, publish_model
from weightcache.embedded import ensure_blocking
from weightcache.hashing import digest_bytes
from weightcache.index import Index
from weightcache.locks import CacheLock, RevisionUses
from weightcache.store import Store
from weightcache.verify import verify

A = digest_bytes(b"revision a")
B = digest_bytes(b"revision b")


def test_uses_are_counted_and_seen_by_other_holders(tmp_path: Path) -> None:
    mine = RevisionUses(tmp_path)
    other = RevisionUses(tmp_path)  # another open file description: like another process
    mine.acquire(A)
    mine.acquire(A)
    mine.acquire(B)
    assert mine.held() == {A, B}
    assert other.busy() == {A, B}
    mine.release(A)  # one of two uses
    assert mine.held() == {A, B} and other.busy() == {A, B}
    mine.release(A)  # the last: the flock goes
    assert mine.held() == {B} and other.busy() == {B}
    mine.release(A)  # more releases than uses: ignored, never negative
    mine.acquire(A)
    assert other.busy() == {A, B}
    mine.close()
    assert mine.held() == frozenset() and other.busy() == frozenset()


def test_using_releases_on_error(tmp_path: Path) -> None:
    uses = RevisionUses(tmp_path)
    probe = RevisionUses(tmp_path)
    try:
        with uses.using(A):
            assert probe.busy() == {A}
            raise KeyError("boom")
    except KeyError:
        pass
    assert probe.busy() == frozenset() and uses.held() == frozenset()


def test_busy_sees_another_process_until_it_is_killed(tmp_path: Path) -> None:
    uses = RevisionUses(tmp_path)
    with uses_held_elsewhere(tmp_path, [A]) as child:
        assert uses.busy() == {A}
        assert uses.held() == frozenset()  # held() is this process's own uses only
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)  # a crash: no release runs
        child.join(10)
        assert uses.busy() == frozenset()


def test_prune_removes_only_lock_files_nobody_holds(tmp_path: Path) -> None:
    holder = RevisionUses(tmp_path)
    holder.acquire(A)
    holder.acquire(B)
    holder.release(B)  # B's lock file stays behind, unlocked
    junk = tmp_path / "rev-not-a-digest.lock"
    junk.write_text("")
    probe = RevisionUses(tmp_path)
    assert holder.path(B).exists()
    with probe.cache_lock.exclusive():
        assert probe.busy(prune=True) == {A}
    assert holder.path(A).exists()  # held: kept
    assert not holder.path(B).exists()  # nobody held it: removed
    assert junk.exists() and (tmp_path / "cache.lock").exists()  # not revision locks
    assert probe.busy() == {A}
    holder.close()


@pytest.mark.timeout(30)
def test_a_use_waits_while_the_cache_lock_is_exclusive(tmp_path: Path) -> None:
    uses = RevisionUses(tmp_path)
    evicting = CacheLock(tmp_path)
    errors: list[BaseException] = []

    def register() -> None:
        try:
            uses.acquire(A)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    with evicting.exclusive():
        thread = threading.Thread(target=register)
        thread.start()
        thread.join(0.1)
        assert thread.is_alive()  # registration waits for the eviction to finish
        assert RevisionUses(tmp_path).busy() == frozenset()
    thread.join(10)
    assert not thread.is_alive() and errors == []
    assert RevisionUses(tmp_path).busy() == {A}
    uses.close()


@pytest.mark.timeout(60)
def test_verify_reconciles_only_under_the_cache_lock(tmp_path: Path) -> None:
    model = publish_model(tmp_path, "m", 300_000, 1)
    cfg = cache_config(tmp_path)
    ensure_blocking(model.ref, cfg)
    store = Store(cfg.cache.dir)
    index = Index(store.index_dir)
    try:
        hashed = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["report"] = verify(
                    store,
                    index,
                    on_blob=lambda digest, size: hashed.set(),
                    lock=CacheLock(store.locks),
                )
            except BaseException as exc:  # reported by the main thread
                box["error"] = exc

        with CacheLock(store.locks).exclusive():  # an eviction in another process
            thread = threading.Thread(target=run)
            thread.start()
            assert hashed.wait(10)  # the re-hashing ran without the lock ...
            thread.join(0.1)
            assert thread.is_alive() and box == {}  # ... the reconcile waits for it
        thread.join(10)
        assert not thread.is_alive()
        assert "error" not in box, box.get("error")
        report = box["report"]
        assert report.clean and report.blobs_checked == 1
    finally:
        index.close()


def test_a_use_waiting_for_the_cache_lock_holds_up_no_other_revision(tmp_path: Path) -> None:
    # An eviction (or verify) holds the cache lock: a first use of one revision
    # waits for it, but releasing or re-using another revision must not.
    locks = tmp_path / "locks"
    uses = RevisionUses(locks)
    a, b = digest_bytes(b"a"), digest_bytes(b"b")
    uses.acquire(b)
    cache_lock = CacheLock(locks)
    waiting = threading.Event()
    done = threading.Event()

    def first_use_of_a() -> None:
        waiting.set()
        uses.acquire(a)
        done.set()

    with cache_lock.exclusive():
        thread = threading.Thread(target=first_use_of_a)
        thread.start()
        waiting.wait(5)
        assert not done.wait(0.05)  # a waits for the cache lock ...
        finished = threading.Event()

        def other_revision() -> None:
            uses.acquire(b)  # ... while b, already held, is used again and released
            uses.release(b)
            uses.release(b)
            assert uses.held() == frozenset()
            finished.set()

        helper = threading.Thread(target=other_revision)
        helper.start()
        assert finished.wait(2), "a use of another revision waited for the cache lock"
        helper.join()
    assert done.wait(5)
    thread.join()
    assert uses.held() == frozenset({a})
    uses.close()
