"""The categorical draw of the sampler in two small passes over the logits: inverse-CDF with one uniform per row.

Per row: token = the column where the running sum of softmax(logits / T) first exceeds a uniform
draw (argmax of the logits when T = 0), and its logprob under log_softmax(logits / T) (T taken as 1
for greedy rows). The first kernel streams every row in chunks of columns, side by side, and writes
each chunk's maximum and its sum of exp(z − maximum); the second, one program per row, combines
those into the row's log-sum-exp, picks the chunk that the row's uniform falls in, and finds the
column inside it. Only the picked chunk is read twice; nothing of the vocabulary's size is written,
and no per-logit random number is drawn. A row's uniform comes from Philox keyed by the row's seed,
so a seeded sequence draws the same token whatever else is in the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_CHUNK = 2048  # columns whose statistics are kept together
_TARGET_PROGRAMS = 2048


@triton.jit
def _scaled(base, cols, end, scale):
    """z = logit / T in base 2 (log2 e · logit / T), -inf past the row's end."""
    x = tl.load(base + cols, mask=cols < end, other=0.0)
    return tl.where(cols < end, x.to(tl.float32) * scale, float("-inf"))


@triton.jit
def _scale(temperature):
    """The factor from a logit to z: log2 e / T (T taken as 1 for a greedy row)."""
    return tl.where(temperature == 0.0, 1.0, 1.0 / temperature) * _LOG2E


@triton.jit
def _chunk_stats_kernel(logits_ptr, stride_row, n_cols, temperature_ptr, stats_ptr, n_chunks, chunks_per_program,
                        CHUNK: tl.constexpr):
    """Each chunk's maximum z and Σ exp2(z − maximum) (0 for a chunk of masked logits only)."""
    row = tl.program_id(0)
    scale = _scale(tl.load(temperature_ptr + row))
    base = logits_ptr + row.to(tl.int64) * stride_row
    lane = tl.arange(0, CHUNK)
    first = tl.program_id(1) * chunks_per_program
    last = tl.minimum(first + chunks_per_program, n_chunks)
    for chunk in range(first, last):
        z = _scaled(base, chunk * CHUNK + lane, n_cols, scale)
        top = tl.max(z, 0)
        total = tl.sum(tl.exp2(z - tl.where(top == float("-inf"), 0.0, top)), 0)
        out = stats_ptr + (row * n_chunks + chunk) * 2
        tl.store(out, top)
        tl.store(out + 1, total)


@triton.jit(do_not_specialize=["step_seed"])
def _pick_kernel(logits_ptr, stride_row, n_cols, temperature_ptr, seeds_ptr, step_seed, stats_ptr, n_chunks,
                 out_ptr, n_rows, HAS_ROW_SEEDS: tl.constexpr, CHUNKS: tl.constexpr, CHUNK: tl.constexpr,
                 WITH_RANKS: tl.constexpr):
    """A row's token and logprob from its chunks' statistics and one pass over the chunk it picks."""
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    scale = _scale(temperature)
    index = tl.arange(0, CHUNKS)
    stats = stats_ptr + (row * n_chunks + index) * 2
    tops = tl.load(stats, mask=index < n_chunks, other=float("-inf"))
    sums = tl.load(stats + 1, mask=index < n_chunks, other=0.0)
    row_max = tl.max(tops, 0)
    weights = tl.where(tops == float("-inf"), 0.0, sums * tl.exp2(tops - row_max))
    row_sum = tl.sum(weights, 0)
    seed = step_seed + row
    if HAS_ROW_SEEDS:
        row_seed = tl.load(seeds_ptr + row)
        seed = tl.where(row_seed >= 0, row_seed, seed)
    target = tl.sum(tl.rand(seed, tl.zeros((1,), tl.int32)), 0) * row_sum  # one uniform: Philox at offset 0
    ends = tl.cumsum(weights, 0)
    # The first chunk whose running sum passes the target (the last one that has any weight, should
    # rounding leave the target at the very end); greedy rows take the first chunk holding the maximum.
    last_weighted = tl.max(tl.where(weights > 0.0, index, 0), 0)
    sampled_chunk = tl.minimum(tl.sum((ends <= target).to(tl.int32), 0), last_weighted)
    greedy_chunk = tl.min(tl.where(tops == row_max, index, CHUNKS), 0)
    chunk = tl.where(greedy, greedy_chunk, sampled_chunk)
    before = tl.sum(tl.where(index < chunk, weights, 0.0), 0)
    chunk_top = tl.max(tl.where(index == chunk, tops, float("-inf")), 0)

    lane = tl.arange(0, CHUNK)
    cols = chunk * CHUNK + lane
    z = _scaled(logits_ptr + row.to(tl.int64) * stride_row, cols, n_cols, scale)
    # The target inside the chunk, in the units of its own maximum.
    inside = (target - before) * tl.exp2(row_max - chunk_top)
    lane_weights = tl.exp2(z - chunk_top)
    running = tl.cumsum(lane_weights, 0)
    # Rounding may put the target just outside the chunk's own sum: the draw stays on a token of weight.
    first_positive = tl.min(tl.where(lane_weights > 0.0, lane, CHUNK), 0)
    last_positive = tl.max(tl.where(lane_weights > 0.0, lane, 0), 0)
    sampled_lane = tl.maximum(tl.minimum(tl.sum((running <= inside).to(tl.int32), 0), last_positive), first_positive)
    greedy_lane = tl.min(tl.where(z == chunk_top, lane, CHUNK), 0)
    picked = tl.where(greedy, greedy_lane, sampled_lane)
    picked_z = tl.max(tl.where(lane == picked, z, float("-inf")), 0)
    log_sum = row_max + tl.log2(row_sum)
    tl.store(out_ptr + row, (chunk * CHUNK + picked).to(tl.float64))
    tl.store(out_ptr + n_rows + row, ((picked_z - log_sum) * _LN2).to(tl.float64))
    if WITH_RANKS:
        tl.store(out_ptr + 2 * n_rows + row, 1.0)  # the rank kernel adds the count of larger logits


@triton.jit
def _rank_part_kernel(logits_ptr, stride_row, n_cols, out_ptr, n_rows, cols_per_part, BLOCK: tl.constexpr):
    """Adds to a row's rank the number of its logits in one part that exceed the sampled token's."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * stride_row
    sampled = tl.load(base + tl.load(out_ptr + row).to(tl.int64)).to(tl.float32)
    begin = part * cols_per_part
    end = tl.minimum(begin + cols_per_part, n_cols)
    count = tl.zeros((BLOCK,), tl.int32)
    for start in range(begin, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < end, other=float("-inf")).to(tl.float32)
        count += (x > sampled).to(tl.int32)
    tl.atomic_add(out_ptr + 2 * n_rows + row, tl.sum(count, 0).to(tl.float64))


def _as_int64_argument(seed: int) -> int:
    # Triton types an integer argument by its value: keep it above 2**31 so the kernel compiles once.
    return (seed & ((1 << 61) - 1)) | (1 << 61)


def draw_tokens(logits: torch.Tensor, temperature: torch.Tensor, step_seed: int,
                row_seeds: torch.Tensor | None = None, with_ranks: bool = False) -> torch.Tensor:
    """Sampled ids and their logprobs for every row of ``logits`` [rows, vocab], as one float64
    tensor [2, rows] (ids are exact in float64), ready for a single transfer to the host; with
    ``with_ranks``, [3, rows] whose last row is each sampled token's rank (1 + the number of larger
    logits, an order temperature does not change).

    ``temperature`` [rows] float32 (0 = greedy). A row's uniform is keyed by ``row_seeds[row]`` where
    that is >= 0, else by ``step_seed + row``.
    """
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty((3 if with_ranks else 2, rows), dtype=torch.float64, device=logits.device)
    if rows == 0:
        return out
    seeds = row_seeds if row_seeds is not None else out  # never read without HAS_ROW_SEEDS
    n_chunks = triton.cdiv(vocab, _CHUNK)
    # Enough programs per row to fill the GPU when the batch is small.
    chunks_per_program = triton.cdiv(n_chunks, max(1, min(n_chunks, _TARGET_PROGRAMS // rows)))
    programs_per_row = triton.cdiv(n_chunks, chunks_per_program)
    stats = torch.empty((rows, n_chunks, 2), dtype=torch.float32, device=logits.device)
    _chunk_stats_kernel[(rows, programs_per_row)](
        logits, logits.stride(0), vocab, temperature, stats, n_chunks, chunks_per_program, CHUNK=_CHUNK, num_warps=4,
    )
    _pick_kernel[(rows,)](
        logits, logits.stride(0), vocab, temperature, seeds, _as_int64_argument(step_seed), stats, n_chunks, out, rows,
        HAS_ROW_SEEDS=row_seeds is not None, CHUNKS=triton.next_power_of_2(n_chunks), CHUNK=_CHUNK,
        WITH_RANKS=with_ranks, num_warps=4,
    )
    if with_ranks:
        _rank_part_kernel[(rows, programs_per_row)](logits, logits.stride(0), vocab, out, rows,
                                                    chunks_per_program * _CHUNK, BLOCK=_CHUNK, num_warps=4)
    return out
