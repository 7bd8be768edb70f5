"""Which bytes of a safetensors file to read, and where each lands: a pure read plan.

A private (non-mmap) read of a file goes into **one destination buffer per
file**, holding only the selected tensors, each at an offset from which a typed
view needs no copy. :func:`plan_file` decides that layout from a validated
header (:mod:`weightcache.client.header`) and a selection
(:mod:`weightcache.client.selection`), and cuts the bytes to read into work
items for the reader pool (:mod:`weightcache.client.readers`) or the CUDA ring:

* **only the selected tensors' bytes** are read: a tensor-parallel rank that
  selects 1/8 of the tensors reads about 1/8 of the bytes;
* **coalesced**: tensors that lie back to back in the file and are selected
  together form one *run*, read as one byte range into one destination range
  (the file's layout mirrored), so a run costs as few reads as its length
  allows, whatever the number of tensors in it;
* **split** at absolute file offsets that are multiples of ``item_bytes``, so
  every item is at most ``item_bytes`` long, and items after the first of a run
  start on ``item_bytes``-aligned file offsets (page-aligned for the default);
* **aligned**: a run starts at a destination offset congruent, modulo
  ``align``, to its first tensor's offset in the data area, so the destination
  keeps the alignment the writer gave the file (safetensors writers order
  tensors so each starts on a multiple of its element size). A tensor that
  would land on an offset that is not a multiple of its element size (a
  hand-made file packs an F32 after a 3-byte U8) starts a new run at an
  ``align``-aligned offset instead: one more read, but its view is zero-copy
  like every other. So every :class:`TensorSlot` offset is a multiple of the
  tensor's element size; a sink still checks (and copies a tensor that is not)
  rather than trust a plan made elsewhere.

The buffer's base must itself be aligned to ``align`` or to the largest element
size (8): torch's CPU allocator aligns to 64 bytes, pinned and CUDA memory to
far more.

Pure: no I/O, no torch. Property-tested in ``tests/unit/test_plan.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from weightcache.client.header import DTYPE_BITS, SafetensorsHeader

__all__ = ["DEFAULT_ITEM_BYTES", "FilePlan", "ReadItem", "TensorSlot", "element_bytes", "plan_file"]

#: the default largest read: big enough that a syscall's cost vanishes, small
#: enough that a handful of threads share a file and a cancelled load stops soon
DEFAULT_ITEM_BYTES = 16 << 20
#: the largest element of any safetensors dtype (F64, I64, U64, C64)
_MAX_ELEMENT = 8


@dataclass(frozen=True, slots=True)
class TensorSlot:
    """A selected tensor and where its bytes land in the file's destination buffer."""

    name: str
    #: safetensors dtype name, e.g. ``"F16"``
    dtype: str
    #: safetensors shape (a packed F4 tensor's last dimension counts F4 values)
    shape: tuple[int, ...]
    nbytes: int
    #: where its bytes start in the destination buffer; a multiple of its element size
    offset: int


@dataclass(frozen=True, slots=True)
class ReadItem:
    """One read: ``length`` bytes at file ``offset`` into the buffer at ``dest``."""

    #: absolute offset in the file
    offset: int
    length: int
    #: offset in the file's destination buffer
    dest: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class FilePlan:
    """What to read from one file and where it goes."""

    path: str
    #: bytes of the destination buffer (only the selected tensors' spans)
    size: int
    #: the selected tensors, in file order
    tensors: tuple[TensorSlot, ...]
    #: coalesced where contiguous, split at item_bytes, in file order
    items: tuple[ReadItem, ...]

    @property
    def nbytes(self) -> int:
        """Tensor bytes the plan reads (the selected tensors' bytes)."""
        return sum(item.length for item in self.items)


def element_bytes(dtype: str) -> int:
    """The alignment a typed view of ``dtype`` needs: its element size (1 for packed F4)."""
    return max(1, DTYPE_BITS[dtype] // 8)


def plan_file(
    path: str,
    header: SafetensorsHeader,
    select: Callable[[str], bool] | None,
    *,
    item_bytes: int = DEFAULT_ITEM_BYTES,
    align: int = 64,
) -> FilePlan:
    """Plan the read of the tensors of ``header`` that ``select`` picks (all when ``None``).

    ``path`` only names the file. ``item_bytes`` caps every read; ``align`` (a
    power of two, at least 8) is the destination alignment a run starts on.
    Raises :class:`ValueError` for parameters out of range (a programmer error).
    """
    if item_bytes < 1:
        raise ValueError(f"item_bytes must be at least 1, not {item_bytes}")
    if align < _MAX_ELEMENT or align & (align - 1):
        raise ValueError(f"align must be a power of two of at least {_MAX_ELEMENT}, not {align}")

    slots: list[TensorSlot] = []
    # Runs of file-contiguous tensors with one destination each: [file begin, file end, dest].
    runs: list[list[int]] = []
    cursor = 0  # the end of the last run in the destination
    for spec in header.tensors.values():  # sorted by offset: file order
        if select is not None and not select(spec.name):
            continue
        if spec.nbytes == 0:
            # Owns no bytes; any offset inside the buffer will do.
            slots.append(TensorSlot(spec.name, spec.dtype, spec.shape, 0, cursor))
            continue
        width = element_bytes(spec.dtype)
        last = runs[-1] if runs else None
        # Extend the last run when this tensor follows it in the file and lands aligned.
        follows = last is not None and last[1] == spec.begin
        if last is not None and follows and (last[2] + spec.begin - last[0]) % width == 0:
            last[1] = spec.end
            dest = last[2] + spec.begin - last[0]
        else:
            relative = spec.begin - header.data_start
            # Mirror the writer's alignment within the data area when it suits this
            # tensor; otherwise start on an `align` boundary.
            want = relative % align if relative % width == 0 else 0
            dest = cursor + (want - cursor) % align
            runs.append([spec.begin, spec.end, dest])
        cursor = dest + spec.nbytes
        slots.append(TensorSlot(spec.name, spec.dtype, spec.shape, spec.nbytes, dest))

    items: list[ReadItem] = []
    for begin, end, dest in runs:
        at = begin
        while at < end:
            # Cut at the next multiple of item_bytes in the file, so pieces after the
            # first start aligned (page-aligned for any item_bytes that is).
            stop = min(end, (at // item_bytes + 1) * item_bytes)
            items.append(ReadItem(at, stop - at, dest + at - begin))
            at = stop
    return FilePlan(path, cursor, tuple(slots), tuple(items))
