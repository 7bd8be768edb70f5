"""What the cache holds: the model listing behind ``/v1/status`` and ``weightcache ls``.

Blocking (directory listings, the index): call it in a worker thread. Manifests
come through a caller's reader so the daemon can serve them from its memo.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from weightcache.config import Config
from weightcache.errors import RequestInvalid
from weightcache.index import Index
from weightcache.manifest import Manifest
from weightcache.store import Store

__all__ = ["disk", "existing_store", "listing", "models"]


def models(
    store: Store,
    index: Index,
    manifest_of: Callable[[str], Manifest | None],
    leases: Mapping[str, int],
) -> list[dict[str, Any]]:
    """One row per cached revision; ``leases`` counts live leases by revision."""
    latest = {rev for _, rev in store.iter_refs()}
    rows = []
    for rev in store.snapshot_revisions():
        manifest = manifest_of(rev)
        rec = index.snapshot(rev)
        rows.append(
            {
                "revision": rev,
                "location": rec["location"] if rec else "",
                "state": "cached" if manifest is not None else "corrupt",
                "latest": rev in latest,
                "files": len(manifest.files) if manifest else 0,
                "bytes": manifest.total_bytes if manifest else 0,
                "leases": leases.get(rev, 0),
                "last_used": rec["accessed"] if rec else None,
            }
        )
    return rows


def disk(store: Store, cfg: Config) -> dict[str, Any]:
    return {
        "cache_dir": str(cfg.cache.dir),
        "used_bytes": store.blob_bytes(),
        "budget_bytes": cfg.cache.max_bytes,
        "reserve_bytes": cfg.cache.reserve_bytes,
        "free_bytes": store.free_bytes(),
    }


def existing_store(cfg: Config) -> Store:
    """The configured cache for a command that reads it (``ls``, ``verify``).

    A directory that does not exist is an error, not a new empty cache: a
    mistyped ``--cache-dir`` must not list "0 revisions" and leave a tree behind.
    An existing directory gets its layout completed, as a pull would.
    """
    root = cfg.cache.dir
    if not root.is_dir():
        raise RequestInvalid(
            f"no cache at {root}" + (" (it is not a directory)" if root.exists() else ""),
            field="cache.dir",
            hint="check --cache-dir, WEIGHTCACHE_CACHE_DIR or cache.dir; a cache is made "
            "by its first pull (`weightcache fetch REF`, `weightcache.load`, the daemon)",
        )
    store = Store(root)
    store.ensure_layout()
    return store


def listing(cfg: Config) -> dict[str, Any]:
    """``weightcache ls``: the cache read directly, with or without a daemon."""

    store = existing_store(cfg)
    index = Index(store.index_dir)
    try:

        def manifest_of(rev: str) -> Manifest | None:
            try:
                return store.load_manifest(rev)
            except Exception:  # a corrupt manifest is a row marked corrupt, not a failure
                return None

        rows = models(store, index, manifest_of, {})
        return {"cache_dir": str(cfg.cache.dir), "blob_bytes": store.blob_bytes(), "models": rows}
    finally:
        index.close()
