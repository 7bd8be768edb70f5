"""The real daemon as a subprocess: Unix socket and TCP, a real S3 origin, signals, restarts."""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from weightcache.client.daemon import UnixHTTPConnection
from weightcache.config import load_config
from weightcache.publish import publish
from weightcache.refs import parse_ref

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "integration-token-4f1c"
START_TIMEOUT_S = 60.0


class Daemon:
    """``python -m weightcache daemon`` with its log in a file."""

    def __init__(self, tmp: Path, *, socket_path: Path, extra_env: dict[str, str] | None = None):
        self.socket_path = socket_path
        self.log_path = tmp / f"daemon-{time.monotonic_ns()}.log"
        env = {**os.environ, **(extra_env or {})}
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "weightcache",
                "daemon",
                "--socket",
                str(socket_path),
                "--listen",
                "127.0.0.1:0",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
        self.port = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.log()}"
            m = re.search(r"daemon\.started .* listen=127\.0\.0\.1:(\d+)", self.log())
            if m and self.socket_path.exists():
                self.port = int(m.group(1))
                try:
                    status, doc = self.call("GET", "/healthz")
                except OSError:
                    status = 0
                if status == 200 and doc["ready"]:
                    return
            time.sleep(0.05)
        raise AssertionError(f"daemon not ready in {START_TIMEOUT_S} s:\n{self.log()}")

    def _send(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: Any,
        headers: dict[str, str],
    ) -> tuple[int, bytes, http.client.HTTPResponse]:
        data = json.dumps(body).encode() if body is not None else None
        hdrs = {"Content-Type": "application/json", **headers} if data else dict(headers)
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        return resp.status, raw, resp

    def call(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        """Over the Unix socket; the body decoded as JSON."""
        status, raw, _ = self._send(
            UnixHTTPConnection(self.socket_path, timeout=30.0, read_timeout=30.0),
            method,
            path,
            body,
            headers or {},
        )
        return status, json.loads(raw)

    def call_tcp(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30.0)
        status, raw, _ = self._send(conn, method, path, body, headers or {})
        return status, raw

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self._log.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.close()


def start(daemons: list[Daemon], tmp_path: Path, socket_path: Path, **env: str) -> Daemon:
    d = Daemon(tmp_path, socket_path=socket_path, extra_env=env)
    daemons.append(d)
    return d


def publish_model(bucket: str, src: Path, size: int, seed: int) -> str:
    src.mkdir(parents=True)
    (src / "weights.bin").write_bytes(random.Random(seed).randbytes(size))
    (src / "config.json").write_text(json.dumps({"seed": seed}))
    ref = f"s3://{bucket}/models/m{seed}"
    publish(
        src,
        parse_ref(ref),
        load_config(env={**os.environ, "WEIGHTCACHE_PUBLISH_CHUNK_BYTES": "1MiB"}),
    )
    return ref


def test_daemon_serves_socket_and_tcp_then_stops_on_sigterm(
    s3: Any, tmp_path: Path, daemons: list[Daemon]
) -> None:
    ref = publish_model(s3.bucket, tmp_path / "src", 5 * 1024 * 1024, 1)
    sock = tmp_path / "run" / "wc.sock"  # the directory does not exist yet
    d = start(daemons, tmp_path, sock, WEIGHTCACHE_TOKEN=TOKEN)
    d.wait_ready()

    mode = sock.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660, oct(stat.S_IMODE(mode))

    status, doc = d.call("POST", "/v1/ensure", {"ref": ref})
    assert status == 200, doc
    assert doc["source"] == "origin" and doc["origin_bytes"] == doc["total_bytes"]
    assert doc["lease"]["pid"] == os.getpid(), "the lease belongs to the peer process"
    weights = next(f for f in doc["files"] if f["path"] == "weights.bin")
    assert Path(weights["local_path"]).read_bytes() == (tmp_path / "src/weights.bin").read_bytes()

    # Streaming over the socket: progress lines, then the result.
    conn = UnixHTTPConnection(sock, timeout=30.0, read_timeout=30.0)
    conn.request(
        "POST",
        "/v1/ensure",
        body=json.dumps({"ref": ref, "stream": True}),
        headers={"Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    lines = [json.loads(x) for x in resp.read().splitlines()]
    conn.close()
    assert resp.status == 200 and resp.getheader("X-Request-Id")
    assert lines[-1]["event"] == "result" and lines[-1]["result"]["source"] == "cache"

    # TCP: /v1 needs the token, probes and the scraper do not.
    status_code, raw = d.call_tcp("GET", "/v1/status")
    assert status_code == 401 and json.loads(raw)["error"]["code"] == "unauthorized"
    status_code, raw = d.call_tcp("GET", "/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status_code == 200
    counters = json.loads(raw)["counters"]
    assert counters["misses"] == 1 and counters["hits"] == 1
    status_code, raw = d.call_tcp("GET", "/metrics")
    assert status_code == 200 and b"weightcache_hits_total 1.0" in raw
    status_code, raw = d.call_tcp(
        "GET", f"/v1/blobs/{weights['blake3']}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert status_code == 200 and raw == (tmp_path / "src/weights.bin").read_bytes()

    started = time.monotonic()
    assert d.stop() == 0, d.log()
    assert time.monotonic() - started < 10.0 + 5.0  # shutdown_timeout_s (default) + a little
    assert not sock.exists(), "a clean stop removes its socket"
    log = d.log()
    assert "daemon.started" in log and "daemon.stopped" in log
    assert "loop=uvloop" in log, "the daemon runs on uvloop where it is installed"
    assert TOKEN not in log


@pytest.mark.parametrize("stream", [True, False])
def test_sigterm_during_a_pull_exits_within_the_shutdown_timeout(
    s3: Any, tmp_path: Path, daemons: list[Daemon], stream: bool
) -> None:
    ref = publish_model(s3.bucket, tmp_path / "src", 8 * 1024 * 1024, 2)
    sock = tmp_path / "wc.sock"
    d = start(
        daemons,
        tmp_path,
        sock,
        # Slow enough that the pull is still running when the signal comes.
        WEIGHTCACHE_FETCH_MAX_BYTES_PER_S="1MiB",
        WEIGHTCACHE_DAEMON_SHUTDOWN_TIMEOUT_S="1",
    )
    d.wait_ready()
    answers: list[tuple[int, list[dict[str, Any]]]] = []
    failure: list[BaseException] = []

    def worker_process() -> None:
        try:
            conn = UnixHTTPConnection(sock, timeout=60.0, read_timeout=60.0)
            conn.request(
                "POST",
                "/v1/ensure",
                body=json.dumps({"ref": ref, "stream": stream}),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            lines: list[dict[str, Any]] = []
            answers.append((resp.status, lines))
            for raw in resp:
                lines.append(json.loads(raw))
            conn.close()
        except (OSError, http.client.HTTPException) as exc:
            failure.append(exc)

    worker = threading.Thread(target=worker_process)
    worker.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, raw = d.call_tcp("GET", "/v1/status")
        if json.loads(raw)["pulls"]:
            break
        time.sleep(0.05)
    assert json.loads(raw)["pulls"], ("no pull in flight", failure, d.log())

    started = time.monotonic()
    assert d.stop(timeout=30) == 0, d.log()
    assert time.monotonic() - started < 1.0 + 5.0
    worker.join(timeout=30)
    # The worker hears why its pull ended; it never gets a result for bytes not there.
    assert not failure, failure
    [(status, lines)] = answers
    if stream:
        assert status == 200
        assert lines[-1]["event"] == "error", lines[-1]
        assert lines[-1]["error"]["code"] == "shutting_down"
        assert all(x["event"] == "progress" for x in lines[:-1])
    else:
        assert status == 503, lines
        assert [x["error"]["code"] for x in lines] == ["shutting_down"]


def test_restart_after_kill_9_replaces_the_stale_socket(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    sock = tmp_path / "wc.sock"
    first = start(daemons, tmp_path, sock)
    first.wait_ready()
    first.proc.kill()  # SIGKILL: no cleanup, the socket file stays behind
    first.proc.wait(timeout=20)
    assert sock.exists()
    with pytest.raises(ConnectionRefusedError):
        first.call("GET", "/healthz")

    second = start(daemons, tmp_path, sock)
    second.wait_ready()
    assert stat.S_IMODE(sock.stat().st_mode) == 0o660
    assert "daemon.stale_socket" in second.log()
    status, doc = second.call("GET", "/v1/status")
    assert status == 200 and doc["counters"]["misses"] == 0
    assert second.stop() == 0, second.log()


def test_a_second_daemon_on_a_live_socket_is_refused(tmp_path: Path, daemons: list[Daemon]) -> None:
    sock = tmp_path / "wc.sock"
    first = start(daemons, tmp_path, sock)
    first.wait_ready()
    second = start(daemons, tmp_path, sock)
    assert second.proc.wait(timeout=60) == 1
    assert "already serving" in second.log()
    status, doc = first.call("GET", "/healthz")
    assert status == 200 and doc["ready"], "the first daemon is untouched"
    assert first.stop() == 0, first.log()
