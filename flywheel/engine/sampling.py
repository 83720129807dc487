"""SamplingParams: how one request is sampled, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

MIN_REPETITION_PENALTY = 1e-4
FLOAT32_MAX = 3.4028234663852886e38


def repetition_penalty_problem(value: float) -> str | None:
    """Why `value` cannot be a repetition penalty, or None. Logits are divided or multiplied by it in
    float32: beyond this range they overflow or vanish."""
    if MIN_REPETITION_PENALTY <= value <= 1 / MIN_REPETITION_PENALTY:
        return None
    return (f"repetition_penalty must be in [{MIN_REPETITION_PENALTY:g}, {1 / MIN_REPETITION_PENALTY:g}] "
            f"(1 is off), got {value}")


@dataclass
class SamplingParams:
    """The sampling controls vLLM users know. ``temperature=0`` is greedy."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    logprobs_mode: Literal["processed", "raw"] = "processed"
    # False: completions' text stays empty and the tokenizer is never called (token ids are enough).
    detokenize: bool = True
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self._validate()

    def _validate(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(message)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                    f"{name} must be a finite number, got {value!r}")
        for name in ("top_k", "min_tokens"):
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool), f"{name} must be an integer, got {value!r}")
        for name in ("ignore_eos", "detokenize", "skip_special_tokens", "include_stop_str_in_output"):
            require(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        require(isinstance(self.n, int) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        # The sampler divides float32 logits by it: beyond float32's range that is 0/inf, and NaN follows.
        require(0.0 <= self.temperature <= FLOAT32_MAX,
                f"temperature must be in [0, {FLOAT32_MAX:.4g}] (float32's range), got {self.temperature}")
        require(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        require(self.top_k == -1 or self.top_k >= 1, f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        require(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        problem = repetition_penalty_problem(self.repetition_penalty)
        require(problem is None, problem)
        require(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        require(
            -2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"
        )
        require(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            f"max_tokens must be >= 1, got {self.max_tokens!r}",
        )
        require(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        require(
            self.max_tokens is None or self.min_tokens <= self.max_tokens,
            f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
        )
        require(all(isinstance(s, str) and s for s in self.stop), "stop must hold non-empty strings")
        require(self.detokenize or not self.stop, "stop strings need detokenize=True: they are matched in the text")
        require(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be ids >= 0")
        require(
            self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0),
            f"logprobs must be an integer >= 0, got {self.logprobs!r}",
        )
        require(
            self.logprobs_mode in ("processed", "raw"),
            f"logprobs_mode must be 'processed' or 'raw', got {self.logprobs_mode!r}",
        )
        require(self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
