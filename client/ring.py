"""A bounded ring of staging buffers between file reads and asynchronous copies.

The CUDA sink (:mod:`weightcache.client.cuda`) moves file bytes to a device
through a few pinned host buffers: reader threads fill a buffer
(:class:`~weightcache.client.readers.ReaderPool` jobs whose destination is a
slice of it), the buffer's copies to the device are queued on a dedicated
stream the moment its last read lands, and the buffer is filled again once
those copies' event has completed. :class:`StagingRing` is that pipeline with
the device behind a :class:`Copier`, so the same code runs with CUDA
(:class:`~weightcache.client.cuda.CudaCopier`) and without it
(:class:`ThreadCopier`: threads stand in for streams and events, destinations
are host memory; the CPU tests and ``loadtest/gpu_bench.py --dry-run`` use it).
It never imports torch.

A buffer goes round one cycle per batch::

    free --acquire--> filling --submit reads--> reading --last read lands--> issuing
         <--event done (whoever sees it first)-- copying <--copies queued--'
         <--a read failed, the load was cancelled, or the copy failed to queue--'

Guarantees:

* **Bounded memory.** A ring allocates at most ``buffers`` staging buffers of
  ``buffer_bytes`` each, lazily, and keeps them for its lifetime: the process's
  twentieth load uses the same buffers as its first (:meth:`StagingRing.stats`
  counts allocations). :meth:`StagingRing.reserve` allocates them up front.
* **No buffer is written while a copy reads it.** A buffer goes back to the
  free list only once its copies' event reports completion (``query()`` or
  ``synchronize()``), or when no copy was ever queued from it.
* **In-order results from out-of-order completion.** :meth:`StagingRing.transfer`
  yields each segment once its bytes *and those of every segment before it*
  have landed, whatever order the events complete in; a buffer whose copies
  completed early is recycled at once, even while an older one is still busy.
* **Shared by concurrent loads.** One ring serves every load of a process on
  its device. A buffer's cycle needs nothing from the load that filled it once
  its reads are submitted (the last read's callback queues the copies, anyone
  may observe the event), so a load paused between two tensors (a consumer
  that stops iterating for a while) never starves another: a load that finds
  no free buffer takes one whose copies completed, whoever filled it.
* **Failure and cancellation are clean.** An error in a read or a copy stops
  the load: reads not yet started are cancelled, and once every read in flight
  has returned and every queued copy has completed, every buffer is back on
  the free list; then the error is raised, typed (an ``OSError`` from a read
  becomes :class:`~weightcache.errors.CacheIOError` naming the file and
  offset; a :class:`~weightcache.errors.WeightcacheError` passes through, so a
  copier translates its own library's errors). Closing the generator early
  does the same without the error. Either way, when control returns to the
  caller no thread writes into a staging buffer or a destination for that load.
"""

from __future__ import annotations

import enum
import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from weightcache.client.readers import ReadJob
from weightcache.errors import CacheIOError, WeightcacheError

__all__ = [
    "Copier",
    "CopyEvent",
    "CopyRun",
    "Reader",
    "RingStats",
    "Segment",
    "StagingRing",
    "ThreadCopier",
    "ThreadEvent",
    "TransferStats",
    "check_shape",
]

log = logging.getLogger(__name__)

S = TypeVar("S")  # a staging buffer, as its copier knows it
D = TypeVar("D")  # a destination buffer, as its copier knows it

#: bounds on a ring's shape: a configuration error, not a way to pin all of RAM
MAX_BUFFERS = 64
MIN_BUFFER_BYTES = 1 << 16
MAX_RING_BYTES = 16 << 30


def check_shape(buffers: int, buffer_bytes: int) -> None:
    """Raise ``ValueError`` unless ``buffers`` x ``buffer_bytes`` is a ring this module allows."""
    if not 1 <= buffers <= MAX_BUFFERS:
        raise ValueError(f"buffers must be 1..{MAX_BUFFERS}, got {buffers}")
    if buffer_bytes < MIN_BUFFER_BYTES or buffers * buffer_bytes > MAX_RING_BYTES:
        raise ValueError(
            f"buffer_bytes must be at least {MIN_BUFFER_BYTES} and buffers x buffer_bytes "
            f"at most {MAX_RING_BYTES}, got {buffers} x {buffer_bytes}"
        )


class CopyEvent(Protocol):
    """Completion of the copies queued from one staging buffer (a ``torch.cuda.Event``)."""

    def query(self) -> bool:
        """True once every copy queued before the event has completed; never blocks."""

    def synchronize(self) -> None:
        """Block until the copies have completed; raise if they failed."""


@dataclass(frozen=True, slots=True)
class CopyRun(Generic[D]):
    """``length`` bytes at ``src_offset`` of a staging buffer to ``dest_offset`` of ``dest``."""

    src_offset: int
    dest: D
    dest_offset: int
    length: int


class Copier(Protocol[S, D]):
    """The device side of a ring: staging buffers, destinations, asynchronous copies.

    Contract: :meth:`copy` returns as soon as the copies are queued; they run
    in the order queued, with nothing else reading or writing the staging
    buffer, until the returned event completes; the ring writes into a
    staging buffer only while no event of its copies is outstanding.
    :meth:`copy` may be called from any thread (a reader thread queues the
    copies of the buffer whose last read it completed). Errors of the
    copier's library should come out as a
    :class:`~weightcache.errors.WeightcacheError` (the ring passes those
    through); anything else is raised as it is.
    """

    def allocate(self, nbytes: int) -> S:
        """A new staging buffer of ``nbytes`` (pinned host memory for CUDA)."""

    def host_view(self, buffer: S) -> memoryview:
        """A writable, byte-format view of ``buffer`` for the reader threads."""

    def destination(self, nbytes: int) -> D:
        """A new destination of ``nbytes`` (one device allocation per file)."""

    def copy(self, buffer: S, runs: Sequence[CopyRun[D]]) -> CopyEvent:
        """Queue ``runs`` out of ``buffer``; an event that completes after the last."""

    def free(self, buffer: S) -> None:
        """Give a staging buffer's memory back (the ring is closing)."""


class Reader(Protocol):
    """Where reads run: :class:`~weightcache.client.readers.ReaderPool` is one."""

    def submit(self, job: ReadJob) -> Future[None]: ...


@dataclass(frozen=True, slots=True)
class Segment(Generic[D]):
    """``length`` bytes of the file open as ``fd`` at ``offset`` to ``dest_offset`` of ``dest``."""

    fd: int
    path: str
    offset: int
    length: int
    dest: D
    dest_offset: int

    def __post_init__(self) -> None:
        if self.length <= 0 or self.offset < 0 or self.dest_offset < 0:
            raise ValueError(f"not a segment: {self.length} bytes at {self.offset}")


@dataclass(frozen=True, slots=True)
class RingStats:
    """A ring's memory, for tests and reports."""

    #: the bound: at most this many staging buffers
    buffers: int
    buffer_bytes: int
    #: staging buffers allocated now (never more than ``buffers``)
    allocated: int
    #: allocations over the ring's life: equal to ``allocated`` while it reuses them
    allocations: int
    #: buffers held by loads now (filling, reading or copying)
    in_use: int
    #: the most held at once
    peak_in_use: int

    @property
    def bytes_reserved(self) -> int:
        return self.allocated * self.buffer_bytes


class _State(enum.Enum):
    FILLING = "filling"
    READING = "reading"
    ISSUING = "issuing"
    COPYING = "copying"
    # terminal: the buffer is back on the free list
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


_BUSY = (_State.FILLING, _State.READING, _State.ISSUING)
_TERMINAL = (_State.DONE, _State.FAILED, _State.CANCELLED)


@dataclass(eq=False, slots=True)
class _Buffer(Generic[S]):
    handle: S
    view: memoryview


@dataclass
class TransferStats:
    """Where one :meth:`StagingRing.transfer` spent its time, for a load's report.

    ``read_s``: the time some read of the load was in flight (from a batch's
    reads being submitted to its last one landing, the union over batches);
    ``copy_s``: the time some copy was (from being queued to its event being
    seen complete). The two overlap: ``read_s + copy_s`` minus the transfer's
    wall time is about the time both ran.
    """

    read_s: float = 0.0
    copy_s: float = 0.0
    bytes: int = 0
    batches: int = 0


@dataclass(eq=False, slots=True)
class _Load:
    cancelled: bool = False
    #: (start, end) perf_counter spans of reads and copies, for TransferStats
    reads: list[tuple[float, float]] = field(default_factory=list)
    copies: list[tuple[float, float]] = field(default_factory=list)
    nbytes: int = 0


@dataclass(eq=False, slots=True)
class _Piece(Generic[D]):
    segment: Segment[D]
    #: where in the segment this piece starts, and where in the staging buffer
    skip: int
    pos: int
    length: int


@dataclass(eq=False, slots=True)
class _Batch(Generic[S, D]):
    """One cycle of one buffer: the pieces read into it and the copies out of it."""

    load: _Load
    buffer: _Buffer[S]
    pieces: list[_Piece[D]] = field(default_factory=list)
    runs: list[CopyRun[D]] = field(default_factory=list)
    #: segments whose last byte is in this batch, in order
    ends: list[Segment[D]] = field(default_factory=list)
    futures: list[Future[None]] = field(default_factory=list)
    pending: int = 0
    state: _State = _State.FILLING
    event: CopyEvent | None = None
    error: BaseException | None = None
    #: the read that failed, when one did
    failed_piece: _Piece[D] | None = None
    #: perf_counter times: reads submitted, copies queued
    submitted: float = 0.0
    issued: float = 0.0


class _Cursor(Generic[D]):
    """Walks the segments, handing out pieces that fit what is left of a buffer."""

    def __init__(self, segments: Iterable[Segment[D]]) -> None:
        self._segments = iter(segments)
        self._current: Segment[D] | None = None
        self._done = 0
        self.exhausted = False

    def more(self) -> bool:
        """Whether a piece is left (pulls the next segment to know)."""
        if self._current is None and not self.exhausted:
            nxt = next(self._segments, None)
            if nxt is None:
                self.exhausted = True
            else:
                self._current, self._done = nxt, 0
        return self._current is not None

    def take(self, room: int) -> tuple[Segment[D], int, int] | None:
        """The next piece of at most ``room`` bytes: (segment, skip, length); None at the end."""
        if not self.more():
            return None
        seg = self._current
        assert seg is not None
        length = min(room, seg.length - self._done)
        skip = self._done
        self._done += length
        if self._done == seg.length:
            self._current = None
        return seg, skip, length


class StagingRing(Generic[S, D]):
    """At most ``buffers`` staging buffers of ``buffer_bytes``, shared by the loads of a process.

    Thread-safe. See the module docstring for the guarantees.
    """

    def __init__(
        self, copier: Copier[S, D], *, buffers: int = 4, buffer_bytes: int = 64 << 20
    ) -> None:
        check_shape(buffers, buffer_bytes)
        self.copier = copier
        self.buffers = buffers
        self.buffer_bytes = buffer_bytes
        self._cond = threading.Condition()
        # Everything below is guarded by _cond.
        self._free: list[_Buffer[S]] = []
        self._allocated = 0
        self._allocations = 0
        self._in_use = 0
        self._peak = 0
        self._closed = False
        # batches whose copies are queued, oldest first: any load may reclaim them
        self._copying: deque[_Batch[S, D]] = deque()

    # -- the public surface --------------------------------------------------------------

    def transfer(
        self,
        segments: Iterable[Segment[D]],
        reader: Reader,
        *,
        stats: TransferStats | None = None,
    ) -> Generator[Segment[D], None, None]:
        """Read ``segments`` through the ring into their destinations.

        Yields each segment, in the order given, once its bytes and those of
        every segment before it are in their destination (the copies have
        completed). ``segments`` is consumed lazily, as buffers come free, so
        it may allocate each destination as it reaches it. Raises the first
        error of a read or copy, after every buffer of this load is back.
        ``stats``, when given, is filled in when the transfer ends (or stops).
        """
        load = _Load()
        cursor: _Cursor[D] = _Cursor(segments)
        outstanding: deque[_Batch[S, D]] = deque()
        try:
            while True:
                # Keep every buffer we can get busy; block only when we hold none,
                # since then there is nothing of ours to wait for instead.
                while cursor.more():
                    buffer = self._acquire(block=not outstanding)
                    if buffer is None:
                        break
                    batch = self._fill(load, buffer, cursor)
                    if batch is None:
                        break
                    outstanding.append(batch)
                    self._submit(batch, reader)
                if not outstanding:
                    return
                batch = outstanding[0]
                self._land(batch)
                outstanding.popleft()
                yield from batch.ends
        finally:
            # An error, the caller closing the generator, or the end: stop what
            # has not started and wait for what has, so no thread writes for us
            # after this returns and every buffer is back.
            load.cancelled = True
            self._drain(outstanding)
            if stats is not None:
                with self._cond:
                    stats.read_s += _union(load.reads)
                    stats.copy_s += _union(load.copies)
                    stats.bytes += load.nbytes
                    stats.batches += len(load.reads)

    def reserve(self) -> None:
        """Allocate every staging buffer now, so that the first load pays no allocation."""
        got: list[_Buffer[S]] = []
        try:
            while True:
                with self._cond:
                    if self._allocated >= self.buffers:
                        break
                buffer = self._acquire(block=False)
                if buffer is None:
                    break
                got.append(buffer)
        finally:
            with self._cond:
                for buffer in got:
                    self._put_back_locked(buffer)

    def stats(self) -> RingStats:
        with self._cond:
            return RingStats(
                buffers=self.buffers,
                buffer_bytes=self.buffer_bytes,
                allocated=self._allocated,
                allocations=self._allocations,
                in_use=self._in_use,
                peak_in_use=self._peak,
            )

    def close(self) -> None:
        """Free the staging buffers: those in use as their loads give them back.

        A closed ring stops keeping buffers: a load still running on it goes on,
        allocating what it needs and freeing each buffer as it comes back.
        """
        with self._cond:
            self._closed = True
            free, self._free = self._free, []
            self._allocated -= len(free)
        for buffer in free:
            self.copier.free(buffer.handle)

    # -- buffers -------------------------------------------------------------------------

    def _acquire(self, *, block: bool) -> _Buffer[S] | None:
        """A free buffer, a newly allocated one, or one whose copies completed.

        With ``block``, waits for one: by synchronising the oldest queued copy
        of any load, or for a batch's reads to land. Otherwise None when none is
        ready now.
        """
        while True:
            victim: _Batch[S, D] | None = None
            with self._cond:
                buffer = self._take_locked()
                if buffer is not None:
                    return buffer
                if self._allocated < self.buffers:
                    self._allocated += 1
                    self._allocations += 1
                    self._mark_in_use_locked()
                    allocate = True
                else:
                    allocate = False
                    if not block:
                        return None
                    if self._copying:
                        victim = self._copying[0]
                    else:
                        # Every buffer is being filled or read: a read landing
                        # (or failing) notifies. The timeout only re-checks.
                        self._cond.wait(timeout=1.0)
                        continue
            if allocate:
                return self._allocate()
            assert victim is not None
            self._settle(victim)

    def _allocate(self) -> _Buffer[S]:
        try:
            handle = self.copier.allocate(self.buffer_bytes)
            view = self.copier.host_view(handle)
            if view.nbytes < self.buffer_bytes or view.readonly or view.itemsize != 1:
                name = type(self.copier).__name__
                raise TypeError(f"{name}.host_view: not a writable byte view of the buffer")
        except BaseException:
            with self._cond:
                self._allocated -= 1
                self._in_use -= 1
                self._cond.notify_all()
            raise
        return _Buffer(handle, view)

    def _take_locked(self) -> _Buffer[S] | None:
        if not self._free:
            # Recycle the first batch of any load whose copies have completed:
            # completion may come out of order, and its owner may be busy.
            for batch in list(self._copying):
                assert batch.event is not None
                try:
                    done = batch.event.query()
                except BaseException as exc:
                    self._finish_locked(batch, _State.FAILED, exc)
                    break
                if done:
                    self._finish_locked(batch, _State.DONE, None)
                    break
        if not self._free:
            return None
        self._mark_in_use_locked()
        return self._free.pop()

    def _mark_in_use_locked(self) -> None:
        self._in_use += 1
        self._peak = max(self._peak, self._in_use)

    def _put_back_locked(self, buffer: _Buffer[S]) -> None:
        self._in_use -= 1
        if self._closed:
            self._allocated -= 1
            self.copier.free(buffer.handle)
        else:
            self._free.append(buffer)
        self._cond.notify_all()

    def _finish_locked(
        self, batch: _Batch[S, D], state: _State, error: BaseException | None
    ) -> None:
        """Terminal state for ``batch``: its buffer goes back. Idempotent."""
        if batch.state in _TERMINAL:
            return
        if batch.state is _State.COPYING:
            self._copying.remove(batch)
            batch.load.copies.append((batch.issued, time.perf_counter()))
        if error is not None and batch.error is None:
            batch.error = error
        if state is _State.DONE:
            batch.load.nbytes += sum(run.length for run in batch.runs)
        batch.state = state
        self._put_back_locked(batch.buffer)

    # -- one batch -----------------------------------------------------------------------

    def _fill(self, load: _Load, buffer: _Buffer[S], cursor: _Cursor[D]) -> _Batch[S, D] | None:
        """Pieces for ``buffer`` up to its size; None (buffer returned) when none are left."""
        batch: _Batch[S, D] = _Batch(load, buffer)
        pos = 0
        try:
            while pos < self.buffer_bytes:
                got = cursor.take(self.buffer_bytes - pos)
                if got is None:
                    break
                seg, skip, length = got
                batch.pieces.append(_Piece(seg, skip, pos, length))
                dest_offset = seg.dest_offset + skip
                last = batch.runs[-1] if batch.runs else None
                if (
                    last is not None
                    and last.dest is seg.dest
                    and last.src_offset + last.length == pos
                    and last.dest_offset + last.length == dest_offset
                ):
                    batch.runs[-1] = CopyRun(
                        last.src_offset, seg.dest, last.dest_offset, last.length + length
                    )
                else:
                    batch.runs.append(CopyRun(pos, seg.dest, dest_offset, length))
                if skip + length == seg.length:
                    batch.ends.append(seg)
                pos += length
        except BaseException:
            # The segments themselves failed (a destination could not be made):
            # nothing was submitted from this buffer.
            with self._cond:
                self._put_back_locked(buffer)
            raise
        if not batch.pieces:
            with self._cond:
                self._put_back_locked(buffer)
            return None
        return batch

    def _submit(self, batch: _Batch[S, D], reader: Reader) -> None:
        pieces = batch.pieces
        # One count per read plus one held here until every read is submitted,
        # so the copies cannot be queued before the last read is.
        with self._cond:
            batch.pending = len(pieces) + 1
            batch.state = _State.READING
            batch.submitted = time.perf_counter()
        for i, piece in enumerate(pieces):
            seg = piece.segment
            job = ReadJob(
                fd=seg.fd,
                path=seg.path,
                offset=seg.offset + piece.skip,
                dest=batch.buffer.view[piece.pos : piece.pos + piece.length],
            )
            try:
                fut = reader.submit(job)
            except BaseException as exc:
                # The reads not submitted count as arrived; the first carries the error.
                self._arrive(batch, exc, piece)
                for _ in pieces[i + 1 :]:
                    self._arrive(batch, None, None)
                break
            batch.futures.append(fut)
            fut.add_done_callback(functools.partial(self._read_done, batch, piece))
        self._arrive(batch, None, None)

    def _read_done(self, batch: _Batch[S, D], piece: _Piece[D], fut: Future[None]) -> None:
        # Runs in the reader thread (or in ours for a future already done or cancelled).
        try:
            # A read cancelled by someone else (the pool shutting down) did not
            # happen: the buffer must not be copied as if it had.
            error: BaseException | None
            if fut.cancelled():
                error = CancelledError("read cancelled before it ran")
            else:
                error = fut.exception()
            self._arrive(batch, error, piece if error is not None else None)
        except BaseException:  # pragma: no cover - a bug here would strand a buffer
            log.exception("ring.callback_failed")
            raise

    def _arrive(
        self, batch: _Batch[S, D], error: BaseException | None, piece: _Piece[D] | None
    ) -> None:
        """One read of ``batch`` is over; the last one queues the copies."""
        with self._cond:
            if error is not None and batch.error is None:
                batch.error = error
                batch.failed_piece = piece
            batch.pending -= 1
            if batch.pending:
                return
            batch.issued = time.perf_counter()
            batch.load.reads.append((batch.submitted, batch.issued))
            if batch.load.cancelled:
                self._finish_locked(batch, _State.CANCELLED, None)
                return
            if batch.error is not None:
                self._finish_locked(batch, _State.FAILED, None)
                return
            batch.state = _State.ISSUING
        try:
            event = self.copier.copy(batch.buffer.handle, batch.runs)
        except BaseException as exc:
            with self._cond:
                self._finish_locked(batch, _State.FAILED, exc)
            return
        with self._cond:
            batch.event = event
            batch.state = _State.COPYING
            self._copying.append(batch)
            self._cond.notify_all()

    def _settle(self, batch: _Batch[S, D]) -> None:
        """Wait for ``batch``'s copies (outside the lock) and give its buffer back."""
        event = batch.event
        assert event is not None
        error: BaseException | None = None
        try:
            event.synchronize()
        except BaseException as exc:
            error = exc
        with self._cond:
            self._finish_locked(batch, _State.DONE if error is None else _State.FAILED, error)

    def _wait_not_busy(self, batch: _Batch[S, D]) -> None:
        with self._cond:
            while batch.state in _BUSY:
                self._cond.wait(timeout=1.0)

    def _land(self, batch: _Batch[S, D]) -> None:
        """Wait until ``batch``'s bytes are in their destinations; raise its error typed."""
        self._wait_not_busy(batch)
        if batch.state is _State.COPYING:
            self._settle(batch)
        if batch.state is _State.FAILED:
            raise _typed(batch)
        assert batch.state is _State.DONE, batch.state

    def _drain(self, outstanding: deque[_Batch[S, D]]) -> None:
        for batch in outstanding:
            for fut in batch.futures:
                fut.cancel()
        for batch in outstanding:
            self._wait_not_busy(batch)
            if batch.state is _State.COPYING:
                self._settle(batch)
            if batch.state is _State.FAILED and batch.error is not None:
                log.debug("ring.drained_error error=%r", batch.error)


def _union(spans: list[tuple[float, float]]) -> float:
    """The length of the union of ``spans``."""
    total = 0.0
    end = float("-inf")
    for start, stop in sorted(spans):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def _typed(batch: _Batch[S, D]) -> BaseException:
    error = batch.error
    assert error is not None
    piece = batch.failed_piece
    if isinstance(error, OSError) and not isinstance(error, WeightcacheError) and piece is not None:
        seg = piece.segment
        offset = seg.offset + piece.skip
        typed = CacheIOError(
            f"cannot read {seg.path} at offset {offset} ({piece.length} bytes): "
            f"{error.strerror or error}",
            hint="check the cache's disk, mount and permissions for this worker's user",
            path=seg.path,
            offset=offset,
            errno=error.errno,
        )
        typed.__cause__ = error
        return typed
    return error


# -- the stand-in copier -------------------------------------------------------------------


class ThreadEvent:
    """A :class:`CopyEvent` set by a :class:`ThreadCopier` stream thread."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.error: BaseException | None = None

    def set(self, error: BaseException | None = None) -> None:
        self.error = error
        self._done.set()

    def query(self) -> bool:
        if self._done.is_set() and self.error is not None:
            raise self.error
        return self._done.is_set()

    def synchronize(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error


_Task = tuple[memoryview, Sequence[CopyRun[D]], ThreadEvent]


class ThreadCopier(Generic[D]):
    """A :class:`Copier` whose device is host memory and whose streams are threads.

    What the ring runs on where there is no GPU. Staging buffers are
    ``bytearray``; ``destination(n)`` makes a destination and ``dest_view``
    gives its writable bytes (:meth:`of_bytes`: ``bytearray`` destinations).
    Copies queued to one stream run in order on its thread; with ``streams``
    > 1 batches go round-robin to several, so their events complete out of
    order, as copies on several CUDA streams would.
    """

    def __init__(
        self,
        destination: Callable[[int], D],
        dest_view: Callable[[D], memoryview],
        *,
        streams: int = 1,
    ) -> None:
        self._destination = destination
        self._dest_view = dest_view
        self._queues: list[queue.SimpleQueue[_Task[D] | None]] = [
            queue.SimpleQueue() for _ in range(streams)
        ]
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._next = 0
        #: copy calls and staging allocations so far
        self.copies = 0
        self.allocations = 0

    @staticmethod
    def of_bytes(*, streams: int = 1) -> ThreadCopier[bytearray]:
        return ThreadCopier(bytearray, memoryview, streams=streams)

    def allocate(self, nbytes: int) -> bytearray:
        with self._lock:
            self.allocations += 1
        return bytearray(nbytes)

    def host_view(self, buffer: bytearray) -> memoryview:
        return memoryview(buffer)

    def destination(self, nbytes: int) -> D:
        return self._destination(nbytes)

    def copy(self, buffer: bytearray, runs: Sequence[CopyRun[D]]) -> ThreadEvent:
        event = ThreadEvent()
        with self._lock:
            if not self._threads:
                for i, q in enumerate(self._queues):
                    t = threading.Thread(
                        target=self._stream, args=(q,), name=f"weightcache-copy-{i}", daemon=True
                    )
                    t.start()
                    self._threads.append(t)
            q = self._queues[self._next % len(self._queues)]
            self._next += 1
            self.copies += 1
        q.put((memoryview(buffer), tuple(runs), event))
        return event

    def free(self, buffer: bytearray) -> None:
        pass  # garbage: nothing else holds it

    def close(self) -> None:
        """Stop the stream threads once the copies queued so far are done."""
        with self._lock:
            threads, self._threads = self._threads, []
            if threads:
                for q in self._queues:
                    q.put(None)
        for t in threads:
            t.join()

    def _stream(self, q: queue.SimpleQueue[_Task[D] | None]) -> None:
        while (task := q.get()) is not None:
            src, runs, event = task
            try:
                for run in runs:
                    out = self._dest_view(run.dest)
                    end = run.dest_offset + run.length
                    out[run.dest_offset : end] = src[run.src_offset : run.src_offset + run.length]
            except BaseException as exc:
                event.set(exc)
            else:
                event.set()
