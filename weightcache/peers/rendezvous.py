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
