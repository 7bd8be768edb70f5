"""Read a safetensors file into CPU tensors: mapped copy-on-write, or read into private memory.

Two sinks, chosen by ``load(..., mmap=)`` (the name follows ``torch.load``):

* ``mmap=True`` (the default), :meth:`SafetensorsFile.map`: no tensor bytes
  are copied; each tensor is a view of a private mapping of the cached blob, so
  reading a file costs page faults for the bytes actually used, served from the
  page cache when other workers on the node already touched them. Only the
  selected tensors' pages are ever faulted in.
* ``mmap=False``, :class:`PrivateRead`: one ``torch.empty`` buffer per file
  holding only the selected tensors, filled by the reader pool's threads with
  ``preadv`` straight into it (:mod:`weightcache.client.readers`), laid out by
  the read plan (:mod:`weightcache.client.plan`) so every tensor is a typed
  view of it. The tensors are ordinary private memory: no page fault on first
  touch, no mapping that outlives eviction, nothing shared with other processes.
  ``direct=`` chooses how the pool reads: through the page cache (``False``,
  the default), with ``O_DIRECT`` (``True``), or by residency (``"auto"``:
  O_DIRECT when less than :data:`AUTO_DIRECT_BELOW` of the selected bytes is
  in the page cache, as ``mincore`` tells). See :class:`PrivateRead`.
"""

from __future__ import annotations

import bisect
import mmap
import os
import sys
from collections.abc import Callable, Iterator
from typing import Literal, NamedTuple

import torch

from weightcache.client.dtypes import torch_dtype, torch_shape
from weightcache.client.header import SafetensorsHeader, TensorSpec, read_header_fd
from weightcache.client.plan import DEFAULT_ITEM_BYTES, FilePlan, TensorSlot, plan_file
from weightcache.client.readers import (
    DIRECT_ALIGN,
    DirectFile,
    ReadBatch,
    ReaderPool,
    ReadJob,
    advise_sequential,
    resident_fraction,
    shared_pool,
)

__all__ = [
    "AUTO_DIRECT_BELOW",
    "Direct",
    "FileTensors",
    "PrivateRead",
    "SafetensorsFile",
    "item_size",
    "read_file",
]

#: how a private read reads: buffered (False), O_DIRECT (True), or chosen by residency
Direct = bool | Literal["auto"]
#: ``direct="auto"`` reads a file with O_DIRECT when less than this fraction of
#: its selected bytes is in the page cache (a cold file), buffered otherwise
AUTO_DIRECT_BELOW = 0.1


class FileTensors(NamedTuple):
    """What :func:`read_file` found in one file."""

    #: The selected tensors, in file order.
    tensors: dict[str, torch.Tensor]
    #: Bytes of tensor data the selected tensors cover.
    nbytes: int
    #: Every tensor name in the file, selected or not, in file order: to check
    #: exact-name selections and duplicate names across the files of a model.
    names: tuple[str, ...]


def read_file(
    path: str | os.PathLike[str],
    *,
    select: Callable[[str], bool] | None = None,
    mmap: bool = True,
    pool: ReaderPool | None = None,
    item_bytes: int | None = None,
    direct: Direct = False,
) -> FileTensors:
    """The selected tensors of the safetensors file at ``path``.

    ``select`` picks tensors by name (all when ``None``). ``mmap``: map the
    file copy-on-write (``True``) or read the tensors into private memory with
    ``pool`` (default :func:`~weightcache.client.readers.shared_pool`) in reads
    of at most ``item_bytes`` (default: :func:`item_size`), buffered or with
    O_DIRECT as ``direct`` says (:class:`PrivateRead`). Either way the
    tensors are bitwise equal to what ``safetensors.torch.load_file`` gives for them.

    Raises :class:`~weightcache.errors.HeaderInvalid` for a header that lies
    (nothing is mapped or read then); a private read raises
    :class:`~weightcache.errors.CacheCorrupt` or
    :class:`~weightcache.errors.CacheIOError`; ``OSError`` from opening the
    file propagates.
    """
    with SafetensorsFile.open(path) as f:
        if mmap:
            tensors, nbytes = f.map(select)
        else:
            read = PrivateRead(
                f, select, pool or shared_pool(), item_bytes=item_bytes, direct=direct
            )
            try:
                tensors = dict(read.tensors())
            finally:
                read.cancel()
            nbytes = read.plan.nbytes
        return FileTensors(tensors, nbytes, f.names)


class SafetensorsFile:
    """An open safetensors file whose header was read and validated through its descriptor.

    Header and tensor bytes come from the same descriptor, so they describe the
    same file even if the path is replaced by a rename meanwhile. Close it (or
    use ``with``) once its tensors are mapped or read.
    """

    def __init__(self, fd: int, path: str, header: SafetensorsHeader) -> None:
        self.fd = fd
        self.path = path
        self.header = header

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SafetensorsFile:
        if sys.byteorder != "little":
            # safetensors data is little-endian; viewing it in place would need a
            # byte swap of every tensor, which neither sink does.
            raise NotImplementedError("weightcache reads safetensors on little-endian hosts only")
        name = os.fsdecode(path)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            header = read_header_fd(fd, os.fstat(fd).st_size, path=name)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, name, header)

    @property
    def names(self) -> tuple[str, ...]:
        """Every tensor name in the file, in file order."""
        return tuple(self.header.tensors)

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map(self, select: Callable[[str], bool] | None) -> tuple[dict[str, torch.Tensor], int]:
        """The selected tensors as copy-on-write views of a private mapping; and their bytes."""
        name = self.path
        plan = [
            (
                spec,
                torch_dtype(spec.dtype, path=name, tensor=spec.name),
                torch_shape(spec.dtype, spec.shape, path=name, tensor=spec.name),
            )
            for spec in self.header.tensors.values()
            if select is None or select(spec.name)
        ]
        mapped = [spec for spec, _, _ in plan if spec.nbytes]
        view: mmap.mmap | None = None
        base = 0
        if mapped:
            # Map only the span of the selected tensors (a rank's shard of a
            # large file), from the granularity boundary below the first one.
            # Tensors are sorted and disjoint, so the last one ends the span.
            base = mapped[0].begin - mapped[0].begin % mmap.ALLOCATIONGRANULARITY
            # Safe to hand out as tensor memory because:
            # * the blob never changes under us: cached blobs are read-only and
            #   immutable, only ever replaced by rename or unlinked, never
            #   truncated or rewritten in place (truncation would SIGBUS us);
            #   an unlinked or replaced file stays mapped until unmapped;
            # * ACCESS_COPY is MAP_PRIVATE over a read-only descriptor: torch
            #   gets the writable buffer it wants (no "non-writable buffer"
            #   warning), a write by the user lands in a private copy of the
            #   page, and the file can never be modified through the map;
            # * every range was checked to lie inside the file by the header
            #   parser, and base + length <= file size;
            # * lifetime: torch.frombuffer keeps a reference to this mmap
            #   object in each tensor's storage, so it is unmapped only when
            #   the last tensor dies. It does NOT hold a buffer export, so
            #   mmap.close() would succeed and leave the tensors dangling:
            #   the object is never closed and never escapes this method.
            # Cost: a private writable map counts toward the commit charge, so
            # hosts with vm.overcommit_memory=2 need room for the span.
            view = mmap.mmap(self.fd, mapped[-1].end - base, access=mmap.ACCESS_COPY, offset=base)
        tensors = {
            spec.name: _mapped_tensor(view, base, spec, dtype, shape) for spec, dtype, shape in plan
        }
        return tensors, sum(spec.nbytes for spec, _, _ in plan)


def _mapped_tensor(
    view: mmap.mmap | None,
    base: int,
    spec: TensorSpec,
    dtype: torch.dtype,
    shape: tuple[int, ...],
) -> torch.Tensor:
    if spec.nbytes == 0:
        # frombuffer refuses zero-length buffers; an empty tensor has no bytes
        # to share anyway.
        return torch.empty(shape, dtype=dtype)
    assert view is not None  # every tensor with bytes is inside the mapping
    offset = spec.begin - base
    if spec.begin % dtype.itemsize:
        # The mapping starts page-aligned, so a file offset that is not a
        # multiple of the element size gives a misaligned data pointer. torch
        # does not check that, but its vectorised CPU kernels and CUDA copies
        # assume natural alignment (a fault on strict architectures, slow or
        # wrong paths elsewhere), so copy such a tensor into a fresh,
        # allocator-aligned one. safetensors writers never produce this (they
        # pad the header to 8 bytes and order tensors by alignment); only
        # hand-made files pay for the copy.
        raw = torch.frombuffer(view, dtype=torch.uint8, count=spec.nbytes, offset=offset)
        return raw.clone().view(dtype).reshape(shape)
    count = spec.nbytes // dtype.itemsize
    return torch.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)


#: the smallest read the default sizing makes: a syscall per MiB costs nothing
MIN_ITEM_BYTES = 1 << 20


def item_size(nbytes: int, threads: int) -> int:
    """The read size for ``nbytes`` over ``threads``: at most 16 MiB, and small enough
    that every thread gets about 4 reads of the file (so a small file is read by
    all of them, and one slow read does not leave the others idle), but at least
    1 MiB; a multiple of the page size."""
    per = -(-nbytes // (4 * max(1, threads)))
    size = min(DEFAULT_ITEM_BYTES, max(MIN_ITEM_BYTES, per))
    return -(-size // 4096) * 4096


class PrivateRead:
    """The selected tensors of one open file, being read into one private buffer.

    Construction plans the read, allocates the buffer and starts every read on
    ``pool``; :meth:`tensors` yields each tensor, in file order, as soon as the
    reads covering it are done. :meth:`cancel` (idempotent; call it in a
    ``finally``) stops the reads not started and returns once none is running:
    only then may the file be closed. The file must stay open until then.

    ``direct``: ``False`` reads through the page cache (with a sequential
    readahead hint); ``True`` reads with ``O_DIRECT`` through a second
    descriptor of the file, falling back to buffered reads where the file
    system refuses it; ``"auto"`` reads with O_DIRECT when less than
    :data:`AUTO_DIRECT_BELOW` of the selected ranges is resident. A direct read
    skips the page-cache copy and leaves the cache to other files, but the
    next process to load the same file finds nothing cached: it suits a file
    that one process reads once. The default stays ``False`` (buffered): on the
    machine of ``docs/benchmarks.md`` a cold direct load was no faster than a
    cold buffered one (see the CPU section), and on a node where several
    workers load the same weights the page cache is what they share.
    :attr:`io` says which path ran.
    """

    def __init__(
        self,
        file: SafetensorsFile,
        select: Callable[[str], bool] | None,
        pool: ReaderPool,
        *,
        item_bytes: int | None = None,
        direct: Direct = False,
    ) -> None:
        if direct not in (True, False, "auto"):
            raise ValueError(f"direct must be True, False or 'auto', not {direct!r}")
        path = file.path
        header = file.header
        plan = plan_file(path, header, select, item_bytes=item_bytes or DEFAULT_ITEM_BYTES)
        if (
            item_bytes is None
            and (size := item_size(plan.nbytes, pool.threads)) < DEFAULT_ITEM_BYTES
        ):
            plan = plan_file(path, header, select, item_bytes=size)
            item_bytes = size
        #: the fraction of the selected bytes found in the page cache (``"auto"`` only)
        self.resident: float | None = None
        if direct == "auto":
            self.resident = _resident(file.fd, plan)
            direct = self.resident < AUTO_DIRECT_BELOW
        self._wanted_direct = bool(direct) and bool(plan.items)
        self._direct: DirectFile | None = None
        if self._wanted_direct:
            self._direct = DirectFile.open(file.fd, path)
        if self._direct is not None:
            # Runs start on block-aligned destination offsets congruent to their
            # file offsets (modulo the block): with a buffer based congruent to
            # the data area, every read's aligned middle goes straight into it.
            # The file ranges, and so the reads, are the same as before.
            plan = plan_file(
                path,
                header,
                select,
                item_bytes=item_bytes or DEFAULT_ITEM_BYTES,
                align=DIRECT_ALIGN,
            )
        self.plan: FilePlan = plan
        # Types first: a dtype this torch lacks fails before any byte is read.
        try:
            self._slots: list[tuple[TensorSlot, torch.dtype, tuple[int, ...]]] = [
                (
                    slot,
                    torch_dtype(slot.dtype, path=path, tensor=slot.name),
                    torch_shape(slot.dtype, slot.shape, path=path, tensor=slot.name),
                )
                for slot in self.plan.tensors
            ]
        except BaseException:
            self._close_direct()
            raise
        # One allocation per file. The allocator aligns it to 64 bytes, which the
        # plan's offsets assume. Not zeroed: every byte a tensor shows is read.
        if self._direct is None:
            self.buffer = torch.empty(self.plan.size, dtype=torch.uint8)
        else:
            # For direct reads, a view of a slightly larger allocation whose base
            # is congruent to the data area's start modulo the block (and so
            # 64-aligned too, since the block is a multiple of 64).
            raw = torch.empty(self.plan.size + DIRECT_ALIGN, dtype=torch.uint8)
            pad = (header.data_start - raw.data_ptr()) % DIRECT_ALIGN
            self.buffer = raw[pad : pad + self.plan.size]
            del raw
        # Safe to hand to other threads: the reads write only inside the plan's
        # disjoint destination ranges, all within the buffer; this object keeps
        # the buffer (and the caller the descriptor, and this object the direct
        # descriptor) alive until cancel() has seen every read finish, and the
        # tensors handed out keep the buffer's storage alive after that.
        dest = self.buffer.numpy().data if self.plan.size else memoryview(bytearray())
        self._ends = [item.dest + item.length for item in self.plan.items]
        items = self.plan.items
        if items and self._direct is None:
            # Direct reads bypass the page cache: no readahead to ask for.
            advise_sequential(file.fd, items[0].offset, items[-1].end - items[0].offset)
        try:
            self._batch: ReadBatch = pool.batch(
                ReadJob(
                    file.fd,
                    path,
                    item.offset,
                    dest[item.dest : item.dest + item.length],
                    self._direct,
                )
                for item in items
            )
        except BaseException:
            self._close_direct()
            raise

    @property
    def io(self) -> str:
        """How the file was read: ``"direct"``, ``"buffered"``, or ``"fallback"``
        (direct was chosen, and the file system refused O_DIRECT)."""
        if not self._wanted_direct:
            return "buffered"
        if self._direct is None or self._direct.refused:
            return "fallback"
        return "direct"

    def _close_direct(self) -> None:
        if self._direct is not None:
            self._direct.close()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` in file order, each once its bytes are read."""
        for slot, dtype, shape in self._slots:
            if slot.nbytes == 0:
                yield slot.name, torch.empty(shape, dtype=dtype)
                continue
            end = slot.offset + slot.nbytes
            # Items are in file order and so in destination order: those ending
            # at or before this tensor's end are the ones it needs (and those before).
            self._batch.wait(bisect.bisect_left(self._ends, end) + 1)
            raw = self.buffer[slot.offset : end]
            if slot.offset % dtype.itemsize:
                # Only a plan made elsewhere leaves a tensor misaligned (ours
                # re-aligns it): copy it into an allocator-aligned tensor.
                raw = raw.clone()
            yield slot.name, raw.view(dtype).reshape(shape)
        # Every read is done (or none started): the direct descriptor can go.
        self._batch.wait()
        self._close_direct()

    def cancel(self) -> None:
        """Stop the reads; returns once none is running (so the file may be closed)."""
        self._batch.cancel()
        self._close_direct()


def _resident(fd: int, plan: FilePlan) -> float:
    """The fraction of the plan's file ranges in the page cache (contiguous items merged)."""
    ranges: list[list[int]] = []
    for item in plan.items:
        if ranges and ranges[-1][1] == item.offset:
            ranges[-1][1] = item.end
        else:
            ranges.append([item.offset, item.end])
    total = sum(end - begin for begin, end in ranges)
    if not total:
        return 1.0
    return sum(resident_fraction(fd, b, e - b) * (e - b) for b, e in ranges) / total
