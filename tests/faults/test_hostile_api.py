"""Hostile input for the daemon's HTTP API: every bad request gets a specific 4xx, never a 500.

The property tests drive the real application in this process: a real
:class:`~weightcache.service.Service` over a ``file://`` origin, behind the
daemon's own listeners (:class:`~weightcache.api.server.Listeners`) on a real
Unix socket and a real TCP port, on an event loop in a background thread, so
that a plain blocking HTTP client can talk to it from inside hypothesis. After
every example the daemon must still answer ``/healthz`` and a valid ensure,
and nothing may have reached the error middleware's catch-all (no
``request.failed`` in the log).

A handful of cases go to the real daemon subprocess as raw bytes: malformed
HTTP that no well-behaved client library can even send.

Each input class and what the daemon does with it is listed in
docs/reliability.md ("Hostile input").
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import gzip
import http.client
import json
import logging
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.support.daemon import free_port
from weightcache.api import app as api_app
from weightcache.api.server import Listeners
from weightcache.client.daemon import UnixHTTPConnection
from weightcache.config import Config, load_config
from weightcache.errors import RefInvalid
from weightcache.publish import publish
from weightcache.refs import parse_ref
from weightcache.service import Service

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hostile-token-6d2b1f"
NDJSON = "application/x-ndjson"
#: requests that must declare Content-Type: application/json, with a body or without
JSON_METHODS = ("POST", "DELETE")
#: a TCP port nothing listens on: an ``s3://`` ref fails fast with origin_unavailable
CLOSED_ENDPOINT = "http://127.0.0.1:9"

# -- the application on real sockets, in this process ---------------------------------


def make_model(root: Path, name: str, size: int, seed: int, chunk: str = "64KiB") -> str:
    src = root / "src" / name
    src.mkdir(parents=True)
    (src / "weights.bin").write_bytes(random.Random(seed).randbytes(size))
    (src / "config.json").write_text(json.dumps({"name": name}))
    ref = f"file://{root}/origin/{name}"
    publish(src, parse_ref(ref), load_config(env={"WEIGHTCACHE_PUBLISH_CHUNK_BYTES": chunk}))
    return ref


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    def json(self) -> Any:
        return json.loads(self.body)


class _Records(logging.Handler):
    """Every log record while the app serves, formatted (tracebacks included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []
        self._lock_lines = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        text = self.format(record)
        with self._lock_lines:
            self.lines.append(text)

    def text(self) -> str:
        with self._lock_lines:
            return "\n".join(self.lines)

    def take_failures(self) -> list[str]:
        """Requests that reached the catch-all (a 500) since the last call."""
        with self._lock_lines:
            failed = [line for line in self.lines if "request.failed" in line]
            self.lines = [line for line in self.lines if "request.failed" not in line]
            return failed


@dataclass
class Served:
    """A Service behind the daemon's listeners: Unix socket (no auth) and TCP (token)."""

    root: Path
    env: dict[str, str]
    cfg: Config = field(init=False)
    sock_path: Path = field(init=False)
    port: int = 0
    service: Service | None = None
    records: _Records = field(default_factory=_Records)
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _ready: threading.Event = field(default_factory=threading.Event)
    _error: BaseException | None = None
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.sock_path = self.root / "d.sock"
        self.cfg = load_config(
            env={
                "WEIGHTCACHE_CACHE_DIR": str(self.root / "cache"),
                "WEIGHTCACHE_CACHE_RESERVE_BYTES": "0",
                "WEIGHTCACHE_DAEMON_LISTEN": "127.0.0.1:0",
                "WEIGHTCACHE_FETCH_RETRIES": "0",
                "AWS_ENDPOINT_URL": CLOSED_ENDPOINT,
                # Keys, so that an S3 ref reaches the (closed) endpoint: unavailable,
                # not denied for want of credentials.
                "AWS_ACCESS_KEY_ID": "hostile",
                "AWS_SECRET_ACCESS_KEY": "hostile-secret",
                "AWS_EC2_METADATA_DISABLED": "true",
                **self.env,
            }
        )

    def __enter__(self) -> Served:
        for name in ("weightcache", "aiohttp"):
            logging.getLogger(name).addHandler(self.records)
        self._thread = threading.Thread(target=self._run, name="served-app", daemon=True)
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None:
            raise self._error
        assert self.port, "the app did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._loop is not None and self._stop is not None:
                self._loop.call_soon_threadsafe(self._stop.set)
            if self._thread is not None:
                self._thread.join(60)
        finally:
            for name in ("weightcache", "aiohttp"):
                logging.getLogger(name).removeHandler(self.records)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        service = self.service = Service(self.cfg)
        await service.start()
        listeners = Listeners(service, self.cfg)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(self.sock_path))
            sock.listen(128)
            sock.setblocking(False)
            await listeners.start(sock)
            self.port = int(listeners.tcp_addresses[0].rpartition(":")[2])
            self._ready.set()
            await self._stop.wait()
        finally:
            await service.close()
            await listeners.close()
            sock.close()

    # -- clients --------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        *,
        tcp: bool = False,
        token: str | None = TOKEN,
        timeout: float = 30,
        json_type: bool = True,
    ) -> Reply:
        """One request on a fresh connection (over TCP with the token unless told otherwise).

        A POST or DELETE declares ``application/json`` unless ``headers`` name a
        Content-Type or ``json_type`` is false (then it declares none).
        """
        headers = dict(headers or {})
        if (
            json_type
            and method in JSON_METHODS
            and not any(name.lower() == "content-type" for name in headers)
        ):
            headers["Content-Type"] = "application/json"
        conn: http.client.HTTPConnection
        if tcp:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            if token is not None:
                headers.setdefault("Authorization", f"Bearer {token}")
        else:
            conn = UnixHTTPConnection(self.sock_path, timeout=timeout, read_timeout=timeout)
        try:
            # Refused before the whole body was read (a 413, a 400): the answer is
            # already on its way back.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return Reply(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def post(self, path: str, doc: Any, **kwargs: Any) -> Reply:
        return self.call("POST", path, json.dumps(doc).encode(), **kwargs)

    def raw(self, data: bytes, *, tcp: bool = True, timeout: float = 5.0) -> bytes:
        """Send bytes as they are; read what comes back until the server closes (or a pause)."""
        return raw_exchange(self.sock_path if not tcp else ("127.0.0.1", self.port), data, timeout)


def raw_exchange(address: Path | tuple[str, int], data: bytes, timeout: float = 5.0) -> bytes:
    family = socket.AF_UNIX if isinstance(address, Path) else socket.AF_INET
    target: Any = os.fspath(address) if isinstance(address, Path) else address
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(target)
        with contextlib.suppress(OSError):
            sock.sendall(data)
        out = b""
        with contextlib.suppress(OSError):
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break
                out += piece
                if _complete(out):
                    break
        return out


def _complete(out: bytes) -> bool:
    """A whole response (status line, headers and a Content-Length body) is in."""
    head, sep, body = out.partition(b"\r\n\r\n")
    if not sep:
        return False
    m = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    return m is not None and len(body) >= int(m.group(1))


@dataclass
class Model:
    ref: str
    revision: str
    digests: dict[str, str]
    sizes: dict[str, int]


def warm(served: Served, ref: str) -> Model:
    reply = served.post("/v1/ensure", {"ref": ref, "lease": False})
    assert reply.status == 200, reply.body
    doc = reply.json()
    return Model(
        ref,
        doc["revision"],
        {f["path"]: f["blake3"] for f in doc["files"]},
        {f["path"]: f["size"] for f in doc["files"]},
    )


@dataclass
class Hostile:
    served: Served
    model: Model
    examples: int = 0

    def begin(self) -> None:
        """Start an example: what an earlier failing example left in the log is its own."""
        self.served.records.take_failures()

    def alive(self) -> None:
        """The daemon still serves: health, and a valid ensure of the cached model."""
        self.examples += 1
        health = self.served.call("GET", "/healthz")
        assert health.status == 200 and health.json()["ready"] is True, health.body
        again = self.served.post("/v1/ensure", {"ref": self.model.ref, "lease": False})
        assert again.status == 200, again.body
        assert again.json()["revision"] == self.model.revision
        failed = self.served.records.take_failures()
        assert not failed, failed[-1]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile")
    ref = make_model(root, "m", 300_000, 1)
    started = time.monotonic()
    with Served(root, {"WEIGHTCACHE_TOKEN": TOKEN}) as served:
        h = Hostile(served, warm(served, ref))
        yield h
    logging.getLogger(__name__).info(
        "hostile.done examples=%d seconds=%.1f", h.examples, time.monotonic() - started
    )


def error_of(reply: Reply, statuses: set[int], codes: set[str]) -> dict[str, Any]:
    """The reply is one of our JSON errors, with one of these statuses and codes."""
    assert reply.status in statuses, (reply.status, reply.body[:600])
    assert reply.content_type.startswith("application/json"), reply.content_type
    doc = reply.json()
    assert set(doc) == {"error"}, doc
    err: dict[str, Any] = doc["error"]
    assert err["code"] in codes, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["request_id"] == reply.headers["X-Request-Id"]
    assert set(err) <= {"code", "message", "hint", "details", "request_id"}, err
    assert b"Traceback" not in reply.body
    return err


def collect_before_report(test: Callable[..., None]) -> Callable[..., None]:
    """Collect garbage before pytest formats a failure.

    CPython 3.11 can raise "AST constructor recursion depth mismatch" (and end the
    whole session with INTERNALERROR) when a finaliser runs inside the ``ast.parse``
    that pytest uses to show a failing test's source; this module leaves many
    connections and event-loop objects for the collector. See tests/conftest.py.
    """

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            test(*args, **kwargs)
        except BaseException:
            gc.collect()
            raise

    return run


PROPERTY = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# -- strategies --------------------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.builds(
        lambda n, sign: n * sign,
        st.integers(min_value=10**300, max_value=10**400),
        st.sampled_from((1, -1)),
    )
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    _scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=10,
)

#: fixed UTC offsets, the whole legal range (no tz database needed)
_zones = st.builds(
    timezone,
    st.timedeltas(
        min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)
    ).map(lambda d: timedelta(minutes=d // timedelta(minutes=1))),
)

_SEGMENT = st.text(alphabet="abcxyz019._-", min_size=1, max_size=12)


def _bad_refs(nowhere: str) -> st.SearchStrategy[str]:
    """Refs that do not parse, of every kind."""
    rev_bad = st.one_of(
        st.text(alphabet="0123456789abcdef", max_size=5),  # too short
        st.text(alphabet="0123456789abcdef", min_size=65, max_size=80),  # too long
        st.text(alphabet="0123456789ABCDEF", min_size=6, max_size=64).filter(
            lambda s: s != s.lower()
        ),
        st.text(alphabet="ghijkz-_ ", min_size=6, max_size=20),
    )
    return st.one_of(
        st.sampled_from(
            [
                "",
                " ",
                "s3://",
                "s3://models",
                "s3://models/",
                "s3://Models/x",
                "s3://a/x",
                "s3://-bad-/x",
                "s3://b..b/x",
                "s3://models/../etc",
                "s3://models/a/./b",
                "s3://models/a//b",
                "s3://models/a\\b",
                "s3://models/a\x00b",
                "s3://models/a\x7fb",
                "s3://models/\ud800",
                "s3://models/x@",
                "s3://models/x@abcdef@",
                "file://relative/path",
                "file://",
                "file:///",
                "file:///../etc/passwd",
                "file:///tmp/../etc",
                f"{nowhere}/\ud800",
                f"{nowhere}/\udcff",
                f"{nowhere}/a\nb",
                "ftp://host/x",
                "http://host/x",
                "://x",
                "S3://models/x",
                "llama",  # a bare name needs a default bucket; this daemon has none
                "llama@abcdef",
                " s3://models/x",
                "s3://models/x ",
                "s3://models/" + "a" * 3000,
                "s3://models/" + "/".join(["a" * 256]),
            ]
        ),
        st.builds(lambda s, r: f"s3://models/{s}@{r}", _SEGMENT, rev_bad),
        st.builds(lambda s, r: f"{nowhere}/{s}@{r}", _SEGMENT, rev_bad),
        st.builds(
            lambda a, b: f"s3://models/{a}/{b}/z",
            _SEGMENT,
            st.sampled_from(["..", ".", "", "x\x00", "x\x1f", "\\"]),
        ),
        st.builds(
            lambda scheme, rest: f"{scheme}://{rest}",
            st.text(
                alphabet="abcdefghijklmnopqrstuvwxyz0123456789+", min_size=1, max_size=8
            ).filter(lambda s: s not in ("s3", "file")),
            _SEGMENT,
        ),
        st.builds(lambda s: f"s3://models/{s}", st.characters(max_codepoint=0x1F).map(str)),
    )


def ref_is_valid(ref: str) -> bool:
    try:
        ref.encode("utf-8")
        parse_ref(ref)
    except (RefInvalid, UnicodeEncodeError):
        return False
    return True


# -- properties over the in-process app ----------------------------------------------

BODY_ROUTES = [
    ("POST", "/v1/ensure"),
    ("POST", "/v1/prefetch"),
    ("DELETE", "/v1/models"),
    ("POST", "/v1/leases/no-such-lease/release"),
]


def _json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except (ValueError, RecursionError):
        return False


@collect_before_report
@settings(PROPERTY, max_examples=120)
@given(
    route=st.sampled_from(BODY_ROUTES),
    raw=st.binary(max_size=300) | st.text(max_size=200).map(str.encode),
    tcp=st.booleans(),
)
def test_any_bytes_as_a_body_get_a_clean_400(
    hostile: Hostile, route: tuple[str, str], raw: bytes, tcp: bool
) -> None:
    hostile.begin()
    assume(not _json_object(raw))
    method, path = route
    reply = hostile.served.call(method, path, raw, tcp=tcp)
    if path.startswith("/v1/leases") and not raw.strip():
        error_of(reply, {404}, {"not_found"})  # an empty body is fine here: the lease is not
    else:
        err = error_of(reply, {400}, {"request_invalid"})
        assert err["details"]["field"] == "body"
    hostile.alive()


ROUTE_FIELDS = {
    "/v1/ensure": ("ref", "stream", "lease", "priority"),
    "/v1/prefetch": ("ref", "at", "deadline", "priority"),
    "/v1/models": ("ref", "force"),
    "/v1/leases/no-such-lease/release": (),
}
BOOLS = ("stream", "lease", "force")
PRIORITIES = ("WORKER", "ADMIN", "BACKGROUND")


def time_is_valid(value: object) -> float | bool | None:
    """``False`` for a bad time, else the epoch seconds (or None): the documented forms."""
    if value is None:
        return None
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:
            return False
        return seconds if math.isfinite(seconds) and seconds >= 0 else False
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            return False
        return when.timestamp() if when.tzinfo is not None else False
    return False


def bad_fields(path: str, doc: dict[str, Any]) -> set[str]:
    """The fields of ``doc`` that the documented rules refuse."""
    known = ROUTE_FIELDS[path]
    bad = {k for k in doc if k not in known}
    if not known:
        return bad
    ref = doc.get("ref")
    if not isinstance(ref, str) or not ref.strip():
        bad.add("ref")
    bad |= {k for k in BOOLS if k in known and k in doc and not isinstance(doc[k], bool)}
    priority = doc.get("priority")
    if (
        "priority" in known
        and priority is not None
        and (not isinstance(priority, str) or priority.upper() not in PRIORITIES)
    ):
        bad.add("priority")
    if path == "/v1/prefetch":
        at, deadline = time_is_valid(doc.get("at")), time_is_valid(doc.get("deadline"))
        if at is False:
            bad.add("at")
        if deadline is False:
            bad.add("deadline")
        if isinstance(at, float) and isinstance(deadline, float) and deadline < at:
            bad.add("deadline")
    return bad


def same_instant(doc: dict[str, Any]) -> bool:
    """``at == deadline``: refused by the service, after the ref parses (not by the body)."""
    at, deadline = time_is_valid(doc.get("at")), time_is_valid(doc.get("deadline"))
    return isinstance(at, float) and isinstance(deadline, float) and deadline == at


def _body_docs(model_ref: str, nowhere: str) -> st.SearchStrategy[dict[str, Any]]:
    refs = st.one_of(
        st.sampled_from([model_ref, f"{nowhere}/m", "s3://models/m", "file:///dev/null"]),
        _bad_refs(nowhere),
        json_values,
    )
    times = st.one_of(
        st.none(),
        st.floats(min_value=0, max_value=4e9),
        st.datetimes(timezones=_zones).map(lambda d: d.isoformat()),
        st.datetimes().map(lambda d: d.isoformat()),  # no zone: refused
        json_values,
    )
    values = {
        "ref": refs,
        "stream": st.booleans() | json_values,
        "lease": st.booleans() | json_values,
        "force": st.just(False) | json_values,
        "priority": st.sampled_from(["worker", "Admin", "BACKGROUND", "urgent", ""]) | json_values,
        "at": times,
        "deadline": times,
    }
    return st.builds(
        lambda fixed, extra: {**extra, **fixed},
        st.fixed_dictionaries({}, optional=values),
        st.dictionaries(st.text(max_size=10), json_values, max_size=2),
    )


@pytest.fixture(scope="module")
def nowhere(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"file://{tmp_path_factory.mktemp('nowhere')}/none"


@collect_before_report
@settings(PROPERTY, max_examples=250)
@given(data=st.data())
def test_json_bodies_of_any_shape_are_judged_field_by_field(
    hostile: Hostile, nowhere: str, data: st.DataObject
) -> None:
    hostile.begin()
    method, path = data.draw(st.sampled_from(BODY_ROUTES))
    doc = data.draw(_body_docs(hostile.model.ref, nowhere))
    if path == "/v1/ensure" and doc.get("stream") is True:
        doc["stream"] = False  # streamed answers have their own test below
    if path == "/v1/models" and doc.get("ref") == hostile.model.ref:
        doc["ref"] = f"{nowhere}/m"  # keep the model the liveness check uses
    reply = hostile.served.call(
        method, path, json.dumps(doc).encode(), tcp=data.draw(st.booleans())
    )
    bad = bad_fields(path, doc)
    if bad:
        err = error_of(reply, {400}, {"request_invalid"})
        assert err["details"]["field"] in bad, (err, bad)
    elif path.startswith("/v1/leases"):
        error_of(reply, {404}, {"not_found"})
    elif not ref_is_valid(doc["ref"]):
        error_of(reply, {400}, {"ref_invalid"})
    elif path == "/v1/prefetch" and same_instant(doc):
        assert error_of(reply, {400}, {"request_invalid"})["details"]["field"] == "deadline"
    elif path == "/v1/prefetch":
        assert reply.status == 202, reply.body
    elif path == "/v1/models":
        error_of(reply, {404}, {"model_not_found"})
    elif doc["ref"] == hostile.model.ref:
        assert reply.status == 200, reply.body
    else:
        # Parses, but names nothing: no model there, a directory that is a file, no S3.
        error_of(
            reply,
            {404, 502, 503},
            {"model_not_found", "object_not_found", "origin_rejected", "origin_unavailable"},
        )
    hostile.alive()


@collect_before_report
@settings(PROPERTY, max_examples=120)
@given(data=st.data())
def test_invalid_refs_of_every_kind_are_ref_invalid(
    hostile: Hostile, nowhere: str, data: st.DataObject
) -> None:
    hostile.begin()
    ref = data.draw(_bad_refs(nowhere))
    assume(ref.strip())  # a blank ref is a missing field: request_invalid (above)
    assert not ref_is_valid(ref), ref
    route = data.draw(st.sampled_from(["ensure", "stream", "prefetch", "evict"]))
    if route == "evict":
        reply = hostile.served.call("DELETE", "/v1/models", json.dumps({"ref": ref}).encode())
    elif route == "prefetch":
        reply = hostile.served.post("/v1/prefetch", {"ref": ref, "at": 4102444800})
    else:
        reply = hostile.served.post("/v1/ensure", {"ref": ref, "stream": route == "stream"})
    # Refused before any streaming starts: a plain status, not an NDJSON error line.
    err = error_of(reply, {400}, {"ref_invalid"})
    assert "ref" in err["message"] or "revision" in err["message"] or "bucket" in err["message"]
    hostile.alive()


_absurd_times = st.one_of(
    st.sampled_from(
        [
            "NaN",
            "Infinity",
            "-Infinity",
            "1e400",
            "-1e400",
            "-0.0",
            "-1",
            "1e308",
            "0",
            "1" + "0" * 400,
            "-" + "9" * 500,
            "true",
            "[]",
            "{}",
            '""',
            '"NaN"',
            '"inf"',
            '"tomorrow"',
            '"2026-11-23"',
            '"2026-11-23T12:00:00"',
            '"2026-11-23T12:00:00Z"',
            '"2026-13-45T99:99:99Z"',
            '"0001-01-01T00:00:00+01:00"',
            '"9999-12-31T23:59:59-23:59"',
            '"2026-11-23T12:00:00+24:00"',
            '"\\u0000"',
            '"\\ud800"',
        ]
    ),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.integers(min_value=-(10**500), max_value=10**500).map(str),
    st.text(max_size=30).map(json.dumps),
    st.datetimes(timezones=_zones).map(lambda d: json.dumps(d.isoformat())),
)


@collect_before_report
@settings(PROPERTY, max_examples=150)
@given(at=_absurd_times | st.none(), deadline=_absurd_times | st.none())
def test_absurd_at_and_deadline_values(
    hostile: Hostile, at: str | None, deadline: str | None
) -> None:
    hostile.begin()
    fields = [f'"ref": {json.dumps(hostile.model.ref)}']
    if at is not None:
        fields.append(f'"at": {at}')
    if deadline is not None:
        fields.append(f'"deadline": {deadline}')
    raw = ("{" + ", ".join(fields) + "}").encode()
    reply = hostile.served.call("POST", "/v1/prefetch", raw)
    doc = json.loads(raw)
    bad = bad_fields("/v1/prefetch", doc)
    if bad or same_instant(doc):
        err = error_of(reply, {400}, {"request_invalid"})
        assert err["details"]["field"] in bad | {"deadline"}, (err, bad)
    else:
        assert reply.status == 202, reply.body
        job = reply.json()["job"]
        # A job for the same ref and time is the same job (the first one's deadline).
        for name in ("at", "deadline") if reply.json()["created"] else ("at",):
            want = time_is_valid(doc.get(name))
            assert job[name] == (None if want is None else pytest.approx(want)), (name, job)
    hostile.alive()


def _not_digests(real: str) -> st.SearchStrategy[str]:
    """Blob ids as they appear in a request path (already percent-encoded where needed)."""
    quote = st.text(max_size=70).map(lambda s: urllib.parse.quote(s, safe=""))
    return st.one_of(
        st.sampled_from(
            [
                "..",
                "%2e%2e",
                "%2E%2E",
                "..%2f..%2fpartial",
                "%2e%2e%2f%2e%2e%2fpartial%2f" + real + ".part",
                "..%2F..%2F..%2Fetc%2Fpasswd",
                "%2Fetc%2Fpasswd",
                "/etc/passwd",
                real + "%00",
                real + ".part",
                real + ".chunks",
                real + "%2F",
                real + "/",
                "%00",
                real.upper(),
                real[:-1] + "G",
                real[:63],
                real[:8],
                real + "0",
                "0x" + real[2:],
                "snapshots",
                "partial",
                "blobs",
                "." + real[1:],
                real[:32] + "%2f" + real[32:],
                "%20" + real,
                "+" + real[1:],
            ]
        ),
        st.text(alphabet="0123456789abcdef", max_size=80).filter(lambda s: len(s) != 64),
        st.text(alphabet="0123456789abcdefABCDEF", min_size=64, max_size=64).filter(
            lambda s: s != s.lower()
        ),
        quote,
        st.text(alphabet="./%2eEfF0", min_size=1, max_size=20),
    )


@collect_before_report
@settings(PROPERTY, max_examples=150)
@given(data=st.data())
def test_blob_ids_that_are_not_full_digests_are_refused(
    hostile: Hostile, data: st.DataObject
) -> None:
    hostile.begin()
    real = hostile.model.digests["weights.bin"]
    blob_id = data.draw(_not_digests(real))
    method = data.draw(st.sampled_from(["GET", "HEAD"]))
    reply = hostile.served.call(method, f"/v1/blobs/{blob_id}", tcp=data.draw(st.booleans()))
    # 400 when it reaches the handler; 404 when no route matches (a '/' in it, or a
    # path that normalises to another route). Never content, never a 5xx.
    assert reply.status in (400, 404), (blob_id, reply.status, reply.body[:300])
    if method == "GET":
        err = error_of(reply, {400, 404}, {"request_invalid", "not_found"})
        if reply.status == 400:
            assert err["details"]["field"] == "digest"
    else:
        assert reply.body == b""
    hostile.alive()


# Header names that change how the message is framed, routed or decoded, not what it
# says (Content-Encoding has its own test below).
_FRAMING = {
    "content-length",
    "content-encoding",
    "transfer-encoding",
    "connection",
    "host",
    "upgrade",
    "expect",
    "te",
    "trailer",
    "keep-alive",
}
_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_header_names = st.one_of(
    st.sampled_from(
        ["Content-Type", "Accept", "X-Request-Id", "Range", "Authorization", "Cookie", "Origin"]
    ),
    st.text(alphabet=_TOKEN_CHARS, min_size=1, max_size=30),
).filter(
    lambda n: n.lower() not in _FRAMING and (n.lower() != "authorization" or n == "Authorization")
)
# What http.client will put on the wire: Latin-1, no CR/LF, no leading/trailing space.
_header_values = st.one_of(
    st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
        max_size=200,
    ),
    st.integers(min_value=1, max_value=8000).map(lambda n: "v" * n),
).map(str.strip)


@collect_before_report
@settings(PROPERTY, max_examples=120)
@given(
    headers=st.dictionaries(_header_names, _header_values, max_size=6).filter(
        lambda d: len({k.lower() for k in d}) == len(d)
    ),
    route=st.sampled_from(["healthz", "status", "ensure", "blob"]),
    tcp=st.booleans(),
)
def test_odd_headers_change_nothing_but_what_they_mean(
    hostile: Hostile, headers: dict[str, str], route: str, tcp: bool
) -> None:
    hostile.begin()
    lowered = {k.lower(): v for k, v in headers.items()}
    if route == "ensure":
        body = json.dumps({"ref": hostile.model.ref, "lease": False}).encode()
        reply = hostile.served.call("POST", "/v1/ensure", body, headers, tcp=tcp)
    elif route == "blob":
        digest = hostile.model.digests["config.json"]
        reply = hostile.served.call("GET", f"/v1/blobs/{digest}", None, headers, tcp=tcp)
    else:
        path = "/healthz" if route == "healthz" else "/v1/status"
        reply = hostile.served.call("GET", path, None, headers, tcp=tcp)
    assert reply.status < 500, (reply.status, reply.body[:300])
    assert reply.headers.get("X-Request-Id")
    rid = lowered.get("x-request-id")
    if rid is not None and re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", rid):
        assert reply.headers["X-Request-Id"] == rid
    else:
        assert re.fullmatch(r"[0-9a-f]{16}", reply.headers["X-Request-Id"])
    auth = lowered.get("authorization")
    token_ok = auth is None or _accepts(auth)
    if tcp and route != "healthz" and not token_ok:
        error_of(reply, {401}, {"unauthorized"})
    elif route == "blob":
        # Range and conditional headers mean what HTTP says; nothing else changes the bytes.
        assert reply.status in (200, 206, 304, 412, 416), (headers, reply.status)
        data = (hostile.served.root / "src/m/config.json").read_bytes()
        if reply.status == 200:
            assert reply.body == data
        elif reply.status == 206:
            assert reply.body and reply.body in data
    elif route == "ensure":
        # A declared Content-Type other than JSON is refused before the body is read;
        # without one, Served.call declares JSON.
        declared = [v for k, v in headers.items() if k.lower() == "content-type"]
        if not declared or declares_json(declared[0]):
            assert reply.status == 200, reply.body
        else:
            error_of(reply, {415}, {"unsupported_media_type"})
    else:
        assert reply.status in (200,), (reply.status, reply.body[:300])
    hostile.alive()


def _accepts(header: str) -> bool:
    scheme, _, given_token = header.partition(" ")
    return scheme.lower() == "bearer" and given_token.strip() == TOKEN


def declares_json(content_type: str) -> bool:
    """The documented rule: ``application/json`` in any case, parameters allowed."""
    return content_type.partition(";")[0].strip(" \t").lower() == "application/json"


@collect_before_report
@settings(PROPERTY, max_examples=80)
@given(
    method=st.sampled_from(
        ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "HEAD", "PROPFIND", "BREW"]
    ),
    path=st.sampled_from(
        [
            "/v1/ensure",
            "/v1/prefetch",
            "/v1/jobs",
            "/v1/jobs/x",
            "/v1/status",
            "/v1/models",
            "/v1/leases/x/release",
            "/v1/openapi.json",
            "/metrics",
            "/healthz",
            "/",
            "/v2/ensure",
            "/v1",
            "/v1/",
            "//v1/status",
            "/v1/status/",
            "/v1/jobs/%00",
            "/v1/jobs/" + "x" * 4000,
            "/v1/leases/%2e%2e/release",
        ]
    )
    | st.text(alphabet="abc/._%2e0", max_size=30).map(lambda s: "/" + s),
    query=st.sampled_from(["", "?x=1", "?ref=s3://a/b", "?" + "a=" * 500, "?%00", "?&&=="]),
)
def test_every_method_and_path_gets_a_status_it_can_explain(
    hostile: Hostile, method: str, path: str, query: str
) -> None:
    hostile.begin()
    reply = hostile.served.call(method, path + query)
    assert reply.status < 500 or (path == "/healthz" and reply.status == 503), reply.body[:300]
    if method != "HEAD" and reply.status >= 400:
        if reply.content_type.startswith("application/json"):
            error_of(reply, {400, 404, 405}, {"request_invalid", "not_found", "method_not_allowed"})
        else:
            # Methods outside HTTP's registry stop in aiohttp's parser (text/plain 400).
            assert reply.status == 400, (method, path, reply.body[:300])
    if reply.status == 405:
        assert reply.headers["Allow"]
    hostile.alive()


# -- deterministic cases --------------------------------------------------------------


@collect_before_report
@pytest.mark.parametrize(
    ("shape", "depth"),
    [
        ("array", 100),
        ("array", 5_000),
        ("object", 5_000),
        ("ref", 5_000),
        ("array", 30_000),
    ],
)
def test_deeply_nested_json_is_a_400_not_a_500(hostile: Hostile, shape: str, depth: int) -> None:
    hostile.begin()
    if shape == "array":
        raw = b"[" * depth + b"]" * depth
    elif shape == "object":
        raw = b'{"a":' * depth + b"1" + b"}" * depth
    else:
        raw = b'{"ref": ' + b"[" * depth + b"]" * depth + b"}"
    assert len(raw) <= hostile.served.cfg.daemon.max_body_bytes
    for method, path in BODY_ROUTES[:3]:
        reply = hostile.served.call(method, path, raw)
        err = error_of(reply, {400}, {"request_invalid"})
        assert err["details"]["field"] in ("body", "ref"), err
    hostile.alive()


@collect_before_report
def test_bodies_over_the_limit_are_413_at_any_size(hostile: Hostile) -> None:
    hostile.begin()
    limit = hostile.served.cfg.daemon.max_body_bytes
    ok = json.dumps({"ref": hostile.model.ref, "lease": False}).encode()
    exact = ok + b" " * (limit - len(ok))
    assert hostile.served.call("POST", "/v1/ensure", exact).status == 200
    for size in (limit + 1, 2 * limit):
        reply = hostile.served.call("POST", "/v1/ensure", exact + b" " * (size - limit))
        err = error_of(reply, {413}, {"payload_too_large"})
        assert err["details"]["limit_bytes"] == limit
    # Declared huge but never sent: refused by the header alone, nothing is read.
    out = hostile.served.raw(
        b"POST /v1/ensure HTTP/1.1\r\nHost: d\r\nContent-Length: 99999999999\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\n\r\n{",
        tcp=False,
    )
    assert out.startswith(b"HTTP/1.1 413"), out[:200]

    def chunked(n_chunks: int) -> bytes:
        head = (
            b"POST /v1/ensure HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n"
        )
        piece = b"x" * 4096
        return head + (b"1000\r\n" + piece + b"\r\n") * n_chunks + b"0\r\n\r\n"

    out = hostile.served.raw(chunked(limit // 4096 + 2), tcp=False)
    assert out.startswith(b"HTTP/1.1 413"), out[:200]
    hostile.alive()


@collect_before_report
def test_encodings_other_than_utf8(hostile: Hostile, nowhere: str) -> None:
    hostile.begin()
    doc = {"ref": f"{nowhere}/modèle"}
    latin1 = json.dumps(doc, ensure_ascii=False).encode("latin-1")
    err = error_of(hostile.served.call("POST", "/v1/ensure", latin1), {400}, {"request_invalid"})
    assert err["details"]["field"] == "body" and "UTF-8" in err["message"]
    # JSON's own detection reads UTF-16 and UTF-32: the document is then judged as usual.
    for codec in ("utf-16", "utf-32", "utf-16-be"):
        raw = json.dumps({"ref": hostile.model.ref, "lease": False}).encode(codec)
        reply = hostile.served.call("POST", "/v1/ensure", raw)
        assert reply.status in (200, 400), reply.body
    # A BOM in front of UTF-8 is accepted by Python's decoder; a lone one is empty.
    raw = b"\xef\xbb\xbf" + json.dumps({"ref": hostile.model.ref, "lease": False}).encode()
    assert hostile.served.call("POST", "/v1/ensure", raw).status in (200, 400)
    hostile.alive()


@collect_before_report
@pytest.mark.parametrize(
    "ref_json",
    [
        '"file:///tmp/\\ud800x"',
        '"s3://models/\\ud800x"',
        '"s3://models/x\\udcff"',
        '"\\udcff"',
        '"s3://models/x@\\ud800"',
    ],
)
def test_lone_surrogates_in_a_ref_are_ref_invalid(hostile: Hostile, ref_json: str) -> None:
    hostile.begin()
    # Valid JSON escapes, but not text a path or a URL can carry.
    for path, extra in (("/v1/ensure", ""), ("/v1/prefetch", ', "at": 4102444800')):
        raw = ('{"ref": ' + ref_json + extra + "}").encode()
        error_of(hostile.served.call("POST", path, raw), {400}, {"ref_invalid"})
    raw = ('{"ref": ' + ref_json + "}").encode()
    error_of(hostile.served.call("DELETE", "/v1/models", raw), {400}, {"ref_invalid"})
    hostile.alive()


@collect_before_report
@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/json",
        "application/json; charset=latin-1",
        "Application/JSON;charset=UTF-8",
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/octet-stream",
        "application/json-seq",
        "application/vnd.api+json",
        "text/json",
        "garbage/\x01",
        "",
    ],
)
def test_only_bodies_declared_as_json_are_read(hostile: Hostile, content_type: str | None) -> None:
    hostile.begin()
    headers = {} if content_type is None else {"Content-Type": content_type.replace("\x01", "")}
    good = json.dumps({"ref": hostile.model.ref, "lease": False}).encode()
    form = urllib.parse.urlencode({"ref": hostile.model.ref}).encode()
    for tcp in (False, True):
        reply = hostile.served.call("POST", "/v1/ensure", good, headers, json_type=False, tcp=tcp)
        if content_type is not None and declares_json(content_type):
            assert reply.status == 200, reply.body
            err = error_of(
                hostile.served.call("POST", "/v1/ensure", form, headers, tcp=tcp),
                {400},
                {"request_invalid"},
            )
            assert err["details"]["field"] == "body"
            continue
        # Refused on the header alone, on every route that reads a body, with one or
        # without: what a browser can send cross-site without a preflight gets nowhere.
        err = error_of(reply, {415}, {"unsupported_media_type"})
        assert err["details"]["content_types"] == list(headers.values())
        for method, path in BODY_ROUTES:
            for body in (good, form, None):
                reply = hostile.served.call(method, path, body, headers, json_type=False, tcp=tcp)
                error_of(reply, {415}, {"unsupported_media_type"})
    hostile.alive()


@collect_before_report
def test_two_content_types_are_refused_even_if_one_is_json(hostile: Hostile) -> None:
    hostile.begin()
    body = json.dumps({"ref": hostile.model.ref, "lease": False}).encode()
    for second in (b"text/plain", b"application/json"):
        out = hostile.served.raw(
            b"POST /v1/ensure HTTP/1.1\r\nHost: d\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Type: " + second + b"\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
            tcp=False,
        )
        # aiohttp's parser refuses the duplicate (a plain 400); the app would say 415.
        assert re.match(rb"HTTP/1\.[01] (400|415) ", out), out[:300]
    hostile.alive()


def _slow_body(
    served: Served, body: bytes, *, chunked: bool, trickle: bool, tcp: bool
) -> tuple[bytes, float]:
    """Headers, then a body a byte at a time (``trickle``) or one byte and nothing more:
    (what came back before the server closed or answered, seconds until then)."""
    head = b"POST /v1/ensure HTTP/1.1\r\nHost: d\r\nContent-Type: application/json\r\n"
    if tcp:
        head += b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
    if chunked:
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        pieces = [b"1\r\n" + body[i : i + 1] + b"\r\n" for i in range(len(body))]
    else:
        head += b"Content-Length: %d\r\n\r\n" % len(body)
        pieces = [body[i : i + 1] for i in range(len(body))]
    family = socket.AF_INET if tcp else socket.AF_UNIX
    address: Any = ("127.0.0.1", served.port) if tcp else os.fspath(served.sock_path)
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.connect(address)
        sock.settimeout(0.05)
        started = time.monotonic()
        sock.sendall(head + pieces.pop(0))
        out = b""
        # Bounded by the daemon, not by this loop: 10 s is far beyond its limit.
        while time.monotonic() - started < 10 and not _complete(out):
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                if trickle and pieces:
                    with contextlib.suppress(OSError):
                        sock.sendall(pieces.pop(0))
                continue
            except OSError:
                break
            if not piece:
                break
            out += piece
        return out, time.monotonic() - started


@collect_before_report
@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickled"])
def test_a_body_that_stalls_or_trickles_gets_408_in_bounded_time(
    hostile: Hostile, monkeypatch: pytest.MonkeyPatch, tcp: bool, chunked: bool, trickle: bool
) -> None:
    hostile.begin()
    limit_s = 0.5
    monkeypatch.setattr(api_app, "BODY_TIMEOUT_S", limit_s)
    body = json.dumps({"ref": hostile.model.ref, "lease": False}).encode()
    # At one byte per 50 ms the whole body would take seconds: longer than the limit.
    assert len(body) * 0.05 > 4 * limit_s
    out, seconds = _slow_body(hostile.served, body, chunked=chunked, trickle=trickle, tcp=tcp)
    assert out.startswith(b"HTTP/1.1 408"), out[:300]
    assert limit_s <= seconds < limit_s + 2.0, seconds
    head, _, raw = out.partition(b"\r\n\r\n")
    assert re.search(rb"(?im)^connection: close\r?$", head), head
    err = json.loads(raw)["error"]
    assert err["code"] == "request_timeout" and err["details"]["timeout_s"] == limit_s
    hostile.alive()


@collect_before_report
def test_content_encodings_that_do_not_match_the_body(hostile: Hostile) -> None:
    hostile.begin()
    good = json.dumps({"ref": hostile.model.ref, "lease": False}).encode()
    for encoding, raw in (("gzip", gzip.compress(good)), ("deflate", zlib.compress(good))):
        reply = hostile.served.call("POST", "/v1/ensure", raw, {"Content-Encoding": encoding})
        assert reply.status == 200, reply.body
    # Said to be compressed, and is not: the body cannot be read.
    for encoding in ("gzip", "deflate"):
        reply = hostile.served.call("POST", "/v1/ensure", good, {"Content-Encoding": encoding})
        err = error_of(reply, {400, 415}, {"request_invalid"})
        assert err["details"]["field"] == "body", err
    # Codings this daemon cannot decode: aiohttp's own 400 (text/plain) or ours.
    for encoding in ("br", "zstd"):
        reply = hostile.served.call("POST", "/v1/ensure", good, {"Content-Encoding": encoding})
        assert 400 <= reply.status < 500, reply.body
    # A compressed body that inflates past the limit: refused while inflating.
    bomb = gzip.compress(b" " * 50_000_000)
    assert len(bomb) < hostile.served.cfg.daemon.max_body_bytes
    reply = hostile.served.call("POST", "/v1/ensure", bomb, {"Content-Encoding": "gzip"})
    error_of(reply, {413}, {"payload_too_large"})
    hostile.alive()


@collect_before_report
def test_streamed_ensure_with_hostile_fields(hostile: Hostile, nowhere: str) -> None:
    hostile.begin()
    ok = hostile.served.post("/v1/ensure", {"ref": hostile.model.ref, "stream": True})
    assert ok.status == 200 and ok.content_type.startswith(NDJSON)
    lines = [json.loads(line) for line in ok.body.splitlines()]
    assert lines[-1]["event"] == "result"
    for doc, status, code in (
        ({"ref": f"{nowhere}/m", "stream": True}, 404, "model_not_found"),
        ({"ref": "s3://models/m", "stream": True}, 503, "origin_unavailable"),
        ({"ref": "ftp://x/y", "stream": True}, 400, "ref_invalid"),
        ({"ref": hostile.model.ref, "stream": "yes"}, 400, "request_invalid"),
        ({"ref": hostile.model.ref, "stream": True, "priority": "now!"}, 400, "request_invalid"),
    ):
        error_of(hostile.served.post("/v1/ensure", doc), {status}, {code})
    hostile.alive()


# -- the real daemon, raw bytes ---------------------------------------------------------

_MALFORMED: list[tuple[str, bytes]] = [
    ("garbage", b"\x00\xff\xfe\xfd garbage\r\n\r\n"),
    ("tls hello", bytes.fromhex("160301002001000104030300") + os.urandom(32)),
    ("http2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("http/0.9", b"GET /healthz\r\n\r\n"),
    ("bad version", b"GET /healthz HTTP/9.9\r\nHost: d\r\n\r\n"),
    ("NUL in path", b"GET /v1/blobs/\x00 HTTP/1.1\r\nHost: d\r\n\r\n"),
    ("space in path", b"GET /v1/blobs/a b HTTP/1.1\r\nHost: d\r\n\r\n"),
    ("no colon", b"GET /healthz HTTP/1.1\r\nHost: d\r\nBad Header\r\n\r\n"),
    ("folded header", b"GET /healthz HTTP/1.1\r\nHost: d\r\nX: a\r\n folded\r\n\r\n"),
    ("header too long", b"GET /healthz HTTP/1.1\r\nHost: d\r\nX: " + b"a" * 20000 + b"\r\n\r\n"),
    ("url too long", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: d\r\n\r\n"),
    (
        "many headers",
        b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(500)) + b"\r\n",
    ),
    ("negative length", b"POST /v1/ensure HTTP/1.1\r\nHost: d\r\nContent-Length: -1\r\n\r\n"),
    ("length not a number", b"POST /v1/ensure HTTP/1.1\r\nHost: d\r\nContent-Length: x\r\n\r\n"),
    (
        "two lengths",
        b"POST /v1/ensure HTTP/1.1\r\nHost: d\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    ),
    (
        "length and chunked",
        b"POST /v1/ensure HTTP/1.1\r\nHost: d\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "bad chunk size",
        b"POST /v1/ensure HTTP/1.1\r\nHost: d\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ),
    (
        "short body, then hang up",
        b'POST /v1/ensure HTTP/1.1\r\nHost: d\r\nContent-Length: 100\r\n\r\n{"ref"',
    ),
    ("half a request line", b"GET /heal"),
    (
        "pipelined with junk after",
        b"GET /healthz HTTP/1.1\r\nHost: d\r\n\r\nGET /healthz HTTP/1.1\r\nHost: d\r\n\r\n\x00\x01",
    ),
    (
        "expect garbage",
        b"POST /v1/ensure HTTP/1.1\r\nHost: d\r\nExpect: teapot\r\nContent-Length: 2\r\n\r\n{}",
    ),
    ("non-ascii header", b"GET /healthz HTTP/1.1\r\nHost: d\r\nX-Request-Id: \xff\xfe\r\n\r\n"),
]


_CUT_SHORT = {"short body, then hang up", "half a request line"}


@collect_before_report
def test_malformed_http_against_the_real_daemon(tmp_path: Path) -> None:
    ref = make_model(tmp_path, "m", 200_000, 2)
    sock_path = tmp_path / "d.sock"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEIGHTCACHE_", "AWS_"))} | {
        "AWS_EC2_METADATA_DISABLED": "true",  # loopback only, even for credentials
        "WEIGHTCACHE_CACHE_DIR": str(tmp_path / "cache"),
        "WEIGHTCACHE_CACHE_RESERVE_BYTES": "0",
        "WEIGHTCACHE_TOKEN": TOKEN,
    }
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "weightcache", "-vv", "daemon"),
                *("--socket", str(sock_path), "--listen", f"127.0.0.1:{port}"),
            ],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        ensure = json.dumps({"ref": ref, "lease": False}).encode()
        request = (
            b"POST /v1/ensure HTTP/1.1\r\nHost: d\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(ensure), ensure)
        )
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if raw_exchange(sock_path, request, 5).startswith(b"HTTP/1.1 200"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)

        health = b"GET /healthz HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n"
        for name, data in _MALFORMED:
            for address in (sock_path, ("127.0.0.1", port)):
                # A request cut short gets no answer: the client just goes away.
                out = raw_exchange(address, data, timeout=0.3 if name in _CUT_SHORT else 5.0)
                status = out[:12]
                # aiohttp's parser answers what it cannot parse with a plain 400; what it
                # can parse reaches the app (HTTP/0.9 health, a 413/417/401, a pipeline).
                assert not status.startswith((b"HTTP/1.1 5", b"HTTP/1.0 5")), (name, out[:300])
                assert proc.poll() is None, (name, log_path.read_text()[-3000:])
                assert raw_exchange(address, health).startswith(b"HTTP/1.1 200"), name
                assert raw_exchange(sock_path, request).startswith(b"HTTP/1.1 200"), name
        log = log_path.read_text(errors="replace")
        assert "request.failed" not in log, log[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                assert proc.wait(timeout=30) == 0, log_path.read_text()[-3000:]
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
