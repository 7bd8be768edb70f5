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
  an origin that answers a range with anything else (the whole object, another
  range) raises :class:`~weightcache.errors.OriginRangeInvalid`, which is not
  retryable: chunked, resumable pulls cannot work against it;
* ``open_range`` can be interrupted from another thread: the fetcher runs it
  inside :func:`abort_scope`, and an adapter that may block (on a socket)
  registers with :func:`current_abort` something that unblocks it
  (:meth:`Abort.on_abort`). Contextual, like a trio cancel scope, so an origin
  that wraps another (a fault injector in tests) passes it through unchanged.
  After an abort the adapter may raise anything; the fetcher, seeing
  :attr:`Abort.aborted`, reports a cancellation, not an origin fault;
* an object written with ``write_*`` is visible whole or not at all;
* no message or exception carries credentials or signed URLs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
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


class Abort:
    """The off switch of one transfer, flipped from another thread (the event loop).

    :meth:`abort` sets :attr:`aborted` and calls every unblocker registered with
    :meth:`on_abort` (an S3 adapter's shuts the socket down, so a ``recv``
    blocked on a stalled origin returns at once). An unblocker registered after
    the abort runs at once. Unblockers must not block and may raise ``OSError``
    (a socket already closed), which is ignored.
    """

    __slots__ = ("_aborted", "_lock", "_unblockers")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._aborted = False
        self._unblockers: list[Callable[[], None]] = []

    @property
    def aborted(self) -> bool:
        return self._aborted

    def on_abort(self, unblock: Callable[[], None]) -> None:
        """Call ``unblock`` on abort; replaces the previous one (one request at a time)."""
        with self._lock:
            if not self._aborted:
                self._unblockers = [unblock]
                return
        _call_quietly(unblock)

    def clear(self) -> None:
        """Forget the unblockers: the sockets they would shut may go back to a pool."""
        with self._lock:
            self._unblockers = []

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            unblockers, self._unblockers = self._unblockers, []
        for unblock in unblockers:
            _call_quietly(unblock)


def _call_quietly(unblock: Callable[[], None]) -> None:
    try:
        unblock()
    except OSError:
        return  # the socket was closed meanwhile: nothing left to unblock


_CURRENT_ABORT: ContextVar[Abort | None] = ContextVar("weightcache_abort", default=None)


def current_abort() -> Abort | None:
    """The :class:`Abort` of the transfer running in this thread, if any."""
    return _CURRENT_ABORT.get()


@contextmanager
def abort_scope(abort: Abort) -> Iterator[Abort]:
    """Run origin calls in this block under ``abort`` (see the module docstring)."""
    token = _CURRENT_ABORT.set(abort)
    try:
        yield abort
    finally:
        abort.clear()
        _CURRENT_ABORT.reset(token)


def join_key(prefix: str, path: str) -> str:
    return f"{prefix}/{path}" if prefix else path
