"""kill -9 of a pulling process in the middle of its chunks: the next pull resumes
inside them, verifies every chunk whole, and the origin sends little more than the model.

A 256 MiB model in 16 MiB chunks (the default) is pulled by the real CLI in a
subprocess, 8 ranged GETs at a time, from the real SeaweedFS behind the fault
proxy, which paces each GET's body at 8 MiB/s (asking SeaweedFS for it 256 KiB
at a time, so that SeaweedFS's byte counter, which the bound is checked on,
does not run megabytes ahead in socket buffers): every kill lands with eight
chunks part-way through. Without resuming inside a chunk each kill threw away
what those eight had received (about half of 128 MiB on average: three kills
made the origin send about 1.6x the model); with a progress record every
1 MiB it throws away at most 1 MiB per transfer, plus what was in flight.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.faultproxy import FaultProxy
from weightcache.config import load_config
from weightcache.hashing import digest_file, is_digest
from weightcache.publish import publish
from weightcache.refs import parse_ref
from weightcache.store import Store

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
SHARDS = 4
SHARD_BYTES = 64 * MiB
CHUNK_BYTES = 16 * MiB
#: each GET's body, at the proxy
GET_BYTES_PER_S = 8 * MiB
#: kill when this fraction of the model is on disk (committed, verified, or recorded);
#: not at multiples of 8 chunks, where the eight transfers would be between chunks
KILL_AT = (0.3, 0.55, 0.8)
#: the origin may send at most this multiple of the model over the kills and the resume
MAX_ORIGIN_RATIO = 1.15


def on_disk(store: Store) -> int:
    """Bytes of the model the next pull will not ask the origin for (if they verify):
    committed blobs, chunks in chunk logs, and bytes in progress records."""
    total = 0
    try:
        for blob in store.blobs.iterdir():
            total += blob.stat().st_size
        for part in store.partial.glob("*.part"):
            digest = part.name.removesuffix(".part")
            if not is_digest(digest):
                continue
            done = store.read_chunk_log(digest)
            total += len(done) * CHUNK_BYTES
            total += sum(n for i, n in store.read_progress(digest).items() if i not in done)
    except FileNotFoundError:
        return total  # a file moved under us (a commit); the next look sees it
    return total


def test_kill_9_at_several_points_then_resume(s3: Any, tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    for i in range(SHARDS):
        (model / f"shard-{i}.bin").write_bytes(os.urandom(SHARD_BYTES))
    (model / "config.json").write_text("{}")
    total = sum(p.stat().st_size for p in model.iterdir())
    ref = f"s3://{s3.bucket}/crash/model"
    # 16 MiB parts: every shard goes up as a multipart upload.
    publish_env = {"WEIGHTCACHE_PUBLISH_PART_BYTES": "16MiB"}
    publish(model, parse_ref(ref), load_config(env={**os.environ, **publish_env}))
    cache = Path(os.environ["WEIGHTCACHE_CACHE_DIR"])
    store = Store(cache)
    before = s3.sent_bytes()

    credentials = (s3.env["AWS_ACCESS_KEY_ID"], s3.env["AWS_SECRET_ACCESS_KEY"])
    region = s3.env.get("AWS_REGION", "us-east-1")
    with FaultProxy(s3.env["AWS_ENDPOINT_URL"], credentials=credentials, region=region) as proxy:
        proxy.add_rule("/crash/model/shard-", "pace", method="GET", bytes_per_s=GET_BYTES_PER_S)
        env = {**os.environ, "AWS_ENDPOINT_URL": proxy.url}
        kills = []
        for fraction in KILL_AT:
            proc = subprocess.Popen(
                [sys.executable, "-m", "weightcache", "fetch", ref],
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                deadline = time.monotonic() + 60
                while on_disk(store) < fraction * total:
                    assert proc.poll() is None, "the puller finished before it could be killed"
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
            finally:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                assert proc.stderr is not None
                proc.stderr.close()
            proxy.wait_idle(10)
            kills.append((on_disk(store), s3.sent_bytes() - before))
            # Nothing half-written is ever visible.
            for blob in store.blobs.iterdir():
                assert digest_file(blob) == blob.name
            assert not any(store.snapshots.iterdir())
        # Each kill stopped transfers in the middle of their chunks.
        assert len(list(store.partial.glob("*.progress"))) > 0

        out = subprocess.run(
            [sys.executable, "-m", "weightcache", "fetch", ref, "--json"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    snap = Path(result["snapshot"])
    for p in model.iterdir():
        assert (snap / p.name).read_bytes() == p.read_bytes()
    assert result["resumed_bytes"] > 0
    # Chunks were resumed from inside: GETs that start where a killed puller's
    # progress record said, not at a chunk's first byte.
    starts = [r.range_start for r in proxy.log if "shard-" in r.path]
    assert any(s is not None and s % CHUNK_BYTES for s in starts), starts

    sent = s3.sent_bytes() - before
    steps = ", ".join(f"{d / MiB:.0f} MiB on disk / {s / MiB:.0f} MiB sent" for d, s in kills)
    print(f"\ncrash: kills at {steps}; origin sent {sent / total:.3f}x the model in all")
    assert sent <= MAX_ORIGIN_RATIO * total, f"origin sent {sent / total:.2f}x the model"
    verify = subprocess.run(
        [sys.executable, "-m", "weightcache", "verify"],
        env=os.environ,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0 and "no problems found" in verify.stdout
    assert list(store.partial.glob("*.part")) == []
