"""Many processes on one node, no daemon: each blob is pulled from the origin once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.support import worker
from tests.support.models import reference, tensors_digest, write_model
from weightcache.config import load_config
from weightcache.manifest import MANIFEST_NAME
from weightcache.publish import publish
from weightcache.refs import parse_ref


def test_eight_processes_cold_pull_each_file_once(s3: Any, tmp_path: Path) -> None:
    files = write_model(tmp_path / "m", shards=4, big=6 * 1024 * 1024)
    ref = f"s3://{s3.bucket}/storm/model"
    cfg = load_config(env={**os.environ, "WEIGHTCACHE_PUBLISH_CHUNK_BYTES": "1MiB"})
    published = publish(tmp_path / "m", parse_ref(ref), cfg)
    model_bytes = sum(p.stat().st_size for p in (tmp_path / "m").iterdir())
    manifest = int(s3.minio.stat_object(s3.bucket, f"storm/model/{MANIFEST_NAME}").size)
    want = tensors_digest(reference(files))

    barrier = tmp_path / "go"
    procs = worker.start(ref, 8, barrier, os.environ)
    before = s3.sent_bytes()
    barrier.touch()
    results = worker.collect(procs)

    sent = s3.sent_bytes() - before
    # Each file once; the only extra is each process reading the (small) manifest.
    assert sent == model_bytes + 8 * manifest, (sent, model_bytes, manifest)
    assert {r["digest"] for r in results} == {want}
    assert {r["report"]["revision"] for r in results} == {published.revision}
    assert sum(r["report"]["origin_bytes"] for r in results) == model_bytes
    blobs = Path(os.environ["WEIGHTCACHE_CACHE_DIR"]) / "blobs"
    assert len(os.listdir(blobs)) == len(published.manifest.files)
    assert os.listdir(Path(os.environ["WEIGHTCACHE_CACHE_DIR"]) / "partial") == []
