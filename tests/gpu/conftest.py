"""The GPU tests: every test here is marked ``gpu`` and needs a CUDA device.

They are skipped, with the reason, where ``torch.cuda.is_available()`` is False
(a CPU-only torch, or no visible GPU), and only there: anything else that goes
wrong on a GPU machine fails. ``pytest -m gpu`` runs just these.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if HERE in Path(str(item.path)).resolve().parents]
    unmarked = [item.nodeid for item in mine if item.get_closest_marker("gpu") is None]
    if unmarked:
        raise pytest.UsageError(f"tests under tests/gpu must be marked gpu: {unmarked}")
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason=f"needs a CUDA device: torch {torch.__version__} "
        f"(CUDA build: {torch.version.cuda or 'no'}) sees none"
    )
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
