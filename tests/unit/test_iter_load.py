"""``iter_load`` and the loader's sinks: order, completeness, the lease, dtype, the report.

``iter_load`` yields ``(name, tensor)`` file by file in file order, holds the
revision (a daemon lease, or embedded this process's use) while it runs, and
lets go when it is exhausted, closed or dropped. ``load(mmap=False)`` is bitwise
``safetensors.torch.load_file``; the report's phases add up to its total.
"""

from __future__ import annotations

import gc
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import weightcache
from tests.faults.test_hostile_api import Served
from tests.support.models import assert_bitwise_equal, reference, write_model
from weightcache.client.daemon import DaemonClient
from weightcache.client.header import read_header
from weightcache.client.report import LoadReport
from weightcache.config import load_config
from weightcache.errors import DeviceUnavailable, RequestInvalid, TensorNotFound
from weightcache.locks import RevisionUses
from weightcache.publish import publish
from weightcache.refs import parse_ref

SINKS = pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])


def published(root: Path, name: str = "m", *, shards: int = 3) -> tuple[str, dict[str, Path]]:
    files = write_model(root / "src" / name, shards=shards, seed=7)
    ref = f"file://{root}/origin/{name}"
    publish(root / "src" / name, parse_ref(ref), load_config())
    return ref, files


def file_order(files: dict[str, Path]) -> list[str]:
    """Every tensor name: files in path order, tensors in the order of their offsets."""
    return [name for rel in sorted(files) for name in read_header(files[rel]).tensors]


def busy_revisions() -> frozenset[str]:
    """Revisions some process (this one included) uses, as eviction sees them."""
    return RevisionUses(load_config().cache.dir / "locks").busy()


@SINKS
def test_iter_load_yields_every_tensor_in_file_order(tmp_path: Path, mmap: bool) -> None:
    ref, files = published(tmp_path)
    got = list(weightcache.iter_load(ref, mmap=mmap))
    assert [name for name, _ in got] == file_order(files)
    assert_bitwise_equal(dict(got), reference(files))


@SINKS
@pytest.mark.parametrize("spec", ["float*", ["int8.matrix", "bool.scalar", "float64.empty"]])
def test_iter_load_of_a_subset(tmp_path: Path, mmap: bool, spec: str | list[str]) -> None:
    ref, files = published(tmp_path)
    got = list(weightcache.iter_load(ref, tensors=spec, mmap=mmap))
    want = weightcache.load(ref, tensors=spec, mmap=mmap)
    assert [name for name, _ in got] == [n for n in file_order(files) if n in want]
    full = reference(files)
    assert_bitwise_equal(dict(got), {name: full[name] for name in want})
    assert len(got) == len(want) == (len(spec) if isinstance(spec, list) else len(got)) > 0


def test_iter_load_checks_its_arguments_at_the_call(tmp_path: Path) -> None:
    ref, _ = published(tmp_path)
    with pytest.raises(DeviceUnavailable):
        weightcache.iter_load(ref, device="tpu")
    with pytest.raises(RequestInvalid):
        weightcache.iter_load(ref, tensors=3)
    # A name no file holds is found before any tensor is handed out.
    tensors = weightcache.iter_load(ref, tensors=["int8.matrix", "no.such"])
    with pytest.raises(TensorNotFound, match=r"no\.such"):
        next(tensors)
    assert busy_revisions() == frozenset()


@SINKS
def test_embedded_iter_load_holds_the_revision_until_closed(tmp_path: Path, mmap: bool) -> None:
    ref, files = published(tmp_path)
    tensors = weightcache.iter_load(ref, mmap=mmap)
    assert busy_revisions() == frozenset()  # nothing happens before the first tensor
    next(tensors)
    (revision,) = busy_revisions()
    tensors.close()
    assert busy_revisions() == frozenset()

    # Dropped half-way (the engine raised, say): let go as well.
    tensors = weightcache.iter_load(ref, mmap=mmap)
    next(tensors)
    assert busy_revisions() == {revision}
    del tensors
    gc.collect()
    assert busy_revisions() == frozenset()

    # Exhausted: let go at the end.
    assert len(list(weightcache.iter_load(ref, mmap=mmap))) == len(file_order(files))
    assert busy_revisions() == frozenset()


@pytest.fixture
def served() -> Iterator[Served]:
    # AF_UNIX paths are short: the daemon's socket lives under /tmp.
    root = Path(tempfile.mkdtemp(prefix="wc-", dir="/tmp"))
    try:
        with Served(root, {}) as s:
            yield s
    finally:
        shutil.rmtree(root, ignore_errors=True)


@SINKS
def test_iter_load_through_the_daemon_releases_its_lease_when_closed(
    served: Served, mmap: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, files = published(served.root)
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", str(served.sock_path))
    client = DaemonClient(socket_path=served.sock_path)
    tensors = weightcache.iter_load(ref, mmap=mmap)
    first = [next(tensors), next(tensors)]
    assert client.status()["leases"] == 1, "the lease is held while the iteration runs"
    tensors.close()
    assert client.status()["leases"] == 0
    assert [name for name, _ in first] == file_order(files)[:2]

    got = dict(weightcache.iter_load(ref, mmap=mmap))
    assert client.status()["leases"] == 0
    assert_bitwise_equal(got, reference(files))


@SINKS
def test_dtype_casts_floats_and_keeps_integers(tmp_path: Path, mmap: bool) -> None:
    ref, files = published(tmp_path)
    got = weightcache.load(ref, dtype=torch.float16, mmap=mmap)
    want = {
        name: t.to(torch.float16) if t.is_floating_point() else t
        for name, t in reference(files).items()
    }
    assert_bitwise_equal(got, want)
    assert got["int64.matrix"].dtype == torch.int64 and got["bool.matrix"].dtype == torch.bool
    assert got["complex64.matrix"].dtype == torch.complex64


def test_mmap_false_tensors_are_private_memory(tmp_path: Path) -> None:
    ref, files = published(tmp_path, shards=2)
    tensors, report = weightcache.load_with_report(ref, mmap=False)
    assert report.sink == "read" and report.files == 2
    assert_bitwise_equal(tensors, reference(files))
    # One buffer per file: every tensor with bytes is a view of one of two storages.
    storages = {t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()}
    assert len(storages) == 2
    blobs = {str(path.resolve()) for path in weightcache.open(ref).iterdir()}
    mapped = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()}
    assert not blobs & mapped, "nothing maps the cached files"


def phases_add_up(report: LoadReport) -> None:
    assert report.total_s > 0
    assert abs(report.phases_s - report.total_s) <= 0.05 * report.total_s, report.to_json()


@SINKS
def test_the_reports_phases_add_up(tmp_path: Path, mmap: bool) -> None:
    ref, files = published(tmp_path)
    _, cold = weightcache.load_with_report(ref, mmap=mmap, dtype=torch.float64)
    _, warm = weightcache.load_with_report(ref, mmap=mmap, tensors="float*")
    for report in (cold, warm):
        phases_add_up(report)
        assert report.import_s == 0.0  # torch was imported long ago in this process
        assert report.read_s > 0 and report.fetch_s > 0
    assert cold.cast_s > 0 and warm.cast_s == 0.0
    assert not cold.cache_hit and warm.cache_hit
    assert cold.bytes_read == sum(t.numel() * t.element_size() for t in reference(files).values())
    assert cold.sink == ("mmap" if mmap else "read")
    assert f"sink={cold.sink}" in cold.line() and "import_s=" in cold.line()


def test_a_load_that_imports_torch_reports_it(tmp_path: Path) -> None:
    ref, _ = published(tmp_path)
    probe = (
        "import json, sys, weightcache\n"
        "assert 'torch' not in sys.modules\n"
        f"_, r = weightcache.load_with_report({ref!r}, mmap=False)\n"
        "print(json.dumps(r.to_json()))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["import_s"] > 0.05  # importing torch takes a while
    phases = sum(doc[f"{p}_s"] for p in ("import", "resolve", "fetch", "read", "h2d", "cast"))
    phases -= doc["overlap_s"]
    assert abs(phases - doc["total_s"]) <= 0.05 * doc["total_s"], doc
