"""Peers without a network: rendezvous ownership, the peer set, self-recognition, DNS."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.clocks import ManualClock
from tests.support.daemon import free_port
from tests.support.published import cache_config
from weightcache.config import FetchConfig, PeersConfig, load_config
from weightcache.errors import ConfigInvalid
from weightcache.fetch import ChunkFlights, Fetcher, FetchStats
from weightcache.hashing import digest_stream
from weightcache.manifest import FileEntry
from weightcache.node import Node
from weightcache.origin.file import FileOrigin
from weightcache.peers.members import Members, normalize
from weightcache.peers.rendezvous import chunk_key, owner, pull_order, rank, top
from weightcache.peers.setup import check_peers
from weightcache.store import BlobLock, Store

DIGEST = "ab" * 32


def _owners(peers: list[str], chunks: int = 4000) -> list[str]:
    return [owner(chunk_key(DIGEST, i), peers) for i in range(chunks)]


def test_rendezvous_spreads_chunks_evenly_and_every_node_agrees() -> None:
    peers = [f"http://10.0.0.{i}:7878" for i in range(8)]
    owners = _owners(peers)
    counts = Counter(owners)
    assert set(counts) == set(peers)
    # 4000 chunks over 8 peers: 500 each on average, none far off.
    assert all(380 <= n <= 620 for n in counts.values()), counts
    # The order of the list does not matter: every node computes the same owners.
    assert _owners(list(reversed(peers))) == owners
    assert rank(chunk_key(DIGEST, 7), peers)[0] == owners[7]


@pytest.mark.parametrize("k", [4, 10, 50])
def test_a_peer_joining_or_leaving_moves_only_about_one_kth_of_the_chunks(k: int) -> None:
    peers = [f"http://10.1.{i // 250}.{i % 250}:7878" for i in range(k)]
    before = _owners(peers)
    joined = _owners([*peers, "http://10.9.9.9:7878"])
    moved = [i for i, (a, b) in enumerate(zip(before, joined, strict=True)) if a != b]
    # Only chunks the newcomer now owns moved, about 1/(k+1) of them.
    assert all(joined[i] == "http://10.9.9.9:7878" for i in moved)
    assert abs(len(moved) / len(before) - 1 / (k + 1)) < 0.5 / (k + 1) + 0.01
    gone = peers[0]
    left = _owners(peers[1:])
    moved = [i for i, (a, b) in enumerate(zip(before, left, strict=True)) if a != b]
    # Only the leaver's chunks moved, each to the next peer in its ranking.
    assert all(before[i] == gone for i in moved)
    assert len(moved) == before.count(gone)
    for i in moved:
        assert left[i] == rank(chunk_key(DIGEST, i), peers)[1]


def test_the_nodes_own_url_in_the_list_is_recognised_by_its_listen_port() -> None:
    port = free_port()
    urls = (f"http://127.0.0.1:{port}", "http://127.0.0.1:1", "http://198.51.100.10:7878")
    for listen in (f"127.0.0.1:{port}", f"0.0.0.0:{port}"):
        members = Members(PeersConfig(urls=urls), listen=listen, clock=ManualClock())
        assert members.self_urls == [f"http://127.0.0.1:{port}"]
        assert sorted(members.peers()) == ["http://127.0.0.1:1", "http://198.51.100.10:7878"]
    # The same port on an address that is not this machine's is another node.
    members = Members(
        PeersConfig(urls=("http://198.51.100.10:7878",)), listen="0.0.0.0:7878", clock=ManualClock()
    )
    assert members.self_urls == []


def test_candidates_stop_at_the_node_itself_and_skip_peers_down_or_avoided() -> None:
    port = free_port()
    me = f"http://127.0.0.1:{port}"
    others = [f"http://198.51.100.{i}:7878" for i in range(1, 6)]
    clock = ManualClock()
    members = Members(
        PeersConfig(urls=(me, *others), down_s=10, avoid_s=100),
        listen=f"127.0.0.1:{port}",
        clock=clock,
    )
    everyone = [me, *others]
    for i in range(200):
        ranking = rank(chunk_key(DIGEST, i), everyone)
        assert members.candidates(ranking) == ranking[: ranking.index(me)]
    # A chunk whose owner is another peer: once that peer fails it is skipped ...
    i = next(i for i in range(200) if rank(chunk_key(DIGEST, i), everyone)[0] != me)
    first = rank(chunk_key(DIGEST, i), everyone)[0]
    members.report_failure(first, "unavailable", "refused", skip=True)
    assert first not in members.candidates(rank(chunk_key(DIGEST, i), everyone))
    clock.now += 11  # ... until down_s has passed
    assert members.candidates(rank(chunk_key(DIGEST, i), everyone))[0] == first
    members.report_corrupt(first, "chunk 3 hashed wrong")
    clock.now += 99
    assert first not in members.candidates(rank(chunk_key(DIGEST, i), everyone))
    assert (
        members.status()["members"][[r["url"] for r in members.status()["members"]].index(first)][
            "state"
        ]
        == "avoided"
    )
    clock.now += 2
    assert members.candidates(rank(chunk_key(DIGEST, i), everyone))[0] == first
    # A busy answer counts, but does not skip the peer.
    members.report_failure(first, "busy", "in flight elsewhere", skip=False)
    assert members.candidates(rank(chunk_key(DIGEST, i), everyone))[0] == first


def test_a_url_that_answers_with_the_nodes_own_id_is_learned_as_itself() -> None:
    members = Members(
        PeersConfig(urls=("http://198.51.100.1:7878", "http://198.51.100.2:7878")),
        listen="0.0.0.0:7878",
        clock=ManualClock(),
    )
    assert members.self_urls == []
    members.learn_self("http://198.51.100.2:7878")
    assert members.self_urls == ["http://198.51.100.2:7878"]
    assert members.peers() == ["http://198.51.100.1:7878"]


def test_dns_refresh_follows_the_set_and_keeps_it_when_a_lookup_fails() -> None:
    answers: list[list[str] | OSError] = [
        ["10.0.0.2", "10.0.0.1"],
        ["10.0.0.1", "10.0.0.2", "10.0.0.3"],
        socket.gaierror(-2, "Name or service not known"),
        ["10.0.0.3", "fd00::5"],
    ]
    asked: list[tuple[str, int]] = []

    def resolver(name: str, port: int) -> list[str]:
        asked.append((name, port))
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    members = Members(
        PeersConfig(dns="weightcache-peers.weightcache.svc", port=7878),
        listen="0.0.0.0:7878",
        clock=ManualClock(),
        resolver=resolver,
    )
    assert members.refresh()
    assert members.names == ["http://10.0.0.1:7878", "http://10.0.0.2:7878"]
    assert members.refresh()
    assert len(members.names) == 3
    assert not members.refresh()  # the lookup failed: the last set stays
    assert len(members.names) == 3 and "Name or service not known" in members.refresh_error
    assert members.refresh()
    assert members.names == ["http://10.0.0.3:7878", "http://[fd00::5]:7878"]
    assert asked == [("weightcache-peers.weightcache.svc", 7878)] * 4


def test_peer_urls_are_normalised_so_every_node_names_a_peer_alike() -> None:
    assert normalize("HTTP://Node-1.Example:7878/") == "http://node-1.example:7878"
    assert normalize("http://[FD00::1]:80") == "http://[fd00::1]:80"


def test_peers_config_from_the_environment_and_its_problems() -> None:
    cfg = load_config(env={"WEIGHTCACHE_PEERS_URLS": "http://10.0.0.1:7878, http://10.0.0.2:7878,"})
    assert cfg.peers.urls == ("http://10.0.0.1:7878", "http://10.0.0.2:7878")
    assert cfg.peers.enabled
    with pytest.raises(ConfigInvalid) as err:
        load_config(
            env={
                "WEIGHTCACHE_PEERS_URLS": "10.0.0.1:7878,http://x:1/path",
                "WEIGHTCACHE_PEERS_WAIT_S": "0",
                "WEIGHTCACHE_PEERS_CONCURRENCY": "0",
            }
        )
    text = str(err.value)
    assert "peers.urls: each must be http(s)://HOST:PORT, got '10.0.0.1:7878'" in text
    assert "'http://x:1/path'" in text
    assert "peers.wait_s: must be > 0" in text and "peers.concurrency" in text


def test_peers_need_the_token_and_a_listener() -> None:
    cfg = load_config(env={"WEIGHTCACHE_PEERS_DNS": "peers.local"})
    with pytest.raises(ConfigInvalid) as err:
        check_peers(cfg)
    assert "WEIGHTCACHE_TOKEN" in str(err.value) and "daemon.listen" in str(err.value)
    ok = load_config(
        env={
            "WEIGHTCACHE_PEERS_DNS": "peers.local",
            "WEIGHTCACHE_TOKEN": "t" * 32,
            "WEIGHTCACHE_DAEMON_LISTEN": "0.0.0.0:7878",
        }
    )
    check_peers(ok)
    check_peers(load_config(env={}))  # no peers: nothing to check


async def test_idle_partial_downloads_are_swept_unless_someone_writes_them(tmp_path: Path) -> None:
    node = Node(cache_config(tmp_path))
    try:
        store = node.store
        idle, fresh, locked = ("1" * 64, "2" * 64, "3" * 64)
        size = 8 << 20
        for digest in (idle, fresh, locked):
            # As a peer's pull leaves it: sparse, one chunk written and recorded.
            store.open_part(digest, size, preallocate=False)
            with open(store.partial_paths(digest).part, "r+b") as fh:
                fh.write(b"x" * (1 << 20))
            store.record_chunk(digest, 0)
        assert store.partial_paths(idle).part.stat().st_blocks * 512 < 2 << 20  # sparse
        day_ago = time.time() - 86400
        for digest in (idle, locked):
            for path in (store.partial_paths(digest).part, store.partial_paths(digest).chunks):
                os.utime(path, (day_ago, day_ago))
        holder = BlobLock(store.partial_paths(locked).lock)  # another process pulling it
        assert holder.try_acquire()
        try:
            freed = await node.sweep_partials(3600, time.time())
        finally:
            holder.release()
        assert freed >= 1 << 20
        assert not store.partial_paths(idle).part.exists()
        assert not store.partial_paths(idle).chunks.exists()
        assert store.read_chunk_log(fresh) == {0}
        assert store.partial_paths(locked).part.exists()
    finally:
        await node.aclose()


def test_top_is_the_head_of_the_ranking() -> None:
    peers = [f"http://10.2.0.{i}:7878" for i in range(30)]
    for i in range(50):
        key = chunk_key(DIGEST, i)
        assert top(key, peers, 4) == rank(key, peers)[:4]


def test_each_node_asks_by_when_the_owner_will_have_the_chunk_in_an_order_of_its_own() -> None:
    peers = [f"http://10.3.0.{i}:7878" for i in range(4)]
    owners = _owners(peers, chunks=400)
    per_owner = 8
    orders = []
    for seed in range(3):
        rng = random.Random(seed)
        orders.append(pull_order(owners, per_owner, [rng.random() for _ in owners]))
    for order in orders:
        assert sorted(order) == list(range(400))
        # An owner's n-th chunk is asked for in its (n // per_owner)-th round, never
        # ahead of chunks some owner will have a round earlier.
        rounds = []
        for i in order:
            place = [j for j in range(400) if owners[j] == owners[i]].index(i)
            rounds.append(place // per_owner)
        assert all(a <= b for a, b in itertools.pairwise(rounds))
    # The first requests of three nodes are spread over every owner, not the same chunks.
    assert len({owners[i] for i in orders[0][:16]}) == len(peers)
    assert orders[0][:16] != orders[1][:16] != orders[2][:16]


class _CountingOrigin:
    """A file origin that records every range asked of it."""

    def __init__(self, root: Path) -> None:
        self.inner = FileOrigin(root)
        self.name = self.inner.name
        self.requests: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    @contextmanager
    def open_range(self, key: str, offset: int, length: int) -> Iterator[Iterator[bytes]]:
        with self._lock:
            self.requests.append((offset, length))
        with self.inner.open_range(key, offset, length) as pieces:
            yield pieces


async def test_a_chunk_pulled_for_a_peer_during_the_blobs_own_pull_is_not_pulled_again(
    tmp_path: Path,
) -> None:
    chunk, data = 4096, random.Random(7).randbytes(3 * 4096)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "w.bin").write_bytes(data)
    d = digest_stream([data], chunk)
    entry = FileEntry("w.bin", d.size, d.blake3, chunk, d.chunks)
    store = Store(tmp_path / "c")
    store.ensure_layout()
    origin = _CountingOrigin(tmp_path / "o")
    flights = ChunkFlights()
    with ThreadPoolExecutor(4) as pool:
        fetcher = Fetcher(store=store, policy=FetchConfig(concurrency=3), executor=pool)
        loop = asyncio.get_running_loop()
        peer_done = asyncio.Event()
        resume_state = fetcher._resume_state

        def late_resume(e: FileEntry) -> tuple[set[int], dict[int, int]]:
            # The own pull looks at the disk while chunk 0 is missing, then a peer's
            # request brings chunk 0 before the own pull gets to it.
            state = resume_state(e)
            asyncio.run_coroutine_threadsafe(peer_done.wait(), loop).result()
            return state

        fetcher._resume_state = late_resume  # type: ignore[method-assign]

        async def peer() -> None:
            await asyncio.sleep(0.05)
            await fetcher.fetch_chunk(origin, "w.bin", entry, 0, FetchStats(), flights)
            peer_done.set()

        await asyncio.gather(
            fetcher.fetch(origin, "w.bin", entry, FetchStats(), None, flights), peer()
        )
    assert sorted(origin.requests) == [(0, 4096), (4096, 4096), (8192, 4096)]
    assert store.blob_path(d.blake3).read_bytes() == data


async def test_chunk_flights_are_per_byte_range_and_digest_and_stop_at_the_commit() -> None:
    flights = ChunkFlights()
    fetched: list[tuple[int, int, str]] = []

    def fetch_of(chunk: tuple[int, int, str], fail: bool = False) -> Any:
        async def fetch(flight: Any) -> None:
            await asyncio.sleep(0.01)
            if fail:
                raise OSError("the first fetch fails")
            fetched.append(chunk)

        return fetch

    a = (0, 4096, "a" * 64)
    assert await flights.run(a, fetch_of(a))
    assert not await flights.run(a, fetch_of(a))  # brought already
    # The same bytes cut another way by another manifest are another chunk.
    other = (0, 2048, "b" * 64)
    assert await flights.run(other, fetch_of(other))
    # Two at once: one fetches, the other waits for it; after a failure the waiter fetches.
    c = (4096, 4096, "c" * 64)
    first = asyncio.ensure_future(flights.run(c, fetch_of(c, fail=True)))
    second = asyncio.ensure_future(flights.run(c, fetch_of(c)))
    with pytest.raises(OSError):
        await first
    assert await second
    assert fetched == [a, other, c]
    flights.closed = True  # the blob's pull is committing: nothing more is written
    assert not await flights.run((8192, 10, "d" * 64), fetch_of(c))
    flights.forget([a])  # a later check found it bad
    assert await flights.run(a, fetch_of(a))
    assert fetched == [a, other, c, a]
