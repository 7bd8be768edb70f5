"""A fault-injecting reverse proxy in front of a real S3 endpoint on the loopback interface.

Tests point a client at :attr:`FaultProxy.url` (``AWS_ENDPOINT_URL``) and the
proxy forwards every request verbatim to the real server: method, path and
query exactly as sent, every header including ``Authorization``, ``x-amz-*``
and ``Host`` (SigV4 signs the Host header, so the client's value is kept), and
the body; responses stream back unchanged. Rules then break chosen requests in
the ways an object store breaks in production:

==================  ==================================================================
``"503"``           503 with an S3 ``SlowDown`` XML body (the origin is never asked)
``"429"``           429 ``TooManyRequests`` (R2/GCS-style throttling)
``"500"``           500 ``InternalError``
``"403"``           403 ``AccessDenied``
``"reset"``         the connection is reset (RST) after ``after_bytes`` body bytes, or
                    before any response when ``after_bytes`` is None
``"truncate"``      the full ``Content-Length`` is sent, then the body ends (FIN) after
                    ``after_bytes`` bytes
``"flip"``          the byte at ``offset`` of the body is XOR-ed with 0xFF
``"stall"``         nothing for ``seconds`` before the response (``after_bytes`` None),
                    or after ``after_bytes`` body bytes
``"throttle"``      the body is sent at ``bytes_per_s``
``"pace"``          a GET's body is sent at ``bytes_per_s`` by an origin that is asked
                    for it ``piece_bytes`` at a time, just before they are due: the
                    origin's byte counter runs at most one piece ahead of the client
                    (with ``"throttle"`` the origin fills its socket send buffer, which
                    Linux grows to 4 MiB, ahead of a slow reader, and counts it as sent)
``"ignore_range"``  a GET is answered ``200`` with the whole object, ``Range`` ignored, as
                    some proxies and CDNs do (RFC 9110 allows it)

``"pace"`` and ``"ignore_range"`` make requests of their own, which they sign with the
``credentials`` the proxy was given (a signed request cannot lose or change its
``Range`` header on the way: SigV4 signs it).
==================  ==================================================================

A rule picks requests by a substring or regex of the path, the method, the
first byte of the ``Range`` header (one, or a ``range`` of them: every request
for some part of a chunk, such as the retries that resume it), or the proxy's
request numbers, and fires
on a schedule: the first ``times`` matching requests, every ``every``-th one,
or always. Every request is recorded in :attr:`FaultProxy.log` (arrival and
end on the system-wide monotonic clock, so a subprocess's ``time.monotonic``
compares with them).

The proxy reads from the origin through a small, fixed socket receive buffer
(:data:`UPSTREAM_RCVBUF`), so a throttled or stalled body cannot pull megabytes
from the origin ahead of what the client is sent (Linux would autotune the
buffer up to ``tcp_rmem``'s maximum, 32 MiB here): the origin's own byte
counters stay within a few hundred KiB of what the client got, as they would
with a slow network in between rather than a slow proxy.

The proxy runs its own event loop in a background thread, so synchronous
tests and subprocesses can use it; the same rules can be set over HTTP under
``/__proxy/`` (``POST /__proxy/rules``, ``DELETE /__proxy/rules``,
``GET /__proxy/log``). It only ever connects to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import re
import socket
import struct
import termios
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import urllib3
from aiohappyeyeballs import AddrInfoType
from aiohttp import web
from minio import Minio
from multidict import CIMultiDict
from yarl import URL

CONTROL_PREFIX = "/__proxy/"
LOOPBACK = "127.0.0.1"

STATUS_FAULTS: dict[str, tuple[int, str, str]] = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "429": (429, "TooManyRequests", "Too many requests, please slow down."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "403": (403, "AccessDenied", "Access Denied"),
}
STREAM_FAULTS = ("reset", "truncate", "flip", "stall", "throttle")
#: faults that ask the origin themselves, with requests the proxy signs
REWRITE_FAULTS = ("pace", "ignore_range")
FAULTS = (*STATUS_FAULTS, *STREAM_FAULTS, *REWRITE_FAULTS)

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Headers aiohttp's client would invent: a verbatim proxy sends only what the client sent.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_THROTTLE_SLICE = 16 * 1024
#: SO_RCVBUF of the proxy's connections to the origin (the kernel doubles it)
UPSTREAM_RCVBUF = 128 * 1024
_RANGE_START = re.compile(r"^\s*bytes\s*=\s*(\d+)-")


@dataclass
class Rule:
    """Which requests to break, how, and how often; counters show what it did."""

    fault: str
    #: a substring of the path, or a compiled regex searched in it; None: every path
    match: str | re.Pattern[str] | None = None
    method: str | None = None
    #: only requests whose ``Range: bytes=N-`` starts at N (or at any N in a range)
    range_start: int | range | None = None
    #: only these request numbers (:attr:`Record.seq`, from 1)
    requests: frozenset[int] | None = None
    #: fire on at most this many requests; None: no limit
    times: int | None = None
    #: fire on every ``every``-th matching request (1: each one)
    every: int = 1
    after_bytes: int | None = None
    offset: int = 0
    seconds: float = 0.0
    bytes_per_s: int = 0
    piece_bytes: int = 256 * 1024
    matched: int = 0
    applied: int = 0

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"unknown fault {self.fault!r} (known: {', '.join(FAULTS)})")
        if self.every < 1 or (self.times is not None and self.times < 0):
            raise ValueError("every must be >= 1 and times >= 0")
        if self.after_bytes is not None and self.after_bytes < 0:
            raise ValueError("after_bytes must be >= 0")
        if self.fault == "truncate" and self.after_bytes is None:
            self.after_bytes = 0  # a body cut before its first byte
        if self.fault == "flip" and self.offset < 0:
            raise ValueError("flip needs offset >= 0")
        if self.fault == "stall" and self.seconds <= 0:
            raise ValueError("stall needs seconds > 0")
        if self.fault in ("throttle", "pace") and self.bytes_per_s <= 0:
            raise ValueError(f"{self.fault} needs bytes_per_s > 0")
        if self.piece_bytes < 1:
            raise ValueError("piece_bytes must be >= 1")

    def selects(self, seq: int, method: str, path: str, range_start: int | None) -> bool:
        if self.requests is not None and seq not in self.requests:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        if self.range_start is not None:
            if range_start is None:
                return False
            if isinstance(self.range_start, range):
                if range_start not in self.range_start:
                    return False
            elif self.range_start != range_start:
                return False
        if self.match is None:
            return True
        if isinstance(self.match, re.Pattern):
            return self.match.search(path) is not None
        return self.match in path

    def fires(self) -> bool:
        """Count one matching request; True if the fault applies to it."""
        self.matched += 1
        if self.matched % self.every:
            return False
        if self.times is not None and self.applied >= self.times:
            return False
        self.applied += 1
        return True

    def label(self) -> str:
        if self.fault in ("reset", "truncate") or (
            self.fault == "stall" and self.after_bytes is not None
        ):
            where = "headers" if self.after_bytes is None else str(self.after_bytes)
            return f"{self.fault}@{where}"
        if self.fault == "flip":
            return f"flip@{self.offset}"
        return self.fault


@dataclass
class Record:
    """One request through the proxy."""

    seq: int
    #: monotonic time the request arrived
    time: float
    method: str
    path: str
    query: str
    range: str | None
    #: the fault applied (:meth:`Rule.label`), None if forwarded untouched
    fault: str | None
    #: status sent to the client; None if no response head was sent
    status: int | None = None
    #: body bytes written to the client
    bytes_sent: int = 0
    #: monotonic time the proxy was done with it (sent, reset, or the client left)
    end: float | None = None
    #: "ok", "reset", "truncated", "client_gone", "upstream_error", or "pending"
    outcome: str = "pending"

    @property
    def range_start(self) -> int | None:
        return _range_start(self.range)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _range_start(header: str | None) -> int | None:
    if header is None:
        return None
    m = _RANGE_START.match(header)
    return int(m.group(1)) if m else None


def _unacked(sock: Any) -> int:
    """Bytes in a TCP socket's send queue the peer has not acknowledged (0 if unknown)."""
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


def _upstream_socket(addr_info: AddrInfoType) -> socket.socket:
    family, type_, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=type_, proto=proto)
    # Set before connect, so the window is small from the handshake on, and fixed:
    # an explicit SO_RCVBUF turns receive-buffer autotuning off for this socket.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UPSTREAM_RCVBUF)
    return sock


def _s3_error_xml(code: str, message: str, resource: str, request_id: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        f"<Resource>{resource}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()


class _ConnectionKilled(Exception):
    """The fault ended the connection; nothing more can be sent on it."""


class FaultProxy:
    """The proxy; use as a context manager, or call :meth:`start` and :meth:`stop`."""

    def __init__(
        self,
        upstream: str,
        *,
        shutdown_timeout_s: float = 0.25,
        credentials: tuple[str, str] | None = None,
        region: str = "us-east-1",
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or parts.hostname not in (LOOPBACK, "localhost"):
            raise ValueError(f"upstream must be http://127.0.0.1:PORT, got {upstream!r}")
        if parts.port is None:
            raise ValueError(f"upstream needs an explicit port: {upstream!r}")
        self.upstream = URL.build(scheme="http", host=LOOPBACK, port=parts.port)
        self._shutdown_timeout_s = shutdown_timeout_s
        self._lock = threading.Lock()
        self._rules: list[Rule] = []
        self._log: list[Record] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._session: aiohttp.ClientSession | None = None
        #: (access key, secret key) for the requests the proxy makes itself (ignore_range)
        self._credentials = credentials
        self._region = region
        self._client: Minio | None = None
        self._client_http: urllib3.PoolManager | None = None
        self.port = 0

    # -- the Python API ----------------------------------------------------------------

    @property
    def url(self) -> str:
        """What to put in ``AWS_ENDPOINT_URL``."""
        return f"http://{LOOPBACK}:{self.port}"

    def add_rule(
        self,
        match: str | re.Pattern[str] | None = None,
        fault: str = "503",
        *,
        times: int | None = None,
        every: int = 1,
        method: str | None = None,
        range_start: int | range | None = None,
        requests: Iterable[int] | None = None,
        after_bytes: int | None = None,
        offset: int = 0,
        seconds: float = 0.0,
        bytes_per_s: int = 0,
        piece_bytes: int = 256 * 1024,
    ) -> Rule:
        """Break requests from now on; rules are tried in the order they were added."""
        if fault in REWRITE_FAULTS and self._credentials is None:
            raise ValueError(f"{fault} needs FaultProxy(..., credentials=(key, secret))")
        rule = Rule(
            fault=fault,
            match=match,
            method=method,
            range_start=range_start,
            requests=frozenset(requests) if requests is not None else None,
            times=times,
            every=every,
            after_bytes=after_bytes,
            offset=offset,
            seconds=seconds,
            bytes_per_s=bytes_per_s,
            piece_bytes=piece_bytes,
        )
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self, *, log: bool = False) -> None:
        """Drop every rule; with ``log=True`` the log too, and request numbers restart at 1."""
        with self._lock:
            self._rules.clear()
            if log:
                self._log.clear()

    @property
    def log(self) -> list[Record]:
        """Every request so far, oldest first (a copy of the list; records update in place)."""
        with self._lock:
            return list(self._log)

    def requests_for(self, match: str, range_start: int | range | None = None) -> list[Record]:
        """Records whose path contains ``match`` (and whose range starts at ``range_start``,
        or inside it)."""
        return [
            r
            for r in self.log
            if match in r.path
            and (
                range_start is None
                or (
                    r.range_start is not None and r.range_start in range_start
                    if isinstance(range_start, range)
                    else r.range_start == range_start
                )
            )
        ]

    def wait_idle(self, timeout_s: float = 5.0) -> None:
        """Wait until every request so far has ended (the proxy is done with it)."""
        deadline = time.monotonic() + timeout_s
        while any(r.end is None for r in self.log):
            if time.monotonic() > deadline:
                raise TimeoutError("requests still in flight through the fault proxy")
            time.sleep(0.005)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="faultproxy", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._failure is not None:
            self._thread.join(5)
            raise RuntimeError("fault proxy failed to start") from self._failure
        if not self._ready.is_set():
            raise RuntimeError("fault proxy did not start in 30 s")
        return self

    def stop(self) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and thread.is_alive():
            loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        if thread.is_alive():
            raise RuntimeError("fault proxy did not stop in 30 s")
        self._thread = None
        if self._client_http is not None:
            self._client_http.clear()
        if self._failure is not None:
            raise RuntimeError("fault proxy failed") from self._failure

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported by start() or stop() in the caller's thread
            self._failure = exc
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()
                self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        connector = aiohttp.TCPConnector(
            limit=0, ttl_dns_cache=None, socket_factory=_upstream_socket
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=_NO_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            trust_env=False,
        )
        try:
            app = web.Application(client_max_size=0)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(
                app,
                access_log=None,
                handler_cancellation=True,
                shutdown_timeout=self._shutdown_timeout_s,
            )
            await runner.setup()
            try:
                site = web.TCPSite(runner, LOOPBACK, 0)
                await site.start()
                self.port = int(runner.addresses[0][1])
                self._ready.set()
                await self._stop.wait()
            finally:
                await runner.cleanup()
        finally:
            await self._session.close()

    # -- requests ------------------------------------------------------------------------

    def _admit(self, request: web.Request) -> tuple[Record, Rule | None]:
        range_header = request.headers.get("Range")
        start = _range_start(range_header)
        with self._lock:
            seq = len(self._log) + 1
            chosen: Rule | None = None
            for rule in self._rules:
                if rule.selects(seq, request.method, request.path, start) and rule.fires():
                    chosen = chosen or rule
            record = Record(
                seq=seq,
                time=time.monotonic(),
                method=request.method,
                path=request.path,
                query=request.query_string,
                range=range_header,
                fault=chosen.label() if chosen else None,
            )
            self._log.append(record)
        return record, chosen

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith(CONTROL_PREFIX):
            return await self._control(request)
        record, rule = self._admit(request)
        try:
            return await self._respond(request, record, rule)
        except _ConnectionKilled:
            # The transport is gone: aiohttp's attempt to finish the response meets
            # a closed transport and gives up quietly.
            return web.Response(status=500)
        except asyncio.CancelledError:
            record.outcome = "client_gone"
            raise
        except (TimeoutError, ConnectionError, aiohttp.ClientPayloadError):
            record.outcome = "client_gone" if record.status is not None else "upstream_error"
            return web.Response(status=502)
        except aiohttp.ClientError:
            record.outcome = "upstream_error"
            record.status = 502
            return web.Response(status=502, text="fault proxy: upstream unreachable")
        finally:
            if record.end is None:
                record.end = time.monotonic()

    async def _respond(
        self, request: web.Request, record: Record, rule: Rule | None
    ) -> web.StreamResponse:
        fault = rule.fault if rule else None
        if rule is not None and fault in STATUS_FAULTS:
            status, code, message = STATUS_FAULTS[fault]
            request_id = f"FAULTPROXY{record.seq:08d}"
            body = _s3_error_xml(code, message, request.path, request_id)
            record.status = status
            record.bytes_sent = 0 if request.method == "HEAD" else len(body)
            record.outcome = "ok"
            return web.Response(
                status=status,
                body=body,
                content_type="application/xml",
                headers={"x-amz-request-id": request_id},
            )
        if rule is not None and fault == "ignore_range" and request.method == "GET":
            return await self._whole_object(request, record)
        if rule is not None and fault == "pace" and request.method == "GET":
            return await self._paced(request, record, rule)
        if rule is not None and fault == "reset" and rule.after_bytes is None:
            self._kill(request, record, reset=True)
        if rule is not None and fault == "stall" and rule.after_bytes is None:
            await asyncio.sleep(rule.seconds)

        assert self._session is not None
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP
        )
        url = URL(str(self.upstream) + request.raw_path, encoded=True)
        assert url.host == LOOPBACK  # traffic never leaves the loopback interface
        data = request.content if request.body_exists else None
        async with self._session.request(
            request.method, url, headers=headers, data=data, allow_redirects=False
        ) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for key, value in upstream.headers.items():
                if key.lower() not in _HOP_BY_HOP:
                    response.headers.add(key, value)
            await response.prepare(request)
            record.status = upstream.status
            if rule is not None and request.method != "HEAD":
                await self._pump_faulty(request, response, upstream, record, rule)
            else:
                async for piece in upstream.content.iter_any():
                    await response.write(piece)
                    record.bytes_sent += len(piece)
            await response.write_eof()
            record.outcome = "ok"
            return response

    async def _whole_object(self, request: web.Request, record: Record) -> web.StreamResponse:
        """200 with the whole object the path names, whatever ``Range`` asked for."""
        bucket, _, key = request.path.lstrip("/").partition("/")
        _, headers, body = await asyncio.get_running_loop().run_in_executor(
            None, self._get_object, bucket, key, 0, 0
        )
        record.status = 200
        record.bytes_sent = len(body)
        record.outcome = "ok"
        return web.Response(
            status=200,
            body=body,
            headers={"ETag": headers.get("ETag", ""), "Accept-Ranges": "bytes"},
            content_type="application/octet-stream",
        )

    async def _paced(self, request: web.Request, record: Record, rule: Rule) -> web.StreamResponse:
        """206 for the asked range, fetched from the origin a piece at a time as it is due."""
        bucket, _, key = request.path.lstrip("/").partition("/")
        m = re.match(r"^\s*bytes\s*=\s*(\d+)-(\d*)\s*$", request.headers.get("Range", ""))
        first = int(m.group(1)) if m else 0
        last = int(m.group(2)) if m and m.group(2) else None
        loop = asyncio.get_running_loop()

        def piece_at(pos: int) -> int:
            stop = pos + rule.piece_bytes if last is None else min(pos + rule.piece_bytes, last + 1)
            return stop - pos

        _, headers, data = await loop.run_in_executor(
            None, self._get_object, bucket, key, first, piece_at(first)
        )
        total = int(headers.get("Content-Range", "*/0").rsplit("/", 1)[1])
        end = total - 1 if last is None else min(last, total - 1)
        response = web.StreamResponse(status=206)
        response.headers["Content-Range"] = f"bytes {first}-{end}/{total}"
        response.headers["Content-Length"] = str(end - first + 1)
        response.headers["Content-Type"] = "application/octet-stream"
        response.headers["Accept-Ranges"] = "bytes"
        response.headers["ETag"] = headers.get("ETag", "")
        await response.prepare(request)
        record.status = 206
        started = time.monotonic()
        pos = first
        while True:
            for at in range(0, len(data), _THROTTLE_SLICE):
                take = data[at : at + _THROTTLE_SLICE]
                await response.write(take)
                record.bytes_sent += len(take)
                ahead = started + record.bytes_sent / rule.bytes_per_s - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
            pos += len(data)
            if pos > end or not data:
                break
            _, _, data = await loop.run_in_executor(
                None, self._get_object, bucket, key, pos, piece_at(pos)
            )
        await response.write_eof()
        record.outcome = "ok"
        return response

    def _origin_client(self) -> Minio:
        """A client of the origin with the proxy's credentials (thread-safe, made once)."""
        with self._lock:
            if self._client is None:
                assert self._credentials is not None
                self._client_http = urllib3.PoolManager(retries=False, maxsize=32)
                self._client = Minio(
                    f"{LOOPBACK}:{self.upstream.port}",
                    access_key=self._credentials[0],
                    secret_key=self._credentials[1],
                    secure=False,
                    region=self._region,
                    http_client=self._client_http,
                )
            return self._client

    def _get_object(
        self, bucket: str, key: str, offset: int, length: int
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of a GET the proxy signs; ``length`` 0: to the end."""
        resp = self._origin_client().get_object(bucket, key, offset=offset, length=length)
        try:
            body = resp.read()
        except BaseException:
            resp.close()
            raise
        finally:
            resp.release_conn()  # a body read to its end: the connection is reused
        return resp.status, dict(resp.headers), body

    async def _pump_faulty(
        self,
        request: web.Request,
        response: web.StreamResponse,
        upstream: aiohttp.ClientResponse,
        record: Record,
        rule: Rule,
    ) -> None:
        fault = rule.fault
        cut = rule.after_bytes if fault in ("reset", "truncate", "stall") else None
        # A cut or a mid-body stall strikes when exactly ``cut`` bytes are out and
        # more are to come; a body no longer than ``cut`` goes out whole.
        struck = cut is None
        started = time.monotonic()
        async for chunk in upstream.content.iter_any():
            piece = bytes(chunk)
            while piece:
                sent = record.bytes_sent
                if not struck and sent == cut:
                    struck = True
                    if fault in ("reset", "truncate"):
                        await self._cut(request, record, reset=fault == "reset")
                    await self._flush(request)
                    await asyncio.sleep(rule.seconds)
                take = piece
                if not struck and cut is not None:
                    take = piece[: cut - sent]
                elif fault == "throttle":
                    take = piece[:_THROTTLE_SLICE]
                if fault == "flip" and sent <= rule.offset < sent + len(take):
                    flipped = bytearray(take)
                    flipped[rule.offset - sent] ^= 0xFF
                    take = bytes(flipped)
                await response.write(take)
                record.bytes_sent += len(take)
                piece = piece[len(take) :]
                if fault == "throttle":
                    ahead = started + record.bytes_sent / rule.bytes_per_s - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)

    async def _flush(self, request: web.Request) -> None:
        """Until every byte written so far has reached the client's kernel (or 2 s pass).

        A reset discards whatever is still queued on our side, so "reset after M
        bytes" waits for aiohttp's buffer and then the socket's send queue
        (``SIOCOUTQ``: bytes not yet acknowledged) to empty.
        """
        writer = request._payload_writer
        send_headers = getattr(writer, "send_headers", None)
        if send_headers is not None:
            send_headers()  # aiohttp holds the head back to coalesce it with the body
        transport = request.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        deadline = time.monotonic() + 2.0
        while not transport.is_closing() and time.monotonic() < deadline:
            if transport.get_write_buffer_size() == 0 and _unacked(sock) == 0:
                return
            await asyncio.sleep(0.001)

    async def _cut(self, request: web.Request, record: Record, *, reset: bool) -> None:
        await self._flush(request)
        self._kill(request, record, reset=reset)

    def _kill(self, request: web.Request, record: Record, *, reset: bool) -> None:
        transport = request.transport
        # End time first: the client may see the cut and retry before this handler
        # runs again, and its next request must not appear to start before this ended.
        record.end = time.monotonic()
        record.outcome = "reset" if reset else "truncated"
        if transport is not None:
            if reset:
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    # SO_LINGER with a zero timeout: close() sends RST, not FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            else:
                transport.close()
        raise _ConnectionKilled

    # -- the HTTP control API --------------------------------------------------------------

    async def _control(self, request: web.Request) -> web.StreamResponse:
        what = request.path[len(CONTROL_PREFIX) :].strip("/")
        if what == "rules" and request.method == "POST":
            spec = await request.json()
            if not isinstance(spec, dict):
                raise web.HTTPBadRequest(text="a JSON object, please")
            if spec.pop("regex", False) and isinstance(spec.get("match"), str):
                spec["match"] = re.compile(spec["match"])
            try:
                rule = self.add_rule(**spec)
            except (TypeError, ValueError) as exc:
                raise web.HTTPBadRequest(text=str(exc)) from exc
            return web.json_response({"fault": rule.fault, "label": rule.label()}, status=201)
        if what == "rules" and request.method == "DELETE":
            self.clear(log=request.query.get("log") == "1")
            return web.Response(status=204)
        if what == "rules" and request.method == "GET":
            with self._lock:
                rules = [
                    {
                        "fault": r.fault,
                        "label": r.label(),
                        "matched": r.matched,
                        "applied": r.applied,
                    }
                    for r in self._rules
                ]
            return web.json_response(rules)
        if what == "log" and request.method == "GET":
            return web.json_response([r.to_json() for r in self.log])
        raise web.HTTPNotFound(text=f"no control endpoint {request.method} {request.path}")
