"""What a pull needs to take chunks from peers: who to ask, how, and with which slots."""

from __future__ import annotations

from dataclasses import dataclass

from weightcache.peers.members import Members
from weightcache.peers.transport import PeerClient, PeerOrigin
from weightcache.scheduler import PrioritySlots


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

    def candidates(self, digest: str, index: int) -> list[str]:
        return self.members.candidates(digest, index)

    def origin(self, url: str) -> PeerOrigin:
        return self.client.origin(url, self.ref)
