"""The daemon's HTTP API: thin handlers over :class:`~weightcache.service.Service`.

One application per listener: the Unix socket for local workers (its file mode
is the access control, and the peer's pid comes from ``SO_PEERCRED``) and,
optionally, TCP for admins, peers and Prometheus, where a configured bearer
token guards every ``/v1/*`` route. Every POST and DELETE must declare
``Content-Type: application/json`` (:func:`_json_only`), so that a browser on
the node cannot post to the daemon cross-site, and a request body must arrive
within :data:`BODY_TIMEOUT_S`.

Every error leaves through :func:`_errors`, the one place that turns an
exception into ``{"error": {"code", "message", "hint"?, "details"?,
"request_id"}}``; a traceback goes to the log, never to the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hmac
import json
import logging
import math
import os
import re
import secrets
import socket
import struct
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from weightcache.api import bodies, metrics, openapi
from weightcache.config import Config
from weightcache.errors import (
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PeerIsSelf,
    RequestInvalid,
    RequestTimeout,
    ShuttingDown,
    Unauthorized,
    WeightcacheError,
)
from weightcache.hashing import is_digest
from weightcache.peers.serve import ChunkFile
from weightcache.peers.transport import NODE_HEADER, PEER_HEADER
from weightcache.service import EnsureResult, ProgressEvent, Service

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SERVICE = web.AppKey("service", Service)
CONFIG = web.AppKey("config", Config)
TCP = web.AppKey("tcp", bool)
#: the request's id, set by the error middleware before anything else runs. A
#: context variable rather than request storage: aiohttp runs each request in a
#: task of its own, and this works the same on every aiohttp 3.x.
_request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("weightcache_request_id")

NDJSON = "application/x-ndjson"
#: progress lines of a streamed ensure: at most one per this interval (the last always goes)
PROGRESS_INTERVAL_S = 0.1
#: a streamed ensure repeats its latest progress this often while nothing moves, so
#: that proxies and client read timeouts see a live connection
PROGRESS_KEEPALIVE_S = 5.0
#: a streamed ensure answers with a plain status (e.g. 503 overloaded) if it fails
#: before this long; after it, the 200 stream starts even without progress
STREAM_HEADERS_AFTER_S = 1.0

#: the whole request body must have arrived this long after the handler asks for it:
#: a client that stalls or trickles its body gets 408, and the handler and its
#: connection are freed (bodies are at most daemon.max_body_bytes, 64 KiB by default)
BODY_TIMEOUT_S = 10.0
#: methods whose routes read a JSON body: requests with them must declare one
JSON_METHODS = frozenset({"POST", "DELETE"})

#: routes a TCP listener serves without a token: probes and scrapers carry none
OPEN_PATHS = frozenset({"/healthz", "/metrics", "/v1/openapi.json"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_RANGE = re.compile(r"bytes=(\d{1,19})-(\d{0,19})")


def make_app(service: Service, cfg: Config, *, tcp: bool) -> web.Application:
    """The application for one listener (``tcp=True``: auth applies when a token is set)."""
    middlewares: list[Middleware] = [_errors]
    if tcp and cfg.daemon.token:
        middlewares.append(_bearer(cfg.daemon.token))
    # After auth: a request without the token learns nothing about the route.
    middlewares.append(_json_only)
    app = web.Application(middlewares=middlewares, client_max_size=cfg.daemon.max_body_bytes)
    app[SERVICE] = service
    app[CONFIG] = cfg
    app[TCP] = tcp
    app.on_response_prepare.append(_stamp)
    app.router.add_post("/v1/ensure", ensure)
    app.router.add_post("/v1/prefetch", prefetch)
    app.router.add_get("/v1/jobs", jobs, allow_head=False)
    app.router.add_get("/v1/jobs/{id}", job, allow_head=False)
    app.router.add_get("/v1/schedules", schedules, allow_head=False)
    app.router.add_get("/v1/schedules/{id}", schedule, allow_head=False)
    app.router.add_delete("/v1/schedules/{id}", remove_schedule)
    app.router.add_get("/v1/forecast", forecast, allow_head=False)
    app.router.add_get("/v1/status", status, allow_head=False)
    app.router.add_delete("/v1/models", evict)
    app.router.add_post("/v1/leases/{id}/release", release)
    # HEAD lets a peer ask whether this node holds a blob without transferring it.
    app.router.add_get("/v1/blobs/{digest}", blob, allow_head=True)
    app.router.add_get("/v1/openapi.json", openapi_doc, allow_head=False)
    app.router.add_get("/metrics", prometheus, allow_head=False)
    app.router.add_get("/healthz", healthz, allow_head=False)
    return app


# -- middleware --------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    _request_id_var.set(_request_id(request))
    started = time.monotonic()
    try:
        resp = await handler(request)
    except WeightcacheError as exc:
        resp = error_response(exc, request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # not an error (a redirect): aiohttp sends it as it is
        resp = _http_error(exc, request)
    except Exception:
        # The traceback is for the operator's log; the client gets the request id
        # to find it there.
        log.error(
            "request.failed request_id=%s method=%s path=%s\n%s",
            request_id(request),
            request.method,
            request.path,
            traceback.format_exc(),
        )
        resp = _error_json(
            500, {"code": "internal", "message": "internal error; see the daemon's log"}, request
        )
    log.debug(
        "request.done request_id=%s method=%s path=%s status=%d seconds=%.3f",
        request_id(request),
        request.method,
        request.path,
        resp.status,
        time.monotonic() - started,
    )
    return resp


def _bearer(token: str) -> Middleware:
    expected = token.encode()

    @web.middleware
    async def bearer(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/") and request.path not in OPEN_PATHS:
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            # Bytes, not str: compare_digest refuses non-ASCII text, and a client
            # must not be able to turn a wrong token into a 500.
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode("utf-8", "surrogateescape"), expected
            ):
                raise Unauthorized(
                    "this route needs a bearer token over TCP",
                    hint="send Authorization: Bearer <token> (the daemon's WEIGHTCACHE_TOKEN "
                    "or daemon.token_file), or use the Unix socket",
                )
        return await handler(request)

    return bearer


@web.middleware
async def _json_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    # Routed requests only: an unknown path stays a 404 and a wrong method a 405.
    # Checked before the handler runs, so a refused request has no effect at all.
    if request.method in JSON_METHODS and request.match_info.http_exception is None:
        bodies.require_json(
            request.headers.getall(hdrs.CONTENT_TYPE, []),
            method=request.method,
            path=request.path,
        )
    return await handler(request)


async def _stamp(request: web.Request, response: web.StreamResponse) -> None:
    # A signal rather than the middleware, so that streamed and file responses,
    # whose headers leave before the handler returns, carry the id as well.
    response.headers["X-Request-Id"] = request_id(request)
    # Peers learn which URL of their list is themselves from this (weightcache.peers).
    node_id = request.app[SERVICE].node_id
    if node_id is not None:
        response.headers[NODE_HEADER] = node_id


def request_id(request: web.Request) -> str:
    """This request's id (one is made up for responses that bypass the middleware)."""
    rid = _request_id_var.get(None)
    if rid is None:
        rid = _request_id(request)
        _request_id_var.set(rid)
    return rid


def _request_id(request: web.Request) -> str:
    # A caller's own id (a sane one) is kept, so one id follows a request from
    # the worker's log into the daemon's.
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID.fullmatch(given) else secrets.token_hex(8)


def error_response(exc: WeightcacheError, request: web.Request) -> web.Response:
    resp = _error_json(exc.http_status, exc.to_dict(), request)
    if isinstance(exc, Overloaded):
        resp.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    if isinstance(exc, Unauthorized):
        resp.headers["WWW-Authenticate"] = 'Bearer realm="weightcache"'
    if isinstance(exc, RequestTimeout):
        # The rest of the body is not waited for on this connection.
        resp.force_close()
    return resp


def _http_error(exc: web.HTTPException, request: web.Request) -> web.Response:
    """aiohttp's own refusals (no route, wrong method, body too large) in our shape."""
    status = exc.status
    if status == 404:
        body = NotFound(f"no route {request.method} {request.path}").to_dict()
    elif status == 405:
        allowed = sorted(getattr(exc, "allowed_methods", ()) or ())
        body = {
            "code": "method_not_allowed",
            "message": f"{request.method} is not allowed on {request.path}",
            "details": {"allowed": allowed},
        }
    elif status == 413:
        body = _too_large(request).to_dict()
    elif 400 <= status < 500:
        body = RequestInvalid(exc.reason or "bad request").to_dict()
    else:
        body = {"code": "internal", "message": exc.reason or "internal error"}
    resp = _error_json(status, body, request)
    if status == 405:
        resp.headers["Allow"] = ", ".join(body["details"]["allowed"])
    return resp


def _error_json(status: int, body: dict[str, Any], request: web.Request) -> web.Response:
    body["request_id"] = request_id(request)
    return web.json_response({"error": body}, status=status)


def _too_large(request: web.Request) -> PayloadTooLarge:
    limit = request.app[CONFIG].daemon.max_body_bytes
    return PayloadTooLarge(
        f"request body is larger than {limit} bytes",
        hint="raise daemon.max_body_bytes if such bodies are expected",
        limit_bytes=limit,
    )


async def _body(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    # Refuse by the declared length first, so an oversized body is not read at all.
    if request.content_length is not None and request.content_length > request.client_max_size:
        raise _too_large(request)
    try:
        # One bound for the whole body, not per read: a byte now and then must
        # not keep a handler (and its connection) forever.
        async with asyncio.timeout(BODY_TIMEOUT_S):
            raw = await request.read()
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
            hint="send the whole body right after the headers",
            timeout_s=BODY_TIMEOUT_S,
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(request) from None
    except web.RequestPayloadError as exc:
        # A Content-Encoding the body does not match, a broken chunked framing.
        raise RequestInvalid(f"request body cannot be read: {exc}", field="body") from None
    except ConnectionResetError:
        # The client hung up mid-body: nobody reads this answer, but it is not our fault.
        raise RequestInvalid(
            "the connection closed before the body was complete", field="body"
        ) from None
    return bodies.decode(raw, allow_empty=allow_empty)


def _service(request: web.Request) -> Service:
    return request.app[SERVICE]


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.json_response(doc, status=status)


# -- routes ------------------------------------------------------------------------


def _client(request: web.Request) -> str | None:
    """Who owns a lease taken over TCP (no pid there): the peer's address."""
    return f"tcp:{request.remote}" if request.app[TCP] else None


async def ensure(request: web.Request) -> web.StreamResponse:
    body = bodies.parse_ensure(await _body(request))
    service = _service(request)
    pid = None if request.app[TCP] else peer_pid(request)
    if body.stream:
        return await _ensure_stream(request, service, body, pid)
    try:
        result = await service.ensure(
            body.ref,
            priority=body.priority,
            pid=pid,
            lease=body.lease,
            client=_client(request),
            connection=_connection(request) if body.bind else None,
        )
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # this request was cancelled
        # The service cancelled the pull it shared with us (its shutdown): the
        # client gets an answer it can act on, not a dropped connection.
        raise _shutting_down() from None
    if _gone(request):
        await _drop_lease(service, result)
    return _json(result.to_json())


async def _ensure_stream(
    request: web.Request, service: Service, body: bodies.EnsureBody, pid: int | None
) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    latest: ProgressEvent | None = None
    changed = asyncio.Event()

    def note(event: ProgressEvent) -> None:
        nonlocal latest
        latest = event
        changed.set()

    def on_progress(event: ProgressEvent) -> None:
        # The service reports from the loop today; a report from a worker thread
        # must still not touch asyncio objects from outside the loop.
        if threading.get_ident() == loop_thread:
            note(event)
        else:
            loop.call_soon_threadsafe(note, event)

    task = asyncio.create_task(
        service.ensure(
            body.ref,
            priority=body.priority,
            pid=pid,
            lease=body.lease,
            on_progress=on_progress,
            client=_client(request),
            connection=_connection(request) if body.bind else None,
        ),
        name=f"weightcache-ensure-{request_id(request)}",
    )
    try:
        # Until the first progress (or a short while), keep the plain status open:
        # a request refused at once (overloaded, a bad ref) gets its own 4xx/5xx.
        await _wait(task, changed, STREAM_HEADERS_AFTER_S)
        if task.done() and latest is None:
            outcome = _outcome(task)
            if isinstance(outcome, BaseException):
                raise outcome

        resp = web.StreamResponse(status=200, headers={"Content-Type": NDJSON})
        await resp.prepare(request)
        lines = _Lines(resp)
        sent: ProgressEvent | None = None
        last_write = 0.0
        while not task.done():
            if latest is not None and (
                latest is not sent or loop.time() - last_write >= PROGRESS_KEEPALIVE_S
            ):
                await lines.send({"event": "progress", **latest.to_json()})
                sent, last_write = latest, loop.time()
            # The result is taken at once; progress no more often than the interval.
            await asyncio.wait({task}, timeout=PROGRESS_INTERVAL_S)
            if not task.done() and latest is sent:
                changed.clear()
                await _wait(task, changed, PROGRESS_KEEPALIVE_S)
        if latest is not None and latest is not sent:
            await lines.send({"event": "progress", **latest.to_json()})
        outcome = _outcome(task)
        if isinstance(outcome, BaseException):
            await lines.send({"event": "error", "error": _stream_error(outcome, request)})
        else:
            if lines.gone or _gone(request):
                await _drop_lease(service, outcome)
            await lines.send({"event": "result", "result": outcome.to_json()})
        await lines.close()
        return resp
    finally:
        if not task.done():
            # The request itself was cancelled (daemon shutdown): its pull goes too.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _wait(task: asyncio.Task[EnsureResult], changed: asyncio.Event, timeout: float) -> None:
    """Until ``task`` is done, ``changed`` is set, or ``timeout`` passes."""
    waiter = asyncio.ensure_future(changed.wait())
    try:
        await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


def _outcome(task: asyncio.Task[EnsureResult]) -> EnsureResult | BaseException:
    if task.cancelled():
        # Cancelled from inside the service (its shutdown), not by this request.
        return _shutting_down()
    exc = task.exception()
    return exc if exc is not None else task.result()


def _shutting_down() -> ShuttingDown:
    return ShuttingDown("the daemon is shutting down", hint="retry against the restarted daemon")


def _stream_error(exc: BaseException, request: web.Request) -> dict[str, Any]:
    if isinstance(exc, WeightcacheError):
        body = exc.to_dict()
    else:
        log.error(
            "request.failed request_id=%s method=%s path=%s\n%s",
            request_id(request),
            request.method,
            request.path,
            "".join(traceback.format_exception(exc)),
        )
        body = {"code": "internal", "message": "internal error; see the daemon's log"}
    body["request_id"] = request_id(request)
    return body


class _Lines:
    """NDJSON lines to a client that may hang up: after that, writes are dropped."""

    def __init__(self, resp: web.StreamResponse) -> None:
        self.resp = resp
        self.gone = False

    async def send(self, doc: dict[str, Any]) -> None:
        if self.gone:
            return
        try:
            await self.resp.write(json.dumps(doc, separators=(",", ":")).encode() + b"\n")
        except ConnectionError:
            # The pull goes on (other clients may share it, and the bytes stay
            # cached); only this client's view of it ends.
            self.gone = True

    async def close(self) -> None:
        if not self.gone:
            try:
                await self.resp.write_eof()
            except ConnectionError:
                self.gone = True


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _connection(request: web.Request) -> Callable[[], bool]:
    """A probe that says whether the request's connection is still open: the kernel
    closes it when the client dies, whichever pid namespace the client lives in."""
    transport = request.transport

    def open_() -> bool:
        return transport is not None and not transport.is_closing()

    return open_


async def _drop_lease(service: Service, result: EnsureResult) -> None:
    # Nobody will ever release a lease granted to a client that hung up; it
    # would only keep the revision from eviction until it expired.
    if result.lease is not None:
        with contextlib.suppress(NotFound):
            await service.release_lease(result.lease.id)


def peer_pid(request: web.Request) -> int | None:
    """The pid of the process on the other end of a Unix socket (``SO_PEERCRED``)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    so_peercred = getattr(socket, "SO_PEERCRED", None)  # Linux only
    if sock is None or so_peercred is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, so_peercred, struct.calcsize("3i"))
    except OSError:
        return None
    pid, _uid, _gid = struct.unpack("3i", raw)
    # 0: the peer lives in a pid namespace this daemon cannot see.
    return pid or None


async def prefetch(request: web.Request) -> web.StreamResponse:
    body = bodies.parse_prefetch(await _body(request))
    service = _service(request)
    if body.schedule is not None:
        return await _prefetch_recurring(service, body)
    job_, created = await service.prefetch(
        body.ref, at=body.at, deadline=body.deadline, priority=body.priority
    )
    resp = _json({"job": job_.to_json(), "created": created}, status=202)
    resp.headers["Location"] = f"/v1/jobs/{job_.id}"
    return resp


async def _prefetch_recurring(service: Service, body: bodies.PrefetchBody) -> web.Response:
    assert body.schedule is not None
    sched, created = await service.add_schedule(
        body.ref,
        body.schedule.expr,
        tz=body.schedule.tz,
        lead_s=body.lead_s,
        hold_s=body.hold_s,
        priority=body.priority,
    )
    planned = None
    if sched.job is not None:
        with contextlib.suppress(NotFound):
            planned = service.job(sched.job).to_json()
    # 201: a new schedule; 200: it already existed (lead, hold and priority updated).
    resp = _json(
        {"schedule": service.schedule_doc(sched), "created": created, "job": planned},
        status=201 if created else 200,
    )
    resp.headers["Location"] = f"/v1/schedules/{sched.id}"
    return resp


async def schedules(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    return _json({"schedules": [service.schedule_doc(s) for s in service.schedules()]})


async def schedule(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    return _json({"schedule": service.schedule_doc(service.schedule(request.match_info["id"]))})


async def remove_schedule(request: web.Request) -> web.StreamResponse:
    bodies.parse_empty(await _body(request, allow_empty=True))
    return _json(await _service(request).remove_schedule(request.match_info["id"]))


async def forecast(request: web.Request) -> web.StreamResponse:
    return _json(await _service(request).forecast())


async def jobs(request: web.Request) -> web.StreamResponse:
    return _json({"jobs": [j.to_json() for j in _service(request).jobs()]})


async def job(request: web.Request) -> web.StreamResponse:
    return _json({"job": _service(request).job(request.match_info["id"]).to_json()})


async def status(request: web.Request) -> web.StreamResponse:
    return _json(await _service(request).status())


async def evict(request: web.Request) -> web.StreamResponse:
    body = bodies.parse_evict(await _body(request))
    return _json(await _service(request).evict(body.ref, force=body.force))


async def release(request: web.Request) -> web.StreamResponse:
    bodies.parse_empty(await _body(request, allow_empty=True))
    lease_id = request.match_info["id"]
    await _service(request).release_lease(lease_id)
    return _json({"released": lease_id})


async def blob(request: web.Request) -> web.StreamResponse:
    digest = request.match_info["digest"]
    # Content is served by its hash only: nothing path-like ever reaches the store.
    if not is_digest(digest):
        raise RequestInvalid(
            "blobs are addressed by their full lower-case hex BLAKE3 digest (64 characters)",
            field="digest",
            digest=digest[:80],
        )
    service = _service(request)
    node_id = service.node_id
    if node_id is not None and request.headers.get(NODE_HEADER) == node_id:
        raise PeerIsSelf("this request came from this daemon: its URL is itself")
    peer = request.headers.get(PEER_HEADER, "")[:200]
    try:
        path, _size = await asyncio.to_thread(service.blob_path, digest)
    except NotFound:
        # Not committed here: a peer may still get a chunk of it (verified, and
        # pulled from the origin for the cluster if need be) by naming the revision.
        ref = request.query.get("ref", "")
        if not ref or request.method != "GET":
            raise
        first, last = _chunk_range(request)
        chunk = await service.serve_chunk(digest, first, last, ref)
        return await _send_chunk(
            request, chunk, functools.partial(service.note_peer_bytes, peer=peer)
        )
    return _BlobResponse(path, functools.partial(service.note_peer_bytes, peer=peer))


#: a chunk is sent in pieces of this size, read as they go out
_SEND_PIECE = 1 << 20


async def _send_chunk(
    request: web.Request, chunk: ChunkFile, on_sent: Callable[[int], None]
) -> web.StreamResponse:
    """Stream a verified chunk from its descriptor, which this closes whatever happens
    (after the read in flight, if the peer went away during one)."""
    pending: asyncio.Future[bytes] | None = None
    sent = 0
    try:
        end = chunk.offset + chunk.length - 1
        resp = web.StreamResponse(
            status=206,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"bytes {chunk.offset}-{end}/{chunk.total}",
            },
        )
        resp.content_length = chunk.length
        await resp.prepare(request)
        loop = asyncio.get_running_loop()
        while sent < chunk.length:
            size = min(_SEND_PIECE, chunk.length - sent)
            pending = loop.run_in_executor(None, os.pread, chunk.fd, size, chunk.offset + sent)
            piece = await pending
            pending = None
            if not piece:
                break  # cannot happen for a verified chunk; the peer sees a short body
            await resp.write(piece)
            sent += len(piece)
        await resp.write_eof()
    finally:
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _: os.close(chunk.fd))
        else:
            os.close(chunk.fd)
        on_sent(sent)
    return resp


def _chunk_range(request: web.Request) -> tuple[int, int | None]:
    """A peer's ``Range: bytes=FIRST-[LAST]`` (one range; no suffix form)."""
    text = request.headers.get(hdrs.RANGE, "")
    m = _RANGE.fullmatch(text.strip())
    if m is None:
        raise RequestInvalid(
            "a blob not committed on this node is served by chunk: send "
            "Range: bytes=FIRST-LAST inside one chunk",
            range=text[:80],
        )
    return int(m[1]), int(m[2]) if m[2] else None


class _BlobResponse(web.FileResponse):
    """A verified blob; counts the bytes it sends (a Range, nothing for HEAD) as served."""

    def __init__(self, path: Path, on_sent: Callable[[int], None]) -> None:
        super().__init__(
            path,
            headers={
                "Content-Type": "application/octet-stream",
                # Content-addressed: the bytes behind a digest never change.
                "Cache-Control": "public, max-age=31536000, immutable",
            },
        )
        self._on_sent = on_sent

    async def prepare(self, request: web.BaseRequest) -> Any:
        writer = await super().prepare(request)
        if request.method == "GET" and 200 <= self.status < 300 and self.content_length:
            self._on_sent(self.content_length)
        return writer


async def openapi_doc(request: web.Request) -> web.StreamResponse:
    return _json(openapi.document())


async def prometheus(request: web.Request) -> web.StreamResponse:
    snapshot = await _service(request).status()
    return web.Response(
        body=metrics.render(snapshot), headers={"Content-Type": metrics.CONTENT_TYPE}
    )


async def healthz(request: web.Request) -> web.StreamResponse:
    health = _service(request).health()
    return _json(health, status=200 if health.get("ready") else 503)
