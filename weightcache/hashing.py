"""BLAKE3 helpers: the only module that imports ``blake3``.

Digests are lower-case hex strings of 32 bytes (64 characters) everywhere in
weightcache: in manifests, blob names and revisions.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import blake3 as _blake3

DIGEST_HEX_LEN = 64
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
# blake3's own reader is multi-threaded over an mmap; small files are not worth threads.
_MMAP_THRESHOLD = 1 << 20


def is_digest(value: object) -> bool:
    """True for a full lower-case hex BLAKE3 digest."""
    return isinstance(value, str) and _HEX_DIGEST.fullmatch(value) is not None


def digest_bytes(data: bytes | bytearray | memoryview) -> str:
    return _blake3.blake3(data).hexdigest()


class Hasher:
    """Incremental BLAKE3 over streamed pieces (a chunk arriving from the origin)."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = _blake3.blake3()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def digest_file(path: str | os.PathLike[str]) -> str:
    """BLAKE3 of a whole file, multi-threaded for large files."""
    size = os.stat(path).st_size
    if size >= _MMAP_THRESHOLD:
        h = _blake3.blake3(max_threads=_blake3.blake3.AUTO)
        h.update_mmap(os.fspath(path))
        return h.hexdigest()
    with open(path, "rb") as f:
        return _blake3.blake3(f.read()).hexdigest()


def digest_range(fd: int, offset: int, length: int, *, block: int = 4 << 20) -> str:
    """BLAKE3 of ``length`` bytes of an open file from ``offset`` (pread, no seek)."""
    h = _blake3.blake3()
    done = 0
    while done < length:
        piece = os.pread(fd, min(block, length - done), offset + done)
        if not piece:
            break  # a short file hashes short: the caller compares digests
        h.update(piece)
        done += len(piece)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class FileDigest:
    """What a manifest records for one file."""

    size: int
    blake3: str
    chunks: tuple[str, ...]


def digest_stream(pieces: Iterable[bytes], chunk_size: int) -> FileDigest:
    """Whole-file and per-chunk digests of a byte stream in one pass.

    Used by ``publish`` (local files) and ``index`` (objects streamed from the
    origin), so both agree on chunk boundaries by construction.
    """
    whole = _blake3.blake3()
    chunk = _blake3.blake3()
    in_chunk = 0
    size = 0
    chunks: list[str] = []
    for piece in pieces:
        whole.update(piece)
        size += len(piece)
        view = memoryview(piece)
        while view:
            take = min(len(view), chunk_size - in_chunk)
            chunk.update(view[:take])
            in_chunk += take
            view = view[take:]
            if in_chunk == chunk_size:
                chunks.append(chunk.hexdigest())
                chunk = _blake3.blake3()
                in_chunk = 0
    if in_chunk:
        chunks.append(chunk.hexdigest())
    return FileDigest(size=size, blake3=whole.hexdigest(), chunks=tuple(chunks))


def digest_path(path: Path, chunk_size: int, *, block: int = 8 << 20) -> FileDigest:
    """:func:`digest_stream` over a local file."""

    def pieces() -> Iterable[bytes]:
        with open(path, "rb") as f:
            while piece := f.read(block):
                yield piece

    return digest_stream(pieces(), chunk_size)
