"""The CUDA sink on a real device: bitwise what ``load_file(device="cuda")`` gives.

Every test is marked ``gpu`` and skipped (with the reason) where torch sees no
CUDA device: see ``conftest.py``. The sink's logic is also tested on CPU with
a fake copier (``tests/unit/test_ring.py``); here the real pinned buffers,
stream and events do the work. Timings are printed, never asserted tightly.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch as safetensors_torch
import torch

import weightcache
import weightcache.client.readers as readers
from tests.support.models import write_model
from tests.support.published import cache_config
from weightcache.client.cuda import (
    DEFAULT_BUFFER_BYTES,
    DEFAULT_BUFFERS,
    CudaCopier,
    cuda_sink_available,
    load_cuda,
    shared_ring,
)
from weightcache.client.header import read_header_fd
from weightcache.client.plan import FilePlan, plan_file
from weightcache.client.readers import ReaderPool
from weightcache.client.ring import StagingRing, TransferStats
from weightcache.client.selection import make_selector
from weightcache.config import load_config
from weightcache.errors import CacheIOError
from weightcache.publish import publish
from weightcache.refs import parse_ref

pytestmark = pytest.mark.gpu

MiB = 1 << 20
DEVICE = "cuda"


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise_on_device(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, ref in want.items():
        t = got[name]
        assert t.device.type == "cuda", name
        assert (t.dtype, t.shape) == (ref.dtype, ref.shape), name
        if ref.numel():
            assert torch.equal(as_bytes(t), as_bytes(ref)), name
            assert t.data_ptr() % t.element_size() == 0, name


def reference(paths: list[Path], select: Any = None) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for p in paths:
        for name, t in safetensors_torch.load_file(p, device=DEVICE).items():
            if select is None or select(name):
                out[name] = t
    return out


@contextlib.contextmanager
def opened(paths: list[Path], select: Any = None) -> Iterator[tuple[list[FilePlan], list[int]]]:
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        plans = [
            plan_file(str(p), read_header_fd(fd, os.fstat(fd).st_size, path=str(p)), select)
            for p, fd in zip(paths, fds, strict=True)
        ]
        yield plans, fds
    finally:
        for fd in fds:
            os.close(fd)


def opened_plans(paths: list[Path]) -> list[FilePlan]:
    with opened(paths) as (plans, _):
        return plans


def sink(paths: list[Path], select: Any = None, **kwargs: Any) -> dict[str, torch.Tensor]:
    with opened(paths, select) as (plans, fds):
        return dict(load_cuda(plans, fds, DEVICE, **kwargs))


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    # Every dtype, scalars and empty tensors over three shards, and a 150 MiB
    # tensor: more than two of the default ring's 64 MiB buffers.
    files = write_model(tmp_path_factory.mktemp("gpu") / "model", shards=3, big=150 * MiB)
    return sorted(files.values())


@pytest.fixture
def small_ring() -> Iterator[StagingRing[torch.Tensor, torch.Tensor]]:
    # 3 x 1 MiB: every file crosses many buffers, copies complete while others fill.
    ring = StagingRing(
        CudaCopier(torch.device("cuda", torch.cuda.current_device())), buffers=3, buffer_bytes=MiB
    )
    yield ring
    ring.close()


def test_sink_is_available() -> None:
    assert cuda_sink_available("cuda") and cuda_sink_available(torch.device("cuda", 0))
    assert not cuda_sink_available("cpu")


def test_every_dtype_bitwise_through_the_shared_ring(model: list[Path]) -> None:
    assert_bitwise_on_device(sink(model), reference(model))
    assert shared_ring(DEVICE).stats().in_use == 0


def test_every_dtype_bitwise_through_a_small_ring(
    model: list[Path], small_ring: StagingRing[torch.Tensor, torch.Tensor]
) -> None:
    with ReaderPool(8) as pool:
        got = sink(model, ring=small_ring, pool=pool)
    assert_bitwise_on_device(got, reference(model))
    stats = small_ring.stats()
    assert stats.allocations == 3 and stats.in_use == 0


def test_tensors_land_in_file_order_and_are_usable_on_any_stream(model: list[Path]) -> None:
    want = reference(model)
    side = torch.cuda.Stream()
    with opened(model) as (plans, fds):
        names = []
        for name, t in load_cuda(plans, fds, DEVICE):
            names.append(name)
            # Used at once on another stream: the copy is complete when yielded.
            with torch.cuda.stream(side):
                same = torch.equal(as_bytes(t), as_bytes(want[name])) if t.numel() else True
            assert same, name
    assert names == [t.name for plan in plans for t in plan.tensors]


def test_a_subset_reads_only_its_tensors(model: list[Path]) -> None:
    select = make_selector("*.matrix")
    with opened(model, select) as (plans, _):
        assert sum(p.size for p in plans) < 4 * MiB  # the big tensor is not read
    assert_bitwise_on_device(sink(model, select), reference(model, select))


def test_one_device_allocation_per_file(model: list[Path]) -> None:
    got = sink(model)
    with opened(model) as (plans, _):
        for plan in plans:
            storages = {got[t.name].untyped_storage().data_ptr() for t in plan.tensors if t.nbytes}
            assert len(storages) == 1, plan.path


def test_pinned_memory_stays_within_the_ring_over_20_loads(
    model: list[Path], small_ring: StagingRing[torch.Tensor, torch.Tensor]
) -> None:
    want = reference(model)
    pinned_start = pinned_stats()
    sink(model, ring=small_ring)  # the first load allocates the ring
    gc.collect()
    torch.cuda.synchronize()
    device_before = torch.cuda.memory_allocated()
    pinned_before = pinned_stats()
    for _ in range(20):
        got = sink(model, ring=small_ring)
        assert_bitwise_on_device(got, want)
        del got
    gc.collect()
    torch.cuda.synchronize()
    stats = small_ring.stats()
    assert stats.allocations == 3 and stats.allocated == 3 and stats.peak_in_use <= 3
    assert stats.in_use == 0
    # Every destination was given back with its tensors: no device memory kept.
    assert torch.cuda.memory_allocated() == device_before
    pinned_after = pinned_stats()
    key = "allocated_bytes.current"
    if key in pinned_after:
        # torch's pinned allocator: the first load added at most the ring
        # (3 x 1 MiB, a power of two, so not rounded up); the next 20 added nothing.
        assert pinned_before[key] - pinned_start.get(key, 0) <= 3 * MiB
        assert pinned_after[key] <= pinned_before[key], (pinned_before, pinned_after)
        assert pinned_after.get("num_host_alloc") == pinned_before.get("num_host_alloc")
    print(f"pinned allocator: {pinned_start} -> {pinned_before} -> {pinned_after}")


def pinned_stats() -> dict[str, Any]:
    stats = getattr(torch.cuda, "host_memory_stats", None)
    return dict(stats()) if stats is not None else {}


def test_first_load_vs_fifth(model: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    # A fresh ring of the default shape, as a worker's first CUDA load has:
    # the first load allocates its pinned buffers, the later ones reuse them.
    torch.cuda.synchronize()
    ring = StagingRing(
        CudaCopier(torch.device("cuda", torch.cuda.current_device())),
        buffers=DEFAULT_BUFFERS,
        buffer_bytes=DEFAULT_BUFFER_BYTES,
    )
    nbytes = sum(p.stat().st_size for p in model)
    times = []
    stats = TransferStats()
    for i in range(5):
        start = time.perf_counter()
        got = sink(model, ring=ring, stats=stats if i == 4 else None)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del got
    ring.close()
    assert stats.bytes == sum(plan.nbytes for plan in opened_plans(model))
    with capsys.disabled():
        print(
            f"\n  CUDA sink, {nbytes / MiB:.0f} MiB warm: first {times[0] * 1e3:.1f} ms, "
            f"fifth {times[4] * 1e3:.1f} ms, median of 2-5 {statistics.median(times[1:]) * 1e3:.1f}"
            f" ms ({nbytes / statistics.median(times[1:]) / 1e9:.2f} GB/s); fifth: reads in "
            f"flight {stats.read_s * 1e3:.1f} ms, copies {stats.copy_s * 1e3:.1f} ms"
        )
    # Loose: the first load pays the pinned allocation (tens of ms), not a multiple.
    assert times[0] <= 3 * statistics.median(times[1:]) + 0.5


def test_read_error_mid_load_frees_everything(
    model: list[Path],
    small_ring: StagingRing[torch.Tensor, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    big = model[0]  # the first shard holds the 150 MiB tensor
    real = os.preadv

    def failing(fd: int, buffers: Any, offset: int) -> int:
        if offset >= 80 * MiB:
            raise OSError(5, "Input/output error")
        return real(fd, buffers, offset)

    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    monkeypatch.setattr(readers, "_preadv", failing)
    with pytest.raises(CacheIOError):
        sink([big], ring=small_ring)
    monkeypatch.setattr(readers, "_preadv", real)
    gc.collect()
    torch.cuda.synchronize()
    assert small_ring.stats().in_use == 0
    assert torch.cuda.memory_allocated() == before
    # The ring is whole: the next load works.
    assert_bitwise_on_device(sink([big], ring=small_ring), reference([big]))


def test_closing_early_returns_every_buffer(
    model: list[Path], small_ring: StagingRing[torch.Tensor, torch.Tensor]
) -> None:
    want = reference(model)
    with opened(model) as (plans, fds):
        tensors = load_cuda(plans, fds, DEVICE, ring=small_ring)
        first = [next(tensors) for _ in range(5)]
        tensors.close()
        assert small_ring.stats().in_use == 0
    for name, t in first:
        if t.numel():
            assert torch.equal(as_bytes(t), as_bytes(want[name])), name


# -- through the loader ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, model: list[Path]) -> tuple[str, Any]:
    root = tmp_path_factory.mktemp("origin")
    ref = f"file://{root}/origin/model"
    publish(
        model[0].parent,
        parse_ref(ref),
        load_config(env={"WEIGHTCACHE_PUBLISH_CHUNK_BYTES": "8MiB"}),
    )
    return ref, cache_config(root)


def test_loader_casts_on_the_device(model: list[Path], published: tuple[str, Any]) -> None:
    ref, cfg = published
    want = reference(model)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        got = weightcache.load(ref, device=DEVICE, dtype=dtype, config=cfg)
        expected = {
            # The same cast of the same bits on the same device: bitwise equal.
            name: t.to(dtype) if t.is_floating_point() else t
            for name, t in want.items()
        }
        assert_bitwise_on_device(got, expected)


def test_loader_subset_and_iter_load(model: list[Path], published: tuple[str, Any]) -> None:
    ref, cfg = published
    select = make_selector("*.scalar")
    got = weightcache.load(ref, device=DEVICE, tensors="*.scalar", config=cfg)
    assert_bitwise_on_device(got, reference(model, select))
    streamed = dict(weightcache.iter_load(ref, device=DEVICE, config=cfg))
    assert_bitwise_on_device(streamed, reference(model))


def test_loader_routes_cuda_loads_through_the_ring(
    model: list[Path], published: tuple[str, Any]
) -> None:
    # The loader's CUDA path is the sink: the shared ring of the device is used
    # (and reused) by weightcache.load, not tensor.to(device).
    ref, cfg = published
    ring = shared_ring(DEVICE)
    before = ring.stats()
    got = weightcache.load(ref, device=DEVICE, config=cfg)
    assert_bitwise_on_device(got, reference(model))
    after = shared_ring(DEVICE).stats()
    assert after.allocated >= 1, "weightcache.load(device='cuda') did not use the CUDA sink"
    assert after.allocations <= max(before.allocations, after.buffers)
