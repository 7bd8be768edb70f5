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

Credentials: minio's own providers, chained in the order the AWS SDKs document
(:func:`credential_chain`): static keys from the environment (with
``AWS_SESSION_TOKEN``), the profile in the shared credentials file, then in the
config file, web identity (IRSA), then container credentials and the instance
metadata service. The client asks the chain before every request; the chain
hands back what it holds until 10 s before it expires, then asks again, so a
long-running daemon renews role credentials without a restart. Config has read
every setting; minio's ``IamAwsProvider`` also reads the same ``AWS_*``
variables (and the ECS ``AWS_CONTAINER_*`` ones) from the process environment.
"""

from __future__ import annotations

import configparser
import functools
import io
import logging
import os
import re
import socket
import threading
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
from minio.credentials.credentials import Credentials
from minio.credentials.providers import (
    AWSConfigProvider,
    ChainedProvider,
    IamAwsProvider,
    Provider,
    StaticProvider,
)
from minio.error import InvalidResponseError, S3Error, ServerError

from weightcache.config import AWS_DEFAULT_ENDPOINT, S3Config
from weightcache.errors import (
    ConfigInvalid,
    ObjectNotFound,
    OriginDenied,
    OriginHostUnknown,
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


#: the instance metadata service when AWS_EC2_METADATA_SERVICE_ENDPOINT names none
METADATA_ENDPOINT = "http://169.254.169.254"


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


class AbortableHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _AbortableHTTPConnection


class AbortableHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _AbortableHTTPSConnection


_KEYS_HINT = (
    "check the credentials the chain found (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
    "AWS_SESSION_TOKEN, the AWS_PROFILE profile, the web identity role or the instance "
    "role) and the bucket policy"
)


def describe_endpoint(cfg: S3Config) -> str:
    """The endpoint for messages, saying when it is only the AWS default."""
    if cfg.endpoint_url == AWS_DEFAULT_ENDPOINT:
        return f"{cfg.endpoint_url} (the AWS default: no endpoint is configured)"
    return cfg.endpoint_url


def _endpoint_hint(endpoint: str) -> str:
    if "the AWS default" in endpoint:
        return (
            "for MinIO, SeaweedFS or another S3-compatible store set AWS_ENDPOINT_URL_S3 "
            "(or AWS_ENDPOINT_URL, s3.endpoint_url)"
        )
    return "check AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL / s3.endpoint_url and that it is up"


def _classify(status: int, code: str, what: str, endpoint: str) -> WeightcacheError:
    if code in _NOT_FOUND or status == 404:
        return ObjectNotFound(f"{what} does not exist ({code or status})")
    if code in _DENIED or status in (401, 403):
        return OriginDenied(
            f"{what}: access denied ({code or status}) by {endpoint}",
            hint=_KEYS_HINT,
            endpoint=endpoint,
        )
    if status == 429 or status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError"):
        return OriginUnavailable(
            f"{what}: {endpoint} answered {status} {code}".rstrip(), endpoint=endpoint
        )
    return OriginRejected(
        f"{what}: {endpoint} refused the request ({status} {code})".rstrip(), endpoint=endpoint
    )


def _reason(exc: BaseException) -> str:
    """A short cause: the errno text of a failed connect rather than urllib3's repr."""
    text = str(exc)
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        text = text.rpartition("): ")[2] or text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def _map_errors(what: str, endpoint: str = "the origin") -> Iterator[None]:
    try:
        yield
    except WeightcacheError:
        raise
    except S3Error as exc:
        status = exc.response.status if exc.response is not None else 0
        raise _classify(status, exc.code or "", what, endpoint) from exc
    except ServerError as exc:
        raise _classify(exc.status_code, "", what, endpoint) from exc
    except InvalidResponseError as exc:
        raise OriginUnavailable(
            f"{what}: unexpected response from {endpoint}", endpoint=endpoint
        ) from exc
    except urllib3.exceptions.NameResolutionError as exc:
        # A name that does not resolve is a wrong endpoint or broken DNS, not a busy
        # origin: fail now instead of retrying for seconds.
        raise OriginHostUnknown(
            f"{what}: the endpoint {endpoint} does not resolve ({_reason(exc)}); "
            "not retried, after 1 attempt",
            hint=_endpoint_hint(endpoint),
            endpoint=endpoint,
            attempts=1,
        ) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        # Connection refused or reset, timeouts, bodies cut short (IncompleteRead).
        raise OriginUnavailable(
            f"{what}: {endpoint}: {_reason(exc)}",
            hint=_endpoint_hint(endpoint),
            endpoint=endpoint,
        ) from exc


_TOKEN_IN_URL = re.compile(r"(WebIdentityToken|Token|X-Amz-Security-Token)=[^&\s'\")]+", re.I)


class _RedactTokens(logging.Filter):
    """Cuts tokens out of urllib3's log records before any handler sees them.

    urllib3 logs each request's URL (at DEBUG, and at WARNING when it retries a
    broken connection), and minio sends the web identity token in the query of
    the STS URL. A filter on a logger sees only the records logged on it, not
    those of its children, so it sits on each urllib3 logger that names a URL.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except (TypeError, ValueError):  # a malformed record: let logging report it
            return True
        if _TOKEN_IN_URL.search(text):
            record.msg, record.args = _TOKEN_IN_URL.sub(r"\1=REDACTED", text), None
        return True


for _name in ("urllib3.connectionpool", "urllib3.poolmanager", "urllib3.util.retry"):
    logging.getLogger(_name).addFilter(_RedactTokens())


class _Link(Provider):
    """One link of the chain: a name for messages, and every failure as ValueError.

    :class:`ChainedProvider` moves on only on ``ValueError``; a missing file, an
    unreachable metadata service or a malformed answer are the same "not here".
    """

    def __init__(self, name: str, inner: Provider) -> None:
        self.name = name
        self.inner = inner
        self.failure = "not tried"

    def retrieve(self) -> Credentials:
        try:
            return self.inner.retrieve()
        except (
            ValueError,
            KeyError,
            TypeError,
            OSError,
            configparser.Error,
            urllib3.exceptions.HTTPError,
        ) as exc:
            text = _reason(exc) if not isinstance(exc, ValueError) else str(exc)
            # minio sends the web identity token in the STS URL, which its errors quote.
            self.failure = _TOKEN_IN_URL.sub(r"\1=REDACTED", text)
            raise ValueError(self.failure) from None


class CredentialChain(Provider):
    """minio's :class:`ChainedProvider` over named links, behind a lock.

    The lock makes one thread renew expiring credentials while the others wait
    for its result, instead of every transfer thread asking the metadata service
    or STS at once. When no link has credentials, :class:`OriginDenied` lists
    what each one said.
    """

    def __init__(self, links: list[_Link]) -> None:
        self.links = links
        self._chain = ChainedProvider(list(links))
        self._lock = threading.Lock()

    def retrieve(self) -> Credentials:
        with self._lock:
            try:
                return self._chain.retrieve()
            except ValueError:
                tried = "; ".join(f"{link.name}: {link.failure}" for link in self.links)
                raise OriginDenied(
                    f"no S3 credentials found; tried {tried}",
                    hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE with a "
                    "shared credentials file, AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN "
                    "(EKS IRSA), or give the instance a role",
                ) from None


def _ca_file(cfg: S3Config) -> str:
    if cfg.ca_bundle is not None:
        return os.fspath(cfg.ca_bundle)
    return os.environ.get("SSL_CERT_FILE") or certifi.where()


def credential_chain(cfg: S3Config, *, sts_timeout_s: float = 10.0) -> CredentialChain:
    """The AWS SDKs' order: environment → shared files → web identity → container/IMDS."""
    links: list[_Link] = []
    if cfg.access_key_id:
        links.append(
            _Link(
                "environment (AWS_ACCESS_KEY_ID)",
                StaticProvider(cfg.access_key_id, cfg.secret_access_key, cfg.session_token or None),
            )
        )
    else:
        links.append(_Link("environment", _Nothing("AWS_ACCESS_KEY_ID is not set")))
    profile = cfg.profile or "default"
    links.append(
        _Link(
            f"profile {profile} in {cfg.shared_credentials_file}",
            AWSConfigProvider(os.fspath(cfg.shared_credentials_file), profile),
        )
    )
    # The config file names its sections "profile NAME", except the default one.
    section = profile if profile == "default" else f"profile {profile}"
    links.append(
        _Link(
            f"profile {profile} in {cfg.config_file}",
            AWSConfigProvider(os.fspath(cfg.config_file), section),
        )
    )
    if cfg.web_identity_token_file is not None:
        sts = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=sts_timeout_s, read=sts_timeout_s),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503]),
            cert_reqs="CERT_REQUIRED",
            ca_certs=_ca_file(cfg),
        )
        # The token file is read again at every renewal: kubelet rotates it.
        links.append(
            _Link(
                f"web identity ({cfg.web_identity_token_file}, role {cfg.role_arn})",
                IamAwsProvider(
                    custom_endpoint=cfg.sts_endpoint or None,
                    token_file=os.fspath(cfg.web_identity_token_file),
                    role_arn=cfg.role_arn,
                    region=cfg.region or None,
                    http_client=sts,
                ),
            )
        )
    elif not cfg.metadata_disabled:
        # Not after web identity: minio's IamAwsProvider would only try web identity
        # again (it prefers AWS_WEB_IDENTITY_TOKEN_FILE), and IRSA is the pod's role.
        # The AWS SDKs give the metadata service 1 s and one attempt: off EC2 nothing
        # answers at 169.254.169.254, and a daemon must not wait minutes to say so.
        t = cfg.metadata_timeout_s
        imds = urllib3.PoolManager(timeout=urllib3.Timeout(connect=t, read=t), retries=False)
        endpoint = cfg.metadata_endpoint or METADATA_ENDPOINT
        links.append(
            _Link(
                f"container or instance metadata ({endpoint})",
                IamAwsProvider(custom_endpoint=endpoint, http_client=imds),
            )
        )
    return CredentialChain(links)


class _Nothing(Provider):
    """A link that is not configured: says why, so the final message lists it."""

    def __init__(self, why: str) -> None:
        self.why = why

    def retrieve(self) -> Credentials:
        raise ValueError(self.why)


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
        self.endpoint = describe_endpoint(cfg)
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            maxsize=max_connections,
            retries=False,
            cert_reqs="CERT_REQUIRED",
            ca_certs=_ca_file(cfg),
        )
        http.pool_classes_by_scheme = {"http": AbortableHTTPPool, "https": AbortableHTTPSPool}
        # A public bucket is read unsigned (s3.anonymous), as `aws s3 --no-sign-request`.
        chain = (
            None
            if cfg.anonymous
            else credential_chain(cfg, sts_timeout_s=connect_timeout_s + read_timeout_s)
        )
        self._client = Minio(
            url.netloc,
            credentials=chain,
            secure=url.scheme == "https",
            region=cfg.region or None,
            http_client=http,
        )
        self._http = http

    def _what(self, key: str) -> str:
        return f"{self.name}/{key}"

    def read(self, key: str, *, max_bytes: int) -> bytes:
        with _map_errors(self._what(key), self.endpoint):
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
        with _map_errors(what, self.endpoint):
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
            with _map_errors(what, self.endpoint):
                while piece := resp.read1(_PIECE, decode_content=False):
                    yield piece

        try:
            yield pieces()
        finally:
            # An unfinished body cannot go back to the pool: drop the connection.
            resp.close()
            resp.release_conn()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        with _map_errors(f"{self.name}/{prefix}/", self.endpoint):
            for obj in self._client.list_objects(self.bucket, prefix=prefix + "/", recursive=True):
                if obj.object_name is None or obj.is_dir:
                    continue
                yield ObjectInfo(obj.object_name, int(obj.size or 0))

    def write_bytes(self, key: str, data: bytes) -> None:
        with _map_errors(self._what(key), self.endpoint):
            self._client.put_object(self.bucket, key, io.BytesIO(data), len(data))

    def write_file(self, key: str, path: Path, *, part_bytes: int) -> None:
        with _map_errors(self._what(key), self.endpoint):
            # S3 makes a multipart upload visible only when it completes.
            self._client.fput_object(self.bucket, key, os.fspath(path), part_size=part_bytes)

    def ensure_bucket(self) -> None:
        with _map_errors(self.name, self.endpoint):
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket)

    def close(self) -> None:
        self._http.clear()

    def __repr__(self) -> str:
        return f"S3Origin({self.name!r})"

    def __reduce__(self) -> Any:  # never pickle credentials into another process
        raise TypeError("S3Origin cannot be pickled")
