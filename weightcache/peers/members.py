"""Who the peers are, which of them is this node, and how each has behaved.

The peer set comes from ``peers.urls`` (fixed) or ``peers.dns`` (a name
resolved every ``peers.refresh_s``, each address reached on ``peers.port``: a
headless Service in front of a DaemonSet). The node's own URL is usually in
the set (the Service includes the node itself) and is recognised, in two ways:

* at once, by address: a URL whose port is the port this daemon listens on and
  whose host is one of this machine's addresses (one it could bind), or the
  listener's own host when that is not a wildcard;
* by answer: every request to a peer carries this daemon's random node id and
  every answer carries the answering daemon's, so a URL that reaches this very
  daemon another way (a proxy, a NAT) is learned as itself on first contact.

The node itself keeps its place in every chunk's rendezvous ranking (so every
node computes the same owners) but is never asked: when the ranking reaches it,
the chunk comes from the origin.

States: ``up`` (tried, or never tried), ``down`` (could not be reached, reset,
slow: skipped for ``peers.down_s``), ``avoided`` (sent bytes that failed their
hash: skipped for ``peers.avoid_s``). A skipped peer is tried again once its
time is up; no prober runs between chunks.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from weightcache.aio import Clock
from weightcache.config import PeersConfig

log = logging.getLogger(__name__)

#: ``(name, port) -> addresses``; :func:`resolve_addresses` unless a test gives another
Resolver = Callable[[str, int], list[str]]

_WILDCARDS = {"", "0.0.0.0", "::", "[::]", "*"}


def resolve_addresses(name: str, port: int) -> list[str]:
    """Every address ``name`` resolves to (A and AAAA), deduplicated, in a stable order."""
    infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def url_for(address: str, port: int, scheme: str = "http") -> str:
    host = f"[{address}]" if ":" in address else address
    return f"{scheme}://{host}:{port}"


def normalize(url: str) -> str:
    """A peer URL as the rendezvous names it: scheme, lower-case host, port; no slash."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}:{parts.port}"


def _nonlocal_bind(family: int) -> bool:
    """True where the kernel lets a socket bind any address (then binding proves nothing)."""
    name = "ipv6" if family == socket.AF_INET6 else "ipv4"
    try:
        with open(f"/proc/sys/net/{name}/ip_nonlocal_bind") as fh:
            return fh.read().strip() == "1"
    except OSError:
        return False


def _is_local_address(address: str) -> bool:
    """True if this machine owns ``address`` (binding to it succeeds). Where any
    address binds (``ip_nonlocal_bind``), only loopback counts; the node id in every
    answer still tells a node its own URL."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    if _nonlocal_bind(family):
        return address in ("127.0.0.1", "::1")
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
    except OSError:
        return False
    return True


@dataclass
class Peer:
    url: str
    #: "up", "down" or "avoided"; see the module docstring
    state: str = "up"
    #: monotonic time the peer is tried again (down or avoided)
    until: float = 0.0
    #: bytes received from this peer (verified) and sent to it
    bytes_in: int = 0
    bytes_out: int = 0
    #: chunks received from it
    chunks_in: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    last_error: str = ""

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "url": self.url,
            "state": self.state if self.until > now or self.state == "up" else "up",
            "retry_in_s": max(0.0, self.until - now) if self.state != "up" else 0.0,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "chunks_in": self.chunks_in,
            "failures": dict(self.failures),
            "last_error": self.last_error,
        }


class Members:
    """The peer set of one daemon, with each peer's state and counters (thread-safe:
    transfer threads report, the loop reads)."""

    def __init__(
        self,
        cfg: PeersConfig,
        *,
        listen: str,
        clock: Clock,
        resolver: Resolver = resolve_addresses,
        node_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.node_id = node_id or uuid.uuid4().hex
        self._resolver = resolver
        host, _, port = listen.rpartition(":")
        self._listen_host = host.strip("[]")
        self._listen_port = int(port) if port.isdigit() else -1
        self._lock = threading.Lock()
        self._peers: dict[str, Peer] = {}
        #: the current set, this node's own URL included when it is in the list
        self._names: list[str] = []
        self._selves: set[str] = set()
        self.refreshed_at: float | None = None
        self.refresh_error = ""
        if cfg.urls:
            self._set(normalize(u) for u in cfg.urls)

    # -- the set -----------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        with self._lock:
            return list(self._names)

    @property
    def self_urls(self) -> list[str]:
        with self._lock:
            return sorted(self._selves)

    def peers(self) -> list[str]:
        """The others: the set without this node."""
        with self._lock:
            return [n for n in self._names if n not in self._selves]

    def refresh(self) -> bool:
        """Resolve ``peers.dns`` again (blocking); True if the set changed. A failed
        lookup keeps the last set and says why in :attr:`refresh_error`."""
        if not self.cfg.dns:
            return False
        try:
            addresses = self._resolver(self.cfg.dns, self.cfg.port)
        except (OSError, ValueError, UnicodeError) as exc:
            self.refresh_error = f"{self.cfg.dns}: {exc}"
            log.warning("peers.dns_failed name=%s error=%s", self.cfg.dns, exc)
            return False
        self.refresh_error = ""
        self.refreshed_at = self.clock.monotonic()
        before = self.names
        self._set(url_for(a, self.cfg.port) for a in addresses)
        changed = self.names != before
        if changed:
            log.info("peers.changed count=%d peers=%s", len(self.names), ",".join(self.names))
        return changed

    def _set(self, urls: Iterable[str]) -> None:
        names = sorted(set(urls))
        selves = {n for n in names if self._looks_like_self(n)}
        with self._lock:
            self._names = names
            # Learned selves stay learned while their URL is in the set.
            self._selves = selves | {s for s in self._selves if s in names}
            for name in names:
                self._peers.setdefault(name, Peer(name))

    def _looks_like_self(self, url: str) -> bool:
        parts = urlsplit(url)
        if parts.port != self._listen_port or not parts.hostname:
            return False
        try:
            addresses = resolve_addresses(parts.hostname, parts.port)
        except OSError:
            return False
        if self._listen_host not in _WILDCARDS:
            try:
                mine = set(resolve_addresses(self._listen_host, self._listen_port))
            except OSError:
                return False
            return bool(mine & set(addresses))
        return any(_is_local_address(a) for a in addresses)

    def learn_self(self, url: str) -> None:
        """``url`` answered with this daemon's own node id: it is this node."""
        with self._lock:
            if url in self._selves:
                return
            self._selves.add(url)
        log.info("peers.self_learned url=%s", url)

    # -- choosing ------------------------------------------------------------------

    def candidates(self, ranking: list[str]) -> list[str]:
        """The peers to ask for a chunk, best first, from the head of its rendezvous
        ranking: up to this node's own place (past it, this node is the owner and asks
        the origin), without the peers down or avoided for now."""
        now = self.clock.monotonic()
        with self._lock:
            out = []
            for name in ranking:
                if name in self._selves:
                    break
                peer = self._peers.get(name)
                if peer is not None and peer.state != "up" and peer.until > now:
                    continue
                out.append(name)
            return out

    # -- reports (from transfer threads or the loop) -------------------------------------

    def report_ok(self, url: str, nbytes: int) -> None:
        with self._lock:
            peer = self._peer(url)
            peer.bytes_in += nbytes
            peer.chunks_in += 1
            if peer.state != "up":
                log.info("peers.up url=%s", url)
            peer.state, peer.until = "up", 0.0

    def report_failure(self, url: str, reason: str, error: str, *, skip: bool) -> None:
        """A chunk could not come from ``url``; ``skip``: leave it out for ``down_s``."""
        with self._lock:
            peer = self._peer(url)
            peer.failures[reason] += 1
            peer.last_error = error
            if skip and peer.state != "avoided":
                if peer.state != "down":
                    log.warning("peers.down url=%s reason=%s error=%s", url, reason, error)
                peer.state, peer.until = "down", self.clock.monotonic() + self.cfg.down_s

    def report_corrupt(self, url: str, error: str) -> None:
        """``url`` sent bytes that failed their hash: avoid it for ``avoid_s``."""
        with self._lock:
            peer = self._peer(url)
            peer.failures["corrupt"] += 1
            peer.last_error = error
            peer.state, peer.until = "avoided", self.clock.monotonic() + self.cfg.avoid_s
        log.error("peers.avoided url=%s for_s=%g reason=%s", url, self.cfg.avoid_s, error)

    def note_sent(self, url: str, nbytes: int) -> None:
        """Bytes this node served to the peer that named itself ``url``."""
        try:
            name = normalize(url) if url else ""
        except ValueError:  # a header that is no URL: counted, as from nobody known
            name = ""
        with self._lock:
            peer = self._peers.get(name) if name else None
            if peer is None:
                peer = self._peers.setdefault("unknown", Peer("unknown"))
            peer.bytes_out += nbytes

    def _peer(self, url: str) -> Peer:
        return self._peers.setdefault(url, Peer(url))

    # -- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self.clock.monotonic()
        with self._lock:
            rows = [
                {**self._peers[n].to_json(now), "self": n in self._selves}
                for n in sorted(self._peers)
                if n in self._names or n == "unknown" or self._peers[n].bytes_out
            ]
            return {
                "node_id": self.node_id,
                "self": sorted(self._selves),
                "dns": self.cfg.dns,
                "refresh_error": self.refresh_error,
                "members": rows,
            }
