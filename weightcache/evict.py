"""Eviction: which revisions to drop, as a pure function over what the cache holds.

A snapshot is the unit of eviction (a snapshot without one of its blobs would
break the invariant that a visible snapshot is complete). Victims go least
recently used first; a revision that is leased, or being pulled, is never one.
A blob goes only when no remaining snapshot, lease or pull needs it, so a file
shared by two models survives the eviction of one of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Revision:
    rev: str
    accessed: float
    blobs: frozenset[str]


@dataclass(frozen=True, slots=True)
class Plan:
    revisions: tuple[str, ...]
    blobs: tuple[str, ...]
    freed_bytes: int
    #: bytes asked for that no allowed eviction can free
    shortfall: int


def bytes_to_free(
    *, used: int, incoming: int, budget: int, free: int, reserve: int, allocate: int | None = None
) -> int:
    """How much must go so that ``incoming`` more bytes respect the budget and the reserve.

    ``budget`` 0 means no budget. ``free`` is the file system's free space now.
    ``allocate`` is the new disk space the incoming bytes still take (less than
    ``incoming`` when part files already hold their share); it defaults to all of it.
    """
    over_budget = used + incoming - budget if budget else 0
    under_reserve = reserve + (incoming if allocate is None else allocate) - free
    return max(0, over_budget, under_reserve)


def plan(
    revisions: Iterable[Revision],
    blob_sizes: dict[str, int],
    *,
    need: int,
    protected_revisions: set[str],
    protected_blobs: set[str],
) -> Plan:
    """Choose revisions to evict, oldest first, until ``need`` bytes of blobs are freed.

    Blobs on disk that no revision references (left by a failed or evicted pull)
    are freed first: nobody can be using them through a snapshot.
    """
    revs = sorted(revisions, key=lambda r: (r.accessed, r.rev))
    keep = {r.rev for r in revs}
    referenced: dict[str, int] = {}
    for r in revs:
        for b in r.blobs:
            referenced[b] = referenced.get(b, 0) + 1
    untouchable = set(protected_blobs)
    for r in revs:
        if r.rev in protected_revisions:
            untouchable |= r.blobs

    chosen_blobs: list[str] = []
    freed = 0
    for digest in sorted(blob_sizes):
        if freed >= need:
            break
        if digest not in referenced and digest not in untouchable:
            chosen_blobs.append(digest)
            freed += blob_sizes[digest]

    chosen_revs: list[str] = []
    for r in revs:
        if freed >= need:
            break
        if r.rev in protected_revisions:
            continue
        chosen_revs.append(r.rev)
        keep.discard(r.rev)
        for b in r.blobs:
            referenced[b] -= 1
            if referenced[b] == 0 and b not in untouchable and b in blob_sizes:
                chosen_blobs.append(b)
                freed += blob_sizes[b]
    return Plan(tuple(chosen_revs), tuple(chosen_blobs), freed, max(0, need - freed))
