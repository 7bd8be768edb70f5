"""Asking a peer for a chunk: an :class:`~weightcache.origin.base.Origin` over HTTP.

``GET /v1/blobs/{blake3}?ref=<location>@<revision>`` with ``Range`` (inside one
chunk), the bearer token, this daemon's node id (``X-Weightcache-Node``) and
its own URL (``X-Weightcache-Peer``, for the peer's per-peer counters). The peer
answers 206 with verified bytes; it may hold the request while the chunk is
still on its way from the origin (up to its ``peers.wait_s``), so the read
timeout before the head is ``wait_s + timeout_s``; once the head is in, a body
that stalls for ``peers.timeout_s`` is a slow peer.

The fetcher streams, hashes, writes and resumes these bytes exactly as the
origin's (it never trusts them: every chunk is checked against the manifest).
Errors keep the origin contract: a peer that cannot be reached, resets, stalls
or answers 5xx is :class:`OriginUnavailable` (:class:`PeerBusy` for a 503 that
says ``peer_busy``), 401/403 :class:`OriginDenied`, 404 :class:`ObjectNotFound`,
a request that came back to this very daemon :class:`PeerIsSelf`.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import urllib3

from weightcache.errors import (
    ObjectNotFound,
    OriginDenied,
    OriginRangeInvalid,
    OriginRejected,
    OriginUnavailable,
    PeerBusy,
    PeerIsSelf,
)
from weightcache.origin.base import ObjectInfo
from weightcache.origin.s3 import AbortableHTTPPool, AbortableHTTPSPool, range_problem

_PIECE = 1 << 20
NODE_HEADER = "X-Weightcache-Node"
PEER_HEADER = "X-Weightcache-Peer"


class PeerClient:
    """The connections to every peer of one daemon, and what each request carries."""

    def __init__(
        self,
        *,
        token: str,
        node_id: str,
        own_url: str,
        connect_timeout_s: float,
        wait_s: float,
        timeout_s: float,
        max_connections: int = 16,
    ) -> None:
        self.node_id = node_id
        self.own_url = own_url
        self.timeout_s = timeout_s
        self._headers = {"Authorization": f"Bearer {token}", NODE_HEADER: node_id}
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=wait_s + timeout_s),
            maxsize=max_connections,
            retries=False,
        )
        http.pool_classes_by_scheme = {"http": AbortableHTTPPool, "https": AbortableHTTPSPool}
        self._http = http

    def origin(self, url: str, ref: str) -> PeerOrigin:
        return PeerOrigin(self, url, ref)

    def headers(self) -> dict[str, str]:
        headers = dict(self._headers)
        if self.own_url:
            headers[PEER_HEADER] = self.own_url
        return headers

    def close(self) -> None:
        self._http.clear()


class PeerOrigin:
    """One peer, for the blobs of one revision (``ref`` names it, so that a peer
    that does not hold a chunk can pull it from the origin for the cluster)."""

    def __init__(self, client: PeerClient, url: str, ref: str) -> None:
        self.client = client
        self.url = url
        self.ref = ref
        self.name = f"peer {url}"

    @contextmanager
    def open_range(self, key: str, offset: int, length: int) -> Iterator[Iterator[bytes]]:
        what = f"{self.name}: blob {key[:16]} bytes {offset}-{offset + length - 1}"
        headers = self.client.headers()
        headers["Range"] = f"bytes={offset}-{offset + length - 1}"
        target = f"{self.url}/v1/blobs/{key}?ref={quote(self.ref, safe='')}"
        try:
            resp = self.client._http.request(
                "GET", target, headers=headers, preload_content=False, redirect=False
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise OriginUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
        try:
            if resp.headers.get(NODE_HEADER) == self.client.node_id:
                raise PeerIsSelf(f"{self.url} is this daemon", url=self.url)
            if resp.status != 206:
                raise _refusal(resp, what)
            problem = range_problem(
                resp.status,
                resp.headers.get("Content-Range"),
                resp.headers.get("Content-Length"),
                offset,
                length,
            )
            if problem is not None:
                raise OriginRangeInvalid(f"{what}: the peer {problem}")
            _set_read_timeout(resp, self.client.timeout_s)
        except BaseException:
            resp.close()
            resp.release_conn()
            raise

        def pieces() -> Iterator[bytes]:
            try:
                while piece := resp.read1(_PIECE, decode_content=False):
                    yield piece
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise OriginUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc

        try:
            yield pieces()
        finally:
            resp.close()
            resp.release_conn()

    def read(self, key: str, *, max_bytes: int) -> bytes:
        raise OriginRejected(f"{self.name} serves chunks of blobs only")

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        raise OriginRejected(f"{self.name} serves chunks of blobs only")

    def write_bytes(self, key: str, data: bytes) -> None:
        raise OriginRejected(f"{self.name} is read-only")

    def write_file(self, key: str, path: Path, *, part_bytes: int) -> None:
        raise OriginRejected(f"{self.name} is read-only")

    def close(self) -> None:
        return None  # the connections are the PeerClient's


def _refusal(resp: Any, what: str) -> Exception:
    code, message = "", ""
    try:
        body = json.loads(resp.read(64 << 10, decode_content=True) or b"{}")
        error = body.get("error") or {}
        code, message = str(error.get("code") or ""), str(error.get("message") or "")
    except (ValueError, AttributeError, urllib3.exceptions.HTTPError, OSError):
        code, message = "", ""  # no JSON error body (a proxy's page): the status says enough
    text = f"{what}: answered {resp.status} {code}".rstrip() + (f": {message}" if message else "")
    if code == "peer_busy":
        return PeerBusy(text)
    if resp.status in (401, 403):
        return OriginDenied(text, hint="every peer must share the daemon token (WEIGHTCACHE_TOKEN)")
    if resp.status == 404:
        return ObjectNotFound(text)
    if resp.status == 409 and code == "peer_is_self":
        return PeerIsSelf(text)
    if resp.status == 429 or resp.status >= 500:
        return OriginUnavailable(text)
    return OriginRejected(text)


def _set_read_timeout(resp: Any, timeout_s: float) -> None:
    """From the head on, a body that stalls this long is a slow peer."""
    conn = getattr(resp, "connection", None)
    sock = getattr(conn, "sock", None)
    if isinstance(sock, socket.socket):
        sock.settimeout(timeout_s)
