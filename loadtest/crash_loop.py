"""Crash loop: ``kill -9`` the node daemon mid-pull again and again; every pull still completes.

    .venv/bin/python loadtest/crash_loop.py                       # 20 models, 20 kills
    .venv/bin/python loadtest/crash_loop.py --models 40 --kills 60 --seed 7 --report
    .venv/bin/python -m loadtest.crash_loop --help                # the same, as a module

Against the real daemon (``python -m weightcache daemon``, a subprocess) and a
real local SeaweedFS (:class:`weightcache.demo.seaweed.SeaweedServer`):

* ``--models`` different multi-shard fp16 safetensors models
  (:func:`weightcache.demo.synthetic.make_model`, a seed each, so no two share
  a blob except the identical tokenizer files) are published under their own
  prefixes, with small manifest chunks so a pull is many ranged GETs;
* the daemon is throttled (``WEIGHTCACHE_FETCH_MAX_BYTES_PER_S``) so pulls take
  seconds; the driver keeps ``--window`` models requested at a time, half of
  them as prefetch jobs (``POST /v1/prefetch``, posted once, never again) and
  half as worker requests (``POST /v1/ensure`` from a thread that retries when
  the daemon goes away, as a worker would);
* the daemon is killed with SIGKILL ``--kills`` times at points a seeded RNG
  picks: mostly when the bytes on disk (committed blobs plus verified chunks)
  reach a random fraction of the total, sometimes the moment a restarted daemon
  reports ready (in the middle of resuming). After every kill it is restarted
  on the same socket path, whose stale socket file must not stop it.

At the end every model must be complete (its snapshot present, every file
hashing to what was published, a further ensure a cache hit), every prefetch
job done though it was posted only once (the daemon resumed it after each kill
by itself), ``weightcache verify`` clean, no ``.part`` file left, and the
origin must have sent at most 1.3x the bytes of the models.
``tests/faults/test_crash_loop.py`` runs a small version of it as a program.

It prints a table of the kills and a summary; ``--json PATH`` writes every
measurement (:class:`Result`) there, and ``--report`` writes the numbers, the
command and the machine into ``docs/reliability.md`` between
``<!-- crash:begin -->`` and ``<!-- crash:end -->``. Exit status 1 when a check
failed or a step could not be carried out.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if not __package__:
    # Run as a file (python loadtest/crash_loop.py): import loadtest from this
    # checkout, as python -m loadtest.crash_loop does.
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
from weightcache.client.daemon import UnixHTTPConnection
from weightcache.config import parse_size
from weightcache.demo import DemoFailed

MiB = 1 << 20
REPORT = ROOT / "docs" / "reliability.md"
BEGIN, END = markers("crash")
#: how often the driver looks at the cache and the worker threads
POLL_S = 0.02
#: the origin may send at most this multiple of the models' bytes
MAX_ORIGIN_RATIO = 1.3
#: a daemon that is not ready this long after its start fails the run
START_TIMEOUT_S = 120.0


# -- parameters and results ---------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    models: int = 20
    kills: int = 20
    shards: int = 3
    #: tensor bytes per shard (each shard also has a small safetensors header)
    shard_bytes: int = 8 * MiB
    #: manifest chunk size: the unit of ranged GETs, of verification and of resume
    chunk_bytes: int = 1 * MiB
    #: the daemon's origin rate limit (WEIGHTCACHE_FETCH_MAX_BYTES_PER_S)
    rate_bytes_per_s: int = 24 * MiB
    #: the daemon's concurrent origin requests (WEIGHTCACHE_FETCH_CONCURRENCY)
    concurrency: int = 4
    #: models requested at a time
    window: int = 2
    #: chance that a kill lands the moment a restarted daemon is ready
    startup_kill_p: float = 0.2
    seed: int = 0
    #: no byte of progress for this long fails the run
    stall_s: float = 120.0


@dataclass
class Model:
    name: str
    ref: str
    revision: str
    directory: str
    #: relative path -> BLAKE3 of the published file
    files: dict[str, str]
    bytes: int
    #: "prefetch" (a job, posted once) or "ensure" (a worker request, retried)
    mode: str
    posts: int = 0
    #: worker requests the daemon was killed in the middle of
    ensure_cut: int = 0
    completed_s: float | None = None


@dataclass
class Kill:
    n: int
    at_s: float
    kind: str  # progress | startup
    target_bytes: int
    progress_bytes: int
    #: verified chunks of unfinished downloads: what the next pulls must not fetch again
    partial_bytes: int
    #: ``.part`` files at the moment of the kill: a download was in progress
    part_files: int
    models_done: int


@dataclass
class Result:
    params: Params
    total_bytes: int = 0
    origin_bytes: int = 0
    kills: list[Kill] = field(default_factory=list)
    #: seconds from each kill to the restarted daemon answering /healthz ready
    restart_s: list[float] = field(default_factory=list)
    #: restarts that found the killed daemon's socket file still there
    stale_sockets: int = 0
    #: bytes of verified chunks that survived a kill, as the pulls that finished counted them
    resumed_bytes: int = 0
    #: "fetch.resumed" log lines: a blob download picked up from its chunk log
    resumed_blobs: int = 0
    #: "pull.resumed" log lines: an interrupted pull the restarted daemon finished by itself
    resumed_pulls: int = 0
    #: worker ensures cut by a kill (each asked again of the restarted daemon)
    ensure_cut: int = 0
    #: ("pull", rev) records left in the index after every pull completed
    stale_pull_records: int = 0
    seconds: float = 0.0
    pull_seconds: float = 0.0
    verify_rc: int | None = None
    verify_out: str = ""
    leftover_parts: int = 0
    models: list[Model] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    log_path: str = ""

    @property
    def ratio(self) -> float:
        return self.origin_bytes / self.total_bytes if self.total_bytes else 0.0

    @property
    def mid_pull_kills(self) -> int:
        return sum(1 for k in self.kills if k.part_files > 0)


# -- the daemon as a subprocess ---------------------------------------------------------


def call(
    sock: Path, method: str, path: str, body: Any = None, timeout: float = 60.0
) -> tuple[int, Any]:
    """One JSON request over the daemon's Unix socket."""
    conn = UnixHTTPConnection(sock, timeout=timeout, read_timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


#: what a request to a daemon that was just killed (or is not up yet) raises
GONE = (OSError, http.client.HTTPException)


# -- models ---------------------------------------------------------------------------------


def publish_models(
    params: Params, env: dict[str, str], bucket: str, workdir: Path, rng: random.Random
) -> list[Model]:
    from weightcache.config import load_config
    from weightcache.demo.synthetic import make_model
    from weightcache.hashing import digest_file
    from weightcache.publish import publish
    from weightcache.refs import parse_ref

    cfg = load_config(
        env={
            **env,
            "WEIGHTCACHE_PUBLISH_CHUNK_BYTES": str(params.chunk_bytes),
            "WEIGHTCACHE_PUBLISH_PART_BYTES": str(max(5 * MiB, params.chunk_bytes)),
        }
    )
    modes = ["prefetch", "ensure"] * ((params.models + 1) // 2)
    rng.shuffle(modes)
    models = []
    for i in range(params.models):
        name = f"model-{i:03d}"
        directory = workdir / "models" / name
        make_model(
            directory,
            total_bytes=params.shards * params.shard_bytes,
            shards=params.shards,
            dtype="fp16",
            seed=rng.getrandbits(32),
        )
        ref = f"s3://{bucket}/crash-loop/{name}"
        published = publish(directory, parse_ref(ref), cfg)
        files = {
            p.relative_to(directory).as_posix(): digest_file(p)
            for p in sorted(directory.rglob("*"))
            if p.is_file()
        }
        size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
        models.append(Model(name, ref, published.revision, str(directory), files, size, modes[i]))
    return models


# -- observing the cache ---------------------------------------------------------------------


def progress_bytes(cache: Path, chunk_bytes: int) -> tuple[int, int, int]:
    """How far the pulls are: (bytes committed or verified on disk, of which in
    verified chunks of unfinished downloads, ``.part`` files open)."""
    committed = chunks = parts = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(cache / "blobs"):
            with contextlib.suppress(FileNotFoundError):
                committed += entry.stat().st_size
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(cache / "partial"):
            if entry.name.endswith(".part"):
                parts += 1
            elif entry.name.endswith(".chunks"):
                with contextlib.suppress(FileNotFoundError):
                    chunks += entry.stat().st_size // 4 * chunk_bytes
    return committed + chunks, chunks, parts


def complete(cache: Path, model: Model) -> bool:
    return (cache / "snapshots" / model.revision).is_dir()


# -- the scenario -------------------------------------------------------------------------------


class _Worker(threading.Thread):
    """A worker's ``POST /v1/ensure``, asked again whenever the daemon goes away meanwhile."""

    def __init__(self, sock: Path, model: Model, stop: threading.Event) -> None:
        super().__init__(name=f"ensure-{model.name}", daemon=True)
        self.sock, self.model, self.stop = sock, model, stop
        self.result: dict[str, Any] | None = None
        self.error: str | None = None

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status, body = call(
                    self.sock, "POST", "/v1/ensure", {"ref": self.model.ref, "lease": False}, 600
                )
            except (ConnectionRefusedError, FileNotFoundError):
                self.stop.wait(0.05)  # the daemon is down: ask the restarted one
                continue
            except GONE:
                self.model.ensure_cut += 1  # killed while answering us: ask again
                self.stop.wait(0.05)
                continue
            if status == 200:
                self.result = body
                return
            code = (body or {}).get("error", {}).get("code")
            if status == 503 and code in ("shutting_down", "overloaded"):
                self.stop.wait(0.05)
                continue
            self.error = f"{self.model.name}: ensure answered {status}: {body}"
            return


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text))


def run(
    params: Params,
    *,
    env: dict[str, str],
    bucket: str,
    sent_bytes: Callable[[], int],
    workdir: Path,
    log: Callable[[str], None] = lambda _: None,
) -> Result:
    """Publish, pull through a daemon killed ``params.kills`` times, then check everything."""
    started = time.monotonic()
    rng = random.Random(params.seed)
    result = Result(params)
    workdir.mkdir(parents=True, exist_ok=True)
    models = publish_models(params, env, bucket, workdir, rng)
    result.models = models
    result.total_bytes = sum(m.bytes for m in models)
    log(
        f"published {len(models)} models, {result.total_bytes / MiB:.1f} MiB "
        f"({params.shards} shards of {params.shard_bytes / MiB:.1f} MiB each)"
    )

    # Where each kill lands: a byte target (sorted, so they spread over the run), or
    # "startup" (the moment a restarted daemon is ready). The first is always a
    # byte target: the first start has nothing to resume.
    kinds = [
        "startup" if i and rng.random() < params.startup_kill_p else "progress"
        for i in range(params.kills)
    ]
    targets = sorted(int(rng.uniform(0.03, 0.97) * result.total_bytes) for _ in kinds)

    cache, sock = workdir / "cache", workdir / "run" / "wc.sock"
    cache.mkdir(parents=True, exist_ok=True)
    daemon_env = {
        **env,
        "WEIGHTCACHE_FETCH_MAX_BYTES_PER_S": str(params.rate_bytes_per_s),
        "WEIGHTCACHE_FETCH_CONCURRENCY": str(params.concurrency),
    }
    daemon = Daemon(cache, sock, daemon_env, workdir / "daemon.log", verbose=True, cwd=ROOT)
    result.log_path = str(daemon.log)
    stop = threading.Event()
    workers: dict[str, _Worker] = {}
    requested: set[str] = set()
    before = sent_bytes()
    pull_started = time.monotonic()

    def request(model: Model) -> None:
        requested.add(model.name)
        if model.mode == "ensure":
            worker = _Worker(sock, model, stop)
            workers[model.name] = worker
            worker.start()
            return
        # Posted once: the kills happen on this thread, so the daemon is up now;
        # after a kill the persisted job must be resumed by the daemon itself.
        model.posts += 1
        status, body = call(sock, "POST", "/v1/prefetch", {"ref": model.ref})
        if status != 202:
            raise ScenarioFailed(f"{model.name}: prefetch answered {status}: {body}")

    def kill(kind: str, target: int) -> None:
        done, partial, parts = progress_bytes(cache, params.chunk_bytes)
        daemon.kill()
        k = Kill(
            n=len(result.kills) + 1,
            at_s=time.monotonic() - pull_started,
            kind=kind,
            target_bytes=target,
            progress_bytes=done,
            partial_bytes=partial,
            part_files=parts,
            models_done=sum(complete(cache, m) for m in models),
        )
        result.kills.append(k)
        log(
            f"kill {k.n}/{params.kills} ({kind}) at {k.at_s:.1f}s: "
            f"{done / MiB:.1f}/{result.total_bytes / MiB:.1f} MiB on disk, "
            f"{parts} downloads open, {k.models_done} models done"
        )

    try:
        daemon.start(timeout_s=START_TIMEOUT_S)
        while True:
            # One incarnation of the daemon: feed the window, kill at the next point.
            last_done, last_move = -1, time.monotonic()
            killed = False
            while True:
                pending = [m for m in models if not complete(cache, m)]
                for m in models:
                    if m.completed_s is None and complete(cache, m):
                        m.completed_s = time.monotonic() - pull_started
                finished = not pending and all(not w.is_alive() for w in workers.values())
                if finished:
                    break
                for m in pending[: params.window]:
                    if m.name not in requested:
                        request(m)
                done, _partial, _parts = progress_bytes(cache, params.chunk_bytes)
                n = len(result.kills)
                if n < params.kills and kinds[n] == "progress" and done >= targets[n]:
                    kill("progress", targets[n])
                    killed = True
                    break
                if done != last_done:
                    last_done, last_move = done, time.monotonic()
                elif time.monotonic() - last_move > params.stall_s:
                    raise ScenarioFailed(
                        f"no progress for {params.stall_s:.0f}s at {done} bytes:\n{daemon.tail()}"
                    )
                if not daemon.alive():
                    raise ScenarioFailed(f"the daemon died by itself:\n{daemon.tail()}")
                time.sleep(POLL_S)
            if not killed:
                break
            # Restart on the same socket path (its stale file is still there), and
            # kill again at once when the RNG said "startup".
            while True:
                if sock.exists():
                    result.stale_sockets += 1
                t = time.monotonic()
                daemon.start(timeout_s=START_TIMEOUT_S)
                result.restart_s.append(time.monotonic() - t)
                n = len(result.kills)
                if n < params.kills and kinds[n] == "startup":
                    kill("startup", 0)
                    continue
                break
        result.pull_seconds = time.monotonic() - pull_started
        log(f"every model complete after {result.pull_seconds:.1f}s and {len(result.kills)} kills")
        for w in workers.values():
            w.join(timeout=60)
        _check(result, daemon, cache, sock, workers)
    finally:
        stop.set()
        daemon.kill()
    result.origin_bytes = sent_bytes() - before
    if result.ratio > MAX_ORIGIN_RATIO:
        result.problems.append(
            f"the origin sent {result.origin_bytes} bytes, {result.ratio:.3f}x the models "
            f"(at most {MAX_ORIGIN_RATIO}x)"
        )
    _read_log(result, daemon.log)
    result.seconds = time.monotonic() - started
    return result


def _check(
    result: Result, daemon: Daemon, cache: Path, sock: Path, workers: dict[str, _Worker]
) -> None:
    """Every pull complete and right, jobs done, verify clean; stops the daemon."""
    from weightcache.hashing import digest_file

    problems = result.problems
    for w in workers.values():
        if w.error:
            problems.append(w.error)
        elif w.result is None:
            problems.append(f"{w.model.name}: the worker never got an answer")
        result.ensure_cut += w.model.ensure_cut
    for m in result.models:
        snap = cache / "snapshots" / m.revision
        for rel, want in m.files.items():
            try:
                got = digest_file(snap / rel)
            except FileNotFoundError:
                problems.append(f"{m.name}: {rel} missing from snapshot {m.revision[:16]}")
                continue
            if got != want:
                problems.append(f"{m.name}: {rel} hashes to {got}, published {want}")
        status, body = call(sock, "POST", "/v1/ensure", {"ref": m.ref, "lease": False})
        if status != 200 or not body.get("cache_hit") or body.get("revision") != m.revision:
            problems.append(f"{m.name}: a further ensure was not a cache hit: {status} {body}")
    status, body = call(sock, "GET", "/v1/jobs")
    jobs = body["jobs"] if status == 200 else []
    for m in result.models:
        if m.mode != "prefetch":
            continue
        mine = [j for j in jobs if j["ref"] == m.ref]
        if m.posts != 1 or len(mine) != 1 or mine[0]["state"] != "done":
            problems.append(
                f"{m.name}: posted {m.posts}x, jobs {[(j['id'], j['state']) for j in mine]}"
            )
    rc = daemon.stop(timeout_s=60.0)
    if rc != 0:
        problems.append(f"the last daemon exited {rc} on SIGTERM")
    from weightcache.index import Index

    index = Index(cache / "index")
    try:
        stale = [rev for rev, _ in index.items("pull")]
    finally:
        index.close()
    # Not counted as a failure here: a known bug with its own deterministic test
    # (tests/faults/test_crash_loop.py, xfail), reported in the summary.
    result.stale_pull_records = len(stale)
    result.leftover_parts = len(list((cache / "partial").glob("*.part")))
    if result.leftover_parts:
        problems.append(f"{result.leftover_parts} .part files left after every pull completed")
    out = subprocess.run(
        [sys.executable, "-m", "weightcache", "verify"],
        env=daemon.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    result.verify_rc, result.verify_out = out.returncode, (out.stdout + out.stderr).strip()
    if out.returncode != 0 or "no problems found" not in out.stdout:
        problems.append(f"weightcache verify exited {out.returncode}: {result.verify_out}")
    if result.stale_sockets != len(result.kills):
        problems.append(
            f"{len(result.kills)} kills but {result.stale_sockets} restarts found a stale socket"
        )


def _read_log(result: Result, path: Path) -> None:
    text = path.read_text(errors="replace") if path.exists() else ""
    result.resumed_pulls = _count(r"pull\.resumed ", text)
    result.resumed_blobs = _count(r"fetch\.resumed ", text)
    result.resumed_bytes = sum(
        int(n) for n in re.findall(r"ensure\.done .*?resumed_bytes=(\d+)", text)
    )
    failures = _count(r"request\.failed|Traceback", text)
    if failures:
        result.problems.append(f"the daemon logged {failures} internal errors; see {path}")


# -- output ---------------------------------------------------------------------------------------


def kill_table(result: Result) -> str:
    rows = [
        "  #      t  kind       target MiB  on disk MiB  in chunks MiB  open .part  models done"
    ]
    for k in result.kills:
        target = f"{k.target_bytes / MiB:10.1f}" if k.kind == "progress" else f"{'-':>10}"
        rows.append(
            f"{k.n:3d} {k.at_s:6.1f}s {k.kind:<9} {target}  {k.progress_bytes / MiB:11.1f}"
            f"  {k.partial_bytes / MiB:13.1f}  {k.part_files:10d}  {k.models_done:4d}/"
            f"{len(result.models)}"
        )
    return "\n".join(rows)


def summary_rows(result: Result) -> list[tuple[str, str]]:
    p = result.params
    restarts = result.restart_s or [0.0]
    prefetch = sum(1 for m in result.models if m.mode == "prefetch")
    last_line = result.verify_out.splitlines()[-1] if result.verify_out else "-"
    rate = result.total_bytes / result.pull_seconds if result.pull_seconds else 0.0
    return [
        ("seed", str(p.seed)),
        (
            "models",
            f"{len(result.models)} ({prefetch} prefetch jobs, {len(result.models) - prefetch} "
            f"worker ensures), {p.shards} shards of {p.shard_bytes / MiB:.1f} MiB, "
            f"{result.total_bytes / MiB:.1f} MiB in all",
        ),
        (
            "daemon",
            f"{p.rate_bytes_per_s / MiB:.0f} MiB/s, {p.concurrency} origin requests, "
            f"{p.chunk_bytes / MiB:.2f} MiB chunks, {p.window} models requested at a time",
        ),
        (
            "kills (SIGKILL)",
            f"{len(result.kills)}: {result.mid_pull_kills} with a download open, "
            f"{sum(k.kind == 'startup' for k in result.kills)} the moment a restart was ready",
        ),
        (
            "restart to ready",
            f"median {statistics.median(restarts):.2f}s, max {max(restarts):.2f}s; "
            f"{result.stale_sockets} stale sockets removed",
        ),
        (
            "origin bytes",
            f"{result.origin_bytes / MiB:.1f} MiB = {result.ratio:.3f}x the models "
            f"(limit {MAX_ORIGIN_RATIO}x)",
        ),
        (
            "resumed",
            f"{result.resumed_bytes / MiB:.1f} MiB kept across kills; {result.resumed_blobs} "
            f"blob downloads and {result.resumed_pulls} pulls resumed by a restarted daemon",
        ),
        ("worker ensures cut by a kill", f"{result.ensure_cut} (each asked again)"),
        (
            "pull records left",
            f"{result.stale_pull_records} (a pull killed after linking its snapshot is "
            "never forgotten: known bug)"
            if result.stale_pull_records
            else "0",
        ),
        (
            "verify",
            f"exit {result.verify_rc}: {last_line}",
        ),
        (
            "time",
            f"{result.pull_seconds:.1f}s pulling ({rate / MiB:.1f} MiB/s on average), "
            f"{result.seconds:.1f}s in all",
        ),
        ("result", "PASS" if not result.problems else f"FAIL ({len(result.problems)} problems)"),
    ]


def summary(result: Result) -> str:
    rows = summary_rows(result)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def report_section(result: Result, command: str) -> str:
    where = f"{machine()}; {versions()}"
    table = "\n".join(f"| {k} | {v} |" for k, v in summary_rows(result))
    return f"""{BEGIN}
## Crash loop: `kill -9` of the daemon mid-pull

`loadtest/crash_loop.py` runs the real daemon (`python -m weightcache daemon`, a
subprocess) against a real local SeaweedFS. It publishes distinct multi-shard
safetensors models under their own prefixes and has the daemon pull them,
throttled (`WEIGHTCACHE_FETCH_MAX_BYTES_PER_S`) so that pulls take seconds. The
driver keeps a window of models requested: half as prefetch jobs
(`POST /v1/prefetch`, posted once and never again), half as worker requests
(`POST /v1/ensure` from threads that ask again when the daemon goes away). A
seeded RNG picks where `SIGKILL` lands: mostly when the bytes on disk (committed
blobs plus verified chunks) reach a random fraction of the total, sometimes the
moment a restarted daemon is ready, in the middle of resuming. After every kill
the daemon is restarted on the same socket path; the killed daemon's socket file
is still there and must not stop it.

Checks at the end: every model's snapshot is present and every file hashes to
what was published; a further ensure of each is a cache hit; every prefetch job
is `done` although it was posted once (the restarted daemons resumed it by
themselves, from the job and pull records in the index); no `.part` file is
left; the last daemon stops cleanly on SIGTERM; `weightcache verify` exits 0
with "no problems found"; the daemon logged no internal error; and SeaweedFS's
own counter of bytes sent from the bucket is at most {MAX_ORIGIN_RATIO}x the
bytes of the models. A kill loses at most what each transfer in flight
received since its last checkpoint (every 1 MiB the part file is synced and the
byte reached is recorded; a resumed chunk asks only for the rest): at most
`concurrency` transfers are ever receiving, so a kill wastes at most about
`concurrency x 1 MiB`, whatever the chunk size.

Each start of the daemon begins with a full token bucket (one second's worth
of the rate limit), so a daemon restarted every fraction of a second pulls
faster on average than its configured rate (the "time" row).

`tests/faults/test_crash_loop.py` runs a short version (4 models of 3 x 2 MiB,
half-MiB chunks, 5 kills, 8 MiB/s) in `make test` in 5-30 s, with a random seed
it prints (`CRASH_LOOP_SEED=N` repeats one):

    .venv/bin/python -m pytest tests/faults/test_crash_loop.py -s

Known bug, found by this loop (now and then; see "pull records left"): a kill after a
pull linked its snapshot but before it dropped its pull record leaves the record
in the index for good. `Service._resume_pulls` finds the snapshot complete (a
cache hit) and never deletes the record, so every restart "resumes" it again,
and once the model is evicted the next restart pulls it back from the origin.
`test_a_pull_killed_after_linking_its_snapshot_is_not_resumed_forever`
reproduces it deterministically (a strict xfail until it is fixed); the loop
counts the records left ("pull records left") without failing on them.

Last run ({time.strftime("%Y-%m-%d")}, {where}):

    {command}

| | |
| --- | --- |
{table}

<details><summary>Kills</summary>

```
{kill_table(result)}
```

</details>
{END}"""


# -- command line ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    d = Params()
    p = argument_parser("loadtest/crash_loop.py", __doc__)
    p.add_argument("--models", type=int, default=d.models, help="models to pull (default 20)")
    p.add_argument("--kills", type=int, default=d.kills, help="SIGKILLs of the daemon")
    p.add_argument("--shards", type=int, default=d.shards, help="safetensors shards per model")
    p.add_argument("--shard-bytes", type=parse_size, default=d.shard_bytes, help="e.g. 8MiB")
    p.add_argument(
        "--chunk-bytes", type=parse_size, default=d.chunk_bytes, help="manifest chunk size"
    )
    p.add_argument("--rate", type=parse_size, default=d.rate_bytes_per_s, help="origin bytes/s")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="origin requests")
    p.add_argument("--window", type=int, default=d.window, help="models requested at a time")
    p.add_argument("--startup-kill-p", type=float, default=d.startup_kill_p)
    p.add_argument("--seed", type=int, help="RNG seed (default: random, printed)")
    add_run_options(p, report=REPORT)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    params = Params(
        models=args.models,
        kills=args.kills,
        shards=args.shards,
        shard_bytes=args.shard_bytes,
        chunk_bytes=args.chunk_bytes,
        rate_bytes_per_s=args.rate,
        concurrency=args.concurrency,
        window=args.window,
        startup_kill_p=args.startup_kill_p,
        seed=seed,
    )
    shown = [a for a in argv if a != "--report" and not a.startswith("--report=")]
    if args.seed is None:
        shown += ["--seed", str(seed)]

    say(f"seed {seed} (repeat with --seed {seed})")
    try:
        with scratch(args.workdir, "wc-crash-") as work, local_origin(work, "crash-loop") as origin:
            assert origin.sent_bytes is not None  # a local SeaweedFS counts what it sends
            result = run(
                params,
                env=child_env(origin.env),
                bucket=origin.bucket,
                sent_bytes=origin.sent_bytes,
                workdir=work / "run",
                log=say,
            )
    except DemoFailed as exc:  # ScenarioFailed, or a daemon that would not start
        print(f"FAILED: {exc}")
        return 1
    print()
    print(kill_table(result))
    print()
    print(summary(result))
    print()
    measurements = asdict(result)
    measurements.update(ratio=result.ratio, mid_pull_kills=result.mid_pull_kills)
    return finish(
        args,
        section="crash",
        heading="# Reliability",
        report=lambda: report_section(result, command("crash_loop.py", shown)),
        measurements=measurements,
        problems=result.problems,
    )


if __name__ == "__main__":
    sys.exit(main())
