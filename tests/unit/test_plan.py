"""The read plan: which bytes of a file a private read fetches, and where each lands.

Properties over generated headers (parsed by the real header parser, so every
layout is one the loader can meet): the items cover exactly the selected
tensors' bytes, never overlap, never exceed ``item_bytes``, are coalesced where
the file allows, and land in disjoint destination ranges inside the buffer at
offsets where each tensor's typed view needs no copy.
"""

from __future__ import annotations

import itertools
import json
import struct
from dataclasses import dataclass
from typing import Any

import pytest
import safetensors.torch as safetensors_torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightcache.client.header import DTYPE_BITS, SafetensorsHeader, parse_header, read_header
from weightcache.client.plan import FilePlan, ReadItem, element_bytes, plan_file

DTYPES = sorted(DTYPE_BITS)


@dataclass(frozen=True)
class Layout:
    header: SafetensorsHeader
    selected: frozenset[str] | None


def header_bytes(entries: list[tuple[str, str, list[int], int, int]], pad: int) -> bytes:
    doc: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for name, dtype, shape, begin, end in entries:
        doc[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    body = json.dumps(doc).encode() + b" " * pad
    return struct.pack("<Q", len(body)) + body


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    """A valid header: tensors tiling the data area in a random order, empties anywhere."""
    count = draw(st.integers(0, 12))
    specs: list[tuple[str, str, list[int]]] = []
    for i in range(count):
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        numel = 1
        for dim in shape:
            numel *= dim
        if dtype == "F4" and numel % 2:
            shape.append(2)  # F4 packs two per byte: an even count ends on a byte
        specs.append((f"t{i}", dtype, shape))
    order = draw(st.permutations(range(count)))
    entries: list[tuple[str, str, list[int], int, int]] = []
    at = 0
    empties: list[tuple[str, str, list[int]]] = []
    for index in order:
        name, dtype, shape = specs[index]
        numel = 1
        for dim in shape:
            numel *= dim
        nbytes = numel * DTYPE_BITS[dtype] // 8
        if nbytes == 0:
            empties.append((name, dtype, shape))
            continue
        entries.append((name, dtype, shape, at, at + nbytes))
        at += nbytes
    for name, dtype, shape in empties:
        where = draw(st.integers(0, at))
        entries.append((name, dtype, shape, where, where))
    # Any padding: the data area may start at any offset, aligned or not.
    prefix = header_bytes(entries, draw(st.integers(0, 70)))
    header = parse_header(prefix, len(prefix) + at)
    if not count:
        return Layout(header, draw(st.none() | st.just(frozenset())))
    selected = draw(st.none() | st.frozensets(st.sampled_from([f"t{i}" for i in range(count)])))
    return Layout(header, selected)


def covered(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge half-open ranges into sorted, disjoint, non-adjacent ones."""
    out: list[list[int]] = []
    for begin, end in sorted(ranges):
        if begin == end:
            continue
        if out and begin <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([begin, end])
    return [(b, e) for b, e in out]


def check_plan(plan: FilePlan, layout: Layout, item_bytes: int, align: int) -> None:
    header, selected = layout.header, layout.selected
    specs = [s for s in header.tensors.values() if selected is None or s.name in selected]

    # The selected tensors, in file order, with their header facts.
    assert [t.name for t in plan.tensors] == [s.name for s in specs]
    for slot, spec in zip(plan.tensors, specs, strict=True):
        assert (slot.dtype, slot.shape, slot.nbytes) == (spec.dtype, spec.shape, spec.nbytes)

    # Items: in file order, disjoint, none empty or over item_bytes, covering
    # exactly the selected tensors' bytes (nothing of an unselected tensor).
    items = plan.items
    for item in items:
        assert 1 <= item.length <= item_bytes
    for a, b in itertools.pairwise(items):
        assert a.end <= b.offset
    assert covered([(i.offset, i.end) for i in items]) == covered([(s.begin, s.end) for s in specs])
    assert plan.nbytes == sum(s.nbytes for s in specs)

    # Destinations: inside the buffer, disjoint, in file order.
    for item in items:
        assert item.dest >= 0 and item.dest + item.length <= plan.size
    for a, b in itertools.pairwise(items):
        assert a.dest + a.length <= b.dest
    nonempty = [t for t in plan.tensors if t.nbytes]
    for slot in plan.tensors:
        assert slot.offset >= 0 and slot.offset + slot.nbytes <= plan.size
    for a, b in itertools.pairwise(nonempty):
        assert a.offset + a.nbytes <= b.offset

    # Each tensor's bytes land at its slot: every item it overlaps maps file
    # offset x to slot.offset + (x - begin).
    for slot, spec in zip(plan.tensors, specs, strict=True):
        if not spec.nbytes:
            continue
        hits = [i for i in items if i.offset < spec.end and spec.begin < i.end]
        assert hits and hits[0].offset <= spec.begin and hits[-1].end >= spec.end
        for item in hits:
            x = max(item.offset, spec.begin)
            assert item.dest + (x - item.offset) == slot.offset + (x - spec.begin)
        # A typed view of it needs no copy.
        assert slot.offset % element_bytes(spec.dtype) == 0

    # Coalesced: two items back to back in the file and the buffer are only
    # apart because of the item_bytes cut.
    for a, b in itertools.pairwise(items):
        if a.end == b.offset and a.dest + a.length == b.dest:
            assert a.end % item_bytes == 0
    # The buffer holds the selected bytes plus at most one alignment gap per run.
    runs = 1 + sum(1 for a, b in itertools.pairwise(items) if a.dest + a.length != b.dest)
    assert plan.size <= plan.nbytes + (align - 1) * runs if items else plan.size == 0


@settings(max_examples=400, deadline=None)
@given(
    layout=layouts(),
    item_bytes=st.integers(1, 300) | st.just(16 << 20),
    align=st.sampled_from([8, 16, 64, 4096]),
)
def test_plan_properties(layout: Layout, item_bytes: int, align: int) -> None:
    select = None if layout.selected is None else layout.selected.__contains__
    plan = plan_file("f.safetensors", layout.header, select, item_bytes=item_bytes, align=align)
    assert plan.path == "f.safetensors"
    check_plan(plan, layout, item_bytes, align)


def real_file(tmp_path: Any, tensors: dict[str, torch.Tensor]) -> SafetensorsHeader:
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_file(tensors, path)
    return read_header(path)


def test_a_whole_safetensors_file_is_one_run(tmp_path: Any) -> None:
    # safetensors' writer aligns every tensor: one read covers them all.
    header = real_file(
        tmp_path,
        {
            "a": torch.zeros(3, dtype=torch.uint8),
            "b": torch.zeros(5, dtype=torch.float64),
            "c": torch.zeros((), dtype=torch.bool),
            "d": torch.zeros(7, dtype=torch.float16),
            "e": torch.zeros(0, 4),
        },
    )
    plan = plan_file("m", header, None)
    data = sum(s.nbytes for s in header.tensors.values())
    first = min(s.begin for s in header.tensors.values() if s.nbytes)
    assert plan.items == (ReadItem(first, data, plan.items[0].dest),)
    assert plan.size == plan.items[0].dest + data


def test_a_tensor_parallel_rank_reads_its_share(tmp_path: Any) -> None:
    header = real_file(tmp_path, {f"layers.{i}.w": torch.zeros(64, 64) for i in range(32)})
    rank = {f"layers.{i}.w" for i in range(32) if i % 8 == 3}
    plan = plan_file("m", header, rank.__contains__)
    total = sum(s.nbytes for s in header.tensors.values())
    assert plan.nbytes == total // 8
    assert len(plan.items) == 4  # the four tensors are apart in the file
    assert plan.size < total // 8 + 4 * 64
    assert {t.name for t in plan.tensors} == rank


def test_items_split_at_item_bytes_boundaries_of_the_file(tmp_path: Any) -> None:
    header = real_file(tmp_path, {"w": torch.zeros(10_000, dtype=torch.uint8)})
    (spec,) = header.tensors.values()
    plan = plan_file("m", header, None, item_bytes=4096)
    assert [i.offset for i in plan.items[1:]] == list(range(4096, spec.end, 4096))
    assert plan.items[0].offset == spec.begin
    assert sum(i.length for i in plan.items) == 10_000


def test_a_packed_misaligned_tensor_gets_an_aligned_destination() -> None:
    # A hand-made file: an F32 right after a 3-byte U8, then a BOOL and an F64.
    entries = [
        ("odd", "U8", [3], 0, 3),
        ("f32", "F32", [3], 3, 15),
        ("flag", "BOOL", [], 15, 16),
        ("f64", "F64", [2], 16, 32),
    ]
    prefix = header_bytes(entries, 0)
    header = parse_header(prefix, len(prefix) + 32)
    plan = plan_file("m", header, None)
    offsets = {t.name: t.offset for t in plan.tensors}
    assert offsets["f32"] % 4 == 0 and offsets["f64"] % 8 == 0
    # u8 | f32 + bool (the f32 starts a new run at 64) | f64: in the f32's run it
    # would land at 64 + 13 = 77, not a multiple of 8, so it starts another.
    assert len(plan.items) == 3


def test_empty_and_scalar_tensors() -> None:
    entries = [("s", "F32", [], 0, 4), ("e", "F16", [0, 3], 4, 4), ("z", "I64", [0], 0, 0)]
    prefix = header_bytes(entries, 0)
    header = parse_header(prefix, len(prefix) + 4)
    plan = plan_file("m", header, None)
    assert [t.name for t in plan.tensors] == ["z", "s", "e"]  # file order
    assert [t.nbytes for t in plan.tensors] == [0, 4, 0]
    assert len(plan.items) == 1 and plan.items[0].length == 4
    only_empty = plan_file("m", header, {"e", "z"}.__contains__)
    assert only_empty.items == () and only_empty.size == 0 and len(only_empty.tensors) == 2


def test_nothing_selected_is_an_empty_plan(tmp_path: Any) -> None:
    header = real_file(tmp_path, {"w": torch.zeros(4)})
    plan = plan_file("m", header, lambda name: False)
    assert plan == FilePlan("m", 0, (), ())


@pytest.mark.parametrize(("item_bytes", "align"), [(0, 64), (16, 4), (16, 48)])
def test_parameters_out_of_range(tmp_path: Any, item_bytes: int, align: int) -> None:
    header = real_file(tmp_path, {"w": torch.zeros(4)})
    with pytest.raises(ValueError):
        plan_file("m", header, None, item_bytes=item_bytes, align=align)
