"""``weightcache.integrations.vllm`` without vLLM: its options, decisions and load path.

vLLM's side (the registry, ``BaseModelLoader``, a real model's ``load_weights``
and generation) is tests/integration/test_vllm_real.py, which needs vLLM
(``make vllm-env``). Here: ``--model-loader-extra-config`` and its errors, the
device and tensor choices, the entry point in the installed metadata, the clear
error without vLLM, and the load path the loader class runs (``weights`` /
``load_into``) from a published model into a model with vLLM's
``load_weights`` contract, bitwise.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightcache
from weightcache.config import load_config
from weightcache.errors import ConfigInvalid
from weightcache.integrations import vllm as plugin
from weightcache.locks import RevisionUses
from weightcache.publish import publish
from weightcache.refs import parse_ref

HAS_VLLM = importlib.util.find_spec("vllm") is not None
ROOT = Path(__file__).resolve().parents[2]

# -- --model-loader-extra-config ------------------------------------------------------


def test_extra_config_needs_only_a_ref() -> None:
    options = plugin.parse_extra_config({"ref": "s3://models/llama-3-8b@3f9a2c"})
    assert options == plugin.LoaderOptions(ref="s3://models/llama-3-8b@3f9a2c", device="auto")
    cuda = plugin.parse_extra_config({"ref": "file:///srv/models/m/", "device": "cuda"})
    assert cuda == plugin.LoaderOptions(ref="file:///srv/models/m", device="cuda")


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({}, ["model_loader_extra_config.ref: required"]),
        (None, ['model_loader_extra_config: a JSON object with a "ref" is expected']),
        ('{"ref": "s3://b/m"}', ["a JSON object", "got str"]),
        ({"ref": "models/llama"}, ["model_loader_extra_config.ref: ", "models/llama"]),
        ({"ref": "s3://models/llama@xyz"}, ["model_loader_extra_config.ref: invalid revision"]),
        ({"ref": 7}, ["model_loader_extra_config.ref: a ref is a string, got int"]),
        ({"ref": "s3://models/llama", "devise": "cpu"}, ["devise: unknown key", "'device'"]),
        ({"ref": "s3://models/llama", "shards": 2}, ["shards: unknown key", "the keys are ref"]),
        ({"ref": "s3://models/llama", "device": "tpu"}, ["device: 'tpu' is not one of auto"]),
    ],
)
def test_bad_extra_config_says_what_and_where(extra: object, says: list[str]) -> None:
    with pytest.raises(ConfigInvalid) as info:
        plugin.parse_extra_config(extra)
    for text in says:
        assert text in str(info.value)


def test_every_problem_of_an_extra_config_at_once() -> None:
    with pytest.raises(ConfigInvalid) as info:
        plugin.parse_extra_config({"refs": "s3://models/llama", "device": 0})
    assert [p.split(":")[0] for p in info.value.problems] == [
        "model_loader_extra_config.refs",
        "model_loader_extra_config.ref",
        "model_loader_extra_config.device",
    ]
    assert "did you mean 'ref'?" in info.value.problems[0]


# -- decisions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "model_device", "layout", "want"),
    [
        ("auto", "cuda:1", {}, "cuda:1"),  # one rank holds the whole model: the pinned ring
        ("auto", "cuda:0", {"tensor_parallel": 2}, "cpu"),  # a rank copies only its slice
        ("auto", "cuda:0", {"pipeline_parallel": 2}, "cpu"),  # other stages' layers unread
        ("auto", "cuda:0", {"expert_parallel": True}, "cpu"),  # other ranks' experts unread
        ("cuda", "cuda:3", {"tensor_parallel": 8}, "cuda:3"),  # asked for: the rank's device
        ("cpu", "cuda:0", {}, "cpu"),
        ("auto", "cpu", {}, "cpu"),  # vLLM's CPU backend
        ("cuda", "cpu", {}, "cpu"),
    ],
)
def test_choose_device(
    requested: str, model_device: str, layout: dict[str, Any], want: str
) -> None:
    assert plugin.choose_device(requested, model_device, **layout) == want


def test_weight_filter_follows_the_models_own_rule() -> None:
    class Mtp:
        def is_unused_checkpoint_weight(self, name: str) -> bool:
            return name.startswith("mtp.")

    wanted = plugin.weight_filter(Mtp())
    assert wanted is not None
    assert [wanted(n) for n in ("mtp.0.weight", "model.norm.weight")] == [False, True]
    assert plugin.weight_filter(torch.nn.Linear(2, 2)) is None  # no rule: every tensor


def test_pinned_ref_takes_the_snapshots_revision() -> None:
    rev = "ab" * 32
    snap = Path("/cache/snapshots") / rev
    assert plugin.pinned_ref("s3://models/llama", snap) == f"s3://models/llama@{rev}"
    assert plugin.pinned_ref("s3://models/llama@abab1234", snap) == f"s3://models/llama@{rev}"
    assert plugin.pinned_ref("s3://models/llama", Path("/elsewhere/llama")) == "s3://models/llama"


def test_config_difference(tmp_path: Path) -> None:
    snap, same, other, hub = tmp_path / "snap", tmp_path / "same", tmp_path / "other", "org/model"
    for directory, config in [
        (snap, {"hidden_size": 32, "num_hidden_layers": 2}),
        (same, {"num_hidden_layers": 2, "hidden_size": 32}),
        (other, {"hidden_size": 64, "num_hidden_layers": 2, "rope_scaling": None}),
    ]:
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config))
    assert plugin.config_difference(str(snap), snap) == []
    assert plugin.config_difference(str(same), snap) == []
    assert plugin.config_difference(str(other), snap) == ["hidden_size", "rope_scaling"]
    assert plugin.config_difference(hub, snap) is None  # a Hugging Face id: nothing to compare
    (other / "config.json").write_text("{not json")
    assert plugin.config_difference(str(other), snap) is None


# -- vLLM's side, without vLLM ----------------------------------------------------------


def test_the_entry_point_is_in_the_installed_metadata() -> None:
    # What vLLM's load_general_plugins() finds: `pip install` of this project adds it.
    found = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "weightcache"]
    assert [ep.value for ep in found] == ["weightcache.integrations.vllm:register"]
    assert found[0].load() is plugin.register


def test_importing_the_plugin_loads_neither_vllm_nor_torch() -> None:
    # vLLM imports the entry point's module in every process it starts, and the
    # pure parts run where vLLM is not installed.
    probe = (
        "import json, sys, weightcache.integrations.vllm; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert json.loads(out.stdout) == []


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here: test_vllm_real.py runs instead")
def test_without_vllm_register_says_how_to_get_it() -> None:
    for call in (plugin.register, plugin.loader_class):
        with pytest.raises(ImportError, match=r"vLLM is not installed .*: pip install vllm"):
            call()


# -- the load path ----------------------------------------------------------------------

HIDDEN, VOCAB, LAYERS = 16, 32, 2


def _checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    """A Llama-shaped checkpoint in two shards, plus a draft head the model does not load."""
    gen = torch.Generator().manual_seed(3)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    first = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN)}
    second = {"lm_head.weight": rand(VOCAB, HIDDEN), "mtp.0.proj.weight": rand(HIDDEN, HIDDEN)}
    for i in range(LAYERS):
        shard = first if i == 0 else second
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shard[f"model.layers.{i}.self_attn.{proj}.weight"] = rand(HIDDEN, HIDDEN)
    directory.mkdir(parents=True)
    save_file(first, directory / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(second, directory / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({"hidden_size": HIDDEN, "layers": LAYERS}))
    return {**first, **second}


class VllmStyleModel(torch.nn.Module):
    """What vLLM's loaders ask of a model: ``load_weights`` over ``(name, tensor)`` that
    maps checkpoint names onto its own parameters (q, k and v stacked into one
    ``qkv_proj``, as vLLM's Llama does), copies each into place (casting to the
    parameter's dtype) and returns the names it loaded; and
    ``is_unused_checkpoint_weight`` for what it never loads (a draft head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = torch.nn.Parameter(torch.zeros(VOCAB, HIDDEN))
        self.lm_head = torch.nn.Parameter(torch.zeros(VOCAB, HIDDEN))
        self.qkv = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(3 * HIDDEN, HIDDEN)) for _ in range(LAYERS)
        )
        self.o = torch.nn.ParameterList(
            torch.nn.Parameter(torch.zeros(HIDDEN, HIDDEN)) for _ in range(LAYERS)
        )
        self.seen: list[tuple[str, torch.device]] = []
        self.busy_while_loading: frozenset[str] = frozenset()

    def is_unused_checkpoint_weight(self, name: str) -> bool:
        return name.startswith("mtp.")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        for name, tensor in weights:
            if not self.seen:  # a generator: nothing is asked of the cache before this
                self.busy_while_loading = RevisionUses(load_config().cache.dir / "locks").busy()
            self.seen.append((name, tensor.device))
            if name == "model.embed_tokens.weight":
                param, rows, target = self.embed_tokens, slice(None), "embed_tokens"
            elif name == "lm_head.weight":
                param, rows, target = self.lm_head, slice(None), "lm_head"
            else:
                layer, proj = int(name.split(".")[2]), name.split(".")[4]
                if proj == "o_proj":
                    param, rows, target = self.o[layer], slice(None), f"o.{layer}"
                else:
                    at = ("q_proj", "k_proj", "v_proj").index(proj) * HIDDEN
                    param, rows, target = self.qkv[layer], slice(at, at + HIDDEN), f"qkv.{layer}"
            with torch.no_grad():
                param[rows].copy_(tensor)
            loaded.add(target)
        return loaded


@pytest.fixture
def published(tmp_path: Path) -> tuple[str, str, dict[str, torch.Tensor]]:
    """(ref, revision, every tensor as published)."""
    tensors = _checkpoint(tmp_path / "src")
    ref = f"file://{tmp_path}/origin/llama"
    done = publish(tmp_path / "src", parse_ref(ref), load_config())
    return ref, done.revision, tensors


def test_load_into_a_vllm_style_model(
    published: tuple[str, str, dict[str, torch.Tensor]], caplog: pytest.LogCaptureFixture
) -> None:
    ref, revision, tensors = published
    model = VllmStyleModel()
    snapshot = weightcache.open(ref)
    options = plugin.parse_extra_config({"ref": ref})
    with caplog.at_level(logging.INFO, logger="weightcache"):
        loaded = plugin.load_into(model, options, device="cpu", model_path=str(snapshot))
    assert loaded == {
        "embed_tokens",
        "lm_head",
        *(f"{k}.{i}" for k in ("qkv", "o") for i in (0, 1)),
    }
    # Every tensor but the one the model never loads arrived, in file order, on the CPU.
    names = [n for path in sorted(snapshot.glob("*.safetensors")) for n in load_file(path)]
    assert [n for n, _ in model.seen] == [n for n in names if not n.startswith("mtp.")]
    assert {device for _, device in model.seen} == {torch.device("cpu")}
    # Bitwise what was published, cast by the model as vLLM's weight loaders cast.
    for i in range(LAYERS):
        qkv = [tensors[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv"]
        assert torch.equal(model.qkv[i], torch.cat(qkv).float())
        assert torch.equal(model.o[i], tensors[f"model.layers.{i}.self_attn.o_proj.weight"].float())
    assert torch.equal(model.embed_tokens, tensors["model.embed_tokens.weight"].float())
    assert torch.equal(model.lm_head, tensors["lm_head.weight"].float())
    # The snapshot was held while the model loaded, the exact revision read, and let go.
    assert revision in model.busy_while_loading
    assert revision not in RevisionUses(load_config().cache.dir / "locks").busy()
    assert f"vllm.load ref={ref}@{revision} device=cpu selected=model" in caplog.text
    assert "vllm.config_differs" not in caplog.text


def test_a_model_built_from_another_config_is_warned_about(
    published: tuple[str, str, dict[str, torch.Tensor]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ref, _, _ = published
    elsewhere = tmp_path / "hub-copy"
    elsewhere.mkdir()
    (elsewhere / "config.json").write_text(json.dumps({"hidden_size": 4096, "layers": LAYERS}))
    with caplog.at_level(logging.WARNING, logger="weightcache"):
        plugin.load_into(VllmStyleModel(), plugin.LoaderOptions(ref), model_path=str(elsewhere))
    assert f"vllm.config_differs model={elsewhere} ref={ref} keys=hidden_size" in caplog.text


def test_a_load_that_fails_in_the_model_lets_the_snapshot_go(
    published: tuple[str, str, dict[str, torch.Tensor]],
) -> None:
    ref, revision, _ = published

    class Broken(VllmStyleModel):
        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            next(iter(weights))
            raise RuntimeError("shape mismatch in the model's weight loader")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        plugin.load_into(Broken(), plugin.LoaderOptions(ref))
    assert revision not in RevisionUses(load_config().cache.dir / "locks").busy()
