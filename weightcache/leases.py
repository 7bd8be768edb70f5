"""Leases: a revision stays on disk while a client uses its files.

A lease belongs to an owner: a local process (its pid, read with
``SO_PEERCRED``), or a TCP peer (its address). It ends when it is released,
when it expires (``daemon.lease_ttl_s``), when its pid no longer runs, or, for
a lease *bound to its connection*, when the connection that asked for it
closes. The last is what works across pod boundaries: in Kubernetes the
daemon cannot see a worker's pid (``SO_PEERCRED`` gives 0 across sibling pid
namespaces), but the kernel always tells it when the worker's socket closes,
``kill -9`` included.

The table lives on the event loop; what crosses into a worker thread is an
immutable snapshot (:meth:`LeaseTable.revisions`). Persisting is the
caller's business (records are plain dicts): the table only decides.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from weightcache.errors import NotFound, TooManyLeases

__all__ = ["Lease", "LeaseTable", "pid_alive"]

#: a probe that says whether the connection a lease is bound to is still open
Connection = Callable[[], bool]


@dataclass
class Lease:
    id: str
    revision: str
    pid: int | None
    created: float
    expires: float
    #: who holds it when there is no pid (a TCP peer's address)
    client: str | None = None
    #: ensures of the same owner that share the lease; it ends when the last releases
    holders: int = 1
    #: ends when the connection that asked for it closes (not persisted: a
    #: restarted daemon has no connections, so such a lease lives on its TTL)
    bound: bool = False
    connections: list[Connection] = field(default_factory=list, repr=False, compare=False)

    @property
    def owner(self) -> str | None:
        return f"pid:{self.pid}" if self.pid is not None else self.client

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        del doc["connections"]
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Lease:
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        known.pop("connections", None)
        return cls(**known)

    def connection_closed(self) -> bool:
        """True when every connection it is bound to has closed."""
        if not self.bound:
            return False
        self.connections[:] = [c for c in self.connections if c()]
        return not self.connections


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user
    return True


@dataclass
class LeaseTable:
    ttl_s: float
    max_per_client: int
    alive: Callable[[int], bool] = pid_alive
    leases: dict[str, Lease] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.leases)

    def grant(
        self,
        revision: str,
        now: float,
        *,
        pid: int | None,
        client: str | None,
        connection: Connection | None = None,
    ) -> Lease:
        """A lease for ``revision``: the owner's existing one renewed (one more holder),
        or a new one. Synchronous, so that nothing can cancel it half-way."""
        owner = f"pid:{pid}" if pid is not None else client
        lease: Lease | None = None
        if owner is not None:
            lease = next(
                (x for x in self.leases.values() if x.owner == owner and x.revision == revision),
                None,
            )
            held = sum(1 for x in self.leases.values() if x.owner == owner)
            if lease is None and held >= self.max_per_client:
                raise TooManyLeases(
                    f"{owner} holds {held} leases (daemon.max_leases_per_client)",
                    hint="release leases with POST /v1/leases/{id}/release",
                )
        if lease is None:
            lease = Lease(secrets.token_hex(12), revision, pid, now, now + self.ttl_s, client)
            lease.holders = 0
            self.leases[lease.id] = lease
        lease.expires = now + self.ttl_s  # a renewal, not a new lease
        lease.holders += 1
        if connection is not None:
            # Bound only if every holder is: a lease one holder asked to keep
            # beyond its connection must not end with another's.
            lease.bound = lease.holders == 1 or lease.bound
            lease.connections.append(connection)
        else:
            lease.bound = False
        return lease

    def release(self, lease_id: str) -> Lease | None:
        """One holder lets go. Returns the lease if it ended, None if others still hold it."""
        lease = self.leases.get(lease_id)
        if lease is None:
            raise NotFound(f"no lease {lease_id!r}", lease=lease_id)
        lease.holders -= 1
        if lease.holders > 0:
            return None
        del self.leases[lease_id]
        return lease

    def drop(self, lease_id: str) -> Lease | None:
        return self.leases.pop(lease_id, None)

    def reap(self, now: float) -> list[Lease]:
        """End expired leases, those of dead pids and those whose connections closed."""
        gone = [
            lease
            for lease in self.leases.values()
            if lease.expires <= now
            or (lease.pid is not None and not self.alive(lease.pid))
            or lease.connection_closed()
        ]
        for lease in gone:
            del self.leases[lease.id]
        return gone

    def load(self, records: list[tuple[str, dict[str, Any]]], now: float) -> list[str]:
        """Take persisted leases back; returns the ids that ended meanwhile."""
        stale = []
        for key, rec in records:
            lease = Lease.from_json(rec)
            lease.bound = False  # its connection did not survive the restart
            if lease.expires > now and (lease.pid is None or self.alive(lease.pid)):
                self.leases[key] = lease
            else:
                stale.append(key)
        return stale

    def revisions(self) -> frozenset[str]:
        """The leased revisions: a snapshot for a worker thread."""
        return frozenset(lease.revision for lease in self.leases.values())

    def of(self, revision: str) -> list[Lease]:
        return [x for x in self.leases.values() if x.revision == revision]

    def count(self, revision: str) -> int:
        return sum(1 for x in self.leases.values() if x.revision == revision)
