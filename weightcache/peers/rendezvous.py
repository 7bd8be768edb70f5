"""Rendezvous (highest-random-weight) hashing: which peer owns a chunk.

Every node computes, for each chunk key (``<blob blake3>:<chunk index>``), a
weight per peer from a hash of the pair and ranks the peers by it. The first
in the ranking is the chunk's owner: it pulls the chunk from the origin and the
others ask it; the rest of the ranking is the order in which the chunk moves
when the owner is down or misbehaving. No coordination is needed: every node
with the same peer set computes the same ranking, and when a peer joins or
leaves only the chunks it owns (about 1/K of them) change owner, since the
other peers' weights for a chunk do not depend on who else is in the set.

A peer is named by a stable string (its base URL as the peer list writes it);
the weight is the first 8 bytes of BLAKE3 over ``name NUL key``, which spreads
uniformly whatever the names look like (sequential IPs, ports).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from blake3 import blake3


def chunk_key(digest: str, index: int) -> str:
    """The rendezvous key of chunk ``index`` of blob ``digest``."""
    return f"{digest}:{index}"


def weight(peer: str, key: str) -> int:
    """The peer's weight for ``key``: a uniform 64-bit integer, the same on every node."""
    return int.from_bytes(blake3(f"{peer}\0{key}".encode()).digest(8), "big")


def rank(key: str, peers: Iterable[str]) -> list[str]:
    """``peers`` from the owner of ``key`` down (ties, which need equal 64-bit weights,
    fall back to the name so that every node agrees)."""
    return sorted(peers, key=lambda p: (weight(p, key), p), reverse=True)


def owner(key: str, peers: Sequence[str]) -> str:
    """The first of :func:`rank` without sorting the rest."""
    if not peers:
        raise ValueError("no peers to choose an owner from")
    return max(peers, key=lambda p: (weight(p, key), p))


def top(key: str, peers: Iterable[str], n: int) -> list[str]:
    """The first ``n`` of :func:`rank` (one weight per peer, no full sort)."""
    return heapq.nlargest(n, peers, key=lambda p: (weight(p, key), p))


def pull_order(owners: Sequence[str], per_owner: int, draw: Sequence[float]) -> list[int]:
    """The order in which a node should ask for a blob's chunks, given each chunk's owner.

    Each owner pulls its own chunks ``per_owner`` at a time in manifest order, so a
    chunk is ready at its owner around its place there // ``per_owner``; asking in
    that order, ties broken by ``draw`` (a random number per chunk, different on
    every node), spreads the cluster's requests over every owner at once instead
    of queueing the whole cluster at the owners of the first chunks.
    """
    seen: dict[str, int] = {}
    ready: list[int] = []
    for name in owners:
        ready.append(seen.get(name, 0) // max(1, per_owner))
        seen[name] = seen.get(name, 0) + 1
    return sorted(range(len(owners)), key=lambda i: (ready[i] + draw[i], i))
