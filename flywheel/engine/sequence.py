"""Per-sequence state: tokens, KV-cache block table, status and the sampled logprobs."""

from __future__ import annotations

import enum
import math
from itertools import count

import torch

from flywheel.engine.outputs import TokenLogprobs
from flywheel.engine.sampling import SamplingParams

_sequence_ids = count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One completion being generated: prompt tokens followed by the tokens sampled so far."""

    def __init__(
        self,
        request_id: str,
        index: int,
        prompt_token_ids: list[int],
        params: SamplingParams,
        seed: int | None,
    ) -> None:
        self.seq_id = next(_sequence_ids)
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        # Tokens that end this sequence (stop_token_ids, and EOS unless ignored); set by the engine.
        self.stop_token_ids: set[int] = set(params.stop_token_ids)
        # The length (prompt included) at which it ends, by max_tokens or the context; set by the engine.
        self.length_limit = math.inf
        # A seeded request's noise key for this completion; the CPU sampler's generator comes from it.
        self.seed = seed
        self.generator: torch.Generator | None = None
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        # Bumped whenever block_table changes, so a copy of it knows when to refresh.
        self.table_version = 0
        # Tokens whose keys and values are in the cache (a prefix hit or an earlier step).
        self.num_cached_tokens = 0
        self.num_hashed_blocks = 0
        # The block pool's prefix-cache epoch when this sequence's cache blocks were allocated.
        self.cache_epoch = 0
        # Completions 1..n-1 of a request wait here until this one's prompt is prefilled, then fork.
        self.pending_forks: list[Sequence] = []
        self.logprobs = TokenLogprobs(params.logprobs) if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_text_end: int | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks_needed(self, block_size: int) -> int:
        return -(-len(self.token_ids) // block_size)

    def fork(self, child: Sequence) -> None:
        """Make ``child`` share this sequence's prompt and cache blocks (the caller counts the refs)."""
        child.token_ids = list(self.token_ids)
        child.num_prompt_tokens = self.num_prompt_tokens
        child.block_table = list(self.block_table)
        child.table_version += 1
        child.num_cached_tokens = self.num_cached_tokens
        child.num_hashed_blocks = self.num_hashed_blocks
        child.cache_epoch = self.cache_epoch
        child.status = SequenceStatus.RUNNING
