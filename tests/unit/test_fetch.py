"""Fetching one blob: retries, backoff, hash re-fetch, resume.

Real files, a fault seam, a fake clock.
"""

from __future__ import annotations

import asyncio
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.origins import FakeClock, FaultyOrigin
from weightcache.config import FetchConfig
from weightcache.errors import HashMismatch, ObjectNotFound, OriginUnavailable
from weightcache.fetch import Fetcher, FetchStats, TokenBucket
from weightcache.hashing import digest_bytes, digest_stream
from weightcache.manifest import FileEntry
from weightcache.origin.file import FileOrigin
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


def run_fetch(
    store: Store,
    origin: FaultyOrigin | FileOrigin,
    entry: FileEntry,
    clock: FakeClock,
    **policy: int | float,
) -> FetchStats:
    cfg = FetchConfig(
        concurrency=3, retries=4, hash_retries=2, backoff_base_s=0.5, backoff_max_s=4.0
    )
    cfg = FetchConfig(**{**cfg.__dict__, **policy})
    stats = FetchStats()

    async def main() -> None:
        with ThreadPoolExecutor(4) as pool:
            fetcher = Fetcher(
                store=store, policy=cfg, executor=pool, clock=clock, rng=random.Random(1)
            )
            await fetcher.fetch(origin, entry.path, entry, stats)

    asyncio.run(main())
    return stats


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
    # Chunk at offset 0 fails 3 times (503, reset mid-body, 503), then succeeds.
    faulty = FaultyOrigin(
        origin, lambda k, off, n: ["503", "short", "503"][n] if off == 0 and n < 3 else None
    )
    clock = FakeClock()
    stats = run_fetch(store, faulty, entry, clock)
    assert store.blob_path(entry.blake3).read_bytes() == data
    assert stats.retries == 3
    assert len(clock.sleeps) == 3
    for attempt, delay in enumerate(clock.sleeps):
        assert 0 <= delay <= min(4.0, 0.5 * 2**attempt)
    assert len([r for r in faulty.requests if r[1] == 0]) == 4


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
