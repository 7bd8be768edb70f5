"""`make demo` end to end: a real SeaweedFS, real worker processes, the real client."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from weightcache.demo import run_demo

ROOT = Path(__file__).resolve().parents[2]


def _scratch(output: str) -> Path:
    m = re.search(r"scratch directory (\S+),", output)
    assert m, output
    return Path(m.group(1))


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


def test_demo_two_workers_origin_sends_the_model_once(capsys: pytest.CaptureFixture[str]) -> None:
    status = run_demo(size_mb=24, workers=2)
    out = capsys.readouterr().out

    assert status == 0, out
    assert re.search(r"^origin sent 1\.00x the model for 2 concurrent loads$", out, re.M), out
    assert "FAIL" not in out
    assert "bitwise equal to safetensors.torch.load_file of the original shards" in out
    rows = dict(re.findall(r"^  (worker \d|warm) +\w+ +(yes|no) ", out, re.M))
    assert rows == {"worker 1": "no", "worker 2": "no", "warm": "yes"}, out
    scratch = _scratch(out)
    assert not scratch.exists()
    assert _processes_mentioning(scratch) == []


def test_cli_demo_three_workers() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "weightcache", "demo", "--size-mb", "8", "--workers", "3"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "origin sent 1.00x the model for 3 concurrent loads" in proc.stdout
    assert not _scratch(proc.stdout).exists()


def test_ctrl_c_stops_workers_and_server_and_removes_everything() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "weightcache", "demo", "--size-mb", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    seen = b""
    try:
        # The step's label is printed (flushed, no newline yet) right after the
        # workers are spawned: interrupt then, with the server and the workers alive.
        while b"worker processes" not in seen:
            piece = os.read(proc.stdout.fileno(), 4096)
            assert piece, seen.decode()
            seen += piece
        scratch = _scratch(seen.decode())
        assert len(_processes_mentioning(scratch)) >= 3, "server and 2 workers should run"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = (seen + out + err).decode()
    assert proc.returncode == 130, text
    assert "interrupted" in text
    assert not scratch.exists()
    deadline = time.monotonic() + 5
    while _processes_mentioning(scratch) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_mentioning(scratch) == []
