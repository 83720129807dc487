"""Prompts in and completions out: chat templates, tokenization with left truncation, decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase


def is_conversational(prompt: Any) -> bool:
    """True for a conversation: a list of {role, content} messages."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def prompt_text(prompt: str | list[dict[str, str]], tokenizer: PreTrainedTokenizerBase) -> str:
    """The text the model sees: a plain prompt as is, a conversation through the chat template."""
    if is_conversational(prompt):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string or a list of {{role, content}} messages, got {type(prompt)}")
    return prompt


def tokenize_prompts(prompts: Sequence[Any], tokenizer: PreTrainedTokenizerBase,
                     max_prompt_length: int | None) -> list[list[int]]:
    """Token ids of each prompt, keeping the last `max_prompt_length` tokens of long ones."""
    texts = [prompt_text(prompt, tokenizer) for prompt in prompts]
    # The chat template already carries any BOS token; plain prompts are taken as written (as TRL does).
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if max_prompt_length is not None:
        ids = [row[-max_prompt_length:] for row in ids]
    return ids


def decode_completions(prompts: Sequence[Any], completion_ids: Sequence[Sequence[int]],
                       tokenizer: PreTrainedTokenizerBase) -> list[Any]:
    """Completion texts; for conversational prompts, an assistant message list as TRL's reward functions get."""
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return [
        [{"role": "assistant", "content": text}] if is_conversational(prompt) else text
        for prompt, text in zip(prompts, texts, strict=True)
    ]
