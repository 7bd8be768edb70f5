"""Run the real daemon as a subprocess for integration tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from weightcache.client.daemon import UnixHTTPConnection

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago (for ``--listen``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(
    sock: Path, method: str, path: str, body: Any = None, timeout: float = 120
) -> tuple[int, Any]:
    conn = UnixHTTPConnection(sock, timeout=timeout, read_timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


class Daemon:
    #: run the daemon under this command (e.g. ``unshare --pid --fork``)
    prefix: tuple[str, ...] = ()

    def __init__(self, cache: Path, sock: Path, env: dict[str, str], *args: str) -> None:
        self.cache, self.sock, self.args = cache, sock, args
        self.env = {**env, "WEIGHTCACHE_CACHE_DIR": str(cache), "WEIGHTCACHE_SOCKET": str(sock)}
        self.log = cache.parent / f"{cache.name}-daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30) -> Daemon:
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    *self.prefix,
                    sys.executable,
                    "-m",
                    "weightcache",
                    "-v",
                    "daemon",
                    "--socket",
                    str(self.sock),
                    *self.args,
                ],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                status, body = call(self.sock, "GET", "/healthz", timeout=2)
                if status == 200 and body.get("ready"):
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"daemon did not become ready:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        return self.proc.wait(timeout=timeout_s)

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
