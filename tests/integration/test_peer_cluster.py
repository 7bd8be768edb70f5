"""Peers: three real daemons against the real SeaweedFS pull a model about once.

Each daemon has its own cache, socket and TCP listener on a free loopback port;
all share one token and one peer list that names all three (each recognises
itself). What the origin sent comes from SeaweedFS's own byte counter.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support import worker
from tests.support.daemon import Daemon, call, free_port
from tests.support.faultproxy import FaultProxy
from tests.support.models import reference, tensors_digest, write_model
from weightcache.config import load_config
from weightcache.hashing import digest_file
from weightcache.manifest import MANIFEST_NAME
from weightcache.publish import publish
from weightcache.refs import parse_ref

TOKEN = "peers-test-token-0123456789"
CHUNK = 1 << 20


def _publish(s3: Any, tmp_path: Path, name: str, big: int) -> tuple[str, int, int, str]:
    """(ref, model bytes, manifest bytes, digest of the tensors)."""
    files = write_model(tmp_path / name, shards=3, big=big)
    ref = f"s3://{s3.bucket}/{name}"
    env = {**os.environ, "WEIGHTCACHE_PUBLISH_CHUNK_BYTES": str(CHUNK)}
    publish(tmp_path / name, parse_ref(ref), load_config(env=env))
    model = sum(p.stat().st_size for p in (tmp_path / name).iterdir())
    manifest = int(s3.minio.stat_object(s3.bucket, f"{name}/{MANIFEST_NAME}").size)
    return ref, model, manifest, tensors_digest(reference(files))


class Node:
    def __init__(self, tmp_path: Path, name: str, port: int, peers: list[str], **env: str) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        self.sock = tmp_path / "run" / f"{name}.sock"
        self.daemon = Daemon(
            tmp_path / f"cache-{name}",
            self.sock,
            {
                **os.environ,
                "WEIGHTCACHE_TOKEN": TOKEN,
                "WEIGHTCACHE_DAEMON_LISTEN": f"127.0.0.1:{port}",
                "WEIGHTCACHE_PEERS_URLS": ",".join(peers),
                "WEIGHTCACHE_PEERS_TIMEOUT_S": "3",
                "WEIGHTCACHE_PEERS_CONNECT_TIMEOUT_S": "1",
                "WEIGHTCACHE_PEERS_WAIT_S": "20",
                **env,
            },
        )

    def status(self) -> dict[str, Any]:
        code, doc = call(self.sock, "GET", "/v1/status")
        assert code == 200, doc
        return dict(doc)

    def peer(self, url: str) -> dict[str, Any]:
        rows = [r for r in self.status()["peers"]["members"] if r["url"] == url]
        assert rows, self.status()["peers"]
        return dict(rows[0])


@contextmanager
def cluster(tmp_path: Path, n: int = 3, **env: str) -> Iterator[list[Node]]:
    ports = [free_port() for _ in range(n)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    nodes = [Node(tmp_path, f"n{i}", p, urls, **env) for i, p in enumerate(ports)]
    with ExitStack() as stack:
        for node in nodes:
            stack.enter_context(node.daemon)
        yield nodes


@contextmanager
def behind_proxy(tmp_path: Path, fault: str, **rule: Any) -> Iterator[tuple[Node, str, FaultProxy]]:
    """Nodes a, b and c, where a and b reach c only through a fault proxy that breaks
    every blob response with ``fault``; yields (a, b's URL, the proxy)."""
    ports = [free_port() for _ in range(3)]
    ua, ub, uc = (f"http://127.0.0.1:{p}" for p in ports)
    with FaultProxy(uc) as proxy, ExitStack() as stack:
        proxy.add_rule("/v1/blobs/", fault, **rule)
        a = Node(tmp_path, "a", ports[0], [ua, ub, proxy.url])
        b = Node(tmp_path, "b", ports[1], [ua, ub, proxy.url])
        c = Node(tmp_path, "c", ports[2], [ua, ub, uc])
        for n in (a, b, c):
            stack.enter_context(n.daemon)
        yield a, ub, proxy


def _blobs_intact(cache: Path) -> list[str]:
    """Blobs under ``blobs/`` whose content does not hash to their name."""
    return [p.name for p in (cache / "blobs").iterdir() if digest_file(p) != p.name]


@pytest.mark.slow
def test_three_nodes_cold_at_once_pull_the_model_from_the_origin_once(
    s3: Any, tmp_path: Path
) -> None:
    ref, model, manifest, want = _publish(s3, tmp_path, "m", big=12 * CHUNK)
    with cluster(tmp_path) as nodes:
        for node in nodes:
            selves = node.status()["peers"]["self"]
            assert selves == [node.url], selves
        procs = []
        barrier = tmp_path / "go"
        for node in nodes:
            procs.append(
                worker.start(ref, 3, barrier.with_name(f"go-{node.name}"), node.daemon.env)
            )
        before = s3.sent_bytes()
        for node in nodes:
            barrier.with_name(f"go-{node.name}").touch()
        results = [worker.collect(p, timeout_s=300) for p in procs]
        sent = s3.sent_bytes() - before

        assert {r["digest"] for rs in results for r in rs} == {want}
        # Each chunk once from the origin (plus the manifest, read by each node).
        assert sent <= 1.10 * model + 3 * 4 * manifest, (sent, model)
        statuses = [node.status() for node in nodes]
        origin = [s["counters"]["origin_bytes"] for s in statuses]
        from_peers = [s["counters"]["peer_bytes"] for s in statuses]
        served = [s["counters"]["peer_bytes_served"] for s in statuses]
        # The daemons' counters agree with the origin's, and with each other.
        assert sum(origin) <= sent <= sum(origin) + 3 * 4 * manifest, (origin, sent)
        assert sum(from_peers) == sum(served), (from_peers, served)
        print(f"origin sent {sent / model:.3f}x the model; origin={origin} peers={from_peers}")
        # The origin's work was shared (which node owns how much is the hash's draw).
        assert sum(1 for o in origin if o > 0) >= 2, origin
        for s, node in zip(statuses, nodes, strict=True):
            # Every node got the whole model, from the origin and from peers.
            assert s["counters"]["origin_bytes"] + s["counters"]["peer_bytes"] >= model
            assert s["counters"]["peer_bytes"] > 0
            for row in s["peers"]["members"]:
                if row["self"] or row["url"] == "unknown":
                    continue
                other = next(n for n in nodes if n.url == row["url"])
                # What this node says it got from `other`, `other` says it sent here.
                assert row["bytes_in"] == other.peer(node.url)["bytes_out"], (node.url, row)
                assert row["state"] == "up"
            assert _blobs_intact(node.daemon.cache) == []
        # The operator's view: `weightcache status` lists the peers and their traffic.
        shown = subprocess.run(
            [sys.executable, "-m", "weightcache", "status"],
            env=nodes[0].daemon.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        assert f"this node {nodes[0].url}" in shown, shown
        for other in nodes[1:]:
            assert re.search(rf"^  up +{re.escape(other.url)}  in \S+ \S+, out ", shown, re.M), (
                shown
            )
        sources = {
            r["report"]["source"] for rs in results for r in rs if r["report"]["origin_bytes"]
        }
        assert sources <= {"origin+peer"}, sources


def _wait(what: str, check: Any, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_a_node_killed_halfway_costs_a_bounded_extra_and_resumes_after_restart(
    s3: Any, tmp_path: Path
) -> None:
    ref, model, manifest, want = _publish(s3, tmp_path, "k", big=16 * CHUNK)
    # Slow enough pulls (the node-wide byte rate counts peer bytes too) to kill one midway.
    with cluster(tmp_path, WEIGHTCACHE_FETCH_MAX_BYTES_PER_S="3MiB") as nodes:
        a, b, c = nodes
        barrier = tmp_path / "go"
        procs = [
            worker.start(ref, 2, barrier.with_name(f"go-{n.name}"), n.daemon.env) for n in (a, b)
        ]
        before = s3.sent_bytes()
        code, doc = call(c.sock, "POST", "/v1/prefetch", {"ref": ref})
        assert code in (200, 202), doc
        for n in (a, b):
            barrier.with_name(f"go-{n.name}").touch()

        def halfway() -> bool:
            # c still pulling, and a halfway: a still needs chunks that c owns.
            pulls = [n.status()["pulls"] for n in (a, c)]
            return all(pulls) and pulls[0][0]["done_bytes"] >= model // 2

        _wait("the cluster halfway", halfway)
        assert c.daemon.proc is not None
        os.kill(c.daemon.proc.pid, signal.SIGKILL)
        c.daemon.proc.wait()

        results = [r for p in procs for r in worker.collect(p, timeout_s=300)]
        assert {r["digest"] for r in results} == {want}
        # The others lost c midway and moved its chunks on.
        assert any(n.peer(c.url)["failures"] for n in (a, b)), [n.peer(c.url) for n in (a, b)]

        c.daemon.start()
        code, doc = call(c.sock, "POST", "/v1/ensure", {"ref": ref})
        assert code == 200, doc
        sent = s3.sent_bytes() - before
        assert sent <= 1.6 * model + 3 * 6 * manifest, (sent / model, sent, model)
        log = c.daemon.log.read_text()
        assert "fetch.resumed" in log or "pull.resumed" in log, log[-3000:]
        for n in nodes:
            assert _blobs_intact(n.daemon.cache) == []
        print(f"kill -9 halfway: origin sent {sent / model:.3f}x the model")


@pytest.mark.slow
def test_a_peer_that_flips_bytes_is_avoided_and_nothing_it_sent_is_kept(
    s3: Any, tmp_path: Path
) -> None:
    ref, _, _, _ = _publish(s3, tmp_path, "f", big=12 * CHUNK)
    # a and b reach c only through the proxy, which flips a byte of every blob body.
    with behind_proxy(tmp_path, "flip", offset=0) as (a, ub, proxy):
        code, doc = call(a.sock, "POST", "/v1/ensure", {"ref": ref})
        assert code == 200, doc
        assert doc["source"] == "origin+peer", doc["source"]

        bad = a.peer(proxy.url)
        assert bad["state"] == "avoided", bad
        assert bad["failures"].get("corrupt", 0) >= 1, bad
        # Nothing the flipping peer sent was kept: no chunk of it counted as received.
        assert bad["bytes_in"] == 0 and bad["chunks_in"] == 0, bad
        flipped = [r for r in proxy.log if "/v1/blobs/" in r.path and r.bytes_sent > 0]
        assert flipped, "the flipping peer was never asked"
        assert _blobs_intact(a.daemon.cache) == []
        # Every file of the snapshot is what the manifest says.
        for f in doc["files"]:
            assert digest_file(f["local_path"]) == f["blake3"], f["path"]
        assert a.peer(ub)["state"] == "up"


@pytest.mark.slow
def test_a_peer_that_stalls_midway_costs_a_bounded_delay_and_its_bytes_are_verified(
    s3: Any, tmp_path: Path
) -> None:
    ref, model, _, _ = _publish(s3, tmp_path, "s", big=12 * CHUNK)
    # c, seen through the proxy, sends 1 KiB of a chunk and then nothing for a minute.
    with behind_proxy(tmp_path, "stall", after_bytes=1024, seconds=60) as (a, _, proxy):
        started = time.monotonic()
        code, doc = call(a.sock, "POST", "/v1/ensure", {"ref": ref})
        took = time.monotonic() - started
        assert code == 200, doc
        stalled = a.peer(proxy.url)
        assert stalled["failures"].get("unavailable", 0) >= 1, stalled
        assert stalled["state"] == "down", stalled
        # One stall (peers.timeout_s = 3 s here), then the peer is skipped: seconds,
        # not the minute the stall lasts.
        assert took < 30, took
        for f in doc["files"]:
            assert digest_file(f["local_path"]) == f["blake3"], f["path"]
        assert _blobs_intact(a.daemon.cache) == []
        print(f"stalled peer: ensure took {took:.1f} s for {model} bytes")


def _get(url: str, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_peer_routes_refuse_without_the_token_and_serve_only_by_hash(
    s3: Any, tmp_path: Path
) -> None:
    ref, _, _, _ = _publish(s3, tmp_path, "auth", big=2 * CHUNK)
    with cluster(tmp_path, n=2) as (a, b):
        code, doc = call(a.sock, "POST", "/v1/ensure", {"ref": ref})
        assert code == 200, doc
        f = max(doc["files"], key=lambda f: f["size"])
        digest, rev = f["blake3"], doc["revision"]
        pinned = f"{ref}@{rev}"
        good = {"Authorization": f"Bearer {TOKEN}", "Range": f"bytes=0-{CHUNK - 1}"}
        url = f"{b.url}/v1/blobs/{digest}?ref={urllib.parse.quote(pinned, safe='')}"
        served_before = b.status()["counters"]["peer_bytes_served"]

        for headers in ({"Range": "bytes=0-99"}, {**good, "Authorization": "Bearer wrong"}):
            status, body, _ = _get(url, headers)
            assert status == 401, (status, body)
            assert json.loads(body)["error"]["code"] == "unauthorized"
        for path in ("/v1/blobs/notahash", "/v1/blobs/..%2f..%2fetc%2fpasswd", "/etc/passwd"):
            status, body, _ = _get(f"{b.url}{path}", good)
            assert status in (400, 404), (path, status)
            assert b"root:" not in body
        # Without the revision a node that does not hold the blob has nothing to say.
        status, body, _ = _get(f"{b.url}/v1/blobs/{digest}", good)
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
        assert b.status()["counters"]["peer_bytes_served"] == served_before

        # The same request with the token: b does not hold it, pulls the chunk for
        # the cluster, and serves it verified (so the refusals above are real).
        status, body, headers = _get(url, good)
        assert status == 206, body[:300]
        assert headers["Content-Range"] == f"bytes 0-{CHUNK - 1}/{f['size']}"
        with open(f["local_path"], "rb") as fh:
            assert body == fh.read(CHUNK)
        assert b.status()["counters"]["peer_bytes_served"] == served_before + CHUNK


def test_a_daemon_with_peers_and_no_token_refuses_to_start(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "WEIGHTCACHE_PEERS_URLS": "http://127.0.0.1:1,http://127.0.0.1:2",
        "WEIGHTCACHE_DAEMON_LISTEN": "127.0.0.1:0",
    }
    daemon = Daemon(tmp_path / "cache", tmp_path / "run" / "d.sock", env)
    with pytest.raises(AssertionError, match="WEIGHTCACHE_TOKEN"):
        daemon.start(timeout_s=20)


@pytest.mark.slow
def test_prefetches_started_node_after_node_still_pull_the_model_from_the_origin_once(
    s3: Any, tmp_path: Path
) -> None:
    # A rollout rarely starts every node at once: here each node's prefetch starts
    # 1.5 s after the previous one, while the earlier ones are still pulling (the
    # byte rate keeps each pull a few seconds long).
    ref, model, manifest, _ = _publish(s3, tmp_path, "p", big=10 * CHUNK)
    with cluster(tmp_path, WEIGHTCACHE_FETCH_MAX_BYTES_PER_S="3MiB") as nodes:
        before = s3.sent_bytes()
        for i, node in enumerate(nodes):
            if i:
                time.sleep(1.5)
            code, doc = call(node.sock, "POST", "/v1/prefetch", {"ref": ref})
            assert code in (200, 202), doc
        for node in nodes:
            code, doc = call(node.sock, "POST", "/v1/ensure", {"ref": ref})
            assert code == 200, doc
            for f in doc["files"]:
                assert digest_file(f["local_path"]) == f["blake3"], (node.name, f["path"])
        sent = s3.sent_bytes() - before
        assert sent <= 1.10 * model + 3 * 4 * manifest, (sent / model, sent, model)
        # The nodes took from each other what they did not own: about 2/3 of the model
        # each (which share a node owns is the hash's draw).
        assert sum(n.status()["counters"]["peer_bytes"] for n in nodes) > model
        print(f"staggered prefetch: origin sent {sent / model:.3f}x the model")
