"""A pool of threads that read file ranges straight into destination buffers.

Each :class:`ReadJob` is one ``os.preadv`` (looped over short reads) from a
descriptor into a writable :class:`memoryview`: no intermediate ``bytes``, no
copy. ``preadv`` releases the GIL, so N threads keep N reads in flight: that is
what a page-cache copy needs to use more than one core's memory bandwidth, and
what an NVMe drive needs to see a queue.

Contract, for every caller (the CPU sink and the CUDA ring):

* a job that cannot be read whole because the file ended first (a blob
  truncated under the reader, which the cache never does) raises
  :class:`~weightcache.errors.CacheCorrupt` naming the path and offset; any
  other ``OSError`` (EIO, ...) raises :class:`~weightcache.errors.CacheIOError`
  naming the path, offset and errno;
* :meth:`ReaderPool.read_all` reads every job or raises one of those errors;
  on the first error the jobs not yet started never start, and it returns or
  raises only once **no thread is still writing into any of its
  destinations** and none will (so the caller may free the buffers and close
  the descriptors right away). :class:`ReadBatch` gives the same guarantee to a
  caller that consumes jobs in order as they complete (``iter_load``);
* the pool never owns a descriptor or a buffer: the caller keeps both alive
  until the jobs are done (a batch's :meth:`ReadBatch.cancel` tells when).

Buffered reads go through the page cache, which is where other workers on the
node find the same weights; :func:`advise_sequential` asks the kernel for a
larger readahead window for them.

**Direct reads** (optional, Linux): a job that carries a :class:`DirectFile`
reads through a second descriptor of the same file opened with ``O_DIRECT``
(:meth:`DirectFile.open`), which moves the bytes from the drive into memory
without a page-cache copy and without filling the cache with pages that no
other process will use. O_DIRECT wants the buffer address, the file offset and
the length all multiples of the logical block size (:data:`DIRECT_ALIGN`): the
aligned middle of a destination whose address is congruent to its file offset
modulo that size is read straight into it; the rest (its partial first and
last blocks, or all of a destination that is not congruent) goes through a
page-aligned bounce buffer of at most :data:`BOUNCE_BYTES`, one per reading
thread, reused, and is copied out. Where the file system refuses O_DIRECT
(``EINVAL`` on open or on a read), the file falls back to buffered reads, once,
with a debug log (``read.direct_refused``); the errors are the same typed ones.
:func:`resident_fraction` (``mincore``) tells how much of a range is already
cached, for a caller that chooses per file (:class:`weightcache.client.cpu.PrivateRead`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from weightcache.errors import CacheCorrupt, CacheIOError

__all__ = [
    "BOUNCE_BYTES",
    "DIRECT_ALIGN",
    "MAX_THREADS",
    "DirectFile",
    "ReadBatch",
    "ReadJob",
    "ReaderPool",
    "advise_sequential",
    "default_threads",
    "resident_fraction",
    "shared_pool",
]

log = logging.getLogger(__name__)

#: the most threads a pool starts by default: past this, a page-cache copy is
#: memory-bound and an NVMe queue is deep enough
MAX_THREADS = 16

#: the alignment of O_DIRECT reads (buffer address, file offset, length): the
#: largest logical block size of common drives (512 or 4096), so safe for both.
#: (The exact value, ``statx``'s STATX_DIOALIGN, is not reachable from Python.)
DIRECT_ALIGN = 4096
#: the size of a thread's bounce buffer for direct reads: the largest read plan item
BOUNCE_BYTES = 16 << 20

# The one call that moves bytes, buffered or direct: tests inject faults (EIO, a
# slow read, EINVAL from a file system that refuses O_DIRECT) here.
_preadv: Callable[[int, Sequence[memoryview], int], int] = os.preadv
# How the O_DIRECT descriptor is opened: tests inject a refusal here.
_open: Callable[[str, int], int] = os.open
# Each reading thread's bounce buffer (an anonymous, hence page-aligned, mapping).
_local = threading.local()


class DirectFile:
    """A second descriptor of an open file, opened with ``O_DIRECT``, and whether it still works.

    Made by :meth:`open`; the caller closes it (:meth:`close`) once no job that
    carries it is running. :attr:`refused` turns true, once, when a direct read
    of the file was refused (``EINVAL``): every read of it is buffered from then on.
    """

    def __init__(self, fd: int, path: str, align: int = DIRECT_ALIGN) -> None:
        self.fd = fd
        self.path = path
        self.align = align
        self.refused = False
        self._lock = threading.Lock()

    @classmethod
    def open(cls, fd: int, path: str) -> DirectFile | None:
        """Reopen the file behind ``fd`` with ``O_DIRECT``; ``None`` where that is refused.

        Reopened through ``/proc/self/fd``, so it is the very file ``fd`` reads
        (whose header was checked), even if ``path`` was replaced meanwhile.
        ``path`` only names it in logs and errors.
        """
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            log.debug("read.direct_refused path=%s reason=no_o_direct_on_this_platform", path)
            return None
        try:
            direct = _open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | flag)
        except OSError as exc:
            # EINVAL: the file system does not do O_DIRECT; anything else (no
            # /proc): the buffered descriptor still works, so use it.
            log.debug(
                "read.direct_refused path=%s at=open errno=%s",
                path,
                errno.errorcode.get(exc.errno or 0, exc.errno),
            )
            return None
        return cls(direct, path)

    def refuse(self, exc: OSError) -> None:
        """Fall back to buffered reads for this file (logged once)."""
        with self._lock:
            if self.refused:
                return
            self.refused = True
        log.debug(
            "read.direct_refused path=%s at=read errno=%s",
            self.path,
            errno.errorcode.get(exc.errno or 0, exc.errno),
        )

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


@dataclass(frozen=True, slots=True)
class ReadJob:
    """Read ``len(dest)`` bytes at file ``offset`` of ``fd`` into ``dest``."""

    fd: int
    #: names the file in errors
    path: str
    #: absolute file offset
    offset: int
    #: writable; len(dest) bytes are read into it
    dest: memoryview
    #: read through this O_DIRECT descriptor of the same file (unless it was refused)
    direct: DirectFile | None = None


def read_job(job: ReadJob) -> None:
    """Do one job in the calling thread (the pool's threads call this)."""
    direct = job.direct
    if direct is not None and not direct.refused and len(job.dest):
        try:
            _read_direct(job, direct)
            return
        except _Refused as refused:
            direct.refuse(refused.error)
            # Read it all again, buffered: the bytes already written are the same.
    _read_buffered(job)


def _read_buffered(job: ReadJob) -> None:
    want = len(job.dest)
    done = 0
    while done < want:
        at = job.offset + done
        try:
            n = _preadv(job.fd, [job.dest[done:]], at)
        except OSError as exc:
            raise CacheIOError(
                f"cannot read {job.path} at byte {at}: {exc.strerror or exc}",
                hint="check the cache's disk (dmesg) and run `weightcache verify`",
                path=job.path,
                offset=at,
                errno=exc.errno,
            ) from exc
        if n == 0:
            # Blobs are immutable and read-only: a file that ends early was
            # truncated under us, or replaced by a shorter one at the same path.
            raise CacheCorrupt(
                f"{job.path} ended at byte {at}, {want - done} bytes short of the "
                f"read of {want} bytes at {job.offset}: the cached file was truncated",
                hint="run `weightcache verify --repair`, then load again",
                path=job.path,
                offset=at,
            )
        done += n


class _Refused(Exception):
    """A direct read got EINVAL: the file system refuses O_DIRECT for this file."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _io_error(job: ReadJob, at: int, exc: OSError) -> CacheIOError:
    return CacheIOError(
        f"cannot read {job.path} at byte {at}: {exc.strerror or exc}",
        hint="check the cache's disk (dmesg) and run `weightcache verify`",
        path=job.path,
        offset=at,
        errno=exc.errno,
    )


def _short(job: ReadJob, at: int) -> CacheCorrupt:
    return CacheCorrupt(
        f"{job.path} ended at byte {at}, short of the read of {len(job.dest)} bytes at "
        f"{job.offset}: the cached file was truncated",
        hint="run `weightcache verify --repair`, then load again",
        path=job.path,
        offset=at,
    )


def _address(view: memoryview) -> int:
    # A buffer export only for the moment the address is taken: nothing is
    # written through ctypes, and the caller keeps `view` alive.
    anchor = ctypes.c_char.from_buffer(view)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor


def _bounce() -> memoryview:
    # Safe to share between jobs because a thread runs one job at a time, and
    # the mapping lives as long as the thread (thread-local), never closed
    # while a view of it is in use.
    buf = getattr(_local, "bounce", None)
    if buf is None:
        buf = _local.bounce = memoryview(mmap.mmap(-1, BOUNCE_BYTES))
    view: memoryview = buf
    return view


def _pread_direct(job: ReadJob, direct: DirectFile, dest: memoryview, offset: int) -> int:
    """Aligned ``dest`` from aligned ``offset``: the bytes read, fewer only at the end of file."""
    done = 0
    while done < len(dest):
        try:
            n = _preadv(direct.fd, [dest[done:]], offset + done)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise _Refused(exc) from exc
            raise _io_error(job, max(offset + done, job.offset), exc) from exc
        done += n
        if n == 0 or n % direct.align:
            break  # the end of the file: a direct read stops short only there
    return done


def _read_direct(job: ReadJob, direct: DirectFile) -> None:
    align = direct.align
    start, end = job.offset, job.offset + len(job.dest)
    dest = job.dest
    # [lo, hi): the aligned middle read straight into dest, when there is one;
    # otherwise all of [start, end) goes through the bounce buffer.
    lo, hi = end, end
    if (_address(dest) - start) % align == 0:
        first, last = -(-start // align) * align, end // align * align
        if first < last:
            lo, hi = first, last
    if lo < hi:
        got = _pread_direct(job, direct, dest[lo - start : hi - start], lo)
        if got < hi - lo:
            raise _short(job, lo + got)
    # The rest, through the bounce buffer, in aligned chunks that cover it.
    for part_start, part_end in ((start, lo), (hi, end)):
        at = part_start
        while at < part_end:
            block = at - at % align
            stop = min(part_end, block + BOUNCE_BYTES)
            bounce = _bounce()[: -(-(stop - block) // align) * align]
            got = _pread_direct(job, direct, bounce, block)
            if block + got < stop:
                raise _short(job, max(block + got, at))
            dest[at - start : stop - start] = bounce[at - block : stop - block]
            at = stop


_libc: ctypes.CDLL | None = None


def _mincore_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        ]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc = lib
    return _libc


# mincore's vector: bit 0 of each byte says resident, the others are reserved.
_LOW_BIT = bytes(i & 1 for i in range(256))
#: pages looked at per mincore call: bounds the vector (1 byte a page) to 256 KiB
_MINCORE_PAGES = 1 << 18


def resident_fraction(fd: int, offset: int, length: int) -> float:
    """The fraction of the pages of ``[offset, offset + length)`` of ``fd`` in the page cache.

    ``mincore(2)`` over a shared read-only mapping of the range, a window at a
    time (mapping reads nothing and faults nothing in). Chosen over probing
    with ``preadv(RWF_NOWAIT)``, which would copy the bytes it finds and stops
    at the first missing page. Where it cannot tell (not Linux, a file that
    cannot be mapped), 1.0: the caller then takes the buffered path, which is
    always right. Pages past the end of the file count as not resident.
    """
    if length <= 0:
        return 1.0
    libc = _mincore_libc()
    if libc is None:
        return 1.0
    page = mmap.PAGESIZE
    first = offset - offset % page
    last = offset + length  # exclusive
    pages = present = 0
    at = first
    while at < last:
        span = min(last - at, _MINCORE_PAGES * page)
        count = -(-span // page)
        # Safe: the mapping is PROT_READ, never dereferenced here, and unmapped
        # before this returns; mincore only asks the kernel about its pages.
        addr = libc.mmap(None, span, mmap.PROT_READ, mmap.MAP_SHARED, fd, at)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return 1.0
        try:
            vec = (ctypes.c_ubyte * count)()
            if libc.mincore(addr, span, vec) != 0:
                return 1.0
        finally:
            libc.munmap(addr, span)
        pages += count
        present += bytes(vec).translate(_LOW_BIT).count(1)
        at += span
    return present / pages if pages else 1.0


def default_threads() -> int:
    """The CPUs this process may run on, capped at :data:`MAX_THREADS`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 4
    return max(1, min(MAX_THREADS, cpus))


class ReaderPool:
    """Threads that carry out :class:`ReadJob` s. Thread-safe; shared by concurrent loads."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = default_threads() if threads is None else threads
        if self.threads < 1:
            raise ValueError(f"a reader pool needs at least one thread, not {self.threads}")
        self._executor = concurrent.futures.ThreadPoolExecutor(
            self.threads, thread_name_prefix="weightcache-read"
        )

    def submit(self, job: ReadJob) -> concurrent.futures.Future[None]:
        """Start one job; its future holds ``None`` or the typed error.

        A caller that stops waiting must :meth:`~concurrent.futures.Future.cancel`
        it and wait for it (:func:`concurrent.futures.wait`) before freeing ``dest``.
        """
        return self._executor.submit(read_job, job)

    def batch(self, jobs: Iterable[ReadJob]) -> ReadBatch:
        """Start ``jobs``; wait for them in order with :meth:`ReadBatch.wait`."""
        return ReadBatch(self, jobs)

    def read_all(self, jobs: Iterable[ReadJob]) -> None:
        """Read every job, or raise the first error once nothing writes any more."""
        batch = ReadBatch(self, jobs)
        try:
            batch.wait()
        finally:
            batch.cancel()

    def close(self) -> None:
        """Stop the threads once the jobs already started are done (queued ones never run)."""
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReadBatch:
    """Jobs started together, awaited in order, stopped together.

    The first job to fail stops the batch: jobs that have not started yet skip
    their read, and :meth:`wait` raises that error once it reaches the failed
    or a skipped job. :meth:`cancel` (idempotent; call it in a ``finally``)
    returns only when no job of the batch is running.
    """

    def __init__(self, pool: ReaderPool, jobs: Iterable[ReadJob]) -> None:
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._next = 0
        self._futures: list[concurrent.futures.Future[bool]] = []
        try:
            for job in jobs:
                self._futures.append(pool._executor.submit(self._run, job))
        except BaseException:
            # A pool that was closed meanwhile, or a bad job: stop what did start.
            self.cancel()
            raise

    def __len__(self) -> int:
        return len(self._futures)

    def _run(self, job: ReadJob) -> bool:
        if self._stop.is_set():
            return False  # another job failed (or the batch was cancelled): skip
        try:
            read_job(job)
        except BaseException as exc:
            with self._lock:
                if self._error is None:
                    self._error = exc
            self._stop.set()
            raise
        return True

    def wait(self, count: int | None = None) -> None:
        """Block until jobs ``[0, count)`` (all when ``None``) are read.

        Raises the batch's first error, after stopping the batch (as
        :meth:`cancel` does), if one of them, or any job that failed meanwhile, failed.
        """
        end = len(self._futures) if count is None else min(count, len(self._futures))
        while self._next < end:
            future = self._futures[self._next]
            try:
                read = future.result()
            except concurrent.futures.CancelledError:
                read = False
            except BaseException:
                self._fail()
            if not read:
                self._fail()
            self._next += 1

    def _fail(self) -> NoReturn:
        self.cancel()
        with self._lock:
            error = self._error
        if error is None:
            raise RuntimeError("read batch was cancelled while being waited for")
        raise error

    def cancel(self) -> None:
        """Stop the batch: jobs not started never start; returns once none is running."""
        self._stop.set()
        for future in self._futures:
            future.cancel()
        concurrent.futures.wait(self._futures)


def advise_sequential(fd: int, offset: int, length: int) -> None:
    """Ask for a larger readahead window over ``[offset, offset + length)``; a hint only."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None or length <= 0:
        return
    with contextlib.suppress(OSError):
        advise(fd, offset, length, os.POSIX_FADV_SEQUENTIAL)


_shared: ReaderPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> ReaderPool:
    """The process's reader pool, created on first use with :func:`default_threads`."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = ReaderPool()
        return _shared


def _forget_shared_pool() -> None:
    # A forked child inherits the pool object but not its threads: it starts its own.
    global _shared, _shared_lock
    _shared = None
    _shared_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_shared_pool)
