"""The reader pool: preadv straight into the destination, typed errors, nothing left running.

Faults are injected at the pool's one seam, ``readers._preadv`` (the
``os.preadv`` every read goes through): EIO, a read held at a gate, a file
truncated under the reader.
"""

from __future__ import annotations

import errno
import gc
import os
import random
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import safetensors.torch as safetensors_torch
import torch

from weightcache.client import readers
from weightcache.client.cpu import PrivateRead, SafetensorsFile, read_file
from weightcache.client.readers import ReaderPool, ReadJob, default_threads, shared_pool
from weightcache.errors import CacheCorrupt, CacheIOError

Preadv = Callable[[int, Sequence[memoryview], int], int]


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(5).randbytes(1 << 20)
    path = tmp_path / "blob"
    path.write_bytes(data)
    return path, data


@pytest.fixture
def fd(data_file: tuple[Path, bytes]) -> Iterator[int]:
    fd = os.open(data_file[0], os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


def jobs_for(fd: int, path: Path, ranges: list[tuple[int, int]], buf: bytearray) -> list[ReadJob]:
    """One job per (offset, length), back to back in ``buf``."""
    view = memoryview(buf)
    jobs, at = [], 0
    for offset, length in ranges:
        jobs.append(ReadJob(fd, str(path), offset, view[at : at + length]))
        at += length
    return jobs


def pool_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("weightcache-read")}


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_reads_land_where_asked(threads: int, data_file: tuple[Path, bytes], fd: int) -> None:
    path, data = data_file
    rng = random.Random(threads)
    ranges = []
    for _ in range(200):
        offset = rng.randrange(len(data))
        ranges.append((offset, rng.randrange(len(data) - offset + 1)))
    buf = bytearray(sum(length for _, length in ranges))
    with ReaderPool(threads) as pool:
        pool.read_all(jobs_for(fd, path, ranges, buf))
    assert bytes(buf) == b"".join(data[o : o + n] for o, n in ranges)


def test_short_reads_are_continued(
    data_file: tuple[Path, bytes], fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # preadv may return less than asked (signals, >2 GiB reads): the job goes on.
    real = readers._preadv

    def dribble(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        return real(fd, [buffers[0][:1000]], offset)

    monkeypatch.setattr(readers, "_preadv", dribble)
    path, data = data_file
    buf = bytearray(100_000)
    with ReaderPool(2) as pool:
        pool.read_all(jobs_for(fd, path, [(7, 50_000), (600_000, 50_000)], buf))
    assert bytes(buf) == data[7:50_007] + data[600_000:650_000]


def test_a_file_truncated_under_the_reader_is_cache_corrupt(
    data_file: tuple[Path, bytes], fd: int
) -> None:
    path, _ = data_file
    before = pool_threads()
    pool = ReaderPool(3)
    os.truncate(path, 300_000)
    buf = bytearray(400_000)
    with pytest.raises(CacheCorrupt) as info:
        pool.read_all(jobs_for(fd, path, [(0, 100_000), (250_000, 100_000), (100, 200_000)], buf))
    assert info.value.facts["path"] == str(path)
    assert info.value.facts["offset"] == 300_000
    assert "300000" in str(info.value) and str(path) in str(info.value)
    pool.close()
    assert pool_threads() == before


def test_eio_is_cache_io_error_and_stops_the_rest(
    data_file: tuple[Path, bytes], fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = data_file
    calls: list[int] = []
    real = readers._preadv

    def eio_at_third(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        calls.append(offset)
        if offset == 2 * 4096:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, buffers, offset)

    monkeypatch.setattr(readers, "_preadv", eio_at_third)
    before = threading.active_count()
    pool = ReaderPool(1)  # one thread: jobs run in order, so "the rest" is well defined
    buf = bytearray(64 * 4096)
    with pytest.raises(CacheIOError) as info:
        pool.read_all(jobs_for(fd, path, [(i * 4096, 4096) for i in range(64)], buf))
    facts = info.value.facts
    assert (facts["path"], facts["offset"], facts["errno"]) == (str(path), 8192, errno.EIO)
    assert calls == [0, 4096, 8192]  # nothing after the failure was read
    pool.close()
    assert threading.active_count() == before


def test_nothing_writes_after_read_all_raises(
    data_file: tuple[Path, bytes], fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three jobs are held inside preadv while a fourth fails: read_all must not
    # return before the held ones have finished writing, and none may start later.
    path, _ = data_file
    real = readers._preadv
    all_in = threading.Barrier(4)  # the failing read and three held ones
    gate = threading.Event()
    lock = threading.Lock()
    state = {"inside": 0, "entered": 0, "after": 0}
    raised = threading.Event()

    def held(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        with lock:
            state["entered"] += 1
            state["inside"] += 1
            if raised.is_set():
                state["after"] += 1
        try:
            all_in.wait(5)
            if offset == 0:
                threading.Timer(0.05, gate.set).start()  # release the others soon
                raise OSError(errno.EIO, "Input/output error")
            gate.wait(5)
            return real(fd, buffers, offset)
        finally:
            with lock:
                state["inside"] -= 1

    monkeypatch.setattr(readers, "_preadv", held)
    buf = bytearray(40 * 1000)
    with ReaderPool(4) as pool:
        with pytest.raises(CacheIOError):
            pool.read_all(jobs_for(fd, path, [(i * 1000, 1000) for i in range(40)], buf))
        raised.set()
        with lock:
            assert state["inside"] == 0, "a read was still writing after read_all raised"
        assert gate.is_set()
    assert state["after"] == 0 and state["entered"] == 4


def test_submit_hands_back_the_typed_error(
    data_file: tuple[Path, bytes], fd: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = data_file
    buf = bytearray(10)
    with ReaderPool(1) as pool:
        ok = pool.submit(ReadJob(fd, str(path), 3, memoryview(buf)))
        assert ok.result(5) is None and bytes(buf) == data[3:13]
        past = pool.submit(ReadJob(fd, str(path), len(data) - 4, memoryview(buf)))
        with pytest.raises(CacheCorrupt):
            past.result(5)


def test_a_batch_is_awaited_in_order(data_file: tuple[Path, bytes], fd: int) -> None:
    path, data = data_file
    buf = bytearray(3 * 1000)
    with ReaderPool(2) as pool:
        batch = pool.batch(jobs_for(fd, path, [(0, 1000), (5000, 1000), (9000, 1000)], buf))
        assert len(batch) == 3
        batch.wait(1)
        assert bytes(buf[:1000]) == data[:1000]
        batch.wait()
        batch.cancel()  # idempotent once done
        assert bytes(buf) == data[:1000] + data[5000:6000] + data[9000:10000]


def test_shared_pool_is_one_per_process() -> None:
    assert shared_pool() is shared_pool()
    assert 1 <= shared_pool().threads == default_threads() <= readers.MAX_THREADS
    with pytest.raises(ValueError):
        ReaderPool(0)


# -- the private CPU read (cpu.PrivateRead) on top of the pool ---------------------


def test_private_read_of_a_truncated_file_is_cache_corrupt_and_keeps_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_file({"a": torch.ones(1000), "b": torch.ones(50_000)}, path)
    before = pool_threads()
    pool = ReaderPool(2)
    with SafetensorsFile.open(path) as f:
        os.truncate(path, os.path.getsize(path) - 1000)  # under the reader, after the header
        read = PrivateRead(f, None, pool, item_bytes=4096)
        buffer = weakref.ref(read.buffer)
        with pytest.raises(CacheCorrupt) as info:
            dict(read.tensors())
        read.cancel()
    assert info.value.facts["path"] == str(path)
    del read, info
    gc.collect()
    assert buffer() is None, "the file's buffer outlived the failed read"
    pool.close()
    assert pool_threads() == before


def test_eio_in_a_private_read_frees_the_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_file({"w": torch.ones(100_000)}, path)
    seen: list[weakref.ref[object]] = []

    def eio(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        seen.append(weakref.ref(buffers[0].obj))  # the numpy view of the file's buffer
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(readers, "_preadv", eio)
    with ReaderPool(2) as pool, pytest.raises(CacheIOError) as info:
        read_file(path, mmap=False, pool=pool, item_bytes=64 * 1024)
    assert info.value.facts["errno"] == errno.EIO
    del info
    gc.collect()
    assert seen and all(ref() is None for ref in seen)
