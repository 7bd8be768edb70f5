"""The daemon client against the real daemon; the loader through it and without it; the CLI.

Happy paths and the daemon's own errors run against the real application: a
:class:`~weightcache.service.Service` over a ``file://`` origin behind the
daemon's own listeners, a Unix socket and TCP with a bearer token, in this
process (:class:`tests.faults.test_hostile_api.Served`). Every request the
client sends passes the real router, media-type check, body parser and auth,
and every answer it parses is one the daemon really gives.

A stand-in daemon (the standard library's HTTP server) remains only for what a
real daemon does not do on purpose: hanging up, tearing a progress stream, and
answers only another version or a proxy gives (unknown events and codes, a
plain answer to a streamed request, an error page, a missing detail); and for
two faults injected at the loader's seams (a release that fails,
``Retry-After: 0``).
"""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import os
import re
import shutil
import socket
import socketserver
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import weightcache
from tests.faults.test_hostile_api import Served, make_model
from tests.support.models import assert_bitwise_equal, reference, write_model
from weightcache import cli
from weightcache.client.daemon import DaemonClient, Ensured, Progress
from weightcache.config import load_config
from weightcache.errors import (
    DaemonUnavailable,
    HashMismatch,
    ModelLeased,
    ModelNotFound,
    NotFound,
    Overloaded,
    RefInvalid,
    RequestInvalid,
    ResponseInvalid,
    ShuttingDown,
    Unauthorized,
    WeightcacheError,
)
from weightcache.publish import publish
from weightcache.refs import parse_ref

REV = "ab" * 32
TOKEN = "client-token-4f1e9a"
#: 2100-01-01T00:00:00Z: prefetch jobs at this time stay scheduled for the whole test
FAR = 4102444800.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="wc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- the real daemon -------------------------------------------------------------


@dataclass
class Real:
    """The daemon's application in this process, and one small cached-nowhere model."""

    served: Served
    #: a model of two files (weights.bin, config.json) at the file:// origin
    ref: str

    @property
    def root(self) -> Path:
        return self.served.root

    @property
    def sock(self) -> str:
        return str(self.served.sock_path)

    def client(self) -> DaemonClient:
        return DaemonClient(socket_path=self.served.sock_path)

    def tcp(self, token: str = TOKEN) -> DaemonClient:
        return DaemonClient(url=f"http://127.0.0.1:{self.served.port}", token=token)

    def model(self, name: str, size: int, seed: int) -> str:
        return make_model(self.root, name, size, seed)

    def safetensors_model(self) -> tuple[str, dict[str, Path]]:
        files = write_model(self.root / "src" / "st", shards=2)
        ref = f"file://{self.root}/origin/st"
        publish(self.root / "src" / "st", parse_ref(ref), load_config())
        return ref, files

    def stop_service(self) -> None:
        """What SIGTERM starts: the service stops taking work, the listeners still answer."""
        assert self.served._loop is not None and self.served.service is not None
        asyncio.run_coroutine_threadsafe(self.served.service.close(), self.served._loop).result(60)


@pytest.fixture
def real(short_dir: Path) -> Iterator[Real]:
    ref = make_model(short_dir, "m", 300_000, 11)
    env = {
        "WEIGHTCACHE_TOKEN": TOKEN,
        # One distinct pull at a time, one chunk at a time, 1 MB/s after a burst of
        # 1 MB (the rate bucket starts full): a pull of a 2 MB model takes a second,
        # long enough to watch its progress and to be refused beside it.
        "WEIGHTCACHE_DAEMON_MAX_PENDING": "1",
        "WEIGHTCACHE_FETCH_CONCURRENCY": "1",
        "WEIGHTCACHE_FETCH_MAX_BYTES_PER_S": "1MB",
    }
    with Served(short_dir, env) as served:
        yield Real(served, ref)


def _until(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- results and progress --------------------------------------------------------


def test_ensure_returns_the_files_and_a_lease_of_this_process(real: Real) -> None:
    c = real.client()
    doc = c.ensure(real.ref)
    assert doc["source"] == "origin" and doc["cache_hit"] is False
    assert doc["ref"] == f"{real.ref}@{doc['revision']}"
    # The daemon read this process's pid off the socket (SO_PEERCRED).
    assert doc["lease"]["pid"] == os.getpid()
    ensured = Ensured.from_json(doc)
    assert ensured.mode == "daemon" and ensured.lease_id == doc["lease"]["id"]
    assert ensured.revision == doc["revision"] and ensured.source == "origin"
    by_path = {f.path: f for f in ensured.files}
    assert sorted(by_path) == ["config.json", "weights.bin"]
    for name, f in by_path.items():
        assert f.local_path.read_bytes() == (real.root / "src" / "m" / name).read_bytes()
        assert f.local_path.parent == ensured.snapshot and f.size == f.local_path.stat().st_size
    assert c.status()["leases"] == 1

    again = c.ensure(real.ref, lease=False, priority="admin")
    assert (again["cache_hit"], again["source"], again["lease"]) == (True, "cache", None)
    assert again["revision"] == doc["revision"] and again["origin_bytes"] == 0


def test_ensure_streams_progress_then_the_result(real: Real) -> None:
    big = real.model("big", 2_000_000, 12)  # a second at 1 MB/s, after the burst
    c = real.client()
    got: list[Progress] = []
    doc = c.ensure(big, lease=False, priority="background", on_progress=got.append)
    assert doc["source"] == "origin" and doc["lease"] is None
    assert len(got) >= 2, got
    done = [p.done_bytes for p in got]
    assert done == sorted(done)
    assert got[-1].done_bytes == got[-1].total_bytes == doc["total_bytes"]
    assert {p.source for p in got} == {"origin"}
    assert all(p.ref.startswith(big) for p in got)

    hit: list[Progress] = []
    assert c.ensure(big, lease=False, on_progress=hit.append)["cache_hit"] is True
    assert [(p.source, p.done_bytes, p.total_bytes) for p in hit] == [
        ("cache", doc["total_bytes"], doc["total_bytes"])
    ]


def test_every_route_of_the_client(real: Real) -> None:
    c = real.client()
    health = c.health()
    assert health["live"] is True and health["ready"] is True
    doc = c.ensure(real.ref)
    lease_id = doc["lease"]["id"]
    assert c.status()["leases"] == 1
    assert c.release(lease_id) == {"released": lease_id}
    assert c.status()["leases"] == 0
    with pytest.raises(NotFound):
        c.release(lease_id)

    made = c.prefetch(
        real.ref, at="2100-01-01T00:00:00Z", deadline=FAR + 3600, priority="background"
    )
    job = made["job"]
    assert made["created"] is True
    assert (job["state"], job["at"], job["deadline"], job["priority"]) == (
        "scheduled",
        FAR,
        FAR + 3600,
        "background",
    )
    # The same ref at the same time is the same job.
    assert c.prefetch(real.ref, at=FAR)["created"] is False
    assert [j["id"] for j in c.jobs()] == [job["id"]]
    assert c.job(job["id"])["id"] == job["id"]
    with pytest.raises(NotFound):
        c.job("no-such-job")

    status = c.status()
    assert status["jobs"] == {"scheduled": 1}
    assert (status["counters"]["misses"], status["counters"]["hits"]) == (1, 0)
    evicted = c.evict(real.ref)
    assert evicted["revision"] == doc["revision"] and evicted["freed_bytes"] > 0
    assert evicted["forced"] is False
    with pytest.raises(ModelNotFound):
        c.evict(real.ref)


# -- errors: the same class the daemon raised -------------------------------------


def test_the_daemons_errors_arrive_as_their_class_with_their_facts(real: Real) -> None:
    c = real.client()
    with pytest.raises(ModelNotFound) as missing:
        c.ensure(f"file://{real.root}/origin/none")
    assert re.fullmatch(r"[0-9a-f]{16}", missing.value.facts["request_id"])
    with pytest.raises(RefInvalid):
        c.ensure("ftp://host/x")
    with pytest.raises(RequestInvalid) as invalid:
        c.prefetch(real.ref, at=FAR, deadline=FAR - 60)
    assert invalid.value.facts["field"] == "deadline"

    doc = c.ensure(real.ref)
    with pytest.raises(ModelLeased) as leased:
        c.evict(real.ref)
    assert leased.value.facts["revision"] == doc["revision"]
    assert c.evict(real.ref, force=True)["forced"] is True


def test_a_corrupt_origin_is_hash_mismatch_before_and_after_the_stream_started(
    real: Real,
) -> None:
    # 31 chunks of 64 KiB, fetched in order; the last one a second after the first.
    bad = real.model("bad", 2_000_000, 13)
    weights = real.root / "origin" / "bad" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the last chunk no longer matches the manifest
    weights.write_bytes(bytes(data))
    c = real.client()

    # Streamed: the good chunks' progress went out, so the error is the last line.
    got: list[Progress] = []
    with pytest.raises(HashMismatch) as streamed:
        c.ensure(bad, lease=False, on_progress=got.append)
    assert got and got[-1].done_bytes < got[-1].total_bytes
    # Plain: the error is the answer.
    with pytest.raises(HashMismatch) as plain:
        c.ensure(bad, lease=False)
    for err in (streamed.value, plain.value):
        assert err.facts["path"] == "weights.bin" and err.facts["chunk"] == 30
        assert err.facts["expected"] != err.facts["actual"]
        assert err.facts["request_id"]


def test_overloaded_carries_the_daemons_retry_after(real: Real) -> None:
    slow = real.model("slow", 2_000_000, 14)
    other = real.model("other", 50_000, 15)
    c = real.client()
    results: list[dict[str, Any]] = []
    puller = threading.Thread(
        target=lambda: results.append(c.ensure(slow, lease=False, priority="background"))
    )
    puller.start()
    try:
        _until(lambda: bool(c.status()["pulls"]), "the pull to start")
        # daemon.max_pending = 1: a second distinct pull is refused while it runs (its
        # manifest read does not queue behind the running pull's chunks).
        with pytest.raises(Overloaded) as info:
            c.ensure(other, lease=False)
        assert info.value.retryable and info.value.retry_after_s >= 1.0
        assert info.value.facts["retry_after_s"] == info.value.retry_after_s
    finally:
        puller.join(60)
    assert results and results[0]["source"] == "origin"
    assert c.status()["counters"]["overloaded"] == 1


def test_a_stopping_daemon_says_so_and_the_loader_pulls_itself(
    real: Real, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, files = real.safetensors_model()
    c = real.client()
    real.stop_service()
    # /healthz answers 503 with its own document, not an error.
    health = c.health()
    assert (health["live"], health["ready"], health["closing"]) == (True, False, True)
    with pytest.raises(ShuttingDown):
        c.ensure(ref)
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", real.sock)
    tensors, report = weightcache.load_with_report(ref)
    assert report.mode == "embedded"
    assert_bitwise_equal(tensors, reference(files))


def test_tcp_sends_the_token_and_never_shows_it(real: Real) -> None:
    c = real.tcp()
    assert c.status()["node"]
    doc = c.ensure(real.ref)
    assert doc["lease"]["pid"] is None  # no peer pid over TCP
    assert c.release(doc["lease"]["id"]) == {"released": doc["lease"]["id"]}
    wrong = real.tcp(token="not-the-token-77")
    with pytest.raises(Unauthorized) as info:
        wrong.status()
    assert "not-the-token" not in f"{info.value} {info.value.facts} {wrong!r}"

    # Nothing listens on port 9: refused; neither the token nor URL credentials leak.
    c = DaemonClient(url="http://user:pw@127.0.0.1:9", token="s3cret-token")
    with pytest.raises(DaemonUnavailable) as gone:
        c.status()
    text = f"{gone.value} {gone.value.facts} {c!r}"
    assert "http://127.0.0.1:9" in text
    assert "s3cret" not in text and "pw" not in text


# -- no daemon -------------------------------------------------------------------


def dead_socket(directory: Path) -> Path:
    """A socket file nobody listens on: what a crashed daemon leaves behind."""
    path = directory / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    return path


def test_missing_socket_is_daemon_unavailable(short_dir: Path) -> None:
    path = short_dir / "none.sock"
    with pytest.raises(DaemonUnavailable) as info:
        DaemonClient(socket_path=path).status()
    assert info.value.facts["reason"] == "no_socket"
    assert str(path) in str(info.value) and info.value.facts["address"] == str(path)


def test_refused_connection_is_daemon_unavailable(short_dir: Path) -> None:
    path = dead_socket(short_dir)
    with pytest.raises(DaemonUnavailable) as info:
        DaemonClient(socket_path=path).ensure("s3://b/m", on_progress=lambda p: None)
    assert info.value.facts["reason"] == "connection_refused"
    assert f"no daemon at {path}: connection refused" in str(info.value)


def test_from_config(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = short_dir / "cache"
    cache.mkdir()
    monkeypatch.setenv("WEIGHTCACHE_CACHE_DIR", str(cache))
    # Nothing configured and no socket file: no daemon, no warning.
    assert DaemonClient.from_config(load_config()) is None
    # The default socket exists: use it.
    dead_socket(cache).rename(cache / "weightcache.sock")
    c = DaemonClient.from_config(load_config())
    assert c is not None and c.address == str(cache / "weightcache.sock")
    # A URL set explicitly wins over the default socket, and carries the token.
    monkeypatch.setenv("WEIGHTCACHE_URL", "https://node-7:8431")
    monkeypatch.setenv("WEIGHTCACHE_TOKEN", "t0k")
    c = DaemonClient.from_config(load_config())
    assert c is not None and c.address == "https://node-7:8431" and c._token == "t0k"
    # A socket set explicitly is used even when it is missing: the caller says so.
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", str(short_dir / "missing.sock"))
    c = DaemonClient.from_config(load_config())
    assert c is not None and c.address == str(short_dir / "missing.sock") and c._token == ""


# -- the loader --------------------------------------------------------------------


def test_loader_through_the_daemon_releases_its_lease(
    real: Real, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, files = real.safetensors_model()
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", real.sock)
    tensors, report = weightcache.load_with_report(ref)
    assert report.mode == "daemon" and not report.cache_hit and report.origin_bytes > 0
    assert_bitwise_equal(tensors, reference(files))
    c = real.client()
    status = c.status()
    assert status["leases"] == 0, "the load released its lease"
    assert (status["counters"]["misses"], status["counters"]["hits"]) == (1, 0)

    # open() takes no lease; a load of a few tensors is a hit.
    snapshot = weightcache.open(ref)
    assert snapshot.is_dir() and snapshot.name == report.revision
    _, report = weightcache.load_with_report(ref, tensors="bool.*")
    assert report.mode == "daemon" and report.cache_hit and report.tensors == 3
    status = c.status()
    assert status["leases"] == 0 and status["counters"]["hits"] == 2


def test_loader_propagates_the_daemons_errors(real: Real, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", real.sock)
    missing = f"file://{real.root}/origin/none"
    with pytest.raises(ModelNotFound, match="none"):
        weightcache.load(missing)
    # The daemon answered (no fallback to pulling in-process).
    assert real.client().status()["errors"] == {"model_not_found": 1}


def test_loader_falls_back_to_embedded_with_one_line(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    files = write_model(short_dir / "src", shards=2)
    ref = f"file://{short_dir}/origin/m"
    publish(short_dir / "src", parse_ref(ref), load_config())
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", str(dead_socket(short_dir)))
    with caplog.at_level(logging.INFO):
        tensors, report = weightcache.load_with_report(ref)
    assert report.mode == "embedded" and not report.cache_hit and report.origin_bytes > 0
    assert_bitwise_equal(tensors, reference(files))
    fallbacks = [r for r in caplog.records if r.getMessage().startswith("load.fallback")]
    assert len(fallbacks) == 1 and fallbacks[0].levelno == logging.WARNING
    assert fallbacks[0].getMessage() == (
        f"load.fallback reason=connection_refused daemon={short_dir / 'dead.sock'} mode=embedded"
    )
    assert "mode=embedded" in [r.getMessage() for r in caplog.records][-1]  # the load.done line


def test_loader_without_any_daemon_says_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    files = write_model(tmp_path / "src", shards=2)
    ref = f"file://{tmp_path}/origin/m"
    publish(tmp_path / "src", parse_ref(ref), load_config())
    monkeypatch.setenv("WEIGHTCACHE_CACHE_DIR", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO):
        tensors, report = weightcache.load_with_report(ref)
    assert report.mode == "embedded"
    # No socket configured and none at the default path: the same one line as a dead
    # daemon's, naming where it looked.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"load.fallback reason=no_daemon daemon={tmp_path / 'cache' / 'weightcache.sock'} "
        "mode=embedded"
    ]
    assert_bitwise_equal(tensors, reference(files))


# -- the command line --------------------------------------------------------------


def test_parse_when() -> None:
    now = 1_000_000.0
    assert cli.parse_when("+30s", now) == now + 30
    assert cli.parse_when("+5m", now) == now + 300
    assert cli.parse_when("+2h", now) == now + 7200
    assert cli.parse_when("+1.5d", now) == now + 1.5 * 86400
    assert cli.parse_when("2026-11-23T12:00:00Z", now) == 1795435200.0
    assert cli.parse_when("2026-11-23T14:00:00+02:00", now) == 1795435200.0
    for bad in ("2026-11-23T12:00:00", "tomorrow", "+30", "-5m", ""):
        with pytest.raises(RequestInvalid):
            cli.parse_when(bad, now)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_prefetch_jobs_status_evict(real: Real, capsys: pytest.CaptureFixture[str]) -> None:
    c, sock, ref = real.client(), real.sock, real.ref
    before = time.time()
    rc, out, _ = run_cli(
        capsys, "prefetch", ref, "--at", "+30s", "--priority", "background", "--socket", sock
    )
    assert rc == 0
    m = re.fullmatch(
        rf"scheduled job ([0-9a-f]{{16}}) for {re.escape(ref)} \(scheduled\)", out.splitlines()[0]
    )
    assert m, out
    job = c.job(m.group(1))
    assert before + 30 <= job["at"] <= time.time() + 30
    assert job["priority"] == "background" and job["deadline"] is None

    rc, out, _ = run_cli(capsys, "jobs", "--socket", sock)
    assert rc == 0 and out.splitlines()[0].split() == [
        "ID", "STATE", "DONE", "STARTS", "AFTER", "DEADLINE", "REF"
    ]  # fmt: skip
    assert out.splitlines()[1].split()[:2] == [job["id"], "scheduled"]
    rc, out, _ = run_cli(capsys, "jobs", job["id"], "--socket", sock)
    assert rc == 0 and out.startswith(f"job {job['id']}  scheduled  {ref}")
    rc, out, _ = run_cli(capsys, "jobs", job["id"], "--json", "--socket", sock)
    assert rc == 0 and json.loads(out) == c.job(job["id"])
    rc, _, err = run_cli(capsys, "jobs", "nope", "--socket", sock)
    assert rc == 1 and err.startswith("weightcache: not_found: ")

    rev = c.ensure(ref, lease=False)["revision"]
    status = c.status()
    rc, out, _ = run_cli(capsys, "status", "--socket", sock)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"node {status['node']}  (weightcache {status['version']}, up ")
    assert "requests  ensure 1: hits 0, misses 1, coalesced 0, overloaded 0" in lines
    assert "jobs      1 scheduled" in lines and "leases    0" in lines
    assert any(line.startswith(f"  cached   {rev[:16]}") for line in lines), out
    rc, out, _ = run_cli(capsys, "status", "--json", "--socket", sock)
    doc = json.loads(out)
    assert rc == 0 and set(doc) == set(status) and doc["counters"]["misses"] == 1

    c.ensure(ref)  # a lease: evicting needs --force
    rc, _, err = run_cli(capsys, "evict", ref, "--socket", sock)
    assert rc == 1 and err.startswith("weightcache: model_leased: ") and "\n  hint: " in err
    rc, out, _ = run_cli(capsys, "evict", ref, "--force", "--socket", sock)
    assert rc == 0
    assert re.fullmatch(
        rf"evicted {re.escape(ref)} \(revision {rev[:16]}\): freed \S+ \S+ in 2 blobs, "
        "leases overridden\n",
        out,
    ), out
    rc, _, err = run_cli(capsys, "evict", ref, "--socket", sock)
    assert rc == 1 and err.startswith("weightcache: model_not_found: ")


def test_cli_status_renders_models_pulls_and_jobs(capsys: pytest.CaptureFixture[str]) -> None:
    # A busy node's status, rendered: numbers the real daemon would need minutes to reach.
    status = {
        "node": "gpu-17",
        "version": "0.1.0",
        "uptime_s": 3725.0,
        "counters": {"ensure_requests": 9, "hits": 6, "misses": 3, "coalesced": 2,
                     "origin_bytes": 3 << 30, "served_bytes": 1 << 20},
        "disk": {"cache_dir": "/nvme/wc", "used_bytes": 3 << 30, "budget_bytes": 100 << 30,
                 "reserve_bytes": 10 << 30, "free_bytes": 500 << 30},
        "models": [{"revision": REV, "location": "s3://b/m", "state": "cached", "files": 4,
                    "bytes": 3 << 30, "leases": 1, "last_used": 1.7e9}],
        "pulls": [{"ref": "s3://b/n", "revision": "cd" * 32, "priority": "worker",
                   "done_bytes": 1 << 30, "total_bytes": 4 << 30,
                   "rate_bytes_per_s": 500 << 20, "waiters": 2}],
        "leases": 1,
        "jobs": {"scheduled": 1, "done": 2},
        "pending": 0,
        "max_pending": 256,
    }  # fmt: skip
    cli._print_status(status)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "node gpu-17  (weightcache 0.1.0, up 1h02m)"
    assert "used 3.0 GiB of 100.0 GiB budget, reserve 10.0 GiB, free 500.0 GiB" in out
    assert "hits 6, misses 3, coalesced 2" in out and "from origin 3.0 GiB" in out
    assert f"cached   {REV[:16]}     3.0 GiB     4 files  1 lease" in out
    assert " 25% 1.0 GiB of 4.0 GiB  500.0 MiB/s  2 waiting  worker  s3://b/n" in out
    assert "jobs      2 done, 1 scheduled" in out


def test_cli_without_a_daemon_says_so_in_one_line(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = short_dir / "none.sock"
    for argv in (["status"], ["jobs"], ["jobs", "x"], ["evict", "r"], ["prefetch", "r"]):
        rc, out, err = run_cli(capsys, *argv, "--socket", str(sock))
        assert rc == 1 and out == ""
        assert err == (
            f"weightcache: daemon_unavailable: no daemon at {sock}: "
            "start one with `weightcache daemon`\n"
        )


def test_cli_fetch_through_the_daemon_and_without_it(
    real: Real, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    ref = real.ref
    rc, out, _ = run_cli(capsys, "fetch", ref, "--json", "--socket", real.sock)
    doc = json.loads(out)
    assert rc == 0 and doc["mode"] == "daemon" and doc["source"] == "origin"
    assert doc["lease"] is None  # fetch takes no lease
    rc, out, _ = run_cli(capsys, "fetch", ref, "--socket", real.sock)
    assert rc == 0 and out.splitlines()[0] == f"already cached {ref}@{doc['revision']}"
    assert out.splitlines()[-1] == "  by the daemon"
    assert real.client().status()["leases"] == 0

    # A dead daemon: the same command pulls in-process, and says why in one line.
    dead = dead_socket(real.root)
    with caplog.at_level(logging.WARNING):
        rc, out, _ = run_cli(capsys, "fetch", ref, "--json", "--socket", str(dead))
    doc = json.loads(out)
    assert rc == 0 and doc["mode"] == "embedded" and doc["origin_bytes"] > 0
    assert os.path.isdir(doc["snapshot"])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"fetch.fallback reason=connection_refused daemon={dead} mode=embedded"
    ]


# -- a stand-in daemon, for what a real one does not do on purpose ------------------


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    #: NDJSON events, sent chunked, one chunk per line
    events: list[dict[str, Any]] | None = None
    #: close the stream after this many events, without the closing chunk
    cut_after: int | None = None
    raw: bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    #: close the connection without answering at all
    hang_up: bool = False


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


Route = Reply | Callable[[Seen], Reply]


class FakeDaemon:
    def __init__(self, server: socketserver.BaseServer) -> None:
        self.server = server
        self.routes: dict[tuple[str, str], Route] = {}
        self.seen: list[Seen] = []

    @property
    def sock(self) -> str:
        return str(self.server.server_address)

    def on(self, method: str, path: str, reply: Route) -> None:
        self.routes[(method, path)] = reply

    def answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        seen = Seen(h.command, h.path, dict(h.headers), json.loads(raw) if raw else None)
        self.seen.append(seen)
        route = self.routes.get((h.command, h.path))
        if route is None:
            reply = Reply(404, {"error": {"code": "not_found", "message": f"no route {h.path}"}})
        else:
            reply = route(seen) if callable(route) else route
        if reply.hang_up:
            h.close_connection = True
            return
        h.send_response(reply.status)
        for name, value in reply.headers.items():
            h.send_header(name, value)
        if reply.events is not None:
            h.send_header("Content-Type", "application/x-ndjson")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for i, event in enumerate(reply.events):
                if reply.cut_after is not None and i >= reply.cut_after:
                    h.close_connection = True
                    return
                line = json.dumps(event).encode() + b"\n"
                h.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                h.wfile.flush()
            h.wfile.write(b"0\r\n\r\n")
            return
        data = reply.raw if reply.raw is not None else json.dumps(reply.body).encode()
        h.send_header("Content-Type", reply.content_type)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _any(self) -> None:
        self.server.fake.answer(self)  # type: ignore[attr-defined]

    do_GET = do_POST = do_DELETE = _any

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


@pytest.fixture
def fake(short_dir: Path) -> Iterator[FakeDaemon]:
    server = _UnixServer(str(short_dir / "d.sock"), _Handler)
    fake = FakeDaemon(server)
    server.fake = fake  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01})
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def client_for(fake: FakeDaemon) -> DaemonClient:
    return DaemonClient(socket_path=fake.sock)


def result_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "ref": f"s3://b/m@{REV}",
        "revision": REV,
        "snapshot": f"/cache/snapshots/{REV}",
        "files": [
            {
                "path": "model.safetensors",
                "local_path": f"/cache/snapshots/{REV}/model.safetensors",
                "size": 10,
                "blake3": "cd" * 32,
            }
        ],
        "cache_hit": False,
        "total_bytes": 10,
        "source": "origin",
        "lease": None,
    }
    doc.update(over)
    return doc


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": "req-7", **extra}}


def test_a_daemon_that_hangs_up_or_tears_the_stream_is_unavailable(fake: FakeDaemon) -> None:
    fake.on("POST", "/v1/ensure", Reply(hang_up=True))
    with pytest.raises(DaemonUnavailable) as info:
        client_for(fake).ensure("s3://b/m")
    assert info.value.facts["reason"] == "connection_closed"

    # ... or dies in the middle of a pull: the stream ends without a result.
    progress = {"event": "progress", "done_bytes": 1, "total_bytes": 10}
    fake.on("POST", "/v1/ensure", Reply(events=[progress, progress, progress], cut_after=2))
    got: list[Progress] = []
    with pytest.raises(DaemonUnavailable) as info:
        client_for(fake).ensure("s3://b/m", on_progress=got.append)
    assert info.value.facts["reason"] == "connection_closed" and len(got) == 2
    fake.on("POST", "/v1/ensure", Reply(events=[progress]))
    with pytest.raises(DaemonUnavailable, match="ended without a result"):
        client_for(fake).ensure("s3://b/m", on_progress=got.append)


def test_unknown_events_are_skipped_and_a_plain_answer_is_taken(fake: FakeDaemon) -> None:
    # A newer daemon's events the client does not know are skipped.
    events: list[dict[str, Any]] = [
        {"event": "progress", "done_bytes": 4, "total_bytes": 10},
        {"event": "heartbeat"},
        {"event": "result", "result": result_doc()},
    ]
    fake.on("POST", "/v1/ensure", Reply(events=events))
    got: list[Progress] = []
    assert client_for(fake).ensure("s3://b/m", on_progress=got.append) == result_doc()
    assert [p.done_bytes for p in got] == [4]
    # A daemon that does not stream answers the streamed request with the plain result.
    fake.on("POST", "/v1/ensure", Reply(body=result_doc()))
    got.clear()
    assert client_for(fake).ensure("s3://b/m", on_progress=got.append) == result_doc()
    assert got == []


def test_answers_that_are_not_the_daemons_documents(fake: FakeDaemon) -> None:
    # A proxy's error page: not our error shape; the status is named.
    fake.on(
        "GET", "/v1/status", Reply(502, raw=b"<html>bad gateway</html>", content_type="text/html")
    )
    with pytest.raises(ResponseInvalid) as info:
        client_for(fake).status()
    assert "502" in str(info.value) and info.value.facts["status"] == 502
    fake.on("GET", "/v1/status", Reply(200, raw=b"[1, 2]"))
    with pytest.raises(ResponseInvalid, match="JSON object"):
        client_for(fake).status()
    # A code from a newer daemon keeps its code and message.
    fake.on("GET", "/v1/status", Reply(500, error_body("brand_new", "from a newer daemon")))
    with pytest.raises(WeightcacheError) as newer:
        client_for(fake).status()
    assert newer.value.code == "brand_new" and newer.value.message == "from a newer daemon"
    # An overloaded answer without the detail: Retry-After says how long.
    fake.on(
        "POST",
        "/v1/ensure",
        Reply(503, error_body("overloaded", "busy"), headers={"Retry-After": "7"}),
    )
    with pytest.raises(Overloaded) as busy:
        client_for(fake).ensure("s3://b/m")
    assert busy.value.retry_after_s == 7.0 and busy.value.facts["retry_after_s"] == 7.0


@pytest.fixture
def local_model(tmp_path: Path) -> tuple[str, dict[str, Path], dict[str, Any]]:
    """A model made local in this process: what the stand-in daemon answers with."""
    from weightcache.embedded import ensure_blocking

    files = write_model(tmp_path / "src", shards=2)
    ref = f"file://{tmp_path}/origin/m"
    publish(tmp_path / "src", parse_ref(ref), load_config())
    doc = ensure_blocking(ref, load_config()).to_json()
    return ref, files, doc


def test_a_failed_release_is_not_the_loads_failure(
    local_model: tuple[str, dict[str, Path], dict[str, Any]],
    fake: FakeDaemon,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref, files, doc = local_model
    doc.update(source="origin", coalesced=False, lease={"id": "L9", "revision": doc["revision"]})
    fake.on("POST", "/v1/ensure", Reply(body=doc))
    fake.on("POST", "/v1/leases/L9/release", Reply(404, error_body("not_found", "no lease")))
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", fake.sock)
    tensors, report = weightcache.load_with_report(ref)
    assert report.mode == "daemon"
    assert_bitwise_equal(tensors, reference(files))
    assert [(s.method, s.path) for s in fake.seen] == [
        ("POST", "/v1/ensure"),
        ("POST", "/v1/leases/L9/release"),
    ]


def test_loader_retries_an_overloaded_daemon_after_retry_after(
    local_model: tuple[str, dict[str, Path], dict[str, Any]],
    fake: FakeDaemon,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref, files, doc = local_model
    doc.update(source="cache", coalesced=False, lease=None)
    # Retry-After: 0 — a real daemon says at least 1 s, which this test would wait out.
    replies = [
        Reply(503, error_body("overloaded", "busy"), headers={"Retry-After": "0"}),
        Reply(503, error_body("overloaded", "busy"), headers={"Retry-After": "0"}),
        Reply(body=doc),
    ]
    fake.on("POST", "/v1/ensure", lambda seen: replies.pop(0))
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", fake.sock)
    tensors, report = weightcache.load_with_report(ref)
    assert report.mode == "daemon"
    assert [s.path for s in fake.seen] == ["/v1/ensure"] * 3
    assert_bitwise_equal(tensors, reference(files))
