"""The categorical draw of the sampler in one pass over the logits: Gumbel-max with counter-based noise.

Per row: token = argmax(logits / T + Gumbel noise) (argmax of the logits when T = 0), and its
logprob under log_softmax(logits / T) (T taken as 1 for greedy rows), with the log-sum-exp kept
online while the row streams through. The noise of a row comes from Philox keyed by the row's
seed, so a seeded sequence draws the same noise whatever else is in the batch. A row is split into
parts that run side by side (a batch of a few hundred rows alone would leave most of the GPU idle),
and a second small kernel combines the parts. The logits are read once, in their own dtype; nothing
of the vocabulary's size is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The largest finite float32: a running maximum that starts here never turns exp() into nan.
_LOWEST = tl.constexpr(-3.0e38)
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_CHUNK = 2048  # columns per loop iteration of a part: four quarters of one Philox call each
_MAX_PARTS = 16
_TARGET_PROGRAMS = 2048


@triton.jit
def _approx_log2(x):
    # The PTX approximation (absolute error ~2^-22): a few instructions where the precise log takes
    # dozens. Used for the outer log of the noise only, whose error then shifts a score by ~1e-7.
    return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _scaled(base, cols, end, scale):
    x = tl.load(base + cols, mask=cols < end, other=0.0)
    return tl.where(cols < end, x.to(tl.float32) * scale, float("-inf"))


@triton.jit
def _keep_best(z, cols, u, greedy, best_score, best_z, best_col):
    """Fold one quarter-chunk's noisy scores into the per-lane winners (the earlier column wins a tie)."""
    # z is in base 2 (logit / T · log2 e): log2(e) · (z_e − ln(−ln u)) = z − log2(−ln u), the same argmax.
    # The inner log stays precise: for u near 1 it is tiny, and the approximation's error is not.
    score = tl.where(greedy, z, z - _approx_log2(-tl.log(u)))
    better = score > best_score
    return tl.where(better, score, best_score), tl.where(better, z, best_z), tl.where(better, cols, best_col)


@triton.jit(do_not_specialize=["step_seed"])
def _draw_part_kernel(
    logits_ptr, stride_row, n_cols, temperature_ptr, seeds_ptr, step_seed, parts_ptr, cols_per_part,
    HAS_ROW_SEEDS: tl.constexpr, QUARTER: tl.constexpr,
):
    """One part of a row's columns: its log-sum-exp, best noisy score, that column and its z."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    scale = tl.where(greedy, 1.0, 1.0 / temperature) * _LOG2E
    seed = step_seed + row
    if HAS_ROW_SEEDS:
        row_seed = tl.load(seeds_ptr + row)
        seed = tl.where(row_seed >= 0, row_seed, seed)
    lane = tl.arange(0, QUARTER)
    m = tl.full((QUARTER,), _LOWEST, tl.float32)
    s = tl.zeros((QUARTER,), tl.float32)
    best_score = tl.full((QUARTER,), float("-inf"), tl.float32)
    best_z = tl.full((QUARTER,), float("-inf"), tl.float32)
    best_col = tl.zeros((QUARTER,), tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    begin = part * cols_per_part
    end = tl.minimum(begin + cols_per_part, n_cols)
    for start in range(begin, end, 4 * QUARTER):
        # One Philox call gives four uniforms, one for each quarter of the chunk; the counter is the
        # column, so the noise does not depend on how the row is split into parts.
        u0, u1, u2, u3 = tl.rand4x(seed, start // 4 + lane)
        c0 = start + lane
        c1 = c0 + QUARTER
        c2 = c1 + QUARTER
        c3 = c2 + QUARTER
        z0 = _scaled(base, c0, end, scale)
        z1 = _scaled(base, c1, end, scale)
        z2 = _scaled(base, c2, end, scale)
        z3 = _scaled(base, c3, end, scale)
        # The running sum of exp2(z − m) per lane, rescaled once per chunk rather than once per column.
        new_m = tl.maximum(tl.maximum(m, tl.maximum(z0, z1)), tl.maximum(z2, z3))
        s = (s * tl.exp2(m - new_m) + (tl.exp2(z0 - new_m) + tl.exp2(z1 - new_m))
             + (tl.exp2(z2 - new_m) + tl.exp2(z3 - new_m)))
        m = new_m
        best_score, best_z, best_col = _keep_best(z0, c0, u0, greedy, best_score, best_z, best_col)
        best_score, best_z, best_col = _keep_best(z1, c1, u1, greedy, best_score, best_z, best_col)
        best_score, best_z, best_col = _keep_best(z2, c2, u2, greedy, best_score, best_z, best_col)
        best_score, best_z, best_col = _keep_best(z3, c3, u3, greedy, best_score, best_z, best_col)
    part_max = tl.max(m, 0)
    top = tl.max(best_score, 0)
    # The first column among the lanes' winners, as argmax returns it.
    col = tl.min(tl.where(best_score == top, best_col, n_cols), 0)
    out = parts_ptr + (row * tl.num_programs(1) + part) * 4
    # The part's log-sum-exp and the winner's z leave in natural units (the combine kernel's).
    tl.store(out, (part_max + tl.log2(tl.sum(s * tl.exp2(m - part_max), 0))) * _LN2)
    tl.store(out + 1, top)
    tl.store(out + 2, col.to(tl.float32))
    tl.store(out + 3, tl.max(tl.where(best_col == col, best_z, float("-inf")), 0) * _LN2)


@triton.jit
def _draw_combine_kernel(parts_ptr, n_parts, n_cols, out_ptr, n_rows, PARTS: tl.constexpr, WITH_RANKS: tl.constexpr):
    row = tl.program_id(0)
    index = tl.arange(0, PARTS)
    mask = index < n_parts
    base = parts_ptr + (row * n_parts + index) * 4
    log_sums = tl.load(base, mask=mask, other=float("-inf"))
    tops = tl.load(base + 1, mask=mask, other=float("-inf"))
    cols = tl.load(base + 2, mask=mask, other=n_cols)
    zs = tl.load(base + 3, mask=mask, other=float("-inf"))
    largest = tl.max(log_sums, 0)
    log_sum = largest + tl.log(tl.sum(tl.exp(log_sums - largest), 0))
    top = tl.max(tops, 0)
    col = tl.min(tl.where(tops == top, cols, n_cols), 0)
    z = tl.max(tl.where(cols == col, zs, float("-inf")), 0)
    tl.store(out_ptr + row, col.to(tl.float64))
    tl.store(out_ptr + n_rows + row, (z - log_sum).to(tl.float64))
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

    ``temperature`` [rows] float32 (0 = greedy). A row's noise is keyed by ``row_seeds[row]`` where
    that is >= 0, else by ``step_seed + row``.
    """
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty((3 if with_ranks else 2, rows), dtype=torch.float64, device=logits.device)
    if rows == 0:
        return out
    seeds = row_seeds if row_seeds is not None else out  # never read without HAS_ROW_SEEDS
    # Enough parts per row to fill the GPU when the batch is small; a part is whole chunks of columns.
    chunks = triton.cdiv(vocab, _CHUNK)
    chunks_per_part = triton.cdiv(chunks, max(1, min(_MAX_PARTS, _TARGET_PROGRAMS // rows, chunks)))
    n_parts = triton.cdiv(chunks, chunks_per_part)
    parts = torch.empty((rows, n_parts, 4), dtype=torch.float32, device=logits.device)
    _draw_part_kernel[(rows, n_parts)](
        logits, logits.stride(0), vocab, temperature, seeds, _as_int64_argument(step_seed), parts,
        chunks_per_part * _CHUNK, HAS_ROW_SEEDS=row_seeds is not None, QUARTER=_CHUNK // 4, num_warps=4,
    )
    _draw_combine_kernel[(rows,)](parts, n_parts, vocab, out, rows, PARTS=triton.next_power_of_2(n_parts),
                                  WITH_RANKS=with_ranks, num_warps=1)
    if with_ranks:
        _rank_part_kernel[(rows, n_parts)](logits, logits.stride(0), vocab, out, rows, chunks_per_part * _CHUNK,
                                           BLOCK=_CHUNK, num_warps=4)
    return out
