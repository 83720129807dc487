"""Token log-probabilities and entropies of [N, V] logits in one Triton pass each way (CUDA only).

Forward: one program per row streams the vocabulary once, keeping the row's running maximum and, per
lane, the sums Σ e^(z−m) and Σ e^(z−m)·(z−m) of z = x / T, so that the logsumexp, the token's logp
and the entropy come out together and nothing of the vocabulary's size is written. Backward: one
program per (row, block of columns) writes g · (onehot(token) − softmax) / T in the logits' dtype.
Both read the logits in their own dtype and compute in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The largest finite float32: a running maximum that starts here never turns exp() into nan.
_LOWEST = tl.constexpr(-3.0e38)
_FORWARD_BLOCK = 4096  # columns per loop iteration of a row
_BACKWARD_BLOCK = 4096  # columns per program


@triton.jit
def _token_logps_forward_kernel(
    logits_ptr, stride_row, n_cols, token_ids_ptr, inv_t, logsumexp_ptr, logps_ptr, entropy_ptr,
    WITH_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride_row
    lane = tl.arange(0, BLOCK)
    row_max = tl.full((), _LOWEST, tl.float32)
    sum_exp = tl.zeros((BLOCK,), tl.float32)
    # Σ e^(z−m)·(z−m) relative to the running maximum m: every term is ≤ 0, so the entropy
    # log Σ e^(z−m) − Σ e^(z−m)·(z−m) / Σ e^(z−m) adds two non-negative numbers, with no cancellation.
    sum_exp_shifted = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + lane
        z = tl.load(base + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32) * inv_t
        new_max = tl.maximum(row_max, tl.max(z, 0))
        shift = row_max - new_max
        rescale = tl.exp(shift)
        e = tl.exp(z - new_max)
        # e = 0 where z = -inf (padding, masked vocabulary), whose 0·(-inf) would be nan.
        sum_exp_shifted = rescale * (sum_exp_shifted + sum_exp * shift) + tl.where(e > 0.0, e * (z - new_max), 0.0)
        sum_exp = rescale * sum_exp + e
        row_max = new_max
    total = tl.sum(sum_exp, 0)
    log_total = tl.log(total)
    logsumexp = row_max + log_total
    tl.store(logsumexp_ptr + row, logsumexp)
    token = tl.load(token_ids_ptr + row)
    # An id outside the vocabulary gives a nan logp instead of a read out of bounds.
    token_logit = tl.load(base + token, mask=(token >= 0) & (token < n_cols), other=float("nan"))
    tl.store(logps_ptr + row, token_logit.to(tl.float32) * inv_t - logsumexp)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, log_total - tl.sum(sum_exp_shifted, 0) / total)


@triton.jit
def _token_logps_backward_kernel(
    logits_ptr, grad_logits_ptr, stride_row, n_cols, token_ids_ptr, inv_t, logsumexp_ptr, grad_logps_ptr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = cols < n_cols
    offset = row.to(tl.int64) * stride_row
    grad_scaled = tl.load(grad_logps_ptr + row) * inv_t
    out_dtype = grad_logits_ptr.dtype.element_ty
    # Rows without gradient (padding, masked tokens) skip reading their logits.
    if grad_scaled == 0.0:
        tl.store(grad_logits_ptr + offset + cols, tl.zeros((BLOCK,), out_dtype), mask=in_row)
    else:
        token = tl.load(token_ids_ptr + row)
        logsumexp = tl.load(logsumexp_ptr + row)
        x = tl.load(logits_ptr + offset + cols, mask=in_row, other=0.0).to(tl.float32)
        probs = tl.exp(x * inv_t - logsumexp)
        grad = grad_scaled * (tl.where(cols == token, 1.0, 0.0) - probs)
        tl.store(grad_logits_ptr + offset + cols, grad.to(out_dtype), mask=in_row)


def forward(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, logsumexp: torch.Tensor,
            logps: torch.Tensor, entropy: torch.Tensor | None) -> None:
    """Fill the rows' logsumexp of logits / T, the tokens' logps (and the entropies) from contiguous
    [N, V] logits."""
    n_rows, n_cols = logits.shape
    if n_rows > 0:
        _token_logps_forward_kernel[(n_rows,)](
            logits, logits.stride(0), n_cols, token_ids, 1.0 / temperature, logsumexp, logps,
            logsumexp if entropy is None else entropy,  # never written without WITH_ENTROPY
            WITH_ENTROPY=entropy is not None, BLOCK=_FORWARD_BLOCK, num_warps=8,
        )


def backward(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float, logsumexp: torch.Tensor,
             grad_logps: torch.Tensor, grad_logits: torch.Tensor) -> None:
    """Fill ``grad_logits`` (the logits' shape and dtype) with grad_logps · (onehot − softmax) / T."""
    n_rows, n_cols = logits.shape
    if n_rows > 0:
        _token_logps_backward_kernel[(n_rows, triton.cdiv(n_cols, _BACKWARD_BLOCK))](
            logits, grad_logits, logits.stride(0), n_cols, token_ids, 1.0 / temperature, logsumexp,
            grad_logps.contiguous(), BLOCK=_BACKWARD_BLOCK, num_warps=4,
        )
