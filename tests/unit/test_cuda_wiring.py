"""The loader's CUDA path, driven on CPU: the same generator the loader runs for a
CUDA device, with the staging ring over the host copier standing in for streams.
Bitwise results, phases that add up, and files closed only after the ring is done."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.support.models import assert_bitwise_equal, reference, write_model
from weightcache.client import cuda, loader
from weightcache.client.cpu import SafetensorsFile
from weightcache.client.readers import ReaderPool
from weightcache.client.report import LoadReport, PhaseClock
from weightcache.client.ring import StagingRing
from weightcache.client.selection import make_selector


def _through_the_ring(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], LoadReport, dict[str, Path]]:
    files = write_model(tmp_path / "m", shards=3, big=300_000)
    shards = sorted(p for p in files.values() if p.suffix == ".safetensors")
    pool = ReaderPool(2)
    ring = StagingRing(cuda.host_copier(), buffers=3, buffer_bytes=64 * 1024)

    def load_on_host(plans: Any, fds: Any, device: Any, **kw: Any) -> Any:
        return cuda.load_staged(
            plans, fds, ring, pool, device=torch.device("cpu"), stats=kw.get("stats")
        )

    monkeypatch.setattr(cuda, "load_cuda", load_on_host)
    opened = [(p.name, p, SafetensorsFile.open(p)) for p in shards]
    report = LoadReport()
    clock = PhaseClock(report, time.perf_counter())
    try:
        got = dict(
            loader._cuda_tensors(
                opened, make_selector(None), torch.device("cpu"), dtype, clock, pool
            )
        )
    finally:
        for _, _, sf in opened:
            sf.close()
        pool.close()
    clock.finish("read")
    return got, report, files


def test_the_cuda_path_is_bitwise_and_reports_its_phases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got, report, files = _through_the_ring(tmp_path, monkeypatch)
    assert_bitwise_equal(got, reference(files))
    assert report.sink == "cuda" and report.tensors == len(got)
    assert report.bytes_read > 0 and report.read_s > 0 and report.h2d_s > 0
    assert report.overlap_s >= 0
    phases = (
        report.import_s
        + report.resolve_s
        + report.fetch_s
        + report.read_s
        + report.h2d_s
        + report.cast_s
        - report.overlap_s
    )
    assert phases == pytest.approx(report.total_s, rel=0.05, abs=1e-3)


def test_the_cuda_path_casts_floats_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    got, _, files = _through_the_ring(tmp_path, monkeypatch, dtype=torch.float16)
    want = reference(files)
    floats = {name for name, w in want.items() if w.is_floating_point()}
    assert floats and all(got[name].dtype == torch.float16 for name in floats)
    # Everything else keeps its exact bits.
    assert_bitwise_equal(
        {n: t for n, t in got.items() if n not in floats},
        {n: t for n, t in want.items() if n not in floats},
    )
