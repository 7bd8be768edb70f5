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

Optional hints (:func:`advise_sequential`) ask the kernel for a larger
readahead window. O_DIRECT is not used: reads go through the page cache, which
is where other workers on the node find the same weights.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

from weightcache.errors import CacheCorrupt, CacheIOError

__all__ = [
    "MAX_THREADS",
    "ReadBatch",
    "ReadJob",
    "ReaderPool",
    "advise_sequential",
    "default_threads",
    "shared_pool",
]

#: the most threads a pool starts by default: past this, a page-cache copy is
#: memory-bound and an NVMe queue is deep enough
MAX_THREADS = 16

# The one call that moves bytes: tests inject faults (EIO, a slow read) here.
_preadv: Callable[[int, Sequence[memoryview], int], int] = os.preadv


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


def read_job(job: ReadJob) -> None:
    """Do one job in the calling thread (the pool's threads call this)."""
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
