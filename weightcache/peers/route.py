"""What a pull needs to take chunks from peers: who to ask, how, and with which slots."""

from __future__ import annotations

import random
from concurrent.futures import Executor
from dataclasses import dataclass

from weightcache.peers.members import Members
from weightcache.peers.rendezvous import chunk_key, pull_order, top
from weightcache.peers.transport import PeerClient, PeerOrigin
from weightcache.scheduler import PrioritySlots

#: owners asked per chunk at most (then the origin): the owner and its successors
RANKED = 4


@dataclass(frozen=True)
class BlobPlan:
    #: per chunk, the first RANKED peers of its rendezvous ranking (this node included)
    rankings: list[list[str]]
    #: the chunk indices in the order this node asks for them
    order: list[int]


@dataclass
class PeerRoute:
    members: Members
    client: PeerClient
    #: the revision being pulled, as ``location@revision``: a peer that does not hold
    #: a chunk yet pulls it from the origin with it
    ref: str
    #: transfers from peers at once. Not the origin slots: a node whose every origin
    #: slot waited on a peer that itself waits on this node's origin chunks would
    #: stall the cluster until ``peers.wait_s``.
    slots: PrioritySlots
    #: the threads peer transfers run in (never the origin transfers' threads)
    executor: Executor

    def plan(self, digest: str, chunks: int, per_owner: int, rng: random.Random) -> BlobPlan:
        """Each chunk's first owners and the order to ask for them (blocking: one
        weight per peer and chunk, so run it in a worker thread)."""
        names = self.members.names
        rankings = [top(chunk_key(digest, i), names, RANKED) for i in range(chunks)]
        owners = [r[0] if r else "" for r in rankings]
        order = pull_order(owners, per_owner, [rng.random() for _ in range(chunks)])
        return BlobPlan(rankings, order)

    def candidates(self, plan: BlobPlan, index: int) -> list[str]:
        return self.members.candidates(plan.rankings[index])

    def origin(self, url: str) -> PeerOrigin:
        return self.client.origin(url, self.ref)
