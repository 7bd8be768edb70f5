"""Runs vLLM for tests/integration/test_vllm_real.py, one engine per process.

``python -m tests.support.vllm_probe MODE 'JSON'`` from the repository root, in
an environment with vLLM (``make vllm-env``); it prints its answer as JSON on
the line marked ``vllm_probe:``. A process of its own per engine, because
vLLM's engine holds process-wide state (its distributed groups, the plugin
registry, its worker processes) and its imports would trip the test run's
warnings-as-errors.

The tests call :func:`probe` (and build the model with :func:`tiny_llama`).

Modes:

``registry``
    vLLM's own plugin loading finds the entry point; ``get_model_loader``
    returns the weightcache loader, and a bad extra config fails with our error.
``generate``
    ``LLM(model, load_format, model_loader_extra_config, tensor_parallel_size)``;
    greedy generation from token ids, with top logprobs, and a digest of every
    parameter of the loaded model (rank 0's shard under tensor parallelism).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

_MARK = "vllm_probe: "

#: the prompt's token ids, and how many tokens to generate greedily
PROMPT = [1, 3, 4, 5, 6, 7]
MAX_TOKENS = 8


def probe(mode: str, args: dict[str, Any], env: dict[str, str], timeout_s: float) -> Any:
    """This module in a process of its own (the test run's interpreter); its JSON answer."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.vllm_probe", mode, json.dumps(args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout_s,
    )
    assert out.returncode == 0, out.stderr[-6000:]
    # vLLM writes to stdout too, before and after: the answer is the marked line.
    [answer] = [line for line in out.stdout.splitlines() if line.startswith(_MARK)]
    return json.loads(answer.removeprefix(_MARK))


def tiny_llama(directory: Path) -> Any:
    """Save a tiny Llama (two layers, random weights, head size 32: vLLM's CPU attention
    takes no smaller) with ``save_pretrained``; return the transformers model."""
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=64,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model


def _registry(args: dict[str, Any]) -> dict[str, Any]:
    import vllm
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    loader = get_model_loader(
        LoadConfig(load_format="weightcache", model_loader_extra_config={"ref": args["ref"]})
    )
    try:
        get_model_loader(
            LoadConfig(load_format="weightcache", model_loader_extra_config={"rev": "x"})
        )
        bad = ""
    except Exception as exc:  # reported, whatever it is
        bad = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    return {
        "vllm": vllm.__version__,
        "loader": f"{type(loader).__module__}.{type(loader).__name__}",
        "is_base_loader": isinstance(loader, BaseModelLoader),
        "ref": loader.options.ref,
        "bad": bad,
    }


def _digests(model: Any) -> dict[str, str]:
    """sha256 of each parameter's bytes (runs in the worker, through ``apply_model``)."""
    import torch

    out = {}
    for name, param in model.named_parameters():
        data = param.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        out[name] = hashlib.sha256(data.numpy().tobytes()).hexdigest()
    return out


def _generate(args: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=args["model"],
        load_format=args["load_format"],
        model_loader_extra_config=args.get("extra") or {},
        tensor_parallel_size=args.get("tp", 1),
        dtype="float32",
        enforce_eager=True,
        max_model_len=64,
        # The CPU backend otherwise reserves most of the machine's memory per worker.
        kv_cache_memory_bytes=64 << 20,
        skip_tokenizer_init=True,
        seed=0,
    )
    params = SamplingParams(temperature=0, max_tokens=args["max_tokens"], logprobs=3)
    out = llm.generate([TokensPrompt(prompt_token_ids=args["prompt"])], params, use_tqdm=False)
    completion = out[0].outputs[0]
    logprobs = [
        {str(token): entry.logprob for token, entry in sorted(step.items())}
        for step in completion.logprobs or []
    ]
    return {
        "tokens": list(completion.token_ids),
        "logprobs": logprobs,
        # By its importable name: this module runs as __main__, which the workers lack.
        "digests": llm.apply_model(importlib.import_module("tests.support.vllm_probe")._digests)[0],
    }


def main() -> None:
    mode, args = sys.argv[1], json.loads(sys.argv[2])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("weightcache").setLevel(logging.INFO)
    # apply_model sends _digests to the workers by pickle.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    answer = _registry(args) if mode == "registry" else _generate(args)
    print(_MARK + json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
