"""Another process on the node: a spawned child that holds revision uses until killed.

What an embedded worker does while it pulls or reads a revision
(:class:`weightcache.locks.RevisionUses`), in a real second process, so that
the test sees the cross-process ``flock`` and what ``kill -9`` does to it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

__all__ = ["uses_held_elsewhere"]


def _hold(locks_dir: str, revisions: list[str], ready: Any) -> None:
    from weightcache.locks import RevisionUses

    uses = RevisionUses(Path(locks_dir))
    for rev in revisions:
        uses.acquire(rev)
    ready.set()
    while True:  # until the parent kills it
        time.sleep(60)


@contextmanager
def uses_held_elsewhere(locks_dir: Path, revisions: list[str]) -> Iterator[BaseProcess]:
    """A spawned process holding a use of each revision; yields once it holds them.

    ``os.kill(proc.pid, signal.SIGKILL)`` then ``proc.join()`` is a crash; the
    process is killed on exit in any case.
    """
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_hold, args=(str(locks_dir), revisions, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(60):
            raise AssertionError("the holder process did not take its uses within 60 s")
        yield proc
    finally:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        proc.close()
