"""What a load is judged by: bitwise equality with the original shards, as one digest or a list.

The demo's workers and the load scenarios in ``loadtest/`` report a digest of
what they loaded; the parent compares it with the digest of
``safetensors.torch.load_file`` of the original shards. torch is imported
inside the functions, so that importing the module does not need it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """One BLAKE3 over names, dtypes, shapes and raw bytes: equal only for bitwise-equal loads."""
    from weightcache.hashing import Hasher

    h = Hasher()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            # Raw bytes, whatever the dtype (numpy has no bfloat16); NaNs compare as bytes too.
            h.update(raw_bytes(t).numpy().data)
    return h.hexdigest()


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` as a flat uint8 tensor (no copy when it is contiguous)."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8)


def bitwise_differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    """Every way ``got`` differs from ``want``, one line each; empty when they are bitwise equal."""
    import torch

    problems: list[str] = []
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        problems.append(f"tensor names differ (missing {missing[:3]}, extra {extra[:3]})")
    for name in sorted(set(got) & set(want)):
        g, w = got[name], want[name]
        if g.dtype != w.dtype or g.shape != w.shape:
            problems.append(f"{name}: {g.dtype}{tuple(g.shape)} != {w.dtype}{tuple(w.shape)}")
        elif w.numel() and not torch.equal(raw_bytes(g), raw_bytes(w)):
            problems.append(f"{name}: bytes differ")
    return problems
