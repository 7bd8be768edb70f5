"""The safetensors header parser: every lie refused, every valid layout kept."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from weightcache.client.header import (
    DTYPE_BITS,
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    parse_header,
    read_header,
)
from weightcache.errors import HeaderInvalid

PATH = "models/m/model-00001.safetensors"


def blob(header: Any, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    """A file: length, header JSON (or ``raw`` bytes), data."""
    body = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def parse(data: bytes) -> SafetensorsHeader:
    return parse_header(data, len(data), path=PATH)


def entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def refused(data: bytes, reason: str, *words: str, tensor: str | None = None) -> HeaderInvalid:
    with pytest.raises(HeaderInvalid) as info:
        parse(data)
    err = info.value
    assert err.code == "header_invalid"
    assert err.facts["reason"] == reason, str(err)
    assert err.facts["path"] == PATH
    assert err.facts["tensor"] == tensor
    assert PATH in str(err)
    if tensor is not None:
        assert repr(tensor) in str(err)
    for word in words:
        assert word in str(err)
    return err


# -- valid headers --------------------------------------------------------------


def test_parses_what_safetensors_writes(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file(
        {"b": torch.zeros(3, 2), "a": torch.zeros(5, dtype=torch.int8), "s": torch.tensor(1.0)},
        path,
        metadata={"format": "pt"},
    )
    header = read_header(path)
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert header.data_start == 8 + length
    assert header.metadata == {"format": "pt"}
    assert sum(t.nbytes for t in header.tensors.values()) == len(raw) - header.data_start
    assert header.tensors["b"].shape == (3, 2)
    assert header.tensors["s"].shape == ()
    assert header.tensors["a"].dtype == "I8"
    assert header == parse_header(raw, len(raw), path=str(path))


def test_offsets_are_absolute_and_in_file_order() -> None:
    header_json = {
        "__metadata__": {"k": "v"},
        "late": entry("F32", [2], 8, 16),
        "early": entry("I64", [], 0, 8),
        "empty": entry("BF16", [0, 4], 16, 16),
    }
    data = blob(header_json, bytes(16))
    header = parse(data)
    start = len(data) - 16
    assert header.data_start == start
    assert list(header.tensors) == ["early", "late", "empty"]
    late = header.tensors["late"]
    assert (late.begin, late.end, late.nbytes, late.numel) == (start + 8, start + 16, 8, 2)
    assert header.tensors["early"].numel == 1
    assert header.tensors["empty"].nbytes == 0
    assert header.metadata == {"k": "v"}


@pytest.mark.parametrize(
    "raw",
    [
        b'   \n\t{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}',
        b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}        ',
        b' {"a": {"data_offsets": [0, 2], "shape": [2], "dtype": "U8"}} ',
    ],
)
def test_whitespace_padding_and_key_order_accepted(raw: bytes) -> None:
    header = parse(blob(None, b"xy", raw=raw))
    assert header.tensors["a"].nbytes == 2


def test_empty_header_and_null_metadata() -> None:
    assert parse(blob({})).tensors == {}
    header = parse(blob({"__metadata__": None}))
    assert header.metadata is None and header.tensors == {}


def test_zero_length_tensors_may_sit_anywhere_in_range() -> None:
    header_json = {
        "a": entry("U8", [4], 0, 4),
        "inside": entry("F32", [0], 2, 2),
        "at_end": entry("F64", [3, 0], 4, 4),
        "at_start": entry("I32", [0], 0, 0),
    }
    header = parse(blob(header_json, bytes(4)))
    assert list(header.tensors) == ["at_start", "a", "inside", "at_end"]


def test_f4_packs_two_elements_per_byte() -> None:
    header = parse(blob({"q": entry("F4", [3, 2], 0, 3)}, bytes(3)))
    assert header.tensors["q"].nbytes == 3
    assert header.tensors["q"].numel == 6


def test_utf8_names_and_metadata() -> None:
    header_json = {"__metadata__": {"ключ": "значение"}, "层.0": entry("U8", [1], 0, 1)}
    data = blob(None, b"\0", raw=json.dumps(header_json, ensure_ascii=False).encode())
    header = parse(data)
    assert list(header.tensors) == ["层.0"]
    assert header.metadata == {"ключ": "значение"}


def test_prefix_may_be_the_whole_file_but_not_less_than_the_header() -> None:
    data = blob({"a": entry("U8", [2], 0, 2)}, b"ab")
    assert parse_header(data + b"", len(data)).tensors["a"].nbytes == 2
    with pytest.raises(ValueError, match="header needs"):
        parse_header(data[:12], len(data))
    with pytest.raises(ValueError, match="needs 8"):
        parse_header(b"\x01", len(data))


# -- every rule, by hand -----------------------------------------------------------


def test_file_shorter_than_length_field() -> None:
    refused(b"", "file_too_small", "0 bytes")
    refused(b"\x02\x00\x00", "file_too_small", "3 bytes")


def test_header_length_beyond_file() -> None:
    data = blob({"a": entry("U8", [2], 0, 2)}, b"ab")
    lying = struct.pack("<Q", len(data) - 7) + data[8:]
    refused(lying, "header_beyond_file", f"header length {len(data) - 7}")
    refused(struct.pack("<Q", 2**64 - 1), "header_too_large", str(2**64 - 1))


def test_header_length_beyond_limit_is_refused_before_reading() -> None:
    with pytest.raises(HeaderInvalid) as info:
        parse_header(struct.pack("<Q", MAX_HEADER_BYTES + 1), 2 * MAX_HEADER_BYTES)
    assert info.value.facts["reason"] == "header_too_large"
    assert str(MAX_HEADER_BYTES) in str(info.value)


def test_read_header_checks_the_length_before_reading(tmp_path: Path) -> None:
    # Lengths of 1 TiB and of 64 bytes in a 16-byte file: refused without
    # trying to read (or allocate) them.
    path = tmp_path / "liar.safetensors"
    for length, reason in [(2**40, "header_too_large"), (64, "header_beyond_file")]:
        path.write_bytes(struct.pack("<Q", length) + b"{}      ")
        with pytest.raises(HeaderInvalid) as info:
            read_header(path)
        assert info.value.facts["reason"] == reason
        assert info.value.facts["path"] == str(path)
    path.write_bytes(b"\x01")
    with pytest.raises(HeaderInvalid, match="fewer than the 8-byte"):
        read_header(path)


def test_header_not_utf8() -> None:
    refused(blob(None, raw=b'{"\xff": 1}'), "not_utf8", "not UTF-8")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b'{"a":',
        b'{"a": 1,}',
        b"{}\x00",
        b'{"__metadata__": {"k": NaN}}',
        b'{"a": Infinity}',
        b"[" * 100_000,
        b'{"a": {"dtype": "U8", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 0]}}',
    ],
    ids=["empty", "truncated", "trailing-comma", "nul", "nan", "inf", "deep", "long-int"],
)
def test_header_not_json(raw: bytes) -> None:
    refused(blob(None, raw=raw), "not_json", "not valid JSON")


@pytest.mark.parametrize("raw", [b"[]", b'"x"', b"null", b"3"])
def test_header_not_an_object(raw: bytes) -> None:
    refused(blob(None, raw=raw), "not_object", "not an object")


def test_duplicate_tensor_name() -> None:
    raw = (
        b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
        b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    )
    refused(blob(None, b"x", raw=raw), "duplicate_key", "'a' twice")


@pytest.mark.parametrize(
    ("metadata", "word"),
    [([], "array"), ("x", "string"), ({"k": 1}, "'k'"), ({"k": None}, "null")],
)
def test_metadata_not_a_string_map(metadata: Any, word: str) -> None:
    refused(blob({"__metadata__": metadata}), "metadata_invalid", "__metadata__", word)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([], ["array", "not an object"]),
        ("U8", ["string"]),
        ({"dtype": "U8", "shape": [0]}, ["missing data_offsets"]),
        ({**entry("U8", [0], 0, 0), "offsets": 1}, ["unexpected 'offsets'"]),
        ({"shape": [0], "data_offsets": [0, 0], "x": 1}, ["missing dtype", "unexpected 'x'"]),
    ],
)
def test_entry_not_an_object_or_wrong_keys(value: Any, words: list[str]) -> None:
    refused(blob({"w": value}), "entry_invalid", *words, tensor="w")


@pytest.mark.parametrize("dtype", ["F6_E2M3", "float32", "f32", "", 5, None, ["F32"]])
def test_unknown_dtype(dtype: Any) -> None:
    refused(blob({"w": entry(dtype, [0], 0, 0)}), "dtype_unknown", "unknown dtype", tensor="w")


@pytest.mark.parametrize(
    ("shape", "word"),
    [
        ("3", "not a list"),
        ({"0": 3}, "not a list"),
        ([2.0], "2.0"),
        ([True], "true"),
        ([-1], "-1"),
        ([1, "2"], '"2"'),
        ([None], "null"),
        ([[2]], "[2]"),
        ([0, 2**62, 4], "int64"),
        ([2**64], "int64"),
    ],
)
def test_shape_not_non_negative_ints(shape: Any, word: str) -> None:
    refused(blob({"w": entry("U8", shape, 0, 0)}), "shape_invalid", "shape", word, tensor="w")


@pytest.mark.parametrize(
    ("offsets", "word"),
    [
        ([0], "not two"),
        ([0, 1, 2], "not two"),
        ([-1, 0], "not two"),
        ([0.0, 1], "not two"),
        ([False, True], "not two"),
        ("0,1", "not two"),
        (None, "not two"),
        ([2, 1], "ends before it begins"),
    ],
)
def test_offsets_not_two_ordered_counts(offsets: Any, word: str) -> None:
    header_json = {"w": {"dtype": "U8", "shape": [1], "data_offsets": offsets}}
    refused(blob(header_json, b"abc"), "offsets_invalid", "data_offsets", word, tensor="w")


def test_offsets_beyond_data_area() -> None:
    data = blob({"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 2, 4)}, b"abc")
    refused(data, "offsets_beyond_data", "end 4", "3-byte data area", tensor="b")
    # An empty tensor past the end is still out of range.
    data = blob({"a": entry("U8", [2], 0, 2), "z": entry("U8", [0], 9, 9)}, b"ab")
    refused(data, "offsets_beyond_data", tensor="z")


@pytest.mark.parametrize(
    ("dtype", "shape", "nbytes", "words"),
    [
        ("F32", [2], 4, ["needs 8 bytes", "hold 4"]),
        ("BF16", [3, 0], 2, ["needs 0 bytes"]),
        ("U8", [], 0, ["needs 1 bytes"]),
        ("C64", [1], 4, ["needs 8 bytes"]),
        ("F4", [3], 2, ["byte boundary"]),
        ("F4", [4], 1, ["needs 2 bytes"]),
    ],
)
def test_byte_length_not_numel_times_itemsize(
    dtype: str, shape: list[int], nbytes: int, words: list[str]
) -> None:
    data = blob({"w": entry(dtype, shape, 0, nbytes)}, bytes(nbytes))
    refused(data, "size_mismatch", *words, tensor="w")


def test_overlapping_tensors() -> None:
    data = blob({"a": entry("U8", [4], 0, 4), "b": entry("U8", [2], 3, 5)}, bytes(5))
    refused(data, "overlap", "overlap tensor 'a'", tensor="b")
    data = blob({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 0, 4)}, bytes(4))
    refused(data, "overlap", tensor="b")


def test_gaps_in_the_data_area() -> None:
    data = blob({"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 4, 6)}, bytes(6))
    refused(data, "gap", "[2, 4]", tensor="b")
    data = blob({"b": entry("U8", [2], 2, 4)}, bytes(4))
    refused(data, "gap", "[0, 2]", tensor="b")
    data = blob({"a": entry("U8", [2], 0, 2)}, bytes(5))
    refused(data, "gap", "[2, 5]", "end of the file")
    refused(blob({}, b"x"), "gap", "[0, 1]")


def test_header_module_does_not_import_torch() -> None:
    code = "import sys, weightcache.client.header; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})


# -- properties ------------------------------------------------------------------


def _check_parse_or_refuse(data: bytes) -> None:
    try:
        header = parse(data)
    except HeaderInvalid as err:
        assert err.facts["reason"]
        return
    # Whatever parses describes a file that is exactly tiled by its tensors.
    assert sum(t.nbytes for t in header.tensors.values()) == len(data) - header.data_start


@settings(max_examples=200)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_parse_or_raise_header_invalid(data: bytes) -> None:
    _check_parse_or_refuse(data)


@settings(max_examples=200)
@given(st.binary(max_size=256), st.binary(max_size=32))
def test_arbitrary_header_bytes_parse_or_raise_header_invalid(raw: bytes, data: bytes) -> None:
    _check_parse_or_refuse(blob(None, data, raw=raw))


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(sorted(DTYPE_BITS)),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["dtype", "shape", "data_offsets", "x"]) | st.text(max_size=4),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=200)
@given(st.dictionaries(st.text(max_size=6), _json_values, max_size=4), st.binary(max_size=32))
def test_arbitrary_json_parse_or_raise_header_invalid(document: Any, data: bytes) -> None:
    _check_parse_or_refuse(blob(None, data, raw=json.dumps(document).encode()))


# A generated valid file: (JSON header object, data size, the expected tensors as
# name -> (dtype, shape, relative begin, relative end)).
Layout = tuple[dict[str, Any], int, dict[str, tuple[str, tuple[int, ...], int, int]]]


@st.composite
def layouts(draw: st.DrawFn, min_nonempty: int = 0) -> Layout:
    names = draw(
        st.lists(
            st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__"),
            min_size=min_nonempty,
            max_size=8,
            unique=True,
        )
    )
    specs: list[tuple[str, str, tuple[int, ...], int]] = []
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        numel = 1
        for dim in shape:
            numel *= dim
        if dtype == "F4" and numel % 2:
            shape = (*shape, 2)
            numel *= 2
        specs.append((name, dtype, shape, numel * DTYPE_BITS[dtype] // 8))
    nonempty = [s for s in specs if s[3]]
    assume(len(nonempty) >= min_nonempty)
    # Non-empty tensors tile the data area in a random order; empty ones sit
    # anywhere in it.
    order = draw(st.permutations(nonempty))
    offsets: dict[str, tuple[int, int]] = {}
    cursor = 0
    for name, _, _, size in order:
        offsets[name] = (cursor, cursor + size)
        cursor += size
    for name, _, _, size in specs:
        if not size:
            at = draw(st.integers(0, cursor))
            offsets[name] = (at, at)
    header_json: dict[str, Any] = {}
    if draw(st.booleans()):
        header_json["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)
        )
    expected = {}
    for name, dtype, shape, _ in draw(st.permutations(specs)):
        begin, end = offsets[name]
        header_json[name] = entry(dtype, list(shape), begin, end)
        expected[name] = (dtype, shape, begin, end)
    return header_json, cursor, expected


def encode(header_json: dict[str, Any], lead: int = 0, trail: int = 0, ascii: bool = True) -> bytes:
    text = json.dumps(header_json, ensure_ascii=ascii)
    return (" " * lead + text + " " * trail).encode()


@settings(max_examples=200)
@given(layouts(), st.integers(0, 8), st.integers(0, 8), st.booleans())
def test_valid_layouts_round_trip(layout: Layout, lead: int, trail: int, ascii: bool) -> None:
    header_json, size, expected = layout
    data = blob(None, bytes(size), raw=encode(header_json, lead, trail, ascii))
    header = parse(data)
    assert header.data_start == len(data) - size
    assert header.metadata == header_json.get("__metadata__")
    assert header.tensors.keys() == expected.keys()
    for name, (dtype, shape, begin, end) in expected.items():
        spec = header.tensors[name]
        assert (spec.name, spec.dtype, spec.shape) == (name, dtype, shape)
        assert (spec.begin, spec.end) == (header.data_start + begin, header.data_start + end)
    begins = [(t.begin, t.end) for t in header.tensors.values()]
    assert begins == sorted(begins)


MUTATIONS = [
    "length_beyond_file",
    "length_short",
    "length_huge",
    "not_utf8",
    "overlap",
    "out_of_range",
    "unknown_dtype",
    "shape_mismatch",
    "reversed_offsets",
    "negative_offset",
    "float_shape",
    "gap",
]


@settings(max_examples=200, suppress_health_check=[HealthCheck.filter_too_much])
@given(layouts(min_nonempty=1), st.sampled_from(MUTATIONS), st.data())
def test_mutated_layouts_raise_header_invalid(
    layout: Layout, mutation: str, data: st.DataObject
) -> None:
    header_json, size, expected = layout
    nonempty = sorted((e[2], n) for n, e in expected.items() if e[2] != e[3])
    victim = data.draw(st.sampled_from([n for _, n in nonempty]))
    _, shape, begin, end = expected[victim]
    reasons: set[str]
    blame: str | None = victim
    raw = encode(header_json)
    file = blob(None, bytes(size), raw=raw)

    if mutation == "length_beyond_file":
        extra = data.draw(st.integers(1, 2**20))
        file = struct.pack("<Q", len(file) - 8 + extra) + file[8:]
        reasons, blame = {"header_beyond_file"}, None
    elif mutation == "length_short":
        cut = data.draw(st.integers(1, len(raw)))
        file = struct.pack("<Q", len(raw) - cut) + file[8:]
        reasons, blame = {"not_json", "not_utf8", "not_object", "gap"}, None
    elif mutation == "length_huge":
        file = struct.pack("<Q", data.draw(st.integers(MAX_HEADER_BYTES + 1, 2**64 - 1))) + file[8:]
        reasons, blame = {"header_too_large"}, None
    elif mutation == "not_utf8":
        at = data.draw(st.integers(0, len(raw)))
        bad = data.draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82"]))
        raw = raw[:at] + bad + raw[at:]
        file = blob(None, bytes(size), raw=raw)
        reasons, blame = {"not_utf8"}, None
    else:
        if mutation == "overlap":
            # Slide a tensor that does not start the data area back into its
            # predecessor's bytes; the size still matches, the range overlaps.
            assume(begin > 0)
            shift = data.draw(st.integers(1, begin))
            header_json[victim]["data_offsets"] = [begin - shift, end - shift]
            reasons, blame = {"overlap"}, None  # blamed on whichever sorts second
        elif mutation == "out_of_range":
            beyond = data.draw(st.integers(1, 2**70))
            header_json[victim]["data_offsets"] = [size - (end - begin) + beyond, size + beyond]
            reasons = {"offsets_beyond_data"}
        elif mutation == "unknown_dtype":
            header_json[victim]["dtype"] = data.draw(
                st.text(max_size=8).filter(lambda s: s not in DTYPE_BITS)
            )
            reasons = {"dtype_unknown"}
        elif mutation == "shape_mismatch":
            header_json[victim]["shape"] = [*shape, data.draw(st.integers(2, 2**40))]
            reasons = {"size_mismatch"}
        elif mutation == "reversed_offsets":
            header_json[victim]["data_offsets"] = [end, begin]
            reasons = {"offsets_invalid"}
        elif mutation == "negative_offset":
            header_json[victim]["data_offsets"] = [-1 - begin, end]
            reasons = {"offsets_invalid"}
        elif mutation == "float_shape":
            header_json[victim]["shape"] = [float(d) for d in shape] or [1.0]
            reasons = {"shape_invalid"}
        else:  # gap: the data area grows by bytes no tensor claims
            size += data.draw(st.integers(1, 64))
            reasons, blame = {"gap"}, None
        file = blob(header_json, bytes(size))

    with pytest.raises(HeaderInvalid) as info:
        parse(file)
    assert info.value.facts["reason"] in reasons, str(info.value)
    if blame is not None:
        assert info.value.facts["tensor"] == blame
