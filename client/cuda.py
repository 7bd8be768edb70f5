"""The CUDA sink: safetensors bytes to a GPU through a ring of pinned host buffers.

A CUDA load reads each file's selected tensors (its :class:`~weightcache.client.plan.FilePlan`)
through the process's :class:`~weightcache.client.ring.StagingRing` for the
device: reader threads ``preadv`` into a few pinned buffers, each buffer's
copies go to the device on one dedicated stream as soon as it is full, and the
buffer is refilled once those copies' event completes. Disk or page-cache
reads, host copies and PCIe transfers overlap; pinned memory stays within
``buffers x buffer_bytes`` (4 x 64 MiB unless :func:`configure_ring` says
otherwise) however large the model, and the ring is kept for the process's
life, so its fifth load allocates nothing its first did not.

Each file gets **one device allocation** (``FilePlan.size`` bytes) and every
tensor is a view of it, in the file's raw dtype: ``dtype=`` casts are the
loader's, on the device, afterwards. :func:`load_cuda` yields ``(name,
tensor)`` in file order as each tensor's bytes land; a yielded tensor is
complete and may be used on any stream (its copies' event was waited on by
the host before it was handed out).

Streams and the caching allocator: destinations are allocated on the caller's
current stream, and the copy stream is made to wait for that stream first, so
a copy never overwrites memory the caller's queued kernels still use; every
copy into a destination has completed (host-observed) before a tensor of it is
yielded or, on an error or an early close, before :func:`load_cuda` gives the
destination up, so freeing it later on the caller's stream is safe without
``record_stream``.

:func:`load_staged` is the same sink over any ring whose destinations are
uint8 tensors: the CPU tests and ``loadtest/gpu_bench.py --dry-run`` run it
with :func:`host_copier` (threads standing in for the stream and its events).

Only imported for a CUDA load: it imports torch (but touches CUDA only when
called).
"""

from __future__ import annotations

import bisect
import contextlib
import threading
from collections import deque
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import torch

from weightcache.client.dtypes import torch_dtype, torch_shape
from weightcache.client.plan import FilePlan, TensorSlot
from weightcache.client.readers import ReaderPool, advise_sequential, shared_pool
from weightcache.client.ring import (
    CopyRun,
    Reader,
    Segment,
    StagingRing,
    ThreadCopier,
    TransferStats,
    check_shape,
)
from weightcache.errors import DeviceUnavailable

__all__ = [
    "DEFAULT_BUFFERS",
    "DEFAULT_BUFFER_BYTES",
    "CudaCopier",
    "configure_ring",
    "cuda_sink_available",
    "host_copier",
    "load_cuda",
    "load_staged",
    "shared_ring",
]

#: the default ring: 4 buffers of 64 MiB (256 MiB pinned per device in use)
DEFAULT_BUFFERS = 4
DEFAULT_BUFFER_BYTES = 64 << 20

TensorRing = StagingRing[torch.Tensor, torch.Tensor]
#: what the sink yields: close it to stop a load early
Tensors = Generator[tuple[str, torch.Tensor], None, None]


def cuda_sink_available(device: Any) -> bool:
    """Whether :func:`load_cuda` can serve ``device``: a CUDA device in a CUDA build of torch.

    False for a CPU device, a CPU-only torch, or no visible GPU: the loader
    then keeps ``tensor.to(device)``.
    """
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError):
        return False
    return dev.type == "cuda" and torch.cuda.is_available()


def _cuda_device(device: Any) -> torch.device:
    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceUnavailable(f"not a device: {device!r} ({exc})", device=repr(device)) from exc
    if not cuda_sink_available(dev):
        raise DeviceUnavailable(
            f"the CUDA sink cannot serve {str(dev)!r}: torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda or 'no'}) sees no CUDA device for it",
            device=str(dev),
        )
    # One ring per physical device: "cuda" and "cuda:N" (N current) share it.
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())


class _CudaEvent:
    """A ``torch.cuda.Event`` whose failures come out typed."""

    __slots__ = ("_device", "_event")

    def __init__(self, event: torch.cuda.Event, device: torch.device) -> None:
        self._event = event
        self._device = device

    def query(self) -> bool:
        try:
            return bool(self._event.query())  # type: ignore[no-untyped-call]
        except RuntimeError as exc:
            raise _copy_failed(self._device, exc) from exc

    def synchronize(self) -> None:
        try:
            self._event.synchronize()
        except RuntimeError as exc:
            raise _copy_failed(self._device, exc) from exc


def _copy_failed(device: torch.device, exc: BaseException) -> DeviceUnavailable:
    return DeviceUnavailable(
        f"a host-to-device copy to {device} failed: {exc}",
        hint="the device or its driver reported an error; check nvidia-smi and dmesg (Xid)",
        device=str(device),
        reason="copy_failed",
    )


class CudaCopier:
    """The ring's :class:`~weightcache.client.ring.Copier` for one CUDA device.

    Staging buffers are pinned host tensors (``torch.empty(n, dtype=torch.uint8,
    pin_memory=True)``), destinations uint8 device tensors, and copies run on
    one dedicated stream, each buffer's followed by one event.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        try:
            self.stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        except RuntimeError as exc:
            raise DeviceUnavailable(
                f"cannot create a copy stream on {device}: {exc}", device=str(device)
            ) from exc

    def allocate(self, nbytes: int) -> torch.Tensor:
        try:
            # Page-locked host memory (cudaHostAlloc through torch's caching host
            # allocator, which rounds up to a power of two: keep buffer sizes one).
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError as exc:
            raise DeviceUnavailable(
                f"cannot pin {nbytes} bytes of host memory for copies to {self.device}: {exc}",
                hint="make the ring smaller (weightcache.client.cuda.configure_ring) or raise "
                "the container's locked-memory limit (ulimit -l)",
                device=str(self.device),
                reason="pin_failed",
            ) from exc

    def host_view(self, buffer: torch.Tensor) -> memoryview:
        # Safe to hand to reader threads: the memoryview holds the numpy array,
        # which holds the tensor, so the pinned memory outlives every view (a
        # read job's slice included); the ring writes through it only while no
        # copy out of the buffer is outstanding (see ring.py).
        return buffer.numpy().data

    def destination(self, nbytes: int) -> torch.Tensor:
        try:
            dest = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        except RuntimeError as exc:  # torch.OutOfMemoryError is one
            raise DeviceUnavailable(
                f"cannot allocate {nbytes} bytes on {self.device} for a file's tensors: {exc}",
                hint="free device memory first, or load a subset (tensors=)",
                device=str(self.device),
                reason="out_of_memory",
            ) from exc
        # The block belongs to the caller's current stream, which may have
        # queued work still using it (a tensor freed just before): our copies
        # start only after that work.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        return dest

    def copy(self, buffer: torch.Tensor, runs: Sequence[CopyRun[torch.Tensor]]) -> _CudaEvent:
        # Called from a reader thread: the stream context sets this thread's
        # current device and stream, so copy_ queues on ours.
        try:
            with torch.cuda.stream(self.stream):
                for run in runs:
                    src = buffer[run.src_offset : run.src_offset + run.length]
                    out = run.dest[run.dest_offset : run.dest_offset + run.length]
                    # Asynchronous: the source is pinned, so this is a DMA the
                    # host does not wait for; the ring keeps the buffer untouched
                    # until the event below has completed.
                    out.copy_(src, non_blocking=True)
                # A blocking-sync event: waiting on it sleeps instead of spinning a core
                # the reader threads need.
                event = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
                event.record(self.stream)
        except RuntimeError as exc:
            raise _copy_failed(self.device, exc) from exc
        return _CudaEvent(event, self.device)

    def free(self, buffer: torch.Tensor) -> None:
        # Dropping the last reference gives the block back to torch's caching
        # host allocator, which keeps it for the next pinned allocation.
        del buffer


def host_copier(*, streams: int = 1) -> ThreadCopier[torch.Tensor]:
    """The CPU stand-in for :class:`CudaCopier`: uint8 CPU tensors, threads for streams."""
    return ThreadCopier(_host_destination, _host_view, streams=streams)


def _host_destination(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def _host_view(dest: torch.Tensor) -> memoryview:
    return dest.numpy().data


# -- the process's rings -------------------------------------------------------------------

_rings: dict[int, TensorRing] = {}
_shape = (DEFAULT_BUFFERS, DEFAULT_BUFFER_BYTES)
_rings_lock = threading.Lock()


def configure_ring(
    *, buffers: int = DEFAULT_BUFFERS, buffer_bytes: int = DEFAULT_BUFFER_BYTES
) -> None:
    """The shape of the rings :func:`shared_ring` makes: ``buffers`` x ``buffer_bytes`` pinned.

    Call it before the first CUDA load; a ring already made with another shape
    is replaced at the next load that finds it idle.
    """
    global _shape
    check_shape(buffers, buffer_bytes)
    with _rings_lock:
        _shape = (buffers, buffer_bytes)


def shared_ring(device: Any) -> TensorRing:
    """The process's staging ring for a CUDA device, made on first use."""
    dev = _cuda_device(device)
    index = dev.index
    assert index is not None
    with _rings_lock:
        ring = _rings.get(index)
        if ring is not None and (ring.buffers, ring.buffer_bytes) != _shape:
            if ring.stats().in_use:
                return ring  # reshaped once it is idle
            ring.close()
            ring = None
        if ring is None:
            ring = StagingRing(CudaCopier(dev), buffers=_shape[0], buffer_bytes=_shape[1])
            _rings[index] = ring
        return ring


# -- the sink -------------------------------------------------------------------------------


def load_cuda(
    plans: Sequence[FilePlan],
    fds: Sequence[int],
    device: Any,
    *,
    ring: StagingRing[Any, torch.Tensor] | None = None,
    pool: ReaderPool | None = None,
    stats: TransferStats | None = None,
) -> Tensors:
    """``(name, tensor)`` on ``device`` for every tensor of ``plans``, in file order, as each lands.

    ``fds[i]`` is the open descriptor of ``plans[i]``'s file; the caller keeps
    them open until the iterator is exhausted or closed: once it is, no read
    or copy for this load is still running (the descriptors may be closed at
    once) and every staging buffer is back in the ring. Tensors are in the
    file's dtype. Raises :class:`~weightcache.errors.DeviceUnavailable` when
    the sink cannot serve ``device`` (see :func:`cuda_sink_available`), for a
    device allocation or copy that fails, or pinned memory that cannot be had;
    reads raise :class:`~weightcache.errors.CacheIOError` or
    :class:`~weightcache.errors.CacheCorrupt`; a dtype this torch lacks raises
    :class:`~weightcache.errors.HeaderInvalid` before anything is read.
    ``stats`` is filled in with the time reads and copies were in flight (they
    overlap) once the iterator ends or is closed: the load report's phases.
    """
    dev = _cuda_device(device)
    return load_staged(
        plans,
        fds,
        ring if ring is not None else shared_ring(dev),
        pool if pool is not None else shared_pool(),
        device=dev,
        stats=stats,
    )


def load_staged(
    plans: Sequence[FilePlan],
    fds: Sequence[int],
    ring: StagingRing[Any, torch.Tensor],
    reader: Reader,
    *,
    device: torch.device,
    stats: TransferStats | None = None,
) -> Tensors:
    """:func:`load_cuda` over any ring with uint8 tensor destinations on ``device``.

    Checks its arguments and every dtype now; the reads start when the first
    tensor is asked for.
    """
    if len(plans) != len(fds):
        raise ValueError(f"{len(plans)} plans but {len(fds)} descriptors")
    layouts = [_layout(plan) for plan in plans]
    return _stream(plans, fds, layouts, ring, reader, device, stats)


class _Slot:
    __slots__ = ("dtype", "need", "shape", "slot")

    def __init__(self, slot: TensorSlot, dtype: torch.dtype, shape: tuple[int, ...], need: int):
        self.slot = slot
        self.dtype = dtype
        self.shape = shape
        #: how many of the file's items (a prefix) must have landed first
        self.need = need


def _layout(plan: FilePlan) -> list[_Slot]:
    """Each tensor's torch type and the prefix of the plan's items it waits for."""
    # Items are in file order, and so in destination order (plan.py): the items
    # ending before a tensor's end, plus the one that holds it, are those it
    # needs. A tensor never needs fewer than the one before it (file order).
    ends = [item.dest + item.length for item in plan.items]
    out: list[_Slot] = []
    need = 0
    for slot in plan.tensors:
        dtype = torch_dtype(slot.dtype, path=plan.path, tensor=slot.name)
        shape = torch_shape(slot.dtype, slot.shape, path=plan.path, tensor=slot.name)
        if slot.nbytes:
            need = max(
                need, min(len(ends), bisect.bisect_left(ends, slot.offset + slot.nbytes) + 1)
            )
        out.append(_Slot(slot, dtype, shape, need))
    return out


def _stream(
    plans: Sequence[FilePlan],
    fds: Sequence[int],
    layouts: list[list[_Slot]],
    ring: StagingRing[Any, torch.Tensor],
    reader: Reader,
    device: torch.device,
    stats: TransferStats | None,
) -> Tensors:
    dests: list[torch.Tensor | None] = [None] * len(plans)
    # which file each segment handed to the ring belongs to, in order
    owners: deque[int] = deque()

    def segments() -> Iterator[Segment[torch.Tensor]]:
        # Lazy: a file's destination is allocated when the ring reaches it.
        for i, (plan, fd) in enumerate(zip(plans, fds, strict=True)):
            if not plan.items:
                continue
            dest = ring.copier.destination(plan.size)
            dests[i] = dest
            advise_sequential(fd, plan.items[0].offset, plan.items[-1].end - plan.items[0].offset)
            for item in plan.items:
                owners.append(i)
                yield Segment(fd, plan.path, item.offset, item.length, dest, item.dest)

    landed = [0] * len(plans)
    at = [0, 0]  # the next tensor to hand out: file, index in file

    def ready() -> Iterator[tuple[str, torch.Tensor]]:
        while at[0] < len(plans):
            f, t = at
            slots = layouts[f]
            if t == len(slots):
                at[0], at[1] = f + 1, 0
                continue
            s = slots[t]
            if s.need > landed[f]:
                return
            at[1] = t + 1
            yield s.slot.name, _tensor(dests[f], s, device)

    transfer = ring.transfer(segments(), reader, stats=stats)
    with contextlib.closing(transfer):
        yield from ready()
        for _ in transfer:
            landed[owners.popleft()] += 1
            yield from ready()
    yield from ready()
    if at[0] != len(plans):  # pragma: no cover - a plan whose items miss a tensor's bytes
        raise AssertionError(f"{plans[at[0]].path}: the plan's items do not cover its tensors")


def _tensor(dest: torch.Tensor | None, s: _Slot, device: torch.device) -> torch.Tensor:
    slot = s.slot
    if slot.nbytes == 0:
        return torch.empty(s.shape, dtype=s.dtype, device=device)
    assert dest is not None  # a tensor with bytes waits for its file's items
    raw = dest[slot.offset : slot.offset + slot.nbytes]
    if slot.offset % s.dtype.itemsize:
        # Only a plan made elsewhere leaves a tensor misaligned (ours aligns
        # each to its element size): copy it into an allocator-aligned tensor.
        raw = raw.clone()
    return raw.view(s.dtype).reshape(s.shape)
