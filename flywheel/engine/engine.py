"""LLMEngine: requests in, one scheduled batch per step, finished requests out."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from itertools import repeat

import torch
from transformers import AutoTokenizer, GenerationConfig

from flywheel.engine.config import EngineConfig
from flywheel.engine.host_to_device import to_device
from flywheel.engine.kv_cache import BlockManager
from flywheel.engine.outputs import CompletionOutput, RequestOutput
from flywheel.engine.sampler import PendingDraw, Sampler, SamplerOutput
from flywheel.engine.sampling import SamplingParams
from flywheel.engine.scheduler import Scheduler
from flywheel.engine.sequence import Sequence, SequenceStatus
from flywheel.engine.tensor_parallel import RankGroup

logger = logging.getLogger(__name__)

# Stands in for a token still being sampled on the device (never a valid id).
_PLACEHOLDER = -1


def _plan_num_blocks(runner, *args) -> int:
    return runner.plan_num_blocks(*args)


@dataclass
class EngineStats:
    prefill_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    preemptions: int = 0
    generated_tokens: int = 0
    steps: int = 0


@dataclass
class _InFlightStep:
    """A step (a decode, or a prefill) whose sampled tokens have not reached the host yet."""

    rows: list[Sequence]
    stop_ids: list[set[int]]
    draw: PendingDraw


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    stream: bool = False
    seqs: list[Sequence] = field(default_factory=list)
    unfinished: int = 0  # of its seqs


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._in_flight: _InFlightStep | None = None
        self._drained: list[RequestOutput] = []
        self.ranks = RankGroup(config)
        self.runner = self.ranks.runner
        self.hf_config = self.runner.hf_config
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, revision=config.revision,
                                                       trust_remote_code=config.trust_remote_code)
        self.max_model_len = self._max_model_len()
        self.max_num_batched_tokens = config.max_num_batched_tokens or max(8192, self.max_model_len)
        if self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len})"
            )
        self.num_blocks = min(
            self.collective_rpc(_plan_num_blocks, self.max_model_len, config.max_num_seqs, self.max_num_batched_tokens)
        )
        capacity = self.num_blocks * config.block_size
        if capacity < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({self.num_blocks} blocks), fewer than max_model_len "
                f"({self.max_model_len}): give it more memory or lower max_model_len"
            )
        self._allocate_kv_cache()
        self.block_manager = BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, self.max_num_batched_tokens)
        self.sampler = Sampler(self.hf_config.vocab_size, self.runner.device, config.seed)
        self.eos_token_ids = self._eos_token_ids()
        self.requests: dict[str, _Request] = {}
        self.stats = EngineStats()
        self.sleeping = False
        self.closed = False
        # Steps overlap with the host's bookkeeping on one GPU (see step()).
        self.overlap_decode = self.runner.device.type == "cuda" and config.tensor_parallel_size == 1
        # The block pool is hundreds of thousands of long-lived objects; a rollout's per-token outputs
        # set off many full garbage collections, each of which would walk them all.
        gc.collect()
        gc.freeze()
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens; %.1f sequences of max_model_len %d)",
            self.num_blocks, config.block_size, capacity, capacity / self.max_model_len, self.max_model_len,
        )

    def _max_model_len(self) -> int:
        limit = getattr(self.hf_config, "max_position_embeddings", None) or 2048
        if self.config.max_model_len is None:
            return limit
        if self.config.max_model_len > limit:
            raise ValueError(f"max_model_len {self.config.max_model_len} exceeds the model's context length {limit}")
        return self.config.max_model_len

    def _eos_token_ids(self) -> set[int]:
        sources = [getattr(self.hf_config, "eos_token_id", None), self.tokenizer.eos_token_id]
        try:
            sources.append(GenerationConfig.from_pretrained(self.config.model).eos_token_id)
        except OSError:
            pass  # a checkpoint without generation_config.json
        ids = set()
        for value in sources:
            ids.update(value if isinstance(value, list) else [] if value is None else [value])
        return ids

    # Requests ------------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        stream: bool = False,
    ) -> None:
        """Queue a request. With ``stream``, every step that extends it also returns its output so
        far (``finished=False``); otherwise only its final output is returned."""
        self._check_open()
        if self.sleeping:
            raise RuntimeError("the engine is asleep: call wake_up() before generating")
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate_prompt(prompt_token_ids)
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n ({params.n}) must be <= max_num_seqs ({self.config.max_num_seqs})")
        request = _Request(request_id, prompt, list(prompt_token_ids), stream)
        vocab = self.hf_config.vocab_size
        outside = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if outside:
            raise ValueError(f"stop_token_ids must be in [0, {vocab}); got {outside[:5]}")
        stop_ids = self._stop_token_ids(params)
        if params.min_tokens and len(stop_ids) >= vocab:
            raise ValueError("min_tokens: the stop tokens (stop_token_ids, and EOS unless ignore_eos) are every token "
                             "of the vocabulary, so none can be generated before min_tokens; stop on fewer tokens")
        length_limit = min(len(prompt_token_ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        for index in range(params.n):
            seq = Sequence(request_id, index, prompt_token_ids, params, self._completion_seed(params, index))
            seq.stop_token_ids = stop_ids
            seq.length_limit = length_limit
            request.seqs.append(seq)
        request.unfinished = params.n
        parent = request.seqs[0]
        parent.pending_forks = request.seqs[1:]
        self.requests[request_id] = request
        self.scheduler.add(parent)

    def validate_prompt(self, prompt_token_ids: list[int]) -> None:
        if len(prompt_token_ids) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens; max_model_len is {self.max_model_len}, "
                "which must leave room for at least one generated token"
            )
        vocab = self.hf_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}")

    @staticmethod
    def _completion_seed(params: SamplingParams, index: int) -> int | None:
        return None if params.seed is None else hash((params.seed, index)) & 0x7FFF_FFFF_FFFF

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self.requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._drained)

    # Steps ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch (prefill or decode); return the requests that finished in it, and the
        progress of the streamed ones it extended.

        On one GPU a step does not wait for its tokens: the next decode step is launched with the
        sampled ids still on the device, one placeholder token per sequence on the host, and only
        then are the previous step's tokens appended and checked for stops. A sequence that stopped
        has computed one token too many, which is dropped.
        """
        if self._in_flight is not None:
            return self._drained_outputs() + self._step_in_flight()
        batch = self.scheduler.schedule()
        if batch is None:
            return self._drained_outputs()
        self.stats.steps += 1
        if batch.is_prefill:
            self.stats.prefill_tokens += batch.num_new_tokens
        logits = self.ranks.execute(self.runner.prepare(batch))
        rows = [s for seq in batch.seqs for s in (seq, *seq.pending_forks)] if batch.is_prefill else batch.seqs
        stop_ids = [seq.stop_token_ids for seq in rows]
        # The decode launched behind a step continues that step's rows only: a prefill overlaps when
        # its sequences are all that run (a batch's start), or the others would wait behind them.
        alone = not batch.is_prefill or len(self.scheduler.running) == len(batch.seqs)
        if self.overlap_decode and alone and self.sampler.can_draw_async(rows):
            draw = self.sampler.draw_async(logits, rows)
            if batch.is_prefill:
                self._prefilled(batch.seqs)
            self._in_flight = _InFlightStep(rows, stop_ids, draw)
            return self._drained_outputs()
        sampled = self.sampler(logits, rows, stop_ids)
        if batch.is_prefill:
            self._prefilled(batch.seqs)
        return self._drained_outputs() + self._finish_step(rows, sampled, stop_ids)

    def _prefilled(self, seqs: list[Sequence]) -> None:
        """The prompts of a launched prefill: their blocks hashed for reuse, their sequences' siblings forked."""
        for seq in seqs:
            seq.num_cached_tokens = len(seq)
            self.block_manager.register_computed_blocks(seq)
            self._fork(seq)

    def _step_in_flight(self) -> list[RequestOutput]:
        previous, self._in_flight = self._in_flight, None
        if not self.scheduler.waiting:  # waiting prompts are prefilled first, as the scheduler does
            self._launch_next_decode(previous)
        return self._complete(previous)

    def _complete(self, step: _InFlightStep) -> list[RequestOutput]:
        """Wait for the tokens of a step in flight, then append them and check for stops."""
        return self._finish_step(step.rows, step.draw.result(), step.stop_ids)

    def _launch_next_decode(self, previous: _InFlightStep) -> None:
        """Launch the decode step after ``previous`` before its tokens are known, when that needs no
        preemption: every sequence of it that its pending token cannot end takes a placeholder."""
        running, rows = SequenceStatus.RUNNING, previous.rows
        # A sequence whose pending token reaches its length limit takes no further step.
        kept = [row for row, seq in enumerate(rows) if seq.status is running and len(seq.token_ids) + 1 < seq.length_limit]
        seqs = rows if len(kept) == len(rows) else [rows[row] for row in kept]
        if not seqs or not self.sampler.can_draw_async(seqs):
            return
        for seq in seqs:
            seq.token_ids.append(_PLACEHOLDER)
        batch = self.scheduler.schedule_decode_without_preemption(seqs)
        if batch is None:
            for seq in seqs:
                seq.token_ids.pop()
            return
        ids = previous.draw.token_ids
        stop_ids = previous.stop_ids
        if seqs is not rows:
            ids = ids[to_device([torch.tensor(kept)], ids.device)[0]]
            stop_ids = [stop_ids[row] for row in kept]
        self.stats.steps += 1
        logits = self.ranks.execute(self.runner.prepare(batch, input_ids=ids))
        self._in_flight = _InFlightStep(seqs, stop_ids, self.sampler.draw_async(logits, seqs))

    def _finish_step(self, rows: list[Sequence], sampled: SamplerOutput, stop_ids: list[set[int]]) -> list[RequestOutput]:
        finished = self._append_tokens(rows, sampled, stop_ids)
        self.stats.preemptions = self.scheduler.num_preemptions
        self.stats.prefix_cache_hit_tokens = self.block_manager.prefix_cache_hit_tokens
        return finished

    def _drain(self) -> None:
        """Wait for a step in flight and keep its outputs for the next ``step``."""
        if self._in_flight is not None:
            previous, self._in_flight = self._in_flight, None
            self._drained += self._complete(previous)

    def _drained_outputs(self) -> list[RequestOutput]:
        outputs, self._drained = self._drained, []
        return outputs

    def _fork(self, parent: Sequence) -> None:
        for child in parent.pending_forks:
            self.block_manager.fork(parent, child)
            self.scheduler.running.append(child)
        parent.pending_forks = []

    def _stop_token_ids(self, params: SamplingParams) -> set[int]:
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= self.eos_token_ids
        return ids

    def _append_tokens(self, rows: list[Sequence], sampled: SamplerOutput, stop_ids: list[set[int]]) -> list[RequestOutput]:
        """Put each row's sampled token in place of its placeholder (or after its tokens), mark the
        positions whose keys and values are now in the cache, and finish the rows that stop.

        One pass over the rows: it runs once per decode step for every sequence of the batch.
        """
        finished_requests = []
        streamed: dict[str, _Request] = {}
        any_streamed = any(request.stream for request in self.requests.values())
        running = SequenceStatus.RUNNING
        block_manager, block_size = self.block_manager, self.block_manager.block_size
        appended = 0
        any_finished = False
        ranks = sampled.ranks or repeat(0)
        tops = sampled.top or repeat(None)
        for seq, token, logprob, rank, top, stops in zip(rows, sampled.token_ids, sampled.logprobs, ranks, tops,
                                                         stop_ids):
            if seq.status is not running:
                continue  # stopped or aborted while this step was in flight
            ids = seq.token_ids
            # Every position before the placeholder (or the new token) has its keys and values cached now.
            if ids[-1] == _PLACEHOLDER:
                cached = len(ids) - 1
                ids[-1] = token
            else:
                cached = len(ids)
                ids.append(token)
            seq.num_cached_tokens = cached
            if cached // block_size > seq.num_hashed_blocks:
                block_manager.register_computed_blocks(seq)
            appended += 1
            seq.cumulative_logprob += logprob
            if seq.logprobs is not None:
                seq.logprobs.append(token, logprob, rank, top)
            # Most rows go on: the full check only where a stop or the length limit is possible.
            if token in stops or len(ids) >= seq.length_limit or seq.params.stop:
                reason = self._finish_reason(seq, token, stops)
                if reason is not None:
                    any_finished = True
                    seq.finish_reason = reason
                    self.scheduler.finish(seq)
                    request = self.requests.get(seq.request_id)
                    if request is not None:
                        request.unfinished -= 1
                        if not request.unfinished:
                            finished_requests.append(self._request_output(self.requests.pop(seq.request_id)))
            if any_streamed:
                request = self.requests.get(seq.request_id)
                if request is not None and request.stream:
                    streamed[request.request_id] = request
        if any_finished:
            self.scheduler.remove_finished()
        self.stats.generated_tokens += appended
        # A request that finished in this step (after a sibling put it here) is reported once, finished.
        partial = [self._request_output(request, finished=False) for request in streamed.values()
                   if request.request_id in self.requests]
        return finished_requests + partial

    def _finish_reason(self, seq: Sequence, token: int, stop_ids: set[int]) -> str | None:
        params = seq.params
        if len(seq.token_ids) - seq.num_prompt_tokens >= params.min_tokens:
            if token in stop_ids:
                return "stop"
            if params.stop and self._hits_stop_string(seq):
                return "stop"
        if len(seq.token_ids) >= seq.length_limit:
            return "length"
        return None

    def _hits_stop_string(self, seq: Sequence) -> bool:
        """Whether the newest token completes a stop string; if so, marks where the output text ends.

        Only a stop string that ends in the newest token's text counts, as in vLLM: the text before it
        was checked at its own step, or was inside `min_tokens`.
        """
        params = seq.params
        ids = seq.completion_token_ids
        longest = max(len(stop) for stop in params.stop)
        # A stop string of L characters spans at most 4L byte-level tokens.
        window = ids[-(4 * longest + 4) :]
        tail = self._completion_text(window, params)
        new_chars = max(0, len(tail) - len(self._completion_text(window[:-1], params)))
        if not any(stop in tail[max(0, len(tail) - new_chars - len(stop) + 1) :] for stop in params.stop):
            return False
        text = self._completion_text(ids, params)
        starts = [(text.find(stop, max(0, len(text) - new_chars - len(stop) + 1)), stop) for stop in params.stop]
        found = [(position, stop) for position, stop in starts if position >= 0]
        if not found:
            return False
        position, stop = min(found)
        seq.stop_text_end = position + len(stop) if params.include_stop_str_in_output else position
        return True

    def _completion_text(self, token_ids: list[int], params: SamplingParams) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=params.skip_special_tokens)

    def _request_output(self, request: _Request, finished: bool = True) -> RequestOutput:
        outputs = []
        for seq in request.seqs:
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=self._output_text(seq),
                    token_ids=seq.completion_token_ids,
                    logprobs=seq.logprobs,
                    finish_reason=seq.finish_reason,
                    cumulative_logprob=seq.cumulative_logprob,
                )
            )
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outputs, finished)

    def _output_text(self, seq: Sequence) -> str:
        if not seq.params.detokenize:
            return ""
        ids = seq.completion_token_ids
        if seq.finish_reason == "stop" and seq.stop_text_end is None and not seq.params.include_stop_str_in_output:
            ids = ids[:-1]  # a stop token's text is left out (its id stays in token_ids), as in vLLM
        text = self._completion_text(ids, seq.params)
        if seq.stop_text_end is not None:
            return text[: seq.stop_text_end]
        if not seq.is_finished and seq.params.stop:
            # Hold back what could still turn out to be the start of a stop string.
            return text[: max(0, len(text) - max(len(stop) for stop in seq.params.stop) + 1)]
        return text

    # Weights and memory ----------------------------------------------------------------------

    def load_weights(self, weights) -> None:
        self._drain()
        self.ranks.load_weights(weights)
        self.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        self.block_manager.reset_prefix_cache()

    def collective_rpc(self, fn, *args) -> list:
        """Run ``fn(model_runner, *args)`` on every tensor-parallel rank; the results by rank."""
        self._drain()
        return self.ranks.collective_rpc(fn, *args)

    def sleep(self) -> None:
        """Release the KV cache (and with it every cached prefix) until ``wake_up``."""
        if self.has_unfinished_requests():
            raise RuntimeError("cannot sleep with requests in flight")
        self.ranks.call("free_kv_cache")
        self.block_manager.reset_prefix_cache()
        self.sleeping = True

    def wake_up(self) -> None:
        self._check_open()
        if self.sleeping:
            self._allocate_kv_cache()
            self.sleeping = False

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the engine was shut down: create a new LLM to generate again")

    def _allocate_kv_cache(self) -> None:
        self.ranks.call("allocate_kv_cache", self.num_blocks)
        self.ranks.call("capture_decode_graphs")

    def shutdown(self) -> None:
        """Release the KV cache and stop the other ranks' processes; the engine takes no requests after this."""
        if self.closed:
            return
        try:
            self._drain()
            self.ranks.call("free_kv_cache")
        finally:
            self.ranks.shutdown()
            self.closed = True
