"""CPU load benchmark: weightcache's two CPU sinks against the hardware ceilings and safetensors.

    .venv/bin/python loadtest/cpu_bench.py                   # a 1 GiB model: a few minutes
    .venv/bin/python loadtest/cpu_bench.py --size 64MiB      # a dry run: seconds
    .venv/bin/python loadtest/cpu_bench.py --report          # also write docs/benchmarks.md
    .venv/bin/python -m loadtest.cpu_bench --help

One run generates a Llama-like bf16 model (``weightcache.demo.synthetic``,
``--size`` tensor bytes in ``--shards`` files) and measures, in the same
process, one after the other:

* the **ceilings**: ``os.preadv`` of every shard's data area into one
  ``torch.empty`` buffer per shard, 16 MiB reads shared round-robin by 1, 2,
  4 ... ``--threads`` threads (what any reader of private memory pays: page
  faults in the fresh buffer and the copy out of the page cache); and memcpy
  (``Tensor.copy_``, torch's intra-op threads) of the same bytes into a fresh
  buffer and into a resident one; and ``O_DIRECT`` reads of the same bytes
  (rounded out to 4 KiB blocks) into 4 KiB-aligned buffers, 16 MiB reads over
  2 threads (what a read that skips the page cache can reach);
* **weightcache**, through ``weightcache.client.loader._read``, the loader's
  read of an ensured revision (every header checked first, the CPU sinks, the
  next file's reads started while this one's tensors are handed out), given
  the shards as they lie: no daemon, no cache lookup, no lease (the cache
  plumbing is not what is measured here): ``mmap=True`` with every page touched,
  ``mmap=False`` (the reader pool, ``--threads`` threads), and ``mmap=False``
  with ``tensors=`` selecting every 8th tensor (what one of 8 tensor-parallel
  ranks reads); and ``weightcache.client.cpu.read_file(mmap=False, direct=...)``
  file by file (no next-file overlap, since the loader does not pass
  ``direct=``), with ``direct=False`` (buffered), ``True`` (O_DIRECT) and
  ``"auto"`` (O_DIRECT for a file less than 10 % resident);
* **safetensors**: ``safetensors.torch.load_file`` with every page touched, and
  ``safetensors.torch.load(open(f, 'rb').read())``.

*Every page touched* means one byte of every 4 KiB page of every tensor is read
after the load, so that lazily mapped tensors pay for their page faults as a
model that runs would; the private loads get the same touch. Each result is
checked bitwise (a BLAKE3 of every tensor against ``load_file``'s) on its
first run. Warm: one unmeasured run of every row, then ``--repeat`` rounds of
every row (interleaved, so that a drift in a shared machine hits every row
alike), the median reported (and the best). Cold: each row once after the model's pages were
dropped from the page cache (``/proc/sys/vm/drop_caches`` where this process
may write it, else ``posix_fadvise(DONTNEED)`` on each shard; the resident
fraction afterwards, from ``mincore``, is reported), unless ``--no-cold``.

It prints a table and the ratios the CPU sinks are held to (warm):
``mmap=False`` within 1.25x of the 2-thread preadv ceiling and at least 1.5x
faster than ``safetensors.torch.load(bytes)``; ``mmap=True`` + touch within
1.1x of ``load_file`` + touch. ``--report [PATH]`` writes the table, the
command and the machine into ``docs/benchmarks.md`` between ``<!-- cpu:begin -->``
and ``<!-- cpu:end -->``; ``--json PATH`` every measurement. Exit status 1
when a load was not bitwise equal (a missed target is reported, not fatal:
timings on a shared machine vary).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import mmap
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if not __package__:
    # Run as a file (python loadtest/cpu_bench.py): import loadtest from this checkout.
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
from weightcache.client.cpu import Direct, read_file
from weightcache.client.header import read_header
from weightcache.client.loader import _read
from weightcache.client.readers import ReaderPool, default_threads
from weightcache.client.report import LoadReport
from weightcache.client.selection import make_selector
from weightcache.config import parse_size
from weightcache.demo.synthetic import make_model
from weightcache.demo.tensors import raw_bytes
from weightcache.hashing import Hasher
from weightcache.results import Ensured, LocalFile

REPORT = ROOT / "docs" / "benchmarks.md"
SECTION = "cpu"
BEGIN, END = markers(SECTION)
PAGE = 4096
CPU = torch.device("cpu")
CHUNK = 16 << 20
#: the targets (warm, every page touched): (row, against, bound, "<=" or ">=")
TARGETS = (
    ("weightcache mmap=False", "ceiling preadv x2", 1.25, "<="),
    ("safetensors load(bytes)", "weightcache mmap=False", 1.5, ">="),
    ("weightcache mmap=True + touch", "safetensors load_file + touch", 1.1, "<="),
)

Tensors = dict[str, torch.Tensor]


@dataclass
class Row:
    name: str
    #: what the row loads: every tensor, or the subset
    nbytes: int
    warm_s: list[float] = field(default_factory=list)
    cold_s: float | None = None
    bitwise: bool | None = None
    note: str = ""

    @property
    def warm(self) -> float:
        return statistics.median(self.warm_s) if self.warm_s else float("nan")

    @property
    def best(self) -> float:
        return min(self.warm_s) if self.warm_s else float("nan")


@dataclass
class Model:
    shards: list[Path]
    #: name -> BLAKE3 of dtype, shape and raw bytes, as load_file reads it
    digests: dict[str, str]
    #: every 8th tensor of each shard, in file order
    subset: frozenset[str]
    tensor_bytes: int
    subset_bytes: int
    #: (absolute offset, length) of each shard's data area
    data: list[tuple[int, int]]


# -- what is timed --------------------------------------------------------------------------


def touch(tensors: Tensors) -> None:
    """Read one byte of every page of every tensor."""
    total = 0
    for t in tensors.values():
        if t.numel():
            flat = raw_bytes(t)
            total += int(flat[::PAGE].sum()) + int(flat[-1])
    if total < 0:  # never: keeps the reads from looking unused
        raise AssertionError


def preadv_ceiling(model: Model, threads: int) -> list[torch.Tensor]:
    """Each shard's data area into its own torch.empty buffer, 16 MiB preadv calls over threads."""
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC) for p in model.shards]
    try:
        buffers = [torch.empty(length, dtype=torch.uint8) for _, length in model.data]
        work: list[tuple[int, int, memoryview]] = []
        for fd, (start, length), buf in zip(fds, model.data, buffers, strict=True):
            view = buf.numpy().data
            for at in range(0, length, CHUNK):
                work.append((fd, start + at, view[at : at + CHUNK]))

        def reader(mine: list[tuple[int, int, memoryview]]) -> None:
            for fd, offset, dest in mine:
                done = 0
                while done < len(dest):
                    n = os.preadv(fd, [dest[done:]], offset + done)
                    if n == 0:
                        raise EOFError(f"short read at {offset + done}")
                    done += n

        pool = [threading.Thread(target=reader, args=(work[i::threads],)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return buffers
    finally:
        for fd in fds:
            os.close(fd)


def odirect_ceiling(model: Model, threads: int) -> list[torch.Tensor]:
    """Each shard's data area, rounded out to 4 KiB blocks, read with O_DIRECT into an
    aligned buffer: 16 MiB reads shared round-robin by ``threads`` threads."""
    fds = [os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT) for p in model.shards]
    try:
        buffers: list[torch.Tensor] = []
        work: list[tuple[int, int, memoryview]] = []
        for fd, (start, length) in zip(fds, model.data, strict=True):
            lo = start - start % PAGE
            hi = -(-(start + length) // PAGE) * PAGE
            raw = torch.empty(hi - lo + PAGE, dtype=torch.uint8)
            pad = -raw.data_ptr() % PAGE
            buf = raw[pad : pad + hi - lo]
            buffers.append(buf)
            view = buf.numpy().data
            for at in range(0, hi - lo, CHUNK):
                work.append((fd, lo + at, view[at : at + CHUNK]))

        def reader(mine: list[tuple[int, int, memoryview]]) -> None:
            for fd, offset, dest in mine:
                done = 0
                while done < len(dest):
                    n = os.preadv(fd, [dest[done:]], offset + done)
                    done += n
                    if n == 0 or n % PAGE:
                        break  # the end of the file

        pool = [threading.Thread(target=reader, args=(work[i::threads],)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        return buffers
    finally:
        for fd in fds:
            os.close(fd)


def weightcache_read_files(model: Model, *, direct: Direct, pool: ReaderPool) -> Tensors:
    """``read_file(mmap=False, direct=direct)`` of each shard in turn."""
    out: Tensors = {}
    for path in model.shards:
        out.update(read_file(path, mmap=False, pool=pool, direct=direct).tensors)
    return out


def weightcache_load(
    model: Model, *, mmap: bool, pool: ReaderPool, subset: bool = False
) -> Tensors:
    """The loader's read of an ensured revision, for the model's shards as they lie."""
    ensured = Ensured(
        ref="cpu-bench",
        revision="0" * 64,
        snapshot=model.shards[0].parent,
        files=[LocalFile(p.name, p, p.stat().st_size, "") for p in model.shards],
        cache_hit=True,
    )
    selector = make_selector(model.subset if subset else None)
    return _read(ensured, selector, CPU, None, LoadReport(), mmap=mmap, pool=pool)


def safetensors_load_file(paths: Sequence[Path]) -> Tensors:
    from safetensors.torch import load_file

    out: Tensors = {}
    for path in paths:
        out.update(load_file(path))
    return out


def safetensors_load_bytes(model: Model) -> Tensors:
    from safetensors.torch import load

    out: Tensors = {}
    for path in model.shards:
        with open(path, "rb") as f:
            out.update(load(f.read()))
    return out


# -- the model and the checks -----------------------------------------------------------------


def digest(t: torch.Tensor) -> str:
    h = Hasher()
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(raw_bytes(t).numpy().data)
    return h.hexdigest()


def prepare(directory: Path, size: int, shards: int) -> Model:
    say(f"generating a {size / (1 << 20):.0f} MiB bf16 model in {shards} shards")
    synthetic = make_model(directory, total_bytes=size, shards=shards, dtype="bf16", seed=1)
    paths = list(synthetic.shards)
    for path in paths:  # clean pages, so that dropping them from the page cache works
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    reference = safetensors_load_file(paths)
    digests = {name: digest(t) for name, t in reference.items()}
    del reference
    subset: set[str] = set()
    data: list[tuple[int, int]] = []
    for path in paths:
        header = read_header(path)
        names = list(header.tensors)
        subset.update(names[::8])
        data.append((header.data_start, path.stat().st_size - header.data_start))
    sizes = {
        name: spec.nbytes for path in paths for name, spec in read_header(path).tensors.items()
    }
    return Model(
        shards=paths,
        digests=digests,
        subset=frozenset(subset),
        tensor_bytes=sum(sizes.values()),
        subset_bytes=sum(sizes[n] for n in subset),
        data=data,
    )


def bitwise(model: Model, got: Tensors, subset: bool) -> bool:
    want = model.subset if subset else model.digests.keys()
    if set(got) != set(want):
        return False
    return all(digest(t) == model.digests[name] for name, t in got.items())


# -- the page cache -----------------------------------------------------------------------------


def drop_method() -> str:
    """``drop_caches`` when this process may write it, else ``fadvise``."""
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        return "fadvise"


def drop(model: Model, method: str) -> None:
    os.sync()
    if method == "drop_caches":
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return
    for path in model.shards:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident(model: Model) -> float:
    """The fraction of the shards' pages in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pages = present = 0
    for path in model.shards:
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


# -- the run ------------------------------------------------------------------------------------


@dataclass
class Bench:
    rows: list[Row]
    size: int
    shards: int
    threads: int
    repeat: int
    cold_method: str
    cold_resident: float | None
    problems: list[str]


def run(args: Any, work: Path) -> Bench:
    model = prepare(work / "model", args.size, args.shards)
    threads = args.threads
    pool = ReaderPool(threads)
    ceilings = sorted({1, 2, *(2**k for k in range(1, 5) if 2**k <= threads), threads})
    # A resident source for the memcpy rows: every shard's data area, read once.
    source = torch.cat([b for b in preadv_ceiling(model, threads)])

    def memcpy_fresh() -> Any:
        dest = torch.empty_like(source)
        dest.copy_(source)
        return dest

    resident_dest = torch.empty_like(source).fill_(0)

    def memcpy_resident() -> Any:
        resident_dest.copy_(source)
        return None

    total, part = model.tensor_bytes, model.subset_bytes
    # (row, load, touch it, bitwise check: None, "all" or "subset")
    plan: list[tuple[Row, Callable[[], Any], bool, str | None]] = []
    for n in ceilings:
        plan.append(
            (Row(f"ceiling preadv x{n}", total), lambda n=n: preadv_ceiling(model, n), False, None)
        )
    plan.append((Row("ceiling O_DIRECT x2", total), lambda: odirect_ceiling(model, 2), False, None))
    plan += [
        (Row("ceiling memcpy, fresh buffer", total), memcpy_fresh, False, None),
        (Row("ceiling memcpy, resident buffer", total), memcpy_resident, False, None),
        (
            Row("weightcache mmap=True + touch", total),
            lambda: weightcache_load(model, mmap=True, pool=pool),
            True,
            "all",
        ),
        (
            Row("weightcache mmap=False", total, note=f"{threads} reader threads"),
            lambda: weightcache_load(model, mmap=False, pool=pool),
            True,
            "all",
        ),
        (
            Row("weightcache mmap=False, tensors=1/8", part, note="every 8th tensor"),
            lambda: weightcache_load(model, mmap=False, pool=pool, subset=True),
            True,
            "subset",
        ),
        *(
            (
                Row(f"weightcache read_file mmap=False, direct={d!r}", total, note="file by file"),
                lambda d=d: weightcache_read_files(model, direct=d, pool=pool),
                True,
                "all",
            )
            for d in (False, True, "auto")
        ),
        (
            Row("safetensors load_file + touch", total),
            lambda: safetensors_load_file(model.shards),
            True,
            "all",
        ),
        (
            Row("safetensors load(bytes)", total, note="load(open(f,'rb').read())"),
            lambda: safetensors_load_bytes(model),
            True,
            "all",
        ),
    ]
    problems: list[str] = []

    def once(row: Row, load: Callable[[], Any], touched: bool, check: str | None) -> float:
        started = time.perf_counter()
        out = load()
        if touched:
            touch(out)
        elapsed = time.perf_counter() - started
        if check is not None and row.bitwise is None:
            row.bitwise = bitwise(model, out, check == "subset")
            if not row.bitwise:
                problems.append(f"{row.name}: not bitwise equal to safetensors' load_file")
        del out
        gc.collect()
        return elapsed

    say("warm: one unmeasured run of each row (and its bitwise check)")
    for row, load, touched, check in plan:
        once(row, load, touched, check)
    # Rounds of every row, rather than every run of one row then the next, so
    # that a drift in the machine (other work, the allocator, reclaim) is shared.
    say(f"warm: {args.repeat} rounds of every row")
    for _ in range(args.repeat):
        for row, load, touched, check in plan:
            row.warm_s.append(once(row, load, touched, check))
    for row, _, _, _ in plan:
        say(f"  {row.name:<40} {row.warm:8.3f} s  {row.nbytes / row.warm / 1e9:6.2f} GB/s")

    cold_method, cold_resident = "off", None
    if args.cold:
        cold_method = drop_method()
        say(f"cold: each row once after dropping the model's pages ({cold_method})")
        fractions = []
        for row, load, touched, check in plan:
            if row.name.startswith("ceiling memcpy"):
                continue  # no file involved
            drop(model, cold_method)
            fractions.append(resident(model))
            row.cold_s = once(row, load, touched, check)
            say(f"  {row.name:<40} {row.cold_s:8.3f} s  {row.nbytes / row.cold_s / 1e9:6.2f} GB/s")
        cold_resident = max(fractions) if fractions else None
        if cold_resident is not None:
            say(
                f"  at most {cold_resident:.1%} of the model's pages were resident when a row began"
            )
    pool.close()
    return Bench(
        rows=[row for row, _, _, _ in plan],
        size=args.size,
        shards=args.shards,
        threads=threads,
        repeat=args.repeat,
        cold_method=cold_method,
        cold_resident=cold_resident,
        problems=problems,
    )


# -- the report ---------------------------------------------------------------------------------


def gbps(nbytes: int, seconds: float | None) -> str:
    return f"{nbytes / seconds / 1e9:.2f}" if seconds else "-"


def table(bench: Bench) -> str:
    lines = [
        "| row | bytes | warm median | warm GB/s | warm best | cold | cold GB/s | bitwise |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for r in bench.rows:
        ok = {None: "-", True: "yes", False: "**NO**"}[r.bitwise]
        name = f"{r.name} ({r.note})" if r.note else r.name
        cold = f"{r.cold_s:.3f} s" if r.cold_s is not None else "-"
        lines.append(
            f"| {name} | {r.nbytes / (1 << 20):.1f} MiB | {r.warm:.3f} s | "
            f"{gbps(r.nbytes, r.warm)} | {r.best:.3f} s | {cold} | {gbps(r.nbytes, r.cold_s)} "
            f"| {ok} |"
        )
    return "\n".join(lines)


def ratios(bench: Bench) -> list[str]:
    """The targets, met or missed, and the subset's share."""
    by = {r.name: r for r in bench.rows}
    out = []
    for name, against, bound, sense in TARGETS:
        a, b = by[name].warm, by[against].warm
        ratio = a / b
        met = ratio <= bound if sense == "<=" else ratio >= bound
        what = (
            f"`{name}` / `{against}` = {ratio:.2f} (target <= {bound})"
            if sense == "<="
            else f"`{name}` / `{against}` = {ratio:.2f} (target >= {bound}: that much faster)"
        )
        out.append(f"{what}: {'met' if met else 'MISSED'}")
    buffered = by["weightcache read_file mmap=False, direct=False"]
    direct = by["weightcache read_file mmap=False, direct=True"]
    if buffered.cold_s and direct.cold_s:
        out.append(
            f"cold: `direct=True` / `direct=False` (read_file) = "
            f"{direct.cold_s / buffered.cold_s:.2f} (below 1: O_DIRECT is faster cold here)"
        )
    out.append(
        f"warm: `direct=True` / `direct=False` (read_file) = {direct.warm / buffered.warm:.2f} "
        "(O_DIRECT never reads from the page cache)"
    )
    sub, full = by["weightcache mmap=False, tensors=1/8"], by["weightcache mmap=False"]
    out.append(
        f"`tensors=1/8` reads {sub.nbytes / full.nbytes:.3f} of the bytes in "
        f"{sub.warm / full.warm:.3f} of the time of the full `mmap=False` load"
    )
    return out


def report_section(bench: Bench, cmd: str) -> str:
    cold = (
        f"cold rows after `{bench.cold_method}` (at most {bench.cold_resident:.1%} of the "
        "model's pages still resident when a row started)"
        if bench.cold_resident is not None
        else "cold rows not measured (`--no-cold`)"
    )
    ratio_lines = "\n".join(f"* {line}" for line in ratios(bench))
    return f"""{BEGIN}
## CPU loads (`loadtest/cpu_bench.py`)

weightcache's CPU sinks against the ceilings of this machine and against
safetensors, on one generated Llama-like bf16 model, in one process. The
weightcache rows call `weightcache.client.loader._read` on the shards as they
lie (the loader's read of an ensured revision: headers, sinks, the next file's
reads started early; no daemon, no cache lookup, no lease). *+ touch*: one
byte of every 4 KiB page of every tensor is read after the load (lazily mapped
tensors pay their page faults); the private loads are touched too. Warm:
median of {bench.repeat} rounds after one unmeasured run; {cold}.
Every load checked bitwise against `safetensors.torch.load_file` (BLAKE3 per tensor).
The rounds interleave the rows, so that a drift of the machine hits each alike.
Ceilings: `os.preadv` of each shard's data area into its own `torch.empty`
buffer in 16 MiB reads over N threads; `Tensor.copy_` of the same bytes;
`O_DIRECT` reads of the same bytes (rounded out to 4 KiB blocks) into
4 KiB-aligned buffers over 2 threads. The `read_file ... direct=` rows call
`weightcache.client.cpu.read_file` shard by shard (no next-file overlap):
buffered, O_DIRECT, and `"auto"` (O_DIRECT for a file under 10 % resident).
See the docstring of `loadtest/cpu_bench.py`.

* command: `{cmd}`
* date: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
* machine: {machine()}; {versions("torch", "safetensors", "numpy")}; 1-minute load average
  {os.getloadavg()[0]:.1f} at the end (the timings are only as quiet as the machine)
* model: {bench.size / (1 << 20):.0f} MiB of bf16 tensors in {bench.shards} shards;
  reader pool of {bench.threads} threads

{table(bench)}

{ratio_lines}
{END}
"""


def parse_args(argv: Sequence[str]) -> Any:
    parser = argument_parser("cpu_bench.py", __doc__)
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="tensor bytes")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5, help="warm runs per row (median)")
    parser.add_argument(
        "--threads",
        type=int,
        default=default_threads(),
        help="reader pool size, most ceiling threads",
    )
    parser.add_argument("--no-cold", dest="cold", action="store_false", help="warm rows only")
    add_run_options(parser, report=REPORT)
    args = parser.parse_args(argv)
    if args.size < 1 << 20 or args.shards < 1 or args.repeat < 1 or args.threads < 1:
        parser.error("--size must be at least 1MiB; --shards, --repeat, --threads at least 1")
    return args


def measured_args(argv: Sequence[str]) -> list[str]:
    """``argv`` without where the results go (``--report [PATH]``, ``--json PATH``)."""
    shown: list[str] = []
    skip_value = False
    for i, arg in enumerate(argv):
        if skip_value:
            skip_value = False
            continue
        if arg.startswith(("--report=", "--json=")):
            continue
        if arg == "--json":
            skip_value = True
            continue
        if arg == "--report":
            # Its path is optional: the next word is it unless it is an option.
            skip_value = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        shown.append(arg)
    return shown


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    cmd = command("cpu_bench.py", measured_args(argv))
    print(f"command: {cmd}")
    print(
        "weightcache rows are timed through weightcache.client.loader._read, the loader's "
        "read of an ensured revision (no daemon, no cache lookup, no lease)"
    )
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(scratch(args.workdir, "wc-cpu-bench-"))
        bench = run(args, work)
    print()
    print(table(bench))
    print()
    for line in ratios(bench):
        print(line)
    measurements = {
        "rows": [{**asdict(r), "warm_median_s": r.warm, "warm_best_s": r.best} for r in bench.rows],
        "ratios": ratios(bench),
        **{k: v for k, v in asdict(bench).items() if k != "rows"},
    }
    return finish(
        args,
        section=SECTION,
        heading="# Benchmarks",
        report=lambda: report_section(bench, cmd),
        measurements=measurements,
        problems=bench.problems,
    )


if __name__ == "__main__":
    sys.exit(main())
