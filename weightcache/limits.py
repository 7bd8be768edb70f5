"""Node-wide origin limits shared by every process on the node: slots and a byte rate.

Each embedded worker (and the daemon) has its own in-process limits
(:class:`~weightcache.scheduler.PrioritySlots`, :class:`~weightcache.fetch.TokenBucket`),
so N processes on one node could use N times the node's origin budget. The two
classes here hold the budget in files of one directory (``CACHE/locks/``) that
every process of the node opens:

* :class:`NodeSlots` — at most ``capacity`` holders at once across all
  processes and threads. Slot ``i`` is an exclusive ``flock`` on ``slot-<i>.lock``.
* :class:`NodeTokenBucket` — at most ``rate`` bytes per second (plus one
  second's burst) over every origin read of every process. The bucket (tokens,
  timestamp) is 28 bytes in ``bucket.state``, read, refilled and rewritten under
  an exclusive ``flock`` on that file.

Why files and ``flock``: a ``flock`` belongs to an open file description and the
kernel drops it when the last descriptor closes, which includes the process
dying by ``kill -9`` or an OOM kill. Nothing here is a pid file or a spin lock
that outlives its holder, and no process has to be alive to clean up after
another. Locks taken through two descriptors of one process conflict like those
of two processes, so threads and processes are counted alike.

Configuration that differs between processes (a rollout in progress): each
process declares its value with a *shared* ``flock`` on
``slots-capacity-<n>.lock`` / ``bucket-rate-<n>.lock`` for as long as it uses the
limit, and every process applies the smallest value a live process declares
(re-read every ``refresh_s``). A process that dies withdraws its declaration
with its locks. Holders admitted under a larger capacity keep their slot until
they release it, so a lowered capacity takes effect within one hold.

Cost: acquiring a free slot is one ``flock`` (the slot files stay open) and a
release is one; a bucket grant is five syscalls (open, flock, pread, pwrite,
close). Measured on ext4: ~20 µs for a slot's acquire and release, ~25 µs
for a bucket grant, Python included; against a 16 MiB chunk GET (tens of
milliseconds at best) that is negligible. A waiter for a slot
polls, jittered, every ``poll_s`` backing off to ``max_poll_s`` (2 ms to
20 ms): one executor hop and at most ``capacity`` non-blocking ``flock`` calls
per poll (~60 µs for 8 busy slots), the probes of one :class:`NodeSlots`
object taking turns under a mutex. Waiters hold no thread while they wait; a
release is noticed within one poll interval of some waiter.

Guarantees and their limits (failure modes):

* Holders never exceed the smallest live capacity, except transiently as said
  above, or when someone deletes the directory while processes use it (holders
  of the old files are invisible to the new ones until they release).
* Waiters are not served in order across processes: whoever polls first after
  a release wins. Within one process the async bucket is first come, first
  served, like :class:`~weightcache.fetch.TokenBucket`; cross-process priority
  is left to the caller (put a ``PrioritySlots`` in front).
* A cancelled async acquire never keeps a slot: a probe already running in the
  executor finishes and its slot is released at once. A cancelled bucket
  acquire may have consumed its tokens (the rate is under-used, never exceeded).
* A bucket file that does not decode (torn, garbage, another version) or lies
  (not finite, stamped in the future as after a reboot — ``CLOCK_MONOTONIC``
  restarts at boot — or a debt over an hour) is reset to a full bucket and
  logged (``limits.bucket_reset``): at worst one extra second's burst.
* ``bucket.state`` is not fsynced (it means nothing after a reboot): a file
  from an earlier boot is refilled or reset as above, so the bucket starts full.
* A process frozen (SIGSTOP, a debugger) inside the five-syscall bucket update
  stalls other bucket users until it resumes or dies.
* ``fork`` without ``exec`` (multiprocessing's default start method on Linux,
  DataLoader workers): the child closes its copies of these descriptors, so a
  child never keeps its parent's slots after the parent dies. ``exec``'d
  children inherit nothing (descriptors are close-on-exec).
* The directory must be a local file system writable by every process of the
  node (same user, or a shared group and umask); I/O errors there raise
  :class:`~weightcache.errors.CacheIOError`.

Blocking (syscalls; call from a worker thread): ``NodeSlots.try_acquire``,
``NodeSlots.acquire``, ``HeldSlot.release``, ``NodeTokenBucket.try_acquire``,
``NodeTokenBucket.acquire_blocking``, ``effective_*`` and ``close``. Async
(``NodeSlots.slot``, ``NodeTokenBucket.acquire``): each syscall step hops to
``executor`` (the loop's default one when ``None``) and waits sleep through the
:class:`~weightcache.aio.Clock`, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import itertools
import logging
import math
import os
import random
import struct
import threading
import time
import weakref
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor
from contextlib import asynccontextmanager, contextmanager, suppress
from pathlib import Path
from types import TracebackType

from weightcache.aio import Clock, RealClock
from weightcache.errors import CacheIOError

__all__ = ["HeldSlot", "NodeSlots", "NodeTokenBucket"]

log = logging.getLogger(__name__)

_HINT = "the locks directory must be a writable local directory shared by every process on the node"
_STATE = struct.Struct("<8sddI")  # magic, tokens, stamp (CLOCK_MONOTONIC seconds), crc32
_MAGIC = b"WCTBKT1\0"
_MAX_DEBT_S = 3600.0  # a debt longer than this is a lie, not a large request
_EPSILON = 1e-6  # tokens (bytes)


@contextmanager
def _io(path: Path, action: str) -> Iterator[None]:
    """Translate the syscalls' OSError into the cache's error, naming the file."""
    try:
        yield
    except BlockingIOError:
        raise
    except OSError as exc:
        raise CacheIOError(
            f"cannot {action} {path}: {exc.strerror or exc}", hint=_HINT, path=str(path)
        ) from exc


def _open(path: Path, flags: int = os.O_RDONLY) -> int:
    with _io(path, "open"):
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open descriptors are close-on-exec: an exec'd child inherits no lock.
        return os.open(path, flags | os.O_CREAT, 0o644)


def _try_lock(fd: int, kind: int, path: Path) -> bool:
    with _io(path, "lock"):
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def _close(fd: int) -> None:
    # Unlock explicitly first: a fork()ed copy of the descriptor would otherwise
    # keep the lock of the open file description alive after this close.
    with suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with suppress(OSError):
        os.close(fd)


def _forget_after_fork(ref: weakref.ref[_ForkAware]) -> None:
    obj = ref()
    if obj is not None:
        obj._forget_in_child()


class _ForkAware:
    """Drops (closes without unlocking) every descriptor in a fork()ed child."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        os.register_at_fork(after_in_child=functools.partial(_forget_after_fork, weakref.ref(self)))

    def _forget_in_child(self) -> None:
        raise NotImplementedError


class _Declaration(_ForkAware):
    """This process's value of a node-wide setting, and the smallest one a live process declares.

    A declaration is a shared ``flock`` on ``<stem>-<value>.lock``; a probe that
    can take a declaration file exclusively knows nobody declares that value. A
    probe that collides with another probe counts the value as live, so at worst
    a stale, smaller value is honoured until the next refresh. Stale files (one
    per distinct value ever declared) are left in place: removing them would
    race with a process declaring that value.
    """

    def __init__(
        self, directory: Path, stem: str, value: int, now: Callable[[], float], refresh_s: float
    ) -> None:
        super().__init__()
        self._dir = directory
        self._stem = stem
        self.value = value
        self._now = now
        self._refresh_s = refresh_s
        self._fd: int | None = None
        self._smallest = value
        self._checked_at: float | None = None

    def _path(self, value: int) -> Path:
        return self._dir / f"{self._stem}-{value}.lock"

    def smallest(self) -> int:
        """The smallest live value (this one included). Blocking; cached for ``refresh_s``."""
        with self._mutex:
            if self._fd is None:
                path = self._path(self.value)
                fd = _open(path)
                with _io(path, "lock"):
                    # Blocks only while another process probes this file (two syscalls).
                    fcntl.flock(fd, fcntl.LOCK_SH)
                self._fd = fd
                self._checked_at = None
            now = self._now()
            if self._checked_at is not None and now - self._checked_at < self._refresh_s:
                return self._smallest
            smallest = self.value
            for value in sorted(self._declared_below(self.value)):
                if self._is_live(value):
                    smallest = value
                    break
            if smallest != self._smallest:
                log.info(
                    "limits.setting_changed name=%s own=%d effective=%d",
                    self._stem,
                    self.value,
                    smallest,
                )
            self._smallest = smallest
            self._checked_at = now
            return smallest

    def _declared_below(self, limit: int) -> list[int]:
        prefix, suffix = f"{self._stem}-", ".lock"
        with _io(self._dir, "list"):
            names = os.listdir(self._dir)
        values = []
        for name in names:
            digits = name[len(prefix) : -len(suffix)]
            if name.startswith(prefix) and name.endswith(suffix) and digits.isdigit():
                values.append(int(digits))
        return [v for v in values if v < limit]

    def _is_live(self, value: int) -> bool:
        path = self._path(value)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise CacheIOError(f"cannot open {path}: {exc.strerror}", hint=_HINT) from exc
        try:
            return not _try_lock(fd, fcntl.LOCK_EX, path)
        finally:
            _close(fd)

    def close(self) -> None:
        with self._mutex:
            if self._fd is not None:
                _close(self._fd)
                self._fd = None

    def _forget_in_child(self) -> None:
        self._mutex = threading.Lock()  # another thread may have held it at fork
        if self._fd is not None:
            with suppress(OSError):
                os.close(self._fd)  # not LOCK_UN: that would withdraw the parent's declaration
        self._fd = None
        self._checked_at = None


class HeldSlot:
    """One slot of a :class:`NodeSlots`, held until :meth:`release` (or the process dies)."""

    def __init__(self, slots: NodeSlots, index: int, token: int) -> None:
        self._slots = slots
        self.index = index
        self._token = token

    def release(self) -> None:
        """Give the slot back; idempotent. Blocking (one ``flock``)."""
        self._slots._release(self.index, self._token)

    def __enter__(self) -> HeldSlot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"HeldSlot(index={self.index})"


class NodeSlots(_ForkAware):
    """At most ``capacity`` holders at once over every process using ``directory``.

    Blocking forms (:meth:`try_acquire`, :meth:`acquire`, :meth:`HeldSlot.release`)
    run in worker threads; the async form is ``async with slots.slot() as held:``.
    """

    def __init__(
        self,
        directory: Path,
        capacity: int,
        *,
        clock: Clock | None = None,
        executor: Executor | None = None,
        rng: random.Random | None = None,
        poll_s: float = 0.002,
        max_poll_s: float = 0.02,
        refresh_s: float = 1.0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 0 < poll_s <= max_poll_s:
            raise ValueError(f"need 0 < poll_s <= max_poll_s, got {poll_s}, {max_poll_s}")
        super().__init__()
        self.directory = directory
        self.capacity = capacity
        self._clock: Clock = clock or RealClock()
        self._executor = executor
        self._rng = rng or random.Random()
        self._poll_s = poll_s
        self._max_poll_s = max_poll_s
        self._declaration = _Declaration(
            directory, "slots-capacity", capacity, self._clock.monotonic, refresh_s
        )
        # One open descriptor per slot file, opened on first use. A slot held by
        # this process is marked in _held (with the holder's token), since a
        # second flock on the same descriptor would succeed rather than conflict.
        self._fds: dict[int, int] = {}
        self._held: dict[int, int] = {}
        self._tokens = itertools.count()
        self._count_lock = threading.Lock()
        self._waiting = 0

    @property
    def in_use(self) -> int:
        """Slots held through this object (this process's share, not the node's)."""
        return len(self._held)

    @property
    def waiting(self) -> int:
        """Callers of this object waiting for a slot."""
        return self._waiting

    def effective_capacity(self) -> int:
        """The smallest capacity a live process declares (blocking)."""
        return min(self.capacity, self._declaration.smallest())

    def _path(self, index: int) -> Path:
        return self.directory / f"slot-{index}.lock"

    def try_acquire(self) -> HeldSlot | None:
        """Take a free slot now, or return None. Blocking: at most ``capacity`` flocks."""
        capacity = self.effective_capacity()
        with self._mutex:
            start = self._rng.randrange(capacity)
            for index in itertools.chain(range(start, capacity), range(start)):
                if index in self._held:
                    continue
                fd = self._fds.get(index)
                if fd is None:
                    fd = self._fds[index] = _open(self._path(index))
                if _try_lock(fd, fcntl.LOCK_EX, self._path(index)):
                    token = next(self._tokens)
                    self._held[index] = token
                    return HeldSlot(self, index, token)
        return None

    def acquire(self, timeout_s: float | None = None) -> HeldSlot:
        """Wait (in this thread, for real time) for a slot; TimeoutError after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._count_waiter(1)
        try:
            attempt = 0
            while True:
                held = self.try_acquire()
                if held is not None:
                    return held
                delay = self._poll_delay(attempt)
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"no slot free in {self.directory} after {timeout_s} s")
                    delay = min(delay, left)
                time.sleep(delay)
                attempt += 1
        finally:
            self._count_waiter(-1)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[HeldSlot]:
        """Hold a slot for the body; polls through the clock, syscalls in the executor.

        Cancellation at any point leaves no slot held: a probe that wins after
        its caller was cancelled releases what it took.
        """
        held = await self._acquire_async()
        try:
            yield held
        finally:
            await self._release_async(held)

    async def _acquire_async(self) -> HeldSlot:
        loop = asyncio.get_running_loop()
        self._count_waiter(1)
        try:
            attempt = 0
            while True:
                probe = loop.run_in_executor(self._executor, self.try_acquire)
                try:
                    # shield: the probe runs to completion even if we are cancelled,
                    # so its outcome is always seen (below) rather than lost.
                    held = await asyncio.shield(probe)
                except asyncio.CancelledError:
                    probe.add_done_callback(self._release_orphan)
                    raise
                if held is not None:
                    return held
                await self._clock.sleep(self._poll_delay(attempt))
                attempt += 1
        finally:
            self._count_waiter(-1)

    def _release_orphan(self, probe: asyncio.Future[HeldSlot | None]) -> None:
        if probe.cancelled() or probe.exception() is not None:
            return
        held = probe.result()
        if held is not None:
            log.debug("limits.slot_orphan_released index=%d", held.index)
            self._release_soon(held)

    def _release_soon(self, held: HeldSlot) -> None:
        try:
            asyncio.get_running_loop().run_in_executor(self._executor, held.release)
        except RuntimeError:  # executor or loop shut down: one syscall inline beats a leak
            held.release()

    async def _release_async(self, held: HeldSlot) -> None:
        loop = asyncio.get_running_loop()
        try:
            job = loop.run_in_executor(self._executor, held.release)
        except RuntimeError:  # executor shut down
            held.release()
            return
        await asyncio.shield(job)  # cancelled here, the release still runs

    def _release(self, index: int, token: int) -> None:
        with self._mutex:
            if self._held.get(index) != token:
                return  # released already, or taken over since (after a fork)
            with _io(self._path(index), "unlock"):
                fcntl.flock(self._fds[index], fcntl.LOCK_UN)
            del self._held[index]

    def _poll_delay(self, attempt: int) -> float:
        base = min(self._max_poll_s, self._poll_s * 2.0 ** min(attempt, 16))
        return base * (0.5 + self._rng.random())

    def _count_waiter(self, delta: int) -> None:
        # Its own lock: the event loop must not wait for a probe's syscalls.
        with self._count_lock:
            self._waiting += delta

    def close(self) -> None:
        """Close every descriptor, releasing slots still held and the declaration."""
        with self._mutex:
            for fd in self._fds.values():
                _close(fd)
            self._fds.clear()
            self._held.clear()
        self._declaration.close()

    def _forget_in_child(self) -> None:
        self._mutex = threading.Lock()
        for fd in self._fds.values():
            with suppress(OSError):
                os.close(fd)  # not LOCK_UN: the parent still holds its slots
        self._fds = {}
        self._held = {}
        self._count_lock = threading.Lock()
        self._waiting = 0


class NodeTokenBucket:
    """Bytes-per-second limit over every origin read of every process using ``directory``.

    The semantics of :class:`weightcache.fetch.TokenBucket`: the bucket holds up
    to one second's worth (``capacity == rate``); a request is granted when the
    bucket holds ``min(n, capacity)`` tokens, and one larger than the capacity
    is granted once the bucket is full, driving it into debt. ``clock`` times the
    bucket (its ``monotonic`` must be the system-wide ``CLOCK_MONOTONIC`` outside
    tests) and paces the async form.
    """

    def __init__(
        self,
        directory: Path,
        rate_bytes_per_s: int,
        *,
        clock: Clock | None = None,
        executor: Executor | None = None,
        refresh_s: float = 1.0,
    ) -> None:
        if rate_bytes_per_s < 1:
            raise ValueError(f"rate_bytes_per_s must be >= 1, got {rate_bytes_per_s}")
        self.directory = directory
        self.path = directory / "bucket.state"
        self.rate = rate_bytes_per_s
        self._clock: Clock = clock or RealClock()
        self._executor = executor
        self._declaration = _Declaration(
            directory, "bucket-rate", rate_bytes_per_s, self._clock.monotonic, refresh_s
        )
        self._fifo: asyncio.Lock | None = None

    def effective_rate(self) -> int:
        """The smallest rate a live process declares (blocking)."""
        return min(self.rate, self._declaration.smallest())

    def try_acquire(self, n: int) -> float:
        """One attempt (blocking): 0.0 when ``n`` bytes are granted, else the seconds
        to wait before asking again."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rate = float(self.effective_rate())
        fd = _open(self.path, os.O_RDWR)
        try:
            with _io(self.path, "update"):
                fcntl.flock(fd, fcntl.LOCK_EX)  # held for a pread and a pwrite
                raw = os.pread(fd, _STATE.size + 1, 0)
                now = self._clock.monotonic()
                tokens, stamp = self._decode(raw, now, rate)
                tokens = min(rate, tokens + (now - stamp) * rate)
                need = min(float(n), rate)
                # The tolerance absorbs rounding in the refill: a wait computed to the
                # last ulp could otherwise round to no time at all, again and again.
                if tokens >= need - _EPSILON:
                    tokens -= n
                    wait = 0.0
                else:
                    wait = (need - tokens) / rate
                body = struct.pack("<8sdd", _MAGIC, tokens, now)
                os.pwrite(fd, body + struct.pack("<I", zlib.crc32(body)), 0)
                if len(raw) > _STATE.size:
                    os.ftruncate(fd, _STATE.size)
        finally:
            _close(fd)
        return wait

    def _decode(self, raw: bytes, now: float, rate: float) -> tuple[float, float]:
        """(tokens, stamp) from the file, or a full bucket stamped ``now`` if it is
        new, unreadable or lying."""
        if not raw:
            return rate, now
        reason = None
        if len(raw) != _STATE.size:
            reason = f"size {len(raw)}"
        else:
            magic, tokens, stamp, crc = _STATE.unpack(raw)
            tokens, stamp = float(tokens), float(stamp)
            if magic != _MAGIC:
                reason = "bad magic"
            elif crc != zlib.crc32(raw[: _STATE.size - 4]):
                reason = "bad checksum"
            elif not (math.isfinite(tokens) and math.isfinite(stamp)) or stamp < 0:
                reason = "not finite, or negative"
            elif stamp > now:
                reason = "stamped in the future (a reboot?)"
            elif tokens < -_MAX_DEBT_S * rate:
                reason = f"debt of {-tokens / rate:.0f} s"
            else:
                return tokens, stamp
        log.warning("limits.bucket_reset path=%s reason=%s", self.path, reason)
        return rate, now

    def acquire_blocking(self, n: int) -> None:
        """Wait in this thread, for real time, until ``n`` bytes are granted."""
        while (wait := self.try_acquire(n)) > 0:
            time.sleep(wait)

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` bytes are granted: first come, first served in this process.

        Drop-in for :meth:`weightcache.fetch.TokenBucket.acquire`.
        """
        if self._fifo is None:
            self._fifo = asyncio.Lock()
        loop = asyncio.get_running_loop()
        async with self._fifo:
            while (wait := await loop.run_in_executor(self._executor, self.try_acquire, n)) > 0:
                await self._clock.sleep(wait)

    def close(self) -> None:
        """Withdraw this process's rate declaration."""
        self._declaration.close()
