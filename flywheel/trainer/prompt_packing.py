"""A batch's groups packed behind one copy of their prompt, for a single forward with fewer tokens.

Rows that share a prompt (a group's completions, kept together by the repeat sampler) run as one flat
sequence: each distinct prompt once (its tokens first, its padding after them), then every row's
completion tokens, all rows padded to one width. Every layer but attention sees only those tokens, so
the prompt runs through the MLPs and projections once per group instead of once per row. Attention
splits the sequence back: each prompt attends causally to itself, and each row's completion to its
group's prompt tokens and its own earlier tokens. Position ids continue each prompt in every row, so
each row scores exactly as it does alone; it stays one forward, gradient checkpointing included.

On a GPU in half precision that attention is one variable-length flash call (each prompt and each row
a segment; a row's keys are its prompt's then its own, and the kernel's causal mask aligned to the
segment's end lets it see the whole prompt). Elsewhere it is two sdpa calls, the rows' with a mask.

The packed forward needs the model's attention to split it: `enable_packed_prompts` gives an sdpa
model the `PACKED_ATTENTION` implementation, which is sdpa for every other forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None

PACKED_ATTENTION = "flywheel_packed"


@dataclass(frozen=True)
class PackedLayout:
    """Where each group's prompt and each row's completion sit in a packed sequence of G·P + B·W tokens."""

    prompt_keys: torch.Tensor  # [G, P] bool: which of a prompt's P slots hold a token (the first ones)
    prompt_of_row: torch.Tensor  # [B] each row's group
    row_mask: torch.Tensor  # [B, 1, W, P + W] the keys each row's query sees: its prompt's, then its own
    key_index: torch.Tensor  # [G·P + B·(P + W)] the varlen keys: the prompts, then each row's prompt and own
    key_read: torch.Tensor  # [G·P + B·(P + W), 1, 1] bool: the keys before the last segment's end
    cu_seq_q: torch.Tensor  # [G + B + 1] int32 segment starts in the sequence
    cu_seq_k: torch.Tensor  # [G + B + 1] int32 segment starts in the gathered keys

    @staticmethod
    def build(prompt_lengths: torch.Tensor, prompt_width: int, prompt_of_row: torch.Tensor,
              width: int) -> PackedLayout:
        groups, rows, device = len(prompt_lengths), len(prompt_of_row), prompt_lengths.device
        slots = torch.arange(prompt_width, device=device)
        prompt_keys = slots < prompt_lengths[:, None]
        own = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        row_mask = torch.cat([prompt_keys[prompt_of_row, None, :].expand(rows, width, prompt_width),
                              own.expand(rows, width, width)], dim=-1)[:, None]
        # A row's key segment: its prompt's tokens, then its own W; the index is sized for full prompts
        # (no host sync), and the tail past the last segment is never read.
        row_lengths = prompt_lengths[prompt_of_row] + width
        row_starts = torch.cat([row_lengths.new_zeros(1), row_lengths.cumsum(0)])
        position = torch.arange(rows * (prompt_width + width), device=device)
        row = (torch.searchsorted(row_starts, position, right=True) - 1).clamp(max=rows - 1)
        offset = position - row_starts[row]
        prompt_length = prompt_lengths[prompt_of_row[row]]
        row_keys = torch.where(offset < prompt_length, prompt_of_row[row] * prompt_width + offset,
                               groups * prompt_width + row * width + offset - prompt_length)
        key_index = torch.cat([torch.arange(groups * prompt_width, device=device),
                               row_keys.clamp(max=groups * prompt_width + rows * width - 1)])
        prompt_starts = torch.arange(groups + 1, device=device) * prompt_width
        cu_seq_q = torch.cat([prompt_starts, prompt_starts[-1] + torch.arange(1, rows + 1, device=device) * width])
        cu_seq_k = torch.cat([prompt_starts, prompt_starts[-1] + row_starts[1:]])
        key_read = (torch.arange(len(key_index), device=device) < cu_seq_k[-1])[:, None, None]
        return PackedLayout(prompt_keys, prompt_of_row, row_mask, key_index, key_read, cu_seq_q.int(), cu_seq_k.int())

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(groups G, prompt width P, rows B, row width W)."""
        return (*self.prompt_keys.shape, self.row_mask.size(0), self.row_mask.size(2))


# This torch's `varlen_attn` signature (it changed between releases), read once: not inside a compiled forward.
_VARLEN_PARAMETERS = inspect.signature(varlen_attn).parameters if varlen_attn is not None else {}
# Causal from each segment's end; key heads fewer than query heads.
_VARLEN_OPTIONS = {"window_size": (-1, 0)} if "window_size" in _VARLEN_PARAMETERS else {"is_causal": True}
if "enable_gqa" in _VARLEN_PARAMETERS:
    _VARLEN_OPTIONS["enable_gqa"] = True
_TAKES_SCALE = "scale" in _VARLEN_PARAMETERS
_FLASH_VARLEN = varlen_attn is not None and torch.backends.cuda.is_flash_attention_available()


def _runs_flash_varlen(query: torch.Tensor, scaling: float | None) -> bool:
    """Whether the flash kernel takes this attention (half precision on a GPU, and a scale it can apply)."""
    default_scale = scaling is None or scaling == query.size(-1) ** -0.5
    return (_FLASH_VARLEN and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and query.size(-1) <= 256 and (_TAKES_SCALE or default_scale))


def _varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: PackedLayout,
                      scaling: float | None) -> torch.Tensor:
    """[1, heads, N, dim] → [1, N, heads, dim] in one flash call over the layout's segments."""
    _, prompt_width, _, width = layout.shape
    # The kernel leaves the gradient of keys past the last segment unwritten: masked, it flows back as zeros.
    keys, values = (torch.where(layout.key_read, states[0].transpose(0, 1).index_select(0, layout.key_index), 0)
                    for states in (key, value))
    scale = {"scale": scaling} if _TAKES_SCALE and scaling is not None else {}
    output = varlen_attn(query[0].transpose(0, 1), keys, values, layout.cu_seq_q, layout.cu_seq_k,
                         max(prompt_width, width), prompt_width + width, **scale, **_VARLEN_OPTIONS)
    return output[None]


def _split(states: torch.Tensor, groups: int, prompt_width: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, heads, N, dim] of a packed sequence → prompts [groups, heads, P, dim], rows [rows, heads, W, dim]."""
    heads, dim = states.size(1), states.size(-1)
    prompt_tokens = groups * prompt_width
    prompts = states[0, :, :prompt_tokens].view(heads, groups, prompt_width, dim).transpose(0, 1)
    completions = states[0, :, prompt_tokens:].view(heads, rows, -1, dim).transpose(0, 1)
    return prompts, completions


def _masked_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      layout: PackedLayout, scaling: float | None, dropout: float, **kwargs) -> torch.Tensor:
    """[1, heads, N, dim] → [1, N, heads, dim] in two sdpa calls: the prompts causal, the rows masked."""
    groups, prompt_width, rows, _ = layout.shape
    query_prompts, query_rows = _split(query, groups, prompt_width, rows)
    key_prompts, key_rows = _split(key, groups, prompt_width, rows)
    value_prompts, value_rows = _split(value, groups, prompt_width, rows)
    key_rows = torch.cat([key_prompts.index_select(0, layout.prompt_of_row), key_rows], dim=2)
    value_rows = torch.cat([value_prompts.index_select(0, layout.prompt_of_row), value_rows], dim=2)
    # A prompt's padding follows its tokens, so the causal mask alone keeps it from them.
    prompts, _ = sdpa_attention_forward(module, query_prompts, key_prompts, value_prompts, None, scaling=scaling,
                                        dropout=dropout, **kwargs)
    completions, _ = sdpa_attention_forward(module, query_rows, key_rows, value_rows, layout.row_mask,
                                            scaling=scaling, dropout=dropout, **kwargs)
    heads, dim = prompts.size(-2), prompts.size(-1)
    return torch.cat([prompts.reshape(-1, heads, dim), completions.reshape(-1, heads, dim)])[None]


def _packed_or_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None,
                              dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    layout = kwargs.pop("packed_layout", None)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout == 0.0 and _runs_flash_varlen(query, scaling):
        return _varlen_attention(query, key, value, layout, scaling), None
    return _masked_attention(module, query, key, value, layout, scaling, dropout, **kwargs), None


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
    prompt_lengths = attention_mask[first_rows, :prompt_width].sum(-1)
    # Each prompt's tokens moved in front of its padding (a roll of the left-padded row).
    slots = torch.arange(prompt_width, device=device)
    tokens_first = (slots + (prompt_width - prompt_lengths)[:, None]) % prompt_width
    prompts = prompt_ids[first_rows].gather(1, tokens_first)
    input_ids = torch.cat([prompts.reshape(-1), completion_ids[:, :-1].reshape(-1)])
    positions = torch.cat([slots.repeat(groups), position_ids[:, prompt_width:-1].reshape(-1)])
    layout = PackedLayout.build(prompt_lengths, prompt_width, prompt_of_row, width)
    # Each row's logits: at its prompt's last token (its first completion token), then at its completion
    # inputs; one [B, C] gather, so the logits and their gradient stay one tensor.
    prompt_ends = prompt_of_row * prompt_width + (prompt_lengths[prompt_of_row] - 1).clamp(min=0)
    row_inputs = groups * prompt_width + torch.arange(rows * width, device=device).view(rows, width)
    kept = torch.cat([prompt_ends[:, None], row_inputs], dim=1).view(-1)
    # A 4D mask reaches the layers as it is (the packed attention ignores it): no mask over the whole sequence.
    logits = model(input_ids=input_ids[None], attention_mask=layout.row_mask, position_ids=positions[None],
                   use_cache=False, logits_to_keep=kept, packed_layout=layout).logits
    return [(logits.view(rows, width + 1, -1), completion_ids)]
