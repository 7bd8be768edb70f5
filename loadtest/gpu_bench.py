"""GPU load benchmark: weightcache's CUDA sink against the hardware ceilings and peer loaders.

    .venv/bin/python loadtest/gpu_bench.py --report     # 8 GiB model on one GPU: ~3-6 min
    .venv/bin/python loadtest/gpu_bench.py --size 2GiB --no-cold
    .venv/bin/python loadtest/gpu_bench.py --dry-run    # no GPU needed: the machinery, small
    .venv/bin/python -m loadtest.gpu_bench --help

One run generates a Llama-like bf16 model (``weightcache.demo.synthetic``,
``--size`` tensor bytes in ``--shards`` files, fsynced) and measures, in one
process, on one CUDA device:

* the **ceilings**: a pinned host-to-device copy of 1 GiB (``Tensor.copy_``
  from ``pin_memory=True`` memory, the PCIe/NVLink-C2C limit any loader
  meets), and a page-cache read of every shard's data area with all cores
  (the reader pool, ``default_threads()`` threads, 16 MiB ``preadv`` calls
  into one host buffer per shard);
* **weightcache's sink** (``weightcache.client.cuda.load_cuda``: read plans,
  reader pool, pinned ring, one copy stream) for each ring shape of
  ``--rings`` (``4x64`` is 4 buffers of 64 MiB, the default), each with a
  fresh ring, so that its first call pays the pinned allocation a worker's
  first load pays; and **weightcache's loader** (``loader._read`` on the
  shards as they lie: headers checked, selection, whatever CUDA path the
  loader takes; no daemon, no cache lookup);
* the **peers**, each only if it imports: ``safetensors.torch.load_file(device=)``,
  fastsafetensors (no GDS), Run:ai Model Streamer (CPU buffers, then
  ``.to(device)``), InstantTensor, tensorizer (its own format, serialised
  first, untimed). A peer that is not installed is reported *missing*, one
  that fails *failed* with its error: never silently left out. The run needs
  no network: it installs nothing.

Every call's result is checked bitwise on the device (``torch.equal`` of the
raw bytes of every tensor) against a reference read independently (the
shards memory-mapped, each tensor copied with ``.to(device)``), kept on the
device for the run (so the GPU needs room for about twice the model). Warm:
each row's first call, then ``--repeat`` rounds of every row, interleaved
(a drift of the machine hits each alike), the median reported. Cold: each row
once after the shards were dropped from the page cache
(``/proc/sys/vm/drop_caches`` where this process may write it, i.e. as root,
else ``posix_fadvise(DONTNEED)``; the resident fraction left, from
``mincore``, is reported), unless ``--no-cold``. ``--budget-s`` (default
480 s) stops early, marking what was not measured, so one run fits in 9
minutes of device time.

It prints a table; ``--report [PATH]`` writes it with the command, the device
and the machine into ``docs/benchmarks.md`` between ``<!-- gpu:begin -->`` and
``<!-- gpu:end -->``; ``--json PATH`` every measurement. Exit status 1 when a
result was not bitwise equal or there is no CUDA device (``--dry-run`` then
runs the same machinery on CPU with a small model and a stand-in copier:
threads for the stream and its events), 2 for bad arguments.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import importlib.util
import mmap
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if not __package__:
    # Run as a file (python loadtest/gpu_bench.py): import loadtest from this checkout.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

from loadtest.scenario import (
    ROOT,
    add_run_options,
    argument_parser,
    command,
    finish,
    machine,
    markers,
    say,
    scratch,
    versions,
)
from weightcache.client.cuda import CudaCopier, host_copier, load_staged
from weightcache.client.header import read_header, read_header_fd
from weightcache.client.plan import plan_file
from weightcache.client.readers import ReaderPool, ReadJob, shared_pool
from weightcache.client.ring import StagingRing
from weightcache.config import parse_size
from weightcache.demo.synthetic import make_model

REPORT = ROOT / "docs" / "benchmarks.md"
SECTION = "gpu"
BEGIN, END = markers(SECTION)
GiB, MiB = 1 << 30, 1 << 20
PAGE = 4096
READ = 16 << 20
#: peer name -> the module that must import
PEERS = {
    "safetensors": "safetensors.torch",
    "fastsafetensors": "fastsafetensors",
    "runai": "runai_model_streamer",
    "instanttensor": "instanttensor",
    "tensorizer": "tensorizer",
}
#: what the docs section suggests trying next, whatever the numbers
VARIANTS = """\
* `cudaHostRegister` of the page-cache mapping (`torch.cuda.cudart().cudaHostRegister`
  over the shard's mmap) and DMA straight from it: no host copy at all for warm files,
  at the cost of pinning (and faulting in) the whole mapping first;
* more copy streams (one per buffer) and more buffers in flight, for hosts whose
  reads outrun one stream's queue;
* bigger buffers (`--rings 4x256,2x512`), to amortise the per-buffer event wait;
* `O_DIRECT` reads into the pinned buffers for cold files (aligned 4 KiB pieces),
  skipping the page-cache copy when the file is not going to be shared anyway."""

Tensors = dict[str, torch.Tensor]
Opener = Callable[[], contextlib.AbstractContextManager[Tensors]]


@dataclass
class Row:
    name: str
    #: "ceiling", "weightcache" or "peer"
    kind: str
    nbytes: int
    status: str = "ok"
    first_s: float | None = None
    warm_s: list[float] = field(default_factory=list)
    cold_s: float | None = None
    bitwise: bool | None = None
    note: str = ""

    @property
    def warm(self) -> float | None:
        return statistics.median(self.warm_s) if self.warm_s else None


@dataclass
class Bench:
    rows: list[Row]
    device: str
    size: int
    shards: int
    repeat: int
    dry_run: bool
    cold_method: str | None
    cold_resident: float | None
    problems: list[str]
    elapsed_s: float = 0.0


# -- the loaders ------------------------------------------------------------------------------


@contextlib.contextmanager
def opened(paths: Sequence[Path]) -> Iterator[tuple[list[Any], list[int]]]:
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths]
    try:
        plans = [
            plan_file(str(p), read_header_fd(fd, os.fstat(fd).st_size, path=str(p)), None)
            for p, fd in zip(paths, fds, strict=True)
        ]
        yield plans, fds
    finally:
        for fd in fds:
            os.close(fd)


def weightcache_sink(
    paths: Sequence[Path], dev: torch.device, ring: StagingRing[Any, torch.Tensor]
) -> Opener:
    @contextlib.contextmanager
    def load() -> Iterator[Tensors]:
        with opened(paths) as (plans, fds):
            yield dict(load_staged(plans, fds, ring, shared_pool(), device=dev))

    return load


def weightcache_loader(paths: Sequence[Path], dev: torch.device, notes: list[str]) -> Opener:
    from weightcache.client.loader import _read
    from weightcache.client.report import LoadReport
    from weightcache.client.selection import make_selector
    from weightcache.results import Ensured, LocalFile

    @contextlib.contextmanager
    def load() -> Iterator[Tensors]:
        ensured = Ensured(
            ref="gpu-bench",
            revision="0" * 64,
            snapshot=paths[0].parent,
            files=[LocalFile(p.name, p, p.stat().st_size, "") for p in paths],
            cache_hit=True,
        )
        report = LoadReport()
        yield _read(ensured, make_selector(None), dev, None, report)
        sink = getattr(report, "sink", "")
        if sink and sink not in notes:
            notes.append(sink)

    return load


def safetensors_peer(paths: Sequence[Path], dev: torch.device) -> Opener:
    from safetensors.torch import load_file

    @contextlib.contextmanager
    def load() -> Iterator[Tensors]:
        out: Tensors = {}
        for p in paths:
            out.update(load_file(p, device=str(dev)))
        yield out

    return load


def fastsafetensors_peer(paths: Sequence[Path], dev: torch.device) -> Opener:
    fst: Any = importlib.import_module("fastsafetensors")
    names = [str(p) for p in paths]

    @contextlib.contextmanager
    def load() -> Iterator[Tensors]:
        # Its tensors live in buffers freed on close: checked before that.
        if hasattr(fst, "fastsafe_open"):
            with fst.fastsafe_open(filenames=names, nogds=True, device=str(dev)) as f:
                yield {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
            return
        loader = fst.SafeTensorsFileLoader(fst.SingleGroup(), dev, nogds=True)
        try:
            loader.add_filenames({0: names})
            files = loader.copy_files_to_device()
            try:
                yield {k: files.get_tensor(k) for k in files.key_to_rank_lidx}
            finally:
                files.close()
        finally:
            loader.close()

    return load


def runai_peer(paths: Sequence[Path], dev: torch.device) -> Opener:
    streamer_mod: Any = importlib.import_module("runai_model_streamer")

    @contextlib.contextmanager
    def load() -> Iterator[Tensors]:
        out: Tensors = {}
        with streamer_mod.SafetensorsStreamer() as streamer:
            # Its tensors are views of a reused CPU buffer: each is copied to
            # the device (synchronously) before the next is asked for.
            if hasattr(streamer, "stream_files"):
                streamer.stream_files([str(p) for p in paths])
                out = {k: t.to(dev) for k, t in streamer.get_tensors()}
            else:
                for p in paths:
                    streamer.stream_file(str(p))
                    out.update({k: t.to(dev) for k, t in streamer.get_tensors()})
        yield out

    return load


def instanttensor_peer(paths: Sequence[Path], dev: torch.device) -> Opener:
    it: Any = importlib.import_module("instanttensor")
    version = tuple(
        int(x) for x in str(getattr(it, "__version__", "0")).split(".")[:2] if x.isdigit()
    )
    # Before 0.2 its tensors point into a reused buffer and must be cloned.
    clone = version < (0, 2)

    @contextlib.contextmanager
    def load() -> Iterator[Tensors]:
        out: Tensors = {}
        for p in paths:
            with it.safe_open(str(p), framework="pt", device=dev.index or 0) as f:
                for k, t in f.tensors():
                    out[k] = t.clone() if clone else t
        yield out

    return load


def tensorizer_peer(paths: Sequence[Path], dev: torch.device, work: Path) -> Opener:
    tz: Any = importlib.import_module("tensorizer")
    from safetensors.torch import load_file

    target = work / "model.tensors"
    if not target.exists():  # its own format: serialised once, untimed
        serializer = tz.TensorSerializer(str(target))
        state: Tensors = {}
        for p in paths:
            state.update(load_file(p))
        serializer.write_state_dict(state)
        serializer.close()
        del state

    @contextlib.contextmanager
    def load() -> Iterator[Tensors]:
        deserializer = tz.TensorDeserializer(str(target), device=str(dev))
        try:
            yield dict(deserializer.items())
        finally:
            deserializer.close()

    return load


# -- ceilings --------------------------------------------------------------------------------


def h2d_ceiling(dev: torch.device, repeat: int) -> list[float]:
    """Seconds per pinned 1 GiB host-to-device copy: one warm-up, then ``repeat``."""
    src = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(GiB, dtype=torch.uint8, device=dev)
    out = []
    for i in range(repeat + 1):
        torch.cuda.synchronize(dev)
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(dev)
        if i:
            out.append(time.perf_counter() - start)
    del src, dst
    return out


def read_ceiling(paths: Sequence[Path], pool: ReaderPool) -> float:
    """Seconds to read every shard's data area into host buffers with the pool."""
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in paths]
    try:
        jobs = []
        keep = []
        for p, fd in zip(paths, fds, strict=True):
            start = read_header(p).data_start
            length = p.stat().st_size - start
            buf = torch.empty(length, dtype=torch.uint8)
            keep.append(buf)
            view = buf.numpy().data
            for at in range(0, length, READ):
                jobs.append(ReadJob(fd, str(p), start + at, view[at : at + READ]))
        began = time.perf_counter()
        pool.read_all(jobs)
        return time.perf_counter() - began
    finally:
        for fd in fds:
            os.close(fd)


# -- checks and the page cache --------------------------------------------------------------


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def reference(paths: Sequence[Path], dev: torch.device) -> Tensors:
    """Every tensor through another path than any row's: a map, then ``.to(device)``."""
    from safetensors import safe_open

    out: Tensors = {}
    for p in paths:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
                out[k] = f.get_tensor(k).to(dev, copy=True)
    return out


def bitwise(got: Tensors, want: Tensors) -> bool:
    if got.keys() != want.keys():
        return False
    for name, ref in want.items():
        t = got[name]
        if t.dtype != ref.dtype or t.shape != ref.shape or t.device != ref.device:
            return False
        if ref.numel() and not torch.equal(raw(t), raw(ref)):
            return False
    return True


def drop_method() -> str:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        return "fadvise"


def drop(paths: Sequence[Path], method: str) -> None:
    os.sync()
    if method == "drop_caches":
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident(paths: Sequence[Path]) -> float:
    """The fraction of the shards' pages in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pages = present = 0
    for path in paths:
        size = path.stat().st_size
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        try:
            anchor = ctypes.c_char.from_buffer(m)
            try:
                count = (size + PAGE - 1) // PAGE
                vec = (ctypes.c_ubyte * count)()
                if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), size, vec) != 0:
                    return float("nan")
                pages += count
                present += sum(b & 1 for b in vec)
            finally:
                del anchor  # the export must end before the map can close
        finally:
            m.close()
    return present / pages if pages else 0.0


# -- the run --------------------------------------------------------------------------------


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def once(opener: Opener, dev: torch.device, want: Tensors) -> tuple[float, bool]:
    """One timed call (until every tensor is on the device), then its bitwise check."""
    sync(dev)
    start = time.perf_counter()
    with opener() as tensors:
        sync(dev)
        elapsed = time.perf_counter() - start
        ok = bitwise(tensors, want)
        del tensors
    gc.collect()
    return elapsed, ok


def parse_rings(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        count, _, mib = part.strip().partition("x")
        out.append((int(count), int(mib) * MiB))
    return out


def run(args: Any, work: Path) -> Bench:
    began = time.monotonic()
    dev = torch.device("cpu") if args.dry_run else torch.device(args.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    say(f"generating a {args.size / MiB:.0f} MiB bf16 model in {args.shards} shards")
    model = make_model(work / "model", total_bytes=args.size, shards=args.shards, seed=1)
    paths = list(model.shards)
    for path in paths:  # clean pages, so that dropping them from the page cache works
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    nbytes = model.tensor_bytes
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        if free < 2.2 * nbytes:
            raise SystemExit(
                f"{dev} has {free / GiB:.1f} GiB free; the reference and one load need about "
                f"{2.2 * nbytes / GiB:.1f} GiB: use a smaller --size"
            )
    say("reading the reference (mmap, then .to(device))")
    want = reference(paths, dev)
    problems: list[str] = []
    rows: list[Row] = []

    def over_budget() -> bool:
        return time.monotonic() - began > args.budget_s

    # The ceilings.
    h2d = Row("pinned H2D, 1 GiB (ceiling)", "ceiling", GiB)
    if dev.type == "cuda":
        times = h2d_ceiling(dev, args.repeat)
        h2d.first_s, h2d.warm_s = times[0], times
    else:
        h2d.status = "n/a: dry run (no CUDA)"
    rows.append(h2d)
    pool = shared_pool()
    page = Row(f"page-cache read, {pool.threads} threads (ceiling)", "ceiling", nbytes)
    read_ceiling(paths, pool)  # warm the page cache
    page.warm_s = [read_ceiling(paths, pool) for _ in range(3)]
    page.first_s = page.warm_s[0]
    rows.append(page)

    # What is loaded.
    openers: dict[str, Opener] = {}
    loaders: list[Row] = []
    for buffers, buffer_bytes in args.rings:
        name = f"weightcache sink, ring {buffers} x {buffer_bytes // MiB} MiB"
        copier = CudaCopier(dev) if dev.type == "cuda" else host_copier()
        ring: StagingRing[Any, torch.Tensor] = StagingRing(
            copier, buffers=buffers, buffer_bytes=buffer_bytes
        )
        openers[name] = weightcache_sink(paths, dev, ring)
        loaders.append(Row(name, "weightcache", nbytes))
    loader_notes: list[str] = []
    openers["weightcache loader (loader._read)"] = weightcache_loader(paths, dev, loader_notes)
    loaders.append(Row("weightcache loader (loader._read)", "weightcache", nbytes))
    for peer in args.peers:
        row = Row(peer, "peer", nbytes)
        loaders.append(row)
        if importlib.util.find_spec(PEERS[peer].split(".")[0]) is None:
            row.status = "missing (not installed)"
            continue
        if args.dry_run and peer != "safetensors":
            row.status = "installed; not run in a dry run"
            continue
        try:
            if peer == "safetensors":
                row.name = f"safetensors load_file(device='{dev.type}')"
                openers[row.name] = safetensors_peer(paths, dev)
            elif peer == "fastsafetensors":
                openers[row.name] = fastsafetensors_peer(paths, dev)
            elif peer == "runai":
                row.name = "Run:ai Model Streamer (+ .to)"
                openers[row.name] = runai_peer(paths, dev)
            elif peer == "instanttensor":
                openers[row.name] = instanttensor_peer(paths, dev)
            elif peer == "tensorizer":
                row.note = "own format, serialised first (untimed)"
                openers[row.name] = tensorizer_peer(paths, dev, work)
        except Exception as exc:
            row.status = f"failed: {type(exc).__name__}: {exc}"[:160]
    rows.extend(loaders)
    active = [r for r in loaders if r.name in openers and r.status == "ok"]

    def attempt(row: Row, record: Callable[[float], None]) -> None:
        if row.status != "ok":
            return
        if over_budget():
            row.status = "skipped: time budget"
            return
        try:
            seconds, ok = once(openers[row.name], dev, want)
        except Exception as exc:
            row.status = f"failed: {type(exc).__name__}: {exc}"[:160]
            say(f"{row.name}: {row.status}")
            return
        record(seconds)
        row.bitwise = ok if row.bitwise is None else (row.bitwise and ok)
        if not ok:
            problems.append(f"{row.name}: not bitwise equal to the reference")

    say("warm: first calls")
    for row in active:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        attempt(row, lambda s, r=row: setattr(r, "first_s", s))
    say(f"warm: {args.repeat} interleaved rounds")
    for _ in range(args.repeat):
        for row in active:
            attempt(row, row.warm_s.append)

    cold_method: str | None = None
    cold_resident: float | None = None
    if args.cold:
        cold_method = drop_method()
        say(f"cold: one call per row after {cold_method}")
        cold_resident = 0.0
        for row in active:
            if row.status != "ok":
                continue
            drop(paths, cold_method)
            cold_resident = max(cold_resident, resident(paths))
            attempt(row, lambda s, r=row: setattr(r, "cold_s", s))
    for note in loader_notes:
        rows[
            rows.index(next(r for r in rows if r.name.startswith("weightcache loader")))
        ].note = f"the loader's sink: {note}"
    return Bench(
        rows=rows,
        device=describe(dev),
        size=nbytes,
        shards=args.shards,
        repeat=args.repeat,
        dry_run=args.dry_run,
        cold_method=cold_method,
        cold_resident=cold_resident,
        problems=problems,
        elapsed_s=time.monotonic() - began,
    )


def describe(dev: torch.device) -> str:
    if dev.type != "cuda":
        return "CPU (dry run: host memory stands in for the device, threads for the stream)"
    props = torch.cuda.get_device_properties(dev)
    return (
        f"{props.name} ({props.total_memory / GiB:.0f} GiB), CUDA {torch.version.cuda}, "
        f"torch {torch.__version__}"
    )


# -- the report -----------------------------------------------------------------------------


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def gbps(nbytes: int, value: float | None) -> str:
    return "-" if not value else f"{nbytes / value / 1e9:.2f}"


def table(bench: Bench) -> str:
    head = (
        "| row | status | first call | warm (median) | warm GB/s | cold | cold GB/s | bitwise |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"
    )
    lines = [head]
    for r in bench.rows:
        checked = "-" if r.bitwise is None else ("yes" if r.bitwise else "**NO**")
        name = f"{r.name} ({r.note})" if r.note else r.name
        lines.append(
            f"| {name} | {r.status} | {seconds(r.first_s)} | {seconds(r.warm)} | "
            f"{gbps(r.nbytes, r.warm)} | {seconds(r.cold_s)} | {gbps(r.nbytes, r.cold_s)} | "
            f"{checked} |"
        )
    return "\n".join(lines)


def report_section(bench: Bench, cmd: str) -> str:
    cold = (
        f"cold: one call per row after `{bench.cold_method}` (at most "
        f"{bench.cold_resident:.1%} of the model's pages still resident when a row started)"
        if bench.cold_resident is not None
        else "cold rows not measured (`--no-cold`)"
    )
    return f"""{BEGIN}
## GPU loads (`loadtest/gpu_bench.py`)

weightcache's CUDA sink (read plans, reader pool, a ring of pinned buffers, one
copy stream; `weightcache.client.cuda.load_cuda`) against the ceilings of this
device and the peer loaders that were installed, on one generated Llama-like
bf16 model, in one process. Every call checked bitwise on the device against
a reference read another way (mmap, then `.to(device)`). Warm: the first call,
then the median of {bench.repeat} interleaved rounds; {cold}. A peer that is
not installed is listed as missing. See the docstring of `loadtest/gpu_bench.py`.

* command: `{cmd}`
* date: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
* device: {bench.device}
* machine: {machine()}; {
        versions(
            "torch",
            "safetensors",
            "fastsafetensors",
            "runai-model-streamer",
            "instanttensor",
            "tensorizer",
        )
    }
* model: {bench.size / GiB:.2f} GiB of bf16 tensors in {bench.shards} shards; the run took
  {bench.elapsed_s:.0f} s

{table(bench)}

Variants to try next:

{VARIANTS}
{END}
"""


def parse_args(argv: Sequence[str]) -> Any:
    parser = argument_parser("gpu_bench.py", __doc__)
    parser.add_argument("--size", type=parse_size, help="tensor bytes (default 8GiB; 64MiB dry)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5, help="warm rounds (median)")
    parser.add_argument("--device", default="cuda", help="a CUDA device (default: cuda)")
    parser.add_argument(
        "--rings",
        type=parse_rings,
        default=parse_rings("4x64,8x64,4x256"),
        help="ring shapes of the weightcache rows, BUFFERSxMiB, comma-separated",
    )
    parser.add_argument(
        "--peers",
        type=lambda s: [p for p in s.split(",") if p],
        default=list(PEERS),
        help=f"peer loaders to try (default: {','.join(PEERS)})",
    )
    parser.add_argument("--no-cold", dest="cold", action="store_false", help="warm rows only")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop measuring after this")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="no GPU: run the plan/ring machinery on CPU with a stand-in copier, small model",
    )
    add_run_options(parser, report=REPORT)
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 64 * MiB if args.dry_run else 8 * GiB
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown peers {unknown}; choose from {','.join(PEERS)}")
    if args.size < MiB or args.shards < 1 or args.repeat < 1:
        parser.error("--size must be at least 1MiB; --shards and --repeat at least 1")
    if args.dry_run and args.report:
        parser.error("--dry-run measures nothing worth reporting: leave out --report")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            f"gpu_bench: no CUDA device: torch {torch.__version__} (CUDA build: "
            f"{torch.version.cuda or 'no'}) sees none. This benchmark needs one GPU "
            "(an H100 or H200 runs the default 8 GiB in a few minutes); "
            "--dry-run runs the same machinery on CPU with a small model.",
            file=sys.stderr,
        )
        return 1
    shown = [a for a in argv if a != "--report" and not a.startswith("--report=")]
    cmd = command("gpu_bench.py", shown)
    print(f"command: {cmd}")
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(scratch(args.workdir, "wc-gpu-bench-"))
        bench = run(args, work)
    print()
    print(f"device: {bench.device}")
    print(table(bench))
    if bench.cold_resident is not None:
        print(
            f"cold rows after {bench.cold_method}: at most {bench.cold_resident:.1%} of the "
            "model's pages still resident when a row started"
        )
    missing = [r.name for r in bench.rows if r.status.startswith("missing")]
    if missing:
        print(f"\nmissing peers (not installed, not measured): {', '.join(missing)}")
    measurements = {
        "rows": [{**asdict(r), "warm_median_s": r.warm} for r in bench.rows],
        **{k: v for k, v in asdict(bench).items() if k != "rows"},
    }
    return finish(
        args,
        section=SECTION,
        heading="# Benchmarks",
        report=lambda: report_section(bench, cmd),
        measurements=measurements,
        problems=bench.problems,
        passed="every load bitwise equal to the reference",
    )


if __name__ == "__main__":
    sys.exit(main())
