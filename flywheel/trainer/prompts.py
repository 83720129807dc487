"""Prompts in and completions out: chat templates, tokenization with left truncation, decoding."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, TypeVar

from transformers import PreTrainedTokenizerBase

Prompt = TypeVar("Prompt")


def is_conversational(prompt: Any) -> bool:
    """True for a conversation: a list of {role, content} messages."""
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def prompt_text(prompt: str | list[dict[str, str]], tokenizer: PreTrainedTokenizerBase,
                chat_template_kwargs: dict[str, Any] | None = None) -> str:
    """The text the model sees: a plain prompt as is, a conversation through the chat template (given
    `chat_template_kwargs` besides the conversation, e.g. {"enable_thinking": False}).

    A conversation that ends with an assistant message is continued from it, as TRL does: that message
    is the start of the completion (`decode_completions` puts it back in front of the generated text).
    """
    if is_conversational(prompt):
        continues = _assistant_start(prompt) is not None
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=not continues,
                                             continue_final_message=continues, **(chat_template_kwargs or {}))
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string or a list of {{role, content}} messages, got {type(prompt)}")
    return prompt


def prompt_runs(prompts: Sequence[Prompt]) -> list[tuple[Prompt, int]]:
    """Consecutive repeats of one prompt as (prompt, count): a group's completions, rendered, tokenized and
    prefilled once."""
    runs: list[tuple[Prompt, int]] = []
    for prompt in prompts:
        if runs and runs[-1][0] == prompt:
            runs[-1] = (prompt, runs[-1][1] + 1)
        else:
            runs.append((prompt, 1))
    return runs


def tokenize_prompts(prompts: Sequence[Any], tokenizer: PreTrainedTokenizerBase, max_prompt_length: int | None,
                     chat_template_kwargs: dict[str, Any] | None = None) -> list[list[int]]:
    """Token ids of each prompt (rendered by `prompt_text`), keeping the last `max_prompt_length` tokens of long
    ones.

    A prompt repeated in consecutive entries is tokenized once, and those entries share its list of ids.
    """
    runs = prompt_runs(prompts)
    texts = [prompt_text(prompt, tokenizer, chat_template_kwargs) for prompt, _ in runs]
    # The chat template already carries any BOS token; plain prompts are taken as written (as TRL does).
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    if max_prompt_length is not None:
        ids = [row[-max_prompt_length:] for row in ids]
    return [row for row, (_, count) in zip(ids, runs) for _ in range(count)]


def decode_completions(prompts: Sequence[Any], completion_ids: Sequence[Sequence[int]],
                       tokenizer: PreTrainedTokenizerBase) -> list[Any]:
    """Completion texts; for conversational prompts, an assistant message list as TRL's reward functions get."""
    if _decodes_as_its_backend(type(tokenizer)) and not tokenizer.clean_up_tokenization_spaces:
        # One call into the Rust tokenizer for the whole batch: transformers decodes row by row in Python.
        texts = tokenizer.backend_tokenizer.decode_batch(completion_ids, skip_special_tokens=True)
    else:
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return [
        [{"role": "assistant", "content": (_assistant_start(prompt) or "") + text}] if is_conversational(prompt)
        else text
        for prompt, text in zip(prompts, texts, strict=True)
    ]


def reward_prompt(prompt: Any) -> Any:
    """The prompt as reward functions and judges get it, as in TRL: a conversation that ended with an assistant
    message without it (that message begins the completion they get)."""
    return prompt[:-1] if is_conversational(prompt) and _assistant_start(prompt) is not None else prompt


def _assistant_start(conversation: list[dict[str, str]]) -> str | None:
    """The content of the assistant message a conversation ends with (the completion's start), or None."""
    last = conversation[-1]
    return last["content"] if last["role"] == "assistant" else None


@functools.cache
def _decodes_as_its_backend(tokenizer_class: type) -> bool:
    """Whether a tokenizer class decodes exactly as its `tokenizers` backend does (no decoding of its own)."""
    fast_base = next((cls for cls in tokenizer_class.__mro__ if "backend_tokenizer" in vars(cls)), None)
    return fast_base is not None and all(
        getattr(tokenizer_class, name) is getattr(fast_base, name) for name in ("decode", "batch_decode", "_decode"))
