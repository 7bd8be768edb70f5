"""``weightcache.load`` and ``iter_load``: a ref in, verified tensors on a device out.

The loader asks the node's daemon to make the ref local (over its Unix socket,
or ``WEIGHTCACHE_URL``; :mod:`weightcache.client.daemon`). When no daemon
answers it logs one ``load.fallback`` line and does the same work in this
process: the embedded mode of :mod:`weightcache.node`, imported only then.
Either way it then opens every ``*.safetensors`` file of the snapshot, checks
every header (our own validated parser) before any tensor is read, and reads
the selected tensors file by file, in file order, through one of the CPU sinks
of :mod:`weightcache.client.cpu`: copy-on-write views of a memory map
(``mmap=True``, the default) or private memory read by the reader pool
(``mmap=False``). Other files (config, tokenizer) are pulled but not loaded;
:func:`open_snapshot` returns the directory holding them.

A load holds a lease on the revision (so the daemon does not evict its blobs)
until every tensor is mapped or read; then the lease is released. The mappings
stay valid even if the files are evicted later: an unlinked file lives on while
it is mapped. :func:`load` and :func:`iter_load` are one generator
(:func:`_load`); ``load`` collects it into a dict.

Every load fills a :class:`~weightcache.client.report.LoadReport` whose phases
(import, resolve, fetch, read, h2d, cast) add up to its total, and logs it as
one ``load.done`` line (``load.closed`` when an ``iter_load`` is closed early).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightcache.client.daemon import DaemonClient, Ensured
from weightcache.client.report import LoadReport, PhaseClock
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

    from weightcache.client.cpu import SafetensorsFile
    from weightcache.client.readers import ReaderPool

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
    else:
        # Nothing configured and no socket at the default path: the same one line, so
        # a worker that was meant to find a daemon says where it looked.
        log.warning("load.fallback reason=no_daemon daemon=%s mode=embedded", cfg.socket_path)
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
    mmap: bool = True,
    config: Config | None = None,
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """:func:`load`, also returning the :class:`LoadReport` of phases and bytes."""
    report = LoadReport()
    clock = PhaseClock(report)
    dev, selector, cfg = _prepare(device, tensors, config, clock)
    out = dict(_load(ref, dev, selector, cfg, dtype, mmap, clock))
    return out, report


def load(
    ref: str,
    device: Any = "cpu",
    *,
    dtype: torch.dtype | None = None,
    tensors: str | Any | Callable[[str], bool] | None = None,
    mmap: bool = True,
    config: Config | None = None,
) -> dict[str, torch.Tensor]:
    """Return the tensors of every safetensors file of ``ref`` on ``device``.

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a ``torch.device``.
    ``dtype``: cast floating-point tensors after loading (integer, bool and
    complex tensors keep their exact values). ``tensors``: a subset: exact
    names, one glob pattern, or a predicate on the name; only the selected
    tensors' bytes are read. An exact name no file holds, or a glob that
    matches no tensor, raises :class:`~weightcache.errors.TensorNotFound`
    listing names the model does hold; ``tensors=[]`` asks for no tensors (the
    ref is made local and every header checked). ``config``: defaults to
    :func:`weightcache.config.load_config` (``WEIGHTCACHE_*`` variables).

    ``mmap`` (CPU; the name follows ``torch.load``): ``True`` maps the cached,
    read-only files copy-on-write, so no copy is made until a tensor is written
    to and pages arrive when first touched; ``False`` reads the selected
    tensors in parallel into private memory (one buffer per file, every tensor
    a view of it). On CUDA it makes no difference.
    """
    out, _ = load_with_report(ref, device, dtype=dtype, tensors=tensors, mmap=mmap, config=config)
    return out


def iter_load(
    ref: str,
    device: Any = "cpu",
    *,
    dtype: torch.dtype | None = None,
    tensors: str | Any | Callable[[str], bool] | None = None,
    mmap: bool = True,
    config: Config | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for the tensors of ``ref``, in file order, as each lands.

    The form ``load_weights(weights)`` of serving engines consumes; the options
    are :func:`load`'s. The arguments are checked here; the ref is made local
    when the first tensor is asked for, and the revision is protected from
    eviction (a daemon lease, or this process's use of it) until the iterator
    is exhausted or closed (``close()``, or dropped). With ``mmap=False`` the
    reads of the next file start while this one's tensors are handed out, so at
    most two files' buffers are held beyond what the caller keeps.
    """
    report = LoadReport()
    clock = PhaseClock(report)
    dev, selector, cfg = _prepare(device, tensors, config, clock)
    return _load(ref, dev, selector, cfg, dtype, mmap, clock)


def _prepare(
    device: Any,
    tensors: str | Any | Callable[[str], bool] | None,
    config: Config | None,
    clock: PhaseClock,
) -> tuple[torch.device, Selector, Config]:
    """Check the arguments; the torch import is charged to its own phase."""
    if "torch" not in sys.modules:
        import torch  # noqa: F401  (~1 s the first time: a phase of its own)

        clock.charge("import")
    dev = _resolve_device(device)
    try:
        selector: Selector = make_selector(tensors)
    except TypeError as exc:
        raise RequestInvalid(f"invalid tensors= selection: {exc}") from exc
    cfg = config if config is not None else load_config()
    clock.charge("resolve")
    return dev, selector, cfg


def _load(
    ref: str,
    dev: torch.device,
    selector: Selector,
    cfg: Config,
    dtype: torch.dtype | None,
    mmap: bool,
    clock: PhaseClock,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Ensure, read, release: one load, as a generator of its tensors."""
    report = clock.report
    report.device = str(dev)
    clock.charge("consumer")  # between the call and the first tensor asked for
    ensured = _ensure(ref, cfg)
    # Wall time as this worker saw it: the round trip to the daemon and any wait for
    # a shared pull belong to the fetch phase, so the phases add up to the total.
    ensure_s = clock.charge("fetch")
    resolve_s = min(max(ensured.resolve_seconds, 0.0), ensure_s)
    report.fetch_s -= resolve_s
    report.resolve_s += resolve_s
    report.ref = ensured.ref
    report.revision = ensured.revision
    report.mode = ensured.mode
    report.cache_hit = ensured.cache_hit
    report.origin_bytes = ensured.origin_bytes
    report.peer_bytes = ensured.peer_bytes
    report.source = ensured.source
    report.reused_bytes = ensured.reused_bytes
    report.coalesced_bytes = ensured.coalesced_bytes
    report.resumed_bytes = ensured.resumed_bytes
    report.retries = ensured.retries
    outcome = "failed"
    try:
        yield from _tensors(ensured, selector, dev, dtype, clock, mmap=mmap)
        outcome = "done"
    except GeneratorExit:
        outcome = "closed"
        raise
    finally:
        clock.charge("read")
        # The tensors map the files or were read whole: the blobs may be evicted
        # from here on (an unlinked file lives on while it is mapped).
        _release(ensured, cfg)
        clock.finish("fetch")
        if outcome == "done":
            log.info(report.line())
        elif outcome == "closed":
            # iter_load's caller stopped early: say so, with what it got.
            log.info(report.line().replace("load.done", "load.closed", 1))


def _read(
    ensured: Ensured,
    selector: Selector,
    dev: torch.device,
    dtype: torch.dtype | None,
    report: LoadReport,
    *,
    mmap: bool = True,
    pool: ReaderPool | None = None,
) -> dict[str, torch.Tensor]:
    """Every selected tensor of an ensured revision (no lease handling): the loader's
    read path, which ``loadtest/cpu_bench.py`` times without the cache around it."""
    clock = PhaseClock(report)
    return dict(_tensors(ensured, selector, dev, dtype, clock, mmap=mmap, pool=pool))


def _tensors(
    ensured: Ensured,
    selector: Selector,
    dev: torch.device,
    dtype: torch.dtype | None,
    clock: PhaseClock,
    *,
    mmap: bool,
    pool: ReaderPool | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The selected tensors of every safetensors file, file by file, in file order.

    Every header is read and checked (duplicate names across files, exact names
    that no file holds, a glob that matches none) before the first tensor is
    read or yielded. Private reads go through ``pool`` (default: the process's
    shared pool).
    """
    import torch

    from weightcache.client.cpu import PrivateRead, SafetensorsFile
    from weightcache.client.readers import shared_pool

    report = clock.report
    # Until CUDA has a sink of its own, a CUDA load maps and copies: mmap=False
    # would only add a host copy.
    private = not mmap and dev.type == "cpu"
    report.sink = "read" if private else "mmap"
    opened: list[tuple[str, Path, SafetensorsFile]] = []
    started: list[PrivateRead] = []
    try:
        seen: dict[str, str] = {}
        for f in ensured.files:
            if not f.path.endswith(SAFETENSORS_SUFFIX):
                continue
            try:
                sf = SafetensorsFile.open(f.local_path)
            except OSError as exc:
                raise _read_error(exc, f.path, f.local_path, ensured) from exc
            opened.append((f.path, f.local_path, sf))
            for name in sf.names:
                if name in seen:
                    raise HeaderInvalid(
                        f"tensor {name!r} appears in both {seen[name]} and {f.path}",
                        tensor=name,
                        path=f.path,
                    )
                seen[name] = f.path
        try:
            check_all_found(selector, seen.keys(), where=ensured.ref)
        except ValueError as exc:
            raise TensorNotFound(str(exc), ref=ensured.ref) from exc
        report.files = len(opened)

        if dev.type == "cuda":
            from weightcache.client.cuda import cuda_sink_available

            if cuda_sink_available(dev):
                # The pinned staging ring: reads and host-to-device copies overlap.
                yield from _cuda_tensors(opened, selector, dev, dtype, clock, pool)
                return

        reader = (pool or shared_pool()) if private else None
        ahead: PrivateRead | None = None
        for i, (path, local, sf) in enumerate(opened):
            source: Iterator[tuple[str, torch.Tensor]]
            if reader is not None:
                read = ahead if ahead is not None else PrivateRead(sf, selector, reader)
                if read is not ahead:
                    started.append(read)
                ahead = None
                if i + 1 < len(opened):
                    # Keep the pool busy while this file's tensors are handed out.
                    ahead = PrivateRead(opened[i + 1][2], selector, reader)
                    started.append(ahead)
                report.bytes_read += read.plan.nbytes
                source = read.tensors()
            else:
                try:
                    mapped, nbytes = sf.map(selector)
                except OSError as exc:
                    raise _read_error(exc, path, local, ensured) from exc
                # The mapping holds its own reference to the file.
                sf.close()
                report.bytes_read += nbytes
                source = iter(mapped.items())
                del mapped
            for name, tensor in source:
                clock.charge("read")
                if dev.type != "cpu":
                    tensor = tensor.to(dev, non_blocking=False)
                    clock.charge("h2d")
                # dtype= casts floating-point tensors only: integer and bool tensors
                # (token ids, masks, quantized weights) keep their exact values.
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                    clock.charge("cast")
                report.tensors += 1
                try:
                    yield name, tensor
                finally:
                    # The caller's time, up to asking for the next tensor or closing.
                    clock.charge("consumer")
                del tensor
            # Let the file's buffer go with its last tensor (a dtype= cast drops them).
            del source
            if reader is not None:
                # Every read of this file is done; none can still use the descriptor.
                started.pop(0).cancel()
                sf.close()
                del read
        if dev.type == "cuda":
            clock.charge("read")
            torch.cuda.synchronize(dev)
            clock.charge("h2d")
    finally:
        # Reads still running write into buffers and read descriptors this frame
        # owns: stop them, and wait for them, before the descriptors are closed.
        for read in started:
            read.cancel()
        for _, _, sf in opened:
            sf.close()


def _cuda_tensors(
    opened: list[tuple[str, Path, SafetensorsFile]],
    selector: Selector,
    dev: torch.device,
    dtype: torch.dtype | None,
    clock: PhaseClock,
    pool: ReaderPool | None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """CUDA loads through the process's pinned staging ring (``client/cuda.py``): one
    device allocation per file, tensors yielded as their bytes land. The caller
    closes the files, after this generator is closed (no read or copy runs then)."""
    from weightcache.client.cuda import load_cuda
    from weightcache.client.plan import plan_file
    from weightcache.client.ring import TransferStats

    report = clock.report
    report.sink = "cuda"
    plans = [plan_file(sf.path, sf.header, selector) for _, _, sf in opened]
    report.bytes_read += sum(p.nbytes for p in plans)
    stats = TransferStats()
    waited = 0.0
    tensors = load_cuda(plans, [sf.fd for _, _, sf in opened], dev, pool=pool, stats=stats)
    try:
        for name, tensor in tensors:
            waited += clock.charge("h2d")  # waiting on the ring: reads and copies
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)  # cast on the device
                clock.charge("cast")
            report.tensors += 1
            try:
                yield name, tensor
            finally:
                clock.charge("consumer")
            del tensor
    finally:
        tensors.close()
        # The wait charged to h2d was reads and copies running at once: split it.
        report.h2d_s -= waited
        report.read_s += stats.read_s
        report.h2d_s += stats.copy_s
        overlap = stats.read_s + stats.copy_s - waited
        if overlap >= 0:
            report.overlap_s += overlap
        else:
            report.read_s -= overlap


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
