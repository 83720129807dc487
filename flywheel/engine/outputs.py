"""What generation returns: RequestOutput and CompletionOutput, in the shapes vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """A token's log-probability and its rank (1 = most likely) in the distribution."""

    logprob: float
    rank: int


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    cumulative_logprob: float | None = None


@dataclass
class RequestOutput:
    """A request's prompt and its completions, sorted by index."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
