"""The staging ring and the CUDA sink's logic, on CPU: a fake copier stands in for the GPU.

:class:`~weightcache.client.ring.ThreadCopier` is the ring's copier with threads
for streams and events and host memory for the device; reads go through the
real :class:`~weightcache.client.readers.ReaderPool`. Faults are injected at
named seams only: ``readers._preadv`` (the one call that reads), a copier
wrapper (a copy that fails to queue, an event that fails), the segments
iterator (a destination that cannot be made). What is checked: order, bytes,
reuse across loads, the memory bound, errors and cancellation leaving every
buffer back and no thread writing; then :func:`~weightcache.client.cuda.load_staged`
differentially against ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch as safetensors_torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weightcache.client.readers as readers
from tests.support.models import write_model
from weightcache.client.cuda import (
    configure_ring,
    cuda_sink_available,
    host_copier,
    load_cuda,
    load_staged,
)
from weightcache.client.header import read_header_fd
from weightcache.client.plan import FilePlan, ReadItem, TensorSlot, plan_file
from weightcache.client.readers import ReaderPool, ReadJob
from weightcache.client.ring import (
    MIN_BUFFER_BYTES,
    CopyEvent,
    CopyRun,
    Segment,
    StagingRing,
    ThreadCopier,
    TransferStats,
)
from weightcache.client.selection import make_selector
from weightcache.errors import CacheCorrupt, CacheIOError, DeviceUnavailable, HeaderInvalid

KIB = 1 << 10
BUF = MIN_BUFFER_BYTES  # 64 KiB: small buffers, so a few hundred KiB cross many


# -- fixtures and seams ----------------------------------------------------------------------


@pytest.fixture
def pool() -> Iterator[ReaderPool]:
    with ReaderPool(4) as p:
        yield p


@pytest.fixture
def blob(tmp_path: Path) -> Iterator[tuple[int, bytes, str]]:
    """An open file of 1 MiB of random bytes: (fd, its bytes, its path)."""
    data = random.Random(7).randbytes(1 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd, data, str(path)
    finally:
        os.close(fd)


class CheckedCopier:
    """A ThreadCopier that checks the ring's side of the contract.

    A staging buffer is *in flight* from the copy queued out of it until the
    ring has observed its event complete (``query()`` true or ``synchronize()``
    returned); a read into an in-flight buffer is a violation. Faults, named by
    a destination offset the copy covers (buffers complete their reads in any
    order, so a call count would not say which): ``fail_copy`` fails to queue,
    ``fail_event``'s event fails.
    """

    def __init__(
        self,
        inner: ThreadCopier[Any] | None = None,
        *,
        fail_copy: int | None = None,
        fail_event: int | None = None,
        copy_error: BaseException | None = None,
    ) -> None:
        self.inner: ThreadCopier[Any] = inner or ThreadCopier.of_bytes()
        self.fail_copy = fail_copy
        self.fail_event = fail_event
        self.copy_error = copy_error or DeviceUnavailable("injected copy failure", device="fake")
        self.lock = threading.Lock()
        self.in_flight: set[int] = set()
        self.buffers: set[int] = set()
        self.violations: list[str] = []
        self.calls = 0

    def allocate(self, nbytes: int) -> bytearray:
        buf = self.inner.allocate(nbytes)
        self.buffers.add(id(buf))
        return buf

    def host_view(self, buffer: bytearray) -> memoryview:
        return self.inner.host_view(buffer)

    def destination(self, nbytes: int) -> Any:
        return self.inner.destination(nbytes)

    def copy(self, buffer: bytearray, runs: Sequence[CopyRun[Any]]) -> CopyEvent:
        with self.lock:
            self.calls += 1
        if _covers(runs, self.fail_copy):
            raise self.copy_error
        event = self.inner.copy(buffer, runs)
        with self.lock:
            self.in_flight.add(id(buffer))
        return _ObservedEvent(self, id(buffer), event, fail=_covers(runs, self.fail_event))

    def free(self, buffer: bytearray) -> None:
        self.inner.free(buffer)

    def check_read(self, job: ReadJob) -> None:
        with self.lock:
            if id(job.dest.obj) in self.in_flight:
                self.violations.append(f"read at {job.offset} into a buffer a copy still reads")


def _covers(runs: Sequence[CopyRun[Any]], offset: int | None) -> bool:
    return offset is not None and any(
        r.dest_offset <= offset < r.dest_offset + r.length for r in runs
    )


class _ObservedEvent:
    def __init__(self, owner: CheckedCopier, key: int, event: CopyEvent, *, fail: bool) -> None:
        self.owner, self.key, self.event, self.fail = owner, key, event, fail

    def _observed(self) -> None:
        with self.owner.lock:
            self.owner.in_flight.discard(self.key)
        if self.fail:
            raise DeviceUnavailable("injected asynchronous copy failure", device="fake")

    def query(self) -> bool:
        done = self.event.query()
        if done:
            self._observed()
        return done

    def synchronize(self) -> None:
        self.event.synchronize()
        self._observed()


class CheckingReader:
    """The real pool, with every job checked against the copier's in-flight buffers."""

    def __init__(self, pool: ReaderPool, copier: CheckedCopier) -> None:
        self.pool, self.copier = pool, copier
        self.jobs = 0

    def submit(self, job: ReadJob) -> Any:
        self.copier.check_read(job)
        self.jobs += 1
        return self.pool.submit(job)


def cut(total: int, rng: random.Random, most: int) -> list[tuple[int, int]]:
    """``[0, total)`` as consecutive (offset, length) pieces of 1..most bytes."""
    out, at = [], 0
    while at < total:
        n = min(total - at, rng.randint(1, most))
        out.append((at, n))
        at += n
    return out


def scattered(
    fd: int, path: str, total: int, seed: int, most: int
) -> tuple[list[Segment[bytearray]], bytearray, list[bytearray]]:
    """Segments of the file's first ``total`` bytes, in file order, to two destinations
    at shuffled places; and the destinations (one per half)."""
    rng = random.Random(seed)
    pieces = cut(total, rng, most)
    half = len(pieces) // 2
    dests = [bytearray(total), bytearray(total)]
    segments = []
    for group, dest in ((pieces[:half], dests[0]), (pieces[half:], dests[1])):
        places = list(range(len(group)))
        rng.shuffle(places)
        slot = max((n for _, n in group), default=0)
        dest.extend(bytes(slot * len(group)))
        for (offset, length), place in zip(group, places, strict=True):
            segments.append(Segment(fd, path, offset, length, dest, total + place * slot))
    return segments, bytearray(), dests


def expected_dest(segments: list[Segment[bytearray]], data: bytes, dest: bytearray) -> bytes:
    out = bytearray(len(dest))
    for seg in segments:
        if seg.dest is dest:
            out[seg.dest_offset : seg.dest_offset + seg.length] = data[
                seg.offset : seg.offset + seg.length
            ]
    return bytes(out)


def assert_idle(ring: StagingRing[Any, Any]) -> None:
    stats = ring.stats()
    assert stats.in_use == 0, stats
    assert stats.allocated <= stats.buffers, stats


# -- the ring ---------------------------------------------------------------------------------


def test_transfer_assembles_every_byte_in_order(
    pool: ReaderPool, blob: tuple[int, bytes, str]
) -> None:
    fd, data, path = blob
    copier = CheckedCopier()
    ring = StagingRing(copier, buffers=3, buffer_bytes=BUF)
    segments, _, dests = scattered(fd, path, len(data), seed=1, most=40 * KIB)
    reader = CheckingReader(pool, copier)
    got = list(ring.transfer(segments, reader))
    assert got == segments  # each once, in the order given
    for dest in dests:
        assert bytes(dest) == expected_dest(segments, data, dest)
    assert copier.violations == []
    assert_idle(ring)
    # Pieces are packed: about one copy per buffer's worth, not one per segment.
    assert copier.calls <= len(data) // BUF + 2
    copier.inner.close()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**32),
    buffers=st.integers(1, 5),
    buffer_kib=st.sampled_from([64, 80, 128]),
    most_kib=st.integers(1, 300),
    streams=st.integers(1, 3),
)
def test_transfer_property(
    blob: tuple[int, bytes, str],
    seed: int,
    buffers: int,
    buffer_kib: int,
    most_kib: int,
    streams: int,
) -> None:
    # Any cut of the file (segments smaller and larger than a buffer), any ring,
    # copies completing in or out of order: the same bytes, in the same order.
    fd, data, path = blob
    total = random.Random(seed).randint(1, len(data) // 2)
    copier = CheckedCopier(ThreadCopier.of_bytes(streams=streams))
    ring = StagingRing(copier, buffers=buffers, buffer_bytes=buffer_kib * KIB)
    segments, _, dests = scattered(fd, path, total, seed=seed, most=most_kib * KIB)
    with ReaderPool(3) as pool:
        got = list(ring.transfer(segments, CheckingReader(pool, copier)))
    copier.inner.close()
    assert got == segments
    for dest in dests:
        assert bytes(dest) == expected_dest(segments, data, dest)
    assert copier.violations == []
    assert_idle(ring)


def test_out_of_order_completion_yields_in_order(
    pool: ReaderPool, blob: tuple[int, bytes, str]
) -> None:
    # The first buffer's event reports completion only after the third buffer's
    # copies are done: later buffers finish first, segments still come in order.
    fd, data, path = blob
    order: list[int] = []
    gate = threading.Event()

    class HoldFirst(CheckedCopier):
        def copy(self, buffer: bytearray, runs: Sequence[CopyRun[Any]]) -> CopyEvent:
            n = runs[0].dest_offset // BUF  # which buffer's worth of the file this is
            event = super().copy(buffer, runs)
            if n == 0:
                return _Gated(event, gate, order, 0)
            if n == 2:
                threading.Thread(target=_open_after, args=(event, gate, order, n)).start()
            return _Logged(event, order, n)

    copier = HoldFirst(ThreadCopier.of_bytes(streams=3))
    ring = StagingRing(copier, buffers=3, buffer_bytes=BUF)
    dest = bytearray(6 * BUF)
    segments = [Segment(fd, path, i * BUF, BUF, dest, i * BUF) for i in range(6)]
    got = list(ring.transfer(segments, CheckingReader(pool, copier)))
    assert got == segments
    assert bytes(dest) == data[: 6 * BUF]
    assert order.index(2) < order.index(0)  # completed out of order
    assert copier.violations == []
    assert_idle(ring)
    copier.inner.close()


class _Logged:
    def __init__(self, event: CopyEvent, order: list[int], n: int) -> None:
        self.event, self.order, self.n = event, order, n

    def _log(self) -> None:
        if self.n not in self.order:
            self.order.append(self.n)

    def query(self) -> bool:
        done = self.event.query()
        if done:
            self._log()
        return done

    def synchronize(self) -> None:
        self.event.synchronize()
        self._log()


class _Gated(_Logged):
    def __init__(self, event: CopyEvent, gate: threading.Event, order: list[int], n: int):
        super().__init__(event, order, n)
        self.gate = gate

    def query(self) -> bool:
        return self.gate.is_set() and super().query()

    def synchronize(self) -> None:
        assert self.gate.wait(10), "gate never opened"
        super().synchronize()


def _open_after(event: CopyEvent, gate: threading.Event, order: list[int], n: int) -> None:
    event.synchronize()
    order.append(n)
    gate.set()


def test_buffers_reused_across_20_loads_without_growth(
    pool: ReaderPool, blob: tuple[int, bytes, str]
) -> None:
    fd, data, path = blob
    copier = CheckedCopier()
    ring = StagingRing(copier, buffers=4, buffer_bytes=BUF)
    seen: set[int] = set()

    class Recording(CheckingReader):
        def submit(self, job: ReadJob) -> Any:
            seen.add(id(job.dest.obj))
            return super().submit(job)

    reader = Recording(pool, copier)
    for load in range(20):
        dest = bytearray(len(data))
        segments = [
            Segment(fd, path, off, n, dest, off)
            for off, n in cut(len(data), random.Random(load), 50 * KIB)
        ]
        assert list(ring.transfer(segments, reader)) == segments
        assert bytes(dest) == data
        stats = ring.stats()
        assert stats.allocations == 4, stats  # allocated by the first load, never again
        assert stats.in_use == 0
    assert copier.inner.allocations == 4
    assert seen == copier.buffers  # every read went into one of the same four buffers
    assert ring.stats().peak_in_use <= 4
    assert copier.violations == []
    copier.inner.close()


def test_memory_is_bounded_by_the_ring_not_the_load(
    pool: ReaderPool, blob: tuple[int, bytes, str]
) -> None:
    # 1 MiB through 2 x 64 KiB: at most two buffers exist or are in use at any time.
    fd, data, path = blob
    copier = CheckedCopier()
    ring = StagingRing(copier, buffers=2, buffer_bytes=BUF)
    peak_seen = 0

    class Watching(CheckingReader):
        def submit(self, job: ReadJob) -> Any:
            nonlocal peak_seen
            peak_seen = max(peak_seen, ring.stats().in_use)
            return super().submit(job)

    dest = bytearray(len(data))
    segments = [
        Segment(fd, path, off, n, dest, off)
        for off, n in cut(len(data), random.Random(3), 16 * KIB)
    ]
    assert list(ring.transfer(segments, Watching(pool, copier))) == segments
    assert bytes(dest) == data
    stats = ring.stats()
    assert stats.allocations == 2 and stats.peak_in_use == 2 and peak_seen <= 2
    assert stats.bytes_reserved == 2 * BUF
    copier.inner.close()


def test_reserve_allocates_up_front(pool: ReaderPool, blob: tuple[int, bytes, str]) -> None:
    fd, data, path = blob
    copier = CheckedCopier()
    ring = StagingRing(copier, buffers=3, buffer_bytes=BUF)
    ring.reserve()
    assert ring.stats().allocated == 3 and ring.stats().in_use == 0
    dest = bytearray(len(data))
    list(ring.transfer([Segment(fd, path, 0, len(data), dest, 0)], pool))
    assert bytes(dest) == data
    assert ring.stats().allocations == 3
    copier.inner.close()


def test_a_paused_load_does_not_starve_another(
    pool: ReaderPool, blob: tuple[int, bytes, str]
) -> None:
    # One thread, two loads, one ring of 2: load A is paused after its first
    # segment, holding buffers; load B runs to the end meanwhile, taking A's
    # buffers as their copies complete; then A finishes. No deadlock, both whole.
    fd, data, path = blob
    copier = CheckedCopier()
    ring = StagingRing(copier, buffers=2, buffer_bytes=BUF)
    reader = CheckingReader(pool, copier)
    dest_a, dest_b = bytearray(len(data)), bytearray(len(data))
    seg_a = [Segment(fd, path, i * BUF, BUF, dest_a, i * BUF) for i in range(len(data) // BUF)]
    seg_b = [Segment(fd, path, i * BUF, BUF, dest_b, i * BUF) for i in range(len(data) // BUF)]
    load_a = ring.transfer(seg_a, reader)
    assert next(load_a) == seg_a[0]
    assert ring.stats().in_use >= 1
    assert list(ring.transfer(seg_b, reader)) == seg_b
    assert list(load_a) == seg_a[1:]
    assert bytes(dest_a) == data and bytes(dest_b) == data
    assert copier.violations == []
    assert_idle(ring)
    assert ring.stats().allocations == 2
    copier.inner.close()


def test_concurrent_loads_share_the_ring(pool: ReaderPool, blob: tuple[int, bytes, str]) -> None:
    fd, data, path = blob
    copier = CheckedCopier(ThreadCopier.of_bytes(streams=2))
    ring = StagingRing(copier, buffers=3, buffer_bytes=BUF)
    reader = CheckingReader(pool, copier)
    errors: list[BaseException] = []
    results: list[bool] = []

    def one(seed: int) -> None:
        try:
            dest = bytearray(len(data))
            pieces = cut(len(data), random.Random(seed), 100 * KIB)
            segments = [Segment(fd, path, off, n, dest, off) for off, n in pieces]
            results.append(list(ring.transfer(segments, reader)) == segments and dest == data)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and results == [True] * 6
    assert copier.violations == []
    assert_idle(ring)
    assert ring.stats().allocations == 3
    copier.inner.close()


# -- errors and cancellation -------------------------------------------------------------------


class PreadvSeam:
    """``readers._preadv`` with faults: an errno at one offset, a gate for later reads.

    Counts reads running now and after ``closed`` is set (none may start then).
    """

    def __init__(self, *, fail_at: int | None = None, error: int = 5, hold_from: int | None = None):
        self.fail_at, self.error, self.hold_from = fail_at, error, hold_from
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.active = 0
        self.calls = 0
        self.held = 0
        self.closed = False
        self.after_close = 0
        self.real = os.preadv

    def __call__(self, fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        with self.lock:
            self.active += 1
            self.calls += 1
            if self.closed:
                self.after_close += 1
        try:
            if self.fail_at is not None and offset <= self.fail_at < offset + len(buffers[0]):
                raise OSError(self.error, os.strerror(self.error))
            if self.hold_from is not None and offset >= self.hold_from:
                with self.lock:
                    self.held += 1
                assert self.gate.wait(10), "test never opened the gate"
            return self.real(fd, buffers, offset)
        finally:
            with self.lock:
                self.active -= 1


def test_read_error_mid_load_is_typed_and_returns_every_buffer(
    monkeypatch: pytest.MonkeyPatch, pool: ReaderPool, blob: tuple[int, bytes, str]
) -> None:
    fd, data, path = blob
    seam = PreadvSeam(fail_at=5 * BUF + 10)
    monkeypatch.setattr(readers, "_preadv", seam)
    copier = CheckedCopier()
    ring = StagingRing(copier, buffers=3, buffer_bytes=BUF)
    dest = bytearray(len(data))
    segments = [Segment(fd, path, i * 8 * KIB, 8 * KIB, dest, i * 8 * KIB) for i in range(128)]
    got: list[Segment[bytearray]] = []
    with pytest.raises(CacheIOError) as info:
        got.extend(ring.transfer(segments, CheckingReader(pool, copier)))
    assert info.value.facts["path"] == path and info.value.facts["errno"] == 5
    assert 5 * BUF <= info.value.facts["offset"] < 6 * BUF
    assert got == segments[: len(got)] and len(got) <= 5 * BUF // (8 * KIB)
    assert_idle(ring)
    assert seam.active == 0  # no read still running into a buffer
    assert copier.violations == []
    # The ring is whole: the next load through it succeeds with the same buffers.
    monkeypatch.setattr(readers, "_preadv", os.preadv)
    dest2 = bytearray(len(data))
    list(ring.transfer([Segment(fd, path, 0, len(data), dest2, 0)], pool))
    assert dest2 == data and ring.stats().allocations == 3
    copier.inner.close()


def test_short_file_is_cache_corrupt(pool: ReaderPool, blob: tuple[int, bytes, str]) -> None:
    fd, data, path = blob
    copier = CheckedCopier()
    ring = StagingRing(copier, buffers=2, buffer_bytes=BUF)
    dest = bytearray(2 * BUF)
    # Past the end of the file: the reader's typed error passes through as it is.
    with pytest.raises(CacheCorrupt):
        list(ring.transfer([Segment(fd, path, len(data) - BUF, 2 * BUF, dest, 0)], pool))
    assert_idle(ring)
    copier.inner.close()


def test_raw_oserror_from_a_reader_becomes_cache_io_error(blob: tuple[int, bytes, str]) -> None:
    # A Reader other than the pool (the Protocol allows it) that fails untyped.
    fd, _data, path = blob

    class Failing:
        def submit(self, job: ReadJob) -> Any:
            from concurrent.futures import Future

            fut: Future[None] = Future()
            if job.offset >= BUF:
                fut.set_exception(OSError(5, "Input/output error"))
            else:
                readers.read_job(job)
                fut.set_result(None)
            return fut

    copier = CheckedCopier()
    ring = StagingRing(copier, buffers=2, buffer_bytes=BUF)
    dest = bytearray(4 * BUF)
    with pytest.raises(CacheIOError) as info:
        list(ring.transfer([Segment(fd, path, 0, 4 * BUF, dest, 0)], Failing()))
    assert info.value.facts == {"path": path, "offset": BUF, "errno": 5}
    assert isinstance(info.value.__cause__, OSError)
    assert_idle(ring)
    copier.inner.close()


@pytest.mark.parametrize(
    "fault",
    ["copy_fails_to_queue", "event_fails", "copy_raises_a_programmer_error"],
)
def test_copy_error_mid_load_returns_every_buffer(
    pool: ReaderPool, blob: tuple[int, bytes, str], fault: str
) -> None:
    fd, data, path = blob
    if fault == "copy_fails_to_queue":
        copier = CheckedCopier(fail_copy=3 * BUF)
        expected: type[BaseException] = DeviceUnavailable
    elif fault == "event_fails":
        copier = CheckedCopier(fail_event=3 * BUF)
        expected = DeviceUnavailable
    else:
        copier = CheckedCopier(fail_copy=3 * BUF, copy_error=ValueError("bug in a copier"))
        expected = ValueError  # not ours to type: passes through as it is
    ring = StagingRing(copier, buffers=3, buffer_bytes=BUF)
    dest = bytearray(len(data))
    segments = [Segment(fd, path, i * BUF, BUF, dest, i * BUF) for i in range(16)]
    got: list[Segment[bytearray]] = []
    with pytest.raises(expected):
        got.extend(ring.transfer(segments, CheckingReader(pool, copier)))
    assert got == segments[:3]  # what landed before the failed buffer, and no more
    assert_idle(ring)
    assert copier.violations == []
    copier.inner.close()


def test_segments_that_fail_return_the_buffer(
    pool: ReaderPool, blob: tuple[int, bytes, str]
) -> None:
    # The segments iterator is where the sink allocates destinations: one that
    # fails (device out of memory) stops the load with every buffer back.
    fd, data, path = blob
    dest = bytearray(len(data))

    def segments() -> Iterator[Segment[bytearray]]:
        for i in range(10):
            yield Segment(fd, path, i * 16 * KIB, 16 * KIB, dest, i * 16 * KIB)
        raise DeviceUnavailable("injected: out of device memory", device="fake")

    copier = CheckedCopier()
    ring = StagingRing(copier, buffers=2, buffer_bytes=BUF)
    with pytest.raises(DeviceUnavailable):
        list(ring.transfer(segments(), pool))
    assert_idle(ring)
    copier.inner.close()


def test_closing_early_returns_buffers_and_leaves_no_thread_writing(
    monkeypatch: pytest.MonkeyPatch, blob: tuple[int, bytes, str]
) -> None:
    # Reads past the first buffer block at a gate. The caller stops after the
    # first segment: close() cancels the reads not started, waits for the ones
    # blocked in preadv (released here from another thread), and returns with
    # every buffer back; no read starts after that.
    fd, data, path = blob
    seam = PreadvSeam(hold_from=BUF)
    monkeypatch.setattr(readers, "_preadv", seam)
    copier = CheckedCopier()
    ring = StagingRing(copier, buffers=4, buffer_bytes=BUF)
    dest = bytearray(len(data))
    segments = [Segment(fd, path, i * 16 * KIB, 16 * KIB, dest, i * 16 * KIB) for i in range(64)]
    with ReaderPool(2) as pool:
        reader = Remembering(pool, copier)
        load = ring.transfer(segments, reader)
        assert next(load) == segments[0]
        copies_before = copier.calls
        # Two reads are held in preadv now (two threads), the rest queued: the
        # gate opens once close() has started cancelling them.
        releaser = threading.Thread(target=_release_when_cancelling, args=(seam, reader))
        releaser.start()
        load.close()
        releaser.join()
        with seam.lock:
            seam.closed = True
            running = seam.active
        assert running == 0
        assert_idle(ring)
        # No copy out of a buffer filled for the closed load was queued.
        assert copier.calls == copies_before
    # The pool has drained: nothing started after close() returned.
    assert seam.after_close == 0
    assert seam.calls < len(segments)
    assert copier.violations == []
    copier.inner.close()


class Remembering(CheckingReader):
    def __init__(self, pool: ReaderPool, copier: CheckedCopier) -> None:
        super().__init__(pool, copier)
        self.futures: list[Any] = []

    def submit(self, job: ReadJob) -> Any:
        fut = super().submit(job)
        self.futures.append(fut)
        return fut


def _release_when_cancelling(seam: PreadvSeam, reader: Remembering) -> None:
    for _ in range(2000):
        if seam.held >= 2 and any(f.cancelled() for f in list(reader.futures)):
            break
        threading.Event().wait(0.005)
    seam.gate.set()


def test_reads_cancelled_under_the_load_fail_it(
    monkeypatch: pytest.MonkeyPatch, blob: tuple[int, bytes, str]
) -> None:
    # The pool shuts down while the load runs, cancelling its queued reads: the
    # load fails rather than copy buffers that were never filled.
    fd, data, path = blob
    seam = PreadvSeam(hold_from=BUF)
    monkeypatch.setattr(readers, "_preadv", seam)
    copier = CheckedCopier()
    ring = StagingRing(copier, buffers=4, buffer_bytes=BUF)
    dest = bytearray(len(data))
    segments = [Segment(fd, path, i * 16 * KIB, 16 * KIB, dest, i * 16 * KIB) for i in range(64)]
    pool = ReaderPool(2)
    reader = Remembering(pool, copier)
    load = ring.transfer(segments, reader)
    assert next(load) == segments[0]
    releaser = threading.Thread(target=_release_when_cancelling, args=(seam, reader))
    releaser.start()
    pool.close()  # cancels the queued reads, waits for the two held ones
    releaser.join()
    with pytest.raises((CancelledError, RuntimeError)):
        list(load)
    assert_idle(ring)
    assert bytes(dest[BUF:]) != data[BUF:]  # what was never read did not land as if it had
    copier.inner.close()


def test_an_empty_load_allocates_nothing(pool: ReaderPool) -> None:
    copier = CheckedCopier()
    ring = StagingRing(copier, buffers=2, buffer_bytes=BUF)
    assert list(ring.transfer([], pool)) == []
    assert ring.stats().allocations == 0


def test_ring_shape_is_bounded() -> None:
    copier = ThreadCopier.of_bytes()
    with pytest.raises(ValueError, match="buffers"):
        StagingRing(copier, buffers=0)
    with pytest.raises(ValueError, match="buffers"):
        StagingRing(copier, buffers=1000)
    with pytest.raises(ValueError, match="buffer_bytes"):
        StagingRing(copier, buffers=4, buffer_bytes=1)
    with pytest.raises(ValueError, match="buffer_bytes"):
        StagingRing(copier, buffers=64, buffer_bytes=1 << 30)
    with pytest.raises(ValueError):
        configure_ring(buffers=4, buffer_bytes=1 << 40)
    with pytest.raises(ValueError):
        Segment(0, "x", 0, 0, bytearray(), 0)


# -- the sink over the fake copier -------------------------------------------------------------


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, ref in want.items():
        t = got[name]
        assert (t.dtype, t.shape) == (ref.dtype, ref.shape), name
        if ref.numel():
            assert torch.equal(as_bytes(t), as_bytes(ref)), name
            assert t.data_ptr() % t.element_size() == 0, name


@contextlib.contextmanager
def opened(
    paths: list[Path], select: Any = None, item_bytes: int = 24 * KIB
) -> Iterator[tuple[list[FilePlan], list[int]]]:
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        plans = [
            plan_file(
                str(p),
                read_header_fd(fd, os.fstat(fd).st_size, path=str(p)),
                select,
                item_bytes=item_bytes,
            )
            for p, fd in zip(paths, fds, strict=True)
        ]
        yield plans, fds
    finally:
        for fd in fds:
            os.close(fd)


@pytest.fixture
def model(tmp_path: Path) -> list[Path]:
    # Every dtype, scalars, empty tensors, three shards; a 300 KiB tensor that
    # spans several 64 KiB buffers and 24 KiB items.
    files = write_model(tmp_path / "model", shards=3, big=300 * KIB)
    return sorted(files.values())


def reference(paths: list[Path], select: Any = None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in paths:
        out.update(
            {k: v for k, v in safetensors_torch.load_file(p).items() if select is None or select(k)}
        )
    return out


@pytest.mark.parametrize("streams", [1, 3])
def test_sink_is_bitwise_load_file(pool: ReaderPool, model: list[Path], streams: int) -> None:
    copier = host_copier(streams=streams)
    ring = StagingRing(copier, buffers=3, buffer_bytes=BUF)
    stats = TransferStats()
    with opened(model) as (plans, fds):
        started = time.perf_counter()
        got = list(load_staged(plans, fds, ring, pool, device=torch.device("cpu"), stats=stats))
        wall = time.perf_counter() - started
    # What the load report is made of: every byte copied once, reads and copies
    # each busy for part of the wall time.
    assert stats.bytes == sum(plan.nbytes for plan in plans)
    assert 0 < stats.read_s <= wall and 0 < stats.copy_s <= wall
    assert stats.batches >= stats.bytes // BUF
    names = [name for name, _ in got]
    assert names == [t.name for plan in plans for t in plan.tensors]  # file order
    assert_bitwise(dict(got), reference(model))
    # One destination per file: every tensor with bytes shares its file's storage.
    for plan in plans:
        storages = {
            dict(got)[t.name].untyped_storage().data_ptr() for t in plan.tensors if t.nbytes
        }
        assert len(storages) <= 1
    assert_idle(ring)
    copier.close()


def test_sink_loads_a_subset(pool: ReaderPool, model: list[Path]) -> None:
    select = make_selector("*.matrix")
    copier = host_copier()
    ring = StagingRing(copier, buffers=2, buffer_bytes=BUF)
    with opened(model, select) as (plans, fds):
        got = dict(load_staged(plans, fds, ring, pool, device=torch.device("cpu")))
    assert_bitwise(got, reference(model, select))
    assert all(name.endswith(".matrix") for name in got)
    assert_idle(ring)
    copier.close()


def test_sink_reuses_the_ring_over_20_loads(pool: ReaderPool, model: list[Path]) -> None:
    copier = host_copier()
    ring = StagingRing(copier, buffers=2, buffer_bytes=BUF)
    want = reference(model)
    for _ in range(20):
        with opened(model) as (plans, fds):
            assert_bitwise(
                dict(load_staged(plans, fds, ring, pool, device=torch.device("cpu"))), want
            )
    assert ring.stats().allocations == 2 and copier.allocations == 2
    assert_idle(ring)
    copier.close()


def test_sink_closed_early_returns_buffers(pool: ReaderPool, model: list[Path]) -> None:
    copier = host_copier()
    ring = StagingRing(copier, buffers=2, buffer_bytes=BUF)
    want = reference(model)
    with opened(model) as (plans, fds):
        tensors = load_staged(plans, fds, ring, pool, device=torch.device("cpu"))
        first = [next(tensors) for _ in range(3)]
        tensors.close()
        assert_idle(ring)
    for name, t in first:
        assert torch.equal(as_bytes(t), as_bytes(want[name]))
    copier.close()


def test_sink_copies_a_misaligned_tensor(pool: ReaderPool, tmp_path: Path) -> None:
    # A plan made elsewhere puts an F32 tensor at destination offset 1: the sink
    # hands out an aligned copy, bitwise equal.
    path = tmp_path / "one.safetensors"
    t = torch.arange(1000, dtype=torch.float32)
    safetensors_torch.save_file({"t": t}, path)
    copier = host_copier()
    ring = StagingRing(copier, buffers=2, buffer_bytes=BUF)
    with opened([path]) as (plans, fds):
        (item,) = plans[0].items
        (slot,) = plans[0].tensors
        shifted = FilePlan(
            str(path),
            plans[0].size + 1,
            (TensorSlot(slot.name, slot.dtype, slot.shape, slot.nbytes, 1),),
            (ReadItem(item.offset, item.length, 1),),
        )
        got = dict(load_staged([shifted], fds, ring, pool, device=torch.device("cpu")))
    assert torch.equal(got["t"], t) and got["t"].data_ptr() % 4 == 0
    copier.close()


def test_sink_checks_dtypes_before_reading(pool: ReaderPool, model: list[Path]) -> None:
    copier = host_copier()
    ring = StagingRing(copier, buffers=2, buffer_bytes=BUF)
    with opened(model[:1]) as (plans, fds):
        slot = plans[0].tensors[0]
        bad = FilePlan(
            plans[0].path,
            plans[0].size,
            (TensorSlot(slot.name, "F6_E2M3", slot.shape, slot.nbytes, slot.offset),),
            plans[0].items,
        )
        with pytest.raises(HeaderInvalid):
            load_staged([bad], fds, ring, pool, device=torch.device("cpu"))
        with pytest.raises(ValueError):
            load_staged(plans, [], ring, pool, device=torch.device("cpu"))
    assert ring.stats().allocations == 0
    copier.close()


def test_cuda_sink_unavailable_on_a_cpu_build() -> None:
    assert not cuda_sink_available("cpu")
    assert not cuda_sink_available("not a device")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: tests/gpu covers the sink")
    assert not cuda_sink_available("cuda:0")
    with pytest.raises(DeviceUnavailable):
        load_cuda([], [], "cuda")
    with pytest.raises(DeviceUnavailable):
        load_cuda([], [], "not a device")
