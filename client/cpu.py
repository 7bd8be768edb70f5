"""Read a safetensors file into CPU tensors backed by a memory map.

No tensor bytes are copied: each tensor is a view of a private mapping of the
cached blob, so reading a file costs page faults for the bytes actually used,
served from the page cache when other workers on the node already touched
them. Only the selected tensors' pages are ever faulted in.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

from weightcache.client.dtypes import torch_dtype, torch_shape
from weightcache.client.header import TensorSpec, read_header_fd

__all__ = ["FileTensors", "read_file"]


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
    path: str | os.PathLike[str], *, select: Callable[[str], bool] | None = None
) -> FileTensors:
    """Map the safetensors file at ``path``; return its selected tensors.

    ``select`` picks tensors by name (all when ``None``). The tensors are
    bitwise equal to what ``safetensors.torch.load_file`` gives for them.

    Raises :class:`~weightcache.errors.HeaderInvalid` for a header that lies
    (nothing is mapped then); ``OSError`` from opening the file propagates.
    """
    if sys.byteorder != "little":
        # safetensors data is little-endian; viewing it in place would need a
        # byte swap of every tensor, which this zero-copy path does not do.
        raise NotImplementedError("weightcache reads safetensors on little-endian hosts only")

    name = os.fsdecode(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        # Header and mapping come from the same descriptor, so they describe
        # the same file even if the path is replaced by a rename meanwhile.
        header = read_header_fd(fd, os.fstat(fd).st_size, path=name)
        plan = [
            (
                spec,
                torch_dtype(spec.dtype, path=name, tensor=spec.name),
                torch_shape(spec.dtype, spec.shape, path=name, tensor=spec.name),
            )
            for spec in header.tensors.values()
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
            #   the object is never closed and never escapes this function.
            # Cost: a private writable map counts toward the commit charge, so
            # hosts with vm.overcommit_memory=2 need room for the span.
            view = mmap.mmap(fd, mapped[-1].end - base, access=mmap.ACCESS_COPY, offset=base)
    finally:
        # The mapping holds its own reference to the file.
        os.close(fd)

    tensors = {spec.name: _tensor(view, base, spec, dtype, shape) for spec, dtype, shape in plan}
    return FileTensors(tensors, sum(spec.nbytes for spec, _, _ in plan), tuple(header.tensors))


def _tensor(
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
