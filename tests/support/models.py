"""Generated safetensors models for differential tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import _TYPES, load_file, save_file

ALL_DTYPES: list[torch.dtype] = sorted(set(_TYPES.values()), key=str)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random bytes reinterpreted as ``dtype``: NaNs, infinities and subnormals included."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen, dtype=torch.uint8).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for s in shape:
        numel *= s
    raw = torch.randint(0, 256, (numel * itemsize,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def write_model(
    directory: Path, *, shards: int = 3, seed: int = 0, big: int = 0
) -> dict[str, Path]:
    """Shards covering every dtype, empty and scalar tensors, plus index.json and config files.

    ``big`` adds one uint8 tensor of that many bytes to the first shard.
    """
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    per_shard: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    for i, dtype in enumerate(ALL_DTYPES):
        name = str(dtype).removeprefix("torch.")
        shard = per_shard[i % shards]
        shard[f"{name}.matrix"] = random_tensor((7, 13), dtype, gen)
        shard[f"{name}.scalar"] = random_tensor((), dtype, gen)
        shard[f"{name}.empty"] = random_tensor((0, 5), dtype, gen)
    if big:
        per_shard[0]["big.blob"] = random_tensor((big,), torch.uint8, gen)
    files: dict[str, Path] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for i, tensors in enumerate(per_shard):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, directory / name, metadata={"format": "pt"})
        files[name] = directory / name
        for tname, t in tensors.items():
            weight_map[tname] = name
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps({"model_type": "synthetic", "seed": seed}))
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0", "vocab": ["a", "b"]}))
    return files


def write_fp16_model(directory: Path, *, shards: int, shard_bytes: int, seed: int) -> None:
    """``shards`` safetensors files of random fp16 bits, each exactly ``shard_bytes`` of tensors.

    Plus an index and a config; the ``tokenizer.json`` is the same bytes in every
    model (and as :func:`write_model`'s), so caches store it once.
    """
    import numpy as np
    from safetensors.numpy import save_file as save_numpy

    directory.mkdir(parents=True, exist_ok=True)
    gen = np.random.default_rng(seed)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        half = shard_bytes // 2 // 2  # two fp16 tensors of shard_bytes / 2 each
        tensors = {
            f"layers.{i}.{part}.weight": gen.integers(0, 1 << 16, half, dtype=np.uint16).view(
                np.float16
            )
            for part in ("attn", "mlp")
        }
        save_numpy(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {"total_size": shards * shard_bytes}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (directory / "config.json").write_text(json.dumps({"model_type": "fp16", "seed": seed}))
    (directory / "tokenizer.json").write_text(json.dumps({"version": "1.0", "vocab": ["a", "b"]}))


def reference(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in files.values():
        out.update(load_file(path))
    return out


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """One digest over names, dtypes, shapes and raw bytes: bitwise identity, NaNs included."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def assert_bitwise_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        if w.numel():
            assert torch.equal(
                g.contiguous().reshape(-1).view(torch.uint8),
                w.contiguous().reshape(-1).view(torch.uint8),
            ), name
