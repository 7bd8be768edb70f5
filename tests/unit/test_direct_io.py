"""Direct (O_DIRECT) reads, their fallback to buffered reads, and page-cache residency.

Faults are injected at the pool's seams: ``readers._open`` (opening the
O_DIRECT descriptor) and ``readers._preadv`` (every read, buffered or direct).
The tests run where ``tmp_path`` lies; where that file system refuses
O_DIRECT, the bitwise tests check that the fallback ran instead.
"""

from __future__ import annotations

import errno
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from tests.support.models import assert_bitwise_equal, reference, write_model
from weightcache.client import readers
from weightcache.client.cpu import PrivateRead, SafetensorsFile, read_file
from weightcache.client.readers import DirectFile, ReaderPool, ReadJob, resident_fraction
from weightcache.errors import CacheCorrupt, CacheIOError


def supports_direct(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"x" * 8192)
    fd = os.open(probe, os.O_RDONLY)
    try:
        direct = DirectFile.open(fd, str(probe))
    finally:
        os.close(fd)
    if direct is None:
        return False
    direct.close()
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def drop_from_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages, so that DONTNEED drops them
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.fixture
def model(tmp_path: Path) -> dict[str, Path]:
    # Every dtype, odd shapes: tensor offsets at no particular alignment; a big
    # tensor so that reads have an aligned middle.
    return write_model(tmp_path / "m", shards=2, big=300_001)


@pytest.mark.parametrize("item_bytes", [4096, 65_536, None])
@pytest.mark.parametrize("subset", [False, True])
def test_a_direct_read_is_bitwise_equal(
    model: dict[str, Path], tmp_path: Path, item_bytes: int | None, subset: bool
) -> None:
    want = reference(model)
    names = sorted(want)[::3] if subset else None
    expected_io = "direct" if supports_direct(tmp_path) else "fallback"
    before = open_fds()
    got: dict[str, torch.Tensor] = {}
    with ReaderPool(2) as pool:
        for path in model.values():
            with SafetensorsFile.open(path) as f:
                select = None if names is None else names.__contains__
                read = PrivateRead(f, select, pool, item_bytes=item_bytes, direct=True)
                try:
                    got.update(read.tensors())
                finally:
                    read.cancel()
                assert read.io == expected_io
    assert_bitwise_equal(got, {n: want[n] for n in names} if names else want)
    assert open_fds() == before  # the O_DIRECT descriptors were closed


def test_direct_jobs_land_where_asked_whatever_the_alignment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Destinations at any address, offsets and lengths at any alignment, up to
    # the file's end; a small bounce buffer so that long unaligned reads take
    # several rounds through it.
    if not supports_direct(tmp_path):
        pytest.fail(
            f"{tmp_path} refuses O_DIRECT: run the tests with a temporary directory on a "
            "file system that supports it (ext4, xfs), e.g. TMPDIR=/var/tmp"
        )
    monkeypatch.setattr(readers, "BOUNCE_BYTES", 3 * 4096)
    data = random.Random(3).randbytes(200_003)
    path = tmp_path / "blob"
    path.write_bytes(data)
    rng = random.Random(4)
    ranges = [(0, len(data)), (len(data) - 5, 5), (4096, 8192), (8192, 0)]
    for _ in range(100):
        offset = rng.randrange(len(data))
        ranges.append((offset, rng.randrange(len(data) - offset + 1)))
    buf = bytearray(1 + sum(n for _, n in ranges))
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY)
    direct = DirectFile.open(fd, str(path))
    assert direct is not None
    try:
        jobs, at = [], 1  # start at an odd address
        for offset, length in ranges:
            jobs.append(ReadJob(fd, str(path), offset, view[at : at + length], direct))
            at += length
        with ReaderPool(3) as pool:
            pool.read_all(jobs)
        assert not direct.refused
    finally:
        direct.close()
        os.close(fd)
    assert bytes(buf[1:]) == b"".join(data[o : o + n] for o, n in ranges)


def test_o_direct_refused_at_open_falls_back_to_buffered(
    model: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = readers._open

    def refuse(path: str, flags: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags)

    monkeypatch.setattr(readers, "_open", refuse)
    caplog.set_level(logging.DEBUG, logger=readers.__name__)
    path = next(iter(model.values()))
    with ReaderPool(2) as pool, SafetensorsFile.open(path) as f:
        read = PrivateRead(f, None, pool, direct=True)
        try:
            got = dict(read.tensors())
        finally:
            read.cancel()
    assert read.io == "fallback"
    assert_bitwise_equal(got, reference({"x": path}))
    refused = [r.getMessage() for r in caplog.records if "read.direct_refused" in r.getMessage()]
    assert len(refused) == 1 and "at=open" in refused[0] and "EINVAL" in refused[0]


def test_o_direct_refused_on_read_falls_back_once(
    model: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not supports_direct(tmp_path):
        pytest.fail(
            f"{tmp_path} refuses O_DIRECT: run the tests with a temporary directory on a "
            "file system that supports it (ext4, xfs), e.g. TMPDIR=/var/tmp"
        )
    real = readers._preadv
    direct_fds: set[int] = set()
    real_open = readers._open

    def opening(path: str, flags: int) -> int:
        fd = real_open(path, flags)
        direct_fds.add(fd)
        return fd

    def einval_on_direct(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(readers, "_open", opening)
    monkeypatch.setattr(readers, "_preadv", einval_on_direct)
    caplog.set_level(logging.DEBUG, logger=readers.__name__)
    path = next(iter(model.values()))
    with ReaderPool(3) as pool, SafetensorsFile.open(path) as f:
        read = PrivateRead(f, None, pool, direct=True, item_bytes=4096)
        try:
            got = dict(read.tensors())
        finally:
            read.cancel()
    assert read.io == "fallback"
    assert_bitwise_equal(got, reference({"x": path}))
    refused = [r.getMessage() for r in caplog.records if "read.direct_refused" in r.getMessage()]
    assert len(refused) == 1 and "at=read" in refused[0]


def test_residency_follows_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(random.Random(1).randbytes(1 << 20))
    drop_from_cache(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert resident_fraction(fd, 0, 1 << 20) < 0.1
        os.pread(fd, 1 << 20, 0)
        assert resident_fraction(fd, 0, 1 << 20) > 0.9
        assert resident_fraction(fd, 4097, 100) == 1.0  # a part, unaligned
        assert resident_fraction(fd, 0, 0) == 1.0
    finally:
        os.close(fd)


def test_auto_reads_cold_files_direct_and_warm_files_buffered(
    model: dict[str, Path], tmp_path: Path
) -> None:
    path = next(iter(model.values()))
    cold_io = "direct" if supports_direct(tmp_path) else "fallback"
    with ReaderPool(2) as pool:
        drop_from_cache(path)
        with SafetensorsFile.open(path) as f:
            read = PrivateRead(f, None, pool, direct="auto")
            try:
                cold = dict(read.tensors())
            finally:
                read.cancel()
        assert read.io == cold_io and read.resident is not None and read.resident < 0.1
        with SafetensorsFile.open(path) as f:
            os.pread(f.fd, os.path.getsize(path), 0)  # now it is all cached
            read = PrivateRead(f, None, pool, direct="auto")
            try:
                warm = dict(read.tensors())
            finally:
                read.cancel()
        assert read.io == "buffered" and read.resident is not None and read.resident > 0.9
        # After the drops: the reference keeps its pages mapped, which DONTNEED cannot drop.
        want = reference({"x": path})
        assert_bitwise_equal(read_file(path, mmap=False, pool=pool, direct="auto").tensors, want)
    assert_bitwise_equal(cold, want)
    assert_bitwise_equal(warm, want)
    with pytest.raises(ValueError), SafetensorsFile.open(path) as f:
        PrivateRead(f, None, ReaderPool(1), direct="yes")  # type: ignore[arg-type]


def test_a_file_truncated_under_a_direct_read_is_cache_corrupt(
    model: dict[str, Path], tmp_path: Path
) -> None:
    if not supports_direct(tmp_path):
        pytest.fail(
            f"{tmp_path} refuses O_DIRECT: run the tests with a temporary directory on a "
            "file system that supports it (ext4, xfs), e.g. TMPDIR=/var/tmp"
        )
    path = next(iter(model.values()))
    before = open_fds()
    with ReaderPool(2) as pool, SafetensorsFile.open(path) as f:
        os.truncate(path, os.path.getsize(path) - 100_000)  # inside the big tensor
        read = PrivateRead(f, None, pool, direct=True, item_bytes=8192)
        with pytest.raises(CacheCorrupt) as info:
            dict(read.tensors())
        read.cancel()
        assert read.io == "direct"
    assert info.value.facts["path"] == str(path)
    assert open_fds() == before


def test_eio_under_a_direct_read_is_cache_io_error(
    model: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not supports_direct(tmp_path):
        pytest.fail(
            f"{tmp_path} refuses O_DIRECT: run the tests with a temporary directory on a "
            "file system that supports it (ext4, xfs), e.g. TMPDIR=/var/tmp"
        )

    def eio(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(readers, "_preadv", eio)
    path = next(iter(model.values()))
    with ReaderPool(2) as pool, pytest.raises(CacheIOError) as info:
        read_file(path, mmap=False, pool=pool, direct=True)
    assert info.value.facts["errno"] == errno.EIO
    assert info.value.facts["path"] == str(path)
