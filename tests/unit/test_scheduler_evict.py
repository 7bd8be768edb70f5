"""Pure decisions: priority order, spread windows, eviction plans."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from weightcache.evict import Revision, bytes_to_free, plan
from weightcache.scheduler import Priority, PrioritySlots, SingleFlight, spread_offset, start_time


def test_priority_slots_serve_workers_before_admin_before_background() -> None:
    order: list[str] = []

    async def main() -> None:
        slots = PrioritySlots(1)

        async def take(name: str, prio: Priority) -> None:
            async with slots.slot(prio):
                order.append(name)
                await asyncio.sleep(0)

        async with slots.slot(Priority.WORKER):  # hold the only slot while others queue
            tasks = [
                asyncio.create_task(take("bg", Priority.BACKGROUND)),
                asyncio.create_task(take("admin", Priority.ADMIN)),
                asyncio.create_task(take("worker1", Priority.WORKER)),
                asyncio.create_task(take("worker2", Priority.WORKER)),
            ]
            await asyncio.sleep(0.01)
            assert slots.waiting == 4
        await asyncio.gather(*tasks)
        assert slots.in_use == 0

    asyncio.run(main())
    assert order == ["worker1", "worker2", "admin", "bg"]


def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    async def main() -> None:
        slots = PrioritySlots(1)
        async with slots.slot():
            waiter = asyncio.create_task(slots.slot().__aenter__())
            await asyncio.sleep(0)
            waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        async with slots.slot():
            assert slots.in_use == 1
        assert slots.in_use == 0

    asyncio.run(main())


def test_single_flight_shares_one_run_and_its_error() -> None:
    calls = 0

    async def main() -> None:
        flight: SingleFlight[str, int] = SingleFlight()

        async def work() -> int:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.01)
            return 42

        results = await asyncio.gather(*[flight.run("k", work) for _ in range(10)])
        assert [r for r, _ in results] == [42] * 10
        assert sum(joined for _, joined in results) == 9

        async def boom() -> int:
            await asyncio.sleep(0.01)
            raise ValueError("shared failure")

        outcomes = await asyncio.gather(
            *[flight.run("e", boom) for _ in range(3)], return_exceptions=True
        )
        assert all(isinstance(o, ValueError) for o in outcomes)

    asyncio.run(main())
    assert calls == 1


@given(st.text(max_size=20), st.text(max_size=20), st.floats(0, 3600))
def test_spread_offset_is_deterministic_and_in_window(node: str, key: str, window: float) -> None:
    a = spread_offset(node, key, window)
    assert a == spread_offset(node, key, window)
    assert 0 <= a <= window


def test_spread_differs_across_nodes_and_respects_deadline() -> None:
    offsets = {round(spread_offset(f"node-{i}", "job", 60.0), 3) for i in range(100)}
    assert len(offsets) > 90  # a fleet does not start in the same second
    assert max(offsets) < 60 and min(offsets) >= 0
    for i in range(50):
        begin = start_time(1000.0, 1010.0, f"node-{i}", "job", 60.0)
        assert 1000.0 <= begin <= 1005.0  # half the time to the deadline is left for the pull


def test_bytes_to_free() -> None:
    assert bytes_to_free(used=80, incoming=30, budget=100, free=1000, reserve=10) == 10
    assert bytes_to_free(used=0, incoming=30, budget=0, free=35, reserve=10) == 5
    assert bytes_to_free(used=10, incoming=10, budget=100, free=1000, reserve=10) == 0


def test_plan_evicts_lru_unleased_and_keeps_shared_blobs() -> None:
    revs = [
        Revision("old", 1.0, frozenset({"a", "shared"})),
        Revision("leased", 0.5, frozenset({"b"})),
        Revision("new", 3.0, frozenset({"c", "shared"})),
    ]
    sizes = {"a": 10, "b": 10, "c": 10, "shared": 100, "orphan": 5}
    p = plan(revs, sizes, need=12, protected_revisions={"leased"}, protected_blobs=set())
    assert p.revisions == ("old",)
    assert set(p.blobs) == {"orphan", "a"}  # "shared" is still needed by "new"
    assert p.freed_bytes == 15 and p.shortfall == 0


@st.composite
def caches(draw: st.DrawFn) -> tuple[list[Revision], dict[str, int], set[str], int]:
    blobs = [f"b{i}" for i in range(draw(st.integers(1, 8)))]
    sizes = {b: draw(st.integers(0, 100)) for b in blobs}
    revs = [
        Revision(
            f"r{i}",
            draw(st.floats(0, 100)),
            frozenset(draw(st.sets(st.sampled_from(blobs), max_size=4))),
        )
        for i in range(draw(st.integers(0, 6)))
    ]
    protected = draw(st.sets(st.sampled_from([r.rev for r in revs]), max_size=3)) if revs else set()
    return revs, sizes, protected, draw(st.integers(0, 500))


@given(caches())
def test_plan_properties(case: tuple[list[Revision], dict[str, int], set[str], int]) -> None:
    revs, sizes, protected, need = case
    p = plan(revs, sizes, need=need, protected_revisions=protected, protected_blobs=set())
    assert not set(p.revisions) & protected
    remaining = [r for r in revs if r.rev not in p.revisions]
    still_needed = set().union(*[r.blobs for r in remaining]) if remaining else set()
    assert not set(p.blobs) & still_needed  # never a blob a kept snapshot links to
    assert p.freed_bytes == sum(sizes[b] for b in p.blobs)
    assert p.freed_bytes >= need or p.shortfall == need - p.freed_bytes
    if p.revisions:  # least recently used first
        chosen = [
            r for r in sorted(revs, key=lambda r: (r.accessed, r.rev)) if r.rev not in protected
        ]
        assert list(p.revisions) == [r.rev for r in chosen[: len(p.revisions)]]
