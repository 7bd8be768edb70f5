"""Metadata over diskcache: the only module that imports ``diskcache``.

The index remembers what the file system cannot say cheaply: when a blob or a
snapshot was last used (for LRU eviction), which location a snapshot came
from, and counters. It is advisory: presence is always decided by the files in
``blobs/`` and ``snapshots/``, and ``weightcache verify`` reconciles the two.

diskcache is opened with every setting explicit. Its defaults would silently
cull rows past a 1 GiB size limit; here nothing is ever evicted by diskcache.

Records are keyed ``(kind, id)``. Each kind also keeps its set of ids under
``("kinds", kind)``, written in the same transaction as the record, so listing
one kind (the leases, the snapshots of a location) reads that kind's rows only,
never every key of the cache. An index written before these sets existed is
scanned once, on open, to build them.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypedDict, cast

import diskcache

from weightcache.errors import CacheFull


class BlobRecord(TypedDict):
    size: int
    created: float
    accessed: float


class SnapshotRecord(TypedDict):
    location: str
    files: int
    bytes: int
    created: float
    accessed: float


_SETTINGS: dict[str, Any] = {
    "eviction_policy": "none",
    "size_limit": 2**62,
    "cull_limit": 0,
    "statistics": 0,
    "tag_index": 0,
    "sqlite_journal_mode": "wal",
    # NORMAL: with WAL, a power loss may lose the last commits but never corrupts;
    # the index is rebuilt from the files by `verify` anyway.
    "sqlite_synchronous": 1,
    "sqlite_cache_size": 2**13,
    "sqlite_mmap_size": 2**26,
    "disk_min_file_size": 2**15,
    "disk_pickle_protocol": 5,
}


#: what SQLite says when the file system is full: SQLITE_FULL once the index is
#: open; SQLITE_IOERR_SHMSIZE when opening it needs a new WAL shared-memory file
_FULL_ERRORS = frozenset({"SQLITE_FULL", "SQLITE_IOERR_SHMSIZE", "SQLITE_IOERR_WRITE"})


def _disk_full(exc: sqlite3.Error, directory: str) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_FULL":
        return True
    if name in _FULL_ERRORS:  # an I/O error is a full disk only if the disk is full
        try:
            return shutil.disk_usage(directory).free < 1 << 20
        except OSError:
            return False
    return False


@contextmanager
def _full_as_cache_full(directory: str) -> Iterator[None]:
    """SQLite failing for want of space is the cache's file system being full."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if _disk_full(exc, directory):
            raise CacheFull(
                f"disk full writing the cache index in {directory}: {exc}",
                hint="free disk space or raise cache.reserve_bytes so pulls stop earlier",
                path=directory,
            ) from exc
        raise


#: the kinds of record that keep an id set (everything but counters)
KINDS = ("blob", "snapshot", "lease", "job", "pull", "schedule", "pin", "history")


class Index:
    def __init__(self, directory: Path, *, timeout_s: float = 60.0) -> None:
        self._dir = str(directory)
        with _full_as_cache_full(self._dir):
            self._cache = diskcache.Cache(self._dir, timeout=timeout_s, **_SETTINGS)
            self._build_kind_sets()

    def close(self) -> None:
        self._cache.close()

    def _build_kind_sets(self) -> None:
        """One scan of an index written before kind sets existed; never again after."""
        if self._cache.get(("kinds", "_built")):
            return
        sets: dict[str, set[str]] = {kind: set() for kind in KINDS}
        for key in list(self._cache.iterkeys()):
            if isinstance(key, tuple) and len(key) == 2 and key[0] in sets:
                sets[key[0]].add(key[1])
        with self._cache.transact():
            for kind, ids in sets.items():
                self._cache.set(("kinds", kind), frozenset(ids))
            self._cache.set(("kinds", "_built"), True)

    def ids(self, kind: str) -> frozenset[str]:
        """The ids of one kind of record, without reading the records."""
        return cast(frozenset[str], self._cache.get(("kinds", kind), frozenset()))

    def _set(self, kind: str, key: str, value: Any) -> None:
        with _full_as_cache_full(self._dir), self._cache.transact():
            self._cache.set((kind, key), value)
            ids = self.ids(kind)
            if key not in ids:
                self._cache.set(("kinds", kind), ids | {key})

    def _delete(self, kind: str, key: str) -> None:
        with _full_as_cache_full(self._dir), self._cache.transact():
            self._cache.delete((kind, key))
            ids = self.ids(kind)
            if key in ids:
                self._cache.set(("kinds", kind), ids - {key})

    def _records(self, kind: str) -> Iterator[tuple[str, Any]]:
        for key in sorted(self.ids(kind)):
            rec = self._cache.get((kind, key))
            if rec is not None:
                yield key, rec

    # -- blobs -----------------------------------------------------------------

    def add_blob(self, digest: str, size: int) -> None:
        now = time.time()
        self._set("blob", digest, BlobRecord(size=size, created=now, accessed=now))

    def touch_blobs(self, digests: list[str]) -> None:
        with _full_as_cache_full(self._dir):
            now = time.time()
            with self._cache.transact():
                for digest in digests:
                    rec = cast(BlobRecord | None, self._cache.get(("blob", digest)))
                    if rec is not None:
                        rec["accessed"] = now
                        self._cache.set(("blob", digest), rec)

    def blob(self, digest: str) -> BlobRecord | None:
        return cast(BlobRecord | None, self._cache.get(("blob", digest)))

    def drop_blob(self, digest: str) -> None:
        self._delete("blob", digest)

    def blobs(self) -> Iterator[tuple[str, BlobRecord]]:
        for key, rec in self._records("blob"):
            yield key, cast(BlobRecord, rec)

    # -- snapshots ---------------------------------------------------------------

    def add_snapshot(self, rev: str, location: str, files: int, nbytes: int) -> None:
        now = time.time()
        old = cast(SnapshotRecord | None, self._cache.get(("snapshot", rev)))
        rec = SnapshotRecord(
            location=location,
            files=files,
            bytes=nbytes,
            created=old["created"] if old else now,
            accessed=now,
        )
        self._set("snapshot", rev, rec)

    def snapshot(self, rev: str) -> SnapshotRecord | None:
        return cast(SnapshotRecord | None, self._cache.get(("snapshot", rev)))

    def drop_snapshot(self, rev: str) -> None:
        self._delete("snapshot", rev)

    def snapshots(self) -> Iterator[tuple[str, SnapshotRecord]]:
        for key, rec in self._records("snapshot"):
            yield key, cast(SnapshotRecord, rec)

    # -- records of the daemon (leases, jobs, pulls, schedules, pins, histories) -----------

    def put(self, key: tuple[str, str], value: dict[str, Any]) -> None:
        self._set(key[0], key[1], value)

    def delete(self, key: tuple[str, str]) -> None:
        self._delete(key[0], key[1])

    def items(self, kind: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for key, rec in self._records(kind):
            yield key, cast(dict[str, Any], rec)

    # -- counters ------------------------------------------------------------------

    def incr(self, name: str, delta: int = 1) -> None:
        with _full_as_cache_full(self._dir):
            self._cache.incr(("counter", name), delta, default=0)
