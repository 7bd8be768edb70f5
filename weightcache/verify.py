"""``weightcache verify``: re-hash the cache and reconcile the index with the files.

Like ``restic check``: every blob is re-hashed against its name, every
snapshot is checked link by link against its manifest, and the index is
compared with what is on disk. With ``repair``: corrupt blobs are moved to
``quarantine/``, snapshots that lost a blob are unlinked (the next ensure pulls
them again), stale temporary entries are removed and the index is rebuilt from
the files. Nothing verified is ever deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from weightcache.config import Config
from weightcache.errors import WeightcacheError
from weightcache.hashing import digest_file
from weightcache.index import Index
from weightcache.inventory import existing_store
from weightcache.locks import CacheLock
from weightcache.store import Store

log = logging.getLogger(__name__)

#: temporaries younger than this may belong to a live pull and are left alone
STALE_AFTER_S = 3600.0


@dataclass
class VerifyReport:
    blobs_checked: int = 0
    bytes_checked: int = 0
    corrupt_blobs: list[str] = field(default_factory=list)
    writable_blobs: list[str] = field(default_factory=list)
    bad_manifests: list[str] = field(default_factory=list)
    broken_snapshots: dict[str, str] = field(default_factory=dict)
    stale_temporaries: list[str] = field(default_factory=list)
    index_without_file: list[str] = field(default_factory=list)
    file_without_index: list[str] = field(default_factory=list)
    partial_downloads: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        """Things that are wrong (partial downloads and index lag are not)."""
        return (
            len(self.corrupt_blobs)
            + len(self.writable_blobs)
            + len(self.bad_manifests)
            + len(self.broken_snapshots)
        )

    @property
    def clean(self) -> bool:
        return self.problems == 0


BlobFn = Callable[[str, int], None]


def verify(
    store: Store,
    index: Index,
    *,
    repair: bool = False,
    on_blob: BlobFn | None = None,
    lock: CacheLock | None = None,
) -> VerifyReport:
    """Re-hash every blob, then, under the exclusive cache lock (no eviction, no new
    use of a revision meanwhile), confirm what looked wrong and reconcile the rest.

    The hashing, which takes as long as the cache is large, runs without the
    lock: blobs are read-only and only ever unlinked, so a blob evicted under it
    is skipped, never misreported. Loads wait only for the short second phase.
    """
    report = VerifyReport()
    suspects: list[tuple[str, str]] = []
    for digest, size in sorted(store.iter_blobs()):
        path = store.blob_path(digest)
        try:
            actual = digest_file(path)
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            continue  # evicted while we looked
        report.blobs_checked += 1
        report.bytes_checked += size
        if on_blob:
            on_blob(digest, size)
        if actual != digest:
            suspects.append((digest, actual))
            continue
        if mode & 0o222:
            report.writable_blobs.append(digest)
            if repair:
                os.chmod(path, 0o444)
                report.repaired.append(f"made blob {digest} read-only")
    with lock.exclusive() if lock is not None else contextlib.nullcontext():
        _reconcile(store, index, report, suspects, repair)
    return report


def _reconcile(
    store: Store,
    index: Index,
    report: VerifyReport,
    suspects: list[tuple[str, str]],
    repair: bool,
) -> None:
    for digest, actual in suspects:
        if not store.blob_path(digest).exists():
            continue  # evicted between the hash and the lock
        report.corrupt_blobs.append(digest)
        log.error("verify.corrupt blob=%s actual=%s", digest, actual)
        if repair:
            moved = store.quarantine_blob(digest)
            index.drop_blob(digest)
            report.repaired.append(f"quarantined blob {digest} -> {moved.name}")

    for rev in store.revisions():
        try:
            store.load_manifest(rev)
        except WeightcacheError as exc:
            report.bad_manifests.append(rev)
            log.error("verify.bad_manifest revision=%s error=%s", rev, exc)
            if repair:
                os.unlink(store.manifest_path(rev))
                report.repaired.append(f"removed manifest {rev}")

    for rev in store.snapshot_revisions():
        problem = _snapshot_problem(store, rev)
        if problem:
            report.broken_snapshots[rev] = problem
            log.error("verify.broken_snapshot revision=%s problem=%s", rev, problem)
            if repair:
                store.remove_snapshot(rev)
                report.repaired.append(f"unlinked snapshot {rev} ({problem})")

    cutoff = time.time() - STALE_AFTER_S
    for entry in store.snapshots.iterdir():
        # A young temporary may belong to a pull linking its snapshot right now.
        if entry.name.startswith((".tmp-", ".del-")) and entry.lstat().st_mtime < cutoff:
            report.stale_temporaries.append(str(entry))
            if repair:
                shutil.rmtree(entry, ignore_errors=True)
                report.repaired.append(f"removed stale {entry.name}")

    on_disk = dict(store.iter_blobs())
    indexed = {digest for digest, _ in index.blobs()}
    report.index_without_file = sorted(indexed - on_disk.keys())
    report.file_without_index = sorted(on_disk.keys() - indexed)
    if repair:
        for digest in report.index_without_file:
            index.drop_blob(digest)
        for digest in report.file_without_index:
            index.add_blob(digest, on_disk[digest])
        live = set(store.snapshot_revisions())
        for rev, _ in list(index.snapshots()):
            if rev not in live:
                index.drop_snapshot(rev)

    report.partial_downloads = sorted(
        p.name.removesuffix(".part") for p in store.partial.glob("*.part")
    )


@dataclass
class VerifyOutcome:
    """``weightcache verify``: the report, and the revisions pulled again after repair."""

    report: VerifyReport
    snapshots: int
    refetched: list[str] = field(default_factory=list)
    refetch_failed: list[str] = field(default_factory=list)


def verify_cache(cfg: Config, *, repair: bool = False) -> VerifyOutcome:
    """Verify the configured cache; with ``repair``, pull broken snapshots again
    (embedded, after the lock is released: a pull registers its use under it)."""
    store = existing_store(cfg)  # a missing cache is an error, not a new empty one
    index = Index(store.index_dir)
    try:
        locations = {rev: rec["location"] for rev, rec in index.snapshots()}
        report = verify(store, index, repair=repair, lock=CacheLock(store.locks))
    finally:
        index.close()
    outcome = VerifyOutcome(report, len(store.snapshot_revisions()))
    if repair:
        from weightcache.embedded import ensure_blocking

        for rev in report.broken_snapshots:
            if not locations.get(rev):
                continue
            ref = f"{locations[rev]}@{rev}"
            try:
                ensure_blocking(ref, cfg)
                outcome.refetched.append(ref)
            except WeightcacheError as exc:
                outcome.refetch_failed.append(f"{ref}: {exc.code}: {exc}")
    return outcome


def _snapshot_problem(store: Store, rev: str) -> str | None:
    manifest = None
    with contextlib.suppress(WeightcacheError):
        manifest = store.load_manifest(rev)
    if manifest is None:
        return "its manifest is missing or corrupt"
    root = store.snapshot_path(rev)
    expected = {f.path for f in manifest.files}
    for f in manifest.files:
        link = root / f.path
        if not link.is_symlink():
            return f"{f.path} is not a link into blobs/"
        target = Path(os.path.normpath(link.parent / os.readlink(link)))
        if target != store.blob_path(f.blake3):
            return f"{f.path} links to {target.name}, expected blob {f.blake3}"
        if not store.has_blob(f.blake3, f.size):
            return f"{f.path}: blob {f.blake3} is missing"
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in expected:
                return f"{rel} is not in the manifest"
    return None
