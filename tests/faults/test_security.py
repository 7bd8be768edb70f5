"""Security properties of the daemon and the client, each proven by a test here.

* TCP: every guarded route refuses a request without the bearer token, or with
  any other value, before it does anything; probes, metrics and the document stay open.
* Blobs: only complete, verified content, only by its full hash; nothing
  path-like, and never a download still under ``partial/``.
* The Unix socket is ``0660`` whatever the umask.
* Secrets (the AWS secret key, the bearer token) and presigned URLs never reach the
  daemon's log at ``-vv``, the client's log, an error body, ``/v1/status`` or
  ``/metrics``, through successful and failing pulls alike.
* Limits: bodies and headers beyond the limit are refused; leases per client are bounded.
* Cross-site requests: a page in a browser on the node cannot make the daemon act,
  even on loopback without a token: every POST and DELETE must declare
  ``application/json``, which a browser only sends after a CORS preflight the daemon
  never grants; what it sends without one (text, forms, multipart, no type) is a 415
  before anything happens.

docs/reliability.md ("Security") lists each property with the test that proves it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults.test_hostile_api import (
    TOKEN,
    Reply,
    Served,
    collect_before_report,
    make_model,
    raw_exchange,
    warm,
)
from weightcache.api import openapi
from weightcache.client.daemon import UnixHTTPConnection
from weightcache.config import load_config
from weightcache.errors import OriginDenied, Unauthorized
from weightcache.hashing import digest_bytes
from weightcache.publish import publish
from weightcache.refs import parse_ref

ROOT = Path(__file__).resolve().parents[2]
#: what a presigned URL or a signed request would show if it were logged
SIGNATURE_MARKS = ("X-Amz-Signature", "X-Amz-Credential", "AWS4-HMAC-SHA256", "Signature=")


# -- TCP auth --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, str]]:
    root = tmp_path_factory.mktemp("secured")
    ref = make_model(root, "m", 200_000, 7)
    with Served(root, {"WEIGHTCACHE_TOKEN": TOKEN}) as served:
        warm(served, ref)
        yield served, ref


def _operations() -> list[tuple[str, str, bool]]:
    """(method, path template, guarded) for every documented operation."""
    doc = openapi.document()
    return [
        (method.upper(), path, op.get("security") != [])
        for path, item in doc["paths"].items()
        for method, op in item.items()
    ]


def _request(served: Served, ref: str, template: str, *, harmful: bool) -> tuple[str, bytes | None]:
    """The path and body for an operation: with ``harmful``, one that would change state."""
    digest = next(iter(_digests(served)))
    path = template.replace("{id}", "no-such-id").replace("{digest}", digest)
    bodies = {
        "/v1/ensure": {"ref": ref, "lease": harmful},
        "/v1/prefetch": {"ref": ref, "at": 0 if harmful else 4102444800},
        "/v1/models": {"ref": ref if harmful else ref + "-not-cached", "force": True},
    }
    body = bodies.get(template)
    return path, json.dumps(body).encode() if body is not None else None


def _digests(served: Served) -> list[str]:
    return sorted(p.name for p in (served.root / "cache" / "blobs").iterdir())


def _state(served: Served) -> Any:
    doc = served.call("GET", "/v1/status").json()
    jobs = served.call("GET", "/v1/jobs").json()["jobs"]
    return (
        {k: v for k, v in doc["counters"].items()},
        doc["leases"],
        sorted(m["revision"] for m in doc["models"]),
        len(jobs),
    )


BAD_AUTH = [
    None,
    "Bearer wrong-token",
    f"Bearer {TOKEN[:-1]}",
    f"Bearer {TOKEN}x",
    f"Bearer x{TOKEN}",
    f"Bearer {TOKEN.upper()}",
    f"Basic {base64.b64encode(f'user:{TOKEN}'.encode()).decode()}",
    f"Token {TOKEN}",
    TOKEN,
    f"Bearer{TOKEN}",
    "Bearer",
    "Bearer ",
    "",
    f"Bearer\t{TOKEN}",
    f"Bearer {TOKEN} extra",
    "Bearer tökén",
]


@collect_before_report
@pytest.mark.parametrize(("method", "template", "guarded"), _operations())
def test_tcp_guarded_routes_refuse_every_wrong_token_and_do_nothing(
    secured: tuple[Served, str], method: str, template: str, guarded: bool
) -> None:
    served, ref = secured
    path, body = _request(served, ref, template, harmful=True)
    before = _state(served)
    for auth in BAD_AUTH:
        headers = {} if auth is None else {"Authorization": auth}
        if body is not None:
            headers["Content-Type"] = "application/json"
        reply = served.call(method, path, body, headers, tcp=True, token=None)
        if not guarded:
            assert reply.status in (200, 503), (auth, reply.status)
            continue
        assert reply.status == 401, (method, path, auth, reply.status, reply.body[:200])
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
        if method != "HEAD":
            err = reply.json()["error"]
            assert err["code"] == "unauthorized"
            assert TOKEN not in reply.body.decode(errors="replace")
            if auth:
                assert auth.encode() not in reply.body or len(auth) < 8, "echoes the credential"
    # Nothing happened: no pull, no job, no eviction, no lease.
    assert _state(served) == before
    if guarded:
        path, body = _request(served, ref, template, harmful=False)
        reply = served.call(method, path, body, tcp=True)
        assert reply.status != 401, reply.body[:200]


def _accepts(header: str) -> bool:
    scheme, _, given_token = header.partition(" ")
    return scheme.lower() == "bearer" and given_token.strip() == TOKEN


_auth_values = st.one_of(
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
        max_size=60,
    ),
    st.builds(
        lambda scheme, pre, post: f"{scheme} {pre}{TOKEN}{post}",
        st.sampled_from(["Bearer", "bearer", "BEARER", "Bearer ", "Basic", "bearer:"]),
        st.sampled_from(["", " ", "x", "\t"]),
        st.sampled_from(["", " ", "x", "\t", "\x00"]),
    ),
    st.builds(
        lambda i, c: f"Bearer {TOKEN[:i]}{c}{TOKEN[i + 1 :]}",
        st.integers(min_value=0, max_value=len(TOKEN) - 1),
        st.sampled_from("aZ0-_é"),
    ),
).map(str.strip)


@collect_before_report
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(auth=_auth_values)
def test_tcp_accepts_exactly_the_token(secured: tuple[Served, str], auth: str) -> None:
    served, _ = secured
    try:
        reply = served.call("GET", "/v1/status", None, {"Authorization": auth}, tcp=True)
    except ValueError:
        return  # http.client refuses to send it (a NUL): no request, nothing to check
    if any(ord(c) < 0x20 and c != "\t" for c in auth):
        # Control characters are not allowed in a header: aiohttp's parser says 400.
        assert reply.status in (400, 401), (auth, reply.status)
    elif _accepts(auth):
        assert reply.status == 200, reply.body[:200]
    else:
        assert reply.status == 401, (auth, reply.status)
        assert reply.json()["error"]["code"] == "unauthorized"


@collect_before_report
@pytest.mark.parametrize(
    "path",
    [
        "//v1/status",
        "/v1//status",
        "/v1/./status",
        "/v1/%73tatus",
        "/%76%31/status",
        "/v1/status/",
        "/V1/status",
        "/v1/status%2F",
        "/v1/status;x",
        "/v1/openapi.json/../status",
        "/healthz/../v1/status",
        "/metrics/../v1/jobs",
        "/v1/jobs/../status",
        "/v1/blobs/..%2fstatus",
        "/v1/status?token=" + TOKEN[:3],
    ],
)
def test_path_spellings_do_not_dodge_the_token(secured: tuple[Served, str], path: str) -> None:
    served, _ = secured
    reply = served.call("GET", path, tcp=True, token=None)
    assert reply.status in (400, 401, 404), (path, reply.status, reply.body[:200])
    assert b'"counters"' not in reply.body and b'"jobs"' not in reply.body


@collect_before_report
def test_unix_socket_needs_no_token_and_tcp_open_routes_stay_open(
    secured: tuple[Served, str],
) -> None:
    served, _ = secured
    assert served.call("GET", "/v1/status").status == 200
    for path in ("/healthz", "/metrics", "/v1/openapi.json"):
        assert served.call("GET", path, tcp=True, token=None).status == 200, path


# -- blobs -------------------------------------------------------------------------------


@collect_before_report
def test_blobs_are_served_whole_and_verified_by_full_hash_only(
    secured: tuple[Served, str],
) -> None:
    served, _ = secured
    digests = _digests(served)
    assert digests
    for digest in digests:
        for tcp in (False, True):
            reply = served.call("GET", f"/v1/blobs/{digest}", tcp=tcp)
            assert reply.status == 200
            assert digest_bytes(reply.body) == digest
            head = served.call("HEAD", f"/v1/blobs/{digest}", tcp=tcp)
            assert head.status == 200 and int(head.headers["Content-Length"]) == len(reply.body)
            ranged = served.call("GET", f"/v1/blobs/{digest}", None, {"Range": "bytes=3-9"})
            assert ranged.status == 206 and ranged.body == reply.body[3:10]
        # Any other spelling of the same content is refused, never served.
        for other in (
            digest.upper(),
            digest[:63],
            digest[:16],
            digest + "0",
            f"..%2fblobs%2f{digest}",
            f"%2e%2e%2f%2e%2e%2fblobs%2f{digest}",
            f"{digest}%00",
            f"{digest}.part",
        ):
            reply = served.call("GET", f"/v1/blobs/{other}", tcp=True)
            assert reply.status in (400, 404), (other, reply.status)
            assert digest_bytes(reply.body) != digest


@collect_before_report
def test_a_download_in_partial_is_never_served(tmp_path: Path) -> None:
    size = 1_500_000
    ref = make_model(tmp_path, "slow", size, 8, chunk="64KiB")
    weights = (tmp_path / "src/slow/weights.bin").read_bytes()
    digest = digest_bytes(weights)
    # A planted "download" of content that is nowhere verified: its digest is right,
    # its bytes are right, and it still must not be served from partial/.
    planted = b"planted bytes that never passed verification"
    planted_digest = digest_bytes(planted)
    with Served(
        tmp_path, {"WEIGHTCACHE_TOKEN": TOKEN, "WEIGHTCACHE_FETCH_MAX_BYTES_PER_S": "500KB"}
    ) as served:
        partial = served.root / "cache" / "partial"
        (partial / f"{planted_digest}.part").write_bytes(planted)
        pulled: list[Reply] = []
        puller = threading.Thread(
            target=lambda: pulled.append(served.post("/v1/ensure", {"ref": ref}))
        )
        puller.start()
        try:
            deadline = time.monotonic() + 30
            while not (partial / f"{digest}.part").exists():
                assert time.monotonic() < deadline, "the pull never started"
                time.sleep(0.01)
            refused = 0
            blob = served.root / "cache" / "blobs" / digest
            while puller.is_alive() and (partial / f"{digest}.part").exists():
                for tcp in (False, True):
                    for method in ("GET", "HEAD"):
                        reply = served.call(method, f"/v1/blobs/{digest}", tcp=tcp)
                        if reply.status == 200:
                            # Committed between the look at partial/ and the request:
                            # then it is the whole, verified blob.
                            assert blob.exists()
                            assert method == "HEAD" or reply.body == weights
                            assert int(reply.headers["Content-Length"]) == size
                            continue
                        assert reply.status == 404, (method, tcp, reply.status)
                        assert not reply.body or reply.json()["error"]["code"] == "not_found"
                        refused += 1
                for name in (
                    f"{digest}.part",
                    f"..%2fpartial%2f{digest}.part",
                    f"%2e%2e%2fpartial%2f{digest}.part",
                    f"{digest}.chunks",
                ):
                    reply = served.call("GET", f"/v1/blobs/{name}", tcp=True)
                    assert reply.status in (400, 404), (name, reply.status)
                time.sleep(0.05)
            assert refused >= 8, "the download was never observed in partial/"
        finally:
            puller.join(60)
        assert pulled and pulled[0].status == 200, pulled and pulled[0].body
        whole = served.call("GET", f"/v1/blobs/{digest}", tcp=True)
        assert whole.status == 200 and whole.body == weights
        for tcp in (False, True):
            assert served.call("GET", f"/v1/blobs/{planted_digest}", tcp=tcp).status == 404


# -- the Unix socket ------------------------------------------------------------------


class Daemon:
    """``python -m weightcache -vv daemon`` with its log in a file, TCP on a free port."""

    def __init__(
        self, tmp: Path, name: str, env: dict[str, str], *, umask: int = 0o022, tcp: bool = True
    ) -> None:
        self.sock = tmp / f"{name}.sock"
        self.log_path = tmp / f"{name}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("WEIGHTCACHE_", "AWS_"))}
        base["AWS_EC2_METADATA_DISABLED"] = "true"  # loopback only, even for credentials
        args = [sys.executable, "-m", "weightcache", "-vv", "daemon", "--socket", str(self.sock)]
        if tcp:
            args += ["--listen", "127.0.0.1:0"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                args,
                env={
                    **base,
                    "WEIGHTCACHE_CACHE_DIR": str(tmp / f"{name}-cache"),
                    "WEIGHTCACHE_CACHE_RESERVE_BYTES": "0",
                    **env,
                },
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                umask=umask,
            )
        self.port = 0
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log()[-3000:]
            m = re.search(r"daemon\.started .* listen=(\S+)", self.log())
            if m:
                if tcp:
                    self.port = int(m.group(1).rpartition(":")[2])
                break
            assert time.monotonic() < deadline, self.log()[-3000:]
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def call(
        self, method: str, path: str, doc: Any = None, *, tcp: bool = False, token: str = ""
    ) -> Reply:
        import http.client

        conn: http.client.HTTPConnection
        if tcp:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        else:
            conn = UnixHTTPConnection(self.sock, timeout=120, read_timeout=120)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if method in ("POST", "DELETE"):
            headers["Content-Type"] = "application/json"
        body = json.dumps(doc).encode() if doc is not None else None
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return Reply(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()


@collect_before_report
@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_unix_socket_is_0660_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    daemon = Daemon(tmp_path, "d", {}, umask=umask, tcp=False)
    try:
        st_ = daemon.sock.lstat()
        assert stat.S_ISSOCK(st_.st_mode)
        assert stat.S_IMODE(st_.st_mode) == 0o660, oct(st_.st_mode)
        assert not st_.st_mode & stat.S_IWOTH and not st_.st_mode & stat.S_IROTH
        assert st_.st_uid == os.getuid()
        lock = daemon.sock.with_name(daemon.sock.name + ".lock")
        assert not stat.S_IMODE(lock.stat().st_mode) & 0o077, oct(lock.stat().st_mode)
        assert daemon.call("GET", "/healthz").status == 200
    finally:
        daemon.stop()


# -- secrets ------------------------------------------------------------------------------


def _publish_s3(tmp: Path, s3: Any, name: str) -> str:
    src = tmp / "src" / name
    src.mkdir(parents=True)
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.arange(4096, dtype=torch.float32)}, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps({"name": name}))
    ref = f"s3://{s3.bucket}/{name}"
    publish(
        src, parse_ref(ref), load_config(env={**s3.env, "WEIGHTCACHE_PUBLISH_CHUNK_BYTES": "64KiB"})
    )
    return ref


def _leaks(text: str, secrets_: list[str]) -> list[str]:
    found = [f"secret #{i}" for i, s in enumerate(secrets_) if s and s in text]
    found += [mark for mark in SIGNATURE_MARKS if mark in text]
    return found


@collect_before_report
def test_secrets_stay_out_of_logs_bodies_status_and_metrics(s3: Any, tmp_path: Path) -> None:
    ref = _publish_s3(tmp_path, s3, "model")
    missing = f"s3://{s3.bucket}/not-there"
    wrong_secret = "wrong-secret-" + "Q" * 24
    wrong_token = "not-the-token-8c1e"
    secrets_ = [s3.server.secret_key, TOKEN, wrong_secret, wrong_token]
    bodies: list[bytes] = []
    logs: list[str] = []

    good = Daemon(tmp_path, "good", {**s3.env, "WEIGHTCACHE_TOKEN": TOKEN})
    try:
        for reply, status in (
            (good.call("POST", "/v1/ensure", {"ref": ref}), 200),
            (good.call("POST", "/v1/ensure", {"ref": missing}), 404),
            (good.call("POST", "/v1/prefetch", {"ref": missing}), 202),
            (good.call("POST", "/v1/ensure", {"ref": ref}, tcp=True, token=TOKEN), 200),
            (good.call("GET", "/v1/status", tcp=True, token=wrong_token), 401),
            (good.call("GET", "/v1/status", tcp=True), 401),
        ):
            assert reply.status == status, reply.body[:300]
            bodies.append(reply.body)
        # A worker in daemon mode over TCP, with the token from its config.
        from weightcache.client.loader import load

        client_cfg = load_config(
            env={
                "WEIGHTCACHE_CACHE_DIR": str(tmp_path / "client-cache"),
                "WEIGHTCACHE_URL": f"http://127.0.0.1:{good.port}",
                "WEIGHTCACHE_TOKEN": TOKEN,
            }
        )
        with _capture() as client_log:
            tensors = load(ref, config=client_cfg)
            assert sorted(tensors) == ["w"]
            bad_cfg = load_config(
                env={
                    "WEIGHTCACHE_CACHE_DIR": str(tmp_path / "client-cache"),
                    "WEIGHTCACHE_URL": f"http://127.0.0.1:{good.port}",
                    "WEIGHTCACHE_TOKEN": wrong_token,
                }
            )
            with pytest.raises(Unauthorized) as refused:
                load(ref, config=bad_cfg)
        logs.append(client_log.text())
        bodies.append(str(refused.value).encode() + repr(refused.value.facts).encode())
        time.sleep(0.2)  # the prefetch job runs and fails in the background
        for path in ("/v1/status", "/v1/jobs", "/metrics", "/healthz", "/v1/openapi.json"):
            reply = good.call("GET", path)
            assert reply.status == 200, path
            bodies.append(reply.body)
        digest = json.loads(bodies[0])["files"][0]["blake3"]
        bodies.append(good.call("GET", f"/v1/blobs/{digest}", tcp=True, token=TOKEN).body)
    finally:
        good.stop()
    logs.append(good.log())

    # The origin refuses our credentials; the origin is down.
    for name, env, status, code in (
        ("denied", {**s3.env, "AWS_SECRET_ACCESS_KEY": wrong_secret}, 502, "origin_denied"),
        (
            "down",
            {
                **s3.env,
                "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
                "WEIGHTCACHE_FETCH_RETRIES": "1",
                "WEIGHTCACHE_FETCH_BACKOFF_BASE_S": "0.01",
            },
            503,
            "origin_unavailable",
        ),
    ):
        daemon = Daemon(tmp_path, name, {**env, "WEIGHTCACHE_TOKEN": TOKEN})
        try:
            reply = daemon.call("POST", "/v1/ensure", {"ref": ref})
            assert reply.status == status, reply.body[:300]
            assert reply.json()["error"]["code"] == code
            bodies.append(reply.body)
            for path in ("/v1/status", "/metrics"):
                bodies.append(daemon.call("GET", path, tcp=True, token=TOKEN).body)
        finally:
            daemon.stop()
        logs.append(daemon.log())

    # -vv really logged the pulls (urllib3's requests included) and the failures.
    assert "DEBUG urllib3" in logs[1] and "ensure.pull" in logs[1], logs[1][-2000:]
    assert "origin_denied" in logs[2] or "denied" in logs[2]
    for i, body in enumerate(bodies):
        assert not _leaks(body.decode(errors="replace"), secrets_), (i, body[:300])
    for i, text in enumerate(logs):
        assert not _leaks(text, secrets_), (i, _leaks(text, secrets_))


@collect_before_report
def test_embedded_client_keeps_credentials_out_of_its_log(s3: Any, tmp_path: Path) -> None:
    from weightcache.client.loader import load

    ref = _publish_s3(tmp_path, s3, "embedded")
    wrong_secret = "wrong-secret-" + "Z" * 24
    cfg = load_config(env={**s3.env, "WEIGHTCACHE_CACHE_DIR": str(tmp_path / "cache")})
    with _capture() as captured:
        assert sorted(load(ref, config=cfg)) == ["w"]
        denied = load_config(
            env={
                **s3.env,
                "AWS_SECRET_ACCESS_KEY": wrong_secret,
                "WEIGHTCACHE_CACHE_DIR": str(tmp_path / "other-cache"),
            }
        )
        with pytest.raises(OriginDenied) as info:
            load(ref, config=denied)
    text = captured.text()
    assert "DEBUG urllib3" in text, "the capture saw the HTTP client's own debug lines"
    leaks = _leaks(
        text + str(info.value) + repr(info.value.facts), [s3.server.secret_key, wrong_secret]
    )
    assert not leaks, leaks
    assert s3.server.secret_key not in repr(cfg) and wrong_secret not in repr(denied)


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def text(self) -> str:
        return "\n".join(self.lines)


class _capture:
    """Every log record of the process at DEBUG, as the client would log at -vv."""

    def __enter__(self) -> _Capture:
        self.handler = _Capture()
        self.root = logging.getLogger()
        self.level = self.root.level
        self.root.addHandler(self.handler)
        self.root.setLevel(logging.DEBUG)
        return self.handler

    def __exit__(self, *exc: object) -> None:
        self.root.removeHandler(self.handler)
        self.root.setLevel(self.level)


@collect_before_report
def test_a_malformed_authorization_line_keeps_the_token_out_of_the_log(
    secured: tuple[Served, str],
) -> None:
    served, _ = secured
    before = len(served.records.lines)
    for line in (
        b"Authorization: Bearer " + TOKEN.encode() + b"\x01",
        b"Authorization: Bearer " + TOKEN.encode() + b"x" * 9000,
        b"Authorization: Bearer " + TOKEN.encode() + b"\r\n bad-fold",
    ):
        out = raw_exchange(
            ("127.0.0.1", served.port),
            b"GET /v1/status HTTP/1.1\r\nHost: d\r\n" + line + b"\r\n\r\n",
        )
        assert out.startswith((b"HTTP/1.0 400", b"HTTP/1.1 400")), out[:200]
    logged = "\n".join(served.records.lines[before:])
    assert TOKEN not in logged, logged[-2000:]


# -- cross-site requests ------------------------------------------------------------------

#: what a page can make a browser send without a CORS preflight ("simple requests"):
#: these three types, or no body type at all (a bodiless POST, a Blob without a type)
SIMPLE_CONTENT_TYPES = [
    "text/plain;charset=UTF-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
    None,
]


@collect_before_report
@pytest.mark.parametrize("content_type", SIMPLE_CONTENT_TYPES)
def test_cross_site_simple_requests_on_loopback_are_refused_and_change_nothing(
    tmp_path: Path, content_type: str | None
) -> None:
    refs = [make_model(tmp_path, f"m{i}", 10_000, 40 + i) for i in range(2)]
    # No token: loopback TCP is open to every local process, a browser included.
    with Served(tmp_path, {}) as served:
        leased = served.post("/v1/ensure", {"ref": refs[0]}, tcp=True)
        assert leased.status == 200, leased.body
        lease_id = leased.json()["lease"]["id"]
        before = _state(served)
        headers = {"Origin": "https://evil.example", "Referer": "https://evil.example/"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        harmful = [
            ("/v1/ensure", {"ref": refs[1]}),  # a pull of a model nobody asked for
            ("/v1/ensure", {"ref": refs[0], "stream": True}),
            ("/v1/prefetch", {"ref": refs[1], "at": 0}),  # a job
            (f"/v1/leases/{lease_id}/release", None),  # someone else's lease
        ]
        for tcp in (True, False):
            for path, doc in harmful:
                if content_type is not None and content_type.startswith("multipart/"):
                    body = (
                        b"------WebKitFormBoundary7MA4YWxkTrZu0gW\r\n"
                        b'Content-Disposition: form-data; name="x"\r\n\r\n'
                        + json.dumps(doc).encode()
                        + b"\r\n------WebKitFormBoundary7MA4YWxkTrZu0gW--\r\n"
                    )
                else:
                    body = json.dumps(doc).encode() if doc is not None else None
                reply = served.call("POST", path, body, headers, tcp=tcp, json_type=False)
                assert reply.status == 415, (path, reply.status, reply.body[:300])
                err = reply.json()["error"]
                assert err["code"] == "unsupported_media_type"
                assert "application/json" in err["hint"]
                # Nothing in the answer says CORS may read it.
                assert not any(h.lower().startswith("access-control-") for h in reply.headers)
        # No pull, no job, no request counted, the lease still held, nothing new on disk.
        assert _state(served) == before
        status = served.call("GET", "/v1/status").json()
        assert status["leases"] == 1 and not status["pulls"]
        assert [m["revision"] for m in status["models"]] == [leased.json()["revision"]]
        # The preflight a browser sends before anything else is refused as well.
        preflight = served.call(
            "OPTIONS",
            "/v1/ensure",
            headers={
                "Origin": "https://evil.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
            tcp=True,
        )
        assert preflight.status == 405, preflight.status
        assert "Access-Control-Allow-Origin" not in preflight.headers
        # The same requests declared as JSON are served: the type was the only fault.
        released = served.call("POST", f"/v1/leases/{lease_id}/release", tcp=True)
        assert released.status == 200, released.body


# -- limits -------------------------------------------------------------------------------


@collect_before_report
def test_bodies_and_headers_beyond_the_limits_are_refused(tmp_path: Path) -> None:
    ref = make_model(tmp_path, "m", 10_000, 9)
    with Served(
        tmp_path, {"WEIGHTCACHE_TOKEN": TOKEN, "WEIGHTCACHE_DAEMON_MAX_BODY_BYTES": "1KiB"}
    ) as served:
        ok = json.dumps({"ref": ref, "lease": False}).encode()
        exact = ok + b" " * (1024 - len(ok))
        for tcp in (False, True):
            assert served.call("POST", "/v1/ensure", exact, tcp=tcp).status == 200
            over = served.call("POST", "/v1/ensure", exact + b" ", tcp=tcp)
            assert over.status == 413 and over.json()["error"]["code"] == "payload_too_large"
            assert over.json()["error"]["details"]["limit_bytes"] == 1024
        # Without the token a body is not even read: 401 on the headers alone.
        out = raw_exchange(
            ("127.0.0.1", served.port),
            b"POST /v1/ensure HTTP/1.1\r\nHost: d\r\nContent-Length: 999999999\r\n\r\n{",
        )
        assert out.startswith(b"HTTP/1.1 401"), out[:200]
        for request in (
            b"GET /healthz HTTP/1.1\r\nHost: d\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
            b"GET /healthz HTTP/1.1\r\n" + b"X-H: 1\r\n" * 1000 + b"\r\n",
            b"GET /healthz?" + b"q" * 9000 + b" HTTP/1.1\r\nHost: d\r\n\r\n",
        ):
            for address in (served.sock_path, ("127.0.0.1", served.port)):
                out = raw_exchange(address, request)
                assert re.match(rb"HTTP/1\.[01] 4\d\d ", out), out[:200]
        assert served.call("GET", "/healthz").status == 200


@collect_before_report
def test_leases_per_client_are_bounded(tmp_path: Path) -> None:
    refs = [make_model(tmp_path, f"m{i}", 10_000, 20 + i) for i in range(3)]
    env = {"WEIGHTCACHE_TOKEN": TOKEN, "WEIGHTCACHE_DAEMON_MAX_LEASES_PER_CLIENT": "2"}
    with Served(tmp_path, env) as served:
        first = served.post("/v1/ensure", {"ref": refs[0]})
        assert first.status == 200
        assert served.post("/v1/ensure", {"ref": refs[1]}).status == 200
        # Renewing a lease it holds is not a new lease.
        again = served.post("/v1/ensure", {"ref": refs[0]})
        assert again.status == 200 and again.json()["lease"]["id"] == first.json()["lease"]["id"]
        refused = served.post("/v1/ensure", {"ref": refs[2]})
        assert refused.status == 429, refused.body
        assert refused.json()["error"]["code"] == "too_many_leases"
        assert served.post("/v1/ensure", {"ref": refs[2], "lease": False}).status == 200
        lease_id = first.json()["lease"]["id"]
        # The renewed lease has two holders: it ends when both have released it.
        assert served.call("POST", f"/v1/leases/{lease_id}/release").status == 200
        assert served.post("/v1/ensure", {"ref": refs[2]}).status == 429
        assert served.call("POST", f"/v1/leases/{lease_id}/release").status == 200
        assert served.post("/v1/ensure", {"ref": refs[2]}).status == 200
        assert served.call("GET", "/v1/status").json()["leases"] == 2


@collect_before_report
def test_tcp_clients_cannot_pile_up_leases_either(tmp_path: Path) -> None:
    refs = [make_model(tmp_path, f"m{i}", 10_000, 30 + i) for i in range(4)]
    env = {"WEIGHTCACHE_TOKEN": TOKEN, "WEIGHTCACHE_DAEMON_MAX_LEASES_PER_CLIENT": "2"}
    with Served(tmp_path, env) as served:
        statuses = [served.post("/v1/ensure", {"ref": ref}, tcp=True).status for ref in refs]
        assert statuses[:2] == [200, 200]
        # Over TCP there is no peer pid; the bound must still hold for the client.
        assert 429 in statuses[2:], statuses
        assert served.call("GET", "/v1/status").json()["leases"] <= 2
