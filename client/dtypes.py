"""safetensors dtype names as torch dtypes.

Kept apart from :mod:`weightcache.client.header` so that header parsing stays
importable without torch: torch is imported on the first lookup, not at import.
The names are those of :data:`weightcache.client.header.DTYPE_BITS`; a name
whose torch dtype this torch build lacks (the unsigned types arrived in 2.3,
``float8_e8m0fnu`` and ``float4_e2m1fn_x2`` later still) fails at lookup with
a clear error instead of at import.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from weightcache.errors import HeaderInvalid

if TYPE_CHECKING:
    import torch

__all__ = ["torch_dtype", "torch_shape"]

# safetensors name -> torch attribute name. Matches safetensors.torch (_TYPES
# plus the F8_E8M0 and packed F4 types its Rust side maps).
_TORCH_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "I64": "int64",
    "U64": "uint64",
    "F64": "float64",
    "C64": "complex64",
}

# safetensors counts F4 elements; torch's float4_e2m1fn_x2 packs two of them
# into one element along the last dimension.
_PACKED = {"F4": 2}


@functools.cache
def _table() -> dict[str, torch.dtype]:
    import torch

    table: dict[str, torch.dtype] = {}
    for name, attr in _TORCH_NAMES.items():
        dtype = getattr(torch, attr, None)
        if isinstance(dtype, torch.dtype):
            table[name] = dtype
    return table


def torch_dtype(name: str, *, path: str = "", tensor: str | None = None) -> torch.dtype:
    """The torch dtype for a safetensors dtype name (one that parsed)."""
    try:
        return _table()[name]
    except KeyError:
        import torch

        attr = _TORCH_NAMES.get(name, "?")
        raise HeaderInvalid(
            f"safetensors header of {path or '<bytes>'}, tensor {tensor!r}: dtype {name} "
            f"needs torch.{attr}, which torch {torch.__version__} does not have",
            hint="upgrade torch",
            path=path,
            tensor=tensor,
            reason="dtype_unsupported",
        ) from None


def torch_shape(
    name: str, shape: tuple[int, ...], *, path: str = "", tensor: str | None = None
) -> tuple[int, ...]:
    """The torch shape of a tensor whose safetensors shape is ``shape``.

    The same except for packed dtypes, whose last dimension counts packed
    elements; like safetensors, a last dimension that does not divide evenly
    is refused rather than silently reinterpreted.
    """
    per = _PACKED.get(name)
    if per is None:
        return shape
    if not shape or shape[-1] % per:
        raise HeaderInvalid(
            f"safetensors header of {path or '<bytes>'}, tensor {tensor!r}: {name} shape "
            f"{list(shape)} needs a last dimension divisible by {per} to be a torch tensor",
            path=path,
            tensor=tensor,
            reason="shape_unsupported",
        )
    return (*shape[:-1], shape[-1] // per)
