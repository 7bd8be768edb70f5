"""Leases across pod boundaries: the daemon in its own pid namespace cannot see a
worker's pid (``SO_PEERCRED`` gives 0), so a worker killed with ``SIGKILL`` is
noticed only through its connection. Needs root (``unshare --pid``), as CI has."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.daemon import ROOT, Daemon, call
from weightcache.config import load_config
from weightcache.publish import publish
from weightcache.refs import parse_ref

MB = 1_000_000

#: a worker outside the daemon's pid namespace: holds a connection-bound lease
WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from weightcache.client.daemon import DaemonClient
    client = DaemonClient(socket_path=Path(sys.argv[1]))
    doc, hold = client.ensure_held(sys.argv[2])
    print("HELD", doc["lease"]["id"], doc["lease"]["pid"], flush=True)
    time.sleep(600)
    """
)


def _model(root: Path, size: int) -> str:
    src = root / "src"
    src.mkdir(parents=True)
    (src / "weights.bin").write_bytes(random.Random(7).randbytes(size))
    ref = f"file://{root}/origin/m"
    publish(src, parse_ref(ref), load_config(env={"WEIGHTCACHE_PUBLISH_CHUNK_BYTES": "256KiB"}))
    return ref


def _daemon(tmp_path: Path, **env: str) -> Daemon:
    if os.geteuid() != 0:
        pytest.fail("this test needs root to run the daemon in its own pid namespace (unshare)")
    daemon = Daemon(
        tmp_path / "cache",
        tmp_path / "d.sock",
        {**os.environ, "WEIGHTCACHE_CACHE_RESERVE_BYTES": "0", **env},
    )
    daemon.prefix = ("unshare", "--pid", "--fork", "--mount-proc")
    return daemon


def _worker(sock: Path, ref: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(sock), ref],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )


def _leases_gone(sock: Path, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        status, body = call(sock, "GET", "/v1/status")
        assert status == 200
        if body["leases"] == 0:
            return True
        time.sleep(0.1)
    return False


def test_a_killed_worker_outside_the_pid_namespace_leaves_no_lease(tmp_path: Path) -> None:
    ref = _model(tmp_path, 1 * MB)
    with _daemon(tmp_path) as daemon:
        worker = _worker(daemon.sock, ref)
        try:
            assert worker.stdout is not None
            line = worker.stdout.readline().split()
            assert line[0] == "HELD", line
            assert line[2] == "None"  # the daemon cannot see this pid: no pid check helps
            _, body = call(daemon.sock, "GET", "/v1/status")
            assert body["leases"] == 1
        finally:
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            assert worker.stdout is not None
            worker.stdout.close()
        # The reaper runs every 2 s; the lease TTL is 15 minutes.
        assert _leases_gone(daemon.sock, within_s=5.0), "the dead worker's lease remains"


def test_a_worker_killed_mid_pull_leaves_no_lease(tmp_path: Path) -> None:
    # Throttled so that the pull is still running when the worker dies.
    ref = _model(tmp_path, 3 * MB)
    with _daemon(tmp_path, WEIGHTCACHE_FETCH_MAX_BYTES_PER_S="1MiB") as daemon:
        worker = _worker(daemon.sock, ref)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            _, body = call(daemon.sock, "GET", "/v1/status")
            if body["pulls"] and body["pulls"][0]["done_bytes"] > 0:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the pull never started")
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        assert worker.stdout is not None
        worker.stdout.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            _, body = call(daemon.sock, "GET", "/v1/status")
            if not body["pulls"]:
                break
            time.sleep(0.1)
        assert _leases_gone(daemon.sock, within_s=5.0), "the dead worker's lease remains"
