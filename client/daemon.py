"""A small synchronous client for the node daemon's HTTP API.

Workers reach the daemon over its Unix socket (no auth: the socket's file mode
is the access control); admins and remote tools over TCP (``WEIGHTCACHE_URL``),
with ``Authorization: Bearer <token>`` when a token is configured.

Standard library only: a worker that imports ``weightcache`` must not pay for
(or depend on) aiohttp, uvloop, torch, minio or diskcache here. One connection
per request: the Unix socket makes that cheap, and it leaves no pooled socket
behind in a forked worker.

Errors: an error body from the daemon is raised as the same class the daemon
raised (:func:`weightcache.errors.from_dict`), with its facts. A daemon that
cannot be reached (no socket file, connection refused, a timeout connecting,
the connection closed before the answer was complete) is
:class:`~weightcache.errors.DaemonUnavailable`, whose facts name the ``reason``
and the ``address`` (the socket path or the URL, never the token): the loader
then falls back to pulling in-process.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from weightcache import __version__
from weightcache.errors import (
    DaemonUnavailable,
    Overloaded,
    ResponseInvalid,
    WeightcacheError,
    from_dict,
)
from weightcache.results import Ensured, LocalFile

if TYPE_CHECKING:
    from weightcache.config import Config

__all__ = [
    "DaemonClient",
    "Ensured",
    "LocalFile",
    "Progress",
]

log = logging.getLogger(__name__)

#: connecting is local (or one hop away): a daemon that does not accept within
#: this long is treated as absent
CONNECT_TIMEOUT_S = 2.0
#: reads of quick routes (status, jobs, prefetch, evict, release, health)
READ_TIMEOUT_S = 30.0
NDJSON = "application/x-ndjson"
_USER_AGENT = f"weightcache-client/{__version__}"


# -- results -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """One ``progress`` event of a streamed ensure."""

    done_bytes: int
    total_bytes: int
    rate_bytes_per_s: float = 0.0
    source: str = ""
    ref: str = ""


ProgressFn = Callable[[Progress], None]


# -- transport -----------------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix stream socket; ``timeout`` bounds the connect only.

    Also what tests and load scenarios use to speak to a daemon's socket directly.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, timeout: float, read_timeout: float | None
    ) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = os.fspath(path)
        self.read_timeout = read_timeout

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_path)
            sock.settimeout(self.read_timeout)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _ReadTimeout:
    """After the connect (and TLS handshake) under ``timeout``, reads wait ``read_timeout``."""

    sock: socket.socket
    read_timeout: float | None

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock.settimeout(self.read_timeout)


class _TCPConnection(_ReadTimeout, http.client.HTTPConnection):
    def __init__(
        self, host: str, port: int | None, *, timeout: float, read_timeout: float | None
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self.read_timeout = read_timeout


class _TLSConnection(_ReadTimeout, http.client.HTTPSConnection):
    def __init__(
        self, host: str, port: int | None, *, timeout: float, read_timeout: float | None
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self.read_timeout = read_timeout


_CLOSED = (
    ConnectionResetError,
    BrokenPipeError,
    ConnectionAbortedError,
    http.client.RemoteDisconnected,
)
#: (exception type, reason code, what the operator reads), first match wins
_FAILURES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str, str], ...] = (
    (FileNotFoundError, "no_socket", "the socket file does not exist"),
    (ConnectionRefusedError, "connection_refused", "connection refused"),
    (PermissionError, "permission_denied", "permission denied"),
    (TimeoutError, "timeout", "timed out"),
    (_CLOSED, "connection_closed", "the connection was closed before the answer was complete"),
    (http.client.IncompleteRead, "connection_closed", "the answer was cut short"),
    (socket.gaierror, "unknown_host", "unknown host"),
    (http.client.HTTPException, "bad_response", "the answer was not HTTP"),
)


def _classify(exc: BaseException) -> tuple[str, str]:
    """(reason code, description) of a failure to reach or hear the daemon."""
    for kind, reason, description in _FAILURES:
        if isinstance(exc, kind):
            return reason, description
    if isinstance(exc, OSError) and exc.strerror:
        return "os_error", exc.strerror.lower()
    return "os_error", f"{type(exc).__name__}: {exc}"


# -- the client ----------------------------------------------------------------


class DaemonClient:
    """Talks to one daemon, over a Unix socket (``socket_path``) or HTTP(S) (``url``)."""

    def __init__(
        self,
        *,
        socket_path: str | os.PathLike[str] | None = None,
        url: str = "",
        token: str = "",
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float | None = READ_TIMEOUT_S,
        ensure_timeout_s: float | None = None,
    ) -> None:
        if (socket_path is None) == (not url):
            raise ValueError("give exactly one of socket_path or url")  # programmer error
        self.socket_path = os.fspath(socket_path) if socket_path is not None else None
        self.url = url.rstrip("/")
        # The token goes to TCP daemons only: the socket needs none, and it must
        # never travel anywhere it is not asked for.
        self._token = token if url else ""
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        #: a pull takes as long as it takes (minutes for a large model): no read timeout
        self.ensure_timeout_s = ensure_timeout_s
        self._base_path = ""
        if url:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"daemon URL must be http(s)://HOST[:PORT], got {url!r}")
            self._scheme = parts.scheme
            self._host = parts.hostname
            self._port = parts.port
            self._base_path = parts.path.rstrip("/")

    def __repr__(self) -> str:
        return f"DaemonClient({self.address!r})"

    @property
    def address(self) -> str:
        """Where the daemon is expected: the socket path or the URL (no credentials)."""
        if self.socket_path is not None:
            return self.socket_path
        parts = urllib.parse.urlsplit(self.url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    @classmethod
    def from_config(cls, cfg: Config) -> DaemonClient | None:
        """The daemon this configuration points at, or ``None`` when there is clearly none.

        In order: a socket path set explicitly (``WEIGHTCACHE_SOCKET``,
        ``daemon.socket_path``, ``--socket``), used even if the file is missing
        so that a misconfigured worker says so; a URL (``WEIGHTCACHE_URL``); the
        default socket ``CACHE_DIR/weightcache.sock`` if the file exists.
        """
        d = cfg.daemon
        if d.socket_path is not None:
            return cls(socket_path=d.socket_path)
        if d.url:
            return cls(url=d.url, token=d.token)
        default = cfg.socket_path
        if default.exists():
            return cls(socket_path=default)
        return None

    # -- plumbing ------------------------------------------------------------

    def _connection(self, read_timeout: float | None) -> http.client.HTTPConnection:
        if self.socket_path is not None:
            return UnixHTTPConnection(
                self.socket_path, timeout=self.connect_timeout_s, read_timeout=read_timeout
            )
        kind = _TLSConnection if self._scheme == "https" else _TCPConnection
        return kind(
            self._host, self._port, timeout=self.connect_timeout_s, read_timeout=read_timeout
        )

    def _headers(self, body: bytes | None, accept: str, keep: bool = False) -> dict[str, str]:
        headers = {
            "User-Agent": _USER_AGENT,
            "Accept": accept,
            "Connection": "keep-alive" if keep else "close",
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _unavailable(
        self,
        exc: BaseException | None,
        method: str,
        path: str,
        *,
        reason: str = "",
        detail: str = "",
    ) -> DaemonUnavailable:
        if exc is not None:
            reason, detail = _classify(exc)
        return DaemonUnavailable(
            f"no daemon at {self.address}: {detail} ({method} {path})",
            hint="start one with `weightcache daemon`, or point WEIGHTCACHE_SOCKET / "
            "WEIGHTCACHE_URL at it",
            reason=reason,
            address=self.address,
        )

    def _open(
        self,
        method: str,
        path: str,
        doc: Mapping[str, Any] | None,
        *,
        accept: str = "application/json",
        read_timeout: float | None,
        conn: http.client.HTTPConnection | None = None,
        keep: bool = False,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        if doc is None and method in ("POST", "DELETE"):
            doc = {}  # the daemon takes a POST only as JSON (no cross-site form posts)
        body = json.dumps(doc).encode() if doc is not None else None
        conn = conn if conn is not None else self._connection(read_timeout)
        try:
            conn.request(
                method,
                self._base_path + path,
                body=body,
                headers=self._headers(body, accept, keep),
            )
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._unavailable(exc, method, path) from exc
        except BaseException:
            conn.close()
            raise
        return conn, resp

    def _read_all(self, resp: http.client.HTTPResponse, method: str, path: str) -> bytes:
        try:
            return resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unavailable(exc, method, path) from exc

    def _raise_for(
        self, resp: http.client.HTTPResponse, raw: bytes, method: str, path: str
    ) -> NoReturn:
        status = resp.status
        try:
            doc = json.loads(raw) if raw else None
        except ValueError:
            doc = None
        body = doc.get("error") if isinstance(doc, dict) else None
        if not isinstance(body, dict):
            text = raw[:200].decode("utf-8", "replace").strip()
            raise ResponseInvalid(
                f"daemon at {self.address} answered {status} {resp.reason} to {method} {path}"
                + (f": {text}" if text else ""),
                status=status,
            )
        raise _error_from_body(body, status, resp.getheader("Retry-After"))

    def _call(
        self,
        method: str,
        path: str,
        doc: Mapping[str, Any] | None = None,
        *,
        long: bool = False,
        also_ok: tuple[int, ...] = (),
    ) -> dict[str, Any]:
        timeout = self.ensure_timeout_s if long else self.read_timeout_s
        conn, resp = self._open(method, path, doc, read_timeout=timeout)
        try:
            raw = self._read_all(resp, method, path)
        finally:
            resp.close()
            conn.close()
        if resp.status < 400:
            return self._parse(raw, method, path)
        if resp.status in also_ok:
            # A status code that still carries the route's own document (``/healthz``).
            with contextlib.suppress(ValueError):
                answer = json.loads(raw)
                if isinstance(answer, dict) and "error" not in answer:
                    return answer
        self._raise_for(resp, raw, method, path)

    def _parse(self, raw: bytes, method: str, path: str) -> dict[str, Any]:
        try:
            out = json.loads(raw) if raw.strip() else {}
        except ValueError:
            out = None
        if not isinstance(out, dict):
            raise ResponseInvalid(
                f"daemon at {self.address} answered {method} {path} with something other "
                f"than a JSON object: {raw[:200].decode('utf-8', 'replace')!r}",
                hint="check that the daemon and the client are the same weightcache version",
            )
        return out

    # -- the API -------------------------------------------------------------

    def ensure(
        self,
        ref: str,
        *,
        lease: bool = True,
        priority: str = "worker",
        on_progress: ProgressFn | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/ensure``: make ``ref`` local; return the daemon's result document.

        With ``on_progress``, the daemon streams NDJSON progress events, each
        passed to ``on_progress`` as a :class:`Progress`. No read timeout: a pull
        takes as long as the model is large; the daemon closing the connection
        (a crash, a restart) is :class:`DaemonUnavailable`.
        """
        path = "/v1/ensure"
        doc = {"ref": ref, "stream": on_progress is not None, "lease": lease, "priority": priority}
        if on_progress is None:
            return self._call("POST", path, doc, long=True)
        conn, resp = self._open(
            "POST",
            path,
            doc,
            accept=f"{NDJSON}, application/json",
            read_timeout=self.ensure_timeout_s,
        )
        return self._streamed(conn, resp, path, on_progress)

    def ensure_held(self, ref: str, *, priority: str = "worker") -> tuple[dict[str, Any], Hold]:
        """``POST /v1/ensure`` with a lease **bound to this connection**: the daemon ends
        the lease when the connection closes, whatever ends this process (``kill -9``
        included, and across pid namespaces where the daemon cannot see the pid).
        The connection stays open in the returned :class:`Hold` until released."""
        path = "/v1/ensure"
        doc = {"ref": ref, "stream": False, "lease": True, "priority": priority, "bind": True}
        conn, resp = self._open("POST", path, doc, read_timeout=self.ensure_timeout_s, keep=True)
        try:
            raw = self._read_all(resp, "POST", path)
            if resp.status >= 400:
                self._raise_for(resp, raw, "POST", path)
            result = self._parse(raw, "POST", path)
        except BaseException:
            conn.close()
            raise
        return result, Hold(self, conn, _lease_id(result))

    def _streamed(
        self,
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        path: str,
        on_progress: ProgressFn,
    ) -> dict[str, Any]:
        try:
            if resp.status >= 400:
                self._raise_for(resp, self._read_all(resp, "POST", path), "POST", path)
            ctype = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if ctype != NDJSON:
                # A daemon that does not stream answers with the plain result.
                return self._parse(self._read_all(resp, "POST", path), "POST", path)
            for event in self._events(resp, path):
                kind = event.get("event")
                if kind == "progress":
                    on_progress(
                        Progress(
                            done_bytes=int(event.get("done_bytes", 0)),
                            total_bytes=int(event.get("total_bytes", 0)),
                            rate_bytes_per_s=float(event.get("rate_bytes_per_s") or 0.0),
                            source=str(event.get("source") or ""),
                            ref=str(event.get("ref") or ""),
                        )
                    )
                elif kind == "result":
                    result = event.get("result")
                    if not isinstance(result, dict):
                        raise ResponseInvalid(
                            f"daemon at {self.address} sent a result event without a result"
                        )
                    return result
                elif kind == "error":
                    body = event.get("error")
                    raise _error_from_body(body if isinstance(body, dict) else {}, 500, None)
                else:
                    log.debug("daemon.event_ignored event=%s", kind)
        finally:
            resp.close()
            conn.close()
        raise self._unavailable(
            None,
            "POST",
            path,
            reason="connection_closed",
            detail="the progress stream ended without a result",
        )

    def _events(self, resp: http.client.HTTPResponse, path: str) -> Iterator[dict[str, Any]]:
        while True:
            try:
                line = resp.readline()
            except (OSError, http.client.HTTPException) as exc:
                raise self._unavailable(exc, "POST", path) from exc
            if not line:
                return
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError as exc:
                raise ResponseInvalid(
                    f"daemon at {self.address} sent a line that is not JSON in the "
                    f"progress stream: {line[:200].decode('utf-8', 'replace')!r}"
                ) from exc
            if isinstance(event, dict):
                yield event

    def status(self) -> dict[str, Any]:
        """``GET /v1/status``: counters, disk, models, pulls, leases, jobs."""
        return self._call("GET", "/v1/status")

    def prefetch(
        self,
        ref: str,
        at: str | float | None = None,
        deadline: str | float | None = None,
        priority: str = "admin",
    ) -> dict[str, Any]:
        """``POST /v1/prefetch``: schedule a pull; ``at``/``deadline`` are RFC 3339 or epoch s.

        Returns ``{"job": {...}, "created": bool}`` (``created`` is false when an
        equal job already existed).
        """
        doc: dict[str, Any] = {"ref": ref, "priority": priority}
        if at is not None:
            doc["at"] = at
        if deadline is not None:
            doc["deadline"] = deadline
        return self._call("POST", "/v1/prefetch", doc)

    def jobs(self) -> list[dict[str, Any]]:
        """``GET /v1/jobs``: every prefetch job the daemon knows."""
        jobs = self._call("GET", "/v1/jobs").get("jobs", [])
        return [j for j in jobs if isinstance(j, dict)] if isinstance(jobs, list) else []

    def job(self, job_id: str) -> dict[str, Any]:
        """``GET /v1/jobs/{id}``; :class:`~weightcache.errors.NotFound` for an unknown id."""
        doc = self._call("GET", f"/v1/jobs/{urllib.parse.quote(str(job_id), safe='')}")
        job = doc.get("job", doc)
        return job if isinstance(job, dict) else doc

    def evict(self, ref: str, force: bool = False) -> dict[str, Any]:
        """``DELETE /v1/models``: evict ``ref`` (refused while leased, unless ``force``)."""
        return self._call("DELETE", "/v1/models", {"ref": ref, "force": force})

    def release(self, lease_id: str) -> dict[str, Any]:
        """``POST /v1/leases/{id}/release``: end a lease before it expires."""
        return self._call("POST", _release_path(lease_id))

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: ``{"live", "ready", ...}``; a daemon not ready (yet) answers 503."""
        return self._call("GET", "/healthz", also_ok=(503,))


def _error_from_body(
    body: Mapping[str, Any], status: int, retry_after: str | None
) -> WeightcacheError:
    err = from_dict(dict(body), status)
    request_id = body.get("request_id")
    if request_id is not None:
        err.facts.setdefault("request_id", request_id)
    if isinstance(err, Overloaded) and "retry_after_s" not in (body.get("details") or {}):
        with contextlib.suppress(ValueError):
            err.retry_after_s = float(retry_after) if retry_after else err.retry_after_s
        err.facts["retry_after_s"] = err.retry_after_s
    return err


def _release_path(lease_id: str) -> str:
    return f"/v1/leases/{urllib.parse.quote(str(lease_id), safe='')}/release"


def _lease_id(result: Mapping[str, Any]) -> str | None:
    lease = result.get("lease")
    if isinstance(lease, Mapping) and lease.get("id") is not None:
        return str(lease["id"])
    return None


class Hold:
    """A lease bound to an open connection to the daemon. :meth:`release` ends it
    (over the same connection, then closes it); a process that dies without
    releasing ends it too, because the kernel closes the connection."""

    def __init__(
        self, client: DaemonClient, conn: http.client.HTTPConnection, lease_id: str | None
    ) -> None:
        self._client = client
        self._conn: http.client.HTTPConnection | None = conn
        self.lease_id = lease_id

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if self.lease_id is not None:
                path = _release_path(self.lease_id)
                _, resp = self._client._open(
                    "POST", path, None, read_timeout=self._client.read_timeout_s, conn=conn
                )
                resp.read()
                resp.close()
        except WeightcacheError as exc:
            # Closing the connection below ends the lease anyway.
            log.info("lease.release_failed lease=%s code=%s", self.lease_id, exc.code)
        finally:
            conn.close()

    def __del__(self) -> None:
        if self._conn is not None:
            self._conn.close()
