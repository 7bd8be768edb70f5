"""The demo's processes: worker processes that speak JSON lines, and the node daemon.

:class:`Worker` is a child that writes one JSON document a line on stdout and
takes one-word commands on stdin (``go``: past the barrier); the demo's
workers run :func:`worker_main` as ``python -m weightcache.demo worker REF``,
and ``loadtest/storm.py`` starts its own workers through the same class.

:class:`DaemonProcess` is ``python -m weightcache daemon`` on one socket and one
cache directory, its output in a log file: started (again, after a kill, on the
same socket path), stopped with SIGTERM as systemd or Kubernetes would, or
killed with SIGKILL. The demo runs one; the load scenarios in ``loadtest/``
run theirs through it too.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Self

from weightcache.demo import DemoFailed

if TYPE_CHECKING:
    from weightcache.client.daemon import DaemonClient

#: the line that lets a worker past the barrier
GO = "go"
#: how long the daemon may take to import its libraries, open the cache and answer /healthz
DAEMON_READY_TIMEOUT_S = 60.0
#: how long the daemon may take to exit after SIGTERM (its own pull checkpoint wait is 10 s)
DAEMON_STOP_TIMEOUT_S = 30.0
#: how often a starting daemon is asked whether it is ready
READY_POLL_S = 0.02
#: how much of the daemon's log a failure shows
LOG_TAIL_LINES = 30


# -- the worker's side -------------------------------------------------------------


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
    from weightcache.demo.tensors import tensors_digest
    from weightcache.errors import WeightcacheError

    _emit({"event": "ready", "pid": os.getpid()})
    if sys.stdin.readline().strip() != GO:
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


def main(argv: Sequence[str]) -> int:
    """``python -m weightcache.demo worker REF``: what the demo's worker processes run."""
    if len(argv) == 2 and argv[0] == "worker":
        return worker_main(argv[1])
    print(
        "usage: python -m weightcache.demo worker REF  (run `weightcache demo` instead)",
        file=sys.stderr,
    )
    return 2


# -- the parent's view of a worker -------------------------------------------------


class Worker:
    """A child process that answers in JSON lines on stdout; its stderr is kept for failures."""

    def __init__(self, name: str, proc: subprocess.Popen[str]) -> None:
        self.name = name
        self.proc = proc
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.stderr: deque[str] = deque(maxlen=40)
        self._threads: list[threading.Thread] = []

    @classmethod
    def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        new_session: bool = False,
    ) -> Self:
        """Start ``argv`` with pipes on every stream; ``new_session`` keeps Ctrl-C from it."""
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env),
            cwd=cwd,
            start_new_session=new_session,
        )
        w = cls(name, proc)
        assert proc.stdout is not None and proc.stderr is not None
        for target, stream in ((w._read_out, proc.stdout), (w._read_err, proc.stderr)):
            t = threading.Thread(target=target, args=(stream,), daemon=True)
            t.start()
            w._threads.append(t)
        return w

    def _read_out(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                self.stderr.append(line)  # not ours: keep it for the failure message
                continue
            if isinstance(doc, dict):
                self.events.put(doc)
        self.events.put(None)  # end of output

    def _read_err(self, stream: IO[str]) -> None:
        for line in stream:
            self.stderr.append(line)

    def next_event(self, deadline: float) -> dict[str, Any]:
        """The next JSON line, or :class:`DemoFailed` when none comes by ``deadline``."""
        try:
            doc = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise DemoFailed(f"{self.name} gave no answer in time{self._tail()}") from None
        if doc is None:
            self.proc.wait()
            raise DemoFailed(f"{self.name} exited with status {self.proc.returncode}{self._tail()}")
        return doc

    def _tail(self) -> str:
        for t in self._threads:
            t.join(timeout=1.0)
        text = "".join(self.stderr).rstrip()
        return f"; its last output:\n{text}" if text else ""

    def send(self, line: str) -> None:
        """One line on its stdin; a dead worker shows up in :meth:`next_event`."""
        assert self.proc.stdin is not None
        with suppress(BrokenPipeError, OSError):
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()

    def release(self) -> None:
        """Let the worker past the barrier."""
        self.send(GO)

    def stop(self, grace_s: float = 0.0) -> None:
        """Wait up to ``grace_s`` for it to exit (after whatever it was sent), then kill it."""
        if self.proc.poll() is None and grace_s > 0:
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace_s)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        # The pipes are at EOF once the process is gone: let the readers finish
        # before their streams are closed under them.
        for t in self._threads:
            t.join(timeout=5.0)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with suppress(OSError):
                    stream.close()


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any WEIGHTCACHE_* or AWS_* setting, plus ``extra``.

    Nothing of the caller's weightcache or AWS settings may leak into a child: a
    WEIGHTCACHE_SOCKET, say, would send the workers to a daemon outside the demo.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEIGHTCACHE_", "AWS_"))}
    env.update(extra)
    return env


# -- the node daemon --------------------------------------------------------------


class DaemonProcess:
    """``python -m weightcache daemon`` on ``sock`` and ``cache``; its output goes to ``log``."""

    def __init__(
        self,
        cache: Path,
        sock: Path,
        env: Mapping[str, str],
        log: Path,
        *,
        name: str = "the daemon",
        verbose: bool = False,
        cwd: Path | None = None,
        new_session: bool = False,
    ) -> None:
        self.cache, self.sock, self.log, self.name = cache, sock, log, name
        self.env = {**env, "WEIGHTCACHE_CACHE_DIR": str(cache), "WEIGHTCACHE_SOCKET": str(sock)}
        self.argv = [sys.executable, "-m", "weightcache", *(["-v"] if verbose else [])]
        self.argv += ["daemon", "--socket", str(sock)]
        self.cwd, self.new_session = cwd, new_session
        self.proc: subprocess.Popen[bytes] | None = None
        #: how many times it was started
        self.starts = 0

    def launch(self) -> None:
        """Start the process; :meth:`wait_ready` waits for it to answer."""
        self.cache.mkdir(parents=True, exist_ok=True)
        self.sock.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log, "ab") as out:  # the child has its own copy of the descriptor
            # Each start's lines follow a line of their own: a restarted daemon's log
            # tells one incarnation from the next.
            out.write(f"=== start {self.starts}: {' '.join(self.argv[1:])} ===\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=self.new_session,
            )

    def client(self, timeout_s: float | None = None) -> DaemonClient:
        from weightcache.client.daemon import DaemonClient

        if timeout_s is None:
            return DaemonClient(socket_path=self.sock)
        return DaemonClient(
            socket_path=self.sock, connect_timeout_s=timeout_s, read_timeout_s=timeout_s
        )

    def wait_ready(self, deadline: float) -> None:
        """Poll ``/healthz`` until the daemon says it is ready, or fail by ``deadline``."""
        from weightcache.errors import WeightcacheError

        client = self.client(timeout_s=5.0)
        while True:
            assert self.proc is not None, "launch() first"
            if self.proc.poll() is not None:
                raise DemoFailed(
                    f"{self.name} exited with status {self.proc.returncode} before it was ready"
                )
            with suppress(WeightcacheError):  # no socket yet, or not answering yet
                if client.health().get("ready"):
                    return
            if time.monotonic() >= deadline:
                raise DemoFailed(f"{self.name} was not ready in time")
            time.sleep(READY_POLL_S)

    def start(self, timeout_s: float = DAEMON_READY_TIMEOUT_S) -> None:
        """Launch and wait until it is ready."""
        self.launch()
        self.wait_ready(time.monotonic() + timeout_s)

    def status(self) -> dict[str, Any]:
        from weightcache.errors import WeightcacheError

        try:
            doc: dict[str, Any] = self.client().status()
        except WeightcacheError as exc:
            raise DemoFailed(f"GET /v1/status failed: {exc.code}: {exc.message}") from None
        return doc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM, not waiting: several daemons stop side by side."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = DAEMON_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, as systemd or Kubernetes would stop it; its exit status (-9 if it hung).

        None when it was never started; safe to call again.
        """
        if self.proc is None:
            return None
        self.terminate()
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed, the socket file stays behind."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of its log ("" when there is none)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def with_log(self, exc: DemoFailed) -> DemoFailed:
        """``exc``, with the end of the daemon's log when there is one."""
        tail = self.tail()
        if not tail:
            return exc
        indented = "\n".join("    " + line for line in tail.splitlines())
        return DemoFailed(f"{exc}\n  the daemon's log ({self.log.name}) ends:\n{indented}")
