"""The origin contract: where a model's bytes come from.

An :class:`Origin` is a flat key space (``/``-separated keys) with blocking
calls; the fetch code runs them in worker threads and never knows which system
it talks to. Every adapter keeps this contract:

* a key that does not exist raises :class:`~weightcache.errors.ObjectNotFound`;
* a transient fault (connection refused or reset, timeouts, 429, 5xx, SlowDown,
  a body cut short) raises :class:`~weightcache.errors.OriginUnavailable`,
  which is retryable; credentials refused raise
  :class:`~weightcache.errors.OriginDenied`; any other refusal
  :class:`~weightcache.errors.OriginRejected`;
* ``open_range`` yields exactly the bytes asked for, or raises; a stream that
  ends early raises ``OriginUnavailable`` (callers count bytes all the same);
* an object written with ``write_*`` is visible whole or not at all;
* no message or exception carries credentials or signed URLs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int


class Origin(Protocol):
    #: where this origin points, for messages and logs (never credentials)
    name: str

    def read(self, key: str, *, max_bytes: int) -> bytes:
        """A whole small object (a manifest); refuse one larger than ``max_bytes``."""

    def open_range(
        self, key: str, offset: int, length: int
    ) -> AbstractContextManager[Iterator[bytes]]:
        """Stream ``length`` bytes of ``key`` from ``offset``, in pieces."""

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix + '/'``, recursively."""

    def write_bytes(self, key: str, data: bytes) -> None:
        """Store a small object whole (a manifest)."""

    def write_file(self, key: str, path: Path, *, part_bytes: int) -> None:
        """Upload a local file (multipart where the system has it)."""

    def close(self) -> None:
        """Release connections; the origin is not used afterwards."""


def join_key(prefix: str, path: str) -> str:
    return f"{prefix}/{path}" if prefix else path
