"""The ``weightcache`` command (also ``python -m weightcache``).

Errors print one line, ``weightcache: <code>: <message>``, plus a hint line
where an operator can act, and exit with status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from weightcache.config import Config, load_config
from weightcache.errors import ConfigInvalid, WeightcacheError

log = logging.getLogger("weightcache.cli")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _config(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {}
    if getattr(args, "cache_dir", None):
        overrides["cache.dir"] = str(args.cache_dir)
    return load_config(args.config, overrides=overrides)


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=desc,
        file=sys.stderr,
        disable=None,  # only on a terminal
        leave=True,
    )


# -- commands --------------------------------------------------------------


def cmd_publish(args: argparse.Namespace) -> int:
    from weightcache.publish import publish
    from weightcache.refs import parse_ref

    cfg = _config(args)
    ref = parse_ref(args.ref, default_bucket=cfg.s3.default_bucket)
    directory = Path(args.dir)
    started = time.monotonic()
    result = publish(directory, ref, cfg, on_file=lambda rel, n: log.info("uploaded %s", rel))
    seconds = time.monotonic() - started
    print(f"published {result.ref}")
    print(
        f"  {len(result.manifest.files)} files, {_human(result.manifest.total_bytes)} "
        f"in {seconds:.1f} s"
    )
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from weightcache.publish import index
    from weightcache.refs import parse_ref

    cfg = _config(args)
    ref = parse_ref(args.ref, default_bucket=cfg.s3.default_bucket)
    result = index(ref, cfg)
    print(f"indexed {result.ref}")
    print(f"  {len(result.manifest.files)} files, {_human(result.manifest.total_bytes)}")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    import asyncio

    from weightcache.node import Node, Progress

    cfg = _config(args)
    bar: Any = None

    def on_progress(p: Progress) -> None:
        nonlocal bar
        if bar is None:
            bar = _progress_bar(p.total_bytes, "fetch")
        bar.update(p.done_bytes - bar.n)

    async def main() -> Any:
        node = Node(cfg)
        try:
            return await node.ensure(args.ref, on_progress)
        finally:
            await node.aclose()

    try:
        result = asyncio.run(main())
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    state = "already cached" if result.cache_hit else "fetched"
    print(f"{state} {result.ref}")
    print(f"  snapshot {result.snapshot}")
    print(
        f"  {len(result.files)} files, {_human(result.total_bytes)}; from origin "
        f"{_human(result.origin_bytes)}, reused {_human(result.reused_bytes)}, "
        f"resumed {_human(result.resumed_bytes)}, retries {result.retries}, "
        f"{result.seconds:.2f} s"
    )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from weightcache.index import Index
    from weightcache.store import Store

    cfg = _config(args)
    store = Store(cfg.cache.dir)
    store.ensure_layout()
    index = Index(store.index_dir)
    try:
        latest = {rev: key for key, rev in store.iter_refs()}
        rows: list[dict[str, Any]] = []
        for rev in store.snapshot_revisions():
            manifest = store.load_manifest(rev)
            rec = index.snapshot(rev)
            rows.append(
                {
                    "revision": rev,
                    "location": rec["location"] if rec else "",
                    "latest": rev in latest,
                    "files": len(manifest.files) if manifest else 0,
                    "bytes": manifest.total_bytes if manifest else 0,
                    "accessed": rec["accessed"] if rec else None,
                }
            )
        blob_bytes = store.blob_bytes()
    finally:
        index.close()
    if args.json:
        print(
            json.dumps(
                {"cache_dir": str(cfg.cache.dir), "blob_bytes": blob_bytes, "models": rows},
                indent=2,
            )
        )
        return 0
    print(f"cache {cfg.cache.dir}: {len(rows)} revisions, {_human(blob_bytes)} in blobs")
    for r in rows:
        when = (
            time.strftime("%Y-%m-%d %H:%M", time.localtime(r["accessed"])) if r["accessed"] else "-"
        )
        mark = "*" if r["latest"] else " "
        print(
            f"{mark} {r['revision'][:16]}  {_human(r['bytes']):>10}  {r['files']:>4} files  "
            f"used {when}  {r['location']}"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    import asyncio

    from weightcache.index import Index
    from weightcache.store import Store
    from weightcache.verify import verify

    cfg = _config(args)
    store = Store(cfg.cache.dir)
    store.ensure_layout()
    index = Index(store.index_dir)
    refetch: list[str] = []
    try:
        locations = {rev: rec["location"] for rev, rec in index.snapshots()}
        report = verify(store, index, repair=args.repair)
        if args.repair:
            refetch = [
                f"{locations[rev]}@{rev}" for rev in report.broken_snapshots if locations.get(rev)
            ]
    finally:
        index.close()
    refetched: list[str] = []
    failed: list[str] = []
    if refetch:
        from weightcache.node import Node

        async def pull_again() -> None:
            node = Node(cfg)
            try:
                for ref in refetch:
                    try:
                        await node.ensure(ref)
                        refetched.append(ref)
                    except WeightcacheError as exc:
                        failed.append(f"{ref}: {exc.code}: {exc}")
            finally:
                await node.aclose()

        asyncio.run(pull_again())

    if args.json:
        doc = dict(vars(report))
        doc.update(
            clean=report.clean, problems=report.problems, refetched=refetched, refetch_failed=failed
        )
        print(json.dumps(doc, indent=2))
    else:
        print(
            f"checked {report.blobs_checked} blobs ({_human(report.bytes_checked)}), "
            f"{len(store.snapshot_revisions())} snapshots"
        )
        for digest in report.corrupt_blobs:
            print(f"  corrupt blob {digest}")
        for digest in report.writable_blobs:
            print(f"  writable blob {digest}")
        for rev in report.bad_manifests:
            print(f"  corrupt manifest {rev}")
        for rev, why in report.broken_snapshots.items():
            print(f"  broken snapshot {rev}: {why}")
        if report.index_without_file or report.file_without_index:
            print(
                f"  index: {len(report.index_without_file)} entries without a file, "
                f"{len(report.file_without_index)} files without an entry"
            )
        if report.partial_downloads:
            print(f"  {len(report.partial_downloads)} partial downloads (resumable)")
        for line in report.repaired:
            print(f"  repaired: {line}")
        for ref in refetched:
            print(f"  pulled again: {ref}")
        for line in failed:
            print(f"  could not pull again: {line}")
        print("no problems found" if report.clean else f"{report.problems} problem(s) found")
    if report.clean:
        return 0
    return 0 if args.repair and not failed else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from weightcache.demo import run_demo

    status: int = run_demo(size_mb=args.size_mb, workers=args.workers)
    return status


# -- entry point -------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightcache", description="Node-local, verified model-weight cache."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="TOML config file (default: $WEIGHTCACHE_CONFIG)")
    common.add_argument("--cache-dir", help="cache directory (default: $WEIGHTCACHE_CACHE_DIR)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "publish", parents=[common], help="upload a local model directory and its manifest"
    )
    p.add_argument("dir")
    p.add_argument("ref")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser(
        "index", parents=[common], help="write a manifest for objects already uploaded"
    )
    p.add_argument("ref")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("fetch", parents=[common], help="pull a model into the node cache")
    p.add_argument("ref")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("ls", parents=[common], help="what the cache holds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("verify", parents=[common], help="re-hash the cache and reconcile the index")
    p.add_argument(
        "--repair", action="store_true", help="quarantine corrupt blobs and pull them again"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "demo", help="what `make demo` runs: local S3, publish, load from two processes"
    )
    p.add_argument("--size-mb", type=int, default=384, help="synthetic model size (default 384)")
    p.add_argument(
        "--workers", type=int, default=2, help="concurrent loading processes (default 2)"
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (
        logging.WARNING
        if args.verbose == 0
        else logging.INFO
        if args.verbose == 1
        else logging.DEBUG
    )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        return int(args.func(args))
    except ConfigInvalid as exc:
        print(f"weightcache: {exc.code}:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except WeightcacheError as exc:
        print(f"weightcache: {exc.code}: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("weightcache: interrupted", file=sys.stderr)
        return 130
