"""The safetensors header: parse it, and refuse every way it can lie.

A safetensors file is an 8-byte little-endian length ``N``, ``N`` bytes of
UTF-8 JSON, then the data area. The JSON maps tensor names to ``{"dtype",
"shape", "data_offsets"}`` with offsets relative to the data area, plus an
optional ``"__metadata__"`` string map.

Everything the loader later does with raw pointers (``torch.frombuffer`` over
an mmap, pinned-buffer copies) trusts the :class:`TensorSpec` this module
returns, so the parser is the one place that proves each range lies inside the
file, matches its dtype and shape to the byte, and does not share bytes with
another tensor. It is a pure function over bytes (``parse_header``) plus a thin
``os.pread`` shell (``read_header``); it never imports torch, so the daemon and
torch-free tools can validate headers too.

Coverage: like safetensors itself (``MetadataIncompleteBuffer``), the tensors
must tile the data area exactly, with no hole between two tensors and nothing
after the last one. A hole is harmless to read around, but it means the header
disagrees with the file (typically a shifted or shrunk offset), and a file that
``safetensors.torch.load_file`` refuses has no reference answer for the
differential contract, so weightcache refuses it too rather than load what no
other loader would. Zero-length tensors own no bytes and may sit at any offset
within the data area (safetensors is stricter here; nothing can be misread).

Every failure raises :class:`~weightcache.errors.HeaderInvalid` with the facts
``path``, ``tensor`` (or ``None``) and a stable ``reason`` (see
:data:`Reason`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Literal, NoReturn

from weightcache.errors import HeaderInvalid

__all__ = [
    "DTYPE_BITS",
    "MAX_HEADER_BYTES",
    "Reason",
    "SafetensorsHeader",
    "TensorSpec",
    "parse_header",
    "read_header",
    "read_header_fd",
]

#: The same cap safetensors applies, so a corrupt length field cannot make us
#: allocate or read gigabytes before the JSON is even looked at.
MAX_HEADER_BYTES: Final = 100_000_000

_LENGTH_BYTES: Final = 8
_METADATA_KEY: Final = "__metadata__"
_ENTRY_KEYS: Final = frozenset({"dtype", "shape", "data_offsets"})
# torch sizes and strides are int64: a shape whose (zero-free) product does not
# fit cannot become a tensor, even an empty one ("Stride calculation overflowed").
_MAX_ELEMENTS: Final = 2**63 - 1

#: Bits per element of every safetensors dtype that ``safetensors.torch`` can
#: load (the torch side lives in :mod:`weightcache.client.dtypes`). F4 is the
#: only sub-byte type: two values per byte, so its element count must be even
#: for the tensor to end on a byte boundary. F6_E2M3/F6_E3M2 have no torch
#: dtype and are refused as unknown.
DTYPE_BITS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "BOOL": 8,
        "U8": 8,
        "I8": 8,
        "F8_E5M2": 8,
        "F8_E4M3": 8,
        "F8_E5M2FNUZ": 8,
        "F8_E4M3FNUZ": 8,
        "F8_E8M0": 8,
        "F4": 4,
        "I16": 16,
        "U16": 16,
        "F16": 16,
        "BF16": 16,
        "I32": 32,
        "U32": 32,
        "F32": 32,
        "I64": 64,
        "U64": 64,
        "F64": 64,
        "C64": 64,
    }
)

Reason = Literal[
    "file_too_small",  # fewer than the 8 bytes of the length field
    "header_too_large",  # N above MAX_HEADER_BYTES
    "header_beyond_file",  # N larger than what follows the length field
    "not_utf8",
    "not_json",  # malformed, NaN/Infinity, absurdly deep or long numbers
    "not_object",  # the top level is not a JSON object
    "duplicate_key",  # a tensor name (or __metadata__) given twice
    "metadata_invalid",  # __metadata__ not a str -> str object
    "entry_invalid",  # a tensor entry not an object, or keys missing/unknown
    "dtype_unknown",
    "shape_invalid",
    "offsets_invalid",  # not two non-negative ints with begin <= end
    "offsets_beyond_data",  # end past the end of the file
    "size_mismatch",  # byte length != element count * element size
    "overlap",  # two non-empty tensors share bytes
    "gap",  # bytes of the data area that no tensor claims
    # Raised by weightcache.client.dtypes when the header is valid but this
    # torch cannot represent it:
    "dtype_unsupported",  # this torch build lacks the dtype
    "shape_unsupported",  # packed F4 whose last dimension is odd
]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Where one tensor lies in its file.

    ``begin``/``end`` are absolute file offsets (data start + data_offsets),
    so a reader can map or ``pread`` them without knowing the header length.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in file order of their offsets."""

    data_start: int
    tensors: dict[str, TensorSpec]
    metadata: dict[str, str] | None


def parse_header(prefix: bytes, file_size: int, *, path: str = "") -> SafetensorsHeader:
    """Parse and validate the header held in ``prefix``.

    ``prefix`` is the start of the file: at least the 8-byte length and the
    ``N`` header bytes it announces (more is ignored, so the whole file will
    do). ``file_size`` is the size of the whole file. ``path`` only names the
    file in errors.

    Raises :class:`HeaderInvalid` for anything the file could be blamed for,
    and :class:`ValueError` only when the caller passed a ``prefix`` shorter
    than the header it is meant to hold (a programmer error).
    """
    if file_size < _LENGTH_BYTES:
        _fail(path, "file_too_small", f"{file_size} bytes, fewer than the 8-byte header length")
    if len(prefix) < _LENGTH_BYTES:
        raise ValueError(f"prefix holds {len(prefix)} bytes; the header length needs 8")
    length = int.from_bytes(prefix[:_LENGTH_BYTES], "little")
    _check_length(length, file_size, path)
    data_start = _LENGTH_BYTES + length
    if len(prefix) < data_start:
        raise ValueError(f"prefix holds {len(prefix)} bytes; the header needs {data_start}")

    raw = prefix[_LENGTH_BYTES:data_start]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        _fail(path, "not_utf8", f"header is not UTF-8 ({exc.reason} at byte {exc.start})")
    try:
        # Leading/trailing whitespace is fine: safetensors pads the header
        # with spaces so the data area starts 8-aligned.
        document = json.loads(
            text, object_pairs_hook=_unique_object, parse_constant=_refuse_constant
        )
    except _DuplicateKey as exc:
        # The duplicate may be nested (a key inside an entry), so it is named
        # in the message rather than blamed on a tensor.
        _fail(path, "duplicate_key", f"a JSON object in the header names {exc.key!r} twice")
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, NaN/Infinity (parse_constant) and
        # integers past the interpreter's digit limit; RecursionError covers
        # absurd nesting. Each is a header that is not plain JSON.
        _fail(path, "not_json", f"header is not valid JSON: {exc}")
    if not isinstance(document, dict):
        _fail(path, "not_object", f"header is {_json_type(document)}, not an object")

    data_size = file_size - data_start
    metadata = _parse_metadata(document.pop(_METADATA_KEY, None), path)
    specs = [
        _parse_entry(name, entry, data_start, data_size, path) for name, entry in document.items()
    ]
    specs.sort(key=lambda s: (s.begin, s.end, s.name))
    _check_layout(specs, data_start, file_size, path)
    return SafetensorsHeader(
        data_start=data_start,
        tensors={spec.name: spec for spec in specs},
        metadata=metadata,
    )


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of the file at ``path``.

    Reads only the length field and the header bytes. ``OSError`` from opening
    or reading the file propagates unchanged.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_header_fd(fd, os.fstat(fd).st_size, path=os.fsdecode(path))
    finally:
        os.close(fd)


def read_header_fd(fd: int, file_size: int, *, path: str = "") -> SafetensorsHeader:
    """Read and validate the header through an open descriptor.

    Taking the descriptor (rather than a path) lets the caller map the very
    file whose header was checked, even if the path is replaced meanwhile.
    The announced length is checked against the limit and ``file_size``
    before any header byte is read, so a lying length costs nothing.
    """
    if file_size < _LENGTH_BYTES:
        _fail(path, "file_too_small", f"{file_size} bytes, fewer than the 8-byte header length")
    length_field = _pread_exact(fd, _LENGTH_BYTES, 0, path)
    length = int.from_bytes(length_field, "little")
    _check_length(length, file_size, path)
    body = _pread_exact(fd, length, _LENGTH_BYTES, path)
    return parse_header(length_field + body, file_size, path=path)


# -- the pieces ---------------------------------------------------------------


def _check_length(length: int, file_size: int, path: str) -> None:
    if length > MAX_HEADER_BYTES:
        _fail(
            path,
            "header_too_large",
            f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit",
        )
    if length > file_size - _LENGTH_BYTES:
        _fail(
            path,
            "header_beyond_file",
            f"header length {length} runs past the end of the {file_size}-byte file",
        )


def _parse_metadata(value: object, path: str) -> dict[str, str] | None:
    # null is what some writers emit for "no metadata"; safetensors accepts it.
    if value is None:
        return None
    if not isinstance(value, dict):
        _fail(path, "metadata_invalid", f"__metadata__ is {_json_type(value)}, not an object")
    for key, item in value.items():
        if not isinstance(item, str):
            _fail(
                path,
                "metadata_invalid",
                f"__metadata__[{key!r}] is {_json_type(item)}, not a string",
            )
    return dict(value)


def _parse_entry(
    name: str, entry: object, data_start: int, data_size: int, path: str
) -> TensorSpec:
    if not isinstance(entry, dict):
        _fail(path, "entry_invalid", f"entry is {_json_type(entry)}, not an object", name)
    keys = entry.keys()
    if keys != _ENTRY_KEYS:
        problems = []
        if missing := sorted(_ENTRY_KEYS - keys):
            problems.append(f"missing {', '.join(missing)}")
        if extra := sorted(keys - _ENTRY_KEYS):
            problems.append(f"unexpected {', '.join(map(repr, extra))}")
        _fail(path, "entry_invalid", f"entry keys: {'; '.join(problems)}", name)

    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        _fail(
            path,
            "dtype_unknown",
            f"unknown dtype {dtype!r} (known: {', '.join(sorted(DTYPE_BITS))})",
            name,
        )
    shape = _parse_shape(entry["shape"], name, path)
    begin, end = _parse_offsets(entry["data_offsets"], name, path)
    if end > data_size:
        _fail(
            path,
            "offsets_beyond_data",
            f"data_offsets end {end} is past the {data_size}-byte data area",
            name,
        )

    numel = 1
    for dim in shape:
        numel *= dim
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        _fail(
            path,
            "size_mismatch",
            f"{numel} elements of {dtype} do not end on a byte boundary",
            name,
        )
    if bits // 8 != end - begin:
        _fail(
            path,
            "size_mismatch",
            f"shape {list(shape)} of {dtype} needs {bits // 8} bytes, "
            f"data_offsets [{begin}, {end}] hold {end - begin}",
            name,
        )
    return TensorSpec(name, dtype, shape, data_start + begin, data_start + end)


def _parse_shape(value: object, name: str, path: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        _fail(path, "shape_invalid", f"shape is {_json_type(value)}, not a list", name)
    for dim in value:
        if not _is_count(dim):
            _fail(
                path,
                "shape_invalid",
                f"shape {_short(value)} holds {_short(dim)}, not a non-negative integer",
                name,
            )
    # Bounded by _MAX_ELEMENTS with an early exit, so a long list of huge
    # numbers costs one pass of small multiplications, not a giant product.
    product = 1
    for dim in value:
        product *= max(dim, 1)
        if product > _MAX_ELEMENTS:
            _fail(
                path,
                "shape_invalid",
                f"shape {_short(value)} has more elements than fit in int64",
                name,
            )
    return tuple(value)


def _parse_offsets(value: object, name: str, path: str) -> tuple[int, int]:
    if not (isinstance(value, list) and len(value) == 2 and all(map(_is_count, value))):
        _fail(
            path,
            "offsets_invalid",
            f"data_offsets {_short(value)} is not two non-negative integers",
            name,
        )
    begin, end = value
    if begin > end:
        _fail(path, "offsets_invalid", f"data_offsets [{begin}, {end}] ends before it begins", name)
    return begin, end


def _check_layout(specs: list[TensorSpec], data_start: int, file_size: int, path: str) -> None:
    """Non-empty tensors, sorted by offset, must tile the data area exactly."""
    covered = data_start  # absolute offset up to which the data area is claimed
    owner: TensorSpec | None = None
    for spec in specs:
        if spec.nbytes == 0:
            continue  # owns no bytes; its offsets were already checked in range
        if spec.begin < covered:
            assert owner is not None  # covered only moves past data_start with an owner
            _fail(
                path,
                "overlap",
                f"bytes [{spec.begin - data_start}, {spec.end - data_start}] overlap "
                f"tensor {owner.name!r} at [{owner.begin - data_start}, "
                f"{owner.end - data_start}]",
                spec.name,
            )
        if spec.begin > covered:
            _fail(
                path,
                "gap",
                f"data bytes [{covered - data_start}, {spec.begin - data_start}] before "
                "this tensor belong to no tensor",
                spec.name,
            )
        covered, owner = spec.end, spec
    if covered != file_size:
        _fail(
            path,
            "gap",
            f"data bytes [{covered - data_start}, {file_size - data_start}] at the end of "
            "the file belong to no tensor",
        )


def _pread_exact(fd: int, size: int, offset: int, path: str) -> bytes:
    parts: list[bytes] = []
    done = 0
    while done < size:
        chunk = os.pread(fd, size - done, offset + done)
        if not chunk:
            # Blobs are immutable, so this is a file that shrank under us or a
            # size the caller got wrong: either way the header is not there.
            _fail(
                path,
                "header_beyond_file",
                f"file ended at byte {offset + done} while reading a header of {size} bytes",
            )
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; a header naming a tensor
    # twice is ambiguous about which bytes it means, so it is refused.
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _refuse_constant(token: str) -> NoReturn:
    raise ValueError(f"{token} is not JSON")


def _is_count(value: object) -> bool:
    # bool is an int subclass; JSON true is not a size.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json_type(value: object) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
    }
    return names.get(type(value), "a number")


def _short(value: object, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(path: str, reason: Reason, problem: str, tensor: str | None = None) -> NoReturn:
    where = f"safetensors header of {path or '<bytes>'}"
    if tensor is not None:
        where += f", tensor {tensor!r}"
    raise HeaderInvalid(f"{where}: {problem}", path=path, tensor=tensor, reason=reason)
