"""``s3://`` origin through the ``minio`` client: the only module that imports minio.

Every minio/urllib3 exception is translated in :func:`_map_errors`, in one
place, into the origin contract of :mod:`weightcache.origin.base`. The minio
client's own urllib3 retries are switched off: retries, backoff and jitter are
the fetch layer's job, where they are bounded, counted and observable.

Aborting: the pool's connections register their socket with the running
transfer's :class:`~weightcache.origin.base.Abort` just before they wait for a
response (:class:`_AbortableHTTPConnection`), so an abort from the event loop
shuts the socket down and a thread blocked on a stalled origin, before the
response head or in the middle of the body, returns at once. Only a TCP connect
in progress is not interrupted; ``fetch.connect_timeout_s`` bounds it.
"""

from __future__ import annotations

import functools
import io
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import certifi
import urllib3
import urllib3.connection
import urllib3.response
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from weightcache.config import S3Config
from weightcache.errors import (
    ConfigInvalid,
    ObjectNotFound,
    OriginDenied,
    OriginRangeInvalid,
    OriginRejected,
    OriginUnavailable,
    WeightcacheError,
)
from weightcache.origin.base import ObjectInfo, current_abort

_PIECE = 1 << 20
_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "NoSuchObject", "NotFound"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def range_problem(
    status: int, content_range: str | None, content_length: str | None, offset: int, length: int
) -> str | None:
    """Why a response to ``Range: bytes=<offset>-<offset+length-1>`` is not that range.

    None when it is: a 206 whose ``Content-Range`` starts at ``offset`` and ends
    no later than asked (earlier is a short object, left to the byte count), or
    a 200 that is the whole object when the whole object, from 0, was asked for
    (RFC 9110 lets a server ignore ``Range``; then only that case is usable).
    """
    asked = f"bytes={offset}-{offset + length - 1}"
    if status == 200:
        if offset == 0 and content_length is not None and content_length.strip() == str(length):
            return None
        size = f"{content_length} bytes" if content_length is not None else "a body"
        return f"answered 200 with {size} to Range {asked}: it ignores Range"
    if status != 206:
        return f"answered {status} to Range {asked}"
    m = _CONTENT_RANGE.fullmatch((content_range or "").strip())
    if m is None:
        return f"answered 206 with Content-Range {content_range!r} to Range {asked}"
    first, last = int(m[1]), int(m[2])
    if first != offset or last < first or last > offset + length - 1:
        return f"answered Content-Range {content_range} to Range {asked}"
    return None


def _unblock_on_abort(sock: object) -> None:
    """Let the running transfer's Abort shut ``sock`` down (see the module docstring)."""
    abort = current_abort()
    if abort is not None and isinstance(sock, socket.socket):
        # The plain socket's shutdown, also for a TLS socket: ssl.SSLSocket.shutdown
        # would drop its SSL object under the thread still reading through it.
        abort.on_abort(functools.partial(socket.socket.shutdown, sock, socket.SHUT_RDWR))


class _AbortableHTTPConnection(urllib3.connection.HTTPConnection):
    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        _unblock_on_abort(self.sock)
        return super().getresponse()


class _AbortableHTTPSConnection(urllib3.connection.HTTPSConnection):
    def getresponse(self) -> urllib3.response.HTTPResponse:  # type: ignore[override]
        _unblock_on_abort(self.sock)
        return super().getresponse()


class _AbortableHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _AbortableHTTPConnection


class _AbortableHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _AbortableHTTPSConnection


def _classify(status: int, code: str, what: str) -> WeightcacheError:
    if code in _NOT_FOUND or status == 404:
        return ObjectNotFound(f"{what} does not exist ({code or status})")
    if code in _DENIED or status in (401, 403):
        return OriginDenied(
            f"{what}: access denied ({code or status})",
            hint="check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy",
        )
    if status == 429 or status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError"):
        return OriginUnavailable(f"{what}: origin answered {status} {code}".rstrip())
    return OriginRejected(f"{what}: origin refused the request ({status} {code})".rstrip())


@contextmanager
def _map_errors(what: str) -> Iterator[None]:
    try:
        yield
    except WeightcacheError:
        raise
    except S3Error as exc:
        status = exc.response.status if exc.response is not None else 0
        raise _classify(status, exc.code or "", what) from exc
    except ServerError as exc:
        raise _classify(exc.status_code, "", what) from exc
    except InvalidResponseError as exc:
        raise OriginUnavailable(f"{what}: unexpected response from the origin") from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        # Connection refused or reset, timeouts, bodies cut short (IncompleteRead).
        raise OriginUnavailable(f"{what}: {type(exc).__name__}") from exc


class S3Origin:
    def __init__(
        self,
        bucket: str,
        cfg: S3Config,
        *,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
        max_connections: int = 32,
    ) -> None:
        url = urlsplit(cfg.endpoint_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigInvalid([f"s3.endpoint_url: not an http(s) URL: {cfg.endpoint_url!r}"])
        self.bucket = bucket
        self.name = f"s3://{bucket}"
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            maxsize=max_connections,
            retries=False,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        http.pool_classes_by_scheme = {"http": _AbortableHTTPPool, "https": _AbortableHTTPSPool}
        self._client = Minio(
            url.netloc,
            access_key=cfg.access_key_id or None,
            secret_key=cfg.secret_access_key or None,
            secure=url.scheme == "https",
            region=cfg.region or None,
            http_client=http,
        )
        self._http = http

    def _what(self, key: str) -> str:
        return f"{self.name}/{key}"

    def read(self, key: str, *, max_bytes: int) -> bytes:
        with _map_errors(self._what(key)):
            resp = self._client.get_object(self.bucket, key)
            try:
                data = resp.read(max_bytes + 1, decode_content=False)
                # One read returns what arrived before a close: a body cut short is
                # a transient fault (retried), not a malformed manifest.
                declared = resp.headers.get("Content-Length")
                if declared is not None and len(data) < min(int(declared), max_bytes + 1):
                    raise OriginUnavailable(
                        f"{self._what(key)}: body ended after {len(data)} of {declared} bytes"
                    )
            finally:
                resp.close()
                resp.release_conn()
        if len(data) > max_bytes:
            raise OriginRejected(f"{self._what(key)} is larger than {max_bytes} bytes")
        return data

    @contextmanager
    def open_range(self, key: str, offset: int, length: int) -> Iterator[Iterator[bytes]]:
        what = self._what(key)
        with _map_errors(what):
            resp = self._client.get_object(self.bucket, key, offset=offset, length=length)
        problem = range_problem(
            resp.status,
            resp.headers.get("Content-Range"),
            resp.headers.get("Content-Length"),
            offset,
            length,
        )
        if problem is not None:
            resp.close()
            resp.release_conn()
            raise OriginRangeInvalid(
                f"{what}: the origin {problem}",
                hint="the origin, or a proxy or CDN in front of it, must answer ranged GETs "
                "with 206 Partial Content; fix that, or point weightcache at the origin itself",
                key=key,
                offset=offset,
                length=length,
            )

        def pieces() -> Iterator[bytes]:
            # read1: each piece as it arrives (up to 1 MiB), not filled to 1 MiB
            # first, so bytes that came before a reset are handed over and kept.
            with _map_errors(what):
                while piece := resp.read1(_PIECE, decode_content=False):
                    yield piece

        try:
            yield pieces()
        finally:
            # An unfinished body cannot go back to the pool: drop the connection.
            resp.close()
            resp.release_conn()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with _map_errors(f"{self.name}/{prefix}/"):
            for obj in self._client.list_objects(self.bucket, prefix=prefix + "/", recursive=True):
                if obj.object_name is None or obj.is_dir:
                    continue
                yield ObjectInfo(obj.object_name, int(obj.size or 0))

    def write_bytes(self, key: str, data: bytes) -> None:
        with _map_errors(self._what(key)):
            self._client.put_object(self.bucket, key, io.BytesIO(data), len(data))

    def write_file(self, key: str, path: Path, *, part_bytes: int) -> None:
        with _map_errors(self._what(key)):
            # S3 makes a multipart upload visible only when it completes.
            self._client.fput_object(self.bucket, key, os.fspath(path), part_size=part_bytes)

    def ensure_bucket(self) -> None:
        with _map_errors(self.name):
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket)

    def close(self) -> None:
        self._http.clear()

    def __repr__(self) -> str:
        return f"S3Origin({self.name!r})"

    def __reduce__(self) -> Any:  # never pickle credentials into another process
        raise TypeError("S3Origin cannot be pickled")
