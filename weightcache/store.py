"""The content-addressed node cache on local disk. Blocking; callers hop to threads.

Layout (see docs/cache-layout.md)::

    CACHE/blobs/<blake3>                   complete, verified, read-only file bodies
    CACHE/partial/<blake3>.part            a download in progress (preallocated, written in place)
    CACHE/partial/<blake3>.chunks          chunks written and verified (a hint, re-checked)
    CACHE/partial/<blake3>.progress        bytes synced inside chunks in flight (a hint, re-checked)
    CACHE/partial/<blake3>.lock            flock: one puller per blob on the node
    CACHE/manifests/<rev>.json             verified manifests (bytes hash to <rev>)
    CACHE/snapshots/<rev>/<path>           symlinks into blobs/, the whole directory or nothing
    CACHE/refs/<percent-encoded location>  the revision a ref without @REV resolved to last
    CACHE/index/                           diskcache metadata (access times, sizes): advisory
    CACHE/quarantine/                      blobs `verify --repair` found corrupt

The file system is the truth: a path under ``blobs/`` or ``snapshots/`` exists
only once it is complete and verified, because it appears by ``rename`` of
something already checked and synced. The index may lag behind a crash; it
never makes a file count as present.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import struct
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weightcache.errors import CacheCorrupt, CacheFull, CacheIOError, HashMismatch
from weightcache.hashing import digest_bytes, digest_file, is_digest
from weightcache.manifest import Manifest, parse

log = logging.getLogger(__name__)

_CHUNK_RECORD = struct.Struct("<I")
#: (chunk index, bytes of the chunk written from its start and fdatasync'ed first)
_PROGRESS_RECORD = struct.Struct("<IQ")
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT)
_DIRS = ("blobs", "partial", "manifests", "snapshots", "refs", "quarantine", "locks")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def disk_errors(path: Path, doing: str, **facts: Any) -> Iterator[None]:
    """Translate an ``OSError`` of the cache's file system into the error tree.

    A full disk (``ENOSPC``, ``EDQUOT``) is :class:`CacheFull`; anything else
    (``EIO``, ``EROFS`` after a remount, ``EACCES``, a file removed by hand) is
    :class:`CacheIOError` naming the path and the errno. Wrap only calls whose
    every failure is the disk's: expected misses (a chunk log not written yet)
    are handled before they get here.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL_DISK:
            raise CacheFull(f"disk full {doing} {path}", path=str(path), **facts) from exc
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        raise CacheIOError(
            f"{doing} {path} failed: {exc.strerror or exc} ({name})",
            hint="check the cache's file system: kernel log (dmesg), mount options "
            "(read-only after an error?), ownership and modes of cache.dir",
            path=str(path),
            errno=name,
            **facts,
        ) from exc


@dataclass(frozen=True, slots=True)
class PartialPaths:
    part: Path
    chunks: Path
    lock: Path
    progress: Path


class BlobLock:
    """An exclusive ``flock`` on ``partial/<digest>.lock``.

    ``flock`` is released by the kernel when the holder dies (``kill -9``), so a
    crashed puller never blocks the node. The lock file is unlinked after the
    blob is committed; a waiter that then wins the lock on the unlinked inode
    notices (the path no longer names its inode) and retries on a fresh file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # we locked a file someone just unlinked; take the new one

    def release(self, *, unlink: bool = False) -> None:
        if self._fd is None:
            return
        if unlink:
            with suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.partial = root / "partial"
        self.manifests = root / "manifests"
        self.snapshots = root / "snapshots"
        self.refs = root / "refs"
        self.quarantine = root / "quarantine"
        self.index_dir = root / "index"
        self.locks = root / "locks"

    def ensure_layout(self) -> None:
        for name in _DIRS:
            (self.root / name).mkdir(parents=True, exist_ok=True)

    # -- blobs -------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        assert is_digest(digest), digest
        return self.blobs / digest

    def has_blob(self, digest: str, size: int) -> bool:
        try:
            return self.blob_path(digest).stat().st_size == size
        except FileNotFoundError:
            return False

    def partial_paths(self, digest: str) -> PartialPaths:
        assert is_digest(digest), digest
        base = self.partial / digest
        return PartialPaths(
            part=base.with_suffix(".part"),
            chunks=base.with_suffix(".chunks"),
            lock=base.with_suffix(".lock"),
            progress=base.with_suffix(".progress"),
        )

    def blob_lock(self, digest: str) -> BlobLock:
        return BlobLock(self.partial_paths(digest).lock)

    def open_part(self, digest: str, size: int, *, preallocate: bool = True) -> None:
        """Create (or keep) the preallocated part file, so a full disk shows now, not halfway.

        ``preallocate=False`` leaves it sparse: a file that will get a few chunks
        (pulled for peers) takes only their blocks."""
        paths = self.partial_paths(digest)
        with disk_errors(paths.part, "creating part file", needed_bytes=size):
            with suppress(FileNotFoundError):
                os.chmod(paths.part, 0o600)  # a kill between commit's chmod and rename
            fd = os.open(paths.part, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)
                if size and preallocate:
                    try:
                        os.posix_fallocate(fd, 0, size)
                    except OSError as exc:
                        if exc.errno in _FULL_DISK:
                            raise CacheFull(
                                f"no room to preallocate {size} bytes for blob {digest[:16]}",
                                needed_bytes=size,
                            ) from exc
                        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                            raise
            finally:
                os.close(fd)

    def read_chunk_log(self, digest: str) -> set[int]:
        """Chunks a previous puller recorded as verified. Only a hint: callers re-hash them."""
        data = self._read_log(self.partial_paths(digest).chunks)
        usable = len(data) - len(data) % _CHUNK_RECORD.size  # a torn last record is dropped
        return {v for (v,) in _CHUNK_RECORD.iter_unpack(data[:usable])}

    def record_chunk(self, digest: str, index: int) -> None:
        # O_APPEND writes of 4 bytes do not interleave; no fsync: the record is a
        # hint that the resume path verifies before trusting.
        self._append_log(self.partial_paths(digest).chunks, _CHUNK_RECORD.pack(index))

    def reset_chunk_log(self, digest: str, indices: set[int]) -> None:
        path = self.partial_paths(digest).chunks
        with disk_errors(path, "rewriting chunk log"):
            path.write_bytes(b"".join(_CHUNK_RECORD.pack(i) for i in sorted(indices)))

    def read_progress(self, digest: str) -> dict[int, int]:
        """Bytes written from the start of each chunk still in flight when its puller
        stopped: the last record per chunk. Only a hint: the resume re-hashes that
        prefix from the part file and checks the whole chunk before trusting it."""
        data = self._read_log(self.partial_paths(digest).progress)
        usable = len(data) - len(data) % _PROGRESS_RECORD.size  # a torn last record is dropped
        return dict(_PROGRESS_RECORD.iter_unpack(data[:usable]))

    def record_progress(self, digest: str, index: int, written: int) -> None:
        """Append (chunk, bytes written). The caller ``fdatasync``s the part file
        first, so a record that reached the disk never claims bytes that did not."""
        self._append_log(self.partial_paths(digest).progress, _PROGRESS_RECORD.pack(index, written))

    def _read_log(self, path: Path) -> bytes:
        data = b""
        with disk_errors(path, "reading"), suppress(FileNotFoundError):
            data = path.read_bytes()
        return data

    def _append_log(self, path: Path, record: bytes) -> None:
        # Records are a few bytes, written with one O_APPEND write: concurrent
        # transfers of one blob never interleave inside a record.
        with disk_errors(path, "appending to"):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, record)
            finally:
                os.close(fd)

    def partial_ages(self, now: float) -> Iterator[tuple[str, float]]:
        """(digest, seconds since any of its partial files last changed) of every
        partial download: a pull stopped midway, chunks pulled for peers."""
        digests = {
            p.name.split(".", 1)[0] for p in self.partial.iterdir() if is_digest(p.name[:64])
        }
        for digest in sorted(digests):
            paths = self.partial_paths(digest)
            stamps = []
            for path in (paths.part, paths.chunks, paths.progress):
                with suppress(FileNotFoundError):
                    stamps.append(path.stat().st_mtime)
            if stamps:
                yield digest, now - max(stamps)

    def remove_partial(self, digest: str) -> int:
        """Remove a partial download's files (the caller holds the blob's lock);
        returns the bytes its part file took on disk."""
        paths = self.partial_paths(digest)
        freed = 0
        with suppress(FileNotFoundError):
            freed = paths.part.stat().st_blocks * 512
        for path in (paths.part, paths.chunks, paths.progress):
            with disk_errors(path, "removing"), suppress(FileNotFoundError):
                os.unlink(path)
        return freed

    def commit_blob(self, digest: str, size: int) -> Path:
        """Move a finished part file into ``blobs/``: size check, hash check, fsync, rename.

        Raises :class:`HashMismatch` (and leaves the part file for the caller to
        repair) when the whole file does not hash to ``digest``.
        """
        paths = self.partial_paths(digest)
        with disk_errors(paths.part, "checking part file"):
            actual_size = paths.part.stat().st_size
            if actual_size != size:
                raise HashMismatch(
                    f"part file of blob {digest} is {actual_size} bytes, expected {size}",
                    expected=digest,
                )
            actual = digest_file(paths.part)
        if actual != digest:
            raise HashMismatch(
                f"assembled blob hashes to {actual}, expected {digest}",
                expected=digest,
                actual=actual,
            )
        target = self.blob_path(digest)
        with disk_errors(paths.part, "committing part file"):
            fd = os.open(paths.part, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(paths.part, 0o444)
            os.replace(paths.part, target)
            # The hints go at once, not after the directory fsync: a kill in between
            # would leave them behind a committed blob (harmless, but never removed).
            # Failing to remove them is no reason to fail a committed blob.
            for leftover in (paths.chunks, paths.progress):
                with suppress(OSError):
                    os.unlink(leftover)
            fsync_dir(self.blobs)
        return target

    def iter_blobs(self) -> Iterator[tuple[str, int]]:
        for entry in os.scandir(self.blobs):
            if is_digest(entry.name) and entry.is_file(follow_symlinks=False):
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:
                    continue  # evicted between the listing and the stat
                yield entry.name, size

    def quarantine_blob(self, digest: str) -> Path:
        target = self.quarantine / f"{digest}.{uuid.uuid4().hex[:8]}"
        os.replace(self.blob_path(digest), target)
        fsync_dir(self.blobs)
        return target

    # -- manifests -------------------------------------------------------------

    def manifest_path(self, rev: str) -> Path:
        assert is_digest(rev), rev
        return self.manifests / f"{rev}.json"

    def save_manifest(self, rev: str, raw: bytes) -> None:
        if digest_bytes(raw) != rev:
            raise HashMismatch(f"manifest bytes do not hash to revision {rev}", expected=rev)
        path = self.manifest_path(rev)
        if path.exists():
            return
        self._atomic_write(path, raw)

    def load_manifest(self, rev: str) -> Manifest | None:
        try:
            raw = self.manifest_path(rev).read_bytes()
        except FileNotFoundError:
            return None
        actual = digest_bytes(raw)
        if actual != rev:
            raise CacheCorrupt(
                f"cached manifest {rev} hashes to {actual}",
                hint="run `weightcache verify --repair`",
            )
        return parse(raw)[0]

    def revisions(self) -> list[str]:
        return sorted(p.name[:-5] for p in self.manifests.glob("*.json") if is_digest(p.name[:-5]))

    # -- snapshots -------------------------------------------------------------

    def snapshot_path(self, rev: str) -> Path:
        assert is_digest(rev), rev
        return self.snapshots / rev

    def has_snapshot(self, rev: str) -> bool:
        return self.snapshot_path(rev).is_dir()

    def missing_blobs(self, manifest: Manifest) -> list[str]:
        """Blobs of ``manifest`` that are not in ``blobs/`` with their size.

        A snapshot whose blobs are all present is a cache hit; one with a blob
        missing (a removal cut short by a power loss, a hand-deleted file) is
        not: the revision is pulled again, never served with a dangling link.
        """
        return sorted({f.blake3 for f in manifest.files if not self.has_blob(f.blake3, f.size)})

    def link_snapshot(self, rev: str, manifest: Manifest) -> Path:
        """Publish ``snapshots/<rev>/`` atomically: built aside, then renamed into place.

        Every blob must already be committed; a reader that sees the directory
        sees every file of the revision.
        """
        target = self.snapshot_path(rev)
        if target.is_dir():
            return target
        for f in manifest.files:
            if not self.has_blob(f.blake3, f.size):
                raise CacheCorrupt(f"blob {f.blake3} for {f.path} is missing; cannot link {rev}")
        work = Path(tempfile.mkdtemp(dir=self.snapshots, prefix=f".tmp-{rev[:16]}-"))
        try:
            os.chmod(work, 0o755)  # mkdtemp makes 0700; workers may run as other users
            for f in manifest.files:
                link = work / f.path
                link.parent.mkdir(parents=True, exist_ok=True)
                # Relative links keep the cache relocatable (bind mounts, containers).
                rel = os.path.relpath(self.blob_path(f.blake3), target / Path(f.path).parent)
                os.symlink(rel, link)
            # The links must be durable before the directory becomes visible.
            for dirpath, _dirs, _files in os.walk(work):
                fsync_dir(Path(dirpath))
            try:
                os.rename(work, target)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    shutil.rmtree(work, ignore_errors=True)  # another puller won the race
                    return target
                raise
            fsync_dir(self.snapshots)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return target

    def remove_snapshot(self, rev: str) -> None:
        target = self.snapshot_path(rev)
        if not target.exists():
            return
        # Unpublish first, durably: rename, then fsync snapshots/. Only then may the
        # caller unlink the blobs it pointed at; after a power loss the snapshot is
        # either whole or gone, never back with dangling links.
        doomed = self.snapshots / f".del-{rev[:16]}-{uuid.uuid4().hex[:8]}"
        os.rename(target, doomed)
        fsync_dir(self.snapshots)
        shutil.rmtree(doomed, ignore_errors=True)

    def snapshot_revisions(self) -> list[str]:
        return sorted(p.name for p in self.snapshots.iterdir() if is_digest(p.name) and p.is_dir())

    # -- refs ------------------------------------------------------------------

    def set_ref(self, location_key: str, rev: str) -> None:
        if self.get_ref(location_key) == rev:
            return  # unchanged: no write (a hit on a full disk must not need one)
        self._atomic_write(self.refs / location_key, rev.encode())

    def get_ref(self, location_key: str) -> str | None:
        try:
            value = (self.refs / location_key).read_text().strip()
        except FileNotFoundError:
            return None
        return value if is_digest(value) else None

    def iter_refs(self) -> Iterator[tuple[str, str]]:
        for p in self.refs.iterdir():
            rev = self.get_ref(p.name)
            if rev:
                yield p.name, rev

    # -- space -------------------------------------------------------------------

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def blob_bytes(self) -> int:
        return sum(size for _, size in self.iter_blobs())

    # -- helpers -------------------------------------------------------------------

    def _atomic_write(self, path: Path, data: bytes) -> None:
        """temp file → write → fsync → rename → fsync dir."""
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; workers may run as other users
            os.replace(tmp, path)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)
