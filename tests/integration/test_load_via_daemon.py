"""The real client against the real daemon and the real SeaweedFS.

``weightcache.load`` through the daemon's socket (bitwise equal tensors, leases
released), the daemon-facing commands (``status``, ``fetch``, ``prefetch``,
``jobs``, ``evict``) over the socket and over TCP with a token, and the fall
back to embedded mode once the daemon is gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import weightcache
from tests.support.daemon import Daemon as _Daemon
from tests.support.daemon import free_port
from tests.support.models import assert_bitwise_equal, reference, write_model
from weightcache.client.daemon import DaemonClient
from weightcache.config import load_config
from weightcache.errors import DaemonUnavailable, ModelNotFound, Unauthorized
from weightcache.publish import publish
from weightcache.refs import parse_ref

ROOT = Path(__file__).resolve().parents[2]


class Daemon(_Daemon):
    """The real daemon as a subprocess; readiness is asked with the client under test."""

    def start(self, timeout_s: float = 30) -> Daemon:
        self.cache.mkdir(parents=True, exist_ok=True)
        argv = ["-m", "weightcache", "-v", "daemon", "--socket", str(self.sock), *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *argv], env=self.env, cwd=ROOT, stdout=log, stderr=log
            )
        client = DaemonClient(socket_path=self.sock, connect_timeout_s=1, read_timeout_s=2)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                if client.health().get("ready"):
                    return self
            except DaemonUnavailable:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon did not become ready:\n{self.log.read_text()[-3000:]}")


def publish_dir(directory: Path, ref: str) -> Any:
    return publish(directory, parse_ref(ref), load_config(env=dict(os.environ)))


def model_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "weightcache", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    # The daemon's socket: AF_UNIX paths are limited to ~107 bytes.
    path = tmp_path / "run"
    path.mkdir()
    assert len(str(path / "wc.sock")) < 100
    return path


def test_load_through_the_daemon(
    s3: Any, tmp_path: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = write_model(tmp_path / "m", shards=3)
    ref = f"s3://{s3.bucket}/org/model"
    published = publish_dir(tmp_path / "m", ref)
    sock = run_dir / "wc.sock"
    with Daemon(tmp_path / "cache", sock, dict(os.environ)) as daemon:
        for name in ("WEIGHTCACHE_CACHE_DIR", "WEIGHTCACHE_SOCKET"):
            monkeypatch.setenv(name, daemon.env[name])

        tensors, report = weightcache.load_with_report(ref)
        assert report.mode == "daemon" and not report.cache_hit
        assert report.revision == published.revision
        assert report.origin_bytes == model_size(tmp_path / "m")
        assert_bitwise_equal(tensors, reference(files))

        again, report2 = weightcache.load_with_report(ref, tensors="float32.*")
        assert report2.mode == "daemon" and report2.cache_hit and report2.origin_bytes == 0
        assert sorted(again) == ["float32.empty", "float32.matrix", "float32.scalar"]

        client = DaemonClient(socket_path=sock)
        status = client.status()
        assert status["leases"] == 0  # each load released its lease
        assert (status["counters"]["hits"], status["counters"]["misses"]) == (1, 1)
        [model] = status["models"]
        assert (model["revision"], model["location"]) == (published.revision, ref)

        # The daemon's errors arrive as the same class, with the facts.
        with pytest.raises(ModelNotFound) as info:
            weightcache.load(f"s3://{s3.bucket}/none")
        assert "weightcache.manifest.json" in str(info.value)
        assert info.value.facts.get("request_id")
        assert daemon.stop() == 0

    # The daemon is gone: the same worker loads in-process from the same cache.
    tensors, report3 = weightcache.load_with_report(ref)
    assert report3.mode == "embedded" and report3.cache_hit
    assert_bitwise_equal(tensors, reference(files))


def test_cli_against_the_daemon(s3: Any, tmp_path: Path, run_dir: Path) -> None:
    write_model(tmp_path / "a", shards=2, seed=1)
    write_model(tmp_path / "b", shards=2, seed=2)
    ref_a, ref_b = f"s3://{s3.bucket}/cli/a", f"s3://{s3.bucket}/cli/b"
    rev_a = publish_dir(tmp_path / "a", ref_a).revision
    publish_dir(tmp_path / "b", ref_b)
    sock = run_dir / "wc.sock"
    port = free_port()
    env = {
        **os.environ,
        "WEIGHTCACHE_DAEMON_PREFETCH_SPREAD_S": "0",
        "WEIGHTCACHE_TOKEN": "integration-token",
    }
    with Daemon(tmp_path / "cache", sock, env, "--listen", f"127.0.0.1:{port}") as daemon:
        env = dict(daemon.env)

        out = run_cli(env, "fetch", ref_a, "--json")
        assert out.returncode == 0, out.stderr
        fetched = json.loads(out.stdout)
        assert fetched["mode"] == "daemon" and fetched["revision"] == rev_a
        assert not fetched["cache_hit"] and fetched["origin_bytes"] == model_size(tmp_path / "a")
        assert fetched["lease"] is None  # fetch holds nothing
        out = run_cli(env, "fetch", ref_a)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"already cached {ref_a}@{rev_a}")
        assert out.stdout.rstrip().endswith("by the daemon")

        out = run_cli(env, "status", "--json")
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert [m["revision"] for m in status["models"]] == [rev_a]
        assert status["counters"]["hits"] == 1 and status["counters"]["misses"] == 1
        out = run_cli(env, "status")
        assert out.returncode == 0, out.stderr
        assert "models    1" in out.stdout and rev_a[:16] in out.stdout

        out = run_cli(env, "prefetch", ref_b, "--at", "+0s", "--deadline", "+1h", "--json")
        assert out.returncode == 0, out.stderr
        job_id = json.loads(out.stdout)["job"]["id"]
        deadline = time.monotonic() + 60
        while True:
            out = run_cli(env, "jobs", job_id, "--json")
            assert out.returncode == 0, out.stderr
            job = json.loads(out.stdout)
            if job["state"] in ("done", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert job["state"] == "done", job
        assert job["done_bytes"] == job["total_bytes"] == model_size(tmp_path / "b")
        out = run_cli(env, "jobs")
        assert out.returncode == 0 and job_id in out.stdout and "done" in out.stdout

        out = run_cli(env, "evict", ref_a)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"evicted {ref_a} (revision {rev_a[:16]}): freed ")
        out = run_cli(env, "evict", ref_a)
        assert out.returncode == 1 and out.stderr.startswith("weightcache: model_not_found:")

        # Over TCP the token is needed, and WEIGHTCACHE_TOKEN supplies it.
        url = f"http://127.0.0.1:{port}"
        tcp_env = {k: v for k, v in env.items() if k != "WEIGHTCACHE_SOCKET"}
        out = run_cli(tcp_env, "status", "--json", "--url", url)
        assert out.returncode == 0, out.stderr
        assert [m["location"] for m in json.loads(out.stdout)["models"]] == [ref_b]
        with pytest.raises(Unauthorized):
            DaemonClient(url=url).status()
        no_token = {k: v for k, v in tcp_env.items() if k != "WEIGHTCACHE_TOKEN"}
        out = run_cli(no_token, "status", "--url", url)
        assert out.returncode == 1 and out.stderr.startswith("weightcache: unauthorized:")
        assert "integration-token" not in out.stderr
        assert daemon.stop() == 0

    out = run_cli(env, "status")
    assert out.returncode == 1
    assert out.stderr == (
        f"weightcache: daemon_unavailable: no daemon at {sock}: "
        "start one with `weightcache daemon`\n"
    )
