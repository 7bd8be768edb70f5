"""A worker process for multi-process tests: load a ref, print one JSON line.

    python -m tests.support.worker REF [--wait-file PATH] [--tensors GLOB]

With ``--wait-file``, the worker imports everything first and then waits until
the file exists, so that many workers start their load at the same moment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import weightcache
from tests.support.models import tensors_digest
from weightcache.errors import WeightcacheError


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("ref")
    parser.add_argument("--wait-file")
    parser.add_argument("--tensors")
    args = parser.parse_args()
    if args.wait_file:
        deadline = time.monotonic() + 60
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


if __name__ == "__main__":
    raise SystemExit(main())
