"""What the load scenarios share: the daemon, the origin, the command line, the docs section.

``crash_loop.py``, ``load.py`` and ``storm.py`` each run the real daemon
(``python -m weightcache daemon``) against a local SeaweedFS, print what they
measured, and can write it into one marked section of a page under ``docs/``.
The parts they have in common live here:

* :class:`Daemon`: the demo's daemon process (:mod:`weightcache.demo.processes`)
  with what a scenario also watches: the errors in its log, its peak memory;
* :func:`local_origin`: a throwaway SeaweedFS with a fresh bucket (or an S3
  server that already runs), and the origin's own count of bytes sent;
* :func:`child_env`: a child's environment, free of the caller's settings;
* the command line: :func:`argument_parser` and :func:`add_run_options`
  (``--workdir``, ``--report``, ``--json``), :func:`scratch`, :func:`say`,
  :func:`command`, :func:`finish`;
* the report: :func:`put_section` rewrites the section between
  ``<!-- name:begin -->`` and ``<!-- name:end -->`` (:func:`markers`) and leaves
  the rest of the page as it is; :func:`machine` and :func:`versions` say where
  it ran.

Run the scenarios from the repository root, as ``python -m loadtest.NAME`` or
``python loadtest/NAME.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from weightcache.demo import DemoFailed
from weightcache.demo.processes import DaemonProcess, clean_env

ROOT = Path(__file__).resolve().parents[1]


class ScenarioFailed(DemoFailed):
    """A step of a scenario could not be carried out (a failed check is not this: those are listed).

    A :class:`DemoFailed` like the ones the demo's processes raise, so that one
    ``except DemoFailed`` in a scenario's ``main`` catches every such failure.
    """


# -- processes ---------------------------------------------------------------------------


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A child's environment: this one without WEIGHTCACHE_* or AWS_*, plus ``extra``.

    Children import weightcache and loadtest from this checkout, whatever the
    caller's PYTHONPATH.
    """
    env = clean_env(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Daemon(DaemonProcess):
    """``python -m weightcache daemon`` as a scenario runs it (see :class:`DaemonProcess`)."""

    def wait_ready(self, deadline: float) -> None:
        try:
            super().wait_ready(deadline)
        except DemoFailed as exc:
            raise ScenarioFailed(str(self.with_log(exc))) from None

    def errors(self) -> list[str]:
        """Lines of the log that mean the daemon itself failed (500s, tracebacks)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return [
            line
            for line in text.splitlines()
            if "request.failed" in line or " ERROR " in line or " CRITICAL " in line
        ]

    def rss_peak(self) -> int:
        """The process's peak resident memory (VmHWM), while it runs; 0 after."""
        if self.proc is None:
            return 0
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return 0


@dataclass(frozen=True)
class Origin:
    """The S3 server a scenario publishes to and its daemons pull from."""

    #: the AWS_* settings that point a client at it
    env: dict[str, str]
    bucket: str
    #: bytes the server has sent from the bucket so far (SeaweedFS's own counter);
    #: None for a server that was already running
    sent_bytes: Callable[[], int] | None


@contextlib.contextmanager
def local_origin(workdir: Path, bucket: str, *, endpoint: str = "") -> Iterator[Origin]:
    """A SeaweedFS of its own under ``workdir`` with a fresh bucket named after ``bucket``.

    With ``endpoint``, the S3 server that already runs there instead (credentials
    from this process's AWS_* settings), and ``bucket`` as it is.
    """
    if endpoint:
        env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        env["AWS_ENDPOINT_URL"] = endpoint
        yield Origin(env, bucket, None)
        return
    from weightcache.demo.seaweed import SeaweedServer

    with SeaweedServer(workdir / "seaweed") as server:
        name = f"{bucket}-{secrets.token_hex(4)}"
        server.make_bucket(name)
        yield Origin(server.env(), name, lambda: server.sent_bytes(name))


# -- the command line ------------------------------------------------------------------------


def argument_parser(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """A scenario's parser, described by the first paragraph of its module docstring."""
    return argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0] if doc else None)


def add_run_options(parser: argparse.ArgumentParser, *, report: Path) -> None:
    """``--workdir``, ``--report [PATH]`` (default ``report``) and ``--json PATH``."""
    parser.add_argument("--workdir", type=Path, help="keep models, cache and logs here")
    parser.add_argument("--report", type=Path, nargs="?", const=report, help="write docs section")
    parser.add_argument("--json", type=Path, help="write every measurement here")


@contextlib.contextmanager
def scratch(path: Path | None, prefix: str) -> Iterator[Path]:
    """``path`` (kept afterwards), or a temporary directory removed at the end."""
    if path is not None:
        yield path.resolve()
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


def say(text: str) -> None:
    """One line of progress, with the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def command(script: str, argv: Sequence[str]) -> str:
    """How to run it again, as the report shows it: ``.venv/bin/python loadtest/SCRIPT ARGS``."""
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(ROOT)
    return shlex.join([str(exe), f"loadtest/{script}", *argv])


def finish(
    args: argparse.Namespace,
    *,
    section: str,
    heading: str,
    report: Callable[[], str],
    measurements: dict[str, Any],
    problems: Sequence[str],
    passed: str = "",
) -> int:
    """Write ``--json`` and ``--report`` when asked, print the verdict; the exit status.

    ``report`` makes docs section ``section`` (a page starts with ``heading``).
    """
    if args.json:
        args.json.write_text(json.dumps(measurements, indent=1, default=str))
    if args.report:
        put_section(args.report, section, report(), heading=heading)
        say(f"wrote {args.report}")
    if problems:
        print("FAILED:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    if passed:
        print(passed)
    return 0


# -- the report ---------------------------------------------------------------------------


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def put_section(path: Path, name: str, section: str, *, heading: str) -> None:
    """Replace section ``name`` of ``path`` with ``section`` (which carries the markers).

    A file without the section gets it appended; a missing file starts with
    ``heading``. The write is atomic, so a reader never sees half a document.
    """
    begin, end = markers(name)
    section = section.rstrip("\n")
    text = path.read_text() if path.exists() else f"{heading}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def machine() -> str:
    """Cores, CPU model, memory and kernel of this machine."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    return (
        f"{os.cpu_count()} cores" + (f" ({cpu})" if cpu else "") + f", {mem / (1 << 30):.1f} GiB "
        f"RAM, {platform.system()} {platform.release()}"
    )


def version_of(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def versions(*dists: str) -> str:
    """``Python 3.11.7, torch 2.13.0, ...`` for the distributions that are installed."""
    parts = [f"Python {platform.python_version()}"]
    for dist in dists:
        with contextlib.suppress(PackageNotFoundError):
            parts.append(f"{dist} {version(dist)}")
    return ", ".join(parts)
