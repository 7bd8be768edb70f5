"""Cross-process coordination on one cache directory: the cache lock and revision uses.

Several processes share a cache: the daemon, embedded workers (no daemon
answered), CLI commands. Two things must hold between them, whatever crashes:

* **An eviction never removes what someone is using.** Every process that
  uses a revision (pulls it, found it cached and has not leased it yet, holds
  a snapshot open) holds a *shared* ``flock`` on ``locks/rev-<rev>.lock``
  (:class:`RevisionUses`). An eviction takes the *exclusive* cache lock, then
  probes each revision's lock with a non-blocking exclusive ``flock``: one it
  cannot take is in use, and its revision and blobs are protected.
* **Registration and eviction do not interleave.** A use is registered while
  holding the cache lock *shared*; eviction plans and applies while holding it
  *exclusive*. So a revision is either registered before an eviction looks (and
  protected) or after it finished (and the user then sees what is really on
  disk: a missing blob is pulled again, never a crash).

``flock`` locks belong to an open file description and die with their holder,
``kill -9`` included: nothing here outlives a crash. Locks of one process on
two descriptors conflict like those of two processes, so the daemon's own uses
are seen by its own probes. Every call here blocks: run it in a worker thread.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path

from weightcache.hashing import is_digest

__all__ = ["CacheLock", "RevisionUses"]

_REV_PREFIX = "rev-"
_REV_SUFFIX = ".lock"


class CacheLock:
    """The cache-wide lock: exclusive for eviction and ``verify``, shared for registering a use."""

    def __init__(self, locks_dir: Path) -> None:
        self.dir = locks_dir
        self.path = locks_dir / "cache.lock"

    @contextmanager
    def _held(self, mode: int) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)  # releases the lock

    def shared(self) -> AbstractContextManager[None]:
        return self._held(fcntl.LOCK_SH)

    def exclusive(self) -> AbstractContextManager[None]:
        return self._held(fcntl.LOCK_EX)


class RevisionUses:
    """This process's uses of revisions, each a shared ``flock`` others can see.

    Uses are counted: the lock file is locked on the first :meth:`acquire` of a
    revision and unlocked on the last :meth:`release`. Thread-safe.
    """

    def __init__(self, locks_dir: Path) -> None:
        self.dir = locks_dir
        self.cache_lock = CacheLock(locks_dir)
        self._mutex = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._fds: dict[str, int] = {}
        self._gates: dict[str, threading.Lock] = {}

    def path(self, rev: str) -> Path:
        assert is_digest(rev), rev
        return self.dir / f"{_REV_PREFIX}{rev}{_REV_SUFFIX}"

    def acquire(self, rev: str) -> None:
        # The flock waits while an eviction or verify holds the cache lock: it is
        # taken outside the mutex (other revisions' uses and releases go on) and
        # under a per-revision gate (two first uses of one revision lock it once).
        with self._mutex:
            gate = self._gates.setdefault(rev, threading.Lock())
        with gate:
            with self._mutex:
                if rev in self._fds:
                    self._counts[rev] += 1
                    return
            fd = self._lock(rev)
            with self._mutex:
                self._fds[rev] = fd
                self._counts[rev] += 1

    def _lock(self, rev: str) -> int:
        with self.cache_lock.shared():
            fd = os.open(self.path(rev), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
            except BaseException:
                os.close(fd)
                raise
        return fd

    def release(self, rev: str) -> None:
        with self._mutex:
            if self._counts[rev] <= 0:
                return
            self._decrement(rev)
            if self._counts[rev] == 0 and rev in self._fds:
                os.close(self._fds.pop(rev))

    def _decrement(self, rev: str) -> None:
        self._counts[rev] -= 1
        if self._counts[rev] <= 0:
            del self._counts[rev]

    def held(self) -> frozenset[str]:
        """Revisions this process uses now."""
        with self._mutex:
            return frozenset(self._counts)

    def close(self) -> None:
        with self._mutex:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._counts.clear()

    def busy(self, *, prune: bool = False) -> frozenset[str]:
        """Revisions some process (this one included) uses now.

        With ``prune`` (only under the exclusive cache lock, when nobody can be
        between creating a lock file and locking it) the lock files nobody holds
        are removed, so ``locks/`` does not grow with every revision ever used.
        """
        found: set[str] = set()
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return frozenset()
        for name in names:
            if not (name.startswith(_REV_PREFIX) and name.endswith(_REV_SUFFIX)):
                continue
            rev = name[len(_REV_PREFIX) : -len(_REV_SUFFIX)]
            if not is_digest(rev):
                continue
            path = self.dir / name
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                found.add(rev)
                continue
            finally:
                if rev not in found and prune:
                    with suppress(FileNotFoundError):
                        os.unlink(path)
                os.close(fd)
        return frozenset(found)

    @contextmanager
    def using(self, rev: str) -> Iterator[None]:
        self.acquire(rev)
        try:
            yield
        finally:
            self.release(rev)
