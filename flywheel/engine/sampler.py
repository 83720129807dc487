"""From logits to sampled tokens and their logprobs, for a whole batch at once on its device.

Order of processing: penalties (repetition, presence, frequency), the min_tokens ban on stop
tokens, temperature, then top-k / top-p / min-p truncation and the draw. "Processed" logprobs are
the log-softmax after penalties and temperature; "raw" ones the log-softmax of the model's logits.
The draw is one uniform per row against the running sum of the probabilities: on a GPU in two
Triton kernels over the logits (``kernels.sampling``: each chunk's maximum and sum, then the row's
chunk and column), through which a batch that needs none of the processing above beyond temperature
goes alone; on the CPU with torch operations. Either way a request with a seed draws from its own
stream, whatever else is in the batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from operator import attrgetter

import torch

from flywheel.engine.host_to_device import to_device
from flywheel.engine.sequence import Sequence


_seq_id = attrgetter("seq_id")


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]
    # Per row, when a row of the batch asked for logprobs: the sampled token's rank (1 = most likely),
    # and the top-k (token ids, logprobs) where k > 0.
    ranks: list[int] | None = None
    top: list[tuple[list[int], list[float]] | None] | None = None


@dataclass
class SamplingTensors:
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    repetition_penalty: torch.Tensor
    presence_penalty: torch.Tensor
    frequency_penalty: torch.Tensor


@dataclass
class BatchSampling:
    """What the sampler derives from a batch's sampling params; reused while the batch's rows stay."""

    key: tuple[int, ...]
    tensors: SamplingTensors
    # Only temperature (and the ban of stop tokens before min_tokens) applies to any row.
    temperature_only: bool
    has_min_tokens: bool
    has_seeds: bool
    wants_logprobs: bool


# Tokens per chunk of the CPU draw's two-level running sum.
_DRAW_CHUNK = 1024


def _draw_below(running_sums: torch.Tensor, fractions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first index whose running sum exceeds ``fractions`` (in [0, 1)) of the row's total,
    and that target; the target stays strictly below the total so that a positive width is hit."""
    total = running_sums[:, -1]
    targets = torch.minimum(fractions * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(running_sums, targets[:, None], right=True)[:, 0], targets


def needs_processing(params, vocab_size: int) -> bool:
    """Whether a request needs more than temperature before its draw, or top-k logprobs after it
    (the sampled token's logprob and rank come with the draw)."""
    return (
        params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        or 0 < params.top_k < vocab_size or params.top_p < 1.0 or params.min_p > 0.0
        or bool(params.logprobs) or (params.logprobs_mode == "raw" and params.temperature not in (0.0, 1.0))
    )


def _draw_output(drawn: torch.Tensor) -> SamplerOutput:
    """The draw kernel's [ids, logprobs(, ranks)] rows (float64, on the host) for the engine."""
    # The sampled token's rank only: no top-k alternatives on this path.
    ranks = drawn[2].long().tolist() if len(drawn) == 3 else None
    return SamplerOutput(drawn[0].long().tolist(), drawn[1].tolist(), ranks)


@dataclass
class PendingDraw:
    """A GPU draw on its way to the host."""

    token_ids: torch.Tensor  # [rows] on the device
    host: torch.Tensor  # pinned; filled once ``copied`` completes
    copied: torch.cuda.Event

    def result(self) -> SamplerOutput:
        self.copied.synchronize()
        return _draw_output(self.host)


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        # Keys of the GPU draw's noise, one per step; seeded rows use their own.
        self.step_seeds = random.Random(seed)
        self.draw_tokens = None
        if device.type == "cuda":
            from flywheel.engine import kernels

            self.draw_tokens = kernels.draw_tokens
        self._batch: BatchSampling | None = None

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], stop_ids: list[set[int]]) -> SamplerOutput:
        batch = self._batch_sampling(seqs)
        banned = []
        if batch.has_min_tokens:
            banned = [(row, ids) for row, (seq, ids) in enumerate(zip(seqs, stop_ids))
                      if ids and seq.num_completion_tokens < seq.params.min_tokens]
        if self.draw_tokens is not None and batch.temperature_only and not banned:
            return _draw_output(self._draw(logits, seqs, batch).cpu())
        return self._sample_processed(logits, seqs, batch, banned)

    def can_draw_async(self, seqs: list[Sequence]) -> bool:
        """Whether ``draw_async`` can sample this batch: on a GPU, with nothing but temperature to apply."""
        batch = self._batch_sampling(seqs)
        return self.draw_tokens is not None and batch.temperature_only and not batch.has_min_tokens

    def draw_async(self, logits: torch.Tensor, seqs: list[Sequence]) -> PendingDraw:
        """Sample without waiting for the GPU: the ids stay on the device for the next step's input,
        and a copy of the results travels to the host behind the GPU's work."""
        drawn = self._draw(logits, seqs, self._batch_sampling(seqs))
        host = torch.empty(drawn.shape, dtype=drawn.dtype, pin_memory=True)
        host.copy_(drawn, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return PendingDraw(drawn[0].long(), host, copied)

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence], batch: BatchSampling) -> torch.Tensor:
        """The draw kernel's [ids, logprobs] (and the sampled tokens' ranks when asked for), float64 on the device."""
        return self.draw_tokens(logits, batch.tensors.temperature, self._step_seed(), self._row_seeds(seqs, batch),
                                with_ranks=batch.wants_logprobs)

    def _sample_processed(self, logits: torch.Tensor, seqs: list[Sequence], batch: BatchSampling, banned) -> SamplerOutput:
        logits = logits.float()
        raw_logits = logits
        params = [seq.params for seq in seqs]
        tensors = batch.tensors
        if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
            logits = self._apply_penalties(logits, seqs, tensors)
        if banned:
            logits = logits.clone()
            for row, ids in banned:
                logits[row, list(ids)] = float("-inf")
        greedy = tensors.temperature == 0.0
        temperature = torch.where(greedy, torch.ones_like(tensors.temperature), tensors.temperature)
        logits = logits / temperature[:, None]
        processed_logprobs = torch.log_softmax(logits, dim=-1)

        if all(p.greedy for p in params):
            sampled = logits.argmax(dim=-1)
        else:
            probs = self._truncate(processed_logprobs.exp(), tensors, params)
            if self.draw_tokens is not None:
                # The same noise as the temperature-only pass: truncation only masks tokens out.
                kept = logits.masked_fill(probs == 0, float("-inf"))
                sampled = self.draw_tokens(kept, greedy.float().neg().add(1.0), self._step_seed(),
                                           self._row_seeds(seqs, batch))[0].long()
            else:
                sampled = self._inverse_cdf_draw(probs, seqs)
                if bool(greedy.any()):
                    sampled = torch.where(greedy, logits.argmax(dim=-1), sampled)

        want_raw = [p.logprobs_mode == "raw" for p in params]
        logprobs = processed_logprobs
        if any(want_raw):
            raw = torch.log_softmax(raw_logits, dim=-1)
            logprobs = torch.where(torch.tensor(want_raw, device=logits.device)[:, None], raw, processed_logprobs)
        sampled_logprobs = logprobs.gather(1, sampled[:, None])[:, 0]
        ranks, top = self._top_logprobs(logprobs, sampled_logprobs, params)
        # One device-to-host transfer for the ids and their logprobs (ids are exact in float64).
        ids_and_logprobs = torch.stack([sampled.double(), sampled_logprobs.double()]).cpu().tolist()
        return SamplerOutput([int(t) for t in ids_and_logprobs[0]], ids_and_logprobs[1], ranks, top)

    def _batch_sampling(self, seqs: list[Sequence]) -> BatchSampling:
        key = tuple(map(_seq_id, seqs))
        if self._batch is None or self._batch.key != key:
            params = [seq.params for seq in seqs]
            # The n completions of a request share one params object: each is looked at once.
            distinct = {id(p): p for p in params}.values()
            self._batch = BatchSampling(
                key=key,
                tensors=self._tensors(params),
                temperature_only=not any(needs_processing(p, self.vocab_size) for p in distinct),
                has_min_tokens=any(p.min_tokens > 0 for p in distinct),
                has_seeds=any(seq.seed is not None for seq in seqs),
                wants_logprobs=any(p.logprobs is not None for p in distinct),
            )
        return self._batch

    def _step_seed(self) -> int:
        return self.step_seeds.getrandbits(62)

    def _row_seeds(self, seqs: list[Sequence], batch: BatchSampling) -> torch.Tensor | None:
        """Per-row noise keys for the GPU draw: a seeded sequence's own, moved on by its length."""
        if not batch.has_seeds:
            return None
        keys = [-1 if seq.seed is None else (seq.seed + seq.num_completion_tokens * 0x9E3779B9) & 0x3FFF_FFFF_FFFF_FFFF
                for seq in seqs]
        return to_device([torch.tensor(keys, dtype=torch.long)], self.device)[0]

    def _tensors(self, params) -> SamplingTensors:
        floats = torch.tensor([[p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                                p.frequency_penalty] for p in params], dtype=torch.float32).reshape(-1, 6)
        top_k = torch.tensor([min(p.top_k, self.vocab_size) if p.top_k > 0 else self.vocab_size for p in params],
                             dtype=torch.long)
        # One pinned copy: a copy from pageable memory may wait for the work queued on the GPU.
        floats, top_k = to_device([floats.t().contiguous(), top_k], self.device)
        temperature, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty = floats
        return SamplingTensors(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                               repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                               frequency_penalty=frequency_penalty)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence], tensors: SamplingTensors) -> torch.Tensor:
        rows, vocab = logits.shape
        seen = torch.zeros(rows, vocab, dtype=torch.bool, device=self.device)
        output_counts = torch.zeros(rows, vocab, dtype=torch.float32, device=self.device)
        for row, seq in enumerate(seqs):
            all_ids = torch.tensor(seq.token_ids, dtype=torch.long, device=self.device).clamp(max=vocab - 1)
            seen[row, all_ids] = True
            completion = all_ids[seq.num_prompt_tokens :]
            output_counts[row].index_add_(0, completion, torch.ones_like(completion, dtype=torch.float32))
        penalty = tensors.repetition_penalty[:, None]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
        logits = logits - tensors.frequency_penalty[:, None] * output_counts
        return logits - tensors.presence_penalty[:, None] * (output_counts > 0).float()

    def _truncate(self, probs: torch.Tensor, tensors: SamplingTensors, params) -> torch.Tensor:
        if any(0 < p.top_k < self.vocab_size or p.top_p < 1.0 for p in params):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            ranks = torch.arange(probs.shape[-1], device=probs.device)[None, :]
            drop = ranks >= tensors.top_k[:, None]
            # Of the top k, keep the smallest set whose share of their mass reaches top_p (always the most
            # likely one): top_p applies to the distribution left by top_k, as in vLLM and transformers.
            kept = sorted_probs.masked_fill(drop, 0.0)
            mass_before = (kept.cumsum(dim=-1) - kept) / kept.sum(dim=-1, keepdim=True)
            drop |= mass_before >= tensors.top_p[:, None]
            drop[:, 0] = False
            probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
        if any(p.min_p > 0 for p in params):
            threshold = tensors.min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs

    def _inverse_cdf_draw(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row from the (unnormalized) ``probs``, by one uniform draw per row against the
        running sum: a generator call per row instead of one per token. The sum runs in float64 over
        chunk totals, then within the chosen chunk only, so a large vocabulary costs one pass over the
        probabilities. A zero-probability token adds no width, so it is never drawn."""
        rows, vocab = probs.shape
        uniforms = self._uniforms(seqs)
        if vocab <= _DRAW_CHUNK:
            return _draw_below(probs.double().cumsum(dim=-1), uniforms)[0]
        whole = vocab - vocab % _DRAW_CHUNK
        totals = probs[:, :whole].view(rows, -1, _DRAW_CHUNK).sum(dim=-1)
        if whole < vocab:
            totals = torch.cat([totals, probs[:, whole:].sum(dim=-1, keepdim=True)], dim=1)
        chunk_ends = totals.double().cumsum(dim=-1)
        picked, targets = _draw_below(chunk_ends, uniforms)
        end = chunk_ends.gather(1, picked[:, None])[:, 0]
        start = chunk_ends.gather(1, (picked - 1).clamp(min=0)[:, None])[:, 0].masked_fill(picked == 0, 0.0)
        columns = picked[:, None] * _DRAW_CHUNK + torch.arange(_DRAW_CHUNK, device=probs.device)
        chunk_probs = probs.gather(1, columns.clamp(max=vocab - 1)).masked_fill(columns >= vocab, 0.0)
        within, _ = _draw_below(chunk_probs.double().cumsum(dim=-1), (targets - start) / (end - start))
        return picked * _DRAW_CHUNK + within

    def _uniforms(self, seqs: list[Sequence]) -> torch.Tensor:
        """One U[0, 1) draw per row, a seeded row's from its own generator."""
        uniforms = torch.rand(len(seqs), dtype=torch.float64, device=self.device, generator=self.generator)
        for row, seq in enumerate(seqs):
            if seq.seed is not None:
                if seq.generator is None:
                    seq.generator = torch.Generator(device=self.device).manual_seed(seq.seed)
                uniforms[row] = torch.rand((), dtype=torch.float64, device=self.device, generator=seq.generator)
        return uniforms

    def _top_logprobs(self, logprobs: torch.Tensor, sampled_logprobs: torch.Tensor,
                      params) -> tuple[list[int] | None, list[tuple[list[int], list[float]] | None] | None]:
        """The sampled tokens' ranks and each row's top-k (ids, logprobs); (None, None) when no row asks."""
        wanted = [p.logprobs for p in params]
        if all(k is None for k in wanted):
            return None, None
        k_max = max(k or 0 for k in wanted)
        ranks = (logprobs > sampled_logprobs[:, None]).sum(dim=-1) + 1
        top_values, top_ids = logprobs.topk(k_max, dim=-1) if k_max else (logprobs[:, :0], logprobs[:, :0].long())
        top_values, top_ids, ranks = top_values.tolist(), top_ids.tolist(), ranks.tolist()
        return ranks, [(top_ids[row][:k], top_values[row][:k]) if k else None for row, k in enumerate(wanted)]
