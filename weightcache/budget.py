"""The cache's byte budget and free-space reserve: admit a pull, evict to make room.

Decisions are the pure functions of :mod:`weightcache.evict`; this module
measures what they need (blobs on disk, free space, what other pulls will still
commit, what is protected) and carries the chosen plan out. The daemon's
service and embedded mode both use it, so a node without a daemon evicts to
its budget too.

Every method blocks (file system, SQLite): call it in a worker thread, handing
it a :class:`Protection` built on the event loop, never the loop's own sets.
Eviction runs under the exclusive cache lock (:mod:`weightcache.locks`) and
protects, besides what the caller names, every revision any process on the
node uses now and every unexpired lease and pin (a recurring prefetch holding
its model until its peak + hold, :mod:`weightcache.schedules`) in the index.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from weightcache.aio import Clock
from weightcache.config import Config
from weightcache.errors import CacheFull, ModelLeased, WeightcacheError
from weightcache.evict import Plan, Revision, bytes_to_free, plan
from weightcache.index import Index
from weightcache.locks import RevisionUses
from weightcache.manifest import Manifest
from weightcache.store import Store

log = logging.getLogger(__name__)

__all__ = ["Budget", "Protection", "enforce", "make_room"]

#: parsed manifests kept in memory (immutable: a revision is the hash of its manifest)
MANIFEST_MEMO = 4096


@dataclass(frozen=True, slots=True)
class Protection:
    """What the caller's own state protects from eviction (a snapshot of it)."""

    revisions: frozenset[str] = frozenset()
    blobs: frozenset[str] = frozenset()
    #: revisions pinned until a schedule's peak + hold: protected like ``revisions``,
    #: but never waited for (a pin is not released by a pull or a load finishing)
    pinned: frozenset[str] = frozenset()


@dataclass
class Budget:
    cfg: Config
    store: Store
    index: Index
    uses: RevisionUses
    #: the time leases and pins expire by (the daemon's own wall clock)
    wall: Callable[[], float] = field(default=time.time, repr=False)
    _memo: dict[str, Manifest] = field(default_factory=dict, repr=False)
    _memo_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # -- reading -------------------------------------------------------------------

    def manifest(self, rev: str) -> Manifest | None:
        """A cached manifest, or None if missing or corrupt (one bad file must not take
        status, metrics and eviction down with it). Parsed once per process: a
        scrape or an eviction pass does not re-read and re-hash every manifest."""
        with self._memo_lock:
            known = self._memo.get(rev)
        if known is not None:
            return known
        try:
            manifest = self.store.load_manifest(rev)
        except WeightcacheError as exc:
            log.error("cache.corrupt_manifest revision=%s error=%s", rev[:16], exc)
            return None
        if manifest is not None:
            with self._memo_lock:
                if len(self._memo) >= MANIFEST_MEMO:
                    self._memo.pop(next(iter(self._memo)))
                self._memo[rev] = manifest
        return manifest

    def revisions(self) -> list[Revision]:
        out = []
        for rev in self.store.snapshot_revisions():
            manifest = self.manifest(rev)
            if manifest is None:
                continue  # not evictable by plan: `verify --repair` deals with it
            rec = self.index.snapshot(rev)
            accessed = rec["accessed"] if rec else 0.0
            out.append(Revision(rev, accessed, frozenset(f.blake3 for f in manifest.files)))
        return out

    def _pending(self, revs: frozenset[str] | set[str]) -> tuple[int, frozenset[str]]:
        """Bytes the pulls of ``revs`` will still commit, and every blob they need."""
        pending: dict[str, int] = {}
        needed: set[str] = set()
        for rev in revs:
            manifest = self.manifest(rev)
            for f in manifest.files if manifest else ():
                needed.add(f.blake3)
                if f.blake3 not in pending and not self.store.has_blob(f.blake3, f.size):
                    pending[f.blake3] = f.size
        return sum(pending.values()), frozenset(needed)

    def _leased(self) -> frozenset[str]:
        """Revisions with an unexpired lease in the index (any daemon's, seen from
        embedded mode as well)."""
        return self._unexpired("lease")

    def _pinned(self) -> frozenset[str]:
        """Revisions pinned by a schedule until its peak + hold (any daemon's, seen from
        embedded mode as well)."""
        return self._unexpired("pin")

    def _unexpired(self, kind: str) -> frozenset[str]:
        now = self.wall()
        return frozenset(
            str(rec["revision"])
            for _, rec in self.index.items(kind)
            if float(rec.get("expires", 0)) > now
        )

    # -- admission -----------------------------------------------------------------

    def shortfall(self, ref: object, rev: str, manifest: Manifest) -> CacheFull | None:
        """The CacheFull a pull of ``rev`` would hit now, or None if it fits.

        Counts the bytes other pulls on the node (any process) will still
        commit, so that concurrent pulls cannot each fit alone and overflow
        together.
        """
        allocate = 0  # new disk space: a preallocated part file already holds its share
        incoming = 0  # what the budget will count once the blobs are committed
        for f in {f.blake3: f for f in manifest.files}.values():
            if self.store.has_blob(f.blake3, f.size):
                continue
            try:
                allocated = self.store.partial_paths(f.blake3).part.stat().st_blocks * 512
            except FileNotFoundError:
                allocated = 0
            allocate += max(0, f.size - allocated)
            incoming += f.size
        if not incoming:
            return None
        budget = self.cfg.cache.max_bytes
        reserve = self.cfg.cache.reserve_bytes
        used = 0
        if budget:
            # Other pulls' bytes first, then the committed ones: a blob committed in
            # between is counted twice (safe), never missed.
            used += self._pending(self.uses.busy() - {rev})[0]
            used += self.store.blob_bytes()
        free = self.store.free_bytes()
        need = bytes_to_free(
            used=used,
            incoming=incoming,
            budget=budget,
            free=free,
            reserve=reserve,
            allocate=allocate,
        )
        if not need:
            return None
        if allocate + reserve > free:
            return CacheFull(
                f"pulling {ref} needs {allocate} bytes and {reserve} must stay free, but only "
                f"{free} are available on the cache's file system ({self.store.root})",
                hint="free disk space, evict models (`weightcache evict REF`), "
                "or lower cache.reserve_bytes",
                needed_bytes=allocate,
                available_bytes=free,
                reserve_bytes=reserve,
                shortfall_bytes=need,
            )
        return CacheFull(
            f"pulling {ref} needs {incoming} bytes; the cache holds {used} of its "
            f"{budget}-byte budget",
            hint="evict models (`weightcache evict REF`) or raise cache.max_bytes",
            needed_bytes=incoming,
            used_bytes=used,
            budget_bytes=budget,
            shortfall_bytes=need,
        )

    def over_budget(self) -> int:
        """Bytes to free now to be back under the budget and above the reserve."""
        budget = self.cfg.cache.max_bytes
        return bytes_to_free(
            used=self.store.blob_bytes() if budget else 0,
            incoming=0,
            budget=budget,
            free=self.store.free_bytes(),
            reserve=self.cfg.cache.reserve_bytes,
        )

    # -- eviction --------------------------------------------------------------------

    def evict(self, need: int, protection: Protection, reason: str, *, partial: bool) -> Plan:
        """Free ``need`` bytes, least recently used first, under the exclusive cache lock.

        With ``partial`` false an eviction that cannot free all of ``need`` frees
        nothing (the pull asking for room fails with cache_full anyway).
        """
        with self.uses.cache_lock.exclusive():
            busy = self.uses.busy(prune=True)
            _, busy_blobs = self._pending(busy)
            chosen = plan(
                self.revisions(),
                dict(self.store.iter_blobs()),
                need=need,
                protected_revisions=set(
                    protection.revisions
                    | protection.pinned
                    | busy
                    | self._leased()
                    | self._pinned()
                ),
                protected_blobs=set(protection.blobs | busy_blobs),
            )
            if chosen.shortfall and not partial:
                return Plan((), (), 0, chosen.shortfall)
            self.apply(chosen, reason)
        return chosen

    def evict_revision(self, rev: str, protection: Protection, *, force: bool = False) -> Plan:
        """Remove one revision and every blob only it used (an admin's evict).

        Refused (``model_leased``) while any process on the node uses the
        revision, and, unless ``force``, while a lease or a pin in the index holds
        it: ``force`` overrides leases and pins, never a use in progress (a pull, a
        hit being leased, a worker inside ``weightcache.snapshot()``).
        """
        with self.uses.cache_lock.exclusive():
            busy = self.uses.busy(prune=True)
            if rev in busy:
                raise ModelLeased(
                    f"revision {rev[:16]} is in use on this node right now (a pull, a load "
                    "being leased, or a worker holding its snapshot)",
                    hint="retry once the load finishes",
                    revision=rev,
                )
            if not force and rev in self._leased():
                raise ModelLeased(
                    f"revision {rev[:16]} is leased",
                    hint="wait for the workers to finish, or pass force to evict anyway",
                    revision=rev,
                )
            if not force and rev in protection.pinned | self._pinned():
                raise ModelLeased(
                    f"revision {rev[:16]} is pinned by a recurring prefetch until its hold ends",
                    hint="remove the schedule (`weightcache jobs --remove ID`), or pass force",
                    revision=rev,
                    pinned=True,
                )
            _, busy_blobs = self._pending(busy)
            revisions = self.revisions()
            needed: set[str] = set(busy_blobs | protection.blobs)
            for r in revisions:
                if r.rev != rev:
                    needed |= r.blobs
            mine = next((r for r in revisions if r.rev == rev), None)
            sizes = dict(self.store.iter_blobs())
            blobs = sorted((mine.blobs if mine else frozenset()) - needed)
            chosen = Plan((rev,), tuple(b for b in blobs if b in sizes), 0, 0)
            freed = self.apply(chosen, "admin")
        return Plan(chosen.revisions, chosen.blobs, freed, 0)

    def apply(self, chosen: Plan, reason: str) -> int:
        """Carry a plan out: every snapshot unpublished (durably) before any blob goes."""
        for rev in chosen.revisions:
            self.store.remove_snapshot(rev)
            self.index.drop_snapshot(rev)
            log.info("evict.revision revision=%s reason=%s", rev[:16], reason)
        freed = 0
        for digest in chosen.blobs:
            path = self.store.blob_path(digest)
            try:
                size = path.stat().st_size
                os.unlink(path)
            except FileNotFoundError:
                continue
            self.index.drop_blob(digest)
            freed += size
        if chosen.revisions or chosen.blobs:
            log.info(
                "evict.done revisions=%d blobs=%d bytes=%d reason=%s",
                len(chosen.revisions),
                len(chosen.blobs),
                freed,
                reason,
            )
        return freed


#: how many times a pull re-checks its room after an eviction (other pulls commit
#: blobs meanwhile) before it gives up with cache_full
ROOM_ATTEMPTS = 8
#: when nothing can be evicted now, because what fills the budget is in use (other
#: pulls in flight, revisions between their hit and their lease), wait this long
#: (doubling) for it to be released before checking again
ROOM_WAIT_S = 0.05

Hop = Callable[..., Awaitable[Any]]


async def make_room(
    budget: Budget,
    hop: Hop,
    ref: object,
    rev: str,
    manifest: Manifest,
    protection: Callable[[], Protection],
    lock: asyncio.Lock,
    clock: Clock,
) -> list[Plan]:
    """Admit a pull of ``rev``: evict until it fits (returning what was evicted), or
    raise the CacheFull it would hit.

    ``protection`` is called on the event loop each time, so a lease granted
    meanwhile is protected by the next eviction. A cache full only of what is in
    use right now is waited for, briefly (about 6 s in all): concurrent pulls end
    and their workers release their leases; a cache that stays full is cache_full.
    """
    done: list[Plan] = []
    for attempt in range(ROOM_ATTEMPTS):
        short: CacheFull | None = await hop(budget.shortfall, ref, rev, manifest)
        if short is None:
            return done
        if attempt == ROOM_ATTEMPTS - 1:
            raise short
        async with lock:
            chosen: Plan = await hop(
                budget.evict,
                int(short.facts["shortfall_bytes"]),
                protection(),
                "make_room",
                partial=False,
            )
        if chosen.revisions or chosen.blobs:
            done.append(chosen)
            continue
        others = protection().revisions | await hop(budget.uses.busy)
        if not others - {rev}:
            raise short  # nothing else holds the room: waiting cannot help
        delay = ROOM_WAIT_S * 2**attempt
        log.info(
            "evict.wait revision=%s shortfall_bytes=%d delay_s=%.2f",
            rev[:16],
            short.facts["shortfall_bytes"],
            delay,
        )
        await clock.sleep(delay)
    raise AssertionError("unreachable")


async def enforce(
    budget: Budget, hop: Hop, protection: Callable[[], Protection], lock: asyncio.Lock
) -> Plan | None:
    """After a pull: back under the budget and above the reserve, as far as allowed."""
    async with lock:
        need: int = await hop(budget.over_budget)
        if not need:
            return None
        chosen: Plan = await hop(budget.evict, need, protection(), "budget", partial=True)
        return chosen
