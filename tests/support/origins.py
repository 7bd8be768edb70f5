"""Test doubles at one named seam: an Origin wrapper that injects faults, and a fake clock.

The wrapper is a full implementation of the Origin protocol over a real origin
(a directory); it changes only what a fault plan says, so every other
behaviour is the real one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from weightcache.errors import OriginUnavailable
from weightcache.origin.base import ObjectInfo, Origin

# A fault decides, per request number for a key, what happens: None (serve),
# "503" (raise OriginUnavailable), "short" (end the body early), "flip" (flip a byte).
FaultPlan = Callable[[str, int, int], str | None]


@dataclass
class FaultyOrigin:
    inner: Origin
    plan: FaultPlan
    requests: list[tuple[str, int, int, str | None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.inner.name

    def read(self, key: str, *, max_bytes: int) -> bytes:
        return self.inner.read(key, max_bytes=max_bytes)

    @contextmanager
    def open_range(self, key: str, offset: int, length: int) -> Iterator[Iterator[bytes]]:
        with self._lock:
            n = sum(1 for r in self.requests if r[0] == key and r[1] == offset)
            fault = self.plan(key, offset, n)
            self.requests.append((key, offset, length, fault))
        if fault == "503":
            raise OriginUnavailable(f"{self.name}/{key}: origin answered 503 SlowDown")
        with self.inner.open_range(key, offset, length) as pieces:
            data = b"".join(pieces)
        if fault == "short":
            data = data[: len(data) // 2]
        elif fault == "flip":
            data = bytes([data[0] ^ 0xFF]) + data[1:]

        def gen() -> Iterator[bytes]:
            yield data
            if fault == "short":
                raise OriginUnavailable(f"{self.name}/{key}: connection reset")

        yield gen()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def write_bytes(self, key: str, data: bytes) -> None:
        self.inner.write_bytes(key, data)

    def write_file(self, key: str, path: Path, *, part_bytes: int) -> None:
        self.inner.write_file(key, path, part_bytes=part_bytes)

    def close(self) -> None:
        self.inner.close()


class FakeClock:
    """Time that moves only when someone sleeps; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)
