"""Synthetic models: a sharded safetensors directory of a chosen size, fast and seeded.

Used by the demo, the tests and the load tests. The layout is the one a Hugging
Face checkpoint has (``model-00001-of-00004.safetensors`` shards, a
``model.safetensors.index.json`` mapping every tensor to its shard,
``config.json``, tokenizer files), with Llama-like tensor names so that shards
hold many tensors each. The shapes are solved so that the tensor bytes land
within a fraction of a percent of ``total_bytes``.

Values are uniform in a small range (finite, like freshly initialised weights),
drawn from a seeded ``torch.Generator``: the same arguments always give the
same bytes. Generation holds one shard in memory at a time.

torch and safetensors are imported inside the functions, so that importing the
package does not need them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"

#: accepted ``dtype=`` spellings → (torch attribute name, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "bf16": ("bfloat16", 2),
    "bfloat16": ("bfloat16", 2),
    "fp16": ("float16", 2),
    "f16": ("float16", 2),
    "float16": ("float16", 2),
    "fp32": ("float32", 4),
    "f32": ("float32", 4),
    "float32": ("float32", 4),
    "fp8": ("float8_e4m3fn", 1),
    "float8_e4m3fn": ("float8_e4m3fn", 1),
}

#: scale of the uniform initialisation of the matrices
_INIT_RANGE = 0.05


@dataclass(frozen=True)
class SyntheticModel:
    """What :func:`make_model` wrote."""

    directory: Path
    #: every file written, shards first, in a stable order
    files: tuple[Path, ...]
    #: the ``*.safetensors`` shards, in order
    shards: tuple[Path, ...]
    #: sum of the tensors' data bytes (what ``index.json`` calls ``total_size``)
    tensor_bytes: int
    #: every tensor name, in the order written
    tensor_names: tuple[str, ...]
    #: tensor name → shard file name (as in ``index.json``)
    weight_map: dict[str, str]
    dtype: str

    @property
    def file_bytes(self) -> int:
        """Bytes on disk of every file (tensor data, headers, config and tokenizer)."""
        return sum(p.stat().st_size for p in self.files)

    def reference(self) -> dict[str, torch.Tensor]:
        """Every tensor as ``safetensors.torch.load_file`` reads it from the shards."""
        from safetensors.torch import load_file

        out: dict[str, torch.Tensor] = {}
        for path in self.shards:
            out.update(load_file(path))
        return out


@dataclass(frozen=True)
class _Spec:
    name: str
    shape: tuple[int, ...]
    kind: str  # "matrix" or "norm"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class _Shape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int


def _solve_shape(elements: int, *, layers: int, vocab: int) -> _Shape:
    """Hidden and intermediate sizes so that the tensor count is close to ``elements``.

    Per layer: q, k, v, o (h x h), gate, up (i x h), down (h x i), two norms (h);
    plus the embedding (vocab x h) and a final norm (h). With i about 2h,
    ``10 L h^2 + (vocab + 2 L + 1) h = elements``; h is rounded to a multiple of
    8 (when large enough), then i is solved exactly for the rest.
    """
    a, b = 10 * layers, vocab + 2 * layers + 1
    h_real = (-b + math.sqrt(b * b + 4 * a * elements)) / (2 * a)
    hidden = int(h_real) // 8 * 8 if h_real >= 64 else max(1, int(h_real))
    fixed = vocab * hidden + layers * (4 * hidden * hidden + 2 * hidden) + hidden
    intermediate = round((elements - fixed) / (3 * layers * hidden))
    if intermediate < 1:
        raise ValueError(
            f"cannot make a model of {elements} elements with {layers} layers and a vocabulary "
            f"of {vocab}: ask for more bytes or a smaller vocab"
        )
    heads = next(d for d in (32, 16, 8, 4, 2, 1) if hidden % d == 0)
    return _Shape(hidden, intermediate, layers, vocab, heads)


def _specs(shape: _Shape) -> list[_Spec]:
    h, i = shape.hidden, shape.intermediate
    specs = [_Spec("model.embed_tokens.weight", (shape.vocab, h), "matrix")]
    for n in range(shape.layers):
        p = f"model.layers.{n}"
        specs += [
            _Spec(f"{p}.input_layernorm.weight", (h,), "norm"),
            _Spec(f"{p}.self_attn.q_proj.weight", (h, h), "matrix"),
            _Spec(f"{p}.self_attn.k_proj.weight", (h, h), "matrix"),
            _Spec(f"{p}.self_attn.v_proj.weight", (h, h), "matrix"),
            _Spec(f"{p}.self_attn.o_proj.weight", (h, h), "matrix"),
            _Spec(f"{p}.post_attention_layernorm.weight", (h,), "norm"),
            _Spec(f"{p}.mlp.gate_proj.weight", (i, h), "matrix"),
            _Spec(f"{p}.mlp.up_proj.weight", (i, h), "matrix"),
            _Spec(f"{p}.mlp.down_proj.weight", (h, i), "matrix"),
        ]
    specs.append(_Spec("model.norm.weight", (h,), "norm"))
    return specs


def _split(specs: list[_Spec], shards: int, itemsize: int) -> list[list[_Spec]]:
    """Consecutive runs of tensors, cut where the running total crosses k/shards of it."""
    total = sum(s.numel for s in specs) * itemsize
    out: list[list[_Spec]] = [[] for _ in range(shards)]
    done = 0
    for idx, spec in enumerate(specs):
        left = len(specs) - idx
        shard = min(shards - 1, done * shards // max(1, total))
        # Never leave a later shard without a tensor.
        empty_after = sum(1 for s in out[shard + 1 :] if not s)
        if left <= empty_after:
            shard = next(k for k in range(shards) if not out[k])
        out[shard].append(spec)
        done += spec.numel * itemsize
    return out


def _fill(spec: _Spec, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    import torch

    # fp8 has no uniform_ kernel: draw in half precision and convert.
    draw = torch.float16 if dtype.itemsize == 1 else dtype
    t = torch.empty(spec.shape, dtype=draw)
    if spec.kind == "norm":
        t.uniform_(0.9, 1.1, generator=gen)
    else:
        t.uniform_(-_INIT_RANGE, _INIT_RANGE, generator=gen)
    return t if draw == dtype else t.to(dtype)


def _tokenizer(vocab: int) -> tuple[dict[str, Any], dict[str, Any]]:
    specials = ["<unk>", "<s>", "</s>"]
    words = specials + [f"tok{n}" for n in range(max(0, vocab - len(specials)))]
    table = {w: n for n, w in enumerate(words[:vocab])}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": n,
                "content": w,
                "special": True,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
            }
            for n, w in enumerate(specials[:vocab])
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": table, "unk_token": "<unk>"},
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 2048,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    return tokenizer, config


def _write_json(path: Path, doc: Any) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")


def make_model(
    directory: Path,
    *,
    total_bytes: int,
    shards: int = 4,
    dtype: str = "bf16",
    seed: int = 0,
    vocab: int = 1000,
) -> SyntheticModel:
    """Write a sharded safetensors model of about ``total_bytes`` tensor bytes into ``directory``.

    ``dtype``: ``bf16``, ``fp16``, ``fp32`` or ``fp8``. The directory is created
    if needed; files of the same names are overwritten.
    """
    import torch
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(DTYPES))}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    if vocab < 1:
        raise ValueError(f"vocab must be >= 1, got {vocab}")
    attr, itemsize = DTYPES[dtype]
    torch_dtype: torch.dtype = getattr(torch, attr)
    if total_bytes < itemsize:
        raise ValueError(f"total_bytes must be at least {itemsize}, got {total_bytes}")

    # Two layers per shard, so that every shard holds whole layers and several tensors.
    shape = _solve_shape(total_bytes // itemsize, layers=2 * shards, vocab=vocab)
    specs = _specs(shape)
    groups = _split(specs, shards, itemsize)

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shard_paths: list[Path] = []
    weight_map: dict[str, str] = {}
    tensor_bytes = 0
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {spec.name: _fill(spec, torch_dtype, gen) for spec in group}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        for spec in group:
            weight_map[spec.name] = name
            tensor_bytes += spec.numel * itemsize
        del tensors  # one shard in memory at a time
        shard_paths.append(directory / name)

    _write_json(
        directory / INDEX_NAME,
        {"metadata": {"total_size": tensor_bytes}, "weight_map": weight_map},
    )
    _write_json(
        directory / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": shape.hidden,
            "intermediate_size": shape.intermediate,
            "num_hidden_layers": shape.layers,
            "num_attention_heads": shape.heads,
            "num_key_value_heads": shape.heads,
            "vocab_size": shape.vocab,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
            "torch_dtype": attr,
            "weightcache_synthetic": {"seed": seed, "total_bytes": total_bytes},
        },
    )
    tokenizer, tokenizer_config = _tokenizer(vocab)
    _write_json(directory / "tokenizer.json", tokenizer)
    _write_json(directory / "tokenizer_config.json", tokenizer_config)

    extra = (INDEX_NAME, "config.json", "tokenizer.json", "tokenizer_config.json")
    return SyntheticModel(
        directory=directory,
        files=(*shard_paths, *(directory / n for n in extra)),
        shards=tuple(shard_paths),
        tensor_bytes=tensor_bytes,
        tensor_names=tuple(spec.name for spec in specs),
        weight_map=weight_map,
        dtype=attr,
    )
