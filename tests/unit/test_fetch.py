"""Fetching one blob: retries, backoff, hash re-fetch, resume.

Real files, a fault seam, a fake clock.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.origins import FakeClock, FaultyOrigin
from tests.support.stopping import stop_stalled_fetch
from weightcache.config import FetchConfig
from weightcache.errors import (
    CacheFull,
    CacheIOError,
    HashMismatch,
    ObjectNotFound,
    OriginRejected,
    OriginUnavailable,
    ShuttingDown,
)
from weightcache.fetch import CHECKPOINT_BYTES, Fetcher, FetchStats, TokenBucket, Transfers
from weightcache.hashing import digest_bytes, digest_stream
from weightcache.manifest import FileEntry
from weightcache.origin.base import ObjectInfo, current_abort
from weightcache.origin.file import FileOrigin
from weightcache.origin.s3 import range_problem
from weightcache.retry import backoff_delay
from weightcache.store import Store

CHUNK = 4096
SIZE = CHUNK * 5 + 123


@pytest.fixture
def payload(tmp_path: Path) -> tuple[FileOrigin, FileEntry, bytes]:
    data = random.Random(7).randbytes(SIZE)
    (tmp_path / "origin").mkdir()
    (tmp_path / "origin" / "w.bin").write_bytes(data)
    d = digest_stream([data], CHUNK)
    entry = FileEntry("w.bin", d.size, d.blake3, CHUNK, d.chunks)
    return FileOrigin(tmp_path / "origin"), entry, data


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "cache")
    s.ensure_layout()
    return s


def policy_of(**policy: int | float) -> FetchConfig:
    cfg = FetchConfig(
        concurrency=3, retries=4, hash_retries=2, backoff_base_s=0.5, backoff_max_s=4.0
    )
    return FetchConfig(**{**cfg.__dict__, **policy})


def run_fetch(
    store: Store,
    origin: FaultyOrigin | FileOrigin | SlicedOrigin,
    entry: FileEntry,
    clock: FakeClock,
    *,
    checkpoint_bytes: int = CHECKPOINT_BYTES,
    stats: FetchStats | None = None,
    **policy: int | float,
) -> FetchStats:
    cfg = policy_of(**policy)
    stats = stats or FetchStats()

    async def main() -> None:
        with ThreadPoolExecutor(4) as pool:
            fetcher = Fetcher(
                store=store,
                policy=cfg,
                executor=pool,
                clock=clock,
                rng=random.Random(1),
                checkpoint_bytes=checkpoint_bytes,
            )
            await fetcher.fetch(origin, entry.path, entry, stats)

    asyncio.run(main())
    return stats


class SlicedOrigin:
    """The Origin protocol over a real origin, serving ranges in ``piece``-byte pieces.

    It records every request as (offset, length); ``die_after[offset]`` ends the
    request starting there for good after that many bytes (a non-retryable error:
    the part file and the progress log are left as a ``kill -9`` leaves them);
    ``stall_after[offset]`` stalls it after that many bytes until the transfer's
    Abort unblocks it, the way the S3 adapter's socket shutdown does.
    """

    def __init__(
        self,
        inner: FileOrigin,
        piece: int = 512,
        *,
        die_after: dict[int, int] | None = None,
        stall_after: dict[int, int] | None = None,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.piece = piece
        self.die_after = die_after or {}
        self.stall_after = stall_after or {}
        self.requests: list[tuple[int, int]] = []
        self.stalled = 0
        self.unblocked = 0
        self._lock = threading.Lock()

    def read(self, key: str, *, max_bytes: int) -> bytes:
        return self.inner.read(key, max_bytes=max_bytes)

    @contextmanager
    def open_range(self, key: str, offset: int, length: int) -> Iterator[Iterator[bytes]]:
        with self._lock:
            self.requests.append((offset, length))
        abort = current_abort()
        with self.inner.open_range(key, offset, length) as pieces:
            data = b"".join(pieces)

        def gen() -> Iterator[bytes]:
            sent = 0
            while sent < len(data):
                if self.stall_after.get(offset) == sent:
                    release = threading.Event()
                    assert abort is not None, "fetch runs every transfer in an abort scope"
                    abort.on_abort(release.set)
                    with self._lock:
                        self.stalled += 1
                    if not release.wait(30):
                        raise AssertionError("a stalled transfer was never unblocked")
                    with self._lock:
                        self.unblocked += 1
                    raise OriginUnavailable(f"{self.name}/{key}: connection shut down")
                if offset in self.die_after and sent >= self.die_after[offset]:
                    raise OriginRejected(f"{self.name}/{key}: the puller died here")
                yield data[sent : sent + self.piece]
                sent += self.piece

        yield gen()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def write_bytes(self, key: str, data: bytes) -> None:
        self.inner.write_bytes(key, data)

    def write_file(self, key: str, path: Path, *, part_bytes: int) -> None:
        self.inner.write_file(key, path, part_bytes=part_bytes)

    def close(self) -> None:
        self.inner.close()


def visible(store: Store) -> list[str]:
    return sorted(os.listdir(store.blobs)) + sorted(os.listdir(store.snapshots))


def test_clean_fetch_writes_a_read_only_verified_blob(
    store: Store, payload: tuple[FileOrigin, FileEntry, bytes]
) -> None:
    origin, entry, data = payload
    stats = run_fetch(store, origin, entry, FakeClock())
    blob = store.blob_path(entry.blake3)
    assert blob.read_bytes() == data
    assert oct(blob.stat().st_mode & 0o777) == "0o444"
    assert stats.origin_bytes == SIZE and stats.requests == 6 and stats.retries == 0
    assert list(store.partial.iterdir()) == []


def test_transient_faults_are_retried_with_full_jitter_backoff(
    store: Store, payload: tuple[FileOrigin, FileEntry, bytes]
) -> None:
    origin, entry, data = payload
    # Chunk 0 fails 3 times: 503, a reset after half its body, then (asked for the
    # rest only) 503 again; then it succeeds.
    plan = {0: ["503", "short"], CHUNK // 2: ["503"]}
    faulty = FaultyOrigin(origin, lambda k, off, n: (plan.get(off, [])[n:] or [None])[0])
    clock = FakeClock()
    stats = run_fetch(store, faulty, entry, clock)
    assert store.blob_path(entry.blake3).read_bytes() == data
    assert stats.retries == 3
    assert len(clock.sleeps) == 3
    for attempt, delay in enumerate(clock.sleeps):
        assert 0 <= delay <= min(4.0, 0.5 * 2**attempt)
    # The cut body was kept: the retries ask for the rest of the chunk only.
    assert [r[1:3] for r in faulty.requests if r[1] < CHUNK] == [
        (0, CHUNK),
        (0, CHUNK),
        (CHUNK // 2, CHUNK - CHUNK // 2),
        (CHUNK // 2, CHUNK - CHUNK // 2),
    ]
    assert stats.origin_bytes == SIZE  # no byte came twice


def test_persistent_faults_give_up_after_the_retry_budget(
    store: Store, payload: tuple[FileOrigin, FileEntry, bytes]
) -> None:
    origin, entry, _ = payload
    faulty = FaultyOrigin(origin, lambda k, off, n: "503" if off == CHUNK else None)
    clock = FakeClock()
    with pytest.raises(OriginUnavailable) as info:
        run_fetch(store, faulty, entry, clock, retries=4)
    assert info.value.code == "origin_unavailable"
    assert "after 5 attempts" in str(info.value)
    assert info.value.facts["chunk"] == 1
    assert len([r for r in faulty.requests if r[1] == CHUNK]) == 5
    assert len(clock.sleeps) == 4
    assert visible(store) == []


def test_corrupt_chunk_is_refetched_then_succeeds(
    store: Store, payload: tuple[FileOrigin, FileEntry, bytes]
) -> None:
    origin, entry, data = payload
    faulty = FaultyOrigin(origin, lambda k, off, n: "flip" if off == 2 * CHUNK and n == 0 else None)
    clock = FakeClock()
    stats = run_fetch(store, faulty, entry, clock)
    assert store.blob_path(entry.blake3).read_bytes() == data
    assert stats.hash_failures == 1
    assert clock.sleeps == []  # a corrupt body is re-fetched at once, not backed off


def test_persistently_corrupt_chunk_raises_hash_mismatch_naming_file_and_chunk(
    store: Store, payload: tuple[FileOrigin, FileEntry, bytes]
) -> None:
    origin, entry, _ = payload
    faulty = FaultyOrigin(origin, lambda k, off, n: "flip" if off == 2 * CHUNK else None)
    with pytest.raises(HashMismatch) as info:
        run_fetch(store, faulty, entry, FakeClock(), hash_retries=2)
    err = info.value
    assert err.code == "hash_mismatch"
    assert err.facts["path"] == "w.bin" and err.facts["chunk"] == 2
    assert err.facts["expected"] == entry.chunks[2]
    assert "w.bin" in str(err) and "chunk 2" in str(err) and "after 3 attempts" in str(err)
    assert len([r for r in faulty.requests if r[1] == 2 * CHUNK]) == 3
    assert visible(store) == []


def test_missing_object_is_not_retried(
    store: Store, payload: tuple[FileOrigin, FileEntry, bytes], tmp_path: Path
) -> None:
    origin, entry, _ = payload
    os.unlink(tmp_path / "origin" / "w.bin")
    clock = FakeClock()
    with pytest.raises(ObjectNotFound):
        run_fetch(store, origin, entry, clock)
    assert clock.sleeps == []


def test_resume_fetches_only_missing_chunks(
    store: Store, payload: tuple[FileOrigin, FileEntry, bytes]
) -> None:
    origin, entry, data = payload
    # A previous puller wrote and recorded chunks 0 and 3, and was killed.
    store.open_part(entry.blake3, entry.size)
    part = store.partial_paths(entry.blake3).part
    with open(part, "r+b") as f:
        for i in (0, 3):
            f.seek(i * CHUNK)
            f.write(data[i * CHUNK : (i + 1) * CHUNK])
    store.record_chunk(entry.blake3, 0)
    store.record_chunk(entry.blake3, 3)
    faulty = FaultyOrigin(origin, lambda k, off, n: None)
    stats = run_fetch(store, faulty, entry, FakeClock())
    assert sorted(r[1] // CHUNK for r in faulty.requests) == [1, 2, 4, 5]
    assert stats.resumed_bytes == 2 * CHUNK
    assert store.blob_path(entry.blake3).read_bytes() == data


def test_resume_does_not_trust_a_lying_chunk_log(
    store: Store, payload: tuple[FileOrigin, FileEntry, bytes]
) -> None:
    origin, entry, data = payload
    store.open_part(entry.blake3, entry.size)  # zeros everywhere
    for i in range(6):
        store.record_chunk(entry.blake3, i)  # ...but the log claims every chunk
    with open(store.partial_paths(entry.blake3).chunks, "ab") as f:
        f.write(b"\x01\x00")  # and a torn record at the end
    faulty = FaultyOrigin(origin, lambda k, off, n: None)
    run_fetch(store, faulty, entry, FakeClock())
    assert len(faulty.requests) == 6
    assert store.blob_path(entry.blake3).read_bytes() == data


def test_a_puller_stopped_mid_chunk_is_resumed_from_its_last_checkpoint(
    store: Store, payload: tuple[FileOrigin, FileEntry, bytes]
) -> None:
    origin, entry, data = payload
    # The first puller syncs and records its progress every 1024 bytes and dies
    # 2560 bytes into chunk 2: the last 512 bytes it wrote are not recorded.
    dying = SlicedOrigin(origin, die_after={2 * CHUNK: 2560})
    with pytest.raises(OriginRejected):
        run_fetch(store, dying, entry, FakeClock(), checkpoint_bytes=1024, concurrency=1)
    progress = store.read_progress(entry.blake3)
    assert progress[2] == 2048
    done = store.read_chunk_log(entry.blake3)
    assert 2 not in done
    # (A chunk whose transfer started as chunk 2 failed was aborted, and synced
    # what it had: that is kept too.)
    partial = sum(n for i, n in progress.items() if i not in done)

    again = SlicedOrigin(origin)
    stats = run_fetch(store, again, entry, FakeClock(), checkpoint_bytes=1024)
    assert store.blob_path(entry.blake3).read_bytes() == data
    # Chunk 2 is asked for from its last checkpoint on, and nothing else twice.
    assert (2 * CHUNK + 2048, CHUNK - 2048) in again.requests
    assert all(off != 2 * CHUNK for off, _ in again.requests)
    kept = sum(entry.chunk_range(i)[1] for i in done) + partial
    assert sum(n for _, n in again.requests) == stats.origin_bytes == SIZE - kept
    assert stats.resumed_bytes == kept
    assert list(store.partial.iterdir()) == []  # the progress log goes with the commit


def test_a_lying_progress_record_is_caught_and_the_chunk_fetched_from_its_start(
    store: Store, payload: tuple[FileOrigin, FileEntry, bytes]
) -> None:
    origin, entry, data = payload
    store.open_part(entry.blake3, entry.size)  # zeros everywhere
    with open(store.partial_paths(entry.blake3).part, "r+b") as f:
        f.write(data[:CHUNK])  # chunk 0 whole (but not in the chunk log)
        f.seek(3 * CHUNK)
        f.write(data[3 * CHUNK : 3 * CHUNK + 1000])  # the first 1000 bytes of chunk 3
    store.record_progress(entry.blake3, 0, CHUNK)  # true: nothing to ask for
    store.record_progress(entry.blake3, 1, 3000)  # a lie: those bytes are zeros
    store.record_progress(entry.blake3, 3, 1000)  # true
    store.record_progress(entry.blake3, 4, CHUNK + 1)  # impossible: ignored
    store.record_progress(entry.blake3, 77, 10)  # no such chunk: ignored
    with open(store.partial_paths(entry.blake3).progress, "ab") as f:
        f.write(b"\x05\x00\x00\x00\xff")  # a torn last record
    faulty = FaultyOrigin(origin, lambda k, off, n: None)
    # hash_retries=0: the lie must not be held against the origin.
    stats = run_fetch(store, faulty, entry, FakeClock(), hash_retries=0)
    assert store.blob_path(entry.blake3).read_bytes() == data
    asked = sorted(r[1:3] for r in faulty.requests)
    assert asked == [
        (CHUNK, CHUNK),  # chunk 1 again from its start, once the whole chunk failed
        (CHUNK + 3000, CHUNK - 3000),  # chunk 1 resumed as the record said
        (2 * CHUNK, CHUNK),
        (3 * CHUNK + 1000, CHUNK - 1000),  # chunk 3 resumed, and right
        (4 * CHUNK, CHUNK),
        (5 * CHUNK, 123),
    ]
    assert stats.hash_failures == 1
    assert stats.resumed_bytes == CHUNK + 1000


def run_stalled(
    store: Store,
    origin: SlicedOrigin,
    entry: FileEntry,
    stop: str,
    transfers: Transfers,
    *,
    stalls: int,
) -> tuple[BaseException | None, float]:
    """Start a fetch, wait until ``stalls`` transfers are stalled, then stop it by
    ``stop`` ("cancel" or "abort_all"). Returns what the fetch raised, and the
    seconds from the stop until every transfer thread had finished."""

    async def main() -> tuple[BaseException | None, float]:
        pool = ThreadPoolExecutor(4)
        try:
            fetcher = Fetcher(
                store=store,
                policy=policy_of(concurrency=3),
                executor=pool,
                clock=FakeClock(),
                transfers=transfers,
                checkpoint_bytes=1024,
            )
            task = asyncio.create_task(fetcher.fetch(origin, entry.path, entry, FetchStats()))
            deadline = time.monotonic() + 10
            while origin.stalled < stalls:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.005)
            return await stop_stalled_fetch(task, transfers, stop, stalls, pool, 5)
        finally:
            pool.shutdown(wait=False)

    return asyncio.run(main())


def test_cancelling_a_fetch_unblocks_its_stalled_transfer_and_keeps_its_bytes(
    store: Store, payload: tuple[FileOrigin, FileEntry, bytes]
) -> None:
    origin, entry, data = payload
    # Chunk 1 stalls after 1536 bytes (one checkpoint at 1024 behind it), for good.
    stalling = SlicedOrigin(origin, stall_after={CHUNK: 1536})
    transfers = Transfers()
    raised, took = run_stalled(store, stalling, entry, "cancel", transfers, stalls=1)
    assert isinstance(raised, asyncio.CancelledError)
    assert took < 1.0, f"the stalled thread took {took:.2f}s to return"
    assert stalling.unblocked == 1 and transfers.active == 0 and not transfers.closed
    assert os.listdir(store.blobs) == []
    # The thread synced what it had before returning: the next pull asks for the rest.
    assert store.read_progress(entry.blake3)[1] == 1536
    again = SlicedOrigin(origin)
    run_fetch(store, again, entry, FakeClock())
    assert (CHUNK + 1536, CHUNK - 1536) in again.requests
    assert store.blob_path(entry.blake3).read_bytes() == data


def test_abort_all_unblocks_every_transfer_and_refuses_new_ones(
    store: Store, payload: tuple[FileOrigin, FileEntry, bytes]
) -> None:
    origin, entry, _ = payload
    # Every chunk stalls at its first byte; three transfers run at once.
    stalling = SlicedOrigin(origin, stall_after={i * CHUNK: 0 for i in range(6)})
    transfers = Transfers()
    raised, took = run_stalled(store, stalling, entry, "abort_all", transfers, stalls=3)
    assert isinstance(raised, ShuttingDown) and raised.code == "shutting_down"
    assert took < 1.0, f"the stalled threads took {took:.2f}s to return"
    assert stalling.unblocked == 3 and transfers.active == 0 and transfers.closed
    assert os.listdir(store.blobs) == []
    # Closed for good: a new fetch sharing these transfers asks the origin nothing.
    later = SlicedOrigin(origin)

    async def again() -> None:
        with ThreadPoolExecutor(2) as pool:
            fetcher = Fetcher(store=store, policy=policy_of(), executor=pool, transfers=transfers)
            await fetcher.fetch(later, entry.path, entry, FetchStats())

    with pytest.raises(ShuttingDown):
        asyncio.run(again())
    assert later.requests == []


def test_origin_bytes_are_observed_on_the_loop_as_they_arrive(store: Store, tmp_path: Path) -> None:
    # One 1 MiB chunk in 64 KiB pieces, stalled halfway: the bytes that arrived
    # before the stall are seen on the loop while the chunk is still in flight.
    data = random.Random(5).randbytes(1 << 20)
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "one.bin").write_bytes(data)
    d = digest_stream([data], 1 << 20)
    entry = FileEntry("one.bin", d.size, d.blake3, 1 << 20, d.chunks)
    stalling = SlicedOrigin(FileOrigin(tmp_path / "big"), 64 << 10, stall_after={0: 512 << 10})
    seen: list[tuple[int, int]] = []  # (thread, bytes)
    stats = FetchStats(on_origin_bytes=lambda n: seen.append((threading.get_ident(), n)))
    during: list[int] = []

    async def main() -> None:
        with ThreadPoolExecutor(4) as pool:
            fetcher = Fetcher(store=store, policy=policy_of(), executor=pool, clock=FakeClock())
            task = asyncio.create_task(fetcher.fetch(stalling, entry.path, entry, stats))
            while stalling.stalled < 1:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.01)  # what the thread posted has run on the loop
            during.append(sum(n for _, n in seen))
            fetcher.transfers.abort_all()
            with pytest.raises(ShuttingDown):
                await task

    asyncio.run(main())
    loop_thread = threading.get_ident()  # asyncio.run ran the loop on this thread
    assert {t for t, _ in seen} == {loop_thread}
    assert during == [512 << 10]  # posted every 256 KiB as the pieces arrived
    assert sum(n for _, n in seen) == stats.origin_bytes == 512 << 10


@pytest.mark.parametrize(
    ("seam", "code"),
    [
        ("posix_fallocate", errno.EACCES),  # creating the part file
        ("pwrite", errno.EIO),  # writing a chunk
        ("fdatasync", errno.EROFS),  # a checkpoint
        ("replace", errno.EROFS),  # the commit's rename
    ],
)
def test_disk_errors_are_cache_io_error_naming_the_path(
    store: Store,
    payload: tuple[FileOrigin, FileEntry, bytes],
    monkeypatch: pytest.MonkeyPatch,
    seam: str,
    code: int,
) -> None:
    origin, entry, _ = payload
    real = getattr(os, seam)

    def failing(*args: object, **kwargs: object) -> object:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, seam, failing)
    with pytest.raises(CacheIOError) as info:
        run_fetch(store, SlicedOrigin(origin), entry, FakeClock(), checkpoint_bytes=1024)
    monkeypatch.setattr(os, seam, real)
    err = info.value
    part = store.partial_paths(entry.blake3).part
    assert err.code == "cache_io_error" and err.http_status == 500 and not err.retryable
    assert err.facts["path"] == str(part) and err.facts["errno"] == errno.errorcode[code]
    assert str(part) in str(err) and err.hint
    assert visible(store) == []


def test_a_full_disk_while_writing_is_cache_full(
    store: Store, payload: tuple[FileOrigin, FileEntry, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    origin, entry, _ = payload

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(CacheFull) as info:
        run_fetch(store, origin, entry, FakeClock())
    assert info.value.facts["path"] == str(store.partial_paths(entry.blake3).part)
    assert info.value.facts["needed_bytes"] > 0


@pytest.mark.parametrize(
    ("status", "content_range", "content_length", "offset", "length", "ok"),
    [
        (206, "bytes 100-199/1000", "100", 100, 100, True),
        (206, "bytes 100-149/150", "50", 100, 100, True),  # a shorter object: counted later
        (200, None, "1000", 0, 1000, True),  # the whole object, which was asked for
        (200, None, "1000", 100, 100, False),  # Range ignored
        (200, None, "1000", 0, 100, False),  # Range ignored, from the start
        (206, "bytes 0-99/1000", "100", 100, 100, False),  # another range
        (206, "bytes 100-299/1000", "200", 100, 100, False),  # more than asked
        (206, None, "100", 100, 100, False),
        (206, "bytes */1000", "100", 100, 100, False),
        (204, None, "0", 100, 100, False),
    ],
)
def test_range_problem_accepts_only_the_range_asked_for(
    status: int,
    content_range: str | None,
    content_length: str | None,
    offset: int,
    length: int,
    ok: bool,
) -> None:
    problem = range_problem(status, content_range, content_length, offset, length)
    assert (problem is None) == ok, problem


def test_empty_file(store: Store, tmp_path: Path) -> None:
    (tmp_path / "origin").mkdir(exist_ok=True)
    (tmp_path / "origin" / "empty").write_bytes(b"")
    entry = FileEntry("empty", 0, digest_bytes(b""), CHUNK, ())
    run_fetch(store, FileOrigin(tmp_path / "origin"), entry, FakeClock())
    assert store.blob_path(entry.blake3).read_bytes() == b""


@given(st.integers(0, 80), st.floats(0.001, 5), st.floats(5, 100), st.integers(0, 2**32))
def test_backoff_is_full_jitter_within_cap(
    attempt: int, base: float, cap: float, seed: int
) -> None:
    delay = backoff_delay(attempt, base, cap, random.Random(seed))
    assert 0 <= delay <= min(cap, base * 2.0**attempt)


def test_token_bucket_spaces_reads_to_the_rate() -> None:
    clock = FakeClock()

    async def main() -> float:
        bucket = TokenBucket(1000, clock)
        start = clock.monotonic()
        for _ in range(5):
            await bucket.acquire(1000)
        return clock.monotonic() - start

    elapsed = asyncio.run(main())
    # The first second's worth is in the bucket; four more seconds are waited.
    assert 3.99 <= elapsed <= 4.01
