"""Node-wide limits: slots and a byte rate shared by real processes through flock'd files.

Cross-process properties run in real subprocesses (each a short script);
in-process ones use a fake clock or a gated executor, so no test sleeps for
more than a few milliseconds at a time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.origins import FakeClock
from weightcache.limits import NodeSlots, NodeTokenBucket

ROOT = Path(__file__).resolve().parents[2]

SLOT_WORKER = """
import json, sys, time
from pathlib import Path
from weightcache.limits import NodeSlots

d, capacity, rounds, hold_s, go = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), \
    float(sys.argv[4]), Path(sys.argv[5])
slots = NodeSlots(d, capacity)
slots.effective_capacity()
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
for _ in range(rounds):
    with slots.acquire(timeout_s=10):
        t0 = time.monotonic()
        time.sleep(hold_s)
        t1 = time.monotonic()
    print(json.dumps([t0, t1]), flush=True)
"""

SLOT_HOLDER = """
import os, sys
from pathlib import Path
from weightcache.limits import NodeSlots

slots = NodeSlots(Path(sys.argv[1]), int(sys.argv[2]))
slots.acquire(timeout_s=5)
if sys.argv[3] == "fork":
    # One slot held across the fork, one taken after it: the child keeps neither.
    pid = os.fork()
    if pid == 0:
        sys.stdin.read()
        os._exit(0)
    slots.acquire(timeout_s=5)
    print(pid, flush=True)
print("held", flush=True)
sys.stdin.read()
"""

BUCKET_WORKER = """
import sys, time
from pathlib import Path
from weightcache.limits import NodeTokenBucket

d, rate, n, rounds, go = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), Path(sys.argv[5])
bucket = NodeTokenBucket(d, rate)
bucket.effective_rate()
print("ready", flush=True)
while not go.exists():
    time.sleep(0.001)
for _ in range(rounds):
    bucket.acquire_blocking(n)
    print(time.monotonic(), flush=True)
"""


def spawn(script: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


@contextmanager
def processes(script: str, count: int, *args: object) -> Iterator[list[subprocess.Popen[str]]]:
    procs = [spawn(script, *args) for _ in range(count)]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()


def start_together(procs: list[subprocess.Popen[str]], go: Path) -> float:
    """Wait for every process to be ready, then release them all; returns the release time."""
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    started = time.monotonic()
    go.touch()
    return started


def finish(proc: subprocess.Popen[str]) -> list[str]:
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    return out.splitlines()


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    # At equal times an exit sorts before an enter: the intervals are recorded
    # inside the holds, so touching ones never overlapped.
    events = sorted([(t0, 1) for t0, _ in intervals] + [(t1, -1) for _, t1 in intervals])
    now = peak = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


async def eventually(condition: Callable[[], bool]) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition never held")


# -- slots across processes ---------------------------------------------------


def test_slots_never_exceed_capacity_across_processes(tmp_path: Path) -> None:
    locks, go = tmp_path / "locks", tmp_path / "go"
    with processes(SLOT_WORKER, 4, locks, 2, 6, 0.02, go) as procs:
        start_together(procs, go)
        intervals = [tuple(json.loads(line)) for p in procs for line in finish(p)]
    assert len(intervals) == 24
    assert max_overlap(intervals) == 2


def test_slots_count_threads_of_one_process_like_processes(tmp_path: Path) -> None:
    slots = NodeSlots(tmp_path, 3)
    intervals: list[tuple[float, float]] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(3):
            with slots.acquire(timeout_s=5):
                t0 = time.monotonic()
                time.sleep(0.01)
                t1 = time.monotonic()
            with lock:
                intervals.append((t0, t1))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(intervals) == 18
    assert max_overlap(intervals) == 3
    assert slots.in_use == 0 and slots.waiting == 0
    slots.close()


def test_killed_holder_frees_its_slot(tmp_path: Path) -> None:
    with processes(SLOT_HOLDER, 1, tmp_path, 1, "plain") as (holder,):
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        slots = NodeSlots(tmp_path, 1)
        assert slots.try_acquire() is None
        holder.send_signal(signal.SIGKILL)
        holder.wait(5)
        held = slots.acquire(timeout_s=1)
        assert held.index == 0
        held.release()
        slots.close()


def test_forked_child_keeps_no_slot_of_a_killed_parent(tmp_path: Path) -> None:
    with processes(SLOT_HOLDER, 1, tmp_path, 2, "fork") as (holder,):
        assert holder.stdout is not None
        child = int(holder.stdout.readline())
        assert holder.stdout.readline().strip() == "held"
        slots = NodeSlots(tmp_path, 2)
        assert slots.try_acquire() is None
        try:
            holder.send_signal(signal.SIGKILL)
            holder.wait(5)
            os.kill(child, 0)  # the child lives on, with copies of the parent's descriptors
            first, second = slots.acquire(timeout_s=1), slots.acquire(timeout_s=1)
            assert {first.index, second.index} == {0, 1}
        finally:
            os.kill(child, signal.SIGKILL)
        slots.close()


def test_blocking_acquire_times_out(tmp_path: Path) -> None:
    holder = NodeSlots(tmp_path, 1)
    held = holder.try_acquire()
    assert held is not None
    slots = NodeSlots(tmp_path, 1)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        slots.acquire(timeout_s=0.05)
    assert 0.05 <= time.monotonic() - start < 1.0
    assert slots.waiting == 0
    held.release()
    held.release()  # idempotent
    assert slots.try_acquire() is not None


def test_smallest_live_capacity_wins(tmp_path: Path) -> None:
    wide = NodeSlots(tmp_path, 3, refresh_s=0)
    narrow = NodeSlots(tmp_path, 2, refresh_s=0)
    assert wide.effective_capacity() == 3
    assert narrow.effective_capacity() == 2  # declares 2 from now on
    held = [wide.try_acquire(), wide.try_acquire()]
    assert all(held) and wide.try_acquire() is None
    assert {h.index for h in held if h} == {0, 1}
    narrow.close()  # a process that exits (or dies) withdraws its declaration
    assert wide.effective_capacity() == 3
    assert wide.try_acquire() is not None
    wide.close()


def test_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        NodeSlots(tmp_path, 0)
    with pytest.raises(ValueError):
        NodeTokenBucket(tmp_path, 0)


# -- slots, async ---------------------------------------------------------------


async def test_async_slot_polls_through_the_clock_with_jitter(tmp_path: Path) -> None:
    holder = NodeSlots(tmp_path, 1)
    held = holder.try_acquire()
    assert held is not None
    clock = FakeClock()
    slots = NodeSlots(tmp_path, 1, clock=clock, rng=random.Random(3))

    async def use() -> int:
        async with slots.slot() as mine:
            assert slots.in_use == 1
            return mine.index

    task = asyncio.create_task(use())
    while len(clock.sleeps) < 6:
        await asyncio.sleep(0.001)
    assert slots.waiting == 1
    held.release()
    assert await asyncio.wait_for(task, 5) == 0
    assert slots.in_use == 0 and slots.waiting == 0
    for attempt, slept in enumerate(clock.sleeps):
        base = min(0.02, 0.002 * 2**attempt)
        assert 0.5 * base <= slept <= 1.5 * base
    assert len(set(clock.sleeps)) == len(clock.sleeps)  # jittered


async def test_cancelled_waiter_leaks_nothing(tmp_path: Path) -> None:
    holder = NodeSlots(tmp_path, 1)
    held = holder.try_acquire()
    assert held is not None
    slots = NodeSlots(tmp_path, 1)

    async def use() -> None:
        async with slots.slot():
            raise AssertionError("the slot was never free")

    task = asyncio.create_task(use())
    await asyncio.sleep(0.03)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slots.waiting == 0 and slots.in_use == 0
    held.release()
    assert slots.try_acquire() is not None


async def test_probe_that_wins_after_cancel_gives_the_slot_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="weightcache.limits")
    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        slots = NodeSlots(tmp_path, 1, executor=pool)
        pool.submit(gate.wait, 5)
        entered = asyncio.Event()

        async def use() -> None:
            async with slots.slot():
                entered.set()

        task = asyncio.create_task(use())
        await asyncio.sleep(0.01)
        # The probe waits behind the gate in the executor: the loop did no flock itself.
        assert not task.done() and slots.in_use == 0
        task.cancel()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not entered.is_set()
        # The probe ran after the cancel and won the slot (the race did happen) ...
        await eventually(lambda: "limits.slot_orphan_released" in caplog.text)
        # ... and its release hopped to the executor.
        await eventually(lambda: slots.in_use == 0)
    other = NodeSlots(tmp_path, 1)
    assert other.try_acquire() is not None


async def test_slot_released_when_the_body_is_cancelled(tmp_path: Path) -> None:
    slots = NodeSlots(tmp_path, 1)
    entered = asyncio.Event()

    async def use() -> None:
        async with slots.slot():
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(use())
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slots.in_use == 0
    assert NodeSlots(tmp_path, 1).try_acquire() is not None


# -- token bucket -----------------------------------------------------------------


def test_bucket_keeps_the_rate_across_processes(tmp_path: Path) -> None:
    rate, n, rounds = 20_000, 2_000, 6
    locks, go = tmp_path / "locks", tmp_path / "go"
    with processes(BUCKET_WORKER, 3, locks, rate, n, rounds, go) as procs:
        started = start_together(procs, go)
        grants = sorted(float(t) for p in procs for t in finish(p))
    assert len(grants) == 3 * rounds
    # By any grant, no more than one second's burst plus the rate since the
    # start was handed out (the bucket is created full after `started`).
    for k, t in enumerate(grants):
        assert (k + 1) * n <= rate + rate * (t - started) + 1, (k, t - started)
    ideal = (3 * rounds * n - rate) / rate  # 0.8 s
    assert ideal <= grants[-1] - started < ideal + 1.0


async def test_bucket_has_the_in_process_bucket_semantics(tmp_path: Path) -> None:
    clock = FakeClock()
    bucket = NodeTokenBucket(tmp_path, 1000, clock=clock)
    start = clock.monotonic()
    for _ in range(5):
        await bucket.acquire(1000)
    # The first second's worth is in the bucket; four more seconds are waited.
    assert 3.99 <= clock.monotonic() - start <= 4.01
    await clock.sleep(10)  # full again
    clock.sleeps.clear()
    await bucket.acquire(2500)  # larger than the capacity: granted when full, into debt
    assert clock.sleeps == []
    await bucket.acquire(1)
    assert clock.sleeps == [pytest.approx(1.501)]


def test_bucket_blocking_form_waits_for_real(tmp_path: Path) -> None:
    bucket = NodeTokenBucket(tmp_path, 10_000)
    start = time.monotonic()
    bucket.acquire_blocking(10_000)
    bucket.acquire_blocking(500)
    assert 0.05 <= time.monotonic() - start < 1.0


def test_smallest_live_rate_wins(tmp_path: Path) -> None:
    clock = FakeClock()
    fast = NodeTokenBucket(tmp_path, 1000, clock=clock, refresh_s=0)
    slow = NodeTokenBucket(tmp_path, 500, clock=clock, refresh_s=0)
    assert slow.effective_rate() == 500
    assert fast.try_acquire(500) == 0.0
    assert fast.try_acquire(1) == pytest.approx(1 / 500)
    slow.close()
    assert fast.effective_rate() == 1000


async def test_cancelled_bucket_acquire_frees_the_queue(tmp_path: Path) -> None:
    clock = FakeClock()
    gate = asyncio.Event()
    real_sleep = clock.sleep

    async def gated_sleep(seconds: float) -> None:
        await gate.wait()
        await real_sleep(seconds)

    clock.sleep = gated_sleep  # type: ignore[method-assign]
    bucket = NodeTokenBucket(tmp_path, 1000, clock=clock)
    await bucket.acquire(1000)
    stuck = asyncio.create_task(bucket.acquire(1000))
    await asyncio.sleep(0.01)
    stuck.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stuck
    gate.set()
    await asyncio.wait_for(bucket.acquire(1000), 5)
    assert clock.sleeps == [pytest.approx(1.0)]


def _state(tokens: float, stamp: float) -> bytes:
    body = struct.pack("<8sdd", b"WCTBKT1\0", tokens, stamp)
    return body + struct.pack("<I", zlib.crc32(body))


NOW = FakeClock().now

BAD_FILES = {
    "garbage": b"\x00\xffnot a bucket at all, honest",
    "truncated": _state(5.0, NOW - 1)[:13],
    "too long": _state(5.0, NOW - 1) + b"x",
    "bad checksum": _state(5.0, NOW - 1)[:-1] + b"\x00",
    "bad magic": b"XXXXXXXX" + _state(5.0, NOW - 1)[8:],
    "nan tokens": _state(math.nan, NOW - 1),
    "infinite stamp": _state(0.0, math.inf),
    "stamped in the future": _state(-900.0, NOW + 3600),
    "endless debt": _state(-1e18, NOW),
}


@pytest.mark.parametrize("content", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_bucket_file_is_reset(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "bucket.state").write_bytes(content)
    bucket = NodeTokenBucket(tmp_path, 1000, clock=FakeClock())
    assert bucket.try_acquire(1000) == 0.0  # a full bucket, not a crash or a stall
    assert bucket.try_acquire(1) == pytest.approx(0.001)  # ... of exactly one second's worth
    assert "limits.bucket_reset" in caplog.text
    assert len((tmp_path / "bucket.state").read_bytes()) == 28


def test_bucket_overfull_file_is_clamped_to_capacity(tmp_path: Path) -> None:
    (tmp_path / "bucket.state").write_bytes(_state(1e30, NOW - 1))
    bucket = NodeTokenBucket(tmp_path, 1000, clock=FakeClock())
    assert bucket.try_acquire(1000) == 0.0
    assert bucket.try_acquire(1) > 0


def test_bucket_honours_a_plausible_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "bucket.state").write_bytes(_state(-500.0, NOW - 0.25))
    bucket = NodeTokenBucket(tmp_path, 1000, clock=FakeClock())
    # -500 + 0.25 s * 1000 = -250 tokens: 1.25 s until a full second's worth
    assert bucket.try_acquire(1000) == pytest.approx(1.25)
    assert "limits.bucket_reset" not in caplog.text
