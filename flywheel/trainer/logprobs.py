"""Per-token log-probabilities (and entropies) of completions under a causal LM, as the engine computes them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import MethodType

import torch
from torch import nn
from transformers import PreTrainedModel

from flywheel.trainer.prompt_packing import packed_completion_logits, packs_prompts

# Logit rows taken to float32 at once: bounds the float32 temporaries (a few of ~128 MiB each).
CHUNK_ELEMENTS = 2**25


def _row_chunks(logits: torch.Tensor) -> list[slice]:
    rows = max(1, CHUNK_ELEMENTS // logits.size(-1))
    return [slice(start, start + rows) for start in range(0, logits.size(0), rows)]


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


class _ChunkedRows:
    """The two passes with torch operations, in float32 over chunks of rows (the CPU's path; on a GPU
    `logps_kernels` does each in one Triton pass)."""

    @staticmethod
    def forward(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, logsumexp: torch.Tensor,
                logps: torch.Tensor, entropy: torch.Tensor | None) -> None:
        for rows in _row_chunks(logits):
            scaled = _scaled(logits[rows], temperature)
            logsumexp[rows] = scaled.logsumexp(-1)
            logps[rows] = scaled.gather(-1, token_ids[rows, None]).squeeze(-1) - logsumexp[rows]
            if entropy is not None:
                log_probs = scaled - logsumexp[rows, None]
                entropy[rows] = -log_probs.exp().mul_(log_probs).sum(-1)

    @staticmethod
    def backward(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, logsumexp: torch.Tensor,
                 grad_logps: torch.Tensor, grad_logits: torch.Tensor) -> None:
        # d logp / d logits = (onehot(token) − softmax) / temperature
        grad_scaled = grad_logps / temperature
        for rows in _row_chunks(logits):
            grad = grad_scaled[rows, None]
            probs = (_scaled(logits[rows], temperature) - logsumexp[rows, None]).exp_()
            grad_logits[rows] = probs.mul_(-grad).scatter_add_(-1, token_ids[rows, None], grad)


class _TokenLogps(torch.autograd.Function):
    """log softmax(logits / temperature) at `token_ids` of contiguous [N, V] logits, in float32.

    Autograd saves only the logits (in their own dtype) and one float32 logsumexp per row; the backward
    pass recomputes the softmax. Entropies come from the same pass and carry no gradient. `passes`
    computes both passes (`_ChunkedRows` or the Triton `logps_kernels`).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, with_entropy: bool,
                passes) -> tuple[torch.Tensor, torch.Tensor | None]:
        logsumexp = logits.new_empty(logits.size(0), dtype=torch.float32)
        logps = torch.empty_like(logsumexp)
        entropy = torch.empty_like(logsumexp) if with_entropy else None
        passes.forward(logits, token_ids, temperature, logsumexp, logps, entropy)
        ctx.save_for_backward(logits, token_ids, logsumexp)
        ctx.temperature, ctx.passes = temperature, passes
        if entropy is not None:
            ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor, grad_entropy: torch.Tensor | None):
        logits, token_ids, logsumexp = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        ctx.passes.backward(logits, token_ids, ctx.temperature, logsumexp, grad_logps, grad_logits)
        return grad_logits, None, None, None, None


def token_logps_and_entropy(logits: torch.Tensor, token_ids: torch.Tensor, *, temperature: float = 1.0,
                            with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log_softmax(logits / temperature) at `token_ids`, and the entropy of each distribution (no gradient).

    logits [B, T, V], token_ids [B, T] → ([B, T], [B, T] or None), in float32 whatever the logits' dtype.
    Contiguous logits are read in place; others are copied once. On a GPU, one Triton pass each way.
    """
    passes = _ChunkedRows
    if logits.is_cuda:
        from flywheel.trainer import logps_kernels

        passes = logps_kernels
    rows = logits.reshape(-1, logits.size(-1)).contiguous()
    logps, entropy = _TokenLogps.apply(rows, token_ids.reshape(-1).contiguous(), temperature, with_entropy, passes)
    return logps.view(token_ids.shape), (entropy.view(token_ids.shape) if with_entropy else None)


def float32_lm_head(model: PreTrainedModel) -> None:
    """Make `model` compute its language-modeling head in float32: the head's weights cast to float32, and its
    input on every call, outside autocast (which would take the projection back to half precision).

    The head needs weights of its own: tied to the input embeddings, those would be cast with it.
    """
    head = model.get_output_embeddings()
    if head.weight is model.get_input_embeddings().weight:
        raise ValueError(f"cast_lm_head_to_fp32 needs a language-modeling head with weights of its own, but "
                         f"{type(model).__name__} ties them to its input embeddings (tie_word_embeddings=True): "
                         "set cast_lm_head_to_fp32=False or use a model with untied embeddings")
    head.float()
    head.forward = MethodType(_float32_projection, head)


def _float32_projection(head: nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    with torch.autocast(hidden_states.device.type, enabled=False):
        return nn.functional.linear(hidden_states.float(), head.weight, head.bias)


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
    share_prompts: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities [B, C] of the completion tokens given their prompts, at `temperature`.

    Prompts are left-padded ([B, P], mask 0 on padding), completions right-padded ([B, C]).
    Position ids count only real tokens, so a padded row scores exactly as the unpadded sequence
    does in the engine. `batch_size` splits the forward into chunks (for no-grad passes). With
    `share_prompts`, rows whose prompt is the previous row's (a group's completions) share one forward
    of it: packed behind it in one sequence when the model takes packed forwards (`prompt_packing`),
    otherwise through a cache of its keys and values. By default they share on the CPU, and on a GPU
    when the model packs.
    """
    if share_prompts is None:
        # On a GPU, sharing needs the packed attention: over a cache, transformers' attention takes a
        # materialized mask and the extra forward doubles the kernel launches (bench.train_step).
        share_prompts = not prompt_ids.is_cuda or packs_prompts(model)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    score = functools.partial(token_logps_and_entropy, temperature=temperature, with_entropy=with_entropy)
    step = batch_size or prompt_ids.size(0)
    all_logps, all_entropies = [], []
    for start in range(0, prompt_ids.size(0), step):
        rows = slice(start, start + step)
        logps, entropy = _chunk_logps(model, prompt_ids[rows], attention_mask[rows], position_ids[rows],
                                      completion_ids[rows], share_prompts, score)
        all_logps.append(logps)
        all_entropies.append(entropy)
    logps = torch.cat(all_logps)
    return logps, (torch.cat(all_entropies) if with_entropy else None)


def _chunk_logps(model: nn.Module, prompt_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, completion_ids: torch.Tensor, share_prompts: bool,
                 score: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    groups = _prompt_groups(prompt_ids, attention_mask[:, :prompt_ids.size(1)]) if share_prompts else None
    if groups is not None and completion_ids.size(1) >= 2 and packs_prompts(model):
        spans = packed_completion_logits(model, prompt_ids, attention_mask, position_ids, completion_ids, *groups)
    else:
        spans = _completion_logits(model, prompt_ids, attention_mask, position_ids, completion_ids, groups)
    parts = [score(logits, ids) for logits, ids in spans]
    entropy = _side_by_side([entropy for _, entropy in parts]) if parts[0][1] is not None else None
    return _side_by_side([logps for logps, _ in parts]), entropy


def _side_by_side(spans: list[torch.Tensor]) -> torch.Tensor:
    """Column spans [B, n_i] as one [B, Σ n_i] tensor; a single span as it is."""
    return spans[0] if len(spans) == 1 else torch.cat(spans, dim=1)


def _completion_logits(model: nn.Module, prompt_ids: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor, completion_ids: torch.Tensor,
                       groups: tuple[torch.Tensor, torch.Tensor] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The logits that predict the completion tokens, as (logits [B, n, V], token ids [B, n]) column spans;
    with `groups`, each distinct prompt runs once and hands its keys and values on as a cache."""
    prompt_width = prompt_ids.size(1)
    if groups is None or completion_ids.size(1) < 2 or _checkpoints_activations(model):
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        # The LM head runs over the positions that predict completion tokens only; its logits come out contiguous.
        predicting = torch.arange(prompt_width - 1, input_ids.size(1) - 1, device=input_ids.device)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False, logits_to_keep=predicting).logits
        return [(logits, completion_ids)]
    first_rows, prompt_of_row = groups
    # Each distinct prompt runs once; its keys and values (with their gradient path) are then indexed
    # out to every row that continues it. The last completion token predicts nothing that is scored.
    prompts = model(input_ids=prompt_ids[first_rows], attention_mask=attention_mask[first_rows, :prompt_width],
                    position_ids=position_ids[first_rows, :prompt_width], use_cache=True, logits_to_keep=1)
    cache = prompts.past_key_values
    cache.batch_select_indices(prompt_of_row)
    continuations = model(input_ids=completion_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                          position_ids=position_ids[:, prompt_width:-1], past_key_values=cache, use_cache=True).logits
    first_logits = prompts.logits.index_select(0, prompt_of_row)
    return [(first_logits, completion_ids[:, :1]), (continuations, completion_ids[:, 1:])]


def _prompt_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(The first row of each run of rows with one prompt, each row's run), or None when no row repeats."""
    repeats = (prompt_ids[1:] == prompt_ids[:-1]).all(-1) & (prompt_mask[1:] == prompt_mask[:-1]).all(-1)
    starts = torch.cat([repeats.new_ones(1), ~repeats])
    first_rows = starts.nonzero().squeeze(1)
    if len(first_rows) == len(prompt_ids):
        return None
    return first_rows, starts.long().cumsum(0) - 1


def _checkpoints_activations(model: nn.Module) -> bool:
    """Whether a training forward recomputes layers in backward (and so cannot hand a cache on)."""
    return model.training and any(getattr(module, "gradient_checkpointing", False) for module in model.modules())
