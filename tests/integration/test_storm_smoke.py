"""loadtest/storm.py end to end, tiny: an 8 MiB model, every scenario, and the peers scenario.

Run as a program, as an operator would: the tests never import loadtest.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STORM = ROOT / "loadtest" / "storm.py"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_storm_tiny_run_checks_one_pull_per_node(tmp_path: Path) -> None:
    out = tmp_path / "docs"
    out.mkdir()
    # Another section of the file must survive the storm writing its own.
    (out / "benchmarks.md").write_text("# Benchmarks\n\n## Loader throughput\n\nkept\n")
    proc = subprocess.run(
        [
            sys.executable,
            str(STORM),
            *("--nodes", "2", "--workers", "2", "--size-mb", "8"),
            *("--lead-s", "0.5", "--spread-s", "0.5", "--out", str(out)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    ratios = re.findall(
        r"origin bytes naive / weightcache(?:\+prefetch)? = (\d+\.\d+) \(M = 2 workers", text
    )
    assert len(ratios) == 2, text[-4000:]
    assert all(abs(float(r) - 2.0) <= 0.02 for r in ratios), ratios
    assert "FAIL" not in text
    assert re.search(r"^\| weightcache \+ prefetch .*\| +4/4 \|", text, re.M), text[-4000:]

    doc = (out / "benchmarks.md").read_text()
    assert doc.count("<!-- storm:begin -->") == 1 and doc.count("<!-- storm:end -->") == 1
    assert "## Loader throughput\n\nkept" in doc
    assert "| naive (minio + load_file) |" in doc
    png = out / "img" / "storm.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_storm_tiny_peers_run_pulls_the_model_once_per_cluster(tmp_path: Path) -> None:
    summary = tmp_path / "storm.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(STORM),
            *("--nodes", "2", "--workers", "1", "--size-mb", "8"),
            *("--scenarios", "weightcache", "--peers", "--no-write", "--json", str(summary)),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    doc = json.loads(summary.read_text())
    assert doc["ok"] is True, doc["checks"]
    assert doc["parameters"]["scenarios"] == ["weightcache", "peers"]
    per_node, peers = doc["scenarios"]["weightcache"], doc["scenarios"]["peers"]
    # One daemon per node: K = 2 pulls; peers of each other: one pull for the cluster.
    assert abs(per_node["origin_x_model"] - 2.0) <= 0.02, per_node["origin_x_model"]
    assert peers["origin_x_model"] <= 1.10, peers["origin_x_model"]
    nodes = peers["nodes"]
    assert [n["node"] for n in nodes] == [1, 2], nodes
    down = sum(n["peer_bytes"] for n in nodes)
    up = sum(n["peer_bytes_served"] for n in nodes)
    # What one node says it got from a peer, the other says it sent; and some did move.
    assert down == up > 0, nodes
    # Each node got the whole model, from the origin and its peer together.
    assert all(n["origin_bytes"] + n["peer_bytes"] >= doc["model_bytes"] for n in nodes), nodes
    assert all(set(n["peer_states"].values()) == {"up"} for n in nodes), nodes
    # The same verdict, as printed.
    ratio = re.search(r"ok +origin bytes with peers = (\d+\.\d+) x the model", text)
    assert ratio is not None and float(ratio.group(1)) <= 1.10, text[-4000:]
    assert re.search(r"^\| weightcache \+ peers +\| .*\| +1\.0\d \|", text, re.M), text[-4000:]
    assert "FAIL" not in text
