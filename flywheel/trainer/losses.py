"""The GRPO and DPO objectives as pure functions of log-probabilities (no model, no trainer)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def per_token_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """The k3 estimator of KL(π ‖ π_ref) per token: exp(r) − r − 1, r = log π_ref − log π (always ≥ 0)."""
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - log_ratio - 1


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (0 when the mask is empty)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_extremes(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of `values` where `mask` is 1 (NaN when the mask is empty), without leaving the device."""
    kept = mask.bool()
    empty = ~kept.any()
    low = torch.where(kept, values, float("inf")).min().masked_fill(empty, float("nan"))
    high = torch.where(kept, values, float("-inf")).max().masked_fill(empty, float("nan"))
    return low, high


IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def importance_sampling_weights(old_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor, *,
                                mode: str, clip_min: float | None, clip_max: float | None) -> torch.Tensor:
    """[B, T] weights π_old / π_engine that correct for the engine's probabilities differing from the trainer's.

    'token_*' weighs each token by its own ratio; 'sequence_*' weighs every token of a completion by the
    completion's ratio (the product of its tokens'). '*_truncate' clamps a ratio into [clip_min, clip_max];
    '*_mask' sets a ratio outside it to 0, leaving those tokens out of the gradient. A bound of None is no bound.
    """
    if mode not in IMPORTANCE_SAMPLING_MODES:
        raise ValueError(f"unknown importance-sampling mode {mode!r}; choose one of {IMPORTANCE_SAMPLING_MODES}")
    level, constraint = mode.split("_")
    log_ratio = old_logps - sampling_logps
    if level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True)
    ratio = torch.exp(log_ratio)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    if constraint == "truncate":
        weights = ratio.clamp(low, high)
    else:
        weights = ratio.masked_fill((ratio < low) | (ratio > high), 0.0)
    return weights.expand_as(old_logps)


def off_policy_sequence_mask(advantages: torch.Tensor, logps: torch.Tensor, sampling_logps: torch.Tensor,
                             mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """[B, 1] off-policy sequence masking (DeepSeek-V3.2): 0 for a completion whose advantage is negative and
    whose mean per-token log π_sampling − log π_θ over `mask` exceeds `threshold`, else 1.

    `advantages` is [B]. A bad completion the policy has drifted far from misleads the update more than it
    teaches; good completions are kept however stale.
    """
    log_ratio = (sampling_logps - logps.detach()) * mask
    mean_kl = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    keep = (advantages.unsqueeze(1) >= 0) | (mean_kl <= threshold)
    return keep.to(logps.dtype)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    loss_type: str,
    epsilon_low: float,
    epsilon_high: float,
    importance_sampling_level: str = "token",
    delta: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    kl_bias_correction: bool = False,
    importance_weights: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
    off_policy_mask_threshold: float | None = None,
    sampling_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    num_items_in_batch: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO surrogate of one micro-batch, and its statistics.

    Args:
        logps: [B, T] log π_θ of each completion token (with grad).
        old_logps: [B, T] log π_θ_old (the policy that generated); equal to `logps.detach()` on-policy.
        advantages: [B] one advantage per completion.
        completion_mask: [B, T] 1 for tokens in the loss.
        loss_type: 'grpo' (mean per sequence, then over sequences), 'bnpo' (mean over the batch's tokens),
            'dr_grpo' (token sum ÷ (B × max_completion_length)), 'dapo' (token sum ÷ num_items_in_batch).
        epsilon_low, epsilon_high: the ratio is clipped to [1 − epsilon_low, 1 + epsilon_high].
        importance_sampling_level: 'token' (a ratio per token) or 'sequence' (GSPO: one ratio per
            completion, exp of the mean of its tokens' log-ratios, clipped as a whole).
        delta: with a value, the unclipped ratio is also capped at delta (two-sided clipping: a token
            with a negative advantage cannot weigh more than delta).
        beta: weight of the per-token KL to `ref_logps`.
        kl_bias_correction: multiply the per-token KL by the probability ratio π_θ / π_old (at
            `importance_sampling_level`, with its gradient), which makes it an unbiased estimate of the
            KL of π_θ from samples of π_old (DeepSeek-V3.2).
        importance_weights: [B, T] weights π_old / π_engine (`importance_sampling_weights`), or None.
        entropy_mask: [B, T] 1 for the tokens whose policy term counts (`top_entropy_quantile`), or None;
            the KL term and the normalisation still count every token of `completion_mask`.
        off_policy_mask_threshold: with a value, the policy term of a completion with a negative advantage
            is dropped when its mean log π_sampling − log π_θ exceeds it (`off_policy_sequence_mask`).
        sampling_logps: [B, T] log π of the policy that sampled the completions (the engine's); default
            `old_logps`.
        max_completion_length: the normaliser of 'dr_grpo'.
        num_items_in_batch: the normaliser of 'dapo' (the step's token count); default: this batch's.

    Returns:
        (loss, stats) with stats 'kl' (when beta > 0, as the loss weighs it), 'clip_ratio/low', 'clip_ratio/high',
        'clip_ratio/region' (fractions of tokens, detached).
    """
    mask = completion_mask.to(logps.dtype)
    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    elif importance_sampling_level != "token":
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; choose token or sequence")
    ratio = torch.exp(log_ratio).expand_as(logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    unclipped_ratio = ratio if delta is None else torch.clamp(ratio, max=delta)
    advantages = advantages.unsqueeze(1)
    per_token_loss = -torch.min(unclipped_ratio * advantages, clipped_ratio * advantages)
    if off_policy_mask_threshold is not None:
        reference = old_logps if sampling_logps is None else sampling_logps
        per_token_loss = per_token_loss * off_policy_sequence_mask(advantages.squeeze(1), logps, reference, mask,
                                                                   off_policy_mask_threshold)
    if importance_weights is not None:
        per_token_loss = per_token_loss * importance_weights
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    stats: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs ref_logps")
        kl = per_token_kl(logps, ref_logps)
        if kl_bias_correction:
            kl = kl * ratio
        per_token_loss = per_token_loss + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask)

    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type == "dapo":
        normaliser = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = (per_token_loss * mask).sum() / normaliser
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose grpo, bnpo, dr_grpo or dapo")

    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
        stats["clip_ratio/low"] = masked_mean(low.to(mask.dtype), mask)
        stats["clip_ratio/high"] = masked_mean(high.to(mask.dtype), mask)
        stats["clip_ratio/region"] = masked_mean((low | high).to(mask.dtype), mask)
    return loss, stats


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards β·(log π − log π_ref) of chosen and rejected.

    All inputs are [B] sums of completion-token log-probabilities. 'sigmoid' is −log σ(β·h) and 'ipo'
    is (h − 1/(2β))², with h = (chosen − rejected) − (ref_chosen − ref_rejected).
    """
    logits = (chosen_logps - rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose 'sigmoid' or 'ipo'")
    chosen_rewards = beta * (chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
