"""A batch's groups packed behind one copy of their prompt, for a single forward with fewer tokens.

Rows that share a prompt (a group's completions, kept together by the repeat sampler) run as one flat
sequence: each distinct prompt once, then every row's completion tokens, all rows padded to one
width. Every layer but attention sees only those tokens, so the prompt runs through the MLPs and
projections once per group instead of once per row. Attention splits the sequence back: the prompts
attend causally among themselves, and each row's completion attends to its group's prompt keys and
its own earlier tokens (two sdpa calls with boolean masks). Position ids continue each prompt in
every row, so each row scores exactly as it does alone; it stays one forward, gradient
checkpointing included.

The packed forward needs the model's attention to split it: `enable_packed_prompts` gives an sdpa
model the `PACKED_ATTENTION` implementation, which is sdpa for every other forward.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_ATTENTION = "flywheel_packed"


def _split(states: torch.Tensor, groups: int, prompt_width: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, heads, N, dim] of a packed sequence → prompts [groups, heads, P, dim], rows [rows, heads, W, dim]."""
    heads, dim = states.size(1), states.size(-1)
    prompt_tokens = groups * prompt_width
    prompts = states[0, :, :prompt_tokens].view(heads, groups, prompt_width, dim).transpose(0, 1)
    completions = states[0, :, prompt_tokens:].view(heads, rows, -1, dim).transpose(0, 1)
    return prompts, completions


def _packed_or_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    prompt_of_row = kwargs.pop("packed_prompt_of_row", None)
    row_mask = kwargs.pop("packed_row_mask", None)
    if prompt_of_row is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    # A packed forward: `attention_mask` [G, 1, P, P] is the prompts' own, `row_mask` [B, 1, W, P + W] the rows'.
    groups, prompt_width, rows = attention_mask.size(0), attention_mask.size(-1), prompt_of_row.numel()
    query_prompts, query_rows = _split(query, groups, prompt_width, rows)
    key_prompts, key_rows = _split(key, groups, prompt_width, rows)
    value_prompts, value_rows = _split(value, groups, prompt_width, rows)
    key_rows = torch.cat([key_prompts.index_select(0, prompt_of_row), key_rows], dim=2)
    value_rows = torch.cat([value_prompts.index_select(0, prompt_of_row), value_rows], dim=2)
    prompts, _ = sdpa_attention_forward(module, query_prompts, key_prompts, value_prompts, attention_mask,
                                        scaling=scaling, dropout=dropout, **kwargs)
    completions, _ = sdpa_attention_forward(module, query_rows, key_rows, value_rows, row_mask, scaling=scaling,
                                            dropout=dropout, **kwargs)
    heads, dim = prompts.size(-2), prompts.size(-1)
    return torch.cat([prompts.reshape(-1, heads, dim), completions.reshape(-1, heads, dim)])[None], None


AttentionInterface.register(PACKED_ATTENTION, _packed_or_sdpa_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def enable_packed_prompts(model: nn.Module) -> bool:
    """Give an sdpa model with full attention in every layer the packed attention; whether it has it."""
    config = model.config
    full_attention = all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or [])
    if config._attn_implementation == "sdpa" and full_attention:
        model.set_attn_implementation(PACKED_ATTENTION)
    return config._attn_implementation == PACKED_ATTENTION


def packs_prompts(model: nn.Module) -> bool:
    """Whether `model` (possibly wrapped: DDP, compiled) takes packed forwards."""
    config = next((module.config for module in model.modules() if hasattr(module, "config")), None)
    return getattr(config, "_attn_implementation", None) == PACKED_ATTENTION


def packed_completion_logits(model: nn.Module, prompt_ids: torch.Tensor, attention_mask: torch.Tensor,
                             position_ids: torch.Tensor, completion_ids: torch.Tensor, first_rows: torch.Tensor,
                             prompt_of_row: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One forward of the groups packed (see the module's docstring); completions at least 2 tokens wide.

    `attention_mask` and `position_ids` [B, P + C] cover the left-padded prompts and right-padded
    completions; `first_rows` [G] is each group's first row and `prompt_of_row` [B] each row's group.
    Returns the logits that predict the completion tokens as one (logits [B, C, V], token ids [B, C]) span.
    """
    rows, prompt_width = prompt_ids.shape
    groups, device = len(first_rows), prompt_ids.device
    width = completion_ids.size(1) - 1  # the last completion token predicts nothing that is scored
    input_ids = torch.cat([prompt_ids[first_rows].reshape(-1), completion_ids[:, :-1].reshape(-1)])
    positions = torch.cat([position_ids[first_rows, :prompt_width].reshape(-1),
                           position_ids[:, prompt_width:-1].reshape(-1)])
    # Padding keys are hidden; a padding query sees itself, so that no row of the softmax is empty.
    prompt_keys = attention_mask[first_rows, :prompt_width].bool()
    causal = torch.ones(prompt_width, prompt_width, dtype=torch.bool, device=device).tril()
    eye = torch.eye(prompt_width, dtype=torch.bool, device=device)
    prompt_mask = (causal & prompt_keys[:, None, :]) | eye
    own = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    row_mask = torch.cat([prompt_keys.index_select(0, prompt_of_row)[:, None, :].expand(rows, width, prompt_width),
                          own.expand(rows, width, width)], dim=-1)
    # Each row's logits: at its prompt's last token (its first completion token), then at its completion
    # inputs; one [B, C] gather, so the logits and their gradient stay one tensor.
    prompt_ends = (prompt_of_row + 1) * prompt_width - 1
    row_inputs = groups * prompt_width + torch.arange(rows * width, device=device).view(rows, width)
    kept = torch.cat([prompt_ends[:, None], row_inputs], dim=1).view(-1)
    logits = model(input_ids=input_ids[None], attention_mask=prompt_mask[:, None], position_ids=positions[None],
                   use_cache=False, logits_to_keep=kept, packed_prompt_of_row=prompt_of_row,
                   packed_row_mask=row_mask[:, None]).logits
    return [(logits.view(rows, width + 1, -1), completion_ids)]
