"""Loading Hugging Face weights: safetensors files, HF names mapped onto fused, sharded parameters.

Every name and full shape is checked against the model's Hugging Face layout before a single
tensor is copied, so a bad update is refused whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_weights(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def hf_parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """The full shape of every tensor of the Hugging Face model with this config."""
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(config)
    return {name: tuple(tensor.shape) for name, tensor in reference.state_dict().items()}


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy HF-named tensors into ``model`` (which has ``parameter_for`` and ``config``)."""
    shapes = getattr(model, "_hf_shapes", None)
    if shapes is None:
        shapes = model._hf_shapes = hf_parameter_shapes(model.config)
    params = dict(model.named_parameters(remove_duplicate=False))
    plan = []
    for hf_name, tensor in weights:
        if hf_name.endswith(IGNORED_SUFFIXES):
            continue
        expected = shapes.get(hf_name)
        name, shard_id = model.parameter_for(hf_name)
        if expected is None or name not in params:
            raise ValueError(f"unknown weight {hf_name!r}: {type(model).__name__} has no such parameter")
        if tuple(tensor.shape) != expected:
            raise ValueError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}, expected {expected}")
        if not tensor.is_floating_point():
            raise ValueError(f"weight {hf_name!r} has dtype {tensor.dtype}, expected a floating-point tensor")
        plan.append((params[name], tensor, shard_id))
    with torch.no_grad():
        for param, tensor, shard_id in plan:
            loader = getattr(param, "shard_loader", None)
            destination, source = loader(param, tensor, shard_id) if loader else (param, tensor)
            destination.copy_(source)
