"""Peers: the daemons of a cluster share chunks so the origin sends each about once.

:mod:`~weightcache.peers.rendezvous` names each chunk's owner;
:mod:`~weightcache.peers.members` knows the peers (a list or a DNS name), which
of them is this node, and how each has behaved; :mod:`~weightcache.peers.transport`
asks a peer for a chunk as an :class:`~weightcache.origin.base.Origin` does, so
the fetcher streams, hashes, writes and resumes a peer's bytes exactly like the
origin's.
"""
