"""The real path against the real SeaweedFS: publish → pull → verified cache → tensors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import weightcache
from tests.support.models import assert_bitwise_equal, reference, tensors_digest, write_model
from weightcache.config import load_config
from weightcache.errors import (
    HashMismatch,
    ModelNotFound,
    RefInvalid,
    RevisionAmbiguous,
    TensorNotFound,
)
from weightcache.manifest import MANIFEST_NAME
from weightcache.publish import publish
from weightcache.refs import parse_ref

ROOT = Path(__file__).resolve().parents[2]


def cfg_for(**env: str) -> Any:
    return load_config(env={**os.environ, **env})


def publish_dir(directory: Path, ref: str, **env: str) -> Any:
    cfg = cfg_for(**env)
    return publish(directory, parse_ref(ref), cfg)


def manifest_bytes(s3: Any, prefix: str) -> int:
    # stat (HEAD), not GET: the origin's sent-bytes counter must not move.
    return int(s3.minio.stat_object(s3.bucket, f"{prefix}/{MANIFEST_NAME}").size)


def cache_dir() -> Path:
    return Path(os.environ["WEIGHTCACHE_CACHE_DIR"])


def model_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def test_round_trip_every_dtype_bitwise(s3: Any, tmp_path: Path) -> None:
    files = write_model(tmp_path / "m", shards=3)
    ref = f"s3://{s3.bucket}/org/model"
    published = publish_dir(tmp_path / "m", ref)
    before = s3.sent_bytes()

    tensors, report = weightcache.load_with_report(ref)
    assert_bitwise_equal(tensors, reference(files))
    assert report.revision == published.revision and not report.cache_hit
    assert report.files == 3 and report.tensors == len(reference(files))
    # The origin sent the model once and the manifest once: nothing else.
    sent = s3.sent_bytes() - before
    assert sent == model_size(tmp_path / "m") + manifest_bytes(s3, "org/model") * 1
    snap = cache_dir() / "snapshots" / published.revision
    assert sorted(p.name for p in snap.iterdir()) == sorted(
        p.name for p in (tmp_path / "m").iterdir()
    )
    assert json.loads((snap / "model.safetensors.index.json").read_text())["weight_map"]

    # Warm: a hit, bitwise the same, and the origin is asked only for the manifest.
    before = s3.sent_bytes()
    again, report2 = weightcache.load_with_report(ref)
    assert report2.cache_hit
    assert tensors_digest(again) == tensors_digest(tensors)
    assert s3.sent_bytes() - before == manifest_bytes(s3, "org/model")


def test_pinned_revision_needs_no_origin_once_cached(s3: Any, tmp_path: Path) -> None:
    write_model(tmp_path / "m", shards=1)
    published = publish_dir(tmp_path / "m", f"s3://{s3.bucket}/m")
    pinned = f"s3://{s3.bucket}/m@{published.revision[:10]}"
    weightcache.load(pinned)
    before = s3.sent_bytes()
    weightcache.load(pinned)
    assert s3.sent_bytes() == before


def test_old_revision_resolves_from_the_origin_after_republish(s3: Any, tmp_path: Path) -> None:
    write_model(tmp_path / "m", shards=2)
    first = publish_dir(tmp_path / "m", f"s3://{s3.bucket}/m")
    (tmp_path / "m" / "extra.txt").write_text("a file added in the second revision")
    second = publish_dir(tmp_path / "m", f"s3://{s3.bucket}/m")
    assert first.revision != second.revision
    path = weightcache.open(f"s3://{s3.bucket}/m@{first.revision[:8]}")
    assert path.name == first.revision and not (path / "extra.txt").exists()
    latest = weightcache.open(f"s3://{s3.bucket}/m")
    assert (latest / "extra.txt").read_text() == "a file added in the second revision"


def test_subset_reads_only_selected_tensors(s3: Any, tmp_path: Path) -> None:
    files = write_model(tmp_path / "m", shards=2, big=1 << 20)
    ref = f"s3://{s3.bucket}/m"
    publish_dir(tmp_path / "m", ref)
    want = {k: v for k, v in reference(files).items() if k.startswith("float32.")}
    got, report = weightcache.load_with_report(ref, tensors="float32.*")
    assert_bitwise_equal(got, want)
    assert report.bytes_read == sum(t.numel() * t.element_size() for t in want.values())
    got2 = weightcache.load(ref, tensors=lambda n: n == "big.blob")
    assert list(got2) == ["big.blob"]
    with pytest.raises(TensorNotFound, match=r"big\.blb"):
        weightcache.load(ref, tensors=["big.blb"])


def test_changed_object_fails_hash_and_leaves_nothing_visible(s3: Any, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    data = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "m" / "weights.bin").write_bytes(data)
    ref = f"s3://{s3.bucket}/m"
    publish_dir(tmp_path / "m", ref, WEIGHTCACHE_PUBLISH_CHUNK_BYTES="1MiB")
    tampered = bytearray(data)
    tampered[2 * 1024 * 1024 + 5] ^= 0x01  # one bit in chunk 2
    s3.minio.put_object(s3.bucket, "m/weights.bin", io.BytesIO(bytes(tampered)), len(tampered))

    with pytest.raises(HashMismatch) as info:
        weightcache.open(ref)
    assert info.value.code == "hash_mismatch"
    assert info.value.facts["path"] == "weights.bin" and info.value.facts["chunk"] == 2
    assert os.listdir(cache_dir() / "blobs") == []
    assert os.listdir(cache_dir() / "snapshots") == []


def test_two_models_sharing_a_file_store_it_once(s3: Any, tmp_path: Path) -> None:
    shared = os.urandom(2 * 1024 * 1024)
    for name, own in (("a", b"model a"), ("b", b"model b, which differs")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "shared.bin").write_bytes(shared)
        (tmp_path / name / "own.txt").write_bytes(own)
        publish_dir(tmp_path / name, f"s3://{s3.bucket}/{name}")
    weightcache.open(f"s3://{s3.bucket}/a")
    before = s3.sent_bytes()
    snap_b = weightcache.open(f"s3://{s3.bucket}/b")
    # Only b's own file and manifest came from the origin; the shared body was already here.
    assert s3.sent_bytes() - before == len(b"model b, which differs") + manifest_bytes(s3, "b")
    blobs = os.listdir(cache_dir() / "blobs")
    assert len(blobs) == 3
    assert os.path.realpath(snap_b / "shared.bin") in {
        str(cache_dir() / "blobs" / b) for b in blobs
    }


def test_missing_model_and_bad_refs(s3: Any) -> None:
    with pytest.raises(ModelNotFound) as info:
        weightcache.open(f"s3://{s3.bucket}/nothing-here")
    assert info.value.code == "model_not_found" and "weightcache.manifest.json" in str(info.value)
    with pytest.raises(ModelNotFound):
        weightcache.open(f"s3://{s3.bucket}/nothing-here@abcdef12")
    with pytest.raises(RefInvalid):
        weightcache.load("s3://Bad_Bucket/x")
    assert os.listdir(cache_dir() / "blobs") == []


def test_ambiguous_revision_prefix(s3: Any, tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    revs: list[str] = []
    for i in range(40):  # enough revisions that two share a first hex digit... we need 6
        (tmp_path / "m" / "f.txt").write_text(str(i))
        revs.append(publish_dir(tmp_path / "m", f"s3://{s3.bucket}/m").revision)
    # Find two revisions sharing the longest common prefix; ask with a shorter one
    # only if they share at least 6 digits (rare): otherwise check exact lookup.
    by_prefix: dict[str, list[str]] = {}
    for r in revs:
        by_prefix.setdefault(r[:6], []).append(r)
    dup = [v for v in by_prefix.values() if len(v) > 1]
    if dup:
        with pytest.raises(RevisionAmbiguous):
            weightcache.open(f"s3://{s3.bucket}/m@{dup[0][0][:6]}")
    path = weightcache.open(f"s3://{s3.bucket}/m@{revs[3][:6]}")
    assert (path / "f.txt").read_text() == "3"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weightcache", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        timeout=120,
    )


def test_cli_publish_index_fetch_ls_verify(s3: Any, tmp_path: Path) -> None:
    write_model(tmp_path / "m", shards=2)
    ref = f"s3://{s3.bucket}/cli/model"
    out = run_cli("publish", str(tmp_path / "m"), ref)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"published {ref}@")

    out = run_cli("fetch", ref, "--json")
    assert out.returncode == 0, out.stderr
    fetched = json.loads(out.stdout)
    assert not fetched["cache_hit"] and fetched["origin_bytes"] == model_size(tmp_path / "m")

    out = run_cli("ls", "--json")
    listing = json.loads(out.stdout)
    assert [m["revision"] for m in listing["models"]] == [fetched["revision"]]
    assert listing["models"][0]["location"] == ref

    out = run_cli("verify")
    assert out.returncode == 0 and "no problems found" in out.stdout

    # index: objects uploaded by someone else, without a manifest.
    for p in sorted((tmp_path / "m").iterdir()):
        s3.minio.fput_object(s3.bucket, f"raw/model/{p.name}", str(p))
    out = run_cli("index", f"s3://{s3.bucket}/raw/model")
    assert out.returncode == 0, out.stderr
    indexed_rev = out.stdout.split("@")[1].split()[0]
    # Same bytes, same paths, same chunk size: the same revision as publishing them.
    assert indexed_rev == fetched["revision"]


def test_cli_errors_are_one_line_and_nonzero(s3: Any) -> None:
    out = run_cli("fetch", "s3://Bad/x")
    assert out.returncode == 1
    assert out.stderr.startswith("weightcache: ref_invalid: invalid bucket")
    assert "Traceback" not in out.stderr
    out = run_cli("fetch", f"s3://{s3.bucket}/none")
    assert out.returncode == 1 and out.stderr.startswith("weightcache: model_not_found:")
    out = run_cli("fetch", "x", env={"WEIGHTCACHE_FETCH_CONCURRENCY": "zero"})
    assert out.returncode == 1 and "fetch.concurrency" in out.stderr


def test_lying_safetensors_header_is_refused_and_the_cache_stays_intact(
    s3: Any, tmp_path: Path
) -> None:
    files = write_model(tmp_path / "m", shards=2)
    good = f"s3://{s3.bucket}/good"
    publish_dir(tmp_path / "m", good)
    weightcache.load(good)

    # A second model whose shard claims a tensor runs past the end of the file.
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}
    ).encode()
    body = len(header).to_bytes(8, "little") + header + b"\0" * 16
    (bad_dir / "model.safetensors").write_bytes(body)
    bad = f"s3://{s3.bucket}/bad"
    publish_dir(bad_dir, bad)
    from weightcache.errors import HeaderInvalid

    with pytest.raises(HeaderInvalid) as info:
        weightcache.load(bad)
    assert info.value.code == "header_invalid" and "model.safetensors" in str(info.value)
    # The verified bytes are cached (they are what was published); loading the good
    # model still works, bitwise.
    assert_bitwise_equal(weightcache.load(good), reference(files))
    assert (weightcache.open(bad) / "model.safetensors").read_bytes() == body
