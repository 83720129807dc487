"""Reward plumbing: reward functions and reward models behind one call, weighting, group advantages."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

RewardFunc = Callable[..., Sequence[float | None]]


class RewardModelScorer:
    """A sequence-classification model (one logit) used as a reward function.

    Called like a reward function: `scorer(prompts=..., completions=...)` → one float per completion.
    Conversational prompts are rendered with the reward model's chat template, the completion as the
    assistant's turn; plain prompts are concatenated with the completion text.
    """

    def __init__(self, model: str | PreTrainedModel, processing_class: PreTrainedTokenizerBase | None = None,
                 *, batch_size: int = 32, max_length: int | None = None, trust_remote_code: bool = False) -> None:
        if isinstance(model, str):
            model = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1,
                                                                       trust_remote_code=trust_remote_code)
        if processing_class is None:
            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path,
                                                             trust_remote_code=trust_remote_code)
        if processing_class.pad_token is None:
            processing_class.pad_token = processing_class.eos_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = processing_class.pad_token_id
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = processing_class
        self.batch_size = batch_size
        self.max_length = max_length
        self.__name__ = model.config._name_or_path.rstrip("/").split("/")[-1] or type(model).__name__

    def to(self, device: torch.device | str) -> RewardModelScorer:
        self.model.to(device)
        return self

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if isinstance(prompt, list):
                messages = prompt + (completion if isinstance(completion, list) else
                                     [{"role": "assistant", "content": completion}])
                texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
            else:
                texts.append(prompt + completion)
        return texts

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        texts = self.texts(prompts, completions)
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=self.max_length is not None, max_length=self.max_length,
                                     add_special_tokens=False).to(device)
            logits = self.model(**encoded).logits
            scores.extend(logits[:, 0].float().tolist())
        return scores


def char_fraction_reward(chars: str, name: str | None = None) -> RewardFunc:
    """A reward function: the fraction of a completion's characters that are in `chars` (a toy task to learn)."""
    wanted = set(chars)

    def reward(completions: Sequence[Any], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [sum(ch in wanted for ch in text) / max(len(text), 1) for text in texts]

    reward.__name__ = name or "char_fraction"
    return reward


def load_reward_funcs(
    reward_funcs: RewardFunc | str | PreTrainedModel | Sequence[RewardFunc | str | PreTrainedModel],
    processing_classes: PreTrainedTokenizerBase | Sequence[PreTrainedTokenizerBase | None] | None = None,
    trust_remote_code: bool = False,
) -> list[RewardFunc]:
    """Normalise reward functions, reward-model paths (loaded with `trust_remote_code`) and reward models into a
    list of callables."""
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs:
        raise ValueError("reward_funcs is empty: give at least one reward function or reward model")
    if processing_classes is None or isinstance(processing_classes, PreTrainedTokenizerBase):
        processing_classes = [processing_classes] * len(funcs)
    if len(processing_classes) != len(funcs):
        raise ValueError(
            f"reward_processing_classes has {len(processing_classes)} entries for {len(funcs)} reward functions"
        )
    loaded: list[RewardFunc] = []
    for func, tokenizer in zip(funcs, processing_classes, strict=True):
        if isinstance(func, (str, PreTrainedModel)):
            loaded.append(RewardModelScorer(func, tokenizer, trust_remote_code=trust_remote_code))
        elif callable(func):
            loaded.append(func)
        else:
            raise TypeError(f"a reward function must be callable, a model path or a PreTrainedModel, got {type(func)}")
    return loaded


def reward_func_name(func: RewardFunc) -> str:
    """The name logged for a reward function (`rewards/<name>/mean`)."""
    return getattr(func, "__name__", None) or type(func).__name__


def compute_rewards(
    reward_funcs: Sequence[RewardFunc],
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]],
    columns: dict[str, Sequence[Any]],
    **extra: Any,
) -> torch.Tensor:
    """Rewards [N, num_funcs] of N completions; `None` from a function becomes NaN (skipped when combined).

    Each function gets prompts, completions, completion_ids and every other dataset column as
    keyword arguments (one value per completion), plus `extra` (e.g. trainer_state). A column of one of
    those names is shadowed by the trainer's value.
    """
    rewards = torch.full((len(completions), len(reward_funcs)), float("nan"))
    for column, func in enumerate(reward_funcs):
        values = func(**{**columns, **extra, "prompts": list(prompts), "completions": list(completions),
                         "completion_ids": [list(ids) for ids in completion_ids]})
        values = list(values)
        if len(values) != len(completions):
            raise ValueError(
                f"reward function {reward_func_name(func)!r} returned {len(values)} rewards for "
                f"{len(completions)} completions"
            )
        rewards[:, column] = torch.tensor([float("nan") if v is None else float(v) for v in values])
    return rewards


def combine_rewards(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum over functions, skipping NaN (a function that abstained); [N, F] → [N]."""
    if torch.isnan(rewards_per_func).all(dim=1).any():
        logger.warning("every reward function returned None for some completion; its reward counts as 0")
    return (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)


def group_std(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """[N] the standard deviation of each reward's group of `num_generations` (contiguous); 0 for groups of one."""
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}")
    if num_generations == 1:
        return torch.zeros_like(rewards)
    return rewards.view(-1, num_generations).std(dim=1).repeat_interleave(num_generations)


def group_advantages(rewards: torch.Tensor, num_generations: int,
                     scale_rewards: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages = reward − mean of its group of `num_generations`, divided by a std per `scale_rewards`.

    `rewards` is [N] with the groups contiguous. Returns (advantages [N], group std [N]); 'group'
    divides by the group's std, 'batch' by the std of all N rewards, 'none' not at all (+1e-4 guards 0).
    """
    std = group_std(rewards, num_generations)
    group_mean = rewards.view(-1, num_generations).mean(dim=1).repeat_interleave(num_generations)
    advantages = rewards - group_mean
    if scale_rewards == "group":
        advantages = advantages / (std + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (_batch_std(rewards) + 1e-4)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return advantages, std


def decoupled_group_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor,
                               num_generations: int) -> torch.Tensor:
    """GDPO's advantages [N] of rewards [N, F]: each function's rewards normalised within their group (mean,
    std + 1e-4; NaN skipped), their weighted sum, then that normalised over all N.

    Normalising each function apart keeps one with a wide range from drowning the others' signal.
    """
    if rewards_per_func.size(0) % num_generations:
        raise ValueError(f"{rewards_per_func.size(0)} rewards do not split into groups of {num_generations}")
    grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.size(1))
    mean = grouped.nanmean(dim=1, keepdim=True)
    count = (~grouped.isnan()).sum(dim=1, keepdim=True)
    # A function scoring one completion of a group gets a NaN std (0/0), so it drops out of that row's sum.
    std = (((grouped - mean) ** 2).nansum(dim=1, keepdim=True) / (count - 1)).sqrt()
    normalised = ((grouped - mean) / (std + 1e-4)).flatten(0, 1)
    total = (normalised * weights.unsqueeze(0)).nansum(dim=1)
    return (total - total.mean()) / (_batch_std(total) + 1e-4)


def _batch_std(values: torch.Tensor) -> torch.Tensor:
    """The std of all values; 0 for a single one."""
    return values.std() if values.numel() > 1 else torch.zeros((), dtype=values.dtype, device=values.device)
