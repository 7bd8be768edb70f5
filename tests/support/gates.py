"""An origin that stalls on cue, and the seam that puts it under a Node.

:class:`GatedOrigin` is the Origin protocol over a real origin (a directory)
whose ranged reads, after the first ``pass_first``, block in their worker
thread until the test opens the gate: a stalled origin, held exactly as long as
the test needs and observable (:attr:`GatedOrigin.blocked` counts the
transfers parked at the gate right now). A blocked read gives up with
``OriginUnavailable`` when its transfer is aborted (where the fetcher offers
:func:`weightcache.origin.base.current_abort`) or after ``limit_s``, so a
failing test never hangs its thread pool.

:func:`wrap_origins` is the one seam: ``weightcache.node.open_origin``, so every
origin a Node opens can be wrapped, chosen by ref.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import weightcache.node
import weightcache.origin.base
from weightcache.config import Config
from weightcache.errors import OriginUnavailable
from weightcache.origin import open_origin
from weightcache.origin.base import ObjectInfo, Origin
from weightcache.refs import Ref

__all__ = ["GatedOrigin", "wrap_origins"]


def _aborted() -> bool:
    current = getattr(weightcache.origin.base, "current_abort", None)
    abort = current() if current is not None else None
    return bool(abort is not None and abort.aborted)


class GatedOrigin:
    def __init__(self, inner: Origin, *, pass_first: int = 0, limit_s: float = 30.0) -> None:
        self.inner = inner
        self.name = inner.name
        self.pass_first = pass_first
        self.limit_s = limit_s
        self.gate = threading.Event()
        self._lock = threading.Lock()
        #: ranged reads asked for so far
        self.requests = 0
        #: ranged reads parked at the gate now
        self.blocked = 0

    def open(self) -> None:
        """Let every parked and future read through."""
        self.gate.set()

    def read(self, key: str, *, max_bytes: int) -> bytes:
        return self.inner.read(key, max_bytes=max_bytes)

    @contextmanager
    def open_range(self, key: str, offset: int, length: int) -> Iterator[Iterator[bytes]]:
        with self._lock:
            n = self.requests
            self.requests += 1
        if n >= self.pass_first:
            self._wait(key)
        with self.inner.open_range(key, offset, length) as pieces:
            yield pieces

    def _wait(self, key: str) -> None:
        with self._lock:
            self.blocked += 1
        try:
            deadline = time.monotonic() + self.limit_s
            while not self.gate.wait(0.02):
                if _aborted():
                    raise OriginUnavailable(f"{self.name}/{key}: transfer aborted at the gate")
                if time.monotonic() > deadline:
                    raise OriginUnavailable(f"{self.name}/{key}: the test never opened the gate")
        finally:
            with self._lock:
                self.blocked -= 1

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def write_bytes(self, key: str, data: bytes) -> None:
        self.inner.write_bytes(key, data)

    def write_file(self, key: str, path: Path, *, part_bytes: int) -> None:
        self.inner.write_file(key, path, part_bytes=part_bytes)

    def close(self) -> None:
        self.inner.close()


def wrap_origins(monkeypatch: pytest.MonkeyPatch, wrap: Callable[[Ref, Origin], Origin]) -> None:
    """Every origin a Node opens from now on is ``wrap(ref, origin)``."""

    def opened(ref: Ref, cfg: Config) -> tuple[Origin, str]:
        origin, prefix = open_origin(ref, cfg)
        return wrap(ref, origin), prefix

    monkeypatch.setattr(weightcache.node, "open_origin", opened)
