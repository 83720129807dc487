"""Pairwise judges for Online DPO: which of two completions of a prompt is better."""

from __future__ import annotations

import functools
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flywheel.trainer.prompts import is_conversational
from flywheel.trainer.rewards import RewardFunc, RewardModelScorer, combine_rewards, compute_rewards, load_reward_funcs

# TRL's template for showing a conversation to a judge, free of any model's special tokens.
SIMPLE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize() + ': ' + message['content'] + '\n\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


@functools.cache
def _simple_chat_template():
    import jinja2  # comes with chat templates, which only conversational prompts need

    return jinja2.Environment().from_string(SIMPLE_CHAT_TEMPLATE)


def judge_text(prompt_or_completion: Any) -> Any:
    """What a pairwise judge reads, as in TRL: a conversation (prompt, or a completion's assistant message)
    rendered as 'Role: content' paragraphs; plain text as it is."""
    if is_conversational(prompt_or_completion):
        return _simple_chat_template().render(messages=prompt_or_completion)
    return prompt_or_completion


class PairwiseJudge(ABC):
    """Ranks pairs of completions (TRL's interface, so TRL judges and LLM judges fit)."""

    @abstractmethod
    def judge(self, prompts: Sequence[Any], completions: Sequence[Sequence[Any]],
              shuffle_order: bool = True) -> list[int]:
        """For each prompt and its pair of completions, the index (0 or 1) of the better one; -1 if undecided.

        `OnlineDPOTrainer` hands over text: conversations rendered by `judge_text`, as TRL does. `shuffle_order`
        asks a judge that could favour a position (an LLM) to see each pair in random order.
        """


class RewardFunctionJudge(PairwiseJudge):
    """Ranks by a weighted sum of reward functions (the completion with the higher score wins; ties go to 0)."""

    def __init__(self, reward_funcs: RewardFunc | str | PreTrainedModel | Sequence[RewardFunc | str | PreTrainedModel],
                 reward_weights: Sequence[float] | None = None,
                 processing_classes: PreTrainedTokenizerBase | Sequence[PreTrainedTokenizerBase | None] | None = None,
                 trust_remote_code: bool = False) -> None:
        self.reward_funcs = load_reward_funcs(reward_funcs, processing_classes, trust_remote_code)
        weights = list(reward_weights) if reward_weights is not None else [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(weights)} values for {len(self.reward_funcs)} reward functions")
        self.weights = torch.tensor(weights, dtype=torch.float32)

    def scores(self, prompts: Sequence[Any], completions: Sequence[Any],
               completion_ids: Sequence[Sequence[int]] | None = None, columns: dict[str, Sequence[Any]] | None = None,
               **extra: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(total score [N], per-function rewards [N, F]) of N completions; `columns` go to the functions."""
        if completion_ids is None:
            completion_ids = [[] for _ in completions]
        per_func = compute_rewards(self.reward_funcs, prompts, completions, completion_ids, columns or {}, **extra)
        return combine_rewards(per_func, self.weights), per_func

    def judge(self, prompts: Sequence[Any], completions: Sequence[Sequence[Any]],
              shuffle_order: bool = True) -> list[int]:
        flat_prompts = [prompt for prompt in prompts for _ in range(2)]
        flat_completions = [completion for pair in completions for completion in pair]
        totals, _ = self.scores(flat_prompts, flat_completions)
        pairs = totals.view(-1, 2)
        return [0 if first >= second else 1 for first, second in pairs.tolist()]


class RewardModelJudge(RewardFunctionJudge):
    """Ranks by a reward model (a sequence-classification model with one logit), given by path or object."""

    def __init__(self, model: str | PreTrainedModel, processing_class: PreTrainedTokenizerBase | None = None,
                 trust_remote_code: bool = False) -> None:
        super().__init__([RewardModelScorer(model, processing_class, trust_remote_code=trust_remote_code)])


class RandomPairwiseJudge(PairwiseJudge):
    """Picks at random: a baseline, and a stand-in while wiring a pipeline."""

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def judge(self, prompts: Sequence[Any], completions: Sequence[Sequence[Any]],
              shuffle_order: bool = True) -> list[int]:
        return [self.rng.randint(0, 1) for _ in prompts]
