"""The origin misbehaves: the real SeaweedFS behind the fault proxy, embedded-mode loads.

Each model is published straight to SeaweedFS with 1 MiB chunks; then the
proxy goes into the path (``AWS_ENDPOINT_URL``) and breaks one chunk of the
big shard (bytes 1 MiB..2 MiB), or the whole file, as each test says. The
claims, for every fault:

* transient faults are retried a bounded number of times, spaced by full-jitter
  backoff, and the load completes bitwise correct with the origin sending about
  the model once (a body cut short is resumed from the byte it reached);
* persistent faults end in the specific typed error after exactly the
  configured number of attempts;
* no unverified byte ever reaches ``blobs/`` or ``snapshots/``, and a model
  already cached keeps loading;
* transfers stalled on the origin are unblocked by an abort or a cancellation
  within a second, whatever the read timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import weightcache
from tests.support.daemon import Daemon, call
from tests.support.faultproxy import FaultProxy, Record
from tests.support.models import assert_bitwise_equal, reference, tensors_digest, write_model
from tests.support.stopping import stop_stalled_fetch
from weightcache.api.server import HANDLER_GRACE_S
from weightcache.config import load_config
from weightcache.errors import (
    HashMismatch,
    ObjectNotFound,
    OriginDenied,
    OriginRangeInvalid,
    OriginUnavailable,
    ShuttingDown,
    WeightcacheError,
)
from weightcache.fetch import Fetcher, FetchStats, Transfers
from weightcache.hashing import digest_file
from weightcache.manifest import MANIFEST_NAME, parse
from weightcache.origin.s3 import S3Origin
from weightcache.publish import publish
from weightcache.refs import parse_ref
from weightcache.service import CANCEL_GRACE_S
from weightcache.store import Store

MiB = 1 << 20
BACKOFF_BASE_S = 0.05
BACKOFF_MAX_S = 0.2
#: what a retry may take beyond its backoff sleep: the failed request's teardown,
#: a thread hop, a new connection; generous because this runs on 2 busy cores
SLACK_S = 0.25
SHARD = "model-00001-of-00002.safetensors"
FAULTY_CHUNK = 1
FAULTY_START = FAULTY_CHUNK * MiB
#: every request for some part of the faulty chunk: the first, and retries resuming it
IN_CHUNK = range(FAULTY_START, FAULTY_START + MiB)


@dataclass
class Scene:
    s3: Any
    proxy: FaultProxy
    ref: str
    key: str  # the big shard's path as the proxy sees it
    want: dict[str, torch.Tensor]
    model_bytes: int  # what the origin has to send for the model: its files not yet cached
    manifest_bytes: int
    good_ref: str
    good_digest: str
    good_revision: str
    cache: Path


def new_bytes(directory: Path, cached: Path) -> int:
    """Bytes of the files in ``directory`` that no file in ``cached`` already holds.

    Identical files are stored once (tokenizer.json is the same in both models),
    so only these have to come from the origin.
    """
    have = {digest_file(p) for p in cached.rglob("*") if p.is_file()}
    return sum(
        p.stat().st_size for p in directory.rglob("*") if p.is_file() and digest_file(p) not in have
    )


@pytest.fixture
def scene(s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Scene]:
    # Every dtype over two shards, the first with a 3.2 MiB tensor: four 1 MiB chunks.
    files = write_model(tmp_path / "m", shards=2, big=3 * MiB + 200_000)
    assert (tmp_path / "m" / SHARD).stat().st_size > 3 * MiB
    good_files = write_model(tmp_path / "good", shards=1, seed=1, big=MiB)
    cfg = load_config(env={**os.environ, "WEIGHTCACHE_PUBLISH_CHUNK_BYTES": "1MiB"})
    ref, good_ref = f"s3://{s3.bucket}/org/m", f"s3://{s3.bucket}/org/good"
    publish(tmp_path / "m", parse_ref(ref), cfg)
    good = publish(tmp_path / "good", parse_ref(good_ref), cfg)
    manifest = s3.minio.stat_object(s3.bucket, f"org/m/{MANIFEST_NAME}").size

    credentials = (s3.env["AWS_ACCESS_KEY_ID"], s3.env["AWS_SECRET_ACCESS_KEY"])
    region = s3.env.get("AWS_REGION", "us-east-1")
    with FaultProxy(s3.env["AWS_ENDPOINT_URL"], credentials=credentials, region=region) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("WEIGHTCACHE_FETCH_BACKOFF_BASE_S", str(BACKOFF_BASE_S))
        monkeypatch.setenv("WEIGHTCACHE_FETCH_BACKOFF_MAX_S", str(BACKOFF_MAX_S))
        # Another model, cached before anything breaks.
        got = weightcache.load(good_ref)
        assert_bitwise_equal(got, reference(good_files))
        proxy.clear(log=True)
        yield Scene(
            s3=s3,
            proxy=proxy,
            ref=ref,
            key=f"/{s3.bucket}/org/m/{SHARD}",
            want=reference(files),
            model_bytes=new_bytes(tmp_path / "m", tmp_path / "good"),
            manifest_bytes=int(manifest or 0),
            good_ref=good_ref,
            good_digest=tensors_digest(got),
            good_revision=good.revision,
            cache=Path(os.environ["WEIGHTCACHE_CACHE_DIR"]),
        )


def attempts(scene: Scene, range_start: int | range | None = FAULTY_START) -> list[Record]:
    scene.proxy.wait_idle()
    return sorted(scene.proxy.requests_for(scene.key, range_start), key=lambda r: r.time)


def gaps(records: list[Record]) -> list[float]:
    """From the end of each attempt to the start of the next: the client's backoff."""
    out = []
    for prev, nxt in itertools.pairwise(records):
        assert prev.end is not None
        out.append(nxt.time - prev.end)
    return out


def assert_backoff_spacing(records: list[Record]) -> list[float]:
    """Each gap fits full jitter: uniform in [0, min(max, base * 2**attempt)], plus slack."""
    spaced = gaps(records)
    for attempt, gap in enumerate(spaced):
        cap = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt)
        assert -0.005 <= gap <= cap + SLACK_S, (attempt, gap, cap, spaced)
    return spaced


def assert_cache_clean(scene: Scene, *, revisions: set[str]) -> None:
    """Everything visible is verified: blobs hash to their names, snapshots are the expected."""
    for blob in (scene.cache / "blobs").iterdir():
        assert digest_file(blob) == blob.name, blob
    assert {p.name for p in (scene.cache / "snapshots").iterdir()} == revisions


def assert_good_model_still_loads(scene: Scene) -> None:
    before = len(scene.proxy.log)
    got, report = weightcache.load_with_report(scene.good_ref)
    assert report.cache_hit and tensors_digest(got) == scene.good_digest
    # Only its manifest went to the origin (through the proxy).
    assert [r.path.rsplit("/", 1)[-1] for r in scene.proxy.log[before:]] == [MANIFEST_NAME]


# -- transient faults: the load completes ----------------------------------------------

# A cut body is resumed from the byte it reached, so a rule that cuts bodies
# matches every request inside the chunk (IN_CHUNK), not only those from its start.
TRANSIENT: dict[str, tuple[dict[str, Any], int]] = {
    "503-slowdown-x2": ({"fault": "503", "times": 2}, 3),
    "429-x2": ({"fault": "429", "times": 2}, 3),
    "500-x1": ({"fault": "500", "times": 1}, 2),
    "reset-mid-body-x2": (
        {"fault": "reset", "after_bytes": 300_000, "times": 2, "range_start": IN_CHUNK},
        3,
    ),
    "reset-before-response-x1": ({"fault": "reset", "times": 1}, 2),
    "truncate-x2": (
        {"fault": "truncate", "after_bytes": 300_001, "times": 2, "range_start": IN_CHUNK},
        3,
    ),
}


@pytest.mark.parametrize("case", list(TRANSIENT))
def test_transient_fault_is_retried_with_backoff_and_the_load_is_bitwise(
    scene: Scene, case: str
) -> None:
    rule, expected_attempts = TRANSIENT[case]
    applied = scene.proxy.add_rule(scene.key, **{"range_start": FAULTY_START, **rule})
    cut = rule["fault"] in ("reset", "truncate") and "after_bytes" in rule
    before = scene.s3.sent_bytes()

    got, report = weightcache.load_with_report(scene.ref)

    assert_bitwise_equal(got, scene.want)
    tries = attempts(scene, IN_CHUNK)
    assert len(tries) == expected_attempts and applied.applied == expected_attempts - 1
    assert [r.fault is not None for r in tries] == [True] * (expected_attempts - 1) + [False]
    assert tries[0].range_start == FAULTY_START and tries[-1].status == 206
    # The last attempt brought the chunk to its end ...
    last = tries[-1]
    assert last.range_start is not None and last.range_start + last.bytes_sent == 2 * MiB
    if cut:
        # ... and each retry asked only for what had not arrived.
        starts = [r.range_start or 0 for r in tries]
        assert starts == sorted(starts) and starts[-1] > FAULTY_START
        if rule["fault"] == "truncate":  # a FIN loses nothing on the way: not a byte twice
            assert [r.bytes_sent for r in tries[:-1]] == [rule["after_bytes"]] * 2
            assert starts == [FAULTY_START + i * rule["after_bytes"] for i in range(3)]
    else:
        assert last.bytes_sent == MiB
    assert_backoff_spacing(tries)
    # Every other chunk of the shard was asked for once.
    assert len(attempts(scene, None)) == 4 + expected_attempts - 1

    sent = scene.s3.sent_bytes() - before
    floor = scene.model_bytes + scene.manifest_bytes
    if cut:
        # The origin sent what arrived and was kept, and some bytes that were still
        # in socket buffers at each cut; never a whole chunk again.
        assert floor < sent <= floor + rule["times"] * MiB
    else:
        # Status faults and a reset before the response never reach the origin.
        assert sent == floor
    # Every byte that reached weightcache was used: nothing was fetched twice.
    assert report.origin_bytes == scene.model_bytes
    assert_cache_clean(scene, revisions={scene.good_revision, report.revision})


def test_flipped_byte_is_refetched_at_once(scene: Scene) -> None:
    scene.proxy.add_rule(scene.key, "flip", range_start=FAULTY_START, offset=12_345, times=1)
    before = scene.s3.sent_bytes()
    got, report = weightcache.load_with_report(scene.ref)
    assert_bitwise_equal(got, scene.want)
    tries = attempts(scene)
    assert [r.fault for r in tries] == ["flip@12345", None]
    # A corrupt body is not a busy origin: no backoff before the re-fetch.
    assert gaps(tries)[0] <= SLACK_S
    # The corrupt chunk went out twice: the origin sent exactly one chunk more.
    assert scene.s3.sent_bytes() - before == scene.model_bytes + scene.manifest_bytes + MiB
    assert_cache_clean(scene, revisions={scene.good_revision, report.revision})


def test_stall_shorter_than_the_read_timeout_is_waited_out(
    scene: Scene, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEIGHTCACHE_FETCH_READ_TIMEOUT_S", "1.5")
    scene.proxy.add_rule(scene.key, "stall", range_start=FAULTY_START, seconds=0.4, times=1)
    scene.proxy.add_rule(scene.key, "stall", range_start=2 * MiB, seconds=0.4, after_bytes=1)
    before = scene.s3.sent_bytes()
    got, report = weightcache.load_with_report(scene.ref)
    assert_bitwise_equal(got, scene.want)
    # Waited out, not retried: one request per chunk.
    assert [r.fault for r in attempts(scene)] == ["stall"]
    assert [r.fault for r in attempts(scene, 2 * MiB)] == ["stall@1"]
    assert all(r.end is not None and r.end - r.time >= 0.4 for r in attempts(scene))
    assert scene.s3.sent_bytes() - before == scene.model_bytes + scene.manifest_bytes
    assert_cache_clean(scene, revisions={scene.good_revision, report.revision})


def test_throttled_origin_is_slow_but_complete(scene: Scene) -> None:
    rate = 4 * MiB
    scene.proxy.add_rule(scene.key, "throttle", bytes_per_s=rate)
    before = scene.s3.sent_bytes()
    got, report = weightcache.load_with_report(scene.ref)
    assert_bitwise_equal(got, scene.want)
    tries = attempts(scene, None)
    assert len(tries) == 4 and all(r.fault == "throttle" for r in tries)
    # Each 1 MiB chunk took at least its share of the rate; nothing timed out or retried.
    for r in tries:
        assert r.end is not None and r.end - r.time >= r.bytes_sent / rate - 0.02
    assert scene.s3.sent_bytes() - before == scene.model_bytes + scene.manifest_bytes
    assert_cache_clean(scene, revisions={scene.good_revision, report.revision})


MANIFEST_FAULTS = {
    "503-x2": {"fault": "503", "times": 2},
    "reset-mid-body-x1": {"fault": "reset", "after_bytes": 500, "times": 1},
    "truncate-x1": {"fault": "truncate", "after_bytes": 500, "times": 1},
}


@pytest.mark.parametrize("rule", list(MANIFEST_FAULTS.values()), ids=list(MANIFEST_FAULTS))
def test_transient_fault_on_the_manifest_is_retried(scene: Scene, rule: dict[str, Any]) -> None:
    scene.proxy.add_rule(f"/org/m/{MANIFEST_NAME}", **rule)
    got = weightcache.load(scene.ref)
    assert_bitwise_equal(got, scene.want)
    tries = sorted(scene.proxy.requests_for(f"/org/m/{MANIFEST_NAME}"), key=lambda r: r.time)
    assert len(tries) == rule["times"] + 1 and tries[-1].fault is None
    assert tries[-1].bytes_sent == scene.manifest_bytes
    assert_backoff_spacing(tries)


# -- persistent faults: a typed error, nothing visible, the cache keeps serving -------------


def expect_failure(scene: Scene, error: type[WeightcacheError], code: str) -> WeightcacheError:
    with pytest.raises(error) as info:
        weightcache.load(scene.ref)
    assert info.value.code == code
    scene.proxy.wait_idle()
    assert_cache_clean(scene, revisions={scene.good_revision})
    return info.value


def test_slowdown_forever_gives_origin_unavailable_after_every_retry(scene: Scene) -> None:
    retries = load_config().fetch.retries
    scene.proxy.add_rule(scene.key, "503", range_start=FAULTY_START)
    exc = expect_failure(scene, OriginUnavailable, "origin_unavailable")
    assert exc.facts["path"] == SHARD and exc.facts["chunk"] == FAULTY_CHUNK
    assert exc.facts["attempts"] == retries + 1
    tries = attempts(scene)
    assert len(tries) == retries + 1 and all(r.status == 503 for r in tries)
    spaced = assert_backoff_spacing(tries)
    # The client really slept between attempts (full jitter: the sum of six
    # uniforms over caps 0.05, 0.1, 0.2, 0.2, 0.2, 0.2 is below 0.05 with p < 1e-6).
    assert sum(spaced) >= 0.05, spaced

    assert_good_model_still_loads(scene)
    # Even with the origin down for everything, the cached model loads (offline).
    scene.proxy.add_rule(None, "503")
    got = weightcache.load(scene.good_ref)
    assert tensors_digest(got) == scene.good_digest

    # The origin recovers: the failed pull kept its verified chunks, and only the
    # chunk that never arrived is asked for again (every other one was done long
    # before the seven attempts and six sleeps ran out).
    scene.proxy.clear(log=True)
    before = scene.s3.sent_bytes()
    got, report = weightcache.load_with_report(scene.ref)
    assert_bitwise_equal(got, scene.want)
    assert [r.range_start for r in attempts(scene, None)] == [FAULTY_START]
    assert scene.s3.sent_bytes() - before == scene.manifest_bytes + MiB
    assert_cache_clean(scene, revisions={scene.good_revision, report.revision})


def test_corrupt_chunk_forever_gives_hash_mismatch_naming_file_and_chunk(scene: Scene) -> None:
    hash_retries = load_config().fetch.hash_retries
    scene.proxy.add_rule(scene.key, "flip", range_start=FAULTY_START, offset=MiB - 1)
    exc = expect_failure(scene, HashMismatch, "hash_mismatch")
    assert exc.facts["path"] == SHARD and exc.facts["chunk"] == FAULTY_CHUNK
    assert SHARD in str(exc) and f"chunk {FAULTY_CHUNK}" in str(exc)
    assert len(attempts(scene)) == hash_retries + 1
    assert_good_model_still_loads(scene)


@pytest.mark.parametrize("after_bytes", [None, 200_000], ids=["before-response", "mid-body"])
def test_stall_longer_than_the_read_timeout_gives_origin_unavailable(
    scene: Scene, monkeypatch: pytest.MonkeyPatch, after_bytes: int | None
) -> None:
    monkeypatch.setenv("WEIGHTCACHE_FETCH_READ_TIMEOUT_S", "0.5")
    monkeypatch.setenv("WEIGHTCACHE_FETCH_RETRIES", "2")
    # Every attempt stalls, including the retries that resume after the first 200 KB.
    scene.proxy.add_rule(
        scene.key, "stall", range_start=IN_CHUNK, seconds=30, after_bytes=after_bytes
    )
    exc = expect_failure(scene, OriginUnavailable, "origin_unavailable")
    assert exc.facts["chunk"] == FAULTY_CHUNK and exc.facts["attempts"] == 3
    tries = attempts(scene, IN_CHUNK)
    assert [r.range_start for r in tries] == [
        FAULTY_START + i * (after_bytes or 0) for i in range(3)
    ]
    assert len(tries) == 3 and all(r.outcome == "client_gone" for r in tries)
    assert all(r.bytes_sent == (after_bytes or 0) for r in tries)
    # The client gave up on each attempt at its 0.5 s read timeout: not at once, and
    # long before the 30 s stall ended (loose bounds: the proxy sees the request a
    # little after the client's clock starts, and the client's close a little later).
    for r in tries:
        assert r.end is not None and 0.3 <= r.end - r.time <= 2.0
    assert_backoff_spacing(tries)
    assert_good_model_still_loads(scene)


def test_access_denied_is_not_retried(scene: Scene) -> None:
    scene.proxy.add_rule(scene.key, "403", range_start=FAULTY_START)
    expect_failure(scene, OriginDenied, "origin_denied")
    assert len(attempts(scene)) == 1
    assert_good_model_still_loads(scene)


def test_object_deleted_after_publishing_gives_object_not_found(scene: Scene) -> None:
    scene.s3.minio.remove_object(scene.s3.bucket, f"org/m/{SHARD}")
    exc = expect_failure(scene, ObjectNotFound, "object_not_found")
    assert SHARD in str(exc)
    # Not retried: each chunk asked once. The first 404 cancels the other chunks,
    # whose requests are cut off (no status) if their answer had not come yet.
    tries = attempts(scene, None)
    assert 1 <= len(tries) <= 4 and any(r.status == 404 for r in tries)
    assert all(r.status in (404, None) for r in tries)
    assert len({r.range_start for r in tries}) == len(tries)
    assert_good_model_still_loads(scene)


@pytest.mark.parametrize("range_start", [0, FAULTY_START], ids=["first-chunk", "later-chunk"])
def test_origin_that_ignores_range_gives_origin_range_invalid(
    scene: Scene, range_start: int
) -> None:
    # The origin answers a ranged GET of the shard with 200 and the whole object.
    # Before any byte is used this is a typed, non-retryable error, not a changed
    # object (a later chunk would not hash) nor, for the first chunk, a success
    # that downloads the whole object for every chunk.
    scene.proxy.add_rule(scene.key, "ignore_range", range_start=range_start)
    exc = expect_failure(scene, OriginRangeInvalid, "origin_range_invalid")
    assert not exc.retryable and exc.http_status == 502
    assert exc.facts["path"] == SHARD and exc.facts["chunk"] == range_start // MiB
    assert exc.facts["offset"] == range_start and exc.facts["length"] == MiB
    assert "answered 200" in str(exc) and "ignores Range" in str(exc) and exc.hint
    tries = attempts(scene, range_start)
    assert len(tries) == 1 and tries[0].status == 200 and tries[0].fault == "ignore_range"
    assert_good_model_still_loads(scene)


def shard_entry(scene: Scene) -> Any:
    raw = scene.s3.minio.get_object(scene.s3.bucket, f"org/m/{MANIFEST_NAME}")
    try:
        manifest = parse(raw.read())[0]
    finally:
        raw.close()
        raw.release_conn()
    return next(f for f in manifest.files if f.path == SHARD)


@pytest.mark.parametrize("stop", ["abort_all", "cancel"])
@pytest.mark.parametrize("after_bytes", [None, 200_000], ids=["before-response", "mid-body"])
def test_stalled_transfers_are_unblocked_at_once_by_abort_or_cancel(
    scene: Scene, tmp_path: Path, stop: str, after_bytes: int | None
) -> None:
    # Every GET of the shard stalls for 30 s; the read timeout is 60 s. Without a
    # way to close the sockets, the fetch would hang on its threads for 30 s.
    scene.proxy.add_rule(scene.key, "stall", seconds=30, after_bytes=after_bytes)
    entry = shard_entry(scene)
    cfg = load_config()
    assert cfg.fetch.read_timeout_s >= 30
    store = Store(tmp_path / "cache")
    store.ensure_layout()
    origin = S3Origin(scene.s3.bucket, cfg.s3, read_timeout_s=cfg.fetch.read_timeout_s)
    transfers = Transfers()
    stats = FetchStats()
    chunks = len(entry.chunks)

    def stalled() -> int:
        return sum(
            1
            for r in scene.proxy.requests_for(scene.key)
            if r.end is None and r.bytes_sent == (after_bytes or 0)
        )

    async def main() -> tuple[BaseException | None, float]:
        pool = ThreadPoolExecutor(8)
        try:
            fetcher = Fetcher(store=store, policy=cfg.fetch, executor=pool, transfers=transfers)
            task = asyncio.create_task(fetcher.fetch(origin, f"org/m/{SHARD}", entry, stats))
            deadline = time.monotonic() + 20
            # Every chunk's GET is stalled, and what came before the stall has arrived.
            while (
                stalled() < chunks
                or transfers.active < chunks
                or stats.origin_bytes < chunks * (after_bytes or 0)
            ):
                assert time.monotonic() < deadline and not task.done(), scene.proxy.log
                await asyncio.sleep(0.01)
            return await stop_stalled_fetch(task, transfers, stop, chunks, pool, 10)
        finally:
            pool.shutdown(wait=False)
            origin.close()

    raised, took = asyncio.run(main())
    expected = asyncio.CancelledError if stop == "cancel" else ShuttingDown
    assert isinstance(raised, expected)
    assert took < 1.0, f"{stop} took {took:.2f}s to unblock {chunks} stalled transfers"
    assert transfers.active == 0
    assert os.listdir(store.blobs) == []
    # The proxy saw each client go away, long before the stall would have ended.
    scene.proxy.wait_idle()
    tries = scene.proxy.requests_for(scene.key)
    assert len(tries) == chunks and all(r.outcome == "client_gone" for r in tries)
    assert all(r.end is not None and r.end - r.time < 20 for r in tries)
    if after_bytes:
        # What arrived before the stall was synced and recorded for the next pull.
        assert set(store.read_progress(entry.blake3).values()) == {after_bytes}


def test_sigterm_against_a_stalled_origin_stops_within_the_grace(
    scene: Scene, tmp_path: Path
) -> None:
    # Every chunk GET stalls for a minute after its first bytes: the transfer
    # threads sit in a socket read. SIGTERM must still end the daemon within
    # daemon.shutdown_timeout_s plus the cancel and handler graces.
    scene.proxy.add_rule(scene.key, "stall", seconds=60, after_bytes=1)
    sock = tmp_path / "d.sock"
    daemon = Daemon(
        tmp_path / "dcache",
        sock,
        {**os.environ, "WEIGHTCACHE_DAEMON_SHUTDOWN_TIMEOUT_S": "1"},
    )
    with daemon:
        ensure = ThreadPoolExecutor(1).submit(
            call, sock, "POST", "/v1/ensure", {"ref": scene.ref, "lease": False}, 90
        )
        deadline = time.monotonic() + 20
        while not any(r.fault == "stall@1" for r in scene.proxy.requests_for(scene.key)):
            assert time.monotonic() < deadline, "no transfer reached the stall"
            time.sleep(0.05)
        started = time.monotonic()
        assert daemon.stop(timeout_s=60) == 0
        took = time.monotonic() - started
        status, body = ensure.result(timeout=10)
    assert took < 1.0 + CANCEL_GRACE_S + HANDLER_GRACE_S + 2.0, f"stopped after {took:.1f} s"
    assert status == 503 and body["error"]["code"] == "shutting_down"
