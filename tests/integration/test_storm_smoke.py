"""loadtest/storm.py end to end, tiny: 2 nodes x 2 workers, an 8 MiB model, every scenario."""

from __future__ import annotations

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
