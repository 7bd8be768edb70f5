"""Load test: many concurrent loads of one model, under eviction pressure and a status storm.

    .venv/bin/python loadtest/load.py --report         # defaults: ~30 s on 2 cores
    .venv/bin/python loadtest/load.py --loads 128 --procs 16 --rounds 10 --status 5000
    .venv/bin/python -m loadtest.load --help           # the same, as a module

Against the real daemon (``python -m weightcache daemon``) and a real local
SeaweedFS (:class:`weightcache.demo.seaweed.SeaweedServer`, or ``--endpoint``
with ``AWS_*`` credentials and ``--bucket`` for one that already runs):

* ``--loads`` concurrent ``weightcache.load`` calls of one model (the *main*
  model), from ``--procs`` worker processes of ``loads / procs`` threads each.
  A torch-importing worker costs ~1 CPU-second to start and ~300 MiB at its
  peak loading a 32 MiB model; one with 8 threads ~380 MiB. 64 processes
  would take ~19 GiB and a minute of imports on a 2-core machine, so threads
  carry the concurrency: the daemon sees one connection, one ensure, per
  thread. Workers import everything before the barrier, so a wave measures
  loads, not imports.
  Every thread loads ``--rounds`` times; a round starts for every thread at
  the same moment (a barrier file), so each round is a wave of ``--loads``
  concurrent ensures. Between rounds nobody holds the main model, so the
  pressure below may evict it and the next wave pulls it again, coalesced.
  Every load is compared bitwise (a BLAKE3 over names, dtypes, shapes and raw
  bytes) with the original shards as ``safetensors.torch.load_file`` reads them.
  Every ``--hold-every``-th operation is a *hold* instead: ``DaemonClient.ensure``
  with a lease, every file of the snapshot checked to exist and re-hashed
  against the manifest while the lease is held, then the lease released.
* eviction pressure: the byte budget (``WEIGHTCACHE_CACHE_MAX_BYTES``) holds
  ``--budget-models`` models of ``--models`` + 1, and ``--pressure-threads``
  threads keep pulling the other models (holds, prefetch jobs, plain ensures),
  so eviction never stops. The loads begin only once the daemon has evicted.
* a storm of ``--status`` concurrent ``GET /v1/status`` (aiohttp over the Unix
  socket, no connection limit, every request issued at once) fired the moment
  the first wave starts (``--status-bursts`` fires one per wave).
* a sampler polls ``/v1/status`` every ``--sample-s`` and records the blob bytes
  against the budget: the cache never grows past its budget (SPEC), neither
  after a pull nor while pulls run side by side.

It passes when nothing failed: every load bitwise correct and served by the
daemon, every hold found its files whole, every status request answered 200,
every pressure operation succeeded, every sample of the cache was within its
budget, evictions happened, and the daemon logged no internal error. It prints
a table (status latency p50/p95/p99/max, load times); ``--json PATH`` writes
every measurement (:class:`Result`) there, and ``--report`` writes the numbers,
the command and the machine into ``docs/reliability.md`` between
``<!-- load:begin -->`` and ``<!-- load:end -->``. Exit status 1 when a check
failed or a step could not be carried out.

``tests/faults/test_load_short.py`` runs a small version of it as a program.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import os
import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if not __package__:
    # Run as a file (python loadtest/load.py): import loadtest from this checkout,
    # as python -m loadtest.load does.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from loadtest.scenario import (
    ROOT,
    Daemon,
    ScenarioFailed,
    add_run_options,
    argument_parser,
    child_env,
    command,
    finish,
    local_origin,
    machine,
    markers,
    say,
    scratch,
    versions,
)
from weightcache.config import parse_size
from weightcache.demo import DemoFailed
from weightcache.demo.tensors import tensors_digest
from weightcache.errors import WeightcacheError

MiB = 1 << 20
REPORT = ROOT / "docs" / "reliability.md"
BEGIN, END = markers("load")
#: how often a waiting worker or the driver looks at the barrier files again
POLL_S = 0.005


# -- options and results ----------------------------------------------------------------


@dataclass
class Options:
    #: concurrent ensures of the main model per wave (threads over all worker processes)
    loads: int = 64
    #: worker processes the threads are spread over
    procs: int = 8
    #: waves; every thread loads once per wave
    rounds: int = 5
    #: every k-th operation is a lease hold + re-hash instead of a load (0: none)
    hold_every: int = 4
    #: models besides the main one, pulled by the pressure threads
    models: int = 5
    #: tensor bytes per model
    model_bytes: int = 32 * MiB
    shards: int = 4
    #: manifest chunk size (the unit of ranged GETs and verification)
    chunk_bytes: int = 4 * MiB
    #: the byte budget, in models (the cache holds this many of models + 1)
    budget_models: float = 3.5
    pressure_threads: int = 2
    #: concurrent GET /v1/status per burst
    status: int = 1000
    #: bursts; the first at the first wave, one per later wave while bursts are left
    status_bursts: int = 1
    #: between the sampler's status polls
    sample_s: float = 0.02
    #: after a wave, before the next (the pressure may evict the main model meanwhile)
    gap_s: float = 0.3
    #: origin connections of the daemon (fetch.concurrency)
    fetch_concurrency: int = 8
    #: every wait (imports, a wave, the warm-up) gives up after this long
    timeout_s: float = 600.0

    @property
    def threads_per_proc(self) -> list[int]:
        base, extra = divmod(self.loads, self.procs)
        return [base + (1 if i < extra else 0) for i in range(self.procs)]


@dataclass
class Result:
    options: dict[str, Any]
    budget_bytes: int
    model_file_bytes: int
    #: every operation of the worker threads (loads and holds of the main model)
    ops: list[dict[str, Any]] = field(default_factory=list)
    #: every operation of the pressure threads
    pressure: list[dict[str, Any]] = field(default_factory=list)
    #: (status code or 0, seconds, error, pending, pulls) of each storm request
    storm: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    final_status: dict[str, Any] = field(default_factory=dict)
    daemon_rss_bytes: int = 0
    daemon_errors: list[str] = field(default_factory=list)
    daemon_exit: int | None = None
    wall_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    def loads(self) -> list[dict[str, Any]]:
        return [o for o in self.ops if o["kind"] == "load"]

    def holds(self) -> list[dict[str, Any]]:
        return [o for o in self.ops if o["kind"] == "hold"]


# -- digests ----------------------------------------------------------------------------


def check_snapshot(doc: dict[str, Any]) -> list[str]:
    """Problems with the files of an ensure result: missing, wrong size, wrong BLAKE3."""
    from weightcache.hashing import digest_file

    problems = []
    for f in doc["files"]:
        path = f["local_path"]
        try:
            size = os.stat(path).st_size
            if size != f["size"]:
                problems.append(f"{f['path']}: {size} bytes, expected {f['size']}")
                continue
            actual = digest_file(path)
        except FileNotFoundError:
            problems.append(f"{f['path']}: missing ({path})")
            continue
        if actual != f["blake3"]:
            problems.append(f"{f['path']}: hashes to {actual[:16]}, expected {f['blake3'][:16]}")
    return problems


# -- the worker process ------------------------------------------------------------------


def _wait_for(path: Path, deadline: float) -> bool:
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def _error(exc: BaseException) -> str:
    code = getattr(exc, "code", "")
    return f"{type(exc).__name__}{f'[{code}]' if code else ''}: {exc}"


def _load_op(ref: str, want: str) -> dict[str, Any]:
    import weightcache

    began = time.perf_counter()
    tensors, report = weightcache.load_with_report(ref, "cpu")
    loaded = time.perf_counter()
    digest = tensors_digest(tensors)
    del tensors
    error = ""
    if report.mode != "daemon":
        error = f"mode {report.mode}: the load did not go through the daemon"
    elif digest != want:
        error = f"digest {digest[:16]} != original {want[:16]}"
    return {
        "ok": not error,
        "error": error,
        "seconds": loaded - began,
        "digest_s": time.perf_counter() - loaded,
        "cache_hit": report.cache_hit,
        "origin_bytes": report.origin_bytes,
        "coalesced_bytes": report.coalesced_bytes,
        "fetch_s": report.resolve_s + report.fetch_s,
        "read_s": report.read_s,
        "mode": report.mode,
    }


def _hold_op(client: Any, ref: str) -> dict[str, Any]:
    """Ensure with a lease, re-hash every file while it is held, release.

    Fails when a file is missing or wrong while leased, and when the lease was
    already gone at release: the daemon keeps one lease per process and
    revision, so another thread's release can end this one's early.
    """
    from weightcache.errors import NotFound

    began = time.perf_counter()
    doc = client.ensure(ref, lease=True)
    ensured = time.perf_counter()
    lease = (doc.get("lease") or {}).get("id")
    problems = [] if lease else ["no lease granted"]
    try:
        problems += check_snapshot(doc)
    finally:
        if lease:
            try:
                client.release(lease)
            except NotFound:
                problems.append(
                    f"lease {lease} ended before its release (another ensure of this process "
                    "shared it and released it)"
                )
    return {
        "ok": not problems,
        "error": "; ".join(problems),
        "seconds": ensured - began,
        "verify_s": time.perf_counter() - ensured,
        "cache_hit": bool(doc.get("cache_hit")),
        "source": doc.get("source"),
        "lease": lease,
    }


def worker_main(spec: dict[str, Any]) -> int:
    """One worker process: ``threads`` threads, each doing one operation per wave."""
    # Everything a load imports lazily (torch above all, ~1 CPU-second) is imported
    # before the barrier, so that a wave measures loads, not imports.
    for module in ("torch", "weightcache.client.loader", "weightcache.client.cpu"):
        importlib.import_module(module)
    from weightcache.client.daemon import DaemonClient

    sync = Path(spec["sync"])
    deadline = time.monotonic() + spec["timeout_s"]
    client = DaemonClient(socket_path=spec["socket"])
    ops: list[dict[str, Any]] = []
    lock = threading.Lock()
    waves = [threading.Event() for _ in range(spec["rounds"])]
    done = [threading.Semaphore(0) for _ in range(spec["rounds"])]

    def thread(slot: int) -> None:
        for r in range(spec["rounds"]):
            if not waves[r].wait(max(0.0, deadline - time.monotonic())):
                return
            kind = "load"
            if spec["hold_every"] and (spec["first_slot"] + slot + r) % spec["hold_every"] == 0:
                kind = "hold"
            began = time.time()
            try:
                op = (
                    _load_op(spec["ref"], spec["digest"])
                    if kind == "load"
                    else _hold_op(client, spec["ref"])
                )
            except Exception as exc:  # every failure is a finding, reported with its type
                op = {"ok": False, "error": _error(exc), "seconds": time.time() - began}
            op.update(kind=kind, round=r, pid=os.getpid(), slot=slot, started=began)
            with lock:
                ops.append(op)
            done[r].release()

    pool = [
        threading.Thread(target=thread, args=(i,), name=f"load-{i}", daemon=True)
        for i in range(spec["threads"])
    ]
    for t in pool:
        t.start()
    (sync / f"ready-{spec['index']}").touch()
    for r in range(spec["rounds"]):
        if not _wait_for(sync / f"go-{r}", deadline):
            break
        waves[r].set()
        for _ in pool:
            if not done[r].acquire(timeout=max(0.0, deadline - time.monotonic())):
                break
        (sync / f"done-{spec['index']}-{r}").touch()
    for t in pool:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"pid": os.getpid(), "rss_bytes": rss, "ops": ops}))
    sys.stdout.flush()
    return 0


# -- the status storm ----------------------------------------------------------------------


async def _storm(sock: Path, n: int) -> list[dict[str, Any]]:
    import aiohttp

    connector = aiohttp.UnixConnector(path=str(sock), limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> dict[str, Any]:
            began = time.perf_counter()
            try:
                async with session.get("http://localhost/v1/status") as resp:
                    raw = await resp.read()
                    seconds = time.perf_counter() - began
                    doc = json.loads(raw) if resp.status == 200 else {}
                    return {
                        "status": resp.status,
                        "seconds": seconds,
                        "error": "" if resp.status == 200 else raw[:200].decode(errors="replace"),
                        "pending": doc.get("pending", 0),
                        "pulls": len(doc.get("pulls", ())),
                        "waiters": max((p["waiters"] for p in doc.get("pulls", ())), default=0),
                    }
            except Exception as exc:  # each failed request is a finding
                return {
                    "status": 0,
                    "seconds": time.perf_counter() - began,
                    "error": _error(exc),
                    "pending": 0,
                    "pulls": 0,
                    "waiters": 0,
                }

        # Every request created before any is awaited: one burst, no client-side limit.
        return list(await asyncio.gather(*(one() for _ in range(n))))


def status_storm(sock: Path, n: int) -> list[dict[str, Any]]:
    return asyncio.run(_storm(sock, n))


# -- eviction pressure and the budget sampler ------------------------------------------------


class Pressure:
    """Threads that keep pulling the other models so that eviction never stops.

    Thread ``i`` owns models ``i, i + threads, ...``: leases are per process and
    revision, so two threads of this process never hold the same revision.
    """

    ACTIONS = ("hold", "prefetch", "ensure")

    def __init__(self, sock: Path, refs: Sequence[str], threads: int, timeout_s: float) -> None:
        from weightcache.client.daemon import DaemonClient

        self.client = DaemonClient(socket_path=sock)
        self.refs, self.timeout_s = list(refs), timeout_s
        self.stop = threading.Event()
        self.ops: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        n = max(1, min(threads, len(self.refs)))
        self._threads = [
            threading.Thread(target=self._loop, args=(i, n), name=f"pressure-{i}", daemon=True)
            for i in range(n)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout_s)

    def _loop(self, i: int, n: int) -> None:
        mine = self.refs[i::n]
        step = 0
        while not self.stop.is_set():
            ref = mine[step % len(mine)]
            action = self.ACTIONS[(step // len(mine) + i) % len(self.ACTIONS)]
            step += 1
            began = time.perf_counter()
            try:
                op = self._act(action, ref)
            except Exception as exc:  # every failure is a finding
                op = {"ok": False, "error": _error(exc)}
            op.update(kind=action, ref=ref, seconds=time.perf_counter() - began)
            with self._lock:
                self.ops.append(op)

    def _act(self, action: str, ref: str) -> dict[str, Any]:
        if action == "hold":
            return _hold_op(self.client, ref)
        if action == "ensure":
            doc = self.client.ensure(ref, lease=False)
            return {"ok": True, "error": "", "cache_hit": bool(doc.get("cache_hit"))}
        job = self.client.prefetch(ref, priority="background")["job"]
        deadline = time.monotonic() + self.timeout_s
        while job["state"] in ("scheduled", "running") and time.monotonic() < deadline:
            time.sleep(0.02)
            job = self.client.job(job["id"])
        ok = job["state"] == "done"
        return {"ok": ok, "error": "" if ok else f"job {job['state']}: {job.get('error')}"}


class Sampler:
    """Polls ``/v1/status``: blob bytes against the budget, pulls in flight, counters."""

    def __init__(self, sock: Path, interval_s: float) -> None:
        from weightcache.client.daemon import DaemonClient

        self.client = DaemonClient(socket_path=sock)
        self.interval_s = interval_s
        self.samples: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=60)

    def sample(self) -> dict[str, Any]:
        doc = self.client.status()
        s = {
            "t": time.time(),
            "used": doc["disk"]["used_bytes"],
            "budget": doc["disk"]["budget_bytes"],
            "pulls": len(doc["pulls"]),
            "pending": doc["pending"],
            "leases": doc["leases"],
            "misses": doc["counters"]["misses"],
            "evictions": doc["counters"]["evictions"],
        }
        self.samples.append(s)
        return s

    def _loop(self) -> None:
        while not self.stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as exc:  # a status poll that fails is a finding too
                self.errors.append(_error(exc))


# -- the driver -------------------------------------------------------------------------------


def _wait_all(paths: Sequence[Path], deadline: float, what: str, alive: Callable[[], str]) -> None:
    while not all(p.exists() for p in paths):
        dead = alive()
        if dead:
            raise ScenarioFailed(f"waiting for {what}: {dead}")
        if time.monotonic() > deadline:
            missing = [p.name for p in paths if not p.exists()]
            raise ScenarioFailed(f"timed out waiting for {what}: {missing[:8]}")
        time.sleep(POLL_S)


def prepare_models(
    workdir: Path,
    opts: Options,
    bucket: str,
    env: dict[str, str],
    log: Callable[[str], None] = lambda _: None,
) -> tuple[list[str], str, int]:
    """Generate and publish the main model and ``opts.models`` others.

    Returns the refs (main first), the main model's tensor digest, and the
    largest model's bytes on disk.
    """
    from weightcache.config import load_config
    from weightcache.demo.synthetic import make_model
    from weightcache.publish import publish
    from weightcache.refs import parse_ref

    cfg = load_config(
        env={
            **env,
            "WEIGHTCACHE_CACHE_DIR": str(workdir / "publish-cache"),
            "WEIGHTCACHE_PUBLISH_CHUNK_BYTES": str(opts.chunk_bytes),
        }
    )
    refs, want, largest = [], "", 0
    for i in range(opts.models + 1):
        model = make_model(
            workdir / "models" / f"m{i}",
            total_bytes=opts.model_bytes,
            shards=opts.shards,
            seed=1000 + i,
        )
        ref = f"s3://{bucket}/load/model-{i}"
        began = time.monotonic()
        publish(model.directory, parse_ref(ref), cfg)
        log(f"published {ref} ({model.file_bytes} B) in {time.monotonic() - began:.1f} s")
        if i == 0:
            want = tensors_digest(model.reference())
        largest = max(largest, model.file_bytes)
        refs.append(ref)
    return refs, want, largest


def run(
    opts: Options,
    *,
    s3_env: dict[str, str],
    bucket: str,
    workdir: Path,
    log: Callable[[str], None] = lambda _: None,
) -> Result:
    """The whole scenario against the S3 server that ``s3_env`` points at; never raises for a
    failed check (they land in ``Result.problems``), only for a scenario that cannot run."""
    if opts.procs < 1 or opts.loads < opts.procs:
        raise ValueError("need 1 <= procs <= loads")
    if opts.models <= opts.budget_models:
        # The pressure threads pull only the other models: they must not fit.
        raise ValueError("need models > budget_models, or nothing is ever evicted")
    started = time.monotonic()
    deadline = started + opts.timeout_s
    workdir.mkdir(parents=True, exist_ok=True)
    env = child_env(s3_env)
    log(f"generating and publishing {opts.models + 1} models of {opts.model_bytes // MiB} MiB")
    refs, want, model_bytes = prepare_models(workdir, opts, bucket, env, log)
    budget = int(opts.budget_models * model_bytes)
    result = Result(options=asdict(opts), budget_bytes=budget, model_file_bytes=model_bytes)

    cache, sock, sync = workdir / "cache", workdir / "run" / "wc.sock", workdir / "sync"
    sync.mkdir(parents=True, exist_ok=True)
    daemon_env = {
        **env,
        "WEIGHTCACHE_CACHE_MAX_BYTES": str(budget),
        "WEIGHTCACHE_FETCH_CONCURRENCY": str(opts.fetch_concurrency),
    }
    daemon = Daemon(cache, sock, daemon_env, workdir / "daemon.log", cwd=ROOT)
    worker_env = {**env, "WEIGHTCACHE_CACHE_DIR": str(cache), "WEIGHTCACHE_SOCKET": str(sock)}
    procs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []
    pressure: Pressure | None = None
    sampler: Sampler | None = None
    try:
        daemon.start()
        log(f"daemon up; budget {budget / MiB:.0f} MiB = {opts.budget_models} x {model_bytes} B")
        first = 0
        for index, threads in enumerate(opts.threads_per_proc):
            spec = {
                "index": index,
                "ref": refs[0],
                "digest": want,
                "threads": threads,
                "first_slot": first,
                "rounds": opts.rounds,
                "hold_every": opts.hold_every,
                "socket": str(sock),
                "sync": str(sync),
                "timeout_s": opts.timeout_s,
            }
            first += threads
            out, err = workdir / f"worker-{index}.out", workdir / f"worker-{index}.err"
            with open(out, "wb") as fo, open(err, "wb") as fe:
                proc = subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "worker", json.dumps(spec)],
                    env=worker_env,
                    cwd=ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=fo,
                    stderr=fe,
                )
            procs.append((proc, out, err))

        def dead() -> str:
            if daemon.proc is not None and daemon.proc.poll() is not None:
                return f"the daemon exited:\n{daemon.tail()}"
            for proc, _, err in procs:
                if proc.poll() is not None:
                    return f"worker {proc.pid} exited {proc.returncode}:\n{err.read_text()[-2000:]}"
            return ""

        sampler = Sampler(sock, opts.sample_s)
        sampler.start()
        pressure = Pressure(sock, refs[1:], opts.pressure_threads, opts.timeout_s)
        pressure.start()
        _wait_all(
            [sync / f"ready-{i}" for i in range(opts.procs)], deadline, "workers to import", dead
        )
        log(f"{opts.procs} workers ready; waiting for the first eviction")
        while not sampler.samples or sampler.samples[-1]["evictions"] == 0:
            if dead():
                raise ScenarioFailed(dead())
            if time.monotonic() > deadline:
                raise ScenarioFailed("the pressure never made the daemon evict")
            time.sleep(0.05)

        bursts = opts.status_bursts if opts.status else 0
        for r in range(opts.rounds):
            (sync / f"go-{r}").touch()
            if r < bursts:
                result.storm += status_storm(sock, opts.status)
            _wait_all(
                [sync / f"done-{i}-{r}" for i in range(opts.procs)], deadline, f"wave {r}", dead
            )
            log(f"wave {r + 1}/{opts.rounds} done")
            if r + 1 < opts.rounds:
                time.sleep(opts.gap_s)
        # A last wave of bursts, if more were asked for than there are waves.
        for _ in range(bursts - opts.rounds):
            result.storm += status_storm(sock, opts.status)
    finally:
        if pressure is not None:
            pressure.close()
            result.pressure = pressure.ops
        if sampler is not None:
            sampler.close()
            result.samples = sampler.samples
            if sampler.errors:
                result.problems.append(
                    f"{len(sampler.errors)} status polls failed, e.g. {sampler.errors[0]}"
                )
        for proc, out, err in procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            lines = out.read_text().strip().splitlines()
            doc = json.loads(lines[-1]) if lines else {"pid": proc.pid, "ops": []}
            doc["returncode"] = proc.returncode
            doc["stderr"] = err.read_text(errors="replace")[-2000:]
            result.ops += doc.pop("ops")
            result.workers.append(doc)
        if daemon.alive():
            try:
                result.final_status = daemon.client(timeout_s=30.0).status()
            except WeightcacheError as exc:
                result.problems.append(f"the final status request failed: {_error(exc)}")
            result.daemon_rss_bytes = daemon.rss_peak()
        result.daemon_exit = daemon.stop()
        result.daemon_errors = daemon.errors()
    result.wall_s = time.monotonic() - started
    result.problems = [_short(p) for p in result.problems + check(result, opts)]
    return result


def _kinds(ops: Sequence[dict[str, Any]]) -> str:
    """How many failures of each kind: the error's class and code, or its first words."""
    counts: dict[str, int] = {}
    for o in ops:
        error = _without_lost(o["error"]) or o["error"]
        m = re.match(r"(\w+(\[\w+\])?): ", error)
        if any(x in error for x in (": missing (", ": hashes to", " bytes, expected")):
            kind = "files missing or wrong while leased"
        elif m:
            kind = m.group(1)
        elif job := re.match(r"job (\w+): .*'code': '(\w+)'", error):
            kind = f"job {job.group(1)}[{job.group(2)}]"
        else:
            kind = error[:40]
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def _short(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _without_lost(error: str) -> str:
    return "; ".join(p for p in error.split("; ") if "ended before its release" not in p)


def check(result: Result, opts: Options) -> list[str]:
    """Everything that must hold; each failure as one line."""
    problems = []
    want_ops = opts.loads * opts.rounds
    if len(result.ops) != want_ops:
        problems.append(f"{len(result.ops)} worker operations reported, expected {want_ops}")
    loads, holds = result.loads(), result.holds()
    bad = [o for o in loads if not o["ok"]]
    if bad:
        problems.append(
            f"{len(bad)} of {len(loads)} loads failed ({_kinds(bad)}), e.g. {bad[0]['error']}"
        )
    lost = [o for o in holds if "ended before its release" in o["error"]]
    bad = [o for o in holds if not o["ok"] and _without_lost(o["error"])]
    if bad:
        problems.append(
            f"{len(bad)} of {len(holds)} holds failed ({_kinds(bad)}), "
            f"e.g. {_without_lost(bad[0]['error'])}"
        )
    if lost:
        problems.append(
            f"{len(lost)} of {len(holds)} holds lost their lease early, e.g. {lost[0]['error']}"
        )
    bad_p = [o for o in result.pressure if not o["ok"]]
    if bad_p:
        problems.append(
            f"{len(bad_p)} of {len(result.pressure)} pressure operations failed ({_kinds(bad_p)}), "
            f"e.g. {bad_p[0]['kind']} {bad_p[0]['ref']}: {bad_p[0]['error']}"
        )
    want_storm = opts.status * (opts.status_bursts if opts.status else 0)
    bad_s = [s for s in result.storm if s["status"] != 200]
    if len(result.storm) != want_storm or bad_s:
        example = f", e.g. {bad_s[0]['status']} {bad_s[0]['error']}" if bad_s else ""
        problems.append(
            f"{len(result.storm) - len(bad_s)} of {want_storm} status requests answered 200"
            + example
        )
    over = [s for s in result.samples if s["budget"] and s["used"] > s["budget"]]
    if over:
        idle = sum(1 for s in over if not s["pulls"])
        problems.append(
            f"{len(over)} of {len(result.samples)} samples over the budget of "
            f"{result.budget_bytes} bytes ({idle} with no pull in flight), up to "
            f"{max(s['used'] for s in over)} bytes"
        )
    if not result.samples:
        problems.append("no sample of the cache's size was taken")
    for w in result.workers:
        if w["returncode"] != 0:
            problems.append(f"worker {w['pid']} exited {w['returncode']}: {w['stderr'][-500:]}")
    counters = result.final_status.get("counters", {})
    if not counters.get("evictions"):
        problems.append("the daemon never evicted: no eviction pressure")
    if result.daemon_errors:
        problems.append(
            f"the daemon logged {len(result.daemon_errors)} errors, e.g. {result.daemon_errors[0]}"
        )
    if result.daemon_exit not in (0, None):
        problems.append(f"the daemon exited {result.daemon_exit} on SIGTERM")
    return problems


# -- the report -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f}"


def _row(label: str, seconds: Sequence[float]) -> str:
    cells = [percentile(seconds, q) for q in (50, 95, 99, 100)]
    return f"| {label} | {len(seconds)} | " + " | ".join(_ms(c) for c in cells) + " |"


def table(result: Result) -> str:
    """The numbers as a Markdown table (milliseconds)."""
    loads = result.loads()
    cold = [o["seconds"] for o in loads if "cache_hit" in o and not o["cache_hit"]]
    hit = [o["seconds"] for o in loads if o.get("cache_hit")]
    holds = result.holds()
    pressure_pulls = [o["seconds"] for o in result.pressure if o["kind"] != "hold"]
    lines = [
        "| what | n | p50 ms | p95 ms | p99 ms | max ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        _row("`GET /v1/status` under load", [s["seconds"] for s in result.storm]),
        _row("load (ensure + map), all", [o["seconds"] for o in loads]),
        _row("load, pulled or joined a pull", cold),
        _row("load, cache hit", hit),
        _row("load, digest of the tensors", [o["digest_s"] for o in loads if "digest_s" in o]),
        _row("hold: leased ensure", [o["seconds"] for o in holds]),
        _row("hold: re-hash while leased", [o["verify_s"] for o in holds if "verify_s" in o]),
        _row("pressure: prefetch / ensure", pressure_pulls),
    ]
    return "\n".join(lines)


def facts(result: Result) -> dict[str, Any]:
    counters = result.final_status.get("counters", {})
    storm = result.storm
    return {
        "loads": len(result.loads()),
        "loads_ok": sum(1 for o in result.loads() if o["ok"]),
        "holds": len(result.holds()),
        "holds_ok": sum(1 for o in result.holds() if o["ok"]),
        "holds_whole": sum(1 for o in result.holds() if not _without_lost(o.get("error", ""))),
        "holds_lost": sum(
            1 for o in result.holds() if "ended before its release" in o.get("error", "")
        ),
        "status_requests": len(storm),
        "status_200": sum(1 for s in storm if s["status"] == 200),
        "max_pending_seen": max(
            [s["pending"] for s in storm] + [s["pending"] for s in result.samples], default=0
        ),
        "max_waiters_seen": max((s["waiters"] for s in storm), default=0),
        "pressure_ops": len(result.pressure),
        "pressure_ok": sum(1 for o in result.pressure if o["ok"]),
        "evictions": counters.get("evictions", 0),
        "evicted_bytes": counters.get("evicted_bytes", 0),
        "misses": counters.get("misses", 0),
        "hits": counters.get("hits", 0),
        "coalesced": counters.get("coalesced", 0),
        "main_pulls": sum(
            1 for o in result.loads() if o.get("origin_bytes", 0) > 0 and not o.get("cache_hit")
        ),
        "budget_bytes": result.budget_bytes,
        "samples": len(result.samples),
        "max_used_bytes": max((s["used"] for s in result.samples), default=0),
        "max_used_idle_bytes": max(
            (s["used"] for s in result.samples if not s["pulls"]), default=0
        ),
        "samples_over_budget": sum(1 for s in result.samples if s["used"] > s["budget"]),
        "idle_samples_over_budget": sum(
            1 for s in result.samples if s["used"] > s["budget"] and not s["pulls"]
        ),
        "worker_rss_max_bytes": max((w.get("rss_bytes", 0) for w in result.workers), default=0),
        "worker_rss_sum_bytes": sum(w.get("rss_bytes", 0) for w in result.workers),
        "daemon_rss_peak_bytes": result.daemon_rss_bytes,
        "wall_s": result.wall_s,
    }


def summary(result: Result) -> str:
    f = facts(result)
    o = result.options
    return "\n".join(
        [
            f"- {o['loads']} concurrent loads per wave x {o['rounds']} waves "
            f"({o['procs']} processes x {o['loads'] // o['procs']}+ threads; every "
            f"{o['hold_every']}th operation a leased re-hash): {f['loads_ok']}/{f['loads']} "
            f"loads bitwise equal to the original, {f['holds_whole']}/{f['holds']} holds found "
            f"every file whole while leased ({f['holds_lost']} lost their lease early)",
            f"- the daemon saw up to {f['max_pending_seen']} ensures at once (`pending` in "
            f"`/v1/status`; `waiters` of one pull up to {f['max_waiters_seen']}); the main "
            "model was pulled "
            f"{f['main_pulls']} times (misses {f['misses']}, coalesced {f['coalesced']}, "
            f"hits {f['hits']} over all models)",
            f"- {f['status_200']}/{f['status_requests']} concurrent `GET /v1/status` answered 200",
            f"- eviction: budget {f['budget_bytes'] / MiB:.1f} MiB "
            f"({o['budget_models']} of {o['models'] + 1} models of "
            f"{result.model_file_bytes / MiB:.1f} MiB), {f['evictions']} revisions evicted "
            f"({f['evicted_bytes'] / MiB:.0f} MiB) by {f['pressure_ok']}/{f['pressure_ops']} "
            f"pressure operations; {f['samples']} samples of the blob bytes: max "
            f"{f['max_used_bytes'] / MiB:.1f} MiB ({f['samples_over_budget']} samples over "
            f"budget), max {f['max_used_idle_bytes'] / MiB:.1f} MiB with no pull in flight "
            f"({f['idle_samples_over_budget']} over budget)",
            f"- memory: worker peak RSS {f['worker_rss_max_bytes'] / MiB:.0f} MiB each "
            f"({f['worker_rss_sum_bytes'] / MiB:.0f} MiB over {len(result.workers)} processes), "
            f"daemon peak {f['daemon_rss_peak_bytes'] / MiB:.0f} MiB; wall {f['wall_s']:.0f} s",
        ]
    )


def _where() -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{machine()}; {versions('torch', 'aiohttp')}; load average {load} at the end "
        "(a shared machine: other work ran beside it)"
    )


def report_section(result: Result, command: str) -> str:
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    verdict = (
        "every check passed"
        if not result.problems
        else "FAILED:\n" + "\n".join(f"  - {p}" for p in result.problems)
    )
    return "\n".join(
        [
            BEGIN,
            "## Concurrent loads under eviction pressure and a status storm",
            "",
            "`loadtest/load.py` runs the real daemon against a local SeaweedFS: waves of",
            "concurrent `weightcache.load` calls of one model (each compared bitwise with",
            "the original shards) and leased re-hashes of its snapshot, while other models",
            "are pulled into a byte budget too small for all of them, and a burst of",
            "concurrent `GET /v1/status` hits the Unix socket during the first wave.",
            "`tests/faults/test_load_short.py` runs a small version in the test suite,",
            "and reproduces each bug this test has found on its own (strict xfails).",
            "",
            f"Run {stamp}: `{command}`",
            "",
            f"Machine: {_where()}",
            "",
            summary(result),
            "",
            table(result),
            "",
            f"Result: {verdict}",
            END,
        ]
    )


# -- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    d = Options()
    p = argument_parser("loadtest/load.py", __doc__)
    p.add_argument("--loads", type=int, default=d.loads, help="concurrent loads per wave")
    p.add_argument("--procs", type=int, default=d.procs, help="worker processes")
    p.add_argument("--rounds", type=int, default=d.rounds, help="waves of loads")
    p.add_argument("--hold-every", type=int, default=d.hold_every, help="k: every k-th a hold")
    p.add_argument("--models", type=int, default=d.models, help="models besides the main one")
    p.add_argument("--model-bytes", type=parse_size, default=d.model_bytes, help="e.g. 32MiB")
    p.add_argument("--shards", type=int, default=d.shards)
    p.add_argument("--chunk-bytes", type=parse_size, default=d.chunk_bytes)
    p.add_argument("--budget-models", type=float, default=d.budget_models)
    p.add_argument("--pressure-threads", type=int, default=d.pressure_threads)
    p.add_argument("--status", type=int, default=d.status, help="concurrent status requests")
    p.add_argument("--status-bursts", type=int, default=d.status_bursts)
    p.add_argument("--sample-s", type=float, default=d.sample_s)
    p.add_argument("--gap-s", type=float, default=d.gap_s)
    p.add_argument("--fetch-concurrency", type=int, default=d.fetch_concurrency)
    p.add_argument("--timeout-s", type=float, default=d.timeout_s)
    p.add_argument(
        "--endpoint",
        help="an S3 server that already runs (credentials from AWS_*); default: start SeaweedFS",
    )
    p.add_argument(
        "--bucket",
        default="weightcache-load",
        help="with --endpoint: the bucket to use as it is; else the new bucket's name prefix",
    )
    add_run_options(p, report=REPORT)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return worker_main(json.loads(argv[1]))
    args = parse_args(argv)
    opts = Options(
        **{
            k: getattr(args, k)
            for k in Options.__dataclass_fields__
            if getattr(args, k, None) is not None
        }
    )
    try:
        with (
            scratch(args.workdir, "wc-load-") as work,
            local_origin(work, args.bucket, endpoint=args.endpoint or "") as origin,
        ):
            result = run(
                opts, s3_env=origin.env, bucket=origin.bucket, workdir=work / "run", log=say
            )
    except DemoFailed as exc:  # ScenarioFailed, or a daemon that would not start
        print(f"FAILED: {exc}")
        return 1
    print()
    print(summary(result))
    print()
    print(table(result))
    print()
    return finish(
        args,
        section="load",
        heading="# Reliability",
        report=lambda: report_section(result, command("load.py", argv)),
        measurements=asdict(result),
        problems=result.problems,
        passed="every check passed",
    )


if __name__ == "__main__":
    raise SystemExit(main())
