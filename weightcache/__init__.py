"""weightcache: verified, node-local model weights and a fast safetensors loader.

Importing this package is cheap: ``load``, ``iter_load`` and ``open`` import the loader on
first call, the loader imports the embedded pull machinery only when no daemon
answers, and nothing here imports the aiohttp server or uvloop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from weightcache.errors import WeightcacheError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from contextlib import AbstractContextManager
    from pathlib import Path

    import torch

    from weightcache.client.report import LoadReport

__all__ = ["WeightcacheError", "iter_load", "load", "load_with_report", "open", "snapshot"]
__version__ = "0.1.0"


def load(ref: str, device: Any = "cpu", **kwargs: Any) -> dict[str, torch.Tensor]:
    """Make ``ref`` local (verified) and return its safetensors tensors on ``device``.

    See :func:`weightcache.client.loader.load` for every option.
    """
    from weightcache.client import loader

    tensors: dict[str, torch.Tensor] = loader.load(ref, device, **kwargs)
    return tensors


def iter_load(ref: str, device: Any = "cpu", **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` as each tensor of ``ref`` lands on ``device``, in file order.

    For engines whose ``load_weights`` takes an iterator; the revision is kept
    from eviction until the iterator is exhausted or closed. See
    :func:`weightcache.client.loader.iter_load`.
    """
    from weightcache.client import loader

    tensors: Iterator[tuple[str, torch.Tensor]] = loader.iter_load(ref, device, **kwargs)
    return tensors


def load_with_report(
    ref: str, device: Any = "cpu", **kwargs: Any
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Like :func:`load`, and also return the phase timings and byte counts."""
    from weightcache.client import loader

    result: tuple[dict[str, torch.Tensor], LoadReport] = loader.load_with_report(
        ref, device, **kwargs
    )
    return result


def open(ref: str, **kwargs: Any) -> Path:
    """Make ``ref`` local and return its snapshot directory (every file, not only tensors)."""
    from weightcache.client import loader

    snapshot: Path = loader.open_snapshot(ref, **kwargs)
    return snapshot


def snapshot(ref: str, **kwargs: Any) -> AbstractContextManager[Path]:
    """``with weightcache.snapshot(ref) as path:`` the snapshot directory, kept from
    eviction until the block ends (:func:`open` returns it unprotected)."""
    from weightcache.client import loader

    held: AbstractContextManager[Path] = loader.snapshot(ref, **kwargs)
    return held
