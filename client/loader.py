"""``weightcache.load``: a ref in, verified tensors on a device out.

The loader asks for the ref to be made local (today: in this process, the
embedded mode of :mod:`weightcache.node`, imported only here and only when
used), then reads every ``*.safetensors`` file of the snapshot through our own
validated header parser and a memory map. Other files (config, tokenizer) are
pulled but not loaded; :func:`open_snapshot` returns the directory holding them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightcache.client.report import LoadReport
from weightcache.client.selection import Selector, check_all_found, make_selector
from weightcache.errors import DeviceUnavailable, HeaderInvalid, RequestInvalid, TensorNotFound

if TYPE_CHECKING:
    import torch

    from weightcache.config import Config
    from weightcache.node import Ensured

log = logging.getLogger("weightcache.load")

SAFETENSORS_SUFFIX = ".safetensors"


def _resolve_device(device: Any) -> torch.device:
    import torch

    try:
        dev = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceUnavailable(f"not a device: {device!r} ({exc})", device=repr(device)) from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"device {str(dev)!r} requested but CUDA is not available in this process "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})",
                device=str(dev),
                hint="use device='cpu', or run on a node with a GPU and a CUDA build of torch",
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"device {str(dev)!r} requested but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible",
                device=str(dev),
            )
    elif dev.type != "cpu":
        raise DeviceUnavailable(
            f"device type {dev.type!r} is not supported; use 'cpu' or 'cuda[:N]'",
            device=str(dev),
        )
    return dev


def _ensure(ref: str, config: Config | None) -> Ensured:
    from weightcache.node import ensure_blocking

    return ensure_blocking(ref, config)


def load_with_report(
    ref: str,
    device: Any = "cpu",
    *,
    dtype: torch.dtype | None = None,
    tensors: str | Any | Callable[[str], bool] | None = None,
    config: Config | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """:func:`load`, also returning the :class:`LoadReport` of phases and bytes."""
    import torch

    from weightcache.client.cpu import read_file

    started = time.perf_counter()
    dev = _resolve_device(device)
    try:
        selector: Selector = make_selector(tensors)
    except TypeError as exc:
        raise RequestInvalid(f"invalid tensors= selection: {exc}") from exc

    ensured = _ensure(ref, config)
    report = LoadReport(
        ref=ensured.ref,
        revision=ensured.revision,
        device=str(dev),
        cache_hit=ensured.cache_hit,
        origin_bytes=ensured.origin_bytes,
        resolve_s=ensured.resolve_seconds,
        fetch_s=max(0.0, ensured.seconds - ensured.resolve_seconds),
    )

    t_read = time.perf_counter()
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, str] = {}
    for f in ensured.files:
        if not f.path.endswith(SAFETENSORS_SUFFIX):
            continue
        tensors_of_file, nbytes, names = read_file(f.local_path, select=selector)
        for name in names:
            if name in seen:
                raise HeaderInvalid(
                    f"tensor {name!r} appears in both {seen[name]} and {f.path}",
                    tensor=name,
                    path=f.path,
                )
            seen[name] = f.path
        out.update(tensors_of_file)
        report.files += 1
        report.bytes_read += nbytes
    try:
        check_all_found(selector, seen.keys(), where=ensured.ref)
    except ValueError as exc:
        raise TensorNotFound(str(exc), ref=ensured.ref) from exc
    report.read_s = time.perf_counter() - t_read

    if dev.type != "cpu" or dtype is not None:
        t_h2d = time.perf_counter()
        for name, t in out.items():
            moved = t.to(dev, non_blocking=False) if dev.type != "cpu" else t
            # dtype= casts floating-point tensors only: integer and bool tensors
            # (token ids, masks, quantized weights) keep their exact values.
            if dtype is not None and moved.is_floating_point():
                moved = moved.to(dtype)
            out[name] = moved
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        report.h2d_s = time.perf_counter() - t_h2d

    report.tensors = len(out)
    report.total_s = time.perf_counter() - started
    log.info(report.line())
    return out, report


def load(
    ref: str,
    device: Any = "cpu",
    *,
    dtype: torch.dtype | None = None,
    tensors: str | Any | Callable[[str], bool] | None = None,
    config: Config | None = None,
) -> dict[str, torch.Tensor]:
    """Return the tensors of every safetensors file of ``ref`` on ``device``.

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
    ``dtype``: cast floating-point tensors after loading. ``tensors``: a
    subset: exact names, one glob pattern, or a predicate on the name; only
    the selected tensors' bytes are read. ``config``: defaults to
    :func:`weightcache.config.load_config` (``WEIGHTCACHE_*`` variables).
    On CPU the tensors map the cached, read-only files copy-on-write: no copy is
    made until a tensor is written to.
    """
    out, _ = load_with_report(ref, device, dtype=dtype, tensors=tensors, config=config)
    return out


def open_snapshot(ref: str, *, config: Config | None = None) -> Path:
    """Make ``ref`` local and return its snapshot directory (every file of the revision)."""
    return _ensure(ref, config).snapshot
