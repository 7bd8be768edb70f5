"""The manifest: what a revision of a model is, byte for byte.

Stored at ``PREFIX/weightcache.manifest.json`` (the current revision) and at
``PREFIX/.weightcache/revisions/<rev>.json`` (every published revision, so a
pinned ``@REV`` stays resolvable after the prefix is republished)::

    {"format": "weightcache.manifest/1",
     "files": [{"path": "model-00001-of-00002.safetensors", "size": 123,
                "blake3": "<64 hex>", "chunk_size": 16777216,
                "chunks": ["<64 hex>", ...]}, ...]}

The revision is the BLAKE3 of the manifest's exact bytes. :func:`dump` writes
the canonical form (sorted keys, no spaces, files sorted by path), so the same
content always publishes as the same revision. :func:`parse` accepts any JSON
spelling but validates everything: paths must stay inside the prefix.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from weightcache.errors import ManifestInvalid
from weightcache.hashing import FileDigest, digest_bytes, is_digest

FORMAT = "weightcache.manifest/1"
MANIFEST_NAME = "weightcache.manifest.json"
RESERVED_DIR = ".weightcache"
REVISIONS_DIR = f"{RESERVED_DIR}/revisions"

MAX_MANIFEST_BYTES = 64 << 20
MAX_FILES = 100_000
MAX_FILE_SIZE = 1 << 48  # 256 TiB: anything larger is a lie, not a model
MIN_CHUNK = 4096
MAX_CHUNK = 1 << 30
MAX_PATH_LEN = 1024
MAX_SEGMENT_LEN = 255


def path_problem(path: str) -> str | None:
    """Why ``path`` is not a safe relative POSIX path inside a prefix, or None.

    Shared by manifest validation and ref parsing: no absolute paths, no
    ``..`` or ``.`` segments, no empty segments, no backslashes, no NUL or
    control characters.
    """
    if not isinstance(path, str):
        return f"path must be a string, got {type(path).__name__}"
    if not path:
        return "path is empty"
    if len(path) > MAX_PATH_LEN:
        return f"path longer than {MAX_PATH_LEN} characters"
    if "\x00" in path:
        return "path contains a NUL byte"
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        return "path contains a control character"
    if "\\" in path:
        return "path contains a backslash"
    if path.startswith("/"):
        return "path is absolute"
    for segment in path.split("/"):
        if segment == "":
            return "path has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"path has a {segment!r} segment"
        if len(segment) > MAX_SEGMENT_LEN:
            return f"path segment longer than {MAX_SEGMENT_LEN} characters"
    return None


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str
    size: int
    blake3: str
    chunk_size: int
    chunks: tuple[str, ...]

    def chunk_range(self, index: int) -> tuple[int, int]:
        """(offset, length) of chunk ``index``."""
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.size - offset)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "blake3": self.blake3,
            "chunk_size": self.chunk_size,
            "chunks": list(self.chunks),
        }


@dataclass(frozen=True, slots=True)
class Manifest:
    files: tuple[FileEntry, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


def n_chunks(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


def _bad(message: str, **facts: Any) -> ManifestInvalid:
    return ManifestInvalid(f"invalid manifest: {message}", **facts)


def _int_field(entry: dict[str, Any], name: str, where: str) -> int:
    value = entry.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{where}.{name} must be an integer, got {value!r}")
    return value


def _entry(raw: Any, index: int) -> FileEntry:
    where = f"files[{index}]"
    if not isinstance(raw, dict):
        raise _bad(f"{where} must be an object")
    unknown = set(raw) - {"path", "size", "blake3", "chunk_size", "chunks"}
    if unknown:
        raise _bad(f"{where} has unknown fields {sorted(unknown)}")
    path = raw.get("path")
    problem = path_problem(path) if isinstance(path, str) else "path must be a string"
    if problem:
        raise _bad(f"{where}.path {path!r}: {problem}", path=repr(path))
    assert isinstance(path, str)
    if path in (MANIFEST_NAME, RESERVED_DIR) or path.startswith(RESERVED_DIR + "/"):
        raise _bad(f"{where}.path {path!r} is reserved for weightcache itself", path=path)
    size = _int_field(raw, "size", where)
    if not 0 <= size <= MAX_FILE_SIZE:
        raise _bad(f"{where}.size {size} out of range 0..{MAX_FILE_SIZE}", path=path)
    chunk_size = _int_field(raw, "chunk_size", where)
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK:
        raise _bad(
            f"{where}.chunk_size {chunk_size} out of range {MIN_CHUNK}..{MAX_CHUNK}", path=path
        )
    digest = raw.get("blake3")
    if not is_digest(digest):
        raise _bad(f"{where}.blake3 must be 64 lower-case hex characters", path=path)
    chunks = raw.get("chunks")
    if not isinstance(chunks, list) or not all(is_digest(c) for c in chunks):
        raise _bad(f"{where}.chunks must be a list of 64-hex BLAKE3 digests", path=path)
    expected = n_chunks(size, chunk_size)
    if len(chunks) != expected:
        raise _bad(
            f"{where} ({path}) lists {len(chunks)} chunks, but size {size} in chunks of "
            f"{chunk_size} needs {expected}",
            path=path,
        )
    assert isinstance(digest, str)
    return FileEntry(path, size, digest, chunk_size, tuple(chunks))


def from_json(doc: Any) -> Manifest:
    """Validate a decoded manifest document."""
    if not isinstance(doc, dict):
        raise _bad("top level must be a JSON object")
    if doc.get("format") != FORMAT:
        raise _bad(f"format must be {FORMAT!r}, got {doc.get('format')!r}")
    unknown = set(doc) - {"format", "files"}
    if unknown:
        raise _bad(f"unknown top-level fields {sorted(unknown)}")
    files = doc.get("files")
    if not isinstance(files, list):
        raise _bad("files must be a list")
    if len(files) > MAX_FILES:
        raise _bad(f"{len(files)} files is more than the limit of {MAX_FILES}")
    entries = [_entry(raw, i) for i, raw in enumerate(files)]
    seen: set[str] = set()
    for e in entries:
        if e.path in seen:
            raise _bad(f"duplicate path {e.path!r}", path=e.path)
        seen.add(e.path)
    # "a" and "a/b" cannot both be files on any file system.
    for e in entries:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in seen:
                raise _bad(f"path {e.path!r} lies under file {parent!r}", path=e.path)
    return Manifest(tuple(sorted(entries, key=lambda e: e.path)))


def parse(raw: bytes) -> tuple[Manifest, str]:
    """Parse manifest bytes; return the manifest and its revision (BLAKE3 of ``raw``)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _bad(f"{len(raw)} bytes is more than the limit of {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise _bad(f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise _bad(f"not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    except RecursionError as exc:
        raise _bad("JSON nested too deeply") from exc
    return from_json(doc), digest_bytes(raw)


def dump(manifest: Manifest) -> bytes:
    """Canonical bytes: the same content always gives the same revision."""
    doc = {"format": FORMAT, "files": [f.to_json() for f in manifest.files]}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def build(entries: Iterable[tuple[str, FileDigest]], chunk_size: int) -> Manifest:
    """A validated manifest from (relative path, digest) pairs."""
    doc = {
        "format": FORMAT,
        "files": [
            {
                "path": path,
                "size": d.size,
                "blake3": d.blake3,
                "chunk_size": chunk_size,
                "chunks": list(d.chunks),
            }
            for path, d in entries
        ],
    }
    return from_json(doc)
