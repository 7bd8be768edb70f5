"""A full disk: the cache on a 32 MiB file system of its own, the real daemon, the real SeaweedFS.

Each test mounts a tmpfs (or, where tmpfs cannot be mounted, a loop-mounted
ext4 image) for the cache and unmounts it afterwards, whatever happened. That
**requires root** (CAP_SYS_ADMIN), which CI has: without it every test here
fails at once with a message that says so, rather than skipping, because a
disk-full test that cannot fill a disk proves nothing and a skip would hide
that it never ran. The daemon's log and socket live outside the small file
system.

The claims (SPEC, "Bad input gets a clear error and loses nothing"):

* a pull that cannot fit fails up front with ``cache_full`` naming the bytes it
  needs and the bytes available, and leaves nothing behind in ``partial/``;
* a pull that passed the free-space check but meets a full disk on the way
  fails with ``cache_full`` too, and keeps what it verified for later;
* either way nothing under ``blobs/`` or ``snapshots/`` is damaged (``weightcache
  verify`` is clean), models already cached keep loading bitwise, the daemon
  stays healthy and serves everyone else; once there is room again the same
  pull succeeds, resuming instead of starting over.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import weightcache
from tests.support.daemon import Daemon, call
from tests.support.models import assert_bitwise_equal, reference, write_fp16_model, write_model
from weightcache.config import load_config
from weightcache.errors import CacheFull
from weightcache.hashing import digest_file
from weightcache.publish import publish
from weightcache.refs import parse_ref

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
FS_BYTES = 32 * MiB
RESERVE = 1 * MiB
#: the throttle that makes a 12 MiB pull take seconds, so the disk can fill under it
RATE = 2 * MiB
POLL_S = 0.02


# -- a small file system ---------------------------------------------------------------------


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


#: why a test here fails on a machine that cannot mount
NEEDS_ROOT = (
    "tests/faults/test_disk_full.py needs root (CAP_SYS_ADMIN) to mount a small file "
    "system for the cache; run it as root, as CI does"
)


def _mount(target: Path, image: Path) -> str:
    """Mount a FS_BYTES file system on ``target``; return how, or fail saying why not."""
    if os.geteuid() != 0:
        pytest.fail(f"{NEEDS_ROOT} (running as uid {os.geteuid()})", pytrace=False)
    tried = []
    out = _run("mount", "-t", "tmpfs", "-o", f"size={FS_BYTES},mode=0755", "tmpfs", str(target))
    if out.returncode == 0:
        return "tmpfs"
    tried.append(f"tmpfs: {out.stderr.strip()}")
    if shutil.which("mkfs.ext4"):
        with open(image, "wb") as f:
            f.truncate(FS_BYTES)
        mk = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
        if mk.returncode == 0:
            out = _run("mount", "-o", "loop", str(image), str(target))
            if out.returncode == 0:
                return "ext4 on a loop device"
            tried.append(f"loop ext4: {out.stderr.strip()}")
        else:
            tried.append(f"mkfs.ext4: {mk.stderr.strip()}")
    # A disk-full test that cannot fill a disk proves nothing: fail, do not skip.
    pytest.fail(f"{NEEDS_ROOT}; mounting failed: " + "; ".join(tried), pytrace=False)


def _unmount(target: Path) -> None:
    for _ in range(50):
        if _run("umount", str(target)).returncode == 0:
            return
        time.sleep(0.1)  # a process that just died may still hold a file open
    _run("umount", "-l", str(target))  # never leave it mounted


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "small"
    target.mkdir()
    how = _mount(target, tmp_path / "small.img")
    print(f"cache on {how}, {FS_BYTES} bytes")
    try:
        yield target
    finally:
        _unmount(target)


def fill(path: Path) -> int:
    """Write ``path`` until the file system has no byte left; return the bytes written."""
    written = 0
    block = MiB
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while block >= 512:
            try:
                written += os.write(fd, b"\xa5" * block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                block //= 2
    finally:
        os.close(fd)
    return written


# -- models ------------------------------------------------------------------------------------


@dataclass
class Models:
    small: str  # cached first; must keep loading whatever happens
    small_files: dict[str, Path]
    big: str  # never fits
    big_dir: Path
    mid: str  # fits, until the disk fills up under it
    mid_dir: Path


def publish_models(s3: Any, tmp_path: Path, *, mid: bool = True) -> Models:
    cfg = load_config(
        env={
            **os.environ,
            "WEIGHTCACHE_PUBLISH_CHUNK_BYTES": "1MiB",
            "WEIGHTCACHE_PUBLISH_PART_BYTES": "5MiB",
        }
    )
    small_files = write_model(tmp_path / "small", shards=2, big=2 * MiB)
    write_fp16_model(tmp_path / "big", shards=2, shard_bytes=18 * MiB, seed=2)
    names = ["small", "big"]
    if mid:
        write_fp16_model(tmp_path / "mid", shards=3, shard_bytes=4 * MiB, seed=3)
        names.append("mid")
    refs = {"mid": ""}
    for name in names:
        refs[name] = f"s3://{s3.bucket}/full/{name}"
        publish(tmp_path / name, parse_ref(refs[name]), cfg)
    return Models(
        refs["small"], small_files, refs["big"], tmp_path / "big", refs["mid"], tmp_path / "mid"
    )


def new_bytes(directory: Path, cache: Path) -> int:
    """Bytes of ``directory``'s files whose content the cache does not hold yet."""
    have = {p.name for p in (cache / "blobs").iterdir()}
    return sum(p.stat().st_size for p in directory.iterdir() if digest_file(p) not in have)


def model_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir())


# -- checks --------------------------------------------------------------------------------------


def assert_cache_sound(cache: Path) -> None:
    """Every blob hashes to its name; ``weightcache verify`` finds no problem."""
    for blob in (cache / "blobs").iterdir():
        assert digest_file(blob) == blob.name, blob
    out = subprocess.run(
        [sys.executable, "-m", "weightcache", "verify"],
        env={**os.environ, "WEIGHTCACHE_CACHE_DIR": str(cache)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "no problems found" in out.stdout, out.stdout + out.stderr


def assert_snapshot_matches(snapshot: Path, directory: Path) -> None:
    for p in directory.iterdir():
        assert digest_file(snapshot / p.name) == digest_file(p), p.name


def wait_for(what: str, cond: Callable[[], bool], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL_S)


def chunks_recorded(cache: Path) -> int:
    with contextlib.suppress(FileNotFoundError):
        return sum(p.stat().st_size // 4 for p in (cache / "partial").glob("*.chunks"))
    return 0


def visible_partials(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "partial").iterdir() if not p.name.endswith(".lock"))


class Background:
    """``fn()`` on a thread; ``result()`` waits for it and re-raises what it raised."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self._box: dict[str, Any] = {}

        def target() -> None:
            try:
                self._box["value"] = fn()
            except BaseException as exc:  # re-raised by result()
                self._box["error"] = exc

        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout_s: float = 180) -> Any:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the background call did not finish"
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]


# -- the daemon ----------------------------------------------------------------------------------


def start_daemon(tmp_path: Path, cache: Path, **env: str) -> Daemon:
    daemon = Daemon(
        cache,
        tmp_path / "run" / "wc.sock",
        {**os.environ, "WEIGHTCACHE_CACHE_RESERVE_BYTES": str(RESERVE), **env},
    )
    daemon.log = tmp_path / "daemon.log"  # not on the small file system
    return daemon


def assert_healthy(daemon: Daemon, models: Models, want: dict[str, torch.Tensor]) -> None:
    """Health, status, and a cached model served bitwise through the daemon."""
    status, body = call(daemon.sock, "GET", "/healthz")
    assert status == 200 and body["ready"], body
    status, body = call(daemon.sock, "GET", "/v1/status")
    assert status == 200, body
    status, body = call(daemon.sock, "POST", "/v1/ensure", {"ref": models.small, "lease": False})
    assert status == 200 and body["cache_hit"], (status, body)
    got, report = weightcache.load_with_report(models.small)
    assert report.mode == "daemon" and report.cache_hit
    assert_bitwise_equal(got, want)


def test_a_pull_that_cannot_fit_fails_cache_full_and_nothing_else(
    s3: Any, tmp_path: Path, small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = publish_models(s3, tmp_path)
    want = reference(models.small_files)
    cache = small_fs / "cache"
    daemon = start_daemon(tmp_path, cache)
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", str(daemon.sock))
    with daemon:
        got, report = weightcache.load_with_report(models.small)
        assert report.mode == "daemon" and not report.cache_hit
        assert_bitwise_equal(got, want)
        # A worker holds it: whatever a failing pull does, a leased model stays
        # (an unleased one is the subject of the eviction test below).
        status, body = call(daemon.sock, "POST", "/v1/ensure", {"ref": models.small})
        assert status == 200 and body["lease"], body

        needed = new_bytes(models.big_dir, cache)
        free_before = shutil.disk_usage(cache).free
        status, body = call(daemon.sock, "POST", "/v1/ensure", {"ref": models.big})
        free_after = shutil.disk_usage(cache).free
        assert status == 507, body
        err = body["error"]
        assert err["code"] == "cache_full", err
        details = err["details"]
        assert details["needed_bytes"] == needed > FS_BYTES, details
        assert min(free_before, free_after) <= details["available_bytes"]
        assert details["available_bytes"] <= max(free_before, free_after)
        assert details["reserve_bytes"] == RESERVE
        assert str(needed) in err["message"] and str(details["available_bytes"]) in err["message"]
        print(
            f"(a) {status} {err['code']}: needed {needed}, available {details['available_bytes']}"
        )

        # Refused before a byte was fetched: nothing in partial/, no snapshot, no blob.
        assert visible_partials(cache) == []
        assert len(list((cache / "snapshots").iterdir())) == 1
        assert_healthy(daemon, models, want)
        # The client raises the daemon's error as the same class, with its facts.
        with pytest.raises(CacheFull) as caught:
            weightcache.load(models.big)
        assert caught.value.facts["needed_bytes"] == needed
        assert daemon.stop() == 0
    assert_cache_sound(cache)


def test_the_disk_fills_up_during_a_pull(
    s3: Any, tmp_path: Path, small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = publish_models(s3, tmp_path)
    want = reference(models.small_files)
    cache = small_fs / "cache"
    filler = small_fs / "filler"
    daemon = start_daemon(
        tmp_path,
        cache,
        WEIGHTCACHE_FETCH_MAX_BYTES_PER_S=str(RATE),
        WEIGHTCACHE_FETCH_CONCURRENCY="1",
    )
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", str(daemon.sock))
    with daemon:
        got, _ = weightcache.load_with_report(models.small)
        assert_bitwise_equal(got, want)

        # The pull passes the free-space check and starts; then something else
        # on the node takes every byte left.
        pull = Background(lambda: call(daemon.sock, "POST", "/v1/ensure", {"ref": models.mid}))
        wait_for("the pull's first verified chunk", lambda: chunks_recorded(cache) >= 1)
        filled = fill(filler)
        assert shutil.disk_usage(cache).free < MiB, filled
        status, body = pull.result()
        print(f"(b) filler {filled} bytes; the pull answered {status}: {body}")
        assert status == 507 and body["error"]["code"] == "cache_full", (status, body)

        # While the disk is full: nothing damaged, cached models served, daemon healthy.
        for blob in (cache / "blobs").iterdir():
            assert digest_file(blob) == blob.name, blob
        assert_healthy(daemon, models, want)
        status, body = call(daemon.sock, "POST", "/v1/ensure", {"ref": models.mid})
        assert status == 507 and body["error"]["code"] == "cache_full", (status, body)

        # Room again: the failed pull left nothing wrong behind; the same pull then
        # succeeds, keeping what it had verified.
        os.unlink(filler)
        assert_cache_sound(cache)
        before = s3.sent_bytes()
        status, body = call(daemon.sock, "POST", "/v1/ensure", {"ref": models.mid})
        sent = s3.sent_bytes() - before
        assert status == 200, body
        kept = body["resumed_bytes"] + body["reused_bytes"]
        assert kept > 0, body
        assert sent < model_bytes(models.mid_dir), (sent, body)
        print(
            f"(b) retry: {body['resumed_bytes']} resumed, {body['reused_bytes']} reused, "
            f"{sent} from the origin of {model_bytes(models.mid_dir)}"
        )
        assert_snapshot_matches(Path(body["snapshot"]), models.mid_dir)
        assert_healthy(daemon, models, want)
        assert daemon.stop() == 0
    assert_cache_sound(cache)


def test_disk_full_in_embedded_mode(
    s3: Any, tmp_path: Path, small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = publish_models(s3, tmp_path)
    want = reference(models.small_files)
    cache = small_fs / "cache"
    filler = small_fs / "filler"
    for name, value in {
        "WEIGHTCACHE_CACHE_DIR": str(cache),
        "WEIGHTCACHE_SOCKET": str(tmp_path / "nobody.sock"),  # no daemon: embedded mode
        "WEIGHTCACHE_CACHE_RESERVE_BYTES": str(RESERVE),
        "WEIGHTCACHE_FETCH_MAX_BYTES_PER_S": str(RATE),
        "WEIGHTCACHE_FETCH_CONCURRENCY": "1",
    }.items():
        monkeypatch.setenv(name, value)
    got, report = weightcache.load_with_report(models.small)
    assert report.mode == "embedded"
    assert_bitwise_equal(got, want)

    # (a) cannot fit: refused up front, with the numbers.
    needed = new_bytes(models.big_dir, cache)
    with pytest.raises(CacheFull) as caught:
        weightcache.load(models.big)
    assert caught.value.facts["needed_bytes"] == needed
    assert 0 < caught.value.facts["available_bytes"] < needed
    assert visible_partials(cache) == []

    # (b) the disk fills up under the pull.
    pull = Background(lambda: weightcache.load(models.mid))
    wait_for("the pull's first verified chunk", lambda: chunks_recorded(cache) >= 1)
    fill(filler)
    with pytest.raises(CacheFull):
        pull.result()
    for blob in (cache / "blobs").iterdir():
        assert digest_file(blob) == blob.name, blob
    got, report = weightcache.load_with_report(models.small)  # a hit, on a full disk
    assert report.cache_hit
    assert_bitwise_equal(got, want)

    os.unlink(filler)
    got, report = weightcache.load_with_report(models.mid)
    assert report.mode == "embedded" and report.resumed_bytes + report.reused_bytes > 0
    assert report.origin_bytes < model_bytes(models.mid_dir)
    assert_cache_sound(cache)


def test_a_pull_that_cannot_fit_evicts_nothing(
    s3: Any, tmp_path: Path, small_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = publish_models(s3, tmp_path, mid=False)
    want = reference(models.small_files)
    cache = small_fs / "cache"
    # Cached before this daemon started (here by an embedded load), not leased.
    monkeypatch.setenv("WEIGHTCACHE_CACHE_DIR", str(cache))
    monkeypatch.setenv("WEIGHTCACHE_CACHE_RESERVE_BYTES", str(RESERVE))
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", str(tmp_path / "nobody.sock"))
    weightcache.load(models.small)
    daemon = start_daemon(tmp_path, cache)
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", str(daemon.sock))
    with daemon:
        status, body = call(daemon.sock, "POST", "/v1/ensure", {"ref": models.big})
        assert status == 507 and body["error"]["code"] == "cache_full", body
        before = s3.sent_bytes()
        got, report = weightcache.load_with_report(models.small)
        assert_bitwise_equal(got, want)
        assert report.cache_hit, "the failed pull evicted a cached model"
        assert s3.sent_bytes() - before < 64 * 1024  # the manifest, read to resolve the ref
        assert daemon.stop() == 0
