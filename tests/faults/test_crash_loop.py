"""kill -9 of the daemon, again and again, mid-pull: every pull completes, once from the origin.

The short version of ``loadtest/crash_loop.py`` (which describes the scenario):
4 models of 3 shards, 5 kills, the real daemon against the real SeaweedFS. The
kill points come from a random seed, printed (a failure shows it); set
``CRASH_LOOP_SEED`` to repeat one.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path
from typing import Any

import pytest

from loadtest import crash_loop
from weightcache.config import load_config
from weightcache.index import Index
from weightcache.publish import publish
from weightcache.refs import parse_ref
from weightcache.service import Service

MiB = 1 << 20
#: read at import (conftest clears WEIGHTCACHE_* variables per test; this name is not one)
SEED = int(os.environ.get("CRASH_LOOP_SEED") or secrets.randbits(31))


@pytest.mark.timeout(240)
def test_daemon_killed_mid_pull_again_and_again(s3: Any, tmp_path: Path) -> None:
    print(f"crash loop seed {SEED} (repeat with CRASH_LOOP_SEED={SEED})")
    params = crash_loop.Params(
        models=4,
        kills=5,
        shards=3,
        shard_bytes=2 * MiB,
        # Half-MiB chunks: a kill wastes at most the chunks in flight (concurrency x
        # chunk), so 5 kills cost at most 5 MiB on top of 24: comfortably under 1.3x.
        chunk_bytes=MiB // 2,
        rate_bytes_per_s=8 * MiB,
        concurrency=2,
        window=2,
        seed=SEED,
    )
    result = crash_loop.run(
        params,
        env=dict(os.environ),
        bucket=s3.bucket,
        sent_bytes=s3.sent_bytes,
        workdir=tmp_path / "crash",
        log=print,
    )
    print(crash_loop.kill_table(result))
    print(crash_loop.summary(result))
    where = f"seed {SEED}, daemon log {result.log_path}"

    # Every pull complete and bitwise right, every prefetch job done though posted
    # once, no .part left, verify clean, the stale socket never in the way, no
    # internal error, the origin at most 1.3x the models: run() checks each.
    assert result.problems == [], f"{where}: {result.problems}"
    assert len(result.kills) == params.kills, where
    # The throttle makes the kills land mid-pull, not between pulls.
    assert result.mid_pull_kills > params.kills // 2, f"{where}\n{crash_loop.kill_table(result)}"
    assert result.stale_sockets == params.kills, where
    assert result.verify_rc == 0 and "no problems found" in result.verify_out, where
    assert result.origin_bytes <= crash_loop.MAX_ORIGIN_RATIO * result.total_bytes, where
    # Verified chunks on disk at a kill are kept: a later pull resumes them
    # instead of asking the origin again.
    if any(k.partial_bytes for k in result.kills):
        assert result.resumed_bytes > 0 and result.resumed_blobs > 0, where
    # The restarted daemons finished what they were killed in, by themselves.
    assert all(m.posts == 1 for m in result.models if m.mode == "prefetch"), where


async def _started(cfg: Any) -> Service:
    """A service whose start-up resumption of interrupted pulls has run to its end."""
    service = Service(cfg)
    await service.start()
    resume = [t for t in asyncio.all_tasks() if t.get_name() == "weightcache-resume"]
    await asyncio.wait_for(asyncio.gather(*resume), timeout=120)
    return service


@pytest.mark.timeout(180)
async def test_a_pull_killed_after_linking_its_snapshot_is_not_resumed_forever(
    s3: Any, tmp_path: Path
) -> None:
    crash_loop.write_model(tmp_path / "m", shards=2, shard_bytes=256 * 1024, seed=1)
    ref = f"s3://{s3.bucket}/linked/model"
    cfg = load_config()
    publish(tmp_path / "m", parse_ref(ref), cfg)
    service = await _started(cfg)
    try:
        rev = (await service.ensure(ref, lease=False)).ensured.revision
    finally:
        await service.close()
    # What a kill -9 between Service._pull's link of the snapshot (inside
    # node.ensure_resolved) and its deletion of the pull record leaves behind;
    # the crash loop lands there now and then (2 records in the last 20-kill run).
    index = Index(cfg.cache.dir / "index")
    try:
        index.put(("pull", rev), {"ref": f"{ref}@{rev}"})
    finally:
        index.close()

    service = await _started(cfg)  # resumes the pull: a cache hit
    try:
        await service.evict(ref)  # then an admin evicts the model
    finally:
        await service.close()
    before = s3.sent_bytes()
    service = await _started(cfg)
    try:
        left = [r for r, _ in service.node.index.items("pull")]
        back = service.node.store.has_snapshot(rev)
    finally:
        await service.close()
    assert not back, "the evicted model was pulled again by a restart"
    assert s3.sent_bytes() == before
    assert left == []
