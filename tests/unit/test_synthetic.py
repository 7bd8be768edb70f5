"""The synthetic model generator: valid safetensors, a truthful index, the size asked for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from weightcache.demo.synthetic import INDEX_NAME, make_model

MiB = 1 << 20


@pytest.mark.parametrize(
    ("total_bytes", "shards", "dtype", "want"),
    [
        (4 * MiB, 4, "bf16", torch.bfloat16),
        (3 * MiB, 2, "fp32", torch.float32),
        (2 * MiB + 12345, 3, "fp16", torch.float16),
        (1 * MiB, 1, "fp8", torch.float8_e4m3fn),
    ],
)
def test_shards_load_and_index_maps_every_tensor_to_its_file(
    tmp_path: Path, total_bytes: int, shards: int, dtype: str, want: torch.dtype
) -> None:
    model = make_model(tmp_path, total_bytes=total_bytes, shards=shards, dtype=dtype)

    names = [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
    assert [p.name for p in model.shards] == names
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index) == {"metadata", "weight_map"}
    weight_map: dict[str, str] = index["weight_map"]

    seen: dict[str, str] = {}
    data_bytes = 0
    for path in model.shards:
        tensors = load_file(path)
        assert len(tensors) >= 2, f"{path.name} should hold several tensors"
        with safe_open(str(path), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            assert name not in seen, f"{name} in {seen[name]} and {path.name}"
            seen[name] = path.name
            assert t.dtype == want, name
            assert weight_map[name] == path.name, name
            data_bytes += t.numel() * t.element_size()

    assert seen == weight_map  # every tensor indexed, nothing indexed that is not there
    assert set(model.tensor_names) == set(seen)
    assert model.weight_map == weight_map
    assert index["metadata"]["total_size"] == data_bytes == model.tensor_bytes
    assert abs(model.tensor_bytes - total_bytes) <= 0.05 * total_bytes
    assert abs(model.file_bytes - total_bytes) <= 0.05 * total_bytes


def test_layout_looks_like_a_hugging_face_checkpoint(tmp_path: Path) -> None:
    model = make_model(tmp_path, total_bytes=2 * MiB, vocab=500)

    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in model.files)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", INDEX_NAME):
        assert (tmp_path / name) in model.files
        json.loads((tmp_path / name).read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    tensors = model.reference()
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    assert tensors["model.embed_tokens.weight"].shape == (500, hidden)
    assert tensors["model.layers.0.mlp.up_proj.weight"].shape == (inter, hidden)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (hidden, inter)
    layers = config["num_hidden_layers"]
    assert f"model.layers.{layers - 1}.self_attn.o_proj.weight" in tensors
    assert f"model.layers.{layers}.self_attn.o_proj.weight" not in tensors
    assert hidden % config["num_attention_heads"] == 0
    vocab = json.loads((tmp_path / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 500
    # Finite, small values: usable as weights, not just as bytes.
    for t in tensors.values():
        assert torch.isfinite(t.float()).all()
        assert t.float().abs().max() <= 1.1


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    a = make_model(tmp_path / "a", total_bytes=1 * MiB, seed=7)
    b = make_model(tmp_path / "b", total_bytes=1 * MiB, seed=7)
    c = make_model(tmp_path / "c", total_bytes=1 * MiB, seed=8)
    for pa, pb, pc in zip(a.shards, b.shards, c.shards, strict=True):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.read_bytes() != pc.read_bytes()


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dtype"):
        make_model(tmp_path, total_bytes=MiB, dtype="int4")
    with pytest.raises(ValueError, match="shards"):
        make_model(tmp_path, total_bytes=MiB, shards=0)
    with pytest.raises(ValueError, match="ask for more bytes"):
        make_model(tmp_path, total_bytes=1000, vocab=1000)
    assert list(tmp_path.iterdir()) == []


def test_importing_the_module_does_not_import_torch() -> None:
    code = "import sys, weightcache.demo.synthetic; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
