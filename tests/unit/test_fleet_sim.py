"""The fleet simulation, tiny: what each strategy costs the origin, and peers' byte accounting.

Runs ``loadtest/fleet_sim.py`` as a program (tests never import ``loadtest``)
on 4 and 8 nodes and a 1 GiB model in 64 MiB chunks (16 chunks), and asserts
on its ``--json`` output: the origin sends the model once for peers, N times
per node, N x M times naive; every byte a peer uploads is a byte another node
downloads from a peer; an owner uploads each chunk it owns to the N - 1 others;
every node ends with the whole model, once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKERS = 8
PEERS = ("peers-in-order", "peers", "peers+relay")


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "loadtest.fleet_sim", "--nodes", "4,8"),
            *("--model-gb", "1", "--chunk-mib", "64", "--workers", str(WORKERS), "--json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["fleet"]["model_bytes"] == 1 << 30
    result: list[dict[str, Any]] = doc["rows"]
    assert {(r["strategy"], r["nodes"]) for r in result} == {
        (s, n) for s in ("naive", "per-node", *PEERS) for n in (4, 8)
    }
    return result


def test_origin_bytes_per_strategy(rows: list[dict[str, Any]]) -> None:
    times = {"naive": WORKERS, "per-node": 1}  # x nodes; peers: the model once in all
    for r in rows:
        assert r["model_bytes"] == 1 << 30 and r["chunks"] == 16
        copies = times[r["strategy"]] * r["nodes"] if r["strategy"] in times else 1
        expected = copies * r["model_bytes"]
        assert r["origin_bytes"] == expected, (r["strategy"], r["nodes"])


def test_peers_bytes_are_conserved(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        up, down, owned = r["upload_bytes"], r["peer_download_bytes"], r["owned_bytes"]
        n, model = r["nodes"], r["model_bytes"]
        assert len(up) == len(down) == len(owned) == n
        assert sum(up) == sum(down)
        if r["strategy"] not in PEERS:
            assert sum(up) == 0
            continue
        assert sum(owned) == model
        # every node holds the model once: what it owns from the origin, the rest from peers
        assert [d + o for d, o in zip(down, owned, strict=True)] == [model] * n
        assert sum(up) == (n - 1) * model
        if r["strategy"] != "peers+relay":  # only the owner serves a chunk: N - 1 times
            assert up == [o * (n - 1) for o in owned]
            assert max(up) / model == pytest.approx(r["owned_chunks_max"] * 64 * (n - 1) / 1024)


def test_ready_times_respect_the_bound(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        assert 0 < r["ready_p50_s"] <= r["ready_p99_s"] <= r["ready_max_s"]
        assert r["ready_max_s"] >= r["bound_s"] * (1 - 1e-9)
