"""Per-token log-probabilities (and entropies) of completions under a causal LM, as the engine computes them."""

from __future__ import annotations

import torch
from torch import nn


def token_logps_and_entropy(logits: torch.Tensor, token_ids: torch.Tensor,
                            with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log_softmax(logits) at `token_ids`, and the entropy of each distribution; row by row to bound memory.

    logits [B, T, V], token_ids [B, T] → ([B, T], [B, T] or None), in float32.
    """
    logps, entropies = [], []
    for row_logits, row_ids in zip(logits, token_ids, strict=True):
        row_log_probs = row_logits.float().log_softmax(dim=-1)
        logps.append(row_log_probs.gather(-1, row_ids.unsqueeze(-1)).squeeze(-1))
        if with_entropy:
            with torch.no_grad():  # logged only: keep it out of the autograd graph
                entropies.append(-(row_log_probs.exp() * row_log_probs).sum(-1))
    return torch.stack(logps), (torch.stack(entropies) if with_entropy else None)


def completion_logps(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities [B, C] of the completion tokens given their prompts, at `temperature`.

    Prompts are left-padded ([B, P], mask 0 on padding), completions right-padded ([B, C]).
    Position ids count only real tokens, so a padded row scores exactly as the unpadded sequence
    does in the engine. `batch_size` splits the forward into chunks (for no-grad passes).
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    num_completion_tokens = completion_ids.size(1)
    step = batch_size or input_ids.size(0)
    all_logps, all_entropies = [], []
    for start in range(0, input_ids.size(0), step):
        rows = slice(start, start + step)
        # logits_to_keep: the LM head runs only over the positions that predict completion tokens.
        logits = model(
            input_ids=input_ids[rows],
            attention_mask=attention_mask[rows],
            position_ids=position_ids[rows],
            use_cache=False,
            logits_to_keep=num_completion_tokens + 1,
        ).logits[:, :-1]
        logps, entropy = token_logps_and_entropy(logits / temperature, completion_ids[rows], with_entropy)
        all_logps.append(logps)
        all_entropies.append(entropy)
    logps = torch.cat(all_logps)
    return logps, (torch.cat(all_entropies) if with_entropy else None)
