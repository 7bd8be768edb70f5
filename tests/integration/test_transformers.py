"""Hugging Face transformers on top of weightcache, both ways the README shows.

A tiny Llama (two layers of the real architecture, random weights) with its
config, generation config and a word-level tokenizer is saved with
``save_pretrained`` (safetensors), published to a ``file://`` origin, and
loaded back through weightcache: ``from_pretrained`` on the snapshot directory,
and ``from_config`` on the meta device plus ``load_state_dict(weightcache.load(ref),
assign=True)``. Either model's logits on a fixed input must equal the
original's exactly. No network: nothing is asked of the Hub.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import weightcache
from weightcache.config import load_config
from weightcache.publish import publish
from weightcache.refs import parse_ref

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

WORDS = ["<unk>", "<s>", "</s>", "the", "cache", "holds", "weights", "once", "per", "node"]


def _tiny_llama(directory: Path) -> tuple[object, object]:
    """Save a tiny Llama and its tokenizer to ``directory``; return (model, input ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)  # safetensors: the only format transformers 5 writes
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(directory)
    ids = tokenizer("the cache holds weights once per node", return_tensors="pt").input_ids
    return model, ids


@pytest.fixture
def published(tmp_path: Path) -> tuple[str, object, object]:
    model, ids = _tiny_llama(tmp_path / "src")
    ref = f"file://{tmp_path}/origin/tiny-llama"
    publish(tmp_path / "src", parse_ref(ref), load_config())
    return ref, model, ids


def _logits(model: object, ids: object) -> object:
    with torch.no_grad():
        return model(ids).logits  # type: ignore[operator]


def test_from_pretrained_on_the_snapshot(published: tuple[str, object, object]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref, original, ids = published
    model = AutoModelForCausalLM.from_pretrained(weightcache.open(ref)).eval()
    assert torch.equal(_logits(model, ids), _logits(original, ids))
    # The protected form: config and tokenizer from the same snapshot, kept for the block.
    with weightcache.snapshot(ref) as path:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
    again = tokenizer("the cache holds weights once per node", return_tensors="pt").input_ids
    assert torch.equal(again, ids)
    assert torch.equal(_logits(model, again), _logits(original, ids))


def test_meta_device_and_load_state_dict(published: tuple[str, object, object]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    ref, original, ids = published
    config = AutoConfig.from_pretrained(weightcache.open(ref))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(weightcache.load(ref), assign=True)
    # RoPE's inv_freq is a buffer the checkpoint does not hold: made on meta above.
    meta = [name for name, b in model.named_buffers() if b.is_meta]
    assert meta == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert torch.equal(_logits(model.eval(), ids), _logits(original, ids))
