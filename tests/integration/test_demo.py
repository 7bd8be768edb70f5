"""`make demo` end to end: a real SeaweedFS, a real daemon, real worker processes, the real client.

The default demo runs the node daemon; ``--embedded`` runs the workers without one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from weightcache.demo import DemoFailed, _Daemon, _with_log, run_demo

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


def test_ctrl_c_stops_workers_daemon_and_server_and_removes_everything() -> None:
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
        # workers are spawned: interrupt then, with the server, the daemon and the
        # workers alive.
        while b"worker processes" not in seen:
            piece = os.read(proc.stdout.fileno(), 4096)
            assert piece, seen.decode()
            seen += piece
        scratch = _scratch(seen.decode())
        alive = _processes_mentioning(scratch)
        assert len(alive) >= 4, "server, daemon and 2 workers should run"
        daemons = [p for p in alive if " daemon --socket " in _cmdline(p)]
        assert len(daemons) == 1, [_cmdline(p) for p in alive]
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


def test_a_daemon_that_dies_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", "print('config_invalid: no such thing'); raise SystemExit(3)"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    daemon = _Daemon(tmp_path / "run" / "weightcache.sock", log, proc)
    try:
        with pytest.raises(DemoFailed) as caught:
            daemon.wait_ready(timeout_s=30)
    finally:
        daemon.kill()
    assert "exited with status 3 before it was ready" in str(caught.value)
    message = str(_with_log(caught.value, daemon))
    assert "the daemon's log (daemon.log) ends:" in message
    assert "config_invalid: no such thing" in message
