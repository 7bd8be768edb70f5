"""Stop a fetch whose transfers stall, by cancelling it or aborting its transfers, and time it."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from weightcache.errors import ShuttingDown
from weightcache.fetch import Transfers


async def stop_stalled_fetch(
    task: asyncio.Task[Any],
    transfers: Transfers,
    how: str,
    expected: int,
    pool: ThreadPoolExecutor,
    timeout_s: float,
) -> tuple[BaseException | None, float]:
    """``how`` is ``"cancel"`` (the task) or ``"abort"`` (every transfer, which must be
    ``expected`` of them). Returns what the fetch raised and the seconds until every
    transfer thread was done, not only the coroutines."""
    started = time.monotonic()
    if how == "cancel":
        task.cancel()
    else:
        assert transfers.abort_all() == expected
    raised: BaseException | None = None
    try:
        await asyncio.wait_for(task, timeout_s)
    except (asyncio.CancelledError, ShuttingDown) as exc:
        raised = exc
    await asyncio.get_running_loop().run_in_executor(None, pool.shutdown, True)
    return raised, time.monotonic() - started
