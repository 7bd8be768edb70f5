"""The storm's ``peers`` scenario: K daemons that are peers of each other, and what they moved.

``storm.py --peers`` starts one daemon per simulated node, as its
``weightcache`` scenario does, but each one also listens on a loopback TCP
port, holds the same bearer token and lists every node's URL (its own
included, which it recognises) in ``WEIGHTCACHE_PEERS_URLS``: the setup
docs/operations.md describes ("Peers: pull each model once per cluster").
This module holds what that scenario adds to the storm:

* :class:`PeerCluster`: the ports, the token and each node's environment;
* :class:`NodeTraffic`: one node's bytes from the origin, from peers and to
  peers, and its view of the other peers, read from its ``/v1/status``;
* :func:`cluster_check`: the check that the cluster pulled the model from the
  origin about once (a pure function over the numbers);
* :func:`traffic_table`: the per-node table the report shows.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: the origin may send the cluster this many times the model (chunks re-pulled when an
#: owner was slow or busy), on top of the manifest reads
CLUSTER_ORIGIN_LIMIT = 1.10


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago.

    The port is free again when the daemon binds it; a daemon that loses the race
    fails to start, and the scenario with it (a failed step, not a wrong number).
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class PeerCluster:
    """K daemons on loopback that name each other as peers."""

    token: str
    ports: tuple[int, ...]

    @classmethod
    def allocate(cls, nodes: int) -> PeerCluster:
        """A fresh token (peers authenticate with it) and a free port per node."""
        return cls(secrets.token_urlsafe(24), tuple(free_port() for _ in range(nodes)))

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def url(self, node: int) -> str:
        """Node ``node``'s base URL (nodes count from 1)."""
        return self.urls[node - 1]

    def env(self, node: int) -> dict[str, str]:
        """What makes node ``node``'s daemon a peer of every other one."""
        return {
            "WEIGHTCACHE_TOKEN": self.token,
            "WEIGHTCACHE_DAEMON_LISTEN": f"127.0.0.1:{self.ports[node - 1]}",
            # Every node's URL, its own too: the peer list is the same on every node,
            # as a DNS answer would be.
            "WEIGHTCACHE_PEERS_URLS": ",".join(self.urls),
        }


@dataclass(frozen=True)
class NodeTraffic:
    """One node's bytes, from its daemon's ``/v1/status`` after the loads."""

    node: int
    #: from the origin, for its own loads and for chunks it owned that others asked for
    origin_bytes: int
    #: of those, the chunks it pulled because a peer asked for them
    pulled_for_peers_bytes: int
    #: received from peers (each chunk verified before it was kept)
    peer_bytes: int
    #: sent to peers
    peer_bytes_served: int
    #: the other peers' states as this node sees them (url -> up, down, avoided)
    peer_states: dict[str, str]
    #: failed peer transfers by reason, summed over the other peers
    failures: dict[str, int]

    @classmethod
    def from_status(cls, node: int, doc: Mapping[str, Any]) -> NodeTraffic:
        counters = doc.get("counters") or {}
        peers = doc.get("peers") or {}
        states: dict[str, str] = {}
        failures: dict[str, int] = {}
        for row in peers.get("members") or []:
            if row.get("self") or row.get("url") == "unknown":
                continue
            states[str(row.get("url"))] = str(row.get("state"))
            for reason, n in (row.get("failures") or {}).items():
                failures[str(reason)] = failures.get(str(reason), 0) + int(n)
        return cls(
            node=node,
            origin_bytes=int(counters.get("origin_bytes", 0)),
            pulled_for_peers_bytes=int(peers.get("pulled_for_peers_bytes", 0)),
            peer_bytes=int(counters.get("peer_bytes", 0)),
            peer_bytes_served=int(counters.get("peer_bytes_served", 0)),
            peer_states=states,
            failures=failures,
        )

    @property
    def peers_up(self) -> int:
        return sum(1 for s in self.peer_states.values() if s == "up")

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "origin_bytes": self.origin_bytes,
            "pulled_for_peers_bytes": self.pulled_for_peers_bytes,
            "peer_bytes": self.peer_bytes,
            "peer_bytes_served": self.peer_bytes_served,
            "peer_states": self.peer_states,
            "failures": self.failures,
        }


def cluster_check(
    *,
    origin_bytes: int,
    model_bytes: int,
    manifest_bytes: int,
    ensures: int,
    nodes: int,
    per_node_origin_bytes: int | None,
) -> tuple[bool, str]:
    """Whether the origin sent a cluster of peers the model about once; the line that says so.

    ``ensures`` manifest reads come on top (every ``ensure`` of a ref without
    ``@REV`` reads it). ``per_node_origin_bytes`` is what the same storm cost
    without peers (the ``weightcache`` scenario), shown beside it when it ran.
    """
    allowed = CLUSTER_ORIGIN_LIMIT * model_bytes + ensures * manifest_bytes
    ratio = origin_bytes / model_bytes
    ok = 0 < origin_bytes <= allowed
    text = (
        f"origin bytes with peers = {ratio:.3f} x the model (limit {CLUSTER_ORIGIN_LIMIT:.2f} x "
        f"+ {ensures} manifest reads; K = {nodes} nodes"
    )
    if per_node_origin_bytes is not None:
        text += f", one daemon per node without peers: {per_node_origin_bytes / model_bytes:.3f} x"
    text += f"): {'ok: one pull per cluster' if ok else 'FAIL'}"
    return ok, text


def traffic_table(traffic: Sequence[NodeTraffic], size: Any) -> list[str]:
    """The per-node markdown table: origin, from peers, to peers; ``size`` formats bytes."""
    head = [
        "node",
        "from the origin",
        "of it asked by peers",
        "from peers (down)",
        "to peers (up)",
        "peers up",
        "failed transfers",
    ]
    rows = [head]
    for t in traffic:
        failed = ", ".join(f"{k} {v}" for k, v in sorted(t.failures.items())) or "0"
        rows.append(
            [
                str(t.node),
                size(t.origin_bytes),
                size(t.pulled_for_peers_bytes),
                size(t.peer_bytes),
                size(t.peer_bytes_served),
                f"{t.peers_up}/{len(t.peer_states)}",
                failed,
            ]
        )
    rows.append(
        [
            "all",
            size(sum(t.origin_bytes for t in traffic)),
            size(sum(t.pulled_for_peers_bytes for t in traffic)),
            size(sum(t.peer_bytes for t in traffic)),
            size(sum(t.peer_bytes_served for t in traffic)),
            "",
            "",
        ]
    )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    out = []
    for n, row in enumerate(rows):
        out.append(
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            + " |"
        )
        if n == 0:
            out.append(
                "| "
                + " | ".join(("-" * (w - 1) + ":") if i else "-" * w for i, w in enumerate(widths))
                + " |"
            )
    return out
