"""A group's completions packed behind one copy of their prompt, for a single forward on a GPU.

Rows that share a prompt (a group's completions, kept together by the repeat sampler) become one
packed sequence: the prompt, then each row's completion tokens back to back. A block mask lets each
completion token see the prompt and the earlier tokens of its own completion only, and FlexAttention
computes just the blocks that hold such pairs; position ids restart after the prompt for every
completion, so each row scores exactly as it does alone. The prompt runs through the layers once
per group instead of once per row, padding after a completion's end is left out, and it stays one
forward (gradient checkpointing included).

The packed forward needs the model's attention to take a block mask: `enable_packed_prompts` gives an
sdpa model the `PACKED_ATTENTION` implementation, which is sdpa for every other forward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_ATTENTION = "flywheel_packed"


@functools.cache
def _compiled_flex_attention():
    return torch.compile(flex_attention)


@functools.cache
def _compiled_create_block_mask():
    return torch.compile(create_block_mask)


def _packed_or_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | BlockMask | None, scaling: float | None = None,
                              dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    if not isinstance(attention_mask, BlockMask):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout:
        raise ValueError("a packed forward has no attention dropout; set the model's attention_dropout to 0")
    # Inside a compiled model the graph compiles it; on its own it needs compiling to be fused at all. The
    # CPU runs the unfused reference: its compiled kernel fails to build once shapes turn dynamic (torch 2.13).
    compile_here = query.is_cuda and not torch.compiler.is_compiling()
    flex = _compiled_flex_attention() if compile_here else flex_attention
    output = flex(query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=query.size(1) != key.size(1))
    return output.transpose(1, 2).contiguous(), None


AttentionInterface.register(PACKED_ATTENTION, _packed_or_sdpa_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)


def enable_packed_prompts(model: nn.Module) -> bool:
    """Give an sdpa model with full attention in every layer, and no attention dropout (FlexAttention has
    none), the packed attention; whether it has it."""
    config = model.config
    full_attention = all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or [])
    no_dropout = not getattr(config, "attention_dropout", 0.0)
    if config._attn_implementation == "sdpa" and full_attention and no_dropout:
        model.set_attn_implementation(PACKED_ATTENTION)
    return config._attn_implementation == PACKED_ATTENTION


def packs_prompts(model: nn.Module) -> bool:
    """Whether `model` (possibly wrapped: DDP, compiled) takes packed forwards."""
    config = next((module.config for module in model.modules() if hasattr(module, "config")), None)
    return getattr(config, "_attn_implementation", None) == PACKED_ATTENTION


@dataclass
class PackedLogits:
    """The logits of a packed forward and where each row's scored tokens are among them.

    `logits` [G, K, V] predict, in each group, every completion's first token (column 0, shared by the
    group) and then each packed completion token's successor; `targets` [G, K] are those successors
    (column 0 and the padding past a group's end hold 0, their scores unused). `first_logits` [B, 1, V]
    and `first_targets` [B, 1] score each row's first token; `row_index` [B, C - 1] places the flattened
    [G * K] scores back at the rows' later columns.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    first_logits: torch.Tensor
    first_targets: torch.Tensor
    row_index: torch.Tensor

    def unpack(self, first: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """Row scores [B, C] from the first tokens' [B, 1] and the packed [G, K]."""
        later = packed.reshape(-1).index_select(0, self.row_index.reshape(-1)).view(self.row_index.shape)
        return torch.cat([first, later], dim=1)


def packed_completion_logits(model: nn.Module, prompt_ids: torch.Tensor, attention_mask: torch.Tensor,
                             position_ids: torch.Tensor, completion_ids: torch.Tensor, first_rows: torch.Tensor,
                             prompt_of_row: torch.Tensor) -> PackedLogits:
    """One forward of the groups packed (see the module's docstring); completions at least 2 tokens wide.

    `attention_mask` and `position_ids` [B, P + C] cover the left-padded prompts and right-padded
    completions; `first_rows` [G] is each group's first row and `prompt_of_row` [B] each row's group.
    """
    rows, prompt_width = prompt_ids.shape
    groups, device = len(first_rows), prompt_ids.device
    # Completion token i is an input when token i + 1 is scored.
    inputs_per_row = attention_mask[:, prompt_width + 1:].sum(1)
    before_row = inputs_per_row.cumsum(0) - inputs_per_row
    row_start = prompt_width + before_row - before_row[first_rows].index_select(0, prompt_of_row)
    per_group = torch.zeros(groups, dtype=inputs_per_row.dtype, device=device).index_add_(0, prompt_of_row,
                                                                                          inputs_per_row)
    length = prompt_width + int(per_group.max())
    steps = torch.arange(completion_ids.size(1) - 1, device=device)
    is_input = steps < inputs_per_row[:, None]
    packed_at = prompt_of_row[:, None] * length + row_start[:, None] + steps
    slots = groups * length + 1  # the last slot takes every non-input

    def packed(prompt_part: torch.Tensor, row_part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out[:-1].view(groups, length)[:, :prompt_width] = prompt_part
        out.scatter_(0, torch.where(is_input, packed_at, slots - 1).reshape(-1), row_part.reshape(-1))
        return out[:-1].view(groups, length)

    input_ids = packed(prompt_ids[first_rows], completion_ids[:, :-1], completion_ids.new_zeros(slots))
    positions = packed(position_ids[first_rows, :prompt_width], position_ids[:, prompt_width:-1],
                       position_ids.new_zeros(slots))
    # A token sees the keys from its segment's start up to itself, and the prompt's real tokens. The
    # prompt is its own segment; a padding token's segment starts at itself.
    prompt_start = prompt_width - attention_mask[first_rows, :prompt_width].sum(1)
    segment_start = packed(torch.arange(prompt_width, device=device).minimum(prompt_start[:, None]),
                           row_start[:, None].expand(-1, steps.numel()),
                           torch.arange(slots, device=device) % length)

    def sees(batch, head, query, key):
        real_prompt = (key < prompt_width) & (key >= prompt_start[batch])
        return (key <= query) & ((key >= segment_start[batch, query]) | real_prompt)

    make_block_mask = _compiled_create_block_mask() if input_ids.is_cuda else create_block_mask
    block_mask = make_block_mask(sees, groups, None, length, length, device=device)
    kept = torch.arange(prompt_width - 1, length, device=device)
    logits = model(input_ids=input_ids, attention_mask=block_mask, position_ids=positions, use_cache=False,
                   logits_to_keep=kept).logits
    width = length - prompt_width + 1
    scored_at = prompt_of_row[:, None] * width + row_start[:, None] - prompt_width + 1 + steps
    targets = completion_ids.new_zeros(groups * width + 1)
    targets.scatter_(0, torch.where(is_input, scored_at, groups * width).reshape(-1), completion_ids[:, 1:].reshape(-1))
    return PackedLogits(logits=logits, targets=targets[:-1].view(groups, width),
                        first_logits=logits[:, 0].index_select(0, prompt_of_row)[:, None],
                        first_targets=completion_ids[:, :1], row_index=torch.where(is_input, scored_at, 0))
