"""Putting models into object storage: ``publish`` (local directory) and ``index`` (in place).

Both end the same way: the manifest is written to
``PREFIX/.weightcache/revisions/<rev>.json`` and then, last, to
``PREFIX/weightcache.manifest.json``. Until that last write the prefix still
names its previous revision, so a half-done publish is never visible.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from weightcache.config import Config
from weightcache.errors import ManifestInvalid, OriginUnavailable, RefInvalid, RequestInvalid
from weightcache.hashing import FileDigest, digest_bytes, digest_path, digest_stream
from weightcache.manifest import (
    MANIFEST_NAME,
    RESERVED_DIR,
    REVISIONS_DIR,
    Manifest,
    build,
    dump,
    path_problem,
)
from weightcache.origin import Origin, join_key, open_origin
from weightcache.refs import Ref
from weightcache.retry import Backoff, retry_sync

log = logging.getLogger(__name__)
T = TypeVar("T")

FileFn = Callable[[str, int], None]


@dataclass(frozen=True)
class Published:
    ref: str
    revision: str
    manifest: Manifest
    uploaded_bytes: int


def _is_ours(rel: str) -> bool:
    return rel in (MANIFEST_NAME, RESERVED_DIR) or rel.startswith(RESERVED_DIR + "/")


def local_files(directory: Path) -> list[tuple[str, Path]]:
    """Regular files under ``directory`` as (relative POSIX path, path), sorted.

    Symbolic links to files are followed (a Hugging Face snapshot is made of
    them); links to directories are not, so a loop cannot hang the walk.
    """
    if not directory.is_dir():
        # The caller named the wrong thing: a usage error, before any origin is touched.
        what = "is not a directory" if directory.exists() else "does not exist"
        raise RequestInvalid(
            f"cannot publish {directory}: it {what}",
            path=str(directory),
            hint="publish takes a local model directory (every file under it is uploaded)",
        )
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(directory).as_posix()
            if _is_ours(rel) or not full.is_file():
                continue
            problem = path_problem(rel)
            if problem:
                raise ManifestInvalid(f"cannot publish {rel!r}: {problem}", path=rel)
            out.append((rel, full))
    if not out:
        raise ManifestInvalid(f"{directory} holds no files to publish", path=str(directory))
    return out


def _retrying(cfg: Config, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """An upload step with the fetch retry policy (backoff with full jitter).

    Every step is idempotent (a whole object put again), so a transient fault
    costs one object, not the whole publish.
    """
    policy = cfg.fetch
    return retry_sync(
        lambda: fn(*args, **kwargs),
        Backoff(policy.retries, policy.backoff_base_s, policy.backoff_max_s),
        on=OriginUnavailable,
        log=log,
        what="publish",
    )


def _write_manifest(cfg: Config, origin: Origin, prefix: str, manifest: Manifest) -> str:
    raw = dump(manifest)
    rev = digest_bytes(raw)
    _retrying(cfg, origin.write_bytes, join_key(prefix, f"{REVISIONS_DIR}/{rev}.json"), raw)
    _retrying(cfg, origin.write_bytes, join_key(prefix, MANIFEST_NAME), raw)  # last: switch-over
    return rev


def _check_target(ref: Ref) -> None:
    if ref.rev:
        raise RefInvalid(
            f"cannot publish to a pinned revision ({ref}); a revision is the result of publishing",
            ref=str(ref),
        )


def publish(directory: Path, ref: Ref, cfg: Config, *, on_file: FileFn | None = None) -> Published:
    """Hash and upload every file of ``directory``, then its manifest."""
    _check_target(ref)
    files = local_files(directory)
    chunk = cfg.publish.chunk_bytes
    origin, prefix = open_origin(ref, cfg)
    try:
        ensure_bucket = getattr(origin, "ensure_bucket", None)
        if ensure_bucket is not None:
            _retrying(cfg, ensure_bucket)
        workers = min(8, max(2, os.cpu_count() or 2))
        with ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="weightcache-publish"
        ) as ex:
            digests: list[FileDigest] = list(ex.map(lambda f: digest_path(f[1], chunk), files))

            def upload(item: tuple[tuple[str, Path], FileDigest]) -> int:
                (rel, path), d = item
                _retrying(
                    cfg,
                    origin.write_file,
                    join_key(prefix, rel),
                    path,
                    part_bytes=cfg.publish.part_bytes,
                )
                if on_file:
                    on_file(rel, d.size)
                log.info("publish.uploaded key=%s bytes=%d", join_key(prefix, rel), d.size)
                return d.size

            uploaded = sum(ex.map(upload, zip(files, digests, strict=True)))
        manifest = build(((rel, d) for (rel, _), d in zip(files, digests, strict=True)), chunk)
        rev = _write_manifest(cfg, origin, prefix, manifest)
    finally:
        origin.close()
    log.info("publish.done ref=%s revision=%s files=%d", ref, rev, len(files))
    return Published(str(ref.with_rev(rev)), rev, manifest, uploaded)


def index(ref: Ref, cfg: Config, *, on_file: FileFn | None = None) -> Published:
    """Write a manifest for objects someone else uploaded, hashing them in place."""
    _check_target(ref)
    chunk = cfg.publish.chunk_bytes
    origin, prefix = open_origin(ref, cfg)
    try:
        base = f"{prefix}/" if prefix else ""
        objects = [
            (info.key[len(base) :], info)
            for info in origin.list(prefix)
            if not _is_ours(info.key[len(base) :])
        ]
        if not objects:
            raise ManifestInvalid(f"no objects under {ref.location} to index", ref=str(ref))

        def hash_object(item: tuple[str, object]) -> tuple[str, FileDigest]:
            rel, info = item
            size = info.size  # type: ignore[attr-defined]
            if size == 0:
                d = digest_stream((), chunk)  # a zero-length range GET would mean "all"
            else:
                with origin.open_range(join_key(prefix, rel), 0, size) as pieces:
                    d = digest_stream(pieces, chunk)
            if d.size != size:
                raise ManifestInvalid(f"{rel} changed while it was being indexed", path=rel)
            if on_file:
                on_file(rel, size)
            return rel, d

        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="weightcache-index") as ex:
            entries = list(ex.map(hash_object, objects))
        manifest = build(entries, chunk)
        rev = _write_manifest(cfg, origin, prefix, manifest)
    finally:
        origin.close()
    log.info("index.done ref=%s revision=%s files=%d", ref, rev, len(entries))
    return Published(str(ref.with_rev(rev)), rev, manifest, 0)
