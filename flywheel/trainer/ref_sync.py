"""The reference model pulled towards the trained policy every few optimizer steps (TR-DPO's soft update)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback


@torch.no_grad()
def mix_into_reference(ref_model: nn.Module, policy: nn.Module, alpha: float) -> None:
    """π_ref ← α·π_θ + (1 − α)·π_ref, parameter by parameter (matched by name)."""
    policy_parameters = dict(policy.named_parameters())
    for name, ref_parameter in ref_model.named_parameters():
        ref_parameter.lerp_(policy_parameters[name].to(ref_parameter.dtype), alpha)


class SyncRefModelCallback(TrainerCallback):
    """Mixes the policy into the reference model after every `every`-th optimizer step."""

    def __init__(self, ref_model: nn.Module, policy: nn.Module, alpha: float, every: int) -> None:
        self.ref_model = ref_model
        self.policy = policy
        self.alpha = alpha
        self.every = every

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            mix_into_reference(self.ref_model, self.policy, self.alpha)
