"""vLLM's ``--load-format weightcache``: a model's weights through the node's cache.

::

    REF=s3://models/llama-3-8b@3f9a2c
    SNAPSHOT=$(python -c 'import sys, weightcache; print(weightcache.open(sys.argv[1]))' $REF)
    vllm serve "$SNAPSHOT" --load-format weightcache \\
        --model-loader-extra-config "{\"ref\": \"$REF\"}"

vLLM builds the model from ``--model`` (``config.json``, and the tokenizer
unless ``--tokenizer`` says otherwise): point it at the ref's snapshot
directory, as above, or at any directory or Hugging Face id with the same
config. It then hands the model to the loader ``--load-format`` names; this
one keeps the ref's snapshot for the whole load (:func:`weightcache.snapshot`),
warns when ``--model``'s ``config.json`` differs from the snapshot's, and feeds
``weightcache.iter_load`` of exactly that revision into the model's own
``load_weights``, which maps checkpoint names to vLLM's parameters and cuts
each tensor to this rank's tensor-parallel shard.

The ``vllm.general_plugins`` entry point (``pyproject.toml``) runs
:func:`register` in every vLLM process, so the API server, the engine core and
every worker know the format. ``--model-loader-extra-config`` takes:

``ref`` (required)
    the weightcache ref (``s3://bucket/prefix[@rev]`` or ``file:///dir[@rev]``);
    pin the revision (``@rev``) so every rank, and the config, see the same one.
``device`` (``"auto"``, default; ``"cpu"``; ``"cuda"``)
    where ``iter_load`` puts each tensor before the model copies it in; see
    :func:`choose_device`.

Which tensors a rank reads (:func:`weight_filter`, :func:`choose_device`): a
tensor-parallel rank needs a slice of nearly every tensor, and vLLM gives a
loader no name-level split of them; what it does give is the model's
``is_unused_checkpoint_weight(name)`` (speculative-decoding heads, encoders a
configuration leaves out), and tensors it rejects are never read. Beyond
that, on ``device="cpu"`` the tensors are copy-on-write views of the cached
files, so only the pages a weight loader touches are read: another pipeline
stage's layers and another expert-parallel rank's experts are mapped, not read.

Everything here but :func:`register` and :func:`loader_class` runs without
vLLM installed; those two import it, and say ``pip install vllm`` when it is
missing. The vLLM API it uses (``BaseModelLoader.download_model(model_config)``
and ``load_weights(model, model_config)``, ``register_model_loader(load_format)``,
the ``vllm.general_plugins`` group) is that of vLLM 0.32 and 0.34; docs/operations.md
("Serving engines") says what has run against which.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import logging
import re
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import weightcache
from weightcache.errors import ConfigInvalid, RefInvalid
from weightcache.refs import parse_ref

if TYPE_CHECKING:
    import torch

    from weightcache.config import Config

__all__ = [
    "LOAD_FORMAT",
    "LoaderOptions",
    "choose_device",
    "config_difference",
    "load_into",
    "loader_class",
    "parse_extra_config",
    "pinned_ref",
    "register",
    "weight_filter",
    "weights",
]

log = logging.getLogger(__name__)

#: the name given to ``--load-format``
LOAD_FORMAT = "weightcache"
#: what to run when vLLM is missing
INSTALL = "pip install vllm"
#: the keys ``--model-loader-extra-config`` may hold
KEYS = ("ref", "device")
DEVICES = ("auto", "cpu", "cuda")

_WHERE = "model_loader_extra_config"
# A snapshot directory is named by its full revision (docs/architecture.md).
_FULL_REV = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LoaderOptions:
    """``--model-loader-extra-config`` for ``--load-format weightcache``, checked."""

    ref: str
    device: str = "auto"


def parse_extra_config(extra: object) -> LoaderOptions:
    """Check ``--model-loader-extra-config``; :class:`ConfigInvalid` lists every problem.

    Unknown keys are errors (with the closest known key), as in vLLM's own
    loaders: a misspelt ``"device"`` would otherwise be ignored silently.
    """
    if not isinstance(extra, Mapping):
        raise ConfigInvalid(
            [f'{_WHERE}: a JSON object with a "ref" is expected, got {type(extra).__name__}']
        )
    problems: list[str] = []
    for key in sorted(str(k) for k in extra if k not in KEYS):
        close = difflib.get_close_matches(key, KEYS, n=1)
        known = f"did you mean {close[0]!r}?" if close else "the keys are " + ", ".join(KEYS)
        problems.append(f"{_WHERE}.{key}: unknown key for --load-format {LOAD_FORMAT} ({known})")
    ref = extra.get("ref")
    if ref is None:
        problems.append(
            f"{_WHERE}.ref: required: the weightcache ref to load, "
            'e.g. {"ref": "s3://models/llama-3-8b@3f9a2c"}'
        )
    else:
        try:
            ref = str(parse_ref(ref))
        except RefInvalid as exc:
            problems.append(f"{_WHERE}.ref: {exc.message}")
    device = extra.get("device", "auto")
    if not isinstance(device, str) or device not in DEVICES:
        problems.append(f"{_WHERE}.device: {device!r} is not one of " + ", ".join(DEVICES))
    if problems:
        raise ConfigInvalid(problems)
    return LoaderOptions(ref=str(ref), device=device)


def choose_device(
    requested: str,
    model_device: str,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: bool = False,
) -> str:
    """Where ``iter_load`` puts the tensors that the model's weight loaders then copy in.

    ``"cpu"``: copy-on-write views of the cached files (what vLLM's own
    safetensors loader hands over too). A weight loader copies only this rank's
    slice to the GPU, and a tensor it skips is never read. ``"cuda"``: the
    model's own CUDA device, through weightcache's pinned ring with reads and
    copies overlapped (vLLM's weight loaders take CUDA tensors, as its
    fastsafetensors loader yields them); every byte of every tensor then
    crosses PCIe. ``"auto"``: ``"cuda"`` when one rank holds the whole model
    (no tensor, pipeline or expert parallelism), where it needs every byte
    anyway, else ``"cpu"``. A model on the CPU always loads from ``"cpu"``.
    """
    if requested not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {requested!r}")
    if not model_device.startswith("cuda") or requested == "cpu":
        return "cpu"
    whole = tensor_parallel == 1 and pipeline_parallel == 1 and not expert_parallel
    if requested == "cuda" or whole:
        return model_device
    return "cpu"


def weight_filter(model: object) -> Callable[[str], bool] | None:
    """The checkpoint names ``model`` loads (a ``tensors=`` predicate), or None for all.

    vLLM models may say which checkpoint weights they do not load
    (``is_unused_checkpoint_weight``, "the same rule used in ``load_weights``");
    vLLM's own loaders use it to skip whole files, this one skips the tensors.
    """
    unused = getattr(model, "is_unused_checkpoint_weight", None)
    if not callable(unused):
        return None

    def wanted(name: str) -> bool:
        return not unused(name)

    return wanted


def pinned_ref(ref: str, snapshot: Path) -> str:
    """``ref`` pinned to the revision of ``snapshot`` (a ``snapshots/<rev>`` directory).

    Loading the pinned ref reads exactly the files whose config was checked,
    even if ``ref`` names no revision and a new one is published meanwhile.
    """
    if not _FULL_REV.fullmatch(snapshot.name):
        return ref
    return str(parse_ref(ref).with_rev(snapshot.name))


def config_difference(model_path: str, snapshot: Path) -> list[str] | None:
    """The top-level keys in which ``model_path``'s ``config.json`` and the snapshot's differ.

    ``None`` when there is nothing to compare: ``model_path`` is not a local
    directory (a Hugging Face id) or either side has no readable ``config.json``.
    """
    local = Path(model_path)
    try:
        if not local.is_dir():
            return None
        if local.resolve() == snapshot.resolve():
            return []
        theirs = json.loads((local / "config.json").read_text(encoding="utf-8"))
        ours = json.loads((snapshot / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(theirs, dict) or not isinstance(ours, dict):
        return None if theirs == ours else ["(the whole file)"]
    absent = object()
    return sorted(
        k for k in theirs.keys() | ours.keys() if theirs.get(k, absent) != ours.get(k, absent)
    )


def weights(
    options: LoaderOptions,
    *,
    device: str = "cpu",
    select: Callable[[str], bool] | None = None,
    model_path: str | None = None,
    config: Config | None = None,
) -> Generator[tuple[str, torch.Tensor], None, None]:
    """``(name, tensor)`` of ``options.ref`` in file order, for a model's ``load_weights``.

    The snapshot is held (:func:`weightcache.snapshot`) until the iterator is
    exhausted or closed, and ``iter_load`` reads the revision held.
    ``model_path`` (vLLM's ``--model``) is compared with the snapshot's config.
    """
    with weightcache.snapshot(options.ref, config=config) as snapshot:
        if model_path is not None:
            differs = config_difference(model_path, snapshot)
            if differs:
                log.warning(
                    "vllm.config_differs model=%s ref=%s keys=%s: the model was built from a "
                    "config.json that differs from the weights' (pass the snapshot directory "
                    "%s as --model)",
                    model_path,
                    options.ref,
                    ",".join(differs[:8]),
                    snapshot,
                )
        ref = pinned_ref(options.ref, snapshot)
        log.info(
            "vllm.load ref=%s device=%s selected=%s",
            ref,
            device,
            "all" if select is None else "model",
        )
        # Closing this generator closes iter_load's too (``yield from``), which
        # gives its lease back before the snapshot's.
        yield from weightcache.iter_load(ref, device, tensors=select, config=config)


def load_into(
    model: Any,
    options: LoaderOptions,
    *,
    device: str = "cpu",
    model_path: str | None = None,
    config: Config | None = None,
) -> Any:
    """``model.load_weights(weights(...))``, with the model's own selection; its result."""
    source = weights(
        options, device=device, select=weight_filter(model), model_path=model_path, config=config
    )
    # A load_weights that raises leaves the generator suspended: close it, so the
    # snapshot is given back now rather than when the generator is collected.
    with contextlib.closing(source):
        return model.load_weights(source)


# -- vLLM ---------------------------------------------------------------------------

_loader: type[Any] | None = None
_registered = False


def _missing(exc: ImportError) -> ImportError:
    if importlib.util.find_spec("vllm") is None:
        return ImportError(
            f"--load-format {LOAD_FORMAT} is a vLLM model loader and vLLM is not installed "
            f"in this environment: {INSTALL}"
        )
    return ImportError(
        f"vLLM is installed but its model loader API does not import ({exc}); "
        "weightcache's loader uses the model loader API of vLLM 0.32 to 0.34"
    )


def loader_class() -> type[Any]:
    """The vLLM model loader class (a ``BaseModelLoader``); imports vLLM."""
    global _loader
    if _loader is None:
        _loader = _define_loader()
    return _loader


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make ``--load-format weightcache`` known.

    vLLM runs it in every process it starts; a second call in one process does nothing.
    """
    global _registered
    try:
        from vllm.model_executor.model_loader import register_model_loader
    except ImportError as exc:
        raise _missing(exc) from exc
    if _registered:
        return
    register_model_loader(LOAD_FORMAT)(loader_class())
    _registered = True


def _parallel_layout() -> dict[str, Any]:
    """This engine's tensor, pipeline and expert parallelism, from vLLM's current config."""
    try:
        from vllm.config import get_current_vllm_config
    except ImportError:
        return {}
    try:
        parallel = get_current_vllm_config().parallel_config
    except (AssertionError, RuntimeError):  # outside a vLLM engine
        return {}
    return {
        "tensor_parallel": int(getattr(parallel, "tensor_parallel_size", 1)),
        "pipeline_parallel": int(getattr(parallel, "pipeline_parallel_size", 1)),
        "expert_parallel": bool(getattr(parallel, "enable_expert_parallel", False)),
    }


def _model_device(model: Any) -> str:
    for param in model.parameters():
        return str(param.device)
    return "cpu"


def _define_loader() -> type[Any]:
    try:
        from vllm.model_executor.model_loader.base_loader import BaseModelLoader
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    except ImportError as exc:
        raise _missing(exc) from exc

    class WeightcacheModelLoader(BaseModelLoader):  # type: ignore[misc,unused-ignore]
        """``--load-format weightcache``: ``iter_load`` of the extra config's ``ref``
        into the model's ``load_weights``."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.options = parse_extra_config(load_config.model_loader_extra_config)

        def download_model(self, model_config: Any) -> None:
            """Make the ref local (what ``vllm`` asks of a loader before a load)."""
            weightcache.open(self.options.ref)

        def get_all_weights(
            self, model_config: Any, model: Any
        ) -> Generator[tuple[str, torch.Tensor], None, None]:
            device = choose_device(self.options.device, _model_device(model), **_parallel_layout())
            yield from weights(
                self.options,
                device=device,
                select=weight_filter(model),
                model_path=model_config.model,
            )

        def load_weights(self, model: Any, model_config: Any) -> None:
            source = self.get_all_weights(model_config, model)
            with contextlib.closing(source):
                loaded = model.load_weights(source)
            # As strict as vLLM's default loader: an unquantized model whose
            # load_weights reports what it loaded must have every parameter filled.
            track = getattr(DefaultModelLoader, "track_weights_loading", None)
            if track is not None and loaded is not None and model_config.quantization is None:
                track(self, model, loaded)

    # vLLM logs the class it registers: name it as importable, not as a local.
    WeightcacheModelLoader.__qualname__ = "WeightcacheModelLoader"
    return WeightcacheModelLoader
