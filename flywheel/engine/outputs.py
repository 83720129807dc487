"""What generation returns: RequestOutput and CompletionOutput, in the shapes vLLM users know."""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


@dataclass
class Logprob:
    """A token's log-probability and its rank (1 = most likely) in the distribution."""

    logprob: float
    rank: int


class TokenLogprobs(Sequence[dict[int, Logprob]]):
    """A completion's per-token logprobs in flat sequences, read as one ``dict[token_id, Logprob]`` per
    token (the sampled token first, then the top-k); a token's dict is built only when read."""

    __slots__ = ("num_top", "_sampled_ids_and_ranks", "_sampled_logprobs", "_top_ids", "_top_logprobs")

    def __init__(self, num_top: int = 0) -> None:
        self.num_top = num_top
        # (token id, rank) of each sampled token, one after the other: a single list to grow keeps the
        # engine's per-token cost low. The logprobs in a C array: a trainer pads them into a tensor
        # with one copy instead of converting each number.
        self._sampled_ids_and_ranks: list[int] = []
        self._sampled_logprobs = array("d")
        self._top_ids: list[int] = []  # num_top per token, most likely first
        self._top_logprobs: list[float] = []

    def append(self, token_id: int, logprob: float, rank: int,
               top: tuple[Sequence[int], Sequence[float]] | None = None) -> None:
        """Add a token: its logprob, its rank, and the top-k (ids, logprobs) when asked for."""
        self._sampled_ids_and_ranks.extend((token_id, rank))
        self._sampled_logprobs.append(logprob)
        if top is not None:
            self._top_ids.extend(top[0])
            self._top_logprobs.extend(top[1])

    @property
    def sampled(self) -> array:
        """The sampled tokens' logprobs (a C array of doubles: a sequence of floats)."""
        return self._sampled_logprobs

    def __len__(self) -> int:
        return len(self._sampled_logprobs)

    def __getitem__(self, index):
        positions = range(len(self))[index]
        if isinstance(positions, range):
            return [self._entry(position) for position in positions]
        return self._entry(positions)

    def __iter__(self) -> Iterator[dict[int, Logprob]]:
        return map(self._entry, range(len(self)))

    def __eq__(self, other) -> bool:
        if isinstance(other, (TokenLogprobs, list)):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"TokenLogprobs({list(self)!r})"

    def _entry(self, position: int) -> dict[int, Logprob]:
        token_id, rank = self._sampled_ids_and_ranks[2 * position : 2 * position + 2]
        entry = {token_id: Logprob(self._sampled_logprobs[position], rank)}
        start, end = position * self.num_top, (position + 1) * self.num_top
        top = zip(self._top_ids[start:end], self._top_logprobs[start:end])
        for top_rank, (top_id, top_logprob) in enumerate(top, start=1):
            entry.setdefault(top_id, Logprob(top_logprob, top_rank))
        return entry


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: TokenLogprobs | None
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
