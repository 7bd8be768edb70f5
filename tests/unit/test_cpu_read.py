"""CPU reads are differential: bitwise what safetensors.torch.load_file returns.

Both sinks: the copy-on-write mapping (``mmap=True``) and the private read into
one buffer per file (``mmap=False``, in small items so that tensors straddle
reads).
"""

from __future__ import annotations

import gc
import json
import mmap
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch as safetensors_torch
import torch

from weightcache.client import readers
from weightcache.client.cpu import item_size, read_file
from weightcache.client.dtypes import torch_dtype, torch_shape
from weightcache.client.header import DTYPE_BITS
from weightcache.client.selection import make_selector
from weightcache.errors import HeaderInvalid

FLOAT_NANS = {
    # Quiet, signalling and negative NaNs with payloads: a loader that goes
    # through float arithmetic (or numpy casts) would canonicalise these.
    torch.float32: [0x7FC00001, 0x7F800001, 0xFFFFFFFF],
    torch.float64: [0x7FF8000000000001, 0xFFF0000000000001],
    torch.float16: [0x7E01, 0xFC01],
    torch.bfloat16: [0x7FC1, 0xFF81],
}


def random_tensor(dtype: Any, shape: tuple[int, ...], seed: int) -> Any:
    """Random bytes viewed as ``dtype`` (so floats include NaNs, infs, denormals)."""
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for dim in shape:
        numel *= dim
    nbytes = numel * dtype.itemsize
    if dtype == torch.bool:
        # Only 0 and 1 are valid bools; anything else is undefined in torch.
        raw = torch.randint(0, 2, (nbytes,), dtype=torch.uint8, generator=gen)
    else:
        raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)
    flat = raw.view(dtype)
    nans = FLOAT_NANS.get(dtype)
    if nans and numel >= len(nans):
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[dtype.itemsize]
        for i, pattern in enumerate(nans):
            width = 8 * dtype.itemsize
            # As the signed integer of the same width, so the bits go in unchanged.
            flat.view(bits)[i] = pattern - (1 << width) if pattern >> (width - 1) else pattern
    return flat.reshape(shape)


def as_bytes(t: Any) -> Any:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_bitwise_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for name, ref in want.items():
        t = got[name]
        assert t.dtype == ref.dtype, name
        assert t.shape == ref.shape, name
        assert t.device.type == "cpu"
        if ref.numel():
            assert torch.equal(as_bytes(t), as_bytes(ref)), name
            assert t.data_ptr() % t.element_size() == 0, name


def save(tmp_path: Path, tensors: dict[str, Any], name: str = "m.safetensors") -> Path:
    path = tmp_path / name
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    return path


#: both sinks: mapped copy-on-write, and read into private memory
SINKS = pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "read"])
#: small reads for the private sink, so tensors straddle items and items split tensors
ITEM_BYTES = 1000


def read(path: Path, *, mmap: bool = True, **kwargs: Any) -> Any:
    if not mmap:
        kwargs.setdefault("item_bytes", ITEM_BYTES)
    return read_file(path, mmap=mmap, **kwargs)


def check_against_load_file(path: Path, **kwargs: Any) -> dict[str, Any]:
    got, nbytes, names = read(path, **kwargs)
    want = safetensors_torch.load_file(path)
    select = kwargs.get("select")
    if select is not None:
        want = {k: v for k, v in want.items() if select(k)}
    assert_bitwise_equal(got, want)
    assert nbytes == sum(t.numel() * t.element_size() for t in want.values())
    assert sorted(names) == sorted(safetensors_torch.load_file(path))
    return got


ALL_DTYPES = sorted(DTYPE_BITS)


def test_every_dtype_in_the_table_maps_like_safetensors() -> None:
    for name in ALL_DTYPES:
        dtype = torch_dtype(name)
        if name in safetensors_torch._TYPES:
            assert safetensors_torch._TYPES[name] == dtype
        # Element size in bits agrees with the header table (F4 packs two).
        per = 2 if name == "F4" else 1
        assert dtype.itemsize * 8 == DTYPE_BITS[name] * per


@pytest.mark.parametrize("name", ALL_DTYPES)
@SINKS
def test_every_dtype_bitwise(tmp_path: Path, mmap: bool, name: str) -> None:
    dtype = torch_dtype(name)
    tensors = {
        "matrix": random_tensor(dtype, (7, 6), 1),
        "vector": random_tensor(dtype, (33,), 2),
        "cube": random_tensor(dtype, (2, 3, 4), 3),
        "empty": torch.empty((0,), dtype=dtype),
        "empty_2d": torch.empty((4, 0), dtype=dtype),
    }
    if name != "F4":  # a packed F4 pair cannot be a 0-d tensor
        tensors["scalar"] = random_tensor(dtype, (), 4)
    path = save(tmp_path, tensors)
    got = check_against_load_file(path, mmap=mmap)
    # And bitwise what was written, not only what load_file thinks it was.
    assert_bitwise_equal(got, tensors)


@SINKS
def test_mixed_dtypes_in_one_file(tmp_path: Path, mmap: bool) -> None:
    tensors = {
        f"t.{name}.{i}": random_tensor(torch_dtype(name), shape, i)
        for i, shape in enumerate([(3,), (5, 2), (1, 1, 4)])
        for name in ALL_DTYPES
    }
    check_against_load_file(save(tmp_path, tensors), mmap=mmap)


@SINKS
def test_large_tensor(tmp_path: Path, mmap: bool) -> None:
    big = random_tensor(torch.bfloat16, (2048, 2048), 7)  # 8 MiB
    path = save(tmp_path, {"big": big, "tail": torch.arange(3, dtype=torch.int64)})
    got = check_against_load_file(path, mmap=mmap)
    assert_bitwise_equal({"big": got["big"]}, {"big": big})


@SINKS
def test_many_tensors(tmp_path: Path, mmap: bool) -> None:
    tensors = {f"layers.{i}.w": random_tensor(torch.float16, (i % 7, 3), i) for i in range(600)}
    check_against_load_file(save(tmp_path, tensors), mmap=mmap)


@SINKS
def test_empty_file_of_tensors(tmp_path: Path, mmap: bool) -> None:
    path = save(tmp_path, {})
    assert read(path, mmap=mmap) == ({}, 0, ())
    only_empty = save(tmp_path, {"e": torch.empty((0, 3))}, "e.safetensors")
    got, nbytes, names = read(only_empty, mmap=mmap)
    assert got["e"].shape == (0, 3) and nbytes == 0 and names == ("e",)


def model(tmp_path: Path) -> Path:
    tensors = {
        f"model.layers.{i}.{part}": random_tensor(torch.float32, (4, 4), i * 10 + j)
        for i in range(3)
        for j, part in enumerate(["attn.q", "attn.k", "mlp.up", "norm"])
    }
    tensors["lm_head"] = random_tensor(torch.float32, (8, 4), 99)
    return save(tmp_path, tensors)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (["lm_head", "model.layers.1.norm"], {"lm_head", "model.layers.1.norm"}),
        ("model.layers.*.attn.*", {f"model.layers.{i}.attn.{p}" for i in range(3) for p in "qk"}),
        ("model.layers.[02].norm", {"model.layers.0.norm", "model.layers.2.norm"}),
        ("MODEL.*", set()),
        (lambda n: n.endswith("mlp.up"), {f"model.layers.{i}.mlp.up" for i in range(3)}),
        ([], set()),
    ],
    ids=["names", "glob", "glob-class", "glob-case", "predicate", "nothing"],
)
@SINKS
def test_selection_returns_exactly_those_names(
    tmp_path: Path, mmap: bool, spec: Any, expected: set[str]
) -> None:
    path = model(tmp_path)
    got = check_against_load_file(path, select=make_selector(spec), mmap=mmap)
    assert set(got) == expected


def mapped_bytes(path: Path) -> int:
    """Bytes of this process's address space that map ``path`` (Linux)."""
    total = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == str(path):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                total += end - start
    return total


def test_selection_maps_only_the_selected_span(tmp_path: Path) -> None:
    # A tensor-parallel rank selecting one small tensor of a large file maps a
    # page or so, not the file.
    page = mmap.ALLOCATIONGRANULARITY
    path = save(tmp_path, {"a": torch.ones(4), "m": torch.ones(1 << 18), "z": torch.ones(4)})
    assert path.stat().st_size > 1 << 20
    for name in ["a", "z"]:
        got, nbytes, _ = read_file(path, select=lambda n, name=name: n == name)
        assert torch.equal(got[name], torch.ones(4)) and nbytes == 16
        assert 0 < mapped_bytes(path) <= 2 * page
        del got
        gc.collect()
    assert mapped_bytes(path) == 0  # unmapped once the tensors are gone
    everything = read_file(path)
    assert mapped_bytes(path) >= path.stat().st_size - page
    del everything


def handmade(tmp_path: Path, entries: list[tuple[str, str, list[int], bytes]], pad: int) -> Path:
    """A file with tensors laid out back to back in the given order, no alignment."""
    header: dict[str, Any] = {}
    data = b""
    for name, dtype, shape, payload in entries:
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(payload)],
        }
        data += payload
    body = json.dumps(header).encode() + b" " * pad
    path = tmp_path / f"hand{pad}.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


@pytest.mark.parametrize("pad", range(8))
@SINKS
def test_misaligned_offsets_are_copied_aligned(tmp_path: Path, mmap: bool, pad: int) -> None:
    f32 = struct.pack("<3f", 1.5, float("nan"), -2.0)
    f64 = struct.pack("<2d", 3.25, -0.0)
    i16 = struct.pack("<3h", -7, 8, 32767)
    c64 = struct.pack("<2f", 1.0, -1.0)
    path = handmade(
        tmp_path,
        [
            ("odd", "U8", [3], b"\x01\x02\x03"),
            ("f32", "F32", [3], f32),
            ("flag", "BOOL", [], b"\x01"),
            ("f64", "F64", [2], f64),
            ("i16", "I16", [3], i16),
            ("c64", "C64", [], c64),
        ],
        pad,
    )
    got = check_against_load_file(path, mmap=mmap)
    assert got["f32"].view(torch.int32).tolist() == list(struct.unpack("<3i", f32))
    assert got["f64"].tolist() == [3.25, -0.0]
    assert got["i16"].tolist() == [-7, 8, 32767]
    assert got["c64"].item() == complex(1.0, -1.0)
    assert got["flag"].shape == () and bool(got["flag"])


def test_writes_stay_private_and_tensors_outlive_the_file(tmp_path: Path) -> None:
    original = torch.arange(4096, dtype=torch.float32).reshape(64, 64)  # no NaNs: compared by value
    path = save(tmp_path, {"w": original, "b": torch.zeros(3)})
    os.chmod(path, 0o444)  # cached blobs are read-only
    before = path.read_bytes()
    got, _, _ = read_file(path)
    w = got.pop("w")
    del got
    gc.collect()
    w.add_(1)  # copy-on-write: lands in a private page
    assert path.read_bytes() == before
    os.unlink(path)  # an unlinked blob stays mapped
    gc.collect()
    assert torch.equal(w, original + 1)


@SINKS
def test_lying_header_raises_header_invalid(tmp_path: Path, mmap: bool) -> None:
    path = save(tmp_path, {"w": torch.zeros(4)})
    with open(path, "ab") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(HeaderInvalid) as info:
        read(path, mmap=mmap)
    assert info.value.facts["reason"] == "gap"
    assert info.value.facts["path"] == str(path)


@SINKS
def test_f4_with_odd_last_dim_cannot_be_a_torch_tensor(tmp_path: Path, mmap: bool) -> None:
    path = handmade(tmp_path, [("q", "F4", [2, 3], b"\0\0\0")], 0)
    with pytest.raises(HeaderInvalid) as info:
        read(path, mmap=mmap)
    assert info.value.facts["reason"] == "shape_unsupported"
    assert info.value.facts["tensor"] == "q"
    with pytest.raises(Exception, match="last dim"):
        safetensors_torch.load_file(path)  # safetensors refuses it too
    # Unselected, it does not get in the way.
    got, _, names = read(path, mmap=mmap, select=lambda n: False)
    assert got == {} and names == ("q",)


def test_torch_shape_unpacks_only_packed_types() -> None:
    assert torch_shape("F32", (2, 3)) == (2, 3)
    assert torch_shape("F4", (2, 6)) == (2, 3)
    assert torch_shape("F4", (0,)) == (0,)


# -- the private read (mmap=False) ---------------------------------------------------


def test_private_read_is_one_private_buffer_per_file(tmp_path: Path) -> None:
    tensors = {
        f"t.{name}": random_tensor(torch_dtype(name), (5, 3), i)
        for i, name in enumerate(ALL_DTYPES)
    }
    path = save(tmp_path, tensors)
    got = check_against_load_file(path, mmap=False)
    storages = {t.untyped_storage().data_ptr() for t in got.values() if t.numel()}
    assert len(storages) == 1, "every tensor is a view of the file's one buffer"
    assert mapped_bytes(path) == 0, "nothing maps the file"
    os.unlink(path)
    assert_bitwise_equal(got, tensors)


def test_private_read_of_a_misaligned_file_copies_nothing(tmp_path: Path) -> None:
    # The plan gives every tensor an aligned destination, so even a hand-made
    # file's F32 after a 3-byte U8 is a view of the buffer, not a copy.
    path = handmade(
        tmp_path,
        [
            ("odd", "U8", [3], b"\x01\x02\x03"),
            ("f32", "F32", [3], struct.pack("<3f", 1.5, 2.5, -2.0)),
            ("f64", "F64", [1], struct.pack("<d", 3.25)),
        ],
        1,
    )
    got = check_against_load_file(path, mmap=False)
    assert len({t.untyped_storage().data_ptr() for t in got.values()}) == 1


def test_private_read_of_a_subset_reads_only_its_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tensor-parallel rank that selects 1/8 of the tensors reads 1/8 of the bytes.
    tensors = {f"layers.{i}.w": random_tensor(torch.float16, (128, 64), i) for i in range(64)}
    path = save(tmp_path, tensors)
    asked: list[int] = []
    real = readers._preadv

    def counting(fd: int, buffers: Sequence[memoryview], offset: int) -> int:
        asked.append(len(buffers[0]))
        return real(fd, buffers, offset)

    monkeypatch.setattr(readers, "_preadv", counting)
    rank = make_selector("layers.*3.w")  # layers.3, 13, 23, ..., 63: 7 of 64
    got = check_against_load_file(path, mmap=False, select=rank)
    per_tensor = 128 * 64 * 2
    assert len(got) == 7 and sum(asked) == 7 * per_tensor


@pytest.mark.parametrize("item_bytes", [1, 7, 4096, 16 << 20])
def test_private_read_item_sizes(tmp_path: Path, item_bytes: int) -> None:
    tensors = {
        "a": random_tensor(torch.float32, (33,), 1),
        "b": random_tensor(torch.int8, (5,), 2),
        "c": random_tensor(torch.float64, (9,), 3),
    }
    path = save(tmp_path, tensors)
    got, nbytes, _ = read_file(path, mmap=False, item_bytes=item_bytes)
    assert_bitwise_equal(got, tensors)
    assert nbytes == 33 * 4 + 5 + 9 * 8


def test_default_reads_are_small_enough_to_share_a_file_between_threads() -> None:
    mib = 1 << 20
    assert item_size(1024 * mib, 2) == 16 * mib  # large files: the 16 MiB default
    assert item_size(64 * mib, 2) == 8 * mib  # about 4 reads per thread
    assert item_size(64 * mib, 16) == mib  # never under 1 MiB
    assert item_size(10, 4) == mib
    assert all(item_size(n, 3) % 4096 == 0 for n in (1, 12345678, 99 * mib))
