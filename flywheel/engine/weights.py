"""Loading Hugging Face weights: safetensors files, HF names mapped onto fused, sharded parameters.

Every name and full shape is checked against the model's Hugging Face layout before a single
tensor is copied, so a bad update is refused whole. Where each name goes is worked out on its
first push and kept on the model, so a live update pays only for its checks and its copies.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import CONFIG_MAPPING, AutoModelForCausalLM

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_weights(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of a checkpoint folder's safetensors files: those its index names, when it has one."""
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [name for name in names if not (folder / name).exists()]
        if absent:
            raise FileNotFoundError(f"{path} lacks {len(absent)} of the {len(names)} files its index names: "
                                    f"{', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''}")
        files = [folder / name for name in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a whole checkpoint into ``model``; raises when it lacks a weight the model needs (rather than
    leave that parameter's memory uninitialized)."""
    loaded = set()

    def recorded() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in checkpoint_weights(path):
            loaded.add(name)
            yield name, tensor

    model.load_weights(recorded())
    needed = set(model._weight_targets.hf_shapes)
    if getattr(model.config, "tie_word_embeddings", False):
        needed.discard("lm_head.weight")
    missing = sorted(name for name in needed - loaded if not name.endswith(IGNORED_SUFFIXES))
    if missing:
        raise ValueError(f"the checkpoint in {path} lacks {len(missing)} weights the model needs, e.g. "
                         f"{', '.join(missing[:3])}")


def hf_parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """The full shape of every tensor of the Hugging Face model with this config."""
    if type(config) is not CONFIG_MAPPING[config.model_type]:
        # A checkpoint's own configuration class (remote code) has no model class registered for it.
        config = CONFIG_MAPPING[config.model_type].from_dict(config.to_dict())
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    return {name: tuple(tensor.shape) for name, tensor in reference.state_dict().items()}


@dataclass(eq=False)
class WeightTarget:
    """Where one HF-named tensor goes: a parameter of ``module``, or a shard of it.

    The parameter is looked up on its module at every push rather than kept, so one replaced
    after the first push (``load_state_dict(assign=True)``, re-tying) is still the one written.
    """

    module: nn.Module
    attribute: str
    shard_id: str | int | None
    hf_shape: tuple[int, ...]
    # (parameter, its data_ptr, destination) when the loader's source is the whole tensor: later
    # pushes reuse the destination view, whose slicing costs more than the copy it feeds. The view
    # holds the parameter's memory until a push finds the parameter or its storage replaced.
    _whole_source_destination: tuple[nn.Parameter, int, torch.Tensor] | None = field(default=None, init=False)

    def parameter(self) -> nn.Parameter:
        return getattr(self.module, self.attribute)

    def views(self, parameter: nn.Parameter, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(destination, source): this rank's piece of ``parameter`` and of the full ``tensor``."""
        kept = self._whole_source_destination
        if kept is not None and kept[0] is parameter and kept[1] == parameter.data_ptr():
            return kept[2], tensor
        loader = getattr(parameter, "shard_loader", None)
        if loader is None:
            return parameter, tensor
        destination, source = loader(parameter, tensor, self.shard_id)
        if source.shape == tensor.shape:
            self._whole_source_destination = (parameter, parameter.data_ptr(), destination)
        return destination, source


class WeightTargets:
    """The targets of one model by HF name, each found on the first sight of its name."""

    def __init__(self, model: nn.Module) -> None:
        self.hf_shapes = hf_parameter_shapes(model.config)
        self.by_name: dict[str, WeightTarget] = {}

    def find(self, model: nn.Module, hf_name: str) -> WeightTarget:
        target = self.by_name.get(hf_name)
        if target is None:
            target = self.by_name[hf_name] = self._resolve(model, hf_name)
        return target

    def _resolve(self, model: nn.Module, hf_name: str) -> WeightTarget:
        name, shard_id = model.parameter_for(hf_name)
        module_path, _, attribute = name.rpartition(".")
        try:
            module = model.get_submodule(module_path)
        except AttributeError:
            module = None
        hf_shape = self.hf_shapes.get(hf_name)
        if hf_shape is None or not isinstance(getattr(module, attribute, None), nn.Parameter):
            raise ValueError(f"unknown weight {hf_name!r}: {type(model).__name__} has no such parameter")
        return WeightTarget(module, attribute, shard_id, hf_shape)


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named tensors into ``model`` (which has ``parameter_for`` and ``config``)."""
    copy_planned_weights(plan_weight_copies(model, weights))


def plan_weight_copies(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]
) -> list[tuple[WeightTarget, nn.Parameter, torch.Tensor]]:
    """Check every weight and pair it with its target; raises before anything is copied."""
    targets = getattr(model, "_weight_targets", None)
    if targets is None:
        targets = model._weight_targets = WeightTargets(model)
    # Keyed by destination so that, as when copying in order, the last tensor for a place wins.
    plan = {}
    for hf_name, tensor in weights:
        if hf_name.endswith(IGNORED_SUFFIXES):
            continue
        target = targets.find(model, hf_name)
        if tuple(tensor.shape) != target.hf_shape:
            raise ValueError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {target.hf_shape}")
        if not tensor.is_floating_point():
            raise ValueError(f"weight {hf_name!r} has dtype {tensor.dtype}, expected a floating-point tensor")
        parameter = target.parameter()
        plan[id(parameter), target.shard_id] = (target, parameter, tensor)
    return list(plan.values())


def copy_planned_weights(plan: list[tuple[WeightTarget, nn.Parameter, torch.Tensor]]) -> None:
    """One multi-tensor copy per (destination, source) device and dtype: ``_foreach_copy_`` copies a
    list in a few launches only when the list shares them, and one tensor at a time otherwise."""
    groups = defaultdict(lambda: ([], []))
    with torch.no_grad():
        for target, parameter, tensor in plan:
            destination, source = target.views(parameter, tensor)
            destinations, sources = groups[destination.device, destination.dtype, source.device, source.dtype]
            destinations.append(destination)
            sources.append(source)
        for destinations, sources in groups.values():
            torch._foreach_copy_(destinations, sources)
