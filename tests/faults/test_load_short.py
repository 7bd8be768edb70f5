"""The load test, short: concurrent loads of one model under eviction pressure and a status storm.

``test_concurrent_loads_under_eviction_pressure_and_status_storm`` runs
``loadtest/load.py`` as a program, small, against the real daemon and the
session's SeaweedFS (``--endpoint``, ``--bucket``): 16 concurrent ensures per
wave (2 worker processes x 8 threads), two waves, every 4th operation a leased
re-hash of the snapshot, two threads pulling 4 other models into a budget of
3.5 models so that eviction never stops, and 200 concurrent ``GET /v1/status``
during the first wave. The properties are asserted on what it measured (its
``--json`` output), not the latencies.

The tests after it each reproduce, deterministically, a race this scenario
found (shared leases, an unprotected cache hit, listing while evicting, pulls
not counting each other's bytes) and guard its fix.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from weightcache.budget import Protection
from weightcache.config import Config, load_config
from weightcache.publish import publish
from weightcache.refs import parse_ref
from weightcache.service import Service
from weightcache.store import Store

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20
MB = 1_000_000
#: how the scenario reports a hold whose lease another thread's release ended early
LOST_LEASE = "ended before its release"


def _without_lost(error: str) -> str:
    """A hold's error without the lost-lease part: what else went wrong."""
    return "; ".join(p for p in error.split("; ") if LOST_LEASE not in p)


@pytest.mark.slow
def test_concurrent_loads_under_eviction_pressure_and_status_storm(s3: Any, tmp_path: Path) -> None:
    loads, rounds, status = 16, 2, 200
    measured = tmp_path / "load.json"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "loadtest.load"),
            *("--loads", str(loads), "--procs", "2", "--rounds", str(rounds)),
            *("--hold-every", "4", "--models", "4", "--model-bytes", "4MiB", "--shards", "2"),
            *("--chunk-bytes", "1MiB", "--budget-models", "3.5", "--pressure-threads", "2"),
            *("--status", str(status), "--status-bursts", "1", "--gap-s", "0.1"),
            *("--timeout-s", "120"),
            # The session's SeaweedFS (the AWS_* settings come from the s3 fixture).
            *("--endpoint", s3.env["AWS_ENDPOINT_URL"], "--bucket", s3.bucket),
            *("--workdir", str(tmp_path / "load"), "--json", str(measured)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    # What it printed: the summary, the latency table, the problems.
    story = f"exit {proc.returncode}\n{proc.stdout[-6000:]}{proc.stderr[-3000:]}"
    assert measured.exists(), story
    result: dict[str, Any] = json.loads(measured.read_text())
    ops = result["ops"]

    # Every wave ran, every load came back bitwise equal to the original, via the daemon.
    assert len(ops) == loads * rounds, story
    loaded = [o for o in ops if o["kind"] == "load"]
    assert loaded, story
    assert all(o["ok"] for o in loaded), story
    assert {o["mode"] for o in loaded} == {"daemon"}, story
    # Leased snapshots stayed whole while leased, and the lease lasted until released.
    holds = [o for o in ops if o["kind"] == "hold"]
    assert holds, story
    assert not [o for o in holds if _without_lost(o["error"])], story
    assert all(o["ok"] for o in holds), story
    # The pressure kept the daemon evicting, and none of its pulls failed.
    assert result["final_status"]["counters"]["evictions"] > 0, story
    assert result["pressure"], story
    assert all(o["ok"] for o in result["pressure"]), story
    # Every status request of the storm was answered.
    assert len(result["storm"]) == status, story
    assert {s["status"] for s in result["storm"]} == {200}, story
    # The blobs never outgrew the budget: not after a pull, not while pulls ran.
    samples = result["samples"]
    assert samples, story
    assert {s["budget"] for s in samples} == {result["budget_bytes"]}, story
    assert all(s["used"] <= s["budget"] for s in samples), story
    # Nothing else went wrong: workers, daemon log, daemon exit.
    assert result["problems"] == [], story
    assert proc.returncode == 0, story


# -- the bugs it finds, one at a time ------------------------------------------------------


def _model(root: Path, name: str, size: int, seed: int) -> str:
    src = root / "src" / name
    src.mkdir(parents=True)
    (src / "weights.bin").write_bytes(random.Random(seed).randbytes(size))
    (src / "config.json").write_text('{"model_type": "synthetic"}')
    ref = f"file://{root}/origin/{name}"
    publish(src, parse_ref(ref), load_config(env={"WEIGHTCACHE_PUBLISH_CHUNK_BYTES": "256KiB"}))
    return ref


def _config(root: Path, **env: str) -> Config:
    return load_config(
        env={
            "WEIGHTCACHE_CACHE_DIR": str(root / "cache"),
            "WEIGHTCACHE_CACHE_RESERVE_BYTES": "0",
            **env,
        }
    )


async def test_two_threads_of_one_worker_each_keep_their_lease(tmp_path: Path) -> None:
    # Two threads of one worker process ensure the same model: the daemon sees
    # the same pid twice. The first to finish releases its lease; the second is
    # still reading and must stay protected.
    ref = _model(tmp_path, "m", 1 * MB, 1)
    service = Service(_config(tmp_path))
    await service.start()
    try:
        first = await service.ensure(ref, pid=os.getpid())
        second = await service.ensure(ref, pid=os.getpid())
        assert first.lease is not None and second.lease is not None
        await service.release_lease(first.lease.id)
        assert second.ensured.revision in service.leased_revisions()
        await service.release_lease(second.lease.id)
    finally:
        await service.close()


async def test_an_eviction_racing_a_cache_hit_leaves_the_leased_files(tmp_path: Path) -> None:
    # Another pull's eviction (asking for every byte the cache holds) lands while a
    # cache hit is between its snapshot check and its lease.
    ref = _model(tmp_path, "m", 1 * MB, 1)
    service = Service(_config(tmp_path))
    await service.start()
    try:
        await service.ensure(ref, lease=False)
        original = service.node.lookup
        held = sum(size for _, size in service.node.store.iter_blobs())

        async def evicted_meanwhile(*args: Any, **kwargs: Any) -> Any:
            ensured = await original(*args, **kwargs)
            chosen = await service.hop(
                service.budget.evict, held, Protection(), "make_room", partial=True
            )
            assert chosen.revisions == ()  # the hit's revision is in use: protected
            return ensured

        service.node.lookup = evicted_meanwhile  # type: ignore[method-assign]
        got = await service.ensure(ref, pid=os.getpid())
        assert got.lease is not None
        missing = [f.path for f in got.ensured.files if not f.local_path.exists()]
        assert missing == [], f"leased, yet gone: {missing}"
    finally:
        await service.close()


def test_blob_bytes_while_a_blob_is_evicted(tmp_path: Path, monkeypatch: Any) -> None:
    # /v1/status, /metrics and every pull's space check add up the blobs; eviction
    # unlinks them from another thread. One unlinked between the listing and its
    # stat must not turn the sum into a FileNotFoundError (a 500).
    store = Store(tmp_path / "cache")
    store.ensure_layout()
    kept, gone = "a" * 64, "b" * 64
    store.blob_path(kept).write_bytes(b"x" * 10)
    store.blob_path(gone).write_bytes(b"y" * 20)
    real_scandir = os.scandir

    def scandir_then_evict(path: Any) -> Any:
        entries = list(real_scandir(path))
        store.blob_path(gone).unlink()  # the eviction, right after the listing
        return iter(entries)

    monkeypatch.setattr("weightcache.store.os.scandir", scandir_then_evict)
    assert store.blob_bytes() == 10


async def test_two_concurrent_pulls_stay_within_the_budget(tmp_path: Path) -> None:
    # Budget for 1.5 models, two models asked at once: each pull's space check
    # sees an empty cache, both are admitted, and the blobs reach two models.
    a = _model(tmp_path, "a", 2 * MB, 1)
    b = _model(tmp_path, "b", 2 * MB, 2)
    service = Service(_config(tmp_path, WEIGHTCACHE_CACHE_MAX_BYTES=str(3 * MB)))
    await service.start()
    store = service.node.store
    checks = 0
    both_checked = threading.Event()
    real_shortfall = service.budget.shortfall
    real_commit = store.commit_blob
    peak = 0

    def counted_shortfall(*args: Any, **kwargs: Any) -> Any:
        nonlocal checks
        checks += 1
        if checks >= 2:
            both_checked.set()
        return real_shortfall(*args, **kwargs)

    def commit_then_measure(digest: str, size: int) -> Path:
        nonlocal peak
        # Commits wait until both pulls passed their space check: the interleaving
        # the load test hits, made certain.
        both_checked.wait(timeout=10)
        path = real_commit(digest, size)
        peak = max(peak, store.blob_bytes())
        return path

    service.budget.shortfall = counted_shortfall  # type: ignore[method-assign]
    store.commit_blob = commit_then_measure  # type: ignore[method-assign]
    try:
        await asyncio.gather(service.ensure(a), service.ensure(b), return_exceptions=True)
        assert peak <= 3 * MB, f"{peak} bytes of blobs against a budget of {3 * MB}"
    finally:
        await service.close()
