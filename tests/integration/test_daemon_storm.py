"""The real daemon against the real SeaweedFS: one pull per node, however many workers ask."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.support import worker
from tests.support.daemon import Daemon, call
from tests.support.models import reference, tensors_digest, write_model
from weightcache.config import load_config
from weightcache.manifest import MANIFEST_NAME
from weightcache.publish import publish
from weightcache.refs import parse_ref

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_32_workers_one_cold_ref_one_pull(s3: Any, tmp_path: Path) -> None:
    files = write_model(tmp_path / "m", shards=4, big=8 * 1024 * 1024)
    ref = f"s3://{s3.bucket}/storm/model"
    published = publish(
        tmp_path / "m",
        parse_ref(ref),
        load_config(env={**os.environ, "WEIGHTCACHE_PUBLISH_CHUNK_BYTES": "1MiB"}),
    )
    model_bytes = sum(p.stat().st_size for p in (tmp_path / "m").iterdir())
    manifest = int(s3.minio.stat_object(s3.bucket, f"storm/model/{MANIFEST_NAME}").size)
    want = tensors_digest(reference(files))

    sock = tmp_path / "run" / "wc.sock"
    with Daemon(tmp_path / "cache", sock, dict(os.environ)) as daemon:
        barrier = tmp_path / "go"
        # Every worker has imported torch and the loader before the starting gun.
        procs = worker.start(ref, 32, barrier, daemon.env, timeout_s=300)
        before = s3.sent_bytes()
        barrier.touch()
        results = worker.collect(procs, timeout_s=300)

        sent = s3.sent_bytes() - before
        # One pull: the model once, plus the manifest, read once per resolve window
        # (concurrent resolves of a location share one read), not once per worker.
        assert model_bytes <= sent <= model_bytes + 8 * manifest, (sent, model_bytes, manifest)
        assert {r["digest"] for r in results} == {want}
        assert {r["report"]["mode"] for r in results} == {"daemon"}
        assert {r["report"]["revision"] for r in results} == {published.revision}

        status, doc = call(sock, "GET", "/v1/status")
        assert status == 200
        c = doc["counters"]
        assert c["misses"] == 1, c
        assert c["coalesced"] + c["hits"] == 31, c
        assert c["origin_bytes"] == model_bytes
        assert daemon.stop() == 0
