"""A worker process for multi-process tests: load a ref, print one JSON line.

    python -m tests.support.worker REF [--wait-file PATH] [--ready-dir DIR] [--tensors GLOB]

With ``--wait-file``, the worker imports everything first and then waits until
the file exists, so that many workers start their load at the same moment;
with ``--ready-dir`` it says that it is waiting there (a file named after its
pid). :func:`start` starts such workers and returns once every one waits;
:func:`collect` reads what each loaded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import weightcache
from tests.support.models import tensors_digest
from weightcache.errors import WeightcacheError

ROOT = Path(__file__).resolve().parents[2]
#: how long a worker waits at the barrier once it is there
BARRIER_TIMEOUT_S = 60.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("ref")
    parser.add_argument("--wait-file")
    parser.add_argument("--ready-dir")
    parser.add_argument("--tensors")
    args = parser.parse_args()
    if args.wait_file:
        # What a load imports on first use, imported before the barrier: the loads
        # start together, not staggered by imports.
        importlib.import_module("weightcache.client.loader")

        if args.ready_dir:
            (Path(args.ready_dir) / str(os.getpid())).touch()
        deadline = time.monotonic() + BARRIER_TIMEOUT_S
        while not os.path.exists(args.wait_file):
            if time.monotonic() > deadline:
                print(json.dumps({"error": "barrier timeout"}))
                return 3
            time.sleep(0.005)
    try:
        tensors, report = weightcache.load_with_report(args.ref, "cpu", tensors=args.tensors)
    except WeightcacheError as exc:
        print(json.dumps({"error": exc.code, "message": str(exc)}))
        return 1
    print(
        json.dumps(
            {"report": report.to_json(), "digest": tensors_digest(tensors), "n": len(tensors)}
        )
    )
    sys.stdout.flush()
    return 0


def start(
    ref: str, n: int, barrier: Path, env: Mapping[str, str], *, timeout_s: float = 240
) -> list[subprocess.Popen[str]]:
    """``n`` workers loading ``ref`` once ``barrier`` exists; returns when all wait there.

    ``timeout_s`` bounds their imports (torch: seconds each, many at once on few cores).
    """
    ready = barrier.with_name(f"{barrier.name}.ready")
    ready.mkdir()
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "tests.support.worker", ref),
                *("--wait-file", str(barrier), "--ready-dir", str(ready)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(env),
            cwd=ROOT,
        )
        for _ in range(n)
    ]
    try:
        deadline = time.monotonic() + timeout_s
        while len(os.listdir(ready)) < n:
            for p in procs:
                if p.poll() is not None:
                    _, err = p.communicate()
                    raise AssertionError(f"worker {p.pid} exited {p.returncode}:\n{err[-3000:]}")
            assert time.monotonic() < deadline, f"{len(os.listdir(ready))} of {n} workers ready"
            time.sleep(0.01)
    except BaseException:
        for p in procs:
            p.kill()
            p.communicate()
        raise
    return procs


def collect(procs: list[subprocess.Popen[str]], timeout_s: float = 240) -> list[dict[str, Any]]:
    """Each worker's JSON line; a worker that failed fails the test with its stderr."""
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout_s)
        assert p.returncode == 0, (out[-2000:], err[-3000:])
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


if __name__ == "__main__":
    raise SystemExit(main())
