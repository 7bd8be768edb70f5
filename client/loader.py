"""``weightcache.load``: a ref in, verified tensors on a device out.

The loader asks the node's daemon to make the ref local (over its Unix socket,
or ``WEIGHTCACHE_URL``; :mod:`weightcache.client.daemon`). When no daemon
answers it logs one ``load.fallback`` line and does the same work in this
process: the embedded mode of :mod:`weightcache.node`, imported only then.
Either way it then reads every ``*.safetensors`` file of the snapshot through
our own validated header parser and a memory map. Other files (config,
tokenizer) are pulled but not loaded; :func:`open_snapshot` returns the
directory holding them.

A daemon load holds a lease on the revision (so the daemon does not evict its
blobs) until the tensors are mapped; then the lease is released. The mappings
stay valid even if the files are evicted later: an unlinked file lives on while
it is mapped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightcache.client.daemon import DaemonClient, Ensured
from weightcache.client.report import LoadReport
from weightcache.client.selection import Selector, check_all_found, make_selector
from weightcache.config import Config, load_config
from weightcache.errors import (
    CacheCorrupt,
    CacheIOError,
    DaemonUnavailable,
    DeviceUnavailable,
    HeaderInvalid,
    Overloaded,
    RequestInvalid,
    ShuttingDown,
    TensorNotFound,
    WeightcacheError,
)
from weightcache.retry import Backoff, retry_sync

if TYPE_CHECKING:
    import torch

log = logging.getLogger("weightcache.load")

#: how often a load retries a daemon that answers `overloaded`, honouring Retry-After
OVERLOADED_RETRIES = 5
OVERLOADED_MAX_WAIT_S = 30.0

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


def _ensure(ref: str, cfg: Config, *, lease: bool = True) -> Ensured:
    """Make ``ref`` local: through the daemon when one answers, else in this process."""
    client = DaemonClient.from_config(cfg)
    if client is not None:
        try:
            # The daemon's queue of distinct pulls is full: it says when to come back.
            def ask() -> Ensured:
                if not lease:
                    return Ensured.from_json(client.ensure(ref, lease=False), mode="daemon")
                # The lease is bound to this connection: a worker killed while it
                # holds it frees it, even where the daemon cannot see its pid.
                doc, hold = client.ensure_held(ref)
                ensured = Ensured.from_json(doc, mode="daemon")
                ensured.hold = hold
                return ensured

            return retry_sync(
                ask,
                Backoff(
                    OVERLOADED_RETRIES,
                    0.1,
                    OVERLOADED_MAX_WAIT_S,
                    delay_of=lambda e: max(0.1, getattr(e, "retry_after_s", 1.0)),
                ),
                on=Overloaded,
                log=log,
                what="load.overloaded",
            )
        except (DaemonUnavailable, ShuttingDown) as exc:
            # A daemon that is stopping takes no new work: a rolling restart must
            # not fail the workers that start meanwhile.
            reason = exc.facts.get("reason") or exc.code
            log.warning("load.fallback reason=%s daemon=%s mode=embedded", reason, client.address)
    from weightcache.embedded import ensure_blocking

    return ensure_blocking(ref, cfg, hold=lease)


def _release(ensured: Ensured, cfg: Config) -> None:
    """End the daemon's lease; it expires anyway, so a failure is only logged."""
    if ensured.hold is not None:
        ensured.release()
        return
    lease_id = ensured.lease_id
    if ensured.mode != "daemon" or lease_id is None:
        return
    client = DaemonClient.from_config(cfg)
    if client is None:
        return
    try:
        client.release(lease_id)
    except WeightcacheError as exc:
        log.info("lease.release_failed lease=%s code=%s", lease_id, exc.code)


def load_with_report(
    ref: str,
    device: Any = "cpu",
    *,
    dtype: torch.dtype | None = None,
    tensors: str | Any | Callable[[str], bool] | None = None,
    config: Config | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """:func:`load`, also returning the :class:`LoadReport` of phases and bytes."""
    started = time.perf_counter()
    dev = _resolve_device(device)
    try:
        selector: Selector = make_selector(tensors)
    except TypeError as exc:
        raise RequestInvalid(f"invalid tensors= selection: {exc}") from exc
    cfg = config if config is not None else load_config()

    t_ensure = time.perf_counter()
    ensured = _ensure(ref, cfg)
    # Wall time as this worker saw it: the round trip to the daemon and any wait for
    # a shared pull belong to the fetch phase, so the phases add up to the total.
    ensure_s = time.perf_counter() - t_ensure
    report = LoadReport(
        ref=ensured.ref,
        revision=ensured.revision,
        device=str(dev),
        mode=ensured.mode,
        cache_hit=ensured.cache_hit,
        origin_bytes=ensured.origin_bytes,
        reused_bytes=ensured.reused_bytes,
        coalesced_bytes=ensured.coalesced_bytes,
        resumed_bytes=ensured.resumed_bytes,
        retries=ensured.retries,
        resolve_s=ensured.resolve_seconds,
        fetch_s=max(0.0, ensure_s - ensured.resolve_seconds),
    )
    try:
        out = _read(ensured, selector, dev, dtype, report)
    finally:
        # The tensors map the files now: the blobs may be evicted from here on.
        _release(ensured, cfg)
    report.tensors = len(out)
    report.total_s = time.perf_counter() - started
    log.info(report.line())
    return out, report


def _read(
    ensured: Ensured,
    selector: Selector,
    dev: torch.device,
    dtype: torch.dtype | None,
    report: LoadReport,
) -> dict[str, torch.Tensor]:
    import torch

    from weightcache.client.cpu import read_file

    t_read = time.perf_counter()
    out: dict[str, torch.Tensor] = {}
    seen: dict[str, str] = {}
    for f in ensured.files:
        if not f.path.endswith(SAFETENSORS_SUFFIX):
            continue
        try:
            tensors_of_file, nbytes, names = read_file(f.local_path, select=selector)
        except OSError as exc:
            raise _read_error(exc, f.path, f.local_path, ensured) from exc
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
    return out


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


def _read_error(exc: OSError, path: str, local: Path, ensured: Ensured) -> WeightcacheError:
    """A cached file that cannot be read, as the cache's error rather than an OSError."""
    if isinstance(exc, FileNotFoundError):
        return CacheCorrupt(
            f"{path} of revision {ensured.revision[:16]} is missing from the cache "
            f"({local}): the snapshot lost a file after it was made local",
            hint="run `weightcache verify --repair`, then load again; if the cache is "
            "mounted at another path in this container than in the daemon's, fix the mount",
            path=str(local),
            revision=ensured.revision,
        )
    return CacheIOError(
        f"cannot read {path} from the cache ({local}): {exc.strerror or exc}",
        hint="check the cache's disk, mount and permissions for this worker's user",
        path=str(local),
        errno=exc.errno,
    )


def open_snapshot(ref: str, *, config: Config | None = None) -> Path:
    """Make ``ref`` local and return its snapshot directory (every file of the revision).

    **Unprotected**: no lease is taken, so the revision may be evicted at any
    time after this returns (a file already open stays readable). Use
    :func:`snapshot` to keep it on disk for a block of code.
    """
    cfg = config if config is not None else load_config()
    snap: Path = _ensure(ref, cfg, lease=False).snapshot
    return snap


@contextlib.contextmanager
def snapshot(ref: str, *, config: Config | None = None) -> Iterator[Path]:
    """``with weightcache.snapshot(ref) as path:`` the snapshot directory, kept on disk
    until the block ends: a daemon lease bound to this process's connection (it
    ends if the process dies), or in embedded mode this process's use of the
    revision, which no eviction on the node takes."""
    cfg = config if config is not None else load_config()
    ensured = _ensure(ref, cfg, lease=True)
    try:
        yield ensured.snapshot
    finally:
        _release(ensured, cfg)
