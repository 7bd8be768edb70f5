"""kill -9 of a pulling process at several points: the next pull resumes and verifies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from weightcache.config import load_config
from weightcache.hashing import digest_file
from weightcache.publish import publish
from weightcache.refs import parse_ref

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def chunks_done(cache: Path) -> int:
    """Chunks recorded as verified across every partial download, plus blobs committed."""
    try:
        done = sum(p.stat().st_size // 4 for p in (cache / "partial").glob("*.chunks"))
        blobs = sum(p.stat().st_size // MiB for p in (cache / "blobs").iterdir())
    except FileNotFoundError:
        return 0  # the puller has not laid out the cache yet, or a file just moved
    return done + blobs


def test_kill_9_at_several_points_then_resume(s3: Any, tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    for i in range(3):
        (model / f"shard-{i}.bin").write_bytes(os.urandom(16 * MiB))
    (model / "config.json").write_text("{}")
    total = sum(p.stat().st_size for p in model.iterdir())
    ref = f"s3://{s3.bucket}/crash/model"
    # 5 MiB parts: every 16 MiB shard goes up as a multipart upload.
    publish_env = {
        "WEIGHTCACHE_PUBLISH_CHUNK_BYTES": "1MiB",
        "WEIGHTCACHE_PUBLISH_PART_BYTES": "5MiB",
    }
    publish(model, parse_ref(ref), load_config(env={**os.environ, **publish_env}))
    cache = Path(os.environ["WEIGHTCACHE_CACHE_DIR"])
    before = s3.sent_bytes()

    # A throttled puller (16 MiB/s, 2 connections) so a kill lands mid-pull.
    slow = {
        **os.environ,
        "WEIGHTCACHE_FETCH_MAX_BYTES_PER_S": str(16 * MiB),
        "WEIGHTCACHE_FETCH_CONCURRENCY": "2",
    }
    n_chunks = 48
    for fraction in (0.2, 0.45, 0.7, 0.9):
        proc = subprocess.Popen(
            [sys.executable, "-m", "weightcache", "fetch", ref],
            env=slow,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            while chunks_done(cache) < fraction * n_chunks:
                assert proc.poll() is None, "the puller finished before it could be killed"
                assert time.monotonic() < deadline
                time.sleep(0.01)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()
        # Nothing half-written is ever visible.
        for blob in (cache / "blobs").iterdir():
            assert digest_file(blob) == blob.name
        assert not any((cache / "snapshots").iterdir())

    out = subprocess.run(
        [sys.executable, "-m", "weightcache", "fetch", ref, "--json"],
        env=os.environ,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["resumed_bytes"] > 0
    snap = Path(result["snapshot"])
    for p in model.iterdir():
        assert (snap / p.name).read_bytes() == p.read_bytes()

    sent = s3.sent_bytes() - before
    assert sent <= 1.3 * total, f"origin sent {sent / total:.2f}x the model"
    verify = subprocess.run(
        [sys.executable, "-m", "weightcache", "verify"],
        env=os.environ,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0 and "no problems found" in verify.stdout
