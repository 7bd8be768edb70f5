"""The node cache over a file:// origin: space checks, dedupe, verify, offline fallback."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import weightcache
from tests.support.origins import FakeClock
from weightcache.config import load_config
from weightcache.embedded import Embedded, ensure_blocking
from weightcache.errors import CacheFull, CacheIOError, OriginUnavailable
from weightcache.index import Index
from weightcache.publish import publish
from weightcache.refs import parse_ref
from weightcache.store import Store
from weightcache.verify import verify

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def model(tmp_path: Path) -> tuple[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    body = random.Random(3).randbytes(300_000)
    (src / "a.bin").write_bytes(body)
    (src / "sub").mkdir()
    (src / "sub" / "copy-of-a.bin").write_bytes(body)  # same content twice in one model
    (src / "config.json").write_text('{"x": 1}')
    ref = f"file://{tmp_path}/origin/m"
    publish(src, parse_ref(ref), load_config(env={"WEIGHTCACHE_PUBLISH_CHUNK_BYTES": "64KiB"}))
    return ref, src


def cfg(tmp_path: Path, **env: str) -> object:
    return load_config(env={"WEIGHTCACHE_CACHE_DIR": str(tmp_path / "cache"), **env})


def test_identical_files_in_one_model_are_one_blob(tmp_path: Path, model: tuple[str, Path]) -> None:
    ref, src = model
    result = ensure_blocking(ref, cfg(tmp_path))  # type: ignore[arg-type]
    assert result.origin_bytes == 300_000 + len('{"x": 1}')
    assert len(os.listdir(tmp_path / "cache" / "blobs")) == 2
    assert (result.snapshot / "sub" / "copy-of-a.bin").read_bytes() == (src / "a.bin").read_bytes()
    assert [f.path for f in result.files] == ["a.bin", "config.json", "sub/copy-of-a.bin"]


def test_cache_full_names_the_numbers_and_writes_nothing(
    tmp_path: Path, model: tuple[str, Path]
) -> None:
    ref, _ = model
    with pytest.raises(CacheFull) as info:
        ensure_blocking(ref, cfg(tmp_path, WEIGHTCACHE_CACHE_RESERVE_BYTES=str(1 << 60)))  # type: ignore[arg-type]
    err = info.value
    assert err.code == "cache_full" and err.http_status == 507
    assert err.facts["needed_bytes"] == 300_000 + 8
    assert err.facts["reserve_bytes"] == 1 << 60 and err.facts["available_bytes"] > 0
    assert "needs 300008 bytes" in str(err)
    cache = tmp_path / "cache"
    assert os.listdir(cache / "blobs") == [] and os.listdir(cache / "partial") == []


def test_a_disk_error_while_pulling_is_cache_io_error_and_the_next_pull_completes(
    tmp_path: Path, model: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, src = model
    config = cfg(tmp_path)
    real = os.pwrite
    chunk = 64 * 1024

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if len(data) == chunk and offset == 2 * chunk:  # the third chunk of a.bin
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(CacheIOError) as info:
        ensure_blocking(ref, config)  # type: ignore[arg-type]
    err = info.value
    assert err.code == "cache_io_error" and err.http_status == 500 and not err.retryable
    part = Path(err.facts["path"])
    assert part.parent == tmp_path / "cache" / "partial" and part.suffix == ".part"
    assert err.facts["errno"] == "EIO" and err.facts["chunk"] == 2 and err.hint
    assert str(part) in str(err)
    assert os.listdir(tmp_path / "cache" / "snapshots") == []

    monkeypatch.setattr(os, "pwrite", real)  # the disk is back
    result = ensure_blocking(ref, config)  # type: ignore[arg-type]
    assert (result.snapshot / "a.bin").read_bytes() == (src / "a.bin").read_bytes()


def test_budget_is_enforced_before_pulling(tmp_path: Path, model: tuple[str, Path]) -> None:
    ref, _ = model
    with pytest.raises(CacheFull, match="budget"):
        ensure_blocking(ref, cfg(tmp_path, WEIGHTCACHE_CACHE_MAX_BYTES="100000"))  # type: ignore[arg-type]


def test_load_from_inside_a_running_event_loop(
    tmp_path: Path, model: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, src = model
    monkeypatch.setenv("WEIGHTCACHE_CACHE_DIR", str(tmp_path / "cache"))

    async def inside() -> Path:
        return weightcache.open(ref)

    snap = asyncio.run(inside())
    assert (snap / "a.bin").read_bytes() == (src / "a.bin").read_bytes()


def test_unreachable_origin_is_retried_then_falls_back_to_last_resolved_revision(
    tmp_path: Path, model: tuple[str, Path]
) -> None:
    ref, _src = model
    # Nothing listens on port 9: every origin request is refused.
    config = cfg(
        tmp_path,
        AWS_ENDPOINT_URL="http://127.0.0.1:9",
        AWS_ACCESS_KEY_ID="test",
        AWS_SECRET_ACCESS_KEY="test-secret",
        WEIGHTCACHE_FETCH_RETRIES="2",
    )
    s3_ref = parse_ref("s3://bucket/m")
    clock = FakeClock()

    async def attempt() -> Path:
        node = Embedded(config, clock=clock)  # type: ignore[arg-type]
        try:
            return (await node.ensure(str(s3_ref))).snapshot
        finally:
            await node.aclose()

    with pytest.raises(OriginUnavailable) as info:
        asyncio.run(attempt())
    assert len(clock.sleeps) == 2  # the manifest read was retried with backoff, then gave up
    # ... and says so, with the endpoint it tried.
    assert info.value.facts["attempts"] == 3 and "after 3 attempts" in info.value.message
    assert "127.0.0.1:9" in info.value.message

    # Once a revision of that location is cached, an origin outage does not stop loads.
    local = ensure_blocking(ref, config)  # type: ignore[arg-type]
    Store(tmp_path / "cache").set_ref(s3_ref.location_key, local.revision)
    assert asyncio.run(attempt()) == local.snapshot


def test_verify_finds_and_repairs_a_corrupt_blob(tmp_path: Path, model: tuple[str, Path]) -> None:
    ref, src = model
    config = cfg(tmp_path)
    result = ensure_blocking(ref, config)  # type: ignore[arg-type]
    store = Store(tmp_path / "cache")
    blob = store.blob_path(result.files[0].blake3)
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")

    index = Index(store.index_dir)
    try:
        report = verify(store, index)
    finally:
        index.close()
    assert report.corrupt_blobs == [result.files[0].blake3]
    assert not report.clean

    env = {**os.environ, "WEIGHTCACHE_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-m", "weightcache", "verify"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 1 and f"corrupt blob {result.files[0].blake3}" in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "weightcache", "verify", "--repair"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "quarantined blob" in out.stdout and "pulled again" in out.stdout
    assert len(os.listdir(tmp_path / "cache" / "quarantine")) == 1
    assert (result.snapshot / "a.bin").read_bytes() == (src / "a.bin").read_bytes()
    out = subprocess.run(
        [sys.executable, "-m", "weightcache", "verify"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0 and "no problems found" in out.stdout
