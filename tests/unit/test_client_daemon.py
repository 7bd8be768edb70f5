"""The daemon client against a fake daemon on a Unix socket; the loader's fallback; the CLI.

The fake daemon is a real HTTP/1.1 server (the standard library's) that
answers canned JSON, chunked NDJSON streams, error bodies, and connections it
drops on purpose, so the client's parsing and its error mapping run for real.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import weightcache
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
    RequestInvalid,
    ShuttingDown,
    WeightcacheError,
)
from weightcache.publish import publish
from weightcache.refs import parse_ref

ROOT = Path(__file__).resolve().parents[2]
REV = "ab" * 32


# -- the fake daemon -----------------------------------------------------------


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


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="wc-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _serve(server: socketserver.BaseServer) -> Iterator[FakeDaemon]:
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


@pytest.fixture
def fake(short_dir: Path) -> Iterator[FakeDaemon]:
    yield from _serve(_UnixServer(str(short_dir / "d.sock"), _Handler))


@pytest.fixture
def fake_tcp() -> Iterator[FakeDaemon]:
    yield from _serve(_TCPServer(("127.0.0.1", 0), _Handler))


def client_for(fake: FakeDaemon) -> DaemonClient:
    return DaemonClient(socket_path=fake.server.server_address)


def dead_socket(directory: Path) -> Path:
    """A socket file nobody listens on: what a crashed daemon leaves behind."""
    path = directory / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    return path


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
        "origin_bytes": 10,
        "reused_bytes": 0,
        "coalesced_bytes": 0,
        "resumed_bytes": 0,
        "retries": 1,
        "resolve_seconds": 0.25,
        "seconds": 1.5,
        "coalesced": True,
        "source": "origin",
        "lease": {"id": "L1", "revision": REV, "pid": 42, "expires": 1e9},
    }
    doc.update(over)
    return doc


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "request_id": "req-7", **extra}}


# -- results and progress ------------------------------------------------------


def test_ensure_returns_the_result_and_sends_the_documented_body(fake: FakeDaemon) -> None:
    fake.on("POST", "/v1/ensure", Reply(body=result_doc()))
    doc = client_for(fake).ensure("s3://b/m")
    assert doc == result_doc()
    [seen] = fake.seen
    assert seen.body == {"ref": "s3://b/m", "stream": False, "lease": True, "priority": "worker"}
    assert seen.headers["Content-Type"] == "application/json"
    assert "Authorization" not in seen.headers  # the socket needs no token

    ensured = Ensured.from_json(doc)
    assert ensured.mode == "daemon" and ensured.lease_id == "L1" and ensured.source == "origin"
    assert ensured.snapshot == Path(f"/cache/snapshots/{REV}")
    [f] = ensured.files
    assert (f.path, f.size, f.blake3) == ("model.safetensors", 10, "cd" * 32)
    assert f.local_path == Path(f"/cache/snapshots/{REV}/model.safetensors")
    assert (ensured.resolve_seconds, ensured.seconds, ensured.retries) == (0.25, 1.5, 1)


def test_ensure_streams_progress_then_the_result(fake: FakeDaemon) -> None:
    events: list[dict[str, Any]] = [
        {"event": "progress", "done_bytes": n, "total_bytes": 10, "rate_bytes_per_s": 5.0,
         "source": "origin", "ref": "s3://b/m"}
        for n in (0, 4, 10)
    ]  # fmt: skip
    events.append({"event": "heartbeat"})  # unknown events are skipped
    events.append({"event": "result", "result": result_doc(lease=None)})
    fake.on("POST", "/v1/ensure", Reply(events=events))
    got: list[Progress] = []
    doc = client_for(fake).ensure("s3://b/m", lease=False, priority="admin", on_progress=got.append)
    assert doc == result_doc(lease=None)
    assert [p.done_bytes for p in got] == [0, 4, 10]
    assert got[-1] == Progress(10, 10, 5.0, "origin", "s3://b/m")
    assert fake.seen[0].body == {
        "ref": "s3://b/m",
        "stream": True,
        "lease": False,
        "priority": "admin",
    }
    assert Ensured.from_json(doc).lease_id is None


def test_a_daemon_that_does_not_stream_still_gives_the_result(fake: FakeDaemon) -> None:
    fake.on("POST", "/v1/ensure", Reply(body=result_doc()))
    got: list[Progress] = []
    assert client_for(fake).ensure("s3://b/m", on_progress=got.append) == result_doc()
    assert got == []


def test_other_routes(fake: FakeDaemon) -> None:
    job = {"id": "j1", "ref": "s3://b/m", "state": "scheduled", "start_after": 100.0}
    fake.on("GET", "/v1/status", Reply(body={"node": "n1", "counters": {"hits": 3}}))
    fake.on("POST", "/v1/prefetch", Reply(202, {"job": job, "created": True}))
    fake.on("GET", "/v1/jobs", Reply(body={"jobs": [job]}))
    fake.on("GET", "/v1/jobs/j1", Reply(body={"job": job}))
    fake.on("DELETE", "/v1/models", Reply(body={"ref": "s3://b/m", "freed_bytes": 5}))
    fake.on("POST", "/v1/leases/L%2F1/release", Reply(body={"released": True}))
    fake.on("GET", "/healthz", Reply(body={"live": True, "ready": True}))
    c = client_for(fake)
    assert c.status()["counters"] == {"hits": 3}
    assert c.prefetch("s3://b/m", at=100.0, deadline="2030-01-01T00:00:00Z") == {
        "job": job,
        "created": True,
    }
    assert c.jobs() == [job]
    assert c.job("j1") == job
    assert c.evict("s3://b/m", force=True)["freed_bytes"] == 5
    assert c.release("L/1") == {"released": True}
    assert c.health()["ready"] is True
    bodies = {(s.method, s.path): s.body for s in fake.seen}
    assert bodies[("POST", "/v1/prefetch")] == {
        "ref": "s3://b/m",
        "priority": "admin",
        "at": 100.0,
        "deadline": "2030-01-01T00:00:00Z",
    }
    assert bodies[("DELETE", "/v1/models")] == {"ref": "s3://b/m", "force": True}
    assert bodies[("GET", "/v1/status")] is None
    # A daemon that is not ready answers /healthz with 503 and its health document.
    fake.on("GET", "/healthz", Reply(503, {"live": True, "ready": False}))
    assert c.health() == {"live": True, "ready": False}
    fake.on("GET", "/healthz", Reply(503, error_body("shutting_down", "stopping")))
    with pytest.raises(ShuttingDown):
        c.health()
    with pytest.raises(NotFound, match="no job"):
        fake.on("GET", "/v1/jobs/nope", Reply(404, error_body("not_found", "no job 'nope'")))
        c.job("nope")


# -- errors: the same class the daemon raised ----------------------------------


def test_an_error_body_raises_the_daemons_class_with_its_facts(fake: FakeDaemon) -> None:
    details = {"path": "model.safetensors", "chunk": 3, "expected": "aa" * 32, "actual": "bb" * 32}
    fake.on(
        "POST",
        "/v1/ensure",
        Reply(502, error_body("hash_mismatch", "chunk 3 of model.safetensors", details=details)),
    )
    with pytest.raises(HashMismatch) as info:
        client_for(fake).ensure("s3://b/m")
    err = info.value
    assert err.code == "hash_mismatch" and err.message == "chunk 3 of model.safetensors"
    assert err.facts == {**details, "request_id": "req-7"}


def test_overloaded_carries_retry_after(fake: FakeDaemon) -> None:
    fake.on(
        "POST",
        "/v1/ensure",
        Reply(
            503,
            error_body(
                "overloaded",
                "256 pulls pending",
                hint="retry later",
                details={"retry_after_s": 2.5},
            ),
            headers={"Retry-After": "3"},
        ),
    )
    with pytest.raises(Overloaded) as info:
        client_for(fake).ensure("s3://b/m")
    assert info.value.retry_after_s == 2.5 and info.value.retryable
    assert info.value.hint == "retry later"

    # Without the detail, the Retry-After header says how long.
    fake.on(
        "POST",
        "/v1/ensure",
        Reply(503, error_body("overloaded", "busy"), headers={"Retry-After": "7"}),
    )
    with pytest.raises(Overloaded) as info:
        client_for(fake).ensure("s3://b/m")
    assert info.value.retry_after_s == 7.0 and info.value.facts["retry_after_s"] == 7.0


def test_an_error_event_in_the_stream_raises_its_class(fake: FakeDaemon) -> None:
    events: list[dict[str, Any]] = [
        {"event": "progress", "done_bytes": 1, "total_bytes": 10},
        {"event": "error", "error": {"code": "model_leased", "message": "x", "details": {"n": 1}}},
    ]
    fake.on("POST", "/v1/ensure", Reply(events=events))
    with pytest.raises(ModelLeased) as info:
        client_for(fake).ensure("s3://b/m", on_progress=lambda p: None)
    assert info.value.facts == {"n": 1}


def test_an_error_that_is_not_ours_names_the_status(fake: FakeDaemon) -> None:
    fake.on(
        "GET", "/v1/status", Reply(502, raw=b"<html>bad gateway</html>", content_type="text/html")
    )
    with pytest.raises(WeightcacheError) as info:
        client_for(fake).status()
    assert type(info.value) is WeightcacheError
    assert "502" in str(info.value) and info.value.facts["status"] == 502
    fake.on("GET", "/v1/status", Reply(200, raw=b"[1, 2]"))
    with pytest.raises(WeightcacheError, match="JSON object"):
        client_for(fake).status()


def test_unknown_codes_keep_their_code(fake: FakeDaemon) -> None:
    fake.on("GET", "/v1/status", Reply(500, error_body("brand_new", "from a newer daemon")))
    with pytest.raises(WeightcacheError) as info:
        client_for(fake).status()
    assert info.value.code == "brand_new" and info.value.message == "from a newer daemon"


# -- no daemon -------------------------------------------------------------------


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


def test_a_daemon_that_hangs_up_is_unavailable(fake: FakeDaemon) -> None:
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


def test_tcp_sends_the_token_and_never_shows_it(fake_tcp: FakeDaemon) -> None:
    host, port = fake_tcp.server.server_address[:2]  # type: ignore[index,str-unpack]
    fake_tcp.on("GET", "/v1/status", Reply(body={"node": "n"}))
    c = DaemonClient(url=f"http://{host}:{port}/", token="s3cret-token")
    assert c.status() == {"node": "n"}
    assert fake_tcp.seen[0].headers["Authorization"] == "Bearer s3cret-token"
    fake_tcp.on("GET", "/v1/status", Reply(401, error_body("unauthorized", "bad token")))
    with pytest.raises(WeightcacheError) as info:
        c.status()
    assert info.value.code == "unauthorized"

    # Nothing listens on port 9: refused; neither the token nor URL credentials leak.
    c = DaemonClient(url="http://user:pw@127.0.0.1:9", token="s3cret-token")
    with pytest.raises(DaemonUnavailable) as info:
        c.status()
    text = f"{info.value} {info.value.facts} {c!r}"
    assert "http://127.0.0.1:9" in text
    assert "s3cret" not in text and "pw" not in text


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


def test_importing_the_client_stays_light() -> None:
    probe = (
        "import json, sys\n"
        "import weightcache.client.daemon\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    loaded = set(json.loads(out.stdout))
    for heavy in ("aiohttp", "uvloop", "minio", "diskcache", "torch", "weightcache.node"):
        assert heavy not in loaded, f"{heavy} imported by weightcache.client.daemon"


# -- the loader --------------------------------------------------------------------


@pytest.fixture
def model(tmp_path: Path) -> tuple[str, dict[str, Path]]:
    files = write_model(tmp_path / "src", shards=2)
    ref = f"file://{tmp_path}/origin/m"
    publish(tmp_path / "src", parse_ref(ref), load_config())
    return ref, files


def test_loader_falls_back_to_embedded_with_one_line(
    model: tuple[str, dict[str, Path]],
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ref, files = model
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


def test_loader_without_any_daemon_is_quietly_embedded(
    model: tuple[str, dict[str, Path]], caplog: pytest.LogCaptureFixture
) -> None:
    ref, files = model
    tensors, report = weightcache.load_with_report(ref)
    assert report.mode == "embedded"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert_bitwise_equal(tensors, reference(files))


def test_loader_through_the_daemon_releases_its_lease(
    model: tuple[str, dict[str, Path]], fake: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, files = model
    # The fake daemon answers with what a real pull made local.
    from weightcache.embedded import ensure_blocking

    doc = ensure_blocking(ref, load_config()).to_json()
    doc.update(source="origin", coalesced=False, lease={"id": "L9", "revision": doc["revision"]})
    fake.on("POST", "/v1/ensure", Reply(body=doc))
    fake.on("POST", "/v1/leases/L9/release", Reply(body={}))
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", str(fake.server.server_address))
    tensors, report = weightcache.load_with_report(ref)
    assert report.mode == "daemon" and report.revision == doc["revision"]
    assert report.origin_bytes == doc["origin_bytes"]
    assert_bitwise_equal(tensors, reference(files))
    assert [(s.method, s.path) for s in fake.seen] == [
        ("POST", "/v1/ensure"),
        ("POST", "/v1/leases/L9/release"),
    ]
    assert fake.seen[0].body["lease"] is True

    # open() takes no lease; a failed release is not the load's failure.
    fake.seen.clear()
    assert weightcache.open(ref) == Path(doc["snapshot"])
    assert fake.seen[0].body["lease"] is False
    fake.on("POST", "/v1/leases/L9/release", Reply(404, error_body("not_found", "no lease")))
    _, report = weightcache.load_with_report(ref, tensors="bool.*")
    assert report.mode == "daemon" and report.tensors == 3


def test_loader_propagates_the_daemons_errors(
    fake: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.on("POST", "/v1/ensure", Reply(404, error_body("model_not_found", "no model at s3://b/x")))
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", str(fake.server.server_address))
    with pytest.raises(ModelNotFound, match="no model at s3://b/x"):
        weightcache.load("s3://b/x")


def test_loader_retries_an_overloaded_daemon_after_retry_after(
    model: tuple[str, dict[str, Path]], fake: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, files = model
    from weightcache.embedded import ensure_blocking

    doc = ensure_blocking(ref, load_config()).to_json()
    doc.update(source="cache", coalesced=False, lease=None)
    replies = [
        Reply(503, error_body("overloaded", "busy"), headers={"Retry-After": "0"}),
        Reply(503, error_body("overloaded", "busy"), headers={"Retry-After": "0"}),
        Reply(body=doc),
    ]
    fake.on("POST", "/v1/ensure", lambda seen: replies.pop(0))
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", str(fake.server.server_address))
    tensors, report = weightcache.load_with_report(ref)
    assert report.mode == "daemon"
    assert [s.path for s in fake.seen] == ["/v1/ensure"] * 3
    assert_bitwise_equal(tensors, reference(files))


def test_loader_falls_back_while_the_daemon_shuts_down(
    model: tuple[str, dict[str, Path]], fake: FakeDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, _ = model
    fake.on("POST", "/v1/ensure", Reply(503, error_body("shutting_down", "stopping")))
    monkeypatch.setenv("WEIGHTCACHE_SOCKET", str(fake.server.server_address))
    _, report = weightcache.load_with_report(ref)
    assert report.mode == "embedded"


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


def test_cli_prefetch_at_relative_time(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    job = {
        "id": "3f9a",
        "ref": "s3://b/m",
        "at": 0,
        "deadline": None,
        "priority": "background",
        "state": "scheduled",
        "start_after": 0,
    }

    def echo(seen: Seen) -> Reply:
        return Reply(202, {"job": {**job, "at": seen.body["at"]}, "created": True})

    fake.on("POST", "/v1/prefetch", echo)
    sock = str(fake.server.server_address)
    before = time.time()
    rc, out, _ = run_cli(
        capsys, "prefetch", "s3://b/m", "--at", "+30s", "--priority", "background", "--socket", sock
    )
    assert rc == 0 and out.startswith("scheduled job 3f9a for s3://b/m (scheduled)")
    body = fake.seen[0].body
    assert before + 30 <= body["at"] <= time.time() + 30
    assert body["priority"] == "background" and "deadline" not in body


def test_cli_status_jobs_evict(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
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
    fake.on("GET", "/v1/status", Reply(body=status))
    sock = str(fake.server.server_address)
    rc, out, _ = run_cli(capsys, "status", "--socket", sock)
    assert rc == 0
    assert out.splitlines()[0] == "node gpu-17  (weightcache 0.1.0, up 1h02m)"
    assert "used 3.0 GiB of 100.0 GiB budget, reserve 10.0 GiB, free 500.0 GiB" in out
    assert "hits 6, misses 3, coalesced 2" in out and "from origin 3.0 GiB" in out
    assert f"cached   {REV[:16]}     3.0 GiB     4 files  1 lease" in out
    assert " 25% 1.0 GiB of 4.0 GiB  500.0 MiB/s  2 waiting  worker  s3://b/n" in out
    assert "jobs      2 done, 1 scheduled" in out
    rc, out, _ = run_cli(capsys, "status", "--json", "--socket", sock)
    assert rc == 0 and json.loads(out) == status

    job = {"id": "j1", "ref": "s3://b/m", "state": "failed", "priority": "admin",
           "start_after": 1.7e9, "deadline": None, "done_bytes": 5, "total_bytes": 10,
           "error": {"code": "origin_unavailable", "message": "down"}}  # fmt: skip
    fake.on("GET", "/v1/jobs", Reply(body={"jobs": [job]}))
    fake.on("GET", "/v1/jobs/j1", Reply(body=job))
    rc, out, _ = run_cli(capsys, "jobs", "--socket", sock)
    assert rc == 0 and out.splitlines()[0].split() == [
        "ID", "STATE", "DONE", "STARTS", "AFTER", "DEADLINE", "REF"
    ]  # fmt: skip
    assert "j1" in out and "failed" in out and " 50%" in out and "origin_unavailable: down" in out
    rc, out, _ = run_cli(capsys, "jobs", "j1", "--socket", sock)
    assert rc == 0 and out.startswith("job j1  failed  s3://b/m") and "progress     50%" in out
    rc, out, _ = run_cli(capsys, "jobs", "j1", "--json", "--socket", sock)
    assert json.loads(out) == job

    fake.on(
        "DELETE",
        "/v1/models",
        Reply(body={"ref": "s3://b/m", "revision": REV, "freed_bytes": 3 << 30,
                    "blobs_removed": 4, "forced": True}),
    )  # fmt: skip
    rc, out, _ = run_cli(capsys, "evict", "s3://b/m", "--force", "--socket", sock)
    assert rc == 0 and fake.seen[-1].body == {"ref": "s3://b/m", "force": True}
    assert out.strip() == (
        f"evicted s3://b/m (revision {REV[:16]}): freed 3.0 GiB in 4 blobs, leases overridden"
    )
    fake.on("DELETE", "/v1/models", Reply(409, error_body("model_leased", "leased", hint="wait")))
    rc, _, err = run_cli(capsys, "evict", "s3://b/m", "--socket", sock)
    assert rc == 1 and err == "weightcache: model_leased: leased\n  hint: wait\n"


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
    model: tuple[str, dict[str, Path]],
    fake: FakeDaemon,
    short_dir: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    ref, _ = model
    progress = {"event": "progress", "done_bytes": 5, "total_bytes": 10, "source": "origin"}
    fake.on(
        "POST",
        "/v1/ensure",
        Reply(events=[progress, {"event": "result", "result": result_doc(lease=None)}]),
    )
    rc, out, _ = run_cli(
        capsys, "fetch", ref, "--json", "--socket", str(fake.server.server_address)
    )
    assert rc == 0 and json.loads(out) == {**result_doc(lease=None), "mode": "daemon"}
    assert fake.seen[0].body == {"ref": ref, "stream": True, "lease": False, "priority": "worker"}
    rc, out, _ = run_cli(capsys, "fetch", ref, "--socket", str(fake.server.server_address))
    assert rc == 0 and out.splitlines()[0] == f"fetched s3://b/m@{REV}"
    assert out.splitlines()[-1] == "  by the daemon, joined a pull in flight"

    # A dead daemon: the same command pulls in-process, and says why in one line.
    dead = dead_socket(short_dir)
    with caplog.at_level(logging.WARNING):
        rc, out, _ = run_cli(capsys, "fetch", ref, "--json", "--socket", str(dead))
    doc = json.loads(out)
    assert rc == 0 and doc["mode"] == "embedded" and doc["origin_bytes"] > 0
    assert os.path.isdir(doc["snapshot"])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"fetch.fallback reason=connection_refused daemon={dead} mode=embedded"
    ]
