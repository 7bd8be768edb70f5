"""An ensure's result says how long resolving took, as the load report's phases need."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.clocks import ManualClock
from tests.support.published import cache_config, publish_model
from weightcache.refs import parse_ref
from weightcache.service import Service


async def test_resolve_seconds_is_the_time_to_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = publish_model(tmp_path, "m", 200_000, seed=3)
    clock = ManualClock()
    service = Service(cache_config(tmp_path), clock=clock, wall=clock.wall)
    await service.start()
    try:
        real = service.node.resolve

        async def slow_resolve(ref: Any) -> Any:
            clock.now += 0.25  # resolving takes a quarter of a second
            return await real(ref)

        monkeypatch.setattr(service.node, "resolve", slow_resolve)
        cold = await service.ensure(m.ref, lease=False)
        assert cold.ensured.resolve_seconds == 0.25
        warm = await service.ensure(str(parse_ref(m.ref).with_rev(m.revision)), lease=False)
        assert warm.ensured.cache_hit and warm.ensured.resolve_seconds == 0.25
    finally:
        await service.close()
