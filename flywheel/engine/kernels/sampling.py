"""The categorical draw of the sampler in one pass over the logits: Gumbel-max with counter-based noise.

Per row: token = argmax(logits / T + Gumbel noise) (argmax of the logits when T = 0), and its
logprob under log_softmax(logits / T) (T taken as 1 for greedy rows), with the log-sum-exp kept
online while the row streams through. The noise of a row comes from Philox keyed by the row's
seed, so a seeded sequence draws the same noise whatever else is in the batch. The logits are read
once, in their own dtype; nothing of the vocabulary's size is written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The largest finite float32: a running maximum that starts here never turns exp() into nan.
_LOWEST = tl.constexpr(-3.0e38)


@triton.jit
def _fold(x, cols, n_cols, u, inv_t, greedy, m, s, best_score, best_z, best_col):
    """Fold one quarter-chunk into per-lane running states: elementwise, no reduction in the loop."""
    z = tl.where(cols < n_cols, x.to(tl.float32) * inv_t, float("-inf"))
    score = tl.where(greedy, z, z - tl.log(-tl.log(u)))
    new_m = tl.maximum(m, z)
    s = s * tl.exp(m - new_m) + tl.exp(z - new_m)
    better = score > best_score
    return (new_m, s, tl.where(better, score, best_score), tl.where(better, z, best_z),
            tl.where(better, cols, best_col))


@triton.jit(do_not_specialize=["step_seed"])
def _draw_kernel(
    logits_ptr, stride_row, n_cols, temperature_ptr, seeds_ptr, step_seed, out_ptr, n_rows,
    HAS_ROW_SEEDS: tl.constexpr, QUARTER: tl.constexpr,
):
    row = tl.program_id(0)
    temperature = tl.load(temperature_ptr + row)
    greedy = temperature == 0.0
    inv_t = tl.where(greedy, 1.0, 1.0 / temperature)
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
    for start in range(0, n_cols, 4 * QUARTER):
        # One Philox call gives four uniforms: one for each quarter of the chunk.
        u0, u1, u2, u3 = tl.rand4x(seed, start // 4 + lane)
        c0 = start + lane
        c1 = c0 + QUARTER
        c2 = c1 + QUARTER
        c3 = c2 + QUARTER
        x0 = tl.load(base + c0, mask=c0 < n_cols, other=0.0)
        x1 = tl.load(base + c1, mask=c1 < n_cols, other=0.0)
        x2 = tl.load(base + c2, mask=c2 < n_cols, other=0.0)
        x3 = tl.load(base + c3, mask=c3 < n_cols, other=0.0)
        m, s, best_score, best_z, best_col = _fold(x0, c0, n_cols, u0, inv_t, greedy, m, s, best_score, best_z, best_col)
        m, s, best_score, best_z, best_col = _fold(x1, c1, n_cols, u1, inv_t, greedy, m, s, best_score, best_z, best_col)
        m, s, best_score, best_z, best_col = _fold(x2, c2, n_cols, u2, inv_t, greedy, m, s, best_score, best_z, best_col)
        m, s, best_score, best_z, best_col = _fold(x3, c3, n_cols, u3, inv_t, greedy, m, s, best_score, best_z, best_col)
    row_max = tl.max(m, 0)
    log_sum = row_max + tl.log(tl.sum(s * tl.exp(m - row_max), 0))
    top = tl.max(best_score, 0)
    # The first column among the lanes' winners, as argmax returns it.
    col = tl.min(tl.where(best_score == top, best_col, n_cols), 0)
    z = tl.max(tl.where(best_col == col, best_z, float("-inf")), 0)
    tl.store(out_ptr + row, col.to(tl.float64))
    tl.store(out_ptr + n_rows + row, (z - log_sum).to(tl.float64))


def _as_int64_argument(seed: int) -> int:
    # Triton types an integer argument by its value: keep it above 2**31 so the kernel compiles once.
    return (seed & ((1 << 61) - 1)) | (1 << 61)


def draw_tokens(logits: torch.Tensor, temperature: torch.Tensor, step_seed: int,
                row_seeds: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled ids and their logprobs for every row of ``logits`` [rows, vocab], as one float64
    tensor [2, rows] (ids are exact in float64), ready for a single transfer to the host.

    ``temperature`` [rows] float32 (0 = greedy). A row's noise is keyed by ``row_seeds[row]`` where
    that is >= 0, else by ``step_seed + row``.
    """
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty((2, rows), dtype=torch.float64, device=logits.device)
    if rows == 0:
        return out
    seeds = row_seeds if row_seeds is not None else out  # never read without HAS_ROW_SEEDS
    _draw_kernel[(rows,)](
        logits, logits.stride(0), vocab, temperature, seeds, _as_int64_argument(step_seed), out, rows,
        HAS_ROW_SEEDS=row_seeds is not None, QUARTER=512, num_warps=4,
    )
    return out
