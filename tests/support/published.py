"""Small models published to a ``file://`` origin, and cache configs, for in-process tests.

Each model is a directory of seeded random files published with
:func:`weightcache.publish.publish` (the real publisher), so its manifest,
chunks and revision are the ones a pull checks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from weightcache.config import Config, load_config
from weightcache.hashing import digest_file
from weightcache.manifest import Manifest
from weightcache.publish import publish
from weightcache.refs import parse_ref

__all__ = ["Model", "cache_config", "files_intact", "publish_model"]

#: small chunks, so even a small model is several ranged reads
CHUNK = "256KiB"
CHUNK_BYTES = 256 * 1024


@dataclass(frozen=True)
class Model:
    ref: str
    revision: str
    #: the published manifest (what a pull checks)
    manifest: Manifest = field(repr=False)
    #: file path in the model -> its bytes
    files: dict[str, bytes] = field(repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(len(data) for data in self.files.values())

    def at(self, rev: str | None = None) -> str:
        """The ref pinned to ``rev`` (default: its full revision)."""
        return f"{self.ref}@{rev or self.revision}"


def publish_model(
    root: Path,
    name: str,
    size: int,
    seed: int,
    *,
    extra: dict[str, bytes] | None = None,
) -> Model:
    """``root/origin/<name>``: ``weights.bin`` of ``size`` seeded bytes, plus ``extra`` files."""
    src = root / "src" / name
    src.mkdir(parents=True)
    files = {"weights.bin": random.Random(seed).randbytes(size), **(extra or {})}
    for path, data in files.items():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        (src / path).write_bytes(data)
    ref = f"file://{root}/origin/{name}"
    done = publish(src, parse_ref(ref), load_config(env={"WEIGHTCACHE_PUBLISH_CHUNK_BYTES": CHUNK}))
    return Model(ref, done.revision, done.manifest, files)


def cache_config(root: Path, **env: str) -> Config:
    """A cache under ``root/cache`` with no free-space reserve; ``env`` adds settings."""
    return load_config(
        env={
            "WEIGHTCACHE_CACHE_DIR": str(root / "cache"),
            "WEIGHTCACHE_CACHE_RESERVE_BYTES": "0",
            **env,
        }
    )


def files_intact(local_paths: list[tuple[Path, str]]) -> list[str]:
    """Problems with files that should be on disk with a digest: [] when all are.

    Blocking (hashes every file): call it in a worker thread from async code.
    """
    problems = []
    for path, blake3 in local_paths:
        try:
            actual = digest_file(path)
        except FileNotFoundError:
            problems.append(f"{path}: missing")
            continue
        if actual != blake3:
            problems.append(f"{path}: hashes to {actual}, expected {blake3}")
    return problems
