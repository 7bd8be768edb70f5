"""Serving chunks to peers, verified, including chunks of blobs still being pulled.

A committed blob is served whole or by any Range by the API (it was verified
as a whole when it was committed). For a blob not committed here, a peer asks
for a Range inside one chunk and names the revision (``ref=<location>@<rev>``)
so this node can find the chunk's digest in the manifest; then, in order:

1. the chunk is on its way from the origin into this node's part file (this
   node's own pull, or another peer's request): wait for it, up to
   ``peers.wait_s``;
2. it is on its way from another peer: answer ``peer_busy`` at once, so that
   two nodes whose views of the cluster differ never wait on each other;
3. it is in the part file: check its BLAKE3 (the chunk log is only a hint),
   then serve it; a chunk there that does not hash right is treated as absent;
4. it is nowhere: pull it from the origin (only the origin: a chunk pulled for
   a peer never asks another peer) into the part file, then serve it. The
   bytes stay as a verified chunk for this node's own pull later.

Nothing is served that did not hash to its manifest digest just before it was
sent. Step 4 is waited for until ``peers.wait_s`` too; past it the asker hears
``peer_busy`` and the pull goes on, for the next asker.
The check streams the chunk through the hasher and the answer streams it
again from an open descriptor (the page cache has it), so an owner asked by
many peers at once holds a descriptor per request, never a chunk in memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import suppress
from dataclasses import dataclass

from weightcache.errors import (
    NotFound,
    PeerBusy,
    RequestInvalid,
    ShuttingDown,
    WeightcacheError,
)
from weightcache.fetch import chunk_id
from weightcache.hashing import digest_range, is_digest
from weightcache.manifest import FileEntry
from weightcache.node import Node
from weightcache.origin import join_key
from weightcache.scheduler import Priority
from weightcache.store import disk_errors

log = logging.getLogger(__name__)

#: attempts at the steps above before a request is answered busy
_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class ChunkFile:
    """Verified bytes to send: ``length`` bytes at ``offset`` of an open descriptor
    (the committed blob or the part file; the caller closes it)."""

    fd: int
    offset: int
    length: int
    #: the blob's size (for Content-Range)
    total: int


async def serve_range(
    node: Node, digest: str, first: int, last: int | None, ref_text: str, wait_s: float
) -> ChunkFile:
    """Bytes ``first..last`` (inclusive; None: to the chunk's end) of blob ``digest``,
    inside one chunk, verified (see the module docstring)."""
    entry = await _entry(node, digest, ref_text)
    index = first // entry.chunk_size if entry.chunk_size else 0
    if not 0 <= first < entry.size or index >= len(entry.chunks):
        raise RequestInvalid(
            f"range start {first} is outside blob {digest[:16]} ({entry.size} bytes)",
            digest=digest,
        )
    offset, length = entry.chunk_range(index)
    end = offset + length - 1 if last is None else last
    if end < first or end > offset + length - 1:
        raise RequestInvalid(
            f"a blob not committed on this node is served one chunk at a time: bytes "
            f"{first}-{end} cross chunk {index} (bytes {offset}-{offset + length - 1})",
            digest=digest,
        )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    for _ in range(_ROUNDS):
        if await node.hop(node.store.has_blob, digest, entry.size):
            try:
                fd = await node.hop(os.open, node.store.blob_path(digest), os.O_RDONLY)
            except FileNotFoundError:
                continue  # evicted meanwhile: look again
            return ChunkFile(fd, first, end - first + 1, entry.size)
        writer = node.writers.get(digest)
        flight = writer.flights.get(chunk_id(entry, index)) if writer is not None else None
        if flight is not None:
            if flight.source not in ("", "origin"):
                raise PeerBusy(
                    f"chunk {index} of blob {digest[:16]} is coming to this node from "
                    f"another peer ({flight.source}); ask the next",
                    digest=digest,
                    chunk=index,
                )
            try:
                await asyncio.wait_for(asyncio.shield(flight.done), deadline - loop.time())
            except TimeoutError:
                raise PeerBusy(
                    f"chunk {index} of blob {digest[:16]} did not arrive from the origin "
                    f"within {wait_s:g} s",
                    digest=digest,
                    chunk=index,
                ) from None
            continue
        # Hashing a chunk is transfer work: the transfer threads, not the metadata ones.
        part = await asyncio.get_running_loop().run_in_executor(
            node.transfers, _verified_chunk, node, entry, index
        )
        if part is not None:
            return ChunkFile(part, first, end - first + 1, entry.size)
        await _pull_for_peer(node, entry, index, ref_text, deadline)
    raise PeerBusy(f"chunk {index} of blob {digest[:16]} is not ready here", digest=digest)


async def _entry(node: Node, digest: str, ref_text: str) -> FileEntry:
    if not ref_text:
        raise NotFound(f"no blob {digest} on this node", digest=digest)
    ref = node.parse(ref_text)
    if not ref.rev or not is_digest(ref.rev):
        raise RequestInvalid(
            "ref must name the revision in full (location@<64 hex digits>)", ref=ref_text[:200]
        )
    res = await node.resolve(ref)
    for entry in res.manifest.files:
        if entry.blake3 == digest:
            return entry
    raise NotFound(f"revision {ref.rev[:16]} has no blob {digest}", digest=digest)


async def _pull_for_peer(
    node: Node, entry: FileEntry, index: int, ref_text: str, deadline: float
) -> None:
    """Bring chunk ``index`` from the origin into this node's part file, waiting for
    it until ``deadline`` (loop time); past it the asker hears ``peer_busy`` while
    the pull goes on, so the chunk is here for the next asker."""
    task = asyncio.ensure_future(_bring(node, entry, index, ref_text))
    node.peer_tasks.add(task)
    task.add_done_callback(_settled)
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        await asyncio.wait_for(asyncio.shield(task), max(0.0, remaining))
    except TimeoutError:
        raise PeerBusy(
            f"chunk {index} of blob {entry.blake3[:16]} is still on its way from the origin",
            digest=entry.blake3,
            chunk=index,
        ) from None


def _settled(task: asyncio.Task[None]) -> None:
    # Nobody may be waiting any more (the asker timed out): the outcome is logged here.
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.info("peers.pull_for_peer_failed error=%s", exc)


async def _bring(node: Node, entry: FileEntry, index: int, ref_text: str) -> None:
    digest = entry.blake3
    try:
        writer = await node.hold_writer(digest, entry.size, wait=False)
        if writer is None:
            if await node.hop(node.store.has_blob, digest, entry.size):
                return
            raise PeerBusy(
                f"another process on this node is pulling blob {digest[:16]}", digest=digest
            )
        try:
            if writer.flights.get(chunk_id(entry, index)) is not None:
                return  # someone started it meanwhile: the caller waits for it
            if await node.hop(node.store.has_blob, digest, entry.size):
                return
            length = entry.chunk_range(index)[1]
            free = await node.hop(node.store.free_bytes)
            if free - length < node.cfg.cache.reserve_bytes:
                raise PeerBusy(
                    f"no room to pull chunk {index} of blob {digest[:16]} for a peer: "
                    f"{free} bytes free, cache.reserve_bytes is {node.cfg.cache.reserve_bytes}",
                    digest=digest,
                )
            ref = node.parse(ref_text)
            origin, prefix = await node.origin(ref)
            fetcher = node.fetcher_for_peers(Priority.WORKER)
            log.info("peers.pull_for_peer blob=%s chunk=%d", digest[:16], index)
            await fetcher.fetch_chunk(
                origin,
                join_key(prefix, entry.path),
                entry,
                index,
                node.peer_pull_stats,
                writer.flights,
            )
        finally:
            await node.let_go_writer(digest, entry.size)
    except (ShuttingDown, asyncio.CancelledError):
        raise
    except PeerBusy:
        raise
    except WeightcacheError as exc:
        # The origin's trouble, not this peer's: the asker moves on without
        # counting it against this node.
        raise PeerBusy(
            f"chunk {index} of blob {digest[:16]} could not be pulled for the peer: {exc.message}",
            digest=digest,
            cause=exc.code,
        ) from exc


def _verified_chunk(node: Node, entry: FileEntry, index: int) -> int | None:
    """An open descriptor of the part file if the chunk in it hashes right (worker thread)."""
    offset, length = entry.chunk_range(index)
    part = node.store.partial_paths(entry.blake3).part
    try:
        fd = os.open(part, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        with disk_errors(part, "re-hashing a chunk for a peer in"):
            good = digest_range(fd, offset, length) == entry.chunks[index]
    except BaseException:
        os.close(fd)
        raise
    if good:
        # Served is used: the sweep of idle partial downloads goes by this time.
        with suppress(OSError):
            os.utime(fd)
        return fd
    os.close(fd)
    return None
