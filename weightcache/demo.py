"""``weightcache demo`` (what ``make demo`` runs): one node, one origin, no download storm.

In a temporary directory, removed on exit (also on errors and Ctrl-C):

1. start a local SeaweedFS with an S3 gateway (:mod:`weightcache.seaweed`);
2. generate a sharded safetensors model (:mod:`weightcache.synthetic`);
3. publish it to ``s3://demo/models/synthetic``;
4. start N worker processes that share one cache directory, hold them at a
   barrier until every one has imported torch and weightcache, then release
   them together: each calls ``weightcache.load_with_report(ref, "cpu")`` and
   prints its report as one JSON line;
5. load once more in this process (a warm load, a cache hit);
6. check that every load saw the same revision and tensors bitwise equal to
   ``safetensors.torch.load_file`` of the original shards, and that the origin
   sent the model about once, not N times (its own byte counter says so).

Exit status 0 when every check holds, 1 otherwise (2 for bad arguments). The workers run this module
as ``python -m weightcache.demo worker REF``.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from weightcache.client.report import LoadReport
    from weightcache.seaweed import SeaweedServer

BUCKET = "demo"
REF = f"s3://{BUCKET}/models/synthetic"
SHARDS = 4
#: a ratio of origin bytes to model bytes at or above this means the storm was not prevented
MAX_RATIO = 1.5
#: how long workers may take to import torch and weightcache and reach the barrier
READY_TIMEOUT_S = 90.0
#: how long the concurrent loads may take, barrier to last report
LOAD_TIMEOUT_S = 240.0

_GO = "go"


class DemoFailed(Exception):
    """A step of the demo could not be carried out (not a failed check: those are listed)."""


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


# -- the digest every load is compared by --------------------------------------------


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """One BLAKE3 over names, dtypes, shapes and raw bytes: equal only for bitwise-equal loads."""
    from weightcache.hashing import Hasher

    h = Hasher()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            # Raw bytes, whatever the dtype (numpy has no bfloat16).
            h.update(_raw(t).numpy().data)
    return h.hexdigest()


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` as a flat uint8 tensor (no copy when it is contiguous)."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8)


def _bitwise_differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    import torch

    problems: list[str] = []
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        problems.append(f"tensor names differ (missing {missing[:3]}, extra {extra[:3]})")
    for name in sorted(set(got) & set(want)):
        g, w = got[name], want[name]
        if g.dtype != w.dtype or g.shape != w.shape:
            problems.append(f"{name}: {g.dtype}{tuple(g.shape)} != {w.dtype}{tuple(w.shape)}")
        elif w.numel() and not torch.equal(_raw(g), _raw(w)):
            problems.append(f"{name}: bytes differ")
    return problems


# -- worker processes ------------------------------------------------------------


def _emit(doc: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


def worker_main(ref: str) -> int:
    """One worker: import everything, wait for ``go`` on stdin, load, report as JSON."""
    # Imported before the barrier, so that the timed load is the load alone, as
    # in a serving worker that has its libraries loaded when weights are wanted.
    import torch  # noqa: F401

    import weightcache
    import weightcache.client.loader
    import weightcache.node
    import weightcache.origin.s3  # the S3 client takes ~0.1 s to import: not a load phase
    from weightcache.errors import WeightcacheError

    _emit({"event": "ready", "pid": os.getpid()})
    if sys.stdin.readline().strip() != _GO:
        return 2  # the parent went away
    started = time.time()
    try:
        tensors, report = weightcache.load_with_report(ref, "cpu")
    except WeightcacheError as exc:
        _emit({"event": "error", "code": exc.code, "message": str(exc)})
        return 1
    _emit(
        {
            "event": "done",
            "started": started,
            "report": report.to_json(),
            "tensors": len(tensors),
            "digest": tensors_digest(tensors),
        }
    )
    return 0


@dataclass
class _Worker:
    number: int
    proc: subprocess.Popen[str]
    lines: queue.Queue[dict[str, Any] | None] = field(default_factory=queue.Queue)
    stderr: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    threads: list[threading.Thread] = field(default_factory=list)

    def start_readers(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        readers = ((self._read_out, self.proc.stdout), (self._read_err, self.proc.stderr))
        for target, stream in readers:
            t = threading.Thread(target=target, args=(stream,), daemon=True)
            t.start()
            self.threads.append(t)

    def _read_out(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                self.stderr.append(line)  # not ours: keep it for the failure message
                continue
            if isinstance(doc, dict):
                self.lines.put(doc)
        self.lines.put(None)  # end of output

    def _read_err(self, stream: IO[str]) -> None:
        for line in stream:
            self.stderr.append(line)

    def next_event(self, deadline: float) -> dict[str, Any]:
        try:
            doc = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise DemoFailed(f"worker {self.number} gave no answer in time{self._tail()}") from None
        if doc is None:
            self.proc.wait()
            raise DemoFailed(
                f"worker {self.number} exited with status {self.proc.returncode}{self._tail()}"
            )
        return doc

    def _tail(self) -> str:
        for t in self.threads:
            t.join(timeout=1.0)
        text = "".join(self.stderr).rstrip()
        return f"; its last output:\n{text}" if text else ""

    def release(self) -> None:
        """Let the worker past the barrier; a dead one shows up in :meth:`next_event`."""
        assert self.proc.stdin is not None
        with suppress(BrokenPipeError):
            self.proc.stdin.write(_GO + "\n")
            self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        # The pipes are at EOF once the process is gone: let the readers finish
        # before their streams are closed under them.
        for t in self.threads:
            t.join(timeout=5.0)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with suppress(OSError):
                    stream.close()


def _worker_env(server_env: dict[str, str], cache_dir: Path) -> dict[str, str]:
    # Nothing of the caller's weightcache or AWS settings may leak in: a
    # WEIGHTCACHE_SOCKET, say, would send the workers to a daemon outside the demo.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEIGHTCACHE_", "AWS_"))}
    env.update(server_env)
    env["WEIGHTCACHE_CACHE_DIR"] = str(cache_dir)
    return env


def _start_workers(n: int, env: dict[str, str], cwd: Path) -> list[_Worker]:
    workers: list[_Worker] = []
    try:
        for number in range(1, n + 1):
            proc = subprocess.Popen(
                [sys.executable, "-m", "weightcache.demo", "worker", REF],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=cwd,
            )
            w = _Worker(number, proc)
            w.start_readers()
            workers.append(w)
    except BaseException:
        for w in workers:
            w.stop()
        raise
    return workers


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


def _cold_loads(n_workers: int, env: dict[str, str], cwd: Path) -> list[_Load]:
    """Start the workers, release them together at the barrier, collect their reports."""
    workers = _start_workers(n_workers, env, cwd)
    try:
        with _step(f"start {n_workers} worker processes (import torch and weightcache)"):
            ready_by = time.monotonic() + READY_TIMEOUT_S
            for w in workers:
                event = w.next_event(ready_by)
                if event.get("event") != "ready":
                    raise DemoFailed(f"worker {w.number} said {event} instead of ready")
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
        f"worker {w.number}: {doc.get('code')}: {doc.get('message')}"
        for w, doc in zip(workers, results, strict=True)
        if doc.get("event") != "done"
    ]
    if errors:
        raise DemoFailed("a worker could not load the model:\n  " + "\n  ".join(errors))
    return [
        _Load(
            f"worker {w.number}",
            _report_from(doc["report"]),
            int(doc["tensors"]),
            str(doc["digest"]),
            float(doc["started"]),
        )
        for w, doc in zip(workers, results, strict=True)
    ]


@dataclass
class _Outcome:
    """Everything measured while the server ran; judged after it is gone."""

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


def _measure(tmp: Path, size_mb: int, n_workers: int) -> _Outcome:
    import weightcache
    from weightcache.config import load_config
    from weightcache.manifest import dump
    from weightcache.publish import publish
    from weightcache.refs import parse_ref
    from weightcache.seaweed import SeaweedServer
    from weightcache.synthetic import make_model

    cache_dir = tmp / "cache"
    server = SeaweedServer(tmp / "seaweed")
    try:
        with _step("start a local S3 origin (SeaweedFS)"):
            server.start()
        _say(f"  S3 endpoint {server.endpoint}, bucket {BUCKET!r}")
        # The demo's own settings only: nothing is read from or written to os.environ.
        cfg = load_config(env={**server.env(), "WEIGHTCACHE_CACHE_DIR": str(cache_dir)})

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
        _say()

        sent_before = server.sent_bytes(BUCKET)
        loads = _cold_loads(n_workers, _worker_env(server.env(), cache_dir), tmp)
        sent_cold = _sent_since(server, sent_before, at_least=model_bytes)

        with _step("warm load in this process"):
            tensors, warm_report = weightcache.load_with_report(REF, "cpu", config=cfg)
        sent_warm = _sent_since(server, sent_before + sent_cold, at_least=manifest_bytes)
        with _step("compare with safetensors.torch.load_file of the original shards"):
            want = model.reference()
            differences = _bitwise_differences(tensors, want)
            want_digest = tensors_digest(want)
            loads.append(_Load("warm", warm_report, warm_report.tensors, tensors_digest(tensors)))
        del tensors, want
    finally:
        server.stop()
    return _Outcome(
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
    )


def _checks(o: _Outcome, n_workers: int) -> list[tuple[bool, str]]:
    workers, warm = o.loads[:-1], o.loads[-1].report
    ratio = o.sent_cold / o.model_bytes
    revisions = sorted({ld.report.revision[:16] for ld in o.loads})
    counts = sorted({ld.tensors for ld in o.loads})
    digests = {ld.digest for ld in o.loads}
    # A worker that the scheduler starts late may find the pull already done by the
    # others and report a hit: correct, but at least one load must have been cold.
    cold = [ld for ld in workers if not ld.report.cache_hit]
    pulled = sum(ld.report.origin_bytes for ld in workers)
    differ = f" ({len(o.differences)} differ: {'; '.join(o.differences[:3])})"
    return [
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


def _verdict(o: _Outcome, n_workers: int) -> int:
    _say()
    for line in _table(o.loads):
        _say(line)
    _say(
        "  (fetch: pulling and verifying the blobs, or waiting for another process's pull of "
        "them;\n   read: mapping the cached files, zero-copy on CPU; GB/s: tensor bytes over "
        "the whole load)"
    )
    starts = [ld.started for ld in o.loads[:-1]]
    _say(f"  the workers started their loads within {(max(starts) - min(starts)) * 1000:.2f} ms")
    _say()

    _say(f"  origin (SeaweedFS's own counter of bytes sent for bucket {BUCKET!r}):")
    overhead = o.sent_cold - o.model_bytes
    overhead_note = (
        f"the manifest, {_size(o.manifest_bytes)}, read once by each load"
        if overhead == n_workers * o.manifest_bytes
        else f"{overhead} B; {n_workers} manifest reads would be {n_workers * o.manifest_bytes} B"
    )
    warm_note = (
        "the manifest: the ref names no revision, so it asks for the latest"
        if o.sent_warm <= o.manifest_bytes
        else f"{o.sent_warm} B: more than the manifest"
    )
    rows = (
        ("model size", o.model_bytes, f"{o.model_bytes} B in {o.files} files"),
        (f"sent for the {n_workers} concurrent loads", o.sent_cold, f"{o.sent_cold} B"),
        (
            "  beyond the model",
            overhead,
            overhead_note,
        ),
        ("sent for the warm load", o.sent_warm, warm_note),
    )
    width = max(len(label) for label, _, _ in rows)
    for label, n, note in rows:
        _say(f"    {label.ljust(width)}  {_size(n):>10}  ({note})")
    _say()

    checks = _checks(o, n_workers)
    for ok, text in checks:
        _say(f"  {'ok  ' if ok else 'FAIL'}  {text}")
    _say()
    failed = [text for ok, text in checks if not ok]
    if failed:
        _say(f"demo FAILED: {len(failed)} check(s) did not hold:")
        for text in failed:
            _say(f"  - {text}")
        return 1
    ratio = o.sent_cold / o.model_bytes
    _say(f"origin sent {ratio:.2f}x the model for {n_workers} concurrent loads")
    return 0


def run_demo(size_mb: int = 384, workers: int = 2) -> int:
    """Run the demo, printing an account to stdout; 0 when every check holds."""
    if size_mb < 1:
        _say(f"demo: --size-mb must be at least 1, got {size_mb}")
        return 2
    if workers < 1:
        _say(f"demo: --workers must be at least 1, got {workers}")
        return 2
    started = time.perf_counter()
    try:
        # Everything (server data, the origin model, the node cache) lives here,
        # and the with-blocks inside stop the workers and the server before it goes.
        with tempfile.TemporaryDirectory(prefix="weightcache-demo-") as tmp:
            _say(
                f"weightcache demo: {workers} processes on one node load the same "
                f"{size_mb} MiB model at the same moment"
            )
            _say(f"  (scratch directory {tmp}, removed at the end)")
            _say()
            outcome = _measure(Path(tmp), size_mb, workers)
        # The server and the scratch directory are gone: what is left is judging.
        status = _verdict(outcome, workers)
    except DemoFailed as exc:
        _say(f"demo FAILED: {exc}")
        return 1
    _say(f"(demo took {time.perf_counter() - started:.1f} s)")
    return status


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "worker":
        return worker_main(argv[1])
    print(
        "usage: python -m weightcache.demo worker REF  (run `weightcache demo` instead)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
